//! In-process simulations of the two sides, with injectable faults: what the tests, the
//! property tests, `agentsync demo` and `agentsync-bench storm` run the worker against.
//!
//! They implement the same ports as the real adapters and keep the same promises (the backend
//! applies each `commandId` at most once), and they count what matters for the incidents:
//! calls by operation, calls in flight and their peak, model-list fetches, and how many times
//! each backend effect was applied. Latency is `tokio::time::sleep`, so a test with a paused
//! clock runs hours of simulated time in milliseconds.

pub mod adversary;
mod agent;
mod backend;
pub mod convex;
pub mod incident;
pub mod model;
pub mod opencode;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub use agent::SimAgent;
pub use backend::{user_message, SimBackend};

use crate::clock::{Clock, Millis};
use crate::ports::PortError;

/// Calls in flight at a fake server, and the most at once: what the incidents' "100 operations
/// at once" is checked against.
#[derive(Debug, Default)]
pub struct InFlightGauge {
    now: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

/// One call counted in flight until dropped (also when the caller hangs up mid-call).
#[derive(Debug)]
pub struct InFlightCall<'a>(&'a InFlightGauge);

impl InFlightGauge {
    /// Counts a call in; returns it with the number in flight, itself included.
    pub fn enter(&self) -> (InFlightCall<'_>, usize) {
        use std::sync::atomic::Ordering;
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        (InFlightCall(self), now)
    }

    /// The most calls in flight at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for InFlightCall<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Faults to inject into one side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Each call takes a uniform time in this range (ms).
    pub latency_ms: (Millis, Millis),
    /// The model listing takes this long (ms) on top (the incident's slow `opencode models`).
    pub model_list_ms: Millis,
    /// Probability that a call fails with a retryable error.
    pub error_rate: f64,
    /// Windows (clock ms, start inclusive, end exclusive) during which every call is refused.
    pub outages: Vec<(Millis, Millis)>,
    /// Which session listings fail (1 = the first listing).
    pub failed_listings: Vec<u32>,
    /// Which session listings come back partial (1 = the first listing).
    pub partial_listings: Vec<u32>,
    /// Probability that a call that changes something (a creation, a rename, a deletion, a
    /// prompt, a mutation) is applied and then its reply is lost.
    pub lost_reply_rate: f64,
    /// Probability that such a call is applied and then answered only `late_reply_ms` later:
    /// past the caller's timeout, so the caller gives up on a call that took effect.
    pub late_reply_rate: f64,
    /// How late a late reply comes (ms).
    pub late_reply_ms: Millis,
    /// Probability that a read (a session listing, a page, the statuses) is taken and then
    /// held back before it is answered: it arrives after changes it does not show.
    pub stale_read_rate: f64,
    /// How long a held-back read waits, at most (ms; uniform from 0).
    pub stale_read_ms: Millis,
    /// Agent only: how long the model works on a prompt (ms, uniform range).
    pub model_run_ms: (Millis, Millis),
    /// Seed of the fault dice.
    pub seed: u64,
}

/// What a simulated side has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls by operation.
    pub calls: BTreeMap<&'static str, u64>,
    /// Calls in flight now.
    pub in_flight: usize,
    /// The most calls in flight at once.
    pub peak_in_flight: usize,
    /// Calls refused by an outage or failed by the dice.
    pub injected_failures: u64,
}

/// The shared machinery of both fakes: the clock, the dice and the counters.
struct Harness {
    clock: Arc<dyn Clock>,
    faults: Mutex<Faults>,
    rng: Mutex<SmallRng>,
    stats: Mutex<CallStats>,
}

/// Decrements the in-flight count when a call ends, however it ends (a dropped future too).
struct InFlight<'a>(&'a Mutex<CallStats>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("stats").in_flight -= 1;
    }
}

impl Harness {
    fn new(clock: Arc<dyn Clock>, faults: Faults) -> Self {
        Self {
            rng: Mutex::new(SmallRng::seed_from_u64(faults.seed)),
            clock,
            faults: Mutex::new(faults),
            stats: Mutex::new(CallStats::default()),
        }
    }

    /// Enters a call: counts it, waits its latency, and decides whether it fails.
    async fn call(&self, op: &'static str, extra_ms: Millis) -> Result<InFlight<'_>, PortError> {
        {
            let mut s = self.stats.lock().expect("stats");
            *s.calls.entry(op).or_default() += 1;
            s.in_flight += 1;
            s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
        }
        let guard = InFlight(&self.stats);
        // A server that is down refuses at once.
        if self.in_outage() {
            self.stats.lock().expect("stats").injected_failures += 1;
            return Err(PortError::retryable(format!("{op}: connection refused")));
        }
        let (latency, fail) = {
            let f = self.faults.lock().expect("faults");
            let mut rng = self.rng.lock().expect("rng");
            let (lo, hi) = f.latency_ms;
            let latency = if hi > lo {
                rng.random_range(lo..=hi)
            } else {
                lo
            };
            let fail = f.error_rate > 0.0 && rng.random_bool(f.error_rate.min(1.0));
            (latency + extra_ms, fail)
        };
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if self.in_outage() {
            self.stats.lock().expect("stats").injected_failures += 1;
            return Err(PortError::retryable(format!("{op}: connection reset")));
        }
        if fail {
            self.stats.lock().expect("stats").injected_failures += 1;
            return Err(PortError::retryable(format!(
                "{op}: 503 service unavailable"
            )));
        }
        Ok(guard)
    }

    fn in_outage(&self) -> bool {
        let now = self.clock.now_ms();
        let f = self.faults.lock().expect("faults");
        f.outages.iter().any(|&(from, to)| now >= from && now < to)
    }

    fn roll(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().expect("rng").random_bool(p.min(1.0))
    }

    /// A uniform draw in `lo..=hi` from the fault dice.
    fn pick(&self, (lo, hi): (Millis, Millis)) -> Millis {
        if hi > lo {
            self.rng.lock().expect("rng").random_range(lo..=hi)
        } else {
            lo
        }
    }

    /// After a call took effect: its reply may be lost (`lost_reply_rate`) or come late
    /// (`late_reply_rate`, past the caller's timeout).
    async fn reply(&self, op: &str) -> Result<(), PortError> {
        let f = self.faults();
        if self.roll(f.lost_reply_rate) {
            return Err(PortError::retryable(format!(
                "{op}: connection reset after the server applied it"
            )));
        }
        if self.roll(f.late_reply_rate) {
            tokio::time::sleep(Duration::from_millis(f.late_reply_ms)).await;
        }
        Ok(())
    }

    /// After a read was taken: it may be held back (`stale_read_rate`) before it is answered.
    async fn hold_back(&self) {
        let f = self.faults();
        if self.roll(f.stale_read_rate) {
            let ms = self.pick((0, f.stale_read_ms));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    fn faults(&self) -> Faults {
        self.faults.lock().expect("faults").clone()
    }

    fn stats(&self) -> CallStats {
        self.stats.lock().expect("stats").clone()
    }
}
