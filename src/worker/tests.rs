//! The control loop against the simulated sides, on a paused clock.

use std::collections::BTreeSet;
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
        // Full listings every few seconds: only they show a silent wipe.
        let cfg = WorkerConfig {
            polling: PollPolicy {
                full_listing_ms: 5_000,
                ..PollPolicy::default()
            },
            ..WorkerConfig::default()
        };
        let worker = Worker::open(log.clone(), agent.clone(), backend.clone(), clock, cfg)
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

/// Runs one worker process on `log` until `driver` finishes, in the current runtime.
async fn process<F: Future<Output = ()>>(
    log: &Arc<EventLog>,
    sides: (&Arc<SimAgent>, &Arc<SimBackend>),
    clock: &Arc<dyn Clock>,
    driver: impl FnOnce(mpsc::Sender<Observation>) -> F,
) -> RunReport {
    process_with(WorkerConfig::default(), log, sides, clock, driver).await
}

async fn process_with<F: Future<Output = ()>>(
    cfg: WorkerConfig,
    log: &Arc<EventLog>,
    sides: (&Arc<SimAgent>, &Arc<SimBackend>),
    clock: &Arc<dyn Clock>,
    driver: impl FnOnce(mpsc::Sender<Observation>) -> F,
) -> RunReport {
    let worker = Worker::open(
        log.clone(),
        sides.0.clone(),
        sides.1.clone(),
        clock.clone(),
        cfg,
    )
    .await
    .unwrap();
    let inlet = worker.inlet();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let drive = async {
        driver(inlet).await;
        let _ = stop.send(());
    };
    let (report, ()) = tokio::join!(
        worker.run(async {
            let _ = stopped.await;
        }),
        drive
    );
    report.unwrap()
}

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

fn open_log(dir: &std::path::Path) -> Arc<EventLog> {
    let opts = LogOptions {
        create: true,
        ..LogOptions::default()
    };
    Arc::new(EventLog::open(dir, &opts).unwrap())
}

fn kinds_after(log: &EventLog, seq: u64) -> Vec<EventKind> {
    log.read(ReadFilter::default())
        .map(Result::unwrap)
        .filter(|e| e.seq > seq)
        .map(|e| e.kind())
        .collect()
}

#[test]
fn a_restart_reads_on_from_the_cursors_in_the_log_and_sees_what_came_while_it_was_down() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 20);
        let sides = (&agent, &backend);
        let first = process(&log, sides, &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(20)).await;
        })
        .await;
        assert!(first.time_to_ready_ms.is_some());
        assert_eq!(
            backend.full_listings(),
            1,
            "the first start lists in full, once"
        );
        let pages_before = backend.stats().calls["listSessions"];
        // While it is down: a person writes in chat_3.
        let chat = ChatSessionId::from("chat_3");
        backend.insert_message(MessageInfo {
            chat_session_id: chat,
            message_id: MessageId::from("m_down"),
            role: Role::User,
            content: "hi".into(),
            completed: true,
            timestamp: T0,
            reply_to: None,
            error: None,
        });
        let down_seq = log.last_seq();
        let second = process(&log, sides, &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(20)).await;
        })
        .await;
        assert!(
            second.time_to_ready_ms.is_some(),
            "Ready without a full listing"
        );
        assert_eq!(
            backend.full_listings(),
            1,
            "the restart read from its cursor"
        );
        let pages = backend.stats().calls["listSessions"] - pages_before;
        assert!(pages <= 12, "one page per poll, not a listing: {pages}");
        let seen = second
            .views
            .messages
            .state
            .messages
            .contains_key(&MessageId::from("m_down"));
        assert!(seen, "the message posted while down was seen");
        let kinds = kinds_after(&log, down_seq);
        let ready = kinds
            .iter()
            .position(|k| *k == EventKind::WorkerReady)
            .unwrap();
        assert!(
            !kinds[..ready].contains(&EventKind::ListingCompleted),
            "no full listing on the way to Ready: {kinds:?}"
        );
    });
}

#[test]
fn an_idle_worker_appends_no_events_poll_after_poll() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 10);
        let sides = (&agent, &backend);
        let log2 = log.clone();
        let backend2 = backend.clone();
        process(&log, sides, &clock, |_| async move {
            // Ready, the first checkpoint written, then five idle minutes: the pollers back
            // off to 30 s, so at least ten polls of each side.
            tokio::time::sleep(Duration::from_secs(60)).await;
            let seq = log2.last_seq();
            let polls = backend2.stats().calls["listMessages"];
            tokio::time::sleep(Duration::from_secs(300)).await;
            assert!(backend2.stats().calls["listMessages"] - polls >= 10);
            assert_eq!(
                kinds_after(&log2, seq),
                Vec::<EventKind>::new(),
                "nothing changed, nothing appended"
            );
        })
        .await;
    });
}

#[test]
fn a_rename_that_does_not_move_updated_at_is_seen_from_the_stream_and_not_from_a_read_of_changes() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 3);
        // The agent feed's cursor is the newest updated_at: ses_0's, a minute after the rest.
        agent.retitle(&AgentSessionId::from("ses_0"), "S0", T0);
        let sides = (&agent, &backend);
        let (a, b) = (agent.clone(), backend.clone());
        let title = move |i: u32| {
            b.sessions()[&ChatSessionId(format!("chat_{i}"))]
                .title
                .clone()
        };
        process(&log, sides, &clock, |inlet| async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            // OpenCode 1.18.33: a rename leaves time.updated where it was.
            a.retitle(&AgentSessionId::from("ses_1"), "quiet rename", T0 - 60_000);
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert_eq!(title(1), "S1", "a read of changes cannot see it");
            a.retitle(
                &AgentSessionId::from("ses_2"),
                "streamed rename",
                T0 - 60_000,
            );
            let info = a.sessions()[&AgentSessionId::from("ses_2")].clone();
            let report = AgentObservation::SessionUpdated(Box::new(info));
            inlet.send(Observation::AgentStream(report)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(title(2), "streamed rename", "the stream carries it");
            // The safety net: the next full listing finds the quiet one.
            tokio::time::sleep(Duration::from_secs(600)).await;
            assert_eq!(title(1), "quiet rename", "the full listing carries it");
        })
        .await;
    });
}

#[test]
fn a_session_created_and_deleted_between_two_reads_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 3);
        let sides = (&agent, &backend);
        let (a, b) = (agent.clone(), backend.clone());
        let report = process(&log, sides, &clock, |_| async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let info = serde_json::json!({"agent_session_id": "ses_brief", "title": "brief", "updated_at": T0 + 20_000});
            a.insert(serde_json::from_value(info).unwrap());
            a.remove(&AgentSessionId::from("ses_brief"));
            b.insert_session(ChatSessionInfo {
                chat_session_id: ChatSessionId::from("chat_brief"),
                agent_session_id: None,
                title: "brief".into(),
                model: None,
                status: ChatStatus::Deleted,
                last_activity: T0 + 20_000,
                project: None,
            });
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await;
        let s = &report.views.sessions.state;
        assert!(!s.agent.contains_key(&AgentSessionId::from("ses_brief")));
        assert_eq!(s.chat[&ChatSessionId::from("chat_brief")].status, ChatStatus::Deleted);
        assert_eq!(backend.sessions().len(), 4, "no chat session made for it");
        assert_eq!(agent.sessions().len(), 3, "no agent session made for it");
    });
}

#[test]
fn a_running_worker_sweeps_a_finished_message_once_it_is_past_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let horizon = 10 * 60_000;
    let report = paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 3);
        backend.insert_message(user_message("chat_1", "m1", "hi", T0 - 1_000));
        let cfg = WorkerConfig {
            retention: reconcile::retention::RetentionPolicy {
                horizon_ms: horizon,
                every_ms: 60_000,
            },
            ..WorkerConfig::default()
        };
        let worker = Worker::open(log.clone(), agent, backend, clock, cfg)
            .await
            .unwrap();
        let half_an_hour = tokio::time::sleep(Duration::from_secs(30 * 60));
        worker.run(half_an_hour).await.unwrap()
    });
    let events: Vec<Envelope> = log
        .read(ReadFilter::default())
        .map(Result::unwrap)
        .collect();
    let delivered_at = events
        .iter()
        .find(|e| matches!(&e.event, Event::CommandSucceeded(s) if s.op == Op::CompleteMessage))
        .expect("the answer was delivered")
        .at;
    let sweeps: Vec<(&RetentionSwept, Millis)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::RetentionSwept(s) => Some((s, e.at)),
            _ => None,
        })
        .collect();
    let (first, at) = sweeps.first().expect("a sweep past the horizon");
    assert_eq!(first.messages, [MessageId::from("m1")]);
    assert!(first.commands.contains(&CommandId::from("prompt:m1")));
    assert!(first
        .commands
        .contains(&CommandId::from("completeMessage:m1")));
    assert!(*at >= delivered_at + horizon, "not before the horizon");
    assert!(
        *at <= delivered_at + horizon + 2 * 60_000,
        "within a sweep interval of it"
    );
    assert!(!report
        .views
        .messages
        .state
        .messages
        .contains_key(&MessageId::from("m1")));
    assert!(report.views.commands.state.commands.is_empty());
}

#[test]
fn a_message_deadline_falls_due_on_its_timer_while_nothing_else_happens() {
    // A turn plans only its dirty keys: while the model works (five minutes) no event names the
    // message, so only the timer its chat session asked for fails it at its one-minute deadline.
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 3);
        agent.set_faults(Faults {
            model_run_ms: (300_000, 300_000),
            ..Faults::default()
        });
        backend.insert_message(user_message("chat_1", "m_slow", "hi", T0));
        let mut cfg = WorkerConfig::default();
        cfg.policy.message_deadline_ms = 60_000;
        cfg.dispatch.prompt_timeout_ms = 600_000;
        process_with(cfg, &log, (&agent, &backend), &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(180)).await;
        })
        .await;
        let events: Vec<Envelope> = log.read(ReadFilter::default()).map(Result::unwrap).collect();
        let seen_at = events
            .iter()
            .find(|e| matches!(&e.event, Event::BackendMessageSeen(m) if m.message_id.as_str() == "m_slow"))
            .map(|e| e.at)
            .expect("the message was seen");
        let failed_at = events
            .iter()
            .find(|e| {
                matches!(&e.event, Event::CommandPlanned(p)
                    if matches!(&p.command, Command::FailMessage { reason, .. } if reason.contains("no answer")))
            })
            .map(|e| e.at)
            .expect("the message was failed at its deadline");
        let late = failed_at - (seen_at + 60_000);
        assert!(
            (0..=1_000).contains(&late),
            "failed {late} ms after its deadline"
        );
    });
}

/// Every checkpoint file in the log's checkpoint directory, by name, with its bytes.
fn checkpoint_files(log: &EventLog) -> std::collections::BTreeMap<String, Vec<u8>> {
    let dir = log.checkpoints().dir().to_owned();
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_idle_worker_writes_no_event_and_no_checkpoint_for_simulated_hours() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 10);
        let sides = (&agent, &backend);
        let log2 = log.clone();
        let backend2 = backend.clone();
        process(&log, sides, &clock, |_| async move {
            // Ready, the first checkpoints written (every 30 s while events come in), and the
            // first periodic full listings (10 min), which follow the lifecycle events and so
            // are recorded once (`observe::idle_listing`).
            tokio::time::sleep(Duration::from_secs(900)).await;
            let seq = log2.last_seq();
            let files = checkpoint_files(&log2);
            assert!(!files.is_empty(), "the first checkpoints were written");
            let sessions_seq = log2.checkpoints().seq("sessions").unwrap();
            assert!(sessions_seq.is_some(), "the sessions rows were written");
            let full = backend2.full_listings();
            // Two idle hours: many polls, and the periodic full listings (every 10 min) of
            // both sides, which find nothing new either.
            tokio::time::sleep(Duration::from_secs(7_200)).await;
            assert!(backend2.full_listings() - full >= 10, "full listings ran");
            assert_eq!(
                kinds_after(&log2, seq),
                Vec::<EventKind>::new(),
                "nothing changed, nothing appended"
            );
            assert_eq!(log2.last_seq(), seq, "the log did not grow");
            assert!(
                checkpoint_files(&log2) == files,
                "no checkpoint was written while nothing changed"
            );
            assert_eq!(log2.checkpoints().seq("sessions").unwrap(), sessions_seq);
        })
        .await;
    });
}

/// Ready from a read of changes is Ready on a stale agent view (found in review). The agent server
/// lost its sessions while the worker was down (a wipe, a restore pending, a replaced server at
/// the same URL): `GET /session?start=T` shows nothing, which reaches the end, so the worker is
/// Ready at once and prompts the pending message into an agent session the server no longer
/// has: 404, terminal, the message is failed. Before i15 Ready waited for a full listing: the
/// sessions were gone from the view, the deletions held (wipe protection), the message waited,
/// and when the server came back 30 s later (within the 60 s deletion confirmation) the message
/// was answered.
#[test]
fn a_restart_onto_a_wiped_agent_server_prompts_nothing_before_a_full_agent_listing() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 30);
        let sides = (&agent, &backend);
        let first = process(&log, sides, &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(20)).await;
        })
        .await;
        assert!(first.time_to_ready_ms.is_some());
        // While it is down: the agent server loses every session, and a person writes.
        let kept = agent.sessions();
        for id in kept.keys() {
            agent.remove(id);
        }
        backend.insert_message(user_message("chat_3", "m_down", "hi", clock.now_ms()));
        let (a, c) = (agent.clone(), clock.clone());
        process(&log, sides, &clock, |_| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            // The server comes back with its sessions (a hiccup, not a deletion).
            for mut info in kept.into_values() {
                info.updated_at = c.now_ms();
                a.insert(info);
            }
            tokio::time::sleep(Duration::from_secs(120)).await;
        })
        .await;
        let m = &backend.messages()[&MessageId::from("m_down")];
        assert_eq!(m.error, None, "failed on a stale view of the agent server");
        assert_eq!(deleted(&backend), 0);
    });
}

/// The feed cursors must not survive `--adopt` (found in review). A data directory moved to another worker
/// id or backend (`identity_adopted`, a supported move) keeps the old backend's change
/// numbers as its cursors (`SessionsView::feeds` ignores `identity_adopted`), and reads the new
/// backend from them: every message the new backend numbered at or below the old cursor is
/// never read (messages have no full relisting), so it is neither answered nor failed. Before
/// i15 the message cursor lived in memory and each start read every message.
#[test]
fn an_adopted_directory_reads_the_new_backend_from_the_start_not_the_old_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, old) = linked_sides(clock.clone(), 3);
        for i in 0..6 {
            old.insert_message(user_message(
                &format!("chat_{}", i % 3),
                &format!("m_old{i}"),
                "hi",
                T0,
            ));
        }
        process(&log, (&agent, &old), &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await;
        // `agentsync run --adopt` against another backend (or worker id): the move is an event.
        let identity = |b: &str| Identity {
            worker_id: "w".into(),
            agent: AgentIdentity::Url("http://127.0.0.1:4096".into()),
            backend: BackendIdentity::Convex(b.into()),
        };
        let adopted = IdentityAdopted {
            previous: identity("https://old.convex.cloud"),
            current: identity("https://new.convex.cloud"),
        };
        log.append(vec![NewEvent::new(
            Event::IdentityAdopted(adopted),
            clock.now_ms(),
        )])
        .unwrap();
        // The new backend: the same chat sessions, and a person's new message.
        let new = Arc::new(SimBackend::new(clock.clone(), Faults::default()));
        for (_, chat) in old.sessions() {
            new.insert_session(chat);
        }
        new.insert_message(user_message("chat_1", "m_new", "hello", clock.now_ms()));
        let report = process(&log, (&agent, &new), &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(40 * 60)).await;
        })
        .await;
        let seen = report
            .views
            .messages
            .state
            .messages
            .contains_key(&MessageId::from("m_new"));
        let resolved = new
            .messages()
            .values()
            .any(|m| m.reply_to == Some(MessageId::from("m_new")) && m.completed)
            || new.messages()[&MessageId::from("m_new")].error.is_some();
        assert!(
            seen && resolved,
            "m_new never read from the new backend (seen {seen}, answered or failed {resolved})"
        );
    });
}

/// A person's message `id` in `chat`, written at `at`.
fn user_message(chat: &str, id: &str, content: &str, at: Millis) -> MessageInfo {
    MessageInfo {
        chat_session_id: chat.into(),
        message_id: id.into(),
        role: Role::User,
        content: content.into(),
        completed: true,
        timestamp: at,
        reply_to: None,
        error: None,
    }
}

/// Settled pairs leave memory at a checkpoint (`log::rows`) and a restart reads only what is
/// resident; what happens to them while they are away must still be seen and acted on: a
/// deletion only a complete listing shows, a rename that does not move `updated_at` (only a
/// full listing shows it), and a person's message in an away chat session.
#[test]
fn pairs_on_disk_are_deleted_renamed_and_prompted_like_pairs_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let (agent, backend) = linked_sides(clock.clone(), 20);
        let sides = (&agent, &backend);
        let first = process(&log, sides, &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(120)).await;
        })
        .await;
        assert_eq!(
            first.views.sessions.state.agent.len(),
            20,
            "the report reads them back"
        );
        let (live, _) = crate::log::LiveViews::open(&log, CheckpointPolicy::default(), T0).unwrap();
        assert_eq!(live.away(), 20, "every pair settled and left memory");
        assert!(live.views.sessions.state.chat.is_empty());
        drop(live);
        // While the worker is down.
        agent.remove(&AgentSessionId::from("ses_3"));
        agent.retitle(&AgentSessionId::from("ses_5"), "renamed", T0 - 60_000);
        backend.insert_message(user_message("chat_7", "m_away", "hello?", T0));
        let cfg = WorkerConfig {
            polling: PollPolicy {
                full_listing_ms: 5_000,
                ..PollPolicy::default()
            },
            ..WorkerConfig::default()
        };
        let down_seq = log.last_seq();
        let second = process_with(cfg, &log, sides, &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(300)).await;
        })
        .await;
        assert!(second.time_to_ready_ms.is_some());
        // Only what changed came back: full listings every 5 s compared the other pairs on
        // disk and recorded nothing for them.
        let touched: BTreeSet<String> = log
            .read(ReadFilter::from(down_seq + 1))
            .map(Result::unwrap)
            .filter(|e| {
                matches!(
                    e.kind(),
                    EventKind::AgentSessionSeen
                        | EventKind::AgentSessionChanged
                        | EventKind::AgentSessionGone
                        | EventKind::BackendSessionSeen
                        | EventKind::BackendSessionChanged
                )
            })
            .flat_map(|e| {
                e.event
                    .session_ids()
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let expected = ["ses_3", "ses_5", "chat_5", "ses_7", "chat_3", "chat_7"];
        assert!(
            touched.iter().all(|id| expected.contains(&id.as_str())),
            "{touched:?}"
        );
        assert!(
            touched.contains("ses_3") && touched.contains("ses_5"),
            "{touched:?}"
        );
        // Brought back into memory: the deleted, the renamed and the written-to pair; the
        // others, listed unchanged every 5 s, stayed on disk.
        assert_eq!(second.pairs_brought_back, 3);
        let (live, _) = crate::log::LiveViews::open(&log, CheckpointPolicy::default(), T0).unwrap();
        assert_eq!(live.away(), 19, "settled again, all but the deleted pair");
        drop(live);
        let chats = backend.sessions();
        assert_eq!(
            chats[&ChatSessionId::from("chat_3")].status,
            ChatStatus::Deleted
        );
        assert_eq!(chats[&ChatSessionId::from("chat_5")].title, "renamed");
        let answered = backend
            .messages()
            .values()
            .any(|m| m.reply_to == Some(MessageId::from("m_away")) && m.completed);
        assert!(answered, "the message in an away chat session was answered");
        assert_eq!(deleted(&backend), 1, "nothing else was deleted");
        assert_eq!(agent.prompts().values().sum::<u64>(), 1, "prompted once");
    });
}

/// A creation's ledger entry leaves after the horizon while its agent session lives
/// (`reconcile::retention`): the agent session's row carries the mark that it was mirrored,
/// to disk with its settled pair and back. A chat session the backend then loses for good is
/// not made again.
#[test]
fn a_mirrored_agent_session_on_disk_is_not_mirrored_again_after_its_entry_left() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    paused().block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(T0));
        let agent = Arc::new(SimAgent::new(clock.clone(), Faults::default()));
        let backend = Arc::new(SimBackend::new(clock.clone(), Faults::default()));
        for i in 0..3 {
            let info = serde_json::json!({"agent_session_id": format!("ses_{i}"), "title": format!("S{i}"), "updated_at": T0 - 60_000});
            agent.insert(serde_json::from_value(info).expect("an agent session"));
        }
        let sides = (&agent, &backend);
        let cfg = WorkerConfig {
            retention: reconcile::retention::RetentionPolicy {
                horizon_ms: 10 * 60_000,
                every_ms: 60_000,
            },
            polling: PollPolicy {
                full_listing_ms: 5_000,
                ..PollPolicy::default()
            },
            ..WorkerConfig::default()
        };
        process_with(cfg.clone(), &log, sides, &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(40 * 60)).await;
        })
        .await;
        assert_eq!(backend.sessions().len(), 3, "each mirrored once");
        let (live, _) = crate::log::LiveViews::open(&log, CheckpointPolicy::default(), T0).unwrap();
        assert_eq!(live.away(), 3, "every pair settled and on disk");
        let ledger = &live.views.commands.state.commands;
        assert!(
            ledger.keys().all(|id| !id.0.starts_with("createSession:")),
            "the creations left the ledger: {ledger:?}"
        );
        drop(live);
        let lost = backend.sessions().into_values().next().expect("a chat session");
        let lost_agent = lost.agent_session_id.clone().expect("linked");
        backend.remove_session(&lost.chat_session_id);
        let second = process_with(cfg, &log, sides, &clock, |_| async {
            tokio::time::sleep(Duration::from_secs(5 * 60)).await;
        })
        .await;
        assert!(second.pairs_brought_back >= 1, "the lost pair came back");
        let s = &second.views.sessions.state;
        assert!(!s.chat.contains_key(&lost.chat_session_id), "seen gone");
        assert!(s.agent[&lost_agent].mirror_planned);
        assert_eq!(backend.sessions().len(), 2, "not made again");
        let creations = log
            .read(ReadFilter::default())
            .map(Result::unwrap)
            .filter(|e| matches!(&e.event, Event::CommandPlanned(p) if p.command_id.0.starts_with("createSession:")))
            .count();
        assert_eq!(creations, 3, "one creation per agent session, ever");
    });
}
