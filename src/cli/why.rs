//! `why`: the causal chain of an id — the observations that led to it, the events about it,
//! and the outcomes that followed.
//!
//! It reads the live log whole, but of the archive only the segments whose index mentions the
//! id, then, until nothing new turns up, those holding a cause not found yet (by the range of
//! event ids each segment holds) and those whose index names a reached event as the cause of
//! one of theirs: the chain is the same as on a log that was never archived.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;

use uuid::Uuid;

use std::ops::RangeInclusive;

use super::{open_log, render, CliError, Out, WhyArgs};
use crate::events::Envelope;
use crate::log::{ArchiveIndex, EventLog, SegmentInfo};

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

/// `id` as it appears inside a JSON string in a stored event.
fn needle(id: &str) -> String {
    let quoted = serde_json::to_string(id).expect("strings serialize");
    quoted[1..quoted.len() - 1].to_owned()
}

/// What the passes keep of the events read: each event's id and cause, and the subjects.
#[derive(Default)]
struct Scan {
    seq_of: HashMap<Uuid, u64>,
    cause_of: HashMap<u64, Uuid>,
    by_seq: Vec<(u64, Uuid)>,
    subjects: Vec<u64>,
    /// The archive segments read (by first seq).
    opened: HashSet<u64>,
}

impl Scan {
    fn read(
        &mut self,
        log: &EventLog,
        range: RangeInclusive<u64>,
        id: &str,
    ) -> Result<(), CliError> {
        let event_id = Uuid::parse_str(id).ok();
        // Every event about `id` holds it in its bytes: only those are decoded whole. An event
        // id may be written in another case than the log's: then every event is.
        let needle = event_id.is_none().then(|| needle(id));
        for link in log.read_links(range, needle.as_deref()) {
            let link = link?;
            self.seq_of.insert(link.id, link.seq);
            self.by_seq.push((link.seq, link.id));
            if let Some(c) = link.cause {
                self.cause_of.insert(link.seq, c);
            }
            if link.event.is_some_and(|e| mentions(&e, id, event_id)) {
                self.subjects.push(link.seq);
            }
        }
        Ok(())
    }

    /// Reads the segments not read yet; returns how many.
    fn read_segments(
        &mut self,
        log: &EventLog,
        segs: Vec<SegmentInfo>,
        id: &str,
    ) -> Result<usize, CliError> {
        let mut read = 0;
        for seg in segs {
            if self.opened.insert(seg.first_seq) {
                self.read(log, seg.first_seq..=seg.last_seq, id)?;
                read += 1;
            }
        }
        Ok(read)
    }

    /// The subjects and, back through causes, what led to them.
    fn causes(&self) -> BTreeMap<u64, Role> {
        let mut chain: BTreeMap<u64, Role> =
            self.subjects.iter().map(|&s| (s, Role::Subject)).collect();
        for &s in &self.subjects {
            let mut at = s;
            while let Some(&seq) = self.cause_of.get(&at).and_then(|c| self.seq_of.get(c)) {
                if chain.contains_key(&seq) {
                    break;
                }
                chain.insert(seq, Role::Cause);
                at = seq;
            }
        }
        chain
    }

    /// Causes named in the chain that are in none of the events read.
    fn missing_causes(&self, chain: &BTreeMap<u64, Role>) -> Vec<Uuid> {
        chain
            .keys()
            .filter_map(|s| self.cause_of.get(s))
            .filter(|c| !self.seq_of.contains_key(c))
            .copied()
            .collect()
    }

    /// Adds to `chain` everything caused by a subject or an outcome (causes only point
    /// backwards, so one pass in seq order finds the whole closure); returns the ids reached.
    fn outcomes(&self, chain: &mut BTreeMap<u64, Role>) -> HashSet<Uuid> {
        let Some(&first) = self.subjects.first() else {
            return HashSet::new();
        };
        let mut reached: HashSet<Uuid> = HashSet::new();
        for &(seq, id) in self.by_seq.iter().filter(|(s, _)| *s >= first) {
            let role = chain.get(&seq).copied();
            if matches!(role, Some(Role::Subject) | Some(Role::Outcome)) {
                reached.insert(id);
            } else if self.cause_of.get(&seq).is_some_and(|c| reached.contains(c)) {
                chain.insert(seq, Role::Outcome);
                reached.insert(id);
            }
        }
        reached
    }

    /// The chain of the events read so far, and the archive segments it still needs: those
    /// holding a missing cause, and those with an effect of a reached event.
    fn chain(&mut self, index: &ArchiveIndex) -> (BTreeMap<u64, Role>, Vec<SegmentInfo>) {
        self.by_seq.sort_unstable();
        self.subjects.sort_unstable();
        let mut chain = self.causes();
        let reached = self.outcomes(&mut chain);
        let mut more = Vec::new();
        for cause in self.missing_causes(&chain) {
            more.extend(index.segments_mentioning(&cause.to_string()));
        }
        for id in reached {
            more.extend(index.segments_mentioning(&id.to_string()));
        }
        more.retain(|s| !self.opened.contains(&s.first_seq));
        (chain, more)
    }
}

/// Reads what the chain of `id` needs, and returns it: the archive segments whose index
/// mentions `id`, the live log, then, until the chain stops growing, the segments it reaches.
fn chain(log: &EventLog, id: &str) -> Result<BTreeMap<u64, Role>, CliError> {
    let index = log.archive_index()?;
    let mut scan = Scan::default();
    scan.read_segments(log, index.segments_mentioning(id), id)?;
    scan.read(log, log.archived_through() + 1..=u64::MAX, id)?;
    loop {
        if scan.subjects.is_empty() {
            return Err(CliError::runtime(format!(
                "no event in the log mentions `{id}`"
            )));
        }
        let (chain, more) = scan.chain(&index);
        if scan.read_segments(log, more, id)? == 0 {
            tracing::debug!(
                segments = scan.opened.len(),
                events = scan.by_seq.len(),
                "why: read"
            );
            return Ok(chain);
        }
    }
}

pub(super) fn run(a: WhyArgs, out: &mut Out) -> Result<(), CliError> {
    let log = open_log(&a.dir)?;
    let chain = chain(&log, &a.id)?;
    print(&log, &a, chain, out)
}

fn print(
    log: &EventLog,
    a: &WhyArgs,
    chain: BTreeMap<u64, Role>,
    out: &mut Out,
) -> Result<(), CliError> {
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
