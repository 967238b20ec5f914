//! The embedded local backend (`--backend local`, the default): chat sessions and messages in
//! the worker's own sled database, behind the same [`Backend`] trait as Convex, plus a loopback
//! HTTP inbox through which a person uses the worker with no external backend:
//!
//! - `GET /sessions`, `POST /sessions {title}`: list or open chat sessions;
//! - `GET /sessions/{id}/messages`, `POST /sessions/{id}/messages {content}`: read the
//!   conversation or post a user message.
//!
//! Bad requests get a 4xx with `{"error": "..."}`. `agentsync send` and `agentsync chat` are
//! clients of this inbox ([`InboxClient`]); the worker writes its address to `DIR/INBOX`.

use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::contract::{read_value, ChatSession, ListArgs, Message, PageValue};
use super::store::{CallError, ContractStore, Kv, SledKv};
use crate::clock::Clock;
use crate::events::{ChatSessionInfo, Command, CommandId, MessageInfo};
use crate::log::{EventLog, LogError};
use crate::ports::{Backend, MutationReply, Page, PortError, PortFuture};

/// The sled tree that holds the local backend.
pub const TREE: &str = "local_backend";

/// The file in the data directory that holds the inbox's address while a worker runs.
pub const INBOX_FILE: &str = "INBOX";

/// A [`Backend`] over a [`ContractStore`]: the same functions, called in-process. Store calls
/// run on blocking threads (sled is synchronous).
pub struct StoreBackend<K: Kv + 'static> {
    store: Arc<ContractStore<K>>,
    worker_id: String,
}

/// The embedded local backend.
pub type LocalBackend = StoreBackend<SledKv>;

impl LocalBackend {
    /// The local backend inside `log`'s database. Blocking.
    pub fn open(log: &EventLog, worker_id: &str, clock: Arc<dyn Clock>) -> Result<Self, LogError> {
        let tree = log.open_tree(TREE)?;
        Ok(Self::new(
            Arc::new(ContractStore::new(SledKv(tree), clock)),
            worker_id,
        ))
    }
}

impl<K: Kv + 'static> StoreBackend<K> {
    /// A backend for `worker_id` over `store`.
    pub fn new(store: Arc<ContractStore<K>>, worker_id: &str) -> Self {
        Self {
            store,
            worker_id: worker_id.to_owned(),
        }
    }

    /// The store, for the inbox.
    pub fn store(&self) -> Arc<ContractStore<K>> {
        self.store.clone()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ContractStore<K>) -> Result<T, CallError> + Send + 'static,
    ) -> Result<T, PortError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| PortError::retryable(format!("local backend task failed: {e}")))?
            .map_err(port_error)
    }

    fn list<'a, T, W>(
        &'a self,
        name: &'static str,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<T>>
    where
        W: serde::de::DeserializeOwned + Send + 'static,
        T: From<W> + Send + 'static,
    {
        let args = serde_json::to_value(ListArgs {
            worker_id: self.worker_id.clone(),
            cursor: cursor.map(str::to_owned),
            limit,
        })
        .expect("plain struct");
        Box::pin(async move {
            let value = self.blocking(move |s| s.query(name, args)).await?;
            let page: PageValue<W> =
                read_value(value).map_err(|e| PortError::terminal(format!("{name}: {e}")))?;
            Ok(page.into_page())
        })
    }
}

fn port_error(e: CallError) -> PortError {
    match e {
        CallError::Function(m) => PortError::terminal(m),
        CallError::Store(e) => PortError::retryable(e.to_string()),
    }
}

impl<K: Kv + 'static> Backend for StoreBackend<K> {
    fn list_sessions<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<ChatSessionInfo>> {
        self.list::<ChatSessionInfo, ChatSession>("listSessions", cursor, limit)
    }

    fn list_messages<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<MessageInfo>> {
        self.list::<MessageInfo, Message>("listMessages", cursor, limit)
    }

    fn mutate<'a>(
        &'a self,
        command_id: &'a CommandId,
        command: &'a Command,
    ) -> PortFuture<'a, MutationReply> {
        Box::pin(async move {
            let (name, args) = super::contract::mutation_for(command_id, command, &self.worker_id)?;
            let value = self.blocking(move |s| s.mutation(name, args)).await?;
            super::convex::mutation_reply(name, value)
        })
    }
}

/// The inbox's routes over a store, for one worker.
pub fn inbox_router<K: Kv + 'static>(store: Arc<ContractStore<K>>, worker_id: &str) -> Router {
    let state = Inbox {
        store,
        worker_id: Arc::from(worker_id),
    };
    Router::new()
        .route("/sessions", get(list_chats::<K>).post(open_chat::<K>))
        .route(
            "/sessions/{id}/messages",
            get(read_conversation::<K>).post(post_message::<K>),
        )
        .with_state(state)
}

struct Inbox<K: Kv + 'static> {
    store: Arc<ContractStore<K>>,
    worker_id: Arc<str>,
}

impl<K: Kv + 'static> Clone for Inbox<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            worker_id: self.worker_id.clone(),
        }
    }
}

fn reason(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({"error": message.into()}))).into_response()
}

fn reply<T: serde::Serialize>(status: StatusCode, result: Result<T, CallError>) -> Response {
    match result {
        Ok(v) => (status, Json(v)).into_response(),
        Err(CallError::Function(m)) if m.starts_with("no chat session") => {
            reason(StatusCode::NOT_FOUND, m)
        }
        Err(CallError::Function(m)) => reason(StatusCode::CONFLICT, m),
        Err(CallError::Store(e)) => reason(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Parses a JSON body, answering 400 with the reason instead of axum's plain-text rejection.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|e| {
        Box::new(reason(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {e}"),
        ))
    })
}

async fn run<K: Kv + 'static, T: Send + 'static>(
    inbox: &Inbox<K>,
    f: impl FnOnce(&ContractStore<K>, &str) -> Result<T, CallError> + Send + 'static,
) -> Result<T, CallError> {
    let store = inbox.store.clone();
    let worker = inbox.worker_id.clone();
    tokio::task::spawn_blocking(move || f(&store, &worker))
        .await
        .unwrap_or_else(|e| Err(CallError::Store(super::store::StoreError(e.to_string()))))
}

async fn list_chats<K: Kv + 'static>(State(inbox): State<Inbox<K>>) -> Response {
    reply(StatusCode::OK, run(&inbox, |s, w| s.chats(w)).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenChat {
    #[serde(default)]
    title: Option<String>,
}

async fn open_chat<K: Kv + 'static>(State(inbox): State<Inbox<K>>, bytes: Bytes) -> Response {
    let req: OpenChat = if bytes.is_empty() {
        OpenChat { title: None }
    } else {
        match body(&bytes) {
            Ok(r) => r,
            Err(resp) => return *resp,
        }
    };
    let title = req.title.unwrap_or_else(|| "New chat".to_owned());
    if title.trim().is_empty() {
        return reason(StatusCode::BAD_REQUEST, "title must not be empty");
    }
    reply(
        StatusCode::CREATED,
        run(&inbox, move |s, w| s.open_chat(w, &title)).await,
    )
}

async fn read_conversation<K: Kv + 'static>(
    State(inbox): State<Inbox<K>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let worker = inbox.worker_id.clone();
    let result = run(&inbox, move |s, _| {
        mine(s, &id, &worker)?;
        s.conversation(&id)
    })
    .await;
    reply(StatusCode::OK, result)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    content: String,
}

async fn post_message<K: Kv + 'static>(
    State(inbox): State<Inbox<K>>,
    UrlPath(id): UrlPath<String>,
    bytes: Bytes,
) -> Response {
    let req: PostMessage = match body(&bytes) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if req.content.trim().is_empty() {
        return reason(StatusCode::BAD_REQUEST, "content must not be empty");
    }
    let worker = inbox.worker_id.clone();
    let result = run(&inbox, move |s, _| {
        mine(s, &id, &worker)?;
        s.post_user_message(&id, &req.content)
    })
    .await;
    reply(StatusCode::CREATED, result)
}

/// The session exists and belongs to this worker.
fn mine<K: Kv>(s: &ContractStore<K>, chat: &str, worker: &str) -> Result<(), CallError> {
    if s.owner(chat)?.as_deref() == Some(worker) {
        Ok(())
    } else {
        Err(CallError::Function(format!("no chat session {chat}")))
    }
}

/// A client of a running worker's inbox (`agentsync send`, `agentsync chat`).
#[derive(Debug, Clone)]
pub struct InboxClient {
    http: reqwest::Client,
    url: String,
}

/// Why an inbox call failed, in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InboxError(pub String);

impl InboxClient {
    /// The inbox of the worker running on `data_dir` (its address is in `DIR/INBOX`).
    pub fn for_data_dir(data_dir: &Path) -> Result<Self, InboxError> {
        let file = data_dir.join(INBOX_FILE);
        let url = std::fs::read_to_string(&file).map_err(|_| {
            InboxError(format!(
                "no inbox at {}: is `agentsync run --backend local --data-dir {}` running?",
                file.display(),
                data_dir.display()
            ))
        })?;
        Ok(Self::new(url.trim()))
    }

    /// The inbox at `url`.
    pub fn new(url: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
        }
    }

    /// Opens a chat session.
    pub async fn open_chat(&self, title: &str) -> Result<ChatSession, InboxError> {
        self.call(
            reqwest::Method::POST,
            "/sessions",
            Some(serde_json::json!({"title": title})),
        )
        .await
    }

    /// Posts a user message.
    pub async fn send(&self, chat: &str, content: &str) -> Result<Message, InboxError> {
        let path = format!("/sessions/{chat}/messages");
        self.call(
            reqwest::Method::POST,
            &path,
            Some(serde_json::json!({"content": content})),
        )
        .await
    }

    /// The conversation of a chat session.
    pub async fn conversation(&self, chat: &str) -> Result<Vec<Message>, InboxError> {
        let path = format!("/sessions/{chat}/messages");
        self.call(reqwest::Method::GET, &path, None).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, InboxError> {
        let method_name = method.to_string();
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| InboxError(format!("cannot reach the inbox at {}: {e}", self.url)))?;
        let status = resp.status();
        // The inbox is the worker's own, on loopback, but its replies are read under the same
        // cap as any server's: a conversation is never near 32 MiB.
        let bytes = crate::transport::read_body(resp, crate::transport::DEFAULT_MAX_REPLY_BYTES)
            .await
            .map_err(|e| match e {
                e @ crate::transport::BodyError::TooLarge { .. } => {
                    InboxError(format!("inbox: {method_name} {path}: {e}"))
                }
                e => InboxError(format!("inbox reply broke off: {e}")),
            })?;
        if !status.is_success() {
            let why = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(crate::text::one_line))
                .unwrap_or_else(|| crate::text::one_line_bytes(&bytes));
            return Err(InboxError(format!(
                "inbox: HTTP {}: {why}",
                status.as_u16()
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| InboxError(format!("inbox reply: {e}")))
    }
}
