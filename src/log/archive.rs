//! Compaction: old events move from sled into compressed segment files in `DIR/archive/`.
//!
//! # Invariants
//! - Only events older than the retention window (by their `at`) *and* covered by every
//!   checkpoint (seq <= the smallest checkpoint seq) are archived, as a prefix of the live log:
//!   archiving stops at the first event too young, so seqs stay one gapless sequence.
//! - A segment is durable (temp file, fsync, rename, fsync of the directory) before any of its
//!   events is removed from sled. Readers take the archive's last seq as the boundary: seqs up to
//!   it come from segments, the rest from sled, so events still in sled after a crash between the
//!   two steps are never read twice (and the next archive run removes them).
//! - Segments are deleted only when asked (`drop_older_than`), oldest first, after
//!   `archive/DROPPED.json` records how far: a reader then starts after that seq.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::format::write_atomically_private;
use super::segment::{SegmentFile, SegmentInfo, SegmentWriter};
use super::{decode_at, seq_of, EventLog, LogError};
use crate::clock::Millis;

/// The archive's folder in a data directory.
pub(crate) const ARCHIVE_DIR: &str = "archive";
const DROPPED_FILE: &str = "DROPPED.json";
/// Keys removed from sled per batch.
const REMOVE_BATCH: usize = 10_000;

/// What to archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveOptions {
    /// Events at least this old (by `at`) may move to the archive.
    pub older_than: Duration,
    /// Also delete archived segments whose newest event is at least this old. Must be longer
    /// than `older_than`. `None`: keep every segment (the default).
    pub drop_older_than: Option<Duration>,
    /// The most events in one segment.
    pub events_per_segment: u64,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        Self {
            older_than: Duration::from_secs(7 * 24 * 3600),
            drop_older_than: None,
            events_per_segment: 100_000,
        }
    }
}

/// What an archive run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArchiveReport {
    /// Events moved into new segments.
    pub archived: u64,
    /// The segments written, oldest first.
    pub segments: Vec<PathBuf>,
    /// Events a previous, interrupted run had archived but not yet removed from sled.
    pub leftovers_removed: u64,
    /// The smallest seq every checkpoint covers (0: some projection has no checkpoint).
    pub covered_through: u64,
    /// Why nothing more was archived, when checkpoints were what held it back.
    pub not_covered: Option<String>,
    /// The last seq in the archive after the run (0: none).
    pub archived_through: u64,
    /// Segments deleted (`drop_older_than`).
    pub dropped_segments: u64,
    /// Seqs up to this one are deleted for good (0: none).
    pub dropped_through: u64,
}

/// The archive as a reader sees it: its segments in seq order and how far it was dropped.
#[derive(Debug, Clone, Default)]
pub(crate) struct ArchiveState {
    pub segments: Vec<SegmentInfo>,
    pub dropped_through: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Dropped {
    through_seq: u64,
}

impl ArchiveState {
    /// Lists `DIR/archive` (nothing there: an empty archive). Blocking.
    pub(crate) fn load(data_dir: &Path) -> Result<Self, LogError> {
        let dir = data_dir.join(ARCHIVE_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(LogError::io(format!("cannot list {}", dir.display()), e)),
        };
        let dropped_through = load_dropped(&dir)?;
        let mut segments = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| LogError::io(format!("cannot list {}", dir.display()), e))?;
            let name = entry.file_name();
            if let Some(s) = SegmentInfo::parse(&dir, &name.to_string_lossy()) {
                // Deleted for good but still there (a crash while dropping): not read.
                if s.last_seq > dropped_through {
                    segments.push(s);
                }
            }
        }
        segments.sort_by_key(|s| s.first_seq);
        Ok(Self {
            segments,
            dropped_through,
        })
    }

    /// The last seq the archive accounts for (held or dropped); 0: none.
    pub(crate) fn through(&self) -> u64 {
        self.segments
            .last()
            .map_or(0, |s| s.last_seq)
            .max(self.dropped_through)
    }

    /// The segment holding `seq`, or else the first one after it.
    pub(crate) fn find(&self, seq: u64) -> Result<&SegmentInfo, Option<&SegmentInfo>> {
        let i = self.segments.partition_point(|s| s.last_seq < seq);
        match self.segments.get(i) {
            Some(s) if s.first_seq <= seq => Ok(s),
            next => Err(next),
        }
    }
}

fn load_dropped(dir: &Path) -> Result<u64, LogError> {
    let path = dir.join(DROPPED_FILE);
    let bytes = super::private::read(&path)
        .map_err(|e| LogError::io(format!("cannot read {}", path.display()), e))?;
    let Some(bytes) = bytes else { return Ok(0) };
    let d: Dropped = serde_json::from_slice(&bytes).map_err(|e| {
        LogError::io(
            format!("{} is unreadable", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    Ok(d.through_seq)
}

/// Creates `DIR/archive` (0700) if missing, and removes temp files a crash left in it.
fn prepare(dir: &Path) -> Result<(), LogError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| LogError::io(format!("cannot create {}", dir.display()), e))?;
        super::private::sync_dir(dir.parent().unwrap_or(Path::new(".")));
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LogError::io(format!("cannot list {}", dir.display()), e))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn days_ago(now: Millis, d: Duration) -> Millis {
    now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl EventLog {
    /// Moves events older than `opts.older_than` (at `now`) and covered by every checkpoint
    /// into segment files, then removes them from sled; with `drop_older_than`, deletes old
    /// segments. Safe to call while the log is appended to and read. Blocking: call it off the
    /// async runtime.
    pub fn archive(&self, opts: &ArchiveOptions, now: Millis) -> Result<ArchiveReport, LogError> {
        let _one_at_a_time = self.archiving.lock().expect("archiver poisoned");
        let dir = self.dir.join(ARCHIVE_DIR);
        prepare(&dir)?;
        let mut report = ArchiveReport {
            leftovers_removed: self.remove_leftovers()?,
            ..ArchiveReport::default()
        };
        let (covered, not_covered) = self.covered_through();
        report.covered_through = covered;
        let upto = covered.min(self.last_seq());
        let cutoff = days_ago(now, opts.older_than);
        let per_segment = opts.events_per_segment.max(1);
        loop {
            let from = self.archived_through() + 1;
            if from > upto {
                break;
            }
            let Some((seg, full)) = self.write_segment(&dir, from, upto, cutoff, per_segment)?
            else {
                break;
            };
            self.publish(seg.clone());
            self.remove_live(seg.first_seq, seg.last_seq)?;
            report.archived += seg.last_seq - seg.first_seq + 1;
            report.segments.push(seg.path);
            if !full {
                break;
            }
        }
        // The checkpoints held it back when the archive reached them and more events follow.
        let through = self.archived_through();
        if through >= covered.min(self.last_seq()) && through < self.last_seq() {
            report.not_covered = not_covered;
        }
        if let Some(horizon) = opts.drop_older_than {
            report.dropped_segments = self.drop_segments(&dir, days_ago(now, horizon))?;
        }
        let state = self.archive_state();
        (report.archived_through, report.dropped_through) =
            (state.through(), state.dropped_through);
        Ok(report)
    }

    /// The smallest seq every projection's checkpoint holds, and why it is 0 when one is
    /// missing or unreadable.
    fn covered_through(&self) -> (u64, Option<String>) {
        let store = self.checkpoints();
        let mut covered = u64::MAX;
        for p in crate::projections::ProjectionName::ALL {
            match store.seq(p.as_str()) {
                Ok(Some(seq)) => covered = covered.min(seq),
                Ok(None) => return (0, Some(format!("projection {p} has no checkpoint"))),
                Err(e) => return (0, Some(e.to_string())),
            }
        }
        let why = format!("events after seq {covered} are not covered by every checkpoint");
        (covered, Some(why))
    }

    /// Writes the segment of the events from `from` on, up to `upto`, `per_segment` at most,
    /// stopping before the first event at or after `cutoff`. Returns it and whether it stopped
    /// only for its size; `None` when the first event is too young.
    fn write_segment(
        &self,
        dir: &Path,
        from: u64,
        upto: u64,
        cutoff: Millis,
        per_segment: u64,
    ) -> Result<Option<(SegmentInfo, bool)>, LogError> {
        let io = |e| LogError::io(format!("cannot build a segment in {}", dir.display()), e);
        let mut w = SegmentWriter::new().map_err(io)?;
        let mut count = 0u64;
        let mut young = false;
        for item in self.events.range(from.to_be_bytes()..=upto.to_be_bytes()) {
            let (k, v) = item?;
            let env = decode_at(seq_of(&k)?, &v)?;
            if env.at >= cutoff {
                young = true;
                break;
            }
            w.push(&env, &v).map_err(io)?;
            count += 1;
            if count == per_segment {
                break;
            }
        }
        let Some((first, last)) = w.seqs() else {
            return Ok(None);
        };
        if first != from {
            return Err(LogError::io(
                format!("cannot archive from seq {from}: the live log starts at seq {first}"),
                std::io::Error::new(std::io::ErrorKind::InvalidData, "gap in the log"),
            ));
        }
        let bytes = w.finish().map_err(io)?.expect("events were pushed");
        let seg = SegmentInfo::new(dir, first, last);
        write_atomically_private(&seg.path, &bytes)?;
        Ok(Some((seg, !young && last < upto)))
    }

    /// Makes a durable segment visible to readers (before its events leave sled).
    fn publish(&self, seg: SegmentInfo) {
        let mut state = self.archive.write().expect("archive state poisoned");
        Arc::make_mut(&mut state).segments.push(seg);
    }

    /// Removes from sled the events a previous run archived but did not remove.
    fn remove_leftovers(&self) -> Result<u64, LogError> {
        let through = self.archived_through();
        match self.events.first()? {
            Some((k, _)) if seq_of(&k)? <= through => self.remove_live(seq_of(&k)?, through),
            _ => Ok(0),
        }
    }

    /// Removes seqs `first..=last` from sled in batches, then flushes. Returns how many.
    pub(crate) fn remove_live(&self, first: u64, last: u64) -> Result<u64, LogError> {
        let mut removed = 0u64;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for key in self
            .events
            .range(first.to_be_bytes()..=last.to_be_bytes())
            .keys()
        {
            batch.remove(key?);
            in_batch += 1;
            if in_batch == REMOVE_BATCH {
                self.events.apply_batch(std::mem::take(&mut batch))?;
                removed += in_batch as u64;
                in_batch = 0;
            }
        }
        self.events.apply_batch(batch)?;
        self.db.flush()?;
        Ok(removed + in_batch as u64)
    }

    /// Deletes the oldest segments whose newest event is before `cutoff`; returns how many.
    fn drop_segments(&self, dir: &Path, cutoff: Millis) -> Result<u64, LogError> {
        let state = self.archive_state();
        let mut doomed = Vec::new();
        for seg in &state.segments {
            let last_at = SegmentFile::open(seg)
                .map_err(|reason| LogError::segment(seg, reason))?
                .header
                .last_at;
            if last_at >= cutoff {
                break;
            }
            doomed.push(seg.clone());
        }
        let Some(through) = doomed.last().map(|s| s.last_seq) else {
            return Ok(0);
        };
        let bytes = serde_json::to_vec(&Dropped {
            through_seq: through,
        })
        .expect("serializes");
        write_atomically_private(&dir.join(DROPPED_FILE), &bytes)?;
        {
            let mut state = self.archive.write().expect("archive state poisoned");
            let s = Arc::make_mut(&mut state);
            s.dropped_through = through;
            s.segments.retain(|seg| seg.last_seq > through);
        }
        for seg in &doomed {
            std::fs::remove_file(&seg.path)
                .map_err(|e| LogError::io(format!("cannot delete {}", seg.path.display()), e))?;
        }
        super::private::sync_dir(dir);
        Ok(doomed.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Envelope;
    use crate::log::{load_views, LogOptions, ReadFilter};
    use crate::testkit::History;

    const START: Millis = 1_763_700_000_000;

    /// A log of random events with checkpoints at its end.
    fn checkpointed_log(dir: &Path, n: usize) -> (EventLog, Vec<Envelope>) {
        let opts = LogOptions {
            create: true,
            ..LogOptions::default()
        };
        let log = EventLog::open(dir, &opts).unwrap();
        let mut stored = Vec::new();
        for chunk in History::of(&History::random_steps(7, n), START).chunks(50) {
            stored.extend(log.append(chunk.to_vec()).unwrap());
        }
        let (views, _) = load_views(&log, None, None, true, |_| {}).unwrap();
        let store = log.checkpoints();
        store.save(&views.sessions).unwrap();
        store.save(&views.messages).unwrap();
        store.save(&views.commands).unwrap();
        (log, stored)
    }

    fn read_all(log: &EventLog) -> Vec<Envelope> {
        log.read(ReadFilter::default())
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn a_crash_between_segment_write_and_removal_leaves_each_event_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, stored) = checkpointed_log(dir.path(), 300);
        let archive = dir.path().join(ARCHIVE_DIR);
        prepare(&archive).unwrap();
        // The first step alone: the segment is durable, its events are still in sled.
        let (seg, _) = log
            .write_segment(&archive, 1, log.last_seq(), u64::MAX, 120)
            .unwrap()
            .unwrap();
        assert_eq!((seg.first_seq, seg.last_seq), (1, 120));
        assert_eq!(read_all(&log), stored, "not yet published: read from sled");
        log.publish(seg);
        assert_eq!(read_all(&log), stored, "published: read from the segment");
        drop(log);
        // The process died here. After a restart every event still reads exactly once.
        let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
        assert_eq!(log.archived_through(), 120);
        assert!(log.events.get(1u64.to_be_bytes()).unwrap().is_some());
        assert_eq!(read_all(&log), stored);
        assert_eq!(log.get(7).unwrap().as_ref(), Some(&stored[6]));
        // The next run finishes the removal, then goes on.
        let opts = ArchiveOptions {
            older_than: Duration::ZERO,
            events_per_segment: 120,
            ..ArchiveOptions::default()
        };
        let report = log.archive(&opts, u64::MAX).unwrap();
        assert_eq!(report.leftovers_removed, 120);
        assert!(log.events.get(1u64.to_be_bytes()).unwrap().is_none());
        assert_eq!(read_all(&log), stored);
    }

    #[test]
    fn a_reader_running_while_events_move_sees_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, stored) = checkpointed_log(dir.path(), 1500);
        assert!(
            stored.len() > 2 * 1024,
            "the reader is past its first chunk when events move"
        );
        let log = std::sync::Arc::new(log);
        let mut reader = log.read(ReadFilter::default());
        // Half a chunk read from sled, then everything covered moves to the archive.
        let mut seen: Vec<Envelope> = reader.by_ref().take(1030).map(Result::unwrap).collect();
        let opts = ArchiveOptions {
            older_than: Duration::ZERO,
            events_per_segment: 100,
            ..ArchiveOptions::default()
        };
        log.archive(&opts, u64::MAX).unwrap();
        seen.extend(reader.map(Result::unwrap));
        assert_eq!(seen, stored);
    }

    #[test]
    fn segment_names_parse_back_and_temp_files_are_not_segments() {
        let dir = Path::new("/d");
        let s = SegmentInfo::new(dir, 1, 100_000);
        assert_eq!(
            s.file_name(),
            "00000000000000000001-00000000000000100000.seg"
        );
        assert_eq!(SegmentInfo::parse(dir, &s.file_name()), Some(s));
        assert_eq!(
            SegmentInfo::parse(dir, "00000000000000000001-00000000000000100000.tmp"),
            None
        );
        assert_eq!(SegmentInfo::parse(dir, "5-4.seg"), None);
        assert_eq!(SegmentInfo::parse(dir, "0-4.seg"), None);
    }
}
