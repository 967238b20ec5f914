//! The backend contract, implemented once: [`ContractStore`] answers every function of
//! [`contract`](super::contract) over a small ordered key-value store ([`Kv`]), idempotent on
//! `commandId` (the first reply is recorded and repeated). The embedded local backend runs it on
//! a sled tree; the fake Convex deployment of the tests runs it in memory; so both keep exactly
//! the same promises, and one conformance suite checks both.
//!
//! Every mutation is one atomic [`Kv::commit`] of all the keys it changes, including its
//! `commandId`, under one lock: a crash leaves it applied entirely or not at all.
//!
//! Keys (all UTF-8):
//! - `s/{chat}`: a chat session (with its worker and change number); `w/{worker}/{chat}`: the
//!   per-worker index by id; `c/{worker}/{change:020}`: the per-worker change log of sessions
//!   that `listSessions` pages through (one entry per session: the old one goes when it changes,
//!   and every write of a session, create, link, rename, delete, fail, activity, changes it);
//!   `cn/{worker}`: set once the sessions written before the change log existed were numbered;
//! - `m/{message}`: a message with its change number; `x/{change:020}`: the change log that
//!   `listMessages` pages through (one entry per message: the old one goes when it changes);
//! - `sm/{chat}/{message}`: a session's messages; `r/{message}`: the reply to a user message;
//! - `a/{commandId}`: the recorded reply of an applied mutation; `ap/{appliedAt:020}/{commandId}`:
//!   when it was applied, the order in which [`ContractStore::prune_applied`] forgets them
//!   (ids applied before that index existed have none and are kept); `n`: the change counter;
//! - `o/{worker}/{chat}`: the chat sessions a person opened (the inbox) that are still active;
//!   `p/{worker}/{message}`: the user messages posted since that index existed that have neither
//!   an answer nor a failure. They let the inbox cap both without reading every record.
//!
//! Chat session and message ids are random (`chat_` or `msg_` and 128 bits from the operating
//! system's CSPRNG, in hex): an id is no capability, yet nothing can be reached by counting.
//! Nothing orders by id: listings page by change number (sessions and messages), and a
//! conversation is in creation order (each message records the change number that created it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::contract::*;
use crate::clock::Clock;
use crate::events::{ChatStatus, Role};

/// An error of the store itself (I/O), not of the caller.
#[derive(Debug, thiserror::Error)]
#[error("backend store: {0}")]
pub struct StoreError(pub String);

/// What a function call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The function refused the call (unknown session, bad arguments): Convex's "the function
    /// threw", HTTP 560. Repeating it will not help.
    #[error("{0}")]
    Function(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An ordered key-value store with atomic multi-key commits.
pub trait Kv: Send + Sync {
    /// The value at `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries whose keys start with `prefix`, after `after` (exclusive) when
    /// given, in key order.
    fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies every write at once (`None` removes), durably.
    fn commit(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), StoreError>;
}

/// The contract over a [`Kv`].
pub struct ContractStore<K: Kv> {
    kv: K,
    clock: Arc<dyn Clock>,
    lock: Mutex<()>,
    /// How long an applied command id is remembered ([`APPLIED_WINDOW_MS`] unless set).
    applied_window_ms: AtomicU64,
    /// When applied ids were last pruned (0: not yet in this process).
    pruned_at: AtomicU64,
}

/// How long the backend remembers an applied command id by default: 8 days, a day more than
/// the worker's default retention horizon (7 days). The worker never sends an id again once
/// the horizon has passed since it was planned (`DispatchConfig::retry_horizon_ms`), so every
/// repeat of an id falls within the window of its first application, and is answered with its
/// recorded reply. The day is the margin for the two clocks. A worker run with a longer
/// `--retention-days` needs a window at least that long (the local backend follows it).
pub const APPLIED_WINDOW_MS: u64 = 8 * 24 * 60 * 60 * 1000;

/// Applied ids are pruned at most this often (on a mutation), in batches of [`PRUNE_BATCH`].
const PRUNE_EVERY_MS: u64 = 60 * 60 * 1000;
const PRUNE_BATCH: usize = 1_000;

#[derive(Debug, Serialize, Deserialize)]
struct StoredSession {
    worker_id: String,
    session: ChatSession,
    /// Why `markSessionFailed` failed it (the contract's listing does not carry it; the app
    /// shows it). Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_reason: Option<String>,
    /// Its entry in the worker's change log (`c/{worker}/{change:020}`); 0 in records written
    /// before sessions had one (numbered at the first full listing, `number_old_sessions`).
    #[serde(default)]
    change: u64,
}

/// The most message bytes one `listMessages` page carries (the content and the other fields,
/// as JSON), beyond the first message: a page stops before the message that would pass it.
/// Convex reads at most 16 MiB per transaction and returns at most 16 MiB
/// (`crates/common/src/knobs.rs:585`, `TRANSACTION_MAX_READ_SIZE_BYTES`; `:419`,
/// `FUNCTION_MAX_RESULT_SIZE`) and a message is at most 1 MiB (`crates/common/src/document.rs:100`,
/// `MAX_USER_SIZE`), so a page of at most 4 MiB + one message stays well inside both, and a
/// page is never empty while messages remain: the cursor always moves. The Convex module
/// (`examples/convex/agentsync.ts`, `PAGE_BYTES`) uses the same bound.
pub const MESSAGE_PAGE_BYTES: usize = 4 << 20;

/// The size a message counts for against [`MESSAGE_PAGE_BYTES`]: its JSON.
pub fn message_bytes(m: &Message) -> usize {
    serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX)
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredMessage {
    change: u64,
    /// The change number that created it: the conversation's order. 0 in records written
    /// before it was kept; their ids (`msg_` and that number) carry it.
    #[serde(default)]
    created: u64,
    message: Message,
}

impl StoredMessage {
    /// The position of the message in its conversation.
    fn order(&self) -> u64 {
        if self.created != 0 {
            return self.created;
        }
        self.message
            .message_id
            .strip_prefix("msg_")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// A call refused because a limit of [`ContractStore::open_chat_capped`] or
/// [`ContractStore::post_user_message_capped`] was reached, or failed.
#[derive(Debug, thiserror::Error)]
pub enum Capped {
    /// The limit was reached: nothing was written.
    #[error("{0}")]
    Full(String),
    /// The call failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl From<StoreError> for Capped {
    fn from(e: StoreError) -> Self {
        Self::Call(CallError::Store(e))
    }
}

/// A new random id: `prefix`, `_`, 128 bits from the operating system's CSPRNG in hex.
pub fn random_id(prefix: &str) -> Result<String, StoreError> {
    use rand::TryRngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| StoreError(format!("no randomness from the operating system: {e}")))?;
    let mut id = String::with_capacity(prefix.len() + 1 + 32);
    id.push_str(prefix);
    id.push('_');
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(id)
}

/// The writes of one mutation, applied together.
#[derive(Default)]
struct Tx {
    writes: Vec<(String, Option<Vec<u8>>)>,
}

impl Tx {
    fn put(&mut self, key: String, value: &impl Serialize) {
        let bytes = serde_json::to_vec(value).expect("plain data");
        self.writes.push((key, Some(bytes)));
    }
    fn remove(&mut self, key: String) {
        self.writes.push((key, None));
    }
}

impl<K: Kv> ContractStore<K> {
    /// A store over `kv`, stamping times from `clock`.
    pub fn new(kv: K, clock: Arc<dyn Clock>) -> Self {
        Self {
            kv,
            clock,
            lock: Mutex::new(()),
            applied_window_ms: AtomicU64::new(APPLIED_WINDOW_MS),
            pruned_at: AtomicU64::new(0),
        }
    }

    /// Remembers applied command ids for `ms` (at least the worker's retention horizon).
    pub fn set_applied_window(&self, ms: u64) {
        self.applied_window_ms.store(ms, Ordering::SeqCst);
    }

    /// Forgets the command ids applied more than the window before now, oldest first; returns
    /// how many. Runs by itself at most hourly on a mutation.
    pub fn prune_applied(&self) -> Result<usize, CallError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.prune_locked(self.clock.now_ms())
    }

    fn prune_locked(&self, now: u64) -> Result<usize, CallError> {
        self.pruned_at.store(now.max(1), Ordering::SeqCst);
        let cutoff = now.saturating_sub(self.applied_window_ms.load(Ordering::SeqCst));
        let mut pruned = 0;
        loop {
            let entries = self.kv.scan("ap/", None, PRUNE_BATCH)?;
            let mut tx = Tx::default();
            for (key, _) in &entries {
                let Some((at, id)) = key[3..].split_once('/') else {
                    continue;
                };
                if at.parse::<u64>().map_or(true, |at| at >= cutoff) {
                    break;
                }
                tx.remove(format!("a/{id}"));
                tx.remove(key.clone());
            }
            let n = tx.writes.len() / 2;
            if n > 0 {
                self.kv.commit(tx.writes)?;
            }
            pruned += n;
            if n < PRUNE_BATCH {
                return Ok(pruned);
            }
        }
    }

    /// Answers a query by name.
    pub fn query(
        &self,
        name: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        let args: ListArgs = read_value(args).map_err(|e| bad_args(name, e))?;
        match name {
            "listSessions" => Ok(to_json(&self.list_sessions(&args)?)),
            "listMessages" => Ok(to_json(&self.list_messages(&args)?)),
            other => Err(CallError::Function(format!("no query named {other}"))),
        }
    }

    /// Applies a mutation by name, once per `commandId`: a repeat gets the first reply.
    pub fn mutation(
        &self,
        name: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        let command_id = args
            .get("commandId")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad_args(name, "missing field `commandId`".into()))?
            .to_owned();
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let applied_key = format!("a/{command_id}");
        if let Some(reply) = self.kv.get(&applied_key)? {
            return serde_json::from_slice(&reply).map_err(corrupt);
        }
        let mut tx = Tx::default();
        let reply = match name {
            "createSession" => {
                let a: CreateSessionArgs = read_value(args).map_err(|e| bad_args(name, e))?;
                to_json(&self.create_session(&mut tx, a)?)
            }
            "linkAgentSession" => {
                let a: LinkAgentSessionArgs = read_value(args).map_err(|e| bad_args(name, e))?;
                self.update_session(&mut tx, &a.chat_session_id, |s| {
                    s.agent_session_id = Some(a.agent_session_id.clone());
                })?
            }
            "renameSession" => {
                let a: RenameSessionArgs = read_value(args).map_err(|e| bad_args(name, e))?;
                self.update_session(&mut tx, &a.chat_session_id, |s| s.title = a.title.clone())?
            }
            "markSessionDeleted" => {
                let a: MarkSessionDeletedArgs = read_value(args).map_err(|e| bad_args(name, e))?;
                self.update_session(&mut tx, &a.chat_session_id, |s| {
                    s.status = ChatStatus::Deleted
                })?
            }
            "markSessionFailed" => {
                let a: MarkSessionFailedArgs = read_value(args).map_err(|e| bad_args(name, e))?;
                let mut stored = self.stored_session(&a.chat_session_id)?.ok_or_else(|| {
                    CallError::Function(format!("no chat session {}", a.chat_session_id))
                })?;
                let worker = stored.worker_id.clone();
                stored.session.status = ChatStatus::Failed;
                stored.session.last_activity = self.clock.now_ms();
                stored.failure_reason = Some(a.reason);
                self.put_stored(&mut tx, &worker, stored)?;
                serde_json::Value::Null
            }
            "completeMessage" => {
                let a: CompleteMessageArgs = read_value(args).map_err(|e| bad_args(name, e))?;
                self.answer(&mut tx, &a.chat_session_id, &a.message_id, Ok(a.content))?
            }
            "failMessage" => {
                let a: FailMessageArgs = read_value(args).map_err(|e| bad_args(name, e))?;
                self.answer(&mut tx, &a.chat_session_id, &a.message_id, Err(a.reason))?
            }
            other => return Err(CallError::Function(format!("no mutation named {other}"))),
        };
        let now = self.clock.now_ms();
        tx.put(applied_key, &reply);
        tx.put(format!("ap/{now:020}/{command_id}"), &());
        self.kv.commit(tx.writes)?;
        if now
            >= self
                .pruned_at
                .load(Ordering::SeqCst)
                .saturating_add(PRUNE_EVERY_MS)
        {
            self.prune_locked(now)?;
        }
        Ok(reply)
    }

    /// A new chat session started by a person (the local inbox): no agent session yet.
    pub fn open_chat(&self, worker_id: &str, title: &str) -> Result<ChatSession, CallError> {
        self.open_chat_capped(worker_id, title, usize::MAX)
            .map_err(|e| match e {
                Capped::Call(e) => e,
                Capped::Full(m) => CallError::Function(m),
            })
    }

    /// [`open_chat`](Self::open_chat), unless `max_open` chat sessions a person opened for
    /// `worker_id` are still active: then [`Capped::Full`] and nothing is written.
    pub fn open_chat_capped(
        &self,
        worker_id: &str,
        title: &str,
        max_open: usize,
    ) -> Result<ChatSession, Capped> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if max_open != usize::MAX {
            let open = self.kv.scan(&format!("o/{worker_id}/"), None, max_open)?;
            if open.len() >= max_open {
                return Err(Capped::Full(format!(
                    "too many open chat sessions ({max_open}): close some first"
                )));
            }
        }
        let mut tx = Tx::default();
        let session = ChatSession {
            chat_session_id: random_id("chat")?,
            agent_session_id: None,
            title: title.to_owned(),
            model: None,
            status: ChatStatus::Active,
            last_activity: self.clock.now_ms(),
            project: None,
        };
        tx.put(format!("o/{worker_id}/{}", session.chat_session_id), &());
        self.put_session(&mut tx, worker_id, &session)?;
        self.kv.commit(tx.writes)?;
        Ok(session)
    }

    /// A person's message in a chat session (the local inbox, or a test seeding the fake).
    pub fn post_user_message(&self, chat: &str, content: &str) -> Result<Message, CallError> {
        self.post_user_message_capped(chat, content, usize::MAX)
            .map_err(|e| match e {
                Capped::Call(e) => e,
                Capped::Full(m) => CallError::Function(m),
            })
    }

    /// [`post_user_message`](Self::post_user_message), unless the chat's worker already has
    /// `max_pending` user messages without an answer or a failure: then [`Capped::Full`] and
    /// nothing is written.
    pub fn post_user_message_capped(
        &self,
        chat: &str,
        content: &str,
        max_pending: usize,
    ) -> Result<Message, Capped> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let (worker, mut session) = self.session(chat)?;
        if session.status != ChatStatus::Active {
            return Err(CallError::Function(format!(
                "chat session {chat} is {}",
                status_name(session.status)
            ))
            .into());
        }
        if max_pending != usize::MAX {
            let pending = self.kv.scan(&format!("p/{worker}/"), None, max_pending)?;
            if pending.len() >= max_pending {
                return Err(Capped::Full(format!(
                    "too many messages waiting for an answer ({max_pending}): wait for some"
                )));
            }
        }
        let mut tx = Tx::default();
        let now = self.clock.now_ms();
        let message = Message {
            chat_session_id: chat.to_owned(),
            message_id: random_id("msg")?,
            role: Role::User,
            content: content.to_owned(),
            completed: true,
            timestamp: now,
            reply_to: None,
            error: None,
        };
        self.put_message(&mut tx, None, &message)?;
        tx.put(format!("p/{worker}/{}", message.message_id), &());
        session.last_activity = now;
        self.put_session(&mut tx, &worker, &session)?;
        self.kv.commit(tx.writes)?;
        Ok(message)
    }

    /// The worker a chat session belongs to, if it exists.
    pub fn owner(&self, chat: &str) -> Result<Option<String>, CallError> {
        Ok(self.stored_session(chat)?.map(|s| s.worker_id))
    }

    /// Why `markSessionFailed` failed a chat session, if it did.
    pub fn failure_reason(&self, chat: &str) -> Result<Option<String>, CallError> {
        Ok(self.stored_session(chat)?.and_then(|s| s.failure_reason))
    }

    /// A chat session, if it exists.
    pub fn get_chat(&self, chat: &str) -> Result<Option<ChatSession>, CallError> {
        Ok(self.stored_session(chat)?.map(|s| s.session))
    }

    /// Every chat session of `worker_id`, in id order.
    pub fn chats(&self, worker_id: &str) -> Result<Vec<ChatSession>, CallError> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.sessions_by_id(&ListArgs {
                worker_id: worker_id.to_owned(),
                cursor,
                limit: 1_000,
            })?;
            out.extend(page.page);
            if page.is_done {
                return Ok(out);
            }
            cursor = Some(page.continue_cursor);
        }
    }

    /// A chat session's messages in the order they were written.
    pub fn conversation(&self, chat: &str) -> Result<Vec<Message>, CallError> {
        Ok(self
            .ordered_conversation(chat)?
            .into_iter()
            .map(|m| m.message)
            .collect())
    }

    /// Up to `limit` messages of a chat session in the order they were written, after
    /// `cursor` (the `continueCursor` of the page before; none or empty: from the start).
    pub fn conversation_page(
        &self,
        chat: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<PageValue<Message>, CallError> {
        let after = match cursor {
            None | Some("") => 0,
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| CallError::Function(format!("bad cursor {c:?}")))?,
        };
        let rest: Vec<StoredMessage> = self
            .ordered_conversation(chat)?
            .into_iter()
            .filter(|m| m.order() > after)
            .collect();
        let is_done = rest.len() <= limit;
        let page: Vec<StoredMessage> = rest.into_iter().take(limit).collect();
        let continue_cursor = page.last().map_or(after, StoredMessage::order).to_string();
        Ok(PageValue {
            page: page.into_iter().map(|m| m.message).collect(),
            is_done,
            continue_cursor,
        })
    }

    fn ordered_conversation(&self, chat: &str) -> Result<Vec<StoredMessage>, CallError> {
        self.session(chat)?;
        let prefix = format!("sm/{chat}/");
        let mut out = Vec::new();
        for (key, _) in self.kv.scan(&prefix, None, usize::MAX)? {
            let id = &key[prefix.len()..];
            if let Some(m) = self.stored_message(id)? {
                out.push(m);
            }
        }
        out.sort_by_key(|m| (m.order(), m.message.timestamp));
        Ok(out)
    }

    /// Up to `limit` chat sessions of `worker_id` in id order, after `cursor` (the
    /// `continueCursor` of the page before).
    pub fn chats_page(
        &self,
        worker_id: &str,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<PageValue<ChatSession>, CallError> {
        self.sessions_by_id(&ListArgs {
            worker_id: worker_id.to_owned(),
            cursor: cursor.filter(|c| !c.is_empty()).map(str::to_owned),
            limit,
        })
    }

    /// `listSessions`: the worker's sessions changed after the cursor (a change number; none:
    /// every session), in change order, each once at its latest change. The last page's
    /// `continueCursor` is where the next incremental read starts. A session changed while a
    /// listing pages on moves to the end of the log, so it is read again, never skipped.
    fn list_sessions(&self, args: &ListArgs) -> Result<PageValue<ChatSession>, CallError> {
        let limit = args.limit.clamp(1, 10_000) as usize;
        let worker = &args.worker_id;
        let after = match args.cursor.as_deref() {
            None | Some("") => {
                self.number_old_sessions(worker)?;
                0
            }
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| CallError::Function(format!("listSessions: bad cursor {c:?}")))?,
        };
        let prefix = format!("c/{worker}/");
        let from = (after > 0).then(|| session_change_key(worker, after));
        let keys = self.kv.scan(&prefix, from.as_deref(), limit + 1)?;
        let is_done = keys.len() <= limit;
        let mut page = Vec::new();
        let mut last = after;
        for (key, id) in keys.into_iter().take(limit) {
            last = key[prefix.len()..].parse().unwrap_or(last);
            let id: String = serde_json::from_slice(&id).map_err(corrupt)?;
            if let Some(s) = self.stored_session(&id)? {
                page.push(s.session);
            }
        }
        Ok(PageValue {
            page,
            is_done,
            continue_cursor: last.to_string(),
        })
    }

    /// Gives every session of `worker` written before sessions had change numbers one, once
    /// (`cn/{worker}` records that it was done): a full listing reads the change log only.
    fn number_old_sessions(&self, worker: &str) -> Result<(), CallError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let done_key = format!("cn/{worker}");
        if self.kv.get(&done_key)?.is_some() {
            return Ok(());
        }
        let mut tx = Tx::default();
        let prefix = format!("w/{worker}/");
        for (key, _) in self.kv.scan(&prefix, None, usize::MAX)? {
            match self.stored_session(&key[prefix.len()..])? {
                Some(stored) if stored.change == 0 => self.put_stored(&mut tx, worker, stored)?,
                _ => {}
            }
        }
        tx.put(done_key, &());
        self.kv.commit(tx.writes)?;
        Ok(())
    }

    fn sessions_by_id(&self, args: &ListArgs) -> Result<PageValue<ChatSession>, CallError> {
        let limit = args.limit.clamp(1, 10_000) as usize;
        let prefix = format!("w/{}/", args.worker_id);
        let after = args.cursor.as_ref().map(|c| format!("{prefix}{c}"));
        let keys = self.kv.scan(&prefix, after.as_deref(), limit + 1)?;
        let is_done = keys.len() <= limit;
        let mut page = Vec::new();
        for (key, _) in keys.into_iter().take(limit) {
            if let Some(s) = self.stored_session(&key[prefix.len()..])? {
                page.push(s.session);
            }
        }
        let continue_cursor = page
            .last()
            .map(|s| s.chat_session_id.clone())
            .or_else(|| args.cursor.clone())
            .unwrap_or_default();
        Ok(PageValue {
            page,
            is_done,
            continue_cursor,
        })
    }

    fn list_messages(&self, args: &ListArgs) -> Result<PageValue<Message>, CallError> {
        let limit = args.limit.clamp(1, 10_000) as usize;
        let after = match args.cursor.as_deref() {
            None | Some("") => None,
            Some(c) => Some(format!(
                "x/{:020}",
                c.parse::<u64>().map_err(|_| {
                    CallError::Function(format!("listMessages: bad cursor {c:?}"))
                })?
            )),
        };
        let mut cursor = args
            .cursor
            .clone()
            .filter(|c| !c.is_empty())
            .unwrap_or("0".into());
        let mut after = after;
        let mut page = Vec::new();
        let mut bytes = 0;
        // Other workers' messages are skipped, so read on until the page is full (in messages
        // or in bytes, MESSAGE_PAGE_BYTES) or the log ends.
        loop {
            let entries = self.kv.scan("x/", after.as_deref(), limit)?;
            let full_chunk = entries.len() == limit;
            for (key, id) in entries {
                let previous = cursor.clone();
                cursor = key[2..].parse::<u64>().unwrap_or(0).to_string();
                let id = String::from_utf8_lossy(&id).into_owned();
                after = Some(key);
                let Some(m) = self.stored_message(&id)? else {
                    continue;
                };
                let owner = self.stored_session(&m.message.chat_session_id)?;
                if owner.is_some_and(|o| o.worker_id == args.worker_id) {
                    let size = message_bytes(&m.message);
                    if !page.is_empty() && bytes + size > MESSAGE_PAGE_BYTES {
                        // Full in bytes: this message starts the next page.
                        return Ok(PageValue {
                            page,
                            is_done: false,
                            continue_cursor: previous,
                        });
                    }
                    bytes += size;
                    page.push(m.message);
                    if page.len() == limit {
                        let more = !self.kv.scan("x/", after.as_deref(), 1)?.is_empty();
                        return Ok(PageValue {
                            page,
                            is_done: !more,
                            continue_cursor: cursor,
                        });
                    }
                }
            }
            if !full_chunk {
                return Ok(PageValue {
                    page,
                    is_done: true,
                    continue_cursor: cursor,
                });
            }
        }
    }

    fn create_session(&self, tx: &mut Tx, a: CreateSessionArgs) -> Result<CreatedValue, CallError> {
        let session = ChatSession {
            chat_session_id: random_id("chat")?,
            agent_session_id: Some(a.agent_session_id),
            title: a.title,
            model: a.model,
            status: ChatStatus::Active,
            last_activity: self.clock.now_ms(),
            project: None,
        };
        self.put_session(tx, &a.worker_id, &session)?;
        Ok(CreatedValue {
            chat_session_id: session.chat_session_id,
        })
    }

    fn update_session(
        &self,
        tx: &mut Tx,
        chat: &str,
        change: impl FnOnce(&mut ChatSession),
    ) -> Result<serde_json::Value, CallError> {
        let (worker, mut session) = self.session(chat)?;
        change(&mut session);
        session.last_activity = self.clock.now_ms();
        self.put_session(tx, &worker, &session)?;
        Ok(serde_json::Value::Null)
    }

    /// `completeMessage` (`Ok(answer)`) or `failMessage` (`Err(reason)`) of a user message.
    fn answer(
        &self,
        tx: &mut Tx,
        chat: &str,
        user_message: &str,
        outcome: Result<String, String>,
    ) -> Result<serde_json::Value, CallError> {
        let (worker, _) = self.session(chat)?;
        let user = self
            .stored_message(user_message)?
            .filter(|m| m.message.chat_session_id == chat && m.message.role == Role::User)
            .ok_or_else(|| {
                CallError::Function(format!(
                    "no user message {user_message} in chat session {chat}"
                ))
            })?;
        // Written by `Tx::put`, so a JSON string (reading its raw bytes as the id, quotes and
        // all, found no reply and made a second one for every later completeMessage id: the
        // shared contract suite's delivery-round case showed it).
        let reply_id = match self.kv.get(&format!("r/{user_message}"))? {
            Some(b) => Some(serde_json::from_slice::<String>(&b).map_err(corrupt)?),
            None => None,
        };
        let reply = match &reply_id {
            Some(id) => self.stored_message(id)?,
            None => None,
        };
        let now = self.clock.now_ms();
        // Answered or failed: no longer waiting.
        tx.remove(format!("p/{worker}/{user_message}"));
        match outcome {
            Ok(content) => {
                let (old, mut message) = match reply {
                    Some(r) => (Some((r.change, r.order())), r.message),
                    None => {
                        let id = random_id("msg")?;
                        tx.put(format!("r/{user_message}"), &id);
                        let m = Message {
                            chat_session_id: chat.to_owned(),
                            message_id: id,
                            role: Role::Assistant,
                            content: String::new(),
                            completed: false,
                            timestamp: now,
                            reply_to: Some(user_message.to_owned()),
                            error: None,
                        };
                        (None, m)
                    }
                };
                message.content = content;
                message.completed = true;
                message.error = None;
                self.put_message(tx, old, &message)?;
            }
            Err(reason) => {
                let old = (user.change, user.order());
                let mut m = user.message;
                m.error = Some(reason.clone());
                self.put_message(tx, Some(old), &m)?;
                if let Some(r) = reply.filter(|r| !r.message.completed) {
                    let old = (r.change, r.order());
                    let mut m = r.message;
                    m.error = Some(reason);
                    self.put_message(tx, Some(old), &m)?;
                }
            }
        }
        Ok(serde_json::Value::Null)
    }

    fn session(&self, chat: &str) -> Result<(String, ChatSession), CallError> {
        self.stored_session(chat)?
            .map(|s| (s.worker_id, s.session))
            .ok_or_else(|| CallError::Function(format!("no chat session {chat}")))
    }

    /// Writes a session under a new change number of its worker, dropping its old change-log
    /// entry: every write of a session is a change `listSessions` reports.
    fn put_stored(
        &self,
        tx: &mut Tx,
        worker: &str,
        mut stored: StoredSession,
    ) -> Result<(), CallError> {
        let id = stored.session.chat_session_id.clone();
        if stored.session.status != ChatStatus::Active {
            tx.remove(format!("o/{worker}/{id}"));
        }
        if stored.change != 0 {
            tx.remove(session_change_key(worker, stored.change));
        }
        stored.change = self.next(tx)?;
        tx.put(session_change_key(worker, stored.change), &id);
        tx.put(format!("w/{worker}/{id}"), &());
        tx.put(format!("s/{id}"), &stored);
        Ok(())
    }

    fn stored_session(&self, chat: &str) -> Result<Option<StoredSession>, CallError> {
        match self.kv.get(&format!("s/{chat}"))? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    fn stored_message(&self, id: &str) -> Result<Option<StoredMessage>, CallError> {
        match self.kv.get(&format!("m/{id}"))? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    fn put_session(
        &self,
        tx: &mut Tx,
        worker: &str,
        session: &ChatSession,
    ) -> Result<(), CallError> {
        // A failed session keeps its reason through later changes (a rename, say).
        let old = self.stored_session(&session.chat_session_id)?;
        let (failure_reason, change) = old.map_or((None, 0), |s| (s.failure_reason, s.change));
        self.put_stored(
            tx,
            worker,
            StoredSession {
                worker_id: worker.to_owned(),
                session: session.clone(),
                failure_reason,
                change,
            },
        )
    }

    /// Writes a message under a new change number, dropping its old change-log entry. `old`:
    /// its change number and its place in the conversation, when it exists already.
    fn put_message(
        &self,
        tx: &mut Tx,
        old: Option<(u64, u64)>,
        message: &Message,
    ) -> Result<(), CallError> {
        if let Some((old_change, _)) = old {
            tx.remove(format!("x/{old_change:020}"));
        }
        let change = self.next(tx)?;
        let created = old.map_or(change, |(_, created)| created);
        let id = &message.message_id;
        tx.writes
            .push((format!("x/{change:020}"), Some(id.as_bytes().to_vec())));
        tx.put(format!("sm/{}/{id}", message.chat_session_id), &());
        tx.put(
            format!("m/{id}"),
            &StoredMessage {
                change,
                created,
                message: message.clone(),
            },
        );
        Ok(())
    }

    /// The next number of the counter, counting writes already staged in `tx`.
    fn next(&self, tx: &mut Tx) -> Result<u64, CallError> {
        let staged = tx
            .writes
            .iter()
            .rev()
            .find(|(k, _)| k == "n")
            .and_then(|(_, v)| v.clone());
        let current = match staged {
            Some(b) => Some(b),
            None => self.kv.get("n")?,
        };
        let n = current
            .and_then(|b| serde_json::from_slice::<u64>(&b).ok())
            .unwrap_or(0)
            + 1;
        tx.put("n".into(), &n);
        Ok(n)
    }
}

/// The key of a session's entry in its worker's change log.
fn session_change_key(worker: &str, change: u64) -> String {
    format!("c/{worker}/{change:020}")
}

fn to_json(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("plain data")
}

fn bad_args(name: &str, e: String) -> CallError {
    CallError::Function(format!("{name}: bad arguments: {e}"))
}

fn corrupt(e: serde_json::Error) -> CallError {
    CallError::Store(StoreError(format!("undecodable record: {e}")))
}

fn status_name(s: ChatStatus) -> &'static str {
    match s {
        ChatStatus::Active => "active",
        ChatStatus::Deleted => "deleted",
        ChatStatus::Failed => "failed",
    }
}

/// An in-memory [`Kv`] (the fake deployment, tests).
#[derive(Debug, Default)]
pub struct MemoryKv(Mutex<std::collections::BTreeMap<String, Vec<u8>>>);

impl Kv for MemoryKv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned())
    }

    fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let start = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Included(prefix.to_owned()),
        };
        Ok(map
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }
}

/// A [`Kv`] on a sled tree (the embedded local backend, in the worker's own database).
/// Blocking: callers run it off the async workers.
#[derive(Debug, Clone)]
pub struct SledKv(pub sled::Tree);

impl Kv for SledKv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.get(key).map_err(sled_error)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
            None => Bound::Included(prefix.as_bytes().to_vec()),
        };
        let mut out = Vec::new();
        for entry in self.0.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = entry.map_err(sled_error)?;
            if !k.starts_with(prefix.as_bytes()) || out.len() == limit {
                break;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    fn commit(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k.as_bytes(), v),
                None => batch.remove(k.as_bytes()),
            }
        }
        self.0.apply_batch(batch).map_err(sled_error)?;
        self.0.flush().map_err(sled_error)?;
        Ok(())
    }
}

fn sled_error(e: sled::Error) -> StoreError {
    StoreError(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn store() -> ContractStore<MemoryKv> {
        ContractStore::new(
            MemoryKv::default(),
            Arc::new(ManualClock::new(1_763_700_000_000)),
        )
    }

    fn is_random_id(id: &str, prefix: &str) -> bool {
        id.strip_prefix(prefix)
            .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    fn list(s: &ContractStore<MemoryKv>, cursor: Option<&str>) -> PageValue<ChatSession> {
        let args = ListArgs {
            worker_id: "w".into(),
            cursor: cursor.map(str::to_owned),
            limit: 100,
        };
        s.list_sessions(&args).unwrap()
    }

    #[test]
    fn an_applied_command_id_is_remembered_for_the_window_then_forgotten() {
        let clock = Arc::new(ManualClock::new(1_763_700_000_000));
        let s = ContractStore::new(MemoryKv::default(), clock.clone());
        let create = |id: &str| {
            let args = serde_json::json!({"commandId": id, "workerId": "w",
                "agentSessionId": "ses_1", "title": "t", "model": null});
            s.mutation("createSession", args).unwrap()["chatSessionId"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let first = create("createSession:ses_1");
        clock.advance(APPLIED_WINDOW_MS - 1);
        assert_eq!(
            create("createSession:ses_1"),
            first,
            "a repeat within the window"
        );
        assert_eq!(s.prune_applied().unwrap(), 0);
        clock.advance(2);
        assert_eq!(s.prune_applied().unwrap(), 1, "forgotten past the window");
        assert!(s.kv.scan("ap/", None, 10).unwrap().is_empty());
        assert!(s.kv.get("a/createSession:ses_1").unwrap().is_none());
        // Past the window the id is new again: which is why the worker never sends an id once
        // the retention horizon (shorter than the window) has passed since it was planned.
        assert_ne!(create("createSession:ses_1"), first);
        assert_eq!(s.chats("w").unwrap().len(), 2);
    }

    #[test]
    fn applied_ids_are_pruned_by_the_mutations_themselves_at_most_hourly() {
        let clock = Arc::new(ManualClock::new(1_763_700_000_000));
        let s = ContractStore::new(MemoryKv::default(), clock.clone());
        let chat = s.open_chat("w", "t").unwrap().chat_session_id;
        let rename = |id: &str| {
            let args = serde_json::json!({"commandId": id, "chatSessionId": chat, "title": id});
            s.mutation("renameSession", args).unwrap();
        };
        rename("r1");
        clock.advance(APPLIED_WINDOW_MS + 1);
        rename("r2");
        assert!(
            s.kv.get("a/r1").unwrap().is_none(),
            "pruned by the next mutation"
        );
        assert!(s.kv.get("a/r2").unwrap().is_some());
    }

    #[test]
    fn sessions_written_before_change_numbers_are_numbered_at_the_first_full_listing() {
        let s = store();
        let old = ChatSession {
            chat_session_id: "chat_old".into(),
            agent_session_id: None,
            title: "old".into(),
            model: None,
            status: ChatStatus::Active,
            last_activity: 1,
            project: None,
        };
        // As an older agentsync wrote it: no change number, no change-log entry.
        let record = serde_json::json!({"worker_id": "w", "session": old});
        s.kv.commit(vec![
            (
                "s/chat_old".into(),
                Some(serde_json::to_vec(&record).unwrap()),
            ),
            ("w/w/chat_old".into(), Some(b"null".to_vec())),
        ])
        .unwrap();
        let first = list(&s, None);
        assert_eq!(first.page, vec![old]);
        assert!(list(&s, Some(&first.continue_cursor)).page.is_empty());
        s.mutation(
            "renameSession",
            serde_json::json!({"commandId": "r", "chatSessionId": "chat_old", "title": "new"}),
        )
        .unwrap();
        let since = list(&s, Some(&first.continue_cursor));
        assert_eq!(since.page.len(), 1);
        assert_eq!(since.page[0].title, "new");
        assert_eq!(
            list(&s, None).page.len(),
            1,
            "listed once, at its latest change"
        );
    }

    #[test]
    fn ids_are_random_and_a_conversation_keeps_the_order_written_within_one_millisecond() {
        let s = store();
        let chat = s.open_chat("w", "t").unwrap().chat_session_id;
        assert!(is_random_id(&chat, "chat_"), "{chat}");
        let sent: Vec<String> = (0..30)
            .map(|i| {
                s.post_user_message(&chat, &format!("q{i}"))
                    .unwrap()
                    .message_id
            })
            .collect();
        assert!(sent.iter().all(|id| is_random_id(id, "msg_")), "{sent:?}");
        let mut sorted = sent.clone();
        sorted.sort();
        assert_ne!(sorted, sent, "30 random ids are not in order by chance");
        let read: Vec<String> = s
            .conversation(&chat)
            .unwrap()
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        assert_eq!(read, sent, "the order written, all at the same millisecond");
        // Pages of 7 give the same order, each message once.
        let mut paged = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = s.conversation_page(&chat, cursor.as_deref(), 7).unwrap();
            paged.extend(page.page.into_iter().map(|m| m.message_id));
            if page.is_done {
                break;
            }
            cursor = Some(page.continue_cursor);
        }
        assert_eq!(paged, sent);
    }

    #[test]
    fn messages_stored_with_sequential_ids_keep_their_order() {
        let s = store();
        let chat = s.open_chat("w", "t").unwrap().chat_session_id;
        let old = |n: u64| {
            let id = format!("msg_{n:012}");
            let record = serde_json::json!({
                "change": n,
                "message": {"chatSessionId": chat, "messageId": id, "role": "user",
                    "content": "old", "completed": true, "timestamp": 1, "replyTo": null,
                    "error": null}
            });
            s.kv.commit(vec![
                (format!("m/{id}"), Some(record.to_string().into_bytes())),
                (format!("sm/{chat}/{id}"), Some(b"null".to_vec())),
                ("n".into(), Some(n.to_string().into_bytes())),
            ])
            .unwrap();
            id
        };
        let (first, second) = (old(9), old(10));
        let new = s.post_user_message(&chat, "new").unwrap().message_id;
        let ids: Vec<String> = s
            .conversation(&chat)
            .unwrap()
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        assert_eq!(ids, [first, second, new]);
    }

    #[test]
    fn caps_refuse_without_writing_and_free_up_when_chats_close_or_messages_are_answered() {
        let s = store();
        let a = s.open_chat_capped("w", "a", 2).unwrap().chat_session_id;
        s.open_chat_capped("w", "b", 2).unwrap();
        assert!(matches!(
            s.open_chat_capped("w", "c", 2),
            Err(Capped::Full(_))
        ));
        assert_eq!(s.chats("w").unwrap().len(), 2, "nothing written");
        s.mutation(
            "markSessionDeleted",
            serde_json::json!({"commandId": "d", "chatSessionId": a}),
        )
        .unwrap();
        let c = s.open_chat_capped("w", "c", 2).unwrap().chat_session_id;

        let first = s.post_user_message_capped(&c, "1", 2).unwrap();
        let second = s.post_user_message_capped(&c, "2", 2).unwrap();
        assert!(matches!(
            s.post_user_message_capped(&c, "3", 2),
            Err(Capped::Full(_))
        ));
        assert_eq!(s.conversation(&c).unwrap().len(), 2, "nothing written");
        s.mutation(
            "completeMessage",
            serde_json::json!({"commandId": "c1", "chatSessionId": c,
                "messageId": first.message_id, "content": "ok"}),
        )
        .unwrap();
        s.mutation(
            "failMessage",
            serde_json::json!({"commandId": "f2", "chatSessionId": c,
                "messageId": second.message_id, "reason": "no"}),
        )
        .unwrap();
        s.post_user_message_capped(&c, "3", 2).unwrap();
        s.post_user_message_capped(&c, "4", 2).unwrap();
        // Another worker's waiting messages are not this one's.
        let other = s.open_chat("v", "x").unwrap().chat_session_id;
        s.post_user_message_capped(&other, "5", 2).unwrap();
    }
}
