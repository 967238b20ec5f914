//! `agentsync send` and `agentsync chat`: a person's side of the embedded local backend, through
//! the inbox of the worker running on the data directory (`DIR/INBOX` holds its address).
//!
//! Answers come from a model and reasons from servers: they are printed through
//! [`printable_lines`] and [`printable`], so an answer cannot rewrite the terminal (`ESC ] 0 ;`
//! sets its title, `ESC [ 2 J` clears it).

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use super::{ChatArgs, CliError, Out, SendArgs};
use crate::backend::contract::Message;
use crate::backend::InboxClient;
use crate::text::{printable, printable_lines};

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))
}

fn inbox(dir: &std::path::Path) -> Result<InboxClient, CliError> {
    InboxClient::for_data_dir(dir).map_err(|e| CliError::usage(e.to_string()))
}

/// What became of a message.
enum Outcome {
    Answered(String),
    Failed(String),
}

/// Polls the conversation until `message` is answered or failed, or `wait` passes.
async fn await_reply(
    inbox: &InboxClient,
    chat: &str,
    message: &str,
    wait: Duration,
) -> Result<Option<Outcome>, CliError> {
    let deadline = Instant::now() + wait;
    loop {
        let conversation: Vec<Message> = inbox
            .conversation(chat)
            .await
            .map_err(|e| CliError::runtime(e.to_string()))?;
        if let Some(m) = conversation.iter().find(|m| m.message_id == message) {
            if let Some(e) = &m.error {
                return Ok(Some(Outcome::Failed(e.clone())));
            }
        }
        if let Some(reply) = conversation
            .iter()
            .find(|m| m.reply_to.as_deref() == Some(message) && m.completed)
        {
            return Ok(Some(Outcome::Answered(reply.content.clone())));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(super) fn send(args: SendArgs, out: &mut Out) -> Result<(), CliError> {
    if args.text.trim().is_empty() {
        return Err(CliError::usage("the message is empty"));
    }
    let inbox = inbox(&args.dir.data_dir)?;
    runtime()?.block_on(async {
        let chat = match args.session.as_str() {
            "new" => {
                let c = inbox
                    .open_chat(&args.title)
                    .await
                    .map_err(|e| CliError::runtime(e.to_string()))?;
                c.chat_session_id
            }
            id => id.to_owned(),
        };
        let sent = inbox
            .send(&chat, &args.text)
            .await
            .map_err(|e| CliError::runtime(e.to_string()))?;
        writeln!(out, "{} {}", sent.chat_session_id, sent.message_id)?;
        out.flush()?;
        let Some(secs) = args.wait else {
            return Ok(());
        };
        match await_reply(&inbox, &chat, &sent.message_id, Duration::from_secs(secs)).await? {
            Some(Outcome::Answered(text)) => {
                writeln!(out, "{}", printable_lines(&text))?;
                Ok(())
            }
            Some(Outcome::Failed(reason)) => Err(CliError::runtime(format!(
                "message {} failed: {}",
                sent.message_id,
                printable(&reason)
            ))),
            None => Err(CliError::runtime(format!(
                "no answer to {} within {secs} s (it may still come: agentsync why --data-dir {} {})",
                sent.message_id,
                args.dir.data_dir.display(),
                sent.message_id
            ))),
        }
    })
}

pub(super) fn chat(args: ChatArgs, out: &mut Out) -> Result<(), CliError> {
    let inbox = inbox(&args.dir.data_dir)?;
    runtime()?.block_on(async {
        let chat = match args.session {
            Some(id) => id,
            None => {
                inbox
                    .open_chat(&args.title)
                    .await
                    .map_err(|e| CliError::runtime(e.to_string()))?
                    .chat_session_id
            }
        };
        writeln!(
            out,
            "chat session {chat}: type a message and Enter; Ctrl-D ends"
        )?;
        out.flush()?;
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line.map_err(|e| CliError::runtime(format!("cannot read stdin: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let sent = inbox
                .send(&chat, &line)
                .await
                .map_err(|e| CliError::runtime(e.to_string()))?;
            let wait = Duration::from_secs(args.wait);
            match await_reply(&inbox, &chat, &sent.message_id, wait).await? {
                Some(Outcome::Answered(text)) => {
                    writeln!(out, "assistant: {}", printable_lines(&text))?
                }
                Some(Outcome::Failed(reason)) => writeln!(out, "failed: {}", printable(&reason))?,
                None => writeln!(out, "(no answer within {} s; it may still come)", args.wait)?,
            }
            out.flush()?;
        }
        Ok(())
    })
}
