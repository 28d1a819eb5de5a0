//! The compute seam: every piece of tensor work the decoder and its blocks
//! do goes through a [`Backend`]. Model code says *what* (project these
//! rows through this weight, attend over layer 3's cache, run these experts
//! on these tokens); a backend says *how and where*. [`Cpu`] is today's
//! kernels behind it.
//!
//! Where the line is drawn, and why. candle puts it at the tensor: a
//! `Device` and a `Storage` enum over `BackendStorage` types, every op
//! dispatched on the storage of its operands. llama.cpp puts it at the
//! graph: model code builds a ggml graph and `ggml_backend_sched` splits it
//! over backends and copies between them. Neither fits a streaming engine
//! as it is: its routed experts arrive from disk in the middle of a layer
//! (the router's choice decides what is read), so the routing decision
//! must come back to the host before the layer can go on, and a whole-graph
//! schedule would be cut at every sparse layer anyway. So the seam is at
//! the op, coarse where a backend needs room to schedule: one call per op
//! per layer (a matmul over all of a call's tokens, attention over the
//! whole cache of a layer, all of a layer's chosen experts at once), never
//! per row, so a virtual call costs nothing next to the work. Host
//! bookkeeping (routing counts, which experts to read) stays in the model;
//! the expert cache hands the backend its weights as [`Matrix`] views of
//! RAM slots, which a device backend would upload (or read in place from
//! pinned memory). The KV cache is the backend's ([`KvCache`]), touched by
//! model code only through [`Backend::kv_append`] and
//! [`Backend::attention`]. Activation buffers are still host `f32` slices
//! that the session owns; a device backend will need them opaque, which
//! this trait's shape (whole buffers per call, no element access in model
//! code) leaves room for.
//!
//! Batched decode of several sequences fits the same calls: `t` rows from
//! different sessions are rows of one matmul, and attention takes one
//! cache per sequence.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod embedding;
mod kv;
pub mod profile;
mod routing;

pub use cpu::Cpu;
pub use device::{choose, Device, Placement};
pub use embedding::Embedding;
pub use kv::KvCache;
pub use routing::{route, RouteScratch};

// The shapes and views the calls take, named here so model code needs
// nothing from the kernels.
pub use crate::kernels::{AttnShape, Matrix, Rope};

use crate::config::Routing;
use crate::error::Result;

/// Shapes of multi-head latent attention's query absorption and value
/// projection ([`Backend::mla_absorb`], [`Backend::mla_values`]).
#[derive(Debug, Clone, Copy)]
pub struct MlaShape {
    pub n_heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
    pub rank: usize,
}

/// Experts grouped for one call: group `i` is expert `experts(i).0` with
/// weights `experts(i).1` over rows `start[e]..start[e + 1]` of the
/// gathered activations, `e` the expert's index.
pub type ExpertFn<'a> = dyn Fn(usize) -> (u32, [Matrix<'a>; 3]) + Sync + 'a;

/// Tensor work, one call per op per layer. Activations are row-major
/// `[t, width]` f32; weights are [`Matrix`] views in their stored type.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// `y[t, rows] = x[t, cols] · wᵀ`, for any stored type.
    fn matmul(&self, x: &[f32], t: usize, w: Matrix<'_>, y: &mut [f32]);
    /// Adds `row` to every row of `y`.
    fn add_rows(&self, y: &mut [f32], row: &[f32]);
    /// `y += x`.
    fn add(&self, y: &mut [f32], x: &[f32]);
    /// RMSNorm of each `w.len()`-wide row of `x` into `out`.
    fn rms_norm_rows(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]);
    /// RMSNorm in place of the first `w.len()` values of each
    /// `stride`-wide row of `x`.
    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32);
    /// Clamps every value to `[-limit, limit]`.
    fn clamp(&self, x: &mut [f32], limit: f32);
    /// `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut [f32], up: &[f32]);
    /// This call's RoPE tables for `positions`.
    fn rope_tables(
        &self,
        rope: &Rope,
        positions: std::ops::Range<usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    );
    /// Rotates `x` (`t` rows of heads `head` wide) in place: the part of
    /// each head from `skip` on, NeoX or interleaved pairs.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut [f32],
        t: usize,
        head: usize,
        skip: usize,
        cos: &[f32],
        sin: &[f32],
        interleaved: bool,
    );
    /// An empty KV cache of `layers` layers, `k_width` and `v_width`
    /// floats per position (latent attention keeps no separate values).
    fn kv_cache(&self, layers: usize, k_width: usize, v_width: usize) -> KvCache;
    /// Appends `t` positions of keys and values to `layer` of `kv`.
    fn kv_append(&self, kv: &mut KvCache, layer: usize, k: &[f32], v: &[f32]);
    /// Causal attention of `q` over every cached position of `layer`.
    fn attention(&self, q: &[f32], kv: &KvCache, layer: usize, s: AttnShape, out: &mut [f32]);
    /// Router logits of `x` through `router`, then each token's top-k
    /// (expert, weight) pairs in `chosen`.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        x: &[f32],
        t: usize,
        router: Matrix<'_>,
        r: &Routing,
        bias: Option<&[f32]>,
        logits: &mut Vec<f32>,
        scratch: &mut RouteScratch,
        chosen: &mut Vec<(u32, f32)>,
    );
    /// Row `i` of `out` is row `order[i] / k` of `x` (`width` wide): each
    /// (token, slot) pair's token, in expert order.
    fn gather(&self, x: &[f32], width: usize, order: &[usize], k: usize, out: &mut [f32]);
    /// SwiGLU through each of `n` experts on its rows of `xs`
    /// (`start[e]..start[e + 1]` for expert `e`), into the same rows of `ys`.
    fn experts(&self, n: usize, expert: &ExpertFn<'_>, start: &[usize], xs: &[f32], ys: &mut [f32]);
    /// `y = Σ weight · row`: each gathered output row `ys[i]` added to its
    /// token's row of `y` with the weight `chosen[order[i]]` gives it.
    fn scatter(&self, ys: &[f32], order: &[usize], chosen: &[(u32, f32)], k: usize, y: &mut [f32]);
    /// `down(silu(gate(x)) * up(x))`, `gate` and `up` as scratch.
    #[allow(clippy::too_many_arguments)]
    fn swiglu(
        &self,
        w: [Matrix<'_>; 3],
        x: &[f32],
        t: usize,
        y: &mut [f32],
        gate: &mut Vec<f32>,
        up: &mut Vec<f32>,
    );
    /// `y[i] += sigmoid(g[i]) * x[i]` for each row `i`.
    fn gated_add(&self, y: &mut [f32], x: &[f32], g: &[f32]);
    /// The embedding rows of `ids` into `x`.
    fn embed(&self, table: &Embedding, ids: &[u32], x: &mut [f32]) -> Result<()>;
    /// Multi-head latent attention's queries in latent space: each head's
    /// `q_nope` through its key rows of `kv_b` (`W_k[h]ᵀ q_nope`), then its
    /// `q_pe`, into `qa` `[t, heads, rank + rope]`. `absorbed` and `rows`
    /// are scratch.
    #[allow(clippy::too_many_arguments)]
    fn mla_absorb(
        &self,
        q: &[f32],
        t: usize,
        kv_b: Matrix<'_>,
        s: MlaShape,
        absorbed: &mut Vec<f32>,
        rows: &mut Vec<f32>,
        qa: &mut [f32],
    );
    /// Each head's latent output `lat` `[t, heads, rank]` through its value
    /// rows of `kv_b` into `out` `[t, heads, v_dim]`. `one` and `vals` are
    /// scratch.
    #[allow(clippy::too_many_arguments)]
    fn mla_values(
        &self,
        lat: &[f32],
        t: usize,
        kv_b: Matrix<'_>,
        s: MlaShape,
        one: &mut Vec<f32>,
        vals: &mut Vec<f32>,
        out: &mut [f32],
    );
}

/// The backend models built now run on: the CPU's, timed op by op when
/// [`profile::enable`] was called.
pub fn backend() -> Box<dyn Backend> {
    if profile::enabled() {
        Box::new(profile::Profiled(Cpu))
    } else {
        Box::new(Cpu)
    }
}

/// Resizes a buffer to exactly `n` elements; within capacity this is free.
pub(crate) fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}
