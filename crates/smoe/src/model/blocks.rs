//! Building blocks shared by the architectures: grouped-query attention with
//! optional per-head q/k norms, the SwiGLU MLP, and the routed-expert block.
//! Each works on a batch of `t` tokens at once (row-major `[t, width]`), so
//! prefill is matrix-matrix and decode is the `t = 1` case of the same code.

use std::sync::Arc;

use crate::checkpoint::{TensorSource, Weight};
use crate::error::Result;
use crate::experts::ExpertCache;
use crate::kernels::{self, matmul, AttnShape, Matrix, Rope};

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

/// Multi-head attention with grouped KV heads, RoPE, optional per-head
/// RMSNorm on q and k (Qwen3), and a KV cache.
#[derive(Debug)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub window: Option<usize>,
}

impl Attention {
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
        let shape = AttnShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: hd,
            pos0,
            window: self.window,
        };
        kernels::attention(q, keys, values, shape, attn);
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
        Ok(Self {
            gate: ckpt.tensor(&format!("{prefix}.gate_proj.weight"), &[inter, hidden])?,
            up: ckpt.tensor(&format!("{prefix}.up_proj.weight"), &[inter, hidden])?,
            down: ckpt.tensor(&format!("{prefix}.down_proj.weight"), &[hidden, inter])?,
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

/// How router probabilities become expert weights.
#[derive(Debug, Clone, Copy)]
pub struct Routing {
    pub top_k: usize,
    /// Renormalise the chosen weights to sum to one.
    pub norm_topk_prob: bool,
}

/// A sparse block: a linear router over all experts, softmax in f32, top-k,
/// then each chosen expert's SwiGLU output weighted and summed.
#[derive(Debug)]
pub struct Moe {
    pub router: Weight,
    pub experts: Experts,
    pub routing: Routing,
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
            route(row, self.routing, &mut m.chosen);
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
        for (i, &(e, _)) in m.chosen.iter().enumerate() {
            m.order[m.fill[e as usize]] = i;
            m.fill[e as usize] += 1;
        }

        y.fill(0.0);
        let k = self.routing.top_k;
        // Each used expert once, over all of its tokens, in ascending order
        // (the order transformers sums them in).
        let mut run =
            |e: usize, mats: [Matrix<'_>; 3], s_ffn: &mut FfnScratch, m: &mut MoeScratch| {
                let slots = &m.order[m.start[e]..m.start[e + 1]];
                let n = slots.len();
                let xg = sized(&mut m.xg, n * hidden);
                for (row, &slot) in xg.chunks_exact_mut(hidden).zip(slots) {
                    let tok = slot / k;
                    row.copy_from_slice(&x[tok * hidden..][..hidden]);
                }
                let yg = sized(&mut m.yg, n * hidden);
                swiglu(mats, xg, n, yg, s_ffn);
                for (row, &slot) in yg.chunks_exact(hidden).zip(slots) {
                    let (tok, w) = (slot / k, m.chosen[slot].1);
                    kernels::axpy(w, row, &mut y[tok * hidden..][..hidden]);
                }
            };
        let mut used = std::mem::take(&mut m.used);
        used.clear();
        used.extend((0..n_exp as u32).filter(|&e| m.start[e as usize + 1] > m.start[e as usize]));
        match &self.experts {
            Experts::Resident(experts) => {
                for &e in &used {
                    let f = &experts[e as usize];
                    run(
                        e as usize,
                        [f.gate.matrix(), f.up.matrix(), f.down.matrix()],
                        &mut s.ffn,
                        m,
                    );
                }
            }
            Experts::Streamed { cache, layer } => {
                // A prefill chunk may route to more experts than the cache
                // holds: take them in groups that fit, all reads of a group
                // in flight together.
                let mut next = next;
                for group in used.chunks(cache.capacity()) {
                    let mut pinned = cache.request(*layer, group)?;
                    if let Some(n) = next.take() {
                        cache.prefetch(n.layer, n.experts);
                    }
                    pinned.wait()?;
                    for (e, mats) in pinned.experts() {
                        run(e as usize, mats, &mut s.ffn, m);
                    }
                }
            }
        }
        m.used = used;
        Ok(())
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
            route(row, self.routing, &mut s.chosen);
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

/// Softmax over all experts in f32, the `top_k` largest (ties to the lower
/// index), optionally renormalised; appends `top_k` pairs to `chosen`.
pub fn route(logits: &mut [f32], r: Routing, chosen: &mut Vec<(u32, f32)>) {
    kernels::softmax(logits);
    let first = chosen.len();
    for _ in 0..r.top_k {
        let mut best = usize::MAX;
        for (e, &p) in logits.iter().enumerate() {
            if best == usize::MAX || p > logits[best] {
                best = e;
            }
        }
        chosen.push((best as u32, logits[best]));
        logits[best] = f32::NEG_INFINITY;
    }
    if r.norm_topk_prob {
        let sum: f32 = chosen[first..].iter().map(|c| c.1).sum();
        for c in &mut chosen[first..] {
            c.1 /= sum;
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
