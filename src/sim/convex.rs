//! A fake Convex deployment on loopback: a real HTTP server speaking the Functions API
//! (`POST /api/query`, `POST /api/mutation`) that implements the backend contract in memory with
//! the contract store (so with the same `commandId` idempotency as the local backend). It records
//! every call with the number in flight when it arrived, and injects the faults a real deployment
//! has: 5xx, 429 with `Retry-After`, functions that throw (560), slow calls, values that break the
//! contract, and a crash that loses the reply after the mutation was applied.
//!
//! For tests and benchmarks: a Convex deployment cannot run here.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::InFlightGauge;
use crate::backend::store::{CallError, ContractStore, MemoryKv};
use crate::clock::Clock;

/// Faults to inject, each for the next N calls it applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvexFaults {
    /// The next N calls answer 503.
    pub unavailable: u32,
    /// The next N calls answer 429 with `Retry-After: retry_after_s`.
    pub rate_limited: u32,
    /// The `Retry-After` of a 429, seconds.
    pub retry_after_s: u64,
    /// The next N calls answer 560 (the function threw).
    pub throws: u32,
    /// The next N queries answer a value whose first item has a mistyped field.
    pub malformed: u32,
    /// The next N mutations are applied, then the reply is lost (the body breaks off).
    pub lose_reply: u32,
    /// Every query waits this long before answering (slow pages), ms.
    pub query_delay_ms: u64,
    /// Every call waits this long, ms.
    pub latency_ms: u64,
}

/// One call as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// `query` or `mutation`.
    pub kind: String,
    /// The function path, `agentsync:listSessions`.
    pub path: String,
    /// The mutation's `commandId`.
    pub command_id: Option<String>,
    /// Calls in flight when it arrived, itself included.
    pub in_flight: usize,
    /// The HTTP status answered (0 when the reply was lost).
    pub status: u16,
}

struct Shared {
    store: Arc<ContractStore<MemoryKv>>,
    module: String,
    deploy_key: Option<String>,
    faults: Mutex<ConvexFaults>,
    calls: Mutex<Vec<CallRecord>>,
    in_flight: InFlightGauge,
}

/// A running fake deployment.
pub struct FakeConvex {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeConvex {
    /// Starts on a free loopback port, functions under `module`, wanting `deploy_key` when given.
    pub async fn start(
        module: &str,
        deploy_key: Option<&str>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Self> {
        Self::start_on(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            module,
            deploy_key,
            clock,
        )
        .await
    }

    /// Starts on `addr`.
    pub async fn start_on(
        addr: SocketAddr,
        module: &str,
        deploy_key: Option<&str>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            store: Arc::new(ContractStore::new(MemoryKv::default(), clock)),
            module: module.to_owned(),
            deploy_key: deploy_key.map(str::to_owned),
            faults: Mutex::default(),
            calls: Mutex::default(),
            in_flight: InFlightGauge::default(),
        });
        let app = Router::new()
            .route("/api/{kind}", post(call))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, shared, task })
    }

    /// The data, for seeding (chat sessions, user messages) and for checking effects.
    pub fn store(&self) -> Arc<ContractStore<MemoryKv>> {
        self.shared.store.clone()
    }

    /// Replaces the faults.
    pub fn set_faults(&self, faults: ConvexFaults) {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.shared
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The most calls in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.shared.in_flight.peak()
    }
}

impl Drop for FakeConvex {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

fn take(n: &mut u32) -> bool {
    if *n > 0 {
        *n -= 1;
        true
    } else {
        false
    }
}

async fn call(
    State(shared): State<Arc<Shared>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (_call, now) = shared.in_flight.enter();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = request["path"].as_str().unwrap_or("").to_owned();
    let mut record = CallRecord {
        kind: kind.clone(),
        path: path.clone(),
        command_id: request["args"]["commandId"].as_str().map(str::to_owned),
        in_flight: now,
        status: 200,
    };
    let response = handle(&shared, &kind, &headers, request, &mut record).await;
    shared
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(record);
    response
}

async fn handle(
    shared: &Shared,
    kind: &str,
    headers: &HeaderMap,
    request: Value,
    record: &mut CallRecord,
) -> Response {
    let faults = shared
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if kind == "query" && faults.query_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.query_delay_ms)).await;
    }
    if let Some(key) = &shared.deploy_key {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if given != format!("Convex {key}") {
            record.status = 401;
            return answer(
                401,
                json!({"code": "BadDeployKey", "message": "The provided deploy key was invalid."}),
            );
        }
    }
    // Faults, one at a time, counted down under the lock.
    let fault = {
        let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        if take(&mut f.unavailable) {
            Some((
                503,
                json!({"code": "Unavailable", "message": "injected: unavailable"}),
                None,
            ))
        } else if take(&mut f.rate_limited) {
            let after = f.retry_after_s;
            Some((
                429,
                json!({"code": "RateLimited", "message": "injected: slow down"}),
                Some(after),
            ))
        } else if take(&mut f.throws) {
            Some((
                560,
                json!({"status": "error", "errorMessage": "Uncaught Error: injected: the function threw", "errorData": null}),
                None,
            ))
        } else {
            None
        }
    };
    if let Some((status, body, retry_after)) = fault {
        record.status = status;
        let mut response = answer(status, body);
        if let Some(s) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", s.to_string().parse().expect("digits"));
        }
        return response;
    }
    let Some(name) = request["path"]
        .as_str()
        .and_then(|p| p.strip_prefix(&format!("{}:", shared.module)))
        .map(str::to_owned)
    else {
        record.status = 404;
        return answer(
            404,
            json!({"code": "FunctionNotFound", "message": format!("Could not find public function for '{}'", request["path"])}),
        );
    };
    let args = request["args"].clone();
    let result = match kind {
        "query" => shared.store.query(&name, args),
        "mutation" => shared.store.mutation(&name, args),
        other => {
            record.status = 404;
            return answer(404, json!({"message": format!("no /api/{other}")}));
        }
    };
    match result {
        Ok(mut value) => {
            let lose = kind == "mutation" && {
                let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
                take(&mut f.lose_reply)
            };
            if lose {
                // Applied, then the connection breaks mid-reply.
                record.status = 0;
                let broken = futures_util::stream::once(async {
                    Err::<Bytes, _>(std::io::Error::other("injected: crash after applying"))
                });
                return Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from_stream(broken))
                    .expect("valid response");
            }
            let malformed = kind == "query" && {
                let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
                take(&mut f.malformed)
            };
            if malformed {
                if let Some(first) = value["page"].get_mut(0) {
                    first["lastActivity"] = json!("yesterday");
                    first["timestamp"] = json!("yesterday");
                } else {
                    value["isDone"] = json!("maybe");
                }
            }
            answer(200, json!({"status": "success", "value": value}))
        }
        Err(CallError::Function(message)) => {
            record.status = 560;
            answer(
                560,
                json!({"status": "error", "errorMessage": format!("Uncaught Error: {message}"), "errorData": null}),
            )
        }
        Err(CallError::Store(e)) => {
            record.status = 500;
            answer(500, json!({"message": e.to_string()}))
        }
    }
}
