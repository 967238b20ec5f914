//! Events: the envelope, the catalogue of event kinds, and their encoding.
//!
//! Every change of state in agentsync is an [`Envelope`] in the log. An envelope carries a
//! sequence number, a UUID v7 id, a wall time, the schema version of its body, its kind, the body,
//! and the id of the event that caused it. On disk and on the wire an envelope is one JSON object:
//!
//! ```json
//! {"seq":7,"id":"0193…","at":1732192000000,"v":2,"kind":"agent_session_seen","body":{…},"cause":null}
//! ```
//!
//! Each kind has its own version. Reading an older version runs its upcaster (see [`upcast`]),
//! so the rest of the program only ever sees current shapes. A version newer than this binary
//! knows is an error, never a guess.

mod keys;
pub mod types;
pub mod upcast;

pub use keys::Key;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::clock::Millis;
pub use types::*;

/// Declares the event catalogue once: the [`Event`] enum, the [`EventKind`] enum, each kind's
/// wire name and current version, the typed decoder and the schema generator all come from this
/// one list, so they cannot drift apart.
macro_rules! event_catalogue {
    ($( $(#[$doc:meta])* $variant:ident($body:ty) = $name:literal, version $ver:literal; )*) => {
        /// One event: its kind and its body, in the current version.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        #[serde(untagged)]
        pub enum Event {
            $( $(#[$doc])* $variant($body), )*
        }

        /// The kind of an event, without its body.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind {
            $( $(#[$doc])* $variant, )*
        }

        impl EventKind {
            /// Every kind, in catalogue order.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant,)*];

            /// The wire name, e.g. `agent_session_seen`.
            pub fn name(self) -> &'static str {
                match self { $(EventKind::$variant => $name,)* }
            }

            /// The current schema version of this kind's body.
            pub fn version(self) -> u32 {
                match self { $(EventKind::$variant => $ver,)* }
            }

            /// The kind with this wire name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($name => Some(EventKind::$variant),)* _ => None }
            }

            /// The JSON Schema of this kind's current body.
            pub fn body_schema(self) -> schemars::Schema {
                match self { $(EventKind::$variant => schemars::schema_for!($body),)* }
            }

            /// Decodes a body that is in this kind's current version.
            fn decode_current(self, body: &str) -> serde_json::Result<Event> {
                match self { $(EventKind::$variant => serde_json::from_str(body).map(Event::$variant),)* }
            }
        }

        impl Event {
            /// This event's kind.
            pub fn kind(&self) -> EventKind {
                match self { $(Event::$variant(_) => EventKind::$variant,)* }
            }
        }
    };
}

event_catalogue! {
    // Observations of the agent server.
    /// An agent session seen in a listing.
    AgentSessionSeen(AgentSessionInfo) = "agent_session_seen", version 2;
    /// An agent session changed (event stream or a later listing).
    AgentSessionChanged(AgentSessionInfo) = "agent_session_changed", version 2;
    /// An agent session no longer exists.
    AgentSessionGone(AgentSessionGone) = "agent_session_gone", version 1;
    /// An agent session's status changed.
    AgentSessionStatus(AgentSessionStatus) = "agent_session_status", version 1;
    /// The worker started fetching the model list (durable before the call, so that a fetch
    /// cut short by a crash still counts as the window's one fetch).
    ModelsRequested(ModelsRequested) = "models_requested", version 1;
    /// The agent server's models were listed.
    ModelsListed(ModelsListed) = "models_listed", version 1;
    // Observations of the backend.
    /// A chat session seen in a backend listing.
    BackendSessionSeen(ChatSessionInfo) = "backend_session_seen", version 1;
    /// A chat session changed in the backend.
    BackendSessionChanged(ChatSessionInfo) = "backend_session_changed", version 1;
    /// A chat session disappeared from the backend.
    BackendSessionGone(BackendSessionGone) = "backend_session_gone", version 1;
    /// A message seen in the backend.
    BackendMessageSeen(MessageInfo) = "backend_message_seen", version 1;
    // Observations of either side.
    /// A listing of one source finished (complete or partial).
    ListingCompleted(ListingCompleted) = "listing_completed", version 1;
    /// An observation failed: a failure, never an empty result.
    ObservationFailed(ObservationFailed) = "observation_failed", version 1;
    /// An incremental read moved a feed's cursor (or first reached its end in a process).
    FeedRead(FeedRead) = "feed_read", version 1;
    // Decisions and outcomes.
    /// The reconciler planned a command.
    CommandPlanned(CommandPlanned) = "command_planned", version 1;
    /// The dispatcher started an attempt.
    AttemptStarted(AttemptStarted) = "attempt_started", version 1;
    /// A command succeeded.
    CommandSucceeded(CommandSucceeded) = "command_succeeded", version 1;
    /// An attempt failed.
    CommandFailed(CommandFailed) = "command_failed", version 1;
    /// A command ran out of attempts.
    CommandDeadLettered(CommandDeadLettered) = "command_dead_lettered", version 1;
    /// A command was dropped before running because its purpose is gone.
    CommandCancelled(CommandCancelled) = "command_cancelled", version 1;
    // Lifecycle.
    /// The worker process started.
    WorkerStarted(WorkerStarted) = "worker_started", version 1;
    /// The worker is Ready.
    WorkerReady(WorkerReady) = "worker_ready", version 1;
    /// The worker is draining.
    WorkerStopping(WorkerStopping) = "worker_stopping", version 1;
    /// The worker moved to another lifecycle state (every transition of `agentsync run`).
    WorkerState(WorkerStateChanged) = "worker_state", version 1;
    /// A spawned agent server is up.
    AgentServerStarted(AgentServerStarted) = "agent_server_started", version 1;
    /// A spawned agent server exited.
    AgentServerExited(AgentServerExited) = "agent_server_exited", version 1;
    /// The supervisor gave up on the agent server.
    AgentServerGaveUp(AgentServerGaveUp) = "agent_server_gave_up", version 1;
    /// A projection checkpoint was written.
    CheckpointWritten(CheckpointWritten) = "checkpoint_written", version 1;
    // Safeguards.
    /// The data directory was moved to another identity with `--adopt`.
    IdentityAdopted(IdentityAdopted) = "identity_adopted", version 1;
    /// A listing's deletions exceeded the limit and were held.
    DeletionsHeld(DeletionsHeld) = "deletions_held", version 1;
    /// A hold on deletions ended.
    DeletionHoldLifted(DeletionHoldLifted) = "deletion_hold_lifted", version 1;
    // Retention.
    /// Final rows older than the retention horizon left the live views.
    RetentionSwept(RetentionSwept) = "retention_swept", version 1;
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Event {
    /// The session ids (chat and agent) this event is about: the keys of the log's session index.
    pub fn session_ids(&self) -> Vec<&str> {
        fn subject(s: &Subject) -> Vec<&str> {
            let mut ids = Vec::with_capacity(2);
            ids.extend(s.chat_session_id.as_ref().map(|i| i.as_str()));
            ids.extend(s.agent_session_id.as_ref().map(|i| i.as_str()));
            ids
        }
        match self {
            Event::AgentSessionSeen(b) | Event::AgentSessionChanged(b) => {
                vec![b.agent_session_id.as_str()]
            }
            Event::AgentSessionGone(b) => vec![b.agent_session_id.as_str()],
            Event::AgentSessionStatus(b) => vec![b.agent_session_id.as_str()],
            Event::BackendSessionSeen(b) | Event::BackendSessionChanged(b) => {
                let mut ids = vec![b.chat_session_id.as_str()];
                ids.extend(b.agent_session_id.as_ref().map(|i| i.as_str()));
                ids
            }
            Event::BackendSessionGone(b) => vec![b.chat_session_id.as_str()],
            Event::BackendMessageSeen(b) => vec![b.chat_session_id.as_str()],
            Event::CommandPlanned(b) => {
                let r = b.command.subject_refs();
                let chat = r.chat_session_id.map(|i| i.as_str());
                chat.into_iter()
                    .chain(r.agent_session_id.map(|i| i.as_str()))
                    .collect()
            }
            Event::AttemptStarted(b) => subject(&b.subject),
            Event::CommandSucceeded(b) => subject(&b.subject),
            Event::CommandFailed(b) => subject(&b.subject),
            Event::CommandDeadLettered(b) => subject(&b.subject),
            Event::CommandCancelled(b) => subject(&b.subject),
            Event::ModelsListed(_)
            | Event::ModelsRequested(_)
            | Event::ListingCompleted(_)
            | Event::FeedRead(_)
            | Event::ObservationFailed(_)
            | Event::WorkerStarted(_)
            | Event::WorkerReady(_)
            | Event::WorkerStopping(_)
            | Event::WorkerState(_)
            | Event::AgentServerStarted(_)
            | Event::AgentServerExited(_)
            | Event::AgentServerGaveUp(_)
            | Event::CheckpointWritten(_)
            | Event::IdentityAdopted(_)
            | Event::DeletionsHeld(_)
            | Event::DeletionHoldLifted(_)
            | Event::RetentionSwept(_) => Vec::new(),
        }
    }

    /// The command id this event is about, if it is a decision or an outcome.
    pub fn command_id(&self) -> Option<&CommandId> {
        match self {
            Event::CommandPlanned(b) => Some(&b.command_id),
            Event::AttemptStarted(b) => Some(&b.command_id),
            Event::CommandSucceeded(b) => Some(&b.command_id),
            Event::CommandFailed(b) => Some(&b.command_id),
            Event::CommandDeadLettered(b) => Some(&b.command_id),
            Event::CommandCancelled(b) => Some(&b.command_id),
            _ => None,
        }
    }

    /// The user or assistant message this event is about, if any.
    pub fn message_id(&self) -> Option<&MessageId> {
        match self {
            Event::BackendMessageSeen(b) => Some(&b.message_id),
            Event::CommandPlanned(b) => b.command.subject_refs().message_id,
            Event::AttemptStarted(b) => b.subject.message_id.as_ref(),
            Event::CommandSucceeded(b) => b.subject.message_id.as_ref(),
            Event::CommandFailed(b) => b.subject.message_id.as_ref(),
            Event::CommandDeadLettered(b) => b.subject.message_id.as_ref(),
            Event::CommandCancelled(b) => b.subject.message_id.as_ref(),
            _ => None,
        }
    }
}

/// An event as stored: the body in its current version plus the envelope's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Position in the log, from 1, gapless and strictly increasing.
    pub seq: u64,
    /// A UUID v7 (time-ordered), unique across logs.
    pub id: Uuid,
    /// When it was appended (injected clock).
    pub at: Millis,
    /// The schema version of the body as *read*: always the kind's current version, because older
    /// versions are upcast on decode.
    pub v: u32,
    /// The event itself.
    pub event: Event,
    /// The id of the event that caused this one, if any.
    pub cause: Option<Uuid>,
}

/// An event to append: the log assigns its sequence number. Its id is chosen here, so that
/// events appended in one batch can already name each other as causes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Its id: a UUID v7 whose time part is `at`.
    pub id: Uuid,
    /// The event.
    pub event: Event,
    /// When it happened (injected clock).
    pub at: Millis,
    /// The id of the event that caused it.
    pub cause: Option<Uuid>,
}

impl NewEvent {
    /// An event at `at` with no cause.
    pub fn new(event: Event, at: Millis) -> Self {
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            at / 1000,
            ((at % 1000) * 1_000_000) as u32,
        );
        Self {
            id: Uuid::new_v7(ts),
            event,
            at,
            cause: None,
        }
    }

    /// Sets the causing event.
    pub fn caused_by(mut self, cause: Option<Uuid>) -> Self {
        self.cause = cause;
        self
    }
}

impl Envelope {
    /// This event's kind.
    pub fn kind(&self) -> EventKind {
        self.event.kind()
    }

    /// The stored form: one JSON object.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        // Serializing plain data into a Vec cannot fail.
        serde_json::to_writer(&mut out, self).expect("events serialize infallibly");
        out
    }

    /// Decodes a stored envelope, upcasting an older body version to the current one.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let wire: WireIn<'_> = serde_json::from_slice(bytes).map_err(DecodeError::Envelope)?;
        let kind = EventKind::from_name(&wire.kind)
            .ok_or_else(|| DecodeError::UnknownKind(wire.kind.to_string()))?;
        let current = kind.version();
        let body = wire.body.get();
        let event = if wire.v == current {
            kind.decode_current(body)
        } else if wire.v > current {
            return Err(DecodeError::NewerVersion {
                kind: kind.name(),
                v: wire.v,
                known: current,
            });
        } else {
            upcast::upcast(kind, wire.v, body).ok_or(DecodeError::UnknownVersion {
                kind: kind.name(),
                v: wire.v,
            })?
        }
        .map_err(|source| DecodeError::Body {
            kind: kind.name(),
            v: wire.v,
            source,
        })?;
        Ok(Envelope {
            seq: wire.seq,
            id: wire.id,
            at: wire.at,
            v: current,
            event,
            cause: wire.cause,
        })
    }
}

impl Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Envelope", 7)?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("at", &self.at)?;
        st.serialize_field("v", &self.v)?;
        st.serialize_field("kind", self.kind().name())?;
        st.serialize_field("body", &self.event)?;
        st.serialize_field("cause", &self.cause)?;
        st.end()
    }
}

/// The envelope as read, with the body left unparsed until its kind and version are known.
#[derive(Deserialize)]
struct WireIn<'a> {
    seq: u64,
    id: Uuid,
    at: Millis,
    v: u32,
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    body: &'a RawValue,
    #[serde(default)]
    cause: Option<Uuid>,
}

/// Why a stored event could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not an envelope at all (bad JSON, missing fields).
    #[error("not a valid event envelope: {0}")]
    Envelope(#[source] serde_json::Error),
    /// A kind this binary does not know: written by a newer agentsync, or corrupt.
    #[error("unknown event kind `{0}` (written by a newer agentsync?)")]
    UnknownKind(String),
    /// A version newer than this binary knows.
    #[error(
        "`{kind}` version {v} is newer than this binary knows (up to {known}): upgrade agentsync"
    )]
    NewerVersion {
        /// The kind.
        kind: &'static str,
        /// The stored version.
        v: u32,
        /// The newest version this binary knows.
        known: u32,
    },
    /// An old version with no upcaster (a bug: upcasters are never removed).
    #[error("`{kind}` version {v} has no upcaster")]
    UnknownVersion {
        /// The kind.
        kind: &'static str,
        /// The stored version.
        v: u32,
    },
    /// The body does not match its kind and version.
    #[error("`{kind}` v{v} body does not match its schema: {source}")]
    Body {
        /// The kind.
        kind: &'static str,
        /// The stored version.
        v: u32,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// The envelope's wire shape, for its JSON Schema.
#[allow(dead_code)]
#[derive(schemars::JsonSchema)]
#[schemars(
    title = "Envelope",
    description = "One event as stored in the log and printed by `export`."
)]
struct EnvelopeSchema {
    /// Position in the log, from 1, gapless.
    seq: u64,
    /// UUID v7 (time-ordered).
    id: Uuid,
    /// Wall time in milliseconds since the Unix epoch.
    at: u64,
    /// Schema version of `body` for this `kind`.
    v: u32,
    /// The event kind; see `KIND.vN.json` for each body.
    kind: String,
    /// The body: its schema is `KIND.vV.json`.
    body: serde_json::Value,
    /// The id of the event that caused this one.
    cause: Option<Uuid>,
}

/// Every JSON Schema of the event format, as `(file name, schema)`: the envelope, and every
/// version of every kind's body. `schemas/events/` holds these, and a test keeps them in step.
pub fn schemas() -> Vec<(String, serde_json::Value)> {
    let mut envelope = schemars::schema_for!(EnvelopeSchema);
    let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
    if let Some(kind) = envelope
        .get_mut("properties")
        .and_then(|p| p.get_mut("kind"))
        .and_then(|k| k.as_object_mut())
    {
        kind.insert("enum".into(), serde_json::json!(names));
    }
    let mut out = vec![("envelope.json".to_owned(), envelope.to_value())];
    let titled = |kind: EventKind, v: u32, mut s: schemars::Schema| {
        s.insert("title".into(), format!("{} v{v}", kind.name()).into());
        (format!("{}.v{v}.json", kind.name()), s.to_value())
    };
    for &kind in EventKind::ALL {
        out.push(titled(kind, kind.version(), kind.body_schema()));
    }
    for (kind, v, schema) in upcast::old_versions() {
        out.push(titled(kind, v, schema));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
