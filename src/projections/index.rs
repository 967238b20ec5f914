//! The sessions view's indexes: what a per-key reconciliation looks up instead of scanning.
//!
//! Kept by the fold, event by event, from the rows each event may change, so that they always
//! equal what [`SessionIndex::build`] derives from the rows (a property test checks it); not stored in
//! checkpoints (rebuilt when one is loaded, [`Projection::loaded`](super::Projection::loaded)).

use std::collections::BTreeSet;

use rustc_hash::{FxHashMap, FxHashSet};

use super::SessionsView;
use crate::events::{AgentSessionId, ChatSessionId, ChatStatus, Effect, Event};

/// Lookups over the sessions view's rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionIndex {
    /// The chat sessions linked to each agent session (whether or not it exists). Hashed, not
    /// ordered: only ever looked up, and at 1,000,000 sessions an ordered map of string keys
    /// cost seconds to build at every start.
    pub chats_by_agent: FxHashMap<AgentSessionId, BTreeSet<ChatSessionId>>,
    /// The agent sessions in view our `createAgentSession` made for each chat session.
    pub agents_by_tag: FxHashMap<ChatSessionId, BTreeSet<AgentSessionId>>,
    /// Active chat sessions linked to an agent session not in view: where deletions come from,
    /// so the deletion pass reads only these.
    pub orphans: BTreeSet<ChatSessionId>,
    /// How many chat sessions are active (the deletion limit is a share of them).
    pub active_chats: usize,
    /// Agent sessions busy now: whether the observers poll fast, without a scan.
    pub busy: BTreeSet<AgentSessionId>,
}

/// What an event may change in the index, read before it is folded in.
pub(super) struct Before {
    chats: Vec<(ChatSessionId, Option<AgentSessionId>, bool)>,
    agents: Vec<(AgentSessionId, Option<ChatSessionId>)>,
}

impl SessionIndex {
    /// The index of `s`'s rows, from scratch: it runs at every start, so it reads each row
    /// once, in order, and looks up only in hash tables (random lookups in the views' ordered
    /// maps cost seconds at 1,000,000 sessions).
    pub fn build(s: &SessionsView) -> SessionIndex {
        let agents: FxHashSet<&AgentSessionId> = s.agent.keys().collect();
        let mut links: Vec<(&AgentSessionId, &ChatSessionId)> = Vec::new();
        let mut orphans = Vec::new();
        let mut active_chats = 0;
        for (id, row) in &s.chat {
            let active = row.status == ChatStatus::Active;
            active_chats += usize::from(active);
            if let Some(agent) = &row.agent_session_id {
                links.push((agent, id));
                if active && !agents.contains(agent) {
                    orphans.push(id.clone());
                }
            }
        }
        let mut tags: Vec<(&ChatSessionId, &AgentSessionId)> = Vec::new();
        let mut busy = Vec::new();
        for (id, row) in &s.agent {
            if let Some(chat) = &row.created_for {
                tags.push((chat, id));
            }
            if row.busy_since.is_some() {
                busy.push(id.clone());
            }
        }
        SessionIndex {
            chats_by_agent: grouped(links),
            agents_by_tag: grouped(tags),
            orphans: orphans.into_iter().collect(),
            active_chats,
            busy: busy.into_iter().collect(),
        }
    }

    /// A settled pair read back into memory (`SessionsView::wake`): its links and tag enter
    /// the index. Not counted in `active_chats`, which counts it while it is away too.
    pub(super) fn woke(
        &mut self,
        agent: &AgentSessionId,
        chat: &ChatSessionId,
        tag: Option<&ChatSessionId>,
    ) {
        self.link(chat, agent);
        if let Some(tag) = tag {
            self.tag(tag, agent);
        }
    }

    /// A settled pair left memory (`SessionsView::evict`): its links and tag leave the index;
    /// still counted in `active_chats` (it is active, only not resident).
    pub(super) fn evicted(
        &mut self,
        agent: &AgentSessionId,
        chat: &ChatSessionId,
        tag: Option<&ChatSessionId>,
    ) {
        self.unlink(chat, agent);
        if let Some(tag) = tag {
            self.untag(tag, agent);
        }
    }

    fn link(&mut self, chat: &ChatSessionId, agent: &AgentSessionId) {
        let chats = self.chats_by_agent.entry(agent.clone()).or_default();
        chats.insert(chat.clone());
    }

    fn unlink(&mut self, chat: &ChatSessionId, agent: &AgentSessionId) {
        if let Some(chats) = self.chats_by_agent.get_mut(agent) {
            chats.remove(chat);
            if chats.is_empty() {
                self.chats_by_agent.remove(agent);
            }
        }
    }

    /// Whether `chat` is an orphan: active and linked to an agent session not in view.
    fn refresh_orphan(&mut self, s: &SessionsView, chat: &ChatSessionId) {
        let orphan = s.chat.get(chat).is_some_and(|row| {
            row.status == ChatStatus::Active
                && row
                    .agent_session_id
                    .as_ref()
                    .is_some_and(|a| !s.agent.contains_key(a))
        });
        if orphan {
            self.orphans.insert(chat.clone());
        } else {
            self.orphans.remove(chat);
        }
    }

    fn tag(&mut self, chat: &ChatSessionId, agent: &AgentSessionId) {
        let agents = self.agents_by_tag.entry(chat.clone()).or_default();
        agents.insert(agent.clone());
    }

    fn untag(&mut self, chat: &ChatSessionId, agent: &AgentSessionId) {
        if let Some(agents) = self.agents_by_tag.get_mut(chat) {
            agents.remove(agent);
            if agents.is_empty() {
                self.agents_by_tag.remove(chat);
            }
        }
    }

    /// The links and tags of the rows `event` may change, before it is folded in.
    pub(super) fn before(s: &SessionsView, event: &Event) -> Before {
        let (chat, agent) = touched(event);
        // A sweep drops many (final) chat sessions at once: each leaves the index.
        let swept = match event {
            Event::RetentionSwept(b) => &b.chats[..],
            _ => &[],
        };
        let chats = chat.into_iter().chain(swept).map(|c| {
            let row = s.chat.get(c);
            let link = row.and_then(|r| r.agent_session_id.clone());
            let active = row.is_some_and(|r| r.status == ChatStatus::Active);
            (c.clone(), link, active)
        });
        let agents = agent.into_iter().map(|a| {
            let tag = s.agent.get(a).and_then(|r| r.created_for.clone());
            (a.clone(), tag)
        });
        Before {
            chats: chats.collect(),
            agents: agents.collect(),
        }
    }

    /// Brings the index in step with the rows named in `before`, now that the event is in.
    pub(super) fn after(&mut self, s: &SessionsView, before: Before) {
        for (chat, old, was_active) in before.chats {
            let row = s.chat.get(&chat);
            let new = row.and_then(|r| r.agent_session_id.as_ref());
            if old.as_ref() != new {
                if let Some(old) = &old {
                    self.unlink(&chat, old);
                }
                if let Some(new) = new {
                    self.link(&chat, new);
                }
            }
            let active = row.is_some_and(|r| r.status == ChatStatus::Active);
            self.active_chats = self.active_chats + usize::from(active) - usize::from(was_active);
            self.refresh_orphan(s, &chat);
        }
        for (agent, old_tag) in before.agents {
            let row = s.agent.get(&agent);
            if row.is_some_and(|r| r.busy_since.is_some()) {
                self.busy.insert(agent.clone());
            } else {
                self.busy.remove(&agent);
            }
            let linked: Vec<ChatSessionId> = self
                .chats_by_agent
                .get(&agent)
                .map(|c| c.iter().cloned().collect())
                .unwrap_or_default();
            for chat in &linked {
                self.refresh_orphan(s, chat);
            }
            let new_tag = row.and_then(|r| r.created_for.as_ref());
            if old_tag.as_ref() != new_tag {
                if let Some(old) = &old_tag {
                    self.untag(old, &agent);
                }
            }
            if let Some(new) = new_tag {
                self.tag(new, &agent);
            }
        }
    }
}

/// The chat session and the agent session whose rows `event` may change (at most one each).
pub(super) fn touched(event: &Event) -> (Option<&ChatSessionId>, Option<&AgentSessionId>) {
    match event {
        Event::AgentSessionSeen(b) | Event::AgentSessionChanged(b) => {
            (None, Some(&b.agent_session_id))
        }
        Event::AgentSessionGone(b) => (None, Some(&b.agent_session_id)),
        Event::AgentSessionStatus(b) => (None, Some(&b.agent_session_id)),
        Event::BackendSessionSeen(b) | Event::BackendSessionChanged(b) => {
            (Some(&b.chat_session_id), None)
        }
        Event::BackendSessionGone(b) => (Some(&b.chat_session_id), None),
        Event::CommandSucceeded(b) => match &b.effect {
            Effect::ChatSessionCreated {
                chat_session_id, ..
            }
            | Effect::AgentSessionLinked {
                chat_session_id, ..
            }
            | Effect::SessionDeleted { chat_session_id }
            | Effect::SessionFailed {
                chat_session_id, ..
            } => (Some(chat_session_id), None),
            Effect::AgentSessionCreated {
                chat_session_id,
                agent_session_id,
                ..
            } => (Some(chat_session_id), Some(agent_session_id)),
            Effect::SessionRenamed { .. }
            | Effect::PromptAnswered { .. }
            | Effect::MessageCompleted { .. }
            | Effect::MessageFailed { .. }
            | Effect::AgentSessionAborted { .. } => (None, None),
        },
        _ => (None, None),
    }
}

/// `pairs` as a map from each first element to the set of its second ones.
fn grouped<K: Eq + std::hash::Hash + Clone, V: Ord + Clone>(
    pairs: Vec<(&K, &V)>,
) -> FxHashMap<K, BTreeSet<V>> {
    let mut out: FxHashMap<K, BTreeSet<V>> = FxHashMap::default();
    out.reserve(pairs.len());
    for (k, v) in pairs {
        out.entry(k.clone()).or_default().insert(v.clone());
    }
    out
}
