//! Deterministic generators of realistic event histories, for the tests, the property tests
//! and the benchmark. Not used by the worker.
//!
//! A history is described as a list of [`Step`]s (a new agent session, a user message, a
//! prompt failing, a listing, ...) that refer to earlier entities by index, modulo how many
//! exist: any list of steps is a valid history, so property tests can shrink them freely.
//! [`History`] turns steps into the events a worker would have appended, causes included.

use std::collections::VecDeque;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::clock::Millis;
use crate::events::*;

/// One thing that happens in a generated history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An agent session appears; the worker creates its chat session.
    NewAgentSession,
    /// An agent session's title changes; the worker renames its chat session.
    Rename(u16),
    /// An agent session's status changes.
    Status(u16, bool),
    /// A user message arrives in a chat session.
    UserMessage(u16),
    /// The oldest pending message is prompted: answered and delivered, or it fails.
    Prompt(PromptOutcome),
    /// A listing of a source completes (complete or partial).
    Listing(Source, bool),
    /// An observation fails.
    ObservationFailed(Source),
    /// An agent session disappears; its chat session is marked deleted.
    Gone(u16),
    /// The model list is fetched.
    Models,
    /// A backend listing reports a chat session again, with a project the view lacked.
    Backfill(u16),
    /// Lifecycle noise: worker started, ready, checkpoint written.
    Lifecycle,
}

/// How a generated prompt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptOutcome {
    /// Answered and delivered.
    Answered,
    /// A retryable failure, then answered.
    RetriedThenAnswered,
    /// A terminal failure (context overflow); the message is failed in the backend.
    Terminal,
    /// Retryable failures until dead-lettered; the message is failed in the backend.
    Dead,
}

struct Session {
    agent: AgentSessionId,
    chat: ChatSessionId,
    title: String,
    gone: bool,
}

/// Builds events from steps.
pub struct History {
    now: Millis,
    sessions: Vec<Session>,
    pending: VecDeque<(ChatSessionId, AgentSessionId, MessageId, Uuid)>,
    next_id: u64,
    events: Vec<NewEvent>,
    /// The models sessions use, in turn.
    pub models: Vec<ModelRef>,
}

impl History {
    /// An empty history starting at `start`.
    pub fn new(start: Millis) -> Self {
        Self {
            now: start,
            sessions: Vec::new(),
            pending: VecDeque::new(),
            next_id: 0,
            events: Vec::new(),
            models: vec![
                ModelRef {
                    provider_id: "mock".into(),
                    model_id: "small".into(),
                },
                ModelRef {
                    provider_id: "mock".into(),
                    model_id: "large/long-context".into(),
                },
            ],
        }
    }

    /// The events of `steps`, from `start`.
    pub fn of(steps: &[Step], start: Millis) -> Vec<NewEvent> {
        let mut h = History::new(start);
        for &s in steps {
            h.step(s);
        }
        h.events
    }

    /// `n` random steps from `seed`, with a realistic mix.
    pub fn random_steps(seed: u64, n: usize) -> Vec<Step> {
        Self::step_stream(seed).take(n).collect()
    }

    /// An endless stream of random steps from `seed` (the same as [`History::random_steps`]).
    pub fn step_stream(seed: u64) -> impl Iterator<Item = Step> {
        let mut rng = SmallRng::seed_from_u64(seed);
        std::iter::repeat_with(move || random_step(&mut rng))
    }

    /// Takes the events built so far.
    pub fn take(&mut self) -> Vec<NewEvent> {
        std::mem::take(&mut self.events)
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_{:06}", self.next_id)
    }

    fn push(&mut self, event: Event, cause: Option<Uuid>) -> Uuid {
        self.now += 17;
        let e = NewEvent::new(event, self.now).caused_by(cause);
        let id = e.id;
        self.events.push(e);
        id
    }

    /// Plans a command and runs it to success; returns the success event's id.
    fn run(&mut self, cmd: Command, reason: &str, cause: Option<Uuid>, effect: Effect) -> Uuid {
        let command_id = CommandId(format!("{}:{}", cmd.op(), self.next_id + 1));
        self.next_id += 1;
        let (op, subject) = (cmd.op(), cmd.subject());
        let planned = self.push(
            Event::CommandPlanned(CommandPlanned {
                command_id: command_id.clone(),
                command: cmd,
                reason: reason.into(),
            }),
            cause,
        );
        let started = self.push(
            Event::AttemptStarted(AttemptStarted {
                command_id: command_id.clone(),
                op,
                subject: subject.clone(),
                attempt: 1,
            }),
            Some(planned),
        );
        self.push(
            Event::CommandSucceeded(CommandSucceeded {
                command_id,
                op,
                subject,
                attempt: 1,
                effect,
            }),
            Some(started),
        )
    }

    /// Plans `failMessage` and runs it to success.
    fn fail_message(
        &mut self,
        chat: ChatSessionId,
        message_id: MessageId,
        reason: String,
        why: &str,
        cause: Uuid,
    ) {
        let cmd = Command::FailMessage {
            chat_session_id: chat.clone(),
            message_id: message_id.clone(),
            reason: reason.clone(),
        };
        let effect = Effect::MessageFailed {
            chat_session_id: chat,
            message_id,
            reason,
        };
        self.run(cmd, why, Some(cause), effect);
    }

    /// The first live session at or after index `i` (modulo), if any: O(1) while most are live.
    fn live(&self, i: u16) -> Option<usize> {
        let n = self.sessions.len();
        (0..n)
            .map(|k| (i as usize + k) % n)
            .find(|&j| !self.sessions[j].gone)
    }

    /// Appends the events of one step.
    pub fn step(&mut self, step: Step) {
        match step {
            Step::NewAgentSession => {
                let agent = AgentSessionId(self.id("ses"));
                let chat = ChatSessionId(self.id("chat"));
                let title = format!("Session {}", self.next_id);
                let model = self.models[self.next_id as usize % self.models.len()].clone();
                let info = AgentSessionInfo {
                    agent_session_id: agent.clone(),
                    title: title.clone(),
                    directory: Some("/work/project".into()),
                    project: None,
                    model: Some(model.clone()),
                    updated_at: self.now,
                    parent_id: None,
                    tag: None,
                };
                let seen = self.push(Event::AgentSessionSeen(info), None);
                let cmd = Command::CreateSession {
                    agent_session_id: agent.clone(),
                    title: title.clone(),
                    model: Some(model.to_string()),
                };
                let effect = Effect::ChatSessionCreated {
                    chat_session_id: chat.clone(),
                    agent_session_id: agent.clone(),
                    title: title.clone(),
                    model: Some(model.to_string()),
                };
                self.run(cmd, "agent session has no chat session", Some(seen), effect);
                self.sessions.push(Session {
                    agent,
                    chat,
                    title,
                    gone: false,
                });
            }
            Step::Rename(i) => {
                let Some(j) = self.live(i) else { return };
                let title = format!("Renamed {}", self.next_id);
                self.next_id += 1;
                let (agent, chat) = (
                    self.sessions[j].agent.clone(),
                    self.sessions[j].chat.clone(),
                );
                self.sessions[j].title.clone_from(&title);
                let info = AgentSessionInfo {
                    agent_session_id: agent,
                    title: title.clone(),
                    directory: Some("/work/project".into()),
                    project: Some("proj".into()),
                    model: None,
                    updated_at: self.now,
                    parent_id: None,
                    tag: None,
                };
                let changed = self.push(Event::AgentSessionChanged(info), None);
                let cmd = Command::RenameSession {
                    chat_session_id: chat.clone(),
                    title: title.clone(),
                };
                self.run(
                    cmd,
                    "titles differ",
                    Some(changed),
                    Effect::SessionRenamed {
                        chat_session_id: chat,
                        title,
                    },
                );
            }
            Step::Status(i, busy) => {
                let Some(j) = self.live(i) else { return };
                let status = if busy {
                    AgentStatus::Busy
                } else {
                    AgentStatus::Idle
                };
                let agent_session_id = self.sessions[j].agent.clone();
                self.push(
                    Event::AgentSessionStatus(AgentSessionStatus {
                        agent_session_id,
                        status,
                    }),
                    None,
                );
            }
            Step::UserMessage(i) => {
                let Some(j) = self.live(i) else { return };
                let message_id = MessageId(self.id("msg"));
                let (chat, agent) = (
                    self.sessions[j].chat.clone(),
                    self.sessions[j].agent.clone(),
                );
                let info = MessageInfo {
                    chat_session_id: chat.clone(),
                    message_id: message_id.clone(),
                    role: Role::User,
                    content: format!("Please look at item {}", self.next_id),
                    completed: true,
                    timestamp: self.now,
                    reply_to: None,
                    error: None,
                };
                let seen = self.push(Event::BackendMessageSeen(info), None);
                self.pending.push_back((chat, agent, message_id, seen));
            }
            Step::Prompt(outcome) => {
                let Some((chat, agent, message_id, seen)) = self.pending.pop_front() else {
                    return;
                };
                self.prompt(chat, agent, message_id, seen, outcome);
            }
            Step::Listing(source, complete) => {
                let sessions = self.sessions.iter().filter(|s| !s.gone).count() as u64;
                self.push(
                    Event::ListingCompleted(ListingCompleted {
                        source,
                        sessions,
                        complete,
                        as_of: None,
                    }),
                    None,
                );
            }
            Step::ObservationFailed(source) => {
                self.push(
                    Event::ObservationFailed(ObservationFailed {
                        source,
                        operation: "list_sessions".into(),
                        error: "connection refused".into(),
                    }),
                    None,
                );
            }
            Step::Gone(i) => {
                let Some(j) = self.live(i) else { return };
                self.sessions[j].gone = true;
                let (agent, chat) = (
                    self.sessions[j].agent.clone(),
                    self.sessions[j].chat.clone(),
                );
                let gone = self.push(
                    Event::AgentSessionGone(AgentSessionGone {
                        agent_session_id: agent,
                        reason: GoneReason::MissingFromListing,
                    }),
                    None,
                );
                let listed = self.push(
                    Event::ListingCompleted(ListingCompleted {
                        source: Source::Agent,
                        sessions: 0,
                        complete: true,
                        as_of: None,
                    }),
                    Some(gone),
                );
                let cmd = Command::MarkSessionDeleted {
                    chat_session_id: chat.clone(),
                };
                self.run(
                    cmd,
                    "linked agent session gone",
                    Some(listed),
                    Effect::SessionDeleted {
                        chat_session_id: chat.clone(),
                    },
                );
                let orphans: Vec<_> = self
                    .pending
                    .iter()
                    .filter(|p| p.0 == chat)
                    .cloned()
                    .collect();
                self.pending.retain(|p| p.0 != chat);
                for (chat, _, message_id, seen) in orphans {
                    self.fail_message(
                        chat,
                        message_id,
                        "session deleted".into(),
                        "message of a deleted session",
                        seen,
                    );
                }
            }
            Step::Models => {
                let models = self.models.clone();
                let default = models.first().cloned();
                self.push(
                    Event::ModelsListed(ModelsListed {
                        generation: 1,
                        models,
                        default,
                    }),
                    None,
                );
            }
            Step::Backfill(i) => {
                let Some(j) = self.live(i) else { return };
                let s = &self.sessions[j];
                let info = ChatSessionInfo {
                    chat_session_id: s.chat.clone(),
                    agent_session_id: Some(s.agent.clone()),
                    title: s.title.clone(),
                    model: None,
                    status: ChatStatus::Active,
                    last_activity: self.now,
                    project: Some("proj".into()),
                };
                self.push(Event::BackendSessionChanged(info), None);
            }
            Step::Lifecycle => {
                let started = self.push(
                    Event::WorkerStarted(WorkerStarted {
                        worker_id: "w1".into(),
                        version: "0.1.0".into(),
                        pid: 4242,
                    }),
                    None,
                );
                self.push(
                    Event::WorkerReady(WorkerReady {
                        time_to_ready_ms: 120,
                    }),
                    Some(started),
                );
            }
        }
    }

    fn prompt(
        &mut self,
        chat: ChatSessionId,
        agent: AgentSessionId,
        message_id: MessageId,
        seen: Uuid,
        outcome: PromptOutcome,
    ) {
        let command_id = CommandId(format!("prompt:{message_id}"));
        let cmd = Command::Prompt {
            chat_session_id: chat.clone(),
            agent_session_id: agent,
            message_id: message_id.clone(),
            text: "Please look".into(),
            model: self.models.first().cloned(),
            agent_message_id: Some(format!("msg_{:012x}testkit", self.now)),
        };
        let (op, subject) = (cmd.op(), cmd.subject());
        let planned = self.push(
            Event::CommandPlanned(CommandPlanned {
                command_id: command_id.clone(),
                command: cmd,
                reason: "user message unanswered".into(),
            }),
            Some(seen),
        );
        let attempt = |h: &mut Self, n: u32| {
            h.push(
                Event::AttemptStarted(AttemptStarted {
                    command_id: command_id.clone(),
                    op,
                    subject: subject.clone(),
                    attempt: n,
                }),
                Some(planned),
            )
        };
        let fail = |h: &mut Self, n: u32, class: ErrorClass, error: &str, cause: Uuid| {
            let next = (class == ErrorClass::Retryable).then_some(h.now + 1000 * u64::from(n));
            h.push(
                Event::CommandFailed(CommandFailed {
                    command_id: command_id.clone(),
                    op,
                    subject: subject.clone(),
                    attempt: n,
                    class,
                    error: error.into(),
                    next_attempt_at: next,
                }),
                Some(cause),
            )
        };
        let mut n = 1;
        let failure = match outcome {
            PromptOutcome::Answered => None,
            PromptOutcome::RetriedThenAnswered => {
                let a = attempt(self, n);
                fail(self, n, ErrorClass::Retryable, "HTTP 503", a);
                n += 1;
                None
            }
            PromptOutcome::Terminal => {
                let a = attempt(self, n);
                Some((
                    "ContextOverflowError: prompt is too long".to_owned(),
                    fail(
                        self,
                        n,
                        ErrorClass::Terminal,
                        "ContextOverflowError: prompt is too long",
                        a,
                    ),
                ))
            }
            PromptOutcome::Dead => {
                for k in 1..=3 {
                    let a = attempt(self, k);
                    fail(self, k, ErrorClass::Retryable, "connection refused", a);
                }
                let dead = self.push(
                    Event::CommandDeadLettered(CommandDeadLettered {
                        command_id: command_id.clone(),
                        op,
                        subject: subject.clone(),
                        attempts: 3,
                        last_error: "connection refused".into(),
                    }),
                    Some(planned),
                );
                Some((
                    "gave up after 3 attempts: connection refused".to_owned(),
                    dead,
                ))
            }
        };
        match failure {
            None => {
                let a = attempt(self, n);
                let content = format!("Answer to {message_id}");
                let answered = self.push(
                    Event::CommandSucceeded(CommandSucceeded {
                        command_id: command_id.clone(),
                        op,
                        subject: subject.clone(),
                        attempt: n,
                        effect: Effect::PromptAnswered {
                            chat_session_id: chat.clone(),
                            message_id: message_id.clone(),
                            content: content.clone(),
                        },
                    }),
                    Some(a),
                );
                let cmd = Command::CompleteMessage {
                    chat_session_id: chat.clone(),
                    message_id: message_id.clone(),
                    content,
                };
                self.run(
                    cmd,
                    "answer to deliver",
                    Some(answered),
                    Effect::MessageCompleted {
                        chat_session_id: chat,
                        message_id,
                    },
                );
            }
            Some((reason, cause)) => {
                self.fail_message(chat, message_id, reason, "prompt failed", cause);
            }
        }
    }
}

fn random_step(rng: &mut SmallRng) -> Step {
    let i = rng.random::<u16>();
    match rng.random_range(0..100) {
        0..=14 => Step::NewAgentSession,
        15..=24 => Step::Rename(i),
        25..=44 => Step::Status(i, rng.random()),
        45..=64 => Step::UserMessage(i),
        65..=74 => Step::Prompt(PromptOutcome::Answered),
        75..=77 => Step::Prompt(PromptOutcome::RetriedThenAnswered),
        78 => Step::Prompt(PromptOutcome::Terminal),
        79 => Step::Prompt(PromptOutcome::Dead),
        80..=86 => Step::Listing(
            if rng.random() {
                Source::Agent
            } else {
                Source::Backend
            },
            rng.random_ratio(9, 10),
        ),
        87..=88 => Step::ObservationFailed(Source::Backend),
        89..=91 => Step::Gone(i),
        92 => Step::Models,
        93..=97 => Step::Backfill(i),
        _ => Step::Lifecycle,
    }
}
