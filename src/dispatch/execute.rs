//! Running one attempt: the command becomes port calls, the reply becomes an [`Effect`].
//!
//! Agent commands are made idempotent here, since the agent server does not deduplicate them:
//! an attempt whose predecessor's outcome is unknown (a lost reply, a timeout, a crash between
//! the call and its logged outcome: [`Attempt::uncertain`]) first asks the server what it
//! already holds. A creation is looked up by the tag it was made with and adopted; a prompt is
//! looked up by its chosen message id and its answer taken, or waited for. Nothing is sent
//! twice that the server already has.

use std::time::Duration;

use super::Attempt;
use crate::events::{AgentSessionId, Command, Effect, SessionTag};
use crate::ports::{AgentServer, Backend, MutationReply, PortError, PromptOutcome, PromptRequest};

/// How often a prompt found running is looked at again.
const RUNNING_POLL: Duration = Duration::from_secs(1);

/// Looks at a prompt found neither running nor answered this many times (a second apart)
/// before calling it interrupted: the server creates the user message a moment before it
/// marks the session busy.
const INTERRUPTED_LOOKS: u32 = 3;

/// Looks at a prompt the server does not have this many times (a second apart) before sending
/// it: the earlier attempt's request may still be on its way. A worker killed right after
/// sending, restarted and Ready within a second (reads of changes make that quick), looked
/// before the server had stored the first request, posted again under the same message id,
/// and OpenCode appended the text to that message a second time (`tests/e2e.rs`, the storm,
/// one run in three).
const NOT_SENT_LOOKS: u32 = 3;

/// Runs `attempt` against the ports, within its timeout (a timeout is retryable). `worker_id`
/// tags what it creates in the agent server.
pub async fn execute(
    agent: &dyn AgentServer,
    backend: &dyn Backend,
    attempt: &Attempt,
    worker_id: &str,
) -> Result<Effect, PortError> {
    let call = run(agent, backend, attempt, worker_id);
    match tokio::time::timeout(attempt.timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(PortError::retryable(format!(
            "{} timed out after {} ms",
            attempt.command.op(),
            attempt.timeout.as_millis()
        ))),
    }
}

async fn run(
    agent: &dyn AgentServer,
    backend: &dyn Backend,
    attempt: &Attempt,
    worker_id: &str,
) -> Result<Effect, PortError> {
    let command = &attempt.command;
    match command {
        Command::CreateAgentSession {
            chat_session_id,
            title,
        } => {
            let tag = SessionTag {
                worker_id: worker_id.to_owned(),
                command_id: attempt.id.clone(),
                chat_session_id: chat_session_id.clone(),
            };
            let agent_session_id = create_once(agent, attempt.uncertain, title, &tag).await?;
            Ok(Effect::AgentSessionCreated {
                chat_session_id: chat_session_id.clone(),
                agent_session_id,
                title: title.clone(),
            })
        }
        Command::Prompt {
            chat_session_id,
            agent_session_id,
            message_id,
            text,
            model,
            agent_message_id,
        } => {
            let prompt = PromptRequest {
                text,
                model: model.as_ref(),
                message_id: agent_message_id.as_deref(),
            };
            let content = prompt_once(agent, attempt.uncertain, agent_session_id, prompt).await?;
            Ok(Effect::PromptAnswered {
                chat_session_id: chat_session_id.clone(),
                message_id: message_id.clone(),
                content,
            })
        }
        Command::AbortAgentSession { agent_session_id } => {
            agent.abort(agent_session_id).await?;
            Ok(Effect::AgentSessionAborted {
                agent_session_id: agent_session_id.clone(),
            })
        }
        _ => mutate(agent, backend, attempt).await,
    }
}

/// Creates the session, unless an earlier attempt whose outcome is unknown already did: then
/// that one is adopted.
async fn create_once(
    agent: &dyn AgentServer,
    uncertain: bool,
    title: &str,
    tag: &SessionTag,
) -> Result<AgentSessionId, PortError> {
    // As for prompts (`NOT_SENT_LOOKS`): the earlier attempt's request may still be on its
    // way, so an absence is believed only after a few looks a second apart.
    let looks = if uncertain { NOT_SENT_LOOKS } else { 0 };
    for look in 1..=looks {
        if let Some(found) = agent.find_session(tag).await? {
            tracing::info!(command = %tag.command_id, agent_session = %found.agent_session_id, "adopted the session an earlier attempt created");
            return Ok(found.agent_session_id);
        }
        if look < looks {
            tokio::time::sleep(RUNNING_POLL).await;
        }
    }
    Ok(agent
        .create_session(title, Some(tag))
        .await?
        .agent_session_id)
}

/// Prompts, unless an earlier attempt whose outcome is unknown already reached the server:
/// then its answer is taken (or waited for), and the model does not run again.
async fn prompt_once(
    agent: &dyn AgentServer,
    uncertain: bool,
    session: &AgentSessionId,
    prompt: PromptRequest<'_>,
) -> Result<String, PortError> {
    if let (true, Some(message_id)) = (uncertain, prompt.message_id) {
        if let Some(earlier) = earlier_prompt(agent, session, message_id).await? {
            return earlier;
        }
    }
    agent.prompt(session, prompt).await
}

/// The outcome of a prompt sent before under `message_id`, if the server has it.
async fn earlier_prompt(
    agent: &dyn AgentServer,
    session: &AgentSessionId,
    message_id: &str,
) -> Result<Option<Result<String, PortError>>, PortError> {
    let (mut idle_looks, mut absent_looks) = (0, 0);
    loop {
        match agent.prompt_outcome(session, message_id).await? {
            PromptOutcome::NotSent if absent_looks + 1 >= NOT_SENT_LOOKS => return Ok(None),
            PromptOutcome::NotSent => absent_looks += 1,
            PromptOutcome::Answered(text) => return Ok(Some(Ok(text))),
            // The provider said another try may work: the stored failure is cleared away and
            // the prompt asked again (the answer so far was an error, not an answer).
            PromptOutcome::Failed(e) if e.is_retryable() => {
                tracing::info!(%session, message_id, error = %e, "a prompt whose answer was a retryable error is asked again");
                agent.forget_prompt(session, message_id).await?;
                return Ok(None);
            }
            PromptOutcome::Failed(e) => return Ok(Some(Err(e))),
            PromptOutcome::Running => idle_looks = 0,
            PromptOutcome::Interrupted if idle_looks + 1 >= INTERRUPTED_LOOKS => {
                // Its run died (with its server, say) and no answer will come of it: clear it
                // away and send it anew, so the history shows the question once.
                tracing::warn!(%session, message_id, "a prompt interrupted before its answer is sent again");
                agent.forget_prompt(session, message_id).await?;
                return Ok(None);
            }
            PromptOutcome::Interrupted => idle_looks += 1,
        }
        tokio::time::sleep(RUNNING_POLL).await;
    }
}

/// A backend command: the mutation, idempotent on the command id at the backend.
async fn mutate(
    agent: &dyn AgentServer,
    backend: &dyn Backend,
    attempt: &Attempt,
) -> Result<Effect, PortError> {
    let mut command = attempt.command.clone();
    if attempt.fetch_models_first {
        // The incident's behaviour, kept only for the baseline measurement.
        let list = agent.list_models().await?;
        if let Command::CreateSession { model, .. } = &mut command {
            *model = list
                .default
                .or(list.models.into_iter().next())
                .map(|m| m.to_string());
        }
    }
    let reply = backend.mutate(&attempt.id, &command).await?;
    effect_of(command, reply)
}

/// The effect of a backend mutation that succeeded.
fn effect_of(command: Command, reply: MutationReply) -> Result<Effect, PortError> {
    Ok(match command {
        Command::CreateSession {
            agent_session_id,
            title,
            model,
        } => match reply {
            MutationReply::Created(chat_session_id) => Effect::ChatSessionCreated {
                chat_session_id,
                agent_session_id,
                title,
                model,
            },
            MutationReply::Done => {
                return Err(PortError::terminal(
                    "createSession answered without a chatSessionId",
                ))
            }
        },
        Command::LinkAgentSession {
            chat_session_id,
            agent_session_id,
        } => Effect::AgentSessionLinked {
            chat_session_id,
            agent_session_id,
        },
        Command::RenameSession {
            chat_session_id,
            title,
        } => Effect::SessionRenamed {
            chat_session_id,
            title,
        },
        Command::MarkSessionDeleted { chat_session_id } => {
            Effect::SessionDeleted { chat_session_id }
        }
        Command::MarkSessionFailed {
            chat_session_id,
            reason,
        } => Effect::SessionFailed {
            chat_session_id,
            reason,
        },
        Command::CompleteMessage {
            chat_session_id,
            message_id,
            ..
        } => Effect::MessageCompleted {
            chat_session_id,
            message_id,
        },
        Command::FailMessage {
            chat_session_id,
            message_id,
            reason,
        } => Effect::MessageFailed {
            chat_session_id,
            message_id,
            reason,
        },
        Command::CreateAgentSession { .. }
        | Command::Prompt { .. }
        | Command::AbortAgentSession { .. } => {
            return Err(PortError::terminal(format!(
                "{} is not a backend operation",
                command.op()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    //! The lookups before a retry, against an agent server whose answers are scripted.

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::clock::ManualClock;
    use crate::events::{AgentSessionInfo, AgentSessionStatus, ModelRef};
    use crate::ports::{AgentListing, ModelList, PortFuture};
    use crate::sim::{Faults, SimBackend};

    /// Says what it is told to, and counts what it is asked.
    #[derive(Default)]
    struct Scripted {
        outcomes: Mutex<VecDeque<PromptOutcome>>,
        found: Option<AgentSessionInfo>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Scripted {
        fn with(outcomes: Vec<PromptOutcome>) -> Self {
            Self {
                outcomes: Mutex::new(outcomes.into()),
                ..Self::default()
            }
        }

        fn called(&self, what: &'static str) {
            self.calls.lock().unwrap().push(what);
        }

        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn session(id: &str) -> AgentSessionInfo {
        AgentSessionInfo {
            agent_session_id: id.into(),
            title: "t".into(),
            directory: None,
            project: None,
            model: None,
            updated_at: 1,
            parent_id: None,
            tag: None,
        }
    }

    impl AgentServer for Scripted {
        fn health(&self) -> PortFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn list_sessions(&self, _: Option<u64>) -> PortFuture<'_, AgentListing> {
            unreachable!("not listed here")
        }
        fn create_session<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a SessionTag>,
        ) -> PortFuture<'a, AgentSessionInfo> {
            self.called("create");
            Box::pin(async { Ok(session("ses_new")) })
        }
        fn find_session<'a>(
            &'a self,
            _: &'a SessionTag,
        ) -> PortFuture<'a, Option<AgentSessionInfo>> {
            self.called("find");
            Box::pin(async move { Ok(self.found.clone()) })
        }
        fn rename_session<'a>(&'a self, _: &'a AgentSessionId, _: &'a str) -> PortFuture<'a, ()> {
            unreachable!()
        }
        fn delete_session<'a>(&'a self, _: &'a AgentSessionId) -> PortFuture<'a, ()> {
            unreachable!()
        }
        fn prompt<'a>(
            &'a self,
            _: &'a AgentSessionId,
            _: PromptRequest<'a>,
        ) -> PortFuture<'a, String> {
            self.called("post");
            Box::pin(async { Ok("fresh answer".to_owned()) })
        }
        fn prompt_outcome<'a>(
            &'a self,
            _: &'a AgentSessionId,
            _: &'a str,
        ) -> PortFuture<'a, PromptOutcome> {
            self.called("look");
            let next = self.outcomes.lock().unwrap().pop_front();
            Box::pin(async move { Ok(next.expect("a scripted outcome")) })
        }
        fn forget_prompt<'a>(&'a self, _: &'a AgentSessionId, _: &'a str) -> PortFuture<'a, ()> {
            self.called("forget");
            Box::pin(async { Ok(()) })
        }
        fn abort<'a>(&'a self, _: &'a AgentSessionId) -> PortFuture<'a, ()> {
            unreachable!()
        }
        fn status(&self) -> PortFuture<'_, Vec<AgentSessionStatus>> {
            unreachable!()
        }
        fn list_models(&self) -> PortFuture<'_, ModelList> {
            unreachable!()
        }
    }

    fn attempt(command: Command, uncertain: bool) -> Attempt {
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        Attempt {
            id: "cmd".into(),
            command,
            attempt: 2,
            timeout: Duration::from_secs(600),
            fetch_models_first: false,
            uncertain,
            permit,
        }
    }

    fn prompt_command() -> Command {
        Command::Prompt {
            chat_session_id: "chat_1".into(),
            agent_session_id: "ses_1".into(),
            message_id: "m1".into(),
            text: "q".into(),
            model: Some(ModelRef::parse("p/m")),
            agent_message_id: Some("msg_0001".into()),
        }
    }

    /// Runs one attempt on a paused clock (the lookups wait a second between looks).
    fn run_one(agent: &Scripted, a: &Attempt) -> Result<Effect, PortError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let backend = SimBackend::new(Arc::new(ManualClock::new(0)), Faults::default());
        rt.block_on(execute(agent, &backend, a, "w1"))
    }

    fn answer(effect: Result<Effect, PortError>) -> String {
        match effect {
            Ok(Effect::PromptAnswered { content, .. }) => content,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_uncertain_creation_adopts_the_session_it_finds_and_creates_nothing() {
        let agent = Scripted {
            found: Some(session("ses_orphan")),
            ..Scripted::default()
        };
        let create = Command::CreateAgentSession {
            chat_session_id: "chat_1".into(),
            title: "t".into(),
        };
        match run_one(&agent, &attempt(create.clone(), true)) {
            Ok(Effect::AgentSessionCreated {
                agent_session_id, ..
            }) => assert_eq!(agent_session_id.as_str(), "ses_orphan"),
            other => panic!("{other:?}"),
        }
        assert_eq!(agent.calls(), ["find"]);
        let absent = Scripted::default();
        run_one(&absent, &attempt(create.clone(), true)).unwrap();
        assert_eq!(
            absent.calls(),
            ["find", "find", "find", "create"],
            "absent at three looks a second apart: created"
        );
        let fresh = Scripted::default();
        run_one(&fresh, &attempt(create, false)).unwrap();
        assert_eq!(
            fresh.calls(),
            ["create"],
            "a first attempt has nothing to find"
        );
    }

    #[test]
    fn a_prompt_found_running_is_waited_for_and_its_answer_taken_not_sent_again() {
        let agent = Scripted::with(vec![
            PromptOutcome::Interrupted, // stored, not yet busy: a moment's gap, measured
            PromptOutcome::Running,
            PromptOutcome::Running,
            PromptOutcome::Answered("the first run's answer".into()),
        ]);
        let got = answer(run_one(&agent, &attempt(prompt_command(), true)));
        assert_eq!(got, "the first run's answer");
        assert_eq!(agent.calls(), ["look"; 4]);
    }

    #[test]
    fn a_prompt_whose_run_died_is_cleared_and_sent_once_more() {
        let agent = Scripted::with(vec![PromptOutcome::Interrupted; 3]);
        let got = answer(run_one(&agent, &attempt(prompt_command(), true)));
        assert_eq!(got, "fresh answer");
        assert_eq!(agent.calls(), ["look", "look", "look", "forget", "post"]);
    }

    #[test]
    fn a_terminal_failure_found_is_the_outcome_and_a_retryable_one_is_asked_again() {
        let terminal = Scripted::with(vec![PromptOutcome::Failed(PortError::terminal(
            "ContextOverflowError",
        ))]);
        let err = run_one(&terminal, &attempt(prompt_command(), true)).unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(terminal.calls(), ["look"], "not sent again");
        let retryable = Scripted::with(vec![PromptOutcome::Failed(PortError::retryable(
            "APIError: overloaded",
        ))]);
        answer(run_one(&retryable, &attempt(prompt_command(), true)));
        assert_eq!(retryable.calls(), ["look", "forget", "post"]);
    }

    #[test]
    fn a_prompt_not_found_or_certain_is_posted_once() {
        let absent = Scripted::with(vec![PromptOutcome::NotSent; 3]);
        answer(run_one(&absent, &attempt(prompt_command(), true)));
        assert_eq!(absent.calls(), ["look", "look", "look", "post"]);
        let first = Scripted::default();
        answer(run_one(&first, &attempt(prompt_command(), false)));
        assert_eq!(first.calls(), ["post"]);
    }

    #[test]
    fn an_earlier_request_that_lands_after_the_first_look_is_taken_not_sent_again() {
        let agent = Scripted::with(vec![
            PromptOutcome::NotSent, // the dead process's request is still on its way
            PromptOutcome::Running,
            PromptOutcome::Answered("the first request's answer".into()),
        ]);
        let got = answer(run_one(&agent, &attempt(prompt_command(), true)));
        assert_eq!(got, "the first request's answer");
        assert_eq!(agent.calls(), ["look"; 3], "never posted");
    }
}
