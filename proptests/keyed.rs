//! Property tests of planning by key, with the full pass as the oracle: over generated
//! histories of both sides (links that move, sessions that go, tags, holds, commands that
//! succeed, fail or die),
//!
//! (a) the indexes the fold keeps equal the ones built from scratch;
//! (b) planning every key plans what the full pass plans;
//! (c) after any event, what the full pass plans anew is planned by the keys that event makes
//!     dirty (its keys and their dependents, before and after the fold): a turn that plans only
//!     its dirty keys misses nothing (retention sweeps included: what they drop plans nothing).

use std::collections::{BTreeMap, BTreeSet};

use agentsync::events::*;
use agentsync::projections::{SessionIndex, Views};
use agentsync::reconcile::{self, Context, Planned, Policy};
use proptest::prelude::*;

const START: u64 = 1_763_700_000_000;

/// One generated happening; ids are drawn from small pools so that links collide and move.
#[derive(Debug, Clone)]
enum Step {
    Agent(u8, bool, Option<u8>),
    AgentGone(u8),
    Busy(u8, bool),
    Chat(u8, Option<u8>, bool, u8),
    ChatGone(u8),
    User(u8, u8),
    Reply(u8),
    Listing(bool, bool),
    AgentFailed,
    /// Plan what the full pass plans now, as the worker would.
    Plan,
    /// The n-th open command ends: 0 succeeds, 1 fails terminally, 2 dies.
    Outcome(u8, u8),
    Hold,
    /// A retention sweep with a zero horizon: every row it may drop goes.
    Sweep,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..5, any::<bool>(), prop::option::weighted(0.2, 0u8..5))
            .prop_map(|(a, t, tag)| Step::Agent(a, t, tag)),
        1 => (0u8..5).prop_map(Step::AgentGone),
        1 => (0u8..5, any::<bool>()).prop_map(|(a, b)| Step::Busy(a, b)),
        3 => (0u8..5, prop::option::weighted(0.8, 0u8..5), any::<bool>(), 0u8..10)
            .prop_map(|(c, a, t, s)| Step::Chat(c, a, t, s)),
        1 => (0u8..5).prop_map(Step::ChatGone),
        3 => (0u8..8, 0u8..5).prop_map(|(m, c)| Step::User(m, c)),
        1 => (0u8..8).prop_map(Step::Reply),
        2 => (any::<bool>(), prop::bool::weighted(0.8)).prop_map(|(a, c)| Step::Listing(a, c)),
        1 => Just(Step::AgentFailed),
        4 => Just(Step::Plan),
        3 => (any::<u8>(), 0u8..3).prop_map(|(i, k)| Step::Outcome(i, k)),
        1 => Just(Step::Hold),
        1 => Just(Step::Sweep),
    ]
}

fn agent_info(a: u8, title: bool, tag: Option<u8>, at: u64) -> AgentSessionInfo {
    AgentSessionInfo {
        agent_session_id: format!("a{a}").into(),
        title: if title { "x".into() } else { "y".into() },
        directory: None,
        project: None,
        model: None,
        updated_at: at,
        parent_id: None,
        tag: tag.map(|c| SessionTag {
            worker_id: "w".into(),
            command_id: format!("create-agent:c{c}").into(),
            chat_session_id: format!("c{c}").into(),
        }),
    }
}

/// What succeeding `command` did, as the dispatcher would report it.
fn effect(command: &Command, n: u64) -> Effect {
    match command.clone() {
        Command::CreateSession {
            agent_session_id,
            title,
            model,
        } => Effect::ChatSessionCreated {
            chat_session_id: format!("c{}", 5 + n % 3).into(),
            agent_session_id,
            title,
            model,
        },
        Command::CreateAgentSession {
            chat_session_id,
            title,
        } => Effect::AgentSessionCreated {
            chat_session_id,
            agent_session_id: format!("a{}", 5 + n % 3).into(),
            title,
        },
        Command::LinkAgentSession {
            chat_session_id,
            agent_session_id,
        } => Effect::AgentSessionLinked {
            chat_session_id,
            agent_session_id,
        },
        Command::RenameSession {
            chat_session_id,
            title,
        } => Effect::SessionRenamed {
            chat_session_id,
            title,
        },
        Command::MarkSessionDeleted { chat_session_id } => {
            Effect::SessionDeleted { chat_session_id }
        }
        Command::MarkSessionFailed {
            chat_session_id,
            reason,
        } => Effect::SessionFailed {
            chat_session_id,
            reason,
        },
        Command::AbortAgentSession { agent_session_id } => {
            Effect::AgentSessionAborted { agent_session_id }
        }
        Command::Prompt {
            chat_session_id,
            message_id,
            ..
        } => Effect::PromptAnswered {
            chat_session_id,
            message_id,
            content: "answer".into(),
        },
        Command::CompleteMessage {
            chat_session_id,
            message_id,
            ..
        } => Effect::MessageCompleted {
            chat_session_id,
            message_id,
        },
        Command::FailMessage {
            chat_session_id,
            message_id,
            reason,
        } => Effect::MessageFailed {
            chat_session_id,
            message_id,
            reason,
        },
    }
}

fn outcome(views: &Views, i: u8, kind: u8, n: u64) -> Vec<Event> {
    let open: Vec<_> = views.commands.state.open().collect();
    if open.is_empty() {
        return Vec::new();
    }
    let (id, entry) = open[i as usize % open.len()];
    let Some(command) = entry.command() else {
        return Vec::new();
    };
    let (op, subject) = (command.op(), command.subject());
    vec![match kind {
        0 => Event::CommandSucceeded(CommandSucceeded {
            command_id: id.clone(),
            op,
            subject,
            attempt: 1,
            effect: effect(command, n),
        }),
        1 => Event::CommandFailed(CommandFailed {
            command_id: id.clone(),
            op,
            subject,
            attempt: 1,
            class: ErrorClass::Terminal,
            error: "HTTP 400".into(),
            next_attempt_at: None,
        }),
        _ => Event::CommandDeadLettered(CommandDeadLettered {
            command_id: id.clone(),
            op,
            subject,
            attempts: 5,
            last_error: "timed out".into(),
        }),
    }]
}

/// The events of one step, against the views as they stand (every row in memory).
fn events(step: &Step, views: &Views, ctx: &Context, n: u64) -> Vec<Event> {
    events_with(step, views, ctx, n, &reconcile::retention::NothingAway)
}

/// The events of one step, against views some rows of which may be `away` on disk.
fn events_with(
    step: &Step,
    views: &Views,
    ctx: &Context,
    n: u64,
    away: &dyn reconcile::retention::AwayRows,
) -> Vec<Event> {
    let at = ctx.now;
    match *step {
        Step::Agent(a, t, tag) => vec![Event::AgentSessionChanged(agent_info(a, t, tag, at))],
        Step::AgentGone(a) => vec![Event::AgentSessionGone(AgentSessionGone {
            agent_session_id: format!("a{a}").into(),
            reason: GoneReason::Deleted,
        })],
        Step::Busy(a, busy) => vec![Event::AgentSessionStatus(AgentSessionStatus {
            agent_session_id: format!("a{a}").into(),
            status: if busy {
                AgentStatus::Busy
            } else {
                AgentStatus::Idle
            },
        })],
        Step::Chat(c, a, t, s) => vec![Event::BackendSessionChanged(ChatSessionInfo {
            chat_session_id: format!("c{c}").into(),
            agent_session_id: a.map(|a| format!("a{a}").into()),
            title: if t { "x".into() } else { "y".into() },
            model: None,
            status: match s {
                0 => ChatStatus::Deleted,
                1 => ChatStatus::Failed,
                _ => ChatStatus::Active,
            },
            last_activity: at,
            project: None,
        })],
        Step::ChatGone(c) => vec![Event::BackendSessionGone(BackendSessionGone {
            chat_session_id: format!("c{c}").into(),
        })],
        Step::User(m, c) => vec![message(m, c, Role::User, None, at)],
        Step::Reply(m) => {
            let chat = views
                .messages
                .state
                .messages
                .get(&MessageId::from(format!("m{m}")));
            let c = chat.map_or("c0".to_owned(), |r| r.chat_session_id.to_string());
            let mut e = message(m, 0, Role::Assistant, Some(format!("m{m}")), at);
            if let Event::BackendMessageSeen(info) = &mut e {
                info.chat_session_id = c.into();
            }
            vec![e]
        }
        Step::Listing(agent, complete) => vec![Event::ListingCompleted(ListingCompleted {
            source: if agent {
                Source::Agent
            } else {
                Source::Backend
            },
            sessions: 0,
            complete,
            as_of: None,
        })],
        Step::AgentFailed => vec![Event::ObservationFailed(ObservationFailed {
            source: Source::Agent,
            operation: "list_sessions".into(),
            error: "down".into(),
        })],
        Step::Plan => reconcile::reconcile(views, ctx, &policy())
            .into_iter()
            .map(|p| Event::CommandPlanned(p.planned))
            .collect(),
        Step::Outcome(i, kind) => outcome(views, i, kind, n),
        Step::Hold => reconcile::deletion_hold(views, &policy())
            .map(Event::from)
            .into_iter()
            .collect(),
        Step::Sweep => {
            let retention = reconcile::retention::RetentionPolicy {
                horizon_ms: 0,
                ..Default::default()
            };
            reconcile::retention::sweep(views, at + 1, at + 1, &retention, away)
                .map(Event::RetentionSwept)
                .into_iter()
                .collect()
        }
    }
}

fn message(m: u8, c: u8, role: Role, reply_to: Option<String>, at: u64) -> Event {
    let id = match role {
        Role::User => format!("m{m}"),
        Role::Assistant => format!("r{m}"),
    };
    Event::BackendMessageSeen(MessageInfo {
        chat_session_id: format!("c{c}").into(),
        message_id: id.into(),
        role,
        content: "hi".into(),
        completed: true,
        timestamp: at,
        reply_to: reply_to.map(Into::into),
        error: None,
    })
}

/// A small deletion limit, so that generated histories reach it and the active count moves it.
fn policy() -> Policy {
    Policy {
        deletion_limit_min: 1,
        deletion_limit_percent: 50,
        ..Policy::default()
    }
}

/// The commands planned, by id, with the agent message id left out: it numbers prompts in the
/// order a turn plans them, which differs between a full pass and a turn of fewer keys.
fn by_id(planned: Vec<Planned>) -> BTreeMap<CommandId, (Command, String, Option<u64>)> {
    planned
        .into_iter()
        .map(|p| {
            let mut command = p.planned.command;
            if let Command::Prompt {
                agent_message_id, ..
            } = &mut command
            {
                *agent_message_id = None;
            }
            (
                p.planned.command_id,
                (command, p.planned.reason, p.cause_seq),
            )
        })
        .collect()
}

fn every_key(views: &Views, ctx: &Context) -> BTreeMap<CommandId, (Command, String, Option<u64>)> {
    let keys = reconcile::all_keys(views);
    by_id(reconcile::reconcile_keys(&keys, views, ctx, &policy()).planned)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// (a), (b) and (c) after every batch of events of a generated history: a batch is what
    /// one append holds (a listing's events, a turn's plans), made against the views before it.
    #[test]
    fn a_turn_of_the_dirty_keys_plans_what_the_full_pass_plans_anew(
        batches in prop::collection::vec(prop::collection::vec(step(), 1..4), 1..60),
        ready_at in 0usize..20,
    ) {
        let mut views = Views::default();
        let mut seq = 0u64;
        for (i, batch) in batches.iter().enumerate() {
            let ctx = Context {
                now: START + i as u64 * 1_000,
                started_at: START,
                ready: i >= ready_at,
                process_seq: 0,
            };
            let events: Vec<Event> = batch
                .iter()
                .enumerate()
                .flat_map(|(j, step)| events(step, &views, &ctx, (i * 4 + j) as u64))
                .collect();
            let before = reconcile::reconcile(&views, &ctx, &policy());
            let before: BTreeSet<CommandId> =
                before.into_iter().map(|p| p.planned.command_id).collect();
            let keys: Vec<Key> = events.iter().flat_map(Event::keys).collect();
            let listed = reconcile::listed_in_this_process(&views.sessions.state, 0);
            let mut dirty = BTreeSet::new();
            for k in &keys {
                dirty.extend(reconcile::dependents(k, &views));
            }
            for event in &events {
                seq += 1;
                views.apply(&Envelope {
                    seq,
                    id: uuid::Uuid::nil(),
                    at: ctx.now,
                    v: event.kind().version(),
                    event: event.clone(),
                    cause: None,
                });
            }
            for k in keys {
                dirty.extend(reconcile::dependents(&k, &views));
                dirty.insert(k);
            }
            let s = &views.sessions.state;
            if !listed && reconcile::listed_in_this_process(s, 0) {
                // Ready: the worker plans every key once (`Worker::check_ready`).
                dirty = reconcile::all_keys(&views);
            }
            prop_assert_eq!(&s.index, &SessionIndex::build(s), "after {:?}", events);
            let full = by_id(reconcile::reconcile(&views, &ctx, &policy()));
            prop_assert_eq!(&every_key(&views, &ctx), &full, "after {:?}", events);
            let turn = by_id(reconcile::reconcile_keys(&dirty, &views, &ctx, &policy()).planned);
            for (id, planned) in &full {
                if !before.contains(id) {
                    prop_assert_eq!(
                        turn.get(id), Some(planned),
                        "{} is planned anew after {:?} but not by its dirty keys {:?}",
                        id, events, dirty
                    );
                }
            }
        }
    }
}

/// Settled pairs away from memory, as `log::rows` keeps them: by agent and by chat session.
#[derive(Default)]
struct Away {
    pairs: BTreeMap<AgentSessionId, agentsync::projections::SettledPair>,
    by_chat: BTreeMap<ChatSessionId, AgentSessionId>,
}

impl reconcile::retention::AwayRows for Away {
    fn chat(&self, id: &ChatSessionId) -> bool {
        self.by_chat.contains_key(id)
    }
}

impl Away {
    /// Brings back every pair a row of which `event` names, as the worker does before a fold.
    fn wake_for(&mut self, views: &mut Views, event: &Event) {
        let (agents, chats) = agentsync::projections::rows_named(event);
        let by_chat = chats.iter().filter_map(|c| self.by_chat.get(c).cloned());
        let named: Vec<AgentSessionId> = agents.into_iter().chain(by_chat).collect();
        for a in named {
            if let Some(pair) = self.pairs.remove(&a) {
                self.by_chat.remove(&pair.chat_id);
                views.sessions.state.wake(pair);
            }
        }
    }

    /// Sends every settled pair away.
    fn evict(&mut self, views: &mut Views) {
        for (a, c) in reconcile::settled_pairs(views) {
            if let Some(pair) = views.sessions.state.evict(&a, &c) {
                self.by_chat.insert(c, a.clone());
                self.pairs.insert(a, pair);
            }
        }
    }

    /// `views` with every pair away brought back.
    fn merged(&self, views: &Views) -> Views {
        let mut all = views.clone();
        for pair in self.pairs.values() {
            all.sessions.state.wake(pair.clone());
        }
        all
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// Settled pairs may leave memory: over generated histories, a worker that sends them away
    /// whenever it likes (at its checkpoints) and brings back what each event names before
    /// folding it holds the same rows as one that keeps everything (their merge is equal, the
    /// index included), plans exactly what the full pass over everything plans, from its own
    /// keys alone, and decides the same deletion hold.
    #[test]
    fn settled_pairs_away_from_memory_change_no_row_and_no_plan(
        batches in prop::collection::vec(
            (prop::collection::vec(step(), 1..4), any::<bool>()), 1..60),
        ready_at in 0usize..20,
    ) {
        let mut full = Views::default();
        let mut resident = Views::default();
        let mut away = Away::default();
        let mut seq = 0u64;
        for (i, (batch, evict)) in batches.iter().enumerate() {
            let ctx = Context {
                now: START + i as u64 * 1_000,
                started_at: START,
                ready: i >= ready_at,
                process_seq: 0,
            };
            // What the worker decides (plans, holds, sweeps) it decides on the rows in memory,
            // told which are on disk; what the sides report is about every row.
            let events: Vec<Event> = batch
                .iter()
                .enumerate()
                .flat_map(|(j, step)| {
                    let n = (i * 4 + j) as u64;
                    match step {
                        Step::Plan | Step::Hold | Step::Sweep => {
                            events_with(step, &resident, &ctx, n, &away)
                        }
                        _ => events(step, &away.merged(&resident), &ctx, n),
                    }
                })
                .collect();
            for event in &events {
                seq += 1;
                let env = Envelope {
                    seq,
                    id: uuid::Uuid::nil(),
                    at: ctx.now,
                    v: event.kind().version(),
                    event: event.clone(),
                    cause: None,
                };
                full.apply(&env);
                away.wake_for(&mut resident, event);
                resident.apply(&env);
            }
            if *evict {
                away.evict(&mut resident);
            }
            let merged = away.merged(&resident);
            prop_assert_eq!(&merged, &full, "after {:?}", events);
            let planned = by_id(reconcile::reconcile(&full, &ctx, &policy()));
            prop_assert_eq!(&every_key(&resident, &ctx), &planned, "after {:?}", events);
            let wakes = |v: &Views| -> BTreeSet<(Key, u64)> {
                let keys = reconcile::all_keys(v);
                reconcile::reconcile_keys(&keys, v, &ctx, &policy()).requeue.into_iter().collect()
            };
            prop_assert_eq!(
                wakes(&resident),
                wakes(&full),
                "timers after {:?}", events
            );
            prop_assert_eq!(
                reconcile::deletion_hold(&resident, &policy()),
                reconcile::deletion_hold(&full, &policy())
            );
        }
    }
}

/// A linked, titled, idle pair with nothing pending is settled, and leaves: the property
/// above is not vacuously true of a predicate that never holds.
#[test]
fn settled_pairs_do_leave() {
    let mut views = Views::default();
    let events = [
        Event::AgentSessionSeen(agent_info(1, true, None, START)),
        Event::BackendSessionSeen(ChatSessionInfo {
            chat_session_id: "c1".into(),
            agent_session_id: Some("a1".into()),
            title: "x".into(),
            model: None,
            status: ChatStatus::Active,
            last_activity: START,
            project: None,
        }),
    ];
    for (i, event) in events.into_iter().enumerate() {
        views.apply(&Envelope {
            seq: i as u64 + 1,
            id: uuid::Uuid::nil(),
            at: START,
            v: event.kind().version(),
            event,
            cause: None,
        });
    }
    assert_eq!(
        reconcile::settled_pairs(&views),
        vec![("a1".into(), "c1".into())]
    );
    let mut away = Away::default();
    away.evict(&mut views);
    assert!(views.sessions.state.agent.is_empty() && views.sessions.state.chat.is_empty());
    assert_eq!(
        views.sessions.state.index.active_chats, 1,
        "still counted as active"
    );
}

/// Found in review (when the ledger entry was what stopped a second `createSession`): for a
/// pair on disk the sweep saw no agent session and dropped the entry, and once the chat
/// session was deleted in the backend a second one was planned. Now the agent session's row
/// records its creation (`mirror_planned`) and carries it to disk: the sweep drops the entry
/// on the resident views as on the whole ones, and a lost chat session is not made again.
#[test]
fn a_sweep_of_a_creation_on_disk_leaves_no_second_creation() {
    let mut full = Views::default();
    let mut resident = Views::default();
    let mut away = Away::default();
    let mut seq = 0u64;
    let ctx = |i: u64| Context {
        now: START + i * 1_000,
        started_at: START,
        ready: true,
        process_seq: 0,
    };
    let mut fold = |full: &mut Views, resident: &mut Views, away: &mut Away, event: Event, at| {
        seq += 1;
        let env = Envelope {
            seq,
            id: uuid::Uuid::nil(),
            at,
            v: event.kind().version(),
            event: event.clone(),
            cause: None,
        };
        full.apply(&env);
        away.wake_for(resident, &event);
        resident.apply(&env);
    };
    let listed = |source| {
        Event::ListingCompleted(ListingCompleted {
            source,
            sessions: 1,
            complete: true,
            as_of: Some(0),
        })
    };
    let c0 = ctx(0);
    for e in [
        Event::AgentSessionSeen(agent_info(1, true, None, START)),
        listed(Source::Agent),
        listed(Source::Backend),
    ] {
        fold(&mut full, &mut resident, &mut away, e, c0.now);
    }
    let planned = events(&Step::Plan, &full, &c0, 0);
    assert_eq!(planned.len(), 1, "{planned:?}");
    for e in planned {
        fold(&mut full, &mut resident, &mut away, e, c0.now);
    }
    for e in outcome(&full, 0, 0, 0) {
        fold(&mut full, &mut resident, &mut away, e, c0.now);
    }
    assert_eq!(reconcile::settled_pairs(&resident).len(), 1);
    away.evict(&mut resident);
    let c1 = ctx(1);
    let retention = reconcile::retention::RetentionPolicy {
        horizon_ms: 0,
        ..Default::default()
    };
    let nothing = reconcile::retention::NothingAway;
    let on_resident = reconcile::retention::sweep(&resident, c1.now, c1.now, &retention, &away);
    let on_full = reconcile::retention::sweep(&full, c1.now, c1.now, &retention, &nothing);
    let commands = |s: &Option<RetentionSwept>| s.as_ref().map(|s| s.commands.clone());
    assert_eq!(commands(&on_resident), commands(&on_full));
    let creation = CommandId::from("createSession:a1");
    assert_eq!(
        commands(&on_full),
        Some(vec![creation]),
        "left, a1 lives on"
    );
    // Then the backend loses the chat session (`effect`: c5) for good: the pair comes back.
    let gone = Event::BackendSessionGone(BackendSessionGone {
        chat_session_id: "c5".into(),
    });
    let swept = Event::RetentionSwept(on_full.expect("a sweep"));
    for e in [swept, gone] {
        fold(&mut full, &mut resident, &mut away, e, c1.now);
    }
    assert!(away.pairs.is_empty(), "brought back");
    assert!(resident.sessions.state.chat.is_empty());
    assert!(resident.sessions.state.agent[&AgentSessionId::from("a1")].mirror_planned);
    for views in [&resident, &full] {
        let again = events(&Step::Plan, views, &ctx(2), 0);
        assert!(again.is_empty(), "{again:?}");
    }
}
