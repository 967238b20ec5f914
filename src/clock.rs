//! Injected time. The pure core never reads the system clock; it is handed a [`Clock`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the one time unit of events and policies.
pub type Millis = u64;

/// A source of the current time, injected so folds, the reconciler and tests are deterministic.
pub trait Clock: Send + Sync {
    /// The current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}

/// The wall clock read once, then moved by the monotonic clock: what a worker process runs on.
/// A step of the wall clock while it runs (NTP, an operator, a VM migration) does not move its
/// event times, so every wait and deadline measured between two events of one process (a
/// deletion hold's minute, a delivery round's backoff, a message's deadline) is a real
/// duration. Across processes the wall clock anchors it again; rules that compare times from an
/// earlier process allow for that (see `reconcile::Context::started_at`).
#[derive(Debug, Clone, Copy)]
pub struct SteadyClock {
    origin: std::time::Instant,
    wall: Millis,
}

impl SteadyClock {
    /// A clock reading the wall clock now.
    pub fn new() -> Self {
        Self::starting_at(SystemClock.now_ms())
    }

    /// A clock reading `wall` now.
    pub fn starting_at(wall: Millis) -> Self {
        Self {
            origin: std::time::Instant::now(),
            wall,
        }
    }
}

impl Default for SteadyClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SteadyClock {
    fn now_ms(&self) -> Millis {
        self.wall + self.origin.elapsed().as_millis() as Millis
    }
}

/// A clock that only moves when told to: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Millis) -> Self {
        Self(AtomicU64::new(start))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to `ms`.
    pub fn set(&self, ms: Millis) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Another clock plus an offset that can be stepped either way: a wall clock corrected by NTP
/// or set by hand while the process runs (the simulations step the worker's clock by minutes).
pub struct SteppedClock {
    inner: std::sync::Arc<dyn Clock>,
    offset_ms: std::sync::atomic::AtomicI64,
}

impl SteppedClock {
    /// Reads `inner`, not stepped yet.
    pub fn new(inner: std::sync::Arc<dyn Clock>) -> Self {
        Self {
            inner,
            offset_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Steps the clock by `delta_ms` (negative: back).
    pub fn step(&self, delta_ms: i64) {
        self.offset_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }

    /// How far it is stepped from the clock it reads.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }
}

impl Clock for SteppedClock {
    fn now_ms(&self) -> Millis {
        self.inner.now_ms().saturating_add_signed(self.offset_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stepped_clock_moves_both_ways_over_the_clock_it_reads() {
        let inner = std::sync::Arc::new(ManualClock::new(1_000_000));
        let clock = SteppedClock::new(inner.clone());
        clock.step(5 * 60_000);
        assert_eq!(clock.now_ms(), 1_300_000);
        clock.step(-7 * 60_000);
        inner.advance(10);
        assert_eq!(clock.now_ms(), 880_010);
        assert_eq!(clock.offset_ms(), -120_000);
    }

    #[test]
    fn a_steady_clock_starts_at_its_anchor_and_only_moves_forward() {
        let c = SteadyClock::starting_at(1_000);
        let a = c.now_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = c.now_ms();
        assert!((1_000..1_100).contains(&a), "{a}");
        assert!(b >= a + 5, "{a} -> {b}");
    }
}
