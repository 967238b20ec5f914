//! A simulated backend: the Convex contract in memory, idempotent on `commandId`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use super::{CallStats, Faults, Harness};
use crate::clock::{Clock, Millis};
use crate::events::*;
use crate::ports::{Backend, MutationReply, Page, PortError, PortFuture};

/// The simulated backend.
pub struct SimBackend {
    h: Harness,
    state: Mutex<BackendState>,
}

#[derive(Default)]
struct BackendState {
    sessions: BTreeMap<ChatSessionId, ChatSessionInfo>,
    messages: BTreeMap<MessageId, MessageInfo>,
    /// The replies to each message, by id (the module's `by_reply` index in
    /// `examples/convex/schema.ts`): a completion finds its reply without a scan of every
    /// message ever written, which made the soak's simulated days grow with history.
    replies: HashMap<MessageId, BTreeSet<MessageId>>,
    /// Message ids in the order they changed: `listMessages`' cursor is a position here.
    changes: Vec<MessageId>,
    /// Chat session ids in the order they changed: `listSessions`' cursor is a position here;
    /// an entry counts only at the session's latest position (`session_at`).
    session_changes: Vec<ChatSessionId>,
    session_at: HashMap<ChatSessionId, usize>,
    /// Replies of the commands applied, by id: a repeat gets the first reply.
    applied: HashMap<CommandId, MutationReply>,
    /// How many times each command changed the state (at most once, by the table above).
    effects: BTreeMap<CommandId, u32>,
    next_chat: u64,
    listings: u32,
}

impl BackendState {
    /// The replies to `message` not completed yet, in id order (the order a scan of
    /// `messages` found them in).
    fn open_reply_ids(&self, message: &MessageId) -> Vec<MessageId> {
        let Some(ids) = self.replies.get(message) else {
            return Vec::new();
        };
        ids.iter()
            .filter(|id| self.messages.get(*id).is_some_and(|m| !m.completed))
            .cloned()
            .collect()
    }

    fn touch(&mut self, id: &MessageId) {
        self.changes.push(id.clone());
    }

    /// A chat session to change (each change moves it to the end of the change log); the
    /// contract's answer for an unknown one is an error.
    fn chat_mut(&mut self, id: &ChatSessionId) -> Result<&mut ChatSessionInfo, PortError> {
        if !self.sessions.contains_key(id) {
            return Err(PortError::terminal(format!("no chat session {id}")));
        }
        self.touch_session(id);
        Ok(self.sessions.get_mut(id).expect("checked"))
    }

    fn touch_session(&mut self, id: &ChatSessionId) {
        self.session_at
            .insert(id.clone(), self.session_changes.len());
        self.session_changes.push(id.clone());
    }

    fn put_session(&mut self, info: ChatSessionInfo) {
        let id = info.chat_session_id.clone();
        self.sessions.insert(id.clone(), info);
        self.touch_session(&id);
    }

    fn put_message(&mut self, m: MessageInfo) {
        let id = m.message_id.clone();
        if let Some(to) = &m.reply_to {
            self.replies
                .entry(to.clone())
                .or_default()
                .insert(id.clone());
        }
        self.messages.insert(id.clone(), m);
        self.touch(&id);
    }
}

impl SimBackend {
    /// An empty backend.
    pub fn new(clock: Arc<dyn Clock>, faults: Faults) -> Self {
        Self {
            h: Harness::new(clock, faults),
            state: Mutex::new(BackendState::default()),
        }
    }

    /// Adds a chat session directly (the scenario's starting point).
    pub fn insert_session(&self, info: ChatSessionInfo) {
        self.lock().put_session(info);
    }

    /// Removes a chat session directly, for good (deleted from the database by hand): only a
    /// complete listing shows it gone, as in Convex, where a deleted document is simply absent.
    pub fn remove_session(&self, id: &ChatSessionId) {
        let mut s = self.lock();
        s.sessions.remove(id);
        s.session_at.remove(id);
    }

    /// Adds or replaces a message directly (a user writing in the web app).
    pub fn insert_message(&self, m: MessageInfo) {
        self.lock().put_message(m);
    }

    /// The chat sessions it holds.
    pub fn sessions(&self) -> BTreeMap<ChatSessionId, ChatSessionInfo> {
        self.lock().sessions.clone()
    }

    /// The messages it holds.
    pub fn messages(&self) -> BTreeMap<MessageId, MessageInfo> {
        self.lock().messages.clone()
    }

    /// How many times each command id changed the state.
    pub fn effects(&self) -> BTreeMap<CommandId, u32> {
        self.lock().effects.clone()
    }

    /// How many full session listings (`listSessions` from no cursor) it was asked for.
    pub fn full_listings(&self) -> u32 {
        self.lock().listings
    }

    /// Its call counters.
    pub fn stats(&self) -> CallStats {
        self.h.stats()
    }

    /// Replaces its faults.
    pub fn set_faults(&self, faults: Faults) {
        *self.h.faults.lock().expect("faults") = faults;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BackendState> {
        self.state.lock().expect("sim backend state")
    }

    fn apply(&self, id: &CommandId, command: &Command) -> Result<MutationReply, PortError> {
        let now = self.h.clock.now_ms();
        let mut s = self.lock();
        if let Some(reply) = s.applied.get(id) {
            return Ok(reply.clone());
        }
        let reply = match command {
            Command::CreateSession {
                agent_session_id,
                title,
                model,
            } => {
                s.next_chat += 1;
                let chat = ChatSessionId(format!("chat_sim{:06}", s.next_chat));
                s.put_session(ChatSessionInfo {
                    chat_session_id: chat.clone(),
                    agent_session_id: Some(agent_session_id.clone()),
                    title: title.clone(),
                    model: model.clone(),
                    status: ChatStatus::Active,
                    last_activity: now,
                    project: None,
                });
                MutationReply::Created(chat)
            }
            Command::LinkAgentSession {
                chat_session_id,
                agent_session_id,
            } => {
                let c = s.chat_mut(chat_session_id)?;
                c.agent_session_id = Some(agent_session_id.clone());
                MutationReply::Done
            }
            Command::RenameSession {
                chat_session_id,
                title,
            } => {
                let c = s.chat_mut(chat_session_id)?;
                c.title.clone_from(title);
                MutationReply::Done
            }
            Command::MarkSessionDeleted { chat_session_id } => {
                let c = s.chat_mut(chat_session_id)?;
                c.status = ChatStatus::Deleted;
                MutationReply::Done
            }
            Command::MarkSessionFailed {
                chat_session_id, ..
            } => {
                let c = s.chat_mut(chat_session_id)?;
                c.status = ChatStatus::Failed;
                MutationReply::Done
            }
            Command::CompleteMessage {
                chat_session_id,
                message_id,
                content,
            } => {
                let reply = s.open_reply_ids(message_id).into_iter().next();
                let mut m = match reply.and_then(|id| s.messages.get(&id).cloned()) {
                    Some(m) => m,
                    None => MessageInfo {
                        chat_session_id: chat_session_id.clone(),
                        message_id: MessageId(format!("{message_id}-reply")),
                        role: Role::Assistant,
                        content: String::new(),
                        completed: false,
                        timestamp: now,
                        reply_to: Some(message_id.clone()),
                        error: None,
                    },
                };
                m.content.clone_from(content);
                m.completed = true;
                s.put_message(m);
                MutationReply::Done
            }
            Command::FailMessage {
                message_id, reason, ..
            } => {
                let mut touched = Vec::new();
                if let Some(m) = s.messages.get_mut(message_id) {
                    m.error = Some(reason.clone());
                    touched.push(message_id.clone());
                }
                for id in s.open_reply_ids(message_id) {
                    if let Some(m) = s.messages.get_mut(&id) {
                        m.error = Some(reason.clone());
                        touched.push(id);
                    }
                }
                for id in touched {
                    s.touch(&id);
                }
                MutationReply::Done
            }
            Command::CreateAgentSession { .. }
            | Command::Prompt { .. }
            | Command::AbortAgentSession { .. } => {
                return Err(PortError::terminal(format!(
                    "{} is not a backend function",
                    command.op()
                )))
            }
        };
        s.applied.insert(id.clone(), reply.clone());
        *s.effects.entry(id.clone()).or_default() += 1;
        Ok(reply)
    }
}

fn cursor_of(cursor: Option<&str>) -> Result<usize, PortError> {
    match cursor {
        None => Ok(0),
        Some(c) => c
            .parse()
            .map_err(|_| PortError::terminal(format!("bad cursor {c:?}"))),
    }
}

impl Backend for SimBackend {
    fn list_sessions<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<ChatSessionInfo>> {
        Box::pin(async move {
            let from = cursor_of(cursor)?;
            let n = {
                let mut s = self.lock();
                if from == 0 {
                    s.listings += 1;
                }
                s.listings
            };
            let _call = self.h.call("listSessions", 0).await?;
            let faults = self.h.faults();
            if faults.failed_listings.contains(&n) && from == 0 {
                return Err(PortError::retryable("listSessions: 500 internal error"));
            }
            if faults.partial_listings.contains(&n) && from > 0 {
                return Err(PortError::retryable("listSessions: page timed out"));
            }
            let page = {
                let s = self.lock();
                let mut page = Vec::new();
                let mut next = from;
                while next < s.session_changes.len() && page.len() < limit as usize {
                    let id = &s.session_changes[next];
                    if s.session_at.get(id) == Some(&next) {
                        page.extend(s.sessions.get(id).cloned());
                    }
                    next += 1;
                }
                Page {
                    is_done: next >= s.session_changes.len(),
                    continue_cursor: next.to_string(),
                    page,
                }
            };
            self.h.hold_back().await;
            Ok(page)
        })
    }

    fn list_messages<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<MessageInfo>> {
        Box::pin(async move {
            let from = cursor_of(cursor)?;
            let _call = self.h.call("listMessages", 0).await?;
            let page = {
                let s = self.lock();
                // A cursor past the end (another backend's) reads nothing, as Convex's
                // `changesAfter` does, instead of panicking on the slice.
                let start = from.min(s.changes.len());
                let to = (from + limit as usize).min(s.changes.len()).max(start);
                let mut seen = std::collections::HashSet::new();
                let page = s.changes[start..to]
                    .iter()
                    .filter(|id| seen.insert(*id))
                    .filter_map(|id| s.messages.get(id).cloned())
                    .collect();
                Page {
                    page,
                    is_done: to >= s.changes.len(),
                    continue_cursor: to.max(from).to_string(),
                }
            };
            self.h.hold_back().await;
            Ok(page)
        })
    }

    fn mutate<'a>(
        &'a self,
        command_id: &'a CommandId,
        command: &'a Command,
    ) -> PortFuture<'a, MutationReply> {
        Box::pin(async move {
            let _call = self.h.call(command.op().name(), 0).await?;
            let reply = self.apply(command_id, command)?;
            self.h.reply(command.op().name()).await?;
            Ok(reply)
        })
    }
}

/// Helper for scenarios: a user message.
pub fn user_message(chat: &ChatSessionId, id: &str, text: &str, at: Millis) -> MessageInfo {
    MessageInfo {
        chat_session_id: chat.clone(),
        message_id: MessageId(id.to_owned()),
        role: Role::User,
        content: text.to_owned(),
        completed: true,
        timestamp: at,
        reply_to: None,
        error: None,
    }
}
