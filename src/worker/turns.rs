//! How long the worker's turns take: what an on-call engineer asks first when a worker falls
//! behind ("is a turn slow, or are there too many?"), and what the soak benchmark checks stays
//! flat as history grows.
//!
//! A turn is one pass of the control loop: the input it handles (an observation turned into
//! events, a finished call), the fold of those events, the reconcile of the dirty keys and the
//! dispatcher's selection. It is timed on the real clock, not the injected one (it is CPU the
//! worker spends, which a paused simulation clock would read as zero), and without the time
//! spent waiting for blocking work (appends, checkpoint writes), which is disk, not turn work.
//!
//! The durations go in an HdrHistogram (`hdrhistogram`): fixed memory whatever the number of
//! turns, and quantiles within 1 % (two significant digits).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The longest turn recorded exactly: one minute, in microseconds (longer ones are clamped).
const LONGEST_US: u64 = 60_000_000;

/// A summary of the turns of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TurnSummary {
    /// How many turns were timed.
    pub count: u64,
    /// The median turn, µs.
    pub p50_us: u64,
    /// The 99th percentile turn, µs.
    pub p99_us: u64,
    /// The longest turn, µs.
    pub max_us: u64,
}

/// The turn timer: `begin` when a turn starts, `exclude` the waits inside it, `end` when it
/// ends.
#[derive(Debug)]
pub struct TurnTimes {
    histogram: Histogram<u64>,
    started: Option<Instant>,
    waited: Duration,
}

impl Default for TurnTimes {
    fn default() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, LONGEST_US, 2).expect("valid bounds"),
            started: None,
            waited: Duration::ZERO,
        }
    }
}

impl TurnTimes {
    /// A turn starts now.
    pub fn begin(&mut self) {
        self.started = Some(Instant::now());
        self.waited = Duration::ZERO;
    }

    /// `d` of the current turn was spent waiting for blocking work: not the turn's own.
    pub fn exclude(&mut self, d: Duration) {
        self.waited += d;
    }

    /// The current turn ends now and is recorded.
    pub fn end(&mut self) {
        let Some(started) = self.started.take() else {
            return;
        };
        let own = started.elapsed().saturating_sub(self.waited);
        let us = u64::try_from(own.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us.clamp(1, LONGEST_US));
    }

    /// The turns so far.
    pub fn summary(&self) -> TurnSummary {
        let h = &self.histogram;
        TurnSummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_counts_its_own_time_not_its_waits() {
        let mut t = TurnTimes::default();
        t.begin();
        std::thread::sleep(Duration::from_millis(30));
        t.exclude(Duration::from_millis(25));
        t.end();
        let s = t.summary();
        assert_eq!(s.count, 1);
        // 30 ms slept, 25 of them excluded: at least 5 ms, and well under the 30 slept.
        assert!(s.max_us >= 5_000, "{s:?}");
        assert!(s.max_us < 25_000, "{s:?}");
    }

    #[test]
    fn the_p99_is_the_slow_tail_not_the_median() {
        let mut t = TurnTimes::default();
        // 20 slow turns in 1000: 2 %, so the 99th percentile falls among them.
        for us in (0..1000).map(|i| if i % 50 == 0 { 50_000 } else { 100 }) {
            t.histogram.record(us).unwrap();
        }
        let s = t.summary();
        assert_eq!(s.count, 1000);
        assert!((99..=101).contains(&s.p50_us), "{s:?}");
        assert!((49_500..=50_500).contains(&s.p99_us), "{s:?}");
        assert!((49_500..=50_500).contains(&s.max_us), "{s:?}");
    }

    #[test]
    fn an_end_without_a_begin_records_nothing() {
        let mut t = TurnTimes::default();
        t.end();
        assert_eq!(t.summary().count, 0);
    }
}
