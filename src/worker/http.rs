//! The worker's loopback HTTP endpoints: `/healthz` (the process answers), `/readyz` (200 only
//! when Ready and not stuck, else 503 with the reason), `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::status::{StuckPolicy, WorkerStatus};
use crate::clock::Clock;

#[derive(Clone)]
struct Shared {
    status: Arc<WorkerStatus>,
    clock: Arc<dyn Clock>,
    stuck: StuckPolicy,
}

/// The routes, over a worker's status.
pub fn router(status: Arc<WorkerStatus>, clock: Arc<dyn Clock>, stuck: StuckPolicy) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Shared {
            status,
            clock,
            stuck,
        })
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    match s.status.readiness(s.clock.now_ms(), &s.stuck) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.status.metrics(s.clock.now_ms()),
    )
}
