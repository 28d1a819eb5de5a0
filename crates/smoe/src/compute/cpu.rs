//! The CPU backend: the kernels of [`crate::kernels`] (SIMD picked at run
//! time, parallel on their own thread pool) behind the [`Backend`] calls.

use std::ops::Range;

use crate::config::Routing;
use crate::error::Result;
use crate::kernels::{self, AttnShape, Matrix, Product, Rope, SharedOut};

use super::{sized, Backend, Embedding, ExpertFn, KvCache, MlaShape, RouteScratch};

/// Today's kernels; stateless, so one value serves every model.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

/// The calling thread's buffers for a layer's routed experts: their
/// intermediate activations, and where each (token, slot) pair's row went.
#[derive(Default)]
struct ExpertScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    pos: Vec<usize>,
}

thread_local! {
    static EXPERT_SCRATCH: std::cell::RefCell<ExpertScratch> = std::cell::RefCell::default();
    /// Each routing task's buffers.
    static ROUTE_SCRATCH: std::cell::RefCell<(RouteScratch, Vec<(u32, f32)>)> =
        std::cell::RefCell::default();
}

/// Rows per task of the element-wise ops, the experts' copies and sums:
/// thousands of rows in a prefill chunk, which on many cores cost a tenth of
/// the layer on one thread.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// `f(rows, y_rows)` over `y`'s `width`-wide rows, in tasks of
/// [`rows_per_task`] rows on the kernels' pool. A decode step's single row is
/// one task, run on the calling thread without touching the pool.
fn par_rows(y: &mut [f32], width: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let width = width.max(1);
    let (rows, per) = (y.len() / width, rows_per_task(width));
    let out = SharedOut(y.as_mut_ptr());
    kernels::for_each_task(rows.div_ceil(per), |c| {
        let r = c * per..((c + 1) * per).min(rows);
        // SAFETY: rows `r` belong to this task only, inside `y`.
        let rows = unsafe { out.slice(r.start * width, r.len() * width) };
        f(r, rows);
    });
}

impl Backend for Cpu {
    fn matmul(&self, x: &[f32], t: usize, w: Matrix<'_>, y: &mut [f32]) {
        kernels::matmul(x, t, w, y);
    }

    fn add_rows(&self, y: &mut [f32], row: &[f32]) {
        par_rows(y, row.len(), |_, y| {
            for r in y.chunks_exact_mut(row.len()) {
                kernels::add_in_place(r, row);
            }
        });
    }

    fn add(&self, y: &mut [f32], x: &[f32]) {
        par_rows(y, 1, |r, y| kernels::add_in_place(y, &x[r]));
    }

    fn rms_norm_rows(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        par_rows(out, d, |r, out| {
            kernels::rms_norm_rows(&x[r.start * d..r.end * d], w, eps, out)
        });
    }

    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) {
        par_rows(x, stride, |_, x| {
            if stride == w.len() {
                kernels::rms_norm(x, w, eps);
            } else {
                for row in x.chunks_exact_mut(stride) {
                    kernels::rms_norm(&mut row[..w.len()], w, eps);
                }
            }
        });
    }

    fn clamp(&self, x: &mut [f32], limit: f32) {
        par_rows(x, 1, |_, x| {
            for v in x {
                *v = v.clamp(-limit, limit);
            }
        });
    }

    fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        kernels::silu_mul_rows(gate, up);
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
        par_rows(x, width, |toks, x| {
            for (tok, row) in toks.zip(x.chunks_exact_mut(width)) {
                let (c, s) = (&cos[tok * half..][..half], &sin[tok * half..][..half]);
                if skip == 0 {
                    rotate(row, c, s);
                } else {
                    for h in row.chunks_exact_mut(head) {
                        rotate(&mut h[skip..], c, s);
                    }
                }
            }
        });
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
        if t == 1 {
            return super::route(logits, r, bias, scratch, chosen);
        }
        // Every token gets exactly `top_k` pairs, so each task knows where
        // its tokens' pairs go.
        let k = r.top_k;
        chosen.resize(t * k, (0, 0.0));
        let out = SharedOut(chosen.as_mut_ptr());
        par_rows(logits, n_exp, |toks, rows| {
            ROUTE_SCRATCH.with_borrow_mut(|(scratch, mine)| {
                mine.clear();
                for row in rows.chunks_exact_mut(n_exp) {
                    super::route(row, r, bias, scratch, mine);
                }
                // SAFETY: these tokens' pairs belong to this task only.
                unsafe { out.slice(toks.start * k, toks.len() * k) }.copy_from_slice(mine);
            })
        });
    }

    fn gather(&self, x: &[f32], width: usize, order: &[usize], k: usize, out: &mut [f32]) {
        let per = rows_per_task(width);
        let out = SharedOut(out.as_mut_ptr());
        kernels::for_each_task(order.len().div_ceil(per), |c| {
            let end = ((c + 1) * per).min(order.len());
            for (i, &slot) in order.iter().enumerate().take(end).skip(c * per) {
                // SAFETY: row i belongs to this task only, inside `out`.
                let row = unsafe { out.slice(i * width, width) };
                row.copy_from_slice(&x[slot / k * width..][..width]);
            }
        });
    }

    /// Two batches over all `n` experts, the gates and ups and then the
    /// downs, rather than one task per expert: routing is far from uniform,
    /// and the busiest expert of a prefill chunk then ran alone on one
    /// thread while the others idled (16 cores: prefill 1.4x, decode 1.3x
    /// with the batches). `kernels::matmul_batch` splits them evenly.
    fn experts(
        &self,
        n: usize,
        expert: &ExpertFn<'_>,
        start: &[usize],
        xs: &[f32],
        ys: &mut [f32],
    ) {
        if n == 0 {
            return;
        }
        let hidden = xs.len() / start.last().copied().unwrap_or(0).max(1);
        let rows = |e: u32| start[e as usize]..start[e as usize + 1];
        // Experts come in ascending order, so theirs is one block of rows.
        let block = rows(expert(0).0).start..rows(expert(n - 1).0).end;
        let inter = expert(0).1[0].rows;
        let all = start.last().copied().unwrap_or(0);
        EXPERT_SCRATCH.with_borrow_mut(|s| {
            let gate_out = SharedOut(sized(&mut s.gate, all * inter).as_mut_ptr());
            let up_out = SharedOut(sized(&mut s.up, all * inter).as_mut_ptr());
            let y_out = SharedOut(ys.as_mut_ptr());
            // SAFETY: expert e writes only its rows of `gate`/`up` (`inter`
            // wide) and of `ys` (`hidden` wide), which lie inside them.
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
                        y: SharedOut(y_out.at(r.start * hidden)),
                    }
                });
            }
        });
    }

    fn scatter(&self, ys: &[f32], order: &[usize], chosen: &[(u32, f32)], k: usize, y: &mut [f32]) {
        let hidden = ys.len() / order.len().max(1);
        let t = y.len() / hidden.max(1);
        EXPERT_SCRATCH.with_borrow_mut(|s| {
            s.pos.resize(order.len(), 0);
            for (i, &slot) in order.iter().enumerate() {
                s.pos[slot] = i;
            }
            let pos = &s.pos;
            let y_out = SharedOut(y.as_mut_ptr());
            let per = rows_per_task(hidden).div_ceil(k.max(1));
            // Each token's experts summed in ascending expert order, the
            // order transformers sums them in: its rows of `ys` ascending.
            kernels::for_each_task(t.div_ceil(per), |c| {
                for tok in c * per..((c + 1) * per).min(t) {
                    // SAFETY: token tok's row belongs to this task only.
                    let out = unsafe { y_out.slice(tok * hidden, hidden) };
                    out.fill(0.0);
                    let slots = tok * k..(tok + 1) * k;
                    let mut last = None;
                    for _ in slots.clone() {
                        let Some(next) = slots
                            .clone()
                            .filter(|&i| last.is_none_or(|l| pos[i] > l))
                            .min_by_key(|&i| pos[i])
                        else {
                            break;
                        };
                        kernels::axpy(chosen[next].1, &ys[pos[next] * hidden..][..hidden], out);
                        last = Some(pos[next]);
                    }
                }
            });
        });
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
        kernels::silu_mul_rows(gate, up);
        kernels::matmul(gate, t, down_w, y);
    }

    fn gated_add(&self, y: &mut [f32], x: &[f32], g: &[f32]) {
        let hidden = y.len() / g.len().max(1);
        par_rows(y, hidden, |toks, y| {
            for (tok, yrow) in toks.zip(y.chunks_exact_mut(hidden)) {
                let row = &x[tok * hidden..][..hidden];
                kernels::axpy(kernels::sigmoid(g[tok]), row, yrow);
            }
        });
    }

    fn embed(&self, table: &Embedding, ids: &[u32], x: &mut [f32]) -> Result<()> {
        // A prompt's rows in parallel: on disk each is a read of its own,
        // which one after another cost a 16-core prefill 4% of its time.
        let h = x.len() / ids.len().max(1);
        let failed = std::sync::Mutex::new(None);
        par_rows(x, h, |toks, x| {
            for (&id, row) in ids[toks].iter().zip(x.chunks_exact_mut(h)) {
                if let Err(e) = table.row(id, row) {
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                    return;
                }
            }
        });
        match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::DType;
    use crate::vault::io::{DirectFile, DiskRows};

    /// Values that differ from row to row and column to column.
    fn pattern(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 - 0.5)
            .collect()
    }

    /// A prefill chunk's routing, split over the pool, chooses for each
    /// token what routing that token's logits alone choose, in token order.
    #[test]
    fn parallel_routing_matches_token_by_token() {
        let (t, n_exp, hidden) = (300, 64, 32);
        let w = pattern(n_exp * hidden, 1);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let router = Matrix::new(DType::F32, &bytes, n_exp, hidden);
        let x = pattern(t * hidden, 2);
        let r = Routing::softmax(4, true);
        let (mut logits, mut scratch, mut chosen) = (Vec::new(), RouteScratch::default(), vec![]);
        Cpu.route(
            &x,
            t,
            router,
            &r,
            None,
            &mut logits,
            &mut scratch,
            &mut chosen,
        );
        assert_eq!(chosen.len(), t * r.top_k);
        let mut serial = vec![0.0; t * n_exp];
        kernels::matmul(&x, t, router, &mut serial);
        for (tok, row) in serial.chunks_exact_mut(n_exp).enumerate() {
            let mut alone = Vec::new();
            super::super::route(row, &r, None, &mut scratch, &mut alone);
            assert_eq!(chosen[tok * r.top_k..][..r.top_k], alone[..], "token {tok}");
        }
    }

    /// Embedding rows read from disk by many tasks at once land on their
    /// own tokens.
    #[test]
    fn on_disk_rows_read_in_parallel() {
        let (rows, cols) = (97, 2048);
        let table = pattern(rows * cols, 3);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        // An offset off the 4 KiB blocks, as a tensor inside a backbone is.
        let offset = 1000u64;
        let mut bytes = vec![0u8; offset as usize];
        bytes.extend(table.iter().flat_map(|v| v.to_le_bytes()));
        // Direct reads are whole 4 KiB blocks; a vault's backbone file is
        // padded so, and so is this one.
        bytes.resize(bytes.len().next_multiple_of(4096) + 4096, 0);
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let disk = DiskRows::new(
            DirectFile::open(file.path()).unwrap(),
            offset,
            rows,
            DType::F32,
            cols,
        );
        let ids: Vec<u32> = (0..200).map(|i| (i * 37 % rows) as u32).collect();
        let mut x = vec![f32::NAN; ids.len() * cols];
        Cpu.embed(&Embedding::OnDisk(disk), &ids, &mut x).unwrap();
        for (tok, &id) in ids.iter().enumerate() {
            let want = &table[id as usize * cols..][..cols];
            assert_eq!(&x[tok * cols..][..cols], want, "token {tok} (row {id})");
        }
    }
}
