//! Streaming keeps memory bounded: a vault whose experts are six times the
//! RAM budget runs with the process's peak resident set (above what the
//! bare binary needs before loading) within the plan's backbone + budget +
//! KV + activations + 10%, while the counters show real streaming.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const EXPERTS: usize = 128;
const TOP_K: usize = 4;
const MOE_INTER: usize = 512;
const LAYERS: usize = 4;
const VOCAB: usize = 448;

/// Deterministic bf16 noise with std ~ `scale`.
fn noise(n: usize, scale: f32, seed: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        let bits = ((u * scale * 1.732).to_bits() >> 16) as u16;
        out.extend_from_slice(&bits.to_le_bytes());
    }
    out
}

fn write_checkpoint(dir: &Path) {
    let mut seed = 42;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, seed: &mut u64| {
        let n = shape.iter().product();
        tensors.push((name, shape, noise(n, scale, seed)));
    };
    let lin = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add(
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        1.0,
        &mut seed,
    );
    add(
        "lm_head.weight".into(),
        vec![VOCAB, HIDDEN],
        lin(HIDDEN),
        &mut seed,
    );
    add("model.norm.weight".into(), vec![HIDDEN], 1.0, &mut seed);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            add(format!("{p}.{n}.weight"), vec![HIDDEN], 1.0, &mut seed);
        }
        let a = format!("{p}.self_attn");
        add(
            format!("{a}.q_proj.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
            lin(HIDDEN),
            &mut seed,
        );
        add(
            format!("{a}.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            lin(HIDDEN),
            &mut seed,
        );
        add(
            format!("{a}.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            lin(HIDDEN),
            &mut seed,
        );
        add(
            format!("{a}.o_proj.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            lin(HEADS * HEAD_DIM),
            &mut seed,
        );
        add(format!("{a}.q_norm.weight"), vec![HEAD_DIM], 1.0, &mut seed);
        add(format!("{a}.k_norm.weight"), vec![HEAD_DIM], 1.0, &mut seed);
        add(
            format!("{p}.mlp.gate.weight"),
            vec![EXPERTS, HIDDEN],
            lin(HIDDEN),
            &mut seed,
        );
        for e in 0..EXPERTS {
            let x = format!("{p}.mlp.experts.{e}");
            add(
                format!("{x}.gate_proj.weight"),
                vec![MOE_INTER, HIDDEN],
                lin(HIDDEN),
                &mut seed,
            );
            add(
                format!("{x}.up_proj.weight"),
                vec![MOE_INTER, HIDDEN],
                lin(HIDDEN),
                &mut seed,
            );
            add(
                format!("{x}.down_proj.weight"),
                vec![HIDDEN, MOE_INTER],
                lin(MOE_INTER),
                &mut seed,
            );
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 1024,
        "moe_intermediate_size": MOE_INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": true,
        "max_position_embeddings": 1024, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn peak_memory_stays_within_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    write_checkpoint(&ckpt);
    let vault = dir.path().join("vault");
    smoe_ok(&[
        "convert",
        path_str(&ckpt),
        "-o",
        path_str(&vault),
        "--experts",
        "bf16",
        "--quiet",
    ]);

    let budget: u64 = 40 << 20;
    let ids: Vec<String> = (0..64).map(|i| ((i * 37) % VOCAB).to_string()).collect();
    let out = smoe_ok(&[
        "run",
        "--model",
        path_str(&vault),
        "--ids",
        &ids.join(","),
        "--max-tokens",
        "32",
        "--json",
        "--ram-budget",
        &budget.to_string(),
        "--ctx",
        "128",
        // The prompt is one chunk, so the plan's activations are this run's.
        "--prefill-chunk",
        &ids.len().to_string(),
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let st = &v["stats"];
    let plan = &st["plan"];
    let expert_bytes = plan["expert_bytes"].as_u64().unwrap();
    assert!(
        expert_bytes >= 4 * budget,
        "experts {expert_bytes} must be >= 4x the budget {budget}"
    );
    assert!(plan["cache_bytes"].as_u64().unwrap() <= budget);
    let (hits, misses) = (st["hits"].as_u64().unwrap(), st["misses"].as_u64().unwrap());
    assert!(
        hits > 0 && misses > 0,
        "real streaming: {hits} hits, {misses} misses"
    );
    assert!(
        st["bytes_read"].as_u64().unwrap() > expert_bytes / 2,
        "most experts were read at least once"
    );

    let (Some(peak), Some(base)) = (st["peak_rss_bytes"].as_u64(), st["base_rss_bytes"].as_u64())
    else {
        eprintln!("no /proc/self/status here: peak RSS not measured");
        return;
    };
    // The 10% is what no plan names: code pages faulted in after the base
    // was read, thread stacks, the allocator's slack; about 2 MB with the
    // debug binary, against 4.3 MB of margin.
    let activations = plan["activation_bytes"].as_u64().unwrap();
    assert!(activations > 0, "the plan counts activations");
    let allowed = (plan["backbone_bytes"].as_u64().unwrap()
        + budget
        + plan["kv_bytes"].as_u64().unwrap()
        + activations) as f64
        * 1.10;
    let used = peak.saturating_sub(base) as f64;
    eprintln!("peak RSS {peak} (base {base}): model used {used} of allowed {allowed}");
    assert!(
        used <= allowed,
        "the model used {used} bytes of RSS, more than backbone + budget + KV + activations + 10% = {allowed}"
    );
}
