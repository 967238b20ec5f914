//! How events look in a terminal: one line each, the same in `replay` and `why`.
//!
//! Events carry text from outside (titles, answers, reasons, server errors, ids): every line
//! printed from them goes through [`crate::text::printable`], so no escape sequence in them
//! reaches the terminal raw.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use uuid::Uuid;

use crate::clock::Millis;
use crate::events::{Command, Effect, Envelope, Event};
use crate::text::printable;

/// `2026-11-21T14:00:00.000Z`.
pub(crate) fn time(at: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}

/// The table header matching [`row`].
pub(crate) fn header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<24}  {:<22}  {:<8}  SUMMARY",
        "SEQ", "TIME (UTC)", "KIND", "CAUSE"
    )
}

/// One event as a table row. `seqs` maps event ids already shown to their seq, so a cause can
/// be shown as `#seq`; other causes show as the start of their id.
pub(crate) fn row(
    out: &mut impl Write,
    e: &Envelope,
    seqs: &HashMap<Uuid, u64>,
) -> std::io::Result<()> {
    let cause = match e.cause {
        None => "-".to_owned(),
        Some(id) => match seqs.get(&id) {
            Some(seq) => format!("#{seq}"),
            None => id.to_string()[..8].to_owned(),
        },
    };
    writeln!(
        out,
        "{:>8}  {:<24}  {:<22}  {:<8}  {}",
        e.seq,
        time(e.at),
        e.kind().name(),
        cause,
        printable(&summary(&e.event))
    )
}

fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len().min(42) + 2);
    q.push('"');
    for (i, c) in s.chars().enumerate() {
        if i == 40 {
            q.push('…');
            break;
        }
        q.extend(c.escape_debug());
    }
    q.push('"');
    q
}

fn opt(o: &Option<impl ToString>) -> String {
    o.as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

fn command(c: &Command) -> String {
    match c {
        Command::CreateSession {
            agent_session_id,
            title,
            model,
        } => {
            format!(
                "agent={agent_session_id} title={} model={}",
                quote(title),
                opt(model)
            )
        }
        Command::LinkAgentSession {
            chat_session_id,
            agent_session_id,
        } => {
            format!("chat={chat_session_id} agent={agent_session_id}")
        }
        Command::RenameSession {
            chat_session_id,
            title,
        } => {
            format!("chat={chat_session_id} title={}", quote(title))
        }
        Command::MarkSessionDeleted { chat_session_id } => format!("chat={chat_session_id}"),
        Command::MarkSessionFailed {
            chat_session_id,
            reason,
        } => {
            format!("chat={chat_session_id} reason={}", quote(reason))
        }
        Command::CompleteMessage {
            chat_session_id,
            message_id,
            content,
        } => {
            format!(
                "chat={chat_session_id} message={message_id} content={}",
                quote(content)
            )
        }
        Command::FailMessage {
            chat_session_id,
            message_id,
            reason,
        } => {
            format!(
                "chat={chat_session_id} message={message_id} reason={}",
                quote(reason)
            )
        }
        Command::CreateAgentSession {
            chat_session_id,
            title,
        } => {
            format!("chat={chat_session_id} title={}", quote(title))
        }
        Command::Prompt {
            chat_session_id,
            agent_session_id,
            message_id,
            text,
            model,
            agent_message_id,
        } => format!(
            "chat={chat_session_id} agent={agent_session_id} message={message_id} agent_message={} model={} text={}",
            opt(agent_message_id),
            opt(model),
            quote(text)
        ),
        Command::AbortAgentSession { agent_session_id } => format!("agent={agent_session_id}"),
    }
}

fn effect(e: &Effect) -> String {
    match e {
        Effect::ChatSessionCreated {
            chat_session_id,
            agent_session_id,
            ..
        } => {
            format!("chat {chat_session_id} created for agent {agent_session_id}")
        }
        Effect::AgentSessionCreated {
            chat_session_id,
            agent_session_id,
            ..
        } => {
            format!("agent {agent_session_id} created for chat {chat_session_id}")
        }
        Effect::AgentSessionLinked {
            chat_session_id,
            agent_session_id,
        } => {
            format!("chat {chat_session_id} linked to agent {agent_session_id}")
        }
        Effect::SessionRenamed {
            chat_session_id,
            title,
        } => {
            format!("chat {chat_session_id} renamed {}", quote(title))
        }
        Effect::SessionDeleted { chat_session_id } => format!("chat {chat_session_id} deleted"),
        Effect::SessionFailed {
            chat_session_id,
            reason,
        } => {
            format!("chat {chat_session_id} failed: {}", quote(reason))
        }
        Effect::PromptAnswered {
            message_id,
            content,
            ..
        } => {
            format!("message {message_id} answered {}", quote(content))
        }
        Effect::MessageCompleted { message_id, .. } => format!("message {message_id} completed"),
        Effect::MessageFailed {
            message_id, reason, ..
        } => {
            format!("message {message_id} failed: {}", quote(reason))
        }
        Effect::AgentSessionAborted { agent_session_id } => {
            format!("agent {agent_session_id} aborted")
        }
    }
}

/// One line saying what an event is about.
pub(crate) fn summary(e: &Event) -> String {
    match e {
        Event::AgentSessionSeen(b) | Event::AgentSessionChanged(b) => format!(
            "{} title={} model={} project={}",
            b.agent_session_id,
            quote(&b.title),
            opt(&b.model),
            opt(&b.project)
        ),
        Event::AgentSessionGone(b) => format!("{} ({:?})", b.agent_session_id, b.reason),
        Event::AgentSessionStatus(b) => format!("{} {:?}", b.agent_session_id, b.status),
        Event::ModelsListed(b) => format!(
            "generation {}: {} models, default {}",
            b.generation,
            b.models.len(),
            opt(&b.default)
        ),
        Event::BackendSessionSeen(b) | Event::BackendSessionChanged(b) => format!(
            "{} agent={} title={} status={:?}",
            b.chat_session_id,
            opt(&b.agent_session_id),
            quote(&b.title),
            b.status
        ),
        Event::BackendSessionGone(b) => b.chat_session_id.to_string(),
        Event::BackendMessageSeen(b) => format!(
            "{} in {} {:?}{}{} {}",
            b.message_id,
            b.chat_session_id,
            b.role,
            if b.completed { "" } else { " incomplete" },
            b.reply_to
                .as_ref()
                .map(|r| format!(" reply_to={r}"))
                .unwrap_or_default(),
            b.error
                .as_ref()
                .map(|e| format!("error={}", quote(e)))
                .unwrap_or_else(|| quote(&b.content)),
        ),
        Event::ListingCompleted(b) => format!(
            "{}: {} sessions, {}",
            b.source,
            b.sessions,
            if b.complete { "complete" } else { "PARTIAL" }
        ),
        Event::ObservationFailed(b) => format!("{} {}: {}", b.source, b.operation, b.error),
        Event::RetentionSwept(b) => format!(
            "retention: {} commands, {} messages, {} chat sessions final before {} left the views",
            b.commands.len(),
            b.messages.len(),
            b.chats.len(),
            b.before
        ),
        Event::FeedRead(b) => format!(
            "{:?} read to {}{}",
            b.feed,
            b.cursor,
            if b.reached_end { ", to the end" } else { "" }
        ),
        Event::CommandPlanned(b) => format!(
            "{} {} {} (because: {})",
            b.command_id,
            b.command.op(),
            command(&b.command),
            b.reason
        ),
        Event::AttemptStarted(b) => format!("{} {} attempt {}", b.command_id, b.op, b.attempt),
        Event::CommandSucceeded(b) => format!("{} {}: {}", b.command_id, b.op, effect(&b.effect)),
        Event::CommandFailed(b) => format!(
            "{} {} attempt {} {:?}: {}{}",
            b.command_id,
            b.op,
            b.attempt,
            b.class,
            b.error,
            b.next_attempt_at
                .map(|t| format!(" (next attempt {})", time(t)))
                .unwrap_or_default()
        ),
        Event::CommandDeadLettered(b) => format!(
            "{} {} after {} attempts: {}",
            b.command_id, b.op, b.attempts, b.last_error
        ),
        Event::ModelsRequested(b) => format!("generation {}", b.generation),
        Event::CommandCancelled(b) => format!("{} {}: {}", b.command_id, b.op, b.reason),
        Event::WorkerStarted(b) => format!("worker {} v{} pid {}", b.worker_id, b.version, b.pid),
        Event::WorkerReady(b) => format!("ready in {} ms", b.time_to_ready_ms),
        Event::WorkerStopping(b) => b.reason.clone(),
        Event::WorkerState(b) => match &b.detail {
            Some(d) => format!("{}: {d}", b.state.name()),
            None => b.state.name().to_owned(),
        },
        Event::AgentServerStarted(b) => format!(
            "generation {} at {} pid {}",
            b.generation,
            b.url,
            opt(&b.pid)
        ),
        Event::AgentServerExited(b) => format!(
            "generation {} code {} signal {}",
            b.generation,
            opt(&b.code),
            opt(&b.signal)
        ),
        Event::AgentServerGaveUp(b) => format!("after {} restarts: {}", b.restarts, b.error),
        Event::CheckpointWritten(b) => format!("{} v{} at seq {}", b.projection, b.version, b.seq),
        Event::IdentityAdopted(b) => format!("from {} to {}", b.previous, b.current),
        Event::DeletionsHeld(b) => format!(
            "listing #{}: {} deletions held (limit {})",
            b.listing_seq, b.candidates, b.limit
        ),
        Event::DeletionHoldLifted(b) => format!(
            "hold of listing #{} lifted at listing #{}: {} deletions (limit {})",
            b.held_listing_seq, b.listing_seq, b.candidates, b.limit
        ),
    }
}
