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
    )?;
    if create {
        // A directory of ours from before agentsync made it private (or moved here by hand):
        // what others could read, they no longer can.
        let narrowed = narrow(dir)
            .map_err(|e| LogError::io(format!("cannot make {} private", dir.display()), e))?;
        if narrowed > 0 {
            tracing::info!(dir = %dir.display(), entries = narrowed, "data directory made private to its user");
        }
    }
    Ok(())
}

/// Makes a rename or an unlink in `dir` durable, where the file system supports fsync of a
/// directory (not every one does: best effort).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Sets `dir` and everything under it to 0700 (directories) and 0600 (files) where group or
/// others had any access; symlinks are left alone, never followed. Returns how many entries
/// changed.
pub(crate) fn narrow(dir: &Path) -> std::io::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let mut changed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let private = if meta.is_dir() { 0o700 } else { 0o600 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & private))?;
            changed += 1;
        }
    }
    Ok(changed)
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

/// Reads and parses a JSON file of the data directory (`FORMAT.json`, `IDENTITY.json`), never
/// through a symlink; `None` when it does not exist.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, LogError> {
    match read(path) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            LogError::io(
                format!("{} is unreadable", path.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        }),
        Ok(None) => Ok(None),
        Err(e) => Err(LogError::io(format!("cannot read {}", path.display()), e)),
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
    fn a_writer_narrows_a_readable_directory_of_its_own_and_leaves_links_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("log")).unwrap();
        std::fs::write(data.join("log/db"), b"x").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"y").unwrap();
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        set(&data, 0o755);
        set(&data.join("log"), 0o755);
        set(&data.join("log/db"), 0o644);
        set(&outside, 0o644);
        prepare_dir(&data, false).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o755, "a reader changes nothing");
        prepare_dir(&data, true).unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("log")), 0o700);
        assert_eq!(mode(&data.join("log/db")), 0o600);
        assert_eq!(
            mode(&outside),
            0o644,
            "a link's target is not ours to change"
        );
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
