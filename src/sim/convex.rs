//! A fake Convex deployment on loopback: a real HTTP server speaking the Functions API
//! (`POST /api/query`, `POST /api/mutation`) that implements the backend contract in memory with
//! the contract store (so with the same `commandId` idempotency as the local backend). It records
//! every call with the number in flight when it arrived, and injects the faults a real
//! deployment has.
//!
//! It answers as the real backend does (`get-convex/convex-backend` at 94a42c3, 2026-08-22;
//! the fake is only as good as these readings, so each is named):
//!
//! - **Numbers are floats.** Every number of a value is written as a JSON float
//!   (`1795344561749.0`): a JS number is a `Float64` and `"format": "json"` exports it with
//!   serde_json (`crates/value/src/export.rs:114-129`, `export_clean`; `"json"` selects it at
//!   `:51`).
//! - **A function's error is HTTP 200** `{"status":"error","errorMessage":...}`
//!   (`crates/local_backend/src/public_api.rs:131-156`, `UdfResponse`, and every handler's
//!   `Ok(Json(response))`, e.g. `:500`); [`FakeConvex::set_legacy_560`] answers 560 as older
//!   backends did (`get-convex/convex-js`, `src/browser/http_client.ts:29-32`). A refusal of
//!   the contract ("no chat session ...") is `Uncaught Error: ...`, a thrown error.
//! - **Other failures are `{code, message}`** with the status of `crates/errors/src/lib.rs:712-732`;
//!   no `Retry-After` is ever sent (nothing in `crates/errors` or `public_api.rs` sets one).
//! - **Internal functions need the deploy key.** Started with a key, the module's functions
//!   are internal (`internalQuery`/`internalMutation`): a call without `Authorization` gets
//!   "Could not find public function for '...'." as a 200 status error
//!   (`crates/udf/src/validation.rs:342-365`), a wrong key 403 `BadDeployKey`
//!   (`crates/keybroker/src/operations.rs:118-125`). Started without one, they are public.
//! - **Limits**: a request body over 16 MiB + 2000 bytes is refused with 413
//!   (`crates/common/src/knobs.rs:1591`, `MAX_BACKEND_PUBLIC_API_REQUEST_SIZE`); arguments over
//!   16 MiB (`knobs.rs:413`, `FUNCTION_MAX_ARGS_SIZE`) and a return value over 16 MiB
//!   (`knobs.rs:419`, `FUNCTION_MAX_RESULT_SIZE`; message `crates/isolate/src/helpers.rs:152`)
//!   are function errors; a message written over 1 MiB is "Value is too large"
//!   (`crates/common/src/document.rs:100`, `MAX_USER_SIZE`; message `:584`). `listMessages`
//!   pages stop at [`MESSAGE_PAGE_BYTES`](crate::backend::store::MESSAGE_PAGE_BYTES), so a
//!   page stays under the 16 MiB read limit (`knobs.rs:585`) however large the messages.
//! - **Transient function errors** as injected faults: a paused deployment
//!   (`crates/udf/src/validation.rs:117`), the user-code time limit
//!   (`crates/isolate/src/termination.rs:350`), and 503 overload / 429 rate limiting.
//!
//! Not simulated: the 1 s user-code limit as a clock (only as a fault), optimistic-concurrency
//! conflicts (the store serializes every mutation under one lock), the 32,000-document scan
//! limit (no contract function scans more than a page).
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

/// Faults to inject, each for the next N calls it applies to (calls of the function
/// [`ConvexFaults::only`] names, when it names one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvexFaults {
    /// The next N calls answer 503 `Overloaded` (as a mutation that lost its optimistic
    /// concurrency retries does).
    pub unavailable: u32,
    /// The next N calls answer 429 `TooManyConcurrentRequests`, with no `Retry-After`.
    pub rate_limited: u32,
    /// The next N calls throw: a status error, `Uncaught Error: injected: the function threw`.
    pub throws: u32,
    /// The next N calls find the deployment paused: a status error with the backend's text.
    pub paused: u32,
    /// The next N calls run out of user-code time: a status error with the backend's text.
    pub timed_out: u32,
    /// Restricts the counted faults above (and `malformed`, `lose_reply`) to calls of this
    /// function (`completeMessage`).
    pub only: Option<String>,
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
    /// The error answered, if any: a function's `errorMessage`, or `code: message`.
    pub error: Option<String>,
}

struct Shared {
    store: Arc<ContractStore<MemoryKv>>,
    legacy_560: std::sync::atomic::AtomicBool,
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
            legacy_560: Default::default(),
            module: module.to_owned(),
            deploy_key: deploy_key.map(str::to_owned),
            faults: Mutex::default(),
            calls: Mutex::default(),
            in_flight: InFlightGauge::default(),
        });
        let app = Router::new()
            .route("/api/{kind}", post(call))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
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

    /// Answers a function's error with HTTP 560, as backends before the 200 status did.
    pub fn set_legacy_560(&self, on: bool) {
        self.shared
            .legacy_560
            .store(on, std::sync::atomic::Ordering::SeqCst);
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

/// `MAX_BACKEND_PUBLIC_API_REQUEST_SIZE` (`crates/common/src/knobs.rs:1591`).
pub const MAX_REQUEST_BYTES: usize = (1 << 24) + 2000;
/// `FUNCTION_MAX_ARGS_SIZE` and `FUNCTION_MAX_RESULT_SIZE` (`knobs.rs:413`, `:419`).
pub const MAX_VALUE_BYTES: usize = 1 << 24;
/// `MAX_USER_SIZE`, the largest document (`crates/common/src/document.rs:100`).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// The paused deployment's message (`crates/udf/src/validation.rs:117`).
pub const PAUSED: &str = "Cannot run functions while this deployment is paused. Resume the \
                          deployment in the dashboard settings to allow functions to run.";

/// A value as `"format": "json"` writes it: every number a float (`export_clean`).
pub fn to_wire(value: Value) -> Value {
    match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Value::Array(items) => Value::Array(items.into_iter().map(to_wire).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, to_wire(v))).collect())
        }
        other => other,
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
        error: None,
    };
    let response = handle(&shared, &kind, &headers, request, &mut record).await;
    shared
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(record);
    response
}

/// A function's error: HTTP 200 (or 560 in legacy mode) with `status: "error"`.
fn function_error(shared: &Shared, record: &mut CallRecord, message: String) -> Response {
    let status = if shared.legacy_560.load(std::sync::atomic::Ordering::SeqCst) {
        560
    } else {
        200
    };
    record.status = status;
    record.error = Some(message.clone());
    answer(status, json!({"status": "error", "errorMessage": message}))
}

fn api_error(record: &mut CallRecord, status: u16, code: &str, message: String) -> Response {
    record.status = status;
    record.error = Some(format!("{code}: {message}"));
    answer(status, json!({"code": code, "message": message}))
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
    if kind != "query" && kind != "mutation" {
        return api_error(record, 404, "NotFound", format!("no /api/{kind}"));
    }
    let name = request["path"]
        .as_str()
        .and_then(|p| p.strip_prefix(&format!("{}:", shared.module)))
        .map(str::to_owned);
    let not_found = || {
        format!(
            "Could not find public function for '{}'.",
            request["path"].as_str().unwrap_or("")
        )
    };
    // Internal functions: invisible without a key, a wrong key refused.
    if let Some(key) = &shared.deploy_key {
        match headers.get("authorization").and_then(|v| v.to_str().ok()) {
            None => return function_error(shared, record, not_found()),
            Some(given) if given != format!("Convex {key}") => {
                return api_error(
                    record,
                    403,
                    "BadDeployKey",
                    "The provided deploy key was invalid for this deployment. Double check that \
                     the environment this key was generated for matches the desired deployment."
                        .into(),
                )
            }
            Some(_) => {}
        }
    }
    let Some(name) = name else {
        return function_error(shared, record, not_found());
    };
    // Faults, one at a time, counted down under the lock.
    enum Fault {
        Http(u16, &'static str, &'static str),
        Function(String),
    }
    let fault = {
        let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        if f.only.as_deref().is_some_and(|only| only != name) {
            None
        } else if take(&mut f.unavailable) {
            Some(Fault::Http(503, "Overloaded", "injected: overloaded"))
        } else if take(&mut f.rate_limited) {
            Some(Fault::Http(
                429,
                "TooManyConcurrentRequests",
                "Too many concurrent requests. Your backend is limited to 16 concurrent mutations.",
            ))
        } else if take(&mut f.throws) {
            Some(Fault::Function(
                "Uncaught Error: injected: the function threw".into(),
            ))
        } else if take(&mut f.paused) {
            Some(Fault::Function(PAUSED.into()))
        } else if take(&mut f.timed_out) {
            Some(Fault::Function(
                "Function execution timed out (maximum duration: 1s)".into(),
            ))
        } else {
            None
        }
    };
    match fault {
        Some(Fault::Http(status, code, message)) => {
            return api_error(record, status, code, message.into())
        }
        Some(Fault::Function(message)) => return function_error(shared, record, message),
        None => {}
    }
    let args = request["args"].clone();
    let args_bytes = serde_json::to_vec(&args).map(|v| v.len()).unwrap_or(0);
    if args_bytes > MAX_VALUE_BYTES {
        return function_error(
            shared,
            record,
            format!("Arguments for {name} are too large (actual: {args_bytes}, limit: {MAX_VALUE_BYTES})"),
        );
    }
    // The one document the contract's mutations write from their arguments: a message.
    if let Some(content) = args["content"].as_str() {
        if content.len() > MAX_DOCUMENT_BYTES {
            return function_error(
                shared,
                record,
                format!(
                    "Uncaught Error: Value is too large ({} > maximum size {MAX_DOCUMENT_BYTES})",
                    content.len()
                ),
            );
        }
    }
    let store = shared.store.clone();
    let call_kind = kind.to_owned();
    let call_name = name.clone();
    // The store is blocking (it takes a lock, a large page copies megabytes).
    let result = tokio::task::spawn_blocking(move || match call_kind.as_str() {
        "query" => store.query(&call_name, args),
        _ => store.mutation(&call_name, args),
    })
    .await
    .unwrap_or_else(|e| Err(CallError::Function(format!("the function crashed: {e}"))));
    let counted = |f: &mut ConvexFaults, pick: fn(&mut ConvexFaults) -> &mut u32| {
        if f.only.as_deref().is_some_and(|only| only != name) {
            false
        } else {
            take(pick(f))
        }
    };
    match result {
        Ok(mut value) => {
            let lose = kind == "mutation" && {
                let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
                counted(&mut f, |f| &mut f.lose_reply)
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
                counted(&mut f, |f| &mut f.malformed)
            };
            if malformed {
                if let Some(first) = value["page"].get_mut(0) {
                    first["lastActivity"] = json!("yesterday");
                    first["timestamp"] = json!("yesterday");
                } else {
                    value["isDone"] = json!("maybe");
                }
            }
            let size = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0);
            if size > MAX_VALUE_BYTES {
                return function_error(
                    shared,
                    record,
                    format!("Function {name} return value is too large (actual: {size}, limit: {MAX_VALUE_BYTES})"),
                );
            }
            answer(200, json!({"status": "success", "value": to_wire(value)}))
        }
        // A validator's refusal reads `ArgumentValidationError: ...`; a thrown error
        // `Uncaught Error: ...`.
        Err(CallError::Function(message)) if message.contains(": bad arguments: ") => {
            function_error(
                shared,
                record,
                format!("ArgumentValidationError: {message}"),
            )
        }
        Err(CallError::Function(message)) => {
            function_error(shared, record, format!("Uncaught Error: {message}"))
        }
        Err(CallError::Store(e)) => api_error(
            record,
            500,
            "InternalServerError",
            format!("Your request couldn't be completed. Try again later. ({e})"),
        ),
    }
}
