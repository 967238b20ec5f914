//! `tests/fixtures/v1-log.jsonl` is a log written when `agent_session_seen` and
//! `agent_session_changed` were version 1 (`id`, and `model` as one `provider/model` string).
//! It must read as version 2, through the decoder and through the binary.

mod common;

use agentsync::events::{Envelope, Event, EventKind, ModelRef};
use agentsync::projections::{Projection, SessionsView};
use common::*;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/v1-log.jsonl");

fn v1_lines() -> Vec<&'static str> {
    FIXTURE.lines().collect()
}

#[test]
fn the_fixture_really_holds_v1_bodies() {
    let v1: Vec<Value> = v1_lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "agent_session_seen" || v["kind"] == "agent_session_changed")
        .collect();
    assert!(v1.len() >= 3);
    for v in v1 {
        assert_eq!(v["v"], 1);
        assert!(v["body"]["id"].is_string());
        assert!(v["body"].get("agent_session_id").is_none());
    }
}

#[test]
fn v1_sessions_decode_as_v2_with_the_id_renamed_and_the_model_split() {
    let mut upcast = 0;
    for line in v1_lines() {
        let raw: Value = serde_json::from_str(line).unwrap();
        let env = Envelope::decode(line.as_bytes()).unwrap();
        assert_eq!(env.v, env.kind().version(), "read as the current version");
        if let Event::AgentSessionSeen(b) | Event::AgentSessionChanged(b) = &env.event {
            upcast += 1;
            assert_eq!(env.v, 2);
            assert_eq!(
                b.agent_session_id.as_str(),
                raw["body"]["id"].as_str().unwrap()
            );
            let (p, m) = raw["body"]["model"]
                .as_str()
                .map(|s| s.split_once('/').unwrap())
                .unzip();
            assert_eq!(
                b.model,
                p.zip(m).map(|(p, m)| ModelRef {
                    provider_id: p.into(),
                    model_id: m.into()
                })
            );
        }
    }
    assert!(upcast >= 3);
}

/// Writes the fixture's bytes into a data directory exactly as the older binary stored them.
fn old_data_dir(dir: &std::path::Path) {
    let db = sled::open(dir.join("log")).unwrap();
    let events = db.open_tree("events").unwrap();
    for line in v1_lines() {
        let seq = serde_json::from_str::<Value>(line).unwrap()["seq"]
            .as_u64()
            .unwrap();
        events.insert(seq.to_be_bytes(), line.as_bytes()).unwrap();
    }
    db.flush().unwrap();
}

#[test]
fn an_old_data_dir_exports_and_replays_as_v2() {
    let dir = tempfile::tempdir().unwrap();
    old_data_dir(dir.path());
    let out = agentsync_in(dir.path(), "export", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), v1_lines().len());
    let sessions: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "agent_session_seen")
        .collect();
    assert!(!sessions.is_empty());
    for s in sessions {
        assert_eq!(s["v"], 2);
        assert!(s["body"]["agent_session_id"].is_string());
        assert!(s["body"]["model"]["provider_id"].is_string());
    }
    // Reading never rewrites: the stored bytes are still version 1.
    let db = sled::open(dir.path().join("log")).unwrap();
    let first_session = db
        .open_tree("events")
        .unwrap()
        .iter()
        .values()
        .map(|v| v.unwrap())
        .find(|v| {
            std::str::from_utf8(v)
                .unwrap()
                .contains("\"kind\":\"agent_session_seen\"")
        })
        .unwrap();
    assert!(std::str::from_utf8(&first_session)
        .unwrap()
        .contains("\"v\":1"));
    drop(db);
    let out = agentsync_in(
        dir.path(),
        "replay",
        &["--at", "30", "--view", "sessions", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_v1_history_folds_to_the_same_state_as_its_v2_equivalent() {
    let v1: Vec<Envelope> = v1_lines()
        .iter()
        .map(|l| Envelope::decode(l.as_bytes()).unwrap())
        .collect();
    let v2: Vec<Envelope> = v1
        .iter()
        .map(|e| Envelope::decode(&e.encode()).unwrap())
        .collect();
    assert!(v2.iter().any(|e| e.kind() == EventKind::AgentSessionSeen));
    let fold = |events: &[Envelope]| {
        let mut s = SessionsView::default();
        events.iter().for_each(|e| s.apply(e));
        s
    };
    assert_eq!(fold(&v1), fold(&v2));
    assert!(!fold(&v1).agent.is_empty());
}
