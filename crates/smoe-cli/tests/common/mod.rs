//! Helpers shared by the CLI integration tests: run the real binary, find
//! the committed fixtures, and make scratch copies to damage.

#![allow(dead_code)]

pub mod server;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// Every committed model fixture (tools/make_fixtures.py): each family's
/// tiny random checkpoint with transformers' outputs on it.
pub const MODELS: &[&str] = &[
    "qwen3-moe-a",
    "qwen3-moe-b",
    "mixtral",
    "qwen2-moe",
    "olmoe",
    "deepseek-v2-lite",
    "deepseek-v2",
    "deepseek-v3",
];

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The built-in model's checkpoint (models/builtin): trained, so its
/// replies are text, unlike the random fixtures'.
pub fn builtin_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/builtin")
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

/// Runs `cmd` with `input` on its stdin, expecting success.
pub fn run_piped(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The token ids `smoe template` renders `messages` to, with the
/// generation prompt.
pub fn template_ids(model: &Path, messages: &[Value]) -> Vec<u32> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.json");
    std::fs::write(&file, Value::from(messages.to_vec()).to_string()).unwrap();
    let out = smoe_ok(&[
        "template",
        "--model",
        path_str(model),
        "--messages",
        path_str(&file),
        "--ids",
    ]);
    serde_json::from_str(out.trim()).unwrap()
}

/// An external tool from `.ci/run`'s installs: the environment variable
/// `var`, else where `.ci/run` puts it. None (after a loud message) when
/// it is missing outside CI; a failure when CI=true.
pub fn tool(var: &str, default: PathBuf, what: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var).map_or(default, PathBuf::from);
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "{what} not found at {} (set {var}, or run .ci/run to install it)",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("\n!!! SKIPPED: {msg}\n");
    None
}
