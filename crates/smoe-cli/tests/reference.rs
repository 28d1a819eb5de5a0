//! smoe against HF transformers on the committed fixtures of every family
//! (made by tools/make_fixtures.py): logits at every position within 1e-3
//! and identical greedy continuations.

mod common;

use common::*;
use serde_json::Value;

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// Absolute tolerance of the contract. Both sides compute in f32
/// from the same bf16 weights; only summation order differs, which moves
/// logits of magnitude ~30 by ~1e-5.
const TOL: f64 = 1e-3;

#[test]
fn logits_match_transformers_at_every_position() {
    for name in MODELS {
        let reference = reference(name);
        let ids = ids_arg(&reference["prompt_ids"]);
        let model = fixture(name);
        let out = smoe_ok(&[
            "logits",
            "--model",
            path_str(&model),
            "--ids",
            &ids,
            "--all",
        ]);
        let got: Value = serde_json::from_str(&out).unwrap();
        let got = rows(&got["logits"]);
        let want = rows(&reference["logits"]);
        assert_eq!(got.len(), want.len(), "{name}: positions");
        let mut worst = 0.0f64;
        for (p, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "{name}: vocab at position {p}");
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
        }
        assert!(
            worst <= TOL,
            "{name}: max |smoe - transformers| = {worst:e}"
        );
        eprintln!("{name}: max |smoe - transformers| = {worst:e}");

        // Without --all: the last row only, identical to --all's last row.
        let out = smoe_ok(&["logits", "--model", path_str(&model), "--ids", &ids]);
        let last: Value = serde_json::from_str(&out).unwrap();
        let last: Vec<f64> = last["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(
            &last,
            got.last().unwrap(),
            "{name}: last-position logits differ from --all"
        );
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in MODELS {
        let reference = reference(name);
        let want: Vec<u64> = reference["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert!(want.len() >= 24);
        let ids = ids_arg(&reference["prompt_ids"]);
        let n = want.len().to_string();
        let model = fixture(name);
        let out = smoe_ok(&[
            "run",
            "--model",
            path_str(&model),
            "--ids",
            &ids,
            "--max-tokens",
            &n,
            "--json",
        ]);
        let got: Value = serde_json::from_str(out.trim()).expect("--json prints one JSON object");
        let tokens: Vec<u64> = got["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(
            tokens, want,
            "{name}: greedy continuation differs from transformers"
        );
        assert_eq!(got["stop_reason"], "length");
        assert_eq!(
            got["prompt_ids"].as_array().unwrap().len(),
            reference["prompt_ids"].as_array().unwrap().len()
        );
        for key in ["prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"] {
            assert!(
                got["timings"][key].as_f64().is_some(),
                "{name}: timings.{key} missing"
            );
        }
    }
}
