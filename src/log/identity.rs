//! `IDENTITY.json`: the worker id, agent server and backend a data directory belongs to,
//! checked when a writer opens the directory, before anything in it is touched.

use std::path::Path;

use super::format::write_atomically_private;
use super::LogError;
use crate::events::Identity;

const FILE: &str = "IDENTITY.json";

/// What opening a data directory for writing found about its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityStatus {
    /// The recorded identity is the one asked for.
    Same,
    /// A new directory: nothing recorded yet.
    New,
    /// A log with no identity recorded (written by an agentsync from before identities).
    Unrecorded,
    /// Another identity is recorded and adopting was asked for: this is the recorded one.
    Adopting(Identity),
}

/// Reads the identity recorded in `dir`, if any.
pub fn load_identity(dir: &Path) -> Result<Option<Identity>, LogError> {
    let path = dir.join(FILE);
    super::private::read_json(&path)
}

/// Records `identity` in `dir`, atomically (temp file, fsync, rename, fsync of the
/// directory), readable by its owner only.
pub fn store_identity(dir: &Path, identity: &Identity) -> Result<(), LogError> {
    let bytes = serde_json::to_vec_pretty(identity).expect("an identity serializes");
    write_atomically_private(&dir.join(FILE), &bytes)
}

/// Compares the identity recorded in `dir` with `current`: refused when they differ and
/// `adopt` is not given. Reads only.
pub(super) fn check(
    dir: &Path,
    current: &Identity,
    adopt: bool,
    had_log: bool,
) -> Result<IdentityStatus, LogError> {
    let Some(recorded) = load_identity(dir)? else {
        return Ok(if had_log {
            IdentityStatus::Unrecorded
        } else {
            IdentityStatus::New
        });
    };
    let differences = recorded.differences(current);
    if differences.is_empty() {
        Ok(IdentityStatus::Same)
    } else if adopt {
        Ok(IdentityStatus::Adopting(recorded))
    } else {
        Err(LogError::IdentityMismatch {
            dir: dir.to_path_buf(),
            differences: differences.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::events::{AgentIdentity, BackendIdentity};

    fn identity(worker: &str) -> Identity {
        Identity {
            worker_id: worker.into(),
            agent: AgentIdentity::Url("http://127.0.0.1:4096/".into()),
            backend: BackendIdentity::Local,
        }
    }

    #[test]
    fn the_identity_file_is_replaced_atomically_and_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        // A temp file left by a crash, readable by all: it must not pass its mode on.
        let tmp = dir.path().join("IDENTITY.tmp");
        std::fs::write(&tmp, b"junk").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        store_identity(dir.path(), &identity("w1")).unwrap();
        store_identity(dir.path(), &identity("w2")).unwrap();
        let path = dir.path().join("IDENTITY.json");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
        assert_eq!(load_identity(dir.path()).unwrap(), Some(identity("w2")));
    }

    #[test]
    fn another_identity_is_refused_unless_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let check = |id: &Identity, adopt| check(dir.path(), id, adopt, true);
        assert_eq!(
            check(&identity("w1"), false).unwrap(),
            IdentityStatus::Unrecorded
        );
        store_identity(dir.path(), &identity("w1")).unwrap();
        assert_eq!(check(&identity("w1"), false).unwrap(), IdentityStatus::Same);
        let err = check(&identity("w2"), false).unwrap_err();
        assert!(err.is_usage());
        let text = err.to_string();
        assert!(
            text.contains(r#"worker id "w1" is recorded, not "w2""#),
            "{text}"
        );
        assert!(text.contains("--adopt"), "{text}");
        assert_eq!(
            check(&identity("w2"), true).unwrap(),
            IdentityStatus::Adopting(identity("w1"))
        );
    }
}
