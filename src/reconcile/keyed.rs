//! Planning by key, as kube-runtime's controller does: an event names the keys it touches
//! ([`Key`], `Event::keys`), those keys and the keys that read the rows they name
//! ([`dependents`]) are marked dirty, and a turn plans only its dirty keys ([`reconcile_keys`]).
//! What a key plans depends only on its own rows, the rows the index links to it, the ledger
//! entries of its commands, and the time: so planning every key adds up to the full
//! [`reconcile`](super::reconcile), and an event changes what only its dirty keys plan (both
//! are property tests). Decisions that fall due with time (a stale busy session, a message's
//! deadline, a delivery round's backoff) ask for their key again at that time
//! ([`KeyedPlan::requeue`]), kept by the [`Scheduler`]: earliest time wins, one entry per key.
//!
//! A turn's cost is that of its dirty keys: an agent session and its chat sessions, a chat
//! session and its pending messages, a message and its rounds, and the deletion pass over the
//! orphaned chat sessions only (`SessionIndex::orphans`).

use std::collections::{BTreeSet, HashMap};

use super::{
    listed_in_this_process, plan_agent, plan_chat, plan_deletions, plan_outcome, Context, Planned,
    Planner, Policy,
};
use crate::clock::Millis;
use crate::events::{AgentSessionId, ChatSessionId, ChatStatus, Key};
use crate::projections::{ChatSessionRow, SessionsView, Views};

/// What planning some keys decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyedPlan {
    /// The commands to plan, each not yet in the ledger.
    pub planned: Vec<Planned>,
    /// Keys to plan again at a time, with no event: when their earliest time-based decision
    /// falls due.
    pub requeue: Vec<(Key, Millis)>,
}

/// Plans one key.
pub fn reconcile_key(key: &Key, views: &Views, ctx: &Context, policy: &Policy) -> KeyedPlan {
    reconcile_keys([key], views, ctx, policy)
}

/// Plans the given keys, in the order given (a `BTreeSet`'s order is the full pass's: agent
/// sessions, deletions, outcomes, chat sessions), skipping a command another key of the same
/// call already planned.
pub fn reconcile_keys<'k>(
    keys: impl IntoIterator<Item = &'k Key>,
    views: &Views,
    ctx: &Context,
    policy: &Policy,
) -> KeyedPlan {
    let mut plan = Planner::new(&views.commands.state);
    let s = &views.sessions.state;
    let m = &views.messages.state;
    let listed = listed_in_this_process(s, ctx.process_seq);
    let mut requeue = Vec::new();
    for key in keys {
        plan.wake = None;
        match key {
            Key::Agent(id) if listed => {
                if let Some(agent) = s.agent.get(id) {
                    plan_agent(&mut plan, s, id, agent, linked_chat(s, id), ctx, policy);
                }
            }
            Key::Deletions if listed => {
                plan_deletions(&mut plan, s, orphans(s), ctx, policy);
            }
            Key::Message(id) => {
                if m.undelivered.contains_key(id) {
                    plan_outcome(&mut plan, m, id, ctx, policy);
                }
            }
            Key::Chat(id) => {
                if let Some(pending) = m.pending_by_chat.get(id) {
                    plan_chat(&mut plan, s, m, id, pending, ctx, policy);
                }
            }
            Key::Agent(_) | Key::Deletions => {}
        }
        if let Some(at) = plan.wake {
            requeue.push((key.clone(), at));
        }
    }
    KeyedPlan {
        planned: plan.out,
        requeue,
    }
}

/// The chat session an agent session's planning reads: the first active one linked to it, else
/// the first (by id), as the full pass's index picks.
fn linked_chat<'v>(
    s: &'v SessionsView,
    agent: &AgentSessionId,
) -> Option<(&'v ChatSessionId, &'v ChatSessionRow)> {
    let chats = s.index.chats_by_agent.get(agent)?;
    let rows = || chats.iter().filter_map(|c| s.chat.get_key_value(c));
    rows()
        .find(|(_, row)| row.status == ChatStatus::Active)
        .or_else(|| rows().next())
}

/// The active chat sessions linked to an absent agent session, from the index.
fn orphans(
    s: &SessionsView,
) -> impl Iterator<Item = (&AgentSessionId, &ChatSessionId, &ChatSessionRow)> {
    s.index.orphans.iter().filter_map(|c| {
        let (id, row) = s.chat.get_key_value(c)?;
        Some((row.agent_session_id.as_ref()?, id, row))
    })
}

/// Every key of the views: what a full pass plans (at the start of a process and on Ready).
pub fn all_keys(views: &Views) -> BTreeSet<Key> {
    let s = &views.sessions.state;
    let m = &views.messages.state;
    let mut keys: BTreeSet<Key> = s.agent.keys().cloned().map(Key::Agent).collect();
    keys.insert(Key::Deletions);
    keys.extend(m.undelivered.keys().cloned().map(Key::Message));
    keys.extend(m.pending_by_chat.keys().cloned().map(Key::Chat));
    keys
}

/// The keys whose planning reads the rows `key` names, besides `key` itself: an agent
/// session's linked chat sessions, and the deletion pass when one of them is an orphan; a chat
/// session's agent sessions (linked or made for it), its pending messages (ending it ends them),
/// and the deletion pass when it is an orphan; a message's chat session. The worker asks both before and after folding an event in, so a
/// link that moved dirties both ends.
pub fn dependents(key: &Key, views: &Views) -> Vec<Key> {
    let s = &views.sessions.state;
    let m = &views.messages.state;
    let mut out = Vec::new();
    match key {
        Key::Agent(a) => {
            let chats = s.index.chats_by_agent.get(a).into_iter().flatten();
            let mut orphaned = false;
            for c in chats {
                orphaned |= s.index.orphans.contains(c);
                out.push(Key::Chat(c.clone()));
            }
            // Its presence decides deletions only for the chat sessions it orphans (after it
            // went) or orphaned (before it came back).
            if orphaned {
                out.push(Key::Deletions);
            }
        }
        Key::Chat(c) => {
            let linked = s.chat.get(c).and_then(|r| r.agent_session_id.clone());
            out.extend(linked.map(Key::Agent));
            let tagged = s.index.agents_by_tag.get(c).into_iter().flatten();
            out.extend(tagged.cloned().map(Key::Agent));
            let pending = m.pending_by_chat.get(c).into_iter().flatten();
            out.extend(pending.cloned().map(Key::Message));
            // An orphan before or after: a candidate came or went, or changed (the active
            // count's changes name the pass themselves, `Event::keys`).
            if s.index.orphans.contains(c) {
                out.push(Key::Deletions);
            }
        }
        Key::Message(id) => {
            let chat = m.messages.get(id).map(|r| r.chat_session_id.clone());
            out.extend(chat.map(Key::Chat));
        }
        Key::Deletions => {}
    }
    out
}

/// The dirty keys of the next turn and the keys due again at a time: kube-runtime's scheduler,
/// pure (time is passed in). A key asked for twice is kept once, at the earlier time; planning
/// a key replaces its timer with what that planning asks for.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    dirty: BTreeSet<Key>,
    everything: bool,
    timers: BTreeSet<(Millis, Key)>,
    due: HashMap<Key, Millis>,
}

impl Scheduler {
    /// Marks a key dirty: the next turn plans it.
    pub fn mark(&mut self, key: Key) {
        if !self.everything {
            self.dirty.insert(key);
        }
    }

    /// Marks every key dirty (the process's first turn, and Ready): the next turn is a full pass.
    pub fn mark_everything(&mut self) {
        self.everything = true;
        self.dirty.clear();
    }

    /// Marks the keys `key` names and their dependents, as `views` stand.
    pub fn mark_with_dependents(&mut self, key: &Key, views: &Views) {
        if self.everything {
            return;
        }
        for k in dependents(key, views) {
            self.dirty.insert(k);
        }
        self.dirty.insert(key.clone());
    }

    /// Runs `key` again at `at`, unless it is already due earlier.
    pub fn requeue(&mut self, key: Key, at: Millis) {
        match self.due.get(&key) {
            Some(&t) if t <= at => {}
            Some(&t) => {
                self.timers.remove(&(t, key.clone()));
                self.timers.insert((at, key.clone()));
                self.due.insert(key, at);
            }
            None => {
                self.timers.insert((at, key.clone()));
                self.due.insert(key, at);
            }
        }
    }

    /// The keys to plan now: the dirty ones and those due by `now`, each once; their timers
    /// are dropped (planning them asks again for what it still needs).
    pub fn take(&mut self, views: &Views, now: Millis) -> BTreeSet<Key> {
        let mut keys = match std::mem::take(&mut self.everything) {
            true => all_keys(views),
            false => std::mem::take(&mut self.dirty),
        };
        self.dirty.clear();
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let (_, key) = self.timers.pop_first().expect("first");
            self.due.remove(&key);
            keys.insert(key);
        }
        for key in &keys {
            if let Some(t) = self.due.remove(key) {
                self.timers.remove(&(t, key.clone()));
            }
        }
        keys
    }

    /// When the next timer falls due, if any.
    pub fn next_due(&self) -> Option<Millis> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Keys waiting for a timer.
    pub fn timers(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(id: &str) -> Key {
        Key::Chat(id.into())
    }

    #[test]
    fn a_key_asked_for_twice_keeps_the_earlier_time() {
        let views = Views::default();
        let mut s = Scheduler::default();
        s.requeue(chat("c1"), 500);
        s.requeue(chat("c1"), 900);
        s.requeue(chat("c1"), 300);
        assert_eq!((s.next_due(), s.timers()), (Some(300), 1));
        assert!(s.take(&views, 299).is_empty(), "not due yet");
        assert_eq!(s.take(&views, 300), BTreeSet::from([chat("c1")]));
        assert!(
            s.take(&views, 10_000).is_empty(),
            "once, not at every time asked"
        );
    }

    #[test]
    fn a_dirty_key_runs_once_and_its_timer_goes_with_it() {
        let views = Views::default();
        let mut s = Scheduler::default();
        s.requeue(chat("c1"), 1_000);
        s.requeue(chat("c2"), 2_000);
        s.mark(chat("c1"));
        s.mark(chat("c1"));
        assert_eq!(s.take(&views, 0), BTreeSet::from([chat("c1")]));
        // Planning c1 asked again for what it still needs; its old timer is gone.
        assert_eq!((s.next_due(), s.timers()), (Some(2_000), 1));
    }
}
