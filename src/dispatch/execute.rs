//! Running one attempt: the command becomes port calls, the reply becomes an [`Effect`].

use super::Attempt;
use crate::events::{Command, Effect};
use crate::ports::{AgentServer, Backend, MutationReply, PortError};

/// Runs `attempt` against the ports, within its timeout (a timeout is retryable).
pub async fn execute(
    agent: &dyn AgentServer,
    backend: &dyn Backend,
    attempt: &Attempt,
) -> Result<Effect, PortError> {
    let call = run(agent, backend, attempt);
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
) -> Result<Effect, PortError> {
    let command = &attempt.command;
    match command {
        Command::CreateAgentSession {
            chat_session_id,
            title,
        } => {
            let info = agent.create_session(title).await?;
            Ok(Effect::AgentSessionCreated {
                chat_session_id: chat_session_id.clone(),
                agent_session_id: info.agent_session_id,
                title: title.clone(),
            })
        }
        Command::Prompt {
            chat_session_id,
            agent_session_id,
            message_id,
            text,
            model,
        } => {
            let content = agent.prompt(agent_session_id, text, model.as_ref()).await?;
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
        _ => {
            let mut command = command.clone();
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
    }
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
