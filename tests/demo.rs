//! `agentsync demo`: the incident through the real binary, its summary, and the log it leaves.

mod common;

use common::agentsync;
use serde_json::Value;

#[test]
fn the_demo_replays_the_incident_and_leaves_a_log_that_replay_and_why_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let data_s = data.to_str().unwrap();
    let out = agentsync(&["demo", "--data-dir", data_s, "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let s: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "time_to_ready_ms",
        "model_fetches",
        "peak_in_flight",
        "commands",
        "messages_answered",
        "messages_failed",
        "deletions_from_failed_listing",
    ] {
        assert!(s.get(key).is_some(), "missing {key}: {s}");
    }
    // The incident's numbers: 90 creations cost one model fetch; 20 renames; the 10 orphans
    // deleted and nothing else despite the failed and partial listings; the 3 stale messages
    // failed, the 5 fresh ones answered; at most 10 calls in flight to a side.
    assert_eq!(s["model_fetches"], 1, "{s}");
    assert_eq!(s["commands"]["createSession"]["succeeded"], 90, "{s}");
    assert_eq!(s["commands"]["renameSession"]["succeeded"], 20, "{s}");
    assert_eq!(s["commands"]["markSessionDeleted"]["succeeded"], 10, "{s}");
    assert_eq!(s["deletions_from_failed_listing"], 0, "{s}");
    assert_eq!(s["messages_failed"], 3, "{s}");
    assert_eq!(s["messages_answered"], 5, "{s}");
    assert!(s["peak_in_flight"].as_u64().unwrap() <= 10, "{s}");
    assert!(s["time_to_ready_ms"].as_u64().is_some(), "{s}");

    let why = agentsync(&[
        "why",
        "--data-dir",
        data_s,
        "markSessionDeleted:chat_00_255",
    ]);
    assert_eq!(why.status.code(), Some(0));
    let text = String::from_utf8_lossy(&why.stdout);
    assert!(
        text.contains("listing_completed"),
        "the deletion's cause is the complete listing:\n{text}"
    );
    let verify = agentsync(&["rebuild", "--data-dir", data_s, "--verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // A directory that already holds something is refused, and left alone.
    let again = agentsync(&["demo", "--data-dir", data_s]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
