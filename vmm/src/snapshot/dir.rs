//! The snapshot directory is replaced atomically: everything is written into a staging
//! directory beside it (`.NAME.snapshot-tmp`), synced, and then renamed into place — with
//! `RENAME_EXCHANGE` when a previous snapshot is there, so the path holds the old snapshot or
//! the new one at every instant, never a torn one. Only files a snapshot holds are ever
//! removed ([`cpr::snapshot::is_snapshot_file`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use super::{SnapshotError, STATE_FILE};

fn bad(path: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::BadPath(path.to_path_buf(), why.into())
}

fn write_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Write { what, path, source }
}

/// Whether `dir` is a snapshot directory (or an empty one) that may be replaced.
fn replaceable(dir: &Path) -> std::io::Result<bool> {
    let mut has_state = false;
    let mut empty = true;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        empty = false;
        if !cpr::snapshot::is_snapshot_file(&name) {
            return Ok(false);
        }
        has_state |= name == STATE_FILE;
    }
    Ok(empty || has_state)
}

/// Checks where a snapshot goes before anything is paused: an absolute path in an existing
/// directory, and nothing there but an earlier snapshot (or an empty directory).
pub fn check_target(path: &Path) -> Result<PathBuf, SnapshotError> {
    if !path.is_absolute() {
        return Err(bad(path, "not an absolute path"));
    }
    let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else {
        return Err(bad(path, "has no parent directory"));
    };
    if !parent.is_dir() {
        return Err(bad(path, "its parent directory does not exist"));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(path, format!("cannot inspect it: {e}"))),
        Ok(m) if !m.is_dir() => return Err(bad(path, "exists and is not a directory")),
        Ok(_) => match replaceable(path) {
            Ok(true) => {}
            Ok(false) => {
                return Err(bad(
                    path,
                    "is a directory holding something else than a molt snapshot; refusing to \
                     replace it",
                ))
            }
            Err(e) => return Err(bad(path, format!("cannot read it: {e}"))),
        },
    }
    Ok(path.to_path_buf())
}

/// Removes a snapshot directory: its snapshot files, then the directory (which fails if
/// anything else is in it).
pub fn remove_snapshot_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if cpr::snapshot::is_snapshot_file(&entry.file_name().to_string_lossy()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Syncs a directory's entries.
fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err("syncing directory", dir))
}

/// The staging directory of a snapshot being written; removed unless committed.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates the staging directory beside `target` (checked by [`check_target`]), removing
    /// one a crashed writer left.
    pub fn create(target: &Path) -> Result<Self, SnapshotError> {
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(bad(target, "has no parent directory"));
        };
        let tmp = parent.join(format!(".{}.snapshot-tmp", name.to_string_lossy()));
        if tmp.exists() {
            log::info!("removing {} left by an interrupted snapshot", tmp.display());
            remove_snapshot_dir(&tmp).map_err(write_err("removing stale directory", &tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(write_err("creating directory", &tmp))?;
        Ok(Self {
            target: target.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// Where the files go meanwhile.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs the staging directory and renames it into place; the previous snapshot there, if
    /// any, is removed afterwards.
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        sync_dir(&self.tmp)?;
        let replacing = self.target.exists();
        let flags = if replacing {
            RenameFlags::RENAME_EXCHANGE
        } else {
            RenameFlags::RENAME_NOREPLACE
        };
        renameat2(AT_FDCWD, &self.tmp, AT_FDCWD, &self.target, flags).map_err(|e| {
            SnapshotError::Write {
                what: "renaming into place",
                path: self.target.clone(),
                source: e.into(),
            }
        })?;
        self.committed = true;
        if let Some(parent) = self.target.parent() {
            sync_dir(parent)?;
        }
        if replacing {
            // The previous snapshot now sits at the staging path.
            if let Err(e) = remove_snapshot_dir(&self.tmp) {
                log::warn!(
                    "cannot remove the previous snapshot {}: {e}",
                    self.tmp.display()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = remove_snapshot_dir(&self.tmp) {
                log::warn!("cannot remove {}: {e}", self.tmp.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("molt-snapdir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_snapshot_replaces_the_previous_one_and_nothing_else() {
        let root = scratch("replace");
        let target = root.join("snap");
        for round in 0..2u8 {
            check_target(&target).unwrap();
            let s = Staging::create(&target).unwrap();
            std::fs::write(s.path().join(STATE_FILE), [round]).unwrap();
            s.commit().unwrap();
            assert_eq!(std::fs::read(target.join(STATE_FILE)).unwrap(), [round]);
        }
        // An abandoned staging directory leaves the snapshot alone and is cleaned up.
        let s = Staging::create(&target).unwrap();
        std::fs::write(s.path().join("ram0.mem"), b"torn").unwrap();
        drop(s);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
        assert_eq!(std::fs::read(target.join(STATE_FILE)).unwrap(), [1]);
        // Refused: relative, a file, a directory of something else.
        assert!(check_target(Path::new("rel/snap")).is_err());
        std::fs::write(root.join("file"), b"x").unwrap();
        assert!(check_target(&root.join("file")).is_err());
        std::fs::create_dir(root.join("other")).unwrap();
        std::fs::write(root.join("other/notes.txt"), b"x").unwrap();
        assert!(check_target(&root.join("other")).is_err());
        assert!(check_target(&root.join("missing/snap")).is_err());
        std::fs::remove_dir_all(root).unwrap();
    }
}
