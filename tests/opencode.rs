//! The OpenCode adapter against the real server (opencode-ai 1.18.33, installed by the test
//! command), with prompts answered by a loopback mock model server.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentsync::agent::supervisor::{supervise, GaveUp, RestartPolicy};
use agentsync::agent::{OpencodeClient, OpencodeConfig, Secret};
use agentsync::clock::SystemClock;
use agentsync::events::{AgentSessionId, AgentStatus, ErrorClass, Event};
use agentsync::ports::{AgentObservation, AgentServer, PromptOutcome, PromptRequest};
use agentsync::sim::model::{MockModel, REPLY_PREFIX};
use common::opencode::{mock_model, Project};
use futures_util::StreamExt;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

const PATIENCE: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ids(listing: &agentsync::ports::AgentListing) -> BTreeSet<String> {
    listing
        .sessions
        .iter()
        .map(|s| s.agent_session_id.to_string())
        .collect()
}

/// Waits for the supervisor's next event of `kind`, returning it and what came before.
async fn next_event(rx: &mut mpsc::Receiver<Event>, kind: &str) -> Event {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let e = rx.recv().await.expect("supervisor events");
            if e.kind().name() == kind {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} within {PATIENCE:?}"))
}

/// A supervisor over the project's servers, running in a task.
struct Supervised {
    client: Arc<OpencodeClient>,
    rx: mpsc::Receiver<Event>,
    stop: watch::Sender<bool>,
    supervisor: tokio::task::JoinHandle<Result<(), GaveUp>>,
}

fn supervised(project: &Project) -> Supervised {
    let (client, launcher) = project.launcher(None);
    let (tx, rx) = mpsc::channel(64);
    let (stop, stopped) = watch::channel(false);
    let supervisor = tokio::spawn(async move {
        supervise(
            &launcher,
            RestartPolicy::default(),
            &SystemClock,
            1,
            tx,
            stopped,
        )
        .await
    });
    Supervised {
        client,
        rx,
        stop,
        supervisor,
    }
}

fn process_gone(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_err()
        && killpg(Pid::from_raw(pid as i32), None).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_round_trip() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let (mut server, client) = project.start(None).await;
    client.health().await.unwrap();

    let created = client.create_session("first title", None).await.unwrap();
    assert!(created.agent_session_id.as_str().starts_with("ses"));
    assert_eq!(created.title, "first title");
    assert_eq!(
        created.directory.as_deref(),
        Some(project.dir.to_str().unwrap())
    );
    let got = client.get_session(&created.agent_session_id).await.unwrap();
    assert_eq!(got.as_ref().map(|s| s.title.as_str()), Some("first title"));

    client
        .rename_session(&created.agent_session_id, "second title")
        .await
        .unwrap();
    let listing = client.list_sessions(None).await.unwrap();
    assert!(listing.complete);
    assert_eq!(listing.sessions.len(), 1);
    assert_eq!(listing.sessions[0].title, "second title");

    client
        .delete_session(&created.agent_session_id)
        .await
        .unwrap();
    assert_eq!(
        client.get_session(&created.agent_session_id).await.unwrap(),
        None
    );
    assert!(client
        .list_sessions(None)
        .await
        .unwrap()
        .sessions
        .is_empty());
    // A delete repeated after a lost reply finds the session gone: that is success.
    client
        .delete_session(&created.agent_session_id)
        .await
        .unwrap();
    // A rename of a session that is gone will never work.
    let err = client
        .rename_session(&created.agent_session_id, "x")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Terminal, "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_sessions_are_listed_whole_and_incrementally() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let (mut server, client) = project.start(None).await;

    let mut created = BTreeSet::new();
    for chunk in 0..30 {
        let calls = (0..10).map(|i| {
            let client = client.clone();
            async move {
                client
                    .create_session(&format!("session {}", chunk * 10 + i), None)
                    .await
            }
        });
        for s in futures_util::future::join_all(calls).await {
            created.insert(s.unwrap().agent_session_id.to_string());
        }
    }
    assert_eq!(created.len(), 300);

    let all = client.list_sessions(None).await.unwrap();
    assert!(all.complete, "300 sessions fit the listing limit");
    assert_eq!(
        ids(&all),
        created,
        "every session, not the server's default 100"
    );

    // The trap: a listing that comes back full may have left sessions out. It is reported
    // incomplete, so it can never prove a session gone.
    let capped = OpencodeClient::new(OpencodeConfig {
        listing_limit: 100,
        ..OpencodeConfig::new(client.base_url())
    })
    .unwrap();
    let partial = capped.list_sessions(None).await.unwrap();
    assert_eq!(partial.sessions.len(), 100);
    assert!(!partial.complete);

    // Incremental: `start=T` lists what was updated at or after T, and only that.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let since = now_ms();
    let mut newer = BTreeSet::new();
    for i in 0..5 {
        let s = client
            .create_session(&format!("newer {i}"), None)
            .await
            .unwrap();
        newer.insert(s.agent_session_id.to_string());
    }
    let old = all.sessions[0].agent_session_id.clone();
    client.rename_session(&old, "renamed").await.unwrap();
    let incremental = client.list_sessions(Some(since)).await.unwrap();
    assert!(
        incremental.complete,
        "every session updated since came (the worker never takes absence from it: observe)"
    );
    // A rename does not move `time.updated` (measured on 1.18.33): renames reach the worker
    // through the event stream or a full listing, never through the incremental one.
    assert_eq!(ids(&incremental), newer);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_is_answered_with_the_mock_models_text_and_models_come_from_the_config() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let (mut server, client) = project.start(None).await;

    let models = client.list_models().await.unwrap();
    assert!(models.models.contains(&mock_model()), "{models:?}");
    assert_eq!(models.default, Some(mock_model()));

    let session = client.create_session("prompted", None).await.unwrap();
    let answer = client
        .prompt(
            &session.agent_session_id,
            PromptRequest::text("hello from agentsync", Some(&mock_model())),
        )
        .await
        .unwrap();
    assert_eq!(answer, format!("{REPLY_PREFIX}hello from agentsync"));
    assert_eq!(model.requests.load(Ordering::SeqCst), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_a_context_overflow_is_terminal_a_dead_server_retryable() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let (mut server, client) = project.start(None).await;

    let session = client.create_session("overflowing", None).await.unwrap();
    let err = client
        .prompt(
            &session.agent_session_id,
            PromptRequest::text("this will OVERFLOW the context", Some(&mock_model())),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Terminal, "{err}");
    assert!(err.message.contains("ContextOverflowError"), "{err}");

    let missing = AgentSessionId::from("ses_doesnotexist");
    let err = client
        .prompt(&missing, PromptRequest::text("hello", Some(&mock_model())))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Terminal, "{err}");
    assert!(err.message.contains("404"), "{err}");

    server.shutdown().await;

    // A server that is not there. Not the one just stopped: OpenCode takes port 4096 first, so
    // another test's server may be listening there by now.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dead = OpencodeClient::new(OpencodeConfig::new(format!("http://{closed}"))).unwrap();
    let err = dead.list_sessions(None).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Retryable, "{err}");
    assert!(
        err.message.starts_with("GET /session: cannot connect"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_reports_create_rename_status_and_delete() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let (mut server, client) = project.start(None).await;
    let stream = client.events();
    tokio::pin!(stream);
    let first = tokio::time::timeout(PATIENCE, stream.next()).await.unwrap();
    assert_eq!(
        first,
        Some(AgentObservation::Connected { reconnected: false })
    );

    let session = client.create_session("watched", None).await.unwrap();
    let id = session.agent_session_id.clone();
    client
        .rename_session(&id, "watched, renamed")
        .await
        .unwrap();
    let answer = client
        .prompt(
            &id,
            PromptRequest::text("SLOW:300 answer slowly", Some(&mock_model())),
        )
        .await
        .unwrap();
    assert!(answer.starts_with(REPLY_PREFIX));
    client.delete_session(&id).await.unwrap();

    let (mut created, mut renamed, mut busy, mut idle, mut message, mut deleted) =
        (false, false, false, false, false, false);
    let seen = tokio::time::timeout(PATIENCE, async {
        while let Some(obs) = stream.next().await {
            match obs {
                AgentObservation::SessionUpdated(s) if s.agent_session_id == id => {
                    created |= s.title == "watched";
                    renamed |= s.title == "watched, renamed";
                }
                AgentObservation::Status(s) if s.agent_session_id == id => {
                    busy |= s.status == AgentStatus::Busy;
                    idle |= busy && s.status == AgentStatus::Idle;
                }
                AgentObservation::MessageUpdated {
                    agent_session_id, ..
                } if agent_session_id == id => message = true,
                AgentObservation::SessionDeleted(s) if s == id => deleted = true,
                _ => {}
            }
            if created && renamed && busy && idle && message && deleted {
                return;
            }
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "created {created}, renamed {renamed}, busy {busy}, idle {idle}, message {message}, deleted {deleted}"
    );
    let stats = client.stream_stats();
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
    assert!(stats.observed.load(Ordering::Relaxed) >= 6);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_with_sigkill_is_restarted_and_still_lists_its_sessions() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let Supervised {
        client,
        mut rx,
        stop,
        supervisor,
    } = supervised(&project);
    let Event::AgentServerStarted(first) = next_event(&mut rx, "agent_server_started").await else {
        unreachable!()
    };
    assert_eq!(first.generation, 1);
    let mut before = BTreeSet::new();
    for i in 0..3 {
        let s = client
            .create_session(&format!("survivor {i}"), None)
            .await
            .unwrap();
        before.insert(s.agent_session_id.to_string());
    }
    let stream = client.events();
    tokio::pin!(stream);
    assert_eq!(
        tokio::time::timeout(PATIENCE, stream.next()).await.unwrap(),
        Some(AgentObservation::Connected { reconnected: false })
    );

    let pid = first.pid.expect("a spawned server has a pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let Event::AgentServerExited(exited) = next_event(&mut rx, "agent_server_exited").await else {
        unreachable!()
    };
    assert_eq!(exited.signal, Some(9));
    let Event::AgentServerStarted(second) = next_event(&mut rx, "agent_server_started").await
    else {
        unreachable!()
    };
    assert_eq!(second.generation, 2);
    assert_eq!(
        client.base_url(),
        second.url,
        "the client follows the new server"
    );

    let listing = client.list_sessions(None).await.unwrap();
    assert_eq!(ids(&listing), before, "the sessions outlive the process");
    // The stream found the new server by itself and says it reconnected, so an observer lists
    // everything to close the gap.
    let reconnected = tokio::time::timeout(PATIENCE, async {
        while let Some(obs) = stream.next().await {
            if obs == (AgentObservation::Connected { reconnected: true }) {
                return;
            }
        }
    })
    .await;
    assert!(reconnected.is_ok(), "no reconnect within {PATIENCE:?}");

    stop.send(true).unwrap();
    let result = tokio::time::timeout(PATIENCE, supervisor)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok());
    let pid2 = second.pid.unwrap();
    assert!(process_gone(pid2), "no orphan after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_three_quick_crashes_the_supervisor_gives_up_with_the_event_and_the_error() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let Supervised {
        mut rx,
        stop: _stop,
        supervisor,
        ..
    } = supervised(&project);
    // Every server dies as soon as it is up.
    let mut killed = Vec::new();
    let gave_up = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match rx.recv().await.expect("supervisor events") {
                Event::AgentServerStarted(s) => {
                    let pid = s.pid.unwrap();
                    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
                    killed.push((s.generation, pid));
                }
                Event::AgentServerGaveUp(g) => return g,
                _ => {}
            }
        }
    })
    .await
    .expect("the supervisor gives up");
    assert_eq!(gave_up.restarts, 3);
    assert!(
        gave_up.error.contains("signal Some(9)"),
        "{}",
        gave_up.error
    );
    assert_eq!(
        killed.iter().map(|(g, _)| *g).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "the first start and three restarts"
    );
    let result = supervisor.await.unwrap();
    let err = result.expect_err("supervision ends in an error");
    assert_eq!(err.restarts, 3);
    assert!(err
        .to_string()
        .contains("gave up after 3 consecutive restarts"));
    for (_, pid) in killed {
        assert!(process_gone(pid));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_password_calls_without_it_are_refused_and_calls_with_it_work() {
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let password = "correct horse battery staple";
    let (mut server, client) = project.start(Some(password)).await;

    let anonymous = OpencodeClient::new(OpencodeConfig::new(client.base_url())).unwrap();
    let err = anonymous.list_sessions(None).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Terminal, "{err}");
    assert!(err.message.contains("401"), "{err}");
    assert!(err.message.contains("--agent-password-env"), "{err}");
    assert!(anonymous.health().await.is_err());

    let wrong = OpencodeClient::new(OpencodeConfig {
        password: Some(Secret::new("wrong")),
        ..OpencodeConfig::new(client.base_url())
    })
    .unwrap();
    let err = wrong.create_session("nope", None).await.unwrap_err();
    assert!(err.message.contains("401"), "{err}");
    assert!(
        !err.message.contains("wrong"),
        "no secret in an error: {err}"
    );

    client.health().await.unwrap();
    let s = client.create_session("authorised", None).await.unwrap();
    let listing = client.list_sessions(None).await.unwrap();
    assert_eq!(
        ids(&listing),
        BTreeSet::from([s.agent_session_id.to_string()])
    );
    server.shutdown().await;
    let _: Arc<OpencodeClient> = client;
}

#[test]
fn without_npm_the_installer_fails_with_a_clear_message() {
    let cache = tempfile::tempdir().unwrap();
    let out =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/install-opencode"))
            .env("AGENTSYNC_CACHE", cache.path())
            .env("NPM", "/nonexistent/npm")
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("npm not found") && stderr.contains("opencode-ai@1.18.33"),
        "{stderr}"
    );
}

/// The facts idempotent agent commands rest on, on the real server: a tagged session is found
/// again by its command id (and another worker's is not ours), sub-agent children are left out
/// of listings, and a prompt sent under a chosen message id is read back (running, then
/// answered) without the model running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_or_prompt_can_be_looked_up_on_the_real_server() {
    use agentsync::events::{MessageId, SessionTag};
    use agentsync::reconcile::ids;
    let model = MockModel::start().await;
    let project = Project::new(&model);
    let (mut server, client) = project.start(None).await;
    let tag = |worker: &str, command: &str| SessionTag {
        worker_id: worker.into(),
        command_id: command.into(),
        chat_session_id: "chat_1".into(),
    };
    let ours = tag("w1", "createAgentSession:chat_1");
    let created = client.create_session("tagged", Some(&ours)).await.unwrap();
    assert_eq!(created.tag.as_ref(), Some(&ours), "metadata round-trips");
    client
        .create_session("theirs", Some(&tag("w2", "createAgentSession:chat_9")))
        .await
        .unwrap();
    client.create_session("untagged", None).await.unwrap();
    let found = client.find_session(&ours).await.unwrap();
    assert_eq!(
        found.map(|s| s.agent_session_id),
        Some(created.agent_session_id.clone())
    );
    assert_eq!(
        client
            .find_session(&tag("w2", "createAgentSession:chat_1"))
            .await
            .unwrap(),
        None,
        "the same command id under another worker is not ours"
    );
    // A sub-agent child (OpenCode's `parentID`) is not listed.
    let child = reqwest::Client::new()
        .post(format!("{}/session", client.base_url()))
        .json(&serde_json::json!({"title": "child", "parentID": created.agent_session_id}))
        .send()
        .await
        .unwrap();
    assert!(child.status().is_success());
    let listing = client.list_sessions(None).await.unwrap();
    let titles: BTreeSet<String> = listing.sessions.iter().map(|s| s.title.clone()).collect();
    assert_eq!(
        titles,
        BTreeSet::from(["tagged".into(), "theirs".into(), "untagged".into()])
    );

    let id = &created.agent_session_id;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let m1 = ids::agent_message_id(&MessageId("m1".into()), now, 0);
    assert_eq!(
        client.prompt_outcome(id, &m1).await.unwrap(),
        PromptOutcome::NotSent
    );
    let asked = {
        let (client, id, m1) = (client.clone(), id.clone(), m1.clone());
        tokio::spawn(async move {
            let model = mock_model();
            let req = PromptRequest {
                text: "SLOW:2000 first question",
                model: Some(&model),
                message_id: Some(&m1),
            };
            client.prompt(&id, req).await
        })
    };
    let mut seen_running = false;
    for _ in 0..100 {
        match client.prompt_outcome(id, &m1).await.unwrap() {
            PromptOutcome::Running => {
                seen_running = true;
                break;
            }
            PromptOutcome::NotSent => tokio::time::sleep(Duration::from_millis(50)).await,
            // Measured: for a moment after the user message is stored the session is not yet
            // busy (the executor looks a few times before it calls a prompt interrupted).
            PromptOutcome::Interrupted => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("before the answer: {other:?}"),
        }
    }
    assert!(seen_running, "a prompt in progress reads as running");
    let answer = asked.await.unwrap().unwrap();
    assert_eq!(answer, format!("{REPLY_PREFIX}SLOW:2000 first question"));
    assert_eq!(
        client.prompt_outcome(id, &m1).await.unwrap(),
        PromptOutcome::Answered(answer),
        "the answer is read back by the chosen id"
    );
    assert_eq!(
        model.requests.load(Ordering::SeqCst),
        1,
        "the model ran once"
    );

    // A run that died with its server leaves the user message stored, unanswered, the session
    // idle (here: stored with `noReply`): it reads as interrupted, and once forgotten it is
    // gone, so it can be sent anew under the same id and shows once.
    let m2 = ids::agent_message_id(&MessageId("m2".into()), now + 1, 0);
    let stored = reqwest::Client::new()
        .post(format!("{}/session/{id}/message", client.base_url()))
        .json(&serde_json::json!({"messageID": m2, "noReply": true,
            "parts": [{"type": "text", "text": "second question"}]}))
        .send()
        .await
        .unwrap();
    assert!(stored.status().is_success());
    assert_eq!(
        client.prompt_outcome(id, &m2).await.unwrap(),
        PromptOutcome::Interrupted
    );
    client.forget_prompt(id, &m2).await.unwrap();
    client.forget_prompt(id, &m2).await.unwrap(); // already gone: done
    assert_eq!(
        client.prompt_outcome(id, &m2).await.unwrap(),
        PromptOutcome::NotSent
    );
    let req = PromptRequest {
        text: "second question",
        model: Some(&mock_model()),
        message_id: Some(&m2),
    };
    let again = client.prompt(id, req).await.unwrap();
    assert_eq!(again, format!("{REPLY_PREFIX}second question"));
    let history: Vec<serde_json::Value> =
        reqwest::get(format!("{}/session/{id}/message", client.base_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let users = history
        .iter()
        .filter(|m| m["info"]["role"] == "user")
        .count();
    assert_eq!(users, 2, "each question once: {history:?}");
    server.shutdown().await;
}

// Issue 13, "untrusted replies": attacks on the client from a hostile server on loopback. None
// needs the real OpenCode server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_body_larger_than_the_cap_is_cut_with_an_error_naming_the_call_and_the_size() {
    use axum::routing::get;
    use common::hostile::{endless_zeros, huge_content_length, serve};

    // A listing that never ends (more than 1 GB of zeros, no length given), and an error
    // reply that never ends either.
    let endless = serve(
        axum::Router::new()
            .route("/session", get(|| async { endless_zeros() }))
            .route(
                "/session/status",
                get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, endless_zeros()) }),
            ),
    )
    .await;
    let client = OpencodeClient::new(OpencodeConfig::new(&endless.url)).unwrap();
    let err = client.list_sessions(None).await.unwrap_err();
    assert_eq!(
        err.message,
        "GET /session: reply larger than 33554432 bytes"
    );
    assert_eq!(
        err.class,
        ErrorClass::Terminal,
        "the same call gets the same reply"
    );
    let err = client.status().await.unwrap_err();
    assert_eq!(
        err.class,
        ErrorClass::Retryable,
        "an error reply keeps its status's class"
    );
    assert_eq!(
        err.message,
        "GET /session/status: HTTP 503: reply larger than 65536 bytes"
    );

    // A smaller cap is the configured one.
    let small = OpencodeClient::new(OpencodeConfig {
        max_reply_bytes: 1_000_000,
        ..OpencodeConfig::new(&endless.url)
    })
    .unwrap();
    let err = small.list_sessions(None).await.unwrap_err();
    assert_eq!(err.message, "GET /session: reply larger than 1000000 bytes");

    // `Content-Length: 1 GiB` and nothing after: refused before reading (reading would wait
    // for the timeout instead).
    let liar = huge_content_length(200).await;
    let client = OpencodeClient::new(OpencodeConfig {
        timeout: Duration::from_secs(20),
        ..OpencodeConfig::new(&liar.url)
    })
    .unwrap();
    let started = std::time::Instant::now();
    let err = client.list_sessions(None).await.unwrap_err();
    assert_eq!(
        err.message,
        "GET /session: reply larger than 33554432 bytes"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "not read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_event_is_cut_at_the_cap_and_the_stream_reconnects() {
    use axum::routing::get;
    use common::hostile::{endless, serve};
    use std::sync::atomic::AtomicUsize;

    // The first connection sends one event that never ends (no newline, ever); the next ones a
    // well-formed event, then nothing.
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    let server = serve(axum::Router::new().route(
        "/event",
        get(move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = if n == 0 {
                    let mut start = b"data: ".to_vec();
                    start.extend(std::iter::repeat_n(b'x', 64 * 1024));
                    endless(start)
                } else {
                    let event = "data: {\"type\":\"session.deleted\",\"properties\":{\"info\":{\"id\":\"ses_after\",\"time\":{\"created\":1,\"updated\":1}}}}\n\n";
                    axum::body::Body::from_stream(
                        futures_util::stream::once(async move {
                            Ok::<_, std::convert::Infallible>(event)
                        })
                        .chain(futures_util::stream::pending()),
                    )
                };
                ([("content-type", "text/event-stream")], body)
            }
        }),
    ))
    .await;
    let client = Arc::new(
        OpencodeClient::new(OpencodeConfig {
            reconnect_min: Duration::from_millis(50),
            ..OpencodeConfig::new(&server.url)
        })
        .unwrap(),
    );
    let stats = client.stream_stats();
    let mut events = Box::pin(client.events());
    async fn next(
        events: &mut (impl futures_util::Stream<Item = AgentObservation> + Unpin),
    ) -> AgentObservation {
        tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("an observation in time")
            .expect("the stream goes on")
    }
    assert_eq!(
        next(&mut events).await,
        AgentObservation::Connected { reconnected: false }
    );
    assert_eq!(
        next(&mut events).await,
        AgentObservation::Connected { reconnected: true }
    );
    assert_eq!(
        next(&mut events).await,
        AgentObservation::SessionDeleted("ses_after".into()),
        "the stream goes on after the cut"
    );
    assert_eq!(stats.oversized.load(Ordering::Relaxed), 1);
    assert_eq!(stats.reconnects.load(Ordering::Relaxed), 1);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}
