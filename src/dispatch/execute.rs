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
    if uncertain {
        if let Some(found) = agent.find_session(tag).await? {
            tracing::info!(command = %tag.command_id, agent_session = %found.agent_session_id, "adopted the session an earlier attempt created");
            return Ok(found.agent_session_id);
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
    let mut idle_looks = 0;
    loop {
        match agent.prompt_outcome(session, message_id).await? {
            PromptOutcome::NotSent => return Ok(None),
            PromptOutcome::Answered(text) => return Ok(Some(Ok(text))),
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
