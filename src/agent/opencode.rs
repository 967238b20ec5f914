//! The OpenCode HTTP adapter: [`OpencodeClient`] implements [`AgentServer`] over the server's
//! own API (`opencode serve`), and streams its events (`GET /event`) as
//! [`AgentObservation`]s.
//!
//! Every call has a timeout. Failures are classified for the dispatcher: a refused connection,
//! a timeout, a 5xx or a 429 may pass and is retryable; any other 4xx will repeat and is
//! terminal; so is an assistant message that carries `info.error` (a context overflow answers
//! HTTP 200). The password, when one is set, goes into the basic-auth header and nowhere else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures_core::Stream;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::sse::{limit_events, SseError};
use super::wire;
use crate::clock::Millis;
use crate::events::{AgentSessionId, AgentSessionInfo, AgentSessionStatus, ModelRef, SessionTag};
use crate::ports::{
    AgentListing, AgentObservation, AgentServer, ModelList, PortError, PortFuture, PortResult,
    PromptOutcome, PromptRequest,
};
pub use crate::secret::Secret;
use crate::transport::{
    one_line, read_body, retry_after_ms, transport_error, DEFAULT_MAX_REPLY_BYTES,
    MAX_ERROR_BODY_BYTES,
};

/// The user OpenCode expects in basic auth.
const BASIC_AUTH_USER: &str = "opencode";

/// How to reach an OpenCode server.
#[derive(Debug, Clone)]
pub struct OpencodeConfig {
    /// `http://127.0.0.1:4096`. Replaced when a supervised server restarts on a new port.
    pub url: String,
    /// Basic-auth password (user `opencode`), when the server has one.
    pub password: Option<Secret>,
    /// The limit of every call but prompts and the event stream.
    pub timeout: Duration,
    /// The limit of a blocking prompt (the model may think for minutes).
    pub prompt_timeout: Duration,
    /// The `limit` sent with every listing. OpenCode returns at most 100 sessions without one,
    /// and a listing that comes back full is reported incomplete, so it never proves a session
    /// gone.
    pub listing_limit: u32,
    /// When set, only sessions created in this directory are listed. OpenCode puts the sessions
    /// of every non-git directory into one shared `global` project, so without this a worker
    /// sees (and would sync) other directories' sessions.
    pub directory: Option<String>,
    /// Waits between event-stream reconnects: the first, doubled up to the last.
    pub reconnect_min: Duration,
    /// The longest wait between event-stream reconnects.
    pub reconnect_max: Duration,
    /// The largest reply body read (listings, answers): a larger one fails the call with
    /// `GET /session: reply larger than N bytes`. Default 32 MiB.
    pub max_reply_bytes: usize,
    /// The largest event of the event stream: a larger one (or an endless one, with no blank
    /// line ever) cuts the connection, and the stream reconnects. Default 1 MiB.
    pub max_event_bytes: usize,
}

impl OpencodeConfig {
    /// The default `listing_limit`: ample for one machine's sessions, small enough that one
    /// listing stays a few megabytes.
    pub const DEFAULT_LISTING_LIMIT: u32 = 10_000;

    /// The default `max_event_bytes`: OpenCode's events carry a session or a message's info,
    /// not its content, and are a few kilobytes.
    pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

    /// Defaults for a server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            timeout: Duration::from_secs(30),
            prompt_timeout: Duration::from_secs(600),
            listing_limit: Self::DEFAULT_LISTING_LIMIT,
            directory: None,
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(10),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            max_event_bytes: Self::DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// Counters of the event stream, for metrics and for tests.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Events received and turned into observations.
    pub observed: AtomicU64,
    /// Events of a kind the worker does not read (counted, logged at debug).
    pub ignored: AtomicU64,
    /// Events that did not parse (counted, logged as warnings; the stream goes on).
    pub malformed: AtomicU64,
    /// Successful connections after the first.
    pub reconnects: AtomicU64,
    /// Events cut at `max_event_bytes` (each ends its connection; the stream reconnects).
    pub oversized: AtomicU64,
}

/// The OpenCode client.
#[derive(Debug)]
pub struct OpencodeClient {
    http: reqwest::Client,
    base: RwLock<String>,
    config: OpencodeConfig,
    stats: Arc<StreamStats>,
}

impl OpencodeClient {
    /// A client for `config`. Fails only if the TLS backend cannot initialise.
    pub fn new(config: OpencodeConfig) -> Result<Self, PortError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| PortError::terminal(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: RwLock::new(trim(&config.url)),
            config,
            stats: Arc::default(),
        })
    }

    /// Points the client at a server's new address (a supervised server restarted).
    pub fn set_base_url(&self, url: &str) {
        *self.base.write().unwrap_or_else(|e| e.into_inner()) = trim(url);
    }

    /// The address calls go to.
    pub fn base_url(&self) -> String {
        self.base.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The event stream's counters.
    pub fn stream_stats(&self) -> Arc<StreamStats> {
        self.stats.clone()
    }

    /// One session; `None` when the server does not have it.
    pub async fn get_session(&self, id: &AgentSessionId) -> PortResult<Option<AgentSessionInfo>> {
        let path = format!("/session/{}", segment(id.as_str()));
        match self.call(Method::GET, &path, &[], None, None).await {
            Ok(bytes) => Ok(Some(
                decode::<wire::Session>("GET", &path, &bytes)?.into_info(),
            )),
            Err(e) if e.status == Some(StatusCode::NOT_FOUND) => Ok(None),
            Err(e) => Err(e.error),
        }
    }

    /// Starts a prompt and returns at once (`prompt_async`); the answer arrives as events.
    pub async fn prompt_async(
        &self,
        id: &AgentSessionId,
        text: &str,
        model: Option<&ModelRef>,
    ) -> PortResult<()> {
        let path = format!("/session/{}/prompt_async", segment(id.as_str()));
        let body = serde_json::to_value(wire::Prompt::text(text, model)).expect("plain struct");
        self.call(Method::POST, &path, &[], Some(body), None)
            .await
            .map_err(|e| e.error)?;
        Ok(())
    }

    /// The server's events as observations, forever: the stream reconnects with a doubling
    /// wait after any failure and says so with [`AgentObservation::Connected`] so the observer
    /// can list everything to close the gap. Events it cannot read are counted in
    /// [`StreamStats`] and skipped; they never end the stream. An event larger than
    /// `max_event_bytes` (or one that never ends) is cut there: the connection is dropped,
    /// counted in [`StreamStats::oversized`], and the stream reconnects.
    pub fn events(self: &Arc<Self>) -> impl Stream<Item = AgentObservation> + Send + 'static {
        let client = self.clone();
        async_stream::stream! {
            let mut connected_before = false;
            let mut cut = false;
            let mut wait = client.config.reconnect_min;
            loop {
                match client.open_event_stream().await {
                    Ok(response) => {
                        if connected_before {
                            client.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!(reconnected = connected_before, "agent event stream connected");
                        yield AgentObservation::Connected { reconnected: connected_before };
                        connected_before = true;
                        // A server that keeps sending oversized events is not reconnected to
                        // at full speed: the wait keeps doubling until a connection ends
                        // some other way.
                        if !cut {
                            wait = client.config.reconnect_min;
                        }
                        cut = false;
                        let cap = client.config.max_event_bytes;
                        let mut events = limit_events(response.bytes_stream(), cap).eventsource();
                        while let Some(event) = events.next().await {
                            match event {
                                Ok(event) => {
                                    if let Some(obs) = client.translate(&event.data) {
                                        yield obs;
                                    }
                                }
                                Err(EventStreamError::Transport(e @ SseError::EventTooLarge { .. })) => {
                                    client.stats.oversized.fetch_add(1, Ordering::Relaxed);
                                    tracing::warn!("GET /event: {e}: connection cut, reconnecting");
                                    cut = true;
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "agent event stream broke");
                                    break;
                                }
                            }
                        }
                        tracing::debug!("agent event stream ended");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, wait_ms = wait.as_millis() as u64, "agent event stream unavailable");
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(client.config.reconnect_max);
            }
        }
    }

    async fn open_event_stream(&self) -> PortResult<reqwest::Response> {
        let url = format!("{}/event", self.base_url());
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(pw) = &self.config.password {
            request = request.basic_auth(BASIC_AUTH_USER, Some(pw.expose()));
        }
        let response = tokio::time::timeout(self.config.timeout, request.send())
            .await
            .map_err(|_| PortError::retryable("GET /event: timed out"))?
            .map_err(|e| transport_error("GET /event", &e))?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(classify_status("GET", "/event", status, None, "").error);
        }
        Ok(response)
    }

    /// One SSE `data:` payload into an observation, counting what it cannot use.
    fn translate(&self, data: &str) -> Option<AgentObservation> {
        match translate_event(data, self.config.directory.as_deref()) {
            Translated::Observation(obs) => {
                self.stats.observed.fetch_add(1, Ordering::Relaxed);
                Some(obs)
            }
            Translated::Ignored(kind) => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                // The server chose these words: one bounded line in the log.
                tracing::debug!(kind = %one_line(&kind), "agent event not read");
                None
            }
            Translated::Malformed(error) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %one_line(&error), "malformed agent event skipped");
                None
            }
        }
    }

    /// Sends one request and returns the body of a 2xx reply.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        let m = method.as_str().to_owned();
        let url = format!("{}{path}", self.base_url());
        let mut request = self.http.request(method, &url).query(query);
        if let Some(pw) = &self.config.password {
            request = request.basic_auth(BASIC_AUTH_USER, Some(pw.expose()));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let limit = timeout.unwrap_or(self.config.timeout);
        let what = format!("{m} {path}");
        let exchange = async {
            let response = request
                .send()
                .await
                .map_err(|e| CallError::plain(transport_error(&what, &e)))?;
            let status = response.status();
            let retry_after = retry_after_ms(response.headers());
            if status.is_success() {
                return read_body(response, self.config.max_reply_bytes)
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|e| CallError::plain(e.into_port_error(&what)));
            }
            // An error reply is classified by its status; of its body only the start is read.
            let text = match read_body(response, MAX_ERROR_BODY_BYTES).await {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) => e.to_string(),
            };
            Err(classify_status(&m, path, status, retry_after, &text))
        };
        match tokio::time::timeout(limit, exchange).await {
            Err(_) => Err(CallError::plain(PortError::retryable(format!(
                "{what}: timed out after {} ms",
                limit.as_millis()
            )))),
            Ok(reply) => reply,
        }
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
        timeout: Option<Duration>,
    ) -> PortResult<T> {
        let m = method.as_str().to_owned();
        let bytes = self
            .call(method, path, query, body, timeout)
            .await
            .map_err(|e| e.error)?;
        decode(&m, path, &bytes)
    }

    /// Root sessions (sub-agent children are the agent's own business), all or those updated
    /// at or after `since`; and whether the listing came back full (so may lack some).
    async fn list_raw(&self, since: Option<Millis>) -> PortResult<(Vec<wire::Session>, bool)> {
        let limit = self.config.listing_limit;
        let mut query = vec![("limit", limit.to_string()), ("roots", "true".to_owned())];
        if let Some(t) = since {
            query.push(("start", t.to_string()));
        }
        let sessions: Vec<wire::Session> = self
            .call_json(Method::GET, "/session", &query, None, None)
            .await?;
        let full = sessions.len() >= limit as usize;
        Ok((sessions, full))
    }

    async fn list(&self, since: Option<Millis>) -> PortResult<AgentListing> {
        let limit = self.config.listing_limit;
        let (sessions, full) = self.list_raw(since).await?;
        if full {
            tracing::warn!(
                limit,
                "agent listing came back full: treated as incomplete (raise the listing limit)"
            );
        }
        let dir = self.config.directory.as_deref();
        Ok(AgentListing {
            sessions: sessions
                .into_iter()
                .filter(|s| in_directory(s, dir))
                .map(wire::Session::into_info)
                .collect(),
            // The whole set asked for (all sessions, or all updated since): an incremental
            // listing is never taken as proof of absence by the worker (`observe`).
            complete: !full,
        })
    }

    /// What became of user message `message_id` in session `id` (see
    /// [`AgentServer::prompt_outcome`]). The reply is the last assistant message whose
    /// `parentID` is the user message (measured on 1.18.33); while the session is busy the
    /// prompt is still running.
    async fn outcome_of(&self, id: &AgentSessionId, message_id: &str) -> PortResult<PromptOutcome> {
        let session = segment(id.as_str());
        let path = format!("/session/{session}/message/{}", segment(message_id));
        match self.call(Method::GET, &path, &[], None, None).await {
            Ok(_) => {}
            // Absent while the session runs: our earlier request may be the run, its user
            // message not stored yet, or queued behind another; looked at again once idle.
            Err(e) if e.status == Some(StatusCode::NOT_FOUND) => {
                let busy = self.is_busy(id).await?;
                return Ok(if busy {
                    PromptOutcome::Running
                } else {
                    PromptOutcome::NotSent
                });
            }
            Err(e) => return Err(e.error),
        }
        if self.is_busy(id).await? {
            return Ok(PromptOutcome::Running);
        }
        let reply = self.replies_to(id, message_id).await?.pop();
        Ok(match reply {
            // Stopped from outside (our own shutdown of the server, say): no answer came of
            // it, and none will.
            Some(m) if m.info.aborted() => PromptOutcome::Interrupted,
            Some(m) if m.info.error.is_some() => {
                PromptOutcome::Failed(prompt_error(m.info.error.as_ref().expect("checked")))
            }
            Some(m) if m.info.ends_the_run() => PromptOutcome::Answered(m.text()),
            // No step, or a step after which the server meant to run another, and the session
            // is idle: the run died between steps.
            _ => PromptOutcome::Interrupted,
        })
    }

    /// The assistant messages answering user message `message_id`, oldest first: the newest
    /// messages are read first, the whole history only if they do not reach back to it.
    async fn replies_to(
        &self,
        id: &AgentSessionId,
        message_id: &str,
    ) -> PortResult<Vec<wire::SessionMessage>> {
        let path = format!("/session/{}/message", segment(id.as_str()));
        for query in [vec![("limit", "50".to_owned())], vec![]] {
            let messages: Vec<wire::SessionMessage> = self
                .call_json(Method::GET, &path, &query, None, None)
                .await?;
            let whole = query.is_empty()
                || messages.len() < 50
                || messages.iter().any(|m| m.info.id == message_id);
            if whole {
                return Ok(messages
                    .into_iter()
                    .filter(|m| {
                        m.info.role == "assistant"
                            && m.info.parent_id.as_deref() == Some(message_id)
                    })
                    .collect());
            }
        }
        Ok(Vec::new())
    }

    async fn is_busy(&self, id: &AgentSessionId) -> PortResult<bool> {
        let map: std::collections::BTreeMap<String, wire::Status> = self
            .call_json(Method::GET, "/session/status", &[], None, None)
            .await?;
        Ok(map
            .get(id.as_str())
            .is_some_and(|s| !matches!(s, wire::Status::Idle)))
    }

    async fn models(&self) -> PortResult<ModelList> {
        let providers: wire::Providers = self
            .call_json(Method::GET, "/config/providers", &[], None, None)
            .await?;
        let mut models = Vec::new();
        for p in &providers.providers {
            for id in p.models.keys() {
                models.push(ModelRef {
                    provider_id: p.id.clone(),
                    model_id: id.clone(),
                });
            }
        }
        // The project's configured default (`model` in opencode.json), when it names a model
        // the server has; otherwise the default of the one provider the project declared.
        let config: wire::Config = self
            .call_json(Method::GET, "/config", &[], None, None)
            .await?;
        let configured = config
            .model
            .map(|m| ModelRef::parse(&m))
            .filter(|m| models.contains(m));
        let declared = || {
            let mut ps = providers
                .providers
                .iter()
                .filter(|p| p.source.as_deref() == Some("config"));
            let p = ps.next()?;
            if ps.next().is_some() {
                return None;
            }
            providers.default.get(&p.id).map(|m| ModelRef {
                provider_id: p.id.clone(),
                model_id: m.clone(),
            })
        };
        let default = configured.or_else(declared);
        Ok(ModelList { models, default })
    }
}

impl AgentServer for OpencodeClient {
    fn health(&self) -> PortFuture<'_, ()> {
        Box::pin(async move {
            let health: wire::Health = self
                .call_json(Method::GET, "/global/health", &[], None, None)
                .await?;
            if health.healthy {
                Ok(())
            } else {
                Err(PortError::retryable(
                    "GET /global/health: server says unhealthy",
                ))
            }
        })
    }

    fn list_sessions(&self, since: Option<Millis>) -> PortFuture<'_, AgentListing> {
        Box::pin(self.list(since))
    }

    fn create_session<'a>(
        &'a self,
        title: &'a str,
        tag: Option<&'a SessionTag>,
    ) -> PortFuture<'a, AgentSessionInfo> {
        Box::pin(async move {
            let metadata = tag.map(wire::tag_metadata);
            let body = serde_json::to_value(wire::CreateSession { title, metadata })
                .expect("plain struct");
            let session: wire::Session = self
                .call_json(Method::POST, "/session", &[], Some(body), None)
                .await?;
            Ok(session.into_info())
        })
    }

    fn find_session<'a>(&'a self, tag: &'a SessionTag) -> PortFuture<'a, Option<AgentSessionInfo>> {
        Box::pin(async move {
            // OpenCode cannot filter by metadata: list every root session and look. Only a
            // creation whose outcome is unknown pays for this.
            let (sessions, full) = self.list_raw(None).await?;
            let mut found: Vec<AgentSessionInfo> = sessions
                .into_iter()
                .map(wire::Session::into_info)
                .filter(|s| {
                    s.tag.as_ref().is_some_and(|t| {
                        t.command_id == tag.command_id && t.worker_id == tag.worker_id
                    })
                })
                .collect();
            if found.is_empty() && full {
                return Err(PortError::retryable(
                    "GET /session: listing full, cannot tell whether the session was created (raise the listing limit)",
                ));
            }
            // Two can exist only if a creation raced its own lookup: adopt the oldest.
            found.sort_by(|a, b| a.agent_session_id.cmp(&b.agent_session_id));
            Ok(found.into_iter().next())
        })
    }

    fn rename_session<'a>(&'a self, id: &'a AgentSessionId, title: &'a str) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let path = format!("/session/{}", segment(id.as_str()));
            let body = serde_json::to_value(wire::RenameSession { title }).expect("plain struct");
            let _: wire::Session = self
                .call_json(Method::PATCH, &path, &[], Some(body), None)
                .await?;
            Ok(())
        })
    }

    fn delete_session<'a>(&'a self, id: &'a AgentSessionId) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let path = format!("/session/{}", segment(id.as_str()));
            match self.call(Method::DELETE, &path, &[], None, None).await {
                Ok(_) => Ok(()),
                // Already gone is what a delete wants: a retry after a lost reply lands here.
                Err(e) if e.status == Some(StatusCode::NOT_FOUND) => Ok(()),
                Err(e) => Err(e.error),
            }
        })
    }

    fn prompt<'a>(
        &'a self,
        id: &'a AgentSessionId,
        prompt: PromptRequest<'a>,
    ) -> PortFuture<'a, String> {
        Box::pin(async move {
            let path = format!("/session/{}/message", segment(id.as_str()));
            let mut request = wire::Prompt::text(prompt.text, prompt.model);
            request.message_id = prompt.message_id;
            let body = serde_json::to_value(request).expect("plain struct");
            let reply: wire::AssistantReply = self
                .call_json(
                    Method::POST,
                    &path,
                    &[],
                    Some(body),
                    Some(self.config.prompt_timeout),
                )
                .await?;
            if let Some(error) = reply.info.error {
                return Err(prompt_error(&error));
            }
            Ok(reply.text())
        })
    }

    fn prompt_outcome<'a>(
        &'a self,
        id: &'a AgentSessionId,
        message_id: &'a str,
    ) -> PortFuture<'a, PromptOutcome> {
        Box::pin(self.outcome_of(id, message_id))
    }

    fn forget_prompt<'a>(
        &'a self,
        id: &'a AgentSessionId,
        message_id: &'a str,
    ) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let session = segment(id.as_str());
            let mut doomed: Vec<String> = self
                .replies_to(id, message_id)
                .await?
                .into_iter()
                .map(|m| m.info.id)
                .collect();
            doomed.push(message_id.to_owned());
            // Replies first: a reply never outlives the question it answers.
            for m in doomed {
                let path = format!("/session/{session}/message/{}", segment(&m));
                match self.call(Method::DELETE, &path, &[], None, None).await {
                    Ok(_) => {}
                    Err(e) if e.status == Some(StatusCode::NOT_FOUND) => {}
                    Err(e) => return Err(e.error),
                }
            }
            Ok(())
        })
    }

    fn abort<'a>(&'a self, id: &'a AgentSessionId) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let path = format!("/session/{}/abort", segment(id.as_str()));
            self.call(Method::POST, &path, &[], None, None)
                .await
                .map_err(|e| e.error)?;
            Ok(())
        })
    }

    fn status(&self) -> PortFuture<'_, Vec<AgentSessionStatus>> {
        Box::pin(async move {
            let map: std::collections::BTreeMap<String, wire::Status> = self
                .call_json(Method::GET, "/session/status", &[], None, None)
                .await?;
            Ok(map
                .into_iter()
                .map(|(id, status)| status.into_status(id))
                .collect())
        })
    }

    fn list_models(&self) -> PortFuture<'_, ModelList> {
        Box::pin(self.models())
    }
}

/// What one event-stream payload became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Translated {
    /// Something the worker reads.
    Observation(AgentObservation),
    /// A well-formed event of a kind the worker does not read (or of another directory).
    Ignored(String),
    /// Not an event, or an event of a read kind whose fields do not parse.
    Malformed(String),
}

/// Reads one `data:` payload of `GET /event`. Pure, so every case is unit-tested.
pub fn translate_event(data: &str, directory: Option<&str>) -> Translated {
    let event: wire::ServerEvent = match serde_json::from_str(data) {
        Ok(e) => e,
        Err(e) => return Translated::Malformed(format!("not an event: {e}")),
    };
    fn read<T: DeserializeOwned>(kind: &str, v: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("{kind}: {e}"))
    }
    let kind = event.kind.as_str();
    let result = match kind {
        "session.created" | "session.updated" => read::<wire::SessionEvent>(kind, event.properties)
            .map(|e| {
                if in_directory(&e.info, directory) {
                    Translated::Observation(AgentObservation::SessionUpdated(Box::new(
                        e.info.into_info(),
                    )))
                } else {
                    Translated::Ignored(format!("{kind} (other directory)"))
                }
            }),
        "session.deleted" => read::<wire::SessionEvent>(kind, event.properties)
            .map(|e| Translated::Observation(AgentObservation::SessionDeleted(e.info.id.into()))),
        "session.status" => read::<wire::StatusEvent>(kind, event.properties).map(|e| {
            Translated::Observation(AgentObservation::Status(e.status.into_status(e.session_id)))
        }),
        "message.updated" => read::<wire::MessageEvent>(kind, event.properties).map(|e| {
            let info = e.info;
            Translated::Observation(AgentObservation::MessageUpdated {
                agent_session_id: info.session_id.into(),
                at: info.time.completed.unwrap_or(info.time.created),
                error: info.error.map(|e| e.describe()),
            })
        }),
        other => Ok(Translated::Ignored(other.to_owned())),
    };
    result.unwrap_or_else(Translated::Malformed)
}

/// A failed assistant message as an error: terminal unless the provider said a retry may work.
fn prompt_error(error: &wire::AssistantError) -> PortError {
    let message = format!("prompt failed: {}", error.describe());
    if error.is_retryable() {
        PortError::retryable(message)
    } else {
        PortError::terminal(message)
    }
}

fn in_directory(s: &wire::Session, directory: Option<&str>) -> bool {
    match directory {
        None => true,
        Some(d) => s.directory.as_deref() == Some(d),
    }
}

/// A failed call with the HTTP status when there was one.
#[derive(Debug)]
struct CallError {
    error: PortError,
    status: Option<StatusCode>,
}

impl CallError {
    fn plain(error: PortError) -> Self {
        Self {
            error,
            status: None,
        }
    }
}

fn classify_status(
    method: &str,
    path: &str,
    status: StatusCode,
    retry_after_ms: Option<Millis>,
    body: &str,
) -> CallError {
    let detail = serde_json::from_str::<wire::ErrorBody>(body)
        .ok()
        .and_then(|b| b.describe())
        .unwrap_or_else(|| one_line(body));
    let mut message = format!("{method} {path}: HTTP {}: {detail}", status.as_u16());
    if status == StatusCode::UNAUTHORIZED {
        message.push_str(" (the server wants a password: see --agent-password-env)");
    }
    let mut error = if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        PortError::retryable(message)
    } else {
        PortError::terminal(message)
    };
    if let Some(ms) = retry_after_ms {
        error = error.with_retry_after(ms);
    }
    CallError {
        error,
        status: Some(status),
    }
}

fn decode<T: DeserializeOwned>(method: &str, path: &str, bytes: &[u8]) -> PortResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| PortError::retryable(format!("{method} {path}: unexpected reply: {e}")))
}

/// Session ids are `ses_` plus base62, but an id read from a backend is external data: never
/// let it add path segments or a query.
fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn trim(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::AgentStatus;

    #[test]
    fn stream_payloads_become_observations_and_the_rest_is_counted_not_fatal() {
        let updated = r#"{"id":"evt_1","type":"session.updated","properties":{"sessionID":"ses_a",
            "info":{"id":"ses_a","title":"b","directory":"/p","projectID":"global",
            "time":{"created":5,"updated":7}}}}"#;
        match translate_event(updated, None) {
            Translated::Observation(AgentObservation::SessionUpdated(info)) => {
                assert_eq!(info.agent_session_id.as_str(), "ses_a");
                assert_eq!(info.title, "b");
                assert_eq!(info.updated_at, 7);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            translate_event(updated, Some("/elsewhere")),
            Translated::Ignored("session.updated (other directory)".into())
        );
        let status = r#"{"type":"session.status","properties":{"sessionID":"ses_a","status":{"type":"retry","attempt":2,"message":"rate limited","next":9}}}"#;
        assert_eq!(
            translate_event(status, None),
            Translated::Observation(AgentObservation::Status(AgentSessionStatus {
                agent_session_id: "ses_a".into(),
                status: AgentStatus::Retry {
                    attempt: 2,
                    message: "rate limited".into()
                }
            }))
        );
        let deleted = r#"{"type":"session.deleted","properties":{"info":{"id":"ses_a","time":{"created":1,"updated":1}}}}"#;
        assert_eq!(
            translate_event(deleted, None),
            Translated::Observation(AgentObservation::SessionDeleted("ses_a".into()))
        );
        let failed = r#"{"type":"message.updated","properties":{"info":{"id":"msg_1","sessionID":"ses_a","role":"assistant","time":{"created":3,"completed":9},"error":{"name":"ContextOverflowError","data":{"message":"too long"}}}}}"#;
        assert_eq!(
            translate_event(failed, None),
            Translated::Observation(AgentObservation::MessageUpdated {
                agent_session_id: "ses_a".into(),
                at: 9,
                error: Some("ContextOverflowError: too long".into())
            })
        );
        assert_eq!(
            translate_event(r#"{"type":"server.heartbeat","properties":{}}"#, None),
            Translated::Ignored("server.heartbeat".into())
        );
        assert!(matches!(
            translate_event("not json", None),
            Translated::Malformed(_)
        ));
        assert!(matches!(
            translate_event(r#"{"type":"session.status","properties":{"status":"busy"}}"#, None),
            Translated::Malformed(m) if m.starts_with("session.status")
        ));
    }

    #[test]
    fn statuses_split_retryable_from_terminal_and_keep_retry_after() {
        let e = classify_status(
            "GET",
            "/session",
            StatusCode::SERVICE_UNAVAILABLE,
            Some(3_000),
            "",
        );
        assert!(e.error.is_retryable());
        assert_eq!(e.error.retry_after_ms, Some(3_000));
        let e = classify_status(
            "GET",
            "/session/x",
            StatusCode::NOT_FOUND,
            None,
            r#"{"name":"NotFoundError","data":{"message":"Session not found: x"}}"#,
        );
        assert!(!e.error.is_retryable());
        assert_eq!(
            e.error.message,
            "GET /session/x: HTTP 404: NotFoundError: Session not found: x"
        );
        assert!(
            classify_status("GET", "/", StatusCode::TOO_MANY_REQUESTS, None, "")
                .error
                .is_retryable()
        );
        assert!(
            !classify_status("GET", "/", StatusCode::UNAUTHORIZED, None, "")
                .error
                .is_retryable()
        );
    }

    #[test]
    fn ids_from_outside_cannot_add_path_segments() {
        assert_eq!(segment("ses_abc-1"), "ses_abc-1");
        assert_eq!(segment("../x?y"), "%2E%2E%2Fx%3Fy");
    }

    /// A server whose prompt run died (it restarted, say) after a tool step: the session is
    /// idle, and the last reply to the user message is the completed `tool-calls` step ("let me
    /// look"), not an answer. OpenCode itself goes on looping after such a step
    /// (`finish` in `tool-calls`/`unknown`); `outcome_of` reads no `finish` and takes any
    /// completed reply as the answer, so the user gets the first step's preamble as the answer
    /// and the prompt, which died without one, is never sent again.
    #[tokio::test]
    async fn a_run_that_died_after_a_tool_step_is_not_answered_by_that_step() {
        use axum::routing::get;
        let messages = serde_json::json!([
            {"info": {"id": "msg_u1", "role": "user", "sessionID": "ses_a",
                      "time": {"created": 1}},
             "parts": [{"type": "text", "text": "fix the bug in main.rs"}]},
            {"info": {"id": "msg_a1", "role": "assistant", "sessionID": "ses_a",
                      "parentID": "msg_u1", "finish": "tool-calls",
                      "time": {"created": 2, "completed": 3}},
             "parts": [{"type": "step-start"},
                       {"type": "text", "text": "Let me look at main.rs first."},
                       {"type": "tool", "tool": "read"}]}
        ]);
        let user = messages[0].clone();
        let app = axum::Router::new()
            .route(
                "/session/{id}/message/{mid}",
                get(move || {
                    let user = user.clone();
                    async move { axum::Json(user) }
                }),
            )
            .route(
                "/session/{id}/message",
                get(move || {
                    let messages = messages.clone();
                    async move { axum::Json(messages) }
                }),
            )
            .route(
                "/session/status",
                get(|| async { axum::Json(serde_json::json!({})) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = OpencodeClient::new(OpencodeConfig::new(url)).unwrap();
        let outcome = client
            .prompt_outcome(&AgentSessionId::from("ses_a"), "msg_u1")
            .await
            .unwrap();
        assert_eq!(
            outcome,
            PromptOutcome::Interrupted,
            "a tool-calls step is not the answer"
        );
    }

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let cfg = OpencodeConfig {
            password: Some(s),
            ..OpencodeConfig::new("http://x")
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
