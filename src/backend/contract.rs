//! The backend contract of DESIGN.md as Rust types: every function's name, kind, arguments and
//! value, in the wire's camelCase. The Convex client sends and reads these; the contract store
//! (local backend, fake deployment) accepts and answers them; `schemas/backend/` is generated
//! from them so a backend team can validate its own implementation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::events::{
    AgentSessionId, ChatSessionId, ChatSessionInfo, ChatStatus, Command, CommandId, MessageId,
    MessageInfo, Role,
};
use crate::ports::{Page, PortError, PortResult};

/// `listSessions` and `listMessages` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListArgs {
    /// The worker whose sessions (or whose sessions' messages) to list.
    pub worker_id: String,
    /// A change cursor: only the sessions (`listSessions`) or messages (`listMessages`)
    /// changed after it, in change order, each at its latest change; `null` for all of them (a
    /// full listing). Pass the `continueCursor` of the page before to read on, and the last
    /// page's to read later what changed since: every write of a session or message (for a
    /// session: create, link, rename, delete, fail, and its `lastActivity`) moves it past
    /// every cursor handed out before.
    pub cursor: Option<String>,
    /// The page size.
    pub limit: u32,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PageValue<T> {
    /// The items.
    pub page: Vec<T>,
    /// True on the last page.
    pub is_done: bool,
    /// The cursor of the next page; on the last page, where the next read of what changed
    /// since starts.
    pub continue_cursor: String,
}

impl<W> PageValue<W> {
    /// The page as the port hands it over, its items in the core's types.
    pub fn into_page<T: From<W>>(self) -> Page<T> {
        Page {
            page: self.page.into_iter().map(T::from).collect(),
            is_done: self.is_done,
            continue_cursor: self.continue_cursor,
        }
    }
}

/// A chat session as the backend stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatSession {
    /// Its id.
    pub chat_session_id: String,
    /// The agent session linked to it, if any.
    pub agent_session_id: Option<String>,
    /// Its title.
    pub title: String,
    /// Its model as `provider/model`, if set.
    pub model: Option<String>,
    /// `active`, `deleted` or `failed`.
    pub status: ChatStatus,
    /// Last activity, ms since the epoch. A JS number, sent as a float (`1795344561749.0`): see `millis`.
    #[serde(deserialize_with = "millis::deserialize")]
    #[schemars(schema_with = "millis::schema")]
    pub last_activity: u64,
    /// Its project, if known.
    pub project: Option<String>,
}

/// A message as the backend stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// The chat session it belongs to.
    pub chat_session_id: String,
    /// Its id.
    pub message_id: String,
    /// `user` or `assistant`.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// Whether it is complete.
    pub completed: bool,
    /// When it was written, ms since the epoch. A JS number, sent as a float (`1795344561749.0`): see `millis`.
    #[serde(deserialize_with = "millis::deserialize")]
    #[schemars(schema_with = "millis::schema")]
    pub timestamp: u64,
    /// For an assistant message, the user message it answers.
    pub reply_to: Option<String>,
    /// Set when it failed.
    pub error: Option<String>,
}

/// Milliseconds as Convex writes them.
///
/// A Convex function's numbers are JS numbers, stored as `Float64`, and the Functions API's
/// `"format": "json"` writes them with serde_json's float formatting: `Date.now()` arrives as
/// `1795344561749.0` (`get-convex/convex-backend`, `crates/value/src/export.rs`,
/// `export_clean`, lines 118-129: `ConvexValue::Float64(value) => value.into()`), NaN and the
/// infinities as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` (same lines), and a
/// `v.int64()` as a decimal string (line 117). So a time is read from a JSON integer or float,
/// and must be a whole, non-negative number of milliseconds no larger than 2^53 (beyond that a
/// float no longer holds every integer); anything else is a contract error that
/// [`read_value`] names by its field path (`page[3].lastActivity: ...`).
pub mod millis {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};

    /// The largest integer a JS number holds exactly (`Number.MAX_SAFE_INTEGER`).
    pub const MAX_SAFE: u64 = (1 << 53) - 1;

    struct Millis;

    impl Visitor<'_> for Millis {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number of milliseconds (a JSON number, 0 to 2^53 - 1)")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            if v > MAX_SAFE {
                return Err(E::custom(format!(
                    "{v} ms is out of range (at most 2^53 - 1)"
                )));
            }
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("{v} ms is out of range (negative)")))
                .and_then(|v| self.visit_u64(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            if !v.is_finite() || v < 0.0 || v > MAX_SAFE as f64 {
                return Err(E::custom(format!("{v} ms is out of range")));
            }
            if v.fract() != 0.0 {
                return Err(E::custom(format!(
                    "{v} is not a whole number of milliseconds"
                )));
            }
            // Whole and within 0..2^53: the conversion is exact.
            Ok(v as u64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            // "NaN", "Infinity", "-Infinity" (a Float64 that is no number) or an int64.
            Err(E::custom(format!(
                "the string {v:?} is not a number of milliseconds (Convex writes NaN, \
                 Infinity and v.int64() values as strings)"
            )))
        }
    }

    /// Reads milliseconds from a JSON integer or a whole float.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(Millis)
    }

    /// The schema: a JSON `number` (Convex sends floats), whole, non-negative.
    pub fn schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "number",
            "minimum": 0,
            "maximum": MAX_SAFE,
            "multipleOf": 1,
        })
    }
}

/// `createSession` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSessionArgs {
    /// Idempotency key.
    pub command_id: String,
    /// The worker it belongs to.
    pub worker_id: String,
    /// The agent session it mirrors.
    pub agent_session_id: String,
    /// Its title.
    pub title: String,
    /// Its model, if known.
    pub model: Option<String>,
}

/// `createSession` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedValue {
    /// The new (or, for a repeated `commandId`, the first) chat session's id.
    pub chat_session_id: String,
}

/// `linkAgentSession` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkAgentSessionArgs {
    /// Idempotency key.
    pub command_id: String,
    /// The chat session.
    pub chat_session_id: String,
    /// The agent session created for it.
    pub agent_session_id: String,
}

/// `renameSession` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenameSessionArgs {
    /// Idempotency key.
    pub command_id: String,
    /// The chat session.
    pub chat_session_id: String,
    /// The new title.
    pub title: String,
}

/// `markSessionDeleted` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarkSessionDeletedArgs {
    /// Idempotency key.
    pub command_id: String,
    /// The chat session.
    pub chat_session_id: String,
}

/// `markSessionFailed` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarkSessionFailedArgs {
    /// Idempotency key.
    pub command_id: String,
    /// The chat session.
    pub chat_session_id: String,
    /// Why.
    pub reason: String,
}

/// `completeMessage` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteMessageArgs {
    /// Idempotency key.
    pub command_id: String,
    /// The chat session.
    pub chat_session_id: String,
    /// The **user** message answered.
    pub message_id: String,
    /// The answer.
    pub content: String,
}

/// `failMessage` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailMessageArgs {
    /// Idempotency key.
    pub command_id: String,
    /// The chat session.
    pub chat_session_id: String,
    /// The **user** message that failed.
    pub message_id: String,
    /// Why.
    pub reason: String,
}

/// A Convex function's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionKind {
    /// `POST /api/query`.
    Query,
    /// `POST /api/mutation`.
    Mutation,
}

impl FunctionKind {
    /// `query` or `mutation`, as in the URL.
    pub fn as_str(self) -> &'static str {
        match self {
            FunctionKind::Query => "query",
            FunctionKind::Mutation => "mutation",
        }
    }
}

/// One function of the contract.
#[derive(Debug, Clone, Copy)]
pub struct Function {
    /// Its name within the module.
    pub name: &'static str,
    /// Query or mutation.
    pub kind: FunctionKind,
    args: fn() -> schemars::Schema,
    value: fn() -> schemars::Schema,
}

fn null_schema() -> schemars::Schema {
    schemars::json_schema!({"type": "null"})
}

macro_rules! function {
    ($name:literal, $kind:ident, $args:ty, $value:ty) => {
        Function {
            name: $name,
            kind: FunctionKind::$kind,
            args: || schemars::schema_for!($args),
            value: || schemars::schema_for!($value),
        }
    };
    ($name:literal, $kind:ident, $args:ty) => {
        Function {
            name: $name,
            kind: FunctionKind::$kind,
            args: || schemars::schema_for!($args),
            value: null_schema,
        }
    };
}

/// Every function of the contract.
pub const FUNCTIONS: &[Function] = &[
    function!("listSessions", Query, ListArgs, PageValue<ChatSession>),
    function!("listMessages", Query, ListArgs, PageValue<Message>),
    function!("createSession", Mutation, CreateSessionArgs, CreatedValue),
    function!("linkAgentSession", Mutation, LinkAgentSessionArgs),
    function!("renameSession", Mutation, RenameSessionArgs),
    function!("markSessionDeleted", Mutation, MarkSessionDeletedArgs),
    function!("markSessionFailed", Mutation, MarkSessionFailedArgs),
    function!("completeMessage", Mutation, CompleteMessageArgs),
    function!("failMessage", Mutation, FailMessageArgs),
];

/// The JSON Schemas of every function's arguments and value: `NAME.args.json`,
/// `NAME.value.json`. `schemas/backend/` holds these; a test keeps them in step.
pub fn schemas() -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for f in FUNCTIONS {
        for (part, schema) in [("args", (f.args)()), ("value", (f.value)())] {
            let mut schema = schema;
            schema.insert(
                "title".into(),
                format!("agentsync:{} {} ({})", f.name, part, f.kind.as_str()).into(),
            );
            out.push((format!("{}.{part}.json", f.name), schema.to_value()));
        }
    }
    out
}

/// A backend command as the function call that applies it: the function's name and its
/// arguments. An agent-server command is refused as a terminal error: no backend applies it.
pub fn mutation_for(
    command_id: &CommandId,
    command: &Command,
    worker_id: &str,
) -> PortResult<(&'static str, serde_json::Value)> {
    let id = command_id.to_string();
    let to = |v: Result<serde_json::Value, serde_json::Error>| v.expect("plain struct");
    Ok(match command {
        Command::CreateSession {
            agent_session_id,
            title,
            model,
        } => (
            "createSession",
            to(serde_json::to_value(CreateSessionArgs {
                command_id: id,
                worker_id: worker_id.to_owned(),
                agent_session_id: agent_session_id.to_string(),
                title: title.clone(),
                model: model.clone(),
            })),
        ),
        Command::LinkAgentSession {
            chat_session_id,
            agent_session_id,
        } => (
            "linkAgentSession",
            to(serde_json::to_value(LinkAgentSessionArgs {
                command_id: id,
                chat_session_id: chat_session_id.to_string(),
                agent_session_id: agent_session_id.to_string(),
            })),
        ),
        Command::RenameSession {
            chat_session_id,
            title,
        } => (
            "renameSession",
            to(serde_json::to_value(RenameSessionArgs {
                command_id: id,
                chat_session_id: chat_session_id.to_string(),
                title: title.clone(),
            })),
        ),
        Command::MarkSessionDeleted { chat_session_id } => (
            "markSessionDeleted",
            to(serde_json::to_value(MarkSessionDeletedArgs {
                command_id: id,
                chat_session_id: chat_session_id.to_string(),
            })),
        ),
        Command::MarkSessionFailed {
            chat_session_id,
            reason,
        } => (
            "markSessionFailed",
            to(serde_json::to_value(MarkSessionFailedArgs {
                command_id: id,
                chat_session_id: chat_session_id.to_string(),
                reason: reason.clone(),
            })),
        ),
        Command::CompleteMessage {
            chat_session_id,
            message_id,
            content,
        } => (
            "completeMessage",
            to(serde_json::to_value(CompleteMessageArgs {
                command_id: id,
                chat_session_id: chat_session_id.to_string(),
                message_id: message_id.to_string(),
                content: content.clone(),
            })),
        ),
        Command::FailMessage {
            chat_session_id,
            message_id,
            reason,
        } => (
            "failMessage",
            to(serde_json::to_value(FailMessageArgs {
                command_id: id,
                chat_session_id: chat_session_id.to_string(),
                message_id: message_id.to_string(),
                reason: reason.clone(),
            })),
        ),
        Command::CreateAgentSession { .. }
        | Command::Prompt { .. }
        | Command::AbortAgentSession { .. } => {
            return Err(PortError::terminal(format!(
                "{} is not a backend command",
                command.op()
            )))
        }
    })
}

impl From<ChatSession> for ChatSessionInfo {
    fn from(s: ChatSession) -> Self {
        ChatSessionInfo {
            chat_session_id: ChatSessionId(s.chat_session_id),
            agent_session_id: s.agent_session_id.map(AgentSessionId),
            title: s.title,
            model: s.model,
            status: s.status,
            last_activity: s.last_activity,
            project: s.project,
        }
    }
}

impl From<Message> for MessageInfo {
    fn from(m: Message) -> Self {
        MessageInfo {
            chat_session_id: ChatSessionId(m.chat_session_id),
            message_id: MessageId(m.message_id),
            role: m.role,
            content: m.content,
            completed: m.completed,
            timestamp: m.timestamp,
            reply_to: m.reply_to.map(MessageId),
            error: m.error,
        }
    }
}

/// Reads a value against the contract type `T`. The error names the path of the first field
/// that does not match (`page[3].lastActivity: 1.5 is not a whole number of milliseconds`), so a
/// backend that answers the wrong shape is told exactly where.
pub fn read_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    // The fast path reads the value in place; only a breach pays for tracking the path.
    if let Ok(t) = T::deserialize(&value) {
        return Ok(t);
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_breaks_the_contract_names_the_field() {
        let value = serde_json::json!({"page": [
            {"chatSessionId": "c1", "agentSessionId": null, "title": "t", "model": null,
             "status": "active", "lastActivity": 1, "project": null},
            {"chatSessionId": "c2", "agentSessionId": null, "title": "t", "model": null,
             "status": "active", "lastActivity": "yesterday", "project": null}
        ], "isDone": true, "continueCursor": "c2"});
        let err = read_value::<PageValue<ChatSession>>(value).unwrap_err();
        assert!(
            err.starts_with("page[1].lastActivity: the string \"yesterday\""),
            "{err}"
        );
        let err =
            read_value::<PageValue<ChatSession>>(serde_json::json!({"page": []})).unwrap_err();
        assert!(err.contains("isDone"), "{err}");
        let err = read_value::<PageValue<ChatSession>>(serde_json::Value::Null).unwrap_err();
        assert!(err.contains("expected struct"), "{err}");
    }

    fn session_at(last_activity: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"page": [
            {"chatSessionId": "c1", "agentSessionId": null, "title": "t", "model": null,
             "status": "active", "lastActivity": 1.0, "project": null},
            {"chatSessionId": "c2", "agentSessionId": null, "title": "t", "model": null,
             "status": "active", "lastActivity": last_activity, "project": null}
        ], "isDone": true, "continueCursor": "c2"})
    }

    #[test]
    fn times_are_read_as_convex_writes_them_and_a_bad_one_names_its_field() {
        // The wire text, as Convex's export_clean writes Date.now(): a float.
        let text = r#"{"page": [{"chatSessionId": "c1", "agentSessionId": null, "title": "t",
            "model": null, "status": "active", "lastActivity": 1795344561749.0,
            "project": null}], "isDone": true, "continueCursor": "x"}"#;
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        let page = read_value::<PageValue<ChatSession>>(value).unwrap();
        assert_eq!(page.page[0].last_activity, 1_795_344_561_749);
        for ok in [
            serde_json::json!(0),
            serde_json::json!(7),
            serde_json::json!(7.0),
        ] {
            read_value::<PageValue<ChatSession>>(session_at(ok)).unwrap();
        }
        for (bad, says) in [
            (serde_json::json!(1.5), "not a whole number"),
            (serde_json::json!(-1.0), "out of range"),
            (serde_json::json!(-1), "out of range"),
            (serde_json::json!(1e300), "out of range"),
            (serde_json::json!(9_007_199_254_740_993u64), "out of range"),
            (serde_json::json!("NaN"), "\"NaN\" is not a number"),
            (
                serde_json::json!("Infinity"),
                "\"Infinity\" is not a number",
            ),
            (serde_json::json!("1795344561749"), "v.int64()"),
            (serde_json::Value::Null, "a whole number of milliseconds"),
        ] {
            let err = read_value::<PageValue<ChatSession>>(session_at(bad.clone())).unwrap_err();
            assert!(err.starts_with("page[1].lastActivity: "), "{bad}: {err}");
            assert!(err.contains(says), "{bad}: {err}");
        }
        let message = serde_json::json!({"page": [{"chatSessionId": "c1", "messageId": "m1",
            "role": "user", "content": "hi", "completed": true, "timestamp": 2.5,
            "replyTo": null, "error": null}], "isDone": true, "continueCursor": "1"});
        let err = read_value::<PageValue<Message>>(message).unwrap_err();
        assert!(
            err.starts_with("page[0].timestamp: 2.5 is not a whole"),
            "{err}"
        );
    }

    #[test]
    fn every_backend_command_is_one_function_and_agent_commands_none() {
        let id = CommandId::from("renameSession:c1@7");
        let (name, args) = mutation_for(
            &id,
            &Command::RenameSession {
                chat_session_id: "c1".into(),
                title: "new".into(),
            },
            "w1",
        )
        .unwrap();
        assert_eq!(name, "renameSession");
        assert_eq!(
            args,
            serde_json::json!({"commandId": "renameSession:c1@7", "chatSessionId": "c1", "title": "new"})
        );
        assert!(mutation_for(
            &id,
            &Command::AbortAgentSession {
                agent_session_id: "a".into()
            },
            "w1"
        )
        .is_err());
        let names: Vec<&str> = FUNCTIONS.iter().map(|f| f.name).collect();
        assert_eq!(names.len(), 9);
        assert_eq!(schemas().len(), 18);
    }
}
