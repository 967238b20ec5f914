//! Checkpoints: each projection's state at a sequence number, in `DIR/checkpoints/NAME.json`.
//!
//! A checkpoint is written only for events already durable in the log (the log is flushed first),
//! and replaced atomically (temporary file, fsync, rename). Starting = load each checkpoint and
//! apply what came after it. A checkpoint that is missing, of another projection version,
//! unreadable, or ahead of the log is set aside and that projection alone is rebuilt from seq 1.

use std::fmt;
use std::path::{Path, PathBuf};

use super::format::write_atomically;
use super::{EventLog, LogError, ReadFilter};
use crate::clock::Millis;
use crate::events::{CheckpointWritten, Envelope, Event, NewEvent};
use crate::projections::{Checkpoint, Projection, ProjectionName, Tracked, Views};

/// A checkpoint file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {path} is unreadable: {reason}")]
pub struct CheckpointError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// The checkpoint files of one data directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

impl CheckpointStore {
    /// The store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The file of projection `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Loads projection `P`'s checkpoint, whatever its version. `Ok(None)`: there is none.
    pub fn load<P: Projection>(&self) -> Result<Option<Checkpoint<P>>, CheckpointError> {
        let path = self.path(P::NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CheckpointError {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        // One typed parse in the usual case; only when it fails is the header read, to tell a
        // checkpoint of another version (rebuild) from a damaged one.
        match serde_json::from_slice::<Checkpoint<P>>(&bytes) {
            Ok(mut c) if c.version == P::VERSION => {
                c.state.loaded();
                Ok(Some(c))
            }
            Ok(c) => Ok(Some(Checkpoint {
                state: P::default(),
                ..c
            })),
            Err(e) => match serde_json::from_slice::<Checkpoint<serde::de::IgnoredAny>>(&bytes) {
                Ok(h) if h.version != P::VERSION => Ok(Some(Checkpoint {
                    name: h.name,
                    version: h.version,
                    seq: h.seq,
                    state: P::default(),
                })),
                _ => Err(CheckpointError {
                    path,
                    reason: e.to_string(),
                }),
            },
        }
    }

    /// Loads projection `name`'s checkpoint with its state as stored, untyped: what
    /// `rebuild --verify` compares against, so that nothing the typed state drops is hidden.
    pub fn load_raw(
        &self,
        name: &str,
    ) -> Result<Option<Checkpoint<serde_json::Value>>, CheckpointError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CheckpointError {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CheckpointError {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// The seq projection `name`'s checkpoint holds, whatever its version, without building
    /// its state. `Ok(None)`: there is none.
    pub fn seq(&self, name: &str) -> Result<Option<u64>, CheckpointError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Checkpoint<serde::de::IgnoredAny>>(&b)
                .map(|c| Some(c.seq))
                .map_err(|e| CheckpointError {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CheckpointError {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Writes a projection's checkpoint atomically, serializing its state in place (no copy:
    /// a view of 100,000 sessions is tens of megabytes).
    pub fn save<P: Projection>(&self, tracked: &Tracked<P>) -> Result<(), LogError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| LogError::io(format!("cannot create {}", self.dir.display()), e))?;
        let c = Checkpoint {
            name: P::NAME.to_owned(),
            version: P::VERSION,
            seq: tracked.seq,
            state: &tracked.state,
        };
        let bytes = serde_json::to_vec(&c).expect("projection state serializes");
        write_atomically(&self.path(P::NAME), &bytes)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Where a projection started from when it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// From its checkpoint at this seq.
    Checkpoint(u64),
    /// From seq 1, for this reason.
    Scratch(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Checkpoint(seq) => write!(f, "checkpoint at seq {seq}"),
            Origin::Scratch(why) => write!(f, "from scratch ({why})"),
        }
    }
}

/// What loading the views did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    /// Where each projection started.
    pub origins: Vec<(ProjectionName, Origin)>,
    /// Events read from the log after the checkpoints.
    pub applied: u64,
}

/// Where projection `P` starts: parked at `upto` when another projection was asked for (so it
/// is neither read for nor folded), from scratch when asked, else from its checkpoint if usable.
fn start<P: Projection>(
    store: &CheckpointStore,
    upto: u64,
    only: Option<ProjectionName>,
    scratch: bool,
    origins: &mut Vec<(ProjectionName, Origin)>,
    name: ProjectionName,
) -> Tracked<P> {
    if only.is_some_and(|o| o != name) {
        return Tracked {
            state: P::default(),
            seq: upto,
        };
    }
    if scratch {
        origins.push((name, Origin::Scratch("rebuild requested".into())));
        return Tracked::default();
    }
    let (tracked, origin) = match store.load::<P>() {
        Ok(None) => (Tracked::default(), Origin::Scratch("no checkpoint".into())),
        Ok(Some(c)) if c.version != P::VERSION => (
            Tracked::default(),
            Origin::Scratch(format!(
                "checkpoint is v{}, projection is v{}",
                c.version,
                P::VERSION
            )),
        ),
        Ok(Some(c)) if c.seq > upto => (
            Tracked::default(),
            Origin::Scratch(format!("checkpoint at seq {} is past seq {upto}", c.seq)),
        ),
        Ok(Some(c)) => {
            let seq = c.seq;
            (Tracked::from_checkpoint(c), Origin::Checkpoint(seq))
        }
        Err(e) => {
            tracing::warn!(error = %e, projection = P::NAME, "ignoring unusable checkpoint");
            (Tracked::default(), Origin::Scratch(e.to_string()))
        }
    };
    origins.push((name, origin));
    tracked
}

/// Loads the views as of seq `upto` (inclusive; `None`: the end of the log): each projection
/// from its checkpoint when that is usable and not past `upto`, then the events after it.
/// `progress` is called with each applied event's seq. Blocking.
pub fn load_views(
    log: &EventLog,
    upto: Option<u64>,
    only: Option<ProjectionName>,
    scratch: bool,
    mut progress: impl FnMut(u64),
) -> Result<(Views, CatchUp), LogError> {
    let last = log.last_seq();
    let upto = upto.unwrap_or(last).min(last);
    let store = log.checkpoints();
    let mut origins = Vec::new();
    let mut views = Views {
        sessions: start(
            &store,
            upto,
            only,
            scratch,
            &mut origins,
            ProjectionName::Sessions,
        ),
        messages: start(
            &store,
            upto,
            only,
            scratch,
            &mut origins,
            ProjectionName::Messages,
        ),
        commands: start(
            &store,
            upto,
            only,
            scratch,
            &mut origins,
            ProjectionName::Commands,
        ),
    };
    let mut applied = 0;
    let from = views.min_seq() + 1;
    let dropped = log.dropped_through();
    if from <= upto && from <= dropped {
        return Err(LogError::Dropped { through: dropped });
    }
    if from <= upto {
        for item in log.read(ReadFilter {
            range: from..=upto,
            ..ReadFilter::default()
        }) {
            let env = item?;
            views.apply(&env);
            applied += 1;
            progress(env.seq);
        }
    }
    Ok((views, CatchUp { origins, applied }))
}

/// When live views write their checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// After this many events.
    pub every_events: u64,
    /// Or after this much time, if any event came in.
    pub every_ms: Millis,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_events: 10_000,
            every_ms: 30_000,
        }
    }
}

/// The views a running process keeps up to date, with their checkpointing.
#[derive(Debug)]
pub struct LiveViews {
    /// The views.
    pub views: Views,
    policy: CheckpointPolicy,
    events_since: u64,
    last_write_at: Millis,
}

impl LiveViews {
    /// Loads the views (checkpoints + tail). Blocking.
    pub fn open(
        log: &EventLog,
        policy: CheckpointPolicy,
        now: Millis,
    ) -> Result<(Self, CatchUp), LogError> {
        let (views, catch_up) = load_views(log, None, None, false, |_| {})?;
        Ok((
            LiveViews {
                views,
                policy,
                events_since: catch_up.applied,
                last_write_at: now,
            },
            catch_up,
        ))
    }

    /// Folds newly appended events in.
    pub fn apply(&mut self, events: &[Envelope]) {
        for e in events {
            self.views.apply(e);
        }
        self.events_since += events.len() as u64;
    }

    /// Whether the policy says to write checkpoints now.
    pub fn due(&self, now: Millis) -> bool {
        self.events_since >= self.policy.every_events
            || (self.events_since > 0
                && now.saturating_sub(self.last_write_at) >= self.policy.every_ms)
    }

    /// Flushes the log, writes every projection's checkpoint, and records that in the log.
    /// Returns the seq the checkpoints hold. Blocking.
    pub fn write_checkpoints(&mut self, log: &EventLog, now: Millis) -> Result<u64, LogError> {
        log.flush()?;
        let store = log.checkpoints();
        let v = &self.views;
        store.save(&v.sessions)?;
        store.save(&v.messages)?;
        store.save(&v.commands)?;
        let written: Vec<NewEvent> = ProjectionName::ALL
            .iter()
            .map(|&p| {
                let body = CheckpointWritten {
                    projection: p.as_str().to_owned(),
                    version: p.version(),
                    seq: v.seq(p),
                };
                NewEvent::new(Event::CheckpointWritten(body), now)
            })
            .collect();
        let seq = v.min_seq();
        let appended = log.append(written)?;
        self.apply(&appended);
        self.events_since = 0;
        self.last_write_at = now;
        Ok(seq)
    }
}

/// What comparing a stored checkpoint with a rebuild found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// There is no checkpoint.
    Missing,
    /// The checkpoint matches a rebuild from scratch up to its seq.
    Matches {
        /// The checkpoint's seq.
        seq: u64,
    },
    /// The checkpoint differs: every difference, `path: checkpoint -> rebuilt`.
    Differs {
        /// The checkpoint's seq.
        seq: u64,
        /// The differences.
        diffs: Vec<String>,
    },
    /// The checkpoint cannot be compared (unreadable, other version, past the log's end).
    Unusable(String),
}

/// Rebuilds projection `name` from scratch up to its stored checkpoint's seq and compares the
/// two, as stored (untyped), so that nothing is hidden. Blocking.
pub fn verify_checkpoint(
    log: &EventLog,
    name: ProjectionName,
    progress: impl FnMut(u64),
) -> Result<Verification, LogError> {
    let stored = match log.checkpoints().load_raw(name.as_str()) {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Verification::Missing),
        Err(e) => return Ok(Verification::Unusable(e.to_string())),
    };
    if stored.version != name.version() {
        return Ok(Verification::Unusable(format!(
            "checkpoint is v{}, projection is v{}: run `agentsync rebuild --projection {name}`",
            stored.version,
            name.version()
        )));
    }
    if stored.seq > log.last_seq() {
        return Ok(Verification::Unusable(format!(
            "checkpoint at seq {} is past the end of the log (seq {})",
            stored.seq,
            log.last_seq()
        )));
    }
    let (views, _) = load_views(log, Some(stored.seq), Some(name), true, progress)?;
    let diffs = crate::projections::diff_states(&stored.state, &views.to_json(name));
    Ok(if diffs.is_empty() {
        Verification::Matches { seq: stored.seq }
    } else {
        Verification::Differs {
            seq: stored.seq,
            diffs,
        }
    })
}
