//! Supervision of a spawned agent server: restart it when it dies, a bounded number of times,
//! with a growing wait, then give up loudly. The policy is pure ([`RestartState`]); the loop
//! ([`supervise`]) runs any [`Launcher`], so it is tested with a fake process and used with
//! `opencode serve`.

use std::time::Duration;

use futures_core::future::BoxFuture;
use tokio::sync::mpsc;

use crate::clock::{Clock, Millis};
use crate::events::{AgentServerExited, AgentServerGaveUp, AgentServerStarted, Event};

/// How many restarts, how far apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Consecutive restarts before giving up.
    pub max_restarts: u32,
    /// The wait before each consecutive restart (the last repeats).
    pub backoff_ms: Vec<Millis>,
    /// A server that stayed up this long resets the count.
    pub healthy_reset_ms: Millis,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            backoff_ms: vec![1_000, 2_000, 4_000],
            healthy_reset_ms: 60_000,
        }
    }
}

/// What to do after the server exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this wait; this is consecutive restart number `restart`.
    Restart {
        /// The wait.
        after_ms: Millis,
        /// Which consecutive restart, from 1.
        restart: u32,
    },
    /// Stop trying.
    GiveUp {
        /// Consecutive restarts made.
        restarts: u32,
    },
}

/// The restart policy's memory.
#[derive(Debug, Clone)]
pub struct RestartState {
    policy: RestartPolicy,
    consecutive: u32,
    started_at: Option<Millis>,
}

impl RestartState {
    /// Nothing started yet.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            consecutive: 0,
            started_at: None,
        }
    }

    /// The server is up.
    pub fn started(&mut self, now: Millis) {
        self.started_at = Some(now);
    }

    /// The server exited (or failed to start) at `now`.
    pub fn exited(&mut self, now: Millis) -> Decision {
        if let Some(at) = self.started_at.take() {
            if now.saturating_sub(at) >= self.policy.healthy_reset_ms {
                self.consecutive = 0;
            }
        }
        if self.consecutive >= self.policy.max_restarts {
            return Decision::GiveUp {
                restarts: self.consecutive,
            };
        }
        let i = (self.consecutive as usize).min(self.policy.backoff_ms.len().saturating_sub(1));
        let after_ms = self.policy.backoff_ms.get(i).copied().unwrap_or(0);
        self.consecutive += 1;
        Decision::Restart {
            after_ms,
            restart: self.consecutive,
        }
    }
}

/// How a server process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitStatus {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
}

/// A running server.
pub trait RunningServer: Send {
    /// The URL it listens on.
    fn url(&self) -> &str;
    /// Its process id.
    fn pid(&self) -> Option<u32>;
    /// Waits until it exits.
    fn wait(&mut self) -> BoxFuture<'_, ExitStatus>;
    /// Stops it (gracefully, then forcibly) and waits for it.
    fn stop(&mut self) -> BoxFuture<'_, ExitStatus>;
}

/// Starts servers.
pub trait Launcher: Send + Sync {
    /// Starts one and waits until it is healthy.
    fn launch(&self) -> BoxFuture<'_, Result<Box<dyn RunningServer>, String>>;
}

/// Why supervision ended without a shutdown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent server gave up after {restarts} consecutive restarts: {error}")]
pub struct GaveUp {
    /// Consecutive restarts made.
    pub restarts: u32,
    /// The last error.
    pub error: String,
}

/// Keeps a server running until `shutdown` fires (then stops it and returns `Ok`), or until the
/// policy gives up (returns the error, after sending `agent_server_gave_up`). Lifecycle events
/// go to `events`; the generation counts from `first_generation`.
pub async fn supervise(
    launcher: &dyn Launcher,
    policy: RestartPolicy,
    clock: &dyn Clock,
    first_generation: u64,
    events: mpsc::Sender<Event>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), GaveUp> {
    let mut state = RestartState::new(policy);
    let mut generation = first_generation;
    loop {
        let error = match launcher.launch().await {
            Ok(mut server) => {
                state.started(clock.now_ms());
                let started = AgentServerStarted {
                    generation,
                    url: server.url().to_owned(),
                    pid: server.pid(),
                };
                tracing::info!(generation, url = server.url(), "agent server started");
                let _ = events.send(Event::AgentServerStarted(started)).await;
                let status = tokio::select! {
                    status = server.wait() => status,
                    () = stopped(&mut shutdown) => {
                        let status = server.stop().await;
                        let exited = exited(generation, status);
                        let _ = events.send(exited).await;
                        return Ok(());
                    }
                };
                tracing::warn!(generation, code = ?status.code, signal = ?status.signal, "agent server exited");
                let _ = events.send(exited(generation, status)).await;
                format!(
                    "exited with code {:?}, signal {:?}",
                    status.code, status.signal
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent server failed to start");
                e
            }
        };
        match state.exited(clock.now_ms()) {
            Decision::GiveUp { restarts } => {
                tracing::error!(restarts, error = %error, "giving up on the agent server");
                let gave_up = AgentServerGaveUp {
                    restarts,
                    error: error.clone(),
                };
                let _ = events.send(Event::AgentServerGaveUp(gave_up)).await;
                return Err(GaveUp { restarts, error });
            }
            Decision::Restart { after_ms, restart } => {
                tracing::info!(restart, after_ms, "restarting the agent server");
                generation += 1;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(after_ms)) => {}
                    () = stopped(&mut shutdown) => return Ok(()),
                }
            }
        }
    }
}

/// Resolves once shutdown is asked for (or its sender is gone). The borrow `wait_for` returns is
/// dropped here, inside, so that `supervise` stays `Send` and can be spawned.
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn exited(generation: u64, status: ExitStatus) -> Event {
    Event::AgentServerExited(AgentServerExited {
        generation,
        code: status.code,
        signal: status.signal,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn three_restarts_at_one_two_four_seconds_then_give_up_and_a_healthy_hour_resets() {
        let mut s = RestartState::new(RestartPolicy::default());
        s.started(0);
        let waits: Vec<Decision> = (0..4).map(|i| s.exited(i)).collect();
        assert_eq!(
            waits,
            [
                Decision::Restart {
                    after_ms: 1_000,
                    restart: 1
                },
                Decision::Restart {
                    after_ms: 2_000,
                    restart: 2
                },
                Decision::Restart {
                    after_ms: 4_000,
                    restart: 3
                },
                Decision::GiveUp { restarts: 3 },
            ]
        );
        let mut s = RestartState::new(RestartPolicy::default());
        for _ in 0..3 {
            s.started(0);
            s.exited(10);
        }
        s.started(100);
        assert_eq!(
            s.exited(100 + 60_000),
            Decision::Restart {
                after_ms: 1_000,
                restart: 1
            },
            "60 s healthy resets the count"
        );
    }

    /// A fake server process that lives for a scripted time.
    struct FakeServer {
        lifetime: Duration,
        stopped: Arc<AtomicU32>,
    }

    impl RunningServer for FakeServer {
        fn url(&self) -> &str {
            "http://127.0.0.1:4096"
        }
        fn pid(&self) -> Option<u32> {
            Some(4242)
        }
        fn wait(&mut self) -> BoxFuture<'_, ExitStatus> {
            let lifetime = self.lifetime;
            Box::pin(async move {
                tokio::time::sleep(lifetime).await;
                ExitStatus {
                    code: None,
                    signal: Some(9),
                }
            })
        }
        fn stop(&mut self) -> BoxFuture<'_, ExitStatus> {
            self.stopped.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                ExitStatus {
                    code: Some(0),
                    signal: None,
                }
            })
        }
    }

    struct FakeLauncher {
        lifetimes: Mutex<Vec<Duration>>,
        launched_at: Mutex<Vec<tokio::time::Instant>>,
        stopped: Arc<AtomicU32>,
    }

    impl Launcher for FakeLauncher {
        fn launch(&self) -> BoxFuture<'_, Result<Box<dyn RunningServer>, String>> {
            Box::pin(async move {
                self.launched_at
                    .lock()
                    .unwrap()
                    .push(tokio::time::Instant::now());
                let lifetime = {
                    let mut l = self.lifetimes.lock().unwrap();
                    if l.is_empty() {
                        Duration::from_secs(3_600)
                    } else {
                        l.remove(0)
                    }
                };
                Ok(Box::new(FakeServer {
                    lifetime,
                    stopped: self.stopped.clone(),
                }) as Box<dyn RunningServer>)
            })
        }
    }

    /// The tokio clock as milliseconds (paused in these tests).
    struct TokioMs(tokio::time::Instant);
    impl Clock for TokioMs {
        fn now_ms(&self) -> Millis {
            self.0.elapsed().as_millis() as Millis
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashing_server_is_restarted_three_times_then_given_up_on() {
        let launcher = FakeLauncher {
            lifetimes: Mutex::new(vec![Duration::from_millis(100); 10]),
            launched_at: Mutex::new(Vec::new()),
            stopped: Arc::new(AtomicU32::new(0)),
        };
        let (tx, mut rx) = mpsc::channel(64);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let clock = TokioMs(tokio::time::Instant::now());
        let result = supervise(&launcher, RestartPolicy::default(), &clock, 1, tx, stop).await;
        assert_eq!(result.as_ref().map_err(|e| e.restarts), Err(3));
        let launches = launcher.launched_at.lock().unwrap().clone();
        let gaps: Vec<u128> = launches
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(
            gaps,
            [1_100, 2_100, 4_100],
            "100 ms up, then 1 s, 2 s, 4 s down"
        );
        let mut kinds = Vec::new();
        while let Ok(e) = rx.try_recv() {
            kinds.push(e.kind().name());
        }
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == "agent_server_started")
                .count(),
            4
        );
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == "agent_server_exited")
                .count(),
            4
        );
        assert_eq!(kinds.last(), Some(&"agent_server_gave_up"));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_server() {
        let launcher = FakeLauncher {
            lifetimes: Mutex::new(Vec::new()),
            launched_at: Mutex::new(Vec::new()),
            stopped: Arc::new(AtomicU32::new(0)),
        };
        let (tx, _rx) = mpsc::channel(64);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let clock = TokioMs(tokio::time::Instant::now());
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop_tx.send(true).unwrap();
        });
        supervise(&launcher, RestartPolicy::default(), &clock, 1, tx, stop)
            .await
            .expect("clean shutdown");
        stopper.await.unwrap();
        assert_eq!(launcher.stopped.load(Ordering::SeqCst), 1);
    }
}
