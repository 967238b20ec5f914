//! A counting, fault-injecting HTTP proxy in front of a real server. Every call is forwarded as
//! it is (the event stream streamed through) and counted by method and path, with the most in
//! flight at once. The end-to-end tests put it before the real OpenCode server to count what the
//! worker sent it; started late on a port the worker already uses, it is an agent server that
//! comes up.
//!
//! Rules pick one call, the n-th (from 1) that matches a method and a path pattern (`*` stands
//! for one path segment: `/session/*/message`) counted from when the rule was added, and either
//! inject a [`Fault`] into it or run a hook at the moment it is forwarded (to SIGKILL the
//! worker with its request on the wire).
//!
//! The upstream call always runs in a task of its own: a client that goes away (killed, or
//! hung up on) never cancels what the upstream was sent, as with a real network where the
//! server carries on with a request whose client vanished.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{oneshot, watch, Notify};

use agentsync::sim::InFlightGauge;

/// What to do to one matched call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward the call, wait for the upstream's whole answer (its effect happened), then
    /// answer the client 502: a reply lost on the way back.
    LoseReplyAfterUpstream,
    /// Forward the call, wait for the upstream's whole answer, then close the client's TCP
    /// connection without writing a byte of the response.
    HangUpAfterUpstream,
    /// Forward the call (the upstream still completes it, in its own task) and close the
    /// client's TCP connection at once, before the upstream has answered.
    HangUpBeforeUpstreamAnswers,
}

/// What a rule does when its call comes.
enum Action {
    Fault(Fault),
    Hook(Box<dyn FnOnce() + Send>, oneshot::Sender<()>),
}

struct Rule {
    method: String,
    pattern: String,
    nth: usize,
    seen: usize,
    action: Option<Action>,
}

/// Fired when a hooked call was forwarded.
pub struct Tripwire(oneshot::Receiver<()>);

impl Tripwire {
    /// Waits until the hooked call was forwarded (and its hook ran), at most `limit`.
    pub async fn fired(self, limit: Duration) {
        match tokio::time::timeout(limit, self.0).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the proxy went away before the hooked call came"),
            Err(_) => panic!("the hooked call did not come within {limit:?}"),
        }
    }
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    calls: Mutex<Vec<(String, String)>>,
    in_flight: InFlightGauge,
    rules: Mutex<Vec<Rule>>,
    injected: Mutex<Vec<(String, String, Fault)>>,
}

/// A running proxy.
pub struct CountingProxy {
    shared: Arc<Shared>,
    port: u16,
    accept: tokio::task::JoinHandle<()>,
    /// Closes every open connection when set.
    shutdown: watch::Sender<bool>,
}

/// The hang-up line of the connection a request came on.
#[derive(Clone)]
struct HangUp(Arc<Notify>);

impl CountingProxy {
    /// Listens on 127.0.0.1:`port` and forwards to `upstream` (`http://host:port`).
    pub async fn start_on(port: u16, upstream: &str) -> Self {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            calls: Mutex::default(),
            in_flight: InFlightGauge::default(),
            rules: Mutex::default(),
            injected: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("the proxy's port is free");
        let port = listener.local_addr().unwrap().port();
        let (shutdown, closed) = watch::channel(false);
        let app = Router::new().fallback(forward).with_state(shared.clone());
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let hang_up = Arc::new(Notify::new());
                let service =
                    TowerToHyperService::new(app.clone().layer(Extension(HangUp(hang_up.clone()))));
                let mut closed = closed.clone();
                tokio::spawn(async move {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service);
                    // Each connection is served here rather than by axum::serve so that a fault
                    // can end it: leaving the select drops `connection` and with it the socket,
                    // so the kernel closes the TCP connection (FIN) while the handler is still
                    // pending, before any byte of a response was written. The client reads end
                    // of file where the status line should be.
                    tokio::select! {
                        _ = connection => {}
                        _ = hang_up.notified() => {}
                        _ = closed.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self {
            shared,
            port,
            accept,
            shutdown,
        }
    }

    /// Listens on a free loopback port.
    pub async fn start(upstream: &str) -> Self {
        Self::start_on(0, upstream).await
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops listening and closes every connection: afterwards nothing listens on the port
    /// (counts and records stay readable).
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        self.accept.abort();
        // The listener is dropped with the accept task: wait until it was.
        while !self.accept.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Injects `fault` into the `nth` call (from 1, counted from now) whose method is `method`
    /// and whose path matches `pattern`.
    pub fn inject(&self, method: &str, pattern: &str, nth: usize, fault: Fault) {
        self.add(method, pattern, nth, Action::Fault(fault));
    }

    /// Runs `hook` at the moment the `nth` call (from 1, counted from now) matching `method` and
    /// `pattern` has been handed to the upstream; the tripwire says when it has.
    pub fn on_forward(
        &self,
        method: &str,
        pattern: &str,
        nth: usize,
        hook: impl FnOnce() + Send + 'static,
    ) -> Tripwire {
        let (tx, rx) = oneshot::channel();
        self.add(method, pattern, nth, Action::Hook(Box::new(hook), tx));
        Tripwire(rx)
    }

    fn add(&self, method: &str, pattern: &str, nth: usize, action: Action) {
        assert!(nth >= 1, "calls are counted from 1");
        self.shared.rules.lock().unwrap().push(Rule {
            method: method.to_owned(),
            pattern: pattern.to_owned(),
            nth,
            seen: 0,
            action: Some(action),
        });
    }

    /// The faults injected so far: `(method, path, fault)`.
    pub fn injected(&self) -> Vec<(String, String, Fault)> {
        self.shared.injected.lock().unwrap().clone()
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

    /// Calls so far with this method whose path matches `pattern` (`*`: one segment).
    pub fn count_matching(&self, method: &str, pattern: &str) -> usize {
        self.shared
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p)| m == method && matches(pattern, p))
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
        let _ = self.shutdown.send(true);
        self.accept.abort();
    }
}

/// Whether `path` matches `pattern`, segment by segment, `*` matching any one segment.
fn matches(pattern: &str, path: &str) -> bool {
    let (p, s): (Vec<_>, Vec<_>) = (pattern.split('/').collect(), path.split('/').collect());
    p.len() == s.len()
        && p.iter()
            .zip(&s)
            .all(|(p, s)| *p == "*" && !s.is_empty() || p == s)
}

impl Shared {
    /// The fault and the hooks of the rules this call is the chosen one of.
    fn decide(&self, method: &str, path: &str) -> (Option<Fault>, Vec<Action>) {
        let mut fault = None;
        let mut hooks = Vec::new();
        let mut rules = self.rules.lock().unwrap();
        for rule in rules.iter_mut() {
            if rule.action.is_none() || rule.method != method || !matches(&rule.pattern, path) {
                continue;
            }
            rule.seen += 1;
            if rule.seen != rule.nth {
                continue;
            }
            match rule.action.take().expect("not yet taken") {
                Action::Fault(f) if fault.is_none() => fault = Some(f),
                Action::Fault(f) => rule.action = Some(Action::Fault(f)),
                hook => hooks.push(hook),
            }
        }
        rules.retain(|r| r.action.is_some());
        (fault, hooks)
    }
}

/// What the upstream answered.
struct Upstream {
    status: u16,
    headers: HeaderMap,
    body: UpstreamBody,
}

enum UpstreamBody {
    Whole(Bytes),
    Stream(reqwest::Response),
}

impl Upstream {
    fn into_response(self) -> Response {
        let mut response = Response::builder().status(self.status);
        for (name, value) in &self.headers {
            if name != "content-length" && name != "transfer-encoding" && name != "connection" {
                response = response.header(name, value);
            }
        }
        let body = match self.body {
            UpstreamBody::Whole(b) => Body::from(b),
            UpstreamBody::Stream(r) => Body::from_stream(r.bytes_stream()),
        };
        response.body(body).expect("a valid response")
    }
}

async fn exchange(
    http: reqwest::Client,
    method: Method,
    target: String,
    headers: HeaderMap,
    body: Bytes,
    streaming: bool,
) -> Result<Upstream, String> {
    let mut upstream = http.request(method, target).body(body);
    for (name, value) in &headers {
        if name != "host" {
            upstream = upstream.header(name, value);
        }
    }
    let reply = upstream.send().await.map_err(|e| e.to_string())?;
    let (status, headers) = (reply.status().as_u16(), reply.headers().clone());
    let body = if streaming {
        UpstreamBody::Stream(reply)
    } else {
        UpstreamBody::Whole(reply.bytes().await.map_err(|e| e.to_string())?)
    };
    Ok(Upstream {
        status,
        headers,
        body,
    })
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    Extension(hang_up): Extension<HangUp>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let method = parts.method.to_string();
    shared
        .calls
        .lock()
        .unwrap()
        .push((method.clone(), path.clone()));
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
    let (fault, hooks) = shared.decide(&method, &path);
    let upstream = tokio::spawn(exchange(
        shared.http.clone(),
        parts.method,
        target,
        parts.headers,
        body,
        streaming,
    ));
    for hook in hooks {
        if let Action::Hook(hook, fired) = hook {
            hook();
            let _ = fired.send(());
        }
    }
    if let Some(fault) = fault {
        shared.injected.lock().unwrap().push((method, path, fault));
    }
    let hang_up = || async move {
        hang_up.0.notify_one();
        // The connection task drops the connection; this response is never written.
        std::future::pending::<Response>().await
    };
    match fault {
        None => match upstream.await {
            Ok(Ok(reply)) => reply.into_response(),
            Ok(Err(e)) => (StatusCode::BAD_GATEWAY, e).into_response(),
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        },
        Some(Fault::LoseReplyAfterUpstream) => {
            let _ = upstream.await;
            (StatusCode::BAD_GATEWAY, "injected: the reply was lost").into_response()
        }
        Some(Fault::HangUpAfterUpstream) => {
            let _ = upstream.await;
            hang_up().await
        }
        Some(Fault::HangUpBeforeUpstreamAnswers) => hang_up().await,
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn a_star_is_one_segment() {
        assert!(matches("/session", "/session"));
        assert!(matches("/session/*/message", "/session/ses_1/message"));
        assert!(!matches(
            "/session/*/message",
            "/session/ses_1/message/msg_1"
        ));
        assert!(!matches("/session/*", "/session"));
        assert!(!matches("/session/*", "/session/"));
    }
}
