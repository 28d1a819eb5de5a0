//! Building blocks shared by the architectures: grouped-query attention
//! (with the q/k norms, biases and clipping some families add), multi-head
//! latent attention, the SwiGLU MLP, the routers, and the routed-expert
//! block with its optional shared expert.
//! Each works on a batch of `t` tokens at once (row-major `[t, width]`), so
//! prefill is matrix-matrix and decode is the `t = 1` case of the same code.
//! They say what is computed and on which weights; every piece of tensor
//! work is a call on the [`Backend`] they are handed.

use std::sync::Arc;

pub use crate::config::{GroupLimit, Routing, Scoring};

use crate::checkpoint::{TensorSource, Weight};
use crate::compute::{AttnShape, Backend, KvCache, Matrix, MlaShape, RouteScratch};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;

pub(crate) use crate::compute::sized;

// Where the embedding table and its name live; model code names them here.
pub use crate::checkpoint::EMBED;
pub use crate::compute::Embedding;

/// Reusable activation buffers, grown on first use and then kept.
#[derive(Debug, Default)]
pub struct Scratch {
    pub(crate) x: Vec<f32>,
    pub(crate) h: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) attn: Vec<f32>,
    pub(crate) out: Vec<f32>,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    /// One sequence's RoPE tables, before they join the call's.
    pub(crate) seq_cos: Vec<f32>,
    pub(crate) seq_sin: Vec<f32>,
    /// A batch's ids, sequence after sequence, and its logits.
    pub(crate) ids: Vec<u32>,
    pub(crate) logits: Vec<f32>,
    pub(crate) predict: PredictScratch,
    ffn: FfnScratch,
    moe: MoeScratch,
    mla: MlaScratch,
}

#[derive(Debug, Default)]
struct FfnScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
}

#[derive(Debug, Default)]
struct MoeScratch {
    logits: Vec<f32>,
    /// Chosen (expert, weight) pairs, `top_k` per token.
    chosen: Vec<(u32, f32)>,
    /// Tokens grouped by expert: `order[start[e]..start[e + 1]]` are the
    /// indices into `chosen` routed to expert `e`.
    start: Vec<usize>,
    fill: Vec<usize>,
    order: Vec<usize>,
    xg: Vec<f32>,
    yg: Vec<f32>,
    /// Experts with at least one token, ascending.
    used: Vec<u32>,
    route: RouteScratch,
    shared_gate: Vec<f32>,
}

#[derive(Debug, Default)]
struct MlaScratch {
    /// Absorbed queries, head-major `[head][t][kv_lora_rank]`.
    absorbed: Vec<f32>,
    /// A widened `kv_b_proj` row per head.
    rows: Vec<f32>,
    /// One head's latent outputs `[t][kv_lora_rank]` and its values.
    latent: Vec<f32>,
    values: Vec<f32>,
}

/// One sequence's rows of a call, `start..start + len`, and its KV cache:
/// a call's rows may come from several sequences (batched decode), each
/// attending only over its own cache.
#[derive(Debug)]
pub struct SeqRows<'a> {
    pub kv: &'a mut KvCache,
    pub start: usize,
    pub len: usize,
}

impl SeqRows<'_> {
    /// This sequence's part of a `[t, width]` buffer.
    fn of<'b>(&self, x: &'b [f32], width: usize) -> &'b [f32] {
        &x[self.start * width..(self.start + self.len) * width]
    }

    fn of_mut<'b>(&self, x: &'b mut [f32], width: usize) -> &'b mut [f32] {
        &mut x[self.start * width..(self.start + self.len) * width]
    }
}

/// A `[out, in]` projection with an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn load(
        ckpt: &dyn TensorSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = ckpt.tensor(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(ckpt.tensor(&format!("{name}.bias"), &[out])?.to_f32())
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.shape[0]
    }

    pub fn forward(&self, be: &dyn Backend, x: &[f32], t: usize, y: &mut [f32]) {
        be.matmul(x, t, self.weight.matrix(), y);
        if let Some(b) = &self.bias {
            be.add_rows(y, b);
        }
    }
}

/// An RMSNorm weight, widened to f32 once at load: it is read for every
/// token and is tiny.
pub fn norm(ckpt: &dyn TensorSource, name: &str, dim: usize) -> Result<Vec<f32>> {
    Ok(ckpt.tensor(name, &[dim])?.to_f32())
}

/// Where a family puts RMSNorms on q and k, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One `head_dim` weight applied to every head (Qwen3).
    PerHead,
    /// One weight over the whole projection (OLMoE).
    Whole,
}

/// Multi-head attention with grouped KV heads, NeoX RoPE, optional q/k
/// RMSNorms (per head or over the whole projection), optional clipping of
/// q, k and v, and a KV cache.
#[derive(Debug)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// RMSNorm weights as wide as the rows they normalise: `head_dim` for
    /// a per-head norm, the whole projection otherwise.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub clip: Option<f32>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub window: Option<usize>,
}

impl Attention {
    /// `{prefix}.{q,k,v,o}_proj` (and `q_norm`/`k_norm`) with the config's
    /// shapes, biases and clipping.
    pub fn load(
        ckpt: &dyn TensorSource,
        c: &ModelConfig,
        prefix: &str,
        qk_norm: QkNorm,
    ) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let bias = c.attention_bias;
        let widths = match qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((hd, hd)),
            QkNorm::Whole => Some((nq, nkv)),
        };
        let (q_norm, k_norm) = match widths {
            None => (None, None),
            Some((q, k)) => (
                Some(norm(ckpt, &format!("{prefix}.q_norm.weight"), q)?),
                Some(norm(ckpt, &format!("{prefix}.k_norm.weight"), k)?),
            ),
        };
        Ok(Self {
            q: Linear::load(ckpt, &format!("{prefix}.q_proj"), nq, h, bias)?,
            k: Linear::load(ckpt, &format!("{prefix}.k_proj"), nkv, h, bias)?,
            v: Linear::load(ckpt, &format!("{prefix}.v_proj"), nkv, h, bias)?,
            o: Linear::load(ckpt, &format!("{prefix}.o_proj"), h, nq, c.o_bias)?,
            q_norm,
            k_norm,
            clip: c.clip_qkv,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: hd,
            eps: c.rms_norm_eps,
            window: c.sliding_window,
        })
    }

    /// `h` is the normed input `[t, hidden]` of the sequences `seqs`; the
    /// result `[t, hidden]` is written to `s.out`. RoPE tables for each
    /// row's position must be in `s.cos`/`s.sin`. Projections run over all
    /// rows at once, attention per sequence over its own cache.
    pub fn forward(
        &self,
        be: &dyn Backend,
        layer: usize,
        h: &[f32],
        t: usize,
        seqs: &mut [SeqRows<'_>],
        s: &mut Scratch,
    ) {
        let (hd, nq, nkv) = (
            self.head_dim,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let q = sized(&mut s.q, t * nq);
        let k = sized(&mut s.k, t * nkv);
        let v = sized(&mut s.v, t * nkv);
        self.q.forward(be, h, t, q);
        self.k.forward(be, h, t, k);
        self.v.forward(be, h, t, v);
        if let Some(w) = &self.q_norm {
            be.rms_norm(q, w.len(), w, self.eps);
        }
        if let Some(w) = &self.k_norm {
            be.rms_norm(k, w.len(), w, self.eps);
        }
        if let Some(c) = self.clip {
            be.clamp(q, c);
            be.clamp(k, c);
            be.clamp(v, c);
        }
        be.rope(q, t, hd, 0, &s.cos, &s.sin, false);
        be.rope(k, t, hd, 0, &s.cos, &s.sin, false);
        let attn = sized(&mut s.attn, t * nq);
        for seq in seqs.iter_mut() {
            let pos0 = seq.kv.len();
            let (k, v) = (seq.of(k, nkv), seq.of(v, nkv));
            be.kv_append(seq.kv, layer, k, v);
            let shape = AttnShape::grouped(self.n_heads, self.n_kv_heads, hd, pos0, self.window);
            be.attention(seq.of(q, nq), seq.kv, layer, shape, seq.of_mut(attn, nq));
        }
        let out = sized(&mut s.out, t * self.o.out_dim());
        self.o.forward(be, attn, t, out);
    }
}

/// How multi-head latent attention makes its queries.
#[derive(Debug)]
pub enum QueryProj {
    /// One projection (`q_lora_rank` null: DeepSeek-V2-Lite).
    Full(Linear),
    /// Down-projection, RMSNorm, up-projection.
    LowRank {
        a: Linear,
        norm: Vec<f32>,
        b: Linear,
    },
}

/// Multi-head latent attention (DeepSeek-V2/V3). Each position is cached as
/// its normed latent (`rank` wide) and one rotary key shared by all heads:
/// `rank + rope` floats instead of `2 * heads * head_dim`.
///
/// Keys and values are never expanded. Head `h`'s key is `W_k[h] c` followed
/// by `k_pe` and its value `W_v[h] c`, where `c` is the latent and `W_k`,
/// `W_v` are `kv_b_proj`'s rows, so the score's `q_nope . W_k[h] c` equals
/// `(W_k[h]^T q_nope) . c`: queries are absorbed into latent space once,
/// attention runs over the cached latents as one shared KV head, and each
/// head's latent output goes through `W_v[h]` at the end.
#[derive(Debug)]
pub struct LatentAttention {
    pub q: QueryProj,
    /// `[rank + rope, hidden]`: the latent and the rotary key.
    pub kv_a: Linear,
    pub kv_norm: Vec<f32>,
    /// `[heads * (nope + v), rank]`.
    pub kv_b: Weight,
    pub o: Linear,
    pub n_heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
    pub rank: usize,
    pub eps: f32,
    pub scale: f32,
    /// Rotary pairs are adjacent elements (DeepSeek's layout).
    pub interleave: bool,
}

impl LatentAttention {
    /// Same contract as [`Attention::forward`].
    pub fn forward(
        &self,
        be: &dyn Backend,
        layer: usize,
        h: &[f32],
        t: usize,
        seqs: &mut [SeqRows<'_>],
        s: &mut Scratch,
    ) {
        let (nh, nope, rope, rank) = (self.n_heads, self.nope, self.rope, self.rank);
        let qk = nope + rope;
        let q = sized(&mut s.q, t * nh * qk);
        match &self.q {
            QueryProj::Full(p) => p.forward(be, h, t, q),
            QueryProj::LowRank { a, norm, b } => {
                let qa = sized(&mut s.k, t * a.out_dim());
                a.forward(be, h, t, qa);
                be.rms_norm(qa, norm.len(), norm, self.eps);
                b.forward(be, qa, t, q);
            }
        }
        let row = rank + rope;
        let latent = sized(&mut s.v, t * row);
        self.kv_a.forward(be, h, t, latent);
        be.rms_norm(latent, row, &self.kv_norm, self.eps);
        let (cos, sin, il) = (&s.cos, &s.sin, self.interleave);
        be.rope(latent, t, row, rank, cos, sin, il);
        be.rope(q, t, qk, nope, cos, sin, il);
        for seq in seqs.iter_mut() {
            let latent = seq.of(latent, row);
            be.kv_append(seq.kv, layer, latent, &[]);
        }

        // Absorb: query h becomes [W_k[h]^T q_nope | q_pe], width `row`.
        let kv_b = self.kv_b.matrix();
        let shape = MlaShape {
            n_heads: nh,
            nope,
            rope,
            v_dim: self.v_dim,
            rank,
        };
        let m = &mut s.mla;
        let qa = sized(&mut s.k, t * nh * row);
        be.mla_absorb(q, t, kv_b, shape, &mut m.absorbed, &mut m.rows, qa);
        let out_lat = sized(&mut s.attn, t * nh * rank);
        for seq in seqs.iter() {
            let attn_shape = AttnShape {
                n_heads: nh,
                n_kv_heads: 1,
                head_dim: row,
                v_dim: rank,
                k_stride: row,
                v_stride: row,
                scale: self.scale,
                pos0: seq.kv.len(),
                window: None,
            };
            let (q, out) = (seq.of(qa, nh * row), seq.of_mut(out_lat, nh * rank));
            be.attention(q, seq.kv, layer, attn_shape, out);
        }

        // Each head's latent output through its value rows.
        let attn = sized(&mut s.q, t * nh * self.v_dim);
        be.mla_values(out_lat, t, kv_b, shape, &mut m.latent, &mut m.values, attn);
        let out = sized(&mut s.out, t * self.o.out_dim());
        self.o.forward(be, attn, t, out);
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Ffn {
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
}

impl Ffn {
    /// `{prefix}.gate_proj.weight` etc. with the given widths.
    pub fn load(
        ckpt: &dyn TensorSource,
        prefix: &str,
        hidden: usize,
        inter: usize,
    ) -> Result<Self> {
        let names = ["gate_proj", "up_proj", "down_proj"].map(|p| format!("{prefix}.{p}.weight"));
        Self::load_named(ckpt, &names, hidden, inter)
    }

    /// Gate, up and down projections under the given names.
    pub fn load_named(
        ckpt: &dyn TensorSource,
        [gate, up, down]: &[String; 3],
        hidden: usize,
        inter: usize,
    ) -> Result<Self> {
        Ok(Self {
            gate: ckpt.tensor(gate, &[inter, hidden])?,
            up: ckpt.tensor(up, &[inter, hidden])?,
            down: ckpt.tensor(down, &[hidden, inter])?,
        })
    }

    /// `x` is `[t, hidden]`, the result goes to `y` `[t, hidden]`.
    pub fn forward(&self, be: &dyn Backend, x: &[f32], t: usize, y: &mut [f32], s: &mut Scratch) {
        self.run(be, x, t, y, &mut s.ffn);
    }

    fn run(&self, be: &dyn Backend, x: &[f32], t: usize, y: &mut [f32], s: &mut FfnScratch) {
        be.swiglu(self.matrices(), x, t, y, &mut s.gate, &mut s.up);
    }

    /// Gate, up and down.
    fn matrices(&self) -> [Matrix<'_>; 3] {
        [self.gate.matrix(), self.up.matrix(), self.down.matrix()]
    }
}

/// Where a sparse layer's experts come from.
pub enum Experts {
    /// All in memory (a checkpoint's mapped tensors).
    Resident(Vec<Ffn>),
    /// In a vault, read into the expert cache on demand.
    Streamed {
        cache: Arc<ExpertCache>,
        layer: usize,
    },
}

impl std::fmt::Debug for Experts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Experts::Resident(e) => write!(f, "Resident({} experts)", e.len()),
            Experts::Streamed { layer, .. } => write!(f, "Streamed(layer {layer})"),
        }
    }
}

impl Experts {
    /// Layer `layer`'s routed experts: streamed through `cache` when there
    /// is one, else mapped from `ckpt` under the family's names.
    pub fn load(
        ckpt: &dyn TensorSource,
        c: &ModelConfig,
        layer: usize,
        cache: Option<&Arc<ExpertCache>>,
    ) -> Result<Self> {
        Ok(match cache {
            Some(cache) => Experts::Streamed {
                cache: Arc::clone(cache),
                layer,
            },
            None => Experts::Resident(
                (0..c.num_experts)
                    .map(|e| {
                        let names = c.family.expert_tensor_names(layer, e);
                        Ffn::load_named(ckpt, &names, c.hidden_size, c.moe_intermediate_size)
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

/// An always-on expert beside the routed ones: resident, part of the
/// backbone. Qwen2-MoE scales it by `sigmoid(gate . x)`.
#[derive(Debug)]
pub struct SharedExpert {
    pub ffn: Ffn,
    /// `[1, hidden]`.
    pub gate: Option<Weight>,
}

impl SharedExpert {
    /// `prefix.{gate,up,down}_proj`, `shared_expert_intermediate_size`
    /// wide, with the gate vector `gate` when named.
    pub fn load(
        ckpt: &dyn TensorSource,
        c: &ModelConfig,
        prefix: &str,
        gate: Option<&str>,
    ) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            ffn: Ffn::load(ckpt, prefix, h, c.shared_expert_intermediate_size)?,
            gate: gate.map(|g| ckpt.tensor(g, &[1, h])).transpose()?,
        })
    }
}

/// A sparse block: a linear router over all experts, routing in f32
/// ([`route`]), each chosen expert's SwiGLU output weighted and summed,
/// plus the shared expert's output when there is one.
#[derive(Debug)]
pub struct Moe {
    pub router: Weight,
    /// Per-expert bias added to the scores for the choice only
    /// (DeepSeek-V3's `e_score_correction_bias`).
    pub score_bias: Option<Vec<f32>>,
    pub experts: Experts,
    pub routing: Routing,
    pub shared: Option<SharedExpert>,
}

impl Moe {
    /// `x` is `[t, hidden]`; the weighted sum goes to `y` `[t, hidden]`.
    ///
    /// Tokens are grouped by expert so that each chosen expert runs once per
    /// call as a matrix-matrix product over all of its tokens, which is what
    /// makes batched prefill cheap and lets the streaming cache read each
    /// chosen expert once per call however many tokens chose it.
    ///
    /// With `next`, the predicted experts of the next sparse layer are
    /// handed to the cache right after this layer's demand reads are queued,
    /// so they load while this layer computes.
    pub fn forward(
        &self,
        be: &dyn Backend,
        x: &[f32],
        t: usize,
        y: &mut [f32],
        s: &mut Scratch,
        next: Option<NextLayer<'_>>,
    ) -> Result<()> {
        let hidden = self.router.shape[1];
        let n_exp = self.router.shape[0];
        let m = &mut s.moe;
        self.route_tokens(be, x, t, &mut m.logits, &mut m.route, &mut m.chosen);

        let mut used = std::mem::take(&mut m.used);
        group_by_expert(
            &m.chosen,
            n_exp,
            &mut m.start,
            &mut m.order,
            &mut m.fill,
            &mut used,
        );

        // Every (token, slot) row in expert order, so that each expert's
        // tokens are one contiguous block of `xs` and of its outputs `ys`.
        let k = self.routing.top_k;
        let xs = sized(&mut m.xg, m.order.len() * hidden);
        be.gather(x, hidden, &m.order, k, xs);
        let ys = sized(&mut m.yg, m.order.len() * hidden);
        match &self.experts {
            Experts::Resident(experts) => {
                let expert = |i: usize| (used[i], experts[used[i] as usize].matrices());
                be.experts(used.len(), &expert, &m.start, xs, ys);
            }
            Experts::Streamed { cache, layer } => {
                // A prefill chunk may route to more experts than the cache
                // holds: take them in groups that fit, all reads of a group
                // in flight together.
                let mut next = next;
                for group in used.chunks(cache.capacity()) {
                    let mut pinned = cache.request(*layer, group)?;
                    if let Some(n) = next.take() {
                        cache.prefetch(n.layer, n.experts, n.prompt);
                    }
                    // The resident experts run while the misses arrive;
                    // each expert writes its own rows, so the order does
                    // not change a result.
                    let ready = pinned.resident_first();
                    if ready > 0 {
                        be.experts(ready, &|i| pinned.get(i), &m.start, xs, ys);
                    }
                    pinned.wait()?;
                    if ready < pinned.len() {
                        let rest = pinned.len() - ready;
                        be.experts(rest, &|i| pinned.get(ready + i), &m.start, xs, ys);
                    }
                }
            }
        }
        be.scatter(ys, &m.order, &m.chosen, k, y);
        m.used = used;
        if let Some(shared) = &self.shared {
            let ys = sized(&mut m.yg, t * hidden);
            shared.ffn.run(be, x, t, ys, &mut s.ffn);
            match &shared.gate {
                Some(gate) => {
                    let g = sized(&mut m.shared_gate, t);
                    be.matmul(x, t, gate.matrix(), g);
                    be.gated_add(y, ys, g);
                }
                None => be.add(y, ys),
            }
        }
        Ok(())
    }
}

/// Counting sort of a call's (token, slot) pairs by expert: expert `e`'s
/// rows are `start[e]..start[e + 1]`, `order[row]` is the index in `chosen`
/// of the pair that row holds, `used` the experts with any rows, in order.
/// `fill` is scratch. Every id in `chosen` must be below `n_exp`.
pub(super) fn group_by_expert(
    chosen: &[(u32, f32)],
    n_exp: usize,
    start: &mut Vec<usize>,
    order: &mut Vec<usize>,
    fill: &mut Vec<usize>,
    used: &mut Vec<u32>,
) {
    start.clear();
    start.resize(n_exp + 1, 0);
    for &(e, _) in chosen {
        start[e as usize + 1] += 1;
    }
    for e in 0..n_exp {
        start[e + 1] += start[e];
    }
    order.resize(chosen.len(), 0);
    fill.clear();
    fill.extend_from_slice(start);
    for (i, &(e, _)) in chosen.iter().enumerate() {
        order[fill[e as usize]] = i;
        fill[e as usize] += 1;
    }
    used.clear();
    used.extend((0..n_exp as u32).filter(|&e| start[e as usize + 1] > start[e as usize]));
}

impl Moe {
    /// The one routing step of a sparse layer, for its own tokens and for
    /// predictions alike: router logits of `x` `[t, hidden]`, then each
    /// token's `top_k` (expert, weight) pairs in `chosen`.
    fn route_tokens(
        &self,
        be: &dyn Backend,
        x: &[f32],
        t: usize,
        logits: &mut Vec<f32>,
        scratch: &mut RouteScratch,
        chosen: &mut Vec<(u32, f32)>,
    ) {
        let bias = self.score_bias.as_deref();
        let router = self.router.matrix();
        be.route(x, t, router, &self.routing, bias, logits, scratch, chosen);
    }
}

/// The next sparse layer's predicted experts, most likely first.
#[derive(Debug, Clone, Copy)]
pub struct NextLayer<'a> {
    pub layer: usize,
    pub experts: &'a [u32],
    /// The pass processes prompt tokens (for [`crate::experts::ReadAhead`]).
    pub prompt: bool,
}

/// Buffers for predicting a later layer's experts.
#[derive(Debug, Default)]
pub struct PredictScratch {
    h: Vec<f32>,
    logits: Vec<f32>,
    route: RouteScratch,
    chosen: Vec<(u32, f32)>,
    /// Per expert, the best weight any token gave it.
    best: Vec<f32>,
    pub(crate) experts: Vec<u32>,
}

impl Moe {
    /// Guesses this layer's experts from an earlier hidden state: `hidden`
    /// (the residual stream `[t, hidden]` as it is now), normed with this
    /// layer's own pre-MLP norm and put through this layer's router. The
    /// residual stream changes little from one layer to the next, which is
    /// why this recalls most of the real routing. The union over tokens is
    /// left in `s.experts`, ordered by the best router weight each got.
    pub fn predict(
        &self,
        be: &dyn Backend,
        hidden: &[f32],
        t: usize,
        norm: &[f32],
        eps: f32,
        s: &mut PredictScratch,
    ) {
        let hn = sized(&mut s.h, t * self.router.shape[1]);
        be.rms_norm_rows(hidden, norm, eps, hn);
        self.route_tokens(be, hn, t, &mut s.logits, &mut s.route, &mut s.chosen);
        // Each expert's best weight, then the chosen ones by it: linear in
        // a prefill chunk's thousands of (token, slot) pairs.
        s.best.clear();
        s.best.resize(self.router.shape[0], f32::NEG_INFINITY);
        for &(e, w) in &s.chosen {
            let b = &mut s.best[e as usize];
            *b = b.max(w);
        }
        s.experts.clear();
        s.experts
            .extend((0..s.best.len() as u32).filter(|&e| s.best[e as usize] > f32::NEG_INFINITY));
        s.experts.sort_by(|&a, &b| {
            s.best[b as usize]
                .total_cmp(&s.best[a as usize])
                .then(a.cmp(&b))
        });
    }
}
