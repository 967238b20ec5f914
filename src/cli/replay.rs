//! `replay` (the timeline, or a view as it was) and `export` (JSON lines).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use tokio_stream::StreamExt;

use super::{open_log, render, CliError, ExportArgs, Out, ReplayArgs};
use crate::log::{load_views, LogError, ReadFilter};
use crate::projections::{ProjectionName, Views};
use crate::text::printable;

pub(super) fn run(a: ReplayArgs, out: &mut Out) -> Result<(), CliError> {
    let log = open_log(&a.dir)?;
    if let (Some(at), Some(view)) = (a.at, a.view) {
        return print_view(&log, at, view, a.json, out);
    }
    let filter = ReadFilter {
        range: a.from.unwrap_or(1)..=a.to.unwrap_or(u64::MAX),
        session: a.session,
        kinds: (!a.kind.is_empty()).then_some(a.kind),
    };
    let log = Arc::new(log);
    if !a.json {
        render::header(out)?;
    }
    let mut seqs = HashMap::new();
    let mut skipped = 0u64;
    let mut skipped_segments = 0u64;
    stream_each(&log, filter, |item| match item {
        Ok(e) => {
            if a.json {
                serde_json::to_writer(&mut *out, &e).map_err(std::io::Error::from)?;
                writeln!(out)?;
            } else {
                render::row(out, &e, &seqs)?;
                seqs.insert(e.id, e.seq);
            }
            Ok(())
        }
        Err(LogError::Corrupt { seq, source }) if a.skip_corrupt => {
            skipped += 1;
            tracing::warn!(seq, error = %source, "skipping corrupt event");
            eprintln!(
                "agentsync: warning: skipped seq {seq}: {}",
                printable(&source.to_string())
            );
            Ok(())
        }
        Err(e @ (LogError::Segment { .. } | LogError::ArchiveGap { .. })) if a.skip_corrupt => {
            skipped_segments += 1;
            tracing::warn!(error = %e, "skipping damaged archive");
            eprintln!("agentsync: warning: skipped {}", printable(&e.to_string()));
            Ok(())
        }
        Err(e) => Err(e.into()),
    })?;
    if skipped > 0 {
        eprintln!("agentsync: warning: {skipped} corrupt event(s) skipped (--skip-corrupt)");
    }
    if skipped_segments > 0 {
        eprintln!(
            "agentsync: warning: {skipped_segments} damaged archive segment(s) or gap(s) skipped (--skip-corrupt): their events are missing above"
        );
    }
    Ok(())
}

pub(super) fn export(a: ExportArgs, out: &mut Out) -> Result<(), CliError> {
    let log = Arc::new(open_log(&a.dir)?);
    stream_each(&log, ReadFilter::from(a.from), |item| {
        serde_json::to_writer(&mut *out, &item?).map_err(std::io::Error::from)?;
        writeln!(out)?;
        Ok(())
    })
}

/// Feeds every event of the log's async stream (scanned on a blocking thread) to `f`, stopping
/// at the first error `f` returns.
fn stream_each(
    log: &Arc<crate::log::EventLog>,
    filter: ReadFilter,
    mut f: impl FnMut(Result<crate::events::Envelope, LogError>) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let stream = log.stream(filter);
        tokio::pin!(stream);
        while let Some(item) = stream.next().await {
            f(item)?;
        }
        Ok(())
    })
}

fn print_view(
    log: &crate::log::EventLog,
    at: u64,
    view: ProjectionName,
    json: bool,
    out: &mut Out,
) -> Result<(), CliError> {
    let last = log.last_seq();
    if at > last {
        return Err(CliError {
            code: 2,
            message: format!("--at {at} is past the end of the log (last seq {last})"),
        });
    }
    let (views, _) = load_views(log, Some(at), Some(view), false, |_| {})?;
    if json {
        let doc = serde_json::json!({
            "view": view.as_str(),
            "version": view.version(),
            "seq": at,
            "state": views.to_json(view),
        });
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "{view} as of seq {at}")?;
    print_table(&views, view, out)?;
    Ok(())
}

fn print_table(views: &Views, view: ProjectionName, out: &mut Out) -> std::io::Result<()> {
    let t = render::time;
    match view {
        ProjectionName::Sessions => {
            let s = &views.sessions.state;
            writeln!(out, "\nchat sessions ({})", s.chat.len())?;
            writeln!(
                out,
                "{:<24} {:<8} {:<24} {:<5} {:<24} TITLE",
                "CHAT", "STATUS", "AGENT", "LINK", "LAST ACTIVITY"
            )?;
            for (id, c) in &s.chat {
                writeln!(
                    out,
                    "{:<24} {:<8} {:<24} {:<5} {:<24} {:?}",
                    printable(id.as_str()),
                    format!("{:?}", c.status).to_lowercase(),
                    printable(
                        c.agent_session_id
                            .as_ref()
                            .map(|a| a.as_str())
                            .unwrap_or("-")
                    ),
                    if c.link_confirmed { "yes" } else { "no" },
                    t(c.last_activity),
                    c.title
                )?;
            }
            writeln!(out, "\nagent sessions ({})", s.agent.len())?;
            writeln!(
                out,
                "{:<24} {:<8} {:<24} {:<24} TITLE",
                "AGENT", "STATUS", "BUSY SINCE", "MODEL"
            )?;
            for (id, a) in &s.agent {
                let status = match &a.status {
                    crate::events::AgentStatus::Idle => "idle".to_owned(),
                    crate::events::AgentStatus::Busy => "busy".to_owned(),
                    crate::events::AgentStatus::Retry { attempt, .. } => format!("retry#{attempt}"),
                };
                writeln!(
                    out,
                    "{:<24} {:<8} {:<24} {:<24} {:?}",
                    printable(id.as_str()),
                    status,
                    a.busy_since.map(t).unwrap_or_else(|| "-".into()),
                    printable(
                        &a.model
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_else(|| "-".into())
                    ),
                    a.title
                )?;
            }
            writeln!(out, "\nlistings")?;
            for (source, l) in &s.listings {
                writeln!(
                    out,
                    "{source:<8} last complete seq {}  last failure seq {} {}",
                    l.last_complete_seq
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    l.last_failure_seq
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    printable(l.last_error.as_deref().unwrap_or(""))
                )?;
            }
        }
        ProjectionName::Messages => {
            let m = &views.messages.state;
            writeln!(
                out,
                "{:<24} {:<24} {:<10} {:>8} {:<9} REASON",
                "MESSAGE", "CHAT", "STATE", "ATTEMPTS", "DELIVERED"
            )?;
            for (id, r) in &m.messages {
                writeln!(
                    out,
                    "{:<24} {:<24} {:<10} {:>8} {:<9} {}",
                    printable(id.as_str()),
                    printable(r.chat_session_id.as_str()),
                    format!("{:?}", r.state).to_lowercase(),
                    r.attempts,
                    if r.delivered { "yes" } else { "no" },
                    printable(r.reason.as_deref().unwrap_or(""))
                )?;
            }
        }
        ProjectionName::Commands => {
            let c = &views.commands.state;
            writeln!(
                out,
                "{:<40} {:<18} {:<10} {:>8} {:<24} LAST ERROR",
                "COMMAND", "OP", "STATE", "ATTEMPTS", "NEXT ATTEMPT"
            )?;
            for (id, e) in &c.commands {
                writeln!(
                    out,
                    "{:<40} {:<18} {:<10} {:>8} {:<24} {}",
                    printable(id.as_str()),
                    e.op.name(),
                    format!("{:?}", e.state).to_lowercase(),
                    e.attempts,
                    e.next_attempt_at().map(t).unwrap_or_else(|| "-".into()),
                    printable(e.last_error.as_deref().unwrap_or(""))
                )?;
            }
        }
    }
    Ok(())
}
