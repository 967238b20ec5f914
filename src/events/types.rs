//! The data carried in event bodies: identifiers, observations, commands and their effects.
//!
//! Field names are the wire names (snake_case JSON) and are part of the log's format: renaming
//! one is a schema change that needs a new event version and an upcaster (see `docs/events.md`).

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::clock::Millis;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

id_type!(
    /// A session inside the agent server (OpenCode's `ses_...` id).
    AgentSessionId
);
id_type!(
    /// A chat session in the backend (the web app's conversation).
    ChatSessionId
);
id_type!(
    /// A message in the backend. Commands about messages always name the *user* message.
    MessageId
);
id_type!(
    /// A command's deterministic id: the same purpose always yields the same id, so planning
    /// twice plans once and the backend can apply each effect at most once.
    CommandId
);

/// The two sides the worker observes and acts on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The agent server (OpenCode).
    Agent,
    /// The backend (Convex or the embedded local backend).
    Backend,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Agent => "agent",
            Source::Backend => "backend",
        })
    }
}

/// A model as OpenCode names it: a provider and a model within it.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub struct ModelRef {
    /// The provider's id, e.g. `openai`.
    pub provider_id: String,
    /// The model's id within the provider, e.g. `gpt-4o`.
    pub model_id: String,
}

impl ModelRef {
    /// Parses `provider/model`; the model part may itself contain `/`.
    /// Without a `/` the whole string is the model id and the provider is empty.
    pub fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((p, m)) => Self {
                provider_id: p.to_owned(),
                model_id: m.to_owned(),
            },
            None => Self {
                provider_id: String::new(),
                model_id: s.to_owned(),
            },
        }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.provider_id.is_empty() {
            f.write_str(&self.model_id)
        } else {
            write!(f, "{}/{}", self.provider_id, self.model_id)
        }
    }
}

/// An agent session as a listing or the event stream reported it (`agent_session_seen` and
/// `agent_session_changed`, version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentSessionInfo {
    /// The agent session's id.
    pub agent_session_id: AgentSessionId,
    /// Its title.
    pub title: String,
    /// The directory it was created in (sessions of non-git directories share a project).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// The project it belongs to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The model it last used, when known. Version 1 stored this as one `provider/model` string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// When the agent server last updated it.
    pub updated_at: Millis,
    /// The session it is a sub-agent child of (OpenCode's `parentID`): children are the
    /// agent's own work, never mirrored as chat sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<AgentSessionId>,
    /// The tag agentsync created it with (OpenCode's `metadata.agentsync`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<SessionTag>,
}

/// What agentsync tags each agent session it creates with (OpenCode keeps it as the session's
/// `metadata.agentsync` and returns it in every listing): a creation whose reply was lost is
/// found again by its command id instead of being made twice, and a session made for a chat
/// session is never mirrored as a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionTag {
    /// The worker that created it: another worker's sessions are not ours to mirror.
    pub worker_id: String,
    /// The `createAgentSession` command that created it.
    pub command_id: CommandId,
    /// The chat session it was created for.
    pub chat_session_id: ChatSessionId,
}

/// Why an agent session is considered gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GoneReason {
    /// The agent server said so (`session.deleted`, or a 404 on get).
    Deleted,
    /// A complete, successful listing did not include it.
    MissingFromListing,
}

/// An agent session that no longer exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentSessionGone {
    /// The agent session's id.
    pub agent_session_id: AgentSessionId,
    /// How its absence was established.
    pub reason: GoneReason,
}

/// What an agent session is doing (OpenCode's `GET /session/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentStatus {
    /// Waiting for a prompt.
    Idle,
    /// Working on a prompt.
    Busy,
    /// Retrying a failed model call.
    Retry {
        /// The attempt number.
        attempt: u32,
        /// The server's message about the retry.
        message: String,
    },
}

/// A change of an agent session's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentSessionStatus {
    /// The agent session's id.
    pub agent_session_id: AgentSessionId,
    /// Its new status.
    pub status: AgentStatus,
}

/// A chat session's status in the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatStatus {
    /// In use.
    Active,
    /// Its agent session is gone.
    Deleted,
    /// Given up on (stale or broken).
    Failed,
}

/// A chat session as the backend reported it (the contract's `ChatSession`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChatSessionInfo {
    /// The chat session's id.
    pub chat_session_id: ChatSessionId,
    /// The agent session it is linked to, if any.
    #[serde(default)]
    pub agent_session_id: Option<AgentSessionId>,
    /// Its title.
    pub title: String,
    /// Its model as `provider/model`, if set.
    #[serde(default)]
    pub model: Option<String>,
    /// Its status.
    pub status: ChatStatus,
    /// When it last saw activity.
    pub last_activity: Millis,
    /// Its project, if known.
    #[serde(default)]
    pub project: Option<String>,
}

/// A chat session that disappeared from a complete backend listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BackendSessionGone {
    /// The chat session's id.
    pub chat_session_id: ChatSessionId,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The person using the web app.
    User,
    /// The agent's answer.
    Assistant,
}

/// A message as the backend reported it (the contract's `Message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageInfo {
    /// The chat session it belongs to.
    pub chat_session_id: ChatSessionId,
    /// The message's id.
    pub message_id: MessageId,
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// Whether it is complete (assistant replies are written incrementally).
    pub completed: bool,
    /// When it was written.
    pub timestamp: Millis,
    /// For an assistant message: the user message it answers.
    #[serde(default)]
    pub reply_to: Option<MessageId>,
    /// Set when the message failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// A model-list fetch started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ModelsRequested {
    /// The agent-server generation it is for.
    pub generation: u64,
}

/// The agent server's model list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ModelsListed {
    /// The agent-server generation the list belongs to (bumped on every restart).
    pub generation: u64,
    /// The models available.
    pub models: Vec<ModelRef>,
    /// The server's default model, if it has one.
    #[serde(default)]
    pub default: Option<ModelRef>,
}

/// A listing of one source finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ListingCompleted {
    /// Which source was listed.
    pub source: Source,
    /// How many sessions it held.
    pub sessions: u64,
    /// False when the listing is known to be incomplete (a page failed, a limit was hit):
    /// such a listing never proves that a session is gone.
    pub complete: bool,
    /// The log's last seq when the listing started: facts recorded after it are newer than
    /// anything the listing says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of: Option<u64>,
}

/// A feed of changes the worker reads incrementally, from a cursor kept in the log.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Feed {
    /// The agent server's sessions updated since a time (`GET /session?start=T`).
    AgentSessions,
    /// The backend's chat sessions changed after a cursor (`listSessions`).
    BackendSessions,
    /// The backend's messages changed after a cursor (`listMessages`).
    BackendMessages,
}

/// An incremental read of a feed moved its cursor, or (the first in a process) reached the
/// end: where the next read starts, kept in the log so a restart reads on from there. Appended
/// only when the cursor moved or the read is the first of the process to reach the end: an
/// idle poll appends nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FeedRead {
    /// Which feed.
    pub feed: Feed,
    /// Where the next read starts: the backend's `continueCursor`, or for the agent server the
    /// highest `updated_at` (ms) a complete listing has shown.
    pub cursor: String,
    /// Whether the read went to the end without a failure: from a cursor that a complete
    /// listing covers, the view then knows every session (but proves none gone).
    pub reached_end: bool,
}

/// Final rows left the live views (retention): the worker decided, purely from the views
/// (`reconcile::retention::sweep`), which final rows whose final moment is before `before`
/// cannot matter again, and names them here; each projection drops the ones it holds. The
/// log (and its archive) keeps their history. Replaying the log replays the same decision, so
/// the views stay a pure fold of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RetentionSwept {
    /// The retention horizon in force (`--retention-days`), in milliseconds.
    pub horizon_ms: Millis,
    /// Rows that became final before this moment (the worker's clock) were considered: the
    /// sweep's time minus the horizon, or earlier while the message feed lags.
    pub before: Millis,
    /// Final ledger entries dropped from the `commands` view.
    #[serde(default)]
    pub commands: Vec<CommandId>,
    /// Delivered user messages dropped from the `messages` view.
    #[serde(default)]
    pub messages: Vec<MessageId>,
    /// Deleted or failed chat sessions dropped from the `sessions` view.
    #[serde(default)]
    pub chats: Vec<ChatSessionId>,
}

/// An observation that failed. It is a failure, never an empty result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObservationFailed {
    /// Which source failed.
    pub source: Source,
    /// What was being observed, e.g. `list_sessions`.
    pub operation: String,
    /// The error, in one line.
    pub error: String,
}

/// The operation a command performs; also names its target.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Op {
    /// Backend: create a chat session for an agent session.
    CreateSession,
    /// Backend: link a chat session to an agent session.
    LinkAgentSession,
    /// Backend: change a chat session's title.
    RenameSession,
    /// Backend: mark a chat session deleted.
    MarkSessionDeleted,
    /// Backend: mark a chat session failed.
    MarkSessionFailed,
    /// Backend: deliver an answer to a user message.
    CompleteMessage,
    /// Backend: fail a user message with a reason.
    FailMessage,
    /// Agent: create an agent session for a chat session.
    CreateAgentSession,
    /// Agent: prompt an agent session with a user message.
    Prompt,
    /// Agent: abort what an agent session is doing.
    AbortAgentSession,
}

impl Op {
    /// The side this operation acts on.
    pub fn target(self) -> Source {
        match self {
            Op::CreateAgentSession | Op::Prompt | Op::AbortAgentSession => Source::Agent,
            _ => Source::Backend,
        }
    }

    /// The wire name (the Convex function's name for backend operations).
    pub fn name(self) -> &'static str {
        match self {
            Op::CreateSession => "createSession",
            Op::LinkAgentSession => "linkAgentSession",
            Op::RenameSession => "renameSession",
            Op::MarkSessionDeleted => "markSessionDeleted",
            Op::MarkSessionFailed => "markSessionFailed",
            Op::CompleteMessage => "completeMessage",
            Op::FailMessage => "failMessage",
            Op::CreateAgentSession => "createAgentSession",
            Op::Prompt => "prompt",
            Op::AbortAgentSession => "abortAgentSession",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A command: what the reconciler wants done, with everything needed to do it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "camelCase", rename_all_fields = "snake_case")]
pub enum Command {
    /// See [`Op::CreateSession`].
    CreateSession {
        /// The agent session the chat session mirrors.
        agent_session_id: AgentSessionId,
        /// Its title.
        title: String,
        /// Its model, `provider/model`.
        model: Option<String>,
    },
    /// See [`Op::LinkAgentSession`].
    LinkAgentSession {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The agent session created for it.
        agent_session_id: AgentSessionId,
    },
    /// See [`Op::RenameSession`].
    RenameSession {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// Its new title.
        title: String,
    },
    /// See [`Op::MarkSessionDeleted`].
    MarkSessionDeleted {
        /// The chat session.
        chat_session_id: ChatSessionId,
    },
    /// See [`Op::MarkSessionFailed`].
    MarkSessionFailed {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// Why.
        reason: String,
    },
    /// See [`Op::CompleteMessage`].
    CompleteMessage {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The user message answered.
        message_id: MessageId,
        /// The answer.
        content: String,
    },
    /// See [`Op::FailMessage`].
    FailMessage {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The user message that failed.
        message_id: MessageId,
        /// Why.
        reason: String,
    },
    /// See [`Op::CreateAgentSession`].
    CreateAgentSession {
        /// The chat session that needs an agent session.
        chat_session_id: ChatSessionId,
        /// The title to give it.
        title: String,
    },
    /// See [`Op::Prompt`].
    Prompt {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The agent session to prompt.
        agent_session_id: AgentSessionId,
        /// The user message.
        message_id: MessageId,
        /// Its text.
        text: String,
        /// The model to use, if chosen.
        model: Option<ModelRef>,
        /// The id the user message gets in the agent server (OpenCode's `messageID`), chosen
        /// when the prompt is planned and the same on every attempt: before posting again, the
        /// worker asks the server whether it already has it. Absent in prompts planned by an
        /// agentsync older than this field.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_message_id: Option<String>,
    },
    /// See [`Op::AbortAgentSession`].
    AbortAgentSession {
        /// The agent session.
        agent_session_id: AgentSessionId,
    },
}

impl Command {
    /// The operation.
    pub fn op(&self) -> Op {
        match self {
            Command::CreateSession { .. } => Op::CreateSession,
            Command::LinkAgentSession { .. } => Op::LinkAgentSession,
            Command::RenameSession { .. } => Op::RenameSession,
            Command::MarkSessionDeleted { .. } => Op::MarkSessionDeleted,
            Command::MarkSessionFailed { .. } => Op::MarkSessionFailed,
            Command::CompleteMessage { .. } => Op::CompleteMessage,
            Command::FailMessage { .. } => Op::FailMessage,
            Command::CreateAgentSession { .. } => Op::CreateAgentSession,
            Command::Prompt { .. } => Op::Prompt,
            Command::AbortAgentSession { .. } => Op::AbortAgentSession,
        }
    }

    /// The sessions and message the command is about, borrowed: the one place that knows
    /// which ids each command names.
    pub fn subject_refs(&self) -> SubjectRef<'_> {
        let none = SubjectRef::default();
        match self {
            Command::CreateSession {
                agent_session_id, ..
            }
            | Command::AbortAgentSession { agent_session_id } => SubjectRef {
                agent_session_id: Some(agent_session_id),
                ..none
            },
            Command::LinkAgentSession {
                chat_session_id,
                agent_session_id,
            } => SubjectRef {
                chat_session_id: Some(chat_session_id),
                agent_session_id: Some(agent_session_id),
                ..none
            },
            Command::RenameSession {
                chat_session_id, ..
            }
            | Command::MarkSessionDeleted { chat_session_id }
            | Command::MarkSessionFailed {
                chat_session_id, ..
            }
            | Command::CreateAgentSession {
                chat_session_id, ..
            } => SubjectRef {
                chat_session_id: Some(chat_session_id),
                ..none
            },
            Command::CompleteMessage {
                chat_session_id,
                message_id,
                ..
            }
            | Command::FailMessage {
                chat_session_id,
                message_id,
                ..
            } => SubjectRef {
                chat_session_id: Some(chat_session_id),
                message_id: Some(message_id),
                ..none
            },
            Command::Prompt {
                chat_session_id,
                agent_session_id,
                message_id,
                ..
            } => SubjectRef {
                chat_session_id: Some(chat_session_id),
                agent_session_id: Some(agent_session_id),
                message_id: Some(message_id),
            },
        }
    }

    /// The sessions and message the command is about.
    pub fn subject(&self) -> Subject {
        let r = self.subject_refs();
        Subject {
            chat_session_id: r.chat_session_id.cloned(),
            agent_session_id: r.agent_session_id.cloned(),
            message_id: r.message_id.cloned(),
        }
    }
}

/// [`Subject`], borrowed from a command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubjectRef<'a> {
    /// The chat session, if any.
    pub chat_session_id: Option<&'a ChatSessionId>,
    /// The agent session, if any.
    pub agent_session_id: Option<&'a AgentSessionId>,
    /// The user message, if any.
    pub message_id: Option<&'a MessageId>,
}

/// The sessions and message a command is about, repeated on its attempt and outcome events so
/// that each can be found by session and folded without looking the command up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Subject {
    /// The chat session, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_session_id: Option<ChatSessionId>,
    /// The agent session, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_session_id: Option<AgentSessionId>,
    /// The user message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
}

/// What a successful command changed in the world: enough for every projection to fold it
/// without looking the command up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    /// A chat session now mirrors an agent session.
    ChatSessionCreated {
        /// The new chat session.
        chat_session_id: ChatSessionId,
        /// The agent session it mirrors.
        agent_session_id: AgentSessionId,
        /// Its title.
        title: String,
        /// Its model.
        model: Option<String>,
    },
    /// An agent session was created for a chat session.
    AgentSessionCreated {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The new agent session.
        agent_session_id: AgentSessionId,
        /// Its title.
        title: String,
    },
    /// A chat session is now linked to an agent session.
    AgentSessionLinked {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The agent session.
        agent_session_id: AgentSessionId,
    },
    /// A chat session's title changed.
    SessionRenamed {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The new title.
        title: String,
    },
    /// A chat session was marked deleted.
    SessionDeleted {
        /// The chat session.
        chat_session_id: ChatSessionId,
    },
    /// A chat session was marked failed.
    SessionFailed {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// Why.
        reason: String,
    },
    /// The agent answered a user message (not yet delivered to the backend).
    PromptAnswered {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The user message.
        message_id: MessageId,
        /// The answer.
        content: String,
    },
    /// The backend holds the answer to a user message.
    MessageCompleted {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The user message.
        message_id: MessageId,
    },
    /// The backend holds a user message's failure.
    MessageFailed {
        /// The chat session.
        chat_session_id: ChatSessionId,
        /// The user message.
        message_id: MessageId,
        /// Why.
        reason: String,
    },
    /// An agent session's work was aborted.
    AgentSessionAborted {
        /// The agent session.
        agent_session_id: AgentSessionId,
    },
}

/// How a failed attempt is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth another attempt after a backoff (timeouts, refused connections, 5xx, 429).
    Retryable,
    /// Will fail the same way again (4xx, context overflow): no retry.
    Terminal,
}

/// A command decided by the reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommandPlanned {
    /// Its deterministic id.
    pub command_id: CommandId,
    /// What to do.
    pub command: Command,
    /// Why the reconciler planned it, in one line.
    pub reason: String,
}

/// The dispatcher started an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AttemptStarted {
    /// The command.
    pub command_id: CommandId,
    /// Its operation.
    pub op: Op,
    /// What it is about.
    pub subject: Subject,
    /// The attempt number, from 1.
    pub attempt: u32,
}

/// A command succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommandSucceeded {
    /// The command.
    pub command_id: CommandId,
    /// Its operation.
    pub op: Op,
    /// What it is about.
    pub subject: Subject,
    /// The attempt that succeeded.
    pub attempt: u32,
    /// What changed.
    pub effect: Effect,
}

/// An attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommandFailed {
    /// The command.
    pub command_id: CommandId,
    /// Its operation.
    pub op: Op,
    /// What it is about.
    pub subject: Subject,
    /// The attempt that failed.
    pub attempt: u32,
    /// Retryable or terminal.
    pub class: ErrorClass,
    /// The error, in one line.
    pub error: String,
    /// When the next attempt may start (retryable failures with attempts left).
    #[serde(default)]
    pub next_attempt_at: Option<Millis>,
}

/// A command ran out of attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommandDeadLettered {
    /// The command.
    pub command_id: CommandId,
    /// Its operation.
    pub op: Op,
    /// What it is about.
    pub subject: Subject,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last error.
    pub last_error: String,
}

/// A command was dropped before its next attempt because what it was for no longer holds
/// (say, a prompt for a message that has since been failed as stale).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommandCancelled {
    /// The command.
    pub command_id: CommandId,
    /// Its operation.
    pub op: Op,
    /// What it is about.
    pub subject: Subject,
    /// Why it no longer applies.
    pub reason: String,
}

/// The worker process started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerStarted {
    /// The worker's id.
    pub worker_id: String,
    /// The agentsync version.
    pub version: String,
    /// The process id.
    pub pid: u32,
}

/// The worker reached Ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerReady {
    /// Time from process start to Ready.
    pub time_to_ready_ms: u64,
}

/// The worker began draining.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerStopping {
    /// Why, e.g. `SIGTERM`.
    pub reason: String,
}

/// The lifecycle of a worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// The process started; the log is open.
    Starting,
    /// Loading checkpoints and applying the log's tail.
    CatchingUp,
    /// Reaching the agent server and the backend.
    Connecting,
    /// Waiting for the first complete listing of both sides.
    Observing,
    /// Working.
    Ready,
    /// No new work; in-flight calls finish; checkpoints are written.
    Draining,
    /// Done.
    Stopped,
}

impl Lifecycle {
    /// Every state, in order.
    pub const ALL: [Lifecycle; 7] = [
        Lifecycle::Starting,
        Lifecycle::CatchingUp,
        Lifecycle::Connecting,
        Lifecycle::Observing,
        Lifecycle::Ready,
        Lifecycle::Draining,
        Lifecycle::Stopped,
    ];

    /// The state's name, as in events and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Starting => "starting",
            Lifecycle::CatchingUp => "catching_up",
            Lifecycle::Connecting => "connecting",
            Lifecycle::Observing => "observing",
            Lifecycle::Ready => "ready",
            Lifecycle::Draining => "draining",
            Lifecycle::Stopped => "stopped",
        }
    }
}

/// The worker entered a lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerStateChanged {
    /// The new state.
    pub state: Lifecycle,
    /// What it is doing or why, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A spawned agent server is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentServerStarted {
    /// Its generation, from 1, bumped on every restart.
    pub generation: u64,
    /// The URL it listens on.
    pub url: String,
    /// Its process id, when the worker spawned it.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// A spawned agent server exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentServerExited {
    /// Its generation.
    pub generation: u64,
    /// Its exit code, if it exited.
    #[serde(default)]
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    #[serde(default)]
    pub signal: Option<i32>,
}

/// The supervisor stopped restarting the agent server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentServerGaveUp {
    /// Consecutive restarts made.
    pub restarts: u32,
    /// The last error.
    pub error: String,
}

/// A projection checkpoint was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CheckpointWritten {
    /// The projection's name.
    pub projection: String,
    /// Its version.
    pub version: u32,
    /// The last sequence number it holds.
    pub seq: u64,
}

/// What a data directory belongs to: recorded in `DATA_DIR/IDENTITY.json` at the first
/// `agentsync run` and checked at every later one, so that a directory is never reconciled
/// against another worker id, agent server or backend by accident. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Identity {
    /// The worker's id (the backend's `workerId`).
    pub worker_id: String,
    /// The agent server.
    pub agent: AgentIdentity,
    /// The backend.
    pub backend: BackendIdentity,
}

/// Which agent server a data directory is synced with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentIdentity {
    /// `--agent-url`: the URL without user, password, query or fragment.
    Url(String),
    /// `--spawn-agent`: the canonical agent directory.
    Dir(String),
}

/// Which backend a data directory is synced with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendIdentity {
    /// The embedded local backend (in the data directory itself).
    Local,
    /// A Convex deployment: its URL without user, password, query or fragment.
    Convex(String),
}

impl fmt::Display for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentIdentity::Url(u) => f.write_str(u),
            AgentIdentity::Dir(d) => write!(f, "spawned in {d}"),
        }
    }
}

impl fmt::Display for BackendIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendIdentity::Local => f.write_str("local"),
            BackendIdentity::Convex(u) => write!(f, "convex at {u}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "worker id {:?}, agent server {}, backend {}",
            self.worker_id, self.agent, self.backend
        )
    }
}

impl Identity {
    /// What differs from `other`, one phrase per part, this one's value first:
    /// `worker id "a" is recorded, not "b"`.
    pub fn differences(&self, other: &Identity) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |what: &str, this: String, that: String| {
            if this != that {
                out.push(format!("{what} {this} is recorded, not {that}"));
            }
        };
        differ(
            "worker id",
            format!("{:?}", self.worker_id),
            format!("{:?}", other.worker_id),
        );
        differ(
            "agent server",
            self.agent.to_string(),
            other.agent.to_string(),
        );
        differ(
            "backend",
            self.backend.to_string(),
            other.backend.to_string(),
        );
        out
    }
}

/// A data directory was moved deliberately (`--adopt`) to another identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IdentityAdopted {
    /// The identity recorded until now.
    pub previous: Identity,
    /// The identity recorded from now on.
    pub current: Identity,
}

/// A complete agent listing would have marked more chat sessions deleted than the policy
/// allows at once: none was, until a later listing confirms the absences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeletionsHeld {
    /// The seq of the held listing's `listing_completed`.
    pub listing_seq: u64,
    /// How many active chat sessions it would have marked deleted.
    pub candidates: u64,
    /// How many one listing may mark deleted.
    pub limit: u64,
}

/// A hold on deletions ended: the absences are within the limit again (the sessions came
/// back, or the confirmed deletions were carried out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeletionHoldLifted {
    /// The seq of the listing that was held.
    pub held_listing_seq: u64,
    /// The seq of the last complete agent listing.
    pub listing_seq: u64,
    /// How many active chat sessions are still to be marked deleted.
    pub candidates: u64,
    /// The limit.
    pub limit: u64,
}
