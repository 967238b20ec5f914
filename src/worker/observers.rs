//! The observers: one task per source, never two, polling adaptively and handing what they see
//! to the controller, which turns it into events (`crate::observe`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::clock::Millis;
use crate::dispatch::Gates;
use crate::events::{AgentSessionStatus, ChatSessionInfo, Event, MessageInfo};
use crate::ports::{
    AgentListing, AgentObservation, AgentServer, Backend, Page, PortError, PortFuture,
};

/// How often a source is polled: fast while there is work, backing off while idle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollPolicy {
    /// The interval while any session is busy, a message is pending or work is queued.
    pub active_ms: Millis,
    /// The longest interval while idle.
    pub idle_max_ms: Millis,
    /// Each idle poll multiplies the interval by this.
    pub backoff: f64,
    /// +/- this fraction of jitter on every interval.
    pub jitter: f64,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self {
            active_ms: 2_000,
            idle_max_ms: 30_000,
            backoff: 1.5,
            jitter: 0.1,
        }
    }
}

/// The adaptive interval of one source. Pure: `next` is given whether the system is active.
#[derive(Debug, Clone)]
pub struct Poller {
    policy: PollPolicy,
    current_ms: f64,
}

impl Poller {
    /// Starts at the active interval.
    pub fn new(policy: PollPolicy) -> Self {
        Self {
            policy,
            current_ms: policy.active_ms as f64,
        }
    }

    /// The wait before the next poll: the active interval while active, otherwise the last
    /// wait times the backoff up to the idle maximum; then +/- jitter.
    pub fn next(&mut self, active: bool, rng: &mut impl Rng) -> Millis {
        let p = self.policy;
        self.current_ms = if active {
            p.active_ms as f64
        } else {
            (self.current_ms * p.backoff).min(p.idle_max_ms as f64)
        };
        let jitter = if p.jitter > 0.0 {
            rng.random_range(-p.jitter..=p.jitter)
        } else {
            0.0
        };
        (self.current_ms * (1.0 + jitter)).max(1.0) as Millis
    }
}

/// What an observer saw.
#[derive(Debug)]
pub enum Observation {
    /// A listing of the agent server, started when the log was at `as_of`.
    AgentSessions {
        /// The log's last seq when the listing started.
        as_of: u64,
        /// The listing, or why it failed.
        result: Result<AgentListing, PortError>,
    },
    /// The agent sessions that are not idle, read when the log was at `as_of`.
    AgentStatus {
        /// The log's last seq when the call started.
        as_of: u64,
        /// The statuses, or why the call failed.
        result: Result<Vec<AgentSessionStatus>, PortError>,
    },
    /// Every page of the backend's sessions, started when the log was at `as_of`.
    BackendSessions {
        /// The log's last seq when the listing started.
        as_of: u64,
        /// The sessions of the pages that came.
        sessions: Vec<ChatSessionInfo>,
        /// Why the listing stopped early, if it did: the listing is then partial.
        error: Option<PortError>,
    },
    /// The backend messages changed since the last poll: those of the pages that came, and
    /// why the listing stopped early, if it did (the rest is read next time).
    BackendMessages {
        /// The messages read.
        messages: Vec<MessageInfo>,
        /// The failure that cut the listing short.
        error: Option<PortError>,
    },
    /// What the agent server's event stream reported.
    AgentStream(AgentObservation),
    /// An event from outside the loop (the agent server's supervisor), appended as it is.
    Lifecycle(Event),
}

/// What the observers share with the controller.
#[derive(Debug, Clone)]
pub struct ObserverLink {
    /// Where observations go.
    pub tx: mpsc::Sender<Observation>,
    /// The log's last seq, published by the controller.
    pub seq: Arc<AtomicU64>,
    /// Whether anything is going on (poll fast) or not (back off).
    pub active: Arc<AtomicBool>,
    /// Poll the backend now (the worker just sent a prompt).
    pub nudge_backend: Arc<Notify>,
    /// List the agent server now (its event stream reconnected: events may have been missed).
    pub nudge_agent: Arc<Notify>,
    /// The per-target gates.
    pub gates: Gates,
    /// The polling policy.
    pub policy: PollPolicy,
    /// Backend page size.
    pub page_size: u32,
    /// Seed of the polling jitter.
    pub seed: u64,
}

/// Observes the agent server until the channel closes.
pub async fn observe_agent(agent: Arc<dyn AgentServer>, link: ObserverLink) {
    let mut poller = Poller::new(link.policy);
    let mut rng = SmallRng::seed_from_u64(link.seed);
    loop {
        let as_of = link.seq.load(Ordering::SeqCst);
        let result = {
            let Ok(_permit) = link.gates.agent.acquire().await else {
                return;
            };
            agent.list_sessions(None).await
        };
        if link
            .tx
            .send(Observation::AgentSessions { as_of, result })
            .await
            .is_err()
        {
            return;
        }
        let as_of = link.seq.load(Ordering::SeqCst);
        let result = {
            let Ok(_permit) = link.gates.agent.acquire().await else {
                return;
            };
            agent.status().await
        };
        if link
            .tx
            .send(Observation::AgentStatus { as_of, result })
            .await
            .is_err()
        {
            return;
        }
        pause(&mut poller, &mut rng, &link, &link.nudge_agent).await;
    }
}

/// Waits the poller's next interval, or less if `nudge` fires.
async fn pause(poller: &mut Poller, rng: &mut SmallRng, link: &ObserverLink, nudge: &Notify) {
    let wait = poller.next(link.active.load(Ordering::SeqCst), rng);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        _ = nudge.notified() => {}
    }
}

/// Reads pages from `cursor` until the last one or a failure, each call under a permit of
/// `gate`. Returns the items, the cursor after the last page read, and the failure if one
/// stopped it; `None` when the gate is closed (shutting down).
async fn read_pages<'a, T, F>(
    gate: &Semaphore,
    mut cursor: Option<String>,
    mut page: F,
) -> Option<(Vec<T>, Option<String>, Option<PortError>)>
where
    F: FnMut(Option<String>) -> PortFuture<'a, Page<T>>,
{
    let mut items = Vec::new();
    loop {
        let result = {
            let _permit = gate.acquire().await.ok()?;
            page(cursor.clone()).await
        };
        match result {
            Ok(p) => {
                items.extend(p.page);
                cursor = Some(p.continue_cursor);
                if p.is_done {
                    return Some((items, cursor, None));
                }
            }
            Err(e) => return Some((items, cursor, Some(e))),
        }
    }
}

/// Observes the backend until the channel closes: every page of the sessions, then the
/// messages changed since the last cursor.
pub async fn observe_backend(backend: Arc<dyn Backend>, link: ObserverLink) {
    let mut poller = Poller::new(link.policy);
    let mut rng = SmallRng::seed_from_u64(link.seed ^ 0xb4c);
    let mut message_cursor: Option<String> = None;
    let limit = link.page_size;
    loop {
        let as_of = link.seq.load(Ordering::SeqCst);
        let gate = &link.gates.backend;
        let Some((sessions, _, error)) = read_pages(gate, None, |c| {
            let b = &backend;
            Box::pin(async move { b.list_sessions(c.as_deref(), limit).await })
        })
        .await
        else {
            return;
        };
        let obs = Observation::BackendSessions {
            as_of,
            sessions,
            error,
        };
        if link.tx.send(obs).await.is_err() {
            return;
        }
        let Some((messages, cursor, failure)) = read_pages(gate, message_cursor.take(), |c| {
            let b = &backend;
            Box::pin(async move { b.list_messages(c.as_deref(), limit).await })
        })
        .await
        else {
            return;
        };
        // The pages before a failure are real; the rest is read from this cursor next time.
        message_cursor = cursor;
        let obs = Observation::BackendMessages {
            messages,
            error: failure,
        };
        if link.tx.send(obs).await.is_err() {
            return;
        }
        pause(&mut poller, &mut rng, &link, &link.nudge_backend).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_is_fast_while_active_and_backs_off_to_the_cap_while_idle() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut p = Poller::new(PollPolicy::default());
        let active = p.next(true, &mut rng);
        assert!((1_800..=2_200).contains(&active), "{active}");
        let idle: Vec<Millis> = (0..12).map(|_| p.next(false, &mut rng)).collect();
        assert!((2_700..=3_300).contains(&idle[0]), "x1.5: {idle:?}");
        assert!(idle.windows(2).take(5).all(|w| w[1] > w[0]), "{idle:?}");
        assert!(
            idle[11] >= 27_000 && idle[11] <= 33_000,
            "capped at 30 s: {idle:?}"
        );
        assert!(
            (1_800..=2_200).contains(&p.next(true, &mut rng)),
            "back to fast at once"
        );
    }
}
