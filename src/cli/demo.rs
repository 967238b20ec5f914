//! `agentsync demo`: the production incident, simulated, through a real worker and a real log.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::{CliError, DemoArgs, Out};
use crate::clock::SystemClock;
use crate::dispatch::DispatchConfig;
use crate::sim::incident::{self, Incident, Summary};

pub(super) fn run(args: DemoArgs, out: &mut Out) -> Result<(), CliError> {
    let dir = match args.data_dir {
        Some(dir) => {
            let used = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
            if used {
                return Err(CliError::usage(format!(
                    "{} is not empty: the demo writes a new log; give a new or empty directory",
                    dir.display()
                )));
            }
            dir
        }
        None => std::env::temp_dir().join(format!("agentsync-demo-{}", uuid::Uuid::now_v7())),
    };
    if args.scale == 0 {
        return Err(CliError::usage("--scale must be at least 1"));
    }
    let scenario = Incident {
        scale: args.scale,
        ..Incident::default()
    };
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))?;
    let summary = runtime
        .block_on(incident::run(
            &dir,
            &scenario,
            DispatchConfig::default(),
            Arc::new(SystemClock),
        ))
        .map_err(|e| CliError::runtime(e.to_string()))?;
    if args.json {
        serde_json::to_writer(&mut *out, &summary).map_err(|e| CliError::runtime(e.to_string()))?;
        writeln!(out)?;
    } else {
        print_summary(&summary, &dir, out)?;
    }
    Ok(())
}

fn print_summary(s: &Summary, dir: &Path, out: &mut Out) -> Result<(), CliError> {
    writeln!(out, "agentsync demo: the incident, simulated")?;
    writeln!(out, "  log:                        {}", dir.display())?;
    let ready = s
        .time_to_ready_ms
        .map_or("never".into(), |ms| format!("{ms} ms"));
    writeln!(out, "  time to Ready:              {ready}")?;
    writeln!(out, "  converged in:               {} ms", s.converge_ms)?;
    writeln!(out, "  model fetches:              {}", s.model_fetches)?;
    writeln!(
        out,
        "  peak in flight:             {} (agent {}, backend {})",
        s.peak_in_flight,
        s.peak_in_flight_by_side.get("agent").copied().unwrap_or(0),
        s.peak_in_flight_by_side
            .get("backend")
            .copied()
            .unwrap_or(0)
    )?;
    writeln!(
        out,
        "  messages answered / failed: {} / {}",
        s.messages_answered, s.messages_failed
    )?;
    writeln!(out, "  deletions:                  {}", s.deletions)?;
    writeln!(
        out,
        "  deletions from the failed listing: {}",
        s.deletions_from_failed_listing
    )?;
    writeln!(out, "  commands:")?;
    for (op, states) in &s.commands {
        let states: Vec<String> = states.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(out, "    {op:<20} {}", states.join(", "))?;
    }
    writeln!(out, "  events in the log:          {}", s.events)?;
    writeln!(out)?;
    writeln!(out, "Look around:")?;
    writeln!(out, "  agentsync stats  --data-dir {}", dir.display())?;
    writeln!(
        out,
        "  agentsync replay --data-dir {} --kind command_planned",
        dir.display()
    )?;
    writeln!(
        out,
        "  agentsync why    --data-dir {} failMessage:msg_stale_00_000",
        dir.display()
    )?;
    Ok(())
}
