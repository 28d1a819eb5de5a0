//! GGUFs written from the family fixtures the way llama.cpp's converter
//! writes them (its names, reversed dims, merged experts, the `llama` q/k
//! permutation, its metadata keys), then run: in bf16 against
//! transformers' logits, quantized against the vault converted from the
//! same file, split into shards, and broken in the ways a file can be.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::write::Builder;
use super::{gguf_name, GgmlType, Gguf, Mapped, Value};
use crate::checkpoint::{Checkpoint, TensorSource};
use crate::config::{ModelConfig, RopeScaling, Scoring};
use crate::engine::Engine;
use crate::load::LoadOptions;
use crate::model::Logits;
use crate::quant::{self, QuantType};
use crate::sampler::SamplingParams;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

pub(crate) const FAMILIES: [&str; 8] = [
    "qwen3-moe-a",
    "qwen3-moe-b",
    "qwen2-moe",
    "mixtral",
    "olmoe",
    "deepseek-v2",
    "deepseek-v2-lite",
    "deepseek-v3",
];

/// `vals` (`cols` per row) stored as `ty`.
fn encode(vals: &[f32], cols: usize, ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Bf16 => vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        q => {
            let q = q.quant_type().expect("a type the tests quantize to");
            let mut out = vec![0u8; vals.len() / cols * q.row_bytes(cols).unwrap()];
            quant::quantize_rows(q, vals, cols, &mut out).unwrap();
            out
        }
    }
}

/// llama.cpp's `LlamaModel.permute`: row `half * d/2 + i` of each head
/// goes to `2 * i + half`.
fn permute(vals: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = vals.len() / rows;
    let d = rows / heads;
    let mut out = vec![0f32; vals.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..d / 2 {
                let from = h * d + half * (d / 2) + i;
                let to = h * d + 2 * i + half;
                out[to * cols..][..cols].copy_from_slice(&vals[from * cols..][..cols]);
            }
        }
    }
    out
}

/// The `{arch}.*` keys convert_hf_to_gguf.py writes for `c`.
fn metadata(c: &ModelConfig) -> Vec<(String, Value)> {
    let arch = c.family.gguf.as_ref().unwrap().arch;
    let mut m = vec![(
        "general.architecture".to_string(),
        Value::String(arch.into()),
    )];
    let mut put = |k: &str, v: Value| m.push((format!("{arch}.{k}"), v));
    let u = |n: usize| Value::U32(n as u32);
    put("block_count", u(c.num_hidden_layers));
    put("context_length", u(c.max_position_embeddings));
    put("embedding_length", u(c.hidden_size));
    put("feed_forward_length", u(c.intermediate_size));
    put("expert_feed_forward_length", u(c.moe_intermediate_size));
    put("attention.head_count", u(c.num_attention_heads));
    put("expert_count", u(c.num_experts));
    put("expert_used_count", u(c.num_experts_per_tok));
    put("expert_weights_norm", Value::Bool(c.routing.norm_topk_prob));
    put("rope.freq_base", Value::F32(c.rope_theta as f32));
    put(
        "attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_norm_eps),
    );
    if let Some(w) = c.sliding_window {
        put("attention.sliding_window", u(w));
    }
    if let Some(clip) = c.clip_qkv {
        put("attention.clamp_kqv", Value::F32(clip));
    }
    match c.mla {
        None => {
            put("attention.head_count_kv", u(c.num_key_value_heads));
            put("attention.key_length", u(c.head_dim));
            put("attention.value_length", u(c.head_dim));
            if c.shared_expert_intermediate_size > 0 {
                put(
                    "expert_shared_feed_forward_length",
                    u(c.shared_expert_intermediate_size),
                );
            }
        }
        Some(mla) => {
            let rope = mla.qk_rope_head_dim;
            put("attention.head_count_kv", u(1));
            put("attention.key_length", u(mla.kv_lora_rank + rope));
            put("attention.value_length", u(mla.kv_lora_rank));
            put("attention.key_length_mla", u(mla.qk_nope_head_dim + rope));
            put("attention.value_length_mla", u(mla.v_head_dim));
            put("rope.dimension_count", u(rope));
            put("attention.kv_lora_rank", u(mla.kv_lora_rank));
            if let Some(r) = mla.q_lora_rank {
                put("attention.q_lora_rank", u(r));
            }
            put("leading_dense_block_count", u(c.first_k_dense_replace));
            put(
                "expert_shared_count",
                u(c.shared_expert_intermediate_size / c.moe_intermediate_size),
            );
            put("expert_weights_scale", Value::F32(c.routing.scale));
            let sigmoid = c.routing.scoring == Scoring::Sigmoid;
            put("expert_gating_func", u(if sigmoid { 2 } else { 1 }));
            if let Some(g) = c.routing.groups {
                put("expert_group_count", u(g.n_group));
                put("expert_group_used_count", u(g.topk_group));
            }
            if let RopeScaling::Yarn(y) = &c.rope_scaling {
                put("rope.scaling.type", Value::String("yarn".into()));
                put("rope.scaling.factor", Value::F32(y.factor as f32));
                put(
                    "rope.scaling.original_context_length",
                    u(y.original_max_position_embeddings),
                );
                put(
                    "rope.scaling.yarn_log_multiplier",
                    Value::F32((0.1 * y.mscale_all_dim.unwrap_or(0.0)) as f32),
                );
            }
        }
    }
    m
}

/// One experts tensor being gathered: the checkpoint shape of one expert,
/// its type, and each expert's bytes.
type ExpertParts = (Vec<usize>, GgmlType, Vec<(usize, Vec<u8>)>);

/// A GGUF of `tensors` (checkpoint names, shapes, values): vectors and
/// routers f32 as llama.cpp keeps them, other matrices `ty` (f32 where a
/// row is not whole blocks of it).
fn gguf_of(c: &ModelConfig, tensors: Vec<(String, Vec<usize>, Vec<f32>)>, ty: GgmlType) -> Builder {
    let mut b = Builder::new();
    for (k, v) in metadata(c) {
        b = b.kv(&k, v);
    }
    let permuted = c.family.gguf.as_ref().unwrap().permute_qk;
    let mut experts: BTreeMap<String, ExpertParts> = BTreeMap::new();
    // By name, as blk.N.* then the rest, so that a split spreads layers
    // (and their experts) over the shards.
    let mut out: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> = Vec::new();
    for (name, shape, mut vals) in tensors {
        let cols = *shape.last().unwrap();
        if permuted && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) {
            let heads = if name.ends_with("q_proj.weight") {
                c.num_attention_heads
            } else {
                c.num_key_value_heads
            };
            vals = permute(&vals, shape[0], heads);
        }
        let mapped = gguf_name(c.family, &name).unwrap_or_else(|| panic!("{name}"));
        let gname = match &mapped {
            Mapped::Tensor(g) | Mapped::Expert(g, _) => g.clone(),
        };
        let t = if shape.len() == 1
            || gname.contains("ffn_gate_inp.")
            || !cols.is_multiple_of(ty.block_elems())
        {
            GgmlType::F32
        } else {
            ty
        };
        let bytes = encode(&vals, cols, t);
        match mapped {
            Mapped::Tensor(g) => {
                let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
                out.push((g, dims, t, bytes));
            }
            Mapped::Expert(g, e) => {
                let entry = experts.entry(g).or_insert((shape.clone(), t, Vec::new()));
                entry.2.push((e, bytes));
            }
        }
    }
    for (g, (shape, t, mut parts)) in experts {
        parts.sort_by_key(|p| p.0);
        let dims = vec![shape[1] as u64, shape[0] as u64, parts.len() as u64];
        out.push((g, dims, t, parts.into_iter().flat_map(|p| p.1).collect()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    for (g, dims, t, bytes) in out {
        b = b.tensor(&g, &dims, t, bytes);
    }
    b
}

/// A fixture checkpoint as a GGUF builder.
pub(crate) fn from_fixture(name: &str, ty: GgmlType) -> (ModelConfig, Builder) {
    let ckpt = Checkpoint::open(&fixture(name)).unwrap();
    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort_unstable();
    let tensors = names
        .into_iter()
        .map(|n| {
            let w = ckpt.tensor_any(n).unwrap();
            (n.to_string(), w.shape.clone(), w.to_f32())
        })
        .collect();
    let c = ckpt.config.clone();
    let b = gguf_of(&c, tensors, ty);
    (c, b)
}

pub(crate) fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `b` split into `n` shards, written to `dir` as `<prefix>-0000K-of-0000N.gguf`.
pub(crate) fn write_split(dir: &Path, prefix: &str, b: &Builder, n: usize) -> Vec<PathBuf> {
    b.split(n)
        .iter()
        .enumerate()
        .map(|(k, bytes)| write(dir, &format!("{prefix}-{:05}-of-{n:05}.gguf", k + 1), bytes))
        .collect()
}

fn opts() -> LoadOptions {
    LoadOptions {
        read_threads: 2,
        ..Default::default()
    }
}

fn all_logits(engine: &Engine, ids: &[u32]) -> Vec<f32> {
    let mut s = engine.new_session();
    engine
        .model()
        .forward(ids, &mut s, Logits::All)
        .unwrap()
        .to_vec()
}

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every fixture's bf16 GGUF gives transformers' logits (1e-3) and its
/// greedy continuation.
#[test]
fn bf16_ggufs_match_transformers() {
    let d = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let (_, b) = from_fixture(name, GgmlType::Bf16);
        let path = write(d.path(), &format!("{name}.gguf"), &b.build());
        let engine = Engine::load_with(&path, &opts()).unwrap();
        let r = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let got = all_logits(&engine, &prompt);
        let vocab = engine.config().vocab_size;
        for (pos, want) in r["logits"].as_array().unwrap().iter().enumerate() {
            for (i, w) in want.as_array().unwrap().iter().enumerate() {
                let diff = (got[pos * vocab + i] - w.as_f64().unwrap() as f32).abs();
                assert!(
                    diff < 1e-3,
                    "{name}: position {pos} id {i} differs by {diff}"
                );
            }
        }
        let greedy = ids(&r["greedy_ids"]);
        let mut session = engine.new_session();
        let gen = engine
            .generate(
                &mut session,
                &prompt,
                &SamplingParams::default(),
                greedy.len(),
                |_| {},
            )
            .unwrap();
        assert_eq!(gen.tokens, greedy, "{name}");
    }
}

/// A vault converted from `path` holds the GGUF's blocks byte for byte and
/// gives the same logits, bit for bit.
fn same_as_its_vault(path: &Path, dir: &Path, prompt: &[u32]) {
    let vault = dir.join(format!(
        "{}-vault",
        path.file_stem().unwrap().to_string_lossy()
    ));
    super::convert::convert(path, &vault, None, &mut |_| {}).unwrap();
    let g = Gguf::open(path).unwrap();
    let cfg = super::config::model_config(&g).unwrap();
    let v = crate::vault::Vault::open(&vault).unwrap();
    let experts = std::fs::read(v.experts_path()).unwrap();
    for (l, layer) in super::expert_tensors(&g, &cfg)
        .unwrap()
        .iter()
        .zip(&v.manifest.experts)
    {
        assert_eq!(l.layer, layer.layer);
        for e in 0..l.experts {
            for (p, entry) in l.parts.iter().zip(&layer.parts) {
                let src = g.extent_data(super::Extent {
                    shard: p.shard,
                    offset: p.offset + e as u64 * p.len,
                    len: p.len,
                });
                let at = (layer.offsets[e] + entry.offset) as usize;
                assert!(
                    experts[at..at + p.len as usize] == *src,
                    "layer {} expert {e}",
                    l.layer
                );
            }
        }
    }
    let backbone = v.backbone().unwrap();
    let weights = super::GgufWeights::new(&g, &cfg);
    for (name, t) in &v.manifest.backbone {
        let w = weights.tensor(name, &t.shape).unwrap();
        let stored = backbone.tensor(name, &t.shape).unwrap();
        assert_eq!(w.dtype, stored.dtype, "{name}");
        assert!(w.bytes() == stored.bytes(), "{name}");
    }
    let a = all_logits(&Engine::load_with(path, &opts()).unwrap(), prompt);
    let b = all_logits(&Engine::load_with(&vault, &opts()).unwrap(), prompt);
    assert!(a == b, "{}: logits differ from its vault's", path.display());
}

/// Q8_0 GGUFs of every family run as the vaults converted from them.
#[test]
fn q8_0_ggufs_run_as_their_vaults() {
    let d = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let (_, b) = from_fixture(name, GgmlType::Q8_0);
        let path = write(d.path(), &format!("{name}.gguf"), &b.build());
        let prompt = ids(&reference(name)["prompt_ids"]);
        same_as_its_vault(&path, d.path(), &prompt);
    }
}

/// A Qwen3-MoE wide enough for Q4_K rows (256), with random weights; the
/// value projections in Q6_K as in Q4_K_M.
pub(crate) fn wide_qwen3(ty: GgmlType) -> Builder {
    let cfg = serde_json::json!({
        "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 256,
        "intermediate_size": 256, "moe_intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64, "norm_topk_prob": true, "rope_theta": 10000.0
    });
    let c = ModelConfig::from_json(&cfg, Path::new("wide")).unwrap();
    let mut seed = 1u64;
    let mut rand = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let (h, hd, v) = (256, 64, 96);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![v, h],
            rand(v * h, 1.0),
        ),
        (
            "model.norm.weight".into(),
            vec![h],
            rand(h, 0.2).iter().map(|x| 1.0 + x).collect(),
        ),
        ("lm_head.weight".into(), vec![v, h], rand(v * h, 0.2)),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_norm.weight", vec![hd]),
            ("self_attn.k_norm.weight", vec![hd]),
        ] {
            let n1: Vec<f32> = rand(shape[0], 0.2).iter().map(|x| 1.0 + x).collect();
            t.push((format!("{p}.{n}"), shape, n1));
        }
        for (n, rows) in [("q_proj", 4 * hd), ("k_proj", 2 * hd), ("v_proj", 2 * hd)] {
            t.push((
                format!("{p}.self_attn.{n}.weight"),
                vec![rows, h],
                rand(rows * h, 0.2),
            ));
        }
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, 4 * hd],
            rand(h * 4 * hd, 0.2),
        ));
        t.push((format!("{p}.mlp.gate.weight"), vec![4, h], rand(4 * h, 1.0)));
        for e in 0..4 {
            for (n, shape) in [
                ("gate_proj", [h, h]),
                ("up_proj", [h, h]),
                ("down_proj", [h, h]),
            ] {
                t.push((
                    format!("{p}.mlp.experts.{e}.{n}.weight"),
                    shape.to_vec(),
                    rand(h * h, 0.2),
                ));
            }
        }
    }
    gguf_of(&c, t, ty)
}

/// Q4_K (with Q6_K parts, as Q4_K_M mixes them) runs as its vault.
#[test]
fn q4_k_gguf_runs_as_its_vault() {
    let d = tempfile::tempdir().unwrap();
    for ty in [GgmlType::Q4K, GgmlType::Q6K] {
        let path = write(
            d.path(),
            &format!("wide-{ty}.gguf"),
            &wide_qwen3(ty).build(),
        );
        same_as_its_vault(&path, d.path(), &[1, 5, 90, 33, 7, 60]);
    }
}

/// A set of three shards is found from any of them and runs like the
/// whole file, experts streamed from whichever shard holds them.
#[test]
fn a_three_shard_gguf_runs() {
    let d = tempfile::tempdir().unwrap();
    let (_, b) = from_fixture("qwen3-moe-a", GgmlType::Bf16);
    let whole = write(d.path(), "whole.gguf", &b.build());
    let paths = write_split(d.path(), "m", &b, 3);
    let prompt = ids(&reference("qwen3-moe-a")["prompt_ids"]);
    let want = all_logits(&Engine::load_with(&whole, &opts()).unwrap(), &prompt);
    let g = Gguf::open(&paths[1]).unwrap();
    let cfg = super::config::model_config(&g).unwrap();
    let shards: std::collections::BTreeSet<usize> = super::expert_tensors(&g, &cfg)
        .unwrap()
        .iter()
        .flat_map(|l| l.parts.map(|p| p.shard))
        .collect();
    assert!(shards.len() > 1, "experts in shards {shards:?}");
    for p in &paths {
        let got = all_logits(&Engine::load_with(p, &opts()).unwrap(), &prompt);
        assert!(got == want, "{}", p.display());
    }
}

fn load_err(path: &Path) -> String {
    match Engine::load_with(path, &opts()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// What a user gets for a file smoe cannot run: one error naming the file
/// and what is wrong.
#[test]
fn bad_ggufs_are_named() {
    let d = tempfile::tempdir().unwrap();
    let (c, b) = from_fixture("qwen3-moe-a", GgmlType::Q8_0);
    let good = b.build();

    let mut meta = metadata(&c);
    meta[0].1 = Value::String("gpt2".into());
    let err = load_err(&write(
        d.path(),
        "gpt2.gguf",
        &b.with_metadata(meta).build(),
    ));
    assert!(err.contains("general.architecture is \"gpt2\""), "{err}");
    assert!(err.contains("qwen3moe"), "{err}");

    let truncated = write(d.path(), "cut.gguf", &good[..good.len() - 100]);
    let err = load_err(&truncated);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated tensor data"),
        "{err}"
    );

    // More experts in the metadata than in the tensors.
    let mut meta = metadata(&c);
    let n = meta
        .iter()
        .position(|(k, _)| k == "qwen3moe.expert_count")
        .unwrap();
    meta[n].1 = Value::U32(9);
    let err = load_err(&write(
        d.path(),
        "nine.gguf",
        &b.with_metadata(meta).build(),
    ));
    assert!(
        err.contains("ffn_gate_exps.weight has dims [64, 32, 8]"),
        "{err}"
    );
    assert!(err.contains("9 experts"), "{err}");

    // A type without kernels is refused with the tensor and the type.
    let q81 = b.with_tensor_type("blk.0.attn_q.weight", GgmlType::Q8_1);
    let err = load_err(&write(d.path(), "q81.gguf", &q81.build()));
    assert!(err.contains("tensor blk.0.attn_q.weight is Q8_1"), "{err}");

    // A shard missing from a split set.
    let parts = b.split(3);
    let first = write(d.path(), "s-00001-of-00003.gguf", &parts[0]);
    write(d.path(), "s-00002-of-00003.gguf", &parts[1]);
    let err = load_err(&first);
    assert!(err.contains("shard 3 of 3 is missing"), "{err}");
}

/// A GGUF conversion stopped anywhere (a full disk in the backbone, in an
/// expert layer, in the journal, the tokenizer files or the manifest; or a
/// crash after a layer) resumes after its last finished layer and ends in
/// the same vault, byte for byte, as one that never stopped; a partial
/// conversion of another GGUF is not resumed into.
#[test]
fn an_interrupted_gguf_conversion_resumes_to_the_same_vault() {
    use crate::vault::convert::disk_full;
    let d = tempfile::tempdir().unwrap();
    let (_, b) = from_fixture("qwen3-moe-a", GgmlType::Q8_0);
    let src = write(d.path(), "m.gguf", &b.build());
    let convert = |out: &Path| super::convert::convert(&src, out, None, &mut |_| {});
    disk_full::stop_and_resume(d.path(), &[0, 100, 300, 500, 700, 900, 999], &convert);
    let want = disk_full::vault_files(&d.path().join("straight"));

    // A crash after one layer, resumed.
    let out = d.path().join("crashed");
    let err = super::convert::convert(&src, &out, Some(1), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("stopped after 1"), "{err}");
    let report = convert(&out).unwrap();
    assert_eq!(report.resumed_layers, 1);
    assert!(disk_full::vault_files(&out) == want);

    // Another GGUF of the same config: its partial conversion is started over.
    let (_, other) = from_fixture("qwen3-moe-a", GgmlType::F16);
    let other = write(d.path(), "other.gguf", &other.build());
    let out = d.path().join("mixed");
    super::convert::convert(&other, &out, Some(1), &mut |_| {}).unwrap_err();
    let report = convert(&out).unwrap();
    assert_eq!(report.resumed_layers, 0);
    assert!(disk_full::vault_files(&out) == want);
}

/// Every byte of a GGUF's header, metadata and tensor table flipped, one
/// at a time: each file is refused with an error naming it (or the memory
/// it would need), or it loads and runs; `smoe plan` and `inspect`'s
/// reading of it end either way. A flipped `block_count` once aborted
/// here, allocating a per-layer table of 2^33 entries before the config
/// was validated, and a flipped `expert_count` took the planner past all
/// memory listing every expert's tensors.
#[test]
fn every_flipped_header_byte_is_refused_or_runs() {
    let d = tempfile::tempdir().unwrap();
    let (_, b) = from_fixture("qwen3-moe-a", GgmlType::Q8_0);
    let good = b.build();
    let end = Gguf::open(&write(d.path(), "good.gguf", &good))
        .unwrap()
        .shards()[0]
        .data_offset();
    let q4k = crate::kernels::DType::Quant(QuantType::Q4K);
    for at in 0..end as usize {
        let mut bytes = good.clone();
        bytes[at] ^= 0xff;
        let path = write(d.path(), "flipped.gguf", &bytes);
        let _ = crate::plan::sizes_of(&path, q4k, q4k);
        if let Ok(g) = Gguf::open(&path) {
            let _ = g.describe();
        }
        match Engine::load_with(&path, &opts()) {
            Ok(engine) => {
                all_logits(&engine, &[1, 2, 3]);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("flipped.gguf") || msg.contains("memory is smaller than"),
                    "byte {at}: {msg}"
                );
            }
        }
    }

    // The count itself, named.
    let (c, b) = from_fixture("qwen3-moe-a", GgmlType::Q8_0);
    let mut meta = metadata(&c);
    let n = meta
        .iter()
        .position(|(k, _)| k == "qwen3moe.block_count")
        .unwrap();
    meta[n].1 = Value::U64(1 << 60);
    let path = write(d.path(), "layers.gguf", &b.with_metadata(meta).build());
    let err = load_err(&path);
    assert!(
        err.contains("layers.gguf")
            && err.contains("qwen3moe.block_count is 1152921504606846976, expected at most 4096"),
        "{err}"
    );
    let err = Gguf::open(&path)
        .unwrap()
        .describe()
        .unwrap_err()
        .to_string();
    assert!(err.contains("block_count"), "{err}");
}
