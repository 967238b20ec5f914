//! `why`: the causal chain of an id — the observations that led to it, the events about it,
//! and the outcomes that followed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;

use uuid::Uuid;

use super::{open_log, render, CliError, Out, WhyArgs};
use crate::events::Envelope;
use crate::log::ReadFilter;

/// An event's place in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Cause,
    Subject,
    Outcome,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Cause => "cause",
            Role::Subject => "subject",
            Role::Outcome => "outcome",
        }
    }
}

/// Whether `e` is about `id` (its event id, when `id` parses as one, or a command, message or
/// session id it names).
fn mentions(e: &Envelope, id: &str, event_id: Option<Uuid>) -> bool {
    event_id == Some(e.id)
        || e.event.command_id().is_some_and(|c| c.as_str() == id)
        || e.event.message_id().is_some_and(|m| m.as_str() == id)
        || e.event.session_ids().contains(&id)
}

pub(super) fn run(a: WhyArgs, out: &mut Out) -> Result<(), CliError> {
    let log = open_log(&a.dir)?;
    // One pass keeps only what the chain needs: each event's id and cause, and the subjects.
    let event_id = Uuid::parse_str(&a.id).ok();
    let mut seq_of: HashMap<Uuid, u64> = HashMap::new();
    let mut cause_of: HashMap<u64, Uuid> = HashMap::new();
    let mut by_seq: Vec<(u64, Uuid)> = Vec::new(); // in seq order, as read
    let mut subjects: Vec<u64> = Vec::new();
    for item in log.read(ReadFilter::default()) {
        let e = item?;
        seq_of.insert(e.id, e.seq);
        by_seq.push((e.seq, e.id));
        if let Some(c) = e.cause {
            cause_of.insert(e.seq, c);
        }
        if mentions(&e, &a.id, event_id) {
            subjects.push(e.seq);
        }
    }
    if subjects.is_empty() {
        return Err(CliError::runtime(format!(
            "no event in the log mentions `{}`",
            a.id
        )));
    }
    let mut chain: BTreeMap<u64, Role> = subjects.iter().map(|&s| (s, Role::Subject)).collect();
    // Back through causes.
    for &s in &subjects {
        let mut at = s;
        while let Some(seq) = cause_of.get(&at).and_then(|c| seq_of.get(c)).copied() {
            if chain.contains_key(&seq) {
                break;
            }
            chain.insert(seq, Role::Cause);
            at = seq;
        }
    }
    // Forward to everything caused by a subject or an outcome (causes only point backwards,
    // so one pass in seq order finds the whole closure).
    let first = subjects[0];
    let mut reached: HashSet<Uuid> = HashSet::new();
    for (seq, id) in by_seq.into_iter().filter(|(s, _)| *s >= first) {
        let role = chain.get(&seq).copied();
        if matches!(role, Some(Role::Subject) | Some(Role::Outcome)) {
            reached.insert(id);
        } else if cause_of.get(&seq).is_some_and(|c| reached.contains(c)) {
            chain.insert(seq, Role::Outcome);
            reached.insert(id);
        }
    }
    let mut shown: HashMap<Uuid, u64> = HashMap::new();
    if !a.json {
        writeln!(
            out,
            "why {}: {} event(s) about it, {} leading to them, {} following from them\n",
            crate::text::printable(&a.id),
            chain.values().filter(|r| **r == Role::Subject).count(),
            chain.values().filter(|r| **r == Role::Cause).count(),
            chain.values().filter(|r| **r == Role::Outcome).count(),
        )?;
        write!(out, "{:<8}  ", "ROLE")?;
        render::header(out)?;
    }
    for (seq, role) in chain {
        let Some(e) = log.get(seq)? else { continue };
        if a.json {
            let line = serde_json::json!({ "role": role.name(), "event": e });
            serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::from)?;
            writeln!(out)?;
        } else {
            write!(out, "{:<8}  ", role.name())?;
            render::row(out, &e, &shown)?;
            shown.insert(e.id, e.seq);
        }
    }
    Ok(())
}
