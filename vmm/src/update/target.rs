//! Which binaries `vm.cpr-exec` may execute. molt usually runs as root and executes the
//! target with its own privileges, so a binary someone else can change is a way in: the
//! target (the named binary, or the running binary's recorded path when it is re-resolved
//! for `{}`) must be owned by root or by molt's own user, not writable by group or others,
//! and every directory above it (on the path as named and as resolved) must not be writable
//! by others unless it has the sticky bit. With `--update-binaries DIR`, the resolved target
//! must also be under DIR.
//!
//! The checks run when the request arrives and the path is executed a moment later; that is
//! safe because the checks themselves establish that only root or molt's user can change
//! what the path names in between.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a target binary is refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The file is writable by group or others.
    #[error("it is writable by group or others (mode {0:04o})")]
    Writable(u32),
    /// Owned by someone else.
    #[error("it is owned by uid {owner}, neither root nor molt's user (uid {ours})")]
    Owner {
        /// The file's owner.
        owner: u32,
        /// molt's effective uid.
        ours: u32,
    },
    /// A directory above it is writable by others and not sticky.
    #[error("directory {0} is writable by others and has no sticky bit")]
    OpenDirectory(PathBuf),
    /// Not under `--update-binaries`.
    #[error("it resolves to {resolved}, which is not under --update-binaries {allowed}")]
    NotAllowed {
        /// The target's canonical path.
        resolved: PathBuf,
        /// The allowed directory.
        allowed: PathBuf,
    },
    /// The path or a directory above it cannot be inspected.
    #[error("cannot inspect {0}")]
    Inspect(PathBuf, #[source] std::io::Error),
}

/// `p` canonical, or as given when it cannot be resolved.
pub fn canonical_or_same(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// `--update-binaries DIR`, resolved once at start (it must be an existing directory).
pub fn allowed_dir(dir: &Path) -> Result<PathBuf, TargetError> {
    let canonical = dir
        .canonicalize()
        .map_err(|e| TargetError::Inspect(dir.to_path_buf(), e))?;
    let meta =
        std::fs::metadata(&canonical).map_err(|e| TargetError::Inspect(canonical.clone(), e))?;
    if !meta.is_dir() {
        let e = std::io::Error::from_raw_os_error(libc::ENOTDIR);
        return Err(TargetError::Inspect(canonical, e));
    }
    Ok(canonical)
}

fn check_dirs(path: &Path) -> Result<(), TargetError> {
    for dir in path.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let meta = std::fs::metadata(dir).map_err(|e| TargetError::Inspect(dir.into(), e))?;
        let mode = meta.mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(TargetError::OpenDirectory(dir.to_path_buf()));
        }
    }
    Ok(())
}

/// Checks that `path` (absolute, an existing executable file) may be executed by an update,
/// under `allowed` (`--update-binaries`, canonical) if set.
pub fn check(path: &Path, allowed: Option<&Path>) -> Result<(), TargetError> {
    let resolved = path
        .canonicalize()
        .map_err(|e| TargetError::Inspect(path.to_path_buf(), e))?;
    if let Some(dir) = allowed {
        if !resolved.starts_with(dir) {
            return Err(TargetError::NotAllowed {
                resolved,
                allowed: dir.to_path_buf(),
            });
        }
    }
    let meta =
        std::fs::metadata(&resolved).map_err(|e| TargetError::Inspect(resolved.clone(), e))?;
    // SAFETY: geteuid() takes no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != ours {
        return Err(TargetError::Owner {
            owner: meta.uid(),
            ours,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(TargetError::Writable(meta.mode() & 0o7777));
    }
    check_dirs(&resolved)?;
    if resolved != path {
        check_dirs(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("molt-target-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn exe(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join("bin");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn each_refusal_says_why() {
        let d = scratch("modes");
        let p = exe(&d, 0o755);
        check(&p, None).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(matches!(check(&p, None), Err(TargetError::Writable(0o775))));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o757)).unwrap();
        assert!(matches!(check(&p, None), Err(TargetError::Writable(_))));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check(&p, None).unwrap_err();
        assert!(
            matches!(&err, TargetError::OpenDirectory(dir) if dir == &d),
            "{err}"
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check(&p, None).unwrap();
        let other = scratch("other");
        let err = check(&p, Some(&other)).unwrap_err();
        assert!(matches!(err, TargetError::NotAllowed { .. }), "{err}");
        check(&p, Some(&d)).unwrap();
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&other);
    }

    #[test]
    fn a_symlink_is_judged_by_its_target_and_its_own_directory() {
        let d = scratch("link-target");
        let p = exe(&d, 0o755);
        let open = scratch("link-open");
        let link = open.join("molt");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        check(&link, Some(&d)).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            check(&link, Some(&d)),
            Err(TargetError::OpenDirectory(_))
        ));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&open);
    }
}
