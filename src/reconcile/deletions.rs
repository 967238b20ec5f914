//! The bound on deletions: one complete agent listing may mark at most a share of the active
//! chat sessions deleted. A listing that calls for more is held, not obeyed, and its deletions
//! proceed only when a later complete listing, at least a wait after the hold, still calls for
//! them: an agent server whose storage was wiped lists zero sessions, completely and
//! successfully, and must not take every chat session with it.

use super::Policy;
use crate::clock::Millis;
use crate::events::{AgentSessionId, ChatStatus, DeletionHoldLifted, DeletionsHeld, Event, Source};
use crate::projections::{ChatSessionRow, SessionsView, Views};

/// The seq of the last complete agent listing, unless an agent observation failed since:
/// the only listing absences may be derived from.
pub(super) fn trusted_agent_listing(s: &SessionsView) -> Option<u64> {
    let listing = s.listings.get(&Source::Agent)?;
    let complete_seq = listing.last_complete_seq?;
    if listing.in_trouble() {
        return None;
    }
    Some(complete_seq)
}

/// Whether `chat` is to be marked deleted: active, linked to `agent`, which the view no
/// longer holds, by a link older than the complete listing at `complete_seq`.
pub(super) fn deletable(
    s: &SessionsView,
    agent: &AgentSessionId,
    chat: &ChatSessionRow,
    complete_seq: u64,
) -> bool {
    chat.status == ChatStatus::Active
        && chat.linked_seq.unwrap_or(chat.first_seq) < complete_seq
        && chat.first_seq < complete_seq
        && !s.agent.contains_key(agent)
}

/// Whether `n` deletions are more than one listing may cause (the active sessions counted by
/// the view's index).
pub(super) fn over_limit(s: &SessionsView, policy: &Policy, n: usize) -> bool {
    n > policy.deletion_limit_min && n > deletion_limit(s.index.active_chats, policy)
}

/// How many chat sessions one listing may mark deleted, of `active` active ones.
fn deletion_limit(active: usize, policy: &Policy) -> usize {
    (active.saturating_mul(policy.deletion_limit_percent as usize) / 100)
        .max(policy.deletion_limit_min)
}

/// Whether the held deletions are confirmed: a complete agent listing after the held one
/// ended at least the policy's wait after the hold, *and* after this process started
/// (`process_start`). Event times are steady within one process (the worker's clock follows
/// the monotonic clock), but a hold recorded by an earlier process is in that process's wall
/// time, which may have been stepped since: the wait is then counted again in this one.
pub(super) fn hold_confirmed(s: &SessionsView, policy: &Policy, process_start: Millis) -> bool {
    let (Some(hold), Some(listing)) = (&s.deletion_hold, s.listings.get(&Source::Agent)) else {
        return false;
    };
    let later = listing
        .last_complete_seq
        .is_some_and(|seq| seq > hold.listing_seq);
    let waited = listing.last_complete_at.is_some_and(|at| {
        let from = hold.at.max(process_start);
        at >= from.saturating_add(policy.deletion_confirm_ms)
    });
    later && waited
}

/// A change to the hold on deletions, for the worker to append as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldChange {
    /// The last complete agent listing calls for more deletions than the limit, and nothing
    /// is held: hold them (`deletions_held`).
    Held(DeletionsHeld),
    /// A hold whose deletions are within the limit again: lift it (`deletion_hold_lifted`).
    Lifted(DeletionHoldLifted),
}

impl From<HoldChange> for Event {
    fn from(change: HoldChange) -> Event {
        match change {
            HoldChange::Held(b) => Event::DeletionsHeld(b),
            HoldChange::Lifted(b) => Event::DeletionHoldLifted(b),
        }
    }
}

/// Whether the deletions of the last complete agent listing are to be held, or a hold lifted.
/// Pure, like [`reconcile`](super::reconcile): the worker calls it each turn, before planning,
/// and appends what it returns, so the hold (its listing and time) is in the log and survives
/// restarts and rebuilds. While a hold stands, more deletions than the limit wait for a
/// complete listing that ends at least [`Policy::deletion_confirm_ms`] after it and still calls
/// for them; the hold is lifted once the deletions called for are within the limit (the
/// sessions came back, or the confirmed deletions were carried out), so an old hold never
/// confirms a new wipe.
pub fn deletion_hold(views: &Views, policy: &Policy) -> Option<HoldChange> {
    let s = &views.sessions.state;
    // The chat sessions are known once the backend has been listed completely.
    let backend = s.listings.get(&Source::Backend);
    backend.and_then(|l| l.last_complete_seq)?;
    let listing_seq = trusted_agent_listing(s)?;
    // Only orphans (active, linked to an absent agent session) can be deletable: the index
    // keeps them, so this reads them and not every chat session.
    let candidates = s
        .index
        .orphans
        .iter()
        .filter_map(|c| s.chat.get(c))
        .filter(|chat| {
            let agent = chat.agent_session_id.as_ref();
            agent.is_some_and(|a| deletable(s, a, chat, listing_seq))
        })
        .count();
    let limit = deletion_limit(s.index.active_chats, policy);
    let (candidates_n, limit_n) = (candidates as u64, limit as u64);
    match &s.deletion_hold {
        None if candidates > limit => Some(HoldChange::Held(DeletionsHeld {
            listing_seq,
            candidates: candidates_n,
            limit: limit_n,
        })),
        Some(hold) if candidates <= limit => Some(HoldChange::Lifted(DeletionHoldLifted {
            held_listing_seq: hold.listing_seq,
            listing_seq,
            candidates: candidates_n,
            limit: limit_n,
        })),
        _ => None,
    }
}
