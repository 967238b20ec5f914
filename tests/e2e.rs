//! End to end, with real processes: the `agentsync` binary, the real OpenCode server it spawns,
//! the mock model server, and the fake Convex deployment, all on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentsync::backend::contract::Message;
use agentsync::clock::SystemClock;
use agentsync::events::Role;
use agentsync::sim::convex::FakeConvex;
use common::model::{MockModel, REPLY_PREFIX};
use common::opencode::{opencode_bin, Project};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WORKER: &str = "w1";

/// A running `agentsync run`.
struct WorkerProcess {
    child: Child,
    metrics: String,
    stderr: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl WorkerProcess {
    fn start(project: &Project, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let metrics = format!("127.0.0.1:{port}");
        let stderr = data.with_extension(format!("{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentsync"));
        cmd.args([
            "run",
            "--data-dir",
            data.to_str().unwrap(),
            "--worker-id",
            WORKER,
        ])
        .args([
            "--spawn-agent",
            "--agent-dir",
            project.dir.to_str().unwrap(),
        ])
        .args(["--opencode-bin", opencode_bin().to_str().unwrap()])
        .args(["--metrics-addr", &metrics, "--drain-grace-secs", "5"])
        .args(extra)
        .envs(project.launch_config(None).env)
        .envs(env.iter().copied())
        .env("RUST_LOG", "agentsync=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
        let child = cmd.spawn().expect("start agentsync run");
        Self {
            child,
            metrics,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("http://{}{path}", self.metrics))
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.ok()?))
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agentsync run exited ({status}) before Ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not Ready in 90 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the exit, up to `limit`.
    async fn exit_within(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "still running after {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of the OpenCode servers a data directory's log says were spawned.
fn spawned_pids(data: &Path) -> Vec<u32> {
    let out = common::agentsync_in(
        data,
        "replay",
        &["--kind", "agent_server_started", "--json"],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    common::stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["body"]["pid"].as_u64().unwrap() as u32
        })
        .collect()
}

fn gone(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_err()
}

async fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn replies(conversation: &[Message], to: &str) -> Vec<Message> {
    conversation
        .iter()
        .filter(|m| m.role == Role::Assistant && m.reply_to.as_deref() == Some(to))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_posted_in_convex_is_answered_there_and_sigterm_drains_and_exits_0() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let fake = FakeConvex::start("agentsync", Some("dev:secret-key"), Arc::new(SystemClock))
        .await
        .unwrap();
    let store = fake.store();
    let chat = store.open_chat(WORKER, "a question").unwrap();
    let asked = store
        .post_user_message(&chat.chat_session_id, "what is six times seven?")
        .unwrap();
    let data = project.root.path().join("data");
    let mut worker = WorkerProcess::start(
        &project,
        &data,
        &[
            "--backend",
            "convex",
            "--convex-url",
            &fake.url,
            "--convex-key-env",
            "E2E_CONVEX_KEY",
        ],
        &[("E2E_CONVEX_KEY", "dev:secret-key")],
    );
    worker.wait_ready().await;
    let reply = until("the answer in the backend", Duration::from_secs(60), || {
        let conversation = store.conversation(&chat.chat_session_id).unwrap();
        replies(&conversation, &asked.message_id)
            .into_iter()
            .find(|m| m.completed)
    })
    .await;
    assert_eq!(
        reply.content,
        format!("{REPLY_PREFIX}what is six times seven?")
    );
    let (_, metrics) = worker.get("/metrics").await.unwrap();
    assert!(
        metrics
            .contains("agentsync_commands_total{kind=\"completeMessage\",outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(fake.peak_in_flight() <= 10);

    worker.signal(Signal::SIGTERM);
    let (status, took) = worker.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    assert!(took < Duration::from_secs(10), "drained in {took:?}");
    let log = worker.log();
    assert!(
        !log.contains("secret-key"),
        "the deploy key never reaches a log line"
    );
    for state in [
        "starting",
        "catching_up",
        "connecting",
        "observing",
        "ready",
        "draining",
        "stopped",
    ] {
        assert!(
            log.contains(&format!("state=\"{state}\"")) || log.contains(&format!("state={state}")),
            "no {state} line:\n{log}"
        );
    }
    for pid in spawned_pids(&data) {
        assert!(gone(pid), "the spawned opencode {pid} outlived the worker");
    }
    let export = common::agentsync_in(&data, "export", &[]);
    assert!(
        !common::stdout(&export).contains("secret-key"),
        "no secret in an event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_failed_once_and_replay_and_why_explain_it() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let data = project.root.path().join("data");
    let mut worker = WorkerProcess::start(&project, &data, &["--model", "mock/echo"], &[]);
    worker.wait_ready().await;

    let data2 = data.clone();
    let out = tokio::task::spawn_blocking(move || {
        common::agentsync_in(
            &data2,
            "send",
            &["new", "this will OVERFLOW", "--wait", "60"],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("ContextOverflowError"),
        "{}",
        common::stderr(&out)
    );
    let message = common::stdout(&out)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();

    let data3 = data.clone();
    let out = tokio::task::spawn_blocking(move || {
        common::agentsync_in(
            &data3,
            "send",
            &["new", "and this one works", "--wait", "60"],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains(&format!("{REPLY_PREFIX}and this one works")));

    worker.signal(Signal::SIGTERM);
    let (status, _) = worker.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));

    let why = common::agentsync_in(&data, "why", &[&message]);
    assert!(why.status.success(), "{}", common::stderr(&why));
    let text = common::stdout(&why);
    assert!(text.contains("ContextOverflowError"), "{text}");
    assert!(text.contains(&format!("failMessage:{message}")), "{text}");
    let failed = common::agentsync_in(&data, "replay", &["--kind", "command_failed", "--json"]);
    let prompt_failures: Vec<String> = common::stdout(&failed)
        .lines()
        .filter(|l| l.contains(&format!("prompt:{message}")))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        prompt_failures.len(),
        1,
        "a terminal failure is not retried: {prompt_failures:?}"
    );
    assert!(
        prompt_failures[0].contains("terminal"),
        "{}",
        prompt_failures[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_work_then_restart_applies_every_backend_effect_once() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let fake = FakeConvex::start("agentsync", None, Arc::new(SystemClock))
        .await
        .unwrap();
    let store = fake.store();
    let mut asked = Vec::new();
    for i in 0..12 {
        let chat = store.open_chat(WORKER, &format!("chat {i}")).unwrap();
        let m = store
            .post_user_message(&chat.chat_session_id, &format!("SLOW:300 question {i}"))
            .unwrap();
        asked.push((chat.chat_session_id, m.message_id));
    }
    let data = project.root.path().join("data");
    let args = ["--backend", "convex", "--convex-url", fake.url.as_str()];
    let mut first = WorkerProcess::start(&project, &data, &args, &[]);
    // Kill it once some, not all, of the work is done.
    until("some answers", Duration::from_secs(90), || {
        let done = fake
            .calls()
            .iter()
            .filter(|c| c.path.ends_with(":completeMessage") && c.status == 200)
            .count();
        (done >= 2).then_some(())
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.exit_within(Duration::from_secs(10)).await;
    let mut second = WorkerProcess::start(&project, &data, &args, &[]);
    second.wait_ready().await;
    until("every answer", Duration::from_secs(120), || {
        asked
            .iter()
            .all(|(chat, m)| {
                replies(&store.conversation(chat).unwrap(), m)
                    .iter()
                    .any(|r| r.completed)
            })
            .then_some(())
    })
    .await;
    for (chat, m) in &asked {
        let r = replies(&store.conversation(chat).unwrap(), m);
        assert_eq!(r.len(), 1, "one reply to {m}");
        assert!(r[0].content.starts_with(REPLY_PREFIX), "{:?}", r[0]);
    }
    // Every chat session got exactly one agent session linked.
    let chats = store.chats(WORKER).unwrap();
    assert_eq!(chats.len(), 12, "no chat session was created twice");
    assert!(chats.iter().all(|c| c.agent_session_id.is_some()));
    second.signal(Signal::SIGTERM);
    let (status, _) = second.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", second.log());
    for pid in spawned_pids(&data) {
        assert!(gone(pid), "opencode {pid} outlived its worker");
    }
}
