//! Property tests of retention: generated histories that cross the horizon, run through a real
//! worker and a real log against the simulated sides (faults in the first phase), with a
//! horizon of one hour so that each later phase, started past it, sweeps what the earlier ones
//! finished. Then:
//! (r1) no command id is planned twice across the whole log, each backend effect is applied
//!      at most once per id, and no purpose got a second id (one chat session per agent
//!      session, deleted ones included);
//! (r2) re-observing everything the sides still hold (every agent session, every chat session,
//!      every message, one message at a time as the pages of a full relisting may split them)
//!      on the swept views plans nothing that the same views without any sweep would not plan,
//!      and nothing whose id was ever planned before;
//! (r3) the sweeps did drop rows (the property is not vacuous), among them the ledger entries
//!      of the creations whose chat sessions the backend then lost for good while their agent
//!      sessions lived, and replaying the log from scratch reproduces the live views.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agentsync::clock::{Clock, Millis};
use agentsync::dispatch::{DispatchConfig, TargetLimits};
use agentsync::events::*;
use agentsync::log::{load_views, EventLog, LogOptions, ReadFilter};
use agentsync::observe;
use agentsync::ports::AgentListing;
use agentsync::projections::{ProjectionName, Views};
use agentsync::reconcile::retention::RetentionPolicy;
use agentsync::reconcile::{self, Context};
use agentsync::sim::{Faults, SimAgent, SimBackend};
use agentsync::worker::{PollPolicy, TokioClock, Worker, WorkerConfig};
use proptest::prelude::*;

const T0: Millis = 1_763_700_000_000;
const HOUR: Millis = 3_600_000;
const LIMIT: usize = 3;

#[derive(Debug, Clone)]
struct History {
    /// Linked pairs at the start.
    linked: usize,
    /// Messages per phase (round-robin over the linked chats).
    messages: [usize; 3],
    /// Chat sessions whose agent session never existed (deleted in phase 1).
    orphans: usize,
    /// Chat sessions a person deleted while their agent session lives on.
    deleted_live: usize,
    /// Agent sessions without a chat session (created in phase 1).
    new_agents: usize,
    /// Agent sessions removed between phases 1 and 2 (their chats deleted in phase 2).
    removed: usize,
    /// Of the new agent sessions, those whose chat session (our `createSession`, its ledger
    /// entry swept in phase 2) the backend loses for good between phases 2 and 3.
    lost: usize,
    /// Gaps between the phases, past the horizon.
    gaps: [Millis; 2],
    /// Phase 1's faults.
    agent: Faults,
    backend: Faults,
}

fn faults() -> impl Strategy<Value = Faults> {
    (0.0f64..0.2, 0.0f64..0.2, any::<u64>()).prop_map(|(error_rate, lost, seed)| Faults {
        latency_ms: (1, 10),
        model_list_ms: 100,
        error_rate,
        lost_reply_rate: lost,
        seed,
        ..Faults::default()
    })
}

fn history() -> impl Strategy<Value = History> {
    (
        (1usize..5, [0usize..5, 0usize..5, 0usize..4]),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3, 0usize..3),
        [HOUR + 60_000..3 * HOUR, HOUR + 60_000..3 * HOUR],
        faults(),
        faults(),
    )
        .prop_map(
            |(
                (linked, messages),
                (orphans, deleted_live, new_agents, removed, lost),
                gaps,
                agent,
                backend,
            )| {
                History {
                    linked,
                    messages,
                    orphans,
                    deleted_live,
                    new_agents,
                    removed: removed.min(linked),
                    lost: lost.min(new_agents),
                    gaps,
                    agent,
                    backend,
                }
            },
        )
}

fn agent_info(id: &str, title: &str, at: Millis) -> AgentSessionInfo {
    AgentSessionInfo {
        agent_session_id: id.into(),
        title: title.into(),
        directory: None,
        project: None,
        model: None,
        updated_at: at,
        parent_id: None,
        tag: None,
    }
}

fn chat_info(id: &str, agent: Option<&str>, status: ChatStatus, at: Millis) -> ChatSessionInfo {
    ChatSessionInfo {
        chat_session_id: id.into(),
        agent_session_id: agent.map(Into::into),
        title: id.into(),
        model: None,
        status,
        last_activity: at,
        project: None,
    }
}

fn post(h: &History, backend: &SimBackend, phase: usize, at: Millis) {
    for i in 0..h.messages[phase] {
        backend.insert_message(MessageInfo {
            chat_session_id: format!("chat_{}", i % h.linked).into(),
            message_id: format!("m{phase}_{i}").into(),
            role: Role::User,
            content: "hi".into(),
            completed: true,
            timestamp: at - 1_000,
            reply_to: None,
            error: None,
        });
    }
}

fn populate(h: &History, agent: &SimAgent, backend: &SimBackend) {
    for i in 0..h.linked {
        agent.insert(agent_info(
            &format!("ses_{i}"),
            &format!("chat_{i}"),
            T0 - 60_000,
        ));
        let chat = chat_info(
            &format!("chat_{i}"),
            Some(&format!("ses_{i}")),
            ChatStatus::Active,
            T0 - 60_000,
        );
        backend.insert_session(chat);
    }
    for i in 0..h.orphans {
        let chat = chat_info(
            &format!("chat_orphan_{i}"),
            Some(&format!("ses_gone_{i}")),
            ChatStatus::Active,
            T0 - 60_000,
        );
        backend.insert_session(chat);
    }
    for i in 0..h.deleted_live {
        let id = format!("ses_live_{i}");
        agent.insert(agent_info(&id, "kept", T0 - 60_000));
        let chat = chat_info(
            &format!("chat_deleted_{i}"),
            Some(&id),
            ChatStatus::Deleted,
            T0 - 60_000,
        );
        backend.insert_session(chat);
    }
    for i in 0..h.new_agents {
        agent.insert(agent_info(&format!("ses_new_{i}"), "new", T0));
    }
    post(h, backend, 0, T0);
}

fn config() -> WorkerConfig {
    let limits = TargetLimits {
        concurrency: LIMIT,
        per_second: 20,
        burst: LIMIT as u32,
    };
    WorkerConfig {
        dispatch: DispatchConfig {
            concurrency: LIMIT + 1,
            agent: limits,
            backend: limits,
            ..DispatchConfig::default()
        },
        polling: PollPolicy {
            active_ms: 500,
            idle_max_ms: 2_000,
            ..PollPolicy::default()
        },
        stop_when_quiet: Some(3),
        drain_grace_ms: 1_000,
        retention: RetentionPolicy {
            horizon_ms: HOUR,
            every_ms: 10 * 60_000,
        },
        ..WorkerConfig::default()
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

struct Outcome {
    views: Views,
    end: Millis,
    log: Arc<EventLog>,
    agent: Arc<SimAgent>,
    backend: Arc<SimBackend>,
    /// The agent sessions whose chat session the backend lost between phases 2 and 3.
    lost: Vec<AgentSessionId>,
    _dir: tempfile::TempDir,
}

/// Runs one worker on `log` from `at` until it is quiet (or an hour of simulated time).
fn phase(
    log: &Arc<EventLog>,
    clock: &Arc<TokioClock>,
    at: Option<Millis>,
    agent: &Arc<SimAgent>,
    backend: &Arc<SimBackend>,
) -> (Views, Millis) {
    let rt = paused_runtime();
    let out = rt.block_on(async {
        if let Some(at) = at {
            clock.rebase(at);
        }
        let dyn_clock: Arc<dyn Clock> = clock.clone();
        let worker = Worker::open(
            log.clone(),
            agent.clone(),
            backend.clone(),
            dyn_clock,
            config(),
        )
        .await
        .unwrap();
        let report = tokio::time::timeout(
            Duration::from_secs(3_600),
            worker.run(std::future::pending()),
        )
        .await
        .expect("quiet within an hour of simulated time")
        .unwrap();
        (report.views, clock.now_ms())
    });
    drop(rt);
    out
}

fn run(h: &History) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        create: true,
        ..LogOptions::default()
    };
    let log = Arc::new(EventLog::open(dir.path(), &opts).unwrap());
    let rt = paused_runtime();
    let clock = rt.block_on(async { Arc::new(TokioClock::new(T0)) });
    drop(rt);
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let agent = Arc::new(SimAgent::new(dyn_clock.clone(), h.agent.clone()));
    let backend = Arc::new(SimBackend::new(dyn_clock, h.backend.clone()));
    populate(h, &agent, &backend);
    let (_, end1) = phase(&log, &clock, None, &agent, &backend);
    // Past the horizon, calm: some agent sessions are gone, a title changed, new messages.
    let calm = |f: &Faults| Faults {
        latency_ms: f.latency_ms,
        ..Faults::default()
    };
    agent.set_faults(calm(&h.agent));
    backend.set_faults(calm(&h.backend));
    let at2 = end1 + h.gaps[0];
    for i in 0..h.removed {
        agent.remove(&format!("ses_{i}").into());
    }
    if h.linked > h.removed {
        agent.retitle(&format!("ses_{}", h.removed).into(), "renamed", at2);
    }
    post(h, &backend, 1, at2);
    let (_, end2) = phase(&log, &clock, Some(at2), &agent, &backend);
    let at3 = end2 + h.gaps[1];
    let mut lost = Vec::new();
    for i in 0..h.lost {
        let agent_id = AgentSessionId(format!("ses_new_{i}"));
        let made = backend
            .sessions()
            .into_values()
            .find(|c| c.agent_session_id.as_ref() == Some(&agent_id));
        // Unless phase 1's faults made it give up: then there is nothing to lose.
        if let Some(made) = made {
            backend.remove_session(&made.chat_session_id);
            lost.push(agent_id);
        }
    }
    post(h, &backend, 2, at3);
    let (views, end) = phase(&log, &clock, Some(at3), &agent, &backend);
    Outcome {
        views,
        end,
        log,
        agent,
        backend,
        lost,
        _dir: dir,
    }
}

/// Folds `event` into `views` as the next event of the log.
fn fold(views: &mut Views, event: Event, at: Millis) {
    let seq = views
        .sessions
        .seq
        .max(views.messages.seq)
        .max(views.commands.seq)
        + 1;
    views.apply(&Envelope {
        seq,
        id: uuid::Uuid::nil(),
        at,
        v: event.kind().version(),
        event,
        cause: None,
    });
}

/// Observes everything the sides hold, in full, the messages one at a time, reconciling (and
/// recording the plans, as the worker does) after each observation. Returns the ids planned.
fn relist(views: &mut Views, o: &Outcome) -> BTreeSet<String> {
    let now = o.end + 1_000;
    let ctx = Context {
        process_seq: 0,
        now,
        started_at: now,
        ready: true,
    };
    let mut planned = BTreeSet::new();
    let mut step = |views: &mut Views, events: Vec<Event>| {
        for e in events {
            fold(views, e, now);
        }
        for p in reconcile::reconcile(views, &ctx, &reconcile::Policy::default()) {
            planned.insert(p.planned.command_id.0.clone());
            fold(views, Event::CommandPlanned(p.planned), now);
        }
    };
    let listing = AgentListing {
        sessions: o.agent.sessions().into_values().collect(),
        complete: true,
    };
    let as_of = views.sessions.seq;
    let events = observe::agent_listing(&views.sessions.state, &listing, as_of, "worker");
    step(views, events);
    let chats: Vec<ChatSessionInfo> = o.backend.sessions().into_values().collect();
    let as_of = views.sessions.seq;
    let events = observe::backend_sessions(&views.sessions.state, &chats, true, as_of);
    step(views, events);
    let mut messages: Vec<MessageInfo> = o.backend.messages().into_values().collect();
    messages.sort_by_key(|m| (m.timestamp, m.role == Role::Assistant));
    for m in messages {
        let events = observe::backend_messages(&views.messages.state, std::slice::from_ref(&m));
        step(views, events);
    }
    planned
}

fn check(h: &History, o: &Outcome) -> Result<(), TestCaseError> {
    let (all, _) = load_views(&o.log, None, None, true, |_| {}).unwrap();
    let mut history = Vec::new();
    let mut unswept = Views::default();
    let mut dropped = 0;
    let mut swept_ids = BTreeSet::new();
    for e in o.log.read(ReadFilter::default()) {
        let e = e.unwrap();
        match &e.event {
            Event::CommandPlanned(p) => history.push(p.command_id.0.clone()),
            Event::RetentionSwept(s) => {
                dropped += s.commands.len() + s.messages.len() + s.chats.len();
                swept_ids.extend(s.commands.iter().map(|c| c.0.clone()));
                continue; // the unswept views never see a sweep
            }
            _ => {}
        }
        unswept.apply(&e);
    }
    // (r1) one plan per id, one effect per id.
    let ids: BTreeSet<&String> = history.iter().collect();
    prop_assert_eq!(
        ids.len(),
        history.len(),
        "an id planned twice: {:?}",
        history
    );
    for (id, n) in o.backend.effects() {
        prop_assert_eq!(n, 1, "{} applied {} times", id, n);
    }
    // One purpose, one id: no agent session got a second chat session once its first (a
    // deleted one among them) left the views.
    let mut chats_per_agent = std::collections::BTreeMap::new();
    for c in o.backend.sessions().into_values() {
        if let Some(a) = c.agent_session_id {
            *chats_per_agent.entry(a).or_insert(0) += 1;
        }
    }
    prop_assert!(
        chats_per_agent.values().all(|n| *n == 1),
        "{:?}",
        chats_per_agent
    );
    // (r3) the sweeps dropped rows: the first phase's messages all ended (and their prompts
    // with them) more than a horizon before the last phase, so at least those left.
    prop_assert!(
        h.messages[0] == 0 || dropped > 0,
        "nothing swept after {} messages",
        h.messages[0]
    );
    // The lost chat sessions' creations had left the ledger (their agent sessions live on):
    // only their rows' mark stopped a second `createSession` (r1).
    for a in &o.lost {
        let id = format!("createSession:{a}");
        prop_assert!(swept_ids.contains(&id), "{} never left the ledger", id);
        prop_assert!(o.agent.sessions().contains_key(a));
    }
    for p in ProjectionName::ALL {
        prop_assert_eq!(
            all.to_json(p),
            o.views.to_json(p),
            "{} differs on replay",
            p
        );
    }
    // (r2) re-observing what the sides hold plans nothing new.
    let mut swept = o.views.clone();
    let after_sweep = relist(&mut swept, o);
    let without_sweep = relist(&mut unswept, o);
    for id in &after_sweep {
        prop_assert!(
            !ids.contains(id),
            "{} planned again after its entry left",
            id
        );
        prop_assert!(
            without_sweep.contains(id),
            "{} planned only because of the sweep",
            id
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 32, ..ProptestConfig::default() })]

    #[test]
    fn nothing_is_planned_twice_across_histories_that_cross_the_retention_horizon(h in history()) {
        let outcome = run(&h);
        check(&h, &outcome)?;
    }
}
