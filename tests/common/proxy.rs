//! A counting HTTP proxy in front of a real server: every call is forwarded as it is (the event
//! stream streamed through), and counted by method and path with the most in flight at once.
//! The end-to-end tests put it before the real OpenCode server to count what the worker sent
//! it; started late on a port the worker already uses, it is an agent server that comes up.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;

use agentsync::sim::InFlightGauge;

struct Shared {
    upstream: String,
    http: reqwest::Client,
    calls: Mutex<Vec<(String, String)>>,
    in_flight: InFlightGauge,
}

/// A running proxy.
pub struct CountingProxy {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on 127.0.0.1:`port` and forwards to `upstream` (`http://host:port`).
    pub async fn start_on(port: u16, upstream: &str) -> Self {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            calls: Mutex::default(),
            in_flight: InFlightGauge::default(),
        });
        let app = Router::new().fallback(forward).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("the proxy's port is free");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { shared, task }
    }

    /// Calls so far with this method and path (query left out).
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.shared
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }

    /// Every call so far, `(method, path)`.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// The most calls in flight at once, the event stream left out (it is always open).
    pub fn peak_in_flight(&self) -> usize {
        self.shared.in_flight.peak()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    shared
        .calls
        .lock()
        .unwrap()
        .push((parts.method.to_string(), path.clone()));
    let streaming = path == "/event";
    let _call = (!streaming).then(|| shared.in_flight.enter());
    let target = format!(
        "{}{}",
        shared.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut upstream = shared.http.request(parts.method, target).body(body);
    for (name, value) in &parts.headers {
        if name != "host" {
            upstream = upstream.header(name, value);
        }
    }
    let reply = match upstream.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let mut response = Response::builder().status(reply.status().as_u16());
    for (name, value) in reply.headers() {
        if name != "content-length" && name != "transfer-encoding" && name != "connection" {
            response = response.header(name, value);
        }
    }
    let body = if streaming {
        Body::from_stream(reply.bytes_stream())
    } else {
        match reply.bytes().await {
            Ok(b) => Body::from(b),
            Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        }
    };
    response.body(body).expect("a valid response")
}
