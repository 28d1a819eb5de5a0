//! Helpers shared by the CLI integration tests: run the real binary, find
//! the committed fixtures, and make scratch copies to damage.

#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn smoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smoe"))
        .args(args)
        .output()
        .expect("failed to start smoe")
}

/// Runs smoe expecting success; returns stdout.
pub fn smoe_ok(args: &[&str]) -> String {
    let out = smoe(args);
    assert!(
        out.status.success(),
        "smoe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs smoe expecting a clean failure: exit status 1, no panic, and one
/// line on stderr. Returns that line.
pub fn smoe_err(args: &[&str]) -> String {
    let out = smoe(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "smoe {args:?} should fail with 1; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "smoe {args:?} panicked: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "expected a one-line error, got: {stderr}"
    );
    stderr.trim_end().to_string()
}

pub fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids_arg(v: &Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A scratch copy of a fixture directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
