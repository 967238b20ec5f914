//! The world around the worker while it runs: people acting on both sides, the agent server
//! restarting, the wall clock stepped, and the agent's event stream, which delivers what the
//! simulated agent server did late, twice and out of order.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::scenario::{Scenario, StreamFaults, Timed, WorldAction, T0};
use crate::clock::{Clock, Millis, SteppedClock};
use crate::events::*;
use crate::ports::AgentObservation;
use crate::sim::{backend::user_message, SimAgent, SimBackend};
use crate::worker::Observation;

/// Everything the world acts on.
#[derive(Clone)]
pub(super) struct World {
    pub agent: Arc<SimAgent>,
    pub backend: Arc<SimBackend>,
    /// True time: the sides' clock.
    pub truth: Arc<dyn Clock>,
    /// The worker's clock, which the world steps.
    pub worker_clock: Arc<SteppedClock>,
    /// Each step of the worker's clock: when (true time) and by how much.
    pub steps: Arc<std::sync::Mutex<Vec<(Millis, i64)>>>,
}

impl World {
    fn since_t0(&self) -> Millis {
        self.truth.now_ms().saturating_sub(T0)
    }

    /// The starting state of both sides.
    pub fn populate(&self, s: &Scenario) {
        let now = T0;
        let minute = 60_000;
        for i in 0..s.linked {
            let mut agent = agent_session(&format!("ses_{i}"), now - minute);
            agent.title = format!("S{i}{}", if i < s.renamed { "!" } else { "" });
            self.agent.insert(agent);
            let mut chat = chat_session(&format!("chat_{i}"), now - minute);
            chat.agent_session_id = Some(format!("ses_{i}").as_str().into());
            chat.title = format!("S{i}");
            self.backend.insert_session(chat);
        }
        for i in 0..s.orphans {
            let mut chat = chat_session(&format!("chat_orphan_{i}"), now - minute);
            chat.agent_session_id = Some(format!("ses_gone_{i}").as_str().into());
            self.backend.insert_session(chat);
        }
        for i in 0..s.new_agents {
            self.agent
                .insert(agent_session(&format!("ses_new_{i}"), now));
        }
        for i in 0..s.lazy {
            self.backend
                .insert_session(chat_session(&format!("chat_lazy_{i}"), now));
        }
        let messages = [
            ("stale", s.stale, "old", now - 10 * minute),
            ("fresh", s.fresh, "hi", now - 1_000),
            ("big", s.overflow, "[overflow]", now - 1_000),
        ];
        for (kind, n, text, at) in messages {
            for i in 0..n {
                let chat = format!("chat_{}", i % s.linked).as_str().into();
                let m = user_message(&chat, &format!("{kind}_{i}"), text, at);
                self.backend.insert_message(m);
            }
        }
        for i in 0..s.lazy {
            let chat = format!("chat_lazy_{i}").as_str().into();
            let m = user_message(&chat, &format!("lazy_{i}"), "new chat", now - 1_000);
            self.backend.insert_message(m);
        }
    }

    /// Carries out `actions` (those of one process's lifetime) at their times.
    pub async fn drive(self, actions: Vec<Timed>, inlet: mpsc::Sender<Observation>) {
        for timed in actions {
            let wait = timed.at.saturating_sub(self.since_t0());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if let Some(obs) = self.act(&timed.action) {
                // A worker that is gone misses it, as it would miss a supervisor's message.
                let _ = inlet.send(obs).await;
            }
        }
    }

    /// Does one thing; returns what the worker's supervisor would report of it.
    fn act(&self, action: &WorldAction) -> Option<Observation> {
        let now = self.truth.now_ms();
        match action {
            WorldAction::UserMessage {
                chat,
                message,
                text,
            } => {
                self.backend
                    .insert_message(user_message(&chat.as_str().into(), message, text, now))
            }
            WorldAction::NewChat { chat, message } => {
                self.backend.insert_session(chat_session(chat, now));
                let m = user_message(&chat.as_str().into(), message, "new chat", now);
                self.backend.insert_message(m);
            }
            WorldAction::AgentRename { agent, title } => {
                self.agent.retitle(&agent.as_str().into(), title, now)
            }
            WorldAction::AgentDelete { agent } => self.agent.remove(&agent.as_str().into()),
            WorldAction::AgentNew { agent } => self.agent.insert(agent_session(agent, now)),
            WorldAction::ClockStep { delta_ms } => {
                self.worker_clock.step(*delta_ms);
                self.steps.lock().expect("steps").push((now, *delta_ms));
            }
            WorldAction::AgentRestart { down_ms } => {
                let generation = self.agent.restart(*down_ms);
                let started = AgentServerStarted {
                    generation,
                    url: "sim://agent".into(),
                    pid: None,
                };
                return Some(Observation::Lifecycle(Event::AgentServerStarted(started)));
            }
        }
        None
    }

    /// The agent's event stream for one connection: what the agent server does from now on,
    /// each report delayed up to `faults.max_delay_ms` (so reports overtake each other) and
    /// some delivered twice. A restart of the server is a reconnection.
    pub async fn stream(self, faults: StreamFaults, seed: u64, inlet: mpsc::Sender<Observation>) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (_, mut position) = self.agent.stream_since(usize::MAX);
        let mut generation = self.agent.generation();
        let mut pending: Vec<(Millis, u64, AgentObservation)> = Vec::new();
        let mut order = 0u64;
        let connected = AgentObservation::Connected { reconnected: false };
        if inlet
            .send(Observation::AgentStream(connected))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..=1_000))).await;
            let (reports, next) = self.agent.stream_since(position);
            position = next;
            let now = self.truth.now_ms();
            let mut push = |report: AgentObservation, rng: &mut SmallRng| {
                let copies = 1 + usize::from(rng.random_bool(faults.duplicate_rate));
                for _ in 0..copies {
                    order += 1;
                    let due = now + rng.random_range(0..=faults.max_delay_ms);
                    pending.push((due, order, report.clone()));
                }
            };
            if self.agent.generation() != generation {
                generation = self.agent.generation();
                push(AgentObservation::Connected { reconnected: true }, &mut rng);
            }
            for report in reports {
                push(report, &mut rng);
            }
            pending.sort_by_key(|(due, order, _)| (*due, *order));
            let due = pending.partition_point(|(at, _, _)| *at <= now);
            for (_, _, report) in pending.drain(..due) {
                if inlet.send(Observation::AgentStream(report)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A chat session a user just opened: no agent session yet.
pub(super) fn chat_session(id: &str, now: Millis) -> ChatSessionInfo {
    ChatSessionInfo {
        chat_session_id: id.into(),
        agent_session_id: None,
        title: format!("{id} title"),
        model: None,
        status: ChatStatus::Active,
        last_activity: now,
        project: None,
    }
}

/// An agent session someone started in the agent's own UI.
pub(super) fn agent_session(id: &str, now: Millis) -> AgentSessionInfo {
    AgentSessionInfo {
        agent_session_id: id.into(),
        title: format!("{id} title"),
        directory: None,
        project: None,
        model: None,
        updated_at: now,
        parent_id: None,
        tag: None,
    }
}
