//! A circuit breaker per target: after repeated retryable failures the target is left alone for
//! a while, then probed by a single command, so a dead server is probed, not stormed.

use crate::clock::Millis;

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive retryable failures that open it.
    pub failures: u32,
    /// How long it first stays open.
    pub open_ms: Millis,
    /// The longest it stays open (each failed probe doubles the wait up to this).
    pub max_open_ms: Millis,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 3,
            open_ms: 2_000,
            max_open_ms: 30_000,
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// No calls until `until`; the next wait will be `next_ms`.
    Open {
        /// When a probe may go.
        until: Millis,
        /// The wait after a failed probe.
        next_ms: Millis,
    },
    /// One probe is out; nothing else goes until it returns.
    Probing {
        /// The wait if the probe fails.
        next_ms: Millis,
    },
}

/// One target's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    failures: u32,
    state: BreakerState,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            state: BreakerState::Closed,
        }
    }

    /// Its state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may start now (without starting it).
    pub fn allows(&self, now: Millis) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until, .. } => now >= until,
            BreakerState::Probing { .. } => false,
        }
    }

    /// A call started: when the breaker was open, this call is the probe.
    pub fn on_start(&mut self, now: Millis) {
        if let BreakerState::Open { until, next_ms } = self.state {
            if now >= until {
                self.state = BreakerState::Probing { next_ms };
            }
        }
    }

    /// When it will let a probe through, if it is open.
    pub fn reopens_at(&self) -> Option<Millis> {
        match self.state {
            BreakerState::Open { until, .. } => Some(until),
            _ => None,
        }
    }

    /// A call to the target succeeded.
    pub fn on_success(&mut self) {
        self.failures = 0;
        self.state = BreakerState::Closed;
    }

    /// A retryable failure. Returns whether the breaker is open after it: the failure is then
    /// the target's (it is down), not the command's.
    pub fn on_failure(&mut self, now: Millis) -> bool {
        self.failures += 1;
        match self.state {
            BreakerState::Closed if self.failures >= self.policy.failures => {
                self.state = BreakerState::Open {
                    until: now + self.policy.open_ms,
                    next_ms: (self.policy.open_ms * 2).min(self.policy.max_open_ms),
                };
            }
            BreakerState::Probing { next_ms } => {
                self.state = BreakerState::Open {
                    until: now + next_ms,
                    next_ms: (next_ms * 2).min(self.policy.max_open_ms),
                };
            }
            _ => {}
        }
        matches!(self.state, BreakerState::Open { .. })
    }

    /// A started call ended without proving the target up or down (cancelled, or a terminal
    /// error): a probe may go again, and nothing closes.
    pub fn on_abandoned(&mut self, now: Millis) {
        if let BreakerState::Probing { next_ms } = self.state {
            self.state = BreakerState::Open {
                until: now,
                next_ms,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_probes_once_and_backs_off() {
        let mut b = Breaker::new(BreakerPolicy {
            failures: 3,
            open_ms: 1_000,
            max_open_ms: 3_000,
        });
        for t in 0..2 {
            b.on_failure(t);
            assert!(b.allows(t));
        }
        b.on_failure(10);
        assert!(!b.allows(10), "open after 3 failures");
        assert!(!b.allows(1_009));
        assert!(b.allows(1_010), "probe allowed when the wait is over");
        b.on_start(1_010);
        assert!(!b.allows(1_011), "only one probe at a time");
        b.on_failure(1_100);
        assert_eq!(b.reopens_at(), Some(3_100), "the wait doubled");
        b.on_start(3_100);
        b.on_failure(3_200);
        assert_eq!(b.reopens_at(), Some(6_200), "capped at max_open_ms");
        b.on_start(6_200);
        b.on_success();
        assert!(b.allows(6_201));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut b = Breaker::new(BreakerPolicy::default());
        for t in 0..2 {
            b.on_failure(t);
        }
        b.on_success();
        for t in 0..2 {
            b.on_failure(t);
        }
        assert!(b.allows(5));
    }
}
