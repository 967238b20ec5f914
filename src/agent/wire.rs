//! OpenCode's JSON, as far as agentsync reads it (opencode-ai 1.18.33; the server's own OpenAPI
//! document is `../shared/reference/opencode-1.18.33-openapi.json`).
//!
//! Every type ignores fields it does not name, so a newer server that adds fields still parses;
//! a field we need that is missing or mistyped is an error that names it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::{AgentSessionInfo, AgentSessionStatus, AgentStatus, ModelRef, SessionTag};
use crate::transport::one_line;

/// `Session`.
#[derive(Debug, Clone, Deserialize)]
pub struct Session {
    /// `ses_…`.
    pub id: String,
    /// The title.
    #[serde(default)]
    pub title: String,
    /// The directory it was created in.
    #[serde(default)]
    pub directory: Option<String>,
    /// `global` for sessions of directories outside a git repository.
    #[serde(default, rename = "projectID")]
    pub project_id: Option<String>,
    /// The session this one is a sub-agent child of.
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    /// Free-form metadata given at creation, returned unchanged (measured on 1.18.33):
    /// agentsync's tag lives under `agentsync`.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Its times.
    pub time: SessionTime,
}

/// `Session.time`.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionTime {
    /// Creation, ms.
    #[serde(default)]
    pub created: u64,
    /// Last update, ms. A rename does **not** move it (measured on 1.18.33), so the
    /// incremental listing (`start=`) never shows renames: they come from the event stream or a
    /// full listing.
    pub updated: u64,
}

impl Session {
    /// The session as agentsync records it.
    pub fn into_info(self) -> AgentSessionInfo {
        AgentSessionInfo {
            agent_session_id: self.id.into(),
            title: self.title,
            directory: self.directory,
            project: self.project_id,
            model: None,
            updated_at: self.time.updated.max(self.time.created),
            parent_id: self.parent_id.map(Into::into),
            tag: self.metadata.as_ref().and_then(read_tag),
        }
    }
}

/// The metadata `POST /session` is given so that the session can be found again.
pub fn tag_metadata(tag: &SessionTag) -> serde_json::Value {
    serde_json::json!({ "agentsync": {
        "workerId": tag.worker_id,
        "commandId": tag.command_id,
        "chatSessionId": tag.chat_session_id,
    }})
}

/// agentsync's tag in a session's metadata; `None` when absent or not ours in shape (metadata
/// is free-form: anything may have written it).
fn read_tag(metadata: &serde_json::Value) -> Option<SessionTag> {
    let tag = metadata.get("agentsync")?;
    let field = |name: &str| tag.get(name)?.as_str().map(str::to_owned);
    Some(SessionTag {
        worker_id: field("workerId")?,
        command_id: field("commandId")?.into(),
        chat_session_id: field("chatSessionId")?.into(),
    })
}

/// One value of `GET /session/status` (a map from session id to this).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Status {
    /// Waiting.
    Idle,
    /// Working.
    Busy,
    /// Retrying a failed model call.
    Retry {
        /// Attempt number.
        #[serde(default)]
        attempt: u32,
        /// Why.
        #[serde(default)]
        message: String,
    },
}

impl Status {
    /// The status as agentsync records it.
    pub fn into_status(self, session: String) -> AgentSessionStatus {
        AgentSessionStatus {
            agent_session_id: session.into(),
            status: match self {
                Status::Idle => AgentStatus::Idle,
                Status::Busy => AgentStatus::Busy,
                // The provider's error text, kept in an event: one bounded line.
                Status::Retry { attempt, message } => AgentStatus::Retry {
                    attempt,
                    message: one_line(&message),
                },
            },
        }
    }
}

/// `POST /session` body.
#[derive(Debug, Serialize)]
pub struct CreateSession<'a> {
    /// The title; given, so the server does not ask the model for one.
    pub title: &'a str,
    /// agentsync's tag ([`tag_metadata`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// `PATCH /session/{id}` body.
#[derive(Debug, Serialize)]
pub struct RenameSession<'a> {
    /// The new title.
    pub title: &'a str,
}

/// `POST /session/{id}/message` and `/prompt_async` body.
#[derive(Debug, Serialize)]
pub struct Prompt<'a> {
    /// The user's text, as one part.
    pub parts: [TextPart<'a>; 1],
    /// The model; the server's default when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PromptModel<'a>>,
    /// The user message's id, chosen by agentsync (pattern `^msg`).
    #[serde(rename = "messageID", skip_serializing_if = "Option::is_none")]
    pub message_id: Option<&'a str>,
}

/// `{type: "text", text}`.
#[derive(Debug, Serialize)]
pub struct TextPart<'a> {
    /// Always `text`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The text.
    pub text: &'a str,
}

/// `{providerID, modelID}`.
#[derive(Debug, Serialize)]
pub struct PromptModel<'a> {
    /// Provider.
    #[serde(rename = "providerID")]
    pub provider_id: &'a str,
    /// Model.
    #[serde(rename = "modelID")]
    pub model_id: &'a str,
}

impl<'a> Prompt<'a> {
    /// A text prompt.
    pub fn text(text: &'a str, model: Option<&'a ModelRef>) -> Self {
        Self {
            parts: [TextPart { kind: "text", text }],
            model: model.map(|m| PromptModel {
                provider_id: &m.provider_id,
                model_id: &m.model_id,
            }),
            message_id: None,
        }
    }
}

/// One message of `GET /session/{id}/message`: its info and parts.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionMessage {
    /// What the message is.
    pub info: SessionMessageInfo,
    /// Its parts; the text parts of an assistant message are the answer.
    #[serde(default)]
    pub parts: Vec<Part>,
}

/// The fields of a listed message that tell whose reply it is and whether it is done.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionMessageInfo {
    /// `msg_…`.
    pub id: String,
    /// `user` or `assistant`.
    pub role: String,
    /// For an assistant message: the user message it answers.
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    /// Its times.
    pub time: MessageTime,
    /// Set when an assistant message failed.
    #[serde(default)]
    pub error: Option<AssistantError>,
    /// Why an assistant step ended: `stop`, `length`, ... or `tool-calls` / `unknown`, after
    /// which OpenCode runs another step (1.18.33's loop), so such a step is not the answer.
    #[serde(default)]
    pub finish: Option<String>,
}

impl SessionMessageInfo {
    /// Whether this assistant step ends its prompt's run: completed, and not followed by
    /// another step.
    pub fn ends_the_run(&self) -> bool {
        self.time.completed.is_some()
            && !matches!(self.finish.as_deref(), Some("tool-calls" | "unknown"))
    }

    /// Whether the run was stopped from outside (OpenCode stamps the running step with
    /// `MessageAbortedError` when it is aborted or shut down).
    pub fn aborted(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| e.name == "MessageAbortedError")
    }
}

impl SessionMessage {
    /// The text parts, joined.
    pub fn text(&self) -> String {
        text_of(&self.parts)
    }
}

fn text_of(parts: &[Part]) -> String {
    let texts: Vec<&str> = parts
        .iter()
        .filter(|p| p.kind == "text")
        .filter_map(|p| p.text.as_deref())
        .collect();
    texts.join("")
}

/// The answer of `POST /session/{id}/message`: the assistant message and its parts.
#[derive(Debug, Clone, Deserialize)]
pub struct AssistantReply {
    /// The assistant message.
    pub info: AssistantInfo,
    /// Its parts; the text parts are the answer.
    #[serde(default)]
    pub parts: Vec<Part>,
}

/// The fields of an assistant message that decide success.
#[derive(Debug, Clone, Deserialize)]
pub struct AssistantInfo {
    /// Set when the prompt failed, even though the HTTP status is 200.
    #[serde(default)]
    pub error: Option<AssistantError>,
    /// `stop`, `error`, `length`, …
    #[serde(default)]
    pub finish: Option<String>,
}

/// `{name, data: {message, isRetryable?}}`: one of OpenCode's named errors.
#[derive(Debug, Clone, Deserialize)]
pub struct AssistantError {
    /// `ContextOverflowError`, `APIError`, `ProviderAuthError`, …
    pub name: String,
    /// Details.
    #[serde(default)]
    pub data: ErrorData,
}

/// The `data` of a named error.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorData {
    /// What went wrong.
    #[serde(default)]
    pub message: Option<String>,
    /// Only on `APIError`: whether the provider said a retry may work.
    #[serde(default, rename = "isRetryable")]
    pub is_retryable: Option<bool>,
}

impl AssistantError {
    /// Whether another attempt of the same prompt may succeed. Only a provider error that says
    /// so is retried: a context overflow, a refused key or a content filter repeats every time,
    /// and retrying those is how messages got retried forever.
    pub fn is_retryable(&self) -> bool {
        self.name == "APIError" && self.data.is_retryable == Some(true)
    }

    /// `Name: message`, one bounded line (both parts are the server's text).
    pub fn describe(&self) -> String {
        match &self.data.message {
            Some(m) => one_line(&format!("{}: {m}", self.name)),
            None => one_line(&self.name),
        }
    }
}

/// A message part; only text is read.
#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    /// `text`, `step-start`, `tool`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

impl AssistantReply {
    /// The answer's text: its text parts, joined.
    pub fn text(&self) -> String {
        text_of(&self.parts)
    }
}

/// `GET /config/providers`.
#[derive(Debug, Clone, Deserialize)]
pub struct Providers {
    /// The providers with their models.
    pub providers: Vec<Provider>,
    /// Each provider's default model id.
    #[serde(default)]
    pub default: BTreeMap<String, String>,
}

/// One provider.
#[derive(Debug, Clone, Deserialize)]
pub struct Provider {
    /// Its id.
    pub id: String,
    /// `config` when the project's `opencode.json` declared it.
    #[serde(default)]
    pub source: Option<String>,
    /// Model id -> model (only the keys are read).
    #[serde(default)]
    pub models: BTreeMap<String, serde_json::Value>,
}

/// `GET /config`, only the configured default model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// `provider/model`.
    #[serde(default)]
    pub model: Option<String>,
}

/// `GET /global/health`.
#[derive(Debug, Clone, Deserialize)]
pub struct Health {
    /// True when the server is up.
    pub healthy: bool,
    /// Its version.
    #[serde(default)]
    pub version: Option<String>,
}

/// An error body: OpenCode answers `{name, data: {message}}` or `{_tag, message}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorBody {
    /// Named style.
    #[serde(default)]
    pub name: Option<String>,
    /// Named style details.
    #[serde(default)]
    pub data: Option<ErrorData>,
    /// Tagged style.
    #[serde(default, rename = "_tag")]
    pub tag: Option<String>,
    /// Tagged style message.
    #[serde(default)]
    pub message: Option<String>,
}

impl ErrorBody {
    /// The best one-line description this body offers.
    pub fn describe(&self) -> Option<String> {
        let name = self.name.as_deref().or(self.tag.as_deref());
        let message = self
            .data
            .as_ref()
            .and_then(|d| d.message.as_deref())
            .or(self.message.as_deref());
        match (name, message) {
            (Some(n), Some(m)) => Some(one_line(&format!("{n}: {m}"))),
            (Some(n), None) => Some(one_line(n)),
            (None, Some(m)) => Some(one_line(m)),
            (None, None) => None,
        }
    }
}

/// One event of `GET /event`: `{id, type, properties}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerEvent {
    /// `session.updated`, `session.status`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The event's data, read according to `kind`.
    #[serde(default)]
    pub properties: serde_json::Value,
}

/// `session.updated` / `session.created` / `session.deleted` properties.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionEvent {
    /// The session.
    pub info: Session,
}

/// `session.status` properties.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusEvent {
    /// `ses_…`.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// The new status.
    pub status: Status,
}

/// `message.updated` properties.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageEvent {
    /// The message.
    pub info: MessageEventInfo,
}

/// The fields of a message that the worker reads from `message.updated`.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageEventInfo {
    /// `msg_…`.
    pub id: String,
    /// `ses_…`.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// `user` or `assistant`.
    pub role: String,
    /// Created / completed, ms.
    pub time: MessageTime,
    /// Set when an assistant message failed.
    #[serde(default)]
    pub error: Option<AssistantError>,
}

/// A message's times.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageTime {
    /// Created, ms.
    pub created: u64,
    /// Completed, ms (assistant messages, once done).
    #[serde(default)]
    pub completed: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_overflow_in_a_200_reply_is_a_terminal_error_and_an_api_error_may_be_retried() {
        let overflow: AssistantReply = serde_json::from_str(
            r#"{"info":{"role":"assistant","finish":"error","error":{"name":"ContextOverflowError",
            "data":{"message":"Session too large\nto compact"}},"id":"msg_1"},"parts":[]}"#,
        )
        .unwrap();
        let e = overflow.info.error.unwrap();
        assert!(!e.is_retryable());
        assert_eq!(
            e.describe(),
            "ContextOverflowError: Session too large to compact"
        );
        let api: AssistantError = serde_json::from_str(
            r#"{"name":"APIError","data":{"message":"overloaded","isRetryable":true,"statusCode":529}}"#,
        )
        .unwrap();
        assert!(api.is_retryable());
    }

    #[test]
    fn the_answer_is_the_text_parts_joined() {
        let reply: AssistantReply = serde_json::from_str(
            r#"{"info":{"finish":"stop"},"parts":[{"type":"step-start"},
            {"type":"text","text":"Hello "},{"type":"tool","text":"x"},{"type":"text","text":"there"}]}"#,
        )
        .unwrap();
        assert_eq!(reply.text(), "Hello there");
    }

    #[test]
    fn error_bodies_of_both_styles_describe_themselves() {
        let named: ErrorBody = serde_json::from_str(
            r#"{"name":"NotFoundError","data":{"message":"Session not found: ses_x"}}"#,
        )
        .unwrap();
        assert_eq!(
            named.describe().unwrap(),
            "NotFoundError: Session not found: ses_x"
        );
        let tagged: ErrorBody = serde_json::from_str(r#"{"_tag":"BadRequest"}"#).unwrap();
        assert_eq!(tagged.describe().unwrap(), "BadRequest");
    }
}
