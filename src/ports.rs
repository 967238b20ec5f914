//! Ports: the two small traits the core defines and the adapters implement.
//!
//! [`AgentServer`] is what the worker needs from an agent server (OpenCode in production, a
//! simulation in tests and `agentsync demo`); [`Backend`] is what it needs from the web app's
//! database (the Convex functions of DESIGN.md, or the embedded local backend). Both return a
//! [`PortError`] that already carries its [`ErrorClass`], so the dispatcher decides retry or
//! give-up without knowing the transport.
//!
//! The methods return boxed futures so that the traits stay object-safe: the worker picks its
//! adapters at run time (`--backend local|convex`).

use std::fmt;

use futures_core::future::BoxFuture;

use crate::clock::Millis;
use crate::events::{
    AgentSessionId, AgentSessionInfo, AgentSessionStatus, ChatSessionId, ChatSessionInfo, Command,
    CommandId, ErrorClass, MessageInfo, ModelRef, SessionTag,
};
use crate::text::one_line;

/// What a port call returns.
pub type PortResult<T> = Result<T, PortError>;

/// A port call in flight.
pub type PortFuture<'a, T> = BoxFuture<'a, PortResult<T>>;

/// A failed call, classified for the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PortError {
    /// Retryable (timeouts, refused connections, 5xx, 429) or terminal (4xx, context overflow,
    /// a function that threw).
    pub class: ErrorClass,
    /// One line saying what went wrong, at most [`crate::text::MAX_LINE_CHARS`] characters
    /// (the constructors make it so: server text is external data). Never contains a secret.
    pub message: String,
    /// How long the other side asked us to wait (HTTP `Retry-After`).
    pub retry_after_ms: Option<Millis>,
}

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl PortError {
    /// A failure worth another attempt. The message is made one bounded line
    /// ([`crate::text::one_line`]): this is where text from a server enters an error, and from
    /// there every event that reports it.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Retryable,
            message: one_line(&message.into()),
            retry_after_ms: None,
        }
    }

    /// A failure that will repeat: no retry. The message is made one bounded line, as in
    /// [`PortError::retryable`].
    pub fn terminal(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Terminal,
            message: one_line(&message.into()),
            retry_after_ms: None,
        }
    }

    /// The same error, asking for a wait of at least `ms` before the next attempt.
    pub fn with_retry_after(mut self, ms: Millis) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}

/// One listing of the agent server's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentListing {
    /// The sessions listed.
    pub sessions: Vec<AgentSessionInfo>,
    /// False when the adapter knows the listing is not the whole set asked for (every session,
    /// or every one updated since a time) because a page limit was hit: such a listing never
    /// proves a session gone, and an incremental one is followed by a full listing. Only a
    /// complete full listing may prove a session gone.
    pub complete: bool,
}

/// What an agent server's event stream reported (OpenCode: `GET /event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentObservation {
    /// The stream (re)connected. Events may have been missed before a reconnect, so the
    /// observer follows it with a full listing, which closes the gap.
    Connected {
        /// False for the first connection, true for every later one.
        reconnected: bool,
    },
    /// A session was created or changed (title, directory, last update).
    SessionUpdated(Box<AgentSessionInfo>),
    /// A session was deleted.
    SessionDeleted(AgentSessionId),
    /// A session's status changed.
    Status(AgentSessionStatus),
    /// A message of a session was created or updated: activity in that session.
    MessageUpdated {
        /// The session.
        agent_session_id: AgentSessionId,
        /// When (ms): the message's completion, or its creation while it runs.
        at: Millis,
        /// The assistant's error, when the message failed.
        error: Option<String>,
    },
}

impl AgentObservation {
    /// The agent session the report is about, if any.
    pub fn agent_session_id(&self) -> Option<&AgentSessionId> {
        match self {
            AgentObservation::Connected { .. } => None,
            AgentObservation::SessionUpdated(info) => Some(&info.agent_session_id),
            AgentObservation::SessionDeleted(id) => Some(id),
            AgentObservation::Status(s) => Some(&s.agent_session_id),
            AgentObservation::MessageUpdated {
                agent_session_id, ..
            } => Some(agent_session_id),
        }
    }
}

/// The agent server's models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelList {
    /// Every model available.
    pub models: Vec<ModelRef>,
    /// The server's default, if it has one.
    pub default: Option<ModelRef>,
}

/// A prompt to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptRequest<'a> {
    /// The user's text.
    pub text: &'a str,
    /// The model, or the server's default.
    pub model: Option<&'a ModelRef>,
    /// The id the user message is to get in the agent server (OpenCode's `messageID`), so
    /// that an attempt whose reply was lost can be looked up instead of sent again.
    pub message_id: Option<&'a str>,
}

impl<'a> PromptRequest<'a> {
    /// A prompt of `text` with no chosen message id.
    pub fn text(text: &'a str, model: Option<&'a ModelRef>) -> Self {
        Self {
            text,
            model,
            message_id: None,
        }
    }
}

/// What the agent server holds of a prompt sent earlier under a chosen message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptOutcome {
    /// It never arrived: sending it now runs the model once.
    NotSent,
    /// It arrived and the agent is still working on it: wait, do not send it again (OpenCode
    /// would append a second copy to the message and run the model again).
    Running,
    /// It arrived, and the agent stopped working on it without an answer (the server
    /// restarted mid-prompt, or it was aborted): no answer will come of it.
    Interrupted,
    /// The agent answered it: the answer's text.
    Answered(String),
    /// The agent's answer is an error (say, a context overflow).
    Failed(PortError),
}

/// The agent server: sessions are data inside it; prompts are answered by its model.
pub trait AgentServer: Send + Sync {
    /// Whether it answers at all.
    fn health(&self) -> PortFuture<'_, ()>;
    /// Its sessions: all of them (`since: None`), or those updated at or after `since`.
    fn list_sessions(&self, since: Option<Millis>) -> PortFuture<'_, AgentListing>;
    /// Creates a session, tagged (when `tag` is given) so that it can be found again.
    fn create_session<'a>(
        &'a self,
        title: &'a str,
        tag: Option<&'a SessionTag>,
    ) -> PortFuture<'a, AgentSessionInfo>;
    /// The session created under `tag`'s command id by `tag`'s worker, if the server has one:
    /// asked before any retry of a creation whose outcome is unknown.
    fn find_session<'a>(&'a self, tag: &'a SessionTag) -> PortFuture<'a, Option<AgentSessionInfo>>;
    /// Renames a session.
    fn rename_session<'a>(&'a self, id: &'a AgentSessionId, title: &'a str) -> PortFuture<'a, ()>;
    /// Deletes a session.
    fn delete_session<'a>(&'a self, id: &'a AgentSessionId) -> PortFuture<'a, ()>;
    /// Prompts a session and waits for the answer's text. An answer that carries an error
    /// (e.g. a context overflow) is an error, not an answer.
    fn prompt<'a>(
        &'a self,
        id: &'a AgentSessionId,
        prompt: PromptRequest<'a>,
    ) -> PortFuture<'a, String>;
    /// What became of the prompt sent to session `id` as user message `message_id`: asked
    /// before any retry of a prompt whose outcome is unknown.
    fn prompt_outcome<'a>(
        &'a self,
        id: &'a AgentSessionId,
        message_id: &'a str,
    ) -> PortFuture<'a, PromptOutcome>;
    /// Removes an interrupted prompt (user message `message_id` and any unfinished reply to
    /// it) so that it can be sent again under the same id as if for the first time; done when
    /// it is already gone.
    fn forget_prompt<'a>(
        &'a self,
        id: &'a AgentSessionId,
        message_id: &'a str,
    ) -> PortFuture<'a, ()>;
    /// Aborts whatever a session is doing.
    fn abort<'a>(&'a self, id: &'a AgentSessionId) -> PortFuture<'a, ()>;
    /// The status of every session that is not idle.
    fn status(&self) -> PortFuture<'_, Vec<AgentSessionStatus>>;
    /// Its models (`GET /config/providers`): expensive, so the dispatcher caches it.
    fn list_models(&self) -> PortFuture<'_, ModelList>;
}

/// One page of a paginated backend listing (Convex's pagination shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items.
    pub page: Vec<T>,
    /// Whether this was the last page.
    pub is_done: bool,
    /// The cursor of the next page; on the last page, where the next read of changes starts.
    pub continue_cursor: String,
}

/// What a backend mutation returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MutationReply {
    /// `null`.
    Done,
    /// `createSession`'s `{chatSessionId}`.
    Created(ChatSessionId),
}

/// The backend: the web app's chat sessions and messages.
pub trait Backend: Send + Sync {
    /// One page of this worker's chat sessions changed after `cursor` (all of them from
    /// `None`), in change order (`listSessions`).
    fn list_sessions<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<ChatSessionInfo>>;
    /// One page of the messages changed after `cursor` (`listMessages`).
    fn list_messages<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<MessageInfo>>;
    /// Applies a backend command, at most once per `command_id` (the backend keeps the ids it
    /// applied and answers a repeat with the first reply). Agent-server commands are refused
    /// as terminal errors.
    fn mutate<'a>(
        &'a self,
        command_id: &'a CommandId,
        command: &'a Command,
    ) -> PortFuture<'a, MutationReply>;
}
