//! `messages`: every user message's way from seen to answered or failed, and on to the backend.
//!
//! Invariants:
//! - a message is pending (`Seen`, `Prompting`) until it has an outcome; the first outcome
//!   stands (a late answer to a message already failed is ignored);
//! - a message is failed as soon as its `failMessage` is *planned*, with that command's reason,
//!   so nothing prompts it afterwards and the reason survives whatever becomes of the delivery;
//! - `undelivered` holds exactly the messages with an outcome the backend does not hold yet:
//!   what the reconciler must deliver (in rounds, until it lands) and what `/readyz` reports;
//! - an answer the backend refuses for good (a terminal `completeMessage` failure) turns into a
//!   failure with that reason, so the user learns something rather than nothing;
//! - only a message that is final *and* delivered ever leaves the view (`retention_swept`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Projection;
use crate::clock::Millis;
use crate::events::{
    ChatSessionId, ChatStatus, Command, Effect, Envelope, ErrorClass, Event, MessageId,
    MessageInfo, Op, Role,
};

/// The state of every user message, and which are still pending per chat session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessagesView {
    /// User messages by id.
    pub messages: BTreeMap<MessageId, MessageRow>,
    /// Pending (seen or prompting) messages per chat session, so that ending a session ends its
    /// messages without scanning them all.
    pub pending_by_chat: BTreeMap<ChatSessionId, BTreeSet<MessageId>>,
    /// Messages whose outcome the backend does not hold yet, with when they got it.
    #[serde(default)]
    pub undelivered: BTreeMap<MessageId, Millis>,
    /// The latest `before` of a `retention_swept` (0: none yet). Every message it dropped was
    /// written (by the backend's clock) before it, so an unknown message written before it is
    /// one that left the view, never news (`observe::backend_messages`).
    #[serde(default)]
    pub swept_before: Millis,
}

/// Where a user message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Seen, waiting to be prompted (or to be prompted again after a retryable failure).
    Seen,
    /// A prompt attempt is running.
    Prompting,
    /// The agent answered (see `delivered`).
    Answered,
    /// It failed, with a reason (see `delivered`).
    Failed,
    /// Its session ended before it was answered, with a reason (see `delivered`).
    Abandoned,
}

impl MessageState {
    /// Seen or prompting: still owed an answer or a failure.
    pub fn is_pending(self) -> bool {
        matches!(self, MessageState::Seen | MessageState::Prompting)
    }
}

/// One user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRow {
    /// Its chat session.
    pub chat_session_id: ChatSessionId,
    /// Where it stands.
    pub state: MessageState,
    /// Prompt attempts started.
    pub attempts: u32,
    /// When the user wrote it.
    pub timestamp: Millis,
    /// Its text, kept only while it may still be prompted.
    pub text: Option<String>,
    /// The agent's answer, kept only until the backend holds it.
    pub answer: Option<String>,
    /// Why it failed or was abandoned.
    pub reason: Option<String>,
    /// Whether the backend holds the outcome (answer or failure).
    pub delivered: bool,
    /// An incomplete assistant reply seen in the backend (a sign of an interrupted attempt).
    pub incomplete_reply: Option<MessageId>,
    /// When its state last changed.
    pub updated_at: Millis,
    /// The seq of the event that first showed it (its `backend_message_seen`): the cause of
    /// the commands that act on it.
    #[serde(default)]
    pub seen_seq: u64,
    /// The seq of the event that last changed its state: the cause of delivering its outcome.
    #[serde(default)]
    pub state_seq: u64,
    /// When the worker first saw it (its own clock): its deadline runs from here.
    #[serde(default)]
    pub seen_at: Millis,
}

impl MessagesView {
    /// Keeps `undelivered` in step with a message's state and `delivered` flag.
    fn track(&mut self, id: &MessageId, at: Millis) {
        match self.messages.get(id) {
            Some(row) if !row.state.is_pending() && !row.delivered => {
                self.undelivered.entry(id.clone()).or_insert(at);
            }
            _ => {
                self.undelivered.remove(id);
            }
        }
    }

    /// Marks the backend as holding a message's outcome.
    fn delivered(&mut self, id: &MessageId, at: Millis) {
        if let Some(row) = self.messages.get_mut(id) {
            row.delivered = true;
            row.answer = None;
            row.incomplete_reply = None;
        }
        self.track(id, at);
    }

    fn set_state(&mut self, id: &MessageId, state: MessageState, at: Millis, seq: u64) {
        self.set_state_untracked(id, state, at, seq);
        self.track(id, at);
    }

    fn set_state_untracked(&mut self, id: &MessageId, state: MessageState, at: Millis, seq: u64) {
        let Some(row) = self.messages.get_mut(id) else {
            return;
        };
        row.state = state;
        row.updated_at = at;
        row.state_seq = seq;
        if state.is_pending() {
            self.pending_by_chat
                .entry(row.chat_session_id.clone())
                .or_default()
                .insert(id.clone());
        } else {
            row.text = None;
            if let Some(set) = self.pending_by_chat.get_mut(&row.chat_session_id) {
                set.remove(id);
                if set.is_empty() {
                    self.pending_by_chat.remove(&row.chat_session_id);
                }
            }
        }
    }

    /// Ends a message with a reason unless it already has an outcome.
    fn end(
        &mut self,
        id: &MessageId,
        state: MessageState,
        reason: &str,
        delivered: bool,
        at: Millis,
        seq: u64,
    ) {
        let Some(row) = self.messages.get_mut(id) else {
            return;
        };
        if !row.state.is_pending() {
            return; // the first outcome stands
        }
        row.reason = Some(reason.to_owned());
        row.delivered = delivered;
        row.answer = None;
        self.set_state(id, state, at, seq);
    }

    /// An answer the backend will never take becomes the message's failure.
    fn undeliverable(&mut self, id: &MessageId, error: &str, at: Millis, seq: u64) {
        let Some(row) = self.messages.get_mut(id) else {
            return;
        };
        if row.state != MessageState::Answered || row.delivered {
            return;
        }
        row.answer = None;
        row.reason = Some(format!("the answer could not be delivered: {error}"));
        self.set_state(id, MessageState::Failed, at, seq);
    }

    fn abandon_session(&mut self, chat: &ChatSessionId, reason: &str, at: Millis, seq: u64) {
        let pending: Vec<MessageId> = self
            .pending_by_chat
            .get(chat)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in pending {
            self.end(&id, MessageState::Abandoned, reason, false, at, seq);
        }
    }

    fn observe(&mut self, m: &MessageInfo, at: Millis, seq: u64) {
        match m.role {
            Role::User => {
                if !self.messages.contains_key(&m.message_id) {
                    self.messages.insert(
                        m.message_id.clone(),
                        MessageRow {
                            chat_session_id: m.chat_session_id.clone(),
                            state: MessageState::Seen,
                            attempts: 0,
                            timestamp: m.timestamp,
                            text: Some(m.content.clone()),
                            answer: None,
                            reason: None,
                            delivered: false,
                            incomplete_reply: None,
                            updated_at: at,
                            seen_seq: seq,
                            state_seq: seq,
                            seen_at: at,
                        },
                    );
                    self.set_state(&m.message_id, MessageState::Seen, at, seq);
                } else if let Some(row) = self.messages.get_mut(&m.message_id) {
                    if row.state.is_pending() {
                        row.text = Some(m.content.clone());
                    }
                }
                if let Some(error) = &m.error {
                    self.end(&m.message_id, MessageState::Failed, error, true, at, seq);
                    self.delivered(&m.message_id, at);
                }
            }
            Role::Assistant => {
                let Some(user) = &m.reply_to else { return };
                if m.completed && m.error.is_none() {
                    let row = self
                        .messages
                        .entry(user.clone())
                        .or_insert_with(|| MessageRow {
                            chat_session_id: m.chat_session_id.clone(),
                            state: MessageState::Seen,
                            attempts: 0,
                            timestamp: m.timestamp,
                            text: None,
                            answer: None,
                            reason: None,
                            delivered: false,
                            incomplete_reply: None,
                            updated_at: at,
                            seen_seq: seq,
                            state_seq: seq,
                            seen_at: at,
                        });
                    row.reason = None;
                    self.set_state_untracked(user, MessageState::Answered, at, seq);
                    self.delivered(user, at);
                } else if let Some(row) = self.messages.get_mut(user) {
                    if !m.completed && row.state.is_pending() {
                        row.incomplete_reply = Some(m.message_id.clone());
                    }
                }
            }
        }
    }
}

impl Projection for MessagesView {
    const NAME: &'static str = "messages";
    // v2: a pending message whose failMessage gave up is failed.
    // v3: `seen_seq` and `state_seq`, the causes of the commands about a message.
    // v4: failed when its failMessage is planned; `undelivered`; `seen_at` (the deadline); an
    // answer refused for good becomes a failure. v5: `retention_swept` drops the delivered
    // messages it names; `swept_before`.
    const VERSION: u32 = 5;

    fn apply(&mut self, e: &Envelope) {
        match &e.event {
            Event::BackendMessageSeen(m) => self.observe(m, e.at, e.seq),
            Event::BackendSessionSeen(s) | Event::BackendSessionChanged(s) => match s.status {
                ChatStatus::Deleted => {
                    self.abandon_session(&s.chat_session_id, "session deleted", e.at, e.seq)
                }
                ChatStatus::Failed => {
                    self.abandon_session(&s.chat_session_id, "session failed", e.at, e.seq)
                }
                ChatStatus::Active => {}
            },
            Event::BackendSessionGone(s) => self.abandon_session(
                &s.chat_session_id,
                "session gone from the backend",
                e.at,
                e.seq,
            ),
            Event::AttemptStarted(b) if b.op == Op::Prompt => {
                if let Some(id) = &b.subject.message_id {
                    if self.messages.get(id).is_some_and(|r| r.state.is_pending()) {
                        if let Some(row) = self.messages.get_mut(id) {
                            row.attempts += 1;
                        }
                        self.set_state(id, MessageState::Prompting, e.at, e.seq);
                    }
                }
            }
            Event::CommandFailed(b) if b.op == Op::Prompt => {
                if let Some(id) = &b.subject.message_id {
                    match b.class {
                        ErrorClass::Retryable => {
                            if self
                                .messages
                                .get(id)
                                .is_some_and(|r| r.state == MessageState::Prompting)
                            {
                                self.set_state(id, MessageState::Seen, e.at, e.seq);
                            }
                        }
                        ErrorClass::Terminal => {
                            self.end(id, MessageState::Failed, &b.error, false, e.at, e.seq)
                        }
                    }
                }
            }
            // Failing a pending message (stale, orphaned, past its deadline) is decided when it
            // is planned: its reason stands whatever becomes of the delivery.
            Event::CommandPlanned(b) => {
                if let Command::FailMessage {
                    message_id, reason, ..
                } = &b.command
                {
                    self.end(message_id, MessageState::Failed, reason, false, e.at, e.seq);
                }
            }
            // The backend refused the answer for good: tell the user that instead.
            Event::CommandFailed(b)
                if b.op == Op::CompleteMessage && b.class == ErrorClass::Terminal =>
            {
                if let Some(id) = &b.subject.message_id {
                    self.undeliverable(id, &b.error, e.at, e.seq);
                }
            }
            Event::CommandDeadLettered(b) if b.op == Op::Prompt => {
                if let Some(id) = &b.subject.message_id {
                    let reason = format!("gave up after {} attempts: {}", b.attempts, b.last_error);
                    self.end(id, MessageState::Failed, &reason, false, e.at, e.seq);
                }
            }
            Event::CommandSucceeded(b) => match &b.effect {
                Effect::PromptAnswered {
                    message_id,
                    content,
                    ..
                } if self
                    .messages
                    .get(message_id)
                    .is_some_and(|r| r.state.is_pending()) =>
                {
                    if let Some(row) = self.messages.get_mut(message_id) {
                        row.answer = Some(content.clone());
                        row.delivered = false;
                    }
                    self.set_state(message_id, MessageState::Answered, e.at, e.seq);
                }
                Effect::MessageCompleted { message_id, .. } => {
                    self.set_state_untracked(message_id, MessageState::Answered, e.at, e.seq);
                    self.delivered(message_id, e.at);
                }
                Effect::MessageFailed {
                    message_id, reason, ..
                } => {
                    let keep = self
                        .messages
                        .get(message_id)
                        .is_some_and(|r| r.state == MessageState::Abandoned);
                    if let Some(row) = self.messages.get_mut(message_id) {
                        row.reason.get_or_insert_with(|| reason.clone());
                    }
                    if !keep {
                        self.set_state_untracked(message_id, MessageState::Failed, e.at, e.seq);
                    }
                    self.delivered(message_id, e.at);
                }
                Effect::SessionDeleted { chat_session_id } => {
                    self.abandon_session(chat_session_id, "session deleted", e.at, e.seq)
                }
                Effect::SessionFailed {
                    chat_session_id,
                    reason,
                } => self.abandon_session(
                    chat_session_id,
                    &format!("session failed: {reason}"),
                    e.at,
                    e.seq,
                ),
                _ => {}
            },
            Event::RetentionSwept(b) => self.sweep(&b.messages, b.before),
            _ => {}
        }
    }
}

impl MessagesView {
    /// Drops the named messages that are final and delivered (nothing more will happen to
    /// them), and remembers the horizon.
    fn sweep(&mut self, ids: &[MessageId], before: Millis) {
        for id in ids {
            if self
                .messages
                .get(id)
                .is_some_and(|r| !r.state.is_pending() && r.delivered)
            {
                self.messages.remove(id);
                self.undelivered.remove(id);
            }
        }
        self.swept_before = self.swept_before.max(before);
    }
}
