//! The control loop against the simulated sides, on a paused clock.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::log::{LogOptions, ReadFilter};
use crate::sim::{Faults, SimAgent, SimBackend};

const T0: Millis = 1_763_700_000_000;

fn linked_sides(clock: Arc<dyn Clock>, n: usize) -> (Arc<SimAgent>, Arc<SimBackend>) {
    let agent = Arc::new(SimAgent::new(clock.clone(), Faults::default()));
    let backend = Arc::new(SimBackend::new(clock, Faults::default()));
    for i in 0..n {
        let id = AgentSessionId(format!("ses_{i}"));
        // From its wire form: fields added later with defaults need no change here.
        let info = serde_json::json!({"agent_session_id": id, "title": format!("S{i}"), "updated_at": T0 - 60_000});
        agent.insert(serde_json::from_value(info).expect("an agent session"));
        backend.insert_session(ChatSessionInfo {
            chat_session_id: ChatSessionId(format!("chat_{i}")),
            agent_session_id: Some(id),
            title: format!("S{i}"),
            model: None,
            status: ChatStatus::Active,
            last_activity: T0 - 60_000,
            project: None,
        });
    }
    (agent, backend)
}

fn deleted(backend: &SimBackend) -> usize {
    let sessions = backend.sessions();
    sessions
        .values()
        .filter(|c| c.status == ChatStatus::Deleted)
        .count()
}

#[test]
fn a_wiped_agent_server_deletes_nothing_until_a_listing_a_minute_later_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        create: true,
        ..LogOptions::default()
    };
    let log = Arc::new(EventLog::open(dir.path(), &opts).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let (agent, backend) = rt.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 30);
        let worker = Worker::open(
            log.clone(),
            agent.clone(),
            backend.clone(),
            clock,
            WorkerConfig::default(),
        )
        .await
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            for i in 5..30 {
                agent.remove(&AgentSessionId(format!("ses_{i}")));
            }
            // Listings every few seconds, all agreeing: none a minute after the hold yet.
            tokio::time::sleep(Duration::from_secs(45)).await;
            assert_eq!(
                deleted(&backend),
                0,
                "deleted before a listing confirmed it"
            );
            tokio::time::sleep(Duration::from_secs(120)).await;
            assert_eq!(
                deleted(&backend),
                25,
                "confirmed deletions were not carried out"
            );
            let _ = stop.send(());
        };
        let (report, ()) = tokio::join!(
            worker.run(async {
                let _ = stopped.await;
            }),
            driver
        );
        report.unwrap();
        (agent, backend)
    });
    assert_eq!(agent.sessions().len(), 5);
    assert_eq!(deleted(&backend), 25);

    let kinds = [
        EventKind::DeletionsHeld,
        EventKind::DeletionHoldLifted,
        EventKind::CommandPlanned,
    ];
    let filter = ReadFilter {
        kinds: Some(kinds.to_vec()),
        ..ReadFilter::default()
    };
    let events: Vec<Envelope> = log.read(filter).map(Result::unwrap).collect();
    let held: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::DeletionsHeld(h) => Some((e, h)),
            _ => None,
        })
        .collect();
    assert_eq!(held.len(), 1, "held once: {held:?}");
    let (held_env, h) = held[0];
    assert_eq!((h.candidates, h.limit), (25, 20));
    let listing = log.get(h.listing_seq).unwrap().unwrap();
    assert_eq!(listing.kind(), EventKind::ListingCompleted);
    assert_eq!(
        held_env.cause,
        Some(listing.id),
        "the hold names its listing"
    );
    for e in &events {
        if let Event::CommandPlanned(p) = &e.event {
            if p.command.op() == Op::MarkSessionDeleted {
                assert!(
                    e.at >= held_env.at + 60_000,
                    "planned {} ms after the hold",
                    e.at - held_env.at
                );
            }
        }
    }
    let lifted = events
        .iter()
        .filter(|e| e.kind() == EventKind::DeletionHoldLifted)
        .count();
    assert_eq!(lifted, 1, "lifted once the deletions were carried out");
}
