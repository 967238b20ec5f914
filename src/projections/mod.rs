//! Projections: pure folds of the event log into the views the reconciler reads.
//!
//! A projection is a name, a version and `apply(&mut self, &Envelope)`. It does no I/O and reads
//! no clock: the same events always fold to the same state, which is what makes checkpoints,
//! `replay --at` and `rebuild --verify` trustworthy. Bump `VERSION` whenever the state's shape or
//! the fold's meaning changes: a stored checkpoint of another version is ignored and that
//! projection alone is rebuilt from the log.

mod commands;
mod index;
mod margin;
mod messages;
mod sessions;

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use commands::{CommandLedger, CommandState, LedgerEntry, OpenCommand};
pub use index::SessionIndex;
pub use margin::{AgentMargin, AGENT_SINCE_MARGIN_MS};
pub use messages::{MessageRow, MessageState, MessagesView};
pub use sessions::{
    rows_named, AgentSessionRow, ChatSessionRow, DeletionHold, FeedState, ListingState, ModelCache,
    SessionsView, SettledPair, MODELS_OPERATION, TOMBSTONE_MS,
};

use crate::events::Envelope;

/// A pure fold of events into a view.
pub trait Projection:
    Default + Clone + PartialEq + fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Its name: the checkpoint's file name and the CLI's `--projection` value.
    const NAME: &'static str;
    /// Its version: bump it when the state or the fold changes.
    const VERSION: u32;
    /// Folds one event in. Must be deterministic and must not fail: an event that makes no
    /// sense for this view is ignored.
    fn apply(&mut self, event: &Envelope);
    /// Rebuilds what the state derives and does not store (its indexes), after it was read
    /// from a checkpoint.
    fn loaded(&mut self) {}
}

/// A projection's state at a point of the log: what a checkpoint stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint<S> {
    /// The projection's name.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// The last sequence number folded in (0: none).
    pub seq: u64,
    /// The state.
    pub state: S,
}

/// A projection with the last sequence number it has applied.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tracked<P> {
    /// The state.
    pub state: P,
    /// The last sequence number applied.
    pub seq: u64,
}

impl<P: Projection> Tracked<P> {
    /// Starts from a checkpoint, rebuilding the state a checkpoint does not store (the
    /// sessions view's index): here only, once (`CheckpointStore::load` leaves it; at 100,000
    /// sessions a second build cost a fifth of the start-up).
    pub fn from_checkpoint(mut c: Checkpoint<P>) -> Self {
        c.state.loaded();
        Tracked {
            state: c.state,
            seq: c.seq,
        }
    }

    /// Applies `event` unless it is already folded in.
    pub fn apply(&mut self, event: &Envelope) {
        if event.seq > self.seq {
            self.state.apply(event);
            self.seq = event.seq;
        }
    }

    /// The checkpoint of the current state.
    pub fn checkpoint(&self) -> Checkpoint<P> {
        Checkpoint {
            name: P::NAME.to_owned(),
            version: P::VERSION,
            seq: self.seq,
            state: self.state.clone(),
        }
    }
}

/// The names of the projections, for the command line and for erasing their types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjectionName {
    /// [`SessionsView`].
    Sessions,
    /// [`MessagesView`].
    Messages,
    /// [`CommandLedger`].
    Commands,
}

impl ProjectionName {
    /// Every projection.
    pub const ALL: [ProjectionName; 3] = [Self::Sessions, Self::Messages, Self::Commands];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sessions => SessionsView::NAME,
            Self::Messages => MessagesView::NAME,
            Self::Commands => CommandLedger::NAME,
        }
    }

    /// Its current version.
    pub fn version(self) -> u32 {
        match self {
            Self::Sessions => SessionsView::VERSION,
            Self::Messages => MessagesView::VERSION,
            Self::Commands => CommandLedger::VERSION,
        }
    }
}

impl fmt::Display for ProjectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProjectionName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown projection `{s}` (expected sessions, messages or commands)")
            })
    }
}

/// All projections, each with its own position in the log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Views {
    /// The active-session view.
    pub sessions: Tracked<SessionsView>,
    /// Each message's state.
    pub messages: Tracked<MessagesView>,
    /// The command ledger.
    pub commands: Tracked<CommandLedger>,
}

impl Views {
    /// Applies `event` to every projection that has not seen it.
    pub fn apply(&mut self, event: &Envelope) {
        self.sessions.apply(event);
        self.messages.apply(event);
        self.commands.apply(event);
    }

    /// The lowest position among the projections: where a catch-up must start reading.
    pub fn min_seq(&self) -> u64 {
        self.sessions
            .seq
            .min(self.messages.seq)
            .min(self.commands.seq)
    }

    /// The state of one projection as JSON (for printing and diffing).
    pub fn to_json(&self, name: ProjectionName) -> serde_json::Value {
        let v = match name {
            ProjectionName::Sessions => serde_json::to_value(&self.sessions.state),
            ProjectionName::Messages => serde_json::to_value(&self.messages.state),
            ProjectionName::Commands => serde_json::to_value(&self.commands.state),
        };
        v.expect("projection state serializes")
    }

    /// The position of one projection.
    pub fn seq(&self, name: ProjectionName) -> u64 {
        match name {
            ProjectionName::Sessions => self.sessions.seq,
            ProjectionName::Messages => self.messages.seq,
            ProjectionName::Commands => self.commands.seq,
        }
    }
}

/// Every difference between two JSON states, as `path: left -> right` lines (JSON Pointer paths).
/// Empty when they are equal.
pub fn diff_states(left: &serde_json::Value, right: &serde_json::Value) -> Vec<String> {
    let patch = json_patch::diff(left, right);
    patch
        .0
        .iter()
        .map(|op| {
            use json_patch::PatchOperation as P;
            let show = |v: Option<&serde_json::Value>| {
                v.map(|v| {
                    let s = v.to_string();
                    if s.len() > 120 {
                        format!("{}…", &s[..s.floor_char_boundary(120)])
                    } else {
                        s
                    }
                })
                .unwrap_or_else(|| "(absent)".into())
            };
            match op {
                P::Add(a) => format!("{}: (absent) -> {}", a.path, show(Some(&a.value))),
                P::Remove(r) => format!(
                    "{}: {} -> (absent)",
                    r.path,
                    show(left.pointer(r.path.as_str()))
                ),
                P::Replace(r) => format!(
                    "{}: {} -> {}",
                    r.path,
                    show(left.pointer(r.path.as_str())),
                    show(Some(&r.value))
                ),
                other => format!("{other:?}"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;

    fn env(seq: u64, event: Event) -> Envelope {
        Envelope {
            seq,
            id: uuid::Uuid::nil(),
            at: 1_000 * seq,
            v: event.kind().version(),
            event,
            cause: None,
        }
    }

    fn chat(project: Option<&str>, model: Option<&str>, status: ChatStatus) -> Event {
        Event::BackendSessionChanged(ChatSessionInfo {
            chat_session_id: "c1".into(),
            agent_session_id: Some("a1".into()),
            title: "t".into(),
            model: model.map(Into::into),
            status,
            last_activity: 5,
            project: project.map(Into::into),
        })
    }

    #[test]
    fn a_later_observation_backfills_an_empty_field_but_never_overwrites_one() {
        let mut v = SessionsView::default();
        v.apply(&env(1, chat(None, Some("p/m"), ChatStatus::Active)));
        v.apply(&env(2, chat(Some("proj"), None, ChatStatus::Active)));
        v.apply(&env(
            3,
            chat(Some("other"), Some("p/other"), ChatStatus::Active),
        ));
        let row = &v.chat[&ChatSessionId::from("c1")];
        assert_eq!(row.project.as_deref(), Some("proj"));
        assert_eq!(row.model.as_deref(), Some("p/m"));
        assert_eq!(row.linked_seq, Some(1));
    }

    #[test]
    fn pending_messages_of_a_deleted_session_are_abandoned_with_a_reason() {
        let mut v = MessagesView::default();
        let msg = |id: &str| {
            Event::BackendMessageSeen(MessageInfo {
                chat_session_id: "c1".into(),
                message_id: id.into(),
                role: Role::User,
                content: "hi".into(),
                completed: true,
                timestamp: 1,
                reply_to: None,
                error: None,
            })
        };
        v.apply(&env(1, msg("m1")));
        v.apply(&env(2, msg("m2")));
        let answered = Event::CommandSucceeded(CommandSucceeded {
            command_id: "p".into(),
            op: Op::Prompt,
            subject: Subject::default(),
            attempt: 1,
            effect: Effect::PromptAnswered {
                chat_session_id: "c1".into(),
                message_id: "m1".into(),
                content: "yo".into(),
            },
        });
        v.apply(&env(3, answered));
        v.apply(&env(4, chat(None, None, ChatStatus::Deleted)));
        assert_eq!(
            v.messages[&MessageId::from("m1")].state,
            MessageState::Answered
        );
        let m2 = &v.messages[&MessageId::from("m2")];
        assert_eq!(m2.state, MessageState::Abandoned);
        assert_eq!(m2.reason.as_deref(), Some("session deleted"));
        assert!(
            m2.text.is_none(),
            "text is dropped once it cannot be prompted"
        );
        assert!(v.pending_by_chat.is_empty());
    }

    #[test]
    fn re_planning_an_id_changes_nothing_and_final_commands_drop_their_body() {
        let mut l = CommandLedger::default();
        let plan = |reason: &str| {
            Event::CommandPlanned(CommandPlanned {
                command_id: "rename:c1".into(),
                command: Command::RenameSession {
                    chat_session_id: "c1".into(),
                    title: "x".into(),
                },
                reason: reason.into(),
            })
        };
        l.apply(&env(1, plan("first")));
        l.apply(&env(2, plan("second")));
        let id = CommandId::from("rename:c1");
        assert_eq!(l.commands[&id].open.as_ref().unwrap().reason, "first");
        assert_eq!(l.commands[&id].planned_seq, 1);
        let subject = Subject::default();
        l.apply(&env(
            3,
            Event::CommandFailed(CommandFailed {
                command_id: id.clone(),
                op: Op::RenameSession,
                subject,
                attempt: 1,
                class: ErrorClass::Terminal,
                error: "HTTP 400".into(),
                next_attempt_at: None,
            }),
        ));
        let e = &l.commands[&id];
        assert!(e.is_final());
        assert!(e.command().is_none() && e.open.is_none());
        assert_eq!(l.open().count(), 0);
    }
}
