//! `smoe serve` driven by clients nobody here wrote: the official `openai`
//! and `anthropic` Python packages, and the web page in headless Chromium.
//! `.ci/run` installs them (a venv, playwright-core, Debian's chromium).
//! Where one is missing the test fails under CI=true and otherwise skips,
//! saying so loudly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::{Server, SERVE_MODEL};
use common::*;
use serde_json::{json, Value};

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve")
}

fn run_checked(cmd: &mut Command) -> Value {
    let out = cmd.output().expect("failed to start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

#[test]
fn official_openai_and_anthropic_clients() {
    let Some(python) = tool(
        "SMOE_TEST_PYTHON",
        repo().join("target/ci/venv/bin/python"),
        "a Python with the openai and anthropic packages",
    ) else {
        return;
    };
    let server = Server::start(&["--api-key", "sesame"]);
    let got = run_checked(
        Command::new(python)
            .arg(scripts().join("clients.py"))
            .args([&server.url(), "sesame", SERVE_MODEL]),
    );
    assert_eq!(got["models"], json!([SERVE_MODEL]));
    assert_eq!(got["bad_request"], 400);
    assert_eq!(got["wrong_key"], 401);

    let model = fixture(SERVE_MODEL);
    let run = |args: &[&str]| -> Value {
        let mut all = vec!["run", "--model", path_str(&model), "--json"];
        all.extend(args);
        serde_json::from_str(&smoe_ok(&all)).unwrap()
    };
    let story = run(&["--prompt", "Tell me a story", "--max-tokens", "24"]);
    let story_text = story["text"].as_str().unwrap().trim_start();
    assert_eq!(got["chat"]["content"], story_text);
    let story_sys = run(&[
        "--prompt",
        "Tell me a story",
        "--system",
        "You are terse.",
        "--max-tokens",
        "24",
    ]);
    assert_eq!(
        got["anthropic"]["text"],
        story_sys["text"].as_str().unwrap().trim_start()
    );
    assert_eq!(
        got["anthropic"]["input_tokens"],
        story_sys["prompt_ids"].as_array().unwrap().len()
    );
    let raw = run(&["--prompt", "Once upon a time", "--raw", "--max-tokens", "8"]);
    assert_eq!(got["completion"], raw["text"]);

    // The tool call and its result went through the template: the prompt
    // is exactly what `smoe template` renders for that conversation.
    let dir = tempfile::tempdir().unwrap();
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]);
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]);
    let (m, t) = (dir.path().join("m.json"), dir.path().join("t.json"));
    std::fs::write(&m, messages.to_string()).unwrap();
    std::fs::write(&t, tools.to_string()).unwrap();
    let rendered = smoe_ok(&[
        "template",
        "--model",
        path_str(&model),
        "--messages",
        path_str(&m),
        "--tools",
        path_str(&t),
    ]);
    assert!(rendered.contains("<tool_response>\n18 C and sunny\n</tool_response>"));
    assert!(rendered.contains("{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"));
    let ids: Value = serde_json::from_str(&smoe_ok(&[
        "template",
        "--model",
        path_str(&model),
        "--messages",
        path_str(&m),
        "--tools",
        path_str(&t),
        "--ids",
    ]))
    .unwrap();
    assert_eq!(
        got["tool_round_trip"]["prompt_tokens"],
        ids.as_array().unwrap().len()
    );
}

#[test]
fn web_page_streams_a_reply_in_chromium() {
    let Some(modules) = tool(
        "SMOE_TEST_NODE_MODULES",
        repo().join("target/ci/node/node_modules"),
        "playwright-core (node_modules)",
    ) else {
        return;
    };
    let Some(chromium) = tool("CHROMIUM", PathBuf::from("/usr/bin/chromium"), "chromium") else {
        return;
    };
    // The built-in model, so the page shows a real answer, as a vault with a
    // quarter of its experts cached, so that it has cache and disk counters
    // to show; tokens slow enough that the page is seen mid-reply on any
    // machine.
    const PROMPT: &str = "What is the capital of France?";
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("builtin-vault");
    smoe_ok(&[
        "convert",
        path_str(&builtin_model()),
        "-o",
        path_str(&vault),
        "--experts",
        "q4_0",
        "--quiet",
    ]);
    let server = Server::start_with(&vault, &["--ram-budget", "1MiB", "--token-delay-ms", "60"]);
    let shot = std::env::var_os("SMOE_SCREENSHOT").map_or_else(
        || std::env::temp_dir().join(format!("smoe-serve-{}.png", std::process::id())),
        PathBuf::from,
    );
    let got = run_checked(
        Command::new("node")
            .arg(scripts().join("web_page.cjs"))
            .arg(server.url())
            .arg(&shot)
            .arg(PROMPT)
            .env("NODE_PATH", &modules)
            .env("CHROMIUM", &chromium),
    );
    assert_eq!(got["errors"], json!([]), "{got}");
    assert_eq!(got["done"]["user"], PROMPT);
    // Text showed before the reply was over, and grew after.
    let early = got["early"]["text"].as_str().unwrap();
    let done = got["done"]["text"].as_str().unwrap();
    assert_eq!(got["early"]["meta"], "", "{got}");
    assert!(
        !early.is_empty() && done.starts_with(early) && done.len() > early.len(),
        "{got}"
    );
    let meta = got["done"]["meta"].as_str().unwrap();
    assert!(
        meta.contains("generated") && meta.contains("tok/s"),
        "{got}"
    );
    assert_ne!(got["done"]["toks"], "–", "{got}");
    let hit = got["done"]["hit"].as_str().unwrap();
    assert!(hit.ends_with('%'), "the cache hit rate is not shown: {got}");
    // What the page shows is the reply the model gives.
    let want: Value = serde_json::from_str(&smoe_ok(&[
        "run",
        "--model",
        path_str(&vault),
        "--ram-budget",
        "1MiB",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "48",
        "--json",
    ]))
    .unwrap();
    assert_eq!(done, want["text"].as_str().unwrap().trim_start());
    assert_eq!(done, "The capital of France is Paris.");
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    if std::env::var_os("SMOE_SCREENSHOT").is_none() {
        let _ = std::fs::remove_file(&shot);
    }
}
