//! placeholder
use std::path::{Path, PathBuf};
/// `p` canonical, or as given when it cannot be resolved.
pub fn canonical_or_same(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}
