//! The built-in model, used the way the README's quick start uses it: no
//! `--model`, converted into a fresh cache directory (XDG_CACHE_HOME points
//! into a temporary directory, never at the user's cache).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn smoe_in(cache: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_smoe"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .expect("failed to start smoe");
    assert!(
        out.status.success(),
        "smoe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_json(cache: &Path, prompt: &str) -> Value {
    run_json_with(cache, prompt, &[])
}

fn run_json_with(cache: &Path, prompt: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "run",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "64",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = smoe_in(cache, &args);
    serde_json::from_slice(&out.stdout).expect("run --json prints one JSON object")
}

#[test]
fn say_hello_converts_once_and_stops_on_im_end() {
    let cache = tempfile::tempdir().unwrap();
    let out = smoe_in(
        cache.path(),
        &["run", "--prompt", "Say hello.", "--temperature", "0"],
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "Hello, world!\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stop: eos"), "{stderr}");
    assert!(stderr.contains("first use, converting"), "{stderr}");
    let vault = cache.path().join("smoe");
    assert!(
        stderr.contains(&format!("built-in model: {}", vault.display())),
        "says where the vault is: {stderr}"
    );

    // The second run streams from the vault the first one left.
    let json = run_json(cache.path(), "Say hello.");
    assert_eq!(json["text"], "Hello, world!");
    assert_eq!(json["stop_reason"], "eos");
    let im_end = json["tokens"].as_array().unwrap().last().unwrap().clone();
    let tok: Value = serde_json::from_str(
        &std::fs::read_to_string(common::builtin_model().join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let id = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["content"] == "<|im_end|>")
        .unwrap()["id"]
        .clone();
    assert_eq!(im_end, id, "the reply ends on <|im_end|>");
}

/// A first use that died half way leaves a partial source and a partial
/// vault behind; the next run converts again and answers.
#[test]
fn an_interrupted_first_use_converts_again() {
    let cache = tempfile::tempdir().unwrap();
    smoe_in(cache.path(), &["check"]);
    let root = cache.path().join("smoe");
    let dir = std::fs::read_dir(&root)
        .unwrap()
        .next()
        .expect("a built-in model directory")
        .unwrap()
        .path();
    std::fs::remove_dir_all(dir.join("vault")).unwrap();
    for partial in ["source.partial", "vault.partial"] {
        std::fs::create_dir_all(dir.join(partial)).unwrap();
    }
    std::fs::write(dir.join("source.partial/config.json"), "{\"trunc").unwrap();
    std::fs::write(dir.join("vault.partial/journal.json"), "{\"trunc").unwrap();
    std::fs::write(dir.join("vault.partial/experts.bin"), [0u8; 100]).unwrap();

    let out = smoe_in(
        cache.path(),
        &["run", "--prompt", "Say hello.", "--temperature", "0"],
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "Hello, world!\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("first use, converting"));
    assert!(!dir.join("vault.partial").exists() && !dir.join("source").exists());
}

#[test]
fn streams_under_a_quarter_of_its_experts() {
    let cache = tempfile::tempdir().unwrap();
    let json = run_json(cache.path(), "What is the capital of France?");
    assert_eq!(json["text"], "The capital of France is Paris.");
    let stats = &json["stats"];
    let plan = &stats["plan"];
    let (cache_bytes, expert_bytes) = (
        plan["cache_bytes"].as_u64().unwrap(),
        plan["expert_bytes"].as_u64().unwrap(),
    );
    assert!(cache_bytes > 0 && 4 * cache_bytes <= expert_bytes, "{plan}");
    assert!(stats["hits"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["misses"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["bytes_read"].as_u64().unwrap() > 0, "{stats}");
}

/// Streaming changes where the experts come from, never what they
/// compute: a quarter budget, with and without read-ahead, writes the
/// tokens the whole model in the cache writes, on text with real routing.
#[test]
fn any_budget_gives_the_same_replies() {
    let cache = tempfile::tempdir().unwrap();
    let prompts = [
        "Say hello.",
        "What is 47 + 38?",
        "Spell the word garden.",
        "Who are you?",
    ];
    for prompt in prompts {
        let whole = run_json_with(cache.path(), prompt, &["--ram-budget", "64MiB"]);
        let plan = &whole["stats"]["plan"];
        assert!(
            plan["cache_bytes"].as_u64() >= plan["expert_bytes"].as_u64(),
            "{plan}"
        );
        for extra in [&[][..], &["--prefetch", "on"][..]] {
            let streamed = run_json_with(cache.path(), prompt, extra);
            assert_eq!(streamed["tokens"], whole["tokens"], "{prompt:?} {extra:?}");
        }
    }
}

/// The held-out set: prompts the training corpus never contained
/// (reworded questions, new arithmetic pairs), answered at temperature 0.
#[test]
fn held_out_evaluation_scores_at_least_80_percent() {
    let cache = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::builtin_model().join("eval.json")).unwrap();
    let items: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(items.len() >= 40, "{} prompts", items.len());
    let mut misses = Vec::new();
    for item in &items {
        let prompt = item["prompt"].as_str().unwrap();
        let expected = item["expected"].as_str().unwrap();
        let json = run_json(cache.path(), prompt);
        let got = json["text"].as_str().unwrap();
        if got.trim() != expected || json["stop_reason"] != "eos" {
            misses.push(format!("{prompt:?}: got {got:?}, want {expected:?}"));
        }
    }
    let correct = items.len() - misses.len();
    eprintln!("held-out evaluation: {correct}/{}", items.len());
    for m in &misses {
        eprintln!("  miss: {m}");
    }
    assert!(
        5 * correct >= 4 * items.len(),
        "{correct}/{} correct:\n{}",
        items.len(),
        misses.join("\n")
    );
}

#[test]
fn check_passes_on_the_builtin_model() {
    let cache = tempfile::tempdir().unwrap();
    let out = smoe_in(cache.path(), &["check"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().last(), Some("ok"), "{stdout}");
    assert!(
        !stdout.contains("warning") && !stdout.contains("error"),
        "{stdout}"
    );
    // The checkpoint in the repository passes as well as its vault.
    let out = smoe_in(
        cache.path(),
        &[
            "check",
            "--model",
            common::path_str(&common::builtin_model()),
        ],
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().lines().last(),
        Some("ok")
    );
}

#[test]
fn chat_answers_with_the_builtin_model() {
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = common::run_piped(
        Command::new(env!("CARGO_BIN_EXE_smoe"))
            .args(["chat", "--temperature", "0"])
            .env("XDG_CACHE_HOME", cache.path())
            .env("XDG_STATE_HOME", state.path()),
        "Say hello.\nWhat is 12 + 30?\n",
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("Hello, world!"), "{stdout}");
    assert!(stdout.contains("12 + 30 = 42."), "{stdout}");
}
