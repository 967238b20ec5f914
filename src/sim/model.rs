//! A loopback mock of an OpenAI-compatible model server, so a real OpenCode server completes
//! prompts with no network and no API key: `POST /v1/chat/completions`, answered with streamed
//! SSE chunks. The end-to-end tests run it; so can a person trying the worker (`cargo run
//! --example mock-model`), with [`opencode_config`] in the agent directory.
//!
//! What it does is chosen by the prompt's last user text, so one mock serves many tests:
//! - contains `OVERFLOW`: HTTP 400 `context_length_exceeded` (OpenCode turns this into a
//!   `ContextOverflowError` in a 200 reply);
//! - contains `FAIL500`: HTTP 500;
//! - contains `SLOW:<ms>`: waits that long before answering;
//! - otherwise answers `<reply prefix><the user's text>` in three chunks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// The prefix of every answer.
pub const REPLY_PREFIX: &str = "mock answer: ";

/// A running mock.
pub struct MockModel {
    /// `http://127.0.0.1:PORT/v1`, the `baseURL` for `opencode.json`.
    pub base_url: String,
    /// Chat completions requested so far.
    pub requests: Arc<AtomicUsize>,
    /// The last user text of every request so far, in arrival order.
    texts: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Seen {
    requests: Arc<AtomicUsize>,
    texts: Arc<Mutex<Vec<String>>>,
}

impl MockModel {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind the mock model server")
    }

    /// Starts on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let seen = Seen {
            requests: Arc::new(AtomicUsize::new(0)),
            texts: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "mock model server stopped");
            }
        });
        Ok(Self {
            base_url: format!("http://{addr}/v1"),
            requests: seen.requests,
            texts: seen.texts,
            task,
        })
    }

    /// Requests so far whose last user text contains `text`: how often the model was asked to
    /// answer that message (a message posted twice under one id has its text twice).
    pub fn asked(&self, text: &str) -> usize {
        self.texts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| t.contains(text))
            .count()
    }

    /// The last user text of every request so far, in arrival order.
    pub fn texts(&self) -> Vec<String> {
        self.texts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The `opencode.json` of an agent directory whose only model is this one (`mock/echo`).
    pub fn opencode_config(&self) -> serde_json::Value {
        opencode_config(&self.base_url)
    }
}

/// An `opencode.json` whose only provider is the mock at `base_url` (`http://HOST:PORT/v1`),
/// model `mock/echo`.
pub fn opencode_config(base_url: &str) -> serde_json::Value {
    json!({
        "$schema": "https://opencode.ai/config.json",
        "provider": {"mock": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "Mock",
            "options": {"baseURL": base_url, "apiKey": "not-a-secret"},
            "models": {"echo": {"name": "Echo", "limit": {"context": 1000, "output": 100}}}
        }},
        "model": "mock/echo",
        "autoupdate": false,
        "share": "disabled"
    })
}

impl Drop for MockModel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The text of the last user message (a string, or text parts).
fn last_user_text(body: &Value) -> String {
    let Some(messages) = body["messages"].as_array() else {
        return String::new();
    };
    let Some(last) = messages.iter().rev().find(|m| m["role"] == "user") else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

async fn complete(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    let text = last_user_text(&body);
    seen.texts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(text.clone());
    seen.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(ms) = text
        .split("SLOW:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if text.contains("OVERFLOW") {
        let error = json!({"error": {
            "message": "This model's maximum context length is 1000 tokens. However, your messages resulted in 200000 tokens.",
            "type": "invalid_request_error",
            "code": "context_length_exceeded"
        }});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    if text.contains("FAIL500") {
        let error = json!({"error": {"message": "mock failure", "type": "server_error"}});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response();
    }
    let answer = format!("{REPLY_PREFIX}{text}");
    let (a, b) = answer.split_at(answer.len() / 2);
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1,
               "model": "echo", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut sse = String::new();
    for event in [
        chunk(json!({"role": "assistant", "content": a}), Value::Null),
        chunk(json!({"content": b}), Value::Null),
        {
            let mut last = chunk(json!({}), json!("stop"));
            last["usage"] = json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8});
            last
        },
    ] {
        sse.push_str(&format!("data: {event}\n\n"));
    }
    sse.push_str("data: [DONE]\n\n");
    ([(header::CONTENT_TYPE, "text/event-stream")], sse).into_response()
}
