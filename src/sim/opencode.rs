//! A fake OpenCode server on loopback: the read side of `opencode serve`'s HTTP API, answering
//! from a fixed set of sessions, for what the real server cannot do here in reasonable time
//! (hold 100,000 sessions for the startup benchmark). It answers `GET /global/health`,
//! `GET /session` (with `limit` and `start`, newest first like the real one), `GET
//! /session/status`, `GET /config`, `GET /config/providers` and an event stream (`GET /event`)
//! that says `server.connected` and then stays open. Writes answer 501: whoever needs them
//! runs the real server.
//!
//! It counts calls and the most in flight at once, like [`super::convex::FakeConvex`], and
//! can answer every request after a fixed delay ([`FakeOpencode::set_latency_ms`]), as a real
//! server on another host does; [`super::convex::ConvexFaults::latency_ms`] is the same for
//! the backend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::InFlightGauge;

/// One session of the fake server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSession {
    /// `ses_…`.
    pub id: String,
    /// Its title.
    pub title: String,
    /// The directory it was created in.
    pub directory: String,
    /// Its project id.
    pub project_id: String,
    /// `time.updated`, ms.
    pub updated: u64,
}

struct Shared {
    /// Serialized once, newest first: a listing of 100,000 is then a copy, not 100,000 encodes.
    sessions: Vec<(u64, Box<serde_json::value::RawValue>)>,
    calls: AtomicUsize,
    in_flight: InFlightGauge,
    /// Every request waits this long before it is answered, ms.
    latency_ms: std::sync::atomic::AtomicU64,
}

/// A running fake OpenCode server.
pub struct FakeOpencode {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeOpencode {
    /// Starts on a free loopback port, holding `sessions`.
    pub async fn start(sessions: Vec<FakeSession>) -> std::io::Result<Self> {
        let mut encoded: Vec<(u64, Box<serde_json::value::RawValue>)> = sessions
            .iter()
            .map(|s| {
                let value = json!({
                    "id": s.id,
                    "slug": s.id,
                    "version": "1.18.33",
                    "projectID": s.project_id,
                    "directory": s.directory,
                    "title": s.title,
                    "time": {"created": s.updated, "updated": s.updated},
                });
                let raw = serde_json::value::to_raw_value(&value).expect("plain JSON");
                (s.updated, raw)
            })
            .collect();
        encoded.sort_by_key(|s| std::cmp::Reverse(s.0));
        let shared = Arc::new(Shared {
            sessions: encoded,
            calls: AtomicUsize::new(0),
            in_flight: InFlightGauge::default(),
            latency_ms: Default::default(),
        });
        let app = Router::new()
            .route("/global/health", get(health))
            .route("/session", get(list).post(unsupported))
            .route("/session/status", get(status))
            .route("/config", get(config))
            .route("/config/providers", get(providers))
            .route("/event", get(events))
            .fallback(unsupported)
            .layer(axum::middleware::from_fn_with_state(shared.clone(), count))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, shared, task })
    }

    /// Calls answered or in progress so far.
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Every request from now on waits `ms` before it is answered (the event stream before
    /// it opens), as across a network.
    pub fn set_latency_ms(&self, ms: u64) {
        self.shared.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// The most calls in flight at once (the event stream counts while it is open).
    pub fn peak_in_flight(&self) -> usize {
        self.shared.in_flight.peak()
    }
}

impl Drop for FakeOpencode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn count(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    let _call = shared.in_flight.enter();
    let latency = shared.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(latency)).await;
    }
    next.run(request).await
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"healthy": true, "version": "1.18.33"}))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    start: Option<u64>,
}

async fn list(State(shared): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    // Without a limit the real server answers at most 100.
    let limit = q.limit.unwrap_or(100);
    let start = q.start.unwrap_or(0);
    let page: Vec<&serde_json::value::RawValue> = shared
        .sessions
        .iter()
        .filter(|(updated, _)| *updated >= start)
        .take(limit)
        .map(|(_, raw)| raw.as_ref())
        .collect();
    Json(page).into_response()
}

async fn status() -> Json<serde_json::Value> {
    Json(json!({}))
}

async fn config() -> Json<serde_json::Value> {
    Json(json!({"model": "mock/small"}))
}

async fn providers() -> Json<serde_json::Value> {
    Json(json!({
        "providers": [{"id": "mock", "source": "config", "models": {"small": {"id": "small"}}}],
        "default": {"mock": "small"},
    }))
}

async fn events() -> impl IntoResponse {
    let connected = SseEvent::default().data(r#"{"type":"server.connected","properties":{}}"#);
    let stream =
        futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(connected) })
            .chain(futures_util::stream::pending());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn unsupported() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        Json(json!({"name": "Unsupported", "data": {"message": "the fake serves reads only"}})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{OpencodeClient, OpencodeConfig};
    use crate::ports::AgentServer;

    fn session(i: u64) -> FakeSession {
        FakeSession {
            id: format!("ses_{i:04}"),
            title: format!("Session {i}"),
            directory: "/work/p".into(),
            project_id: "p".into(),
            updated: 1_000 + i,
        }
    }

    #[tokio::test]
    async fn the_opencode_client_reads_it_like_the_real_server() {
        let fake = FakeOpencode::start((0..250).map(session).collect())
            .await
            .unwrap();
        let client = OpencodeClient::new(OpencodeConfig::new(fake.url.clone())).unwrap();
        client.health().await.unwrap();
        let all = client.list_sessions(None).await.unwrap();
        assert!(all.complete);
        assert_eq!(all.sessions.len(), 250);
        assert_eq!(all.sessions[0].agent_session_id.0, "ses_0249");
        assert_eq!(all.sessions[0].directory.as_deref(), Some("/work/p"));
        let recent = client.list_sessions(Some(1_240)).await.unwrap();
        assert_eq!(recent.sessions.len(), 10);
        assert!(
            recent.complete,
            "every session updated since: not cut at the limit"
        );
        assert!(client.status().await.unwrap().is_empty());
        let models = client.list_models().await.unwrap();
        assert_eq!(models.models.len(), 1);
        assert!(client.create_session("x", None).await.is_err());
        assert!(fake.calls() >= 6);
    }

    #[tokio::test]
    async fn every_request_waits_the_latency_set() {
        let fake = FakeOpencode::start((0..3).map(session).collect())
            .await
            .unwrap();
        let client = OpencodeClient::new(OpencodeConfig::new(fake.url.clone())).unwrap();
        fake.set_latency_ms(60);
        let t = std::time::Instant::now();
        let listing = client.list_sessions(None).await.unwrap();
        assert_eq!(listing.sessions.len(), 3);
        assert!(t.elapsed() >= std::time::Duration::from_millis(60));
    }

    #[tokio::test]
    async fn a_listing_that_fills_the_limit_is_incomplete() {
        let fake = FakeOpencode::start((0..30).map(session).collect())
            .await
            .unwrap();
        let mut cfg = OpencodeConfig::new(fake.url.clone());
        cfg.listing_limit = 30;
        let client = OpencodeClient::new(cfg).unwrap();
        let listing = client.list_sessions(None).await.unwrap();
        assert_eq!(listing.sessions.len(), 30);
        assert!(!listing.complete, "a full listing may have left some out");
    }
}
