//! The CPU backend: the kernels of [`crate::kernels`] (SIMD picked at run
//! time, parallel on their own thread pool) behind the [`Backend`] calls.

use crate::config::Routing;
use crate::error::Result;
use crate::kernels::{self, AttnShape, Matrix, Rope, SharedOut};

use super::{sized, Backend, Embedding, ExpertFn, KvCache, MlaShape, RouteScratch};

/// Today's kernels; stateless, so one value serves every model.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

/// A pool thread's buffers for the routed experts it runs.
#[derive(Default)]
struct ExpertScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
}

thread_local! {
    static EXPERT_SCRATCH: std::cell::RefCell<ExpertScratch> = std::cell::RefCell::default();
}

impl Backend for Cpu {
    fn matmul(&self, x: &[f32], t: usize, w: Matrix<'_>, y: &mut [f32]) {
        kernels::matmul(x, t, w, y);
    }

    fn add_rows(&self, y: &mut [f32], row: &[f32]) {
        for r in y.chunks_exact_mut(row.len()) {
            kernels::add_in_place(r, row);
        }
    }

    fn add(&self, y: &mut [f32], x: &[f32]) {
        kernels::add_in_place(y, x);
    }

    fn rms_norm_rows(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        kernels::rms_norm_rows(x, w, eps, out);
    }

    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) {
        if stride == w.len() {
            kernels::rms_norm(x, w, eps);
        } else {
            for row in x.chunks_exact_mut(stride) {
                kernels::rms_norm(&mut row[..w.len()], w, eps);
            }
        }
    }

    fn clamp(&self, x: &mut [f32], limit: f32) {
        for v in x {
            *v = v.clamp(-limit, limit);
        }
    }

    fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        kernels::silu_mul(gate, up);
    }

    fn rope_tables(
        &self,
        rope: &Rope,
        positions: std::ops::Range<usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        rope.tables(positions, cos, sin);
    }

    fn rope(
        &self,
        x: &mut [f32],
        t: usize,
        head: usize,
        skip: usize,
        cos: &[f32],
        sin: &[f32],
        interleaved: bool,
    ) {
        let rotate = if interleaved {
            Rope::apply_interleaved
        } else {
            Rope::apply
        };
        let half = (head - skip) / 2;
        let width = x.len() / t.max(1);
        for (tok, row) in x.chunks_exact_mut(width).enumerate() {
            let (c, s) = (&cos[tok * half..][..half], &sin[tok * half..][..half]);
            if skip == 0 {
                rotate(row, c, s);
            } else {
                for h in row.chunks_exact_mut(head) {
                    rotate(&mut h[skip..], c, s);
                }
            }
        }
    }

    fn kv_cache(&self, layers: usize, k_width: usize, v_width: usize) -> KvCache {
        KvCache::new(layers, k_width, v_width)
    }

    fn kv_append(&self, kv: &mut KvCache, layer: usize, k: &[f32], v: &[f32]) {
        kv.append(layer, k, v);
    }

    fn attention(&self, q: &[f32], kv: &KvCache, layer: usize, s: AttnShape, out: &mut [f32]) {
        let (keys, values) = kv.layer(layer);
        kernels::attention(q, keys, values, s, out);
    }

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
    ) {
        let n_exp = router.rows;
        let logits = sized(logits, t * n_exp);
        kernels::matmul(x, t, router, logits);
        chosen.clear();
        for row in logits.chunks_exact_mut(n_exp) {
            super::route(row, r, bias, scratch, chosen);
        }
    }

    fn gather(&self, x: &[f32], width: usize, order: &[usize], k: usize, out: &mut [f32]) {
        for (row, &slot) in out.chunks_exact_mut(width).zip(order) {
            row.copy_from_slice(&x[slot / k * width..][..width]);
        }
    }

    fn experts(
        &self,
        n: usize,
        expert: &ExpertFn<'_>,
        start: &[usize],
        xs: &[f32],
        ys: &mut [f32],
    ) {
        let hidden = xs.len() / start.last().copied().unwrap_or(0).max(1);
        let out = SharedOut(ys.as_mut_ptr());
        // The experts of a layer are independent products, one task each
        // when there are enough of them to keep every thread busy: with one
        // token (decode) each is too small to split well by rows, and one
        // synchronization per layer replaces three per expert. Their
        // matmuls then run on the task's own thread
        // (`kernels::for_each_task`), with that thread's buffers. Few
        // experts (Mixtral's two, on many cores) split by rows instead.
        let by_expert = n >= 2 * kernels::threads();
        let run = |i: usize| {
            let (e, mats) = expert(i);
            let (a, b) = (start[e as usize], start[e as usize + 1]);
            // SAFETY: expert e's rows a..b of `ys` are written by this
            // task only, and lie inside `ys` (b <= the gathered rows).
            let yg = unsafe { out.slice(a * hidden, (b - a) * hidden) };
            EXPERT_SCRATCH.with_borrow_mut(|s| {
                self.swiglu(
                    mats,
                    &xs[a * hidden..b * hidden],
                    b - a,
                    yg,
                    &mut s.gate,
                    &mut s.up,
                )
            });
        };
        if by_expert {
            kernels::for_each_task(n, run);
        } else {
            (0..n).for_each(run);
        }
    }

    fn scatter(&self, ys: &[f32], order: &[usize], chosen: &[(u32, f32)], k: usize, y: &mut [f32]) {
        let hidden = ys.len() / order.len().max(1);
        // Each token's experts summed in ascending expert order, the order
        // transformers sums them in.
        y.fill(0.0);
        for (row, &slot) in ys.chunks_exact(hidden).zip(order) {
            let (tok, w) = (slot / k, chosen[slot].1);
            kernels::axpy(w, row, &mut y[tok * hidden..][..hidden]);
        }
    }

    fn swiglu(
        &self,
        [gate_w, up_w, down_w]: [Matrix<'_>; 3],
        x: &[f32],
        t: usize,
        y: &mut [f32],
        gate: &mut Vec<f32>,
        up: &mut Vec<f32>,
    ) {
        let inter = gate_w.rows;
        let gate = sized(gate, t * inter);
        let up = sized(up, t * inter);
        kernels::matmul(x, t, gate_w, gate);
        kernels::matmul(x, t, up_w, up);
        kernels::silu_mul(gate, up);
        kernels::matmul(gate, t, down_w, y);
    }

    fn gated_add(&self, y: &mut [f32], x: &[f32], g: &[f32]) {
        let hidden = y.len() / g.len().max(1);
        for ((row, yrow), g) in x
            .chunks_exact(hidden)
            .zip(y.chunks_exact_mut(hidden))
            .zip(g)
        {
            kernels::axpy(kernels::sigmoid(*g), row, yrow);
        }
    }

    fn embed(&self, table: &Embedding, ids: &[u32], x: &mut [f32]) -> Result<()> {
        let h = x.len() / ids.len().max(1);
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            table.row(id, row)?;
        }
        Ok(())
    }

    fn mla_absorb(
        &self,
        q: &[f32],
        t: usize,
        kv_b: Matrix<'_>,
        s: MlaShape,
        absorbed: &mut Vec<f32>,
        rows: &mut Vec<f32>,
        qa: &mut [f32],
    ) {
        let MlaShape {
            n_heads: nh,
            nope,
            rope,
            v_dim,
            rank,
        } = s;
        let (qk, row) = (nope + rope, rank + rope);
        let absorbed = sized(absorbed, nh * t * rank);
        // One widened weight row per head, kept between calls.
        let rows = sized(rows, nh * rank);
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
                kernels::widen(kv_b.dtype, kv_b.row(head * (nope + v_dim) + i), w);
                for tok in 0..t {
                    let qv = q[(tok * nh + head) * qk + i];
                    kernels::axpy(qv, w, &mut out[tok * rank..][..rank]);
                }
            }
        });
        for tok in 0..t {
            for head in 0..nh {
                let dst = &mut qa[(tok * nh + head) * row..][..row];
                dst[..rank].copy_from_slice(&absorbed[(head * t + tok) * rank..][..rank]);
                dst[rank..].copy_from_slice(&q[(tok * nh + head) * qk + nope..][..rope]);
            }
        }
    }

    fn mla_values(
        &self,
        lat: &[f32],
        t: usize,
        kv_b: Matrix<'_>,
        s: MlaShape,
        one: &mut Vec<f32>,
        vals: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let MlaShape {
            n_heads: nh,
            nope,
            v_dim: vd,
            rank,
            ..
        } = s;
        for head in 0..nh {
            let one = sized(one, t * rank);
            for tok in 0..t {
                one[tok * rank..][..rank].copy_from_slice(&lat[(tok * nh + head) * rank..][..rank]);
            }
            let first = head * (nope + vd) + nope;
            let vals = sized(vals, t * vd);
            kernels::matmul(one, t, kv_b.rows(first..first + vd), vals);
            for tok in 0..t {
                out[(tok * nh + head) * vd..][..vd].copy_from_slice(&vals[tok * vd..][..vd]);
            }
        }
    }
}
