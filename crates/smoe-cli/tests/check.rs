//! `smoe check`: clean on every fixture, and each problem it exists to
//! catch is named, with the start-up check of `run` printing the same.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::*;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::Value;

fn check(model: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["check", "--model", path_str(model)];
    args.extend_from_slice(extra);
    smoe(&args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Passes: exit 0, nothing but warnings, and "ok" last.
fn assert_passes(out: &Output) -> String {
    let text = stdout(out);
    assert!(
        out.status.success(),
        "check failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().last(), Some("ok"), "{text}");
    assert!(!text.contains("error:"), "{text}");
    text
}

/// Fails: exit 1, one summary line on stderr; returns the findings.
fn assert_fails(out: &Output) -> String {
    let text = stdout(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}{stderr}");
    assert!(stderr.contains("problem(s) found"), "{stderr}");
    assert!(!text.lines().any(|l| l == "ok"), "{text}");
    text
}

#[test]
fn every_fixture_passes_without_findings() {
    // Each family's fixture names the tokenizer class its real checkpoints
    // ship (Llama for Mixtral and DeepSeek, GPT-NeoX for OLMoE): no
    // family warning may fire.
    for &name in MODELS {
        let text = assert_passes(&check(&fixture(name), &[]));
        assert_eq!(text, "ok\n", "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, experts) in [
        ("qwen3-moe-a", "q8_0"),
        ("qwen3-moe-b", "bf16"),
        ("deepseek-v3", "q8_0"),
    ] {
        let vault = dir.path().join(name);
        smoe_ok(&[
            "convert",
            path_str(&fixture(name)),
            "-o",
            path_str(&vault),
            "--experts",
            experts,
            "--quiet",
        ]);
        let text = assert_passes(&check(&vault, &[]));
        // The only finding a vault may have depends on the disk under it.
        for line in text.lines().filter(|l| *l != "ok") {
            assert!(line.contains("direct I/O"), "{name}: {text}");
        }
    }
}

/// A copy of qwen3-moe-a whose template writes two tokens the weights
/// never trained: their embedding rows are zero.
fn zeroed_rows_fixture(tokens: [(&str, usize); 2]) -> tempfile::TempDir {
    let dir = copy_fixture("qwen3-moe-a");
    let template = format!(
        "{{% for m in messages %}}<|im_start|>{{{{ m.role }}}}\n{{{{ m.content }}}}<|im_end|>\n{{% endfor %}}\
         {{% if add_generation_prompt %}}<|im_start|>assistant\n{}{}{{% endif %}}",
        tokens[0].0, tokens[1].0
    );
    fs::write(dir.path().join("chat_template.jinja"), template).unwrap();

    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, TensorView)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == "model.embed_tokens.weight" {
            let row = data.len() / view.shape()[0];
            for (_, id) in tokens {
                data[id * row..(id + 1) * row].fill(0);
            }
        }
        tensors.push((name, data, view));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, data, view)| {
            (
                name.clone(),
                TensorView::new(view.dtype(), view.shape().to_vec(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    dir
}

#[test]
fn untrained_tokens_in_the_template_are_named() {
    let tokens = [("<|box_start|>", 405), ("<|fim_pad|>", 419)];
    let dir = zeroed_rows_fixture(tokens);
    // A vault reads the table from its backbone file rather than the
    // checkpoint's mapping: both must find the rows.
    let vault = dir.path().join("vault");
    smoe_ok(&[
        "convert",
        path_str(dir.path()),
        "-o",
        path_str(&vault),
        "--experts",
        "bf16",
        "--quiet",
    ]);
    for model in [dir.path(), vault.as_path()] {
        let text = assert_fails(&check(model, &[]));
        for (token, id) in tokens {
            assert!(
                text.lines().any(|l| l.starts_with("error: ")
                    && l.contains(&format!("\"{token}\" (id {id})"))
                    && l.contains("untrained embedding")),
                "{token} not named: {text}"
            );
        }
        let others = text.lines().filter(|l| !l.contains("direct I/O"));
        assert_eq!(others.count(), 2, "only those two: {text}");
    }

    // run and chat print the same at start-up and go on; --no-check is quiet.
    let stderr = run_stderr(dir.path(), false);
    for (token, _) in tokens {
        assert!(
            stderr.contains("warning: ") && stderr.contains(token),
            "{stderr}"
        );
    }
    let stderr = run_stderr(dir.path(), true);
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// stderr of a short `smoe run`, which must succeed.
fn run_stderr(model: &Path, no_check: bool) -> String {
    let mut args = vec!["run", "--model", path_str(model), "--prompt", "hi"];
    args.extend(["--max-tokens", "1"]);
    if no_check {
        args.push("--no-check");
    }
    let out = smoe(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// A copy of qwen3-moe-a with one JSON file edited.
fn edited(file: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = copy_fixture("qwen3-moe-a");
    edit_json(&dir.path().join(file), edit);
    dir
}

/// A file, an edit to it, and what `check` must say about the result.
type Case = (&'static str, fn(&mut Value), &'static str);

#[test]
fn tokenizer_config_and_weights_disagreeing_are_errors() {
    let cases: [Case; 4] = [
        (
            "config.json",
            |v| v["vocab_size"] = 420.into(),
            "vocab_size 420 is smaller than the tokenizer's 426 ids",
        ),
        (
            "tokenizer_config.json",
            |v| {
                v.as_object_mut().unwrap().remove("chat_template");
            },
            "no chat template",
        ),
        (
            "tokenizer_config.json",
            |v| v["eos_token"] = "<|end|>".into(),
            "eos_token \"<|end|>\" is not in the tokenizer's vocabulary",
        ),
        (
            "generation_config.json",
            |v| v["eos_token_id"] = serde_json::json!([402, 440]),
            "eos id 440 is not a token of tokenizer.json",
        ),
    ];
    for (file, edit, says) in cases {
        let dir = edited(file, edit);
        let text = assert_fails(&check(dir.path(), &[]));
        assert!(
            text.lines()
                .any(|l| l.starts_with("error: ") && l.contains(says)),
            "{file}: {text}"
        );
    }
}

#[test]
fn suspicious_pairings_are_warnings() {
    // A Llama tokenizer beside a Qwen config.
    let dir = edited("tokenizer_config.json", |v| {
        v["tokenizer_class"] = "LlamaTokenizerFast".into()
    });
    let text = assert_passes(&check(dir.path(), &[]));
    assert!(
        text.contains("warning: ")
            && text.contains("tokenizer_class LlamaTokenizerFast is a llama tokenizer")
            && text.contains("qwen3_moe"),
        "{text}"
    );
    // run prints it at start-up; --no-check does not.
    let err = run_stderr(dir.path(), false);
    assert!(
        err.contains("warning: ") && err.contains("LlamaTokenizerFast"),
        "{err}"
    );
    assert!(!run_stderr(dir.path(), true).contains("warning"));

    // And the other way round: Qwen's tokenizer beside a Mixtral config.
    let dir = copy_fixture("mixtral");
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v["tokenizer_class"] = "Qwen2Tokenizer".into()
    });
    let text = assert_passes(&check(dir.path(), &[]));
    assert!(
        text.contains("tokenizer_class Qwen2Tokenizer is a qwen tokenizer")
            && text.contains("model_type mixtral"),
        "{text}"
    );

    // Stop ids the template never writes: none that ends a turn, and an
    // ordinary text token ("{", id 90; the sample has no braces).
    let dir = edited("generation_config.json", |v| {
        v["eos_token_id"] = serde_json::json!([400, 90])
    });
    let text = assert_passes(&check(dir.path(), &[]));
    assert!(
        text.contains(
            "ends turns with none of the eos ids (\"<|endoftext|>\" (id 400), \"{\" (id 90))"
        ),
        "{text}"
    );
    assert!(
        text.contains("eos id \"{\" (id 90) is ordinary text"),
        "{text}"
    );

    // A reasoning template on a vocabulary without <think>.
    let dir = copy_fixture("qwen3-moe-a");
    let drop_think = |v: &mut Value| {
        v["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| !t["content"].as_str().unwrap().contains("think>"))
    };
    edit_json(&dir.path().join("tokenizer.json"), drop_think);
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        let decoder = v["added_tokens_decoder"].as_object_mut().unwrap();
        decoder.retain(|_, t| !t["content"].as_str().unwrap().contains("think>"));
    });
    let text = assert_passes(&check(dir.path(), &[]));
    assert!(
        text.contains("writes <think> blocks, but the vocabulary has no <think> token"),
        "{text}"
    );
}

#[test]
fn a_checkpoint_past_the_budget_is_sent_to_convert() {
    let model = fixture("qwen3-moe-a");
    let text = assert_fails(&check(&model, &["--ram-budget", "1KiB"]));
    assert!(
        text.contains("smoe convert") && text.contains("qwen3-moe-a-vault"),
        "{text}"
    );
    let args = [
        "run",
        "--model",
        path_str(&model),
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
        "--ram-budget",
        "1KiB",
    ];
    let err = smoe_err(&args);
    assert!(
        err.contains("smoe convert") && err.contains("--no-check"),
        "{err}"
    );
    smoe_ok(&[&args[..], &["--no-check"]].concat());
}
