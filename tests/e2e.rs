//! End to end, with real processes: the `agentsync` binary, the real OpenCode server it spawns,
//! the mock model server, and the fake Convex deployment, all on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentsync::agent::OpencodeProcess;
use agentsync::backend::contract::Message;
use agentsync::backend::store::{ContractStore, MemoryKv};
use agentsync::clock::{Clock, Millis, SystemClock};
use agentsync::events::{ChatStatus, Role};
use agentsync::ports::AgentServer;
use agentsync::sim::convex::{ConvexFaults, FakeConvex};
use agentsync::sim::model::{MockModel, REPLY_PREFIX};
use common::opencode::{opencode_bin, Project};
use common::proxy::{CountingProxy, Fault};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WORKER: &str = "w1";

/// A running `agentsync run`.
struct WorkerProcess {
    child: Child,
    metrics: String,
    stderr: PathBuf,
    data: PathBuf,
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
            data: data.to_owned(),
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

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for it to die of the SIGKILL a hook sent it.
    async fn killed(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        let (status, _) = self.exit_within(Duration::from_secs(10)).await;
        assert_eq!(status.signal(), Some(9), "not SIGKILLed: {status}");
    }

    /// Stops it with SIGTERM; it exits 0.
    async fn stop(&mut self) {
        self.signal(Signal::SIGTERM);
        let (status, _) = self.exit_within(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(0), "{}", self.log());
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
        if std::thread::panicking() {
            keep_evidence(&self.stderr, &self.data);
        }
    }
}

/// A failed test's worker log and data directory outlive the test's temporary directory:
/// copied under `$TMPDIR/agentsync-e2e/TEST/` (so `agentsync why --data-dir` and `replay` can
/// read what the worker did), the log's path and last lines on stderr.
fn keep_evidence(log: &Path, data: &Path) {
    let test = std::thread::current()
        .name()
        .unwrap_or("test")
        .replace("::", "-");
    let dir = std::env::temp_dir().join("agentsync-e2e").join(&test);
    // A run's evidence replaces an earlier run's, once (a test may drop several workers).
    static CLEARED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut cleared = CLEARED.lock().unwrap_or_else(|e| e.into_inner());
    if !cleared.contains(&test) {
        let _ = std::fs::remove_dir_all(&dir);
        cleared.push(test);
    }
    let kept = dir.join(log.file_name().unwrap_or_default());
    if let Err(e) = copy_dir(data, &dir.join("data")) {
        eprintln!("cannot keep the data directory {}: {e}", data.display());
    }
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::copy(log, &kept).is_ok() {
        let text = std::fs::read_to_string(&kept).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        eprintln!(
            "worker log kept at {} (data directory beside it); its end:\n{tail}",
            kept.display()
        );
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
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

async fn until<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    until_explained(what, limit, f, String::new).await
}

/// [`until`], saying what `explain` finds when the time is up.
async fn until_explained<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
    explain: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            explain()
        );
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
    // The backend holds the answer a moment before the worker has the reply of the call that
    // put it there (and counts it): wait for the count, then check it is one.
    let line = "agentsync_commands_total{kind=\"completeMessage\",outcome=\"succeeded\"} ";
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (_, metrics) = worker.get("/metrics").await.unwrap();
        if metrics.contains(line) || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metrics.contains(&format!("{line}1\n")), "{metrics}");
    assert!(fake.peak_in_flight() <= 10);
    the_spawned_server_holds_no_secret_and_wants_its_password(&worker).await;

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

/// The processes whose parent is `pid` (from `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`: comm may hold spaces, so read after the last `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            kids.push(child);
        }
    }
    kids
}

/// The spawned OpenCode sees neither the deploy key nor its variable (its tools run shell
/// commands for the model), and its API refuses a call without the password the worker gave it.
async fn the_spawned_server_holds_no_secret_and_wants_its_password(worker: &WorkerProcess) {
    let kids = children_of(worker.child.id());
    assert_eq!(kids.len(), 1, "one spawned server: {kids:?}");
    let environ = std::fs::read(format!("/proc/{}/environ", kids[0])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let vars: Vec<&str> = environ.split('\0').collect();
    assert!(
        !environ.contains("secret-key") && !environ.contains("E2E_CONVEX_KEY"),
        "the deploy key reached the agent's environment: {vars:?}"
    );
    assert!(
        vars.iter()
            .any(|v| v.starts_with("OPENCODE_SERVER_PASSWORD=") && v.len() > 60),
        "a random password of its own: {vars:?}"
    );
    let log = worker.log();
    let url = log
        .lines()
        .find_map(|l| l.split("agent server up url=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no agent url in the log:\n{log}"));
    let status = reqwest::get(format!("{url}/session"))
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 401, "its API without the password");
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
    // What each side did, for a failure to show (this test has been seen failing only now
    // and then): per message its chat's link, its replies and how often the model was asked
    // for it; every chat session; the backend's mutations. The workers' logs and the data
    // directory are kept when it fails (see `keep_evidence`).
    let explain = || {
        let texts = model.texts();
        let mut out = String::from(
            "message: chat -> agent session, replies (completed), model calls, failure\n",
        );
        for (i, (chat, m)) in asked.iter().enumerate() {
            let link = store
                .get_chat(chat)
                .unwrap()
                .and_then(|c| c.agent_session_id);
            let conversation = store.conversation(chat).unwrap();
            let r = replies(&conversation, m);
            let text = format!("SLOW:300 question {i}");
            out.push_str(&format!(
                "{m}: {chat} -> {link:?}, {} ({}), {}, {:?}\n",
                r.len(),
                r.iter().filter(|r| r.completed).count(),
                texts.iter().filter(|t| **t == text).count(),
                failure(&conversation, m)
            ));
        }
        for c in store.chats(WORKER).unwrap() {
            out.push_str(&format!(
                "chat {} {:?} {:?} -> {:?}\n",
                c.chat_session_id, c.title, c.status, c.agent_session_id
            ));
        }
        for (name, data) in [("first", &first), ("second", &second)] {
            out.push_str(&format!("{name} run: {}\n", data.stderr.display()));
        }
        let mut ops = std::collections::BTreeMap::<String, usize>::new();
        for e in fake.calls().iter().filter(|c| c.kind == "mutation") {
            *ops.entry(format!("{} {}", e.path, e.status)).or_default() += 1;
        }
        out.push_str(&format!("backend mutations: {ops:?}\n"));
        out
    };
    // Every message answered, or one failed (then it never will be: no need to wait on).
    let failed = || {
        asked
            .iter()
            .filter_map(|(chat, m)| failure(&store.conversation(chat).unwrap(), m))
            .collect::<Vec<_>>()
    };
    until_explained(
        "every answer",
        Duration::from_secs(120),
        || {
            let answered = asked.iter().all(|(chat, m)| {
                replies(&store.conversation(chat).unwrap(), m)
                    .iter()
                    .any(|r| r.completed)
            });
            (answered || !failed().is_empty()).then_some(())
        },
        explain,
    )
    .await;
    assert!(
        failed().is_empty(),
        "a message failed, none should:\n{}",
        explain()
    );
    for (chat, m) in &asked {
        let r = replies(&store.conversation(chat).unwrap(), m);
        assert_eq!(r.len(), 1, "one reply to {m}:\n{}", explain());
        assert!(r[0].content.starts_with(REPLY_PREFIX), "{:?}", r[0]);
    }
    // Every chat session got exactly one agent session linked.
    let chats = store.chats(WORKER).unwrap();
    assert_eq!(
        chats.len(),
        12,
        "no chat session was created twice:\n{}",
        explain()
    );
    assert!(
        chats.iter().all(|c| c.agent_session_id.is_some()),
        "{}",
        explain()
    );
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

/// A user message posted in the backend, and where: what the counts are taken of.
#[derive(Debug, Clone)]
struct Asked {
    chat: String,
    message: String,
    text: String,
}

/// The real OpenCode server behind the fault-injecting proxy, the fake Convex deployment and a
/// data directory: a worker started by [`Rig::worker`] reaches the agent server only through
/// the proxy, while the test looks at the real server directly.
struct Rig {
    model: MockModel,
    project: Project,
    server: OpencodeProcess,
    /// The real server's URL, not the proxy's.
    upstream: String,
    fake: FakeConvex,
    store: Arc<ContractStore<MemoryKv>>,
    proxy: CountingProxy,
    data: PathBuf,
    http: reqwest::Client,
}

impl Rig {
    async fn start() -> Self {
        let model = MockModel::start().await;
        let project = Project::new(&model);
        let (server, client) = project.start(None).await;
        let upstream = client.base_url();
        let fake = FakeConvex::start("agentsync", None, Arc::new(SystemClock))
            .await
            .unwrap();
        let store = fake.store();
        let proxy = CountingProxy::start(&upstream).await;
        let data = project.root.path().join("data");
        Self {
            model,
            project,
            server,
            upstream,
            fake,
            store,
            proxy,
            data,
            http: reqwest::Client::new(),
        }
    }

    /// `agentsync run --agent-url <the proxy> --backend convex`.
    fn worker(&self) -> WorkerProcess {
        let args = [
            "--backend",
            "convex",
            "--convex-url",
            self.fake.url.as_str(),
        ];
        WorkerProcess::at_url(&self.project, &self.data, &self.proxy.url(), &args)
    }

    /// A new chat session in the backend with one user message.
    fn ask_in_new_chat(&self, title: &str, text: &str) -> Asked {
        let chat = self.store.open_chat(WORKER, title).unwrap().chat_session_id;
        self.ask(&chat, text)
    }

    /// A user message in chat session `chat`.
    fn ask(&self, chat: &str, text: &str) -> Asked {
        let m = self.store.post_user_message(chat, text).unwrap();
        Asked {
            chat: chat.to_owned(),
            message: m.message_id,
            text: text.to_owned(),
        }
    }

    /// The backend's replies to `a`.
    fn replies(&self, a: &Asked) -> Vec<Message> {
        replies(&self.store.conversation(&a.chat).unwrap(), &a.message)
    }

    fn answered(&self, a: &Asked) -> bool {
        self.replies(a).iter().any(|r| r.completed)
    }

    /// Neither answered nor failed.
    fn pending(&self, a: &Asked) -> bool {
        let conversation = self.store.conversation(&a.chat).unwrap();
        replies(&conversation, &a.message).is_empty()
            && failure(&conversation, &a.message).is_none()
    }

    /// Waits until every one of `asked` has a completed reply in the backend.
    async fn all_answered(&self, asked: &[Asked], worker: &WorkerProcess) {
        until_explained(
            "every message answered in the backend",
            Duration::from_secs(120),
            || asked.iter().all(|a| self.answered(a)).then_some(()),
            || {
                let open: Vec<_> = asked.iter().filter(|a| !self.answered(a)).collect();
                format!(
                    "unanswered: {open:#?}\nagent calls: {:?}\n{}",
                    self.proxy.calls(),
                    worker.log()
                )
            },
        )
        .await;
    }

    /// `GET path` on the real server, as JSON.
    async fn agent_get(&self, path: &str) -> serde_json::Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.upstream))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    /// Every session the real server holds.
    async fn agent_sessions(&self) -> Vec<serde_json::Value> {
        let sessions = self.agent_get("/session?limit=1000").await;
        sessions.as_array().expect("a list of sessions").clone()
    }

    /// Waits until the real server runs nothing: every prompt sent, however it was lost on the
    /// way back, has finished (so the model calls are all counted).
    async fn agent_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.agent_get("/session/status").await;
            let busy: Vec<_> = status
                .as_object()
                .expect("a map of statuses")
                .iter()
                .filter(|(_, s)| s["type"] != "idle")
                .collect();
            if busy.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "still busy: {busy:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Everything that says how often `a` was acted on, on every side.
    async fn account(&self, a: &Asked) -> Account {
        let tagged = self
            .agent_sessions()
            .await
            .into_iter()
            .filter(|s| tag(s)["chatSessionId"] == a.chat.as_str())
            .collect::<Vec<_>>();
        let linked = self
            .store
            .get_chat(&a.chat)
            .unwrap()
            .unwrap()
            .agent_session_id;
        let replies = self.replies(a);
        let mut account = Account {
            asked: a.clone(),
            tagged: tagged
                .iter()
                .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
                .collect(),
            tags: tagged.iter().map(|s| tag(s).clone()).collect(),
            linked: linked.clone(),
            backend_replies: replies.len(),
            completed_replies: replies.iter().filter(|r| r.completed).count(),
            model_calls: self.model.asked(&a.text),
            user_messages: 0,
            text_parts: 0,
            agent_replies: 0,
        };
        if let Some(session) = linked {
            let history = self.agent_get(&format!("/session/{session}/message")).await;
            let history = history.as_array().expect("a list of messages");
            let texts = |m: &serde_json::Value| {
                m["parts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["type"] == "text")
                    .filter(|p| p["text"].as_str().is_some_and(|t| t.contains(&a.text)))
                    .count()
            };
            let users: Vec<_> = history
                .iter()
                .filter(|m| m["info"]["role"] == "user" && texts(m) > 0)
                .collect();
            account.user_messages = users.len();
            account.text_parts = users.iter().map(|m| texts(m)).sum();
            account.agent_replies = history
                .iter()
                .filter(|m| m["info"]["role"] == "assistant")
                .filter(|m| {
                    users
                        .iter()
                        .any(|u| u["info"]["id"] == m["info"]["parentID"])
                })
                .count();
        }
        account
    }

    /// Every count of each of `asked` is one: one model call, the user message once in
    /// OpenCode with one text part and one reply there, one completed reply in the backend, one
    /// OpenCode session tagged for its chat session and linked to it. A failure shows them all.
    async fn assert_once(&self, asked: &[Asked]) {
        let mut accounts = Vec::new();
        for a in asked {
            accounts.push(self.account(a).await);
        }
        let all = format!(
            "{accounts:#?}\nmodel texts: {:?}\nagent calls: {:?}",
            self.model.texts(),
            self.proxy.calls()
        );
        for account in &accounts {
            Self::assert_account_once(account, &all);
        }
    }

    fn assert_account_once(account: &Account, all: &str) {
        assert_eq!(account.model_calls, 1, "model calls: {all}");
        assert_eq!(account.user_messages, 1, "user messages in OpenCode: {all}");
        assert_eq!(account.text_parts, 1, "text parts in OpenCode: {all}");
        assert_eq!(
            account.agent_replies, 1,
            "assistant replies in OpenCode: {all}"
        );
        assert_eq!(account.backend_replies, 1, "replies in the backend: {all}");
        assert_eq!(account.completed_replies, 1, "completed replies: {all}");
        assert_eq!(account.tagged.len(), 1, "OpenCode sessions tagged: {all}");
        assert_eq!(
            account.linked.as_ref(),
            account.tagged.first(),
            "the chat session is linked to the tagged OpenCode session: {all}"
        );
    }

    /// The real server holds exactly one session per chat session, each tagged by this worker,
    /// and the backend no chat session beyond `chats` (no OpenCode session was mirrored back).
    async fn assert_one_session_per_chat(&self, chats: usize) {
        let sessions = self.agent_sessions().await;
        let summary: Vec<_> = sessions
            .iter()
            .map(|s| format!("{} {} {}", s["id"], s["title"], s["metadata"]))
            .collect();
        assert_eq!(
            sessions.len(),
            chats,
            "OpenCode sessions, one per chat session: {summary:#?}"
        );
        for s in &sessions {
            let tag = tag(s);
            assert_eq!(tag["workerId"], WORKER, "{summary:#?}");
            let chat = tag["chatSessionId"].as_str().unwrap_or_default();
            assert_eq!(
                tag["commandId"],
                format!("createAgentSession:{chat}"),
                "{summary:#?}"
            );
        }
        let backend = self.store.chats(WORKER).unwrap();
        assert_eq!(
            backend.len(),
            chats,
            "chat sessions in the backend: {backend:#?}"
        );
    }
}

/// The worker's tag on an OpenCode session (`metadata.agentsync`), `null` when untagged.
fn tag(session: &serde_json::Value) -> &serde_json::Value {
    &session["metadata"]["agentsync"]
}

/// How often a message was acted on, on every side.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug in failure messages
struct Account {
    asked: Asked,
    /// OpenCode sessions tagged for the chat session.
    tagged: Vec<String>,
    tags: Vec<serde_json::Value>,
    /// The chat session's agent session in the backend.
    linked: Option<String>,
    backend_replies: usize,
    completed_replies: usize,
    /// Model requests whose last user text holds the message's text.
    model_calls: usize,
    /// User messages in the linked OpenCode session holding the text.
    user_messages: usize,
    /// Text parts holding the text across them (a message posted twice under one id has two).
    text_parts: usize,
    /// Assistant messages in OpenCode answering them.
    agent_replies: usize,
}

/// A hook that SIGKILLs the process whose pid is in `pid` at the time it runs.
fn sigkill(pid: &Arc<std::sync::atomic::AtomicI32>) -> impl FnOnce() + Send + 'static {
    let pid = pid.clone();
    move || {
        let p = pid.load(std::sync::atomic::Ordering::SeqCst);
        // 0 or less would signal a whole process group: the test runner's.
        assert!(p > 0, "no worker to kill yet");
        kill(Pid::from_raw(p), Signal::SIGKILL).unwrap();
    }
}

/// A `POST /session` that reached OpenCode (the session exists) but whose reply was lost: the
/// worker finds the session it tagged and adopts it instead of creating a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_post_session_is_adopted_not_repeated() {
    let rig = Rig::start().await;
    let asked = rig.ask_in_new_chat("lost create", "a question after a lost create");
    rig.proxy
        .inject("POST", "/session", 1, Fault::LoseReplyAfterUpstream);
    let mut worker = rig.worker();
    worker.wait_ready().await;
    rig.all_answered(std::slice::from_ref(&asked), &worker)
        .await;
    rig.agent_idle().await;

    assert_eq!(
        rig.proxy.injected(),
        [(
            "POST".to_owned(),
            "/session".to_owned(),
            Fault::LoseReplyAfterUpstream
        )]
    );
    assert_eq!(
        rig.proxy.count("POST", "/session"),
        1,
        "the session was created again: {:?}",
        rig.proxy.calls()
    );
    rig.assert_once(std::slice::from_ref(&asked)).await;
    rig.assert_one_session_per_chat(1).await;
    worker.stop().await;
}

/// A prompt that reached OpenCode but whose reply was lost (a 502 after OpenCode answered; the
/// connection closed unanswered after it answered, or before, the model still slow at work):
/// the worker reads the message back by its id and takes (or waits for) OpenCode's reply
/// instead of prompting again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_a_prompt_is_read_back_not_prompted_again() {
    let rig = Rig::start().await;
    let mut worker = rig.worker();
    worker.wait_ready().await;
    let cases = [
        (
            Fault::LoseReplyAfterUpstream,
            "answered, then the reply was lost",
        ),
        (
            Fault::HangUpAfterUpstream,
            "answered, then the connection closed unanswered",
        ),
        (
            Fault::HangUpBeforeUpstreamAnswers,
            "SLOW:1500 hung up on before the model answered",
        ),
    ];
    for (fault, text) in &cases {
        rig.proxy.inject("POST", "/session/*/message", 1, *fault);
        let asked = rig.ask_in_new_chat(&format!("{fault:?}"), text);
        rig.all_answered(std::slice::from_ref(&asked), &worker)
            .await;
        rig.agent_idle().await;
        let injected = rig.proxy.injected();
        assert_eq!(
            injected.last().map(|i| i.2),
            Some(*fault),
            "the fault was injected: {injected:?}"
        );
        rig.assert_once(std::slice::from_ref(&asked)).await;
    }
    assert_eq!(
        rig.proxy.count_matching("POST", "/session/*/message"),
        cases.len(),
        "prompts posted: {:?}",
        rig.proxy.calls()
    );
    rig.assert_one_session_per_chat(cases.len()).await;
    worker.stop().await;
}

/// The worker SIGKILLed the moment its first `POST /session` is on the wire, restarted,
/// SIGKILLed again the moment its first prompt is, restarted again: every chat ends with one
/// OpenCode session, one model call and one reply, as if nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_each_point_of_the_storm_keeps_every_count_at_one() {
    const CHATS: usize = 6;
    let rig = Rig::start().await;
    let asked: Vec<Asked> = (0..CHATS)
        .map(|i| {
            rig.ask_in_new_chat(
                &format!("storm {i}"),
                &format!("SLOW:300 storm question {i}"),
            )
        })
        .collect();
    let pid = Arc::new(std::sync::atomic::AtomicI32::new(0));

    let tripped = rig.proxy.on_forward("POST", "/session", 1, sigkill(&pid));
    let mut first = rig.worker();
    pid.store(first.pid(), std::sync::atomic::Ordering::SeqCst);
    tripped.fired(Duration::from_secs(90)).await;
    first.killed().await;
    assert_eq!(rig.proxy.count_matching("POST", "/session/*/message"), 0);

    let tripped = rig
        .proxy
        .on_forward("POST", "/session/*/message", 1, sigkill(&pid));
    let mut second = rig.worker();
    pid.store(second.pid(), std::sync::atomic::Ordering::SeqCst);
    tripped.fired(Duration::from_secs(90)).await;
    second.killed().await;

    let mut third = rig.worker();
    third.wait_ready().await;
    rig.all_answered(&asked, &third).await;
    rig.agent_idle().await;
    rig.assert_once(&asked).await;
    rig.assert_one_session_per_chat(CHATS).await;
    third.stop().await;
}

/// A worker that was Ready, restarted while nothing listens on its agent URL, is not Ready and
/// prompts nothing however many rounds pass (what it knew from before the restart is not a
/// listing of this process); once the agent server is back behind the same URL it is Ready
/// and answers each waiting message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_with_the_agent_server_down_it_is_not_ready_and_prompts_nothing() {
    let mut rig = Rig::start().await;
    let before = rig.ask_in_new_chat("before", "asked while all was well");
    let mut worker = rig.worker();
    worker.wait_ready().await;
    rig.all_answered(std::slice::from_ref(&before), &worker)
        .await;
    worker.stop().await;

    rig.proxy.stop().await;
    let port = rig.proxy.port();
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "something still listens on the agent URL"
    );
    let waiting = [
        rig.ask(
            &before.chat,
            "asked in a linked chat while the agent server was down",
        ),
        rig.ask_in_new_chat(
            "during",
            "asked in a new chat while the agent server was down",
        ),
    ];
    let model_calls = rig.model.requests.load(std::sync::atomic::Ordering::SeqCst);
    let mut worker = rig.worker();
    let backend_listings = || {
        rig.fake
            .calls()
            .iter()
            .filter(|c| c.path == "agentsync:listSessions" && c.status == 200)
            .count()
    };
    let listed_before = backend_listings();
    let agent_failures = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("agentsync_observation_failures_total{source=\"agent\"} "))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut rounds = 0;
    loop {
        let ready = worker.get("/readyz").await;
        let metrics = worker
            .get("/metrics")
            .await
            .map(|m| m.1)
            .unwrap_or_default();
        assert_ne!(
            ready.as_ref().map(|r| r.0),
            Some(200),
            "Ready with the agent server down ({rounds} rounds): {ready:?}\n{}",
            worker.log()
        );
        assert_eq!(
            rig.model.requests.load(std::sync::atomic::Ordering::SeqCst),
            model_calls,
            "the model was asked while the agent server was down"
        );
        for a in &waiting {
            assert!(rig.pending(a), "{a:?} was acted on:\n{}", worker.log());
        }
        assert!(
            !metrics.contains("agentsync_commands_total{kind=\"prompt\""),
            "a prompt was attempted:\n{metrics}"
        );
        assert_eq!(mutations(&rig.fake, "failMessage"), 0);
        rounds += 1;
        if agent_failures(&metrics) >= 3 && backend_listings() >= listed_before + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent side was not seen failing 3 times:\n{metrics}\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    rig.proxy = CountingProxy::start_on(port, &rig.upstream).await;
    worker.wait_ready().await;
    rig.all_answered(&waiting, &worker).await;
    rig.agent_idle().await;
    rig.assert_once(&[before, waiting[0].clone(), waiting[1].clone()])
        .await;
    assert_eq!(
        rig.proxy.count_matching("POST", "/session/*/message"),
        waiting.len(),
        "prompts after the agent server came back: {:?}",
        rig.proxy.calls()
    );
    rig.assert_one_session_per_chat(2).await;
    worker.stop().await;
    rig.server.shutdown().await;
}

/// The proxy's faults do what they say at the TCP level: a hang-up closes the connection
/// without a byte of response, after (or while) the upstream applied the call; a lost reply is
/// a 502 after the upstream applied it. (The harness the tests above rely on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_faults_apply_the_call_upstream_and_answer_nothing_or_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeConvex::start("agentsync", None, Arc::new(SystemClock))
        .await
        .unwrap();
    let proxy = CountingProxy::start(&fake.url).await;
    let body = serde_json::json!({
        "path": "agentsync:listSessions",
        "args": {"workerId": WORKER, "cursor": null, "limit": 10},
        "format": "json",
    })
    .to_string();
    let call = || async {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        let request = format!(
            "POST /api/query HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        // A reset counts as closed too: nothing was answered either way.
        let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
            .await
            .expect("the connection was closed");
        String::from_utf8_lossy(&answer).into_owned()
    };
    let applied = || fake.calls().len();

    proxy.inject("POST", "/api/*", 1, Fault::HangUpAfterUpstream);
    assert_eq!(call().await, "", "hung up without a response");
    assert_eq!(applied(), 1, "the upstream had applied it");

    proxy.inject("POST", "/api/*", 1, Fault::HangUpBeforeUpstreamAnswers);
    assert_eq!(call().await, "", "hung up without a response");
    until(
        "the upstream applied it anyway",
        Duration::from_secs(10),
        || (applied() == 2).then_some(()),
    )
    .await;

    proxy.inject("POST", "/api/*", 2, Fault::LoseReplyAfterUpstream);
    let whole = call().await;
    assert!(
        whole.starts_with("HTTP/1.1 200"),
        "the first passes: {whole}"
    );
    let lost = call().await;
    assert!(
        lost.starts_with("HTTP/1.1 502"),
        "the second is lost: {lost}"
    );
    assert_eq!(applied(), 4, "both were applied");
    assert_eq!(proxy.count_matching("POST", "/api/*"), 4);
    assert_eq!(proxy.injected().len(), 3);
}

/// A backlog larger than one Convex transaction may read (16 MiB: 20 messages of 900 KB),
/// found at start: the worker pages through it (each page bounded in bytes by the fake, as
/// `paginate` with `maximumBytesRead` bounds the real module's), sees every message, and fails
/// each, stale, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_16_mib_is_paged_through_and_every_message_failed_once() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let past = Arc::new(PastClock::default());
    past.set_behind(20 * 60_000);
    let fake = FakeConvex::start("agentsync", None, past.clone())
        .await
        .unwrap();
    let store = fake.store();
    let chat = store.open_chat(WORKER, "a long backlog").unwrap();
    let big = "x".repeat(900_000);
    let asked: Vec<String> = (0..20)
        .map(|i| {
            let text = format!("{i} {big}");
            store
                .post_user_message(&chat.chat_session_id, &text)
                .unwrap()
                .message_id
        })
        .collect();
    past.set_behind(0);
    let data = project.root.path().join("data");
    let args = ["--backend", "convex", "--convex-url", fake.url.as_str()];
    let mut worker = WorkerProcess::start(&project, &data, &args, &[]);
    worker.wait_ready().await;
    until("every message failed", Duration::from_secs(90), || {
        let conversation = store.conversation(&chat.chat_session_id).unwrap();
        asked
            .iter()
            .all(|m| failure(&conversation, m).is_some())
            .then_some(())
    })
    .await;
    let conversation = store.conversation(&chat.chat_session_id).unwrap();
    for m in &asked {
        let why = failure(&conversation, m).unwrap();
        assert!(why.starts_with("still incomplete"), "{m}: {why}");
    }
    let pages = fake
        .calls()
        .iter()
        .filter(|c| c.path.ends_with(":listMessages") && c.status == 200)
        .count();
    assert!(
        pages >= 5,
        "18 MB cannot come in fewer than 5 pages of 4 MiB: {pages}"
    );
    assert_eq!(mutations(&fake, "failMessage"), 20, "each failed once");
    assert_eq!(model.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    worker.signal(Signal::SIGTERM);
    let (status, _) = worker.exit_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
}
