//! The data directory is private to its user: it holds every user message, prompt and answer.
//!
//! Invariants:
//! - a directory agentsync creates is mode 0700, and every file in it 0600 (the process runs
//!   with umask 0o077: `cli::private_files`);
//! - a directory owned by another user, or writable by group or others, is refused before
//!   anything in it is read or written: whoever can write it can plant a log or a lock;
//! - the files agentsync opens by name in it (`LOCK`, `FORMAT.json`, `IDENTITY.json`, temp files)
//!   are opened without following a symlink, so a link planted there cannot redirect a write.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::LogError;

/// Creates `dir` (mode 0700) when asked and missing, then refuses it unless it is this user's
/// and writable by nobody else.
pub(crate) fn prepare_dir(dir: &Path, create: bool) -> Result<(), LogError> {
    if create && !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| LogError::io(format!("cannot create {}", dir.display()), e))?;
    }
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        // Missing: the caller reports it in its own words.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LogError::io(format!("cannot inspect {}", dir.display()), e)),
    };
    check(
        dir,
        meta.uid(),
        meta.mode(),
        nix::unistd::geteuid().as_raw(),
    )
}

/// Why a directory with this owner and mode is not to be trusted by user `me`, if it is not.
fn check(dir: &Path, owner: u32, mode: u32, me: u32) -> Result<(), LogError> {
    let unsafe_dir = |reason: String| LogError::UnsafeDir {
        dir: dir.to_path_buf(),
        reason,
    };
    if owner != me {
        return Err(unsafe_dir(format!(
            "it is owned by uid {owner}, not by this user (uid {me})"
        )));
    }
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "it is writable by group or others (mode {:o}): `chmod go-w` it",
            mode & 0o777
        )));
    }
    Ok(())
}

/// Opens `path` for reading and writing, created 0600 if missing, never through a symlink.
pub(crate) fn open_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Creates `path` anew (0600), never through a symlink: a leftover of a crash (or a planted
/// link) is removed first, the link itself, not its target.
pub(crate) fn create_new(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Reads `path` whole, never through a symlink; `None` when it does not exist.
pub(crate) fn read(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path);
    match file {
        Ok(mut f) => {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_directory_of_ones_own_writable_by_nobody_else_is_trusted() {
        let d = Path::new("/data");
        assert!(check(d, 1000, 0o40700, 1000).is_ok());
        assert!(check(d, 1000, 0o40755, 1000).is_ok());
        let other = check(d, 0, 0o40700, 1000).unwrap_err().to_string();
        assert!(
            other.contains("owned by uid 0, not by this user (uid 1000)"),
            "{other}"
        );
        let group = check(d, 1000, 0o40770, 1000).unwrap_err().to_string();
        assert!(
            group.contains("writable by group or others (mode 770)"),
            "{group}"
        );
        assert!(check(d, 1000, 0o40757, 1000).is_err());
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("LOCK");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(
            open_rw(&link).is_err(),
            "opening through the link is refused"
        );
        assert!(read(&link).is_err());
        // Creating anew replaces the link itself; the target is untouched.
        create_new(&link).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
