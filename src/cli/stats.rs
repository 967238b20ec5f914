//! `stats`: what the log holds and how far behind the checkpoints are.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use super::{open_log, render, CliError, Out, StatsArgs};
use crate::log::{LogError, ReadFilter};
use crate::projections::{CommandLedger, MessagesView, Projection, ProjectionName, SessionsView};

#[derive(Debug, Serialize)]
struct Stats {
    events: u64,
    first_seq: Option<u64>,
    last_seq: u64,
    first_at: Option<String>,
    last_at: Option<String>,
    by_kind: BTreeMap<&'static str, u64>,
    corrupt: Vec<u64>,
    size_on_disk_bytes: u64,
    archive: ArchiveStats,
    checkpoints: Vec<CheckpointStats>,
}

#[derive(Debug, Serialize)]
struct ArchiveStats {
    /// Segment files.
    segments: usize,
    /// The last seq in the archive (0: none); the live log starts after it.
    archived_through: u64,
    /// Seqs up to this one were deleted for good (0: none).
    dropped_through: u64,
    /// What cannot be read: damaged segments and gaps, one message each.
    damaged: Vec<String>,
}

#[derive(Debug, Serialize)]
struct CheckpointStats {
    projection: &'static str,
    /// None: no usable checkpoint.
    seq: Option<u64>,
    version: Option<u32>,
    current_version: u32,
    /// Events a start would have to apply after it.
    lag: u64,
    note: Option<String>,
}

/// What the next start does with a checkpoint of `version` of projection `P`, when not the
/// current one: rebuilds it from the log, upcasts it (the sessions view of the version before,
/// on a log that cannot rebuild it), or fails (`dropped`: events deleted with the archive).
fn other_version<P: Projection>(version: u32, dropped: u64) -> Option<String> {
    let upcast = P::NAME == SessionsView::NAME && version == crate::log::SESSIONS_UPCASTS_FROM;
    match (version == P::VERSION, dropped) {
        (true, _) => None,
        (false, 0) => Some("other version: will be rebuilt".to_owned()),
        (false, _) if upcast => {
            Some("other version: will be upcast (the log cannot rebuild it)".to_owned())
        }
        (false, d) => Some(format!(
            "other version: cannot be rebuilt (events through seq {d} were deleted); a start fails"
        )),
    }
}

fn checkpoint<P: Projection>(
    store: &crate::log::CheckpointStore,
    last: u64,
    dropped: u64,
) -> CheckpointStats {
    // The header only: `rebuild --verify` is what reads a checkpoint whole and checks it.
    let (seq, version, note) = match store.header(P::NAME) {
        Ok(Some((seq, version))) => (
            Some(seq),
            Some(version),
            other_version::<P>(version, dropped),
        ),
        Ok(None) => (None, None, Some("none".to_owned())),
        Err(e) => (None, None, Some(e.to_string())),
    };
    let usable = version == Some(P::VERSION);
    CheckpointStats {
        projection: P::NAME,
        seq,
        version,
        current_version: P::VERSION,
        lag: if usable {
            last.saturating_sub(seq.unwrap_or(0))
        } else {
            last
        },
        note,
    }
}

pub(super) fn run(a: StatsArgs, out: &mut Out) -> Result<(), CliError> {
    let log = open_log(&a.dir)?;
    let last = log.last_seq();
    let mut s = Stats {
        events: 0,
        first_seq: None,
        last_seq: last,
        first_at: None,
        last_at: None,
        by_kind: BTreeMap::new(),
        corrupt: Vec::new(),
        size_on_disk_bytes: log.size_on_disk()?,
        archive: ArchiveStats {
            segments: log.segments().len(),
            archived_through: log.archived_through(),
            dropped_through: log.dropped_through(),
            damaged: Vec::new(),
        },
        checkpoints: Vec::new(),
    };
    for item in log.read(ReadFilter::default()) {
        match item {
            Ok(e) => {
                s.events += 1;
                s.first_seq.get_or_insert(e.seq);
                if s.first_at.is_none() {
                    s.first_at = Some(render::time(e.at));
                }
                s.last_at = Some(render::time(e.at));
                *s.by_kind.entry(e.kind().name()).or_default() += 1;
            }
            Err(LogError::Corrupt { seq, .. }) => s.corrupt.push(seq),
            Err(e @ (LogError::Segment { .. } | LogError::ArchiveGap { .. })) => {
                s.archive.damaged.push(e.to_string())
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (store, dropped) = (log.checkpoints(), log.dropped_through());
    for p in ProjectionName::ALL {
        s.checkpoints.push(match p {
            ProjectionName::Sessions => checkpoint::<SessionsView>(&store, last, dropped),
            ProjectionName::Messages => checkpoint::<MessagesView>(&store, last, dropped),
            ProjectionName::Commands => checkpoint::<CommandLedger>(&store, last, dropped),
        });
    }
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &s).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(out, "data dir      {}", log.dir().display())?;
        writeln!(
            out,
            "events        {} (seq {}..={})",
            s.events,
            s.first_seq.unwrap_or(0),
            s.last_seq
        )?;
        writeln!(
            out,
            "time          {} .. {}",
            s.first_at.as_deref().unwrap_or("-"),
            s.last_at.as_deref().unwrap_or("-")
        )?;
        writeln!(
            out,
            "size on disk  {:.1} MiB ({} bytes)",
            s.size_on_disk_bytes as f64 / 1048576.0,
            s.size_on_disk_bytes
        )?;
        writeln!(
            out,
            "archive       {} segment(s), seqs through {}{}",
            s.archive.segments,
            s.archive.archived_through,
            if s.archive.dropped_through > 0 {
                format!(" (through {} dropped)", s.archive.dropped_through)
            } else {
                String::new()
            }
        )?;
        writeln!(out, "\n{:<24} {:>10}", "KIND", "COUNT")?;
        for (k, n) in &s.by_kind {
            writeln!(out, "{k:<24} {n:>10}")?;
        }
        writeln!(
            out,
            "\n{:<10} {:>10} {:>8} {:>10}  NOTE",
            "CHECKPOINT", "SEQ", "VERSION", "LAG"
        )?;
        for c in &s.checkpoints {
            writeln!(
                out,
                "{:<10} {:>10} {:>8} {:>10}  {}",
                c.projection,
                c.seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                c.version
                    .map(|v| format!("v{v}"))
                    .unwrap_or_else(|| "-".into()),
                c.lag,
                c.note.as_deref().unwrap_or("")
            )?;
        }
    }
    if let Some(first) = s.archive.damaged.first() {
        return Err(CliError::runtime(format!(
            "{} damaged archive segment(s) or gap(s): {first}",
            s.archive.damaged.len()
        )));
    }
    if !s.corrupt.is_empty() {
        return Err(CliError::runtime(format!(
            "{} corrupt event(s), first at seq {} (replay --skip-corrupt passes over them)",
            s.corrupt.len(),
            s.corrupt[0]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: on a log whose oldest segments were deleted, `stats` said a sessions
    /// view of the version before would be rebuilt, where the start upcasts it.
    #[test]
    fn a_checkpoint_of_another_version_says_what_the_next_start_does_with_it() {
        let before = crate::log::SESSIONS_UPCASTS_FROM;
        assert_eq!(
            other_version::<SessionsView>(SessionsView::VERSION, 9),
            None
        );
        let note = |n: Option<String>| n.unwrap_or_default();
        assert!(note(other_version::<SessionsView>(before, 0)).contains("will be rebuilt"));
        assert!(note(other_version::<SessionsView>(before, 9)).contains("will be upcast"));
        let older = note(other_version::<SessionsView>(before - 1, 9));
        assert!(
            older.contains("seq 9 were deleted); a start fails"),
            "{older}"
        );
        let ledger = note(other_version::<CommandLedger>(0, 9));
        assert!(ledger.contains("a start fails"), "{ledger}");
    }
}
