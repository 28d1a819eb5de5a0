//! `smoe template` prints transformers' render byte for byte (the cases in
//! fixtures/templates/cases.json, made by tools/template_refs.py), prints
//! ids with --ids, and exits 1 with the template's own message when it
//! raises.

mod common;

use std::fs;

use common::*;
use serde_json::Value;

#[test]
fn renders_every_reference_case_byte_for_byte() {
    let dir = fixtures().join("templates");
    let cases: Vec<Value> =
        serde_json::from_str(&fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        // Cases that print today's date are covered by the library test,
        // which substitutes it.
        let special = &case["special_tokens"];
        if case["template_file"] == "llama3.jinja" && case["extra"].get("date_string").is_none() {
            continue;
        }
        let model = scratch.path().join("model");
        fs::create_dir_all(&model).unwrap();
        let mut cfg = serde_json::Map::new();
        for (k, v) in special.as_object().unwrap() {
            cfg.insert(k.clone(), v.clone());
        }
        fs::write(
            model.join("tokenizer_config.json"),
            Value::Object(cfg).to_string(),
        )
        .unwrap();
        let messages = scratch.path().join("messages.json");
        fs::write(&messages, case["messages"].to_string()).unwrap();
        let template = dir.join(case["template_file"].as_str().unwrap());
        let mut args: Vec<String> = [
            "template",
            "--model",
            path_str(&model),
            "--messages",
            path_str(&messages),
            "--chat-template",
            path_str(&template),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(tools) = case.get("tools").filter(|t| !t.is_null()) {
            let path = scratch.path().join("tools.json");
            fs::write(&path, tools.to_string()).unwrap();
            args.extend(["--tools".into(), path_str(&path).into()]);
        }
        if case["add_generation_prompt"] == false {
            args.push("--no-generation-prompt".into());
        }
        for (k, v) in case["extra"].as_object().unwrap() {
            args.extend(["--var".into(), format!("{k}={v}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Some(err) = case.get("error") {
            let line = smoe_err(&args);
            assert!(line.contains(err.as_str().unwrap()), "{name}: {line}");
        } else {
            let out = smoe(&args);
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                case["expected"].as_str().unwrap(),
                "{name}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} cases checked");
}

#[test]
fn ids_of_the_fixture_chat_prompt() {
    let model = fixture("qwen3-moe-a");
    let scratch = tempfile::tempdir().unwrap();
    let messages = scratch.path().join("m.json");
    fs::write(&messages, r#"[{"role":"user","content":"Say hello."}]"#).unwrap();
    let text = smoe_ok(&[
        "template",
        "--model",
        path_str(&model),
        "--messages",
        path_str(&messages),
    ]);
    assert_eq!(
        text,
        "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids: Vec<u32> = serde_json::from_str(&smoe_ok(&[
        "template",
        "--model",
        path_str(&model),
        "--messages",
        path_str(&messages),
        "--ids",
    ]))
    .unwrap();
    // The special tokens are single ids, as transformers encodes them.
    assert_eq!(ids.first(), Some(&401));
    assert_eq!(ids.iter().filter(|&&i| i == 401).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == 402).count(), 1);
    // And `run` feeds exactly these ids for the same prompt.
    let out: Value = serde_json::from_str(&smoe_ok(&[
        "run",
        "--model",
        path_str(&model),
        "--prompt",
        "Say hello.",
        "--max-tokens",
        "1",
        "--json",
    ]))
    .unwrap();
    let prompt_ids: Vec<u32> = serde_json::from_value(out["prompt_ids"].clone()).unwrap();
    assert_eq!(prompt_ids, ids);
}

#[test]
fn raising_template_exits_1_with_its_message() {
    let model = fixture("qwen3-moe-a");
    let scratch = tempfile::tempdir().unwrap();
    let messages = scratch.path().join("m.json");
    fs::write(&messages, r#"[{"role":"user","content":"hi"}]"#).unwrap();
    let tpl = scratch.path().join("t.jinja");
    fs::write(
        &tpl,
        "{{ raise_exception('Only assistants may speak here') }}",
    )
    .unwrap();
    let args = [
        "template",
        "--model",
        path_str(&model),
        "--messages",
        path_str(&messages),
        "--chat-template",
        path_str(&tpl),
    ];
    let err = smoe_err(&args);
    assert!(err.contains("Only assistants may speak here"), "{err}");
    assert!(
        smoe(&args).stdout.is_empty(),
        "nothing on stdout when the template raises"
    );
}

/// Runs `smoe template` on `template` with one user message, with the
/// environment variables given.
fn render_with_env(template: &str, vars: &[(&str, &str)]) -> std::process::Output {
    let model = fixture("qwen3-moe-a");
    let scratch = tempfile::tempdir().unwrap();
    let messages = scratch.path().join("m.json");
    fs::write(&messages, r#"[{"role":"user","content":"hi"}]"#).unwrap();
    let tpl = scratch.path().join("t.jinja");
    fs::write(&tpl, template).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_smoe"))
        .args(["template", "--model", path_str(&model), "--messages"])
        .arg(&messages)
        .arg("--chat-template")
        .arg(&tpl)
        .envs(vars.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn source_date_epoch_pins_strftime_now() {
    let template = "{{ strftime_now('%Y-%m-%d %H:%M %d %b %Y') }}";
    let out = render_with_env(template, &[("SOURCE_DATE_EPOCH", "1721952000")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2024-07-26 00:00 26 Jul 2024"
    );

    let out = render_with_env(template, &[("SOURCE_DATE_EPOCH", "yesterday")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SOURCE_DATE_EPOCH") && err.contains("yesterday"),
        "{err}"
    );
}

#[test]
fn endless_template_fails_naming_the_file_and_the_bound() {
    let out = render_with_env(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("t.jinja") && err.contains("steps"), "{err}");
}
