//! The dispatcher: the only part that talks to the outside, and the throttle in front of it.
//!
//! [`Dispatcher`] is a state machine driven with the time passed in: the controller feeds it
//! planned commands ([`Dispatcher::enqueue`]), asks what may start now ([`Dispatcher::select`]),
//! runs the calls, and reports how they ended ([`Dispatcher::finished`]), appending the events
//! each step returns. It enforces, in this order:
//!
//! 1. **priorities with ageing**: a command's rank is its op's priority (answering users first,
//!    then creations, renames, deletions) plus how long it has waited: every
//!    [`DispatchConfig::aging_ms`] waited is worth one priority class, so a steady stream of
//!    prompts delays a rename by at most a few classes' worth of waiting, never forever;
//! 2. **same-key exclusion**: never two commands for the same chat or agent session at once,
//!    and a key whose last attempt failed waits out its backoff before *any* command for it runs
//!    (a new observation cannot start a hot loop against a failing backend);
//! 3. **limits**: a global concurrency limit, and per target a concurrency limit (a semaphore
//!    the observers share, so calls in flight to a side never exceed it), a rate limit
//!    (`governor`) and a circuit breaker;
//! 4. **retries**: retryable failures back off exponentially with full jitter, up to
//!    `max_attempts`, then the command is dead-lettered; terminal failures end it at once;
//! 5. **the model list**: one cached list per agent-server generation and TTL, fetched once
//!    (single-flight) for all the creations that need it.
//!
//! Before each attempt the command is checked against the current views
//! ([`crate::reconcile::obsolete`]): one whose purpose is gone is cancelled, not run.

pub mod breaker;
mod execute;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::num::NonZeroU32;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use breaker::{Breaker, BreakerPolicy, BreakerState};
pub use execute::execute;

use crate::clock::Millis;
use crate::events::*;
use crate::ports::{ModelList, PortError};
use crate::projections::{CommandLedger, CommandState, SessionsView, Views};
use crate::reconcile::{agent_side_failing, obsolete};

/// Retries of retryable failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first backoff's ceiling.
    pub base_ms: Millis,
    /// No backoff is longer.
    pub cap_ms: Millis,
    /// Attempts before the dead letter.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_ms: 1_000,
            cap_ms: 30_000,
            max_attempts: 3,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (from 1): "full jitter", uniform in
    /// `0..=min(cap, base * 2^(attempt-1))`, so retries of many commands spread out.
    pub fn backoff(&self, attempt: u32, rng: &mut impl Rng) -> Millis {
        let exp = self
            .base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
            .min(self.cap_ms);
        rng.random_range(0..=exp)
    }
}

/// The limits of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetLimits {
    /// Calls in flight at once (commands and observations together).
    pub concurrency: usize,
    /// Commands started per second (0: no rate limit).
    pub per_second: u32,
    /// How many may start at once before the rate applies.
    pub burst: u32,
}

impl Default for TargetLimits {
    fn default() -> Self {
        Self {
            concurrency: 10,
            per_second: 100,
            burst: 20,
        }
    }
}

/// Everything the dispatcher may decide, as numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchConfig {
    /// Commands in flight at once, all targets together.
    pub concurrency: usize,
    /// The agent server's limits.
    pub agent: TargetLimits,
    /// The backend's limits.
    pub backend: TargetLimits,
    /// The timeout of one call.
    pub timeout_ms: Millis,
    /// The timeout of one prompt (the agent works while it runs).
    pub prompt_timeout_ms: Millis,
    /// Retries.
    pub retry: RetryPolicy,
    /// The breaker of each target.
    pub breaker: BreakerPolicy,
    /// Waiting this long raises a command by one priority class.
    pub aging_ms: Millis,
    /// No attempt starts this long after its command was planned: it is cancelled instead.
    /// The worker sets it to the retention horizon, which the backend's window for applied
    /// command ids is at least as long as, so every attempt of a command falls within the
    /// window of its first: an id the backend may have forgotten is never sent again.
    pub retry_horizon_ms: Millis,
    /// How long a fetched model list stays fresh.
    pub model_ttl_ms: Millis,
    /// Whether the model list is cached (off only to measure the incident's baseline: every
    /// creation then fetches the list itself).
    pub model_cache: bool,
    /// The model new chat sessions get when their agent session names none (`--model`); when
    /// unset, the agent server's default from the model list.
    pub default_model: Option<ModelRef>,
    /// Seed of the backoff jitter.
    pub seed: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            concurrency: 10,
            agent: TargetLimits::default(),
            backend: TargetLimits::default(),
            timeout_ms: 30_000,
            prompt_timeout_ms: 10 * 60_000,
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            aging_ms: 10_000,
            retry_horizon_ms: crate::reconcile::retention::RetentionPolicy::default().horizon_ms,
            model_ttl_ms: 5 * 60_000,
            model_cache: true,
            default_model: None,
            seed: 0x5eed,
        }
    }
}

impl DispatchConfig {
    /// No limits and no model cache: the incident's `Promise.allSettled`, for the baseline
    /// measurement only.
    pub fn unthrottled() -> Self {
        let open = TargetLimits {
            concurrency: Semaphore::MAX_PERMITS,
            per_second: 0,
            burst: 1,
        };
        Self {
            concurrency: usize::MAX,
            agent: open,
            backend: open,
            model_cache: false,
            ..Self::default()
        }
    }
}

/// The priority class of an operation: 0 goes first. Answering users, then creations, then
/// renames, then deletions and other clean-up.
pub fn priority(op: Op) -> u8 {
    match op {
        Op::Prompt | Op::CompleteMessage | Op::FailMessage => 0,
        Op::CreateSession | Op::CreateAgentSession | Op::LinkAgentSession => 1,
        Op::RenameSession => 2,
        Op::MarkSessionDeleted | Op::MarkSessionFailed | Op::AbortAgentSession => 3,
    }
}

/// The per-target semaphores that bound calls in flight to each side. The observers take a
/// permit for each call too.
#[derive(Debug, Clone)]
pub struct Gates {
    /// Calls to the agent server.
    pub agent: Arc<Semaphore>,
    /// Calls to the backend.
    pub backend: Arc<Semaphore>,
}

impl Gates {
    /// The gate of `target`.
    pub fn of(&self, target: Source) -> &Arc<Semaphore> {
        match target {
            Source::Agent => &self.agent,
            Source::Backend => &self.backend,
        }
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    FakeRelativeClock,
    governor::middleware::NoOpMiddleware<governor::nanos::Nanos>,
>;

/// One target's throttle state.
struct Target {
    limiter: Option<Limiter>,
    /// Driven to the dispatcher's `now` before each check (time is injected).
    limiter_clock: FakeRelativeClock,
    limiter_origin: Millis,
    limiter_free_at: Millis,
    breaker: Breaker,
}

impl Target {
    fn new(limits: &TargetLimits, breaker: BreakerPolicy, now: Millis) -> Self {
        let clock = FakeRelativeClock::default();
        let limiter = NonZeroU32::new(limits.per_second).map(|rate| {
            let burst = NonZeroU32::new(limits.burst.max(1)).expect("at least 1");
            RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                clock.clone(),
            )
        });
        Self {
            limiter,
            limiter_clock: clock,
            limiter_origin: now,
            limiter_free_at: 0,
            breaker: Breaker::new(breaker),
        }
    }

    /// Takes one start from the rate limit, or says when the next is free.
    fn take(&mut self, now: Millis) -> Result<(), Millis> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        use governor::clock::Clock as _;
        let elapsed = Duration::from_millis(now.saturating_sub(self.limiter_origin));
        let current = Duration::from(self.limiter_clock.now());
        if elapsed > current {
            self.limiter_clock.advance(elapsed - current);
        }
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter_clock.now());
            let free = now + (wait.as_millis() as Millis).max(1);
            self.limiter_free_at = free;
            free
        })
    }
}

/// A command waiting to start.
#[derive(Debug, Clone)]
struct Queued {
    command: Command,
    /// Its exclusion keys, computed once.
    keys: Vec<String>,
    /// Attempts already made.
    attempts: u32,
    /// Failed attempts that count toward the dead letter: failures while the target was down
    /// (its breaker open) are the target's, not the command's, and are not charged.
    charged: u32,
    /// Not before this time (its backoff).
    not_before: Millis,
    /// Since when it has been waiting to start (for ageing).
    waiting_since: Millis,
    /// Enqueue order, to keep equal ranks first-in first-out.
    order: u64,
    /// Its place in line once its backoff is over: `waiting_since` plus its priority's ageing
    /// offset (lower first).
    rank: u64,
    /// Whether an earlier attempt may have reached the target (its reply was lost, it timed
    /// out, or the process died during it): the next attempt looks before it acts.
    uncertain: bool,
}

/// A command whose attempt is running.
#[derive(Debug)]
struct Running {
    command: Command,
    keys: Vec<String>,
    charged: u32,
}

/// What the dispatcher wants done now.
#[derive(Debug)]
pub enum Action {
    /// Record that a command was dropped: `event` is its `command_cancelled`.
    Cancel(Event),
    /// Start an attempt (its `attempt_started` must be appended before the call).
    Start(Attempt),
    /// Fetch the model list (single-flight).
    FetchModels(ModelFetch),
}

/// One attempt to run.
#[derive(Debug)]
pub struct Attempt {
    /// The command's id.
    pub id: CommandId,
    /// The command, with its model resolved.
    pub command: Command,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// The call's timeout.
    pub timeout: Duration,
    /// Fetch the model list before a creation (the unthrottled baseline only).
    pub fetch_models_first: bool,
    /// An earlier attempt may have taken effect: look it up before acting again (see
    /// [`execute`]).
    pub uncertain: bool,
    /// The target's permit, held for the call.
    pub permit: OwnedSemaphorePermit,
}

impl Attempt {
    /// Its `attempt_started` event.
    pub fn started_event(&self) -> Event {
        Event::AttemptStarted(AttemptStarted {
            command_id: self.id.clone(),
            op: self.command.op(),
            subject: self.command.subject(),
            attempt: self.attempt,
        })
    }
}

/// One model-list fetch to run (its `models_requested` must be appended before the call).
#[derive(Debug)]
pub struct ModelFetch {
    /// The agent-server generation it is for.
    pub generation: u64,
    /// The agent target's permit.
    pub permit: OwnedSemaphorePermit,
}

impl ModelFetch {
    /// Its `models_requested` event.
    pub fn started_event(&self) -> Event {
        Event::ModelsRequested(ModelsRequested {
            generation: self.generation,
        })
    }
}

/// Counters the dispatcher keeps for the summary and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// The most calls it had in flight at once (commands and model fetches).
    pub peak_in_flight: usize,
    /// Attempts started.
    pub attempts: u64,
    /// Attempts that were retries.
    pub retries: u64,
    /// Commands dead-lettered.
    pub dead_letters: u64,
    /// Commands cancelled.
    pub cancelled: u64,
    /// Model-list fetches started.
    pub model_fetches: u64,
}

/// Where the model list stands in this process (the log holds the rest).
#[derive(Debug, Default)]
struct ModelState {
    in_flight: bool,
}

/// The scheduler. See the module documentation.
pub struct Dispatcher {
    cfg: DispatchConfig,
    gates: Gates,
    queue: BTreeMap<CommandId, Queued>,
    /// The queue in line, without sorting it: what may start by (rank, order), and what waits
    /// for its backoff by (not_before, order) until `select` moves it in line.
    line: Line,
    running: HashMap<CommandId, Running>,
    busy_keys: HashSet<String>,
    key_not_before: HashMap<String, Millis>,
    agent: Target,
    backend: Target,
    rng: SmallRng,
    models: ModelState,
    order: u64,
    stats: DispatchStats,
    /// Whether the worker is Ready: before, only what cannot act on a stale picture of the
    /// world may start ([`waits_for_ready`]).
    ready: bool,
    /// What waits for Ready ([`waits_for_ready`]) also waits for a complete agent listing
    /// after this seq (the start of the worker's process): Ready may come from reads of
    /// changes, which show nothing gone. A server wiped or replaced while the worker was down
    /// reads as "nothing changed": a prompt to a session it lost would fail the message for
    /// good, a mirror of a session deleted meanwhile would make a ghost chat, and a deletion
    /// resumed from the ledger was decided on an older listing. `None`: no such hold (a
    /// dispatcher not started by a worker process).
    listed_after: Option<u64>,
}

/// Whether `op` must wait until the worker is Ready: everything that acts on the agent server
/// (prompts, creations, aborts, and the model fetch a chat creation needs) and every verdict
/// on a chat session (deleted, failed). A command resumed from the ledger was decided on what
/// a previous process saw; until this process has listed both sides it may be wrong. Delivering
/// an outcome already in hand, linking and renaming may go at once.
pub fn waits_for_ready(op: Op) -> bool {
    op.target() == Source::Agent
        || matches!(
            op,
            Op::CreateSession | Op::MarkSessionDeleted | Op::MarkSessionFailed
        )
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("queued", &self.queue.len())
            .field("running", &self.running.len())
            .finish()
    }
}

/// Whether the agent side has been listed completely after `after` (`None`: no such need).
fn agent_listed_after(s: &SessionsView, after: Option<u64>) -> bool {
    let listed = s
        .listings
        .get(&Source::Agent)
        .and_then(|l| l.last_complete_seq);
    after.is_none_or(|after| listed.is_some_and(|seq| seq > after))
}

/// The exclusion keys of a command: every session it touches.
fn keys_of(command: &Command) -> Vec<String> {
    let r = command.subject_refs();
    let mut keys = Vec::with_capacity(2);
    keys.extend(r.chat_session_id.map(|c| format!("chat:{c}")));
    keys.extend(r.agent_session_id.map(|a| format!("agent:{a}")));
    keys
}

impl Dispatcher {
    /// A dispatcher with nothing queued.
    pub fn new(cfg: DispatchConfig, now: Millis) -> Self {
        let gates = Gates {
            agent: Arc::new(Semaphore::new(cfg.agent.concurrency)),
            backend: Arc::new(Semaphore::new(cfg.backend.concurrency)),
        };
        Self {
            agent: Target::new(&cfg.agent, cfg.breaker, now),
            backend: Target::new(&cfg.backend, cfg.breaker, now),
            rng: SmallRng::seed_from_u64(cfg.seed),
            cfg,
            gates,
            queue: BTreeMap::new(),
            line: Line::default(),
            running: HashMap::new(),
            busy_keys: HashSet::new(),
            key_not_before: HashMap::new(),
            models: ModelState::default(),
            order: 0,
            stats: DispatchStats::default(),
            ready: true,
            listed_after: None,
        }
    }

    /// Holds what waits for Ready until a complete agent listing after `seq` is in the views
    /// as well.
    pub fn hold_until_agent_listed_after(&mut self, seq: u64) {
        self.listed_after = Some(seq);
    }

    /// Holds back (`false`) or lets go (`true`) the commands that wait for Ready. A worker
    /// holds them from its start until both sides were listed in its own process.
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }

    /// The per-target gates, for the observers to share.
    pub fn gates(&self) -> Gates {
        self.gates.clone()
    }

    /// Whether a command is queued or running here.
    pub fn holds(&self, id: &CommandId) -> bool {
        self.queue.contains_key(id) || self.running.contains_key(id)
    }

    /// Its counters.
    pub fn stats(&self) -> &DispatchStats {
        &self.stats
    }

    /// Commands waiting to start.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Calls running (commands and a model fetch).
    pub fn in_flight(&self) -> usize {
        self.running.len() + usize::from(self.models.in_flight)
    }

    /// When the oldest queued command started waiting.
    pub fn oldest_waiting_since(&self) -> Option<Millis> {
        self.line.since.first().map(|(t, _)| *t)
    }

    /// Takes a command out of the queue and out of line.
    fn unqueue(&mut self, id: &CommandId) -> Option<Queued> {
        let q = self.queue.remove(id)?;
        self.line.remove(id, &q);
        Some(q)
    }

    fn target(&mut self, target: Source) -> &mut Target {
        match target {
            Source::Agent => &mut self.agent,
            Source::Backend => &mut self.backend,
        }
    }

    /// Queues a planned command (a no-op when it is already queued or running).
    pub fn enqueue(&mut self, id: CommandId, command: Command, now: Millis) {
        self.push(id, command, (0, 0), (now, false), now);
    }

    fn push(
        &mut self,
        id: CommandId,
        command: Command,
        (attempts, charged): (u32, u32),
        (at, uncertain): (Millis, bool),
        now: Millis,
    ) {
        if self.running.contains_key(&id) || self.queue.contains_key(&id) {
            return;
        }
        self.order += 1;
        let waiting_since = at.max(now);
        let q = Queued {
            keys: keys_of(&command),
            rank: waiting_since + u64::from(priority(command.op())) * self.cfg.aging_ms,
            command,
            attempts,
            charged,
            not_before: at,
            waiting_since,
            order: self.order,
            uncertain,
        };
        self.line.insert(&id, &q, now);
        self.queue.insert(id, q);
    }

    /// Why a command planned at least `retry_horizon_ms` ago must not be attempted: an
    /// earlier attempt may have been applied and the backend's record of it pruned since, so
    /// sending the id again could apply a non-idempotent effect (a second chat session) twice.
    fn too_old(&self, views: &Views, id: &CommandId, now: Millis) -> Option<String> {
        let planned_at = views.commands.state.commands.get(id)?.planned_at;
        (now >= planned_at.saturating_add(self.cfg.retry_horizon_ms)).then(|| {
            format!(
                "planned {} h ago, past the retention horizon: the backend may no longer remember an earlier attempt",
                now.saturating_sub(planned_at) / 3_600_000
            )
        })
    }

    /// Queues every command the ledger holds open: what a previous process planned but did not
    /// finish resumes with the same ids. An attempt cut short by the process's death is not
    /// counted as a failure: it is made again under the same number.
    pub fn resume(&mut self, ledger: &CommandLedger, now: Millis) -> usize {
        let mut n = 0;
        for (id, entry) in ledger.open() {
            let Some(command) = entry.command() else {
                continue;
            };
            let attempts = match entry.state {
                CommandState::InFlight => entry.attempts.saturating_sub(1),
                _ => entry.attempts,
            };
            // Cut short by the process's death, or failed in a way that may have taken effect.
            let uncertain = matches!(entry.state, CommandState::InFlight | CommandState::Failed);
            // A wait logged before the wall clock was stepped back is capped at the longest.
            let at = entry
                .next_attempt_at()
                .unwrap_or(now)
                .min(now.saturating_add(self.cfg.retry.cap_ms));
            let when = (at, uncertain);
            self.push(id.clone(), command.clone(), (attempts, attempts), when, now);
            n += 1;
        }
        n
    }

    /// What may start now, in rank order, within every limit. The caller appends the events of
    /// the actions (`command_cancelled`, `attempt_started`) and then runs the calls.
    pub fn select(&mut self, views: &Views, now: Millis) -> Vec<Action> {
        self.line.backoffs_over(&self.queue, now);
        // A cooldown over holds nothing back: forgotten, so that the map holds only keys
        // cooling down now (a key whose command failed for good would otherwise stay forever).
        self.key_not_before.retain(|_, t| *t > now);
        let mut actions = Vec::new();
        let mut after = None;
        while let Some(place) = self.line.next_after(after.take()) {
            let id = place.2.clone();
            after = Some(place);
            if self.in_flight() >= self.cfg.concurrency {
                break;
            }
            let Some(queued) = self.queue.get(&id) else {
                continue;
            };
            if !self.ready && waits_for_ready(queued.command.op()) {
                continue;
            }
            let mut command = queued.command.clone();
            let keys = queued.keys.clone();
            let blocked = keys.iter().any(|k| {
                self.busy_keys.contains(k) || self.key_not_before.get(k).is_some_and(|t| *t > now)
            });
            if blocked {
                continue;
            }
            if let Some(reason) =
                obsolete(views, &command).or_else(|| self.too_old(views, &id, now))
            {
                self.unqueue(&id);
                self.stats.cancelled += 1;
                actions.push(Action::Cancel(Event::CommandCancelled(CommandCancelled {
                    command_id: id,
                    op: command.op(),
                    subject: command.subject(),
                    reason,
                })));
                continue;
            }
            let s = &views.sessions.state;
            if waits_for_ready(command.op()) && !agent_listed_after(s, self.listed_after) {
                continue; // waits for a complete agent listing of this process
            }
            if command.op() == Op::MarkSessionDeleted && agent_side_failing(s) {
                continue; // waits for a complete listing after the failure
            }
            if let Command::Prompt {
                agent_session_id, ..
            } = &command
            {
                if !s.agent.contains_key(agent_session_id) {
                    // Planned on a view a listing has since corrected (a server wiped while
                    // the worker was down): waits for the session to come back, or for its
                    // chat session's deletion to make the prompt obsolete. Sent now, it would
                    // fail the message for good on a 404.
                    continue;
                }
            }
            let target = command.op().target();
            if !self.target(target).breaker.allows(now) {
                continue;
            }
            let mut fetch_models_first = false;
            if let Command::CreateSession { model, .. } = &mut command {
                if model.is_none() {
                    match self.model_for_creation(views, now) {
                        ModelNeed::Use(m) => *model = m.map(|m| m.to_string()),
                        ModelNeed::FetchInline => fetch_models_first = true,
                        ModelNeed::Wait => continue,
                        ModelNeed::Fetch => {
                            if let Some(fetch) = self.start_model_fetch(views, now) {
                                actions.push(Action::FetchModels(fetch));
                            }
                            continue;
                        }
                    }
                }
            }
            let Ok(permit) = self.gates.of(target).clone().try_acquire_owned() else {
                continue;
            };
            if self.target(target).take(now).is_err() {
                continue;
            }
            self.target(target).breaker.on_start(now);
            let q = self.unqueue(&id).expect("queued");
            for k in &keys {
                self.busy_keys.insert(k.clone());
            }
            let attempt = q.attempts + 1;
            self.stats.attempts += 1;
            if attempt > 1 {
                self.stats.retries += 1;
            }
            let timeout = Duration::from_millis(match command.op() {
                Op::Prompt => self.cfg.prompt_timeout_ms,
                _ => self.cfg.timeout_ms,
            });
            self.running.insert(
                id.clone(),
                Running {
                    command: q.command,
                    keys,
                    charged: q.charged,
                },
            );
            self.stats.peak_in_flight = self.stats.peak_in_flight.max(self.in_flight());
            actions.push(Action::Start(Attempt {
                id,
                command,
                attempt,
                timeout,
                fetch_models_first,
                uncertain: q.uncertain,
                permit,
            }));
        }
        actions
    }

    fn model_for_creation(&self, views: &Views, now: Millis) -> ModelNeed {
        if let Some(m) = &self.cfg.default_model {
            return ModelNeed::Use(Some(m.clone()));
        }
        if !self.cfg.model_cache {
            return ModelNeed::FetchInline;
        }
        let s = &views.sessions.state;
        let generation = s.agent_generation;
        if let Some(cache) = &s.models {
            if cache.generation == generation
                && now.saturating_sub(cache.fetched_at) < self.cfg.model_ttl_ms
            {
                return ModelNeed::Use(
                    cache
                        .default
                        .clone()
                        .or_else(|| cache.models.first().cloned()),
                );
            }
        }
        if self.models.in_flight {
            return ModelNeed::Wait;
        }
        match s.models_requested {
            // Fetched in this window for this generation, and it failed (or the process died
            // during it): go without a model rather than fetch again (one fetch per TTL window
            // per generation).
            Some((g, at)) if g == generation && now.saturating_sub(at) < self.cfg.model_ttl_ms => {
                ModelNeed::Use(None)
            }
            _ => ModelNeed::Fetch,
        }
    }

    fn start_model_fetch(&mut self, views: &Views, now: Millis) -> Option<ModelFetch> {
        if !self.agent.breaker.allows(now) {
            return None;
        }
        let permit = self.gates.agent.clone().try_acquire_owned().ok()?;
        self.models.in_flight = true;
        let generation = views.sessions.state.agent_generation;
        self.stats.model_fetches += 1;
        self.stats.peak_in_flight = self.stats.peak_in_flight.max(self.in_flight());
        Some(ModelFetch { generation, permit })
    }

    /// A model fetch ended: the events to append (`models_listed`, or an observation failure).
    pub fn models_fetched(
        &mut self,
        generation: u64,
        result: Result<ModelList, PortError>,
        now: Millis,
    ) -> Vec<Event> {
        self.models.in_flight = false;
        match result {
            Ok(list) => {
                self.agent.breaker.on_success();
                vec![Event::ModelsListed(ModelsListed {
                    generation,
                    models: list.models,
                    default: list.default,
                })]
            }
            Err(e) => {
                if e.is_retryable() {
                    self.agent.breaker.on_failure(now);
                }
                vec![Event::ObservationFailed(ObservationFailed {
                    source: Source::Agent,
                    operation: crate::projections::MODELS_OPERATION.into(),
                    error: e.message,
                })]
            }
        }
    }

    /// An attempt ended: the events to append (success; failure with the next attempt's time;
    /// or failure and dead letter).
    pub fn finished(
        &mut self,
        id: &CommandId,
        attempt: u32,
        result: Result<Effect, PortError>,
        now: Millis,
    ) -> Vec<Event> {
        let Some(run) = self.running.remove(id) else {
            return Vec::new();
        };
        for k in &run.keys {
            self.busy_keys.remove(k);
        }
        let op = run.command.op();
        let subject = run.command.subject();
        let target = op.target();
        match result {
            Ok(effect) => {
                self.target(target).breaker.on_success();
                for k in &run.keys {
                    self.key_not_before.remove(k);
                }
                vec![Event::CommandSucceeded(CommandSucceeded {
                    command_id: id.clone(),
                    op,
                    subject,
                    attempt,
                    effect,
                })]
            }
            Err(e) if !e.is_retryable() => {
                // An answer, but no success: it neither counts against the target nor closes
                // its breaker (only a call that really succeeded does); a probe may go again.
                self.target(target).breaker.on_abandoned(now);
                vec![Event::CommandFailed(CommandFailed {
                    command_id: id.clone(),
                    op,
                    subject,
                    attempt,
                    class: ErrorClass::Terminal,
                    error: e.message,
                    next_attempt_at: None,
                })]
            }
            Err(e) => {
                let target_down = self.target(target).breaker.on_failure(now);
                let charged = run.charged + u32::from(!target_down);
                if charged >= self.cfg.retry.max_attempts {
                    self.stats.dead_letters += 1;
                    return vec![
                        Event::CommandFailed(CommandFailed {
                            command_id: id.clone(),
                            op,
                            subject: subject.clone(),
                            attempt,
                            class: ErrorClass::Retryable,
                            error: e.message.clone(),
                            next_attempt_at: None,
                        }),
                        Event::CommandDeadLettered(CommandDeadLettered {
                            command_id: id.clone(),
                            op,
                            subject,
                            attempts: attempt,
                            last_error: e.message,
                        }),
                    ];
                }
                // A call to the agent whose connection broke may still be on its way to the
                // server: give it time to land before the next attempt looks it up.
                let landing = match target {
                    Source::Agent => self.cfg.retry.base_ms / 2,
                    Source::Backend => 0,
                };
                let wait = self
                    .cfg
                    .retry
                    .backoff(charged.max(1), &mut self.rng)
                    .max(e.retry_after_ms.unwrap_or(0))
                    .max(landing);
                // A target that is down is waited for, not retried into.
                let reopens = self.target(target).breaker.reopens_at().unwrap_or(now);
                let next = (now + wait).max(reopens);
                for k in &run.keys {
                    let t = self.key_not_before.entry(k.clone()).or_insert(next);
                    *t = (*t).max(next);
                }
                self.push(
                    id.clone(),
                    run.command,
                    (attempt, charged),
                    (next, true),
                    next,
                );
                vec![Event::CommandFailed(CommandFailed {
                    command_id: id.clone(),
                    op,
                    subject,
                    attempt,
                    class: ErrorClass::Retryable,
                    error: e.message,
                    next_attempt_at: Some(next),
                })]
            }
        }
    }

    /// An observation of `source` succeeded or failed: the observers are the breakers' other
    /// witnesses. A listing that works proves the target up (a command that keeps failing is
    /// then the command's fault and is charged); failing listings open the breaker sooner.
    pub fn observed(&mut self, source: Source, ok: bool, now: Millis) {
        let breaker = &mut self.target(source).breaker;
        if ok {
            breaker.on_success();
        } else {
            breaker.on_failure(now);
        }
    }

    /// A started attempt will never report (its task was dropped while draining): forget it so
    /// that its keys are free. The ledger keeps it in flight, so the next process resumes it.
    pub fn abandoned(&mut self, id: &CommandId, now: Millis) {
        if let Some(run) = self.running.remove(id) {
            for k in &run.keys {
                self.busy_keys.remove(k);
            }
            self.target(run.command.op().target())
                .breaker
                .on_abandoned(now);
        }
    }

    /// The next time something waiting may become startable (a backoff ends, a breaker lets a
    /// probe through, the rate limit frees a slot), if anything waits.
    pub fn next_wakeup(&self, now: Millis) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut consider = |t: Millis| {
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(&(t, _, _)) = self.line.backoff.first() {
            consider(t);
        }
        if !self.queue.is_empty() {
            // The keys cooling down now (`select` forgets those over), not the queue: waking
            // for a key none of the queue holds costs one idle turn, walking the queue every
            // turn cost O(queue).
            for t in self.key_not_before.values() {
                consider(*t);
            }
            for t in [&self.agent, &self.backend] {
                if let Some(t) = t.breaker.reopens_at() {
                    consider(t);
                }
                consider(t.limiter_free_at);
            }
        }
        next
    }
}

/// The queue's order, kept as commands come and go: selecting walks it from the front and
/// stops at the concurrency limit, instead of sorting the whole queue each turn.
#[derive(Debug, Default)]
struct Line {
    /// Past their backoff, by (rank, order).
    due: BTreeSet<(u64, u64, CommandId)>,
    /// In their backoff, by (not_before, order).
    backoff: BTreeSet<(Millis, u64, CommandId)>,
    /// Every queued command by (waiting_since, order): the oldest wait.
    since: BTreeSet<(Millis, u64)>,
}

impl Line {
    fn insert(&mut self, id: &CommandId, q: &Queued, now: Millis) {
        if q.not_before <= now {
            self.due.insert((q.rank, q.order, id.clone()));
        } else {
            self.backoff.insert((q.not_before, q.order, id.clone()));
        }
        self.since.insert((q.waiting_since, q.order));
    }

    fn remove(&mut self, id: &CommandId, q: &Queued) {
        if !self.due.remove(&(q.rank, q.order, id.clone())) {
            self.backoff.remove(&(q.not_before, q.order, id.clone()));
        }
        self.since.remove(&(q.waiting_since, q.order));
    }

    /// Moves in line the commands whose backoff is over by `now`.
    fn backoffs_over(&mut self, queue: &BTreeMap<CommandId, Queued>, now: Millis) {
        while self.backoff.first().is_some_and(|(t, _, _)| *t <= now) {
            let (_, _, id) = self.backoff.pop_first().expect("first");
            if let Some(q) = queue.get(&id) {
                self.due.insert((q.rank, q.order, id));
            }
        }
    }

    /// The place in line after `after` (the front when `None`).
    fn next_after(&self, after: Option<(u64, u64, CommandId)>) -> Option<(u64, u64, CommandId)> {
        let next = match after {
            None => self.due.first(),
            Some(a) => self.due.range((Excluded(a), Unbounded)).next(),
        };
        next.cloned()
    }
}

enum ModelNeed {
    /// Use this model (or none).
    Use(Option<ModelRef>),
    /// A fetch is running: wait for it.
    Wait,
    /// Start the (single) fetch, and wait for it.
    Fetch,
    /// The model cache is off: the attempt fetches the list itself.
    FetchInline,
}

#[cfg(test)]
mod tests;
