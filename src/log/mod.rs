//! The event log: append-only, on sled, in one data directory.
//!
//! # Layout of a data directory
//!
//! ```text
//! DIR/LOCK          flock'd by the one process using DIR; holds its pid
//! DIR/FORMAT.json   the layout version and every event kind's version ever written here
//! DIR/IDENTITY.json the worker id, agent server and backend the directory belongs to (mode 0600)
//! DIR/log/          the sled database
//!     tree events       u64 big-endian seq -> envelope JSON
//!     tree views.sessions   the sessions view's checkpoint, its rows in hash buckets (`rows`),
//!                           and a large write's stage while one is under way or cut short
//! DIR/log.compact/, log.ready/, log.old/   a compaction's copy (unfinished, finished) and the
//!                   database before it: only while one runs or after a crash in one
//!                   (`compact`: finished or undone at open)
//! DIR/checkpoints/  one file per projection (NAME.ckpt: MessagePack in zstd), replaced atomically
//! DIR/archive/      compressed segments of old events (`agentsync archive`, see [`archive`])
//!     FIRST-LAST.seg    seqs FIRST..=LAST with an index of the ids they mention (0600)
//!     DROPPED.json      present once segments were deleted: seqs up to `through_seq` are gone
//! ```
//!
//! # Invariants
//! - Sequence numbers start at 1 and have no gaps; an entry, once written, is never rewritten.
//! - A batch of events is applied with one `sled::Batch` (atomic); with [`Durability::EveryBatch`]
//!   the database is flushed before `append` returns, so an acknowledged event survives a crash.
//!   [`EventLog::append_unflushed`] (the worker's lifecycle records) leaves it to the next flush;
//!   sled recovers a prefix, so a crash can lose such a batch only with everything after it.
//! - Every open, inspection commands' too, finishes or drops a write of the sessions view that a
//!   crash cut short (`rows`, invariant 5), as sled's own recovery does before anything is read;
//!   only a writer's open sets a damaged one aside (where the log can rebuild the view).
//! - There is one key per event and no secondary index: sled's cost is per key, and an index by
//!   session halved the durable append rate (measured: 0.36 x raw sled with it). Reads by session
//!   scan with a byte prefilter (the id as a JSON string) and decode only the candidates.
//! - `FORMAT.json` is checked before sled is opened: a directory written by a newer agentsync
//!   is refused with nothing modified.
//! - A writer that names its identity has it checked against `IDENTITY.json` before sled is
//!   opened, too: a directory recorded for another worker id, agent server or backend is
//!   refused with nothing modified, unless adopting was asked for.
//! - Undecodable entries are reported with their sequence number, never skipped silently; a
//!   damaged archive segment is reported with its file name.
//! - Archive and live log are one sequence: seqs up to the archive's last one are read from
//!   segments, the rest from sled ([`EventLog::archived_through`]); `read`, `stream` and `get`
//!   do this for every caller.

mod archive;
mod checkpoint;
mod compact;
mod format;
mod identity;
mod lock;
mod packed;
mod private;
pub mod rows;
mod segment;

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use archive::ArchiveState;
pub use archive::{ArchiveOptions, ArchiveReport};
pub use compact::CompactReport;
pub use segment::SegmentInfo;
use segment::{Records, SegmentFile};

pub use checkpoint::{
    load_views, verify_checkpoint, CatchUp, CheckpointError, CheckpointPolicy, CheckpointStore,
    LiveViews, Origin, Verification,
};
pub use format::Format;
use futures_core::Stream;
pub use identity::{load_identity, store_identity, IdentityStatus};

use crate::events::{DecodeError, Envelope, EventKind, Identity, NewEvent};

const EVENTS_TREE: &str = "events";
/// The version of the sessions view a start upcasts, not rebuilds, on a log that cannot rebuild
/// it (its oldest segments deleted): see `rows::UPCASTS_FROM`.
pub const SESSIONS_UPCASTS_FROM: u32 = rows::UPCASTS_FROM;
/// The checkpoint files' directory in a data directory (`checkpoint`).
const CHECKPOINTS_DIR: &str = "checkpoints";
/// The tree of the log's own bookkeeping: [`COMPACTED_THROUGH`].
const LOG_META_TREE: &str = "log.meta";
/// The archive's last seq when the database was last compacted (u64, big-endian).
const COMPACTED_THROUGH: &[u8] = b"compacted_through";

/// A compaction is due ([`EventLog::compaction_due`]) once this many events were archived since
/// the last one, and more than the live log still holds. sled keeps the cost of what it ever
/// held: 2,000,000 events archived leave a database that opens in 240 ms and 200 MB resident,
/// as before (`docs/architecture.md`); a quarter of that is tens of milliseconds per start.
pub const COMPACT_AFTER_ARCHIVED: u64 = 500_000;
/// How many events a blocking reader hands over at a time.
const READ_CHUNK: usize = 1024;

/// When appended events are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flush at the end of every batch: `append` returns only once the batch is on disk.
    EveryBatch,
    /// Flush at the end of a batch when this much time has passed since the last flush.
    /// Events in between may be lost by a crash (not by a clean shutdown, which flushes).
    Interval(Duration),
}

/// How to open a log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Create the directory if it does not exist (the worker does; inspection commands do not).
    pub create: bool,
    /// Durability policy for appends.
    pub durability: Durability,
    /// sled's page cache in bytes. Set deliberately: sled's default (1 GiB) let a 200 MB log use
    /// 390 MB. Every reader here is one pass in key order (catch-up, rebuild, replay, export)
    /// and appends touch the last leaf, so a small cache costs no speed: measured with
    /// `agentsync-bench log` on 1,000,000 events, 4 MiB rebuilt at 246,000 events/s against
    /// 251,000 with 64 MiB, appended as fast, and kept 60 MB less resident.
    pub cache_bytes: u64,
    /// Who opens the directory (the worker): checked against `IDENTITY.json` before anything
    /// in the directory is touched. `None`: not checked (inspection commands). Recording it
    /// is the caller's, after opening ([`EventLog::identity_status`], [`store_identity`]).
    pub identity: Option<Identity>,
    /// Accept `identity` even though another one is recorded (`--adopt`).
    pub adopt: bool,
    /// Read the file checkpoints on a thread of their own while sled opens, once the directory
    /// is checked and locked, for the first [`LiveViews::open`]: a worker's start
    /// ([`checkpoint::Preloaded`]).
    pub read_ahead: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            create: false,
            durability: Durability::EveryBatch,
            cache_bytes: 4 * 1024 * 1024,
            identity: None,
            adopt: false,
            read_ahead: false,
        }
    }
}

/// What can go wrong with the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The directory holds no log and `create` was not asked for.
    #[error("no agentsync data directory at {0} (expected {0}/log); check --data-dir")]
    NotFound(PathBuf),
    /// Another process holds the directory.
    #[error("data directory {dir} is in use by another agentsync process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, when it could be read.
        pid: Option<u32>,
    },
    /// The directory was written by a newer agentsync.
    #[error(
        "data directory {dir} was written by a newer agentsync: {reason}; nothing was modified"
    )]
    NewerSchema {
        /// The directory.
        dir: PathBuf,
        /// What is newer.
        reason: String,
    },
    /// The directory belongs to another worker id, agent server or backend.
    #[error(
        "data directory {dir} belongs to another identity (its IDENTITY.json): {differences}; to move it deliberately, start once with --adopt (config: adopt = true); nothing was modified"
    )]
    IdentityMismatch {
        /// The directory.
        dir: PathBuf,
        /// What differs, recorded value and new one.
        differences: String,
    },
    /// The directory is not private to this user.
    #[error("data directory {dir} is not safe to use: {reason}; nothing was modified")]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// An entry could not be decoded.
    #[error("event seq {seq} cannot be decoded: {source}")]
    Corrupt {
        /// Its sequence number.
        seq: u64,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// An archive segment cannot be read (bad checksum, truncated, undecodable).
    #[error("archive segment {} is damaged: {reason}", file.display())]
    Segment {
        /// The segment's file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Seqs the archive should hold are in none of its segments (a segment file went missing).
    #[error("seqs {from}..={to} are in no archive segment: a segment file is missing")]
    ArchiveGap {
        /// The first missing seq.
        from: u64,
        /// The last missing seq.
        to: u64,
    },
    /// Events needed were deleted from the archive (`--drop-older-than-days`).
    #[error("events up to seq {through} were dropped from the archive: what needs them from seq 1 (a rebuild from scratch) cannot be done")]
    Dropped {
        /// The last seq deleted.
        through: u64,
    },
    /// A key in the events tree is not an 8-byte sequence number.
    #[error("the events tree holds a malformed key {key:?}: the log is corrupt")]
    BadKey {
        /// The key's bytes.
        key: Vec<u8>,
    },
    /// sled failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A compaction's copy does not match the database it copies (`log::compact`); the
    /// database is left as it was.
    #[error("compacting the log failed: {0}; the database is left as it was")]
    Compact(String),
    /// The sessions view's stored rows contradict each other (`log::rows`).
    #[error("the sessions checkpoint's rows are damaged: {reason}; run `agentsync rebuild --projection sessions`")]
    Rows {
        /// What is wrong.
        reason: String,
    },
    /// The file system failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl LogError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LogError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn segment(seg: &SegmentInfo, reason: String) -> Self {
        LogError::Segment {
            file: seg.path.clone(),
            reason,
        }
    }

    /// True when the error is about how the log was asked for (bad path, newer schema, locked,
    /// another identity), rather than a failure while using it: the CLI exits 2 for these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            LogError::NotFound(_)
                | LogError::NewerSchema { .. }
                | LogError::Locked { .. }
                | LogError::IdentityMismatch { .. }
                | LogError::UnsafeDir { .. }
        )
    }
}

/// Which events to read.
#[derive(Debug, Clone)]
pub struct ReadFilter {
    /// Sequence numbers to read, inclusive.
    pub range: RangeInclusive<u64>,
    /// Only events about this session (chat or agent id).
    pub session: Option<String>,
    /// Only events of these kinds (`None`: all).
    pub kinds: Option<Vec<EventKind>>,
}

impl Default for ReadFilter {
    fn default() -> Self {
        Self {
            range: 1..=u64::MAX,
            session: None,
            kinds: None,
        }
    }
}

impl ReadFilter {
    /// Every event from `from` on.
    pub fn from(from: u64) -> Self {
        Self {
            range: from..=u64::MAX,
            ..Self::default()
        }
    }

    fn wants_kind(&self, kind: EventKind) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }

    /// The event stored as `bytes` at `seq`, decoded, if it passes the filter. An event about a
    /// session holds its id as a JSON string: bytes without `needle` are skipped undecoded.
    /// Candidates are decoded and confirmed (the id may appear in other fields).
    fn accept(
        &self,
        needle: Option<&[u8]>,
        seq: u64,
        bytes: &[u8],
    ) -> Option<Result<Envelope, LogError>> {
        if let Some(n) = needle {
            memchr::memmem::find(bytes, n)?;
        }
        match decode_at(seq, bytes) {
            Ok(env) if !self.wants_kind(env.kind()) => None,
            Ok(env)
                if self
                    .session
                    .as_deref()
                    .is_some_and(|s| !env.event.session_ids().contains(&s)) =>
            {
                None
            }
            other => Some(other),
        }
    }
}

/// The append-only event log of one data directory.
pub struct EventLog {
    dir: PathBuf,
    db: sled::Db,
    events: sled::Tree,
    /// The sessions view's checkpoint, row by row (`rows`).
    session_rows: sled::Tree,
    durability: Durability,
    /// sled's cache, bytes (`LogOptions::cache_bytes`).
    cache_bytes: u64,
    writer: Mutex<WriterState>,
    identity: Option<IdentityStatus>,
    /// The archive's segments, replaced whole when a run adds or drops some.
    archive: RwLock<Arc<ArchiveState>>,
    /// Held by an archive run: one at a time.
    archiving: Mutex<()>,
    /// The segment read last (by `get` or a reader), decompressed: `why` prints what it read.
    cached: Mutex<Option<(u64, Arc<Records>)>>,
    /// The file checkpoints read while this opened (`LogOptions::read_ahead`), until taken.
    read_ahead: Mutex<Option<checkpoint::Preloaded>>,
    _lock: lock::DirLock,
}

struct WriterState {
    /// The last sequence number appended.
    last_seq: u64,
    /// The last sequence number known to be on disk.
    durable_seq: u64,
    last_flush: Instant,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").field("dir", &self.dir).finish()
    }
}

impl EventLog {
    /// Opens (or, with `create`, creates) the log in `dir`: takes the directory lock, checks the
    /// schema marker and the identity (when one is given), and opens sled.
    /// Blocking: call it off the async runtime.
    pub fn open(dir: impl AsRef<Path>, opts: &LogOptions) -> Result<EventLog, LogError> {
        Self::open_locked(dir, opts, None)
    }

    /// [`EventLog::open`], with the directory lock already held (`held`) or taken here.
    fn open_locked(
        dir: impl AsRef<Path>,
        opts: &LogOptions,
        held: Option<lock::DirLock>,
    ) -> Result<EventLog, LogError> {
        let dir = dir.as_ref().to_path_buf();
        let db_path = dir.join("log");
        // A compaction cut between its renames leaves the database at `log.ready/`.
        let had_log = db_path.exists() || dir.join("log.ready").exists();
        if !had_log && !opts.create {
            return Err(LogError::NotFound(dir));
        }
        private::prepare_dir(&dir, opts.create)?;
        let lock = match held {
            Some(lock) => lock,
            None => lock::DirLock::acquire(&dir)?,
        };
        let format = Format::load(&dir)?;
        if let Some(reason) = format.as_ref().and_then(Format::newer_than_this_binary) {
            return Err(LogError::NewerSchema { dir, reason });
        }
        let identity = match &opts.identity {
            Some(current) => Some(identity::check(&dir, current, opts.adopt, had_log)?),
            None => None,
        };
        compact::recover(&dir)?;
        let read_ahead = opts.read_ahead.then(|| {
            let dir = dir.clone();
            std::thread::spawn(move || checkpoint::Preloaded::read(&dir))
        });
        let db = open_sled(&db_path, opts.cache_bytes)?;
        let events = db.open_tree(EVENTS_TREE)?;
        let archive = ArchiveState::load(&dir)?;
        // Everything may be archived: the next seq follows the archive's last one then.
        let last_seq = match events.last()? {
            Some((k, _)) => seq_of(&k)?,
            None => 0,
        }
        .max(archive.through());
        // A writer records the versions it writes before it writes anything; inspection
        // commands (opened without `create`) leave `FORMAT.json` as they found it.
        let merged = Format::current().merged_with(format.as_ref());
        if opts.create && format.as_ref() != Some(&merged) {
            merged.store(&dir)?;
        }
        let session_rows = db.open_tree(rows::TREE)?;
        let log = EventLog {
            dir,
            db,
            events,
            session_rows,
            durability: opts.durability,
            cache_bytes: opts.cache_bytes,
            writer: Mutex::new(WriterState {
                last_seq,
                durable_seq: last_seq,
                last_flush: Instant::now(),
            }),
            identity,
            archive: RwLock::new(Arc::new(archive)),
            archiving: Mutex::new(()),
            cached: Mutex::new(None),
            // A thread that panicked read nothing: the start reads the files itself.
            read_ahead: Mutex::new(read_ahead.and_then(|t| t.join().ok())),
            _lock: lock,
        };
        // A write of the sessions view cut short by a crash: finished or dropped (`rows`,
        // invariant 5) before anything reads the tree.
        log.finish_rows_write(opts.create)?;
        Ok(log)
    }

    /// Rewrites the log's sled database without the space sled keeps for what was removed
    /// (after an archive, its open time and memory stay those of the most it ever held), and
    /// closes it: see [`compact`]. The directory lock is held to the end. Blocking.
    pub fn compact(self) -> Result<CompactReport, LogError> {
        self.compact_steps(compact::STEPS)
    }

    /// Opens the log as [`EventLog::open`] does, compacted first when a compaction is due at
    /// `threshold` ([`EventLog::compaction_due`]): for a worker's start, without which its
    /// hourly archives would leave sled as slow to open, and as large in memory, as its
    /// busiest past. A compaction that fails is logged and the log opened as it is (one cut
    /// short is finished or undone by that open); one that failed before its copy was swapped
    /// in is still due, and the next start tries again. Blocking.
    pub fn open_compacted(
        dir: impl AsRef<Path>,
        opts: &LogOptions,
        threshold: u64,
    ) -> Result<Self, LogError> {
        let dir = dir.as_ref();
        let log = EventLog::open(dir, opts)?;
        let Some(since) = log.compaction_due(threshold)? else {
            return Ok(log);
        };
        // What was read ahead is kept for the reopen, not read again.
        let read_ahead = log.take_read_ahead();
        let opts = &LogOptions {
            read_ahead: false,
            ..opts.clone()
        };
        tracing::info!(
            archived_since = since,
            "compacting the log before starting (events archived since its last compaction)"
        );
        // The lock is held from the first open to the second: nothing slips in between.
        let (compacted, lock) = log.compact_holding_lock(compact::STEPS);
        match compacted {
            Ok(r) => tracing::info!(
                bytes_before = r.bytes_before,
                bytes_after = r.bytes_after,
                entries = r.entries,
                "log compacted"
            ),
            Err(e) => tracing::warn!(error = %e, "compacting the log failed: opening it as it is"),
        }
        let log = EventLog::open_locked(dir, opts, Some(lock))?;
        *log.read_ahead.lock().expect("read-ahead poisoned") = read_ahead;
        Ok(log)
    }

    /// Finishes or drops a write of the sessions view a crash cut short (`rows::finish_staged`).
    /// A damaged stage is left as it is by inspection commands (`writer` false: reading the
    /// view then fails naming it), and by a writer on a log that cannot rebuild the view (the
    /// open fails naming it); else the writer sets it aside with the view, which is rebuilt
    /// from the log. Blocking.
    fn finish_rows_write(&self, writer: bool) -> Result<(), LogError> {
        match rows::finish_staged(&self.session_rows) {
            Err(LogError::Rows { reason }) if !writer => {
                tracing::warn!(%reason, "the sessions checkpoint is damaged; left as it is");
                Ok(())
            }
            Err(LogError::Rows { reason }) => {
                checkpoint::kept_unless_rebuildable(self, &reason)?;
                tracing::warn!(%reason, "setting the damaged sessions checkpoint aside: it is rebuilt from the log");
                rows::discard_staged(&self.session_rows)
            }
            finished => finished,
        }
    }

    /// The file checkpoints read while this opened (`LogOptions::read_ahead`), once.
    pub(crate) fn take_read_ahead(&self) -> Option<checkpoint::Preloaded> {
        self.read_ahead.lock().expect("read-ahead poisoned").take()
    }

    /// Events archived since the last compaction (or ever, if none), when at least
    /// `threshold` and more than the live log holds: a compaction would then shed most of
    /// what sled keeps. `run` compacts at its start when [`COMPACT_AFTER_ARCHIVED`] are.
    /// Blocking.
    pub fn compaction_due(&self, threshold: u64) -> Result<Option<u64>, LogError> {
        let through = self.archived_through();
        let compacted = match self.db.open_tree(LOG_META_TREE)?.get(COMPACTED_THROUGH)? {
            Some(v) => <[u8; 8]>::try_from(v.as_ref()).map_or(0, u64::from_be_bytes),
            None => 0,
        };
        let since = through.saturating_sub(compacted);
        let live = self.last_seq().saturating_sub(through);
        Ok((since >= threshold && since > live).then_some(since))
    }

    /// The first `steps` of [`EventLog::compact`]: tests cut it at each point.
    pub(crate) fn compact_steps(self, steps: usize) -> Result<CompactReport, LogError> {
        self.compact_holding_lock(steps).0
    }

    /// [`EventLog::compact_steps`], handing back the directory lock with the outcome.
    fn compact_holding_lock(
        self,
        steps: usize,
    ) -> (Result<CompactReport, LogError>, lock::DirLock) {
        let flushed = self.flush().and_then(|_| Ok(self.db.size_on_disk()?));
        // The copy records how far the archive went, so that the next is due only after as
        // many events again.
        let through = self.archived_through().to_be_bytes();
        let stamp = move |db: &sled::Db| -> Result<(), LogError> {
            db.open_tree(LOG_META_TREE)?
                .insert(COMPACTED_THROUGH, &through[..])?;
            Ok(())
        };
        let EventLog {
            dir,
            db,
            events,
            session_rows,
            cache_bytes,
            _lock,
            ..
        } = self;
        drop((events, session_rows));
        let compacted = (|| {
            let bytes_before = flushed?;
            let entries = compact::run(db, &dir, cache_bytes, steps, &stamp)?;
            // Opened only once swapped in: opening a missing `log/` would make an empty one.
            // Only a figure for the report: the compaction is done whatever it says (0).
            let size = || -> Result<u64, LogError> {
                Ok(open_sled(&dir.join("log"), cache_bytes)?.size_on_disk()?)
            };
            let bytes_after = match steps >= compact::STEPS {
                true => size().unwrap_or(0),
                false => 0,
            };
            Ok(CompactReport {
                bytes_before,
                bytes_after,
                entries,
            })
        })();
        (compacted, _lock)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What opening found about the directory's identity (`None`: none was given to check).
    pub fn identity_status(&self) -> Option<&IdentityStatus> {
        self.identity.as_ref()
    }

    /// Another tree of the log's sled database, for state that lives beside the log (the
    /// embedded local backend). The events tree is never handed out: only `append` writes it.
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, LogError> {
        assert_ne!(name, EVENTS_TREE, "the events tree is the log's own");
        assert_ne!(
            name,
            rows::TREE,
            "the sessions rows tree is the checkpoints'"
        );
        Ok(self.db.open_tree(name)?)
    }

    /// The last sequence number appended (0 for an empty log).
    pub fn last_seq(&self) -> u64 {
        self.writer.lock().expect("log writer poisoned").last_seq
    }

    /// The last sequence number known to be on disk.
    pub fn durable_seq(&self) -> u64 {
        self.writer.lock().expect("log writer poisoned").durable_seq
    }

    /// Appends events as one atomic batch and returns them as stored. With
    /// [`Durability::EveryBatch`] they are on disk when this returns. Blocking.
    pub fn append(&self, batch: Vec<NewEvent>) -> Result<Vec<Envelope>, LogError> {
        self.append_then(batch, true)
    }

    /// [`EventLog::append`] without waiting for the disk, whatever the durability: the batch
    /// is on disk with the next flush (the next append that flushes, a checkpoint, a clean
    /// stop, or sled's own within half a second). A crash before then may lose it, and then
    /// everything after it too: sled recovers a prefix of its log (sled 0.34,
    /// `pagecache/segment.rs`, "torn segments"). For records whose loss costs only a line of
    /// history (a worker's lifecycle), where a wait would hold up the start: sled zeroes its
    /// free segments at every open, and the first flush after waits for them to reach the disk
    /// (measured: 20 ms at a million sessions, 76 MB in 145 free segments). Blocking.
    pub fn append_unflushed(&self, batch: Vec<NewEvent>) -> Result<Vec<Envelope>, LogError> {
        self.append_then(batch, false)
    }

    /// Appends, then flushes when `may_flush` and the durability says so.
    fn append_then(
        &self,
        batch: Vec<NewEvent>,
        may_flush: bool,
    ) -> Result<Vec<Envelope>, LogError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = self.writer.lock().expect("log writer poisoned");
        let mut events = sled::Batch::default();
        let mut stored = Vec::with_capacity(batch.len());
        let mut seq = w.last_seq;
        for new in batch {
            seq += 1;
            let env = Envelope {
                seq,
                id: new.id,
                at: new.at,
                v: new.event.kind().version(),
                event: new.event,
                cause: new.cause,
            };
            events.insert(&seq.to_be_bytes(), env.encode());
            stored.push(env);
        }
        self.events.apply_batch(events)?;
        w.last_seq = seq;
        let due = may_flush
            && match self.durability {
                Durability::EveryBatch => true,
                Durability::Interval(every) => w.last_flush.elapsed() >= every,
            };
        if due {
            self.db.flush()?;
            w.durable_seq = seq;
            w.last_flush = Instant::now();
        }
        Ok(stored)
    }

    /// Flushes everything appended so far to disk. Blocking.
    pub fn flush(&self) -> Result<u64, LogError> {
        let mut w = self.writer.lock().expect("log writer poisoned");
        self.db.flush()?;
        w.durable_seq = w.last_seq;
        w.last_flush = Instant::now();
        Ok(w.durable_seq)
    }

    /// Reads events matching `filter` in sequence order. An undecodable entry is yielded as
    /// [`LogError::Corrupt`] and reading goes on after it: the caller decides to stop or skip.
    /// Blocking: use [`EventLog::stream`] from async code.
    pub fn read(
        &self,
        filter: ReadFilter,
    ) -> impl Iterator<Item = Result<Envelope, LogError>> + Send + '_ {
        let needle = filter
            .session
            .as_ref()
            .map(|s| serde_json::to_vec(s).expect("strings serialize"));
        let range = filter.range.clone();
        Reader::new(self, range, move |seq, bytes| {
            filter.accept(needle.as_deref(), seq, bytes)
        })
    }

    /// Reads seqs `range` (archive and live log) as [`Link`]s: each event's id and cause, and
    /// the event decoded whole only when its stored bytes contain `needle` (`None`: always).
    /// The causal graph of a long log without decoding every body: what `why` reads. Blocking.
    pub fn read_links(
        &self,
        range: RangeInclusive<u64>,
        needle: Option<&str>,
    ) -> impl Iterator<Item = Result<Link, LogError>> + Send + '_ {
        let needle = needle.map(|n| n.as_bytes().to_vec());
        Reader::new(self, range, move |seq, bytes| {
            Some(link_at(seq, bytes, needle.as_deref()))
        })
    }

    /// [`EventLog::read`] as an async stream: the scan and decoding run on a blocking thread and
    /// hand events over in chunks, so the async workers never wait on sled.
    pub fn stream(
        self: &Arc<Self>,
        filter: ReadFilter,
    ) -> impl Stream<Item = Result<Envelope, LogError>> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Result<Envelope, LogError>>>(4);
        let log = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut chunk = Vec::with_capacity(READ_CHUNK);
            for item in log.read(filter) {
                chunk.push(item);
                if chunk.len() == READ_CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(READ_CHUNK));
                    if tx.blocking_send(full).is_err() {
                        return; // the reader went away
                    }
                }
            }
            if !chunk.is_empty() {
                let _ = tx.blocking_send(chunk);
            }
        });
        async_stream::stream! {
            while let Some(chunk) = rx.recv().await {
                for item in chunk {
                    yield item;
                }
            }
        }
    }

    /// Reads one event by sequence number, from the archive or the live log. Blocking.
    pub fn get(&self, seq: u64) -> Result<Option<Envelope>, LogError> {
        let state = self.archive_state();
        if seq <= state.through() {
            let Ok(seg) = state.find(seq) else {
                return Ok(None);
            };
            let records = self.cached_segment(seg)?;
            return records.get(seq).map(|b| decode_at(seq, b)).transpose();
        }
        match self.events.get(seq.to_be_bytes())? {
            Some(bytes) => decode_at(seq, &bytes).map(Some),
            // Archived since the state was read: the archive has it now.
            None if seq <= self.archived_through() => self.get(seq),
            None => Ok(None),
        }
    }

    /// The last seq the archive holds or dropped (0: nothing archived): the live log (sled)
    /// starts after it.
    pub fn archived_through(&self) -> u64 {
        self.archive_state().through()
    }

    /// The last seq deleted for good from the archive (0: none).
    pub fn dropped_through(&self) -> u64 {
        self.archive_state().dropped_through
    }

    /// The archive's segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.archive_state().segments.clone()
    }

    /// Every segment's header and index, to find the segments an id needs without reading
    /// their events. Blocking.
    pub fn archive_index(&self) -> Result<ArchiveIndex, LogError> {
        let mut segments = Vec::new();
        for seg in self.segments() {
            let mut file = SegmentFile::open(&seg).map_err(|r| LogError::segment(&seg, r))?;
            let index = file.index().map_err(|r| LogError::segment(&seg, r))?;
            segments.push((seg, file.header, index));
        }
        Ok(ArchiveIndex { segments })
    }

    /// [`ArchiveIndex::segments_mentioning`] on a fresh [`EventLog::archive_index`]. Blocking.
    pub fn segments_mentioning(&self, id: &str) -> Result<Vec<SegmentInfo>, LogError> {
        Ok(self.archive_index()?.segments_mentioning(id))
    }

    fn archive_state(&self) -> Arc<ArchiveState> {
        Arc::clone(&self.archive.read().expect("archive state poisoned"))
    }

    /// `seg`'s events, decompressed and checked.
    fn load_segment(seg: &SegmentInfo) -> Result<Records, LogError> {
        SegmentFile::open(seg)
            .and_then(SegmentFile::records)
            .map_err(|r| LogError::segment(seg, r))
    }

    /// [`EventLog::load_segment`], keeping the last one read for the next `get` or reader.
    fn cached_segment(&self, seg: &SegmentInfo) -> Result<Arc<Records>, LogError> {
        let mut cached = self.cached.lock().expect("segment cache poisoned");
        if let Some((first, records)) = cached.as_ref() {
            if *first == seg.first_seq {
                return Ok(Arc::clone(records));
            }
        }
        let records = Arc::new(Self::load_segment(seg)?);
        *cached = Some((seg.first_seq, Arc::clone(&records)));
        Ok(records)
    }

    /// Bytes used on disk by the whole data directory.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        fn walk(p: &Path) -> std::io::Result<u64> {
            let mut total = 0;
            for entry in std::fs::read_dir(p)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                total += if meta.is_dir() {
                    walk(&entry.path())?
                } else {
                    meta.len()
                };
            }
            Ok(total)
        }
        walk(&self.dir)
            .map_err(|e| LogError::io(format!("cannot measure {}", self.dir.display()), e))
    }

    /// Where checkpoints of this log live: files, and the sessions view's rows in this log's
    /// database (`rows`). The store shares the database: the data directory stays locked
    /// until both it and the log are dropped.
    pub fn checkpoints(&self) -> CheckpointStore {
        CheckpointStore::with_rows(self.dir.join(CHECKPOINTS_DIR), self.session_rows.clone())
    }
}

/// The archive's segments with their headers and indexes, in memory.
pub struct ArchiveIndex {
    segments: Vec<(SegmentInfo, segment::Header, segment::SegmentIndex)>,
}

impl std::fmt::Debug for ArchiveIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveIndex")
            .field("segments", &self.segments.len())
            .finish()
    }
}

impl ArchiveIndex {
    /// The segments whose index lists `id` (a command, message, chat or agent session id, or
    /// an event id some event in the segment names as its cause), or, when `id` is an event id,
    /// whose range of event ids includes it.
    pub fn segments_mentioning(&self, id: &str) -> Vec<SegmentInfo> {
        let event_id = uuid::Uuid::parse_str(id).ok();
        self.segments
            .iter()
            .filter(|(_, h, index)| match event_id {
                Some(e) => h.may_hold_event(e) || index.contains(&e.to_string()),
                None => index.contains(id),
            })
            .map(|(seg, _, _)| seg.clone())
            .collect()
    }
}

/// Reads archive and live log as one sequence, a chunk at a time: from the segment holding the
/// next seq while it is archived, else from sled. A run of keys in sled that stops short of the
/// next seq means an archive run moved them meanwhile: the reader looks in the archive again.
/// `accept` turns each event's stored bytes into an item, or skips it.
struct Reader<'a, T, F> {
    log: &'a EventLog,
    to: u64,
    accept: F,
    next: u64,
    segment: Option<Arc<Records>>,
    buf: VecDeque<Result<T, LogError>>,
    done: bool,
}

impl<'a, T, F> Reader<'a, T, F>
where
    F: FnMut(u64, &[u8]) -> Option<Result<T, LogError>>,
{
    fn new(log: &'a EventLog, range: RangeInclusive<u64>, accept: F) -> Self {
        Self {
            log,
            to: *range.end(),
            accept,
            next: *range.start(),
            segment: None,
            buf: VecDeque::new(),
            done: false,
        }
    }

    fn fill_archived(&mut self, state: &ArchiveState) {
        if self.next <= state.dropped_through {
            self.next = state.dropped_through + 1;
            return;
        }
        let seg = match state.find(self.next) {
            Ok(seg) => seg,
            Err(after) => {
                let to = after.map_or(state.through(), |s| s.first_seq - 1);
                self.buf.push_back(Err(LogError::ArchiveGap {
                    from: self.next,
                    to,
                }));
                self.next = to + 1;
                return;
            }
        };
        if self
            .segment
            .as_ref()
            .is_none_or(|r| r.get(self.next).is_none())
        {
            match self.log.cached_segment(seg) {
                Ok(r) => self.segment = Some(r),
                Err(e) => {
                    // The whole segment is unreadable: reported once, then passed over.
                    self.buf.push_back(Err(e));
                    self.next = seg.last_seq + 1;
                    return;
                }
            }
        }
        let records = Arc::clone(self.segment.as_ref().expect("just loaded"));
        let end = records.last().min(self.to);
        let chunk_end = end.min(self.next.saturating_add(READ_CHUNK as u64 - 1));
        for seq in self.next..=chunk_end {
            let bytes = records.get(seq).expect("within the segment");
            let item = (self.accept)(seq, bytes);
            self.buf.extend(item);
        }
        self.next = chunk_end + 1;
        if self.next > records.last() {
            self.segment = None;
        }
    }

    fn fill_live(&mut self) {
        let (from, to) = (self.next, self.to);
        let mut expected = from;
        let mut taken = 0;
        for item in self.log.events.range(from.to_be_bytes()..=to.to_be_bytes()) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    self.buf.push_back(Err(e.into()));
                    self.done = true;
                    return;
                }
            };
            let seq = match seq_of(&k) {
                Ok(s) => s,
                Err(e) => {
                    self.buf.push_back(Err(e));
                    continue;
                }
            };
            if seq != expected && expected <= self.log.archived_through() {
                break; // moved to the archive while we read: look there
            }
            let item = (self.accept)(seq, &v);
            self.buf.extend(item);
            taken += 1;
            expected = seq.saturating_add(1);
            if taken == READ_CHUNK || seq == u64::MAX {
                break;
            }
        }
        if taken == 0 && expected > self.log.archived_through() {
            self.done = true; // nothing more in range
        }
        self.next = expected;
    }
}

impl<T, F> Iterator for Reader<'_, T, F>
where
    F: FnMut(u64, &[u8]) -> Option<Result<T, LogError>>,
{
    type Item = Result<T, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.buf.pop_front() {
                return Some(item);
            }
            if self.done || self.next > self.to {
                return None;
            }
            let state = self.log.archive_state();
            if self.next <= state.through() {
                self.fill_archived(&state);
            } else {
                self.fill_live();
            }
        }
    }
}

/// An event's place in the causal graph ([`EventLog::read_links`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its seq.
    pub seq: u64,
    /// Its id.
    pub id: uuid::Uuid,
    /// The event that caused it.
    pub cause: Option<uuid::Uuid>,
    /// The event itself, when its stored bytes contain the needle asked for.
    pub event: Option<Envelope>,
}

/// The part of a stored envelope a [`Link`] needs; the rest is skipped undecoded.
#[derive(serde::Deserialize)]
struct Head {
    id: uuid::Uuid,
    cause: Option<uuid::Uuid>,
}

fn link_at(seq: u64, bytes: &[u8], needle: Option<&[u8]>) -> Result<Link, LogError> {
    if needle.is_none_or(|n| memchr::memmem::find(bytes, n).is_some()) {
        let env = decode_at(seq, bytes)?;
        return Ok(Link {
            seq,
            id: env.id,
            cause: env.cause,
            event: Some(env),
        });
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| LogError::Corrupt {
        seq,
        source: DecodeError::Envelope(e),
    })?;
    Ok(Link {
        seq,
        id: head.id,
        cause: head.cause,
        event: None,
    })
}

/// Opens sled. We hold `DIR/LOCK`, so no other process uses the directory; if sled's own file
/// lock is still busy, it is held by an instance this process just dropped whose background
/// flusher has not finished: wait for it (briefly) instead of failing.
fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, LogError> {
    let config = sled::Config::new().path(path).cache_capacity(cache_bytes);
    let mut waited = Duration::ZERO;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if waited < Duration::from_secs(5)
                    && e.to_string().contains("could not acquire lock") =>
            {
                std::thread::sleep(Duration::from_millis(20));
                waited += Duration::from_millis(20);
            }
            other => return Ok(other?),
        }
    }
}

fn seq_of(key: &[u8]) -> Result<u64, LogError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| LogError::BadKey { key: key.to_vec() })?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_at(seq: u64, bytes: &[u8]) -> Result<Envelope, LogError> {
    Envelope::decode(bytes).map_err(|source| LogError::Corrupt { seq, source })
}
