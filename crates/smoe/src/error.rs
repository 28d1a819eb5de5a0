//! One error type for the library. Every variant that comes from a file names
//! that file, so the binary can print a single line that tells the user what
//! to fix without a backtrace.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS refused to open, read or map a file.
    // The I/O error is part of the message and deliberately not its
    // `source`: printed as a chain it said "(os error 2)" twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A file was read but its content is wrong: bad JSON, missing or
    /// contradictory keys, truncated tensor data, wrong shapes.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A chat template failed to compile or raised while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// A request that cannot be served as asked: ids outside the vocabulary,
    /// a prompt longer than the context, contradictory options.
    #[error("{0}")]
    Invalid(String),
    /// A compute device is missing or failed: no driver or GPU, a kernel
    /// that did not compile or launch.
    #[error("{0}")]
    Device(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err: source,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Reads a whole small file (configs, JSON) with an error that names it.
pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Reads and parses a JSON file, naming the file and the position on failure.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}
