//! Settled pairs: linked sessions that plan nothing, whatever the time or the context, until
//! an event names them. They are what may leave memory (`log::rows`): a worker holding a
//! million sessions of which a hundred are active keeps the hundred.
//!
//! A pair (agent session A, chat session C) is settled when every key that reads either row
//! plans nothing and asks for no time:
//! - C is active, linked to A and the link is confirmed; C is the only chat session linked to
//!   A, and no agent session other than A was made for C (so no other key's planning reads
//!   C or A: `linked_chat`, `adopt`, the deletion pass's orphans);
//! - the titles agree, A is idle (no stale-busy timer), and A was made for C or for nothing;
//! - C has no pending message, and no open command names A or C (so the dispatcher reads
//!   neither row).
//!
//! The claim "a settled pair plans nothing" is a property test (`proptests/keyed.rs`): over
//! generated histories, evicting every settled pair leaves the full pass's plan unchanged.

use std::collections::HashSet;

use crate::events::{AgentSessionId, AgentStatus, ChatSessionId, ChatStatus};
use crate::projections::Views;

/// The settled pairs of `views`, by agent session id.
pub fn settled_pairs(views: &Views) -> Vec<(AgentSessionId, ChatSessionId)> {
    let s = &views.sessions.state;
    let m = &views.messages.state;
    let mut busy_agents: HashSet<&AgentSessionId> = HashSet::new();
    let mut busy_chats: HashSet<&ChatSessionId> = HashSet::new();
    for (_, entry) in views.commands.state.open() {
        let Some(command) = entry.command() else {
            // Open without its command: nothing can be said of what it touches.
            return Vec::new();
        };
        let r = command.subject_refs();
        busy_agents.extend(r.agent_session_id);
        busy_chats.extend(r.chat_session_id);
    }
    let mut out = Vec::new();
    for (agent_id, agent) in &s.agent {
        let Some(chats) = s.index.chats_by_agent.get(agent_id) else {
            continue;
        };
        let mut chats = chats.iter();
        let (Some(chat_id), None) = (chats.next(), chats.next()) else {
            continue;
        };
        let Some(chat) = s.chat.get(chat_id) else {
            continue;
        };
        let only_tag = s
            .index
            .agents_by_tag
            .get(chat_id)
            .is_none_or(|tagged| tagged.iter().all(|a| a == agent_id));
        let settled = chat.status == ChatStatus::Active
            && chat.link_confirmed
            && chat.agent_session_id.as_ref() == Some(agent_id)
            && agent.title == chat.title
            && agent.status == AgentStatus::Idle
            && agent.busy_since.is_none()
            && agent.created_for.as_ref().is_none_or(|c| c == chat_id)
            && only_tag
            && m.pending_by_chat.get(chat_id).is_none_or(|p| p.is_empty())
            && !busy_agents.contains(agent_id)
            && !busy_chats.contains(chat_id);
        if settled {
            out.push((agent_id.clone(), chat_id.clone()));
        }
    }
    out
}
