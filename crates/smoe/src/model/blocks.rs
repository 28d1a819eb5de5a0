//! Building blocks shared by the architectures: grouped-query attention
//! (with the q/k norms, biases and clipping some families add), multi-head
//! latent attention, the SwiGLU MLP, the routers, and the routed-expert
//! block with its optional shared expert.
//! Each works on a batch of `t` tokens at once (row-major `[t, width]`), so
//! prefill is matrix-matrix and decode is the `t = 1` case of the same code.

use std::sync::Arc;

pub use crate::config::{GroupLimit, Routing, Scoring};

use crate::checkpoint::{TensorSource, Weight};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;
use crate::kernels::{self, matmul, AttnShape, Matrix, Product, Rope, SharedOut};

use super::KvCache;

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
    /// Where each of `chosen` went in `order`: its row of `xg` and `yg`.
    pos: Vec<usize>,
    xg: Vec<f32>,
    yg: Vec<f32>,
    /// The routed experts' intermediate activations, rows as in `xg`.
    gate: Vec<f32>,
    up: Vec<f32>,
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

/// Resizes a buffer to exactly `n` elements; within capacity this is free.
pub(crate) fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
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

    pub fn forward(&self, x: &[f32], t: usize, y: &mut [f32]) {
        matmul(x, t, self.weight.matrix(), y);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                kernels::add_in_place(row, b);
            }
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

    /// `h` is the normed input `[t, hidden]`; the result `[t, hidden]` is
    /// written to `s.out`. RoPE tables for the call's positions must be in
    /// `s.cos`/`s.sin`.
    pub fn forward(&self, layer: usize, h: &[f32], t: usize, kv: &mut KvCache, s: &mut Scratch) {
        let (hd, nq, nkv) = (
            self.head_dim,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let q = sized(&mut s.q, t * nq);
        let k = sized(&mut s.k, t * nkv);
        let v = sized(&mut s.v, t * nkv);
        self.q.forward(h, t, q);
        self.k.forward(h, t, k);
        self.v.forward(h, t, v);
        if let Some(w) = &self.q_norm {
            kernels::rms_norm(q, w, self.eps);
        }
        if let Some(w) = &self.k_norm {
            kernels::rms_norm(k, w, self.eps);
        }
        if let Some(c) = self.clip {
            for x in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *x = x.clamp(-c, c);
            }
        }
        let half = hd / 2;
        for tok in 0..t {
            let (c, sn) = (&s.cos[tok * half..][..half], &s.sin[tok * half..][..half]);
            Rope::apply(&mut q[tok * nq..][..nq], c, sn);
            Rope::apply(&mut k[tok * nkv..][..nkv], c, sn);
        }
        let pos0 = kv.len();
        kv.append(layer, k, v);
        let (keys, values) = kv.layer(layer);
        let attn = sized(&mut s.attn, t * nq);
        let shape = AttnShape::grouped(self.n_heads, self.n_kv_heads, hd, pos0, self.window);
        kernels::attention(q, keys, values, shape, attn);
        let out = sized(&mut s.out, t * self.o.out_dim());
        self.o.forward(attn, t, out);
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
    pub fn forward(&self, layer: usize, h: &[f32], t: usize, kv: &mut KvCache, s: &mut Scratch) {
        let (nh, nope, rope, rank) = (self.n_heads, self.nope, self.rope, self.rank);
        let qk = nope + rope;
        let q = sized(&mut s.q, t * nh * qk);
        match &self.q {
            QueryProj::Full(p) => p.forward(h, t, q),
            QueryProj::LowRank { a, norm, b } => {
                let qa = sized(&mut s.k, t * a.out_dim());
                a.forward(h, t, qa);
                kernels::rms_norm(qa, norm, self.eps);
                b.forward(qa, t, q);
            }
        }
        let row = rank + rope;
        let latent = sized(&mut s.v, t * row);
        self.kv_a.forward(h, t, latent);
        let half = rope / 2;
        let rotate = if self.interleave {
            Rope::apply_interleaved
        } else {
            Rope::apply
        };
        for tok in 0..t {
            let (c, sn) = (&s.cos[tok * half..][..half], &s.sin[tok * half..][..half]);
            let (lat, k_pe) = latent[tok * row..][..row].split_at_mut(rank);
            kernels::rms_norm(lat, &self.kv_norm, self.eps);
            rotate(k_pe, c, sn);
            for head in q[tok * nh * qk..][..nh * qk].chunks_exact_mut(qk) {
                rotate(&mut head[nope..], c, sn);
            }
        }
        let pos0 = kv.len();
        kv.append(layer, latent, &[]);
        let (cached, _) = kv.layer(layer);

        // Absorb: query h becomes [W_k[h]^T q_nope | q_pe], width `row`.
        let kv_b = self.kv_b.matrix();
        let m = &mut s.mla;
        let absorbed = sized(&mut m.absorbed, nh * t * rank);
        // One widened weight row per head, kept between calls.
        let rows = sized(&mut m.rows, nh * rank);
        let (absorbed_at, rows_at) = (
            SharedOut(absorbed.as_mut_ptr()),
            SharedOut(rows.as_mut_ptr()),
        );
        kernels::for_each_task(nh, |head| {
            // SAFETY: head `head` alone writes its slices of both buffers,
            // which hold `nh` of each.
            let (out, w) = unsafe {
                (
                    absorbed_at.slice(head * t * rank, t * rank),
                    rows_at.slice(head * rank, rank),
                )
            };
            out.fill(0.0);
            for i in 0..nope {
                kernels::widen(kv_b.dtype, kv_b.row(head * (nope + self.v_dim) + i), w);
                for tok in 0..t {
                    let qv = q[(tok * nh + head) * qk + i];
                    kernels::axpy(qv, w, &mut out[tok * rank..][..rank]);
                }
            }
        });
        let qa = sized(&mut s.k, t * nh * row);
        for tok in 0..t {
            for head in 0..nh {
                let dst = &mut qa[(tok * nh + head) * row..][..row];
                dst[..rank].copy_from_slice(&absorbed[(head * t + tok) * rank..][..rank]);
                dst[rank..].copy_from_slice(&q[(tok * nh + head) * qk + nope..][..rope]);
            }
        }
        let out_lat = sized(&mut s.attn, t * nh * rank);
        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: 1,
            head_dim: row,
            v_dim: rank,
            k_stride: row,
            v_stride: row,
            scale: self.scale,
            pos0,
            window: None,
        };
        kernels::attention(qa, cached, cached, shape, out_lat);

        // Each head's latent output through its value rows.
        let vd = self.v_dim;
        let attn = sized(&mut s.q, t * nh * vd);
        for head in 0..nh {
            let lat = sized(&mut m.latent, t * rank);
            for tok in 0..t {
                lat[tok * rank..][..rank]
                    .copy_from_slice(&out_lat[(tok * nh + head) * rank..][..rank]);
            }
            let first = head * (nope + vd) + nope;
            let vals = sized(&mut m.values, t * vd);
            matmul(lat, t, kv_b.rows(first..first + vd), vals);
            for tok in 0..t {
                attn[(tok * nh + head) * vd..][..vd].copy_from_slice(&vals[tok * vd..][..vd]);
            }
        }
        let out = sized(&mut s.out, t * self.o.out_dim());
        self.o.forward(attn, t, out);
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
    pub fn forward(&self, x: &[f32], t: usize, y: &mut [f32], s: &mut Scratch) {
        self.run(x, t, y, &mut s.ffn);
    }

    fn run(&self, x: &[f32], t: usize, y: &mut [f32], s: &mut FfnScratch) {
        swiglu(
            [self.gate.matrix(), self.up.matrix(), self.down.matrix()],
            x,
            t,
            y,
            s,
        );
    }
}

/// `down(silu(gate(x)) * up(x))` on `[gate, up, down]` matrices, wherever
/// they live (mapped checkpoint or cache slot).
fn swiglu(
    [gate_w, up_w, down_w]: [Matrix<'_>; 3],
    x: &[f32],
    t: usize,
    y: &mut [f32],
    s: &mut FfnScratch,
) {
    let inter = gate_w.rows;
    let gate = sized(&mut s.gate, t * inter);
    let up = sized(&mut s.up, t * inter);
    matmul(x, t, gate_w, gate);
    matmul(x, t, up_w, up);
    kernels::silu_mul(gate, up);
    matmul(gate, t, down_w, y);
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
                        let names = super::expert_tensor_names(c.architecture, layer, e);
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
    /// makes batched prefill cheap and what the streaming cache will need.
    ///
    /// With `next`, the predicted experts of the next sparse layer are
    /// handed to the cache right after this layer's demand reads are queued,
    /// so they load while this layer computes.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        y: &mut [f32],
        s: &mut Scratch,
        next: Option<NextLayer<'_>>,
    ) -> Result<()> {
        let hidden = self.router.shape[1];
        let n_exp = self.router.shape[0];
        let m = &mut s.moe;
        let logits = sized(&mut m.logits, t * n_exp);
        matmul(x, t, self.router.matrix(), logits);
        m.chosen.clear();
        for row in logits.chunks_exact_mut(n_exp) {
            route(
                row,
                &self.routing,
                self.score_bias.as_deref(),
                &mut m.route,
                &mut m.chosen,
            );
        }

        // Counting sort of (token, slot) pairs by expert.
        m.start.clear();
        m.start.resize(n_exp + 1, 0);
        for &(e, _) in &m.chosen {
            m.start[e as usize + 1] += 1;
        }
        for e in 0..n_exp {
            m.start[e + 1] += m.start[e];
        }
        m.order.resize(m.chosen.len(), 0);
        m.fill.clear();
        m.fill.extend_from_slice(&m.start);
        m.pos.resize(m.chosen.len(), 0);
        for (i, &(e, _)) in m.chosen.iter().enumerate() {
            m.order[m.fill[e as usize]] = i;
            m.pos[i] = m.fill[e as usize];
            m.fill[e as usize] += 1;
        }

        // Every (token, slot) row in expert order, so that each expert's
        // tokens are one contiguous block of `xs` and of its outputs `ys`.
        let k = self.routing.top_k;
        let xs = sized(&mut m.xg, m.order.len() * hidden);
        // Copies and sums over thousands of rows in a prefill chunk: on many
        // cores, one thread doing them costs a tenth of the layer.
        let rows_per_task = (16_384 / hidden).max(1);
        let (order, xs_out) = (&m.order, SharedOut(xs.as_mut_ptr()));
        kernels::for_each_task(order.len().div_ceil(rows_per_task), |c| {
            let end = ((c + 1) * rows_per_task).min(order.len());
            for (i, &slot) in order.iter().enumerate().take(end).skip(c * rows_per_task) {
                // SAFETY: row i belongs to this task only, inside `xs`.
                let row = unsafe { xs_out.slice(i * hidden, hidden) };
                row.copy_from_slice(&x[slot / k * hidden..][..hidden]);
            }
        });
        let ys = sized(&mut m.yg, m.order.len() * hidden);
        let mut used = std::mem::take(&mut m.used);
        used.clear();
        used.extend((0..n_exp as u32).filter(|&e| m.start[e as usize + 1] > m.start[e as usize]));
        {
            let (start, xs) = (&m.start, &*xs);
            let (gate, up) = (&mut m.gate, &mut m.up);
            // SAFETY (of each `routed_swiglu` below): `ys` holds a row of
            // `hidden` for every routed (token, slot) pair, and nothing else
            // uses it meanwhile.
            let ys = SharedOut(ys.as_mut_ptr());
            match &self.experts {
                Experts::Resident(experts) => {
                    let expert = |i: usize| {
                        let f = &experts[used[i] as usize];
                        (used[i], [f.gate.matrix(), f.up.matrix(), f.down.matrix()])
                    };
                    unsafe { routed_swiglu(used.len(), &expert, start, xs, hidden, gate, up, ys) }
                }
                Experts::Streamed { cache, layer } => {
                    // A prefill chunk may route to more experts than the
                    // cache holds: take them in groups that fit, all reads
                    // of a group in flight together.
                    let mut next = next;
                    for group in used.chunks(cache.capacity()) {
                        let mut pinned = cache.request(*layer, group)?;
                        if let Some(n) = next.take() {
                            cache.prefetch(n.layer, n.experts);
                        }
                        pinned.wait()?;
                        let expert = |i: usize| pinned.get(i);
                        unsafe {
                            routed_swiglu(pinned.len(), &expert, start, xs, hidden, gate, up, ys)
                        }
                    }
                }
            }
        }
        // Each token's experts summed in ascending expert order, the order
        // transformers sums them in: its rows of `ys` in ascending position.
        let (pos, chosen, ys) = (&m.pos, &m.chosen, &*ys);
        let y_out = SharedOut(y.as_mut_ptr());
        let tokens_per_task = rows_per_task.div_ceil(k);
        kernels::for_each_task(t.div_ceil(tokens_per_task), |c| {
            for tok in c * tokens_per_task..((c + 1) * tokens_per_task).min(t) {
                // SAFETY: token tok's row belongs to this task only, inside `y`.
                let out = unsafe { y_out.slice(tok * hidden, hidden) };
                out.fill(0.0);
                let slots = tok * k..(tok + 1) * k;
                let mut last = None;
                for _ in slots.clone() {
                    let next = slots
                        .clone()
                        .filter(|&i| last.is_none_or(|l| pos[i] > l))
                        .min_by_key(|&i| pos[i])
                        .expect("k distinct positions per token");
                    kernels::axpy(chosen[next].1, &ys[pos[next] * hidden..][..hidden], out);
                    last = Some(pos[next]);
                }
            }
        });
        m.used = used;
        if let Some(shared) = &self.shared {
            let ys = sized(&mut m.yg, t * hidden);
            shared.ffn.run(x, t, ys, &mut s.ffn);
            match &shared.gate {
                Some(gate) => {
                    let g = sized(&mut m.shared_gate, t);
                    matmul(x, t, gate.matrix(), g);
                    for ((row, yrow), g) in ys
                        .chunks_exact(hidden)
                        .zip(y.chunks_exact_mut(hidden))
                        .zip(g)
                    {
                        kernels::axpy(kernels::sigmoid(*g), row, yrow);
                    }
                }
                None => kernels::add_in_place(y, ys),
            }
        }
        Ok(())
    }
}

/// `down(silu(gate(x)) * up(x))` for `n` routed experts (`expert(i)` is the
/// i-th, ascending, so their rows `start[e]..start[e + 1]` of `xs` and `ys`
/// form one block), as two batches over all of them: the gates and ups,
/// then the downs ([`kernels::matmul_batch`] says why not expert by expert).
///
/// # Safety
/// `ys` points at `start[last] * hidden` floats that nothing else touches
/// during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn routed_swiglu<'w>(
    n: usize,
    expert: &(dyn Fn(usize) -> (u32, [Matrix<'w>; 3]) + Sync),
    start: &[usize],
    xs: &[f32],
    hidden: usize,
    gate: &mut Vec<f32>,
    up: &mut Vec<f32>,
    ys: SharedOut<f32>,
) {
    if n == 0 {
        return;
    }
    let rows = |e: u32| start[e as usize]..start[e as usize + 1];
    let inter = expert(0).1[0].rows;
    let all = start[start.len() - 1];
    let gate_out = SharedOut(sized(gate, all * inter).as_mut_ptr());
    let up_out = SharedOut(sized(up, all * inter).as_mut_ptr());
    let block = rows(expert(0).0).start..rows(expert(n - 1).0).end;
    // SAFETY: expert e writes only its rows of `gate`/`up` (`inter` wide)
    // and of `ys` (`hidden` wide), which lie inside those buffers.
    unsafe {
        kernels::matmul_batch(2 * n, |j| {
            let (e, mats) = expert(j / 2);
            let r = rows(e);
            let out = if j % 2 == 0 { gate_out } else { up_out };
            Product {
                w: mats[j % 2],
                x: &xs[r.start * hidden..r.end * hidden],
                t: r.len(),
                y: SharedOut(out.at(r.start * inter)),
            }
        });
        kernels::silu_mul_rows(
            gate_out.slice(block.start * inter, block.len() * inter),
            up_out.slice(block.start * inter, block.len() * inter),
        );
        let gate = &*gate_out.slice(0, all * inter);
        kernels::matmul_batch(n, |i| {
            let (e, mats) = expert(i);
            let r = rows(e);
            Product {
                w: mats[2],
                x: &gate[r.start * inter..r.end * inter],
                t: r.len(),
                y: SharedOut(ys.at(r.start * hidden)),
            }
        });
    }
}

/// The next sparse layer's predicted experts, most likely first.
#[derive(Debug, Clone, Copy)]
pub struct NextLayer<'a> {
    pub layer: usize,
    pub experts: &'a [u32],
}

/// Buffers for predicting a later layer's experts.
#[derive(Debug, Default)]
pub struct PredictScratch {
    h: Vec<f32>,
    logits: Vec<f32>,
    route: RouteScratch,
    chosen: Vec<(u32, f32)>,
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
        hidden: &[f32],
        t: usize,
        norm: &[f32],
        eps: f32,
        s: &mut PredictScratch,
    ) {
        let (n_exp, h) = (self.router.shape[0], self.router.shape[1]);
        let hn = sized(&mut s.h, t * h);
        kernels::rms_norm_rows(hidden, norm, eps, hn);
        let logits = sized(&mut s.logits, t * n_exp);
        matmul(hn, t, self.router.matrix(), logits);
        s.chosen.clear();
        for row in logits.chunks_exact_mut(n_exp) {
            route(
                row,
                &self.routing,
                self.score_bias.as_deref(),
                &mut s.route,
                &mut s.chosen,
            );
        }
        s.chosen.sort_by(|a, b| b.1.total_cmp(&a.1));
        s.experts.clear();
        for &(e, _) in &s.chosen {
            if !s.experts.contains(&e) {
                s.experts.push(e);
            }
        }
    }
}

/// Buffers of [`route`], kept between calls.
#[derive(Debug, Default)]
pub struct RouteScratch {
    /// Scores the choice is made on (bias-corrected ones, for V3).
    choice: Vec<f32>,
    /// (group, score), best first.
    groups: Vec<(usize, f32)>,
}

/// Turns one token's router logits into `top_k` (expert, weight) pairs
/// appended to `chosen`, as transformers does for each family:
///
/// - scores: softmax over all experts, or independent sigmoids;
/// - the choice is made on the scores plus `bias` when given (the weights
///   stay the unbiased scores);
/// - with a group limit, only experts of the best `topk_group` groups
///   compete, a group scored by its best expert (softmax) or the sum of
///   its best two (sigmoid);
/// - the `top_k` best win, ties to the lower index; their weights are
///   optionally renormalised, then multiplied by `scale`.
///
/// `logits` is overwritten with the scores.
pub fn route(
    logits: &mut [f32],
    r: &Routing,
    bias: Option<&[f32]>,
    scratch: &mut RouteScratch,
    chosen: &mut Vec<(u32, f32)>,
) {
    let RouteScratch { choice, groups } = scratch;
    match r.scoring {
        Scoring::Softmax => kernels::softmax(logits),
        Scoring::Sigmoid => {
            for v in logits.iter_mut() {
                *v = kernels::sigmoid(*v);
            }
        }
    }
    let scores = &*logits;
    choice.clear();
    match bias {
        Some(b) => choice.extend(scores.iter().zip(b).map(|(s, b)| s + b)),
        None => choice.extend_from_slice(scores),
    }
    if let Some(g) = r.groups {
        let per = choice.len() / g.n_group;
        let group_score = |grp: &[f32]| match r.scoring {
            Scoring::Softmax => grp.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            Scoring::Sigmoid => {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in grp {
                    if v > a {
                        (a, b) = (v, a);
                    } else if v > b {
                        b = v;
                    }
                }
                a + b
            }
        };
        groups.clear();
        groups.extend(choice.chunks_exact(per).map(group_score).enumerate());
        groups.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for &(grp, _) in &groups[g.topk_group..] {
            choice[grp * per..(grp + 1) * per].fill(f32::NEG_INFINITY);
        }
    }
    let first = chosen.len();
    for _ in 0..r.top_k {
        let mut best = 0;
        for (e, &p) in choice.iter().enumerate() {
            if p > choice[best] {
                best = e;
            }
        }
        chosen.push((best as u32, scores[best]));
        choice[best] = f32::NEG_INFINITY;
    }
    if r.norm_topk_prob {
        let sum: f32 = chosen[first..].iter().map(|c| c.1).sum();
        for c in &mut chosen[first..] {
            c.1 /= sum;
        }
    }
    if r.scale != 1.0 {
        for c in &mut chosen[first..] {
            c.1 *= r.scale;
        }
    }
}

/// The token-embedding table: mapped, or left on disk and read one row per
/// token. On disk it costs no resident RAM at all (0.6 GB for
/// Qwen3-30B-A3B), and a prompt touches only a few thousand rows.
pub enum Embedding {
    Mapped(Weight),
    OnDisk(DiskRows),
}

impl std::fmt::Debug for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Embedding::Mapped(w) => write!(f, "Mapped({:?})", w.shape),
            Embedding::OnDisk(d) => write!(f, "OnDisk({} bytes per row)", d.row_bytes),
        }
    }
}

impl Embedding {
    /// Row `id`, widened into `out`.
    pub fn row(&self, id: u32, out: &mut [f32]) -> Result<()> {
        match self {
            Embedding::Mapped(w) => {
                let table = w.matrix();
                kernels::widen(table.dtype, table.row(id as usize), out);
                Ok(())
            }
            Embedding::OnDisk(d) => d.read(id, out),
        }
    }
}

/// Rows of a matrix stored at `offset` in a file read with direct I/O.
pub struct DiskRows {
    pub file: crate::experts::io::DirectFile,
    pub offset: u64,
    pub dtype: kernels::DType,
    pub cols: usize,
    pub row_bytes: usize,
    pub buf: std::sync::Mutex<crate::experts::io::AlignedBuf>,
}

impl DiskRows {
    pub fn new(
        file: crate::experts::io::DirectFile,
        offset: u64,
        dtype: kernels::DType,
        cols: usize,
    ) -> Self {
        let row_bytes = dtype.row_bytes(cols);
        // A row may straddle a block boundary: two blocks of slack.
        let span =
            crate::vault::align_up(row_bytes as u64) as usize + 2 * crate::vault::ALIGN as usize;
        Self {
            file,
            offset,
            dtype,
            cols,
            row_bytes,
            buf: std::sync::Mutex::new(crate::experts::io::AlignedBuf::new(span)),
        }
    }

    fn read(&self, id: u32, out: &mut [f32]) -> Result<()> {
        let align = crate::vault::ALIGN;
        let start = self.offset + id as u64 * self.row_bytes as u64;
        let first = start / align * align;
        let end = crate::vault::align_up(start + self.row_bytes as u64);
        let buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the buffer is only used under its lock.
        let span = unsafe { buf.slice_mut(0, (end - first) as usize) };
        self.file.read_exact_at(span, first).map_err(|e| {
            crate::error::Error::format(&self.file.path, format!("reading embedding row {id}: {e}"))
        })?;
        let skip = (start - first) as usize;
        kernels::widen(
            self.dtype,
            &span[skip..skip + self.row_bytes],
            &mut out[..self.cols],
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(logits: &[f32], r: Routing, bias: Option<&[f32]>) -> Vec<(u32, f32)> {
        let (mut l, mut chosen) = (logits.to_vec(), Vec::new());
        route(&mut l, &r, bias, &mut RouteScratch::default(), &mut chosen);
        chosen
    }

    #[test]
    fn group_limits_and_correction_bias_steer_the_choice() {
        let plain = Routing {
            top_k: 2,
            scoring: Scoring::Softmax,
            groups: None,
            norm_topk_prob: false,
            scale: 1.0,
        };
        let logits = [3.0, 2.9, 0.0, 2.8, 0.1, 0.2];
        let ids = |c: Vec<(u32, f32)>| c.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(ids(routed(&logits, plain, None)), [0, 1]);

        // Three groups of two, one allowed: group {0, 1} has the best
        // expert, so both picks come from it.
        let grouped = Routing {
            groups: Some(GroupLimit {
                n_group: 3,
                topk_group: 1,
            }),
            ..plain
        };
        assert_eq!(ids(routed(&logits, grouped, None)), [0, 1]);
        let logits = [3.0, -5.0, 2.9, 2.8, 0.0, 0.0];
        // Max-scored groups: {0,1} wins on 3.0 alone, so expert 1 is
        // chosen over 2 and 3 although its score is the lowest.
        assert_eq!(ids(routed(&logits, grouped, None)), [0, 1]);
        let sigmoid = Routing {
            scoring: Scoring::Sigmoid,
            norm_topk_prob: true,
            scale: 2.0,
            ..grouped
        };
        // Best-two sums: {2, 3} beats {0, 1}.
        let chosen = routed(&logits, sigmoid, None);
        assert_eq!(ids(chosen.clone()), [2, 3]);
        let sum: f32 = chosen.iter().map(|c| c.1).sum();
        assert!((sum - 2.0).abs() < 1e-6, "renormalised, then scaled");

        // The bias changes the choice but not the weights.
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 9.0];
        let chosen = routed(
            &logits,
            Routing {
                norm_topk_prob: false,
                scale: 1.0,
                ..sigmoid
            },
            Some(&bias),
        );
        assert_eq!(chosen[0].0, 5);
        assert!((chosen[0].1 - 0.5).abs() < 1e-6, "sigmoid(0), unbiased");
    }
}
