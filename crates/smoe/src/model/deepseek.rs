//! DeepSeek-V2/V2-Lite (`DeepseekV2ForCausalLM`) and DeepSeek-V3, Moonlight
//! and Kimi-K2 (`DeepseekV3ForCausalLM`).
//!
//! Multi-head latent attention with interleaved RoPE (YaRN in published
//! configs) and a cache of the compressed latent; the first
//! `first_k_dense_replace` layers are dense, the others route
//! `n_routed_experts` under `mlp.experts.E.{gate,up,down}_proj` and add
//! `n_shared_experts` always-on experts (`mlp.shared_experts`, one MLP of
//! their combined width). The two generations differ only in routing,
//! which the config describes: V2 softmax with greedy or group-limited
//! greedy choice, V3 sigmoid with `e_score_correction_bias` and
//! group-limited top-k; both scaled by `routed_scaling_factor`.

use serde_json::{json, Map, Value};

use crate::checkpoint::TensorSource;
use crate::config::{GroupLimit, Keys, Mla, ModelConfig, RopeScaling, Routing, Scoring, Yarn};
use crate::error::{Error, Result};
use crate::gguf::config::ArchKeys;

use super::blocks::{norm, LatentAttention, Linear, QueryProj, SharedExpert};
use super::decoder::{Attn, Mlp, Source};
use super::family::{ExpertNames, Family, GgufArch};

pub static V2: Family = Family {
    name: "DeepseekV2",
    model_types: &["deepseek_v2"],
    config: config_v2,
    experts: ExpertNames::MLP,
    attention_note: "",
    shared_note: "",
    layer,
    extra_layers: false,
    gguf: Some(GGUF),
};

pub static V3: Family = Family {
    name: "DeepseekV3",
    // Kimi-K2 ships DeepSeek-V3's architecture under its own name.
    model_types: &["deepseek_v3", "kimi_k2"],
    config: config_v3,
    experts: ExpertNames::MLP,
    attention_note: "",
    shared_note: "",
    layer,
    extra_layers: true,
    gguf: Some(GGUF),
};

/// Both generations are llama.cpp's `deepseek2`; the gating function tells
/// them apart.
const GGUF: GgufArch = GgufArch {
    arch: "deepseek2",
    config: gguf_config,
    permute_qk: false,
};

/// llama.cpp's `expert_gating_func` for sigmoid scores (V3).
const GATING_SIGMOID: usize = 2;

/// The latent attention's sizes, the experts, the routing and YaRN, from
/// `deepseek2.*`. Files converted since llama.cpp stores MLA absorbed keep
/// `head_count_kv` 1 and `key_length`/`value_length` of the latent, with the
/// per-head sizes in `*_mla`; older ones have the per-head sizes in the
/// plain keys. Not stored, so as llama.cpp hard-codes them: YaRN's
/// `mscale` equal to `mscale_all_dim` (as in every release), V2's greedy
/// top-k without renormalising, V3's `noaux_tc`.
fn gguf_config(k: &ArchKeys<'_>, c: &mut Map<String, Value>) -> Result<()> {
    let rope = k.usize("rope.dimension_count")?;
    let key = match k.opt_usize("attention.key_length_mla")? {
        Some(n) => n,
        None => k.usize("attention.key_length")?,
    };
    let value = match k.opt_usize("attention.value_length_mla")? {
        Some(n) => n,
        None => k.usize("attention.value_length")?,
    };
    if key <= rope {
        return Err(k.err(
            "attention.key_length",
            format!("{key} leaves no room beside the rotary part ({rope})"),
        ));
    }
    c.remove("head_dim");
    c.insert(
        "num_key_value_heads".into(),
        c["num_attention_heads"].clone(),
    );
    c.insert("qk_rope_head_dim".into(), json!(rope));
    c.insert("qk_nope_head_dim".into(), json!(key - rope));
    c.insert("v_head_dim".into(), json!(value));
    c.insert(
        "kv_lora_rank".into(),
        json!(k.usize("attention.kv_lora_rank")?),
    );
    let q_rank = k.opt_usize("attention.q_lora_rank")?.filter(|&r| r > 0);
    c.insert("q_lora_rank".into(), json!(q_rank));
    c.insert("n_routed_experts".into(), c["num_experts"].clone());
    c.insert(
        "n_shared_experts".into(),
        json!(k.opt_usize("expert_shared_count")?.unwrap_or(0)),
    );
    c.insert(
        "first_k_dense_replace".into(),
        json!(k.opt_usize("leading_dense_block_count")?.unwrap_or(0)),
    );
    c.insert(
        "routed_scaling_factor".into(),
        json!(k.opt_f64("expert_weights_scale")?.unwrap_or(1.0)),
    );
    let groups = k.opt_usize("expert_group_count")?.unwrap_or(1);
    c.insert("n_group".into(), json!(groups));
    c.insert(
        "topk_group".into(),
        json!(k.opt_usize("expert_group_used_count")?.unwrap_or(1)),
    );
    if k.opt_usize("expert_gating_func")? == Some(GATING_SIGMOID) {
        c.insert("model_type".into(), json!(V3.model_types[0]));
        c.insert("scoring_func".into(), json!("sigmoid"));
        c.insert("topk_method".into(), json!("noaux_tc"));
        c.insert(
            "norm_topk_prob".into(),
            json!(k.opt_bool("expert_weights_norm")?.unwrap_or(false)),
        );
    } else {
        c.insert("model_type".into(), json!(V2.model_types[0]));
        c.insert("scoring_func".into(), json!("softmax"));
        let method = if groups > 1 {
            "group_limited_greedy"
        } else {
            "greedy"
        };
        c.insert("topk_method".into(), json!(method));
    }
    if let Some(kind) = k.opt_str("rope.scaling.type")? {
        if kind != "yarn" {
            return Err(k.err(
                "rope.scaling.type",
                format!("\"{kind}\" is not supported for deepseek2 (only yarn)"),
            ));
        }
        let mut yarn = Map::new();
        yarn.insert("type".into(), json!("yarn"));
        let factor = k
            .opt_f64("rope.scaling.factor")?
            .ok_or_else(|| k.err("rope.scaling.factor", "missing for yarn"))?;
        yarn.insert("factor".into(), json!(factor));
        yarn.insert(
            "original_max_position_embeddings".into(),
            json!(k.usize("rope.scaling.original_context_length")?),
        );
        // llama.cpp stores `0.1 * mscale_all_dim` as the log multiplier.
        if let Some(m) = k.opt_f64("rope.scaling.yarn_log_multiplier")? {
            let all = m / 0.1;
            yarn.insert("mscale".into(), json!(all));
            yarn.insert("mscale_all_dim".into(), json!(all));
        }
        c.insert("rope_scaling".into(), Value::Object(yarn));
    }
    Ok(())
}

/// What both generations share: the latent attention's dimensions, the
/// experts' spelling, shared experts, biases.
fn config_common(keys: &Keys<'_>, c: &mut ModelConfig) -> Result<()> {
    let m = Mla {
        q_lora_rank: keys.opt_dim("q_lora_rank")?,
        kv_lora_rank: keys.dim("kv_lora_rank")?,
        qk_nope_head_dim: keys.dim("qk_nope_head_dim")?,
        qk_rope_head_dim: keys.dim("qk_rope_head_dim")?,
        v_head_dim: keys.dim("v_head_dim")?,
    };
    c.mla = Some(m);
    // DeepSeek's `head_dim`, where present, is the rotary part only.
    c.head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim;
    c.num_experts = keys.num_experts("n_routed_experts")?;
    c.moe_intermediate_size = keys.dim("moe_intermediate_size")?;
    c.shared_expert_intermediate_size =
        keys.opt_dim("n_shared_experts")?.unwrap_or(0) * c.moe_intermediate_size;
    if let Some(f) = keys.opt_usize("moe_layer_freq")?.filter(|&f| f != 1) {
        return Err(keys.err(format!(
            "moe_layer_freq {f} is not supported (only 1, as in every published DeepSeek model)"
        )));
    }
    c.attention_bias = keys.opt_bool("attention_bias")?.unwrap_or(false);
    c.o_bias = c.attention_bias;
    Ok(())
}

fn group_limit(keys: &Keys<'_>) -> Result<Option<GroupLimit>> {
    Ok(Some(GroupLimit {
        n_group: keys.opt_usize("n_group")?.unwrap_or(1),
        topk_group: keys.opt_usize("topk_group")?.unwrap_or(1),
    }))
}

fn scale(keys: &Keys<'_>) -> Result<f32> {
    Ok(keys.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32)
}

/// Softmax routing, greedy or group-limited greedy. transformers'
/// DeepSeek-V2 never renormalises; its published configs all say
/// norm_topk_prob false anyway.
fn config_v2(keys: &Keys<'_>, c: &mut ModelConfig) -> Result<()> {
    config_common(keys, c)?;
    keys.expect("scoring_func", "softmax", "deepseek_v2")?;
    let groups = match keys.present("topk_method").and_then(Value::as_str) {
        None | Some("greedy") => None,
        Some("group_limited_greedy") => group_limit(keys)?,
        Some(other) => {
            return Err(keys.err(format!(
                "topk_method \"{other}\" is not supported for deepseek_v2 (greedy, group_limited_greedy)"
            )))
        }
    };
    c.routing = Routing {
        groups,
        scale: scale(keys)?,
        ..Routing::softmax(c.num_experts_per_tok, false)
    };
    c.rope_interleave = true;
    Ok(())
}

/// Sigmoid scores with a correction bias, `noaux_tc` group-limited top-k.
fn config_v3(keys: &Keys<'_>, c: &mut ModelConfig) -> Result<()> {
    config_common(keys, c)?;
    keys.expect("scoring_func", "sigmoid", "deepseek_v3")?;
    keys.expect("topk_method", "noaux_tc", "deepseek_v3")?;
    c.routing = Routing {
        top_k: c.num_experts_per_tok,
        scoring: Scoring::Sigmoid,
        groups: group_limit(keys)?,
        norm_topk_prob: keys.opt_bool("norm_topk_prob")?.unwrap_or(true),
        scale: scale(keys)?,
    };
    c.rope_interleave = keys.opt_bool("rope_interleave")?.unwrap_or(true);
    Ok(())
}

pub fn layer(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)> {
    let (ckpt, c) = (src.ckpt, src.cfg);
    let p = format!("model.layers.{i}");
    let attn = attention(ckpt, c, &format!("{p}.self_attn"))?;
    let mlp = if c.is_moe_layer(i) {
        let mut moe = src.sparse(i, &format!("{p}.mlp"))?;
        if c.routing.scoring == Scoring::Sigmoid {
            let bias = format!("{p}.mlp.gate.e_score_correction_bias");
            moe.score_bias = Some(ckpt.tensor(&bias, &[c.num_experts])?.to_f32());
        }
        if c.shared_expert_intermediate_size > 0 {
            let prefix = format!("{p}.mlp.shared_experts");
            moe.shared = Some(SharedExpert::load(ckpt, c, &prefix, None)?);
        }
        Mlp::Sparse(moe)
    } else {
        src.dense(&format!("{p}.mlp"))?
    };
    Ok((Attn::Latent(attn), mlp))
}

fn attention(ckpt: &dyn TensorSource, c: &ModelConfig, a: &str) -> Result<LatentAttention> {
    let m = c
        .mla
        .ok_or_else(|| Error::invalid("DeepSeek config without MLA dimensions"))?;
    let (h, nh) = (c.hidden_size, c.num_attention_heads);
    let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    let bias = c.attention_bias;
    let q = match m.q_lora_rank {
        None => QueryProj::Full(Linear::load(
            ckpt,
            &format!("{a}.q_proj"),
            nh * qk,
            h,
            false,
        )?),
        Some(r) => QueryProj::LowRank {
            a: Linear::load(ckpt, &format!("{a}.q_a_proj"), r, h, bias)?,
            norm: norm(ckpt, &format!("{a}.q_a_layernorm.weight"), r)?,
            b: Linear::load(ckpt, &format!("{a}.q_b_proj"), nh * qk, r, false)?,
        },
    };
    let rank = m.kv_lora_rank;
    Ok(LatentAttention {
        q,
        kv_a: Linear::load(
            ckpt,
            &format!("{a}.kv_a_proj_with_mqa"),
            rank + m.qk_rope_head_dim,
            h,
            bias,
        )?,
        kv_norm: norm(ckpt, &format!("{a}.kv_a_layernorm.weight"), rank)?,
        kv_b: ckpt.tensor(
            &format!("{a}.kv_b_proj.weight"),
            &[nh * (m.qk_nope_head_dim + m.v_head_dim), rank],
        )?,
        o: Linear::load(ckpt, &format!("{a}.o_proj"), h, nh * m.v_head_dim, c.o_bias)?,
        n_heads: nh,
        nope: m.qk_nope_head_dim,
        rope: m.qk_rope_head_dim,
        v_dim: m.v_head_dim,
        rank,
        eps: c.rms_norm_eps,
        scale: softmax_scale(c, qk),
        interleave: c.rope_interleave,
    })
}

/// `1/sqrt(qk_head_dim)`, times `mscale(factor, mscale_all_dim)^2` under
/// YaRN: the softmax sharpening DeepSeek pairs with its context extension.
fn softmax_scale(c: &ModelConfig, qk: usize) -> f32 {
    let base = 1.0 / (qk as f64).sqrt();
    let m = match &c.rope_scaling {
        RopeScaling::Yarn(y) => match y.mscale_all_dim {
            Some(all) if all != 0.0 => Yarn::get_mscale(y.factor, all),
            _ => 1.0,
        },
        _ => 1.0,
    };
    (base * m * m) as f32
}
