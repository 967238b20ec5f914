//! The invariants, checked after a run against the log (replayed from scratch, event by event)
//! and against what the two simulated sides hold.

use std::collections::BTreeMap;

use super::scenario::MESSAGE_DEADLINE_MS;
use super::Violations;
use crate::clock::Millis;
use crate::dispatch::waits_for_ready;
use crate::events::*;
use crate::projections::{CommandState, MessageState, ProjectionName, Views, MODELS_OPERATION};
use crate::reconcile::{self, ids, Context};
use crate::sim::{SimAgent, SimBackend};

/// 1. No agent session and no chat session created twice for one purpose.
pub const NO_DUPLICATE_SESSION: &str = "no_duplicate_session";
/// 2. No prompt sent twice for one message: the model runs at most once per message, except
///    that a run lost with its server (interrupted: no answer ever came of it) is run anew,
///    once per such loss (`dispatch::execute`: posting again over a live or answered run would
///    make the user pay twice; leaving a dead one would leave the user without an answer).
pub const NO_DUPLICATE_PROMPT: &str = "no_duplicate_prompt";
/// 3. Every user message ends answered or failed with a reason, within its deadline, and the
///    backend knows it.
pub const EVERY_MESSAGE_RESOLVED: &str = "every_message_resolved";
/// 4. No deletion while the agent side's latest observation in this process is failed or
///    partial.
pub const NO_DELETION_ON_FAILED_OBSERVATION: &str = "no_deletion_on_failed_observation";
/// 5. Ready (and any prompt) never before both sides were observed completely in this process:
///    a complete listing, or a read of the side's sessions feed that reached the end from a
///    cursor a complete listing covers (`reconcile::listed_in_this_process`); and nothing that
///    waits for Ready (`dispatch::waits_for_ready`) before a complete agent listing of this
///    process (reads of changes do not show a server wiped while the worker was down).
pub const READY_AFTER_COMPLETE_LISTINGS: &str = "ready_after_complete_listings";
/// 6. Convergence once faults stop: nothing left to plan or run, and the log replayed from
///    scratch equals the live views.
pub const CONVERGENCE: &str = "convergence";
/// No chat session is marked deleted while its agent session exists.
pub const NO_DELETION_OF_LIVE_SESSION: &str = "no_deletion_of_live_session";
/// The worker ran to the end: no error, no panic.
pub const RUN_COMPLETED: &str = "run_completed";

/// Every invariant, in report order.
pub const INVARIANTS: [&str; 8] = [
    NO_DUPLICATE_SESSION,
    NO_DUPLICATE_PROMPT,
    EVERY_MESSAGE_RESOLVED,
    NO_DELETION_ON_FAILED_OBSERVATION,
    READY_AFTER_COMPLETE_LISTINGS,
    CONVERGENCE,
    NO_DELETION_OF_LIVE_SESSION,
    RUN_COMPLETED,
];

/// How long after its deadline a message may still be undecided: a turn of the loop and a
/// failMessage to plan.
const DEADLINE_SLACK_MS: Millis = 60_000;

/// What the last observation of a side in this process said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Complete,
    Partial,
    Failed,
}

/// The state of one worker process, as its events show it.
#[derive(Debug, Default)]
struct Process {
    agent: Option<Seen>,
    listed_agent: bool,
    /// A complete full agent listing in this process (reads of changes do not count).
    full_agent: bool,
    listed_backend: bool,
    ready: bool,
}

/// The true time of the log's events, recovered from their times (the worker's stepped clock)
/// and the steps: events are appended in true-time order, so each one's true time is the
/// earliest reading, not before the previous event's, that its clock could have shown it at.
struct TrueTime {
    /// The true time from which each offset holds, and the offset.
    offsets: Vec<(Millis, i64)>,
    last: Millis,
}

impl TrueTime {
    fn new(steps: &[(Millis, i64)]) -> Self {
        let mut offsets = vec![(0, 0)];
        for (at, delta) in steps {
            let cumulative = offsets.last().map_or(0, |o| o.1) + delta;
            offsets.push((*at, cumulative));
        }
        Self { offsets, last: 0 }
    }

    /// The true time of an event the worker's clock stamped `at`.
    fn of(&mut self, at: Millis) -> Millis {
        let candidates = self
            .offsets
            .iter()
            .enumerate()
            .filter_map(|(k, (from, offset))| {
                let until = self.offsets.get(k + 1).map_or(Millis::MAX, |o| o.0);
                let t = at.checked_add_signed(-offset)?;
                (t >= *from && t < until && t >= self.last).then_some(t)
            });
        self.last = candidates.min().unwrap_or(self.last);
        self.last
    }

    /// The clock's steps back between two true times: a deadline on the worker's wall clock
    /// is late by that much, and can be no earlier (it is all that survives a restart).
    fn back_between(&self, from: Millis, to: Millis) -> Millis {
        self.offsets
            .windows(2)
            .filter(|w| w[1].0 > from && w[1].0 <= to && w[1].1 < w[0].1)
            .map(|w| w[0].1.abs_diff(w[1].1))
            .sum()
    }
}

/// Walks the log from its first event, folding fresh views and checking, at each event, the
/// rules that are about the order of things (4, 5 and the deadline of 3).
pub(super) struct Auditor<'a> {
    pub views: Views,
    process: Process,
    decided: BTreeMap<MessageId, Millis>,
    /// When each message was first seen (true time).
    seen: BTreeMap<MessageId, Millis>,
    time: TrueTime,
    v: &'a mut Violations,
}

impl<'a> Auditor<'a> {
    /// An auditor of a run whose worker clock made `steps` (true time, delta).
    pub fn new(v: &'a mut Violations, steps: Vec<(Millis, i64)>) -> Self {
        Self {
            views: Views::default(),
            process: Process::default(),
            decided: BTreeMap::new(),
            seen: BTreeMap::new(),
            time: TrueTime::new(&steps),
            v,
        }
    }

    /// One event of the log, in order.
    pub fn event(&mut self, env: &Envelope) {
        self.order_rules(env);
        self.views.apply(env);
        self.deadlines(env);
    }

    fn order_rules(&mut self, env: &Envelope) {
        let agent_listing = self.views.sessions.state.listings.get(&Source::Agent);
        let covered = agent_listing.is_some_and(|l| l.last_complete_seq.is_some());
        let p = &mut self.process;
        match &env.event {
            Event::FeedRead(f) if f.reached_end => match f.feed {
                Feed::AgentSessions => p.listed_agent |= covered,
                Feed::BackendSessions => p.listed_backend = true,
                Feed::BackendMessages => {}
            },
            Event::WorkerState(s) if s.state == Lifecycle::Starting => *p = Process::default(),
            Event::ListingCompleted(l) => {
                let seen = if l.complete {
                    Seen::Complete
                } else {
                    Seen::Partial
                };
                match l.source {
                    Source::Agent => {
                        p.agent = Some(seen);
                        p.listed_agent |= l.complete;
                        p.full_agent |= l.complete;
                    }
                    Source::Backend => p.listed_backend |= l.complete,
                }
            }
            Event::ObservationFailed(f)
                if f.source == Source::Agent && f.operation != MODELS_OPERATION =>
            {
                p.agent = Some(Seen::Failed)
            }
            Event::WorkerReady(_) => {
                p.ready = true;
                if !(p.listed_agent && p.listed_backend) {
                    let what = format!(
                        "seq {}: ready before both sides were listed completely in this process",
                        env.seq
                    );
                    self.v.add(READY_AFTER_COMPLETE_LISTINGS, what);
                }
            }
            Event::AttemptStarted(a) if a.op == Op::Prompt && !p.ready => {
                let what = format!("seq {}: {} started before ready", env.seq, a.command_id);
                self.v.add(READY_AFTER_COMPLETE_LISTINGS, what);
            }
            Event::AttemptStarted(a) if waits_for_ready(a.op) && !p.full_agent => {
                let what = format!(
                    "seq {}: {} started before a complete agent listing in this process",
                    env.seq, a.command_id
                );
                self.v.add(READY_AFTER_COMPLETE_LISTINGS, what);
            }
            _ => {}
        }
        self.deletion_rule(env);
    }

    /// Rule 4: a deletion decided or attempted while the agent side's latest observation in
    /// this process is not a complete listing.
    fn deletion_rule(&mut self, env: &Envelope) {
        let id = match &env.event {
            Event::CommandPlanned(c) if c.command.op() == Op::MarkSessionDeleted => &c.command_id,
            Event::AttemptStarted(a) if a.op == Op::MarkSessionDeleted => &a.command_id,
            _ => return,
        };
        if let Some(seen) = self.process.agent.filter(|s| *s != Seen::Complete) {
            let what = format!(
                "seq {} ({}): {id} while the agent side's latest observation is {seen:?}",
                env.seq,
                env.kind().name()
            );
            self.v.add(NO_DELETION_ON_FAILED_OBSERVATION, what);
        } else if self.process.agent.is_none() {
            let what = format!(
                "seq {}: {id} before any agent listing in this process",
                env.seq
            );
            self.v.add(NO_DELETION_ON_FAILED_OBSERVATION, what);
        }
    }

    /// Rule 3's deadline: the first moment (true time) each message was decided, against
    /// the first moment it was seen.
    fn deadlines(&mut self, env: &Envelope) {
        let now = self.time.of(env.at);
        for (id, row) in &self.views.messages.state.messages {
            let seen = *self.seen.entry(id.clone()).or_insert(now);
            if row.state.is_pending() || self.decided.contains_key(id) {
                continue;
            }
            self.decided.insert(id.clone(), now);
            let back = self.time.back_between(seen, now);
            let due = seen + MESSAGE_DEADLINE_MS + DEADLINE_SLACK_MS + back;
            if now > due {
                let late = (now - seen) / 1_000;
                let what = format!("seq {}: {id} decided {late} s after it was seen", env.seq);
                self.v.add(EVERY_MESSAGE_RESOLVED, what);
            }
        }
    }
}

/// Rules 1 and 2, and the wrongful deletions, against what the sides hold.
pub(super) fn sides(agent: &SimAgent, backend: &SimBackend, v: &mut Violations) {
    for (command, n) in agent.created_for().into_iter().filter(|(_, n)| *n > 1) {
        v.add(
            NO_DUPLICATE_SESSION,
            format!("{n} agent sessions for {command}"),
        );
    }
    for (chat, n) in agent.created_for_chat().into_iter().filter(|(_, n)| *n > 1) {
        v.add(
            NO_DUPLICATE_SESSION,
            format!("{n} agent sessions for chat {chat}"),
        );
    }
    for (id, n) in backend.effects().into_iter().filter(|(_, n)| *n > 1) {
        v.add(NO_DUPLICATE_SESSION, format!("{id} applied {n} times"));
    }
    let mut chats: BTreeMap<AgentSessionId, Vec<ChatSessionId>> = BTreeMap::new();
    for c in backend.sessions().into_values() {
        if let Some(a) = c.agent_session_id {
            chats.entry(a).or_default().push(c.chat_session_id);
        }
    }
    for (a, c) in chats.iter().filter(|(_, c)| c.len() > 1) {
        v.add(NO_DUPLICATE_SESSION, format!("{a} has chat sessions {c:?}"));
    }
    let interrupted = agent.interrupted_runs();
    for (m, n) in agent.model_runs() {
        let dead = interrupted.get(&m).copied().unwrap_or(0);
        if n > 1 + dead {
            let what = format!("the model ran {n} times for {m} ({dead} of the runs interrupted)");
            v.add(NO_DUPLICATE_PROMPT, what);
        }
    }
    let live = agent.sessions();
    for c in backend.sessions().into_values() {
        let exists = c
            .agent_session_id
            .as_ref()
            .is_some_and(|a| live.contains_key(a));
        if c.status == ChatStatus::Deleted && exists {
            let what = format!(
                "{} deleted while its agent session exists",
                c.chat_session_id
            );
            v.add(NO_DELETION_OF_LIVE_SESSION, what);
        }
    }
}

/// Rule 3 at the end: every user message decided, with a reason if not answered, and the
/// backend holds the outcome, once.
pub(super) fn messages(views: &Views, backend: &SimBackend, v: &mut Violations) {
    let all = backend.messages();
    for m in all.values().filter(|m| m.role == Role::User) {
        let id = &m.message_id;
        let Some(row) = views.messages.state.messages.get(id) else {
            v.add(EVERY_MESSAGE_RESOLVED, format!("{id} never observed"));
            continue;
        };
        if row.state.is_pending() {
            v.add(
                EVERY_MESSAGE_RESOLVED,
                format!("{id} still {:?}", row.state),
            );
        } else if row.state != MessageState::Answered && row.reason.is_none() {
            v.add(
                EVERY_MESSAGE_RESOLVED,
                format!("{id} failed without a reason"),
            );
        }
        let answers = all
            .values()
            .filter(|r| r.reply_to.as_ref() == Some(id) && r.completed)
            .count();
        let failed = m.error.is_some();
        match (answers, failed) {
            (0, false) => v.add(
                EVERY_MESSAGE_RESOLVED,
                format!("the backend has no outcome for {id}"),
            ),
            (1, false) | (0, true) => {}
            _ => v.add(
                EVERY_MESSAGE_RESOLVED,
                format!("{id}: {answers} answers, failed: {failed}"),
            ),
        }
    }
}

/// Rule 6: once faults stop, reconciling plans nothing, nothing is open, and the views rebuilt
/// from the log equal the live ones.
pub(super) fn convergence(live: &Views, rebuilt: &Views, now: Millis, v: &mut Violations) {
    let ctx = Context {
        process_seq: 0,
        now,
        started_at: now,
        ready: true,
    };
    let policy = super::policy();
    for p in reconcile::reconcile(live, &ctx, &policy) {
        let what = format!(
            "still planning {} ({})",
            p.planned.command_id, p.planned.reason
        );
        v.add(CONVERGENCE, what);
    }
    for (id, _) in live.commands.state.open() {
        v.add(CONVERGENCE, format!("{id} still open"));
    }
    for p in ProjectionName::ALL {
        if rebuilt.to_json(p) != live.to_json(p) {
            v.add(
                CONVERGENCE,
                format!("the {p} view rebuilt from the log differs from the live one"),
            );
        }
    }
}

/// Rule 6, the mirror: every agent session has its chat session (or the command that owed it
/// gave up), and every orphaned chat session is deleted (or its deletion gave up).
pub(super) fn mirrored(views: &Views, agent: &SimAgent, backend: &SimBackend, v: &mut Violations) {
    let ledger = &views.commands.state.commands;
    let gave_up = |id: &CommandId| {
        ledger
            .get(id)
            .is_some_and(|e| e.is_final() && e.state != CommandState::Succeeded)
    };
    let chats = backend.sessions();
    let linked: BTreeMap<&AgentSessionId, &ChatSessionInfo> = chats
        .values()
        .filter_map(|c| c.agent_session_id.as_ref().map(|a| (a, c)))
        .collect();
    for (a, info) in agent.sessions() {
        let owed = match &info.tag {
            Some(tag) => ids::link_agent_session(&tag.chat_session_id, &a),
            None => ids::create_session(&a),
        };
        if !linked.contains_key(&a) && !gave_up(&owed) {
            v.add(
                CONVERGENCE,
                format!("{a} has no chat session and {owed} did not give up"),
            );
        }
    }
    for c in chats
        .values()
        .filter(|c| c.chat_session_id.0.starts_with("chat_orphan_"))
    {
        let deletion = ids::mark_session_deleted(&c.chat_session_id);
        if c.status == ChatStatus::Active && !gave_up(&deletion) {
            v.add(CONVERGENCE, format!("{} not deleted", c.chat_session_id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_time_is_recovered_across_steps_both_ways() {
        const B: Millis = 10_000_000;
        // +5 min at B+1 s, then -10 min at B+2 s.
        let mut t = TrueTime::new(&[(B + 1_000, 300_000), (B + 2_000, -600_000)]);
        assert_eq!(t.of(B + 500), B + 500);
        assert_eq!(t.of(B + 301_500), B + 1_500, "after the step forward");
        assert_eq!(t.of(B + 2_500 - 300_000), B + 2_500, "after the step back");
        assert_eq!(t.back_between(B, B + 3_000), 600_000);
        assert_eq!(
            t.back_between(B + 2_000, B + 3_000),
            0,
            "a step at `from` is not between"
        );
    }
}
