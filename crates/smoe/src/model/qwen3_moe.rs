//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3-30B-A3B, Qwen3-235B-A22B.
//!
//! Per layer: RMSNorm, attention with per-head q/k RMSNorm and NeoX RoPE,
//! residual; RMSNorm, then either the routed-expert block or (for
//! `mlp_only_layers` and off-step layers) a dense SwiGLU MLP, residual.
//! Final RMSNorm and the LM head (or the tied embedding table).

use std::sync::Arc;

use crate::checkpoint::{TensorSource, Weight};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;
use crate::kernels::{self, matmul, Rope};

use super::blocks::{
    norm, sized, Attention, DiskRows, Embedding, Experts, Ffn, Linear, Moe, NextLayer, Routing,
};
use super::{check_input, CausalLm, KvCache, Logits, Session};

#[derive(Debug)]
enum Mlp {
    Dense(Ffn),
    Sparse(Moe),
}

#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    attn: Attention,
    post_norm: Vec<f32>,
    mlp: Mlp,
}

#[derive(Debug)]
pub struct Qwen3Moe {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Weight,
    rope: Rope,
}

impl Qwen3Moe {
    /// Builds the model from `ckpt`'s tensors. With a `cache`, routed
    /// experts stream through it instead of coming from `ckpt`; with
    /// `embed_rows`, the (untied) embedding table stays on disk.
    pub fn load(
        ckpt: &dyn TensorSource,
        c: &ModelConfig,
        cache: Option<&Arc<ExpertCache>>,
        embed_rows: Option<DiskRows>,
    ) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let table = ckpt.tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let (embed, lm_head) = match (c.tie_word_embeddings, embed_rows) {
            (true, _) => (Embedding::Mapped(table.clone()), table),
            (false, Some(rows)) => (
                Embedding::OnDisk(rows),
                ckpt.tensor("lm_head.weight", &[c.vocab_size, h])?,
            ),
            (false, None) => (
                Embedding::Mapped(table),
                ckpt.tensor("lm_head.weight", &[c.vocab_size, h])?,
            ),
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let bias = c.attention_bias;
            let attn = Attention {
                q: Linear::load(
                    ckpt,
                    &format!("{a}.q_proj"),
                    c.num_attention_heads * hd,
                    h,
                    bias,
                )?,
                k: Linear::load(
                    ckpt,
                    &format!("{a}.k_proj"),
                    c.num_key_value_heads * hd,
                    h,
                    bias,
                )?,
                v: Linear::load(
                    ckpt,
                    &format!("{a}.v_proj"),
                    c.num_key_value_heads * hd,
                    h,
                    bias,
                )?,
                o: Linear::load(
                    ckpt,
                    &format!("{a}.o_proj"),
                    h,
                    c.num_attention_heads * hd,
                    false,
                )?,
                q_norm: Some(norm(ckpt, &format!("{a}.q_norm.weight"), hd)?),
                k_norm: Some(norm(ckpt, &format!("{a}.k_norm.weight"), hd)?),
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: hd,
                eps: c.rms_norm_eps,
                window: c.sliding_window,
            };
            let mlp = if c.is_moe_layer(i) {
                let experts = match cache {
                    Some(cache) => Experts::Streamed {
                        cache: Arc::clone(cache),
                        layer: i,
                    },
                    None => Experts::Resident(
                        (0..c.num_experts)
                            .map(|e| {
                                let name = format!("{p}.mlp.experts.{e}");
                                Ffn::load(ckpt, &name, h, c.moe_intermediate_size)
                            })
                            .collect::<Result<_>>()?,
                    ),
                };
                Mlp::Sparse(Moe {
                    router: ckpt.tensor(&format!("{p}.mlp.gate.weight"), &[c.num_experts, h])?,
                    experts,
                    routing: Routing {
                        top_k: c.num_experts_per_tok,
                        norm_topk_prob: c.norm_topk_prob,
                    },
                })
            } else {
                Mlp::Dense(Ffn::load(
                    ckpt,
                    &format!("{p}.mlp"),
                    h,
                    c.intermediate_size,
                )?)
            };
            layers.push(Layer {
                input_norm: norm(ckpt, &format!("{p}.input_layernorm.weight"), h)?,
                attn,
                post_norm: norm(ckpt, &format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp,
            });
        }
        Ok(Self {
            cfg: c.clone(),
            embed,
            layers,
            norm: norm(ckpt, "model.norm.weight", h)?,
            lm_head,
            rope: Rope::new(hd, c.rope_theta, &c.rope_scaling),
        })
    }
}

impl CausalLm for Qwen3Moe {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn new_session(&self) -> Session {
        let width = self.cfg.num_key_value_heads * self.cfg.head_dim;
        Session::new(KvCache::new(self.cfg.num_hidden_layers, width))
    }

    fn forward<'s>(
        &self,
        ids: &[u32],
        session: &'s mut Session,
        logits: Logits,
    ) -> Result<&'s mut [f32]> {
        let (t, h) = (ids.len(), self.cfg.hidden_size);
        let pos0 = session.kv.len();
        check_input(&self.cfg, ids, pos0)?;
        let s = &mut session.scratch;
        let kv = &mut session.kv;

        let x = sized(&mut s.x, t * h);
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            self.embed.row(id, row)?;
        }
        self.rope.tables(pos0..pos0 + t, &mut s.cos, &mut s.sin);

        for (i, layer) in self.layers.iter().enumerate() {
            let mut hbuf = std::mem::take(&mut s.h);
            let hn = sized(&mut hbuf, t * h);
            kernels::rms_norm_rows(&s.x, &layer.input_norm, self.cfg.rms_norm_eps, hn);
            layer.attn.forward(i, hn, t, kv, s);
            kernels::add_in_place(&mut s.x, &s.out);

            kernels::rms_norm_rows(&s.x, &layer.post_norm, self.cfg.rms_norm_eps, hn);
            let mut out = std::mem::take(&mut s.out);
            let y = sized(&mut out, t * h);
            match &layer.mlp {
                Mlp::Dense(ffn) => ffn.forward(hn, t, y, s),
                Mlp::Sparse(moe) => {
                    let mut pred = std::mem::take(&mut s.predict);
                    let next = match self.layers.get(i + 1) {
                        Some(Layer {
                            mlp: Mlp::Sparse(next),
                            post_norm,
                            ..
                        }) if matches!(next.experts, Experts::Streamed { .. }) => {
                            next.predict(&s.x, t, post_norm, self.cfg.rms_norm_eps, &mut pred);
                            Some(NextLayer {
                                layer: i + 1,
                                experts: &pred.experts,
                            })
                        }
                        _ => None,
                    };
                    let done = moe.forward(hn, t, y, s, next);
                    s.predict = pred;
                    done?
                }
            }
            kernels::add_in_place(&mut s.x, y);
            s.out = out;
            s.h = hbuf;
        }
        kv.advance(t);

        let rows = match logits {
            Logits::Last => t - 1..t,
            Logits::All => 0..t,
        };
        let n = rows.len();
        let hn = sized(&mut s.h, n * h);
        kernels::rms_norm_rows(
            &s.x[rows.start * h..rows.end * h],
            &self.norm,
            self.cfg.rms_norm_eps,
            hn,
        );
        let out = sized(&mut session.logits, n * self.cfg.vocab_size);
        matmul(hn, n, self.lm_head.matrix(), out);
        Ok(out)
    }
}
