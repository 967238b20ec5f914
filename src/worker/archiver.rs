//! The archive schedule of `agentsync run`: every so often, events older than the retention
//! window and covered by every checkpoint move from sled into compressed segments
//! (`EventLog::archive`), so the live log holds only the window, whatever the history.
//!
//! It runs beside the worker's loop, never in it: an archive run reads and compresses up to
//! a day of events, and the loop must keep observing meanwhile. `EventLog::archive` is safe
//! beside appends and reads, takes its own lock against a second run, and is crash-safe at
//! every step (a segment is durable before its events leave sled), so the task may simply be
//! dropped at shutdown.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, Millis};
use crate::log::{ArchiveOptions, EventLog};

/// When and what the worker archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSchedule {
    /// What to archive (the window, and whether old segments are deleted).
    pub options: ArchiveOptions,
    /// The first run this long after start: the first checkpoints of the process come first.
    pub first_after_ms: Millis,
    /// Then a run this often.
    pub every_ms: Millis,
}

impl Default for ArchiveSchedule {
    fn default() -> Self {
        Self {
            options: ArchiveOptions::default(),
            first_after_ms: 5 * 60 * 1000,
            every_ms: 60 * 60 * 1000,
        }
    }
}

/// Archives on `schedule` until dropped. A failed run is logged and tried again at the next
/// tick: the live log only grows meanwhile, nothing is lost.
pub async fn archive_on_schedule(
    log: Arc<EventLog>,
    clock: Arc<dyn Clock>,
    schedule: ArchiveSchedule,
) {
    let mut wait = schedule.first_after_ms;
    loop {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        wait = schedule.every_ms.max(1);
        let (log, opts, now) = (log.clone(), schedule.options.clone(), clock.now_ms());
        match tokio::task::spawn_blocking(move || log.archive(&opts, now)).await {
            Ok(Ok(r)) if r.archived > 0 || r.dropped_segments > 0 => tracing::info!(
                archived = r.archived,
                segments = r.segments.len(),
                archived_through = r.archived_through,
                dropped_segments = r.dropped_segments,
                "archived old events"
            ),
            Ok(Ok(r)) => tracing::debug!(
                covered_through = r.covered_through,
                "nothing old enough to archive"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "archive run failed; trying again later"),
            Err(e) => tracing::warn!(error = %e, "archive task failed; trying again later"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, NewEvent, WorkerStarted};
    use crate::log::{CheckpointPolicy, LiveViews, LogOptions, ReadFilter};
    use crate::worker::TokioClock;

    const DAY_MS: Millis = 24 * 3600 * 1000;

    fn started(at: Millis) -> NewEvent {
        let body = WorkerStarted {
            worker_id: "w".into(),
            version: "test".into(),
            pid: 1,
        };
        NewEvent::new(Event::WorkerStarted(body), at)
    }

    #[test]
    fn old_checkpointed_events_leave_the_live_log_on_schedule_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            create: true,
            ..LogOptions::default()
        };
        let log = Arc::new(EventLog::open(dir.path(), &opts).unwrap());
        let t0 = 1_800_000_000_000;
        let old: Vec<_> = (0..50).map(|i| started(t0 + i)).collect();
        log.append(old).unwrap();
        log.append(vec![started(t0 + 9 * DAY_MS)]).unwrap();
        let now = t0 + 9 * DAY_MS;
        let (mut live, _) = LiveViews::open(&log, CheckpointPolicy::default(), now).unwrap();
        live.write_checkpoints(&log, now).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(now));
            let schedule = ArchiveSchedule {
                first_after_ms: 60_000,
                ..ArchiveSchedule::default()
            };
            let task = tokio::spawn(archive_on_schedule(log.clone(), clock, schedule));
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert_eq!(log.archived_through(), 0, "not before its first tick");
            tokio::time::sleep(Duration::from_secs(31)).await;
            // The blocking archive run finishes on its own thread: wait for it, bounded.
            for _ in 0..200 {
                if log.archived_through() > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            task.abort();
        });
        assert_eq!(
            log.archived_through(),
            50,
            "the 50 old events, not the young one"
        );
        let seqs: Vec<u64> = log
            .read(ReadFilter::default())
            .map(|e| e.unwrap().seq)
            .collect();
        assert_eq!(seqs, (1..=log.last_seq()).collect::<Vec<_>>());
    }
}
