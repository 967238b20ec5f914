//! The production incident of DESIGN.md as a scenario for the simulated sides, and a runner
//! that puts a real worker (real log on disk, real dispatcher) through it: what
//! `agentsync demo` and `agentsync-bench storm` run.
//!
//! At scale 1: the backend holds 265 active chat sessions, 255 linked to live agent sessions
//! and 10 linked to agent sessions that no longer exist; the agent server holds 345 sessions,
//! 90 with no chat session and 20 whose titles differ; 3 user messages have incomplete replies
//! older than 5 minutes; 5 user messages are fresh. The agent server's second listing fails and
//! its third is partial (OpenCode's 100-session trap); the backend's second listing loses a page.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::{Faults, SimAgent, SimBackend};
use crate::clock::{Clock, Millis};
use crate::dispatch::DispatchConfig;
use crate::events::*;
use crate::log::{EventLog, LogOptions};
use crate::projections::{CommandState, MessageState, Views};
use crate::worker::{PollPolicy, RunReport, Worker, WorkerConfig, WorkerError};

/// The shape of the scenario.
#[derive(Debug, Clone)]
pub struct Incident {
    /// Multiplies every count.
    pub scale: usize,
    /// Latency of each agent-server call (ms, uniform range).
    pub agent_latency_ms: (Millis, Millis),
    /// Latency of each backend call (ms, uniform range).
    pub backend_latency_ms: (Millis, Millis),
    /// Extra latency of the model listing (ms).
    pub model_list_ms: Millis,
    /// Inject the listing failures described in the module documentation.
    pub listing_faults: bool,
    /// Seed of the simulations' dice.
    pub seed: u64,
}

impl Default for Incident {
    fn default() -> Self {
        Self {
            scale: 1,
            agent_latency_ms: (5, 20),
            backend_latency_ms: (5, 20),
            model_list_ms: 150,
            listing_faults: true,
            seed: 7,
        }
    }
}

/// The two sides, populated.
pub struct Sides {
    /// The agent server.
    pub agent: Arc<SimAgent>,
    /// The backend.
    pub backend: Arc<SimBackend>,
}

impl Incident {
    /// Builds both sides at `now` (message ages are relative to it).
    pub fn build(&self, clock: Arc<dyn Clock>, now: Millis) -> Sides {
        let agent_faults = Faults {
            latency_ms: self.agent_latency_ms,
            model_list_ms: self.model_list_ms,
            failed_listings: if self.listing_faults { vec![2] } else { vec![] },
            partial_listings: if self.listing_faults { vec![3] } else { vec![] },
            seed: self.seed,
            ..Faults::default()
        };
        let backend_faults = Faults {
            latency_ms: self.backend_latency_ms,
            partial_listings: if self.listing_faults { vec![2] } else { vec![] },
            seed: self.seed.wrapping_add(1),
            ..Faults::default()
        };
        let agent = Arc::new(SimAgent::new(clock.clone(), agent_faults));
        let backend = Arc::new(SimBackend::new(clock, backend_faults));
        let model = ModelRef::parse("mock/small");
        let minute = 60_000;
        for unit in 0..self.scale {
            let id = |kind: &str, i: usize| format!("{kind}_{unit:02}_{i:03}");
            for i in 0..255 {
                let agent_id = AgentSessionId(id("ses", i));
                let title = format!("Session {unit}-{i}");
                let agent_title = if i < 20 {
                    format!("{title} (renamed)")
                } else {
                    title.clone()
                };
                agent.insert(AgentSessionInfo {
                    agent_session_id: agent_id.clone(),
                    title: agent_title,
                    directory: Some("/work/project".into()),
                    project: Some("project".into()),
                    model: None,
                    updated_at: now - 60 * minute,
                    parent_id: None,
                    tag: None,
                });
                backend.insert_session(ChatSessionInfo {
                    chat_session_id: ChatSessionId(id("chat", i)),
                    agent_session_id: Some(agent_id),
                    title,
                    model: Some(model.to_string()),
                    status: ChatStatus::Active,
                    last_activity: now - 60 * minute,
                    project: None,
                });
            }
            for i in 255..265 {
                backend.insert_session(ChatSessionInfo {
                    chat_session_id: ChatSessionId(id("chat", i)),
                    agent_session_id: Some(AgentSessionId(id("ses_gone", i))),
                    title: format!("Orphan {unit}-{i}"),
                    model: Some(model.to_string()),
                    status: ChatStatus::Active,
                    last_activity: now - 90 * minute,
                    project: None,
                });
            }
            for i in 255..345 {
                agent.insert(AgentSessionInfo {
                    agent_session_id: AgentSessionId(id("ses", i)),
                    title: format!("New work {unit}-{i}"),
                    directory: Some("/work/project".into()),
                    project: Some("project".into()),
                    model: None,
                    updated_at: now - 5 * minute,
                    parent_id: None,
                    tag: None,
                });
            }
            for i in 0..3 {
                let chat = ChatSessionId(id("chat", 30 + i));
                let user = id("msg_stale", i);
                let at = now - (10 + i as u64) * minute;
                backend.insert_message(super::backend::user_message(&chat, &user, "hello?", at));
                backend.insert_message(MessageInfo {
                    chat_session_id: chat,
                    message_id: MessageId(format!("{user}-reply")),
                    role: Role::Assistant,
                    content: "I was about to".into(),
                    completed: false,
                    timestamp: at + 1_000,
                    reply_to: Some(MessageId(user)),
                    error: None,
                });
            }
            for i in 0..5 {
                let chat = ChatSessionId(id("chat", 40 + i));
                let text = format!("question {unit}-{i}");
                backend.insert_message(super::backend::user_message(
                    &chat,
                    &id("msg_fresh", i),
                    &text,
                    now - 10_000,
                ));
            }
        }
        Sides { agent, backend }
    }
}

/// What a run of the incident showed.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Where the log is.
    pub data_dir: String,
    /// From the worker's start to Ready.
    pub time_to_ready_ms: Option<u64>,
    /// From the worker's start to the last command's outcome.
    pub converge_ms: u64,
    /// Model-list fetches the agent server saw.
    pub model_fetches: u64,
    /// The most calls in flight at once to either side (commands and observations).
    pub peak_in_flight: usize,
    /// The same, per side.
    pub peak_in_flight_by_side: BTreeMap<String, usize>,
    /// Commands by kind, then by final state.
    pub commands: BTreeMap<String, BTreeMap<String, u64>>,
    /// User messages whose answer the backend holds.
    pub messages_answered: u64,
    /// User messages whose failure the backend holds.
    pub messages_failed: u64,
    /// Chat sessions marked deleted although their agent session exists: deletions a failed or
    /// partial listing would have caused. Counted against the simulated agent server's truth.
    pub deletions_from_failed_listing: u64,
    /// Chat sessions marked deleted.
    pub deletions: u64,
    /// Events in the log.
    pub events: u64,
}

/// Runs a worker through the incident with a real log in `dir`, until it is quiet.
pub async fn run(
    dir: &Path,
    incident: &Incident,
    dispatch: DispatchConfig,
    clock: Arc<dyn Clock>,
) -> Result<Summary, WorkerError> {
    let opts = LogOptions {
        create: true,
        ..LogOptions::default()
    };
    let log = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || EventLog::open(dir, &opts))
            .await
            .map_err(|e| WorkerError::Task(e.to_string()))??
    };
    let log = Arc::new(log);
    let sides = incident.build(clock.clone(), clock.now_ms());
    let cfg = WorkerConfig {
        worker_id: "demo".into(),
        dispatch,
        polling: PollPolicy {
            active_ms: 200,
            idle_max_ms: 1_000,
            ..PollPolicy::default()
        },
        stop_when_quiet: Some(3),
        ..WorkerConfig::default()
    };
    let worker = Worker::open(
        log.clone(),
        sides.agent.clone(),
        sides.backend.clone(),
        clock,
        cfg,
    )
    .await?;
    let report = worker.run(std::future::pending()).await?;
    let last_outcome = report
        .views
        .commands
        .state
        .commands
        .values()
        .map(|c| c.updated_at)
        .max()
        .unwrap_or(report.started_at);
    let converge_ms = last_outcome.saturating_sub(report.started_at);
    Ok(summarize(dir, &sides, &report, converge_ms, log.last_seq()))
}

fn summarize(
    dir: &Path,
    sides: &Sides,
    report: &RunReport,
    converge_ms: u64,
    events: u64,
) -> Summary {
    let views: &Views = &report.views;
    let mut commands: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for entry in views.commands.state.commands.values() {
        let state = match entry.state {
            CommandState::Planned => "planned",
            CommandState::InFlight => "in_flight",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Dead => "dead",
            CommandState::Cancelled => "cancelled",
        };
        *commands
            .entry(entry.op.name().to_owned())
            .or_default()
            .entry(state.to_owned())
            .or_default() += 1;
    }
    let delivered = |s: MessageState| {
        views
            .messages
            .state
            .messages
            .values()
            .filter(|m| m.delivered && m.state == s)
            .count() as u64
    };
    let agent_sessions = sides.agent.sessions();
    let deleted: Vec<_> = sides
        .backend
        .sessions()
        .into_values()
        .filter(|c| c.status == ChatStatus::Deleted)
        .collect();
    let wrongly_deleted = deleted
        .iter()
        .filter(|c| {
            c.agent_session_id
                .as_ref()
                .is_some_and(|a| agent_sessions.contains_key(a))
        })
        .count() as u64;
    let (a, b) = (sides.agent.stats(), sides.backend.stats());
    Summary {
        data_dir: dir.display().to_string(),
        time_to_ready_ms: report.time_to_ready_ms,
        converge_ms,
        model_fetches: sides.agent.model_fetches(),
        peak_in_flight: a.peak_in_flight.max(b.peak_in_flight),
        peak_in_flight_by_side: BTreeMap::from([
            ("agent".to_owned(), a.peak_in_flight),
            ("backend".to_owned(), b.peak_in_flight),
        ]),
        commands,
        messages_answered: delivered(MessageState::Answered),
        messages_failed: delivered(MessageState::Failed) + delivered(MessageState::Abandoned),
        deletions_from_failed_listing: wrongly_deleted,
        deletions: deleted.len() as u64,
        events,
    }
}
