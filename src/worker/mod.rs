//! The worker: the control loop that joins the log, the views, the observers, the reconciler
//! and the dispatcher.
//!
//! One task owns the log's writing end and the live views; everything else sends it messages
//! (observations, finished calls) and it turns them into events. Each turn of the loop:
//! fold what arrived into events and append them (off the runtime, on a blocking thread);
//! reconcile (pure) and append what was planned; let the dispatcher start what it may, appending
//! `attempt_started` *before* each call so that a crash leaves the attempt visible and the
//! command resumable. Nothing changes state except by an event.
//!
//! Lifecycle: Starting -> CatchingUp (checkpoints + tail) -> Observing (first complete listing
//! of both sides) -> Ready (prompts allowed) -> Draining (no new work; in-flight calls get a
//! grace period; checkpoints written) -> Stopped.

pub mod archiver;
pub mod http;
pub mod observers;
pub mod status;
pub mod turns;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::clock::{Clock, Millis};
use crate::dispatch::{self, Action, DispatchConfig, DispatchStats, Dispatcher};
use crate::events::*;
use crate::log::{CheckpointPolicy, EventLog, LiveViews, LogError};
use crate::observe;
use crate::ports::{AgentObservation, AgentServer, Backend, ModelList, PortError};
use crate::projections::Views;
use crate::reconcile::{self, Context};

pub use observers::{Observation, PollPolicy, Poller};
pub use status::{StuckPolicy, WorkerStatus};
pub use turns::TurnSummary;

/// The clock of a worker running on tokio: wall time at `rebase`, advanced by tokio's clock.
/// Under a paused tokio clock (the simulations) time moves only when every task waits, so hours
/// of simulated work take milliseconds and runs are deterministic.
#[derive(Debug)]
pub struct TokioClock {
    origin: std::sync::Mutex<(tokio::time::Instant, Millis)>,
}

impl TokioClock {
    /// A clock reading `now_ms` now. Call from within a runtime.
    pub fn new(now_ms: Millis) -> Self {
        Self {
            origin: std::sync::Mutex::new((tokio::time::Instant::now(), now_ms)),
        }
    }

    /// Makes the clock read `now_ms` now, on the current runtime's clock (a simulation that
    /// restarts the worker in a new runtime keeps its time going).
    pub fn rebase(&self, now_ms: Millis) {
        *self.origin.lock().expect("clock") = (tokio::time::Instant::now(), now_ms);
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> Millis {
        let (at, ms) = *self.origin.lock().expect("clock");
        ms + at.elapsed().as_millis() as Millis
    }
}

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker's id (the backend's `workerId`).
    pub worker_id: String,
    /// The dispatcher's limits and retries.
    pub dispatch: DispatchConfig,
    /// The reconciler's windows.
    pub policy: reconcile::Policy,
    /// When checkpoints are written.
    pub checkpoints: CheckpointPolicy,
    /// How the sources are polled.
    pub polling: PollPolicy,
    /// Backend page size: the most the Convex client asks for (more round trips cost more than
    /// bigger pages; 100,000 sessions list in 200 calls).
    pub page_size: u32,
    /// The most pages one backend listing reads (at most `page_size` x this many items): a
    /// backend that never says `isDone` is stopped there, and the listing is a failed
    /// observation. Default 1,000 (500,000 items at the default page size).
    pub max_listing_pages: u32,
    /// How long in-flight calls may finish when draining.
    pub drain_grace_ms: Millis,
    /// Stop by itself after this many consecutive quiet observation rounds (both sides listed,
    /// nothing planned, queued or running): for the demo and the simulations.
    pub stop_when_quiet: Option<u32>,
    /// When old events move into the archive (`None`: never, as in tests that read the live
    /// log whole).
    pub archive: Option<archiver::ArchiveSchedule>,
    /// How long final rows stay in the live views, and how often they are swept.
    pub retention: reconcile::retention::RetentionPolicy,
    /// Whether the run's report holds every row of the views, settled pairs on disk read back
    /// (`log::rows`): what tests and simulations compare. `agentsync run` discards the report
    /// and sets it off (at a million sessions, reading them all back would cost a second and
    /// a gigabyte at shutdown). Default on.
    pub report_every_row: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: "worker".into(),
            dispatch: DispatchConfig::default(),
            policy: reconcile::Policy::default(),
            checkpoints: CheckpointPolicy::default(),
            polling: PollPolicy::default(),
            page_size: 500,
            max_listing_pages: 1_000,
            drain_grace_ms: 10_000,
            stop_when_quiet: None,
            archive: None,
            retention: reconcile::retention::RetentionPolicy::default(),
            report_every_row: true,
        }
    }
}

/// A worker failure: the log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The event log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A blocking task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    /// When the worker started.
    pub started_at: Millis,
    /// Time from start to Ready, if it got there.
    pub time_to_ready_ms: Option<u64>,
    /// The dispatcher's counters.
    pub dispatch: DispatchStats,
    /// The views at the end: every row when `WorkerConfig::report_every_row`, else those in
    /// memory (settled pairs on disk left out, `log::rows`).
    pub views: Views,
    /// Why it stopped.
    pub stopped: String,
    /// How long its turns took ([`turns`]).
    pub turns: TurnSummary,
    /// Settled pairs on disk at the end, and how many were brought back into memory during
    /// the run (`log::rows`).
    pub pairs_on_disk: u64,
    /// See `pairs_on_disk`.
    pub pairs_brought_back: u64,
}

/// A finished call.
enum Done {
    Command {
        id: CommandId,
        attempt: u32,
        result: Result<Effect, PortError>,
    },
    Models {
        generation: u64,
        result: Result<ModelList, PortError>,
    },
}

/// The worker's control loop. See the module documentation.
pub struct Worker {
    log: Arc<EventLog>,
    live: Option<LiveViews>,
    clock: Arc<dyn Clock>,
    agent: Arc<dyn AgentServer>,
    backend: Arc<dyn Backend>,
    dispatcher: Dispatcher,
    cfg: WorkerConfig,
    started_at: Millis,
    /// The log's last seq when this process opened it: Ready needs listings newer than this.
    process_seq: u64,
    ready_after: Option<u64>,
    seq: Arc<AtomicU64>,
    /// The seq of the last event appended that is neither a listing marker nor a checkpoint
    /// record (the log's end at open): a full listing that finds nothing new after it is not
    /// recorded ([`observe::idle_listing`]).
    last_change_seq: u64,
    /// The event id of each command's `command_planned`, for the causes of its outcomes.
    planned_ids: HashMap<CommandId, Uuid>,
    /// The keys the next turn plans, and those due again at a time.
    keys: reconcile::Scheduler,
    status: Arc<WorkerStatus>,
    inlet: mpsc::Sender<Observation>,
    observations: Option<mpsc::Receiver<Observation>>,
    nudge_agent: Arc<Notify>,
    /// Ask the observers for a full listing at their next poll.
    full_agent: Arc<AtomicBool>,
    full_backend: Arc<AtomicBool>,
    /// When the message feed last read to its end in this process (retention's clamp).
    messages_read_at: Option<Millis>,
    /// When retention was last swept in this process.
    swept_at: Option<Millis>,
    /// How long the turns take.
    turns: turns::TurnTimes,
}

impl Worker {
    /// Starting and CatchingUp: loads the views (checkpoints + tail, on a blocking thread),
    /// records the start, and queues every command a previous process left unfinished.
    pub async fn open(
        log: Arc<EventLog>,
        agent: Arc<dyn AgentServer>,
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        cfg: WorkerConfig,
    ) -> Result<Worker, WorkerError> {
        let started_at = clock.now_ms();
        let (tx, rx) = mpsc::channel(256);
        let (live, catch_up) = {
            let log = log.clone();
            let policy = cfg.checkpoints;
            blocking(move || LiveViews::open(&log, policy, started_at)).await??
        };
        tracing::info!(
            applied = catch_up.applied,
            seq = live.views.min_seq(),
            "caught up"
        );
        let caught_up = format!(
            "{} events applied after the checkpoints, log at seq {}",
            catch_up.applied,
            log.last_seq()
        );
        // Never past the backend's window for applied ids (the dispatch config's own
        // horizon, which `run` sets for Convex), nor past the views' retention.
        let dispatch = DispatchConfig {
            retry_horizon_ms: cfg.retention.horizon_ms.min(cfg.dispatch.retry_horizon_ms),
            ..cfg.dispatch.clone()
        };
        let mut dispatcher = Dispatcher::new(dispatch, started_at);
        // The first turn plans everything once: what the checkpoints hold was planned by an
        // earlier process, with another start time.
        // Resumed commands were decided on a previous process's view: they wait for Ready.
        dispatcher.set_ready(false);
        dispatcher.hold_until_agent_listed_after(log.last_seq());
        let resumed = dispatcher.resume(&live.views.commands.state, started_at);
        if resumed > 0 {
            tracing::info!(resumed, "resuming unfinished commands");
        }
        let mut worker = Worker {
            seq: Arc::new(AtomicU64::new(log.last_seq())),
            process_seq: log.last_seq(),
            last_change_seq: log.last_seq(),
            log,
            live: Some(live),
            clock,
            agent,
            backend,
            dispatcher,
            cfg,
            started_at,
            ready_after: None,
            planned_ids: HashMap::new(),
            keys: reconcile::Scheduler::default(),
            status: Arc::new(WorkerStatus::new()),
            inlet: tx,
            observations: Some(rx),
            nudge_agent: Arc::new(Notify::new()),
            full_agent: Arc::new(AtomicBool::new(false)),
            full_backend: Arc::new(AtomicBool::new(false)),
            messages_read_at: None,
            swept_at: None,
            turns: turns::TurnTimes::default(),
        };
        let started = WorkerStarted {
            worker_id: worker.cfg.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
        };
        tracing::info!(state = "starting", detail = %format!("pid {}", std::process::id()), "lifecycle");
        tracing::info!(state = "catching_up", detail = %caught_up, "lifecycle");
        worker.keys.mark_everything();
        worker.status.set_state(Lifecycle::CatchingUp, started_at);
        let state = |state, detail: Option<String>| {
            NewEvent::new(
                Event::WorkerState(WorkerStateChanged { state, detail }),
                started_at,
            )
        };
        worker
            .append(vec![
                state(
                    Lifecycle::Starting,
                    Some(format!("pid {}", std::process::id())),
                ),
                NewEvent::new(Event::WorkerStarted(started), started_at),
                state(Lifecycle::CatchingUp, Some(caught_up)),
            ])
            .await?;
        Ok(worker)
    }

    /// The worker's outside view (state, readiness, metrics), for the HTTP server.
    pub fn status(&self) -> Arc<WorkerStatus> {
        self.status.clone()
    }

    /// Where other tasks send what they observe: the agent server's event stream, the
    /// supervisor's lifecycle events. Each becomes events in the loop's next turn.
    pub fn inlet(&self) -> mpsc::Sender<Observation> {
        self.inlet.clone()
    }

    /// Enters a lifecycle state: an event and a log line.
    pub async fn enter(
        &mut self,
        state: Lifecycle,
        detail: Option<String>,
    ) -> Result<(), WorkerError> {
        let now = self.clock.now_ms();
        tracing::info!(
            state = state.name(),
            detail = detail.as_deref().unwrap_or(""),
            "lifecycle"
        );
        self.status.set_state(state, now);
        let event = Event::WorkerState(WorkerStateChanged { state, detail });
        self.append(vec![NewEvent::new(event, now)]).await?;
        Ok(())
    }

    /// The live views.
    pub fn views(&self) -> &Views {
        &self
            .live
            .as_ref()
            .expect("views are present between turns")
            .views
    }

    /// Appends events (on a blocking thread), folds them into the views, and marks the keys
    /// they name dirty, with the keys that read those rows before and after the fold (a link
    /// that moved dirties both ends).
    async fn append(&mut self, events: Vec<NewEvent>) -> Result<Vec<Envelope>, WorkerError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Settled pairs away from memory that these events name come back first (`log::rows`).
        let events = if self.live.as_ref().is_some_and(|l| l.needs_wake(&events)) {
            let mut live = self.live.take().expect("views");
            let (live, events, woke) = self
                .off_runtime(move || {
                    let woke = live.wake_for(&events);
                    (live, events, woke)
                })
                .await?;
            self.live = Some(live);
            woke?;
            events
        } else {
            events
        };
        self.append_resident(events).await
    }

    /// `append`, once every row the events name is in memory.
    async fn append_resident(
        &mut self,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Envelope>, WorkerError> {
        let keys: Vec<Key> = events.iter().flat_map(|e| e.event.keys()).collect();
        if let Some(live) = self.live.as_ref() {
            for key in &keys {
                self.keys.mark_with_dependents(key, &live.views);
            }
        }
        let log = self.log.clone();
        // The lifecycle is history for people, not state: it does not wait for the disk (the
        // start's first flush would wait on sled's own writes of the open; `append_unflushed`).
        let lifecycle = events.iter().all(|e| is_lifecycle(&e.event));
        let stored = self
            .off_runtime(move || match lifecycle {
                true => log.append_unflushed(events),
                false => log.append(events),
            })
            .await??;
        self.status.appended(&stored);
        if let Some(live) = self.live.as_mut() {
            // Every row named is in memory (`append`): no read of the tree here.
            live.apply(&stored)?;
            for key in &keys {
                self.keys.mark_with_dependents(key, &live.views);
            }
        }
        if let Some(last) = stored.last() {
            self.seq.store(last.seq, Ordering::SeqCst);
        }
        let marker = |e: &&Envelope| {
            matches!(
                e.kind(),
                EventKind::ListingCompleted | EventKind::CheckpointWritten
            )
        };
        if let Some(change) = stored.iter().rev().find(|e| !marker(e)) {
            self.last_change_seq = change.seq;
        }
        Ok(stored)
    }

    /// Runs until `shutdown` completes (or, with `stop_when_quiet`, until nothing is left to
    /// do), then drains.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunReport, WorkerError> {
        let tx = self.inlet.clone();
        let mut rx = self.observations.take().expect("run is called once");
        self.enter(Lifecycle::Observing, None).await?;
        let active = Arc::new(AtomicBool::new(true));
        let nudge = Arc::new(Notify::new());
        let link = observers::ObserverLink {
            tx,
            seq: self.seq.clone(),
            active: active.clone(),
            nudge_backend: nudge.clone(),
            nudge_agent: self.nudge_agent.clone(),
            full_agent: self.full_agent.clone(),
            full_backend: self.full_backend.clone(),
            feeds: self.feed_cursors(),
            gates: self.dispatcher.gates(),
            policy: self.cfg.polling,
            page_size: self.cfg.page_size,
            max_pages: self.cfg.max_listing_pages,
            seed: self.cfg.dispatch.seed,
        };
        let mut observers = JoinSet::new();
        observers.spawn(observers::observe_agent(self.agent.clone(), link.clone()));
        observers.spawn(observers::observe_backend(self.backend.clone(), link));
        if let Some(schedule) = self.cfg.archive.clone() {
            let (log, clock) = (self.log.clone(), self.clock.clone());
            observers.spawn(archiver::archive_on_schedule(log, clock, schedule));
        }
        let mut calls: JoinSet<Done> = JoinSet::new();
        tokio::pin!(shutdown);
        let mut quiet_rounds = 0u32;
        let mut planned_since_round = false;
        let mut agent_listed_since_round = false;
        let mut backend_listed_in_round = false;
        let mut hold_checked_at = None;
        self.turns.begin();
        let stopped = loop {
            let now = self.clock.now_ms();
            self.check_ready(now).await?;
            self.sweep_retention(now).await?;
            self.hold_deletions(now, &mut hold_checked_at).await?;
            self.confirm_hold(now);
            planned_since_round |= self.plan_and_start(now, &mut calls, &nudge).await?;
            self.maybe_checkpoint(now).await?;
            self.status.dispatch(
                self.dispatcher.stats(),
                self.dispatcher.queued(),
                self.dispatcher.in_flight(),
                self.dispatcher.oldest_waiting_since(),
            );
            if let Some(live) = self.live.as_ref() {
                let s = &live.views.sessions.state;
                let rows = s.agent.len() + s.chat.len();
                self.status
                    .residency(rows, live.away(), live.brought_back());
            }
            let undelivered = &self.views().messages.state.undelivered;
            let oldest = undelivered.values().min().copied();
            self.status.undelivered(undelivered.len(), oldest);
            if let Some(n) = self.cfg.stop_when_quiet {
                if quiet_rounds >= n {
                    break "quiet".to_owned();
                }
            }
            let due = [self.dispatcher.next_wakeup(now), self.keys.next_due()];
            let wake = due
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_sub(now));
            let sleep = tokio::time::sleep(Duration::from_millis(wake.unwrap_or(60_000)));
            self.turns.end();
            tokio::select! {
                () = &mut shutdown => break "shutdown requested".to_owned(),
                Some(obs) = rx.recv() => {
                    self.turns.begin();
                    let round_end = matches!(obs, Observation::BackendMessages { .. });
                    agent_listed_since_round |= matches!(obs, Observation::AgentSessions { full: true, result: Ok(ref l), .. } if l.complete);
                    backend_listed_in_round |= matches!(obs, Observation::BackendSessions { full: true, error: None, .. });
                    self.observed(obs).await?;
                    if round_end {
                        let idle = self.dispatcher.queued() == 0 && self.dispatcher.in_flight() == 0;
                        let ready = self.ready_after.is_some();
                        let quiet = idle && ready && !planned_since_round;
                        // A round counts as quiet only when both sides were listed in full in
                        // it: a simulation stops on what a full listing shows, deletions included.
                        if quiet && agent_listed_since_round && backend_listed_in_round {
                            quiet_rounds += 1;
                        } else {
                            quiet_rounds = 0;
                        }
                        if quiet && self.cfg.stop_when_quiet.is_some() {
                            self.full_agent.store(true, Ordering::SeqCst);
                            self.full_backend.store(true, Ordering::SeqCst);
                        }
                        planned_since_round = false;
                        agent_listed_since_round = false;
                        backend_listed_in_round = false;
                    }
                    active.store(self.is_active(), Ordering::SeqCst);
                }
                Some(done) = calls.join_next(), if !calls.is_empty() => {
                    self.turns.begin();
                    match done {
                        Ok(done) => self.finished(done).await?,
                        Err(e) => return Err(WorkerError::Task(e.to_string())),
                    }
                }
                () = sleep => self.turns.begin(),
            }
        };
        observers.abort_all();
        self.drain(&stopped, calls).await?;
        self.enter(Lifecycle::Stopped, Some(stopped.clone()))
            .await?;
        let live = self.live.take().expect("views");
        let (pairs_on_disk, pairs_brought_back) = (live.away(), live.brought_back());
        let views = if self.cfg.report_every_row {
            self.off_runtime(move || live.merged()).await??
        } else {
            live.views
        };
        Ok(RunReport {
            started_at: self.started_at,
            time_to_ready_ms: self.ready_after,
            dispatch: self.dispatcher.stats().clone(),
            views,
            stopped,
            turns: self.turns.summary(),
            pairs_on_disk,
            pairs_brought_back,
        })
    }

    /// Observing -> Ready once both sides have been listed completely by this process.
    async fn check_ready(&mut self, now: Millis) -> Result<(), WorkerError> {
        if self.ready_after.is_some() {
            return Ok(());
        }
        let sessions = &self.views().sessions.state;
        if reconcile::listed_in_this_process(sessions, self.process_seq) {
            self.dispatcher.set_ready(true);
            // Everything that waited for Ready (prompts, creations, deletions) is planned once.
            self.keys.mark_everything();
            let ms = now.saturating_sub(self.started_at);
            self.ready_after = Some(ms);
            let views = self.views();
            let summary = format!(
                "{} agent sessions and {} chat sessions in memory, {} settled pairs on disk, ready in {ms} ms, {} model fetches, {} commands queued, {} messages pending",
                views.sessions.state.agent.len(),
                views.sessions.state.chat.len(),
                self.live.as_ref().map_or(0, |l| l.away()),
                self.dispatcher.stats().model_fetches,
                self.dispatcher.queued(),
                views.messages.state.pending_by_chat.values().map(|p| p.len()).sum::<usize>(),
            );
            let ready = WorkerReady {
                time_to_ready_ms: ms,
            };
            self.append(vec![NewEvent::new(Event::WorkerReady(ready), now)])
                .await?;
            self.enter(Lifecycle::Ready, Some(summary)).await?;
        }
        Ok(())
    }

    /// Retention: once Ready and once the message feed has read to its end in this process,
    /// and then every `retention.every_ms`, drops the final rows older than the horizon
    /// (`reconcile::retention::sweep` decides, purely; the event records it). A sweep that
    /// would drop nothing appends nothing.
    async fn sweep_retention(&mut self, now: Millis) -> Result<(), WorkerError> {
        let policy = self.cfg.retention;
        let (Some(_), Some(read_at)) = (self.ready_after, self.messages_read_at) else {
            return Ok(());
        };
        if self
            .swept_at
            .is_some_and(|at| now < at.saturating_add(policy.every_ms))
        {
            return Ok(());
        }
        self.swept_at = Some(now);
        // Off the runtime: chat sessions on disk are looked up (their rename entries stay).
        let live = self.live.take().expect("views");
        let (live, swept) = self
            .off_runtime(move || {
                let swept = live.retention_sweep(now, read_at, &policy);
                (live, swept)
            })
            .await?;
        self.live = Some(live);
        let Some(swept) = swept else {
            return Ok(());
        };
        let rows = swept.commands.len() + swept.messages.len() + swept.chats.len();
        if rows >= reconcile::retention::MAX_ROWS_PER_SWEEP {
            self.swept_at = None; // more are due: sweep again at the next turn
        }
        tracing::info!(
            before = swept.before,
            commands = swept.commands.len(),
            messages = swept.messages.len(),
            chats = swept.chats.len(),
            "retention: final rows older than the horizon left the views"
        );
        self.append(vec![NewEvent::new(Event::RetentionSwept(swept), now)])
            .await?;
        Ok(())
    }

    /// Holds a listing's deletions when they are more than one listing may cause, or lifts a
    /// hold: the reconciler decides (purely), the worker appends the event before this turn's
    /// planning reads it, caused by the listing it is about. Asked once per complete agent
    /// listing (`checked_at`: the last one asked about), not every turn: it scans every chat
    /// session, and only a listing changes its answer in time to matter (the reconciler holds
    /// deletions over the limit by itself; this records the hold and starts its wait).
    async fn hold_deletions(
        &mut self,
        now: Millis,
        checked_at: &mut Option<u64>,
    ) -> Result<(), WorkerError> {
        let listings = &self.views().sessions.state.listings;
        let listing = listings
            .get(&Source::Agent)
            .and_then(|l| l.last_complete_seq);
        if listing.is_none() || listing == *checked_at {
            return Ok(());
        }
        *checked_at = listing;
        let Some(change) = reconcile::deletion_hold(self.views(), &self.cfg.policy) else {
            return Ok(());
        };
        let listing_seq = match &change {
            reconcile::HoldChange::Held(h) => {
                tracing::warn!(
                    listing_seq = h.listing_seq,
                    candidates = h.candidates,
                    limit = h.limit,
                    confirm_after_ms = self.cfg.policy.deletion_confirm_ms,
                    "deletions held: a complete agent listing lacks more linked sessions than one listing may delete; a later listing must confirm"
                );
                h.listing_seq
            }
            reconcile::HoldChange::Lifted(l) => {
                tracing::info!(
                    held_listing_seq = l.held_listing_seq,
                    listing_seq = l.listing_seq,
                    candidates = l.candidates,
                    limit = l.limit,
                    "deletion hold lifted"
                );
                l.listing_seq
            }
        };
        let cause = self.event_ids(std::iter::once(listing_seq)).await?;
        let event = NewEvent::new(change.into(), now).caused_by(cause.get(&listing_seq).copied());
        self.append(vec![event]).await?;
        Ok(())
    }

    /// While deletions are held, asks for the full agent listing that may confirm them once
    /// the wait has passed since the hold and since the last one: full listings are otherwise
    /// paced minutes apart.
    fn confirm_hold(&self, now: Millis) {
        let s = &self.views().sessions.state;
        let Some(hold) = &s.deletion_hold else {
            return;
        };
        let last = s
            .listings
            .get(&Source::Agent)
            .and_then(|l| l.last_complete_at);
        let from = hold.at.max(last.unwrap_or(0)).max(self.started_at);
        if now >= from.saturating_add(self.cfg.policy.deletion_confirm_ms)
            && !self.full_agent.swap(true, Ordering::SeqCst)
        {
            self.nudge_agent.notify_one();
        }
    }

    /// Reconciles, appends what was planned, and starts what the dispatcher allows. Returns
    /// whether anything was planned.
    async fn plan_and_start(
        &mut self,
        now: Millis,
        calls: &mut JoinSet<Done>,
        nudge: &Arc<Notify>,
    ) -> Result<bool, WorkerError> {
        let ctx = Context {
            now,
            started_at: self.started_at,
            ready: self.ready_after.is_some(),
            process_seq: self.process_seq,
        };
        let keys = {
            let live = self.live.as_ref().expect("views");
            self.keys.take(&live.views, now)
        };
        let turn = reconcile::reconcile_keys(&keys, self.views(), &ctx, &self.cfg.policy);
        for (key, at) in turn.requeue {
            self.keys.requeue(key, at);
        }
        let planned = turn.planned;
        let any = !planned.is_empty();
        if any {
            let causes = self
                .event_ids(planned.iter().filter_map(|p| p.cause_seq))
                .await?;
            let events = planned
                .into_iter()
                .map(|p| {
                    let e = NewEvent::new(Event::CommandPlanned(p.planned), now);
                    e.caused_by(p.cause_seq.and_then(|s| causes.get(&s)).copied())
                })
                .collect();
            for env in self.append(events).await? {
                if let Event::CommandPlanned(p) = &env.event {
                    self.planned_ids.insert(p.command_id.clone(), env.id);
                    self.dispatcher
                        .enqueue(p.command_id.clone(), p.command.clone(), now);
                }
            }
        }
        let actions = {
            let live = self.live.as_ref().expect("views");
            self.dispatcher.select(&live.views, now)
        };
        if actions.is_empty() {
            return Ok(any);
        }
        let mut events = Vec::new();
        let mut starts = Vec::new();
        let mut fetches = Vec::new();
        for action in actions {
            match action {
                Action::Cancel(event) => {
                    let cause = event
                        .command_id()
                        .and_then(|id| self.planned_ids.remove(id));
                    events.push(with_cause(NewEvent::new(event, now), cause.as_ref()));
                }
                Action::Start(attempt) => {
                    let cause = self.planned_ids.get(&attempt.id);
                    events.push(with_cause(
                        NewEvent::new(attempt.started_event(), now),
                        cause,
                    ));
                    starts.push(attempt);
                }
                Action::FetchModels(fetch) => {
                    events.push(NewEvent::new(fetch.started_event(), now));
                    fetches.push(fetch);
                }
            }
        }
        // Durable before the calls: a crash from here on leaves the attempts in the log.
        self.append(events).await?;
        for fetch in fetches {
            let agent = self.agent.clone();
            let timeout = Duration::from_millis(self.cfg.dispatch.timeout_ms);
            calls.spawn(async move {
                let _permit = fetch.permit;
                let result = tokio::time::timeout(timeout, agent.list_models())
                    .await
                    .unwrap_or_else(|_| Err(PortError::retryable("list_models timed out")));
                Done::Models {
                    generation: fetch.generation,
                    result,
                }
            });
        }
        for attempt in starts {
            if attempt.command.op() == Op::Prompt {
                nudge.notify_one();
            }
            let agent = self.agent.clone();
            let backend = self.backend.clone();
            let worker_id = self.cfg.worker_id.clone();
            calls.spawn(async move {
                let (agent, backend) = (agent.as_ref(), backend.as_ref());
                let result = dispatch::execute(agent, backend, &attempt, &worker_id).await;
                Done::Command {
                    id: attempt.id,
                    attempt: attempt.attempt,
                    result,
                }
            });
        }
        Ok(any)
    }

    /// The event ids at these seqs (a blocking read).
    async fn event_ids(
        &mut self,
        seqs: impl Iterator<Item = u64>,
    ) -> Result<HashMap<u64, Uuid>, WorkerError> {
        let seqs: Vec<u64> = seqs.collect();
        if seqs.is_empty() {
            return Ok(HashMap::new());
        }
        let log = self.log.clone();
        self.off_runtime(move || {
            let mut ids = HashMap::new();
            for seq in seqs {
                if let Some(env) = log.get(seq)? {
                    ids.insert(seq, env.id);
                }
            }
            Ok::<_, LogError>(ids)
        })
        .await?
        .map_err(Into::into)
    }

    /// An observation becomes events.
    async fn observed(&mut self, obs: Observation) -> Result<(), WorkerError> {
        let now = self.clock.now_ms();
        let failed = |source, operation: &str, e: PortError| {
            tracing::warn!(%source, operation, error = %e, "observation failed");
            Event::ObservationFailed(ObservationFailed {
                source,
                operation: operation.into(),
                error: e.message,
            })
        };
        let obs = match obs {
            Observation::Lifecycle(event) => {
                if matches!(event, Event::AgentServerStarted(_)) {
                    // A new server: list it in full now rather than at the next poll.
                    self.full_agent.store(true, Ordering::SeqCst);
                    self.nudge_agent.notify_one();
                }
                self.append(vec![NewEvent::new(event, now)]).await?;
                return Ok(());
            }
            Observation::AgentStream(AgentObservation::Connected { reconnected }) => {
                if reconnected {
                    // Events may have been missed, renames among them, which only a full
                    // listing shows (a rename does not move `time.updated`): list in full.
                    self.full_agent.store(true, Ordering::SeqCst);
                    self.nudge_agent.notify_one();
                }
                return Ok(());
            }
            other => other,
        };
        if let Some((source, ok)) = obs.call_outcome() {
            self.dispatcher.observed(source, ok, now);
            if ok {
                self.status.observed_ok(source, now);
            }
        }
        if matches!(obs, Observation::BackendMessages { error: None, .. }) {
            // Every message written before this read began has been read (in change order).
            self.messages_read_at = Some(now);
        }
        let (obs, listed) = self.bring_back_for(obs).await?;
        let worker_id = self.cfg.worker_id.as_str();
        let views = self.views();
        let sessions = &views.sessions.state;
        let process_seq = self.process_seq;
        let events = match obs {
            Observation::AgentSessions {
                as_of,
                full,
                cursor,
                result,
            } => match result {
                Ok(listing) => {
                    let mut events = if full {
                        let events = observe::agent_listing(sessions, &listing, as_of, worker_id);
                        self.unless_idle(Source::Agent, events)
                    } else {
                        observe::agent_changes(sessions, &listing, as_of, worker_id)
                    };
                    let read = cursor.map(|c| c.to_string());
                    events.extend(read.and_then(|c| {
                        observe::feed_read(sessions, Feed::AgentSessions, &c, true, process_seq)
                    }));
                    events
                }
                Err(e) => vec![failed(Source::Agent, "list_sessions", e)],
            },
            Observation::AgentStatus { as_of, result } => match result {
                Ok(statuses) => observe::agent_statuses(sessions, statuses, as_of),
                Err(e) => vec![failed(Source::Agent, "status", e)],
            },
            Observation::BackendSessions {
                as_of,
                full,
                sessions: listed,
                cursor,
                error,
            } => {
                let complete = error.is_none();
                let mut events = if full {
                    let events = observe::backend_sessions(sessions, &listed, complete, as_of);
                    self.unless_idle(Source::Backend, events)
                } else {
                    observe::backend_session_changes(sessions, &listed, as_of)
                };
                events.extend(cursor.and_then(|c| {
                    observe::feed_read(sessions, Feed::BackendSessions, &c, complete, process_seq)
                }));
                if let Some(e) = error {
                    events.push(failed(Source::Backend, "list_sessions", e));
                }
                events
            }
            Observation::BackendMessages {
                messages,
                cursor,
                error,
            } => {
                let mut events = observe::backend_messages(&views.messages.state, &messages);
                let complete = error.is_none();
                events.extend(cursor.and_then(|c| {
                    observe::feed_read(sessions, Feed::BackendMessages, &c, complete, process_seq)
                }));
                if let Some(e) = error {
                    events.push(failed(Source::Backend, "list_messages", e));
                }
                events
            }
            Observation::AgentStream(report) => {
                observe::agent_observation(&views.sessions.state, &report, worker_id)
            }
            Observation::Lifecycle(_) => unreachable!("handled above"),
        };
        let events = events
            .into_iter()
            .map(|mut e| {
                // The marker counts every session listed, those left away from memory too.
                if let (Event::ListingCompleted(l), Some(n)) = (&mut e, listed) {
                    l.sessions = n;
                }
                NewEvent::new(e, now)
            })
            .collect();
        self.append(events).await?;
        Ok(())
    }

    /// Brings into memory the settled pairs away that an observation is about, before it is
    /// compared with the views (`log::rows`): the sessions a read of changes, a status or a
    /// stream report names; for a full listing, the pairs it changes or (complete) lacks,
    /// while those it reports unchanged are taken out of it. Returns the observation and, for
    /// a full listing, how many sessions it listed. Reads the tree off the runtime, and only
    /// when a row named may be away.
    async fn bring_back_for(
        &mut self,
        obs: Observation,
    ) -> Result<(Observation, Option<u64>), WorkerError> {
        let worker_id = self.cfg.worker_id.clone();
        let ours = move |i: &AgentSessionInfo| observe::is_ours(i, &worker_id);
        let live = self.live.as_ref().expect("views");
        let mut agents = Vec::new();
        let full_count = match &obs {
            Observation::AgentSessions {
                full: true,
                result: Ok(l),
                ..
            } => Some(l.sessions.iter().filter(|i| ours(i)).count() as u64),
            Observation::BackendSessions {
                full: true,
                sessions,
                ..
            } => Some(sessions.len() as u64),
            _ => None,
        };
        let listed_resident = match &obs {
            Observation::AgentSessions { result: Ok(l), .. } => l
                .sessions
                .iter()
                .all(|i| live.agent_resident(&i.agent_session_id)),
            Observation::BackendSessions { sessions, .. } => sessions
                .iter()
                .all(|i| live.chat_resident(&i.chat_session_id)),
            _ => true,
        };
        match &obs {
            // Nothing is away, or nothing listed may be and no absence is to be proved.
            _ if live.away() == 0 => return Ok((obs, full_count)),
            Observation::AgentSessions { result: Ok(_), .. }
            | Observation::BackendSessions { .. }
                if full_count.is_some() || !listed_resident =>
            {
                let obs = self.ready_listing(obs, ours).await?;
                return Ok((obs, full_count));
            }
            Observation::AgentStatus { result: Ok(st), .. } => {
                agents.extend(st.iter().map(|s| s.agent_session_id.clone()));
            }
            Observation::AgentStream(report) => agents.extend(report.agent_session_id().cloned()),
            _ => {}
        }
        self.wake(agents, Vec::new()).await?;
        Ok((obs, full_count))
    }

    /// A listing of either side (in full or of changes), readied off the runtime
    /// (`bring_back_for`): only a complete full listing may bring back what it lacks.
    async fn ready_listing(
        &mut self,
        obs: Observation,
        ours: impl Fn(&AgentSessionInfo) -> bool + Send + 'static,
    ) -> Result<Observation, WorkerError> {
        let mut live = self.live.take().expect("views");
        let (live, result) = self
            .off_runtime(move || {
                let mut obs = obs;
                let readied = match &mut obs {
                    Observation::AgentSessions {
                        as_of,
                        full,
                        result: Ok(listing),
                        ..
                    } => {
                        let (complete, as_of) = (*full && listing.complete, *as_of);
                        let listed = &mut listing.sessions;
                        live.ready_agent_listing(listed, complete, as_of, ours)
                    }
                    Observation::BackendSessions {
                        as_of,
                        full,
                        sessions,
                        error,
                        ..
                    } => {
                        let (complete, as_of) = (*full && error.is_none(), *as_of);
                        live.ready_backend_listing(sessions, complete, as_of)
                    }
                    _ => Ok(()),
                };
                (live, readied.map(|()| obs))
            })
            .await?;
        self.live = Some(live);
        Ok(result?)
    }

    /// Brings back the settled pairs away from memory these rows belong to, if any may be.
    async fn wake(
        &mut self,
        agents: Vec<AgentSessionId>,
        chats: Vec<ChatSessionId>,
    ) -> Result<(), WorkerError> {
        let live = self.live.as_ref().expect("views");
        if live.all_resident(&agents, &chats) {
            return Ok(());
        }
        let mut live = self.live.take().expect("views");
        let (live, woke) = self
            .off_runtime(move || {
                let woke = live.wake(&agents, &chats);
                (live, woke)
            })
            .await?;
        self.live = Some(live);
        Ok(woke?)
    }

    /// The events of a full listing of `source`, or none when it found nothing new and its
    /// marker would change no decision ([`observe::idle_listing`]).
    fn unless_idle(&self, source: Source, events: Vec<Event>) -> Vec<Event> {
        let sessions = &self.views().sessions.state;
        if observe::idle_listing(
            sessions,
            source,
            &events,
            self.last_change_seq,
            self.process_seq,
        ) {
            tracing::debug!(%source, "full listing found nothing new: not recorded");
            return Vec::new();
        }
        events
    }

    /// A call finished: its outcome becomes events.
    async fn finished(&mut self, done: Done) -> Result<(), WorkerError> {
        let now = self.clock.now_ms();
        let events = match done {
            Done::Command {
                id,
                attempt,
                result,
            } => {
                if let Err(e) = &result {
                    tracing::debug!(command = %id, attempt, error = %e, "attempt failed");
                }
                let cause = self.planned_ids.get(&id).copied();
                let events = self.dispatcher.finished(&id, attempt, result, now);
                if !self.dispatcher.holds(&id) {
                    // Over (succeeded, dead or failed terminally): nothing more will cite it.
                    self.planned_ids.remove(&id);
                }
                events
                    .into_iter()
                    .map(|e| with_cause(NewEvent::new(e, now), cause.as_ref()))
                    .collect()
            }
            Done::Models { generation, result } => self
                .dispatcher
                .models_fetched(generation, result, now)
                .into_iter()
                .map(|e| NewEvent::new(e, now))
                .collect(),
        };
        self.append(events).await?;
        Ok(())
    }

    /// Where the feeds' next reads start, as the log has it. The agent feed counts only when
    /// a complete agent listing covers it (`feed_read` for it follows only such listings).
    fn feed_cursors(&self) -> observers::FeedCursors {
        let s = &self.views().sessions.state;
        let cursor = |feed| {
            s.feeds
                .get(&feed)
                .map(|f: &crate::projections::FeedState| f.cursor.clone())
        };
        let listed = s
            .listings
            .get(&Source::Agent)
            .and_then(|l| l.last_complete_seq);
        observers::FeedCursors {
            agent: cursor(Feed::AgentSessions)
                .filter(|_| listed.is_some())
                .and_then(|c| c.parse().ok()),
            backend_sessions: cursor(Feed::BackendSessions),
            backend_messages: cursor(Feed::BackendMessages),
        }
    }

    /// Whether the observers should poll fast.
    fn is_active(&self) -> bool {
        let v = self.views();
        self.dispatcher.queued() > 0
            || self.dispatcher.in_flight() > 0
            || !v.messages.state.pending_by_chat.is_empty()
            || !v.sessions.state.index.busy.is_empty()
    }

    async fn maybe_checkpoint(&mut self, now: Millis) -> Result<(), WorkerError> {
        if self.live.as_ref().is_some_and(|l| l.due(now)) {
            self.write_checkpoints(now).await?;
        }
        Ok(())
    }

    /// Runs blocking work off the async workers, its wait not counted in the turn's time.
    async fn off_runtime<T: Send + 'static>(
        &mut self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, WorkerError> {
        let started = std::time::Instant::now();
        let result = blocking(f).await;
        self.turns.exclude(started.elapsed());
        result
    }

    /// Writes the checkpoints on a blocking thread (serializing a large view takes a while).
    async fn write_checkpoints(&mut self, now: Millis) -> Result<(), WorkerError> {
        let mut live = self.live.take().expect("views");
        let log = self.log.clone();
        let (live, result) = self
            .off_runtime(move || {
                let r = live.write_checkpoints(&log, now);
                (live, r)
            })
            .await?;
        self.live = Some(live);
        let seq = result?;
        self.seq.store(self.log.last_seq(), Ordering::SeqCst);
        tracing::debug!(seq, "checkpoints written");
        Ok(())
    }

    /// Draining: no new work; in-flight calls get the grace period; then checkpoints.
    async fn drain(&mut self, reason: &str, mut calls: JoinSet<Done>) -> Result<(), WorkerError> {
        let now = self.clock.now_ms();
        tracing::info!(reason, in_flight = calls.len(), "draining");
        self.enter(Lifecycle::Draining, Some(reason.to_owned()))
            .await?;
        let stopping = WorkerStopping {
            reason: reason.to_owned(),
        };
        self.append(vec![NewEvent::new(Event::WorkerStopping(stopping), now)])
            .await?;
        let grace = tokio::time::sleep(Duration::from_millis(self.cfg.drain_grace_ms));
        tokio::pin!(grace);
        while !calls.is_empty() {
            tokio::select! {
                Some(done) = calls.join_next() => match done {
                    Ok(done) => self.finished(done).await?,
                    Err(e) => return Err(WorkerError::Task(e.to_string())),
                },
                () = &mut grace => {
                    tracing::warn!(left = calls.len(), "grace period over; unfinished attempts resume on the next start");
                    calls.abort_all();
                    break;
                }
            }
        }
        let now = self.clock.now_ms();
        self.write_checkpoints(now).await
    }
}

/// A record of the worker's own lifecycle (started, the state it entered): nothing is
/// folded from it, nothing planned, and a crash that loses it loses a line of history.
fn is_lifecycle(event: &Event) -> bool {
    matches!(event, Event::WorkerStarted(_) | Event::WorkerState(_))
}

fn with_cause(e: NewEvent, cause: Option<&Uuid>) -> NewEvent {
    e.caused_by(cause.copied())
}

/// Runs blocking work (sled, checkpoint files) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WorkerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WorkerError::Task(e.to_string()))
}

#[cfg(test)]
mod tests;
