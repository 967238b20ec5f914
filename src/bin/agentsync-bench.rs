//! `agentsync-bench`: measurements, not tests. Each subcommand prints what it measured, and with
//! `--json` one JSON object, so runs can be compared within one machine.
//!
//! `log --events N`: the event log and projections against raw sled on the same bytes, in the
//! same run (runs vary by +/-15 % on a shared machine: compare the ratios); then `why` of an
//! early message id on the whole live log, the archive step (checkpoints at the end, every
//! covered event into segments) and the same `why` once archived (`why_ms`).
//! `reconcile --sessions N`: one reconciliation pass over N x N sessions with 1 % drift, the
//! same planned key by key, and the median worker turn after one changed key (a rename, a new
//! message).
//! `storm --scale K`: the incident x K through a real worker and log against the simulated
//! sides, throttled, then (same run) with throttling and the model cache off.
//! `startup --sessions N`: `agentsync run` as a process of its own, from its start to Ready, on
//! a data dir whose checkpoint holds N linked sessions, against a fake OpenCode server and a
//! fake Convex deployment (both on loopback HTTP) holding the same N sessions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use agentsync::clock::SystemClock;
use agentsync::dispatch::DispatchConfig;
use agentsync::events::{
    AgentSessionId, AgentSessionInfo, ChatSessionId, ChatSessionInfo, ChatStatus, Envelope, Event,
    ListingCompleted, MessageId, MessageInfo, ModelRef, NewEvent, Role, Source,
};
use agentsync::log::{
    load_views, ArchiveOptions, CheckpointPolicy, EventLog, LiveViews, LogOptions, ReadFilter,
};
use agentsync::projections::{SessionIndex, Views};
use agentsync::reconcile::{self, Context};
use agentsync::sim::adversary;
use agentsync::sim::incident::{self, Incident};
use agentsync::testkit::History;
use clap::{Parser, Subcommand};
use serde_json::json;

/// sled's page cache for every database in the benchmark, ours and raw alike: the engine's
/// default.
fn cache_bytes() -> u64 {
    LogOptions::default().cache_bytes
}
const BATCH: usize = 1000;
const START: u64 = 1_763_700_000_000;

#[derive(Parser)]
#[command(name = "agentsync-bench", about = "agentsync measurements")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Append, rebuild and startup of the log, against raw sled on the same bytes; `why`
    /// before and after archiving.
    Log {
        /// How many events to append and rebuild.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Sessions in the checkpoint loaded by the startup measurement.
        #[arg(long, default_value_t = 100_000)]
        startup_sessions: usize,
        /// Where to put the databases (a fresh folder inside it; removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One phase of `log`, run by `log` in a child process.
    #[command(hide = true)]
    LogPhase {
        #[arg(long)]
        phase: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        events: usize,
        #[arg(long)]
        startup_sessions: usize,
    },
    /// One reconciliation pass over N agent x N chat sessions with 1 % drift.
    Reconcile {
        /// Sessions on each side.
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// `agentsync run` from process start to Ready on a checkpointed view of N sessions,
    /// against fake OpenCode and fake Convex servers holding them.
    Startup {
        /// Sessions in the checkpoint and on each side; a list (`10000,100000`) runs each in
        /// turn, in one invocation.
        #[arg(long, value_delimiter = ',', default_value = "100000")]
        sessions: Vec<usize>,
        /// Every call to the fake Convex deployment waits this long, ms.
        #[arg(long, default_value_t = 0)]
        backend_latency_ms: u64,
        /// Every call to the fake OpenCode server waits this long, ms.
        #[arg(long, default_value_t = 0)]
        agent_latency_ms: u64,
        /// The share of sessions with a conversation (a user message and its answer) in the
        /// backend and in the checkpointed views, percent.
        #[arg(long, default_value_t = 1.0)]
        active_percent: f64,
        /// Where to put the data dir (a fresh folder inside it; removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A data dir without the feeds' cursors (as one from before incremental observation):
        /// the start lists both sides in full, as every start did before.
        #[arg(long)]
        no_cursors: bool,
        /// The previous run's history archived and its log database compacted (`agentsync
        /// archive --compact`): sessions that came in longer ago than the retention window.
        /// Without it, the events that brought every session in are all in the live log.
        #[arg(long)]
        archived: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The adversarial simulation: N seeded histories of faults on both sides through a real
    /// worker and log, each checked against the invariants.
    Sim {
        /// How many seeds to run (0..N).
        #[arg(long, default_value_t = 200)]
        seeds: u64,
        /// Replay this seed alone, keep its log, and print what broke.
        #[arg(long)]
        seed: Option<u64>,
        /// Where to keep the log of `--seed` (default: a folder in the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Days of traffic on the simulated sides, on a paused clock: one worker process a day,
    /// then the archive step; per day the views' size, events and bytes on disk (live log and
    /// archive), a reconcile pass's p99 and the start-up (load) from that day's data dir.
    Soak {
        /// Simulated days.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// User messages a day, spread over its hours (the full size is 10,000; the
        /// default is a smoke-sized run).
        #[arg(long, default_value_t = 200)]
        messages_per_day: usize,
        /// Linked chat sessions the messages go to.
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        /// Where to put the data dir (a fresh folder inside it; removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The incident x K on the simulated sides (150 ms agent latency), throttled and not.
    Storm {
        /// Multiply the incident's size.
        #[arg(long, default_value_t = 10)]
        scale: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// The hidden first argument under which this binary is `agentsync` itself (`startup` runs the
/// worker that way, so the measured process is the product's code, built with the benchmark).
const AS_AGENTSYNC: &str = "as-agentsync";

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == AS_AGENTSYNC)
    {
        args.next();
        return agentsync::cli::main_from(args);
    }
    let cli = Cli::parse();
    let (result, json) = match cli.what {
        What::Log {
            events,
            startup_sessions,
            dir,
            json,
        } => {
            let base = dir
                .unwrap_or_else(std::env::temp_dir)
                .join(format!("agentsync-bench-{}", std::process::id()));
            let result = bench_log(&base, events, startup_sessions);
            let _ = std::fs::remove_dir_all(&base);
            (result, json)
        }
        What::LogPhase {
            phase,
            dir,
            events,
            startup_sessions,
        } => (log_phase(&phase, &dir, events, startup_sessions), true),
        What::Reconcile { sessions, json } => (bench_reconcile(sessions), json),
        What::Startup {
            sessions,
            backend_latency_ms,
            agent_latency_ms,
            active_percent,
            dir,
            no_cursors,
            archived,
            json,
        } => {
            let base = dir
                .unwrap_or_else(std::env::temp_dir)
                .join(format!("agentsync-startup-{}", std::process::id()));
            let setup = StartupSetup {
                cursors: !no_cursors,
                archived,
                backend_latency_ms,
                agent_latency_ms,
                active_percent,
            };
            let result = bench_startups(&base, &sessions, &setup);
            let _ = std::fs::remove_dir_all(&base);
            (result, json)
        }
        What::Storm { scale, json } => (bench_storm(scale), json),
        What::Soak {
            days,
            messages_per_day,
            sessions,
            dir,
            json,
        } => {
            let base = dir
                .unwrap_or_else(std::env::temp_dir)
                .join(format!("agentsync-soak-{}", std::process::id()));
            let result = soak::run(&base, days, messages_per_day, sessions);
            let _ = std::fs::remove_dir_all(&base);
            (result, json)
        }
        What::Sim {
            seeds,
            seed: Some(seed),
            dir,
            json,
        } => {
            let _ = seeds;
            (bench_sim_one(seed, dir), json)
        }
        What::Sim { seeds, json, .. } => (bench_sim(seeds), json),
    };
    match result {
        Ok(report) => {
            if json {
                println!("{report}");
            } else {
                for (k, v) in report.as_object().expect("an object") {
                    println!("{k:<26} {v}");
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentsync-bench: error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[path = "agentsync-bench/soak.rs"]
mod soak;

fn opts() -> LogOptions {
    LogOptions {
        create: true,
        cache_bytes: cache_bytes(),
        ..LogOptions::default()
    }
}

/// Events from the seeded generator, `BATCH` at a time, `total` in all.
fn batches(total: usize) -> impl Iterator<Item = Vec<NewEvent>> {
    let mut h = History::new(START);
    let mut steps = History::step_stream(42);
    let mut pending: Vec<NewEvent> = Vec::new();
    let mut left = total;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        while pending.len() < BATCH.min(left) {
            h.step(steps.next().expect("endless steps"));
            pending.extend(h.take());
        }
        let n = BATCH.min(left);
        left -= n;
        Some(pending.drain(..n).collect())
    })
}

/// The log benchmark: each phase runs in its own process (this binary, `log-phase`), so each
/// phase's peak RSS is its own: not inflated by another phase's database still open, nor by
/// memory the allocator kept from an earlier phase.
fn bench_log(base: &Path, events: usize, startup_sessions: usize) -> Res<serde_json::Value> {
    std::fs::create_dir_all(base)?;
    let mut by_phase = serde_json::Map::new();
    let mut run = |phase: &str| -> Res<serde_json::Value> {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["log-phase", "--phase", phase, "--dir"])
            .arg(base)
            .args(["--events", &events.to_string()])
            .args(["--startup-sessions", &startup_sessions.to_string()])
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "phase {phase} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        by_phase.insert(phase.to_owned(), v["peak_rss_mb"].clone());
        Ok(v)
    };
    let append = run("append")?;
    let raw_append = run("raw_append")?;
    let rebuild = run("rebuild")?;
    let raw_scan = run("raw_scan_decode")?;
    run("startup_prepare")?;
    let startup = run("startup")?;
    // `why` of an early id, scanning the whole live log, then once it is archived.
    let why_before = run("why")?;
    let archive = run("archive")?;
    let why_after = run("why")?;
    let secs = |v: &serde_json::Value| v["secs"].as_f64().unwrap_or(f64::NAN);
    let eps = |s: f64| (events as f64 / s).round();
    let (append_eps, raw_append_eps) = (eps(secs(&append)), eps(secs(&raw_append)));
    let (rebuild_eps, raw_scan_decode_eps) = (eps(secs(&rebuild)), eps(secs(&raw_scan)));
    let startup_ms = secs(&startup) * 1000.0;
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    // The engine's peak: our own operations. The raw-sled reference phases are listed too.
    let ours = ["append", "rebuild", "startup"];
    let peak_rss_mb = ours
        .iter()
        .filter_map(|p| by_phase.get(*p).and_then(|v| v.as_f64()))
        .fold(0.0, f64::max);
    Ok(json!({
        "events": events,
        "append_eps": append_eps,
        "raw_append_eps": raw_append_eps,
        "append_ratio": round2(append_eps / raw_append_eps),
        "rebuild_eps": rebuild_eps,
        "raw_scan_decode_eps": raw_scan_decode_eps,
        "rebuild_ratio": round2(rebuild_eps / raw_scan_decode_eps),
        "startup_ms": round2(startup_ms),
        "startup_sessions": startup_sessions,
        "startup_catch_up_events": startup["catch_up"],
        "peak_rss_mb": round2(peak_rss_mb),
        "peak_rss_mb_by_phase": by_phase,
        "views_after_rebuild": rebuild["views"],
        "why_ms": {
            "before_archive": round2(secs(&why_before) * 1000.0),
            "after_archive": round2(secs(&why_after) * 1000.0),
            "id": why_after["id"],
            "events_shown": why_after["lines"],
        },
        "archive": {
            "secs": round2(secs(&archive)),
            "archived": archive["archived"],
            "segments": archive["segments"],
            "segment_bytes": archive["segment_bytes"],
            "data_dir_bytes_before": archive["bytes_before"],
            "data_dir_bytes_after": archive["bytes_after"],
        },
        "targets_met": {
            "append_ratio_ge_0_5": append_eps / raw_append_eps >= 0.5,
            "rebuild_ratio_ge_0_4": rebuild_eps / raw_scan_decode_eps >= 0.4,
            "startup_le_300ms": startup_ms <= 300.0,
            "rss_le_200mb": peak_rss_mb <= 200.0,
            "why_after_archive_lt_1s": secs(&why_after) < 1.0,
        },
    }))
}

/// A message id the first events of the generated log name (and later ones rarely do).
fn early_id() -> String {
    batches(BATCH)
        .flatten()
        .find_map(|e| e.event.message_id().map(|m| m.to_string()))
        .expect("the first events name a message")
}

/// One phase of the log benchmark, in this process; prints `{secs, peak_rss_mb, ...}`.
fn log_phase(
    phase: &str,
    base: &Path,
    events: usize,
    startup_sessions: usize,
) -> Res<serde_json::Value> {
    let ours_dir = base.join("ours");
    let raw_db = || {
        sled::Config::new()
            .path(base.join("raw"))
            .cache_capacity(cache_bytes())
            .open()
    };
    let mut extra = json!({});
    let secs = match phase {
        // Our append: encode, one atomic batch, flush at each batch end.
        "append" => {
            let log = EventLog::open(&ours_dir, &opts())?;
            let mut secs = 0.0;
            for batch in batches(events) {
                let t = Instant::now();
                log.append(batch)?;
                secs += t.elapsed().as_secs_f64();
            }
            secs
        }
        // Raw sled on the same bytes: sled::Batch of 1,000, flush after each.
        "raw_append" => {
            let log = EventLog::open(&ours_dir, &opts())?;
            let raw = raw_db()?;
            let raw_events = raw.open_tree("events")?;
            let mut secs = 0.0;
            let mut chunk: Vec<Envelope> = Vec::with_capacity(BATCH);
            let mut insert = |chunk: &mut Vec<Envelope>| -> Res<()> {
                let encoded: Vec<(u64, Vec<u8>)> =
                    chunk.drain(..).map(|e| (e.seq, e.encode())).collect();
                let t = Instant::now();
                let mut b = sled::Batch::default();
                for (seq, bytes) in encoded {
                    b.insert(&seq.to_be_bytes(), bytes);
                }
                raw_events.apply_batch(b)?;
                raw.flush()?;
                secs += t.elapsed().as_secs_f64();
                Ok(())
            };
            for e in log.read(ReadFilter::default()) {
                chunk.push(e?);
                if chunk.len() == BATCH {
                    insert(&mut chunk)?;
                }
            }
            if !chunk.is_empty() {
                insert(&mut chunk)?;
            }
            secs
        }
        // Rebuild: every projection from scratch through the log's read path (open included).
        "rebuild" => {
            let t = Instant::now();
            let log = EventLog::open(&ours_dir, &opts())?;
            let (views, catch_up) = load_views(&log, None, None, true, |_| {})?;
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(catch_up.applied as usize, events);
            extra = json!({"views": {
                "agent_sessions": views.sessions.state.agent.len(),
                "chat_sessions": views.sessions.state.chat.len(),
                "messages": views.messages.state.messages.len(),
                "commands": views.commands.state.commands.len(),
            }});
            secs
        }
        // Raw scan + decode of the same bytes (open included).
        "raw_scan_decode" => {
            let t = Instant::now();
            let raw = raw_db()?;
            let raw_events = raw.open_tree("events")?;
            let mut decoded = 0usize;
            for kv in raw_events.iter() {
                let (_, v) = kv?;
                std::hint::black_box(Envelope::decode(&v)?);
                decoded += 1;
            }
            assert_eq!(decoded, events);
            t.elapsed().as_secs_f64()
        }
        "startup_prepare" => {
            prepare_startup(&base.join("startup"), startup_sessions)?;
            0.0
        }
        // Startup: open + load a checkpoint of `startup_sessions` sessions + catch up.
        "startup" => {
            let t = Instant::now();
            let log = EventLog::open(base.join("startup"), &opts())?;
            let (views, catch_up) = load_views(&log, None, None, false, |_| {})?;
            let secs = t.elapsed().as_secs_f64();
            assert!(views.sessions.state.chat.len() >= startup_sessions);
            assert!(catch_up.applied >= 1000);
            extra = json!({"catch_up": catch_up.applied});
            secs
        }
        // `agentsync why` of an early message id, as its own process (open included).
        "why" => {
            let id = early_id();
            let t = Instant::now();
            let out = std::process::Command::new(std::env::current_exe()?)
                .args([AS_AGENTSYNC, "why", "--json", "--data-dir"])
                .arg(&ours_dir)
                .arg(&id)
                .output()?;
            let secs = t.elapsed().as_secs_f64();
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                return Err(format!("why {id} failed: {err}").into());
            }
            let lines = out.stdout.iter().filter(|b| **b == b'\n').count();
            extra = json!({"id": id, "lines": lines});
            secs
        }
        // Checkpoints at the end (what a worker keeps), then archive everything they cover.
        "archive" => {
            let log = EventLog::open(&ours_dir, &opts())?;
            let (views, _) = load_views(&log, None, None, true, |_| {})?;
            let store = log.checkpoints();
            store.save(&views.sessions)?;
            store.save(&views.messages)?;
            store.save(&views.commands)?;
            let bytes_before = log.size_on_disk()?;
            let all_old = ArchiveOptions {
                older_than: std::time::Duration::ZERO,
                ..ArchiveOptions::default()
            };
            let t = Instant::now();
            let report = log.archive(&all_old, u64::MAX)?;
            let secs = t.elapsed().as_secs_f64();
            let segment_bytes: u64 = log
                .segments()
                .iter()
                .map(|s| std::fs::metadata(&s.path).map_or(0, |m| m.len()))
                .sum();
            extra = json!({
                "archived": report.archived,
                "segments": report.segments.len(),
                "segment_bytes": segment_bytes,
                "bytes_before": bytes_before,
                "bytes_after": log.size_on_disk()?,
            });
            secs
        }
        other => return Err(format!("unknown phase {other}").into()),
    };
    let mut out = json!({"secs": secs, "peak_rss_mb": (peak_rss_mb() * 100.0).round() / 100.0});
    if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    Ok(out)
}

/// A data dir whose checkpoints hold `n` linked sessions, with 1,000 events after them.
fn prepare_startup(dir: &Path, n: usize) -> Res<()> {
    let model = ModelRef {
        provider_id: "mock".into(),
        model_id: "small".into(),
    };
    let events = (0..n).flat_map(|i| {
        let agent = AgentSessionId(format!("ses_{i:08}"));
        let at = START + i as u64;
        [
            Event::AgentSessionSeen(AgentSessionInfo {
                agent_session_id: agent.clone(),
                title: format!("Session {i}"),
                directory: Some("/work/project".into()),
                project: Some("project".into()),
                model: Some(model.clone()),
                updated_at: at,
                parent_id: None,
                tag: None,
            }),
            Event::BackendSessionSeen(ChatSessionInfo {
                chat_session_id: ChatSessionId(format!("chat_{i:08}")),
                agent_session_id: Some(agent),
                title: format!("Session {i}"),
                model: Some(model.to_string()),
                status: ChatStatus::Active,
                last_activity: at,
                project: Some("project".into()),
            }),
        ]
    });
    let log = checkpointed(dir, events, None)?;
    for batch in batches(1000) {
        log.append(batch)?;
    }
    Ok(())
}

/// A log in `dir` holding `events` (at `START`), then the retention sweeps due at `swept_at`
/// if any (as a worker still running then would have appended), with every projection's
/// checkpoint written after them.
fn checkpointed(
    dir: &Path,
    events: impl Iterator<Item = Event>,
    swept_at: Option<u64>,
) -> Res<EventLog> {
    let log = EventLog::open(dir, &opts())?;
    let (mut live, _) = LiveViews::open(&log, CheckpointPolicy::default(), START)?;
    let mut events = events.peekable();
    while events.peek().is_some() {
        let batch = events
            .by_ref()
            .take(BATCH)
            .map(|e| NewEvent::new(e, START))
            .collect();
        live.apply(&log.append(batch)?)?;
    }
    let policy = reconcile::retention::RetentionPolicy::default();
    while let Some(at) = swept_at {
        let Some(swept) = live.retention_sweep(at, at, &policy) else {
            break;
        };
        let swept = NewEvent::new(Event::RetentionSwept(swept), at);
        live.apply(&log.append(vec![swept])?)?;
    }
    live.write_checkpoints(&log, START)?;
    log.flush()?;
    Ok(log)
}

/// The process's peak resident set (VmHWM), in MiB.
fn peak_rss_mb() -> f64 {
    peak_rss_mb_of("self")
}

/// The peak resident set (VmHWM) of `/proc/PID`, in MiB.
fn peak_rss_mb_of(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Views holding `n` agent and `n` chat sessions, both sides listed, with 1 % drift: renamed
/// agent sessions, agent sessions without a chat session, chat sessions whose agent is gone.
fn drifted_views(n: usize) -> Views {
    let mut views = Views::default();
    let mut seq = 0;
    let mut apply = |views: &mut Views, event: Event| {
        seq += 1;
        views.apply(&Envelope {
            seq,
            id: uuid::Uuid::nil(),
            at: START,
            v: event.kind().version(),
            event,
            cause: None,
        });
    };
    let drift = n / 100;
    let (renamed, unlinked, gone) = (drift * 4 / 10, drift * 3 / 10, drift - drift * 7 / 10);
    for i in 0..n {
        let agent = AgentSessionId(format!("ses_{i:08}"));
        let title = format!("Session {i}");
        if i >= n - gone {
            // Its agent session no longer exists.
        } else {
            let agent_title = if i < renamed {
                format!("{title} (renamed)")
            } else {
                title.clone()
            };
            apply(
                &mut views,
                Event::AgentSessionSeen(AgentSessionInfo {
                    agent_session_id: agent.clone(),
                    title: agent_title,
                    directory: None,
                    project: None,
                    model: None,
                    updated_at: START,
                    parent_id: None,
                    tag: None,
                }),
            );
        }
        if i >= renamed && i < renamed + unlinked {
            continue; // no chat session yet
        }
        apply(
            &mut views,
            Event::BackendSessionSeen(ChatSessionInfo {
                chat_session_id: ChatSessionId(format!("chat_{i:08}")),
                agent_session_id: Some(agent),
                title,
                model: None,
                status: ChatStatus::Active,
                last_activity: START,
                project: None,
            }),
        );
    }
    for source in [Source::Backend, Source::Agent] {
        apply(
            &mut views,
            Event::ListingCompleted(ListingCompleted {
                source,
                sessions: n as u64,
                complete: true,
                as_of: None,
            }),
        );
    }
    views
}

fn bench_reconcile(n: usize) -> Res<serde_json::Value> {
    let t = Instant::now();
    let views = drifted_views(n);
    let build_ms = t.elapsed().as_secs_f64() * 1000.0;
    let ctx = Context {
        process_seq: 0,
        now: START,
        started_at: START,
        ready: true,
    };
    let policy = reconcile::Policy::default();
    let mut times = Vec::new();
    let mut planned = 0;
    for _ in 0..11 {
        let t = Instant::now();
        let plan = std::hint::black_box(reconcile::reconcile(&views, &ctx, &policy));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        planned = plan.len();
    }
    times.sort_by(f64::total_cmp);
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    // What loading a checkpoint adds: the sessions view's index, which is not stored.
    let t = Instant::now();
    std::hint::black_box(SessionIndex::build(&views.sessions.state));
    let index_build_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let keys = reconcile::all_keys(&views);
    let every_key = reconcile::reconcile_keys(&keys, &views, &ctx, &policy).planned;
    let every_key_ms = t.elapsed().as_secs_f64() * 1000.0;
    // The ledger as the worker would have it after that pass: every command planned.
    let mut views = views;
    let first = views.min_seq() + 1;
    for (seq, p) in (first..).zip(&every_key) {
        let event = Event::CommandPlanned(p.planned.clone());
        let (id, at, v) = (uuid::Uuid::nil(), START, event.kind().version());
        views.apply(&Envelope {
            seq,
            id,
            at,
            v,
            event,
            cause: None,
        });
    }
    let turns = keyed_turns(&mut views, &ctx, &policy, n);
    Ok(json!({
        "sessions": n,
        "agent_sessions": views.sessions.state.agent.len(),
        "chat_sessions": views.sessions.state.chat.len(),
        "commands_planned": planned,
        "reconcile_ms": round2(times[times.len() / 2]),
        "reconcile_ms_min": round2(times[0]),
        "reconcile_ms_max": round2(times[times.len() - 1]),
        "passes": times.len(),
        "every_key_ms": round2(every_key_ms),
        "index_build_ms": round2(index_build_ms),
        "every_key_commands_planned": every_key.len(),
        "turn_one_key_us": round2(turns.rename_us),
        "turn_one_message_us": round2(turns.message_us),
        "turn_commands_planned": turns.planned,
        "turns": turns.count,
        "views_build_ms": round2(build_ms),
        "target_met": { "reconcile_le_50ms": times[times.len() / 2] <= 50.0 },
    }))
}

/// The medians of one worker turn after one event, as `Worker::append` and `plan_and_start`
/// run it: mark the event's keys and their dependents, fold it in, mark again, plan the dirty
/// keys.
struct Turns {
    rename_us: f64,
    message_us: f64,
    planned: usize,
    count: usize,
}

fn keyed_turns(views: &mut Views, ctx: &Context, policy: &reconcile::Policy, n: usize) -> Turns {
    let mut keys = reconcile::Scheduler::default();
    let mut seq = views.min_seq();
    let mut planned = 0;
    // Appends events as `Worker::append` does: mark, fold, mark again.
    let mut fold = |views: &mut Views, keys: &mut reconcile::Scheduler, events: Vec<Event>| {
        let named: Vec<_> = events.iter().flat_map(Event::keys).collect();
        for k in &named {
            keys.mark_with_dependents(k, views);
        }
        for event in events {
            seq += 1;
            let (id, at, v) = (uuid::Uuid::nil(), START, event.kind().version());
            views.apply(&Envelope {
                seq,
                id,
                at,
                v,
                event,
                cause: None,
            });
        }
        for k in &named {
            keys.mark_with_dependents(k, views);
        }
    };
    // One turn: the event in, its dirty keys planned, what they planned in (as the worker
    // appends it, which marks its keys for the next turn).
    let mut turn = |views: &mut Views, event: Event| {
        let t = Instant::now();
        fold(views, &mut keys, vec![event]);
        let dirty = keys.take(views, ctx.now);
        let plan = reconcile::reconcile_keys(&dirty, views, ctx, policy);
        planned += plan.planned.len();
        let events = plan
            .planned
            .into_iter()
            .map(|p| Event::CommandPlanned(p.planned));
        fold(views, &mut keys, events.collect());
        t.elapsed().as_secs_f64() * 1e6
    };
    let count = 1_000.min(n / 2);
    let mut renames = Vec::new();
    let mut messages = Vec::new();
    for i in 0..count {
        let j = n / 2 + i; // linked sessions, past the drifted ones
        renames.push(turn(
            views,
            Event::AgentSessionChanged(AgentSessionInfo {
                agent_session_id: AgentSessionId(format!("ses_{j:08}")),
                title: format!("Session {j} (renamed in a turn)"),
                directory: None,
                project: None,
                model: None,
                updated_at: START,
                parent_id: None,
                tag: None,
            }),
        ));
        messages.push(turn(
            views,
            Event::BackendMessageSeen(MessageInfo {
                chat_session_id: ChatSessionId(format!("chat_{j:08}")),
                message_id: MessageId(format!("msg_{j:08}")),
                role: Role::User,
                content: "hello".into(),
                completed: true,
                timestamp: START,
                reply_to: None,
                error: None,
            }),
        ));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Turns {
        rename_us: median(renames),
        message_us: median(messages),
        planned,
        count,
    }
}

fn bench_storm(scale: usize) -> Res<serde_json::Value> {
    let runtime = tokio::runtime::Runtime::new()?;
    let incident = Incident {
        scale,
        agent_latency_ms: (150, 150),
        backend_latency_ms: (5, 20),
        model_list_ms: 0,
        ..Incident::default()
    };
    let base = std::env::temp_dir().join(format!("agentsync-storm-{}", std::process::id()));
    let run = |name: &str, dispatch: DispatchConfig| -> Res<incident::Summary> {
        let dir = base.join(name);
        let summary = runtime.block_on(incident::run(
            &dir,
            &incident,
            dispatch,
            Arc::new(SystemClock),
        ))?;
        Ok(summary)
    };
    let throttled = run("throttled", DispatchConfig::default());
    let baseline = run("baseline", DispatchConfig::unthrottled());
    let _ = std::fs::remove_dir_all(&base);
    let (throttled, baseline) = (throttled?, baseline?);
    Ok(json!({
        "scale": scale,
        "agent_latency_ms": 150,
        "model_fetches": throttled.model_fetches,
        "peak_in_flight": throttled.peak_in_flight,
        "converge_ms": throttled.converge_ms,
        "baseline_model_fetches": baseline.model_fetches,
        "baseline_peak_in_flight": baseline.peak_in_flight,
        "baseline_converge_ms": baseline.converge_ms,
        "commands": throttled.commands,
        "deletions_from_failed_listing": throttled.deletions_from_failed_listing,
        "baseline_deletions_from_failed_listing": baseline.deletions_from_failed_listing,
        "messages_answered": throttled.messages_answered,
        "messages_failed": throttled.messages_failed,
    }))
}

/// `x` to two decimals.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Runs seeds 0..n of the adversarial simulation on every core.
fn bench_sim(n: u64) -> Res<serde_json::Value> {
    let started = Instant::now();
    let seeds: Vec<u64> = (0..n).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let reports = adversary::run_seeds(&seeds, threads);
    let mut violations: std::collections::BTreeMap<&str, u64> =
        adversary::INVARIANTS.iter().map(|i| (*i, 0)).collect();
    for r in &reports {
        for (k, n) in &r.violations {
            *violations.entry(k).or_default() += n;
        }
    }
    let failing: Vec<u64> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.seed)
        .collect();
    let broke: std::collections::BTreeMap<String, &String> = reports
        .iter()
        .filter_map(|r| Some((r.seed.to_string(), r.details.first()?)))
        .collect();
    let sum = |f: fn(&adversary::SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    Ok(json!({
        "runs": reports.len(),
        "violations": violations,
        "failing_seeds": failing,
        "first_violation": broke,
        "wall_s": round2(started.elapsed().as_secs_f64()),
        "simulated_h": round2(sum(|r| r.simulated_ms) as f64 / 3_600_000.0),
        "events": sum(|r| r.events),
        "crashes": sum(|r| r.crashes as u64),
        "agent_restarts": sum(|r| r.restarts as u64),
        "clock_steps": sum(|r| r.clock_steps as u64),
        "pairs_on_disk_at_end": sum(|r| r.pairs_on_disk),
        "runs_with_pairs_on_disk": reports.iter().filter(|r| r.pairs_on_disk > 0).count(),
    }))
}

/// Replays one seed, keeps its log, and says what broke.
fn bench_sim_one(seed: u64, dir: Option<PathBuf>) -> Res<serde_json::Value> {
    let dir =
        dir.unwrap_or_else(|| std::env::temp_dir().join(format!("agentsync-sim-seed-{seed}")));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let started = Instant::now();
    let r = adversary::run_seed_in(seed, &dir);
    Ok(json!({
        "seed": seed,
        "passed": r.passed(),
        "violations": r.violations,
        "broke": r.details,
        "scenario": format!("{:?}", adversary::Scenario::generate(seed)),
        "events": r.events,
        "simulated_s": r.simulated_ms / 1_000,
        "data_dir": dir.display().to_string(),
        "wall_s": round2(started.elapsed().as_secs_f64()),
    }))
}

const STARTUP_WORKER: &str = "bench";

/// How the startup benchmark's world is laid out.
struct StartupSetup {
    /// Whether the data dir holds the feeds' cursors.
    cursors: bool,
    /// The seed's events archived and the log database compacted.
    archived: bool,
    /// Per call to the fake Convex deployment, ms.
    backend_latency_ms: u64,
    /// Per call to the fake OpenCode server, ms.
    agent_latency_ms: u64,
    /// The share of sessions with a conversation, percent.
    active_percent: f64,
}

/// `bench_startup` at each of `sizes`, side by side: `time_to_ready_ms` and `peak_rss_mb` per
/// N, and the ratio of the largest to the smallest.
fn bench_startups(base: &Path, sizes: &[usize], setup: &StartupSetup) -> Res<serde_json::Value> {
    let mut runs = serde_json::Map::new();
    let (mut ready, mut rss) = (serde_json::Map::new(), serde_json::Map::new());
    for &n in sizes {
        let dir = base.join(n.to_string());
        let run = bench_startup(&dir, n, setup);
        let _ = std::fs::remove_dir_all(&dir);
        let run = run?;
        ready.insert(n.to_string(), run["time_to_ready_ms"].clone());
        rss.insert(n.to_string(), run["peak_rss_mb"].clone());
        runs.insert(n.to_string(), run);
    }
    let at = |n: usize| ready.get(&n.to_string()).and_then(|v| v.as_f64());
    let ratio = |a: usize, b: usize| Some(round2(at(a)? / at(b)?));
    let (small, large) = (sizes.iter().min(), sizes.iter().max());
    let ratio_large_small = small.zip(large).and_then(|(s, l)| ratio(*l, *s));
    let rss_1m = rss.get("1000000").and_then(|v| v.as_f64());
    Ok(json!({
        "sessions": sizes,
        "backend_latency_ms": setup.backend_latency_ms,
        "agent_latency_ms": setup.agent_latency_ms,
        "active_percent": setup.active_percent,
        "archived": setup.archived,
        "time_to_ready_ms": ready,
        "peak_rss_mb": rss,
        "ratio_1m_10k": ratio(1_000_000, 10_000),
        "ratio_largest_smallest": ratio_large_small,
        "targets_met": {
            "time_to_ready_le_500ms_at_100k": at(100_000).map(|t| t <= 500.0),
            "ratio_1m_10k_le_1_5": ratio(1_000_000, 10_000).map(|r| r <= 1.5),
            "peak_rss_le_150mb_at_1m": rss_1m.map(|r| r <= 150.0),
        },
        "runs": runs,
    }))
}

/// Everything a read of `query` from the start to the end returns, and its last cursor: what
/// the worker's feed of it saw by the end of its previous run.
fn read_to_end<K: agentsync::backend::store::Kv>(
    store: &agentsync::backend::store::ContractStore<K>,
    query: &str,
) -> Res<(Vec<serde_json::Value>, String)> {
    let (mut items, mut cursor) = (Vec::new(), serde_json::Value::Null);
    loop {
        let args = json!({"workerId": STARTUP_WORKER, "cursor": cursor, "limit": 10_000});
        let page = store.query(query, args)?;
        items.extend(page["page"].as_array().cloned().unwrap_or_default());
        cursor = page["continueCursor"].clone();
        if page["isDone"].as_bool() != Some(false) {
            let cursor = cursor.as_str().unwrap_or_default().to_owned();
            return Ok((items, cursor));
        }
    }
}

/// The worker's time from process start to Ready, and its peak RSS, on a checkpointed view of
/// `n` sessions against fakes holding the same `n` sessions (so Ready finds nothing to do),
/// `setup.active_percent` of them with a conversation answered before the last run ended.
fn bench_startup(base: &Path, n: usize, setup: &StartupSetup) -> Res<serde_json::Value> {
    use agentsync::sim::convex::{ConvexFaults, FakeConvex};
    use agentsync::sim::opencode::{FakeOpencode, FakeSession};

    std::fs::create_dir_all(base)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let t = Instant::now();
    let convex = runtime.block_on(FakeConvex::start("agentsync", None, Arc::new(SystemClock)))?;
    let store = convex.store();
    let every = if setup.active_percent > 0.0 {
        (100.0 / setup.active_percent).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    for i in 0..n {
        let chat = store.mutation(
            "createSession",
            json!({
                // The id the worker's own creation of it carries (`reconcile::ids`).
                "commandId": format!("createSession:ses_{i:08}"),
                "workerId": STARTUP_WORKER,
                "agentSessionId": format!("ses_{i:08}"),
                "title": format!("Session {i}"),
            }),
        )?;
        if i % every == 0 {
            // A conversation: a person's message, answered by the previous run.
            let chat = chat["chatSessionId"].as_str().ok_or("a chat session id")?;
            let asked = store.post_user_message(chat, &format!("question {i}"))?;
            store.mutation(
                "completeMessage",
                json!({
                    "commandId": format!("answer-{i}"),
                    "chatSessionId": chat,
                    "messageId": asked.message_id,
                    "content": format!("answer {i}"),
                }),
            )?;
        }
    }
    let chats = store.chats(STARTUP_WORKER)?;
    let (messages, messages_cursor) = read_to_end(&store, "listMessages")?;
    let (_, sessions_cursor) = read_to_end(&store, "listSessions")?;
    let messages: Vec<agentsync::backend::contract::Message> = messages
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()?;
    let feeds = Feeds {
        sessions: sessions_cursor,
        messages: messages_cursor,
        conversations: messages,
    };
    let agents: Vec<FakeSession> = (0..n)
        .map(|i| FakeSession {
            id: format!("ses_{i:08}"),
            title: format!("Session {i}"),
            directory: "/work/project".into(),
            project_id: "project".into(),
            updated: START + i as u64,
        })
        .collect();
    let data_dir = base.join("data");
    prepare_worker_dir(&data_dir, &agents, chats, feeds, setup.cursors)?;
    let opencode = runtime.block_on(FakeOpencode::start(agents))?;
    let setup_ms = t.elapsed().as_millis();
    opencode.set_latency_ms(setup.agent_latency_ms);
    convex.set_faults(ConvexFaults {
        latency_ms: setup.backend_latency_ms,
        ..ConvexFaults::default()
    });
    if setup.archived {
        // What `agentsync archive --compact` does: the seed's events are older than a week.
        let log = EventLog::open(&data_dir, &opts())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        log.archive(&agentsync::log::ArchiveOptions::default(), now)?;
        log.compact()?;
    }
    let (checkpoint_seq, ledger_entries) = {
        let log = EventLog::open(&data_dir, &opts())?;
        let ledger = log
            .checkpoints()
            .load::<agentsync::projections::CommandLedger>()?;
        let entries = ledger.map_or(0, |c| c.state.commands.len());
        (log.last_seq(), entries)
    };
    // As the previous run left it: its identity recorded, and everything on disk long ago.
    // Without these, the start measured the first run's identity write, whose fsync waited on
    // the gigabytes of set-up just written (70 to 90 ms at 1,000,000).
    let url = |u: &str| reqwest::Url::parse(u).map(|u| u.to_string());
    let identity = agentsync::events::Identity {
        worker_id: STARTUP_WORKER.into(),
        agent: agentsync::events::AgentIdentity::Url(url(&opencode.url)?),
        backend: agentsync::events::BackendIdentity::Convex(url(&convex.url)?),
    };
    agentsync::log::store_identity(&data_dir, &identity)?;
    nix::unistd::sync();

    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let stderr_path = base.join("worker.log");
    let listing_limit = (n + 1).max(10_000);
    let started = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg(AS_AGENTSYNC)
        .args(["run", "--data-dir"])
        .arg(&data_dir)
        .args(["--worker-id", STARTUP_WORKER, "--agent-url", &opencode.url])
        .args(["--backend", "convex", "--convex-url", &convex.url])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--listing-limit", &listing_limit.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()?;
    let pid = child.id().to_string();
    let ready = runtime.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://{metrics}/readyz");
        let deadline = started + std::time::Duration::from_secs(120);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return Some(started.elapsed());
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        None
    });
    let rss_at_ready = peak_rss_mb_of(&pid);
    // Settled: a second of steady state after Ready (listings repeat, nothing to do).
    std::thread::sleep(std::time::Duration::from_secs(1));
    let peak_rss = peak_rss_mb_of(&pid);
    // Already gone when it failed to start: then its exit status tells.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait()?;
    let worker_log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let Some(ready) = ready else {
        return Err(format!(
            "the worker was not Ready within 120 s ({status}); its log ends:\n{}",
            tail(&worker_log, 10)
        )
        .into());
    };
    if !status.success() {
        return Err(format!(
            "the worker exited with {status}; its log ends:\n{}",
            tail(&worker_log, 10)
        )
        .into());
    }
    let log = EventLog::open(&data_dir, &opts())?;
    let mut by_kind = std::collections::BTreeMap::<String, u64>::new();
    // Each lifecycle state's entry, ms after the first (starting): where the time went.
    let mut states = serde_json::Map::new();
    let mut first_at = None;
    for e in log.read(ReadFilter {
        range: checkpoint_seq + 1..=u64::MAX,
        ..ReadFilter::default()
    }) {
        let e = e?;
        *by_kind.entry(e.event.kind().name().to_owned()).or_default() += 1;
        let first = *first_at.get_or_insert(e.at);
        match &e.event {
            Event::WorkerState(w) => {
                states.insert(w.state.name().to_owned(), json!(e.at - first));
            }
            Event::ListingCompleted(l) => {
                let key = format!("{}_listed", l.source);
                states.entry(key).or_insert(json!(e.at - first));
            }
            _ => {}
        }
    }
    let time_to_ready_ms = ready.as_secs_f64() * 1000.0;
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    Ok(json!({
        "sessions": n,
        "time_to_ready_ms": round2(time_to_ready_ms),
        "peak_rss_mb": round2(peak_rss),
        "rss_at_ready_mb": round2(rss_at_ready),
        "events_after_checkpoint": by_kind,
        "ledger_entries_in_checkpoint": ledger_entries,
        "state_entered_ms": states,
        "agent_calls": opencode.calls(),
        "backend_calls": convex.calls().len(),
        "backend_peak_in_flight": convex.peak_in_flight(),
        "setup_ms": setup_ms,
        "ready_line": worker_log.lines().find(|l| l.contains("lifecycle") && l.contains("ready")).map(str::trim),
        "targets_met": {
            "time_to_ready_le_1000ms": time_to_ready_ms <= 1000.0,
            "rss_le_250mb": peak_rss <= 250.0,
        },
    }))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Where the previous run's feeds of the backend stood, and the messages they had read.
struct Feeds {
    /// `listSessions`' cursor at the end.
    sessions: String,
    /// `listMessages`' cursor at the end.
    messages: String,
    /// Every message read.
    conversations: Vec<agentsync::backend::contract::Message>,
}

/// A worker data dir whose checkpoints hold `agents` linked to `chats` and the messages
/// read, exactly as the fakes will list them.
fn prepare_worker_dir(
    dir: &Path,
    agents: &[agentsync::sim::opencode::FakeSession],
    chats: Vec<agentsync::backend::contract::ChatSession>,
    feeds: Feeds,
    cursors: bool,
) -> Res<()> {
    let agent_events = agents.iter().map(|s| {
        Event::AgentSessionSeen(AgentSessionInfo {
            agent_session_id: AgentSessionId(s.id.clone()),
            title: s.title.clone(),
            directory: Some(s.directory.clone()),
            project: Some(s.project_id.clone()),
            model: None,
            updated_at: s.updated,
            parent_id: None,
            tag: None,
        })
    });
    // The previous run mirrored every agent session: its `createSession`, planned and applied.
    let chats: Vec<ChatSessionInfo> = chats.into_iter().map(ChatSessionInfo::from).collect();
    let creations = chats.iter().flat_map(|c| {
        let agent = c.agent_session_id.clone().expect("seeded linked");
        let command = agentsync::events::Command::CreateSession {
            agent_session_id: agent.clone(),
            title: c.title.clone(),
            model: None,
        };
        let command_id = reconcile::ids::create_session(&agent);
        let succeeded = agentsync::events::CommandSucceeded {
            command_id: command_id.clone(),
            op: command.op(),
            subject: command.subject(),
            attempt: 1,
            effect: agentsync::events::Effect::ChatSessionCreated {
                chat_session_id: c.chat_session_id.clone(),
                agent_session_id: agent,
                title: c.title.clone(),
                model: None,
            },
        };
        let planned = agentsync::events::CommandPlanned {
            command_id,
            command,
            reason: "agent session has no chat session".into(),
        };
        [
            Event::CommandPlanned(planned),
            Event::CommandSucceeded(succeeded),
        ]
    });
    let creations: Vec<Event> = creations.collect();
    let chat_events = chats.into_iter().map(Event::BackendSessionSeen);
    let message_events = feeds
        .conversations
        .into_iter()
        .map(|m| Event::BackendMessageSeen(m.into()));
    // What the previous run left: its complete listings and where each feed stood, as the
    // fake store's own reads to the end answered.
    let high = agents.iter().map(|s| s.updated).max().unwrap_or(0);
    let listed = |source| {
        Event::ListingCompleted(ListingCompleted {
            source,
            sessions: 0,
            complete: true,
            as_of: Some(0),
        })
    };
    let feed = |feed, cursor: String| {
        Event::FeedRead(agentsync::events::FeedRead {
            feed,
            cursor,
            reached_end: true,
        })
    };
    use agentsync::events::Feed;
    let marks = [
        listed(Source::Agent),
        listed(Source::Backend),
        feed(Feed::AgentSessions, high.to_string()),
        feed(Feed::BackendSessions, feeds.sessions),
        feed(Feed::BackendMessages, feeds.messages),
    ];
    let marks = marks.into_iter().filter(|_| cursors);
    let events = agent_events
        .chain(creations)
        .chain(chat_events)
        .chain(message_events);
    // The previous run went on past the retention horizon: its sweeps dropped what was final.
    let swept_at = START + 8 * reconcile::retention::DAY_MS;
    checkpointed(dir, events.chain(marks), Some(swept_at))?;
    Ok(())
}
