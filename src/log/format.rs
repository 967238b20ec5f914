//! `FORMAT.json`: what wrote a data directory, checked before anything else is opened.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::LogError;
use crate::events::EventKind;

const FILE: &str = "FORMAT.json";

/// The layout version of a data directory and the newest version of every event kind written
/// into it. A binary refuses a directory whose layout or any kind's version it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Format {
    /// The layout of the directory (trees, keys, files).
    pub layout: u32,
    /// Event kind name -> newest version written.
    pub kinds: BTreeMap<String, u32>,
}

impl Format {
    /// The layout this binary reads and writes.
    pub const LAYOUT: u32 = 1;

    /// What this binary writes.
    pub fn current() -> Self {
        Format {
            layout: Self::LAYOUT,
            kinds: EventKind::ALL
                .iter()
                .map(|k| (k.name().to_owned(), k.version()))
                .collect(),
        }
    }

    /// Reads the marker of `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, LogError> {
        let path = dir.join(FILE);
        super::private::read_json(&path)
    }

    /// Why this marker is beyond this binary, if it is.
    pub fn newer_than_this_binary(&self) -> Option<String> {
        if self.layout > Self::LAYOUT {
            return Some(format!(
                "layout {} (this binary knows up to {})",
                self.layout,
                Self::LAYOUT
            ));
        }
        self.kinds
            .iter()
            .find_map(|(name, &v)| match EventKind::from_name(name) {
                None => Some(format!(
                    "event kind `{name}` v{v} is unknown to this binary"
                )),
                Some(k) if v > k.version() => Some(format!(
                    "event kind `{name}` v{v} (this binary knows up to v{})",
                    k.version()
                )),
                Some(_) => None,
            })
    }

    /// This marker combined with an older one: the newest of each.
    pub fn merged_with(mut self, other: Option<&Self>) -> Self {
        if let Some(other) = other {
            self.layout = self.layout.max(other.layout);
            for (name, &v) in &other.kinds {
                let e = self.kinds.entry(name.clone()).or_insert(v);
                *e = (*e).max(v);
            }
        }
        self
    }

    /// Writes the marker atomically.
    pub fn store(&self, dir: &Path) -> Result<(), LogError> {
        let bytes = serde_json::to_vec_pretty(self).expect("format serializes");
        write_atomically(&dir.join(FILE), &bytes)
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old file or the new one:
/// write a temporary file beside it, fsync it, rename it over, fsync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    write_replacing(path, bytes, None)
}

/// [`write_atomically`], for a file only its owner may read or write (mode 0600).
pub(crate) fn write_atomically_private(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    write_replacing(path, bytes, Some(0o600))
}

fn write_replacing(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), LogError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let ctx = |what: &str| format!("cannot {what} {}", tmp.display());
    let mut f = super::private::create_new(&tmp).map_err(|e| LogError::io(ctx("create"), e))?;
    if let Some(mode) = mode {
        // On the open file, before the contents: a leftover temp file would keep its mode.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| LogError::io(ctx("restrict"), e))?;
    }
    f.write_all(bytes)
        .map_err(|e| LogError::io(ctx("write"), e))?;
    f.sync_all().map_err(|e| LogError::io(ctx("sync"), e))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| LogError::io(format!("cannot replace {}", path.display()), e))?;
    super::private::sync_dir(dir);
    Ok(())
}
