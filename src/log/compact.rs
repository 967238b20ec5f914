//! Rewriting the log's sled database without the space it keeps for what was removed.
//!
//! Why: sled keeps its page table at the high-water mark of its entries. After `archive` moves
//! the events of a busy past out, the database opens as slowly, and holds as much memory, as
//! when it held them. Measured on the 1,000,000-session start-up bench's data dir: 474 ms and
//! 90 MB resident after archiving all 2,020,008 events; the same live trees copied into a fresh
//! database, 80 ms and 7 MB. Compaction copies every tree into a fresh database and swaps it
//! in, with the directory lock held throughout, so no worker runs meanwhile.
//!
//! Invariants (a crash at any point leaves a state [`recover`] finishes or undoes at the next
//! open, before sled is opened):
//! 1. `log.compact/` is complete and flushed before `log/` is renamed away: found beside
//!    `log/`, it is an unfinished copy, and is removed.
//! 2. `log/` missing with `log.compact/` present is a swap cut between its two renames
//!    (`log/` to `log.old/`, then `log.compact/` to `log/`): the copy is renamed into place.
//! 3. `log.old/` is the database before, kept until the swap is on disk: found beside `log/`,
//!    it is removed.

use std::path::Path;

use serde::Serialize;

use super::LogError;

/// The copy being written.
const FRESH: &str = "log.compact";
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
const BATCH_BYTES: usize = 16 << 20;

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    let io = |e| LogError::io(format!("syncing {}", dir.display()), e);
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io)
}

fn remove(path: &Path) -> Result<(), LogError> {
    std::fs::remove_dir_all(path)
        .map_err(|e| LogError::io(format!("removing {}", path.display()), e))
}

fn rename(from: &Path, to: &Path) -> Result<(), LogError> {
    let io = |e| {
        LogError::io(
            format!("renaming {} to {}", from.display(), to.display()),
            e,
        )
    };
    std::fs::rename(from, to).map_err(io)
}

/// Finishes or undoes a compaction a crash cut short (see the invariants). Blocking; the
/// caller holds the directory lock.
pub(super) fn recover(dir: &Path) -> Result<(), LogError> {
    let (log, fresh, old) = (dir.join("log"), dir.join(FRESH), dir.join(OLD));
    if fresh.exists() {
        if log.exists() {
            tracing::warn!(dir = %dir.display(), "removing an unfinished compaction of the log");
            remove(&fresh)?;
        } else {
            tracing::warn!(dir = %dir.display(), "finishing a compaction of the log cut short");
            rename(&fresh, &log)?;
        }
        sync_dir(dir)?;
    }
    if old.exists() && log.exists() {
        remove(&old)?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// Copies every tree of `db` into a fresh database at `DIR/log.compact`, flushed and checked
/// entry for entry; returns how many entries. Blocking.
pub(super) fn copy(db: &sled::Db, dir: &Path, cache_bytes: u64) -> Result<u64, LogError> {
    let fresh_path = dir.join(FRESH);
    if fresh_path.exists() {
        remove(&fresh_path)?;
    }
    let fresh = super::open_sled(&fresh_path, cache_bytes)?;
    super::private::narrow(&fresh_path)
        .map_err(|e| LogError::io(format!("narrowing {}", fresh_path.display()), e))?;
    let mut entries = 0;
    for name in db.tree_names() {
        let (from, to) = (db.open_tree(&name)?, fresh.open_tree(&name)?);
        let (mut batch, mut bytes, mut copied) = (sled::Batch::default(), 0, 0u64);
        for item in from.iter() {
            let (k, v) = item?;
            bytes += k.len() + v.len();
            batch.insert(k, v);
            copied += 1;
            if bytes >= BATCH_BYTES {
                to.apply_batch(std::mem::take(&mut batch))?;
                bytes = 0;
            }
        }
        to.apply_batch(batch)?;
        if to.len() as u64 != copied {
            return Err(LogError::Compact(format!(
                "tree {} has {} entries in the copy, {copied} read",
                String::from_utf8_lossy(&name),
                to.len()
            )));
        }
        entries += copied;
    }
    fresh.flush()?;
    drop(fresh);
    // sled's first open of a database replays everything written since its last snapshot and
    // then writes one: done here, not at the worker's next start.
    drop(super::open_sled(&fresh_path, cache_bytes)?);
    Ok(entries)
}

/// Swaps the copy in for the database (both closed): invariants 2 and 3. Blocking.
pub(super) fn swap(dir: &Path) -> Result<(), LogError> {
    rename(&dir.join("log"), &dir.join(OLD))?;
    rename(&dir.join(FRESH), &dir.join("log"))?;
    sync_dir(dir)?;
    remove(&dir.join(OLD))?;
    sync_dir(dir)?;
    Ok(())
}
