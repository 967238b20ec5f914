//! What a running worker shows outside: its lifecycle state, readiness, and Prometheus metrics
//! (`prometheus-client`). The control loop updates a [`WorkerStatus`] as it appends events and
//! after each turn; the HTTP server reads it (`/healthz`, `/readyz`, `/metrics`).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::clock::Millis;
use crate::dispatch::DispatchStats;
use crate::events::{Envelope, Event, Lifecycle, Source};

/// When `/readyz` says the worker is stuck even though it is Ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StuckPolicy {
    /// Queued work whose oldest item has waited longer than this (ms).
    pub oldest_queued_ms: Millis,
    /// No successful observation of a source for longer than this (ms).
    pub observation_ms: Millis,
    /// An answer or failure the backend has not taken for longer than this (ms).
    pub undelivered_ms: Millis,
}

impl Default for StuckPolicy {
    fn default() -> Self {
        Self {
            oldest_queued_ms: 5 * 60_000,
            observation_ms: 2 * 60_000,
            undelivered_ms: 5 * 60_000,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Debug, Default)]
struct Marks {
    state: Option<Lifecycle>,
    last_ok: [Option<Millis>; 2],
    started_at: Option<Millis>,
    oldest_waiting: Option<Millis>,
    dispatch: DispatchStats,
    undelivered: (usize, Option<Millis>),
}

/// The worker's outside view. Cheap to update; shared with the HTTP server.
pub struct WorkerStatus {
    registry: Registry,
    marks: Mutex<Marks>,
    events: Family<KindLabel, Counter>,
    commands: Family<CommandLabel, Counter>,
    state: Family<StateLabel, Gauge>,
    in_flight: Gauge,
    queue_depth: Gauge,
    retries: Counter,
    dead_letters: Counter,
    model_fetches: Counter,
    observation_failures: Family<SourceLabel, Counter>,
    observation_lag: Family<SourceLabel, Gauge<f64, AtomicU64>>,
    oldest_queued: Gauge<f64, AtomicU64>,
    undelivered: Gauge,
    oldest_undelivered: Gauge<f64, AtomicU64>,
    checkpoint_seq: Gauge,
    log_seq: Gauge,
    sessions_in_memory: Gauge,
    pairs_on_disk: Gauge,
    pairs_brought_back: Gauge,
}

impl std::fmt::Debug for WorkerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerStatus")
            .field("state", &self.state())
            .finish()
    }
}

impl Default for WorkerStatus {
    fn default() -> Self {
        Self::new()
    }
}

fn source_index(s: Source) -> usize {
    match s {
        Source::Agent => 0,
        Source::Backend => 1,
    }
}

impl WorkerStatus {
    /// A status with every metric registered and the state unset.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agentsync");
        let s = Self {
            registry: Registry::default(),
            marks: Mutex::default(),
            events: Family::default(),
            commands: Family::default(),
            state: Family::default(),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            retries: Counter::default(),
            dead_letters: Counter::default(),
            model_fetches: Counter::default(),
            observation_failures: Family::default(),
            observation_lag: Family::default(),
            oldest_queued: Gauge::default(),
            undelivered: Gauge::default(),
            oldest_undelivered: Gauge::default(),
            checkpoint_seq: Gauge::default(),
            log_seq: Gauge::default(),
            sessions_in_memory: Gauge::default(),
            pairs_on_disk: Gauge::default(),
            pairs_brought_back: Gauge::default(),
        };
        registry.register(
            "events_appended",
            "Events appended to the log, by kind",
            s.events.clone(),
        );
        registry.register(
            "commands",
            "Command outcomes, by kind (operation) and outcome",
            s.commands.clone(),
        );
        registry.register(
            "lifecycle_state",
            "1 for the worker's current lifecycle state",
            s.state.clone(),
        );
        registry.register(
            "commands_in_flight",
            "Calls in flight (commands and model fetches)",
            s.in_flight.clone(),
        );
        registry.register(
            "queue_depth",
            "Commands waiting to start",
            s.queue_depth.clone(),
        );
        registry.register("retries", "Attempts that were retries", s.retries.clone());
        registry.register(
            "dead_letters",
            "Commands that ran out of attempts",
            s.dead_letters.clone(),
        );
        registry.register(
            "model_fetches",
            "Model-list fetches started",
            s.model_fetches.clone(),
        );
        registry.register(
            "observation_failures",
            "Failed observations, by source",
            s.observation_failures.clone(),
        );
        registry.register(
            "observation_lag_seconds",
            "Seconds since the last complete listing of each source",
            s.observation_lag.clone(),
        );
        registry.register(
            "oldest_queued_seconds",
            "How long the longest-waiting queued command has waited",
            s.oldest_queued.clone(),
        );
        registry.register(
            "undelivered_outcomes",
            "Answers and failures the backend does not hold yet (their delivery is retried in rounds)",
            s.undelivered.clone(),
        );
        registry.register(
            "oldest_undelivered_seconds",
            "How long the oldest undelivered answer or failure has waited",
            s.oldest_undelivered.clone(),
        );
        registry.register(
            "checkpoint_seq",
            "The log position of the last checkpoint written",
            s.checkpoint_seq.clone(),
        );
        registry.register(
            "log_seq",
            "The log's last sequence number",
            s.log_seq.clone(),
        );
        registry.register(
            "sessions_in_memory",
            "Agent and chat session rows held in memory (the active ones)",
            s.sessions_in_memory.clone(),
        );
        registry.register(
            "settled_pairs_on_disk",
            "Linked session pairs with nothing to do, kept on disk until an event names them",
            s.pairs_on_disk.clone(),
        );
        registry.register(
            "settled_pairs_brought_back",
            "Pairs brought back from disk since the start: steady growth means churn",
            s.pairs_brought_back.clone(),
        );
        Self { registry, ..s }
    }

    /// The current lifecycle state.
    pub fn state(&self) -> Option<Lifecycle> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).state
    }

    /// Records a new lifecycle state.
    pub fn set_state(&self, state: Lifecycle, now: Millis) {
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        m.state = Some(state);
        if m.started_at.is_none() {
            m.started_at = Some(now);
        }
        for s in Lifecycle::ALL {
            self.state
                .get_or_create(&StateLabel {
                    state: s.name().into(),
                })
                .set(i64::from(s == state));
        }
    }

    /// Counts appended events.
    pub fn appended(&self, envelopes: &[Envelope]) {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        for env in envelopes {
            self.events
                .get_or_create(&KindLabel {
                    kind: env.kind().name().into(),
                })
                .inc();
            self.log_seq.set(env.seq as i64);
            let outcome = match &env.event {
                Event::CommandSucceeded(c) => Some((&c.command_id, "succeeded")),
                Event::CommandFailed(c) => Some((&c.command_id, "failed")),
                Event::CommandDeadLettered(c) => Some((&c.command_id, "dead_lettered")),
                Event::CommandCancelled(c) => Some((&c.command_id, "cancelled")),
                _ => None,
            };
            if let Some((id, outcome)) = outcome {
                let kind = id.as_str().split(':').next().unwrap_or("unknown");
                self.commands
                    .get_or_create(&CommandLabel {
                        kind: kind.into(),
                        outcome: outcome.into(),
                    })
                    .inc();
            }
            match &env.event {
                Event::ListingCompleted(l) if l.complete => {
                    marks.last_ok[source_index(l.source)] = Some(env.at);
                }
                Event::ObservationFailed(f) => {
                    self.observation_failures
                        .get_or_create(&SourceLabel {
                            source: f.source.to_string(),
                        })
                        .inc();
                }
                Event::CheckpointWritten(c) => {
                    self.checkpoint_seq.set(c.seq as i64);
                }
                _ => {}
            }
        }
    }

    /// Records the dispatcher's state after a turn of the loop.
    pub fn dispatch(
        &self,
        stats: &DispatchStats,
        queued: usize,
        in_flight: usize,
        oldest_waiting: Option<Millis>,
    ) {
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        self.retries
            .inc_by(stats.retries.saturating_sub(m.dispatch.retries));
        self.dead_letters
            .inc_by(stats.dead_letters.saturating_sub(m.dispatch.dead_letters));
        self.model_fetches
            .inc_by(stats.model_fetches.saturating_sub(m.dispatch.model_fetches));
        m.dispatch = stats.clone();
        m.oldest_waiting = oldest_waiting;
        self.queue_depth.set(queued as i64);
        self.in_flight.set(in_flight as i64);
    }

    /// A call to `source` succeeded at `now` (a listing, a read of changes, a status reply):
    /// the observation is fresh even when it found nothing to append.
    pub fn observed_ok(&self, source: Source, now: Millis) {
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        m.last_ok[source_index(source)] = Some(now);
    }

    /// Records how many outcomes the backend does not hold yet, and since when the oldest.
    pub fn undelivered(&self, count: usize, oldest: Option<Millis>) {
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        m.undelivered = (count, oldest);
        self.undelivered.set(count as i64);
    }

    /// Records where the sessions are: rows in memory, pairs on disk, pairs brought back.
    pub fn residency(&self, in_memory: usize, on_disk: u64, brought_back: u64) {
        self.sessions_in_memory.set(in_memory as i64);
        self.pairs_on_disk.set(on_disk as i64);
        self.pairs_brought_back.set(brought_back as i64);
    }

    /// The Prometheus text exposition, as of `now`.
    pub fn metrics(&self, now: Millis) -> String {
        {
            let m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
            for source in [Source::Agent, Source::Backend] {
                let since = m.last_ok[source_index(source)].or(m.started_at);
                let lag = since.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
                self.observation_lag
                    .get_or_create(&SourceLabel {
                        source: source.to_string(),
                    })
                    .set(lag);
            }
            let oldest = m
                .oldest_waiting
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            self.oldest_queued.set(oldest);
            let oldest = m
                .undelivered
                .1
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            self.oldest_undelivered.set(oldest);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// `Ok` when Ready and not stuck; otherwise why not, in one line.
    pub fn readiness(&self, now: Millis, policy: &StuckPolicy) -> Result<(), String> {
        let m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        match m.state {
            Some(Lifecycle::Ready) => {}
            Some(s) => return Err(format!("not ready: {}", s.name())),
            None => return Err("not ready: starting".into()),
        }
        if let Some(t) = m.oldest_waiting {
            let waited = now.saturating_sub(t);
            if waited > policy.oldest_queued_ms {
                return Err(format!(
                    "stuck: the oldest queued command has waited {} s",
                    waited / 1000
                ));
            }
        }
        if let (count, Some(t)) = m.undelivered {
            let waited = now.saturating_sub(t);
            if waited > policy.undelivered_ms {
                return Err(format!(
                    "stuck: {count} answers or failures not delivered to the backend, the oldest for {} s",
                    waited / 1000
                ));
            }
        }
        for source in [Source::Agent, Source::Backend] {
            let since = m.last_ok[source_index(source)].or(m.started_at);
            if let Some(t) = since {
                let quiet = now.saturating_sub(t);
                if quiet > policy.observation_ms {
                    return Err(format!(
                        "stuck: no successful {source} observation for {} s",
                        quiet / 1000
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_wants_ready_and_fresh_observations_and_no_old_queue() {
        let s = WorkerStatus::new();
        let p = StuckPolicy::default();
        assert_eq!(s.readiness(0, &p).unwrap_err(), "not ready: starting");
        s.set_state(Lifecycle::Observing, 1_000);
        assert!(s.readiness(1_000, &p).is_err());
        s.set_state(Lifecycle::Ready, 2_000);
        assert_eq!(s.readiness(2_000, &p), Ok(()));
        let err = s.readiness(1_000 + p.observation_ms + 1, &p).unwrap_err();
        assert!(err.contains("no successful agent observation"), "{err}");
        s.dispatch(&DispatchStats::default(), 1, 0, Some(2_000));
        let err = s.readiness(2_000 + p.oldest_queued_ms + 1, &p).unwrap_err();
        assert!(err.contains("oldest queued"), "{err}");
        s.dispatch(&DispatchStats::default(), 0, 0, None);
        s.undelivered(2, Some(2_000));
        let err = s.readiness(2_000 + p.undelivered_ms + 1, &p).unwrap_err();
        assert!(err.contains("2 answers or failures not delivered"), "{err}");
        assert!(s
            .metrics(3_000)
            .contains("agentsync_undelivered_outcomes 2"));
        s.undelivered(0, None);
        s.dispatch(&DispatchStats::default(), 1, 0, Some(2_000));
        let text = s.metrics(3_000);
        assert!(
            text.contains("agentsync_lifecycle_state{state=\"ready\"} 1"),
            "{text}"
        );
        assert!(text.contains("agentsync_queue_depth 1"), "{text}");
    }
}
