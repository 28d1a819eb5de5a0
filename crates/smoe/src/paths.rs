//! Where smoe keeps files of its own from one run to the next: the
//! built-in model's vault, the GPU kernels compiled for this machine.

use std::path::PathBuf;

/// `$XDG_CACHE_HOME/smoe`, else `~/.cache/smoe`; `None` with neither. The
/// XDG spec says a relative `XDG_CACHE_HOME` is invalid and must be
/// ignored.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from) {
        if dir.is_absolute() {
            return Some(dir.join("smoe"));
        }
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".cache").join("smoe"))
}
