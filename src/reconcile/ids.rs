//! Deterministic command ids: the same purpose always yields the same id.
//!
//! An id names the operation and what it is for, readably (`prompt:msg_17`), so `why` and a
//! backend's table of applied ids can be read by a person. Where one subject may need the same
//! operation again for a new reason, the id carries what makes the reason new: a rename carries
//! the seq of the title change it mirrors, an abort the moment the session became busy.

use crate::clock::Millis;
use crate::events::{AgentSessionId, ChatSessionId, CommandId, MessageId};

fn id(s: String) -> CommandId {
    CommandId(s)
}

/// A chat session for an agent session that has none.
pub fn create_session(agent: &AgentSessionId) -> CommandId {
    id(format!("createSession:{agent}"))
}

/// The rename mirroring the agent-side title change at `title_seq`.
pub fn rename_session(chat: &ChatSessionId, title_seq: u64) -> CommandId {
    id(format!("renameSession:{chat}@{title_seq}"))
}

/// Marking a chat session deleted (once: deleted is final).
pub fn mark_session_deleted(chat: &ChatSessionId) -> CommandId {
    id(format!("markSessionDeleted:{chat}"))
}

/// Marking a chat session failed (once: failed is final).
pub fn mark_session_failed(chat: &ChatSessionId) -> CommandId {
    id(format!("markSessionFailed:{chat}"))
}

/// Aborting an agent session stuck busy since `busy_since`.
pub fn abort_agent_session(agent: &AgentSessionId, busy_since: Millis) -> CommandId {
    id(format!("abortAgentSession:{agent}@{busy_since}"))
}

/// Creating the agent session a chat session's messages need.
pub fn create_agent_session(chat: &ChatSessionId) -> CommandId {
    id(format!("createAgentSession:{chat}"))
}

/// Recording in the backend the agent session created for a chat session.
pub fn link_agent_session(chat: &ChatSessionId, agent: &AgentSessionId) -> CommandId {
    id(format!("linkAgentSession:{chat}:{agent}"))
}

/// Prompting the agent with a user message.
pub fn prompt(message: &MessageId) -> CommandId {
    id(format!("prompt:{message}"))
}

/// Delivering a user message's answer to the backend.
pub fn complete_message(message: &MessageId) -> CommandId {
    complete_message_round(message, 0)
}

/// Delivering a user message's failure to the backend.
pub fn fail_message(message: &MessageId) -> CommandId {
    fail_message_round(message, 0)
}

/// Delivery round `round` of a message's answer: a round that gave up (dead letter, terminal
/// failure) is followed, after a backoff, by the next under a new id, since the backend applies
/// each id at most once. Round 0 has the plain id.
pub fn complete_message_round(message: &MessageId, round: u32) -> CommandId {
    with_round(format!("completeMessage:{message}"), round)
}

/// Delivery round `round` of a message's failure (see [`complete_message_round`]).
pub fn fail_message_round(message: &MessageId, round: u32) -> CommandId {
    with_round(format!("failMessage:{message}"), round)
}

fn with_round(base: String, round: u32) -> CommandId {
    if round == 0 {
        id(base)
    } else {
        id(format!("{base}#round{}", round + 1))
    }
}

/// What a command id is for: the inverse of the functions above, for retention, which must
/// know an entry's subject after the ledger has dropped its command body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// `createSession:{agent}`.
    CreateSession(AgentSessionId),
    /// `renameSession:{chat}@{title_seq}`.
    RenameSession(ChatSessionId, u64),
    /// `markSessionDeleted:{chat}`.
    MarkSessionDeleted(ChatSessionId),
    /// `markSessionFailed:{chat}`.
    MarkSessionFailed(ChatSessionId),
    /// `abortAgentSession:{agent}@{busy_since}`.
    AbortAgentSession(AgentSessionId, Millis),
    /// `createAgentSession:{chat}`.
    CreateAgentSession(ChatSessionId),
    /// `linkAgentSession:{chat}:{agent}`.
    LinkAgentSession(ChatSessionId, AgentSessionId),
    /// `prompt:{message}`.
    Prompt(MessageId),
    /// `completeMessage:{message}` or `failMessage:{message}`, any delivery round.
    Deliver(MessageId),
}

/// What `id` is for, if it has the form of one of the ids above. Chat session ids never hold
/// a `:` (they are `chat_` and hex, or Convex ids), so `linkAgentSession` splits at the first.
pub fn purpose(id: &CommandId) -> Option<Purpose> {
    let (op, rest) = id.0.split_once(':')?;
    let at = |rest: &str| {
        rest.rsplit_once('@')
            .and_then(|(s, n)| Some((s.to_owned(), n.parse::<u64>().ok()?)))
    };
    let round = |rest: &str| match rest.rsplit_once("#round") {
        Some((m, n)) if n.parse::<u32>().is_ok() => m.to_owned(),
        _ => rest.to_owned(),
    };
    Some(match op {
        "createSession" => Purpose::CreateSession(rest.into()),
        "renameSession" => at(rest).map(|(c, n)| Purpose::RenameSession(c.into(), n))?,
        "markSessionDeleted" => Purpose::MarkSessionDeleted(rest.into()),
        "markSessionFailed" => Purpose::MarkSessionFailed(rest.into()),
        "abortAgentSession" => at(rest).map(|(a, n)| Purpose::AbortAgentSession(a.into(), n))?,
        "createAgentSession" => Purpose::CreateAgentSession(rest.into()),
        "linkAgentSession" => {
            let (c, a) = rest.split_once(':')?;
            Purpose::LinkAgentSession(c.into(), a.into())
        }
        "prompt" => Purpose::Prompt(rest.into()),
        "completeMessage" | "failMessage" => Purpose::Deliver(round(rest).into()),
        _ => return None,
    })
}

/// The id a prompt's user message gets in the agent server, chosen when the prompt is planned
/// (at `now`, the `n`th prompt of that pass) and recorded in its `command_planned`, so every
/// attempt sends the same one and an attempt whose reply was lost can be looked up by it. It has
/// the form of OpenCode's own ids (`packages/opencode/src/id/id.ts`: `msg_`, 12 hex digits of
/// the low 48 bits of `ms * 4096 + counter`, 14 base62 characters), with `n` as the counter, so
/// ids sort by the time, then the order, in which their prompts were planned (the messages of a
/// chat are planned in the order they were written). The tail comes from a hash of the message
/// id: pure, and distinct per message.
pub fn agent_message_id(message: &MessageId, now: Millis, n: u64) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    message.hash(&mut h);
    let mut bits = h.finish();
    let stamp = (now.wrapping_mul(4096).wrapping_add(n.min(0xfff))) & 0xffff_ffff_ffff;
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut tail = String::with_capacity(14);
    for i in 0..14 {
        if i == 7 {
            // 64 bits give ~10 base62 digits: mix again for the rest.
            bits = bits.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
        }
        tail.push(BASE62[(bits % 62) as usize] as char);
        bits /= 62;
    }
    format!("msg_{stamp:012x}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_reads_back_as_the_purpose_it_was_made_for() {
        let (c, a, m) = (
            ChatSessionId::from("chat_9f"),
            AgentSessionId::from("ses_1"),
            MessageId::from("msg_2"),
        );
        let cases = [
            (create_session(&a), Purpose::CreateSession(a.clone())),
            (
                rename_session(&c, 42),
                Purpose::RenameSession(c.clone(), 42),
            ),
            (
                mark_session_deleted(&c),
                Purpose::MarkSessionDeleted(c.clone()),
            ),
            (
                mark_session_failed(&c),
                Purpose::MarkSessionFailed(c.clone()),
            ),
            (
                abort_agent_session(&a, 7_000),
                Purpose::AbortAgentSession(a.clone(), 7_000),
            ),
            (
                create_agent_session(&c),
                Purpose::CreateAgentSession(c.clone()),
            ),
            (
                link_agent_session(&c, &a),
                Purpose::LinkAgentSession(c.clone(), a.clone()),
            ),
            (prompt(&m), Purpose::Prompt(m.clone())),
            (complete_message(&m), Purpose::Deliver(m.clone())),
            (fail_message_round(&m, 3), Purpose::Deliver(m.clone())),
            (complete_message_round(&m, 12), Purpose::Deliver(m.clone())),
        ];
        for (id, want) in cases {
            assert_eq!(purpose(&id), Some(want), "{id}");
        }
        assert_eq!(purpose(&CommandId::from("nonsense")), None);
        assert_eq!(purpose(&CommandId::from("renameSession:c@x")), None);
    }

    #[test]
    fn agent_message_ids_have_opencodes_form_ascend_with_time_and_differ_per_message() {
        let a = agent_message_id(&MessageId("m1".into()), 1_796_100_954_171, 0);
        assert_eq!(a.len(), 4 + 12 + 14, "{a}");
        assert!(a.starts_with("msg_") && a[4..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(
            a,
            agent_message_id(&MessageId("m1".into()), 1_796_100_954_171, 0)
        );
        let later = agent_message_id(&MessageId("m1".into()), 1_796_100_954_172, 0);
        assert!(later > a, "{later} > {a}");
        // Two prompts of one pass, in the order planned, whatever their message ids hash to.
        let first = agent_message_id(&MessageId("zz".into()), 1_796_100_954_171, 0);
        let second = agent_message_id(&MessageId("aa".into()), 1_796_100_954_171, 1);
        assert!(second > first, "{second} > {first}");
        assert!(later > a, "{later} > {a}");
        assert_ne!(
            a,
            agent_message_id(&MessageId("m2".into()), 1_796_100_954_171, 0)
        );
    }
}
