//! Read-ahead and grouped prefill: prediction and prefetch never change the
//! output, under any policy and budget, and a prefill chunk reads each
//! expert at most once per layer.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn vault(dir: &Path) -> std::path::PathBuf {
    let v = dir.join("v");
    smoe_ok(&[
        "convert",
        path_str(&fixture("qwen3-moe-a")),
        "-o",
        path_str(&v),
        "--experts",
        "q8_0",
        "--quiet",
    ]);
    v
}

fn record(v: &Path) -> (u64, u64) {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(v.join("manifest.json")).unwrap()).unwrap();
    let layers = m["experts"].as_array().unwrap();
    let n = layers
        .iter()
        .map(|l| l["offsets"].as_array().unwrap().len() as u64)
        .sum();
    (layers[0]["record_len"].as_u64().unwrap(), n)
}

fn run(v: &Path, ids: &str, extra: &[&str]) -> Value {
    let mut args = vec!["run", "--model", path_str(v), "--ids", ids, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(smoe_ok(&args).trim()).unwrap()
}

#[test]
fn prefetch_and_policy_never_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let (len, n) = record(&v);
    let ids = ids_arg(&reference("qwen3-moe-a")["prompt_ids"]);
    let all = (len * n).to_string();
    let want = run(
        &v,
        &ids,
        &[
            "--max-tokens",
            "24",
            "--ram-budget",
            &all,
            "--prefetch",
            "off",
        ],
    );
    let want_logits = smoe_ok(&[
        "logits",
        "--model",
        path_str(&v),
        "--ids",
        &ids,
        "--all",
        "--ram-budget",
        &all,
        "--prefetch",
        "off",
    ]);
    for budget in [len * 2, len * 5, len * 12, len * n] {
        for prefetch in ["on", "off"] {
            for policy in ["lru", "lfu"] {
                let b = budget.to_string();
                let extra = [
                    "--max-tokens",
                    "24",
                    "--ram-budget",
                    &b,
                    "--prefetch",
                    prefetch,
                    "--cache-policy",
                    policy,
                ];
                let got = run(&v, &ids, &extra);
                assert_eq!(
                    got["tokens"], want["tokens"],
                    "budget {budget}, prefetch {prefetch}, {policy}"
                );
                let st = &got["stats"];
                assert_eq!(st["prefetch"], prefetch == "on");
                assert_eq!(st["cache_policy"], policy);
                let recall = st["recall"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&recall), "recall {recall}");
                if prefetch == "off" {
                    assert_eq!(st["prefetch_bytes"], 0, "no prefetch reads when off");
                }
                let logits = smoe_ok(&[
                    "logits",
                    "--model",
                    path_str(&v),
                    "--ids",
                    &ids,
                    "--all",
                    "--ram-budget",
                    &b,
                    "--prefetch",
                    prefetch,
                    "--cache-policy",
                    policy,
                ]);
                assert_eq!(
                    logits, want_logits,
                    "logits at budget {budget}, prefetch {prefetch}, {policy}"
                );
            }
        }
    }
}

#[test]
fn prediction_is_scored_and_prefetch_reads_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let (len, n) = record(&v);
    let ids = ids_arg(&reference("qwen3-moe-a")["prompt_ids"]);
    let budget = (len * n).to_string();
    let got = run(
        &v,
        &ids,
        &[
            "--max-tokens",
            "24",
            "--ram-budget",
            &budget,
            "--prefetch",
            "on",
        ],
    );
    let st = &got["stats"];
    assert!(
        st["prefetches"].as_u64().unwrap() > 0,
        "predicted experts were read ahead: {st}"
    );
    assert!(
        st["prefetch_hits"].as_u64().unwrap() > 0,
        "some demanded experts came from prefetches: {st}"
    );
    assert!(st["precision"].as_f64().unwrap() > 0.0, "{st}");
}

#[test]
fn grouped_prefill_reads_each_expert_once_per_layer_per_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let (len, n) = record(&v);
    let ids = ids_arg(&reference("qwen3-moe-a")["prompt_ids"]); // 14 tokens
    let sparse_layers = 3;
    let experts = n / sparse_layers;
    let all = (len * n).to_string();
    // --max-tokens 1: the prompt's forward passes and nothing else.
    for (chunk, chunks) in [("14", 1), ("5", 3)] {
        let got = run(
            &v,
            &ids,
            &[
                "--max-tokens",
                "1",
                "--ram-budget",
                &all,
                "--prefetch",
                "off",
                "--prefill-chunk",
                chunk,
            ],
        );
        let st = &got["stats"];
        let misses = st["misses"].as_u64().unwrap();
        let requests = misses + st["hits"].as_u64().unwrap();
        // Each chunk asks each layer once for the union of its experts.
        assert!(
            requests <= chunks * sparse_layers * experts,
            "chunk {chunk}: {requests} expert requests"
        );
        // A cold cache that holds everything reads each expert at most once.
        assert!(misses <= n, "chunk {chunk}: {misses} reads of {n} records");
        assert_eq!(st["demand_bytes"].as_u64().unwrap(), misses * len);
    }
    // Token by token, with a cache of one layer's top-k, reads far more.
    let tight = (len * 2).to_string();
    let one = run(
        &v,
        &ids,
        &[
            "--max-tokens",
            "1",
            "--ram-budget",
            &tight,
            "--prefetch",
            "off",
            "--prefill-chunk",
            "1",
        ],
    );
    let grouped = run(
        &v,
        &ids,
        &[
            "--max-tokens",
            "1",
            "--ram-budget",
            &tight,
            "--prefetch",
            "off",
            "--prefill-chunk",
            "14",
        ],
    );
    let (m1, mg) = (
        one["stats"]["misses"].as_u64().unwrap(),
        grouped["stats"]["misses"].as_u64().unwrap(),
    );
    assert!(
        mg < m1,
        "grouped prefill read {mg} records, token by token {m1}"
    );
    assert_eq!(one["tokens"], grouped["tokens"]);
}

#[test]
fn bench_reports_streaming_and_the_roofline() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let (len, _) = record(&v);
    let out = smoe_ok(&[
        "bench",
        "--model",
        path_str(&v),
        "--ram-budget",
        &(len * 4).to_string(),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--repeat",
        "2",
        "--json",
    ]);
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    for k in ["prefill_tok_s", "decode_tok_s", "ttft_s"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    let st = &r["streaming"];
    for k in [
        "decode_hit_rate",
        "recall",
        "precision",
        "bytes_read_per_token",
        "blocked_ms_per_token",
        "disk_read_gb_s",
    ] {
        assert!(st[k].as_f64().is_some(), "{k} missing: {st}");
    }
    assert!(st["disk_read_gb_s"].as_f64().unwrap() > 0.0);
    let text = smoe_ok(&[
        "bench",
        "--model",
        path_str(&v),
        "--ram-budget",
        &(len * 4).to_string(),
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--repeat",
        "1",
    ]);
    assert!(
        text.contains("I/O roofline") && text.contains("prediction recall"),
        "{text}"
    );
    // A checkpoint has nothing to stream: only speeds are reported.
    let r: Value = serde_json::from_str(
        smoe_ok(&[
            "bench",
            "--model",
            path_str(&fixture("qwen3-moe-b")),
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeat",
            "1",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert!(r.get("streaming").is_none() && r["decode_tok_s"].as_f64().unwrap() > 0.0);
}
