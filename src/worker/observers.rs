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
use crate::events::{AgentSessionStatus, ChatSessionInfo, Event, MessageInfo, Source};
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
    /// How often each side is listed in full, in the background, as a safety net under the
    /// incremental reads (and the only observation that may prove a session gone). Default
    /// 10 minutes.
    pub full_listing_ms: Millis,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self {
            active_ms: 2_000,
            idle_max_ms: 30_000,
            backoff: 1.5,
            jitter: 0.1,
            full_listing_ms: 600_000,
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
        /// A full listing (`GET /session`), or the sessions updated since the feed's cursor.
        full: bool,
        /// The agent feed's cursor after it (the highest `updated_at` a complete listing has
        /// shown), when the listing was complete and the feed is covered by a complete listing.
        cursor: Option<Millis>,
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
    /// The backend's sessions, every page (`full`, from no cursor) or those changed since the
    /// feed's cursor, started when the log was at `as_of`.
    BackendSessions {
        /// The log's last seq when the listing started.
        as_of: u64,
        /// Whether it read from no cursor: a full listing, which may prove absence.
        full: bool,
        /// The sessions of the pages that came.
        sessions: Vec<ChatSessionInfo>,
        /// The cursor after the last page that came, if one did.
        cursor: Option<String>,
        /// Why the listing stopped early, if it did: the listing is then partial.
        error: Option<PortError>,
    },
    /// The backend messages changed since the last poll: those of the pages that came, and
    /// why the listing stopped early, if it did (the rest is read next time).
    BackendMessages {
        /// The messages read.
        messages: Vec<MessageInfo>,
        /// The cursor after the last page that came, if one did.
        cursor: Option<String>,
        /// The failure that cut the listing short.
        error: Option<PortError>,
    },
    /// What the agent server's event stream reported.
    AgentStream(AgentObservation),
    /// An event from outside the loop (the agent server's supervisor), appended as it is.
    Lifecycle(Event),
}

impl Observation {
    /// The side this observation called and whether the call succeeded, for the breakers:
    /// only a call that really succeeded closes one. A pushed stream event is no call (`None`),
    /// and a listing cut short by a failure failed, whatever pages came before it.
    pub fn call_outcome(&self) -> Option<(Source, bool)> {
        match self {
            Observation::AgentStream(_) | Observation::Lifecycle(_) => None,
            Observation::AgentSessions { result, .. } => Some((Source::Agent, result.is_ok())),
            Observation::AgentStatus { result, .. } => Some((Source::Agent, result.is_ok())),
            Observation::BackendSessions { error, .. } => Some((Source::Backend, error.is_none())),
            Observation::BackendMessages { error, .. } => Some((Source::Backend, error.is_none())),
        }
    }
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
    /// List the agent server in full at its next poll (a reconnect of its event stream, a new
    /// server, a deletion hold waiting for its confirmation, a simulation about to stop).
    pub full_agent: Arc<AtomicBool>,
    /// List the backend in full at its next poll.
    pub full_backend: Arc<AtomicBool>,
    /// Where the feeds stood in the log when the worker started.
    pub feeds: FeedCursors,
    /// The per-target gates.
    pub gates: Gates,
    /// The polling policy.
    pub policy: PollPolicy,
    /// Backend page size.
    pub page_size: u32,
    /// The most pages one backend listing reads.
    pub max_pages: u32,
    /// Seed of the polling jitter.
    pub seed: u64,
}

/// Where each feed's next incremental read starts, as the log has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedCursors {
    /// The agent feed's cursor (a complete listing's highest `updated_at`), if one was kept.
    pub agent: Option<Millis>,
    /// The backend sessions' change cursor.
    pub backend_sessions: Option<String>,
    /// The backend messages' change cursor.
    pub backend_messages: Option<String>,
}

pub use crate::projections::AGENT_SINCE_MARGIN_MS;

/// When a full listing is due: never listed in full by this observer (`last` is `None`; the
/// caller sets it at start when a cursor lets the first read be incremental), or the interval
/// passed since the last one.
fn full_due(last: Option<tokio::time::Instant>, every_ms: Millis) -> bool {
    last.is_none_or(|t| t.elapsed() >= Duration::from_millis(every_ms))
}

/// Observes the agent server until the channel closes: from its feed's cursor the sessions
/// updated since (`GET /session?start=T`), and in full when there is no cursor, when asked
/// (`full_agent`), every `full_listing_ms`, and once right after a start from a cursor: a
/// rename does not move OpenCode's `time.updated` (1.18.33), so renames made while no stream
/// was connected come only from a full listing.
pub async fn observe_agent(agent: Arc<dyn AgentServer>, link: ObserverLink) {
    let mut poller = Poller::new(link.policy);
    let mut rng = SmallRng::seed_from_u64(link.seed);
    let mut cursor = link.feeds.agent;
    let mut last_full = None;
    let mut first = true;
    loop {
        let as_of = link.seq.load(Ordering::SeqCst);
        let wanted = link.full_agent.swap(false, Ordering::SeqCst);
        let full = cursor.is_none()
            || wanted
            || (!first && full_due(last_full, link.policy.full_listing_ms));
        first = false;
        let since = cursor.filter(|_| !full);
        let result = {
            let Ok(_permit) = link.gates.agent.acquire().await else {
                return;
            };
            agent
                .list_sessions(since.map(|t| t.saturating_sub(AGENT_SINCE_MARGIN_MS)))
                .await
        };
        let mut read_to = None;
        match &result {
            Ok(l) if l.complete => {
                last_full = if full {
                    Some(tokio::time::Instant::now())
                } else {
                    last_full
                };
                let high = crate::observe::agent_high_water(l);
                cursor = cursor.max(high).or(Some(0));
                read_to = cursor;
            }
            // Cut short (a page limit): only a full listing can close the gap.
            Ok(_) => link.full_agent.store(true, Ordering::SeqCst),
            Err(_) if wanted => link.full_agent.store(true, Ordering::SeqCst),
            Err(_) => {}
        }
        let obs = Observation::AgentSessions {
            as_of,
            full,
            cursor: read_to,
            result,
        };
        if link.tx.send(obs).await.is_err() {
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

/// Reads the pages of listing `what` from `cursor` until the last one or a failure, each call
/// under a permit of `gate`. Returns the items, the cursor after the last page read, and the
/// failure if one stopped it; `None` when the gate is closed (shutting down).
///
/// The backend's answers are not trusted to end: a page that is not the last but gives back
/// the cursor it was asked with would be asked for again forever, and a cursor that moves but
/// never reaches the end would be followed forever. Both stop the listing with a failure (the
/// listing is then partial, a failed observation): the first at once, the second after
/// `max_pages` pages. Both are terminal (the backend would answer the same again), and the
/// pages read before are kept.
async fn read_pages<'a, T, F>(
    gate: &Semaphore,
    what: &str,
    mut cursor: Option<String>,
    max_pages: u32,
    mut page: F,
) -> Option<(Vec<T>, Option<String>, Option<PortError>)>
where
    F: FnMut(Option<String>) -> PortFuture<'a, Page<T>>,
{
    let mut items = Vec::new();
    for _ in 0..max_pages.max(1) {
        let result = {
            let _permit = gate.acquire().await.ok()?;
            page(cursor.clone()).await
        };
        match result {
            Ok(p) => {
                items.extend(p.page);
                if p.is_done {
                    return Some((items, Some(p.continue_cursor), None));
                }
                if cursor.as_deref() == Some(p.continue_cursor.as_str()) {
                    let e = PortError::terminal(format!(
                        "{what}: the backend answered isDone: false with the cursor it was asked with ({:?}): listing stopped",
                        p.continue_cursor
                    ));
                    return Some((items, cursor, Some(e)));
                }
                cursor = Some(p.continue_cursor);
            }
            Err(e) => return Some((items, cursor, Some(e))),
        }
    }
    let e = PortError::terminal(format!(
        "{what}: not done after {} pages ({} items): listing stopped (the most a listing reads: max_listing_pages)",
        max_pages.max(1),
        items.len()
    ));
    Some((items, cursor, Some(e)))
}

/// Observes the backend until the channel closes: the sessions changed since the feed's
/// cursor (every page from no cursor when there is none, when asked with `full_backend`, and
/// every `full_listing_ms`), then the messages changed since theirs.
pub async fn observe_backend(backend: Arc<dyn Backend>, link: ObserverLink) {
    let mut poller = Poller::new(link.policy);
    let mut rng = SmallRng::seed_from_u64(link.seed ^ 0xb4c);
    let mut sessions_cursor = link.feeds.backend_sessions.clone();
    let mut message_cursor = link.feeds.backend_messages.clone();
    // From a kept cursor the first read is incremental, and the safety net comes later.
    let mut last_full = sessions_cursor
        .as_ref()
        .map(|_| tokio::time::Instant::now());
    let limit = link.page_size;
    let max_pages = link.max_pages;
    loop {
        let as_of = link.seq.load(Ordering::SeqCst);
        let gate = &link.gates.backend;
        let wanted = link.full_backend.swap(false, Ordering::SeqCst);
        let full =
            sessions_cursor.is_none() || wanted || full_due(last_full, link.policy.full_listing_ms);
        let from = sessions_cursor.clone().filter(|_| !full);
        let Some((sessions, cursor, error)) =
            read_pages(gate, "listSessions", from, max_pages, |c| {
                let b = &backend;
                Box::pin(async move { b.list_sessions(c.as_deref(), limit).await })
            })
            .await
        else {
            return;
        };
        if full && error.is_none() {
            last_full = Some(tokio::time::Instant::now());
        } else if full && wanted {
            link.full_backend.store(true, Ordering::SeqCst);
        }
        // In change order, the pages before a failure are a valid place to read on from.
        if cursor.is_some() {
            sessions_cursor.clone_from(&cursor);
        }
        let obs = Observation::BackendSessions {
            as_of,
            full,
            sessions,
            cursor,
            error,
        };
        if link.tx.send(obs).await.is_err() {
            return;
        }
        let from = message_cursor.clone();
        let Some((messages, cursor, failure)) =
            read_pages(gate, "listMessages", from, max_pages, |c| {
                let b = &backend;
                Box::pin(async move { b.list_messages(c.as_deref(), limit).await })
            })
            .await
        else {
            return;
        };
        // The pages before a failure are real; the rest is read from this cursor next time.
        if cursor.is_some() {
            message_cursor.clone_from(&cursor);
        }
        let obs = Observation::BackendMessages {
            messages,
            cursor,
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
    use std::sync::atomic::AtomicU32;

    fn page(items: Vec<u32>, is_done: bool, cursor: &str) -> Page<u32> {
        Page {
            page: items,
            is_done,
            continue_cursor: cursor.into(),
        }
    }

    #[tokio::test]
    async fn a_backend_that_never_moves_its_cursor_is_stopped_with_an_error_naming_it() {
        let gate = Semaphore::new(1);
        let calls = AtomicU32::new(0);
        let (items, cursor, error) = read_pages(&gate, "listSessions", None, 1_000, |c| {
            calls.fetch_add(1, Ordering::SeqCst);
            // The first page moves to "c1"; then "c1" is answered with "c1" forever.
            let p = match c {
                None => page(vec![1, 2], false, "c1"),
                Some(_) => page(vec![3], false, "c1"),
            };
            Box::pin(async move { Ok(p) })
        })
        .await
        .unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "stopped at the first repeat"
        );
        assert_eq!(items, vec![1, 2, 3]);
        assert_eq!(cursor.as_deref(), Some("c1"));
        let e = error.expect("an error");
        assert!(!e.is_retryable());
        assert!(
            e.message.starts_with("listSessions: the backend answered isDone: false with the cursor it was asked with (\"c1\")"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_backend_whose_cursor_moves_but_never_ends_is_stopped_at_the_page_cap() {
        let gate = Semaphore::new(1);
        let calls = AtomicU32::new(0);
        let (items, cursor, error) = read_pages(&gate, "listMessages", None, 50, |_| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(page(vec![n], false, &format!("c{n}"))) })
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 50);
        assert_eq!(items.len(), 50, "the pages read are kept");
        assert_eq!(
            cursor.as_deref(),
            Some("c49"),
            "the next poll goes on from here"
        );
        let e = error.expect("an error");
        assert_eq!(
            e.message,
            "listMessages: not done after 50 pages (50 items): listing stopped (the most a listing reads: max_listing_pages)"
        );
    }

    #[tokio::test]
    async fn a_listing_that_ends_is_read_whole() {
        let gate = Semaphore::new(1);
        let (items, cursor, error) = read_pages(&gate, "listSessions", None, 3, |c| {
            let p = match c.as_deref() {
                None => page(vec![1], false, "a"),
                Some("a") => page(vec![2], false, "b"),
                _ => page(vec![3], true, "end"),
            };
            Box::pin(async move { Ok(p) })
        })
        .await
        .unwrap();
        assert_eq!(
            (items, cursor.as_deref(), error),
            (vec![1, 2, 3], Some("end"), None)
        );
    }

    #[test]
    fn only_calls_that_succeeded_witness_for_a_breaker() {
        let stream = Observation::AgentStream(AgentObservation::Connected { reconnected: true });
        assert_eq!(stream.call_outcome(), None, "a pushed event is no call");
        let partial = Observation::BackendMessages {
            messages: vec![],
            cursor: None,
            error: Some(PortError::retryable("page 3: 503")),
        };
        assert_eq!(partial.call_outcome(), Some((Source::Backend, false)));
        let whole = Observation::BackendMessages {
            messages: vec![],
            cursor: None,
            error: None,
        };
        assert_eq!(whole.call_outcome(), Some((Source::Backend, true)));
        let failed = Observation::AgentStatus {
            as_of: 0,
            result: Err(PortError::retryable("refused")),
        };
        assert_eq!(failed.call_outcome(), Some((Source::Agent, false)));
    }

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
