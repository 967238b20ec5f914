//! Keys: what an event is about, as the reconciler plans it.
//!
//! Every event names the keys whose rows it may change ([`Event::keys`]): the agent sessions,
//! chat sessions and messages it touches, and the global deletion pass when it changes what a
//! deletion is derived from (an agent listing, a failed agent observation, a hold, a chat
//! session that comes, goes or changes status; an orphaned chat session reaches it through
//! `reconcile::dependents`). The worker marks those keys dirty and the reconciler plans only them
//! (`reconcile::reconcile_keys`); a property test checks that no event changes what an
//! unnamed key would plan.

use super::types::*;
use super::Event;

/// One unit of planning: the decisions about one session or message, or the deletion pass.
/// Ordered agent sessions first, then the deletion pass, outcomes and chat sessions: the order
/// in which a turn plans them, as the global pass does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// An agent session: its chat session (creation, link, rename) and its staleness.
    Agent(AgentSessionId),
    /// The deletions one complete agent listing calls for: a global decision under a limit.
    Deletions,
    /// A user message's outcome and its delivery rounds.
    Message(MessageId),
    /// A chat session's pending messages: fail, create an agent session, or prompt.
    Chat(ChatSessionId),
}

impl Effect {
    fn keys(&self, out: &mut Vec<Key>) {
        let (chat, agent, message) = match self {
            Effect::ChatSessionCreated {
                chat_session_id,
                agent_session_id,
                ..
            }
            | Effect::AgentSessionCreated {
                chat_session_id,
                agent_session_id,
                ..
            }
            | Effect::AgentSessionLinked {
                chat_session_id,
                agent_session_id,
            } => {
                out.push(Key::Deletions); // a chat session may be new: the active count
                (chat_session_id, Some(agent_session_id), None)
            }
            Effect::SessionRenamed {
                chat_session_id, ..
            } => (chat_session_id, None, None),
            Effect::SessionDeleted { chat_session_id }
            | Effect::SessionFailed {
                chat_session_id, ..
            } => {
                out.push(Key::Deletions); // the active count
                (chat_session_id, None, None)
            }
            Effect::PromptAnswered {
                chat_session_id,
                message_id,
                ..
            }
            | Effect::MessageCompleted {
                chat_session_id,
                message_id,
            }
            | Effect::MessageFailed {
                chat_session_id,
                message_id,
                ..
            } => (chat_session_id, None, Some(message_id)),
            Effect::AgentSessionAborted { agent_session_id } => {
                out.push(Key::Agent(agent_session_id.clone()));
                return;
            }
        };
        out.push(Key::Chat(chat.clone()));
        out.extend(agent.cloned().map(Key::Agent));
        out.extend(message.cloned().map(Key::Message));
    }
}

fn subject_keys(s: &Subject, out: &mut Vec<Key>) {
    out.extend(s.chat_session_id.clone().map(Key::Chat));
    out.extend(s.agent_session_id.clone().map(Key::Agent));
    out.extend(s.message_id.clone().map(Key::Message));
}

impl Event {
    /// The keys whose planning this event may change (see the module documentation). A command's
    /// lifecycle events name its subject (and a success its effect's sessions and message);
    /// events the reconciler does not read name none.
    pub fn keys(&self) -> Vec<Key> {
        let mut out = Vec::new();
        match self {
            Event::AgentSessionSeen(b) | Event::AgentSessionChanged(b) => {
                out.push(Key::Agent(b.agent_session_id.clone()));
            }
            Event::AgentSessionGone(b) => out.push(Key::Agent(b.agent_session_id.clone())),
            Event::AgentSessionStatus(b) => out.push(Key::Agent(b.agent_session_id.clone())),
            // A chat session that comes, goes or changes status changes the active count the
            // deletion limit is a share of.
            Event::BackendSessionSeen(b) | Event::BackendSessionChanged(b) => {
                out.push(Key::Chat(b.chat_session_id.clone()));
                out.extend(b.agent_session_id.clone().map(Key::Agent));
                out.push(Key::Deletions);
            }
            Event::BackendSessionGone(b) => {
                out.push(Key::Chat(b.chat_session_id.clone()));
                out.push(Key::Deletions);
            }
            // Its chat session's row is unchanged; its pending messages are the message's
            // dependent (`reconcile::dependents`).
            Event::BackendMessageSeen(b) => {
                out.push(Key::Message(b.message_id.clone()));
                out.extend(b.reply_to.clone().map(Key::Message));
            }
            Event::CommandPlanned(b) => subject_keys(&b.command.subject(), &mut out),
            Event::AttemptStarted(b) => subject_keys(&b.subject, &mut out),
            Event::CommandSucceeded(b) => {
                subject_keys(&b.subject, &mut out);
                b.effect.keys(&mut out);
            }
            Event::CommandFailed(b) => subject_keys(&b.subject, &mut out),
            Event::CommandDeadLettered(b) => subject_keys(&b.subject, &mut out),
            Event::CommandCancelled(b) => subject_keys(&b.subject, &mut out),
            Event::ListingCompleted(ListingCompleted {
                source: Source::Agent,
                ..
            })
            | Event::ObservationFailed(ObservationFailed {
                source: Source::Agent,
                ..
            })
            | Event::DeletionsHeld(_)
            | Event::DeletionHoldLifted(_) => out.push(Key::Deletions),
            Event::ListingCompleted(_)
            | Event::ObservationFailed(_)
            | Event::ModelsListed(_)
            | Event::ModelsRequested(_)
            | Event::FeedRead(_)
            | Event::WorkerStarted(_)
            | Event::WorkerReady(_)
            | Event::WorkerStopping(_)
            | Event::WorkerState(_)
            | Event::AgentServerStarted(_)
            | Event::AgentServerExited(_)
            | Event::AgentServerGaveUp(_)
            | Event::CheckpointWritten(_)
            | Event::IdentityAdopted(_) => {}
            // It drops only rows whose every purpose is fulfilled (`reconcile::retention`): no
            // key can plan anything new for their going.
            Event::RetentionSwept(_) => {}
        }
        out
    }
}
