//! The shared contract suite (`tests/contract/cases.json`, also run by vitest against the real
//! Convex module under convex-test: `examples/convex/contract.test.ts`) against the two Rust
//! implementations: the fake Convex deployment, called through the worker's Convex client over
//! HTTP in the real wire format (floats, 200 status errors, internal functions behind a deploy
//! key), and the embedded local backend's contract store on sled.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use agentsync::backend::contract::FunctionKind;
use agentsync::backend::store::{CallError, ContractStore, Kv};
use agentsync::backend::{ConvexClient, ConvexConfig, LocalBackend};
use agentsync::clock::ManualClock;
use agentsync::log::EventLog;
use agentsync::secret::Secret;
use agentsync::sim::convex::FakeConvex;
use serde_json::Value;

const CASES: &str = include_str!("contract/cases.json");

/// One implementation: the contract's calls, and what people do.
#[allow(async_fn_in_trait)]
trait Subject {
    async fn call(&self, name: &str, args: Value) -> Result<Value, String>;
    fn open_chat(&self, worker: &str, title: &str) -> String;
    fn post(&self, chat: &str, content: &str) -> String;
    fn failure_reason(&self, chat: &str) -> Option<String>;
    /// Moves the backend's clock `ms` on and runs its pruning of applied command ids.
    fn elapse(&self, ms: u64);
}

fn is_query(name: &str) -> bool {
    matches!(name, "listSessions" | "listMessages")
}

struct Seeds<K: Kv>(Arc<ContractStore<K>>);

impl<K: Kv> Seeds<K> {
    fn open_chat(&self, worker: &str, title: &str) -> String {
        self.0.open_chat(worker, title).unwrap().chat_session_id
    }
    fn post(&self, chat: &str, content: &str) -> String {
        self.0.post_user_message(chat, content).unwrap().message_id
    }
    fn failure_reason(&self, chat: &str) -> Option<String> {
        self.0.failure_reason(chat).unwrap()
    }
}

/// The fake deployment through the Convex client.
struct Fake {
    fake: FakeConvex,
    client: ConvexClient,
    seeds: Seeds<agentsync::backend::store::MemoryKv>,
    clock: Arc<ManualClock>,
}

impl Subject for Fake {
    async fn call(&self, name: &str, args: Value) -> Result<Value, String> {
        let kind = if is_query(name) {
            FunctionKind::Query
        } else {
            FunctionKind::Mutation
        };
        let value = self.client.call(kind, name, args).await.map_err(|e| {
            assert!(!e.is_retryable(), "a refusal is terminal: {e}");
            e.message
        })?;
        // The wire format: every number a float.
        assert_no_integers(&value);
        Ok(value)
    }
    fn open_chat(&self, worker: &str, title: &str) -> String {
        self.seeds.open_chat(worker, title)
    }
    fn post(&self, chat: &str, content: &str) -> String {
        self.seeds.post(chat, content)
    }
    fn failure_reason(&self, chat: &str) -> Option<String> {
        self.seeds.failure_reason(chat)
    }
    fn elapse(&self, ms: u64) {
        self.clock.advance(ms);
        self.seeds.0.prune_applied().unwrap();
    }
}

fn assert_no_integers(v: &Value) {
    match v {
        Value::Number(n) => assert!(n.is_f64(), "{n} is sent as a float"),
        Value::Array(items) => items.iter().for_each(assert_no_integers),
        Value::Object(map) => map.values().for_each(assert_no_integers),
        _ => {}
    }
}

/// The local backend's store.
struct Local {
    store: Arc<ContractStore<agentsync::backend::store::SledKv>>,
    seeds: Seeds<agentsync::backend::store::SledKv>,
    clock: Arc<ManualClock>,
    _keep: (EventLog, tempfile::TempDir),
}

impl Subject for Local {
    async fn call(&self, name: &str, args: Value) -> Result<Value, String> {
        let store = self.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            if is_query(&name) {
                store.query(&name, args)
            } else {
                store.mutation(&name, args)
            }
        })
        .await
        .unwrap()
        .map_err(|e| match e {
            CallError::Function(m) => m,
            CallError::Store(e) => panic!("the store failed: {e}"),
        })
    }
    fn open_chat(&self, worker: &str, title: &str) -> String {
        self.seeds.open_chat(worker, title)
    }
    fn post(&self, chat: &str, content: &str) -> String {
        self.seeds.post(chat, content)
    }
    fn failure_reason(&self, chat: &str) -> Option<String> {
        self.seeds.failure_reason(chat)
    }
    fn elapse(&self, ms: u64) {
        self.clock.advance(ms);
        self.store.prune_applied().unwrap();
    }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_763_700_000_000))
}

async fn fake() -> Fake {
    let clock = clock();
    let fake = FakeConvex::start("agentsync", Some("dev:suite"), clock.clone())
        .await
        .unwrap();
    let client = ConvexClient::new(ConvexConfig {
        deploy_key: Some(Secret::new("dev:suite")),
        ..ConvexConfig::new(&fake.url, "worker-1")
    })
    .unwrap();
    let seeds = Seeds(fake.store());
    Fake {
        fake,
        client,
        seeds,
        clock,
    }
}

fn local() -> Local {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), &common::create()).unwrap();
    let clock = clock();
    let backend = LocalBackend::open(&log, "worker-1", clock.clone()).unwrap();
    let store = backend.store();
    Local {
        seeds: Seeds(store.clone()),
        store,
        clock,
        _keep: (log, dir),
    }
}

type Bindings = HashMap<String, Value>;

fn content(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        other => other["repeat"]
            .as_str()
            .unwrap()
            .repeat(other["times"].as_u64().unwrap() as usize),
    }
}

fn subst(v: &Value, b: &Bindings) -> Value {
    match v {
        Value::String(s) if s.starts_with('$') && b.contains_key(&s[1..]) => b[&s[1..]].clone(),
        Value::Array(items) => Value::Array(items.iter().map(|x| subst(x, b)).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, x)| (k.clone(), subst(x, b))).collect())
        }
        other => other.clone(),
    }
}

/// Whether `actual` matches the pattern `want` (cases.json's "about"), binding as it goes.
fn matches(want: &Value, actual: &Value, b: &mut Bindings, at: &str) {
    match want {
        Value::String(s) if s.starts_with('$') => {
            if s == "$any" {
            } else if s == "$number" {
                assert!(actual.is_number(), "{at}: {actual} is a number");
            } else if let Some(name) = s.strip_prefix("$bind:") {
                b.insert(name.to_owned(), actual.clone());
            } else {
                let bound = b
                    .get(&s[1..])
                    .unwrap_or_else(|| panic!("{at}: {s} unbound"));
                assert_eq!(actual, bound, "{at}");
            }
        }
        Value::Array(items) => {
            let got = actual
                .as_array()
                .unwrap_or_else(|| panic!("{at}: {actual} is an array"));
            assert_eq!(got.len(), items.len(), "{at}: length of {actual}");
            for (i, (w, a)) in items.iter().zip(got).enumerate() {
                matches(w, a, b, &format!("{at}[{i}]"));
            }
        }
        Value::Object(map) => {
            for (k, w) in map {
                matches(w, &actual[k], b, &format!("{at}.{k}"));
            }
        }
        Value::Number(n) => assert_eq!(
            actual.as_f64(),
            n.as_f64(),
            "{at}: numbers compare as numbers"
        ),
        other => assert_eq!(actual, other, "{at}"),
    }
}

async fn run(subject: &impl Subject, steps: &[Value]) {
    let mut b = Bindings::new();
    for (i, step) in steps.iter().enumerate() {
        let at = format!("step {i}");
        if let Some(seed) = step["seed"].as_str() {
            match seed {
                "openChat" => {
                    let id = subject.open_chat(
                        step["workerId"].as_str().unwrap(),
                        step["title"].as_str().unwrap(),
                    );
                    b.insert(step["as"].as_str().unwrap().into(), Value::String(id));
                }
                "post" => {
                    let chat = subst(&step["chat"], &b);
                    let text = content(&step["content"]);
                    for _ in 0..step["times"].as_u64().unwrap_or(1) {
                        let id = subject.post(chat.as_str().unwrap(), &text);
                        if let Some(name) = step["as"].as_str() {
                            b.insert(name.into(), Value::String(id));
                        }
                    }
                }
                other => panic!("{at}: unknown seed {other}"),
            }
        } else if let Some(name) = step["call"].as_str() {
            let result = subject.call(name, subst(&step["args"], &b)).await;
            match step.get("error").and_then(Value::as_str) {
                Some(says) => {
                    let err = result.expect_err(&format!("{at}: {name} is refused"));
                    assert!(err.contains(says), "{at}: {err:?} says {says:?}");
                }
                None => {
                    let value = result.unwrap_or_else(|e| panic!("{at}: {name}: {e}"));
                    matches(&step["ok"], &value, &mut b, &format!("{at} {name}"));
                }
            }
        } else if let Some(name) = step["drain"].as_str() {
            let mut cursor = subst(&step["cursor"], &b);
            let mut items = Vec::new();
            let mut pages = 0;
            loop {
                let args = serde_json::json!({"workerId": step["workerId"], "cursor": cursor,
                    "limit": step["limit"]});
                let page = subject.call(name, args).await.unwrap();
                pages += 1;
                assert!(pages < 1000, "{at}: the listing ends");
                if let Some(max) = step["maxPageBytes"].as_u64() {
                    let bytes = serde_json::to_vec(&page).unwrap().len() as u64;
                    assert!(bytes <= max, "{at}: page {pages} is {bytes} bytes");
                }
                items.extend(page["page"].as_array().unwrap().iter().cloned());
                cursor = page["continueCursor"].clone();
                if page["isDone"] == Value::Bool(true) {
                    break;
                }
            }
            if let Some(min) = step["minPages"].as_u64() {
                assert!(pages >= min, "{at}: {pages} pages, at least {min}");
            }
            if let Some(name) = step["cursorAs"].as_str() {
                b.insert(name.into(), cursor);
            }
            if let Some(n) = step["expectCount"].as_u64() {
                assert_eq!(items.len() as u64, n, "{at}");
            }
            if let Some(expect) = step.get("expect") {
                let any_order = step["anyOrder"] == Value::Bool(true);
                let key = |x: &Value| {
                    format!(
                        "{}/{}",
                        x["chatSessionId"].as_str().unwrap_or(""),
                        x["messageId"].as_str().unwrap_or("")
                    )
                };
                let (want, got) = if any_order {
                    let mut want = subst(expect, &b).as_array().unwrap().clone();
                    want.sort_by_key(key);
                    items.sort_by_key(key);
                    (Value::Array(want), items)
                } else {
                    (expect.clone(), items)
                };
                matches(&want, &Value::Array(got), &mut b, &format!("{at} {name}"));
            }
        } else if let Some(ms) = step["elapse"].as_u64() {
            subject.elapse(ms);
        } else if step["inspect"] == "failureReason" {
            let chat = subst(&step["chat"], &b);
            assert_eq!(
                subject.failure_reason(chat.as_str().unwrap()).as_deref(),
                step["equals"].as_str(),
                "{at}"
            );
        } else {
            panic!("{at}: unknown step {step}");
        }
    }
}

fn cases() -> Vec<(String, Vec<Value>)> {
    let suite: Value = serde_json::from_str(CASES).unwrap();
    suite["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["steps"].as_array().unwrap().clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_suite_on_the_fake_convex_deployment_in_its_wire_format() {
    let cases = cases();
    assert!(cases.len() >= 6);
    for (name, steps) in &cases {
        let subject = fake().await;
        run(&subject, steps).await;
        assert!(
            subject.fake.calls().iter().all(|c| c.status == 200),
            "{name}: every answer, refusals too, is HTTP 200"
        );
        println!("fake convex: ok: {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_suite_on_the_embedded_local_backend() {
    for (name, steps) in &cases() {
        run(&local(), steps).await;
        println!("local backend: ok: {name}");
    }
}
