//! The `agentsync` binary as a process, on generated logs: output and exit codes.

mod common;

use agentsync::events::{Event, EventKind};
use agentsync::projections::{Projection, SessionsView};
use common::*;
use serde_json::Value;

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn replay_prints_every_event_as_a_table_and_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 7, 200);
    let table = agentsync_in(dir.path(), "replay", &[]);
    assert_eq!(table.status.code(), Some(0), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(text.lines().next().unwrap().contains("KIND"));
    assert_eq!(text.lines().count(), stored.len() + 1);
    // Causes within the shown range are shown as #seq.
    assert!(text.contains(" #"), "no cause shown as #seq:\n{text}");

    let json = agentsync_in(dir.path(), "replay", &["--json"]);
    let lines = json_lines(&stdout(&json));
    assert_eq!(lines.len(), stored.len());
    for (line, env) in lines.iter().zip(&stored) {
        assert_eq!(line["seq"], env.seq);
        assert_eq!(line["kind"], env.kind().name());
        assert_eq!(line["id"], env.id.to_string());
    }
}

#[test]
fn replay_filters_by_range_kind_and_session() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 11, 300);
    let out = agentsync_in(
        dir.path(),
        "replay",
        &["--json", "--from", "10", "--to", "20"],
    );
    let seqs: Vec<u64> = json_lines(&stdout(&out))
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (10..=20).collect::<Vec<_>>());

    let out = agentsync_in(
        dir.path(),
        "replay",
        &[
            "--json",
            "--kind",
            "command_planned",
            "--kind",
            "listing_completed",
        ],
    );
    let got = json_lines(&stdout(&out));
    let want = stored
        .iter()
        .filter(|e| {
            matches!(
                e.kind(),
                EventKind::CommandPlanned | EventKind::ListingCompleted
            )
        })
        .count();
    assert_eq!(got.len(), want);
    assert!(want > 0);

    let session = stored
        .iter()
        .find_map(|e| match &e.event {
            Event::AgentSessionSeen(s) => Some(s.agent_session_id.to_string()),
            _ => None,
        })
        .unwrap();
    let out = agentsync_in(dir.path(), "replay", &["--json", "--session", &session]);
    let got: Vec<u64> = json_lines(&stdout(&out))
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = stored
        .iter()
        .filter(|e| e.event.session_ids().contains(&session.as_str()))
        .map(|e| e.seq)
        .collect();
    assert_eq!(got, want);
    assert!(got.len() >= 2);
}

#[test]
fn replay_at_prints_the_view_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let stored = story(dir.path());
    let at = stored.len() as u64 / 2;
    let mut view = SessionsView::default();
    for e in stored.iter().take(at as usize) {
        view.apply(e);
    }
    let out = agentsync_in(
        dir.path(),
        "replay",
        &["--at", &at.to_string(), "--view", "sessions", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["seq"], at);
    assert_eq!(doc["state"], serde_json::to_value(&view).unwrap());

    let table = agentsync_in(
        dir.path(),
        "replay",
        &["--at", &at.to_string(), "--view", "messages"],
    );
    assert_eq!(table.status.code(), Some(0));
    assert!(stdout(&table).starts_with(&format!("messages as of seq {at}")));
}

#[test]
fn why_explains_a_failed_message_from_observation_to_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let stored = story(dir.path());
    // The second user message is the one whose prompt overflowed the context.
    let failed = stored
        .iter()
        .find_map(|e| match &e.event {
            Event::CommandFailed(f) => f.subject.message_id.clone(),
            _ => None,
        })
        .expect("the story has a failed prompt");
    let out = agentsync_in(dir.path(), "why", &[failed.as_str(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = json_lines(&stdout(&out));
    let kinds: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["role"].as_str().unwrap(),
                l["event"]["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("subject", "backend_message_seen")),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("subject", "command_failed")), "{kinds:?}");
    assert!(
        kinds
            .iter()
            .any(|(r, k)| *r == "subject" && *k == "command_succeeded"),
        "{kinds:?}"
    );
    let text = stdout(&agentsync_in(dir.path(), "why", &[failed.as_str()]));
    assert!(text.contains("ContextOverflowError"), "{text}");
    assert!(text.contains("failMessage"), "{text}");

    // From a command id: back to the observation that caused it, forward to its outcome.
    let planned = stored
        .iter()
        .find_map(|e| match &e.event {
            Event::CommandPlanned(p) if p.command.op() == agentsync::events::Op::CreateSession => {
                Some(p.command_id.to_string())
            }
            _ => None,
        })
        .unwrap();
    let lines = json_lines(&stdout(&agentsync_in(
        dir.path(),
        "why",
        &[&planned, "--json"],
    )));
    let roles: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["role"].as_str().unwrap(),
                l["event"]["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(roles[0], ("cause", "agent_session_seen"), "{roles:?}");
    assert!(
        roles.contains(&("subject", "command_succeeded")),
        "{roles:?}"
    );

    let missing = agentsync_in(dir.path(), "why", &["no-such-id"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no event in the log mentions `no-such-id`"));
}

#[test]
fn rebuild_writes_checkpoints_and_verify_lists_every_difference() {
    let dir = tempfile::tempdir().unwrap();
    random_log(dir.path(), 3, 300);
    let out = agentsync_in(dir.path(), "rebuild", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let sessions = agentsync::projections::ProjectionName::Sessions;
    let rebuilt = format!("rebuilt sessions v{}", sessions.version());
    assert!(stdout(&out).contains(&rebuilt), "{}", stdout(&out));
    let ok = agentsync_in(dir.path(), "rebuild", &["--verify"]);
    assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
    assert_eq!(stdout(&ok).matches("matches a rebuild").count(), 3);

    // Tamper with a stored checkpoint (the sessions view's rows live in the log's database):
    // verify names the place and fails.
    let first = {
        let log = agentsync::log::EventLog::open(dir.path(), &Default::default()).unwrap();
        let store = log.checkpoints();
        let mut doc = store.load_raw("sessions").unwrap().unwrap();
        let chat = doc.state["chat"].as_object_mut().unwrap();
        let first = chat.keys().next().unwrap().clone();
        chat[&first]["title"] = Value::from("tampered");
        store.save_raw("sessions", &doc).unwrap();
        first
    };
    let bad = agentsync_in(
        dir.path(),
        "rebuild",
        &["--verify", "--projection", "sessions"],
    );
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    let text = stdout(&bad);
    assert!(
        text.contains(&format!("/chat/{first}/title: \"tampered\" ->")),
        "{text}"
    );
    assert!(stderr(&bad).contains("verify found 1 difference(s)"));

    // Rebuilding that projection alone repairs it.
    let fix = agentsync_in(dir.path(), "rebuild", &["--projection", "sessions"]);
    assert_eq!(fix.status.code(), Some(0));
    assert!(!stdout(&fix).contains("messages"));
    assert_eq!(
        agentsync_in(dir.path(), "rebuild", &["--verify"])
            .status
            .code(),
        Some(0)
    );
}

#[test]
fn stats_counts_kinds_and_checkpoint_lag() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 5, 150);
    assert_eq!(
        agentsync_in(dir.path(), "rebuild", &[]).status.code(),
        Some(0)
    );
    // More events after the checkpoint: lag.
    let more = write_more(dir.path(), 9);
    let out = agentsync_in(dir.path(), "stats", &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(s["events"], (stored.len() + more) as u64);
    let planned = stored
        .iter()
        .filter(|e| e.kind() == EventKind::CommandPlanned)
        .count() as u64;
    assert_eq!(s["by_kind"]["command_planned"], planned);
    assert!(s["size_on_disk_bytes"].as_u64().unwrap() > 0);
    for c in s["checkpoints"].as_array().unwrap() {
        assert_eq!(c["lag"], more as u64, "{c}");
    }
    let text = stdout(&agentsync_in(dir.path(), "stats", &[]));
    assert!(text.contains("command_planned"));
}

fn write_more(dir: &std::path::Path, n: usize) -> usize {
    use agentsync::events::{NewEvent, WorkerStopping};
    let log = agentsync::log::EventLog::open(dir, &create()).unwrap();
    let batch = (0..n)
        .map(|i| {
            NewEvent::new(
                Event::WorkerStopping(WorkerStopping {
                    reason: format!("test {i}"),
                }),
                1_763_800_000_000,
            )
        })
        .collect();
    log.append(batch).unwrap().len()
}

#[test]
fn export_writes_json_lines_from_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 9, 100);
    let out = agentsync_in(dir.path(), "export", &["--from", "5"]);
    assert_eq!(out.status.code(), Some(0));
    let lines = json_lines(&stdout(&out));
    assert_eq!(lines.len(), stored.len() - 4);
    assert_eq!(lines[0], serde_json::to_value(&stored[4]).unwrap());
}

#[test]
fn bad_input_gets_a_one_line_reason_and_the_right_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let out = agentsync_in(&missing, "replay", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("no agentsync data directory"));
    assert!(
        !missing.exists(),
        "an inspection command created the directory"
    );

    story(dir.path());
    let out = agentsync_in(dir.path(), "replay", &["--kind", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown event kind `nonsense`"));
    let out = agentsync_in(
        dir.path(),
        "replay",
        &["--at", "99999", "--view", "sessions"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("past the end of the log"));
    let out = agentsync_in(dir.path(), "replay", &["--at", "3"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--at without --view is a usage error"
    );
    let out = agentsync_in(dir.path(), "rebuild", &["--projection", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let out = agentsync(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_corrupt_entry_is_an_error_naming_its_seq_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let stored = story(dir.path());
    {
        // sled's flusher thread holds the database's file lock for a moment after the log is
        // dropped (seen once under a loaded full run): wait for it rather than fail.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::open(dir.path().join("log")) {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => panic!("cannot open the log's sled database: {e}"),
            }
        };
        let events = db.open_tree("events").unwrap();
        events
            .insert(5u64.to_be_bytes(), &b"{\"seq\":5, not json"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let out = agentsync_in(dir.path(), "replay", &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("event seq 5 cannot be decoded"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        json_lines(&stdout(&out)).len(),
        4,
        "events before the corrupt one are printed"
    );

    let out = agentsync_in(dir.path(), "replay", &["--json", "--skip-corrupt"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_lines(&stdout(&out)).len(), stored.len() - 1);
    assert!(stderr(&out).contains("skipped seq 5"));

    let out = agentsync_in(dir.path(), "export", &[]);
    assert_eq!(out.status.code(), Some(1));
    let out = agentsync_in(dir.path(), "stats", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("first at seq 5"));
}

fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_data_dir_from_a_newer_schema_exits_2_and_is_not_modified() {
    let dir = tempfile::tempdir().unwrap();
    story(dir.path());
    let format = dir.path().join("FORMAT.json");
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&format).unwrap()).unwrap();
    doc["kinds"]["agent_session_seen"] = Value::from(3);
    std::fs::write(&format, serde_json::to_vec(&doc).unwrap()).unwrap();
    let before = snapshot(dir.path());
    for sub in ["replay", "stats", "export", "rebuild"] {
        let out = agentsync_in(dir.path(), sub, &[]);
        assert_eq!(out.status.code(), Some(2), "{sub}: {}", stderr(&out));
        assert!(stderr(&out).contains("newer agentsync"), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("`agent_session_seen` v3"),
            "{}",
            stderr(&out)
        );
    }
    // A writer is refused too.
    let err = agentsync::log::EventLog::open(dir.path(), &create()).unwrap_err();
    assert!(err.is_usage());
    let mut after = snapshot(dir.path());
    // The lock file holds the pid of whoever took it last; everything else is byte-identical.
    after.retain(|(p, _)| !p.ends_with("LOCK"));
    let mut before = before;
    before.retain(|(p, _)| !p.ends_with("LOCK"));
    assert_eq!(before, after);
}

#[test]
fn a_second_process_on_the_same_data_dir_fails_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    story(dir.path());
    let held = agentsync::log::EventLog::open(dir.path(), &create()).unwrap();
    let started = std::time::Instant::now();
    let out = agentsync_in(dir.path(), "replay", &[]);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("in use by another agentsync process"), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(held);
    assert_eq!(
        agentsync_in(dir.path(), "replay", &[]).status.code(),
        Some(0)
    );
}

#[test]
fn a_closed_pipe_is_not_an_error() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    random_log(dir.path(), 1, 3000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentsync"))
        .args(["replay", "--data-dir", dir.path().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 64];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_bad_settings_with_exit_2_naming_the_key_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("agentsync.toml");
    let run = |config_text: &str, flags: &[&str]| {
        std::fs::write(&config, config_text).unwrap();
        let mut args = vec!["run", "--config", config.to_str().unwrap()];
        args.extend_from_slice(flags);
        agentsync(&args)
    };
    let base = format!(
        "data-dir = {:?}\nworker-id = \"w\"\n",
        data.to_str().unwrap()
    );
    for (config_text, flags, says) in [
        (
            format!("{base}listing-limt = 5\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "(line 3): unknown field `listing-limt`",
        ),
        (
            format!("{base}listing-limit = 0\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "listing-limit must be at least 1",
        ),
        (
            format!("{base}max-reply-mib = 0\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "max-reply-mib must be at least 1 and at most 1 GiB",
        ),
        (
            format!("{base}message-deadline-mins = 0\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "message-deadline-mins must be between 1 and 10080",
        ),
        (
            format!("{base}archive-after-days = 7\ndrop-archive-after-days = 7\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "drop-archive-after-days (7) must be more than archive-after-days (7)",
        ),
        (
            format!("{base}drop-archive-after-days = 30\n"),
            vec!["--agent-url", "http://127.0.0.1:9", "--archive-after-days", "0"],
            "drop-archive-after-days needs archiving on",
        ),
        (
            format!("{base}retention-days = 0\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "retention-days must be between 1 and 3650",
        ),
        (
            base.clone(),
            vec!["--agent-url", "http://127.0.0.1:9", "--retention-days", "3651"],
            "retention-days must be between 1 and 3650",
        ),
        (
            format!("{base}concurrency = \"ten\"\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "(line 3): invalid type: string \"ten\"",
        ),
        // The flag wins over the file: its value is the one refused.
        (
            format!("{base}agent-url = \"http://127.0.0.1:9\"\n"),
            vec!["--agent-url", "ftp://flag"],
            "agent-url \"ftp://flag\" is not an http(s) URL",
        ),
        (
            base.clone(),
            vec![],
            "no agent server: give --agent-url URL or --spawn-agent",
        ),
        (
            format!("{base}spawn-agent = true\n"),
            vec!["--agent-url", "http://127.0.0.1:9"],
            "agent-url and spawn-agent exclude each other",
        ),
        (
            base.clone(),
            vec![
                "--agent-url",
                "http://127.0.0.1:9",
                "--agent-password-env",
                "AGENTSYNC_TEST_UNSET_VARIABLE",
            ],
            "agent-password-env: environment variable AGENTSYNC_TEST_UNSET_VARIABLE is not set",
        ),
        (
            base.clone(),
            vec!["--agent-url", "http://127.0.0.1:9", "--backend", "convex"],
            "backend convex needs convex-url",
        ),
        (
            base.clone(),
            vec![
                "--agent-url",
                "http://127.0.0.1:9",
                "--metrics-addr",
                "nowhere",
            ],
            "metrics-addr \"nowhere\"",
        ),
        (
            base.clone(),
            vec!["--agent-url", "http://127.0.0.1:9", "--model", "no-slash"],
            "model \"no-slash\" is not PROVIDER/MODEL",
        ),
        // The deploy key would cross the network in clear.
        (
            base.clone(),
            vec![
                "--agent-url",
                "http://127.0.0.1:9",
                "--backend",
                "convex",
                "--convex-url",
                "http://happy-otter-123.convex.cloud",
            ],
            "plain http to another host would send the deploy key in clear: use https",
        ),
        (
            base.clone(),
            vec!["--agent-url", "http://127.0.0.1:9/?token=abc"],
            "has a query or fragment",
        ),
        (
            base.clone(),
            vec![
                "--agent-url",
                "http://127.0.0.1:9",
                "--metrics-addr",
                "0.0.0.0:9464",
            ],
            "is not a loopback address: it would serve the worker's metrics to the network; add --metrics-public",
        ),
        // A secret of the worker's is never handed to the agent's shell.
        (
            base.clone(),
            vec![
                "--spawn-agent",
                "--agent-password-env",
                "HOME",
                "--agent-env",
                "HOME",
            ],
            "agent-env HOME: a secret of the worker's is never passed to the agent server",
        ),
    ] {
        let out = run(&config_text, &flags);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?}: wanted {says:?} in {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            !data.exists(),
            "{flags:?}: a refused start wrote the data dir"
        );
    }
}

/// An agent server that is not there: the worker starts, observes failures, never prunes.
const NOWHERE: &str = "http://127.0.0.1:9";

/// `agentsync run --data-dir DATA ARGS...` stopped with SIGTERM once it is observing (or
/// its own exit, if it refuses to start): its exit code and stderr.
fn run_until_observing(data: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    use nix::sys::signal::{kill, Signal};
    use std::time::{Duration, Instant};
    let log = data.with_extension("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agentsync"))
        .args(["run", "--data-dir", data.to_str().unwrap()])
        .args(["--metrics-addr", "127.0.0.1:0", "--drain-grace-secs", "1"])
        .args(args)
        .env("RUST_LOG", "agentsync=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    while child.try_wait().unwrap().is_none() {
        if text().contains(r#"state="observing""#) {
            // The signal handlers are installed as the loop starts, just after this line.
            std::thread::sleep(Duration::from_millis(300));
            kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                Signal::SIGTERM,
            )
            .unwrap();
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("not observing within 30 s:\n{}", text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().unwrap();
    (status.code(), text())
}

/// Every file of `dir` but `LOCK` (which names the last process that took it), with its bytes.
fn snapshot_without_lock(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files = snapshot(dir);
    files.retain(|(p, _)| !p.ends_with("LOCK"));
    files
}

fn recorded_identity(data: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(data.join("IDENTITY.json")).unwrap()).unwrap()
}

#[test]
fn a_data_dir_refuses_another_worker_id_with_exit_2_and_is_left_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (code, err) = run_until_observing(&data, &["--worker-id", "w1", "--agent-url", NOWHERE]);
    assert_eq!(code, Some(0), "{err}");
    let file = data.join("IDENTITY.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "IDENTITY.json is its owner's only");
    assert_eq!(
        recorded_identity(&data),
        serde_json::json!({"worker_id": "w1", "agent": {"url": "http://127.0.0.1:9/"}, "backend": "local"})
    );

    let before = snapshot_without_lock(&data);
    let d = data.to_str().unwrap();
    let out = agentsync(&[
        "run",
        "--data-dir",
        d,
        "--worker-id",
        "w2",
        "--agent-url",
        NOWHERE,
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(r#"worker id "w1" is recorded, not "w2""#),
        "{err}"
    );
    assert!(
        err.contains("--adopt"),
        "says how to move deliberately: {err}"
    );
    assert!(
        !err.contains("agent server"),
        "names only what differs: {err}"
    );
    assert_eq!(
        before,
        snapshot_without_lock(&data),
        "a refused start touched the data dir"
    );
}

#[test]
fn a_data_dir_refuses_another_agent_url_and_records_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A password in the URL is refused outright (it would reach logs and events): it belongs
    // in the variable --agent-password-env names.
    let with_secret = "http://opencode:hunter2@127.0.0.1:9";
    let refused = agentsync(&[
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--worker-id",
        "w",
        "--agent-url",
        with_secret,
    ]);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("carries credentials"), "{err}");
    assert!(!err.contains("hunter2"), "the password on stderr: {err}");
    assert!(!data.exists(), "a refused start creates nothing");
    let (code, err) = run_until_observing(&data, &["--worker-id", "w", "--agent-url", NOWHERE]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        recorded_identity(&data)["agent"]["url"],
        "http://127.0.0.1:9/"
    );

    let before = snapshot_without_lock(&data);
    let d = data.to_str().unwrap();
    let other = [
        "run",
        "--data-dir",
        d,
        "--worker-id",
        "w",
        "--agent-url",
        "http://127.0.0.1:10",
    ];
    let out = agentsync(&other);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("agent server http://127.0.0.1:9/ is recorded, not http://127.0.0.1:10/"),
        "{err}"
    );
    assert_eq!(before, snapshot_without_lock(&data));

    // The config key adopts as the flag does.
    let config = dir.path().join("adopt.toml");
    std::fs::write(&config, "adopt = true\n").unwrap();
    let args = ["--worker-id", "w", "--agent-url", "http://127.0.0.1:10"];
    let (code, err) = run_until_observing(
        &data,
        &[&args[..], &["--config", config.to_str().unwrap()]].concat(),
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        recorded_identity(&data)["agent"]["url"],
        "http://127.0.0.1:10/"
    );
}

#[test]
fn adopt_moves_a_data_dir_to_a_new_identity_and_the_log_records_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (code, err) = run_until_observing(&data, &["--worker-id", "w1", "--agent-url", NOWHERE]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run_until_observing(
        &data,
        &["--worker-id", "w2", "--agent-url", NOWHERE, "--adopt"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("adopted"), "{err}");
    assert_eq!(recorded_identity(&data)["worker_id"], "w2");

    let out = agentsync_in(&data, "replay", &["--kind", "identity_adopted", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let events = json_lines(&stdout(&out));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["body"]["previous"]["worker_id"], "w1");
    assert_eq!(events[0]["body"]["current"]["worker_id"], "w2");
    assert_eq!(events[0]["body"]["current"]["backend"], "local");

    // The new identity is now the one that binds: the old one is refused.
    let d = data.to_str().unwrap();
    let out = agentsync(&[
        "run",
        "--data-dir",
        d,
        "--worker-id",
        "w1",
        "--agent-url",
        NOWHERE,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(r#"worker id "w2" is recorded, not "w1""#));
}

#[test]
fn a_data_dir_from_before_identities_is_given_one_at_its_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    story(&data);
    assert!(!data.join("IDENTITY.json").exists());
    let (code, err) = run_until_observing(&data, &["--worker-id", "w1", "--agent-url", NOWHERE]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("written by an older agentsync"), "{err}");
    assert_eq!(recorded_identity(&data)["worker_id"], "w1");
    let out = agentsync_in(&data, "replay", &["--kind", "identity_adopted", "--json"]);
    assert!(
        stdout(&out).is_empty(),
        "recording a first identity is not a move"
    );
}

#[test]
fn a_fresh_data_dir_is_private_and_a_shared_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (code, err) = run_until_observing(&data, &["--worker-id", "w", "--agent-url", NOWHERE]);
    assert_eq!(code, Some(0), "{err}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    let mut files = 0;
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                assert_eq!(mode(&p), 0o700, "{}", p.display());
                stack.push(p);
            } else {
                assert_eq!(mode(&p) & 0o077, 0, "{} is {:o}", p.display(), mode(&p));
                files += 1;
            }
        }
    }
    assert!(
        files >= 4,
        "the log, its lock, marker and identity: {files}"
    );

    // Writable by the group: whoever is in it could plant a log. Refused, untouched.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o770)).unwrap();
    let before = snapshot_without_lock(&data);
    let out = agentsync(&[
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--worker-id",
        "w",
        "--agent-url",
        NOWHERE,
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("writable by group or others (mode 770)"),
        "{err}"
    );
    assert_eq!(before, snapshot_without_lock(&data));
    let replay = agentsync_in(&data, "replay", &[]);
    assert_eq!(replay.status.code(), Some(2), "inspection refuses it too");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();

    // A LOCK that is a symlink is not followed (the link's target is left alone).
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, b"precious").unwrap();
    std::fs::remove_file(data.join("LOCK")).unwrap();
    std::os::unix::fs::symlink(&target, data.join("LOCK")).unwrap();
    let out = agentsync_in(&data, "stats", &[]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("LOCK"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
}

/// Issue 13: what a log holds came from servers; printing it must not rewrite the terminal.
#[test]
fn replay_and_why_print_escape_sequences_from_the_log_escaped() {
    use agentsync::events::{
        ChatSessionInfo, ChatStatus, NewEvent, ObservationFailed, Source, WorkerStopping,
    };
    let dir = tempfile::tempdir().unwrap();
    let at = 1_763_800_000_000;
    let attack = "\x1b]0;pwned\x07\x1b[2J";
    let events = vec![
        NewEvent::new(
            Event::BackendSessionSeen(ChatSessionInfo {
                chat_session_id: format!("chat_{attack}").into(),
                agent_session_id: None,
                title: format!("title {attack}"),
                model: Some(format!("m/{attack}")),
                status: ChatStatus::Active,
                last_activity: at,
                project: Some(attack.into()),
            }),
            at,
        ),
        // Written as an older agentsync (or a bug) might have: not made one line.
        NewEvent::new(
            Event::ObservationFailed(ObservationFailed {
                source: Source::Backend,
                operation: "list_sessions".into(),
                error: format!("HTTP 500: {attack}\r\nforged line"),
            }),
            at,
        ),
        NewEvent::new(
            Event::WorkerStopping(WorkerStopping {
                reason: attack.into(),
            }),
            at,
        ),
    ];
    write_log(dir.path(), events, 8);
    let raw = |s: &str| s.contains(['\x1b', '\x07', '\r']);
    let table = stdout(&agentsync_in(dir.path(), "replay", &[]));
    assert!(!raw(&table), "{table:?}");
    assert_eq!(table.lines().count(), 4, "one line per event: {table}");
    assert!(table.contains("\\u{1b}]0;pwned\\u{7}\\u{1b}[2J"), "{table}");
    for view in ["sessions", "messages", "commands"] {
        let out = agentsync_in(dir.path(), "replay", &["--at", "3", "--view", view]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(!raw(&stdout(&out)), "{view}: {:?}", stdout(&out));
    }
    let why = agentsync_in(dir.path(), "why", &[&format!("chat_{attack}")]);
    assert_eq!(why.status.code(), Some(0), "{}", stderr(&why));
    assert!(!raw(&stdout(&why)), "{:?}", stdout(&why));
}

/// The `.seg` files of a data directory's archive, in seq order.
fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("archive"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.retain(|p: &std::path::PathBuf| p.extension().is_some_and(|x| x == "seg"));
    v.sort();
    v
}

/// A log whose checkpoints (written by `rebuild`) cover all but the last `live` events.
fn checkpointed(dir: &std::path::Path, live: usize) -> Vec<agentsync::events::Envelope> {
    let stored = random_log(dir, 21, 600);
    assert_eq!(agentsync_in(dir, "rebuild", &[]).status.code(), Some(0));
    write_more(dir, live);
    stored
}

#[test]
fn archive_leaves_export_replay_why_and_rebuild_as_they_were() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let stored = checkpointed(dir.path(), 5);
    let n = stored.len() as u64;
    // An id named only by early events: it will be in the archive alone.
    let early = stored
        .iter()
        .find_map(|e| e.event.message_id().map(|m| m.to_string()))
        .unwrap();
    let range = format!("{}", n - 10);
    let to = format!("{}", n + 3);
    let before = |args: &[&str], sub: &str| stdout(&agentsync_in(dir.path(), sub, args));
    let export = before(&[], "export");
    let replay = before(&["--from", &range, "--to", &to, "--json"], "replay");
    let why = before(&[&early, "--json"], "why");
    let view = before(&["--at", "50", "--view", "messages", "--json"], "replay");
    assert!(!why.is_empty());

    // With the database compacted after: everything below reads as before.
    let out = agentsync_in(dir.path(), "archive", &["--compact"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("archived {n} event(s) into 1 new segment(s)")),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("compacted the log database"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("not covered by every checkpoint"),
        "{}",
        stderr(&out)
    );
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 1);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&segs[0]), 0o600);
    assert_eq!(mode(&dir.path().join("archive")), 0o700);
    assert_eq!(
        mode(&dir.path().join("log")),
        0o700,
        "the compacted database"
    );

    let after = |args: &[&str], sub: &str| {
        let out = agentsync_in(dir.path(), sub, args);
        assert_eq!(out.status.code(), Some(0), "{sub}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(after(&[], "export"), export, "export is identical");
    assert_eq!(
        after(&["--from", &range, "--to", &to, "--json"], "replay"),
        replay,
        "a range across the boundary"
    );
    assert_eq!(after(&[&early, "--json"], "why"), why);
    assert_eq!(
        after(&["--at", "50", "--view", "messages", "--json"], "replay"),
        view
    );
    assert!(after(&["--verify"], "rebuild").contains("matches a rebuild from scratch"));
    let stats: Value = serde_json::from_str(&after(&["--json"], "stats")).unwrap();
    assert_eq!(stats["events"], n + 5);
    assert_eq!(stats["archive"]["archived_through"], n);
    // Archiving again moves nothing more (the rest is not covered).
    let again = agentsync_in(dir.path(), "archive", &["--json"]);
    let report: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["archived"], 0);
}

#[test]
fn a_damaged_segment_is_named_and_skip_corrupt_passes_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let stored = checkpointed(dir.path(), 5);
    let early = stored
        .iter()
        .find_map(|e| e.event.message_id().map(|m| m.to_string()))
        .unwrap();
    assert_eq!(
        agentsync_in(dir.path(), "archive", &[]).status.code(),
        Some(0)
    );
    let seg = segments(dir.path()).remove(0);
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    std::fs::write(&seg, bytes).unwrap();

    for (sub, args) in [
        ("replay", vec!["--json"]),
        ("export", vec![]),
        ("rebuild", vec![]),
        ("stats", vec![]),
        ("why", vec![early.as_str()]),
    ] {
        let out = agentsync_in(dir.path(), sub, &args);
        assert_eq!(out.status.code(), Some(1), "{sub}");
        assert!(stderr(&out).contains(&name), "{sub}: {}", stderr(&out));
    }
    let out = agentsync_in(dir.path(), "replay", &["--json", "--skip-corrupt"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json_lines(&stdout(&out)).len(), 5, "the live events");
    assert!(
        stderr(&out).contains("skipped archive segment"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&name));
}

#[test]
fn archive_refuses_bad_flags_and_a_running_workers_dir_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    story(dir.path());
    let bad = agentsync_in(
        dir.path(),
        "archive",
        &["--older-than-days", "7", "--drop-older-than-days", "3"],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--drop-older-than-days"));
    let held = agentsync::log::EventLog::open(dir.path(), &create()).unwrap();
    let locked = agentsync_in(dir.path(), "archive", &[]);
    assert_eq!(locked.status.code(), Some(2));
    assert!(stderr(&locked).contains("in use by another agentsync process"));
    drop(held);
    let missing = agentsync_in(&dir.path().join("nothing"), "archive", &[]);
    assert_eq!(missing.status.code(), Some(2));
    // No checkpoint: nothing moves, exit 0, and it says why.
    let out = agentsync_in(dir.path(), "archive", &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("archived 0 event(s)"));
    assert!(
        stderr(&out).contains("has no checkpoint"),
        "{}",
        stderr(&out)
    );
    assert!(segments(dir.path()).is_empty());
}

#[test]
fn why_across_many_small_segments_tells_the_same_chain_as_the_live_log() {
    use agentsync::log::{ArchiveOptions, EventLog, LogOptions};
    let dir = tempfile::tempdir().unwrap();
    let stored = checkpointed(dir.path(), 3);
    let mut ids: Vec<String> = stored
        .iter()
        .flat_map(|e| {
            let ev = &e.event;
            let mut v: Vec<String> = ev.session_ids().iter().map(|s| s.to_string()).collect();
            v.extend(ev.message_id().map(|m| m.to_string()));
            v.extend(ev.command_id().map(|c| c.to_string()));
            v
        })
        .collect();
    ids.sort();
    ids.dedup();
    // A sample across the history, and an event id.
    let step = (ids.len() / 12).max(1);
    let mut sample: Vec<String> = ids.into_iter().step_by(step).collect();
    sample.push(stored[stored.len() / 2].id.to_string());
    let why = |id: &str| {
        let out = agentsync_in(dir.path(), "why", &[id, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{id}: {}", stderr(&out));
        stdout(&out)
    };
    let before: Vec<String> = sample.iter().map(|id| why(id)).collect();
    {
        let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
        let opts = ArchiveOptions {
            older_than: std::time::Duration::ZERO,
            events_per_segment: 40,
            ..ArchiveOptions::default()
        };
        let r = log.archive(&opts, u64::MAX).unwrap();
        assert!(r.segments.len() > 10, "{}", r.segments.len());
        // The index is selective: an early message is in few of the segments.
        let early = stored
            .iter()
            .find_map(|e| e.event.message_id().map(|m| m.to_string()))
            .unwrap();
        let hits = log.segments_mentioning(&early).unwrap();
        assert!(
            !hits.is_empty() && hits.len() < r.segments.len() / 2,
            "{hits:?}"
        );
    }
    for (id, expected) in sample.iter().zip(&before) {
        assert_eq!(&why(id), expected, "why {id}");
    }
}

/// Runs `agentsync-bench ARGS --json` and parses what it printed.
fn bench_json(args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentsync-bench"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agentsync-bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_startup_measures_each_size_side_by_side_and_a_quiet_start_plans_nothing() {
    let r = bench_json(&[
        "startup",
        "--sessions",
        "200,400",
        "--backend-latency-ms",
        "20",
        "--agent-latency-ms",
        "5",
        "--active-percent",
        "10",
    ]);
    for n in ["200", "400"] {
        let ready = r["time_to_ready_ms"][n].as_f64().unwrap();
        // Ready needs at least one read of the backend's sessions, which waits 20 ms.
        assert!(ready >= 20.0, "{n}: ready in {ready} ms");
        assert!(r["peak_rss_mb"][n].as_f64().unwrap() > 0.0);
        let run = &r["runs"][n];
        let kinds = run["events_after_checkpoint"].as_object().unwrap();
        assert!(kinds.contains_key("worker_ready"), "{kinds:?}");
        // Nothing changed since the last run, conversations included: nothing to do.
        assert!(!kinds.contains_key("command_planned"), "{kinds:?}");
        assert!(!kinds.contains_key("backend_message_seen"), "{kinds:?}");
    }
    assert!(r["ratio_largest_smallest"].as_f64().unwrap() > 0.0);
    assert!(r["ratio_1m_10k"].is_null(), "not measured at these sizes");
}

#[test]
fn bench_soak_runs_simulated_days_answers_every_message_archives_and_finds_a_day_one_message() {
    let r = bench_json(&[
        "soak",
        "--days",
        "9",
        "--messages-per-day",
        "12",
        "--sessions",
        "3",
    ]);
    let days = r["days"].as_array().unwrap();
    assert_eq!(days.len(), 9);
    for (i, d) in days.iter().enumerate() {
        assert_eq!(d["answered"].as_u64(), Some(12 * (i as u64 + 1)), "{d}");
        assert!(d["live_log_bytes"].as_u64().unwrap() > 0);
        assert!(d["views_bytes"].as_u64().unwrap() > 0);
        assert!(d["startup_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(days[1]["events"].as_u64() > days[0]["events"].as_u64());
    // The archive step runs each simulated day (default window: 7 days), on simulated time.
    assert_eq!(days[6]["archive_bytes"].as_u64(), Some(0), "{}", days[6]);
    let last = &days[8];
    assert!(last["archive_bytes"].as_u64().unwrap() > 0, "{last}");
    assert!(
        last["live_events"].as_u64() < last["events"].as_u64(),
        "{last}"
    );
    // `why` reads the archive: the day-1 message is found.
    assert!(
        r["why_ms"]["lines"].as_u64().unwrap() > 0,
        "{}",
        r["why_ms"]
    );
    assert!(
        r["ratio_day90_day14"]["startup_ms"].is_null(),
        "under 14 days"
    );
}
