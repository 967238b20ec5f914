//! The measurement behind the checkpoint encoding (`docs/architecture.md`, "Checkpoint
//! encoding"): the three views of a realistic history of N agent sessions (the seeded
//! generator of `agentsync::testkit`, with its messages, prompts and ledger), each encoded and
//! decoded (typed, as a start loads it) in every candidate format, in one run.
//!
//! `cargo run --release --example checkpoint-formats -- 100000`
//!
//! Candidates: JSON (the checkpoints before), JSON in a zstd frame, MessagePack with field
//! names (`rmp-serde`, self-describing: keeps `#[serde(tag)]`, `skip_serializing_if` and
//! `default`), the same in zstd (decompressed whole, then decoded; or decoded from the
//! decompressing reader, which holds no decompressed copy), and postcard (not self-describing: the views hold internally
//! tagged enums, which it cannot decode; the run shows the error rather than assume it).
//! bincode is not a candidate: unmaintained (RUSTSEC-2025-0141).

use std::time::Instant;

use agentsync::events::Envelope;
use agentsync::projections::Views;
use agentsync::testkit::History;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

const START: u64 = 1_763_700_000_000;

/// Views folded from the seeded history until they hold `n` agent sessions.
fn views(n: usize) -> (Views, u64) {
    let mut h = History::new(START);
    let mut steps = History::step_stream(42);
    let mut views = Views::default();
    let mut seq = 0;
    while views.sessions.state.agent.len() < n {
        for _ in 0..1000 {
            h.step(steps.next().expect("endless steps"));
        }
        for e in h.take() {
            seq += 1;
            views.apply(&Envelope {
                seq,
                id: uuid::Uuid::nil(),
                at: e.at,
                v: e.event.kind().version(),
                event: e.event,
                cause: None,
            });
        }
    }
    (views, seq)
}

type Codec<T> = (
    &'static str,
    fn(&T) -> Result<Vec<u8>, String>,
    fn(&[u8]) -> Result<T, String>,
);

fn codecs<T: Serialize + DeserializeOwned>() -> Vec<Codec<T>> {
    fn z(b: Vec<u8>) -> Result<Vec<u8>, String> {
        zstd::bulk::compress(&b, 1).map_err(|e| e.to_string())
    }
    fn unz(b: &[u8]) -> Result<Vec<u8>, String> {
        zstd::stream::decode_all(b).map_err(|e| e.to_string())
    }
    vec![
        (
            "json",
            |v| serde_json::to_vec(v).map_err(|e| e.to_string()),
            |b| serde_json::from_slice(b).map_err(|e| e.to_string()),
        ),
        (
            "json_zstd1",
            |v| z(serde_json::to_vec(v).map_err(|e| e.to_string())?),
            |b| serde_json::from_slice(&unz(b)?).map_err(|e| e.to_string()),
        ),
        (
            "msgpack_named",
            |v| rmp_serde::to_vec_named(v).map_err(|e| e.to_string()),
            |b| rmp_serde::from_slice(b).map_err(|e| e.to_string()),
        ),
        (
            "msgpack_named_zstd1",
            |v| z(rmp_serde::to_vec_named(v).map_err(|e| e.to_string())?),
            |b| rmp_serde::from_slice(&unz(b)?).map_err(|e| e.to_string()),
        ),
        (
            "msgpack_named_zstd1_streamed",
            |v| z(rmp_serde::to_vec_named(v).map_err(|e| e.to_string())?),
            |b| {
                let frame = zstd::stream::read::Decoder::new(b).map_err(|e| e.to_string())?;
                rmp_serde::from_read(frame).map_err(|e| e.to_string())
            },
        ),
        (
            "postcard",
            |v| postcard::to_allocvec(v).map_err(|e| e.to_string()),
            |b| postcard::from_bytes(b).map_err(|e| e.to_string()),
        ),
    ]
}

/// Best of five: encode and write (fsync'd, as a checkpoint is) ms, read and decode ms, bytes;
/// or the error.
fn measure<T: Serialize + DeserializeOwned + PartialEq>(v: &T, c: &Codec<T>) -> serde_json::Value {
    let (mut enc, mut dec, mut bytes) = (f64::MAX, f64::MAX, 0);
    let path = std::env::temp_dir().join(format!("checkpoint-formats-{}", std::process::id()));
    for _ in 0..5 {
        let t = Instant::now();
        let b = match (c.1)(v) {
            Ok(b) => b,
            Err(e) => return json!({ "error": format!("encode: {e}") }),
        };
        let mut f = std::fs::File::create(&path).expect("a temp file");
        std::io::Write::write_all(&mut f, &b).expect("written");
        f.sync_all().expect("synced");
        enc = enc.min(t.elapsed().as_secs_f64() * 1000.0);
        bytes = b.len();
        drop(b);
        let t = Instant::now();
        let b = std::fs::read(&path).expect("read back");
        let back = match (c.2)(&b) {
            Ok(x) => x,
            Err(e) => return json!({ "error": format!("decode: {e}"), "bytes": bytes }),
        };
        dec = dec.min(t.elapsed().as_secs_f64() * 1000.0);
        if back != *v {
            return json!({ "error": "decoded state differs" });
        }
    }
    let _ = std::fs::remove_file(&path);
    let r = |x: f64| (x * 10.0).round() / 10.0;
    json!({ "encode_ms": r(enc), "decode_ms": r(dec), "bytes": bytes })
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a number of sessions"))
        .unwrap_or(100_000);
    let t = Instant::now();
    let (v, events) = views(n);
    let built_ms = t.elapsed().as_millis();
    let mut out = serde_json::Map::new();
    let sizes = json!({
        "agent_sessions": v.sessions.state.agent.len(),
        "chat_sessions": v.sessions.state.chat.len(),
        "messages": v.messages.state.messages.len(),
        "ledger": v.commands.state.commands.len(),
        "events_folded": events,
        "build_ms": built_ms,
    });
    out.insert("views".into(), sizes);
    let mut totals = serde_json::Map::new();
    let names: Vec<&str> = codecs::<agentsync::projections::SessionsView>()
        .iter()
        .map(|c| c.0)
        .collect();
    let results: Vec<(&str, [serde_json::Value; 3])> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let s = measure(&v.sessions.state, &codecs()[i]);
            let m = measure(&v.messages.state, &codecs()[i]);
            let c = measure(&v.commands.state, &codecs()[i]);
            (*name, [s, m, c])
        })
        .collect();
    for (name, [s, m, c]) in results {
        let sum = |k: &str| {
            [&s, &m, &c]
                .iter()
                .map(|x| x[k].as_f64())
                .sum::<Option<f64>>()
                .map(|x| (x * 10.0).round() / 10.0)
        };
        totals.insert(
            name.into(),
            json!({
                "encode_ms": sum("encode_ms"),
                "decode_ms": sum("decode_ms"),
                "bytes": sum("bytes"),
                "sessions": s,
                "messages": m,
                "commands": c,
            }),
        );
    }
    out.insert("formats".into(), totals.into());
    println!("{}", serde_json::Value::Object(out));
}
