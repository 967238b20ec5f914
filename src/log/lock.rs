//! The data-directory lock: one process per directory, and a clear message naming the holder.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use super::LogError;

/// Held for as long as a process uses a data directory; released (by the OS, too, if the
/// process dies) when dropped.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

/// How long a process waits for a lock that names itself (see [`DirLock::acquire`]).
const OWN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl DirLock {
    /// Takes `DIR/LOCK` without waiting, or says who holds it.
    ///
    /// One exception to "without waiting": a lock that names this very process, which it just
    /// released. A child this process is starting (say, the agent server) holds a copy of every
    /// descriptor between `fork` and `exec`, where close-on-exec drops it; the `flock` lives as
    /// long as any copy. So a process that closes its data directory and opens it again while
    /// another thread starts a child may find its own released lock still held for a moment:
    /// it waits for that moment (at most two seconds), never for another process.
    pub(crate) fn acquire(dir: &Path) -> Result<Self, LogError> {
        let deadline = std::time::Instant::now() + OWN_LOCK_WAIT;
        loop {
            match Self::try_acquire(dir) {
                Err(LogError::Locked { pid: Some(pid), .. })
                    if pid == std::process::id() && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    /// [`DirLock::acquire`] without the wait for a lock this process just released.
    pub(super) fn try_acquire(dir: &Path) -> Result<Self, LogError> {
        let path = dir.join("LOCK");
        let mut file = super::private::open_rw(&path)
            .map_err(|e| LogError::io(format!("cannot open {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {
                // Best effort: the pid only makes the message for a second process clearer.
                let _ = file.set_len(0);
                let _ = file.rewind();
                let _ = write!(file, "{}", std::process::id());
                let _ = file.sync_all();
                Ok(DirLock { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut held_by = String::new();
                let _ = file.read_to_string(&mut held_by);
                Err(LogError::Locked {
                    dir: dir.to_path_buf(),
                    pid: held_by.trim().parse().ok(),
                })
            }
            Err(TryLockError::Error(e)) => {
                Err(LogError::io(format!("cannot lock {}", path.display()), e))
            }
        }
    }
}
