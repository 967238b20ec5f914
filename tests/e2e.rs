//! End to end, with real processes: the `agentsync` binary, the real OpenCode server it spawns,
//! the mock model server, and the fake Convex deployment, all on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentsync::backend::contract::Message;
use agentsync::clock::{Clock, Millis, SystemClock};
use agentsync::events::{ChatStatus, Role};
use agentsync::ports::AgentServer;
use agentsync::sim::convex::{ConvexFaults, FakeConvex};
use agentsync::sim::model::{MockModel, REPLY_PREFIX};
use common::opencode::{opencode_bin, Project};
use common::proxy::CountingProxy;
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
    /// `agentsync run --spawn-agent` in the project.
    fn start(project: &Project, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let bin = opencode_bin();
        let agent = [
            "--spawn-agent",
            "--agent-dir",
            project.dir.to_str().unwrap(),
            "--opencode-bin",
            bin.to_str().unwrap(),
        ];
        Self::launch(project, data, &agent, extra, env)
    }

    /// `agentsync run --agent-url URL`.
    fn at_url(project: &Project, data: &Path, url: &str, extra: &[&str]) -> Self {
        Self::launch(project, data, &["--agent-url", url], extra, &[])
    }

    fn launch(
        project: &Project,
        data: &Path,
        agent: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
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
        .args(agent)
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

/// `agentsync SUB --data-dir DATA ARGS... --json`, succeeded, as parsed JSON lines.
fn json_lines(data: &Path, sub: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut args = args.to_vec();
    args.push("--json");
    let out = common::agentsync_in(data, sub, &args);
    assert!(out.status.success(), "{}", common::stderr(&out));
    common::stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `agentsync send DATA new TEXT --wait 60`, run off the async workers.
async fn send_new(data: &Path, text: &str) -> std::process::Output {
    let (data, text) = (data.to_owned(), text.to_owned());
    tokio::task::spawn_blocking(move || {
        common::agentsync_in(&data, "send", &["new", &text, "--wait", "60"])
    })
    .await
    .unwrap()
}

/// The pids of the OpenCode servers a data directory's log says were spawned.
fn spawned_pids(data: &Path) -> Vec<u32> {
    json_lines(data, "replay", &["--kind", "agent_server_started"])
        .iter()
        .map(|v| v["body"]["pid"].as_u64().unwrap() as u32)
        .collect()
}

fn gone(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_err()
}

/// Prints the worker logs when the test panics: they live in a temporary directory that is
/// gone once the test ends.
struct DumpOnPanic(Vec<PathBuf>);

impl Drop for DumpOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.0 {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                eprintln!("===== {} =====\n{text}", p.display());
            }
        }
    }
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

/// Why the user message `id` failed, if the worker failed it.
fn failure(conversation: &[Message], id: &str) -> Option<String> {
    conversation
        .iter()
        .find(|m| m.message_id == id && m.role == Role::User)
        .and_then(|m| m.error.clone())
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

    let out = send_new(&data, "this will OVERFLOW").await;
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

    let out = send_new(&data, "and this one works").await;
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
    // The chain is linked: the prompt follows from the message's observation.
    let events: Vec<serde_json::Value> = json_lines(&data, "why", &[&message])
        .into_iter()
        .map(|l| l["event"].clone())
        .collect();
    let seen = events
        .iter()
        .find(|e| e["kind"] == "backend_message_seen")
        .expect("the observation");
    let planned = events
        .iter()
        .find(|e| {
            e["kind"] == "command_planned" && e["body"]["command_id"] == format!("prompt:{message}")
        })
        .expect("the prompt planned");
    assert_eq!(planned["cause"], seen["id"], "{planned}");
    let prompt_failures: Vec<String> = json_lines(&data, "replay", &["--kind", "command_failed"])
        .iter()
        .map(|e| e.to_string())
        .filter(|l| l.contains(&format!("prompt:{message}")))
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
    let log = (first.stderr.clone(), second.stderr.clone());
    let _dump = DumpOnPanic(vec![log.0, log.1]);
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

/// The wall clock moved back by an adjustable amount: a deployment whose old messages were
/// written minutes ago.
#[derive(Default)]
struct PastClock(std::sync::atomic::AtomicU64);

impl PastClock {
    fn set_behind(&self, ms: Millis) {
        self.0.store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for PastClock {
    fn now_ms(&self) -> Millis {
        SystemClock.now_ms() - self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Mutation calls to the fake so far, by function name.
fn mutations(fake: &FakeConvex, name: &str) -> usize {
    let path = format!("agentsync:{name}");
    fake.calls()
        .iter()
        .filter(|c| c.kind == "mutation" && c.path == path)
        .count()
}

/// DESIGN.md's incident at full size, against the real OpenCode server: the backend holds 265
/// active chat sessions (255 linked, 10 whose agent session is gone), the agent server 345
/// sessions (90 new, 20 renamed), 3 user messages went stale before the worker started and 5
/// are fresh. The worker starts while the agent server is unreachable, then it comes up, the
/// worker is SIGKILLed during the storm and restarted, then stopped and restarted once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_incident_at_full_size_converges_once_through_an_outage_and_a_sigkill() {
    const LINKED: usize = 255;
    const NEW: usize = 90;
    const GONE: usize = 10;
    const RENAMED: usize = 20;
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let (mut server, client) = project.start(None).await;

    // The agent server: 255 + 90 sessions, and 10 created then deleted.
    let mut agent_ids = Vec::new();
    for chunk in (0..LINKED + NEW + GONE).collect::<Vec<_>>().chunks(10) {
        let calls = chunk.iter().map(|&i| {
            let client = client.clone();
            async move { client.create_session(&format!("Session {i}"), None).await }
        });
        for s in futures_util::future::join_all(calls).await {
            agent_ids.push(s.unwrap().agent_session_id);
        }
    }
    for id in &agent_ids[LINKED + NEW..] {
        client.delete_session(id).await.unwrap();
    }
    for (i, id) in agent_ids[..RENAMED].iter().enumerate() {
        client
            .rename_session(id, &format!("Session {i} (renamed)"))
            .await
            .unwrap();
    }

    // The backend, its slow calls making the storm last: written 20 minutes ago.
    let past = Arc::new(PastClock::default());
    past.set_behind(20 * 60_000);
    let fake = FakeConvex::start("agentsync", None, past.clone())
        .await
        .unwrap();
    fake.set_faults(ConvexFaults {
        latency_ms: 40,
        ..ConvexFaults::default()
    });
    let store = fake.store();
    let mut chat_of = std::collections::HashMap::new();
    for i in (0..LINKED).chain(LINKED + NEW..LINKED + NEW + GONE) {
        let created = store
            .mutation(
                "createSession",
                serde_json::json!({
                    "commandId": format!("seed-{i}"),
                    "workerId": WORKER,
                    "agentSessionId": agent_ids[i].to_string(),
                    "title": format!("Session {i}"),
                }),
            )
            .unwrap();
        let chat = created["chatSessionId"].as_str().unwrap().to_owned();
        chat_of.insert(agent_ids[i].to_string(), chat);
    }
    let chat = |i: usize| chat_of[&agent_ids[i].to_string()].clone();
    let stale: Vec<(String, String)> = (30..33)
        .map(|i| {
            let m = store.post_user_message(&chat(i), "hello?").unwrap();
            (chat(i), m.message_id)
        })
        .collect();
    past.set_behind(0);
    let fresh: Vec<(String, String)> = (40..45)
        .map(|i| {
            let m = store
                .post_user_message(&chat(i), &format!("question {i}"))
                .unwrap();
            (chat(i), m.message_id)
        })
        .collect();

    // The worker starts with the agent server unreachable: nothing listens on its port yet.
    let port = free_port();
    let agent_url = format!("http://127.0.0.1:{port}");
    let data = project.root.path().join("data");
    let args = ["--backend", "convex", "--convex-url", fake.url.as_str()];
    let mut worker = WorkerProcess::at_url(&project, &data, &agent_url, &args);
    until("two backend listings", Duration::from_secs(60), || {
        let listings = fake
            .calls()
            .iter()
            .filter(|c| c.path == "agentsync:listSessions" && c.status == 200)
            .count();
        (listings >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(
        worker.get("/readyz").await.map(|r| r.0),
        Some(200),
        "Ready without ever listing the agent server"
    );
    let (_, metrics) = worker.get("/metrics").await.unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("agentsync_observation_failures_total{source=\"agent\"}")
            && !l.ends_with(" 0")),
        "the agent server's failed listings are counted:\n{metrics}"
    );
    assert_eq!(
        mutations(&fake, "markSessionDeleted"),
        0,
        "a chat session was marked deleted while the agent server was down"
    );
    assert_eq!(mutations(&fake, "createSession"), 0);

    // The agent server comes up on that port; kill the worker in the middle of the storm.
    let proxy = CountingProxy::start_on(port, &client.base_url()).await;
    worker.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while mutations(&fake, "createSession") < 20 {
        assert!(Instant::now() < deadline, "no storm:\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.signal(Signal::SIGKILL);
    worker.exit_within(Duration::from_secs(10)).await;
    let created_before_kill = mutations(&fake, "createSession");
    assert!(
        created_before_kill < NEW,
        "killed after the storm, not during it ({created_before_kill} creations)"
    );
    let mut worker = WorkerProcess::at_url(&project, &data, &agent_url, &args);
    worker.wait_ready().await;

    // Converged: every effect in the backend, each once.
    let progress = || {
        let chats = store.chats(WORKER).unwrap();
        // Answered (a completed reply) or failed (the user message carries the reason).
        let answered = |list: &[(String, String)]| {
            list.iter()
                .filter(|(c, m)| {
                    let conversation = store.conversation(c).unwrap();
                    replies(&conversation, m).iter().any(|r| r.completed)
                        || failure(&conversation, m).is_some()
                })
                .count()
        };
        let deleted = chats
            .iter()
            .filter(|c| c.status == ChatStatus::Deleted)
            .count();
        let done = chats.len() == LINKED + GONE + NEW
            && deleted == GONE
            && answered(&stale) == stale.len()
            && answered(&fresh) == fresh.len();
        let said = format!(
            "{} chats, {deleted} deleted, {} stale and {} fresh answered",
            chats.len(),
            answered(&stale),
            answered(&fresh)
        );
        (done, chats, said)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let chats = loop {
        let (done, chats, said) = progress();
        if done {
            break chats;
        }
        assert!(
            Instant::now() < deadline,
            "not converged in 120 s: {said}\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut per_agent = std::collections::HashMap::<String, usize>::new();
    for c in &chats {
        *per_agent
            .entry(c.agent_session_id.clone().expect("every chat is linked"))
            .or_default() += 1;
    }
    assert!(
        per_agent.values().all(|&n| n == 1),
        "an agent session got two chat sessions"
    );
    for (i, id) in agent_ids.iter().enumerate() {
        let c = chats
            .iter()
            .find(|c| c.agent_session_id.as_deref() == Some(id.as_str()))
            .unwrap();
        let (status, title) = match i {
            i if i >= LINKED + NEW => (ChatStatus::Deleted, format!("Session {i}")),
            i if i < RENAMED => (ChatStatus::Active, format!("Session {i} (renamed)")),
            i => (ChatStatus::Active, format!("Session {i}")),
        };
        assert_eq!((c.status, &c.title), (status, &title), "session {i}");
    }
    for (c, m) in &stale {
        let conversation = store.conversation(c).unwrap();
        let reason = failure(&conversation, m).expect("failed");
        assert!(reason.contains("still incomplete"), "{reason}");
        assert!(
            replies(&conversation, m).is_empty(),
            "a stale {m} was prompted"
        );
    }
    for (c, m) in &fresh {
        let r = replies(&store.conversation(c).unwrap(), m);
        assert_eq!(r.len(), 1, "fresh {m}: one answer, {r:?}");
        assert!(r[0].content.starts_with(REPLY_PREFIX), "{r:?}");
    }
    assert_eq!(
        proxy.count("GET", "/config/providers"),
        1,
        "model fetches across both runs: {:?}",
        proxy.calls()
    );
    assert!(
        fake.peak_in_flight() <= 10,
        "backend peak in flight {}",
        fake.peak_in_flight()
    );
    assert!(
        proxy.peak_in_flight() <= 10,
        "agent peak in flight {}",
        proxy.peak_in_flight()
    );
    let failures: std::collections::BTreeSet<_> = fake
        .calls()
        .into_iter()
        .filter(|c| c.path == "agentsync:failMessage")
        .filter_map(|c| c.command_id)
        .collect();
    assert_eq!(
        failures.len(),
        3,
        "one failMessage per stale message: {failures:?}"
    );

    eprintln!(
        "incident: killed after {created_before_kill} of {NEW} creations; peak in flight: \
         backend {}, agent {}; model fetches 1; {} backend calls, {} agent calls",
        fake.peak_in_flight(),
        proxy.peak_in_flight(),
        fake.calls().len(),
        proxy.calls().len()
    );

    // Stopped and started again: the stale messages are not failed again, nothing is redone.
    worker.signal(Signal::SIGTERM);
    let (status, _) = worker.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    let calls_before = fake.calls().len();
    let listings_before = proxy.count("GET", "/session");
    let mut worker = WorkerProcess::at_url(&project, &data, &agent_url, &args);
    worker.wait_ready().await;
    until(
        "a full listing after the restart",
        Duration::from_secs(30),
        || (proxy.count("GET", "/session") > listings_before).then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<_> = fake.calls()[calls_before..]
        .iter()
        .filter(|c| c.kind == "mutation")
        .map(|c| c.path.clone())
        .collect();
    assert!(after.is_empty(), "mutations after the restart: {after:?}");
    assert_eq!(proxy.count("GET", "/config/providers"), 1);
    worker.signal(Signal::SIGTERM);
    let (status, _) = worker.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    server.shutdown().await;
}

/// SIGTERM while a prompt is with the model: the worker lets it finish within the grace period
/// and exits 0; the answer, recorded in the log, reaches the backend after a restart without
/// asking the model again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_prompt_lets_it_finish_and_the_answer_lands_after_restart_unasked() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let fake = FakeConvex::start("agentsync", None, Arc::new(SystemClock))
        .await
        .unwrap();
    let store = fake.store();
    let chat = store.open_chat(WORKER, "slow one").unwrap();
    let asked = store
        .post_user_message(&chat.chat_session_id, "SLOW:2500 take your time")
        .unwrap();
    let data = project.root.path().join("data");
    let args = ["--backend", "convex", "--convex-url", fake.url.as_str()];
    let mut worker = WorkerProcess::start(&project, &data, &args, &[]);
    worker.wait_ready().await;
    let asked_model = || model.requests.load(std::sync::atomic::Ordering::SeqCst);
    until("the prompt at the model", Duration::from_secs(60), || {
        (asked_model() > 0).then_some(())
    })
    .await;
    worker.signal(Signal::SIGTERM);
    let (status, took) = worker.exit_within(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    // 5 s of drain grace, then at most 5 s to stop the spawned server.
    assert!(took < Duration::from_secs(10), "drained in {took:?}");
    let prompts = |data: &Path| -> Vec<serde_json::Value> {
        json_lines(data, "replay", &[])
            .into_iter()
            .filter(|e| e["body"]["op"] == "prompt")
            .collect()
    };
    let kinds: Vec<String> = prompts(&data)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        ["attempt_started", "command_succeeded"],
        "the prompt in flight at SIGTERM finished within the grace"
    );
    let stopping = json_lines(&data, "replay", &["--kind", "worker_stopping"]).remove(0);
    let succeeded = prompts(&data)
        .into_iter()
        .find(|e| e["kind"] == "command_succeeded")
        .unwrap();
    assert!(
        succeeded["seq"].as_u64() > stopping["seq"].as_u64(),
        "the prompt was still in flight when the worker began to stop"
    );
    let model_calls_at_stop = asked_model();

    let mut worker = WorkerProcess::start(&project, &data, &args, &[]);
    worker.wait_ready().await;
    let reply = until("the answer in the backend", Duration::from_secs(60), || {
        replies(
            &store.conversation(&chat.chat_session_id).unwrap(),
            &asked.message_id,
        )
        .into_iter()
        .find(|m| m.completed)
    })
    .await;
    assert_eq!(
        reply.content,
        format!("{REPLY_PREFIX}SLOW:2500 take your time")
    );
    assert_eq!(
        asked_model(),
        model_calls_at_stop,
        "the model was asked again"
    );
    worker.signal(Signal::SIGTERM);
    let (status, _) = worker.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    let attempts = prompts(&data)
        .iter()
        .filter(|e| e["kind"] == "attempt_started")
        .count();
    assert_eq!(attempts, 1, "one prompt attempt across both runs");
}
