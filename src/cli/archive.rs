//! `archive`: moves old, checkpoint-covered events into compressed segments (`DIR/archive/`).

use std::io::Write;
use std::time::Duration;

use super::{open_log, ArchiveArgs, CliError, Out};
use crate::log::{ArchiveOptions, ArchiveReport, CompactReport};

const DAY: Duration = Duration::from_secs(24 * 3600);

pub(super) fn run(a: ArchiveArgs, out: &mut Out) -> Result<(), CliError> {
    if let Some(drop) = a.drop_older_than_days {
        if drop <= a.older_than_days {
            return Err(CliError::usage(format!(
                "--drop-older-than-days ({drop}) must be more than --older-than-days ({})",
                a.older_than_days
            )));
        }
    }
    let opts = ArchiveOptions {
        older_than: DAY * a.older_than_days,
        drop_older_than: a.drop_older_than_days.map(|d| DAY * d),
        ..ArchiveOptions::default()
    };
    let log = open_log(&a.dir)?;
    let report = log.archive(&opts, now_ms())?;
    if let Some(why) = &report.not_covered {
        eprintln!("agentsync: note: {why}; they stay in the live log (a running worker writes checkpoints, or run `agentsync rebuild`)");
    }
    if !a.json {
        print(&report, out)?;
    }
    let compacted = match a.compact {
        true => Some(log.compact().map_err(|e| {
            let done = format!("{} event(s) were archived", report.archived);
            CliError::runtime(format!("{done}, but {e}"))
        })?),
        false => None,
    };
    if a.json {
        let both = Report { report, compacted };
        serde_json::to_writer_pretty(&mut *out, &both).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if let Some(c) = compacted {
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            out,
            "compacted the log database: {:.1} MB -> {:.1} MB ({} entries)",
            mb(c.bytes_before),
            mb(c.bytes_after),
            c.entries
        )?;
    }
    Ok(())
}

/// `--json`: the archive's report, and the compaction's when asked for.
#[derive(serde::Serialize)]
struct Report {
    #[serde(flatten)]
    report: ArchiveReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    compacted: Option<CompactReport>,
}

fn print(r: &ArchiveReport, out: &mut Out) -> std::io::Result<()> {
    writeln!(
        out,
        "archived {} event(s) into {} new segment(s); the archive holds seqs through {}, the live log starts at seq {}",
        r.archived,
        r.segments.len(),
        r.archived_through,
        r.archived_through + 1
    )?;
    for s in &r.segments {
        writeln!(out, "  {}", s.display())?;
    }
    if r.leftovers_removed > 0 {
        writeln!(
            out,
            "removed {} event(s) an interrupted run had archived but left in the live log",
            r.leftovers_removed
        )?;
    }
    if r.dropped_segments > 0 {
        writeln!(
            out,
            "deleted {} segment(s): seqs through {} are gone for good",
            r.dropped_segments, r.dropped_through
        )?;
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
