//! A simulated agent server: sessions in memory, prompts answered by rule.
//!
//! It keeps the promises of the real one that agentsync relies on, as measured on OpenCode
//! 1.18.33 (`../shared/DESIGN.md`, "Facts measured on the real server"): a session's
//! `metadata` (here its [`SessionTag`]) comes back in every listing; a prompt may carry a
//! client-chosen message id, which `prompt_outcome` finds again; posting the **same** id again is
//! not deduplicated (the model runs again: counted in [`SimAgent::model_runs`]). With
//! `Faults::lost_reply_rate` a creation, a rename, a deletion or a prompt is applied and then its
//! reply is lost, as a proxy or a network that drops the answer would do; with
//! `Faults::late_reply_rate` the reply comes after the caller's timeout.
//!
//! The model takes `Faults::model_run_ms` to answer; meanwhile the session is busy and
//! `prompt_outcome` reads `Running`. [`SimAgent::restart`] is a new generation of the server:
//! what was running is lost (`Interrupted`), the sessions stay. Everything it does is also
//! written to a journal of event-stream reports ([`SimAgent::stream_since`]), what OpenCode's
//! `GET /event` would say.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{CallStats, Faults, Harness};
use crate::clock::{Clock, Millis};
use crate::events::{
    AgentSessionId, AgentSessionInfo, AgentSessionStatus, AgentStatus, ChatSessionId, ModelRef,
    SessionTag,
};
use crate::ports::{
    AgentListing, AgentObservation, AgentServer, ModelList, PortError, PortFuture, PromptOutcome,
    PromptRequest,
};

/// A prompt containing this text fails like an overflowing context window (terminal).
pub const OVERFLOW_MARKER: &str = "[overflow]";

/// The simulated agent server. Prompts are answered with `answer: <text>`.
pub struct SimAgent {
    h: Harness,
    state: Mutex<AgentState>,
}

#[derive(Default)]
struct AgentState {
    sessions: BTreeMap<AgentSessionId, AgentSessionInfo>,
    next_id: u64,
    listings: u32,
    model_fetches: u64,
    prompts: BTreeMap<AgentSessionId, u64>,
    /// Model runs per user message id (a prompt without an id counts under its text).
    model_runs: BTreeMap<String, u64>,
    /// Answers by (session, user message id).
    answers: BTreeMap<(AgentSessionId, String), Result<String, PortError>>,
    /// Sessions created, by the command id of their tag.
    created_for: BTreeMap<String, u64>,
    /// Sessions created, by the chat session of their tag.
    created_for_chat: BTreeMap<ChatSessionId, u64>,
    /// The server's generation, from 1: bumped by each restart.
    generation: u64,
    /// Prompts the model is working on, by (session, message key).
    running: BTreeMap<(AgentSessionId, String), Run>,
    /// The answers of the runs that finished, by run number.
    finished: BTreeMap<u64, Result<String, PortError>>,
    next_run: u64,
    /// Prompts that stopped without an answer (a restart, an abort).
    interrupted: BTreeSet<(AgentSessionId, String)>,
    /// Runs that stopped without an answer, per message key.
    interrupted_runs: BTreeMap<String, u64>,
    /// What the event stream reports, in the order it happened.
    journal: Vec<AgentObservation>,
}

/// One run of the model.
struct Run {
    /// Its number, from 1.
    number: u64,
    /// When it is done (the server's clock).
    done_at: Millis,
    /// What it answers.
    answer: Result<String, PortError>,
}

impl AgentState {
    /// The runs due by `now` finish: their answers are stored and reported. The model keeps
    /// working whether or not the caller still waits (a worker that died mid-prompt).
    fn settle(&mut self, now: Millis) {
        let due: Vec<_> = self
            .running
            .iter()
            .filter(|(_, r)| r.done_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(run) = self.running.remove(&key) else {
                continue;
            };
            let id = key.0.clone();
            if let Some(session) = self.sessions.get_mut(&id) {
                session.updated_at = run.done_at;
            }
            self.journal.push(AgentObservation::MessageUpdated {
                agent_session_id: id.clone(),
                at: run.done_at,
                error: run.answer.as_ref().err().map(|e| e.message.clone()),
            });
            if !self.busy(&id) {
                self.report_status(&id, AgentStatus::Idle);
            }
            self.finished.insert(run.number, run.answer.clone());
            self.answers.insert(key, run.answer);
        }
    }

    /// Whether a session has a prompt running.
    fn busy(&self, id: &AgentSessionId) -> bool {
        self.running.keys().any(|(s, _)| s == id)
    }

    fn report_status(&mut self, id: &AgentSessionId, status: AgentStatus) {
        self.journal
            .push(AgentObservation::Status(AgentSessionStatus {
                agent_session_id: id.clone(),
                status,
            }));
    }

    fn report_session(&mut self, id: &AgentSessionId) {
        if let Some(info) = self.sessions.get(id) {
            let report = AgentObservation::SessionUpdated(Box::new(info.clone()));
            self.journal.push(report);
        }
    }

    /// Stops the running prompts that `which` selects: they read as interrupted.
    fn interrupt(&mut self, which: impl Fn(&AgentSessionId) -> bool) {
        let stopped: Vec<_> = self
            .running
            .keys()
            .filter(|(s, _)| which(s))
            .cloned()
            .collect();
        for key in stopped {
            self.running.remove(&key);
            if !self.busy(&key.0) {
                self.report_status(&key.0, AgentStatus::Idle);
            }
            *self.interrupted_runs.entry(key.1.clone()).or_default() += 1;
            self.interrupted.insert(key);
        }
    }
}

impl SimAgent {
    /// An agent server with no sessions.
    pub fn new(clock: Arc<dyn Clock>, faults: Faults) -> Self {
        Self {
            h: Harness::new(clock, faults),
            state: Mutex::new(AgentState {
                generation: 1,
                ..AgentState::default()
            }),
        }
    }

    /// Adds a session directly (the scenario's starting point).
    pub fn insert(&self, info: AgentSessionInfo) {
        let id = info.agent_session_id.clone();
        let mut s = self.lock();
        s.sessions.insert(id.clone(), info);
        s.report_session(&id);
    }

    /// Renames a session directly (a user acting in the agent's own UI).
    pub fn retitle(&self, id: &AgentSessionId, title: &str, at: Millis) {
        let mut s = self.lock();
        if let Some(info) = s.sessions.get_mut(id) {
            info.title = title.to_owned();
            info.updated_at = at;
            s.report_session(id);
        }
    }

    /// Deletes a session directly.
    pub fn remove(&self, id: &AgentSessionId) {
        let mut s = self.lock();
        if s.sessions.remove(id).is_some() {
            s.interrupt(|x| x == id);
            s.journal.push(AgentObservation::SessionDeleted(id.clone()));
        }
    }

    /// Restarts the server: a new generation, down for `down_ms` (every call refused), and
    /// every prompt the model was working on lost: it then reads as `Interrupted`. The
    /// sessions (on disk) stay. Returns the new generation.
    pub fn restart(&self, down_ms: Millis) -> u64 {
        let now = self.now();
        self.h
            .faults
            .lock()
            .expect("faults")
            .outages
            .push((now, now + down_ms));
        let mut s = self.lock();
        s.settle(now);
        s.generation += 1;
        s.interrupt(|_| true);
        s.generation
    }

    /// Its generation: 1, plus one per restart.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The event-stream reports from position `from` of the journal on, and the position
    /// after them.
    pub fn stream_since(&self, from: usize) -> (Vec<AgentObservation>, usize) {
        let s = self.lock();
        let from = from.min(s.journal.len());
        (s.journal[from..].to_vec(), s.journal.len())
    }

    /// Sessions created per chat session of their tag: more than one is a duplicate.
    pub fn created_for_chat(&self) -> BTreeMap<ChatSessionId, u64> {
        self.lock().created_for_chat.clone()
    }

    /// The sessions it holds.
    pub fn sessions(&self) -> BTreeMap<AgentSessionId, AgentSessionInfo> {
        self.lock().sessions.clone()
    }

    /// How many times the model list was fetched.
    pub fn model_fetches(&self) -> u64 {
        self.lock().model_fetches
    }

    /// Prompts received per session.
    pub fn prompts(&self) -> BTreeMap<AgentSessionId, u64> {
        self.lock().prompts.clone()
    }

    /// Model runs per user message id: more than one for a message is a prompt paid twice.
    pub fn model_runs(&self) -> BTreeMap<String, u64> {
        self.lock().model_runs.clone()
    }

    /// Runs of the model that stopped without an answer (a restart, an abort), per user
    /// message id.
    pub fn interrupted_runs(&self) -> BTreeMap<String, u64> {
        self.lock().interrupted_runs.clone()
    }

    /// Sessions created per tag command id: more than one is a duplicate creation.
    pub fn created_for(&self) -> BTreeMap<String, u64> {
        self.lock().created_for.clone()
    }

    /// Its call counters.
    pub fn stats(&self) -> CallStats {
        self.h.stats()
    }

    /// Replaces its faults (say, to end an outage).
    pub fn set_faults(&self, faults: Faults) {
        *self.h.faults.lock().expect("faults") = faults;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().expect("sim agent state")
    }

    fn now(&self) -> Millis {
        self.h.clock.now_ms()
    }

    /// The model starts on a prompt (once per call: the same message id posted twice runs
    /// twice). Returns the run's number and when it is done.
    fn start_model(
        &self,
        id: &AgentSessionId,
        prompt: PromptRequest<'_>,
    ) -> Result<(u64, Millis), PortError> {
        let now = self.now();
        let work = self.h.pick(self.h.faults().model_run_ms);
        let mut s = self.lock();
        s.settle(now);
        let Some(session) = s.sessions.get_mut(id) else {
            return Err(PortError::terminal(format!("404: no session {id}")));
        };
        session.updated_at = now;
        *s.prompts.entry(id.clone()).or_default() += 1;
        let key = (
            id.clone(),
            prompt.message_id.unwrap_or(prompt.text).to_owned(),
        );
        *s.model_runs.entry(key.1.clone()).or_default() += 1;
        if !s.busy(id) {
            s.report_status(id, AgentStatus::Busy);
        }
        s.interrupted.remove(&key);
        s.answers.remove(&key);
        s.journal.push(AgentObservation::MessageUpdated {
            agent_session_id: id.clone(),
            at: now,
            error: None,
        });
        let answer = if prompt.text.contains(OVERFLOW_MARKER) {
            Err(PortError::terminal(
                "ContextOverflowError: prompt is too long for the model's context",
            ))
        } else {
            Ok(format!("answer: {}", prompt.text))
        };
        s.next_run += 1;
        let number = s.next_run;
        let done_at = now + work;
        let run = Run {
            number,
            done_at,
            answer,
        };
        s.running.insert(key, run);
        Ok((number, done_at))
    }

    /// The answer of run `number` once it is done, or a cut connection if the server
    /// restarted or the prompt was aborted meanwhile.
    fn finish_model(&self, number: u64) -> Result<Result<String, PortError>, PortError> {
        let now = self.now();
        let mut s = self.lock();
        s.settle(now);
        s.finished.get(&number).cloned().ok_or_else(|| {
            PortError::retryable(
                "prompt: connection reset (the agent server restarted or the prompt was aborted)",
            )
        })
    }

    /// Finishes the runs that are due.
    fn settle(&self) {
        let now = self.now();
        self.lock().settle(now);
    }
}

impl AgentServer for SimAgent {
    fn health(&self) -> PortFuture<'_, ()> {
        Box::pin(async move {
            self.h.call("health", 0).await?;
            Ok(())
        })
    }

    fn list_sessions(&self, since: Option<Millis>) -> PortFuture<'_, AgentListing> {
        Box::pin(async move {
            let n = {
                let mut s = self.lock();
                s.listings += 1;
                s.listings
            };
            let _call = self.h.call("list_sessions", 0).await?;
            self.settle();
            let faults = self.h.faults();
            if faults.failed_listings.contains(&n) {
                return Err(PortError::retryable("list_sessions: 500 internal error"));
            }
            let mut sessions: Vec<AgentSessionInfo> = self
                .lock()
                .sessions
                .values()
                .filter(|s| since.is_none_or(|t| s.updated_at >= t))
                .cloned()
                .collect();
            let complete = !faults.partial_listings.contains(&n);
            if !complete {
                // OpenCode's trap: a listing without `limit` stops at 100.
                sessions.truncate(100.min(sessions.len() / 2));
            }
            self.h.hold_back().await;
            Ok(AgentListing { sessions, complete })
        })
    }

    fn create_session<'a>(
        &'a self,
        title: &'a str,
        tag: Option<&'a SessionTag>,
    ) -> PortFuture<'a, AgentSessionInfo> {
        Box::pin(async move {
            let _call = self.h.call("create_session", 0).await?;
            let now = self.now();
            let info = {
                let mut s = self.lock();
                s.next_id += 1;
                let info = AgentSessionInfo {
                    agent_session_id: AgentSessionId(format!("ses_sim{:06}", s.next_id)),
                    title: title.to_owned(),
                    directory: Some("/sim".into()),
                    project: Some("global".into()),
                    model: None,
                    updated_at: now,
                    parent_id: None,
                    tag: tag.cloned(),
                };
                if let Some(t) = tag {
                    *s.created_for.entry(t.command_id.0.clone()).or_default() += 1;
                    *s.created_for_chat
                        .entry(t.chat_session_id.clone())
                        .or_default() += 1;
                }
                s.sessions
                    .insert(info.agent_session_id.clone(), info.clone());
                s.report_session(&info.agent_session_id);
                info
            };
            self.h.reply("create_session").await?;
            Ok(info)
        })
    }

    fn find_session<'a>(&'a self, tag: &'a SessionTag) -> PortFuture<'a, Option<AgentSessionInfo>> {
        Box::pin(async move {
            let _call = self.h.call("list_sessions", 0).await?;
            let found = self
                .lock()
                .sessions
                .values()
                .find(|s| {
                    s.tag.as_ref().is_some_and(|t| {
                        t.command_id == tag.command_id && t.worker_id == tag.worker_id
                    })
                })
                .cloned();
            self.h.hold_back().await;
            Ok(found)
        })
    }

    fn rename_session<'a>(&'a self, id: &'a AgentSessionId, title: &'a str) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let _call = self.h.call("rename_session", 0).await?;
            let now = self.now();
            {
                let mut s = self.lock();
                let Some(info) = s.sessions.get_mut(id) else {
                    return Err(PortError::terminal(format!("404: no session {id}")));
                };
                info.title = title.to_owned();
                info.updated_at = now;
                s.report_session(id);
            }
            self.h.reply("rename_session").await
        })
    }

    fn delete_session<'a>(&'a self, id: &'a AgentSessionId) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let _call = self.h.call("delete_session", 0).await?;
            self.remove(id);
            self.h.reply("delete_session").await
        })
    }

    fn prompt<'a>(
        &'a self,
        id: &'a AgentSessionId,
        prompt: PromptRequest<'a>,
    ) -> PortFuture<'a, String> {
        Box::pin(async move {
            let _call = self.h.call("prompt", 0).await?;
            let (run, done_at) = self.start_model(id, prompt)?;
            let wait = done_at.saturating_sub(self.now());
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let answer = self.finish_model(run)?;
            self.h.reply("prompt").await?;
            answer
        })
    }

    fn forget_prompt<'a>(
        &'a self,
        id: &'a AgentSessionId,
        message_id: &'a str,
    ) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let _call = self.h.call("delete_message", 0).await?;
            let key = (id.clone(), message_id.to_owned());
            self.lock().answers.remove(&key);
            Ok(())
        })
    }

    fn prompt_outcome<'a>(
        &'a self,
        id: &'a AgentSessionId,
        message_id: &'a str,
    ) -> PortFuture<'a, PromptOutcome> {
        Box::pin(async move {
            let _call = self.h.call("get_message", 0).await?;
            let key = (id.clone(), message_id.to_owned());
            let outcome = {
                let now = self.now();
                let mut s = self.lock();
                s.settle(now);
                match s.answers.get(&key) {
                    _ if s.running.contains_key(&key) => PromptOutcome::Running,
                    _ if s.interrupted.contains(&key) => PromptOutcome::Interrupted,
                    None => PromptOutcome::NotSent,
                    Some(Ok(text)) => PromptOutcome::Answered(text.clone()),
                    Some(Err(e)) => PromptOutcome::Failed(e.clone()),
                }
            };
            self.h.hold_back().await;
            Ok(outcome)
        })
    }

    fn abort<'a>(&'a self, id: &'a AgentSessionId) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let _call = self.h.call("abort", 0).await?;
            {
                let now = self.now();
                let mut s = self.lock();
                s.settle(now);
                s.interrupt(|x| x == id);
            }
            self.h.reply("abort").await
        })
    }

    fn status(&self) -> PortFuture<'_, Vec<AgentSessionStatus>> {
        Box::pin(async move {
            let _call = self.h.call("status", 0).await?;
            self.settle();
            let busy: BTreeSet<AgentSessionId> =
                self.lock().running.keys().map(|(s, _)| s.clone()).collect();
            self.h.hold_back().await;
            Ok(busy
                .into_iter()
                .map(|agent_session_id| AgentSessionStatus {
                    agent_session_id,
                    status: AgentStatus::Busy,
                })
                .collect())
        })
    }

    fn list_models(&self) -> PortFuture<'_, ModelList> {
        Box::pin(async move {
            self.lock().model_fetches += 1;
            let slow = self.h.faults().model_list_ms;
            let _call = self.h.call("list_models", slow).await?;
            let small = ModelRef::parse("mock/small");
            Ok(ModelList {
                models: vec![small.clone(), ModelRef::parse("mock/large")],
                default: Some(small),
            })
        })
    }
}
