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

fn checkpoint<P: Projection>(store: &crate::log::CheckpointStore, last: u64) -> CheckpointStats {
    // The header only: `rebuild --verify` is what reads a checkpoint whole and checks it.
    let (seq, version, note) = match store.header(P::NAME) {
        Ok(Some((seq, version))) => {
            let note = (version != P::VERSION).then(|| "other version: will be rebuilt".to_owned());
            (Some(seq), Some(version), note)
        }
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
    let store = log.checkpoints();
    for p in ProjectionName::ALL {
        s.checkpoints.push(match p {
            ProjectionName::Sessions => checkpoint::<SessionsView>(&store, last),
            ProjectionName::Messages => checkpoint::<MessagesView>(&store, last),
            ProjectionName::Commands => checkpoint::<CommandLedger>(&store, last),
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
