//! Deterministic command ids: the same purpose always yields the same id.
//!
//! An id names the operation and what it is for, readably (`prompt:msg_17`), so `why` and a
//! backend's table of applied ids can be read by a person. Where one subject may need the same
//! operation again for a new reason, the id carries what makes the reason new: a rename carries
//! the seq of the title change it mirrors, an abort the moment the session became busy.

use crate::clock::Millis;
use crate::events::{AgentSessionId, ChatSessionId, CommandId, MessageId};

fn id(s: String) -> CommandId {
    CommandId(s)
}

/// A chat session for an agent session that has none.
pub fn create_session(agent: &AgentSessionId) -> CommandId {
    id(format!("createSession:{agent}"))
}

/// The rename mirroring the agent-side title change at `title_seq`.
pub fn rename_session(chat: &ChatSessionId, title_seq: u64) -> CommandId {
    id(format!("renameSession:{chat}@{title_seq}"))
}

/// Marking a chat session deleted (once: deleted is final).
pub fn mark_session_deleted(chat: &ChatSessionId) -> CommandId {
    id(format!("markSessionDeleted:{chat}"))
}

/// Marking a chat session failed (once: failed is final).
pub fn mark_session_failed(chat: &ChatSessionId) -> CommandId {
    id(format!("markSessionFailed:{chat}"))
}

/// Aborting an agent session stuck busy since `busy_since`.
pub fn abort_agent_session(agent: &AgentSessionId, busy_since: Millis) -> CommandId {
    id(format!("abortAgentSession:{agent}@{busy_since}"))
}

/// Creating the agent session a chat session's messages need.
pub fn create_agent_session(chat: &ChatSessionId) -> CommandId {
    id(format!("createAgentSession:{chat}"))
}

/// Recording in the backend the agent session created for a chat session.
pub fn link_agent_session(chat: &ChatSessionId, agent: &AgentSessionId) -> CommandId {
    id(format!("linkAgentSession:{chat}:{agent}"))
}

/// Prompting the agent with a user message.
pub fn prompt(message: &MessageId) -> CommandId {
    id(format!("prompt:{message}"))
}

/// Delivering a user message's answer to the backend.
pub fn complete_message(message: &MessageId) -> CommandId {
    id(format!("completeMessage:{message}"))
}

/// Delivering a user message's failure to the backend.
pub fn fail_message(message: &MessageId) -> CommandId {
    id(format!("failMessage:{message}"))
}
