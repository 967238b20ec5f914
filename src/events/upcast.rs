//! Upcasters: older event versions turned into the current ones on read.
//!
//! Rules (see `docs/events.md`): a stored event is never rewritten; a kind's version goes up
//! when its body changes shape; the old shape stays here as a type with a conversion to the new
//! one, forever, so every log ever written stays readable.
//!
//! Version history:
//! - `agent_session_seen` / `agent_session_changed` v1 -> v2: the field `id` was renamed
//!   `agent_session_id` (every id field names its kind), and `model`, one `"provider/model"`
//!   string, was split into `{provider_id, model_id}` (OpenCode's prompt API takes the two apart,
//!   and a model id may itself contain `/`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{AgentSessionId, AgentSessionInfo, Event, EventKind, ModelRef};
use crate::clock::Millis;

/// `agent_session_seen` / `agent_session_changed` body, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentSessionInfoV1 {
    /// The agent session's id (renamed `agent_session_id` in v2).
    pub id: String,
    /// Its title.
    pub title: String,
    /// The directory it was created in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// Its project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Its model as one `provider/model` string (split in v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// When the agent server last updated it.
    pub updated_at: Millis,
}

impl From<AgentSessionInfoV1> for AgentSessionInfo {
    fn from(v1: AgentSessionInfoV1) -> Self {
        AgentSessionInfo {
            agent_session_id: AgentSessionId(v1.id),
            title: v1.title,
            directory: v1.directory,
            project: v1.project,
            model: v1.model.as_deref().map(ModelRef::parse),
            updated_at: v1.updated_at,
            parent_id: None,
            tag: None,
        }
    }
}

impl From<&AgentSessionInfo> for AgentSessionInfoV1 {
    /// The v1 shape of a v2 body: what an older agentsync would have written. Used to make
    /// fixtures and to check that upcasting preserves meaning.
    fn from(v2: &AgentSessionInfo) -> Self {
        AgentSessionInfoV1 {
            id: v2.agent_session_id.0.clone(),
            title: v2.title.clone(),
            directory: v2.directory.clone(),
            project: v2.project.clone(),
            model: v2.model.as_ref().map(ModelRef::to_string),
            updated_at: v2.updated_at,
        }
    }
}

/// Decodes `body`, stored as version `v` of `kind`, into the current version.
/// `None` when no upcaster exists for that (kind, version).
pub(crate) fn upcast(kind: EventKind, v: u32, body: &str) -> Option<serde_json::Result<Event>> {
    let v1_session = || serde_json::from_str::<AgentSessionInfoV1>(body).map(Into::into);
    match (kind, v) {
        (EventKind::AgentSessionSeen, 1) => Some(v1_session().map(Event::AgentSessionSeen)),
        (EventKind::AgentSessionChanged, 1) => Some(v1_session().map(Event::AgentSessionChanged)),
        _ => None,
    }
}

/// Every superseded (kind, version) with the JSON Schema of its body, for `schemas/events/`.
pub fn old_versions() -> Vec<(EventKind, u32, schemars::Schema)> {
    let v1 = || schemars::schema_for!(AgentSessionInfoV1);
    vec![
        (EventKind::AgentSessionSeen, 1, v1()),
        (EventKind::AgentSessionChanged, 1, v1()),
    ]
}
