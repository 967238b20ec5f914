//! The log's invariants that the CLI tests do not reach directly.

mod common;

use agentsync::events::{DecodeError, Envelope};
use agentsync::log::{EventLog, LogOptions, ReadFilter};
use agentsync::testkit::History;
use common::*;
use tokio_stream::StreamExt;

#[test]
fn acknowledged_events_survive_reopen_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    let first = random_log(dir.path(), 2, 50);
    let more = random_log(dir.path(), 3, 50);
    assert_eq!(more[0].seq, first.len() as u64 + 1);
    let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
    assert_eq!(log.last_seq(), (first.len() + more.len()) as u64);
    assert_eq!(log.durable_seq(), log.last_seq());
}

/// Set in the child of `an_unflushed_append_is_made_durable_by_the_next_flushed_one`.
const UNFLUSHED_CHILD: &str = "AGENTSYNC_TEST_UNFLUSHED_CHILD";

#[test]
fn an_unflushed_append_is_made_durable_by_the_next_flushed_one() {
    let events = |seed| History::of(&History::random_steps(seed, 20), 1_763_700_000_000);
    if let Some(dir) = std::env::var_os(UNFLUSHED_CHILD) {
        // The child: an unflushed batch, then a flushed one, then a death with no clean-up
        // (no drop of the log, so no flush of sled's own at close).
        let log = EventLog::open(&dir, &create()).unwrap();
        let first = log.append_unflushed(events(1)).unwrap();
        assert!(
            log.durable_seq() < first.last().unwrap().seq,
            "not waited for"
        );
        log.append(events(2)).unwrap();
        assert_eq!(log.durable_seq(), log.last_seq());
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_unflushed_append_is_made_durable_by_the_next_flushed_one",
        ])
        .env(UNFLUSHED_CHILD, dir.path())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        child.status.signal(),
        Some(nix::libc::SIGABRT),
        "the child's checks passed and it died: {}",
        String::from_utf8_lossy(&child.stdout)
    );
    let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
    let read: Vec<_> = log
        .read(ReadFilter::default())
        .map(|e| e.unwrap())
        .collect();
    let written: Vec<_> = [events(1), events(2)].concat();
    assert!(!events(1).is_empty() && !events(2).is_empty());
    assert_eq!(
        read.len(),
        written.len(),
        "{}",
        String::from_utf8_lossy(&child.stderr)
    );
    for (r, w) in read.iter().zip(&written) {
        assert_eq!(r.event, w.event);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_stream_yields_the_same_events_as_the_blocking_read() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 8, 700);
    let log = std::sync::Arc::new(EventLog::open(dir.path(), &LogOptions::default()).unwrap());
    let streamed: Vec<Envelope> = log
        .stream(ReadFilter::default())
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert!(stored.len() > 1024, "spans more than one chunk");
    assert_eq!(streamed, stored);
}

#[test]
fn decode_refuses_what_it_does_not_know_and_says_why() {
    let newer = br#"{"seq":1,"id":"019aa4b6-4544-762c-b92d-fda74e96c767","at":1,"v":9,"kind":"agent_session_seen","body":{},"cause":null}"#;
    assert!(matches!(
        Envelope::decode(newer),
        Err(DecodeError::NewerVersion { v: 9, known: 2, .. })
    ));
    let unknown = br#"{"seq":1,"id":"019aa4b6-4544-762c-b92d-fda74e96c767","at":1,"v":1,"kind":"teleported","body":{},"cause":null}"#;
    let err = Envelope::decode(unknown).unwrap_err();
    assert!(err.to_string().contains("unknown event kind `teleported`"));
    let bad_body = br#"{"seq":1,"id":"019aa4b6-4544-762c-b92d-fda74e96c767","at":1,"v":1,"kind":"worker_ready","body":{"x":1},"cause":null}"#;
    let err = Envelope::decode(bad_body).unwrap_err();
    assert!(
        err.to_string()
            .contains("`worker_ready` v1 body does not match"),
        "{err}"
    );
}

// ----- the archive -----

use agentsync::log::{load_views, ArchiveOptions, LogError};
use std::time::Duration;

/// Far past every generated event's time: everything is old enough to archive.
const LATER: u64 = 1_763_700_000_000 + 365 * 24 * 3600 * 1000;

fn archive_all(per_segment: u64) -> ArchiveOptions {
    ArchiveOptions {
        older_than: Duration::ZERO,
        events_per_segment: per_segment,
        ..ArchiveOptions::default()
    }
}

/// Writes every projection's checkpoint as of seq `upto` (what a worker does on its own).
fn checkpoint_at(log: &EventLog, upto: u64) {
    let (views, _) = load_views(log, Some(upto), None, true, |_| {}).unwrap();
    let store = log.checkpoints();
    store.save(&views.sessions).unwrap();
    store.save(&views.messages).unwrap();
    store.save(&views.commands).unwrap();
}

fn all(log: &EventLog, filter: ReadFilter) -> Vec<Envelope> {
    log.read(filter).map(Result::unwrap).collect()
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("archive"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn archived_and_live_events_read_as_one_sequence_before_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 11, 400);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    let last = log.last_seq();
    checkpoint_at(&log, last - 50);
    let report = log.archive(&archive_all(100), LATER).unwrap();
    assert_eq!(report.archived, last - 50);
    assert_eq!(report.archived_through, last - 50);
    assert!(report.segments.len() >= 2, "{report:?}");
    assert_eq!(all(&log, ReadFilter::default()), stored);
    assert_eq!(log.get(1).unwrap().as_ref(), Some(&stored[0]));
    assert_eq!(log.get(last).unwrap().as_ref(), stored.last());
    drop(log);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    assert_eq!(log.last_seq(), last);
    assert_eq!(all(&log, ReadFilter::default()), stored);
    // Across the boundary, with a range and a session filter, as before archiving.
    let session = stored
        .iter()
        .find_map(|e| e.event.session_ids().first().map(|s| s.to_string()))
        .unwrap();
    let filter = ReadFilter {
        range: 30..=last - 20,
        session: Some(session.clone()),
        kinds: None,
    };
    let expected: Vec<Envelope> = stored
        .iter()
        .filter(|e| (30..=last - 20).contains(&e.seq))
        .filter(|e| e.event.session_ids().contains(&session.as_str()))
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(all(&log, filter), expected);
    // Appending goes on after the last seq, archived or not.
    let more = log
        .append(agentsync::testkit::History::of(
            &agentsync::testkit::History::random_steps(3, 5),
            LATER,
        ))
        .unwrap();
    assert_eq!(more[0].seq, last + 1);
}

#[test]
fn everything_archived_still_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 12, 100);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    checkpoint_at(&log, log.last_seq());
    log.archive(&archive_all(1000), LATER).unwrap();
    drop(log);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    assert_eq!(log.last_seq(), stored.len() as u64);
    assert_eq!(log.archived_through(), stored.len() as u64);
    let more = log
        .append(agentsync::testkit::History::of(
            &agentsync::testkit::History::random_steps(3, 5),
            LATER,
        ))
        .unwrap();
    assert_eq!(more[0].seq, stored.len() as u64 + 1);
    let read = all(&log, ReadFilter::default());
    assert_eq!(&read[..stored.len()], &stored[..]);
    assert_eq!(&read[stored.len()..], &more[..]);
}

#[test]
fn events_not_covered_by_every_checkpoint_or_too_young_stay_live() {
    let dir = tempfile::tempdir().unwrap();
    random_log(dir.path(), 13, 200);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    // No checkpoint at all: nothing moves, and the report says why.
    let r = log.archive(&archive_all(1000), LATER).unwrap();
    assert_eq!(r.archived, 0);
    assert!(r.not_covered.unwrap().contains("no checkpoint"));
    // One projection behind the others: only what it covers moves.
    checkpoint_at(&log, 60);
    let (views, _) = load_views(&log, Some(120), None, true, |_| {}).unwrap();
    log.checkpoints().save(&views.sessions).unwrap();
    log.checkpoints().save(&views.commands).unwrap();
    let r = log.archive(&archive_all(1000), LATER).unwrap();
    assert_eq!(
        (r.archived, r.archived_through, r.covered_through),
        (60, 60, 60)
    );
    assert!(r.not_covered.unwrap().contains("after seq 60"));
    // Covered, but younger than the retention window: stays.
    checkpoint_at(&log, log.last_seq());
    let young = ArchiveOptions {
        older_than: Duration::from_secs(7 * 24 * 3600),
        ..archive_all(1000)
    };
    let r = log.archive(&young, 1_763_700_000_000 + 1000).unwrap();
    assert_eq!(r.archived, 0);
    assert_eq!(log.archived_through(), 60);
}

#[test]
fn a_rebuild_from_archive_and_live_log_equals_the_views_from_the_live_log() {
    let dir = tempfile::tempdir().unwrap();
    random_log(dir.path(), 14, 500);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    let (before, _) = load_views(&log, None, None, true, |_| {}).unwrap();
    checkpoint_at(&log, log.last_seq() - 100);
    log.archive(&archive_all(150), LATER).unwrap();
    assert!(log.archived_through() > 0);
    let (after, _) = load_views(&log, None, None, true, |_| {}).unwrap();
    for p in agentsync::projections::ProjectionName::ALL {
        assert_eq!(before.to_json(p), after.to_json(p), "{p}");
    }
}

#[test]
fn a_damaged_segment_is_reported_by_its_file_name_and_the_rest_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 15, 300);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    checkpoint_at(&log, log.last_seq());
    log.archive(&archive_all(100), LATER).unwrap();
    drop(log);
    let segs = segment_files(dir.path());
    // A flipped byte near the end (the events section), and another segment cut short.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&segs[0], bytes).unwrap();
    let len = std::fs::metadata(&segs[1]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[1])
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
    let items: Vec<Result<Envelope, LogError>> = log.read(ReadFilter::default()).collect();
    let damaged: Vec<String> = items
        .iter()
        .filter_map(|i| i.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert_eq!(damaged.len(), 2, "{damaged:?}");
    for (msg, seg) in damaged.iter().zip(&segs) {
        let name = seg.file_name().unwrap().to_string_lossy().into_owned();
        assert!(msg.contains(&name), "{msg}");
    }
    assert!(damaged[0].contains("checksum"), "{}", damaged[0]);
    assert!(damaged[1].contains("truncated"), "{}", damaged[1]);
    let good: Vec<u64> = items
        .into_iter()
        .filter_map(|i| i.ok())
        .map(|e| e.seq)
        .collect();
    let expected: Vec<u64> = stored.iter().map(|e| e.seq).filter(|&s| s > 200).collect();
    assert_eq!(good, expected, "the segments after them read on");
    assert!(matches!(log.get(5), Err(LogError::Segment { .. })));
}

#[test]
fn dropping_old_segments_is_asked_for_and_a_rebuild_from_scratch_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 16, 300);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    checkpoint_at(&log, log.last_seq());
    let kept = log.archive(&archive_all(100), LATER).unwrap();
    assert_eq!(kept.dropped_segments, 0, "nothing is deleted unless asked");
    let dropping = ArchiveOptions {
        drop_older_than: Some(Duration::from_secs(24 * 3600)),
        ..archive_all(100)
    };
    let r = log.archive(&dropping, LATER).unwrap();
    assert_eq!(r.dropped_segments as usize, kept.segments.len());
    assert_eq!(r.dropped_through, stored.len() as u64);
    assert!(segment_files(dir.path()).is_empty());
    assert!(all(&log, ReadFilter::default()).is_empty());
    assert!(matches!(
        load_views(&log, None, None, true, |_| {}),
        Err(LogError::Dropped { .. })
    ));
    // The checkpoints still load: a worker starts.
    let (views, catch_up) = load_views(&log, None, None, false, |_| {}).unwrap();
    assert_eq!(catch_up.applied, 0);
    assert!(!views.sessions.state.agent.is_empty());
}

#[test]
fn links_name_every_event_across_the_boundary_and_decode_only_the_needles() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 17, 300);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    checkpoint_at(&log, log.last_seq() - 30);
    log.archive(&archive_all(100), LATER).unwrap();
    let session = stored
        .iter()
        .find_map(|e| e.event.session_ids().first().map(|s| s.to_string()))
        .unwrap();
    let links: Vec<_> = log
        .read_links(1..=u64::MAX, Some(&session))
        .map(Result::unwrap)
        .collect();
    assert_eq!(links.len(), stored.len());
    for (l, e) in links.iter().zip(&stored) {
        assert_eq!((l.seq, l.id, l.cause), (e.seq, e.id, e.cause));
        let holds = e
            .encode()
            .windows(session.len())
            .any(|w| w == session.as_bytes());
        assert_eq!(l.event.as_ref(), holds.then_some(e), "seq {}", e.seq);
    }
}

/// Every stored projection's checkpoint, as tools read it.
fn stored_views(log: &EventLog) -> Vec<serde_json::Value> {
    let store = log.checkpoints();
    ["sessions", "messages", "commands"]
        .iter()
        .map(|name| serde_json::to_value(store.load_raw(name).unwrap()).unwrap())
        .collect()
}

#[test]
fn a_compaction_after_an_archive_keeps_every_event_and_view_and_gives_the_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let stored = random_log(dir.path(), 13, 3000);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    let last = log.last_seq();
    checkpoint_at(&log, last - 40);
    log.archive(&archive_all(1000), LATER).unwrap();
    let views = stored_views(&log);
    let report = log.compact().unwrap();
    assert!(
        report.bytes_after < report.bytes_before,
        "sled keeps what the archive removed until compacted: {report:?}"
    );
    assert!(report.entries >= 40, "{report:?}");
    for leftover in ["log.compact", "log.old"] {
        assert!(
            !dir.path().join(leftover).exists(),
            "{leftover} left behind"
        );
    }
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    assert_eq!(log.last_seq(), last);
    assert_eq!(all(&log, ReadFilter::default()), stored);
    assert_eq!(stored_views(&log), views);
    let more = log
        .append(agentsync::testkit::History::of(
            &agentsync::testkit::History::random_steps(3, 5),
            LATER,
        ))
        .unwrap();
    assert_eq!(more[0].seq, last + 1);
}

/// Found in review: a data dir whose sessions view is of the version before (v5) and whose
/// archive's oldest segments are deleted (`--drop-archive-after-days`) could not start: the
/// view could only be rebuilt from the log, and the log no longer starts at seq 1. It is read
/// whole and upcast: each agent row marked mirrored when the ledger holds its
/// `createSession`, as the fold would have marked it.
#[test]
fn a_view_of_the_version_before_is_upcast_when_the_log_cannot_rebuild_it() {
    use agentsync::events::*;
    use agentsync::log::{CheckpointPolicy, LiveViews};
    let dir = tempfile::tempdir().unwrap();
    // Three agent sessions mirrored by the worker (its ids), one not yet, then a long tail.
    let mut events = Vec::new();
    for i in 0..4 {
        let agent = AgentSessionId(format!("ses_{i}"));
        let info = AgentSessionInfo {
            agent_session_id: agent.clone(),
            title: format!("S{i}"),
            directory: None,
            project: None,
            model: None,
            updated_at: 1_000 + i,
            parent_id: None,
            tag: None,
        };
        events.push(Event::AgentSessionSeen(info));
        if i < 3 {
            let command = Command::CreateSession {
                agent_session_id: agent.clone(),
                title: format!("S{i}"),
                model: None,
            };
            let command_id = agentsync::reconcile::ids::create_session(&agent);
            events.push(Event::CommandPlanned(CommandPlanned {
                command_id: command_id.clone(),
                command: command.clone(),
                reason: "agent session has no chat session".into(),
            }));
            events.push(Event::CommandDeadLettered(CommandDeadLettered {
                command_id,
                op: command.op(),
                subject: command.subject(),
                attempts: 5,
                last_error: "HTTP 500".into(),
            }));
        }
    }
    let events = events
        .into_iter()
        .map(|e| NewEvent::new(e, 1_763_700_000_000));
    let mut all: Vec<NewEvent> = events.collect();
    use agentsync::testkit::History;
    let tail = History::random_steps(17, 300);
    all.extend(History::of(&tail, 1_763_700_000_000));
    let _ = common::write_log(dir.path(), all, 50);
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    checkpoint_at(&log, log.last_seq());
    // Planned after the ledger's checkpoint, before the sessions view's: only a catch-up of
    // the ledger names it.
    let agent = AgentSessionId::from("ses_3");
    let late = CommandPlanned {
        command_id: agentsync::reconcile::ids::create_session(&agent),
        command: Command::CreateSession {
            agent_session_id: agent,
            title: "S3".into(),
            model: None,
        },
        reason: "agent session has no chat session".into(),
    };
    log.append(vec![NewEvent::new(
        Event::CommandPlanned(late),
        1_763_700_000_000,
    )])
    .unwrap();
    let (whole, _) = load_views(&log, None, None, true, |_| {}).unwrap();
    log.checkpoints().save(&whole.sessions).unwrap();
    let marked = |views: &agentsync::projections::Views| -> Vec<String> {
        let rows = views.sessions.state.agent.iter();
        rows.filter(|(_, r)| r.mirror_planned)
            .map(|(id, _)| id.0.clone())
            .filter(|id| id.len() == 5)
            .collect()
    };
    let all_four = ["ses_0", "ses_1", "ses_2", "ses_3"];
    assert_eq!(marked(&whole), all_four);
    // The sessions view as the v5 binary stored it: no marks.
    let store = log.checkpoints();
    let mut raw = store.load_raw("sessions").unwrap().unwrap();
    raw.version = 5;
    for row in raw.state["agent"].as_object_mut().unwrap().values_mut() {
        row.as_object_mut().unwrap().remove("mirror_planned");
    }
    store.save_raw("sessions", &raw).unwrap();
    let dropping = ArchiveOptions {
        drop_older_than: Some(Duration::from_secs(24 * 3600)),
        ..archive_all(100)
    };
    log.archive(&archive_all(100), LATER).unwrap();
    log.archive(&dropping, LATER).unwrap();
    assert!(log.dropped_through() > 0);
    let (live, _) = LiveViews::open(&log, CheckpointPolicy::default(), LATER).unwrap();
    assert_eq!(marked(&live.views), all_four);
    assert_eq!(
        live.views.sessions.state.chat.len(),
        whole.sessions.state.chat.len()
    );
    // That worker swept the creations (final, their sessions marked) and stopped before its
    // first checkpoint: the next start upcasts the same view, and the sweep still marks.
    let creations: Vec<CommandId> = (0..3)
        .map(|i| agentsync::reconcile::ids::create_session(&AgentSessionId(format!("ses_{i}"))))
        .collect();
    let swept = RetentionSwept {
        horizon_ms: 1,
        before: LATER,
        commands: creations.clone(),
        messages: Vec::new(),
        chats: Vec::new(),
    };
    drop(live);
    log.append(vec![NewEvent::new(Event::RetentionSwept(swept), LATER)])
        .unwrap();
    let (live, _) = LiveViews::open(&log, CheckpointPolicy::default(), LATER).unwrap();
    let ledger = &live.views.commands.state.commands;
    assert!(creations.iter().all(|c| !ledger.contains_key(c)), "swept");
    assert_eq!(marked(&live.views), all_four);
}
