//! The log's invariants that the CLI tests do not reach directly.

mod common;

use agentsync::events::{DecodeError, Envelope};
use agentsync::log::{EventLog, LogOptions, ReadFilter};
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
