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

/// A backend whose listings misbehave; mutations go to the simulated one.
struct Hostile {
    inner: Arc<SimBackend>,
    /// `listSessions`: a cursor that moves forever ("c1", "c2", ...), never done.
    sessions_moving: bool,
    /// `listMessages`: the cursor it was asked with, never done (else: a 1 MB error page).
    messages_stuck: bool,
    pages: std::sync::atomic::AtomicU64,
}

impl Backend for Hostile {
    fn list_sessions<'a>(
        &'a self,
        cursor: Option<&'a str>,
        _limit: u32,
    ) -> crate::ports::PortFuture<'a, crate::ports::Page<ChatSessionInfo>> {
        let n = self.pages.fetch_add(1, Ordering::SeqCst);
        let moving = self.sessions_moving;
        Box::pin(async move {
            if !moving {
                return self.inner.list_sessions(cursor, 10).await;
            }
            Ok(crate::ports::Page {
                page: Vec::new(),
                is_done: false,
                continue_cursor: format!("c{n}"),
            })
        })
    }

    fn list_messages<'a>(
        &'a self,
        cursor: Option<&'a str>,
        _limit: u32,
    ) -> crate::ports::PortFuture<'a, crate::ports::Page<MessageInfo>> {
        let stuck = self.messages_stuck;
        Box::pin(async move {
            if stuck {
                return Ok(crate::ports::Page {
                    page: Vec::new(),
                    is_done: false,
                    continue_cursor: cursor.unwrap_or("start").to_owned(),
                });
            }
            let page = "<h1>502 Bad Gateway</h1>\r\n\x1b]0;pwned\x07\n".repeat(25_000);
            Err(PortError::retryable(format!(
                "listMessages: HTTP 502: {page}"
            )))
        })
    }

    fn mutate<'a>(
        &'a self,
        command_id: &'a CommandId,
        command: &'a Command,
    ) -> crate::ports::PortFuture<'a, crate::ports::MutationReply> {
        self.inner.mutate(command_id, command)
    }
}

/// Runs a worker against `backend` for `secs` of paused time; its `observation_failed` events.
fn observation_failures(backend: Hostile, secs: u64) -> Vec<ObservationFailed> {
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
    rt.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, _) = linked_sides(clock.clone(), 3);
        let cfg = WorkerConfig {
            max_listing_pages: 20,
            ..WorkerConfig::default()
        };
        let worker = Worker::open(log.clone(), agent, Arc::new(backend), clock, cfg)
            .await
            .unwrap();
        worker
            .run(tokio::time::sleep(Duration::from_secs(secs)))
            .await
            .unwrap();
    });
    let filter = ReadFilter {
        kinds: Some(vec![EventKind::ObservationFailed]),
        ..ReadFilter::default()
    };
    log.read(filter)
        .map(|e| match e.unwrap().event {
            Event::ObservationFailed(f) => f,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_backend_that_pages_forever_is_a_failed_observation_never_an_endless_loop() {
    let clock: Arc<dyn Clock> = Arc::new(crate::clock::ManualClock::new(T0));
    let backend = Hostile {
        inner: Arc::new(SimBackend::new(clock, Faults::default())),
        sessions_moving: true,
        messages_stuck: true,
        pages: Default::default(),
    };
    let failures = observation_failures(backend, 60);
    let sessions: Vec<_> = failures
        .iter()
        .filter(|f| f.operation == "list_sessions")
        .collect();
    let messages: Vec<_> = failures
        .iter()
        .filter(|f| f.operation == "list_messages")
        .collect();
    assert!(!sessions.is_empty() && !messages.is_empty(), "{failures:?}");
    assert!(
        sessions.len() < 40,
        "one failure per poll: {}",
        sessions.len()
    );
    assert!(
        sessions.iter().all(|f| f.source == Source::Backend
            && f.error.starts_with("listSessions: not done after 20 pages")),
        "{sessions:?}"
    );
    assert!(
        messages.iter().all(|f| f.error.starts_with(
            "listMessages: the backend answered isDone: false with the cursor it was asked with"
        )),
        "{messages:?}"
    );
}

#[test]
fn a_megabyte_listing_error_is_one_bounded_line_in_observation_failed() {
    let clock: Arc<dyn Clock> = Arc::new(crate::clock::ManualClock::new(T0));
    let backend = Hostile {
        inner: Arc::new(SimBackend::new(clock, Faults::default())),
        sessions_moving: false,
        messages_stuck: false,
        pages: Default::default(),
    };
    let failures = observation_failures(backend, 10);
    assert!(!failures.is_empty());
    for f in failures {
        assert_eq!(f.operation, "list_messages");
        assert_eq!(f.error.chars().count(), crate::text::MAX_LINE_CHARS);
        assert!(
            !f.error.contains(['\n', '\r', '\x1b', '\x07']),
            "{}",
            f.error
        );
        assert!(f
            .error
            .starts_with("listMessages: HTTP 502: <h1>502 Bad Gateway</h1> \\u{1b}]0;pwned\\u{7}"));
    }
}

/// The log of a process that died with a prompt on the wire: chat `chat_0` linked to `ses_0`,
/// user message `m1` seen, `prompt:m1` planned and its attempt started.
fn died_mid_prompt(log: &EventLog) {
    let chat = ChatSessionInfo {
        chat_session_id: "chat_0".into(),
        agent_session_id: Some("ses_0".into()),
        title: "S0".into(),
        model: None,
        status: ChatStatus::Active,
        last_activity: T0,
        project: None,
    };
    let agent: AgentSessionInfo = serde_json::from_value(
        serde_json::json!({"agent_session_id": "ses_0", "title": "S0", "updated_at": T0}),
    )
    .unwrap();
    let prompt = Command::Prompt {
        chat_session_id: "chat_0".into(),
        agent_session_id: "ses_0".into(),
        message_id: "m1".into(),
        text: "hello".into(),
        model: None,
        agent_message_id: Some(crate::reconcile::ids::agent_message_id(&"m1".into(), T0, 0)),
    };
    let events = vec![
        Event::BackendSessionSeen(chat),
        Event::AgentSessionSeen(agent),
        Event::BackendMessageSeen(MessageInfo {
            chat_session_id: "chat_0".into(),
            message_id: "m1".into(),
            role: Role::User,
            content: "hello".into(),
            completed: true,
            timestamp: T0,
            reply_to: None,
            error: None,
        }),
        Event::CommandPlanned(CommandPlanned {
            command_id: "prompt:m1".into(),
            command: prompt.clone(),
            reason: "user message has no answer".into(),
        }),
        Event::AttemptStarted(AttemptStarted {
            command_id: "prompt:m1".into(),
            op: Op::Prompt,
            subject: prompt.subject(),
            attempt: 1,
        }),
    ];
    log.append(events.into_iter().map(|e| NewEvent::new(e, T0)).collect())
        .unwrap();
}

/// "Ready means observed in this process: until then nothing is prompted and nothing is
/// deleted" (issue 12, point 3). A command the previous process left open is queued by
/// `Dispatcher::resume` at open and started by the first `select`, which knows nothing of
/// readiness: restarted with the backend down (so never Ready), the worker still runs the
/// model for the resumed prompt.
#[test]
fn a_resumed_prompt_waits_for_ready_like_a_planned_one() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        create: true,
        ..LogOptions::default()
    };
    let log = Arc::new(EventLog::open(dir.path(), &opts).unwrap());
    died_mid_prompt(&log);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let agent = rt.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0 + 5_000));
        let agent = Arc::new(SimAgent::new(clock.clone(), Faults::default()));
        agent.insert(
            serde_json::from_value(
                serde_json::json!({"agent_session_id": "ses_0", "title": "S0", "updated_at": T0}),
            )
            .unwrap(),
        );
        // The backend is down for the whole run: no complete listing, never Ready.
        let down = Faults {
            outages: vec![(0, Millis::MAX)],
            ..Faults::default()
        };
        let backend = Arc::new(SimBackend::new(clock.clone(), down));
        let worker = Worker::open(
            log.clone(),
            agent.clone(),
            backend,
            clock,
            WorkerConfig::default(),
        )
        .await
        .unwrap();
        let report = worker
            .run(tokio::time::sleep(Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(report.time_to_ready_ms, None, "Ready with the backend down");
        agent
    });
    let attempts: Vec<Envelope> = log
        .read(ReadFilter {
            kinds: Some(vec![EventKind::AttemptStarted, EventKind::WorkerReady]),
            ..ReadFilter::default()
        })
        .map(Result::unwrap)
        .filter(|e| e.seq > 5)
        .collect();
    assert!(
        agent.model_runs().is_empty() && attempts.is_empty(),
        "prompted before Ready: model runs {:?}, attempts {:?}",
        agent.model_runs(),
        attempts
            .iter()
            .map(|e| (e.seq, e.kind()))
            .collect::<Vec<_>>()
    );
}
