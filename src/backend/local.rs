//! The embedded local backend (`--backend local`, the default): chat sessions and messages in
//! the worker's own sled database, behind the same [`Backend`] trait as Convex, plus a loopback
//! HTTP inbox through which a person uses the worker with no external backend:
//!
//! - `GET /sessions?cursor=&limit=`, `POST /sessions {title}`: list (a page) or open chat
//!   sessions;
//! - `GET /sessions/{id}/messages?cursor=&limit=`, `POST /sessions/{id}/messages {content}`:
//!   read the conversation (a page, in the order written) or post a user message.
//!
//! Pages are `{page, isDone, continueCursor}`, like the backend contract's listings.
//! Bad requests get a 4xx with `{"error": "..."}`. `agentsync send` and `agentsync chat` are
//! clients of this inbox ([`InboxClient`]); the worker writes its address and a per-run token
//! to `DIR/INBOX` ([`write_inbox_file`]).
//!
//! Whoever can reach a loopback port can call it: any local user, and any web page the user
//! visits (a `text/plain` POST needs no CORS preflight; DNS rebinding gives a page a name that
//! resolves to 127.0.0.1). And a message here prompts an agent that runs shell commands as the
//! user. So every request passes [`inbox_router`]'s guard, in this order, before anything is read
//! or written:
//!
//! 1. `Host` must be `127.0.0.1:PORT`, `localhost:PORT` or `[::1]:PORT` of the inbox's own port:
//!    403 otherwise (DNS rebinding);
//! 2. no `Origin` header, and `Sec-Fetch-Site` neither `cross-site` nor `same-site`: 403
//!    otherwise (a browser sends `Origin` on every cross-origin POST; a CLI client never does);
//! 3. `Authorization: Bearer <token>`, compared in constant time: 401 otherwise (only who can
//!    read `DIR/INBOX`, mode 0600, holds it);
//! 4. a rate limit ([`InboxLimits::rate_per_second`], GCRA): 429 past it;
//! 5. a request with a body must say `Content-Type: application/json`: 415 otherwise.
//!
//! Then the body is read up to [`InboxLimits::max_body_bytes`] (413 past it), and the handlers
//! bound titles and contents (422), open chats and waiting messages (429), and page sizes.
//! Chat and message ids are random ([`random_id`](super::store::random_id)): none can be
//! guessed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::contract::{read_value, ChatSession, ListArgs, Message, PageValue};
use super::store::{CallError, Capped, ContractStore, Kv, SledKv};
use crate::clock::Clock;
use crate::events::{ChatSessionInfo, Command, CommandId, MessageInfo};
use crate::log::{EventLog, LogError};
use crate::ports::{Backend, MutationReply, Page, PortError, PortFuture};
use crate::secret::Secret;

/// The sled tree that holds the local backend.
pub const TREE: &str = "local_backend";

/// The file in the data directory that holds the inbox's address and token while a worker
/// runs: `{"url": "http://127.0.0.1:PORT", "token": "..."}`, mode 0600.
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

/// The inbox's bounds. Each refusal is a 4xx with `{"error": "..."}` that changes nothing.
#[derive(Debug, Clone)]
pub struct InboxLimits {
    /// The largest request body, bytes (413 past it).
    pub max_body_bytes: usize,
    /// The longest chat title, characters (422 past it).
    pub max_title_chars: usize,
    /// The longest message, bytes of UTF-8 (422 past it).
    pub max_content_bytes: usize,
    /// Chat sessions opened here and still active, at most (429 past it).
    pub max_open_chats: usize,
    /// User messages without an answer or a failure, at most (429 past it).
    pub max_pending_messages: usize,
    /// Requests per second, on average, that pass the token check (429 past it).
    pub rate_per_second: u32,
    /// Requests allowed in a burst.
    pub rate_burst: u32,
    /// The largest `limit` of a listing (422 past it).
    pub max_page: u32,
    /// A listing's `limit` when none is given.
    pub default_page: u32,
}

impl Default for InboxLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 256 * 1024,
            max_title_chars: 200,
            max_content_bytes: 64 * 1024,
            max_open_chats: 1_000,
            max_pending_messages: 100,
            rate_per_second: 20,
            rate_burst: 40,
            max_page: 1_000,
            default_page: 100,
        }
    }
}

/// What the inbox's guard needs: its token, its port (for the `Host` check) and its bounds.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The bearer token every request must carry ([`new_token`]).
    pub token: Secret,
    /// The port the inbox listens on: the only one its `Host` header may name.
    pub port: u16,
    /// Its bounds.
    pub limits: InboxLimits,
}

/// A new inbox token: 256 bits from the operating system's CSPRNG, in hex.
pub fn new_token() -> Result<Secret, InboxError> {
    use rand::TryRngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| InboxError(format!("no randomness for the inbox token: {e}")))?;
    Ok(Secret::new(
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    ))
}

/// The inbox's routes over a store, for one worker, behind its guard (see the module's docs).
pub fn inbox_router<K: Kv + 'static>(
    store: Arc<ContractStore<K>>,
    worker_id: &str,
    config: InboxConfig,
) -> Router {
    let limits = Arc::new(config.limits.clone());
    let guard = Arc::new(Guard::new(config));
    let state = Inbox {
        store,
        worker_id: Arc::from(worker_id),
        limits: limits.clone(),
    };
    Router::new()
        .route("/sessions", get(list_chats::<K>).post(open_chat::<K>))
        .route(
            "/sessions/{id}/messages",
            get(read_conversation::<K>).post(post_message::<K>),
        )
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
        // Outermost: a request passes the guard before any extractor reads it.
        .layer(axum::middleware::from_fn_with_state(guard, guarded))
}

/// The checks made before a request reaches a handler.
struct Guard {
    token: Secret,
    hosts: [String; 3],
    limiter: governor::DefaultDirectRateLimiter,
}

impl Guard {
    fn new(config: InboxConfig) -> Self {
        let port = config.port;
        let per_second = std::num::NonZeroU32::new(config.limits.rate_per_second.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(config.limits.rate_burst.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            token: config.token,
            hosts: [
                format!("127.0.0.1:{port}"),
                format!("localhost:{port}"),
                format!("[::1]:{port}"),
            ],
            limiter: governor::RateLimiter::direct(
                governor::Quota::per_second(per_second).allow_burst(burst),
            ),
        }
    }

    /// Refuses the request with its reason, or lets it through.
    fn check(
        &self,
        method: &Method,
        uri: &axum::http::Uri,
        headers: &HeaderMap,
    ) -> Result<(), Refusal> {
        // 1. DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own name.
        let host = match headers.get(header::HOST) {
            Some(h) => h.to_str().ok().map(str::to_owned),
            None => uri.authority().map(|a| a.as_str().to_owned()),
        };
        let host_ok = host.is_some_and(|h| self.hosts.iter().any(|ok| h.eq_ignore_ascii_case(ok)));
        if !host_ok {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "the Host header must name this inbox (127.0.0.1, localhost or [::1] and its port)",
            ));
        }
        // 2. Browsers: any Origin, or a cross-site fetch, is a web page, never the CLI.
        if headers.contains_key(header::ORIGIN) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "requests from web pages (with an Origin header) are refused",
            ));
        }
        let site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        if matches!(site.as_deref(), Some("cross-site" | "same-site")) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "cross-site requests are refused",
            ));
        }
        // 3. The token, in constant time.
        if !self.authorized(headers) {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (it is in DATA_DIR/INBOX)",
            ));
        }
        // 4. The rate.
        if self.limiter.check().is_err() {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests: slow down",
            ));
        }
        // 5. A body is JSON, said so: a text/plain form post is no JSON request.
        let has_body = *method == Method::POST
            || *method == Method::PUT
            || *method == Method::PATCH
            || headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body && !is_json(headers) {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        Ok(())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        use subtle::ConstantTimeEq;
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return false;
        }
        let given = value[scheme.len()..].trim_ascii();
        bool::from(given.ct_eq(self.token.expose().as_bytes()))
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

async fn guarded(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match guard.check(req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

struct Inbox<K: Kv + 'static> {
    store: Arc<ContractStore<K>>,
    worker_id: Arc<str>,
    limits: Arc<InboxLimits>,
}

impl<K: Kv + 'static> Clone for Inbox<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            worker_id: self.worker_id.clone(),
            limits: self.limits.clone(),
        }
    }
}

/// A request refused: its status and its reason, answered as `{"error": reason}`.
struct Refusal(StatusCode, String);

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        reason(self.0, self.1)
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
        Err(CallError::Function(m)) if m.starts_with("bad cursor") => {
            reason(StatusCode::BAD_REQUEST, m)
        }
        Err(CallError::Function(m)) => reason(StatusCode::CONFLICT, m),
        Err(CallError::Store(e)) => reason(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn capped_reply<T: serde::Serialize>(status: StatusCode, result: Result<T, Capped>) -> Response {
    match result {
        Ok(v) => reply(status, Ok::<T, CallError>(v)),
        Err(Capped::Full(m)) => reason(StatusCode::TOO_MANY_REQUESTS, m),
        Err(Capped::Call(e)) => reply(status, Err::<T, CallError>(e)),
    }
}

/// The body (413 past the limit), parsed as JSON (400 with the reason instead of axum's
/// plain-text rejection).
fn body<T: serde::de::DeserializeOwned>(
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Option<T>, Box<Response>> {
    let bytes = bytes.map_err(|e| {
        let status = e.status();
        let why = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large".to_owned()
        } else {
            format!("cannot read the request body: {e}")
        };
        Box::new(reason(status, why))
    })?;
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Box::new(reason(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {e}"),
        ))
    })
}

async fn run<K: Kv + 'static, T: Send + 'static, E: From<CallError> + Send + 'static>(
    inbox: &Inbox<K>,
    f: impl FnOnce(&ContractStore<K>, &str) -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    let store = inbox.store.clone();
    let worker = inbox.worker_id.clone();
    tokio::task::spawn_blocking(move || f(&store, &worker))
        .await
        .unwrap_or_else(|e| Err(CallError::Store(super::store::StoreError(e.to_string())).into()))
}

/// `?cursor=&limit=` of a listing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

impl PageQuery {
    /// The page size asked for, or why it is refused.
    fn limit(&self, limits: &InboxLimits) -> Result<u32, Refusal> {
        match self.limit {
            None => Ok(limits.default_page.clamp(1, limits.max_page.max(1))),
            Some(n) if (1..=limits.max_page).contains(&n) => Ok(n),
            Some(_) => Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("limit must be between 1 and {}", limits.max_page),
            )),
        }
    }
}

fn page_query(
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
    limits: &InboxLimits,
) -> Result<(Option<String>, u32), Refusal> {
    let Query(q) = query.map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("bad query: {}", e.body_text()),
        )
    })?;
    let limit = q.limit(limits)?;
    Ok((q.cursor, limit))
}

async fn list_chats<K: Kv + 'static>(
    State(inbox): State<Inbox<K>>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (cursor, limit) = match page_query(query, &inbox.limits) {
        Ok(q) => q,
        Err(refused) => return refused.into_response(),
    };
    let result = run(&inbox, move |s, w| {
        s.chats_page(w, cursor.as_deref(), limit)
    })
    .await;
    reply(StatusCode::OK, result)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenChat {
    #[serde(default)]
    title: Option<String>,
}

async fn open_chat<K: Kv + 'static>(
    State(inbox): State<Inbox<K>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let req: OpenChat = match body(bytes) {
        Ok(r) => r.unwrap_or(OpenChat { title: None }),
        Err(resp) => return *resp,
    };
    let title = req.title.unwrap_or_else(|| "New chat".to_owned());
    if title.trim().is_empty() {
        return reason(StatusCode::BAD_REQUEST, "title must not be empty");
    }
    let max = inbox.limits.max_title_chars;
    if title.chars().count() > max {
        return reason(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("title longer than {max} characters"),
        );
    }
    let max_open = inbox.limits.max_open_chats;
    let result = run(&inbox, move |s, w| s.open_chat_capped(w, &title, max_open)).await;
    capped_reply(StatusCode::CREATED, result)
}

async fn read_conversation<K: Kv + 'static>(
    State(inbox): State<Inbox<K>>,
    UrlPath(id): UrlPath<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (cursor, limit) = match page_query(query, &inbox.limits) {
        Ok(q) => q,
        Err(refused) => return refused.into_response(),
    };
    let worker = inbox.worker_id.clone();
    let result = run(&inbox, move |s, _| {
        mine(s, &id, &worker)?;
        s.conversation_page(&id, cursor.as_deref(), limit as usize)
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
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let req: PostMessage = match body(bytes) {
        Ok(Some(r)) => r,
        Ok(None) => return reason(StatusCode::BAD_REQUEST, "bad request body: empty"),
        Err(resp) => return *resp,
    };
    if req.content.trim().is_empty() {
        return reason(StatusCode::BAD_REQUEST, "content must not be empty");
    }
    let max = inbox.limits.max_content_bytes;
    if req.content.len() > max {
        return reason(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("content longer than {max} bytes"),
        );
    }
    let worker = inbox.worker_id.clone();
    let max_pending = inbox.limits.max_pending_messages;
    let result = run(&inbox, move |s, _| {
        mine(s, &id, &worker)?;
        s.post_user_message_capped(&id, &req.content, max_pending)
    })
    .await;
    capped_reply(StatusCode::CREATED, result)
}

/// The session exists and belongs to this worker.
fn mine<K: Kv>(s: &ContractStore<K>, chat: &str, worker: &str) -> Result<(), CallError> {
    if s.owner(chat)?.as_deref() == Some(worker) {
        Ok(())
    } else {
        Err(CallError::Function(format!("no chat session {chat}")))
    }
}

/// What `DIR/INBOX` holds.
#[derive(serde::Serialize, Deserialize)]
struct InboxFile {
    url: String,
    token: String,
}

/// Writes `DIR/INBOX` (the inbox's URL and token) for `agentsync send` and `chat`: created
/// exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW`), mode 0600, so no other user reads the token and
/// no link planted there redirects the write. A file left by a killed run is removed first, but
/// only a regular file this user owns: anything else (a symlink, another user's file) is
/// refused. Returns the file's path.
pub fn write_inbox_file(data_dir: &Path, url: &str, token: &Secret) -> Result<PathBuf, InboxError> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = data_dir.join(INBOX_FILE);
    let cannot = |what: &str| InboxError(format!("cannot write {}: {what}", path.display()));
    match std::fs::symlink_metadata(&path) {
        Ok(meta) => {
            if meta.file_type().is_symlink() {
                return Err(cannot("it is a symbolic link (refusing to follow it)"));
            }
            let me = nix::unistd::geteuid().as_raw();
            if !meta.file_type().is_file() || meta.uid() != me {
                return Err(cannot("it is not a regular file of this user"));
            }
            // A stale file of a run that was killed (the data directory's lock is ours).
            std::fs::remove_file(&path).map_err(|e| cannot(&e.to_string()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(cannot(&e.to_string())),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&path)
        .map_err(|e| cannot(&e.to_string()))?;
    let text = serde_json::to_string(&InboxFile {
        url: url.to_owned(),
        token: token.expose().to_owned(),
    })
    .map_err(|e| cannot(&e.to_string()))?;
    file.write_all(format!("{text}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| cannot(&e.to_string()))?;
    Ok(path)
}

/// Reads `DIR/INBOX`: the inbox's URL and token. A symbolic link is refused, not followed.
pub fn read_inbox_file(data_dir: &Path) -> Result<(String, Secret), InboxError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(INBOX_FILE);
    let unreadable = |why: String| {
        InboxError(format!(
            "no inbox at {} ({why}): is `agentsync run --backend local --data-dir {}` running?",
            path.display(),
            data_dir.display()
        ))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == nix::errno::Errno::ELOOP as i32 => {
                unreadable("a symbolic link, not followed".into())
            }
            _ => unreadable(e.to_string()),
        })?;
    let mut text = String::new();
    file.take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| unreadable(e.to_string()))?;
    let parsed: InboxFile = serde_json::from_str(text.trim())
        .map_err(|_| unreadable("not an inbox file of this agentsync version".into()))?;
    Ok((parsed.url, Secret::new(parsed.token)))
}

/// A loopback inbox, bound and announced, ready to serve.
pub struct OpenInbox {
    /// Its listener, on 127.0.0.1 and a port the kernel chose.
    pub listener: tokio::net::TcpListener,
    /// Its routes, guarded.
    pub router: Router,
    /// Its URL (no secret in it: fit for a log line).
    pub url: String,
    /// `DIR/INBOX`, to remove when the worker stops.
    pub file: PathBuf,
}

/// Opens the inbox of the worker on `data_dir`: binds a loopback port, draws a new token, and
/// writes both to `DIR/INBOX` ([`write_inbox_file`]). The token lives for this run only.
pub async fn open_inbox<K: Kv + 'static>(
    store: Arc<ContractStore<K>>,
    worker_id: &str,
    data_dir: &Path,
    limits: InboxLimits,
) -> Result<OpenInbox, InboxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| InboxError(format!("cannot open the inbox: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| InboxError(format!("cannot open the inbox: {e}")))?;
    let url = format!("http://{addr}");
    let token = new_token()?;
    let file = write_inbox_file(data_dir, &url, &token)?;
    let router = inbox_router(
        store,
        worker_id,
        InboxConfig {
            token,
            port: addr.port(),
            limits,
        },
    );
    Ok(OpenInbox {
        listener,
        router,
        url,
        file,
    })
}

/// A client of a running worker's inbox (`agentsync send`, `agentsync chat`).
#[derive(Debug, Clone)]
pub struct InboxClient {
    http: reqwest::Client,
    url: String,
    token: Secret,
}

/// Why an inbox call failed, in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InboxError(pub String);

impl InboxClient {
    /// The most pages [`InboxClient::conversation`] reads: 1,000 of 1,000 messages.
    pub const MAX_CONVERSATION_PAGES: usize = 1_000;

    /// The inbox of the worker running on `data_dir` (its address and token are in
    /// `DIR/INBOX`).
    pub fn for_data_dir(data_dir: &Path) -> Result<Self, InboxError> {
        let (url, token) = read_inbox_file(data_dir)?;
        Ok(Self::new(url.trim(), token))
    }

    /// The inbox at `url`, with its token.
    pub fn new(url: &str, token: Secret) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            token,
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

    /// The conversation of a chat session, every page of it (at most
    /// [`Self::MAX_CONVERSATION_PAGES`]: pages that never end are an error, not a loop).
    pub async fn conversation(&self, chat: &str) -> Result<Vec<Message>, InboxError> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        for _ in 0..Self::MAX_CONVERSATION_PAGES {
            let path = format!("/sessions/{chat}/messages?limit=1000&cursor={cursor}");
            let page: PageValue<Message> = self.call(reqwest::Method::GET, &path, None).await?;
            out.extend(page.page);
            if page.is_done {
                return Ok(out);
            }
            if page.continue_cursor == cursor {
                return Err(InboxError(format!(
                    "inbox: the conversation's page is not the last but gives back the cursor it was asked with ({})",
                    crate::text::one_line(&cursor)
                )));
            }
            cursor = page.continue_cursor;
        }
        Err(InboxError(format!(
            "inbox: the conversation did not end within {} pages",
            Self::MAX_CONVERSATION_PAGES
        )))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, InboxError> {
        let method_name = method.to_string();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(self.token.expose());
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
