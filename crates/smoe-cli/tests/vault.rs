//! Vaults: conversion, streaming equivalence under any budget, honest
//! counters, crash-safe conversion, and damaged vaults.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use serde_json::Value;

/// A vault with `experts` and a bf16 backbone, so that a bf16 vault is the
/// checkpoint bit for bit.
fn convert(src: &Path, dst: &Path, experts: &str) {
    smoe_ok(&[
        "convert",
        path_str(src),
        "-o",
        path_str(dst),
        "--experts",
        experts,
        "--backbone",
        "bf16",
        "--quiet",
    ]);
}

fn logits_all(model: &Path, ids: &str, budget: &str) -> String {
    smoe_ok(&[
        "logits",
        "--model",
        path_str(model),
        "--ids",
        ids,
        "--all",
        "--ram-budget",
        budget,
    ])
}

fn run_json(model: &Path, ids: &str, budget: &str, n: usize) -> Value {
    let out = smoe_ok(&[
        "run",
        "--model",
        path_str(model),
        "--ids",
        ids,
        "--max-tokens",
        &n.to_string(),
        "--json",
        "--ram-budget",
        budget,
    ]);
    serde_json::from_str(out.trim()).unwrap()
}

fn manifest(vault: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(vault.join("manifest.json")).unwrap()).unwrap()
}

/// Bytes of one expert record, and the number of records.
fn record_len(vault: &Path) -> (u64, u64) {
    let m = manifest(vault);
    let layers = m["experts"].as_array().unwrap();
    let len = layers[0]["record_len"].as_u64().unwrap();
    let n: u64 = layers
        .iter()
        .map(|l| l["offsets"].as_array().unwrap().len() as u64)
        .sum();
    (len, n)
}

#[test]
fn bf16_vault_matches_the_checkpoint_bit_for_bit() {
    for &name in MODELS {
        let dir = tempfile::tempdir().unwrap();
        let vault = dir.path().join("v");
        convert(&fixture(name), &vault, "bf16");
        let r = reference(name);
        let ids = ids_arg(&r["prompt_ids"]);
        let direct = smoe_ok(&[
            "logits",
            "--model",
            path_str(&fixture(name)),
            "--ids",
            &ids,
            "--all",
        ]);
        let (len, n) = record_len(&vault);
        for budget in [len * 3, len * n] {
            assert_eq!(
                logits_all(&vault, &ids, &budget.to_string()),
                direct,
                "{name}: budget {budget}"
            );
        }
        let greedy = run_json(&vault, &ids, "auto", 32);
        assert_eq!(
            greedy["tokens"], r["greedy_ids"],
            "{name}: greedy from the vault"
        );
    }
}

/// Top-k and the number of sparse layers, from a vault's config and
/// manifest.
fn routing_shape(vault: &Path) -> (u64, u64) {
    let m = manifest(vault);
    let top_k = m["config"]["num_experts_per_tok"].as_u64().unwrap();
    (top_k, m["experts"].as_array().unwrap().len() as u64)
}

#[test]
fn streaming_is_identical_under_every_budget() {
    // Every family, quantized: streaming must not change a single bit of
    // what the same vault computes with every expert cached.
    let cases = MODELS
        .iter()
        .map(|&m| (m, if m == "qwen3-moe-a" { "q4_k" } else { "q8_0" }));
    for (name, experts) in cases {
        let dir = tempfile::tempdir().unwrap();
        let vault = dir.path().join("v");
        convert(&fixture(name), &vault, experts);
        let r = reference(name);
        let ids = ids_arg(&r["prompt_ids"]);
        let (len, n) = record_len(&vault);
        let (top_k, sparse_layers) = routing_shape(&vault);
        // One layer's top-k, a middle budget, everything.
        let budgets = [len * top_k, (len * n / 2).max(len * top_k), len * n];
        let resident = logits_all(&vault, &ids, &budgets[2].to_string());
        let resident_run = run_json(&vault, &ids, &budgets[2].to_string(), 24);
        for b in budgets {
            assert_eq!(
                logits_all(&vault, &ids, &b.to_string()),
                resident,
                "{name}: logits at budget {b}"
            );
            let got = run_json(&vault, &ids, &b.to_string(), 24);
            assert_eq!(
                got["tokens"], resident_run["tokens"],
                "{name}: tokens at budget {b}"
            );
            let st = &got["stats"];
            let (hits, misses) = (st["hits"].as_u64().unwrap(), st["misses"].as_u64().unwrap());
            assert!(
                misses > 0,
                "{name}, budget {b}: the first use of an expert is always a miss"
            );
            assert_eq!(
                st["demand_bytes"].as_u64().unwrap(),
                misses * len,
                "{name}, budget {b}: bytes read on demand"
            );
            if b == len * top_k {
                assert!(
                    misses > hits,
                    "{name}, budget {b}: a one-layer cache should mostly miss ({hits} hits, {misses} misses)"
                );
            }
            if b == len * n {
                assert!(
                    misses <= n,
                    "{name}: everything fits: each expert is read at most once"
                );
            }
        }
        // Every decode step asks each sparse layer for top-k experts.
        let st = &resident_run["stats"];
        let decode = resident_run["tokens"].as_array().unwrap().len() as u64 - 1;
        assert!(
            st["hits"].as_u64().unwrap() + st["misses"].as_u64().unwrap()
                >= decode * sparse_layers * top_k,
            "{name}: expert requests"
        );
    }
}

#[test]
fn layers_past_num_hidden_layers_stay_behind() {
    // DeepSeek-V3 checkpoints carry a multi-token-prediction layer after
    // the last one inference runs; a copy of the fixture gets one.
    let src = copy_fixture("deepseek-v3");
    let path = src.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let extra: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .filter_map(|(name, view)| {
            let rest = name.strip_prefix("model.layers.2.")?;
            Some((format!("model.layers.3.{rest}"), view.clone()))
        })
        .collect();
    assert!(extra.iter().any(|(n, _)| n.contains(".mlp.experts.")));
    tensors.extend(extra);
    safetensors::serialize_to_file(tensors, None, &path).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("v");
    convert(src.path(), &vault, "bf16");
    let m = manifest(&vault);
    let names: Vec<&String> = m["backbone"].as_object().unwrap().keys().collect();
    assert!(
        !names.iter().any(|n| n.starts_with("model.layers.3.")),
        "{names:?}"
    );
    assert!(m["experts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["layer"].as_u64().unwrap() < 3));
    let ids = ids_arg(&reference("deepseek-v3")["prompt_ids"]);
    let want = smoe_ok(&[
        "logits",
        "--model",
        path_str(&fixture("deepseek-v3")),
        "--ids",
        &ids,
        "--all",
    ]);
    assert_eq!(logits_all(&vault, &ids, "auto"), want);
}

#[test]
fn too_small_a_budget_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("v");
    convert(&fixture("qwen3-moe-a"), &vault, "q8_0");
    let (len, _) = record_len(&vault);
    let err = smoe_err(&[
        "logits",
        "--model",
        path_str(&vault),
        "--ids",
        "1",
        "--ram-budget",
        &len.to_string(),
    ]);
    assert!(err.contains("--ram-budget"), "{err}");
}

#[test]
fn interrupted_conversion_resumes_and_matches() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("v");
    let src = fixture("qwen3-moe-a");
    let args = [
        "convert",
        path_str(&src),
        "-o",
        path_str(&vault),
        "--experts",
        "q8_0",
        "--quiet",
    ];
    let mut crash = args.to_vec();
    crash.extend(["--stop-after-layers", "1"]);
    let err = smoe_err(&crash);
    assert!(err.contains("stopped after 1"), "{err}");
    assert!(!vault.exists(), "no vault until the conversion completes");
    let partial = dir.path().join("v.partial");
    assert!(partial.exists());
    // A half-vault does not load.
    smoe_err(&["logits", "--model", path_str(&partial), "--ids", "1"]);

    smoe_ok(&args);
    assert!(!partial.exists());
    let resumed = manifest(&vault);
    let fresh = dir.path().join("fresh");
    smoe_ok(&[
        "convert",
        path_str(&src),
        "-o",
        path_str(&fresh),
        "--experts",
        "q8_0",
        "--quiet",
    ]);
    let fresh = manifest(&fresh);
    assert_eq!(
        resumed["experts"], fresh["experts"],
        "resumed expert records equal a straight conversion"
    );
    assert_eq!(resumed["backbone"], fresh["backbone"]);
    smoe_ok(&["verify", path_str(&vault)]);
}

#[test]
fn lossy_types_need_a_flag_and_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let convert_err = |experts: &str| {
        smoe_err(&[
            "convert",
            path_str(&fixture("qwen3-moe-a")),
            "-o",
            path_str(&dir.path().join("v")),
            "--experts",
            experts,
            "--quiet",
        ])
    };
    let err = convert_err("q2_k");
    assert!(
        err.contains("--allow-lossy") && err.contains("4-bit"),
        "{err}"
    );
    let err = convert_err("q9");
    assert!(err.contains("unknown type"), "{err}");
    let m = dir.path().join("q");
    convert(&fixture("qwen3-moe-a"), &m, "q8_0");
    let q = manifest(&m)["quant_error"].clone();
    let e = q["experts.gate_proj"].as_f64().unwrap();
    assert!(e > 0.0 && e < 0.02, "q8_0 relative RMS error {e}");
}

#[test]
fn damaged_vaults_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    convert(&fixture("qwen3-moe-a"), &good, "q8_0");
    let copy = |name: &str| {
        let d = dir.path().join(name);
        fs::create_dir(&d).unwrap();
        for e in fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let m = manifest(&good);
    let layer0 = &m["experts"][0];
    let (rec_off, rec_len) = (
        layer0["offsets"][5].as_u64().unwrap(),
        layer0["record_len"].as_u64().unwrap(),
    );

    // Truncated experts file.
    let v = copy("trunc");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(v.join("experts.bin"))
        .unwrap();
    f.set_len(rec_off + rec_len / 2).unwrap();
    let err = smoe_err(&["logits", "--model", path_str(&v), "--ids", "1"]);
    assert!(
        err.contains("experts.bin") && err.contains("truncated"),
        "{err}"
    );

    // One flipped byte in layer 0 expert 5: verify names it; reads with
    // verification on refuse it.
    let v = copy("flip");
    let mut bytes = fs::read(v.join("experts.bin")).unwrap();
    bytes[(rec_off + 7) as usize] ^= 0x40;
    fs::write(v.join("experts.bin"), &bytes).unwrap();
    let out = smoe(&["verify", path_str(&v)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("layer 0 expert 5"), "{text}");
    let all: Vec<String> = (0..448).map(|i| i.to_string()).collect();
    let ids = all[..64].join(",");
    let err = smoe_err(&[
        "logits",
        "--model",
        path_str(&v),
        "--ids",
        &ids,
        "--verify-experts",
        "--ram-budget",
        "100MiB",
    ]);
    assert!(
        err.contains("layer 0 expert 5") && err.contains("checksum"),
        "{err}"
    );

    // A manifest from the future.
    let v = copy("newer");
    let mut mf = manifest(&v);
    mf["version"] = 99.into();
    fs::write(v.join("manifest.json"), mf.to_string()).unwrap();
    let err = smoe_err(&["logits", "--model", path_str(&v), "--ids", "1"]);
    assert!(err.contains("version 99") && err.contains("newer"), "{err}");

    // Missing files.
    for file in ["backbone.bin", "experts.bin"] {
        let v = copy(&format!("missing-{file}"));
        fs::remove_file(v.join(file)).unwrap();
        let err = smoe_err(&["logits", "--model", path_str(&v), "--ids", "1"]);
        assert!(err.contains(file) && err.contains("missing"), "{err}");
    }

    // Files from different conversions.
    let other = dir.path().join("other");
    convert(&fixture("qwen3-moe-a"), &other, "q8_0");
    let v = copy("mixed");
    fs::copy(other.join("experts.bin"), v.join("experts.bin")).unwrap();
    let err = smoe_err(&["logits", "--model", path_str(&v), "--ids", "1"]);
    assert!(err.contains("different conversion"), "{err}");
}

/// The built-in model's rows (64 and 128 weights) are no whole q4_k or q6_k
/// block (256): asked for q4_k experts and the default q4_k backbone, they
/// are stored as q4_0 and, for the LM head (tied to the embeddings) and
/// v_proj, which the backbone recipe raises to q6_k, as q8_0; routers stay
/// bf16. Every summary says what is stored, not what was asked.
#[test]
fn summaries_report_the_stored_quant_types() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("v");
    let out = smoe(&[
        "convert",
        path_str(&builtin_model()),
        "-o",
        path_str(&vault),
        "--experts",
        "q4_k",
    ]);
    let convert = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{convert}");
    let stored =
        "experts q4_0 (asked q4_k: rows of 64 and 128 weights are not whole q4_k blocks), \
         backbone q4_0 (asked q4_k: rows of 128 weights are not whole q4_k blocks) \
         + lm_head q8_0 (asked q6_k: rows of 128 weights are not whole q6_k blocks) \
         + v_proj q8_0 (asked q6_k: rows of 128 weights are not whole q6_k blocks) \
         + routers bf16";
    assert!(
        convert.contains(&format!("stored as {stored}")),
        "{convert}"
    );
    let parts = &manifest(&vault)["experts"][0]["parts"];
    assert!(
        (0..3).all(|i| parts[i]["dtype"] == "q4_0"),
        "the manifest records the fallback: {parts}"
    );

    let inspect = smoe_ok(&["inspect", path_str(&vault)]);
    assert!(inspect.contains(&format!("quant: {stored}")), "{inspect}");

    let state = tempfile::tempdir().unwrap();
    let mut chat = std::process::Command::new(env!("CARGO_BIN_EXE_smoe"));
    chat.args(["chat", "--model", path_str(&vault), "--max-tokens", "8"])
        .env("XDG_STATE_HOME", state.path());
    let out = run_piped(&mut chat, "/quit\n");
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains(&format!("weights  vault: {stored}")),
        "{summary}"
    );
}

#[test]
fn inspect_describes_checkpoints_and_vaults() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("v");
    convert(&fixture("qwen3-moe-a"), &vault, "q8_0");
    let text = smoe_ok(&["inspect", path_str(&vault), "--ram-budget", "1MiB"]);
    for part in [
        "Qwen3Moe",
        "layers 3",
        "experts 8 (top 2)",
        "quant: experts q8_0, backbone bf16",
        "expert bytes",
        "memory plan",
        "direct I/O",
        "weights read per decoded token",
        // Where it runs (this test's binary: the CPU, and why).
        "\ndevice: ",
    ] {
        assert!(
            text.contains(part),
            "inspect output lacks {part:?}:\n{text}"
        );
    }
    let text = smoe_ok(&["inspect", path_str(&fixture("qwen3-moe-b"))]);
    assert!(
        text.contains("layers 4") && !text.contains("memory plan"),
        "{text}"
    );

    // Each family's own traits.
    for (name, parts) in [
        (
            "mixtral",
            &[
                "Mixtral",
                "sliding window 6",
                "softmax top-2 of 4, renormalised",
            ][..],
        ),
        (
            "qwen2-moe",
            &[
                "Qwen2Moe",
                "q/k/v biases",
                "dense layers: 1 of 3",
                "sigmoid-gated",
            ][..],
        ),
        (
            "olmoe",
            &["Olmoe", "whole-width q/k norm", "clip_qkv 1.5"][..],
        ),
        (
            "deepseek-v2",
            &[
                "DeepseekV2",
                "multi-head latent",
                "q_lora_rank 24",
                "within the best 2 of 4 groups",
                "scaled by 2",
            ][..],
        ),
        (
            "deepseek-v2-lite",
            &[
                "q_lora_rank none",
                "dense layers: 1 of 3; shared expert 48 wide",
            ][..],
        ),
        (
            "deepseek-v3",
            &[
                "DeepseekV3",
                "sigmoid with correction bias top-3",
                "renormalised, scaled by 2.5",
            ][..],
        ),
    ] {
        let text = smoe_ok(&["inspect", path_str(&fixture(name))]);
        for part in parts {
            assert!(
                text.contains(part),
                "{name}: inspect lacks {part:?}:\n{text}"
            );
        }
    }
}

/// `smoe check` names a smaller backbone when a vault's does not fit: what
/// `--backbone q4_k` (the default recipe) would store, predicted exactly,
/// and nothing for a vault that already has it.
#[test]
fn the_fit_check_predicts_the_default_backbone_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (wide, small) = (dir.path().join("bf16"), dir.path().join("q4_k"));
    convert(&fixture("qwen3-moe-a"), &wide, "q8_0");
    smoe_ok(&[
        "convert",
        path_str(&fixture("qwen3-moe-a")),
        "-o",
        path_str(&small),
        "--experts",
        "q8_0",
        "--quiet",
    ]);
    let opts = smoe::model::LoadOptions::default();
    let fp = |p: &Path| smoe::check::Footprint::of(p, &opts).unwrap();
    let (wide, small) = (fp(&wide), fp(&small));
    assert!(small.resident_bytes < wide.resident_bytes);
    assert_eq!(
        wide.smaller_backbone,
        Some((smoe::quant::QuantType::Q4K, small.resident_bytes))
    );
    assert_eq!(small.smaller_backbone, None);
}
