//! The adversarial simulation: one seeded history of faults on both sides, run through a real
//! worker on a real sled log under a paused tokio clock, then checked against the guarantees.
//!
//! A history ([`Scenario::generate`], a pure function of the seed) has, on both sides: replies
//! lost after the effect was applied; replies that come after the worker's timeout; reads
//! (listings, pages, statuses, look-ups) taken and then held back, so they arrive after changes
//! they do not show; failed and partial listings; outages and random errors. Around them: an
//! agent event stream that delivers what the agent server did late, twice and out of order;
//! people writing messages, opening chats, renaming, creating and deleting agent sessions; the
//! worker's wall clock stepped by minutes either way; the agent server restarting with a new
//! generation (what it was running is lost); and the worker's process dying, its log closed and
//! opened anew. The faults then stop, and a last process runs until it is quiet.
//!
//! The invariants ([`audit::INVARIANTS`]) are checked against the log, replayed event by event
//! from its start, and against what the simulated sides hold. See `docs/architecture.md`
//! ("The adversarial simulation").

pub mod audit;
pub mod scenario;
mod world;

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use audit::INVARIANTS;
pub use scenario::{Scenario, StreamFaults, Timed, WorldAction};

use crate::clock::{Clock, Millis, SteppedClock};
use crate::dispatch::{DispatchConfig, TargetLimits};
use crate::log::{EventLog, LogOptions, ReadFilter};
use crate::reconcile::Policy;
use crate::sim::{Faults, SimAgent, SimBackend};
use crate::worker::{PollPolicy, RunReport, TokioClock, Worker, WorkerConfig};
use scenario::{CALL_TIMEOUT_MS, MESSAGE_DEADLINE_MS, PROMPT_TIMEOUT_MS, T0};
use world::World;

/// How long the worker's process stays dead after a crash (ms).
const DOWNTIME_MS: Millis = 1_000;

/// The most details a report keeps.
const MAX_DETAILS: usize = 40;

/// The violations of one run: a count per invariant, and what broke, one line each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    /// Violations per invariant name; every invariant is listed, at 0 when it held.
    pub counts: BTreeMap<&'static str, u64>,
    /// What broke (the first few), each line starting with its invariant.
    pub details: Vec<String>,
}

impl Violations {
    fn new() -> Self {
        Self {
            counts: INVARIANTS.iter().map(|i| (*i, 0)).collect(),
            details: Vec::new(),
        }
    }

    /// Records one violation of `invariant`.
    pub fn add(&mut self, invariant: &'static str, what: String) {
        *self.counts.entry(invariant).or_default() += 1;
        if self.details.len() < MAX_DETAILS {
            self.details.push(format!("{invariant}: {what}"));
        }
    }

    /// Whether every invariant held.
    pub fn none(&self) -> bool {
        self.counts.values().all(|n| *n == 0)
    }
}

/// What one seeded run showed.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Violations per invariant (every invariant listed).
    pub violations: BTreeMap<&'static str, u64>,
    /// What broke, one line each (the first few).
    pub details: Vec<String>,
    /// Events in the log at the end.
    pub events: u64,
    /// Worker processes that died mid-flight.
    pub crashes: usize,
    /// Agent-server restarts.
    pub restarts: usize,
    /// Wall-clock steps.
    pub clock_steps: usize,
    /// Settled pairs on disk when the last process stopped (`log::rows`): the run exercised
    /// pairs away from memory across its crashes.
    pub pairs_on_disk: u64,
    /// Simulated time from the start to the end of the last process (true time, ms).
    pub simulated_ms: Millis,
    /// Real time the run took (ms).
    pub wall_ms: u64,
}

impl SimReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations.values().all(|n| *n == 0)
    }
}

/// Runs the history of `seed` in a scratch directory (removed afterwards).
pub fn run_seed(seed: u64) -> SimReport {
    let dir = scratch_dir(seed);
    let report = run_seed_in(seed, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// Runs the histories of `seeds` on `threads` threads (each run has its own runtime and
/// directory); the reports come back in seed order.
pub fn run_seeds(seeds: &[u64], threads: usize) -> Vec<SimReport> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let reports = std::sync::Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&seed) = seeds.get(i) else { break };
                let report = run_seed(seed);
                reports.lock().expect("reports").push((i, report));
            });
        }
    });
    let mut reports = reports.into_inner().expect("reports");
    reports.sort_by_key(|(i, _)| *i);
    reports.into_iter().map(|(_, r)| r).collect()
}

/// Runs the history of `seed` with its log in `dir` (kept: `agentsync replay` reads it).
pub fn run_seed_in(seed: u64, dir: &Path) -> SimReport {
    run_scenario(&Scenario::generate(seed), dir)
}

/// Runs `scenario` with its log in `dir`, and checks every invariant.
pub fn run_scenario(scenario: &Scenario, dir: &Path) -> SimReport {
    let started = Instant::now();
    let mut v = Violations::new();
    let (events, simulated_ms, pairs_on_disk) =
        match catch_unwind(AssertUnwindSafe(|| simulate(scenario, dir, &mut v))) {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => {
                v.add(audit::RUN_COMPLETED, e);
                (0, 0, 0)
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".into());
                v.add(audit::RUN_COMPLETED, format!("panicked: {what}"));
                (0, 0, 0)
            }
        };
    let is = |f: fn(&WorldAction) -> bool| scenario.count(f);
    SimReport {
        seed: scenario.seed,
        violations: v.counts,
        details: v.details,
        events,
        crashes: scenario.crashes.len(),
        restarts: is(|a| matches!(a, WorldAction::AgentRestart { .. })),
        clock_steps: is(|a| matches!(a, WorldAction::ClockStep { .. })),
        pairs_on_disk,
        simulated_ms,
        wall_ms: started.elapsed().as_millis() as u64,
    }
}

/// The reconciler's policy in the simulation: a short message deadline and quick delivery
/// rounds, so that a history of minutes reaches them.
pub fn policy() -> Policy {
    Policy {
        message_deadline_ms: MESSAGE_DEADLINE_MS,
        delivery_retry_ms: 5_000,
        delivery_retry_cap_ms: 60_000,
        ..Policy::default()
    }
}

/// The worker's configuration in the simulation: small limits and timeouts.
pub fn config(seed: u64, stop_when_quiet: Option<u32>) -> WorkerConfig {
    let limits = TargetLimits {
        concurrency: 3,
        per_second: 20,
        burst: 3,
    };
    WorkerConfig {
        worker_id: "sim".into(),
        dispatch: DispatchConfig {
            concurrency: 4,
            agent: limits,
            backend: limits,
            timeout_ms: CALL_TIMEOUT_MS,
            prompt_timeout_ms: PROMPT_TIMEOUT_MS,
            seed,
            ..DispatchConfig::default()
        },
        policy: policy(),
        polling: PollPolicy {
            active_ms: 500,
            idle_max_ms: 2_000,
            ..PollPolicy::default()
        },
        stop_when_quiet,
        drain_grace_ms: 1_000,
        ..WorkerConfig::default()
    }
}

fn scratch_dir(seed: u64) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("agentsync-sim-{}-{seed}-{n}", std::process::id()))
}

/// The two sides, the clocks, and the directory of the log.
struct Sim<'a> {
    s: &'a Scenario,
    dir: &'a Path,
    world: World,
    truth: Arc<TokioClock>,
}

/// How one process of the worker ends (the last runs until it is quiet).
enum End {
    /// Its future is dropped mid-flight at this time: the process died.
    Crash,
    /// It is asked to stop at this time, and drains.
    Shutdown,
}

/// Runs every process of the history; returns the log's size and the simulated time.
fn simulate(s: &Scenario, dir: &Path, v: &mut Violations) -> Result<(u64, Millis, u64), String> {
    let rt = paused_runtime()?;
    let truth = rt.block_on(async { Arc::new(TokioClock::new(T0)) });
    drop(rt);
    let dyn_truth: Arc<dyn Clock> = truth.clone();
    let sim = Sim {
        s,
        dir,
        world: World {
            agent: Arc::new(SimAgent::new(dyn_truth.clone(), s.agent.clone())),
            backend: Arc::new(SimBackend::new(dyn_truth.clone(), s.backend.clone())),
            worker_clock: Arc::new(SteppedClock::new(dyn_truth.clone())),
            truth: dyn_truth,
            steps: Arc::default(),
        },
        truth,
    };
    sim.world.populate(s);
    let mut start = 0;
    let mut ends: Vec<(Millis, End)> = s.crashes.iter().map(|c| (*c, End::Crash)).collect();
    ends.push((s.faulty_ms, End::Shutdown));
    for (end, how) in ends {
        let end = end.max(start + 1);
        let actions = s
            .actions
            .iter()
            .filter(|a| a.at < end && a.at >= start.saturating_sub(DOWNTIME_MS));
        let actions: Vec<Timed> = actions.cloned().collect();
        sim.process(start, Some((end, how)), actions)?;
        start = end + DOWNTIME_MS;
    }
    sim.calm();
    let (report, now) = sim.process(start, None, Vec::new())?;
    let report = report.ok_or("the last process did not report")?;
    let (events, simulated_ms) = sim.audit(&report, now, v)?;
    Ok((events, simulated_ms, report.pairs_on_disk))
}

impl Sim<'_> {
    /// One worker process from `start` (ms after T0) until `end`, or until quiet. Returns its
    /// report (none if it died) and the worker's clock at its end.
    fn process(
        &self,
        start: Millis,
        end: Option<(Millis, End)>,
        actions: Vec<Timed>,
    ) -> Result<(Option<RunReport>, Millis), String> {
        let log = open_log(self.dir)?;
        let rt = paused_runtime()?;
        let result = rt.block_on(async {
            self.truth.rebase(T0 + start);
            let quiet = end.is_none().then_some(3);
            let worker = Worker::open(
                log.clone(),
                self.world.agent.clone(),
                self.world.backend.clone(),
                self.world.worker_clock.clone(),
                config(self.s.seed, quiet),
            )
            .await
            .map_err(|e| format!("open: {e}"))?;
            let inlet = worker.inlet();
            let stream = match end {
                Some(_) => self.s.stream,
                None => StreamFaults::CALM,
            };
            let seed = self.s.seed ^ start;
            tokio::spawn(self.world.clone().stream(stream, seed, inlet.clone()));
            tokio::spawn(self.world.clone().drive(actions, inlet));
            let report = run_until(worker, start, end).await?;
            Ok::<_, String>((report, self.world.worker_clock.now_ms()))
        });
        drop(rt); // waits for blocking appends in flight, as a dying process's last write would land or not
        close_log(log)?;
        result
    }

    /// The faults stop: what is left is latency and the model's time.
    fn calm(&self) {
        let calm = |f: &Faults| Faults {
            latency_ms: f.latency_ms,
            model_run_ms: f.model_run_ms,
            seed: f.seed,
            ..Faults::default()
        };
        self.world.agent.set_faults(calm(&self.s.agent));
        self.world.backend.set_faults(calm(&self.s.backend));
    }

    fn audit(
        &self,
        report: &RunReport,
        now: Millis,
        v: &mut Violations,
    ) -> Result<(u64, Millis), String> {
        let log = open_log(self.dir)?;
        let steps = self.world.steps.lock().expect("steps").clone();
        let mut auditor = audit::Auditor::new(v, steps);
        for env in log.read(ReadFilter::from(1)) {
            auditor.event(&env.map_err(|e| format!("reading the log: {e}"))?);
        }
        let rebuilt = std::mem::take(&mut auditor.views);
        let (agent, backend) = (&self.world.agent, &self.world.backend);
        if report.stopped != "quiet" {
            v.add(
                audit::CONVERGENCE,
                format!("the last process stopped: {}", report.stopped),
            );
        }
        audit::convergence(&report.views, &rebuilt, now, v);
        audit::mirrored(&report.views, agent, backend, v);
        audit::messages(&report.views, backend, v);
        audit::sides(agent, backend, v);
        let events = log.last_seq();
        close_log(log)?;
        Ok((events, self.truth.now_ms().saturating_sub(T0)))
    }
}

/// Runs a worker until its end: dropped mid-flight (a crash), asked to stop, or quiet.
async fn run_until(
    worker: Worker,
    start: Millis,
    end: Option<(Millis, End)>,
) -> Result<Option<RunReport>, String> {
    let at = |end: Millis| Duration::from_millis(end.saturating_sub(start));
    let run = |shutdown: Box<dyn Future<Output = ()> + Unpin>| worker.run(shutdown);
    let report = match end {
        Some((end, End::Crash)) => {
            let _ = tokio::time::timeout(at(end), run(Box::new(std::future::pending()))).await;
            return Ok(None);
        }
        Some((end, _)) => run(Box::new(Box::pin(tokio::time::sleep(at(end))))).await,
        None => {
            let limit = Duration::from_secs(2 * 3_600);
            let quiet = run(Box::new(std::future::pending()));
            tokio::time::timeout(limit, quiet)
                .await
                .map_err(|_| "the last process did not settle within two hours".to_owned())?
        }
    };
    report.map(Some).map_err(|e| format!("worker: {e}"))
}

fn paused_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())
}

fn open_log(dir: &Path) -> Result<Arc<EventLog>, String> {
    let opts = LogOptions {
        create: true,
        ..LogOptions::default()
    };
    EventLog::open(dir, &opts)
        .map(Arc::new)
        .map_err(|e| format!("opening the log: {e}"))
}

/// Closes the log for real: the last handle is dropped (sled flushed, the lock released), so
/// the next process opens the directory anew.
fn close_log(log: Arc<EventLog>) -> Result<(), String> {
    match Arc::try_unwrap(log) {
        Ok(log) => {
            drop(log);
            Ok(())
        }
        Err(_) => Err("the log is still held after its process ended".into()),
    }
}
