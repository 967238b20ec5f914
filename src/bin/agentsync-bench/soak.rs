//! `agentsync-bench soak`: days of traffic through a real worker and log against the simulated
//! sides, on a paused tokio clock (a day takes as long as its work, not 24 hours).
//!
//! Each simulated day: the day's user messages are posted hour by hour to the linked chat
//! sessions, one worker process runs the day through (prompting the simulated agent and
//! completing the messages) and stops (draining: checkpoints written); then the archive step
//! runs, the same library call `agentsync archive` makes ([`EventLog::archive`], default
//! window). Retention of the views, when it exists, runs inside the worker and so is measured
//! here as it lands. Per day: the views' size (their JSON, the three of them), events and
//! bytes on disk (live log, archive, checkpoints), the p50/p99/max of the worker's own turns
//! that day (`worker::turns`: the fold, the dirty keys' reconcile and the dispatcher's
//! selection, on the real clock), the p99 of 21 full reconcile passes over the day's views
//! (what each start runs once), and the start-up from that day's data dir (loading its checkpoints and the
//! tail, as a worker's `CatchingUp` does). At the end, `why` of a day-1 message on the last
//! day's data dir, run as `agentsync why` in a process of its own.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentsync::clock::{Clock, Millis};
use agentsync::events::{
    AgentSessionId, AgentSessionInfo, ChatSessionId, ChatSessionInfo, ChatStatus,
};
use agentsync::log::{load_views, ArchiveOptions, EventLog};
use agentsync::projections::{ProjectionName, Views};
use agentsync::reconcile::{self, Context};
use agentsync::sim::{user_message, Faults, SimAgent, SimBackend};
use agentsync::worker::{RunReport, TokioClock, Worker, WorkerConfig};
use serde_json::json;

use super::{opts, round2, Res, AS_AGENTSYNC, START};

const HOUR_MS: Millis = 3_600_000;

/// The id of message `i` of day `day` (1-based).
fn message_id(day: u32, i: usize) -> String {
    format!("m{day:03}-{i:06}")
}

/// Bytes of every file under `p` (0 when it does not exist).
fn dir_bytes(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `n` agent sessions linked to `n` chat sessions on the simulated sides.
fn linked_sides(clock: Arc<dyn Clock>, n: usize) -> (Arc<SimAgent>, Arc<SimBackend>) {
    let agent = Arc::new(SimAgent::new(clock.clone(), Faults::default()));
    let backend = Arc::new(SimBackend::new(clock, Faults::default()));
    for i in 0..n {
        let id = AgentSessionId(format!("ses_{i:05}"));
        agent.insert(AgentSessionInfo {
            agent_session_id: id.clone(),
            title: format!("S{i}"),
            directory: None,
            project: None,
            model: None,
            updated_at: START - 60_000,
            parent_id: None,
            tag: None,
        });
        backend.insert_session(ChatSessionInfo {
            chat_session_id: ChatSessionId(format!("chat_{i:05}")),
            agent_session_id: Some(id),
            title: format!("S{i}"),
            model: None,
            status: ChatStatus::Active,
            last_activity: START - 60_000,
            project: None,
        });
    }
    (agent, backend)
}

/// One simulated day: a worker process runs it through while its messages arrive hourly.
async fn day(
    log: &Arc<EventLog>,
    sides: &(Arc<SimAgent>, Arc<SimBackend>),
    clock: &Arc<dyn Clock>,
    day: u32,
    per_day: usize,
    chats: usize,
) -> Res<RunReport> {
    let (agent, backend) = sides;
    let worker = Worker::open(
        log.clone(),
        agent.clone(),
        backend.clone(),
        clock.clone(),
        WorkerConfig::default(),
    )
    .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let drive = async {
        let mut posted = 0;
        for hour in 0..24 {
            let upto = per_day * (hour + 1) / 24;
            for i in posted..upto {
                let chat = ChatSessionId(format!("chat_{:05}", i % chats));
                let text = format!("question {i} of day {day}");
                backend.insert_message(user_message(
                    &chat,
                    &message_id(day, i),
                    &text,
                    clock.now_ms(),
                ));
            }
            posted = upto;
            tokio::time::sleep(Duration::from_millis(HOUR_MS)).await;
        }
        let _ = stop.send(());
    };
    let (report, ()) = tokio::join!(
        worker.run(async {
            let _ = stopped.await;
        }),
        drive
    );
    Ok(report?)
}

/// p99 (of 21, so the slowest) of a full reconcile pass over `views`, ms: as a worker that
/// has listed both sides in this process runs it (`process_seq` 0), sessions included. The
/// worker runs one per start; its turns reconcile only their dirty keys.
fn full_pass_p99_ms(views: &Views, now: Millis) -> f64 {
    let ctx = Context {
        process_seq: 0,
        now,
        started_at: now,
        ready: true,
    };
    let policy = reconcile::Policy::default();
    let mut times: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(reconcile::reconcile(views, &ctx, &policy));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[(times.len() * 99).div_ceil(100) - 1]
}

/// The soak: see the module documentation.
pub fn run(base: &Path, days: u32, per_day: usize, chats: usize) -> Res<serde_json::Value> {
    let data = base.join("data");
    std::fs::create_dir_all(&data)?;
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    // In the runtime's context throughout: the clock reads the paused (simulated) time even
    // between days, outside `block_on` (the archive's "now").
    let _in_runtime = runtime.enter();
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(START));
    let sides = linked_sides(clock.clone(), chats.max(1));
    let mut rows = Vec::new();
    let mut log = Arc::new(EventLog::open(&data, &opts())?);
    for d in 1..=days {
        let report = runtime.block_on(day(&log, &sides, &clock, d, per_day, chats.max(1)))?;
        let (views, turns) = (report.views, report.turns);
        let now = clock.now_ms();
        eprintln!(
            "soak: day {d} done at {} simulated h",
            (now - START) / HOUR_MS
        );
        let t = Instant::now();
        let archived = log.archive(&ArchiveOptions::default(), now)?;
        let archive_ms = t.elapsed().as_secs_f64() * 1000.0;
        let views_bytes: usize = ProjectionName::ALL
            .iter()
            .map(|p| views.to_json(*p).to_string().len())
            .sum();
        let full_pass = full_pass_p99_ms(&views, now);
        drop(views);
        // Start-up from this day's data dir: a process opening it and loading its views.
        drop(log);
        let t = Instant::now();
        log = Arc::new(EventLog::open(&data, &opts())?);
        let (_, catch_up) = load_views(&log, None, None, false, |_| {})?;
        let startup_ms = t.elapsed().as_secs_f64() * 1000.0;
        let last = log.last_seq();
        rows.push(json!({
            "day": d,
            "views_bytes": views_bytes,
            "events": last,
            "live_events": last - log.archived_through(),
            "live_log_bytes": dir_bytes(&data.join("log")),
            "archive_bytes": dir_bytes(&data.join("archive")),
            "checkpoint_bytes": dir_bytes(&data.join("checkpoints")),
            "archived_today": archived.archived,
            "archive_ms": round2(archive_ms),
            "turn_p99_ms": turns.p99_us as f64 / 1000.0,
            "turn_p50_ms": turns.p50_us as f64 / 1000.0,
            "turn_max_ms": turns.max_us as f64 / 1000.0,
            "turns": turns.count,
            "full_pass_p99_ms": (full_pass * 1000.0).round() / 1000.0,
            "startup_ms": round2(startup_ms),
            "startup_catch_up_events": catch_up.applied,
            "answered": sides.1.messages().values().filter(|m| m.reply_to.is_some()).count(),
        }));
    }
    drop(log);
    let why = why_ms(&data, &message_id(1, 0))?;
    let ratio = |key: &str| {
        let at = |d: usize| rows.get(d - 1).and_then(|r| r[key].as_f64());
        let last = rows.len();
        (last >= 14).then(|| at(last).zip(at(14)).map(|(a, b)| round2(a / b.max(1e-9))))
    };
    let figures = [
        "views_bytes",
        "turn_p99_ms",
        "full_pass_p99_ms",
        "startup_ms",
        "live_log_bytes",
        "live_events",
    ];
    let ratios: serde_json::Map<String, serde_json::Value> = figures
        .iter()
        .map(|k| (k.to_string(), json!(ratio(k).flatten())))
        .collect();
    Ok(json!({
        "days": rows,
        "messages_per_day": per_day,
        "sessions": chats,
        "ratio_day90_day14": ratios,
        "ratio_note": "last day / day 14 (day 90 at the full size)",
        "why_ms": why,
        "wall_s": round2(started.elapsed().as_secs_f64()),
    }))
}

/// `agentsync why ID --json` on `data` in a process of its own: its wall time, ms.
fn why_ms(data: &Path, id: &str) -> Res<serde_json::Value> {
    let t = Instant::now();
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([AS_AGENTSYNC, "why", "--json", "--data-dir"])
        .arg(data)
        .arg(id)
        .output()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(format!("why {id} failed: {err}").into());
    }
    let lines = out.stdout.iter().filter(|b| **b == b'\n').count();
    Ok(json!({"ms": round2(ms), "id": id, "lines": lines}))
}
