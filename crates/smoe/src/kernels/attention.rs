//! Scaled dot-product attention of new queries against the KV cache.
//!
//! Keys and values are stored position-major (`[pos][kv_head][dim]`), so
//! appending a token is one contiguous write and a head's keys are read
//! with a fixed stride. Keys and values may share one buffer: multi-head
//! latent attention's values are the first `v_dim` elements of its keys.
//!
//! A task is one KV head and a tile of query tokens; its rows are every
//! (token, query head) pair of the tile that reads that KV head, so each key
//! and value row is loaded once for all of them (in decode: once for the
//! whole group of heads sharing it). The rows are the SIMD lanes: a task
//! transposes its queries to `[dim][row]` once, then every key element is
//! broadcast against 8 or 16 rows, so keys and values are read in place,
//! in the cache's own layout, and the per-row softmax is plain vertical
//! vector arithmetic. Scores are `Q_tile x K^T` and the output `P x V`, both
//! register-tiled.
//!
//! Keys are visited in blocks of [`BLOCK`] with an online (flash-style)
//! softmax: each block rescales the running output by `exp(old max - new
//! max)`. The alternative, one block spanning all keys (the materialized
//! score tile), took 1.0 to 1.3 times as long at 512 tokens and 1.4 times
//! at 2048, where a task's tile (32 rows by up to 2048 keys) outgrows L1 and
//! crowds L2 (`benches/kernels.rs` on this project's 2-core machine, three
//! interleaved rounds); and its buffer grows with the context, which would
//! make decode steps allocate.
//! Blocks that the causal (and sliding-window) mask hides from every row of
//! a task are never visited; only blocks that straddle the diagonal or the
//! window's edge pay for a mask.
//!
//! Decode has one token: tasks are KV heads, and when there are fewer of
//! them than the pool has threads to keep busy (multi-head latent attention
//! has one), each head's keys are also split into ranges whose partial
//! softmaxes are merged afterwards. The position-major layout suits decode
//! too: a head's key row is `head_dim` contiguous floats read whole, once
//! for its group, and rows follow at a fixed stride that the prefetcher
//! tracks.

use std::{cell::RefCell, ops::Range};

use super::{for_each_task, with_scratch, SharedOut};

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Query and key elements per head.
    pub head_dim: usize,
    /// Value (and output) elements per head.
    pub v_dim: usize,
    /// Elements per position in `keys` and in `values`.
    pub k_stride: usize,
    pub v_stride: usize,
    /// Multiplies the scores before the softmax.
    pub scale: f32,
    /// Position of the first query; queries are `pos0..pos0 + t`.
    pub pos0: usize,
    pub window: Option<usize>,
}

impl AttnShape {
    /// Grouped-query attention: keys and values of `n_kv_heads` heads of
    /// `head_dim` each, scores scaled by `1/sqrt(head_dim)`.
    pub fn grouped(
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        pos0: usize,
        window: Option<usize>,
    ) -> Self {
        Self {
            n_heads,
            n_kv_heads,
            head_dim,
            v_dim: head_dim,
            k_stride: n_kv_heads * head_dim,
            v_stride: n_kv_heads * head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            pos0,
            window,
        }
    }

    /// Keys `lo..hi` that the query at `qpos` attends to.
    fn visible(&self, qpos: usize) -> (usize, usize) {
        let hi = qpos + 1;
        (self.window.map_or(0, |w| hi.saturating_sub(w)), hi)
    }
}

/// Keys per softmax block: the block's scores for 32 rows (8 KiB) and its
/// keys and values stay in L1 while they are reused.
const BLOCK: usize = 64;
/// Rows per prefill task: enough to reuse each key and value row for several
/// SIMD vectors of rows, few enough to give two threads many tasks to
/// balance the causal mask's uneven work.
const TILE_ROWS: usize = 32;
/// Fewest keys worth a decode task of their own.
const MIN_SPLIT_KEYS: usize = 128;
/// Below any real score, and finite so that `NEG - NEG` is 0, not NaN.
const NEG: f32 = -1e30;

/// `q` is `[t, n_heads * head_dim]`; `keys`/`values` hold positions
/// `0..pos0 + t`; `out` is `[t, n_heads * v_dim]`.
pub fn attention(q: &[f32], keys: &[f32], values: &[f32], s: AttnShape, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = x86::Avx2::new() {
        return run(k, q, keys, values, s, out);
    }
    run(Portable, q, keys, values, s, out)
}

/// How one call is cut into tasks: KV head, token tile, key range.
struct Plan {
    group: usize,
    /// Tokens per tile, and tiles.
    tile: usize,
    tiles: usize,
    splits: usize,
    /// Keys `first..total` are visible to some query; each split takes
    /// `span` of them.
    first: usize,
    total: usize,
    span: usize,
}

impl Plan {
    fn new(s: &AttnShape, t: usize) -> Self {
        let group = s.n_heads / s.n_kv_heads;
        let tile = (TILE_ROWS / group).clamp(1, t);
        let tiles = t.div_ceil(tile);
        let (first, _) = s.visible(s.pos0);
        let total = s.pos0 + t;
        let splits = Self::max_splits(s.n_kv_heads * tiles)
            .min((total - first) / MIN_SPLIT_KEYS)
            .max(1);
        Self {
            group,
            tile,
            tiles,
            splits,
            first,
            total,
            span: (total - first).div_ceil(splits),
        }
    }

    /// Key ranges per (head, tile) so that the pool gets two tasks a
    /// thread; a bound independent of the context, so that the buffer of
    /// partial results is sized once.
    fn max_splits(tasks: usize) -> usize {
        (2 * super::threads()).div_ceil(tasks)
    }

    fn tasks(&self, s: &AttnShape) -> usize {
        s.n_kv_heads * self.tiles * self.splits
    }

    /// The KV head, query tokens and keys of task `i`.
    fn task(&self, i: usize, t: usize) -> (usize, Range<usize>, Range<usize>) {
        let (kvh, tile, split) = (
            i / (self.tiles * self.splits),
            i / self.splits % self.tiles,
            i % self.splits,
        );
        let toks = tile * self.tile..((tile + 1) * self.tile).min(t);
        let k0 = self.first + split * self.span;
        (kvh, toks, k0..(k0 + self.span).min(self.total))
    }

    /// Floats of one task's partial result: unnormalized output rows, then
    /// the rows' maxima and sums.
    fn partial_len(&self, s: &AttnShape) -> usize {
        self.tile * self.group * (s.v_dim + 2)
    }
}

fn run<K: Kernels>(k: K, q: &[f32], keys: &[f32], values: &[f32], s: AttnShape, out: &mut [f32]) {
    let (nh, hd, vd) = (s.n_heads, s.head_dim, s.v_dim);
    let t = q.len() / (nh * hd);
    assert_eq!(q.len(), t * nh * hd, "attention: query shape");
    assert_eq!(out.len(), t * nh * vd, "attention: output shape");
    assert!(
        s.n_kv_heads > 0 && nh % s.n_kv_heads == 0,
        "attention: heads"
    );
    let total = s.pos0 + t;
    assert!(t == 0 || keys.len() >= (total - 1) * s.k_stride + s.n_kv_heads * hd);
    assert!(t == 0 || values.len() >= (total - 1) * s.v_stride + s.n_kv_heads * vd);
    if t == 0 {
        return;
    }
    let plan = Plan::new(&s, t);
    let kv = (keys, values);
    if plan.splits == 1 {
        let o = SharedOut(out.as_mut_ptr());
        for_each_task(plan.tasks(&s), |i| {
            with_scratch(|buf| {
                let (kvh, toks, span) = plan.task(i, t);
                let tile = Tile::attend(buf, k, q, kv, &s, kvh, toks.clone(), span);
                for (r, off) in row_offsets(&s, kvh, toks, vd).enumerate() {
                    let inv = 1.0 / tile.l[r];
                    for d in 0..vd {
                        // SAFETY: rows of (token, head) pairs are this task's
                        // alone, and `off + d` < out.len() (asserted shapes).
                        unsafe { *o.at(off + d) = tile.ot[d * tile.rp + r] * inv };
                    }
                }
            })
        });
        return;
    }
    // The caller's own buffer: tasks borrow their threads' scratch, and the
    // caller may be one of those threads.
    thread_local!(static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) });
    let chunk = plan.partial_len(&s);
    PARTIALS.with_borrow_mut(|parts| {
        let most = s.n_kv_heads * plan.tiles * Plan::max_splits(s.n_kv_heads * plan.tiles);
        parts.resize(most.max(plan.tasks(&s)) * chunk, 0.0);
        let parts = &mut parts[..plan.tasks(&s) * chunk];
        let shared = SharedOut(parts.as_mut_ptr());
        for_each_task(plan.tasks(&s), |i| {
            // SAFETY: task i alone writes partial result i, inside `parts`.
            let part = unsafe { shared.slice(i * chunk, chunk) };
            with_scratch(|buf| {
                let (kvh, toks, span) = plan.task(i, t);
                let tile = Tile::attend(buf, k, q, kv, &s, kvh, toks, span);
                let rows = plan.tile * plan.group;
                let (o, ml) = part.split_at_mut(rows * vd);
                for r in 0..tile.rows {
                    for d in 0..vd {
                        o[r * vd + d] = tile.ot[d * tile.rp + r];
                    }
                    ml[r] = tile.m[r];
                    ml[rows + r] = tile.l[r];
                }
            })
        });
        merge(&plan, &s, t, parts, out);
    });
}

/// Output offsets of a task's rows, in row order: token-major, then the
/// group's heads.
fn row_offsets(
    s: &AttnShape,
    kvh: usize,
    toks: Range<usize>,
    width: usize,
) -> impl Iterator<Item = usize> {
    let (nh, group) = (s.n_heads, s.n_heads / s.n_kv_heads);
    toks.flat_map(move |tok| (0..group).map(move |g| (tok * nh + kvh * group + g) * width))
}

/// Combines the partial softmaxes of each (head, tile)'s key ranges: each
/// is weighted by `exp(its max - the overall max)`.
fn merge(plan: &Plan, s: &AttnShape, t: usize, parts: &[f32], out: &mut [f32]) {
    let (vd, chunk, rows) = (s.v_dim, plan.partial_len(s), plan.tile * plan.group);
    for (i, group) in parts.chunks_exact(chunk * plan.splits).enumerate() {
        let (kvh, toks, _) = plan.task(i * plan.splits, t);
        for (r, off) in row_offsets(s, kvh, toks, vd).enumerate() {
            let ml = |p: &[f32]| (p[rows * vd + r], p[rows * vd + rows + r]);
            let max = group.chunks_exact(chunk).fold(NEG, |m, p| m.max(ml(p).0));
            let dst = &mut out[off..off + vd];
            dst.fill(0.0);
            let mut sum = 0.0;
            for p in group.chunks_exact(chunk) {
                let (m, l) = ml(p);
                let w = (m - max).exp();
                sum += w * l;
                super::simd::axpy(w, &p[r * vd..(r + 1) * vd], dst);
            }
            for v in dst {
                *v /= sum;
            }
        }
    }
}

/// One task's working set, carved from its thread's scratch buffer. Row
/// vectors are `rp` long: the rows rounded up to whole SIMD vectors.
struct Tile<'a> {
    rows: usize,
    rp: usize,
    /// Scaled queries, `[head_dim][rp]`.
    qt: &'a mut [f32],
    /// One block's scores, then probabilities, `[BLOCK][rp]`.
    st: &'a mut [f32],
    /// Unnormalized output, `[v_dim][rp]`.
    ot: &'a mut [f32],
    /// Running maximum score and sum of `exp(score - max)` per row.
    m: &'a mut [f32],
    l: &'a mut [f32],
    alpha: &'a mut [f32],
    /// Visible keys `lo..hi` per row, as floats for vector compares.
    lo: &'a mut [f32],
    hi: &'a mut [f32],
}

impl<'a> Tile<'a> {
    /// Attends the rows of tokens `toks` with KV head `kvh` over the keys
    /// `span` of `kv` (keys and values).
    #[allow(clippy::too_many_arguments)]
    fn attend<K: Kernels>(
        buf: &'a mut Vec<f32>,
        k: K,
        q: &[f32],
        kv: (&[f32], &[f32]),
        s: &AttnShape,
        kvh: usize,
        toks: Range<usize>,
        span: Range<usize>,
    ) -> Self {
        let mut tile = Self::carve(buf, toks.len() * s.n_heads / s.n_kv_heads, s);
        tile.run(k, q, kv, s, kvh, toks, span);
        tile
    }

    fn carve(buf: &'a mut Vec<f32>, rows: usize, s: &AttnShape) -> Self {
        let (hd, vd) = (s.head_dim, s.v_dim);
        let rp = rows.next_multiple_of(8);
        buf.resize(rp * (hd + BLOCK + vd + 5), 0.0);
        let (qt, rest) = buf.split_at_mut(rp * hd);
        let (st, rest) = rest.split_at_mut(rp * BLOCK);
        let (ot, rest) = rest.split_at_mut(rp * vd);
        let (m, rest) = rest.split_at_mut(rp);
        let (l, rest) = rest.split_at_mut(rp);
        let (alpha, rest) = rest.split_at_mut(rp);
        let (lo, hi) = rest.split_at_mut(rp);
        Self {
            rows,
            rp,
            qt,
            st,
            ot,
            m,
            l,
            alpha,
            lo,
            hi,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run<K: Kernels>(
        &mut self,
        k: K,
        q: &[f32],
        (keys, values): (&[f32], &[f32]),
        s: &AttnShape,
        kvh: usize,
        toks: Range<usize>,
        span: Range<usize>,
    ) {
        let (hd, vd, rp) = (s.head_dim, s.v_dim, self.rp);
        let group = s.n_heads / s.n_kv_heads;
        if rp != self.rows {
            // Padding lanes: zero queries and no visible key, so they stay
            // finite and are never written out.
            self.qt.fill(0.0);
            self.lo.fill(0.0);
            self.hi.fill(0.0);
        }
        let (mut first, mut last) = (usize::MAX, 0);
        let (mut all_from, mut all_to) = (0, usize::MAX);
        for (r, off) in row_offsets(s, kvh, toks.clone(), hd).enumerate() {
            for (d, v) in q[off..off + hd].iter().enumerate() {
                self.qt[d * rp + r] = v * s.scale;
            }
            let (lo, hi) = s.visible(s.pos0 + toks.start + r / group);
            let (lo, hi) = (lo.max(span.start), hi.min(span.end).max(lo));
            (first, last) = (first.min(lo), last.max(hi));
            (all_from, all_to) = (all_from.max(lo), all_to.min(hi));
            self.lo[r] = lo as f32;
            self.hi[r] = hi as f32;
        }
        self.ot.fill(0.0);
        self.m.fill(NEG);
        self.l.fill(0.0);
        let mut b0 = first;
        while b0 < last {
            let n = BLOCK.min(last - b0);
            let kb = &keys[b0 * s.k_stride + kvh * hd..][..(n - 1) * s.k_stride + hd];
            let scores = Product {
                lanes: self.qt,
                rp,
                steps: hd,
                b: kb,
                b_row: s.k_stride,
                b_step: 1,
                add: false,
            };
            k.product(scores, n, self.st);
            let mask = (b0 < all_from || b0 + n > all_to).then_some((&*self.lo, &*self.hi));
            let (m, l, alpha) = (&mut *self.m, &mut *self.l, &mut *self.alpha);
            k.softmax(self.st, Block { rp, n, b0, mask }, Running { m, l, alpha });
            if self.alpha.iter().any(|&a| a != 1.0) {
                for row in self.ot.chunks_exact_mut(rp) {
                    for (o, a) in row.iter_mut().zip(&*self.alpha) {
                        *o *= a;
                    }
                }
            }
            let vb = &values[b0 * s.v_stride + kvh * vd..][..(n - 1) * s.v_stride + vd];
            let weighted = Product {
                lanes: self.st,
                rp,
                steps: n,
                b: vb,
                b_row: 1,
                b_step: s.v_stride,
                add: true,
            };
            k.product(weighted, vd, self.ot);
            b0 += n;
        }
    }
}

/// `o[i][r] = sum_x b[i * b_row + x * b_step] * lanes[x][r]` (added to
/// `o` with `add`) for `x < steps`, `r < rp`: a small GEMM whose columns
/// are a task's rows. Scores are keys (rows `i`) times transposed queries;
/// the output is values' elements (rows `i`) times the block's weights.
#[derive(Clone, Copy)]
struct Product<'a> {
    lanes: &'a [f32],
    rp: usize,
    steps: usize,
    b: &'a [f32],
    b_row: usize,
    b_step: usize,
    add: bool,
}

/// `n` keys from `b0` over `rp` row lanes, and, when some of them are
/// hidden from some rows, each row's visible keys `lo..hi`.
#[derive(Clone, Copy)]
struct Block<'a> {
    rp: usize,
    n: usize,
    b0: usize,
    mask: Option<(&'a [f32], &'a [f32])>,
}

/// Each row's running maximum score, sum of `exp(score - max)`, and the
/// factor the last block scaled them by.
struct Running<'a> {
    m: &'a mut [f32],
    l: &'a mut [f32],
    alpha: &'a mut [f32],
}

/// The inner loops, on one task's `rp` row lanes (`rp` a multiple of 8).
trait Kernels: Copy + Send + Sync {
    /// Rows `0..count` of `p` into `o` (`[count][rp]`).
    fn product(self, p: Product<'_>, count: usize, o: &mut [f32]);

    /// One block of the online softmax: with the block's mask hiding
    /// scores, raises each row's max `m` to the block's, turns `st` into
    /// `exp(score - m)` (0 where hidden), adds those to the row sums `l`
    /// after scaling them by `alpha = exp(old m - new m)`.
    fn softmax(self, st: &mut [f32], b: Block<'_>, run: Running<'_>);
}

/// Plain Rust, for CPUs without AVX2 and as the reference the SIMD path is
/// tested against.
#[derive(Clone, Copy)]
struct Portable;

impl Kernels for Portable {
    fn product(self, p: Product<'_>, count: usize, o: &mut [f32]) {
        for (i, orow) in o.chunks_exact_mut(p.rp).take(count).enumerate() {
            if !p.add {
                orow.fill(0.0);
            }
            for (x, lrow) in p.lanes.chunks_exact(p.rp).take(p.steps).enumerate() {
                let b = p.b[i * p.b_row + x * p.b_step];
                for (o, l) in orow.iter_mut().zip(lrow) {
                    *o += b * l;
                }
            }
        }
    }

    fn softmax(self, st: &mut [f32], b: Block<'_>, run: Running<'_>) {
        let (Block { rp, n, b0, mask }, Running { m, l, alpha }) = (b, run);
        for r in 0..rp {
            let shown = |j: usize| {
                mask.is_none_or(|(lo, hi)| {
                    let p = (b0 + j) as f32;
                    p >= lo[r] && p < hi[r]
                })
            };
            let max = (0..n)
                .filter(|&j| shown(j))
                .fold(m[r], |a, j| a.max(st[j * rp + r]));
            let mut sum = 0.0;
            for j in 0..n {
                let p = &mut st[j * rp + r];
                *p = if shown(j) { (*p - max).exp() } else { 0.0 };
                sum += *p;
            }
            alpha[r] = (m[r] - max).exp();
            l[r] = l[r] * alpha[r] + sum;
            m[r] = max;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Block, Kernels, Product, Running, NEG};

    /// Proof that the CPU has AVX2 and FMA: only [`Avx2::new`] makes one.
    #[derive(Clone, Copy)]
    pub struct Avx2(());

    impl Avx2 {
        pub fn new() -> Option<Self> {
            super::super::simd::has_avx2().then_some(Avx2(()))
        }
    }

    /// Calls `$f::<R, $w>` for the `R` in `1..=4` that `$r` names: the
    /// register tile's height, shortened at the product's last rows.
    macro_rules! by_height {
        ($r:expr, $f:ident, $w:literal, ($($a:expr),*)) => {
            match $r {
                4 => $f::<4, $w>($($a),*),
                3 => $f::<3, $w>($($a),*),
                2 => $f::<2, $w>($($a),*),
                _ => $f::<1, $w>($($a),*),
            }
        };
    }

    impl Kernels for Avx2 {
        fn product(self, p: Product<'_>, count: usize, o: &mut [f32]) {
            let Product { rp, steps, .. } = p;
            assert!(count > 0 && steps > 0 && rp.is_multiple_of(8));
            assert!(p.lanes.len() >= steps * rp && o.len() >= count * rp);
            assert!(p.b.len() > (count - 1) * p.b_row + (steps - 1) * p.b_step);
            let (l, b, o) = (p.lanes.as_ptr(), p.b.as_ptr(), o.as_mut_ptr());
            // SAFETY: the CPU has AVX2 and FMA (self exists); the tiles read
            // lanes rows x < steps, b at i * b_row + x * b_step for i <
            // count, and write o's rows i < count, all within the asserted
            // lengths.
            unsafe {
                for i in (0..count).step_by(4) {
                    let (b, o) = (b.add(i * p.b_row), o.add(i * rp));
                    let h = (count - i).min(4);
                    let at = |r| RegTile {
                        l: l.add(r),
                        b,
                        o: o.add(r),
                        rp,
                        steps,
                        b_row: p.b_row,
                        b_step: p.b_step,
                        add: p.add,
                    };
                    let mut r = 0;
                    while r + 16 <= rp {
                        by_height!(h, tile, 2, (at(r)));
                        r += 16;
                    }
                    if r < rp {
                        by_height!(h, tile, 1, (at(r)));
                    }
                }
            }
        }

        fn softmax(self, st: &mut [f32], b: Block<'_>, run: Running<'_>) {
            let rp = b.rp;
            assert!(rp.is_multiple_of(8) && st.len() >= b.n * rp);
            assert!(run.m.len() >= rp && run.l.len() >= rp && run.alpha.len() >= rp);
            assert!(b
                .mask
                .is_none_or(|(lo, hi)| lo.len() >= rp && hi.len() >= rp));
            // SAFETY: AVX2 and FMA as above; every access is at r + 0..8
            // for r < rp, in rows j < n of st.
            unsafe { softmax(st, b, run) }
        }
    }

    /// One register tile of a [`Product`]: `R` rows by `8 * W` lanes.
    #[derive(Clone, Copy)]
    struct RegTile {
        l: *const f32,
        b: *const f32,
        o: *mut f32,
        rp: usize,
        steps: usize,
        b_row: usize,
        b_step: usize,
        add: bool,
    }

    /// Per step, `R` broadcasts and `W` loads feed `R * W` FMAs into
    /// accumulators that stay in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const W: usize>(t: RegTile) {
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        if t.add {
            for (i, a) in acc.iter_mut().enumerate() {
                for (w, x) in a.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(t.o.add(i * t.rp + 8 * w));
                }
            }
        }
        for x in 0..t.steps {
            let mut lv = [_mm256_setzero_ps(); W];
            for (w, v) in lv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(t.l.add(x * t.rp + 8 * w));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let bv = _mm256_set1_ps(*t.b.add(i * t.b_row + x * t.b_step));
                for w in 0..W {
                    a[w] = _mm256_fmadd_ps(bv, lv[w], a[w]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (w, x) in a.iter().enumerate() {
                _mm256_storeu_ps(t.o.add(i * t.rp + 8 * w), *x);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax(st: &mut [f32], b: Block<'_>, run: Running<'_>) {
        let (Block { rp, n, b0, mask }, Running { m, l, alpha }) = (b, run);
        let s = st.as_mut_ptr();
        for r in (0..rp).step_by(8) {
            let shown = |j: usize| match mask {
                Some((lo, hi)) => {
                    let p = _mm256_set1_ps((b0 + j) as f32);
                    let lo = _mm256_loadu_ps(lo.as_ptr().add(r));
                    let hi = _mm256_loadu_ps(hi.as_ptr().add(r));
                    _mm256_and_ps(
                        _mm256_cmp_ps::<_CMP_GE_OQ>(p, lo),
                        _mm256_cmp_ps::<_CMP_LT_OQ>(p, hi),
                    )
                }
                None => _mm256_castsi256_ps(_mm256_set1_epi32(-1)),
            };
            let old = _mm256_loadu_ps(m.as_ptr().add(r));
            let mut max = old;
            for j in 0..n {
                let v = _mm256_loadu_ps(s.add(j * rp + r));
                max = _mm256_max_ps(max, _mm256_blendv_ps(_mm256_set1_ps(NEG), v, shown(j)));
            }
            let mut sum = _mm256_setzero_ps();
            for j in 0..n {
                let at = s.add(j * rp + r);
                let e = _mm256_and_ps(exp(_mm256_sub_ps(_mm256_loadu_ps(at), max)), shown(j));
                _mm256_storeu_ps(at, e);
                sum = _mm256_add_ps(sum, e);
            }
            let a = exp(_mm256_sub_ps(old, max));
            _mm256_storeu_ps(alpha.as_mut_ptr().add(r), a);
            let lv = _mm256_loadu_ps(l.as_ptr().add(r));
            _mm256_storeu_ps(l.as_mut_ptr().add(r), _mm256_fmadd_ps(lv, a, sum));
            _mm256_storeu_ps(m.as_mut_ptr().add(r), max);
        }
    }

    /// `e^x` to about 2 ulp (Cephes' `expf`): `x = n ln2 + f`, a degree-5
    /// polynomial for `e^f`, and `2^n` built in the exponent bits. Inputs
    /// below -88.4 give 0, as a hidden score's weight must be.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-88.376_26)),
            _mm256_set1_ps(88.376_26),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        // ln 2 in two parts, so that `n * ln2` is exact in the first.
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), f);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_66,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(f, f),
            _mm256_add_ps(f, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvttps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    #[test]
    fn single_key_returns_its_value_and_window_masks() {
        let s = AttnShape::grouped(2, 1, 2, 0, None);
        let q = [1.0, 0.0, 0.0, 1.0];
        let mut out = [0.0; 4];
        attention(&q, &[0.5, 0.5], &[3.0, 4.0], s, &mut out);
        assert_eq!(out, [3.0, 4.0, 3.0, 4.0]);

        // Two positions, window 1: the query at position 1 sees only itself.
        let s = AttnShape::grouped(1, 1, 2, 1, Some(1));
        let mut out = [0.0; 2];
        attention(
            &[1.0, 1.0],
            &[9.0, 9.0, 0.0, 0.0],
            &[1.0, 1.0, 5.0, 6.0],
            s,
            &mut out,
        );
        assert_eq!(out, [5.0, 6.0]);
    }

    /// Attention by the definition, one (token, head) at a time, in f64.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], s: &AttnShape) -> Vec<f64> {
        let (nh, hd, vd) = (s.n_heads, s.head_dim, s.v_dim);
        let group = nh / s.n_kv_heads;
        let t = q.len() / (nh * hd);
        let mut out = vec![0.0; t * nh * vd];
        for tok in 0..t {
            for h in 0..nh {
                let kvh = h / group;
                let qv = &q[(tok * nh + h) * hd..][..hd];
                let qpos = s.pos0 + tok;
                let first = s.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
                let scores: Vec<f64> = (first..=qpos)
                    .map(|p| {
                        let k = &keys[p * s.k_stride + kvh * hd..][..hd];
                        let dot: f64 = qv.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot * s.scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                for (p, w) in (first..=qpos).zip(&w) {
                    let v = &values[p * s.v_stride + kvh * vd..][..vd];
                    for d in 0..vd {
                        out[(tok * nh + h) * vd + d] += w / sum * v[d] as f64;
                    }
                }
            }
        }
        out
    }

    /// Random shapes covering the paths: group sizes 1 to 16 (so rows that
    /// fill no whole vector), head sizes that are no multiple of 8,
    /// multi-head latent attention's shared, wider key rows, windows, prefill
    /// from position 0 and chunks after a prefix, many blocks, and decode
    /// with its key-range splits.
    /// Heads, KV heads, head_dim, v_dim (0: grouped, else latent), pos0, t,
    /// window.
    type Case = (usize, usize, usize, usize, usize, usize, Option<usize>);

    #[test]
    fn matches_reference_on_random_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (32, 4, 128, 0, 0, 150, None),
            (32, 4, 128, 0, 300, 1, None),
            (8, 8, 20, 0, 7, 5, None),
            (6, 2, 13, 0, 3, 40, Some(9)),
            (6, 2, 13, 0, 200, 1, Some(70)),
            (4, 1, 64, 0, 400, 1, None),
            (12, 4, 17, 0, 90, 33, Some(100)),
            (3, 1, 7, 0, 0, 1, None),
            (16, 1, 40, 33, 0, 21, None),
            (16, 1, 40, 33, 500, 1, None),
            (5, 1, 24, 19, 70, 6, None),
            (5, 1, 24, 19, 70, 0, None),
        ];
        for &(nh, nkv, hd, mla_v, pos0, t, window) in cases {
            let s = if mla_v > 0 {
                AttnShape {
                    n_heads: nh,
                    n_kv_heads: 1,
                    head_dim: hd,
                    v_dim: mla_v,
                    k_stride: hd,
                    v_stride: hd,
                    scale: 0.3,
                    pos0,
                    window,
                }
            } else {
                AttnShape::grouped(nh, nkv, hd, pos0, window)
            };
            let total = pos0 + t;
            let mut rand = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| (rng.next_u32() >> 8) as f32 / (1 << 22) as f32 - 2.0)
                    .collect()
            };
            let q = rand(t * nh * hd);
            let keys = rand(total * s.k_stride);
            let own_values = rand(total * s.v_stride);
            let values = if mla_v > 0 { &keys } else { &own_values };
            let want = reference(&q, &keys, values, &s);
            for name in ["dispatched", "portable"] {
                let mut out = vec![f32::NAN; t * nh * s.v_dim];
                if name == "portable" {
                    run(Portable, &q, &keys, values, s, &mut out);
                } else {
                    attention(&q, &keys, values, s, &mut out);
                }
                // Each output is a convex combination of values below 2 in
                // magnitude. A score is an f32 sum of up to 128 products below
                // 4 (times a scale below 1), off by at most ~128 * 4 * 2^-24
                // = 3e-5; through exp that is a relative weight error of 3e-5,
                // so 6e-5 on the output, plus exp's 2 ulp and the f32 sums of
                // up to 500 weighted values (~500 * 2 * 2^-24 = 6e-5 worst
                // case, far less in practice). 2e-4 bounds all of it.
                for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 2e-4,
                        "{name} {s:?} t={t} at {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
