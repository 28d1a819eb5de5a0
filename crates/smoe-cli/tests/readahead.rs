//! Read-ahead and grouped prefill: prediction and prefetch never change the
//! output, under any policy and budget, and a prefill chunk reads each
//! expert at most once per layer. The built-in model's learned routing
//! gives real text to compare and a prediction to score; the grouped
//! prefill counts are worked out on a random fixture's known shape.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn vault(dir: &Path, src: &Path, experts: &str) -> PathBuf {
    let v = dir.join("v");
    smoe_ok(&[
        "convert",
        path_str(src),
        "-o",
        path_str(&v),
        "--experts",
        experts,
        "--quiet",
    ]);
    v
}

/// The built-in model as `smoe run` streams it: a q4_0 vault.
fn builtin_vault(dir: &Path) -> PathBuf {
    vault(dir, &builtin_model(), "q4_0")
}

/// The chat prompt's token ids for one user message.
fn prompt_ids(model: &Path, message: &str) -> Vec<u32> {
    template_ids(model, &[json!({"role": "user", "content": message})])
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
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
    let mut args = vec![
        "run",
        "--model",
        path_str(v),
        "--ids",
        ids,
        "--temperature",
        "0",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(smoe_ok(&args).trim()).unwrap()
}

const COUNT: &str = "Count from 1 to 9.";
const COUNTED: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9.";

#[test]
fn prefetch_and_policy_never_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let v = builtin_vault(dir.path());
    let (len, n) = record(&v);
    let prompt = prompt_ids(&v, COUNT);
    let ids = join(&prompt);
    let all = (len * n).to_string();
    let want = run(
        &v,
        &ids,
        &[
            "--max-tokens",
            "32",
            "--ram-budget",
            &all,
            "--prefetch",
            "off",
        ],
    );
    assert_eq!(want["text"], COUNTED, "{want}");
    // Logits at every position of the prompt and the reply: each decode
    // step's experts, not just the prompt's.
    let tokens: Vec<u32> = serde_json::from_value(want["tokens"].clone()).unwrap();
    let conversation = join(&[prompt, tokens].concat());
    let logits = |budget: &str, prefetch: &str, policy: &str| {
        smoe_ok(&[
            "logits",
            "--model",
            path_str(&v),
            "--ids",
            &conversation,
            "--all",
            "--ram-budget",
            budget,
            "--prefetch",
            prefetch,
            "--cache-policy",
            policy,
        ])
    };
    let want_logits = logits(&all, "off", "lfu");
    // From the least cache (one token's top-4 of one layer) to all 256
    // records.
    for budget in [len * 4, len * 10, len * 64, len * n] {
        for prefetch in ["on", "prompts", "off"] {
            for policy in ["lru", "lfu"] {
                let b = budget.to_string();
                let extra = [
                    "--max-tokens",
                    "32",
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
                    "budget {budget}, prefetch {prefetch}, {policy}: {}",
                    got["text"]
                );
                let st = &got["stats"];
                assert_eq!(st["prefetch"], prefetch);
                assert_eq!(st["cache_policy"], policy);
                let recall = st["recall"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&recall), "recall {recall}");
                if prefetch == "off" {
                    assert_eq!(st["prefetch_bytes"], 0, "no prefetch reads when off");
                }
                assert_eq!(
                    logits(&b, prefetch, policy),
                    want_logits,
                    "logits at budget {budget}, prefetch {prefetch}, {policy}"
                );
            }
        }
    }
}

/// Learned routing is predictable from the layer before: the next layer's
/// top-4 of 32 is guessed far better than chance (4/32 = 12.5%), on prompts
/// from four of the model's domains.
#[test]
fn prediction_is_scored_and_prefetch_reads_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let v = builtin_vault(dir.path());
    let (len, n) = record(&v);
    let budget = (len * n).to_string();
    for (prompt, reply) in [
        (COUNT, COUNTED),
        ("Say hello.", "Hello, world!"),
        ("What is 2 + 3?", "2 + 3 = 5."),
        ("Spell cat.", "c-a-t."),
    ] {
        let got = run(
            &v,
            &join(&prompt_ids(&v, prompt)),
            &[
                "--max-tokens",
                "32",
                "--ram-budget",
                &budget,
                "--prefetch",
                "on",
            ],
        );
        assert_eq!(got["text"], reply);
        let st = &got["stats"];
        assert!(
            st["prefetches"].as_u64().unwrap() > 0,
            "predicted experts were read ahead: {st}"
        );
        assert!(
            st["prefetch_hits"].as_u64().unwrap() > 0,
            "some demanded experts came from prefetches: {st}"
        );
        let (recall, precision) = (
            st["recall"].as_f64().unwrap(),
            st["precision"].as_f64().unwrap(),
        );
        assert!(
            recall > 0.6 && precision > 0.6,
            "{prompt}: recall {recall}, precision {precision}: {st}"
        );
    }
}

/// `--prefetch prompts` reads ahead while the prompt is
/// processed and never while decoding: a 32-token reply adds no
/// read-ahead to the prompt's, where `on` adds some.
#[test]
fn prompts_read_ahead_only_while_the_prompt_is_processed() {
    let dir = tempfile::tempdir().unwrap();
    let v = builtin_vault(dir.path());
    let (len, n) = record(&v);
    let budget = (len * n).to_string();
    let ids = join(&prompt_ids(&v, COUNT));
    let prefetches = |mode: &str, tokens: &str| {
        let got = run(
            &v,
            &ids,
            &[
                "--max-tokens",
                tokens,
                "--ram-budget",
                &budget,
                "--prefetch",
                mode,
            ],
        );
        assert_eq!(got["stats"]["prefetch"], mode);
        got["stats"]["prefetches"].as_u64().unwrap()
    };
    // --max-tokens 1: the prompt's forward pass and nothing else.
    let prompt = prefetches("prompts", "1");
    assert!(prompt > 0, "the prompt read nothing ahead");
    assert_eq!(prefetches("prompts", "32"), prompt, "decoding read ahead");
    assert_eq!(prefetches("on", "1"), prompt);
    assert!(
        prefetches("on", "32") > prompt,
        "on: decoding read nothing ahead"
    );
    // The default reads nothing ahead.
    let got = run(&v, &ids, &["--max-tokens", "1", "--ram-budget", &budget]);
    assert_eq!(got["stats"]["prefetch"], "off");
    assert_eq!(got["stats"]["prefetches"], 0);
}

#[test]
fn grouped_prefill_reads_each_expert_once_per_layer_per_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path(), &fixture("qwen3-moe-a"), "q8_0");
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
    let with_chunk = |chunk: &str| {
        run(
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
                chunk,
            ],
        )
    };
    let one = with_chunk("1");
    let grouped = with_chunk("14");
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
    let v = builtin_vault(dir.path());
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
