//! `rebuild`: projections from scratch, or `--verify` against the stored checkpoints.

use std::io::Write;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{open_log, CliError, Out, RebuildArgs};
use crate::log::{load_views, verify_checkpoint, EventLog, Verification};
use crate::projections::{ProjectionName, Views};

/// A progress bar on stderr; invisible when stderr is not a terminal.
fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Folds from scratch up to `upto`, with a progress bar.
fn rebuild(
    log: &EventLog,
    upto: u64,
    only: Option<ProjectionName>,
    what: &str,
) -> Result<(Views, u64), CliError> {
    let bar = progress(upto, what);
    let (views, catch_up) = load_views(log, Some(upto), only, true, |seq| {
        if seq % 4096 == 0 {
            bar.set_position(seq);
        }
    })?;
    bar.finish_and_clear();
    Ok((views, catch_up.applied))
}

pub(super) fn run(a: RebuildArgs, out: &mut Out) -> Result<(), CliError> {
    let log = open_log(&a.dir)?;
    let selected: Vec<ProjectionName> = match a.projection {
        Some(p) => vec![p],
        None => ProjectionName::ALL.to_vec(),
    };
    if a.verify {
        return verify(&log, &selected, out);
    }
    let last = log.last_seq();
    let started = Instant::now();
    let (views, applied) = rebuild(&log, last, a.projection, "rebuilding")?;
    let secs = started.elapsed().as_secs_f64();
    let store = log.checkpoints();
    for &p in &selected {
        match p {
            ProjectionName::Sessions => store.save(&views.sessions)?,
            ProjectionName::Messages => store.save(&views.messages)?,
            ProjectionName::Commands => store.save(&views.commands)?,
        }
        writeln!(
            out,
            "rebuilt {p} v{} through seq {last}; checkpoint written",
            p.version()
        )?;
    }
    writeln!(
        out,
        "{applied} events folded in {:.0} ms ({:.0} events/s)",
        secs * 1000.0,
        applied as f64 / secs.max(1e-9)
    )?;
    Ok(())
}

fn verify(log: &EventLog, selected: &[ProjectionName], out: &mut Out) -> Result<(), CliError> {
    let mut problems = 0usize;
    for &p in selected {
        let bar = progress(log.last_seq(), "verifying");
        let found = verify_checkpoint(log, p, |seq| {
            if seq % 4096 == 0 {
                bar.set_position(seq);
            }
        })?;
        bar.finish_and_clear();
        match found {
            Verification::Missing => writeln!(out, "{p}: no checkpoint to verify")?,
            Verification::Matches { seq } => writeln!(
                out,
                "{p}: checkpoint at seq {seq} matches a rebuild from scratch"
            )?,
            Verification::Unusable(why) => {
                problems += 1;
                writeln!(out, "{p}: {why}")?;
            }
            Verification::Differs { seq, diffs } => {
                problems += diffs.len();
                writeln!(
                    out,
                    "{p}: checkpoint at seq {seq} differs from a rebuild in {} place(s) (checkpoint -> rebuilt):",
                    diffs.len()
                )?;
                for d in diffs {
                    writeln!(out, "  {}", crate::text::printable(&d))?;
                }
            }
        }
    }
    if problems > 0 {
        return Err(CliError::runtime(format!(
            "verify found {problems} difference(s)"
        )));
    }
    Ok(())
}
