//! The decoder stack every supported family shares: embedding, then per
//! layer RMSNorm, attention, residual, RMSNorm, MLP (dense or sparse),
//! residual; final RMSNorm and the LM head (or the tied embedding table).
//! A family contributes only how one layer's attention and MLP are built
//! from its tensors ([`LayerFn`]).

use std::sync::Arc;

use crate::checkpoint::{TensorSource, Weight};
use crate::compute::{self, Backend, KvCache, Rope};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;

use super::blocks::{
    norm, sized, Attention, Embedding, Experts, Ffn, LatentAttention, Moe, NextLayer, Scratch,
    EMBED,
};
use super::check_input;
use super::{CausalLm, Logits, Session};

#[derive(Debug)]
pub enum Attn {
    Grouped(Attention),
    Latent(LatentAttention),
}

impl Attn {
    fn forward(
        &self,
        be: &dyn Backend,
        layer: usize,
        h: &[f32],
        t: usize,
        kv: &mut KvCache,
        s: &mut Scratch,
    ) {
        match self {
            Attn::Grouped(a) => a.forward(be, layer, h, t, kv, s),
            Attn::Latent(a) => a.forward(be, layer, h, t, kv, s),
        }
    }
}

#[derive(Debug)]
pub enum Mlp {
    Dense(Ffn),
    Sparse(Moe),
}

/// What a family builds its layers from: the tensors, the config, and
/// the expert cache when routed experts stream from a vault.
pub struct Source<'a> {
    pub ckpt: &'a dyn TensorSource,
    pub cfg: &'a ModelConfig,
    pub cache: Option<&'a Arc<ExpertCache>>,
}

impl Source<'_> {
    /// The routed-expert block most families share: router at
    /// `{prefix}.gate.weight`, experts by the family's names.
    pub fn sparse(&self, i: usize, prefix: &str) -> Result<Moe> {
        let c = self.cfg;
        Ok(Moe {
            router: self.ckpt.tensor(
                &format!("{prefix}.gate.weight"),
                &[c.num_experts, c.hidden_size],
            )?,
            score_bias: None,
            experts: Experts::load(self.ckpt, c, i, self.cache)?,
            routing: c.routing,
            shared: None,
        })
    }

    /// A dense SwiGLU MLP at `prefix`, `intermediate_size` wide.
    pub fn dense(&self, prefix: &str) -> Result<Mlp> {
        let c = self.cfg;
        Ok(Mlp::Dense(Ffn::load(
            self.ckpt,
            prefix,
            c.hidden_size,
            c.intermediate_size,
        )?))
    }
}

/// Builds layer `i`'s attention and MLP.
pub type LayerFn = fn(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)>;

#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    attn: Attn,
    post_norm: Vec<f32>,
    mlp: Mlp,
}

#[derive(Debug)]
pub struct Decoder {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Weight,
    rope: Rope,
    /// Where every tensor op runs.
    backend: Box<dyn Backend>,
}

impl Decoder {
    /// Builds the model from `ckpt`'s tensors. With a `cache`, routed
    /// experts stream through it instead of coming from `ckpt`; with
    /// `on_disk`, the (untied) embedding table is read from there.
    pub fn load(
        ckpt: &dyn TensorSource,
        c: &ModelConfig,
        cache: Option<&Arc<ExpertCache>>,
        on_disk: Option<Embedding>,
    ) -> Result<Self> {
        let layer = c.family.layer;
        let h = c.hidden_size;
        let table = ckpt.tensor(EMBED, &[c.vocab_size, h])?;
        let (embed, lm_head) = match (c.tie_word_embeddings, on_disk) {
            (true, _) => (Embedding::Mapped(table.clone()), table),
            (false, Some(rows)) => (rows, ckpt.tensor("lm_head.weight", &[c.vocab_size, h])?),
            (false, None) => (
                Embedding::Mapped(table),
                ckpt.tensor("lm_head.weight", &[c.vocab_size, h])?,
            ),
        };
        let src = Source {
            ckpt,
            cfg: c,
            cache,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (attn, mlp) = layer(&src, i)?;
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
            rope: Rope::new(c.rope_dim(), c.rope_theta, &c.rope_scaling),
            backend: compute::backend(),
        })
    }
}

impl CausalLm for Decoder {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn new_session(&self) -> Session {
        let c = &self.cfg;
        let be = &self.backend;
        let kv = match c.mla {
            Some(_) => be.kv_cache(c.num_hidden_layers, c.kv_floats_per_position(), 0),
            None => {
                let width = c.num_key_value_heads * c.head_dim;
                be.kv_cache(c.num_hidden_layers, width, width)
            }
        };
        Session::new(kv)
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
        let be = &*self.backend;
        let eps = self.cfg.rms_norm_eps;

        let x = sized(&mut s.x, t * h);
        be.embed(&self.embed, ids, x)?;
        be.rope_tables(&self.rope, pos0..pos0 + t, &mut s.cos, &mut s.sin);

        for (i, layer) in self.layers.iter().enumerate() {
            let mut hbuf = std::mem::take(&mut s.h);
            let hn = sized(&mut hbuf, t * h);
            be.rms_norm_rows(&s.x, &layer.input_norm, eps, hn);
            layer.attn.forward(be, i, hn, t, kv, s);
            be.add(&mut s.x, &s.out);

            be.rms_norm_rows(&s.x, &layer.post_norm, eps, hn);
            let mut out = std::mem::take(&mut s.out);
            let y = sized(&mut out, t * h);
            match &layer.mlp {
                Mlp::Dense(ffn) => ffn.forward(be, hn, t, y, s),
                Mlp::Sparse(moe) => {
                    let mut pred = std::mem::take(&mut s.predict);
                    let next = match self.layers.get(i + 1) {
                        Some(Layer {
                            mlp: Mlp::Sparse(next),
                            post_norm,
                            ..
                        }) if matches!(next.experts, Experts::Streamed { .. }) => {
                            next.predict(be, &s.x, t, post_norm, eps, &mut pred);
                            Some(NextLayer {
                                layer: i + 1,
                                experts: &pred.experts,
                            })
                        }
                        _ => None,
                    };
                    let done = moe.forward(be, hn, t, y, s, next);
                    s.predict = pred;
                    done?
                }
            }
            be.add(&mut s.x, y);
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
        be.rms_norm_rows(&s.x[rows.start * h..rows.end * h], &self.norm, eps, hn);
        let out = sized(&mut session.logits, n * self.cfg.vocab_size);
        be.matmul(hn, n, self.lm_head.matrix(), out);
        Ok(out)
    }
}
