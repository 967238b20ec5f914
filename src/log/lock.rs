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

impl DirLock {
    /// Takes `DIR/LOCK` without waiting, or says who holds it.
    pub(crate) fn acquire(dir: &Path) -> Result<Self, LogError> {
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
