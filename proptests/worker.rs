//! Property tests of the worker: generated scenarios run through a real worker and a real log
//! against the simulated sides, with injected faults, crashes and a paused clock.
//!
//! Each scenario runs in two phases: with faults (and maybe a crash: the worker's future is
//! dropped mid-flight and its runtime shut down), then, faults stopped, a new worker on the same
//! log until it is quiet. Then:
//! (a) every user message ends answered or failed with a reason, none pending, none answered
//!     twice, and an outcome the backend lacks is a dead letter, never silence;
//! (b) each backend effect is applied at most once per `commandId`, across crashes and restarts,
//!     and no purpose got two ids (one chat session per agent session, one reply per message);
//! (c) calls in flight to each side never exceed its limit;
//! (d) model fetches <= 1 per TTL window per agent-server generation;
//! (e) no chat session is deleted while its agent session exists (failed and partial listings
//!     are injected);
//! (f) convergence: once faults stop, reconciling the final views plans nothing new;
//! (g) replaying the log from scratch reproduces the live projections exactly;
//! (h) a stale listing that lacks a session just created never creates it twice (see (b));
//! (i) under a constant stream of prompts, renames and deletions start within a bounded time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentsync::clock::{Clock, Millis};
use agentsync::dispatch::{Action, DispatchConfig, Dispatcher, TargetLimits};
use agentsync::events::*;
use agentsync::log::{load_views, EventLog, LogOptions};
use agentsync::projections::{MessageState, ProjectionName, Views};
use agentsync::reconcile::{self, ids, Context};
use agentsync::sim::{Faults, SimAgent, SimBackend};
use agentsync::worker::{PollPolicy, TokioClock, Worker, WorkerConfig};
use proptest::prelude::*;

const T0: Millis = 1_763_700_000_000;
const LIMIT: usize = 3;

#[derive(Debug, Clone)]
struct Scenario {
    linked: usize,
    orphans: usize,
    new_agents: usize,
    renamed: usize,
    stale: usize,
    fresh: usize,
    overflow: usize,
    lazy: usize,
    agent: Faults,
    backend: Faults,
    crash_at_ms: Option<Millis>,
}

fn listings() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(1u32..8, 0..3)
}

fn faults(lost_replies: bool) -> impl Strategy<Value = Faults> {
    (
        (1u64..10, 10u64..60),
        0.0f64..0.25,
        prop::option::of((0u64..20_000, 1_000u64..20_000)),
        listings(),
        listings(),
        if lost_replies {
            (0.0f64..0.3).boxed()
        } else {
            Just(0.0).boxed()
        },
        any::<u64>(),
    )
        .prop_map(
            |(latency, error_rate, outage, failed, partial, lost, seed)| Faults {
                latency_ms: latency,
                model_list_ms: 100,
                error_rate,
                outages: outage
                    .map(|(s, l)| vec![(T0 + s, T0 + s + l)])
                    .unwrap_or_default(),
                failed_listings: failed,
                partial_listings: partial,
                lost_reply_rate: lost,
                seed,
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (1usize..12, 0usize..4, 0usize..8, 0usize..4),
        (0usize..3, 0usize..6, 0usize..2, 0usize..3),
        faults(false),
        faults(true),
        prop::option::of(300u64..20_000),
    )
        .prop_map(
            |(
                (linked, orphans, new_agents, renamed),
                (stale, fresh, overflow, lazy),
                agent,
                backend,
                crash,
            )| {
                Scenario {
                    linked,
                    orphans,
                    new_agents,
                    renamed: renamed.min(linked),
                    stale,
                    fresh,
                    overflow,
                    lazy,
                    agent,
                    backend,
                    crash_at_ms: crash,
                }
            },
        )
}

fn populate(s: &Scenario, agent: &SimAgent, backend: &SimBackend) {
    let minute = 60_000;
    let user = |chat: &str, id: String, text: &str, at| MessageInfo {
        chat_session_id: chat.into(),
        message_id: MessageId(id),
        role: Role::User,
        content: text.into(),
        completed: true,
        timestamp: at,
        reply_to: None,
        error: None,
    };
    for i in 0..s.linked {
        let title = format!("S{i}");
        agent.insert(AgentSessionInfo {
            agent_session_id: AgentSessionId(format!("ses_{i}")),
            title: if i < s.renamed {
                format!("{title}!")
            } else {
                title.clone()
            },
            directory: None,
            project: None,
            model: None,
            updated_at: T0 - minute,
            parent_id: None,
            tag: None,
        });
        backend.insert_session(ChatSessionInfo {
            chat_session_id: ChatSessionId(format!("chat_{i}")),
            agent_session_id: Some(AgentSessionId(format!("ses_{i}"))),
            title,
            model: None,
            status: ChatStatus::Active,
            last_activity: T0 - minute,
            project: None,
        });
    }
    for i in 0..s.orphans {
        backend.insert_session(ChatSessionInfo {
            chat_session_id: ChatSessionId(format!("chat_orphan_{i}")),
            agent_session_id: Some(AgentSessionId(format!("ses_gone_{i}"))),
            title: format!("O{i}"),
            model: None,
            status: ChatStatus::Active,
            last_activity: T0 - minute,
            project: None,
        });
    }
    for i in 0..s.new_agents {
        agent.insert(AgentSessionInfo {
            agent_session_id: AgentSessionId(format!("ses_new_{i}")),
            title: format!("N{i}"),
            directory: None,
            project: None,
            model: None,
            updated_at: T0,
            parent_id: None,
            tag: None,
        });
    }
    for i in 0..s.stale {
        let chat = format!("chat_{}", i % s.linked);
        backend.insert_message(user(&chat, format!("stale_{i}"), "old", T0 - 10 * minute));
    }
    for i in 0..s.fresh {
        let chat = format!("chat_{}", i % s.linked);
        backend.insert_message(user(&chat, format!("fresh_{i}"), "hi", T0 - 1_000));
    }
    for i in 0..s.overflow {
        let chat = format!("chat_{}", i % s.linked);
        backend.insert_message(user(&chat, format!("big_{i}"), "[overflow]", T0 - 1_000));
    }
    for i in 0..s.lazy {
        let chat = format!("chat_lazy_{i}");
        backend.insert_session(ChatSessionInfo {
            chat_session_id: ChatSessionId(chat.clone()),
            agent_session_id: None,
            title: format!("L{i}"),
            model: None,
            status: ChatStatus::Active,
            last_activity: T0,
            project: None,
        });
        backend.insert_message(user(&chat, format!("lazy_{i}"), "new chat", T0 - 1_000));
    }
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
    quiet: bool,
    end: Millis,
    log: Arc<EventLog>,
    agent: Arc<SimAgent>,
    backend: Arc<SimBackend>,
    _dir: tempfile::TempDir,
}

fn run(s: &Scenario) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        create: true,
        ..LogOptions::default()
    };
    let log = Arc::new(EventLog::open(dir.path(), &opts).unwrap());
    // Phase 1: faults, maybe a crash.
    let rt = paused_runtime();
    let clock = rt.block_on(async { Arc::new(TokioClock::new(T0)) });
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let agent = Arc::new(SimAgent::new(dyn_clock.clone(), s.agent.clone()));
    let backend = Arc::new(SimBackend::new(dyn_clock.clone(), s.backend.clone()));
    populate(s, &agent, &backend);
    let end1 = rt.block_on(async {
        let worker = Worker::open(
            log.clone(),
            agent.clone(),
            backend.clone(),
            dyn_clock.clone(),
            config(),
        )
        .await
        .unwrap();
        let limit = Duration::from_millis(s.crash_at_ms.unwrap_or(20 * 60_000));
        // Dropping the future mid-flight is the crash: calls are cut off wherever they are.
        let _ = tokio::time::timeout(limit, worker.run(std::future::pending())).await;
        clock.now_ms()
    });
    drop(rt); // waits for blocking appends in flight, as a dying process's last write would land or not
              // Phase 2: no faults, a new worker on the same log.
    let calm = |f: &Faults| Faults {
        latency_ms: f.latency_ms,
        ..Faults::default()
    };
    agent.set_faults(calm(&s.agent));
    backend.set_faults(calm(&s.backend));
    let rt = paused_runtime();
    let (report, end) = rt.block_on(async {
        clock.rebase(end1 + 1_000);
        let worker = Worker::open(
            log.clone(),
            agent.clone(),
            backend.clone(),
            dyn_clock.clone(),
            config(),
        )
        .await
        .unwrap();
        let report = tokio::time::timeout(
            Duration::from_secs(3_600),
            worker.run(std::future::pending()),
        )
        .await
        .expect("converges within an hour of simulated time")
        .unwrap();
        (report, clock.now_ms())
    });
    drop(rt);
    Outcome {
        quiet: report.stopped == "quiet",
        views: report.views,
        end,
        log,
        agent,
        backend,
        _dir: dir,
    }
}

fn check(s: &Scenario, o: &Outcome) -> Result<(), TestCaseError> {
    prop_assert!(o.quiet, "phase 2 did not settle");
    let views = &o.views;
    let backend_messages = o.backend.messages();
    let ledger = &views.commands.state.commands;
    // (a) every user message ends answered or failed with a reason.
    for m in backend_messages.values().filter(|m| m.role == Role::User) {
        let row = views.messages.state.messages.get(&m.message_id);
        prop_assert!(row.is_some(), "{} never observed", m.message_id);
        let row = row.unwrap();
        prop_assert!(
            !row.state.is_pending(),
            "{} still {:?}",
            m.message_id,
            row.state
        );
        if row.state != MessageState::Answered {
            prop_assert!(
                row.reason.is_some(),
                "{} failed without a reason",
                m.message_id
            );
        }
        if !row.delivered {
            let delivery = match row.state {
                MessageState::Answered => reconcile::ids::complete_message(&m.message_id),
                _ => reconcile::ids::fail_message(&m.message_id),
            };
            let dead = ledger.get(&delivery).is_some_and(|e| e.is_final());
            prop_assert!(
                dead,
                "{}: outcome neither delivered nor dead-lettered",
                m.message_id
            );
        }
        let replies = backend_messages
            .values()
            .filter(|r| r.reply_to.as_ref() == Some(&m.message_id) && r.completed)
            .count();
        prop_assert!(replies <= 1, "{} answered {replies} times", m.message_id);
        prop_assert!(
            !(replies == 1 && m.error.is_some()),
            "{} both answered and failed",
            m.message_id
        );
    }
    // (b) at most once per commandId, and one id per purpose.
    for (id, n) in o.backend.effects() {
        prop_assert_eq!(n, 1, "{} applied {} times", id, n);
    }
    let mut chats_per_agent: BTreeMap<AgentSessionId, usize> = BTreeMap::new();
    for c in o.backend.sessions().values() {
        if let Some(a) = &c.agent_session_id {
            *chats_per_agent.entry(a.clone()).or_default() += 1;
        }
    }
    prop_assert!(
        chats_per_agent.values().all(|n| *n == 1),
        "{chats_per_agent:?}"
    );
    // Every agent session has its chat session, or the command that owed it is a dead letter.
    let dead = |id: &CommandId| {
        ledger.get(id).is_some_and(|e| {
            e.is_final() && e.state != agentsync::projections::CommandState::Succeeded
        })
    };
    for a in o.agent.sessions().keys() {
        // The commands that owe a chat session to `a` name it in their ids.
        let owes = |id: &CommandId| {
            id.0 == ids::create_session(a).0
                || (id.0.starts_with("linkAgentSession:") && id.0.ends_with(&format!(":{a}")))
        };
        let owed = ledger.keys().any(owes);
        let gave_up = ledger.keys().any(|id| owes(id) && dead(id));
        prop_assert!(
            chats_per_agent.contains_key(a) || (owed && gave_up),
            "{a} has no chat session and nothing gave up on it"
        );
    }
    // (c) calls in flight per side.
    prop_assert!(
        o.agent.stats().peak_in_flight <= LIMIT,
        "agent {}",
        o.agent.stats().peak_in_flight
    );
    prop_assert!(
        o.backend.stats().peak_in_flight <= LIMIT,
        "backend {}",
        o.backend.stats().peak_in_flight
    );
    // (d) one model fetch per TTL window (one generation here).
    let ttl = DispatchConfig::default().model_ttl_ms;
    let windows = 1 + (o.end - T0) / ttl;
    prop_assert!(
        o.agent.model_fetches() <= windows,
        "{} fetches in {} windows",
        o.agent.model_fetches(),
        windows
    );
    // (e) no deletion while the agent session exists; orphans are deleted.
    let agents = o.agent.sessions();
    for c in o.backend.sessions().values() {
        let exists = c
            .agent_session_id
            .as_ref()
            .is_some_and(|a| agents.contains_key(a));
        if c.status == ChatStatus::Deleted {
            prop_assert!(
                !exists,
                "{} deleted while its agent session exists",
                c.chat_session_id
            );
        }
        if c.chat_session_id.0.starts_with("chat_orphan_") {
            let gave_up = dead(&reconcile::ids::mark_session_deleted(&c.chat_session_id));
            prop_assert!(
                c.status == ChatStatus::Deleted || gave_up,
                "{} not deleted",
                c.chat_session_id
            );
        }
    }
    // (f) convergence.
    let ctx = Context {
        process_seq: 0,
        now: o.end,
        started_at: o.end,
        ready: true,
    };
    let again = reconcile::reconcile(views, &ctx, &reconcile::Policy::default());
    prop_assert!(
        again.is_empty(),
        "still planning: {:?}",
        again
            .iter()
            .map(|p| &p.planned.command_id)
            .collect::<Vec<_>>()
    );
    prop_assert_eq!(views.commands.state.open().count(), 0);
    // (g) replay from scratch = live.
    let (rebuilt, _) = load_views(&o.log, None, None, true, |_| {}).unwrap();
    for p in ProjectionName::ALL {
        prop_assert_eq!(rebuilt.to_json(p), views.to_json(p), "{} differs", p);
    }
    let _ = s;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_worker_keeps_its_invariants_under_faults_and_crashes(s in scenario()) {
        let outcome = run(&s);
        check(&s, &outcome)?;
    }

    /// (i): a steady stream of prompts never starves renames and deletions.
    #[test]
    fn waiting_work_ages_past_a_steady_stream_of_prompts(
        arrivals_ms in prop::collection::vec(50u64..500, 50..200),
        durations_ms in prop::collection::vec(50u64..2_000, 200),
        low in prop::collection::vec((0u64..20_000, prop::bool::ANY), 1..10),
    ) {
        let cfg = DispatchConfig { concurrency: 2, ..DispatchConfig::default() };
        let aging = cfg.aging_ms;
        let views = Views::default();
        let mut d = Dispatcher::new(cfg, 0);
        let mut now = 0u64;
        let mut next_arrival = 0usize;
        let mut arrival_at = 0u64;
        let mut running: Vec<(u64, CommandId)> = Vec::new();
        let mut low_started: BTreeMap<CommandId, (u64, u64)> = BTreeMap::new();
        let mut low_enqueued: BTreeMap<CommandId, u64> = BTreeMap::new();
        let mut prompt_enqueued: BTreeMap<CommandId, u64> = BTreeMap::new();
        let mut prompt_started: Vec<(u64, u64)> = Vec::new();
        let mut n = 0usize;
        let horizon = arrivals_ms.iter().sum::<u64>() + 60_000;
        while now < horizon {
            // Prompts keep arriving.
            while next_arrival < arrivals_ms.len() && arrival_at <= now {
                let id = CommandId(format!("prompt:{next_arrival}"));
                prompt_enqueued.insert(id.clone(), now);
                d.enqueue(id, Command::FailMessage {
                    chat_session_id: ChatSessionId(format!("c{next_arrival}")),
                    message_id: MessageId(format!("m{next_arrival}")),
                    reason: "r".into(),
                }, now);
                arrival_at += arrivals_ms[next_arrival];
                next_arrival += 1;
            }
            for (i, (at, deletion)) in low.iter().enumerate() {
                let id = CommandId(format!("low:{i}"));
                if *at <= now && !low_enqueued.contains_key(&id) {
                    let chat = ChatSessionId(format!("low{i}"));
                    let command = if *deletion {
                        Command::MarkSessionDeleted { chat_session_id: chat }
                    } else {
                        Command::RenameSession { chat_session_id: chat, title: "t".into() }
                    };
                    d.enqueue(id.clone(), command, now);
                    low_enqueued.insert(id, now);
                }
            }
            for a in d.select(&views, now) {
                if let Action::Start(s) = a {
                    if let Some(at) = low_enqueued.get(&s.id) {
                        low_started.insert(s.id.clone(), (*at, now));
                    }
                    if let Some(at) = prompt_enqueued.get(&s.id) {
                        prompt_started.push((*at, now));
                    }
                    running.push((now + durations_ms[n % durations_ms.len()], s.id));
                    n += 1;
                }
            }
            running.sort();
            let done: Vec<_> = running.iter().filter(|(t, _)| *t <= now).cloned().collect();
            running.retain(|(t, _)| *t > now);
            for (_, id) in done {
                d.finished(&id, 1, Ok(Effect::SessionDeleted { chat_session_id: "x".into() }), now);
            }
            now += 10;
        }
        for (id, at) in &low_enqueued {
            let started = low_started.get(id);
            prop_assert!(started.is_some(), "{} never started", id);
            let (_, start) = *started.unwrap();
            // Priority class 3 at most: once it has waited 3 x ageing it outranks every prompt
            // that arrives after that, however many keep coming.
            let cutoff = at + 3 * aging;
            for (p_at, p_start) in &prompt_started {
                prop_assert!(
                    !(*p_at > cutoff && *p_start < start),
                    "{} (queued at {}) started at {} after a prompt queued at {} started at {}",
                    id, at, start, p_at, p_start
                );
            }
        }
    }
}
