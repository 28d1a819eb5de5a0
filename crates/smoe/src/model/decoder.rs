//! The decoder stack every supported family shares: embedding, then per
//! layer RMSNorm, attention, residual, RMSNorm, MLP (dense or sparse),
//! residual; final RMSNorm and the LM head (or the tied embedding table).
//! A family contributes only how one layer's attention and MLP are built
//! from its tensors ([`LayerFn`]).

use std::sync::Arc;

use crate::checkpoint::{TensorSource, Weight};
use crate::compute::{self, Backend, Rope};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;

use super::blocks::{
    norm, sized, Attention, Embedding, Experts, Ffn, LatentAttention, Moe, NextLayer, Scratch,
    SeqRows, EMBED,
};
use super::check_input;
use super::{CausalLm, Logits, Session, Step};

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
        seqs: &mut [SeqRows<'_>],
        s: &mut Scratch,
    ) {
        match self {
            Attn::Grouped(a) => a.forward(be, layer, h, t, seqs, s),
            Attn::Latent(a) => a.forward(be, layer, h, t, seqs, s),
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
pub(super) struct Layer {
    pub(super) input_norm: Vec<f32>,
    pub(super) attn: Attn,
    pub(super) post_norm: Vec<f32>,
    pub(super) mlp: Mlp,
}

#[derive(Debug)]
pub struct Decoder {
    pub(super) cfg: ModelConfig,
    pub(super) embed: Embedding,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Vec<f32>,
    pub(super) lm_head: Weight,
    pub(super) rope: Rope,
    /// Where every tensor op runs.
    pub(super) backend: Box<dyn Backend>,
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
        let t = ids.len();
        check_input(&self.cfg, ids, session.kv.len())?;
        let Session {
            kv,
            scratch,
            logits: out,
            ..
        } = session;
        let mut seqs = [SeqRows {
            kv,
            start: 0,
            len: t,
        }];
        self.rows(ids, &mut seqs, scratch)?;
        let rows = match logits {
            Logits::Last => t - 1..t,
            Logits::All => 0..t,
        };
        Ok(self.head(scratch, rows, out))
    }

    fn forward_batch(&self, steps: &mut [Step<'_>], s: &mut Scratch) -> Result<()> {
        let mut ids = std::mem::take(&mut s.ids);
        ids.clear();
        // The last row of each sequence that asks for logits, in order.
        let mut last = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            check_input(&self.cfg, step.ids, step.session.kv.len())?;
            ids.extend_from_slice(step.ids);
            if step.logits {
                last.push(ids.len() - 1);
            }
        }
        let mut start = 0;
        let mut seqs: Vec<SeqRows<'_>> = steps
            .iter_mut()
            .map(|step| {
                let seq = SeqRows {
                    kv: &mut step.session.kv,
                    start,
                    len: step.ids.len(),
                };
                start += seq.len;
                seq
            })
            .collect();
        let ran = self.rows(&ids, &mut seqs, s);
        s.ids = ids;
        ran?;
        drop(seqs);
        let mut all = std::mem::take(&mut s.logits);
        let vocab = self.cfg.vocab_size;
        let rows = self.head(s, last.into_iter(), &mut all);
        let wanted = steps.iter_mut().filter(|step| step.logits);
        for (step, row) in wanted.zip(rows.chunks_exact(vocab)) {
            step.session.logits.clear();
            step.session.logits.extend_from_slice(row);
        }
        s.logits = all;
        Ok(())
    }
}

impl Decoder {
    /// Every layer over the rows of `seqs` (ids `ids`, sequence after
    /// sequence), leaving the last hidden states in `s.x` and each
    /// sequence's keys and values in its cache.
    fn rows(&self, ids: &[u32], seqs: &mut [SeqRows<'_>], s: &mut Scratch) -> Result<()> {
        let (t, h) = (ids.len(), self.cfg.hidden_size);
        let be = &*self.backend;
        let eps = self.cfg.rms_norm_eps;
        #[cfg(feature = "cuda")]
        if seqs.iter().any(|s| s.kv.is_on_device()) {
            return Err(crate::Error::invalid(
                "a session made by a CUDA model was given to the CPU one",
            ));
        }

        // A sequence of more than one row is a prompt (decoding gives one).
        let prompt = seqs.iter().any(|q| q.len > 1);
        let x = sized(&mut s.x, t * h);
        be.embed(&self.embed, ids, x)?;
        s.cos.clear();
        s.sin.clear();
        for seq in seqs.iter() {
            let pos0 = seq.kv.len();
            be.rope_tables(
                &self.rope,
                pos0..pos0 + seq.len,
                &mut s.seq_cos,
                &mut s.seq_sin,
            );
            s.cos.extend_from_slice(&s.seq_cos);
            s.sin.extend_from_slice(&s.seq_sin);
        }

        for (i, layer) in self.layers.iter().enumerate() {
            let mut hbuf = std::mem::take(&mut s.h);
            let hn = sized(&mut hbuf, t * h);
            be.rms_norm_rows(&s.x, &layer.input_norm, eps, hn);
            layer.attn.forward(be, i, hn, t, seqs, s);
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
                                prompt,
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
        for seq in seqs.iter_mut() {
            seq.kv.advance(seq.len);
        }
        Ok(())
    }

    /// Logits of rows `rows` of `s.x` into `out`, `[rows, vocab]`.
    fn head<'o>(
        &self,
        s: &mut Scratch,
        rows: impl Iterator<Item = usize>,
        out: &'o mut Vec<f32>,
    ) -> &'o mut [f32] {
        let h = self.cfg.hidden_size;
        let be = &*self.backend;
        s.attn.clear();
        for r in rows {
            s.attn.extend_from_slice(&s.x[r * h..(r + 1) * h]);
        }
        let n = s.attn.len() / h;
        let hn = sized(&mut s.h, n * h);
        be.rms_norm_rows(&s.attn, &self.norm, self.cfg.rms_norm_eps, hn);
        let out = sized(out, n * self.cfg.vocab_size);
        be.matmul(hn, n, self.lm_head.matrix(), out);
        out
    }
}
