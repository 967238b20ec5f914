//! The reconciler: a pure function from the views, the time and a policy to the commands that
//! would bring the two sides together.
//!
//! It does no I/O and keeps no state: everything it knows is in the projections, so planning
//! the same views twice plans the same commands, and each command's id says what it is for
//! ([`ids`]). The command ledger decides what is already planned, running, done or dead: a
//! command whose id is in the ledger is never planned again, whatever its state. That is what
//! makes the incidents of DESIGN.md impossible by construction here:
//!
//! - deletions are derived only from a complete, successful agent listing newer than the link,
//!   and none while the agent side's last observation failed; one listing causes at most a
//!   bounded number, more are held until a later listing confirms them ([`deletion_hold`]);
//! - agent sessions are created lazily, for a message that needs one, never restored eagerly;
//! - nothing is prompted before the worker is Ready, and messages that were already older than
//!   the retry window when the worker started are failed once, not retried;
//! - a message whose prompt failed terminally or ran out of attempts, or whose session ended,
//!   is failed in the backend with a reason; none stays pending.

mod deletions;
pub mod ids;
mod keyed;
pub mod retention;
mod settled;

pub use keyed::{all_keys, dependents, reconcile_key, reconcile_keys, KeyedPlan, Scheduler};
pub use settled::settled_pairs;

use crate::events::Feed;
pub use deletions::{deletion_hold, HoldChange};

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashSet};

use rustc_hash::FxHashMap;

use crate::clock::Millis;
use crate::events::{
    AgentSessionId, ChatSessionId, ChatStatus, Command, CommandId, CommandPlanned, ErrorClass,
    MessageId, ModelRef, Source,
};
use crate::projections::{
    AgentSessionRow, ChatSessionRow, CommandLedger, CommandState, ListingState, MessageRow,
    MessageState, MessagesView, SessionsView, Views,
};

/// What the reconciler may decide, as numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// A message still incomplete this long before the worker started is failed, not retried.
    pub retry_window_ms: Millis,
    /// A session busy this long with no progress is marked failed.
    pub stale_busy_ms: Millis,
    /// One complete agent listing may mark at most this share (percent, rounded down) of the
    /// active chat sessions deleted, or [`Policy::deletion_limit_min`] if that is more; beyond
    /// it the listing is held, not obeyed.
    pub deletion_limit_percent: u32,
    /// The least number of deletions one listing may cause.
    pub deletion_limit_min: usize,
    /// Held deletions proceed when a complete agent listing that ends at least this long after
    /// the hold still calls for more than the limit.
    pub deletion_confirm_ms: Millis,
    /// The model of prompts whose session names none (`--model`); `None`: the agent server's
    /// default.
    pub default_model: Option<ModelRef>,
    /// A message still pending this long after the worker first saw it is failed, whether or
    /// not the worker restarted meanwhile.
    pub message_deadline_ms: Millis,
    /// The wait before the second delivery round of an outcome whose delivery gave up; each
    /// later round waits twice as long, up to `delivery_retry_cap_ms`.
    pub delivery_retry_ms: Millis,
    /// The longest wait between delivery rounds.
    pub delivery_retry_cap_ms: Millis,
    /// Delivery rounds of one outcome at most (24: about a day at the longest wait); past
    /// them the outcome stays undelivered, counted in `/metrics` and named by `/readyz`.
    pub max_delivery_rounds: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            retry_window_ms: 5 * 60 * 1000,
            stale_busy_ms: 6 * 60 * 60 * 1000,
            deletion_limit_percent: 10,
            deletion_limit_min: 20,
            deletion_confirm_ms: 60_000,
            default_model: None,
            message_deadline_ms: 30 * 60 * 1000,
            delivery_retry_ms: 60 * 1000,
            delivery_retry_cap_ms: 60 * 60 * 1000,
            max_delivery_rounds: 24,
        }
    }
}

impl Policy {
    /// The wait before delivery round `round` (from 1) after the previous round gave up.
    pub fn delivery_backoff(&self, round: u32) -> Millis {
        let doublings = round.saturating_sub(1).min(32);
        self.delivery_retry_ms
            .saturating_mul(1 << doublings)
            .min(self.delivery_retry_cap_ms)
    }
}

/// The moment a pass runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// Now.
    pub now: Millis,
    /// When this worker process started: messages older than the retry window at this moment
    /// were "found at start".
    pub started_at: Millis,
    /// Whether the worker is Ready (both sides listed completely in this process).
    pub ready: bool,
    /// The log's last seq when this process started: only a listing completed after it says
    /// anything about the world now (a checkpoint's listings may be days old, of a server
    /// since wiped or replaced).
    pub process_seq: u64,
}

/// A command to plan, with the position of the event that made it necessary, when one did
/// (`why` follows it back; time-based decisions have none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The decision.
    pub planned: CommandPlanned,
    /// The seq of the event it follows from.
    pub cause_seq: Option<u64>,
}

/// One reconciliation pass over everything: the commands to plan, each not yet in the ledger.
/// The worker plans by key ([`reconcile_keys`]); this full pass is what those must add up to,
/// the oracle of the property tests, and builds its index from scratch.
pub fn reconcile(views: &Views, ctx: &Context, policy: &Policy) -> Vec<Planned> {
    let mut plan = Planner::new(&views.commands.state);
    let sessions = &views.sessions.state;
    let messages = &views.messages.state;
    if listed_in_this_process(sessions, ctx.process_seq) {
        let mut index = ChatIndex::new(sessions);
        for (agent_id, agent) in &sessions.agent {
            let chat = index.by_agent.remove(agent_id);
            plan_agent(&mut plan, sessions, agent_id, agent, chat, ctx, policy);
        }
        let absent = index
            .by_agent
            .iter()
            .map(|(a, (c, row))| (*a, *c, *row))
            .chain(index.others.iter().copied());
        plan_deletions(&mut plan, sessions, absent, ctx, policy);
    }
    for id in messages.undelivered.keys() {
        plan_outcome(&mut plan, messages, id, ctx, policy);
    }
    for (chat_id, pending) in &messages.pending_by_chat {
        plan_chat(&mut plan, sessions, messages, chat_id, pending, ctx, policy);
    }
    plan.out
}

/// Collects commands, skipping ids the ledger (or this pass) already has.
struct Planner<'a> {
    ledger: &'a CommandLedger,
    planned: HashSet<CommandId>,
    out: Vec<Planned>,
    /// The cause of the next command planned (set by `because`).
    cause: Option<u64>,
    /// The earliest time at which what was planned for the current key may change with no
    /// event: a deadline, a staleness, a delivery round's backoff.
    wake: Option<Millis>,
}

impl<'a> Planner<'a> {
    fn new(ledger: &'a CommandLedger) -> Self {
        Planner {
            ledger,
            planned: HashSet::new(),
            out: Vec::new(),
            cause: None,
            wake: None,
        }
    }

    /// Asks for the current key to be planned again at `at` (the earliest asked wins).
    fn wake_at(&mut self, at: Millis) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    fn known(&self, id: &CommandId) -> bool {
        self.ledger.commands.contains_key(id) || self.planned.contains(id)
    }

    fn plan(&mut self, command_id: CommandId, command: impl FnOnce() -> Command, reason: String) {
        let cause_seq = self.cause.take();
        if self.known(&command_id) {
            return;
        }
        self.planned.insert(command_id.clone());
        self.out.push(Planned {
            planned: CommandPlanned {
                command_id,
                command: command(),
                reason,
            },
            cause_seq,
        });
    }

    /// Names the event the next command follows from (0: not known, as in a checkpoint from
    /// before causes were kept).
    fn because(&mut self, seq: u64) -> &mut Self {
        self.cause = (seq > 0).then_some(seq);
        self
    }

    /// Whether a command ended without success (dead, failed terminally or cancelled).
    fn gave_up(&self, id: &CommandId) -> Option<String> {
        let e = self.ledger.commands.get(id)?;
        let failed = matches!(e.state, CommandState::Dead | CommandState::Cancelled)
            || (e.state == CommandState::Failed && e.last_class == Some(ErrorClass::Terminal));
        failed.then(|| e.last_error.clone().unwrap_or_else(|| "gave up".into()))
    }
}

/// Both sides have been observed completely since this process started (after
/// `process_seq`): before that, a missing counterpart may only be unlisted, and acting on it
/// would duplicate or delete sessions on the strength of what a previous process saw. The
/// worker is Ready exactly when this holds.
///
/// A side is observed completely by a complete listing, or by an incremental read of its
/// sessions' feed that reached the end (`feed_read` with `reached_end`) from the cursor the
/// log keeps: that cursor is covered by a complete listing (the agent's is first set by one;
/// the backend's chain of reads starts from `null`, which is one), so the view then holds
/// every session the source holds. It proves none gone: absence still needs a complete
/// listing (`ListingState::last_complete_seq`, which only a full listing sets).
pub fn listed_in_this_process(s: &SessionsView, process_seq: u64) -> bool {
    let observed = |src: Source, feed: Feed| {
        let listed = s.listings.get(&src).and_then(|l| l.last_complete_seq);
        let read = s.feeds.get(&feed).and_then(|f| f.caught_up_seq);
        listed.max(read).is_some_and(|seq| seq > process_seq)
    };
    observed(Source::Agent, Feed::AgentSessions) && observed(Source::Backend, Feed::BackendSessions)
}

/// Chat sessions by the agent session they link to: one per agent session (an active one when
/// several are), plus the rest. Built once per pass with a fast hasher: at 100k sessions this
/// index is most of a pass's cost.
struct ChatIndex<'a> {
    by_agent: FxHashMap<&'a AgentSessionId, (&'a ChatSessionId, &'a ChatSessionRow)>,
    others: Vec<(&'a AgentSessionId, &'a ChatSessionId, &'a ChatSessionRow)>,
}

impl<'a> ChatIndex<'a> {
    fn new(s: &'a SessionsView) -> Self {
        let mut by_agent: FxHashMap<&AgentSessionId, (&ChatSessionId, &ChatSessionRow)> =
            FxHashMap::with_capacity_and_hasher(s.chat.len(), Default::default());
        let mut others = Vec::new();
        for (id, row) in &s.chat {
            let Some(agent) = &row.agent_session_id else {
                continue;
            };
            match by_agent.entry(agent) {
                Entry::Vacant(v) => {
                    v.insert((id, row));
                }
                Entry::Occupied(mut o) => {
                    let cur = *o.get();
                    if cur.1.status != ChatStatus::Active && row.status == ChatStatus::Active {
                        o.insert((id, row));
                        others.push((agent, cur.0, cur.1));
                    } else {
                        others.push((agent, id, row));
                    }
                }
            }
        }
        Self { by_agent, others }
    }
}

/// Creations, renames and staleness of one agent session, given the chat session linked to it
/// (an active one when several are), if any.
#[allow(clippy::too_many_arguments)]
fn plan_agent(
    plan: &mut Planner<'_>,
    s: &SessionsView,
    agent_id: &AgentSessionId,
    agent: &AgentSessionRow,
    linked: Option<(&ChatSessionId, &ChatSessionRow)>,
    ctx: &Context,
    policy: &Policy,
) {
    let Some((chat_id, chat)) = linked else {
        if let Some(chat_id) = &agent.created_for {
            // Made by our createAgentSession for a chat session: that command adopts it
            // (or it is a spare from a race); mirroring it would make a second chat.
            adopt(plan, s, agent_id, agent, chat_id);
            return;
        }
        if agent.mirror_planned {
            // Mirrored once already: its chat session was deleted from the backend for good,
            // or the creation gave up. Its ledger entry may have left after the horizon.
            return;
        }
        plan.because(agent.first_seq).plan(
            ids::create_session(agent_id),
            || Command::CreateSession {
                agent_session_id: agent_id.clone(),
                title: agent.title.clone(),
                model: agent.model.as_ref().map(ToString::to_string),
            },
            "agent session has no chat session".into(),
        );
        return;
    };
    // Deleted and failed chat sessions are final: never renamed, never recreated.
    if chat.status != ChatStatus::Active {
        return;
    }
    // An agent session created for this chat session: the backend must learn the link,
    // whether or not the message that needed it is still waiting.
    if !chat.link_confirmed {
        if let Some(seq) = chat.linked_seq {
            plan.because(seq);
        }
        plan.plan(
            ids::link_agent_session(chat_id, agent_id),
            || Command::LinkAgentSession {
                chat_session_id: chat_id.clone(),
                agent_session_id: agent_id.clone(),
            },
            format!("agent session {agent_id} was created for this chat session"),
        );
    }
    if agent.title != chat.title && !agent.title.is_empty() {
        plan.because(agent.title_seq).plan(
            ids::rename_session(chat_id, agent.title_seq),
            || Command::RenameSession {
                chat_session_id: chat_id.clone(),
                title: agent.title.clone(),
            },
            format!(
                "agent title is {:?}, chat title is {:?}",
                agent.title, chat.title
            ),
        );
    }
    if let Some(since) = agent.busy_since {
        let progress = since.max(agent.last_activity);
        if ctx.now.saturating_sub(progress) < policy.stale_busy_ms {
            plan.wake_at(progress.saturating_add(policy.stale_busy_ms));
        } else {
            let hours = policy.stale_busy_ms as f64 / 3_600_000.0;
            let reason = format!("busy with no progress for {hours} h");
            plan.plan(
                ids::mark_session_failed(chat_id),
                || Command::MarkSessionFailed {
                    chat_session_id: chat_id.clone(),
                    reason: reason.clone(),
                },
                reason.clone(),
            );
            plan.plan(
                ids::abort_agent_session(agent_id, since),
                || Command::AbortAgentSession {
                    agent_session_id: agent_id.clone(),
                },
                reason,
            );
        }
    }
}

/// An agent session our `createAgentSession` made for `chat_id`, found after that command gave
/// up (its last attempt's reply was lost or came past the timeout, after the server had made
/// it): while the chat session still has none, it is linked now. Left alone, it would be a
/// spare forever, and every later message of the chat would be failed for want of a session.
fn adopt(
    plan: &mut Planner<'_>,
    s: &SessionsView,
    agent_id: &AgentSessionId,
    agent: &AgentSessionRow,
    chat_id: &ChatSessionId,
) {
    let Some(chat) = s.chat.get(chat_id) else {
        return;
    };
    if chat.status != ChatStatus::Active || chat.agent_session_id.is_some() {
        return;
    }
    let create = ids::create_agent_session(chat_id);
    let Some(error) = plan.gave_up(&create) else {
        return; // still open: its own lookup adopts the session
    };
    plan.because(agent.first_seq).plan(
        ids::link_agent_session(chat_id, agent_id),
        || Command::LinkAgentSession {
            chat_session_id: chat_id.clone(),
            agent_session_id: agent_id.clone(),
        },
        format!("agent session {agent_id} was made for this chat session by {create}, which gave up ({error})"),
    );
}

/// Deletions: only from a complete, successful agent listing of this process newer than the
/// link, and none while the agent side's last observation is a failure (the server may simply
/// be down). `linked` holds (at least) every linked chat session whose agent session is
/// absent. More than the policy's limit are held, not obeyed, until a later listing confirms
/// them (see [`deletion_hold`]).
fn plan_deletions<'v>(
    plan: &mut Planner<'_>,
    s: &'v SessionsView,
    linked: impl Iterator<Item = (&'v AgentSessionId, &'v ChatSessionId, &'v ChatSessionRow)>,
    ctx: &Context,
    policy: &Policy,
) {
    // Only a complete listing of this process proves absence: Ready may come from reads of
    // the agent's changes from a cursor, which show nothing gone, and a listing a previous
    // process saw may be of a server since wiped and refilled.
    let Some(complete_seq) =
        deletions::trusted_agent_listing(s).filter(|&seq| seq > ctx.process_seq)
    else {
        return;
    };
    let absent: Vec<_> = linked
        .filter(|(a, _, chat)| deletions::deletable(s, a, chat, complete_seq))
        .collect();
    let over = deletions::over_limit(s, policy, absent.len());
    if over && !deletions::hold_confirmed(s, policy, ctx.started_at) {
        return; // held: see `deletion_hold`
    }
    let note = match &s.deletion_hold {
        Some(h) if over => format!(
            "; {} absent, held at seq {} and confirmed",
            absent.len(),
            h.seq
        ),
        _ => String::new(),
    };
    for (agent_id, chat_id, _) in absent {
        let id = ids::mark_session_deleted(chat_id);
        if plan.known(&id) {
            continue; // planned already: no reason to write
        }
        plan.because(complete_seq).plan(
            id,
            || Command::MarkSessionDeleted {
                chat_session_id: chat_id.clone(),
            },
            format!(
                "agent session {agent_id} absent from the complete listing at seq {complete_seq}{note}"
            ),
        );
    }
}

/// An outcome the backend does not hold yet: an answer to deliver, a failure to record. A delivery
/// that gave up is tried again, in rounds with new ids and a growing wait: no outcome is left
/// stranded because one command died.
fn plan_outcome(
    plan: &mut Planner<'_>,
    m: &MessagesView,
    id: &MessageId,
    ctx: &Context,
    policy: &Policy,
) {
    let Some(row) = m.messages.get(id) else {
        return;
    };
    let (answer, round_id): (Option<&String>, RoundId) = match row.state {
        MessageState::Answered => match &row.answer {
            Some(answer) => (Some(answer), ids::complete_message_round),
            None => return,
        },
        MessageState::Failed | MessageState::Abandoned => (None, ids::fail_message_round),
        MessageState::Seen | MessageState::Prompting => return,
    };
    let next = next_round(plan.ledger, |r| round_id(id, r), ctx, policy);
    let (round, after) = match next {
        Round::Plan(round, after) => (round, after),
        Round::Wait(until) => return plan.wake_at(until),
        Round::None => return,
    };
    let chat_session_id = row.chat_session_id.clone();
    let (command, reason) = match answer {
        Some(answer) => (
            Command::CompleteMessage {
                chat_session_id,
                message_id: id.clone(),
                content: answer.clone(),
            },
            "answered by the agent".to_owned(),
        ),
        None => {
            let reason = row.reason.clone().unwrap_or_else(|| "failed".into());
            let command = Command::FailMessage {
                chat_session_id,
                message_id: id.clone(),
                reason: reason.clone(),
            };
            (command, reason)
        }
    };
    let reason = match after {
        Some(previous) => format!("{reason} (delivery round {}: {previous})", round + 1),
        None => reason,
    };
    plan.because(row.state_seq)
        .plan(round_id(id, round), || command, reason);
}

/// The id of a delivery round of a message's outcome.
type RoundId = fn(&MessageId, u32) -> CommandId;

/// What to do about a message's delivery rounds.
enum Round {
    /// Plan this round; why the previous one ended, if there was one.
    Plan(u32, Option<String>),
    /// Nothing until the previous round's backoff ends, at this time.
    Wait(Millis),
    /// Nothing: a round is open or succeeded, or the rounds are used up.
    None,
}

/// The delivery round to plan now, if any, and why the previous round ended.
fn next_round(
    ledger: &CommandLedger,
    round_id: impl Fn(u32) -> CommandId,
    ctx: &Context,
    policy: &Policy,
) -> Round {
    let mut previous = None;
    for round in 0.. {
        let Some(entry) = ledger.commands.get(&round_id(round)) else {
            return Round::Plan(round, previous);
        };
        if !entry.is_final() || entry.state == CommandState::Succeeded {
            return Round::None;
        }
        // A round that ended "in the future" was logged before the wall clock was stepped
        // back (by an earlier process): count its wait from this process's start instead.
        let ended = match entry.updated_at > ctx.now {
            true => ctx.started_at.min(ctx.now),
            false => entry.updated_at,
        };
        if round + 1 >= policy.max_delivery_rounds {
            return Round::None; // given up: it stays undelivered, in /metrics and /readyz
        }
        let due = ended.saturating_add(policy.delivery_backoff(round + 1));
        if ctx.now < due {
            return Round::Wait(due);
        }
        previous = Some(entry.last_error.clone().unwrap_or_else(|| "gave up".into()));
    }
    Round::None
}

/// A chat session's pending messages: fail the stale and the orphaned, ensure an agent
/// session, then prompt.
fn plan_chat(
    plan: &mut Planner<'_>,
    s: &SessionsView,
    m: &MessagesView,
    chat_id: &ChatSessionId,
    pending: &BTreeSet<MessageId>,
    ctx: &Context,
    policy: &Policy,
) {
    let chat = s.chat.get(chat_id);
    for (message_id, row) in in_written_order(m, pending) {
        let fail_id = ids::fail_message(message_id);
        if plan.known(&fail_id) {
            continue;
        }
        let fail = |plan: &mut Planner<'_>, reason: String| {
            plan.because(row.seen_seq).plan(
                fail_id.clone(),
                || Command::FailMessage {
                    chat_session_id: chat_id.clone(),
                    message_id: message_id.clone(),
                    reason: reason.clone(),
                },
                reason.clone(),
            )
        };
        if row.timestamp.saturating_add(policy.retry_window_ms) < ctx.started_at {
            let minutes = policy.retry_window_ms / 60_000;
            fail(
                plan,
                format!(
                    "still incomplete {minutes} min after it was written when the worker started"
                ),
            );
            continue;
        }
        let deadline = row.seen_at.saturating_add(policy.message_deadline_ms);
        if ctx.now >= deadline {
            let minutes = policy.message_deadline_ms / 60_000;
            fail(plan, format!("no answer within {minutes} min"));
            continue;
        }
        plan.wake_at(deadline);
        let Some(chat) = chat else {
            continue; // its chat session is not listed yet
        };
        match chat.status {
            ChatStatus::Active => {}
            ChatStatus::Deleted => {
                fail(plan, "session deleted".into());
                continue;
            }
            ChatStatus::Failed => {
                fail(plan, "session failed".into());
                continue;
            }
        }
        if !ctx.ready {
            continue;
        }
        let create_id = ids::create_agent_session(chat_id);
        let Some(agent_id) = &chat.agent_session_id else {
            match plan.gave_up(&create_id) {
                Some(error) => fail(plan, format!("no agent session: {error}")),
                None => plan.because(row.seen_seq).plan(
                    create_id,
                    || Command::CreateAgentSession {
                        chat_session_id: chat_id.clone(),
                        title: chat.title.clone(),
                    },
                    format!("message {message_id} needs an agent session"),
                ),
            }
            continue;
        };
        let Some(agent) = s.agent.get(agent_id) else {
            continue; // gone or not listed yet: the deletion rule decides
        };
        let prompting = Prompting {
            chat_id,
            chat,
            agent_id,
            agent,
        };
        plan_prompt(plan, &prompting, message_id, row, ctx, policy);
    }
}

/// Pending messages in the order they were written, never by id: backend ids are random
/// (Convex's, the local inbox's), and the dispatcher prompts a chat's messages in the order
/// planned.
fn in_written_order<'v>(
    m: &'v MessagesView,
    pending: &'v BTreeSet<MessageId>,
) -> Vec<(&'v MessageId, &'v MessageRow)> {
    let mut pending: Vec<(&MessageId, &MessageRow)> = pending
        .iter()
        .filter_map(|id| m.messages.get(id).map(|row| (id, row)))
        .collect();
    pending.sort_by_key(|(id, row)| (row.timestamp, row.seen_seq, *id));
    pending
}

/// The chat session and agent session a message would be prompted in.
struct Prompting<'v> {
    chat_id: &'v ChatSessionId,
    chat: &'v ChatSessionRow,
    agent_id: &'v AgentSessionId,
    agent: &'v AgentSessionRow,
}

/// Prompts a message still waiting for its first (or next) attempt, once the backend holds
/// its chat session's link, or once linking has given up (the answer still matters more than
/// the bookkeeping).
fn plan_prompt(
    plan: &mut Planner<'_>,
    at: &Prompting<'_>,
    message_id: &MessageId,
    row: &MessageRow,
    ctx: &Context,
    policy: &Policy,
) {
    let link_id = ids::link_agent_session(at.chat_id, at.agent_id);
    let linked = at.chat.link_confirmed || plan.gave_up(&link_id).is_some();
    if !linked || row.state != MessageState::Seen {
        return;
    }
    let model = (at.chat.model.as_deref())
        .map(ModelRef::parse)
        .or_else(|| at.agent.model.clone())
        .or_else(|| policy.default_model.clone());
    // Its place in this pass: prompts planned together keep their order in the ids.
    let prompts_planned = plan.out.len() as u64;
    plan.because(row.seen_seq).plan(
        ids::prompt(message_id),
        || Command::Prompt {
            chat_session_id: at.chat_id.clone(),
            agent_session_id: at.agent_id.clone(),
            message_id: message_id.clone(),
            text: row.text.clone().unwrap_or_default(),
            model,
            agent_message_id: Some(ids::agent_message_id(message_id, ctx.now, prompts_planned)),
        },
        "user message has no answer".into(),
    );
}

/// Whether the agent side's latest observation is a failure or a partial listing (none since
/// listed it completely). The dispatcher asks before each deletion's attempt, so a deletion
/// planned from a good listing waits while the agent server fails to answer in full.
pub fn agent_side_failing(s: &SessionsView) -> bool {
    s.listings
        .get(&Source::Agent)
        .is_some_and(ListingState::in_trouble)
}

/// Why `command` no longer serves its purpose, if it does not: checked by the dispatcher before
/// each attempt, so a command planned earlier (or resumed after a restart) never acts on a
/// world that has moved on.
pub fn obsolete(views: &Views, command: &Command) -> Option<String> {
    let s = &views.sessions.state;
    let m = &views.messages.state;
    let ledger = &views.commands.state;
    let message = |id| m.messages.get(id);
    match command {
        Command::Prompt { message_id, .. } => {
            let row = message(message_id)?;
            if !row.state.is_pending() {
                return Some(format!("message is already {:?}", row.state).to_lowercase());
            }
            let fail = ids::fail_message(message_id);
            ledger
                .commands
                .contains_key(&fail)
                .then(|| format!("the message is being failed by {fail}"))
        }
        Command::CompleteMessage { message_id, .. } | Command::FailMessage { message_id, .. } => {
            message(message_id)
                .filter(|row| row.delivered)
                .map(|_| "the backend already holds the message's outcome".to_owned())
        }
        Command::RenameSession {
            chat_session_id,
            title,
        } => {
            let chat = s.chat.get(chat_session_id)?;
            if chat.status != ChatStatus::Active {
                Some(format!("chat session is {:?}", chat.status).to_lowercase())
            } else {
                (&chat.title == title).then(|| "chat session already has that title".to_owned())
            }
        }
        Command::MarkSessionDeleted { chat_session_id } => {
            let chat = s.chat.get(chat_session_id)?;
            if chat.status != ChatStatus::Active {
                return Some(format!("chat session is already {:?}", chat.status).to_lowercase());
            }
            // Planned on a listing that missed it, then listed again (a wiped server restored,
            // a listing that raced a restart): the session is not gone.
            let agent = chat.agent_session_id.as_ref()?;
            s.agent
                .contains_key(agent)
                .then(|| format!("agent session {agent} is listed again"))
        }
        Command::MarkSessionFailed {
            chat_session_id, ..
        } => s
            .chat
            .get(chat_session_id)
            .filter(|c| c.status != ChatStatus::Active)
            .map(|c| format!("chat session is already {:?}", c.status).to_lowercase()),
        Command::CreateAgentSession {
            chat_session_id, ..
        } => s
            .chat
            .get(chat_session_id)
            .and_then(|c| c.agent_session_id.as_ref())
            .map(|a| format!("chat session already has agent session {a}")),
        Command::AbortAgentSession { agent_session_id } => match s.agent.get(agent_session_id) {
            None => Some("agent session is gone".into()),
            Some(a) if a.busy_since.is_none() => Some("agent session is no longer busy".into()),
            Some(_) => None,
        },
        Command::CreateSession { .. } | Command::LinkAgentSession { .. } => None,
    }
}

#[cfg(test)]
mod tests;
