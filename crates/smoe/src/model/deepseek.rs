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

use crate::checkpoint::TensorSource;
use crate::config::{ModelConfig, RopeScaling, Scoring, Yarn};
use crate::error::{Error, Result};

use super::blocks::{norm, LatentAttention, Linear, QueryProj, SharedExpert};
use super::decoder::{Attn, Mlp, Source};

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
