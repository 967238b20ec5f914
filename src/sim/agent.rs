//! A simulated agent server: sessions in memory, prompts answered by rule.
//!
//! It keeps the promises of the real one that agentsync relies on, as measured on OpenCode
//! 1.18.33 (`../shared/DESIGN.md`, "Facts measured on the real server"): a session's
//! `metadata` (here its [`SessionTag`]) comes back in every listing; a prompt may carry a
//! client-chosen message id, which `prompt_outcome` finds again; posting the **same** id again is
//! not deduplicated (the model runs again: counted in [`SimAgent::model_runs`]). With
//! `Faults::lost_reply_rate` a creation or a prompt is applied and then its reply is lost, as a
//! proxy or a network that drops the answer would do.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{CallStats, Faults, Harness};
use crate::clock::{Clock, Millis};
use crate::events::{AgentSessionId, AgentSessionInfo, AgentSessionStatus, ModelRef, SessionTag};
use crate::ports::{
    AgentListing, AgentServer, ModelList, PortError, PortFuture, PromptOutcome, PromptRequest,
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
}

impl SimAgent {
    /// An agent server with no sessions.
    pub fn new(clock: Arc<dyn Clock>, faults: Faults) -> Self {
        Self {
            h: Harness::new(clock, faults),
            state: Mutex::new(AgentState::default()),
        }
    }

    /// Adds a session directly (the scenario's starting point).
    pub fn insert(&self, info: AgentSessionInfo) {
        self.lock()
            .sessions
            .insert(info.agent_session_id.clone(), info);
    }

    /// Renames a session directly (a user acting in the agent's own UI).
    pub fn retitle(&self, id: &AgentSessionId, title: &str, at: Millis) {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.title = title.to_owned();
            s.updated_at = at;
        }
    }

    /// Deletes a session directly.
    pub fn remove(&self, id: &AgentSessionId) {
        self.lock().sessions.remove(id);
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

    /// The model answers a prompt (once per call: the same message id posted twice runs twice).
    fn run_model(
        &self,
        id: &AgentSessionId,
        prompt: PromptRequest<'_>,
    ) -> Result<Result<String, PortError>, PortError> {
        let now = self.now();
        let mut s = self.lock();
        let Some(session) = s.sessions.get_mut(id) else {
            return Err(PortError::terminal(format!("404: no session {id}")));
        };
        session.updated_at = now;
        *s.prompts.entry(id.clone()).or_default() += 1;
        let key = prompt.message_id.unwrap_or(prompt.text).to_owned();
        *s.model_runs.entry(key).or_default() += 1;
        let answer = if prompt.text.contains(OVERFLOW_MARKER) {
            Err(PortError::terminal(
                "ContextOverflowError: prompt is too long for the model's context",
            ))
        } else {
            Ok(format!("answer: {}", prompt.text))
        };
        if let Some(m) = prompt.message_id {
            s.answers.insert((id.clone(), m.to_owned()), answer.clone());
        }
        Ok(answer)
    }

    /// After the effect: with `lost_reply_rate`, the reply never reaches the caller.
    fn maybe_lose_reply(&self, op: &str) -> Result<(), PortError> {
        if self.h.roll(self.h.faults().lost_reply_rate) {
            return Err(PortError::retryable(format!(
                "{op}: connection reset after the server applied it"
            )));
        }
        Ok(())
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
                }
                s.sessions
                    .insert(info.agent_session_id.clone(), info.clone());
                info
            };
            self.maybe_lose_reply("create_session")?;
            Ok(info)
        })
    }

    fn find_session<'a>(&'a self, tag: &'a SessionTag) -> PortFuture<'a, Option<AgentSessionInfo>> {
        Box::pin(async move {
            let _call = self.h.call("list_sessions", 0).await?;
            Ok(self
                .lock()
                .sessions
                .values()
                .find(|s| {
                    s.tag.as_ref().is_some_and(|t| {
                        t.command_id == tag.command_id && t.worker_id == tag.worker_id
                    })
                })
                .cloned())
        })
    }

    fn rename_session<'a>(&'a self, id: &'a AgentSessionId, title: &'a str) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let _call = self.h.call("rename_session", 0).await?;
            let now = self.now();
            match self.lock().sessions.get_mut(id) {
                Some(s) => {
                    s.title = title.to_owned();
                    s.updated_at = now;
                    Ok(())
                }
                None => Err(PortError::terminal(format!("404: no session {id}"))),
            }
        })
    }

    fn delete_session<'a>(&'a self, id: &'a AgentSessionId) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let _call = self.h.call("delete_session", 0).await?;
            self.lock().sessions.remove(id);
            Ok(())
        })
    }

    fn prompt<'a>(
        &'a self,
        id: &'a AgentSessionId,
        prompt: PromptRequest<'a>,
    ) -> PortFuture<'a, String> {
        Box::pin(async move {
            let _call = self.h.call("prompt", 0).await?;
            let answer = self.run_model(id, prompt)?;
            self.maybe_lose_reply("prompt")?;
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
            Ok(match self.lock().answers.get(&key) {
                None => PromptOutcome::NotSent,
                Some(Ok(text)) => PromptOutcome::Answered(text.clone()),
                Some(Err(e)) => PromptOutcome::Failed(e.clone()),
            })
        })
    }

    fn abort<'a>(&'a self, _id: &'a AgentSessionId) -> PortFuture<'a, ()> {
        Box::pin(async move {
            let _call = self.h.call("abort", 0).await?;
            Ok(())
        })
    }

    fn status(&self) -> PortFuture<'_, Vec<AgentSessionStatus>> {
        Box::pin(async move {
            let _call = self.h.call("status", 0).await?;
            Ok(Vec::new())
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
