//! Rewriting the log's sled database without the space it keeps for what was removed.
//!
//! Why: sled keeps its page table at the high-water mark of its entries. After `archive` moves
//! the events of a busy past out, the database opens as slowly, and holds as much memory, as
//! when it held them. Measured on the 1,000,000-session start-up bench's data dir: 474 ms and
//! 90 MB resident after archiving all 2,020,008 events; the same live trees copied into a fresh
//! database, 80 ms and 7 MB. Compaction copies every tree into a fresh database and swaps it
//! in, with the directory lock held throughout, so no worker runs meanwhile.
//!
//! The steps ([`STEPS`]): copy into `log.compact/` (flushed, reopened, read back and checked
//! against the source by checksum); rename it `log.ready/`; rename `log/` to `log.old/`; rename
//! `log.ready/` to `log/`; remove `log.old/`. The directory is fsynced after each rename
//! (best effort, as everywhere in `log`: not every file system can). A step that fails with
//! the process going on is undone before the error returns (`undo_swap`: the database before
//! back in place, the copy removed), so that a refusal that lasts cannot fail every later open.
//!
//! Invariants (a crash between any two steps leaves a state [`recover`] finishes or undoes at
//! the next open, after the format and identity checks and before sled is opened):
//! 1. `log.compact/` is never a finished copy: found, it is removed.
//! 2. `log.ready/` is a finished, checked copy. Without `log/` it is renamed into place;
//!    beside `log/` and no `log.old/`, the swap had not begun and is carried out.
//! 3. `log.old/` beside `log/` and no `log.ready/` is the database before a finished swap, and
//!    is removed.
//! 4. Any other state (`log/`, `log.ready/` and `log.old/` together: something else made a
//!    `log/` between the renames, such as an agentsync from before compaction) is refused
//!    with every directory left in place: which database is the log is for a person to say.

use std::hash::Hasher;
use std::path::Path;

use serde::Serialize;

use super::private::sync_dir;
use super::LogError;

/// The copy being written.
const FRESH: &str = "log.compact";
/// The finished, checked copy.
const READY: &str = "log.ready";
/// The database before, until the swap is on disk.
const OLD: &str = "log.old";

/// What a compaction did.
#[derive(Debug, Clone, Serialize)]
pub struct CompactReport {
    /// The database's size on disk before, bytes (sled's own count).
    pub bytes_before: u64,
    /// And after.
    pub bytes_after: u64,
    /// Entries copied, over every tree.
    pub entries: u64,
}

/// Most bytes copied in one sled batch (sled holds a batch whole in memory several times).
/// Small, because sled leaves the copy with more free segments the larger its batches, and
/// rewrites every free segment at every open (sled 0.34, `SegmentAccountant::
/// initialize_from_snapshot`): copying the startup bench's 1,000,000 data dir left 211 free
/// segments in batches of 16 MB, 42 to 67 in batches of 1 MB, 12 in batches of 64 KB (for
/// twice the copy's time), and 522 in batches of 64 MB (`examples`-style copies, by hand).
const BATCH_BYTES: usize = 1 << 20;

fn remove(path: &Path) -> Result<(), LogError> {
    std::fs::remove_dir_all(path)
        .map_err(|e| LogError::io(format!("removing {}", path.display()), e))
}

fn rename(dir: &Path, from: &str, to: &str) -> Result<(), LogError> {
    let (f, t) = (dir.join(from), dir.join(to));
    let io = |e| LogError::io(format!("renaming {} to {}", f.display(), t.display()), e);
    std::fs::rename(&f, &t).map_err(io)?;
    sync_dir(dir);
    Ok(())
}

/// Finishes or undoes a compaction a crash cut short (see the invariants). Blocking; the
/// caller holds the directory lock and has checked the format and the identity.
pub(super) fn recover(dir: &Path) -> Result<(), LogError> {
    let has = |name: &str| dir.join(name).exists();
    if has(FRESH) {
        tracing::warn!(dir = %dir.display(), "removing an unfinished compaction of the log");
        remove(&dir.join(FRESH))?;
        sync_dir(dir);
    }
    match (has("log"), has(READY), has(OLD)) {
        (_, false, false) => Ok(()),
        (false, true, _) => {
            tracing::warn!(dir = %dir.display(), "finishing a compaction of the log cut short");
            rename(dir, READY, "log")?;
            recover(dir)
        }
        (true, true, false) => {
            tracing::warn!(dir = %dir.display(), "finishing a compaction of the log cut short");
            rename(dir, "log", OLD)?;
            recover(dir)
        }
        (true, false, true) => {
            remove(&dir.join(OLD))?;
            sync_dir(dir);
            Ok(())
        }
        (log, ready, old) => Err(LogError::Compact(format!(
            "{} holds {}{}{}: a compaction was cut short and something else wrote in between; \
             move aside the directory that is not the log",
            dir.display(),
            if log { "log/ " } else { "" },
            if ready {
                "log.ready/ (a finished copy) "
            } else {
                ""
            },
            if old {
                "log.old/ (the database before it)"
            } else {
                ""
            },
        ))),
    }
}

/// A checksum of every entry of every tree, in order: trees by name (sled lists them from a
/// hash map, in no order two databases share), entries by key.
fn checksum(db: &sled::Db) -> Result<(u64, u64), LogError> {
    let mut h = crc32fast::Hasher::new();
    let mut entries = 0;
    let mut names = db.tree_names();
    names.sort();
    for name in names {
        h.write(&name);
        for item in db.open_tree(&name)?.iter() {
            let (k, v) = item?;
            h.write(&(k.len() as u64).to_le_bytes());
            h.write(&k);
            h.write(&(v.len() as u64).to_le_bytes());
            h.write(&v);
            entries += 1;
        }
    }
    Ok((u64::from(h.finalize()), entries))
}

/// What a compaction writes into its copy once checked, before it may be swapped in.
pub(super) type Stamp<'a> = &'a dyn Fn(&sled::Db) -> Result<(), LogError>;

/// Copies every tree of `db` into `DIR/log.compact` (invariant 1: removed on any failure),
/// flushed, reopened, read back against the source's checksum, and stamped; returns how many
/// entries. Blocking.
fn copy(db: &sled::Db, dir: &Path, cache_bytes: u64, stamp: Stamp<'_>) -> Result<u64, LogError> {
    let fresh_path = dir.join(FRESH);
    let copied = (|| {
        let fresh = super::open_sled(&fresh_path, cache_bytes)?;
        for name in db.tree_names() {
            let (from, to) = (db.open_tree(&name)?, fresh.open_tree(&name)?);
            let (mut batch, mut bytes) = (sled::Batch::default(), 0);
            for item in from.iter() {
                let (k, v) = item?;
                bytes += k.len() + v.len();
                batch.insert(k, v);
                if bytes >= BATCH_BYTES {
                    to.apply_batch(std::mem::take(&mut batch))?;
                    bytes = 0;
                }
            }
            to.apply_batch(batch)?;
        }
        fresh.flush()?;
        drop(fresh);
        // sled's first open of a database replays everything written since its last snapshot
        // and then writes one: done here, not at the worker's next start. Then the copy is
        // read back as sled will read it.
        let (wanted, entries) = checksum(db)?;
        let reopened = super::open_sled(&fresh_path, cache_bytes)?;
        let (got, copied) = checksum(&reopened)?;
        if (got, copied) != (wanted, entries) {
            return Err(LogError::Compact(format!(
                "the copy reads back {copied} entries (checksum {got:x}), the database {entries} ({wanted:x})"
            )));
        }
        stamp(&reopened)?;
        reopened.flush()?;
        drop(reopened);
        super::private::narrow(&fresh_path)
            .map_err(|e| LogError::io(format!("narrowing {}", fresh_path.display()), e))?;
        sync_dir(&fresh_path);
        Ok(entries)
    })();
    copied.map_err(|e| {
        let _ = std::fs::remove_dir_all(&fresh_path);
        match e {
            LogError::Compact(_) => e,
            other => LogError::Compact(other.to_string()),
        }
    })
}

/// How many steps a compaction has (copy, three renames, removal).
pub(super) const STEPS: usize = 5;

/// Runs the first `steps` of a compaction of `db` (all of them: [`STEPS`]); `db` is closed
/// before the first rename. Returns the entries copied. Blocking.
pub(super) fn run(
    db: sled::Db,
    dir: &Path,
    cache_bytes: u64,
    steps: usize,
    stamp: Stamp<'_>,
) -> Result<u64, LogError> {
    let fresh_path = dir.join(FRESH);
    if fresh_path.exists() {
        remove(&fresh_path)?;
    }
    let entries = before_step(0).and_then(|_| copy(&db, dir, cache_bytes, stamp))?;
    drop(db);
    let renames = [(FRESH, READY), ("log", OLD), (READY, "log")];
    for (i, (from, to)) in renames.iter().take(steps.saturating_sub(1)).enumerate() {
        if let Err(e) = before_step(i + 1).and_then(|_| rename(dir, from, to)) {
            undo_swap(dir, i);
            return Err(e);
        }
    }
    if steps >= STEPS {
        // The swap is done: a failure from here on is left to the next open (invariant 3).
        match before_step(4).and_then(|_| remove(&dir.join(OLD))) {
            Ok(()) => sync_dir(dir),
            Err(e) => {
                tracing::warn!(error = %e, "the database before the compaction is left in log.old/")
            }
        }
    }
    Ok(entries)
}

/// Puts the database before back in place after rename `failed` (0 to 2) of the swap was
/// refused, and removes the copy: left to the next open, a refusal that lasts (a directory
/// made read-only, a rename the file system refuses) would fail that open's `recover` and
/// every open after it. The database before is as good as the copy (the lock is held, nothing
/// was written since), and the compaction stays due. Best effort: whatever is left is a state
/// of the invariants, which the next open finishes or undoes. Blocking.
fn undo_swap(dir: &Path, failed: usize) {
    let undone = (|| {
        if failed == 2 {
            rename(dir, OLD, "log")?;
        }
        for copy in [FRESH, READY] {
            if dir.join(copy).exists() {
                remove(&dir.join(copy))?;
            }
        }
        sync_dir(dir);
        Ok::<_, LogError>(())
    })();
    if let Err(e) = undone {
        tracing::warn!(error = %e, "undoing a compaction that failed: the next open finishes or undoes it");
    }
}

#[cfg(test)]
thread_local! {
    /// Tests run this before each step ([`STEPS`], from 0): to fail it, or to look at the
    /// directory while the compaction holds it.
    pub(super) static BEFORE_STEP: std::cell::RefCell<Option<StepHook>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
pub(super) type StepHook = Box<dyn FnMut(usize) -> Result<(), LogError>>;

#[cfg(test)]
fn before_step(step: usize) -> Result<(), LogError> {
    BEFORE_STEP.with_borrow_mut(|hook| hook.as_mut().map_or(Ok(()), |hook| hook(step)))
}

#[cfg(not(test))]
fn before_step(_: usize) -> Result<(), LogError> {
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use crate::log::{EventLog, LogOptions, ReadFilter};
    use crate::testkit::History;

    fn create() -> LogOptions {
        LogOptions {
            create: true,
            ..LogOptions::default()
        }
    }

    /// Every event of `log`, archive and live log, in order.
    fn read_all(log: &EventLog) -> Vec<crate::events::Envelope> {
        log.read(ReadFilter::default())
            .map(Result::unwrap)
            .collect()
    }

    /// Every projection's checkpoint at the end, then every event they cover archived.
    pub(in crate::log) fn archive_all(log: &EventLog) {
        let (views, _) = crate::log::load_views(log, None, None, true, |_| {}).unwrap();
        let store = log.checkpoints();
        store.save(&views.sessions).unwrap();
        store.save(&views.messages).unwrap();
        store.save(&views.commands).unwrap();
        let all = crate::log::ArchiveOptions {
            older_than: std::time::Duration::ZERO,
            ..crate::log::ArchiveOptions::default()
        };
        log.archive(&all, u64::MAX).unwrap();
    }

    /// A compaction is due once enough was archived since the last one, and more than the
    /// live log holds; a compaction records how far the archive went, so the next is due only
    /// after as many again.
    #[test]
    fn a_compaction_is_due_once_enough_was_archived_since_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), &create()).unwrap();
        let events = |seed| History::of(&History::random_steps(seed, 200), 1_000);
        log.append(events(10)).unwrap();
        assert_eq!(log.compaction_due(1).unwrap(), None, "nothing archived");
        archive_all(&log);
        let first = log.archived_through();
        assert!(first > 100, "{first}");
        assert_eq!(log.compaction_due(100).unwrap(), Some(first));
        assert_eq!(log.compaction_due(first + 1).unwrap(), None, "too few");
        log.compact().unwrap();
        let log = EventLog::open(dir.path(), &create()).unwrap();
        assert_eq!(log.compaction_due(1).unwrap(), None, "just compacted");
        log.append(events(11)).unwrap();
        archive_all(&log);
        let since = log.archived_through() - first;
        assert_eq!(log.compaction_due(1).unwrap(), Some(since));
        log.append(events(12)).unwrap();
        log.append(events(13)).unwrap();
        assert_eq!(
            log.compaction_due(1).unwrap(),
            None,
            "more live than archived"
        );
    }

    /// A worker's start (`open_compacted`) compacts a log that is due, and only then; every
    /// event reads back as before.
    #[test]
    fn a_start_compacts_the_log_when_it_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), &create()).unwrap();
        log.append(History::of(&History::random_steps(14, 400), 1_000))
            .unwrap();
        archive_all(&log);
        let stored = read_all(&log);
        let n = log.archived_through();
        drop(log);
        let log = EventLog::open_compacted(dir.path(), &create(), n + 1).unwrap();
        assert_eq!(log.compaction_due(n).unwrap(), Some(n), "not due at n + 1");
        drop(log);
        let log = EventLog::open_compacted(dir.path(), &create(), n).unwrap();
        assert_eq!(
            log.compaction_due(1).unwrap(),
            None,
            "compacted at the start"
        );
        let read = read_all(&log);
        assert_eq!(read, stored);
    }

    /// A crash after each step of a real compaction (the process gone, the lock with it)
    /// leaves a directory the next open finishes or undoes, with every event there.
    #[test]
    fn a_compaction_cut_after_any_step_is_finished_or_undone_at_the_next_open() {
        for steps in 0..=super::STEPS {
            let dir = tempfile::tempdir().unwrap();
            let log = EventLog::open(dir.path(), &create()).unwrap();
            let stored = log
                .append(History::of(&History::random_steps(7, 200), 1_000))
                .unwrap();
            let cut = log.compact_steps(steps);
            assert!(cut.is_ok(), "step {steps}: {cut:?}");
            let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
            let read = read_all(&log);
            assert_eq!(read, stored, "cut after {steps} step(s)");
            for left in [super::FRESH, super::READY, super::OLD] {
                assert!(!dir.path().join(left).exists(), "step {steps}: {left} left");
            }
        }
    }

    /// A start whose compaction fails at any step (a full disk, a rename refused) opens the
    /// log with every event there and nothing left beside it, and no other process can open
    /// the directory at any step of the compaction. A failure before the swap is done is
    /// undone in place (`undo_swap`: left to the next open's `recover`, a refusal that lasts
    /// would fail every open) and the compaction stays due: the next start tries again
    /// (there is no backoff). Once swapped in, a failure to remove the database before is a
    /// warning: the compaction is done.
    #[test]
    fn a_start_whose_compaction_fails_at_any_step_opens_the_log_with_every_event() {
        use crate::log::{lock::DirLock, LogError};
        for failing in 0..super::STEPS {
            let dir = tempfile::tempdir().unwrap();
            let log = EventLog::open(dir.path(), &create()).unwrap();
            log.append(History::of(&History::random_steps(15, 300), 1_000))
                .unwrap();
            archive_all(&log);
            let n = log.archived_through();
            // Some live events too: the archive's files are not what a compaction copies.
            log.append(History::of(&History::random_steps(16, 20), 1_000))
                .unwrap();
            let stored = read_all(&log);
            assert!(log.last_seq() > n && log.compaction_due(n).unwrap().is_some());
            drop(log);
            let path = dir.path().to_path_buf();
            let seen_by_hook = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let record = seen_by_hook.clone();
            let own = std::process::id();
            super::BEFORE_STEP.set(Some(Box::new(move |step| {
                let held = DirLock::try_acquire(&path);
                let by_us = matches!(held, Err(LogError::Locked { pid: Some(p), .. }) if p == own);
                record.borrow_mut().push((step, by_us));
                match step == failing {
                    true => Err(LogError::Compact("failed (test)".into())),
                    false => Ok(()),
                }
            })));
            let opened = EventLog::open_compacted(dir.path(), &create(), n);
            super::BEFORE_STEP.set(None);
            let log = opened.unwrap_or_else(|e| panic!("failing step {failing}: {e}"));
            let seen = seen_by_hook.borrow().clone();
            let steps: Vec<usize> = seen.iter().map(|s| s.0).collect();
            assert_eq!(
                steps,
                (0..=failing).collect::<Vec<_>>(),
                "failing step {failing}"
            );
            assert!(
                seen.iter().all(|(_, held)| *held),
                "lock not held: {seen:?}"
            );
            assert_eq!(read_all(&log), stored, "failing step {failing}");
            for left in [super::FRESH, super::READY, super::OLD] {
                assert!(
                    !dir.path().join(left).exists(),
                    "step {failing}: {left} left"
                );
            }
            let due = log.compaction_due(n).unwrap();
            assert_eq!(
                due.is_some(),
                failing < 4,
                "failing step {failing}: {due:?}"
            );
        }
    }

    /// `archive --compact` whose removal of the database before fails (after the swap)
    /// reports the compaction done, and the next open removes what is left.
    #[test]
    fn a_compaction_that_cannot_remove_the_database_before_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), &create()).unwrap();
        let stored = log
            .append(History::of(&History::random_steps(17, 100), 1_000))
            .unwrap();
        super::BEFORE_STEP.set(Some(Box::new(|step| match step {
            4 => Err(crate::log::LogError::Compact("failed (test)".into())),
            _ => Ok(()),
        })));
        let compacted = log.compact();
        super::BEFORE_STEP.set(None);
        assert!(compacted.is_ok(), "{compacted:?}");
        assert!(
            dir.path().join(super::OLD).exists(),
            "the removal was not failed"
        );
        let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
        assert!(!dir.path().join(super::OLD).exists());
        assert_eq!(read_all(&log), stored);
    }

    /// Invariant 4: an unknown state (here an empty `log/` made between the renames, as an
    /// agentsync from before compaction would) is refused, and nothing is removed.
    #[test]
    fn a_log_made_between_the_renames_is_refused_with_both_copies_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), &create()).unwrap();
        let stored = log
            .append(History::of(&History::random_steps(8, 100), 1_000))
            .unwrap();
        log.compact_steps(3).unwrap();
        drop(sled::open(dir.path().join("log")).unwrap());
        let err = EventLog::open(dir.path(), &create())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("log.ready/") && err.contains("log.old/"),
            "{err}"
        );
        for kept in ["log", super::READY, super::OLD] {
            assert!(dir.path().join(kept).exists(), "{kept} removed");
        }
        // Moved aside as the message says, the log is whole again.
        std::fs::remove_dir_all(dir.path().join("log")).unwrap();
        let log = EventLog::open(dir.path(), &create()).unwrap();
        let read = read_all(&log);
        assert_eq!(read, stored);
    }

    /// A directory of a newer format is refused before anything is touched, a compaction cut
    /// short in it included.
    #[test]
    fn a_newer_format_cut_mid_compaction_is_refused_with_nothing_modified() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), &create()).unwrap();
        log.append(History::of(&History::random_steps(9, 50), 1_000))
            .unwrap();
        log.compact_steps(3).unwrap();
        let format = dir.path().join("FORMAT.json");
        std::fs::write(&format, br#"{"layout": 99, "kinds": {}}"#).unwrap();
        let err = EventLog::open(dir.path(), &LogOptions::default()).unwrap_err();
        assert!(err.to_string().contains("nothing was modified"), "{err}");
        assert!(dir.path().join(super::READY).exists());
        assert!(dir.path().join(super::OLD).exists());
        assert!(!dir.path().join("log").exists());
    }
}
