//! Retention: which final rows may leave the live views, decided purely from the views.
//!
//! Guarantees (the argument, per command kind, is in `docs/architecture.md`, "Retention"):
//! - only final rows leave: a final ledger entry, a user message whose outcome the backend
//!   holds, a deleted or failed chat session whose agent session is gone; each final before
//!   the sweep's `before` (its time minus the horizon, earlier while the message feed lags);
//! - a ledger entry leaves only when the reconciler, on any later views, can never plan its
//!   id again: its purpose is over (the message final and delivered, the chat session final
//!   or gone, the agent session gone, the agent title it mirrored replaced), so the ledger's
//!   "already planned" set loses nothing it still needs;
//! - a row that an open command still acts on stays, so no command runs against a row the
//!   views forgot;
//! - a row that left is not brought back by observing it again (`observe` ignores an unknown
//!   final row from before `swept_before`), so nothing leads to planning its purpose again.
//!
//! The worker calls [`sweep`] on a slow schedule and appends what it returns as one
//! `retention_swept`: the projections drop what it names, and a replay drops the same.

use std::collections::HashSet;

use super::ids::{self, Purpose};
use crate::clock::Millis;
use crate::events::{
    AgentSessionId, ChatSessionId, ChatStatus, CommandId, MessageId, RetentionSwept,
};
use crate::projections::{CommandLedger, LedgerEntry, MessagesView, SessionsView, Views};

/// One day in milliseconds.
pub const DAY_MS: Millis = 24 * 60 * 60 * 1000;

/// How long final rows stay in the live views, and how often the worker sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Final rows stay at least this long after their final moment (`--retention-days`,
    /// default 7 days). The backend must keep applied command ids at least as long.
    pub horizon_ms: Millis,
    /// How often the worker sweeps (default hourly; the first sweep comes once Ready).
    pub every_ms: Millis,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            horizon_ms: 7 * DAY_MS,
            every_ms: 60 * 60 * 1000,
        }
    }
}

/// The most rows one sweep names: the first sweep of a long-lived data directory finds its
/// whole history final, and one event naming a million ids would be tens of megabytes. A sweep
/// that names this many is followed by another at the worker's next turn. Any subset of the
/// rows that may go is safe to drop: each row's rule reads the views, never the other rows of
/// the same sweep.
pub const MAX_ROWS_PER_SWEEP: usize = 10_000;

/// What open commands still act on: their rows must stay.
#[derive(Default)]
struct InUse<'a> {
    chats: HashSet<&'a ChatSessionId>,
    messages: HashSet<&'a MessageId>,
}

impl<'a> InUse<'a> {
    fn new(ledger: &'a CommandLedger) -> Self {
        let mut used = InUse::default();
        for (_, entry) in ledger.open() {
            if let Some(command) = entry.command() {
                let r = command.subject_refs();
                used.chats.extend(r.chat_session_id);
                used.messages.extend(r.message_id);
            }
        }
        used
    }
}

/// What a sweep cannot see in memory: whether a chat session's row is on disk, in a settled
/// pair away from memory (`log::rows`). Such a row is present and active: an entry whose
/// purpose reads it stays. Implemented by the worker over its rows tree. (An agent session's
/// row on disk needs no look: see `createSession` in `entry_leaves`.)
pub trait AwayRows {
    /// Whether chat session `id` is on disk.
    fn chat(&self, id: &ChatSessionId) -> bool;
}

/// Every row in memory: views built whole (tests, tools).
pub struct NothingAway;

impl AwayRows for NothingAway {
    fn chat(&self, _: &ChatSessionId) -> bool {
        false
    }
}

/// The sweep due at `now`, if it drops anything: the final rows older than `before` =
/// `min(now, messages_read_at) - horizon`. `messages_read_at` is when the message feed last
/// read to its end: every message not yet read was written after it, so after `before`, and
/// `observe` never takes one for a row that left (see the module's guarantees).
pub fn sweep(
    views: &Views,
    now: Millis,
    messages_read_at: Millis,
    policy: &RetentionPolicy,
    away: &dyn AwayRows,
) -> Option<RetentionSwept> {
    let before = now.min(messages_read_at).saturating_sub(policy.horizon_ms);
    let s = &views.sessions.state;
    let m = &views.messages.state;
    let ledger = &views.commands.state;
    let used = InUse::new(ledger);
    let chats: Vec<ChatSessionId> = s
        .chat
        .iter()
        .filter(|(id, _)| chat_leaves(s, m, &used, id, before))
        .map(|(id, _)| id.clone())
        .take(MAX_ROWS_PER_SWEEP)
        .collect();
    let messages: Vec<MessageId> = m
        .messages
        .keys()
        .filter(|id| message_leaves(m, ledger, &used, id, before))
        .take(MAX_ROWS_PER_SWEEP - chats.len())
        .cloned()
        .collect();
    let commands: Vec<CommandId> = ledger
        .commands
        .iter()
        .filter(|(id, e)| entry_leaves(s, m, id, e, before, away))
        .map(|(id, _)| id.clone())
        .take(MAX_ROWS_PER_SWEEP - chats.len() - messages.len())
        .collect();
    let tombstones = s.agent_gone.values().chain(s.chat_gone.values());
    let old_tombstones = tombstones.into_iter().any(|&(_, at)| at < before);
    if chats.is_empty() && messages.is_empty() && commands.is_empty() && !old_tombstones {
        return None;
    }
    Some(RetentionSwept {
        horizon_ms: policy.horizon_ms,
        before,
        commands,
        messages,
        chats,
    })
}

/// A deleted or failed chat session leaves once it went final (and was last active, by the
/// backend's clock) before `before`, its agent session is gone for good (so no agent session
/// is left without the chat session that stops `createSession` for it), no open command names
/// it and no message of it is pending.
fn chat_leaves(
    s: &SessionsView,
    m: &MessagesView,
    used: &InUse<'_>,
    id: &ChatSessionId,
    before: Millis,
) -> bool {
    let Some(c) = s.chat.get(id) else {
        return false;
    };
    let agent_gone = |a: &AgentSessionId| !s.agent.contains_key(a) && !s.agent_gone.contains_key(a);
    c.status != ChatStatus::Active
        && c.status_at < before
        && c.last_activity < before
        && c.agent_session_id.as_ref().is_none_or(agent_gone)
        && !used.chats.contains(id)
        && !m.pending_by_chat.contains_key(id)
}

/// A user message leaves once it is final and delivered (the backend holds its outcome),
/// both written and last changed before `before`, and no open command acts on it.
fn message_leaves(
    m: &MessagesView,
    ledger: &CommandLedger,
    used: &InUse<'_>,
    id: &MessageId,
    before: Millis,
) -> bool {
    let Some(row) = m.messages.get(id) else {
        return false;
    };
    let open = |cid: &CommandId| ledger.commands.get(cid).is_some_and(|e| !e.is_final());
    !row.state.is_pending()
        && row.delivered
        && row.updated_at < before
        && row.timestamp < before
        && !used.messages.contains(id)
        && !open(&ids::prompt(id))
}

/// A final ledger entry leaves once its purpose is over for good: the condition under which
/// the reconciler plans its id can no longer arise (the argument per kind is in the docs).
/// An id of no known form stays.
fn entry_leaves(
    s: &SessionsView,
    m: &MessagesView,
    id: &CommandId,
    e: &LedgerEntry,
    before: Millis,
    away: &dyn AwayRows,
) -> bool {
    if !e.is_final() || e.updated_at >= before {
        return false;
    }
    let active = |c: &ChatSessionId| s.chat.get(c).filter(|c| c.status == ChatStatus::Active);
    match ids::purpose(id) {
        None => false,
        // Planned for an agent session no chat session links to, and never again once its
        // row records it (`mirror_planned`, folded from this entry's own `command_planned`):
        // that row, not the entry, stops a second one if the chat session vanishes from the
        // backend. A row not in memory is gone, or away on disk, where it went from memory
        // after that event was folded, so carrying the mark.
        Some(Purpose::CreateSession(a)) => s.agent.get(&a).is_none_or(|row| row.mirror_planned),
        // Planned while the agent title at `seq` differs from an active chat's title. Kept
        // while that title stands, even once mirrored: a person may rename the chat session
        // afterwards, and the entry is what keeps their title.
        Some(Purpose::RenameSession(c, seq)) => {
            // On disk: its title stands or not, unknown here; the entry stays.
            if away.chat(&c) {
                return false;
            }
            let stands = active(&c).is_some_and(|chat| {
                let agent = chat.agent_session_id.as_ref().and_then(|a| s.agent.get(a));
                agent.is_some_and(|a| a.title_seq == seq)
            });
            !stands
        }
        // Planned only for an active chat session; final is final.
        Some(Purpose::MarkSessionDeleted(c)) | Some(Purpose::MarkSessionFailed(c)) => {
            active(&c).is_none()
        }
        // Planned while the agent session has been busy since `since`.
        Some(Purpose::AbortAgentSession(a, since)) => s
            .agent
            .get(&a)
            .is_none_or(|row| row.busy_since != Some(since)),
        // Planned (and its giving up read) while an active chat session has no agent session.
        Some(Purpose::CreateAgentSession(c)) => {
            active(&c).is_none_or(|chat| chat.agent_session_id.is_some())
        }
        // Planned (and its giving up read) while an active chat session's link is unconfirmed.
        Some(Purpose::LinkAgentSession(c, _)) => active(&c).is_none_or(|chat| chat.link_confirmed),
        // Planned only for a pending message; a message with a final prompt never is again.
        Some(Purpose::Prompt(msg)) => m.messages.get(&msg).is_none_or(|r| !r.state.is_pending()),
        // Every round is read while the outcome is undelivered (`next_round` walks them).
        Some(Purpose::Deliver(msg)) => {
            !m.undelivered.contains_key(&msg)
                && m.messages.get(&msg).is_none_or(|r| !r.state.is_pending())
        }
    }
}
