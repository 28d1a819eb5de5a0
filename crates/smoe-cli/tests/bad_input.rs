//! Damaged checkpoints and malformed requests end with one line on stderr
//! that names the file and the problem, exit status 1, and never a panic.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use serde_json::Value;

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn logits_err(dir: &Path) -> String {
    smoe_err(&["logits", "--model", path_str(dir), "--ids", "1,2,3"])
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error should mention {p:?}: {err}");
    }
}

#[test]
fn missing_directory() {
    let err = logits_err(Path::new("/nonexistent/model"));
    assert_mentions(&err, &["/nonexistent/model", "not a directory"]);
}

/// A description, an edit to config.json, and what the error must say.
type ConfigCase = (&'static str, Box<dyn Fn(&mut Value)>, Vec<&'static str>);

#[test]
fn config_problems_are_named() {
    let cases: Vec<ConfigCase> = vec![
        (
            "missing key",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("hidden_size");
            }),
            vec!["config.json", "missing key \"hidden_size\""],
        ),
        (
            "contradiction",
            Box::new(|v| v["num_local_experts"] = 99.into()),
            vec![
                "config.json",
                "contradictory",
                "num_experts",
                "num_local_experts",
            ],
        ),
        (
            "rope contradiction",
            Box::new(|v| v["rope_parameters"] = serde_json::json!({"rope_theta": 5.0})),
            vec!["config.json", "rope_theta"],
        ),
        (
            "unknown model_type",
            Box::new(|v| v["model_type"] = "llama".into()),
            vec![
                "config.json",
                "unsupported model_type \"llama\"",
                "qwen3_moe",
            ],
        ),
        (
            "wrong type",
            Box::new(|v| v["num_attention_heads"] = "four".into()),
            vec!["config.json", "num_attention_heads"],
        ),
        (
            "bad gqa",
            Box::new(|v| v["num_key_value_heads"] = 3.into()),
            vec!["config.json", "num_key_value_heads"],
        ),
        (
            "shape mismatch",
            Box::new(|v| v["vocab_size"] = 512.into()),
            vec!["model.safetensors", "embed_tokens", "shape"],
        ),
    ];
    for (what, edit, parts) in cases {
        let dir = copy_fixture("qwen3-moe-a");
        edit_json(&dir.path().join("config.json"), edit);
        let err = logits_err(dir.path());
        assert!(!err.is_empty(), "{what}");
        assert_mentions(&err, &parts);
    }
}

#[test]
fn malformed_json_files() {
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ] {
        let dir = copy_fixture("qwen3-moe-b");
        fs::write(dir.path().join(file), "{ not json").unwrap();
        let err = logits_err(dir.path());
        assert_mentions(&err, &[file]);
    }
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("qwen3-moe-a");
    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&logits_err(dir.path()), &["model.safetensors", "truncated"]);

    fs::write(&path, &bytes[..5]).unwrap();
    assert_mentions(&logits_err(dir.path()), &["model.safetensors"]);
}

#[test]
fn shards_that_do_not_match_their_index() {
    let dir = copy_fixture("qwen3-moe-b");
    let index = dir.path().join("model.safetensors.index.json");
    edit_json(&index, |v| {
        let map = v["weight_map"].as_object_mut().unwrap();
        let (name, file) = map
            .iter()
            .next()
            .map(|(k, f)| (k.clone(), f.as_str().unwrap().to_string()))
            .unwrap();
        let other = map
            .values()
            .find(|f| f.as_str() != Some(file.as_str()))
            .unwrap()
            .clone();
        map.insert(name, other);
    });
    assert_mentions(
        &logits_err(dir.path()),
        &["model.safetensors.index.json", "but it is in"],
    );

    let dir = copy_fixture("qwen3-moe-b");
    fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(
        &logits_err(dir.path()),
        &["model-00002-of-00003.safetensors"],
    );

    let dir = copy_fixture("qwen3-moe-b");
    edit_json(&dir.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]["model.extra.weight"] = "model-00001-of-00003.safetensors".into();
    });
    assert_mentions(
        &logits_err(dir.path()),
        &["model.extra.weight", "does not hold it"],
    );
}

#[test]
fn ids_out_of_vocabulary() {
    let model = fixture("qwen3-moe-a");
    let err = smoe_err(&["logits", "--model", path_str(&model), "--ids", "1,99999"]);
    assert_mentions(&err, &["token id 99999", "vocab_size 448"]);
    let err = smoe_err(&[
        "run",
        "--model",
        path_str(&model),
        "--ids",
        "99999",
        "--json",
    ]);
    assert_mentions(&err, &["token id 99999"]);
}

#[test]
fn bad_sampling_options() {
    let model = fixture("qwen3-moe-a");
    let err = smoe_err(&[
        "run",
        "--model",
        path_str(&model),
        "--ids",
        "1",
        "--top-p",
        "0",
    ]);
    assert_mentions(&err, &["top_p"]);
    let err = smoe_err(&[
        "run",
        "--model",
        path_str(&model),
        "--ids",
        "1",
        "--temperature=-1",
    ]);
    assert_mentions(&err, &["temperature"]);
}

#[test]
fn malformed_messages_file() {
    let model = fixture("qwen3-moe-a");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("broken.json", "[{\"role\": \"user\", ", "invalid JSON"),
        ("object.json", "{\"role\": \"user\"}", "messages"),
        ("norole.json", "[{\"content\": \"hi\"}]", "role"),
        ("empty.json", "[]", "messages"),
    ];
    for (file, content, what) in cases {
        let path = dir.path().join(file);
        fs::write(&path, content).unwrap();
        let err = smoe_err(&[
            "template",
            "--model",
            path_str(&model),
            "--messages",
            path_str(&path),
        ]);
        assert_mentions(&err, &[file, what]);
    }
    let err = smoe_err(&[
        "template",
        "--model",
        path_str(&model),
        "--messages",
        "/nonexistent/m.json",
    ]);
    assert_mentions(&err, &["/nonexistent/m.json"]);
}

#[test]
fn chat_prompt_without_template() {
    let dir = copy_fixture("qwen3-moe-a");
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v.as_object_mut().unwrap().remove("chat_template");
    });
    let err = smoe_err(&["run", "--model", path_str(dir.path()), "--prompt", "hi"]);
    assert_mentions(&err, &["no chat template", "--raw"]);
    // Raw text needs no template.
    smoe_ok(&[
        "run",
        "--model",
        path_str(dir.path()),
        "--prompt",
        "hi",
        "--raw",
        "--max-tokens",
        "2",
    ]);
}

/// `--device cuda` where CUDA cannot run (a build without the `cuda`
/// feature, as CI's, or a machine without a driver or GPU) is a one-line
/// error that says which; where it runs, the start-up lines name the GPU.
/// `auto` runs wherever the binary can.
#[test]
fn device_cuda_where_it_cannot_run() {
    let dir = fixture("qwen3-moe-a");
    let args = |device| {
        [
            "logits",
            "--model",
            path_str(&dir),
            "--ids",
            "1,2,3",
            "--device",
            device,
        ]
    };
    let out = smoe(&args("cuda"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.status.success() {
        assert!(stderr.contains("device: cuda:0"), "{stderr}");
    } else {
        let err = smoe_err(&args("cuda"));
        assert!(
            err.contains("built without CUDA") || err.contains("CUDA:"),
            "{err}"
        );
    }
    smoe_ok(&args("auto"));
    let err = String::from_utf8_lossy(&smoe(&args("gpu")).stderr).into_owned();
    assert!(err.contains("expected cpu, cuda, cuda:N or auto"), "{err}");
}

/// The largest numbers the flags take plan and run: the memory plan once
/// overflowed summing activations for a 2^64-1-token prefill chunk (a
/// panic in a debug build), and `smoe plan --parallel` took any count.
#[test]
fn the_largest_sizes_flags_take_plan_and_run() {
    let dir = fixture("qwen3-moe-a");
    let most = u64::MAX.to_string();
    for flags in [
        vec!["--prefill-chunk", most.as_str()],
        vec!["--ctx", most.as_str(), "--prefill-chunk", most.as_str()],
    ] {
        let mut args = vec!["run", "--model", path_str(&dir), "--ids", "1,2,3"];
        args.extend(["--max-tokens", "2"]);
        args.extend(flags);
        smoe_ok(&args);
    }
    let config = dir.join("config.json");
    let out = smoe(&["plan", path_str(&config), "--parallel", "257"]);
    // A usage error: clap's status 2 and message.
    assert_eq!(out.status.code(), Some(2));
    assert_mentions(
        &String::from_utf8_lossy(&out.stderr),
        &["--parallel", "1..=256"],
    );
}
