//! Matrix products with GGML-quantized weights and f32 activations, done the
//! way llama.cpp does them: each activation row is quantized once per call to
//! the weight format's dot-product partner (Q8K for the k-quants, Q8_0 for
//! q4_0 and q8_0), then every output is an integer dot product of two
//! quantized rows, scaled per block (candle's `GgmlType::vec_dot`). Weights
//! are never dequantized, so a matrix-vector product streams only the
//! quantized bytes.
//!
//! Candle chooses its SIMD dot products at compile time, by
//! `cfg(target_feature = "avx2")` (or neon/simd128), not at run time as
//! `kernels::simd` does: a build for the baseline x86-64 target gets its
//! portable scalar loops, 5-8x slower per core than its AVX2 ones (see
//! `matvec_bandwidth`).
//! `RUSTFLAGS="-C target-cpu=x86-64-v3"` (or `native`) selects AVX2.

use std::mem::{align_of, size_of};

use candle_core::quantized::k_quants::GgmlType;
#[cfg(target_arch = "x86_64")]
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K};
use rayon::prelude::*;

use super::{rows_per_task, SharedOut};
use crate::quant::{as_blocks, with_block_type, Block, QuantType};

/// Reusable storage for quantized activations: once it has grown to the
/// largest `[t, cols]` seen, calls allocate nothing.
#[derive(Default)]
pub struct QuantScratch {
    /// u64 words so that any block type (at most 4-byte aligned) fits.
    words: Vec<u64>,
}

/// Reports the size only: the buffer is large and its content meaningless
/// between calls.
impl std::fmt::Debug for QuantScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantScratch")
            .field("bytes", &(self.words.len() * size_of::<u64>()))
            .finish()
    }
}

impl QuantScratch {
    /// `n` blocks of `B`, grown on demand, holding whatever the last call left.
    fn blocks<B: Block>(&mut self, n: usize) -> &mut [B] {
        const { assert!(align_of::<B>() <= align_of::<u64>()) };
        let words = (n * size_of::<B>()).div_ceil(size_of::<u64>());
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        // SAFETY: the words cover `n` blocks and are aligned for `B` (checked
        // above); `Block` makes any bit pattern a valid `B`; the borrow of
        // `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), n) }
    }
}

/// `y[t, o] = sum_i x[t, i] * W[o, i]` with `W` a row-major `[rows, cols]`
/// matrix of `qt` blocks in `w` (`rows * qt.row_bytes(cols)` bytes, 2-byte
/// aligned), `x` a row-major `[t, cols]` f32 matrix and `y` `[t, rows]`.
///
/// Output rows are split across rayon's global pool; within a task each
/// weight row is dotted with every token before the next is loaded, so with
/// several tokens a row is read from memory once. Quantizing the activations
/// to 8 bits costs each dot product an RMS error of 0.5-0.8% of
/// `sqrt(sum_i (w_i x_i)^2)`, compared with f32 products of the dequantized
/// weights.
///
/// # Panics
/// If a length disagrees with the shapes, `cols` does not split into `qt`'s
/// blocks, or `w` is misaligned.
#[allow(clippy::too_many_arguments)]
pub fn matmul_quant(
    qt: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
    scratch: &mut QuantScratch,
) {
    assert_eq!(x.len(), t * cols, "matmul_quant: activation shape");
    assert_eq!(y.len(), t * rows, "matmul_quant: output shape");
    let row_bytes = qt.row_bytes(cols).unwrap_or_else(|| {
        panic!(
            "matmul_quant: {} rows of {cols} weights do not split into blocks of {}",
            qt.name(),
            qt.block_elems()
        )
    });
    assert_eq!(
        w.len(),
        rows * row_bytes,
        "matmul_quant: {} weight bytes for a [{rows}, {cols}] matrix",
        qt.name()
    );
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    // candle picks its SIMD dot products at compile time, so a portable
    // build runs them scalar; the default expert type gets a run-time AVX2
    // path of our own.
    #[cfg(target_arch = "x86_64")]
    if qt == QuantType::Q4K && super::simd::has_avx2() {
        return matmul_typed::<BlockQ4K>(w, rows, cols, x, t, y, scratch, q4k_dot_avx2);
    }
    with_block_type!(qt, B => matmul_typed::<B>(w, rows, cols, x, t, y, scratch, B::vec_dot));
}

/// A block dot product: `n` weights of a row against one activation row.
type BlockDot<B> = fn(usize, &[B], &[<B as GgmlType>::VecDotType]) -> f32;

#[allow(clippy::too_many_arguments)]
fn matmul_typed<B: Block>(
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
    scratch: &mut QuantScratch,
    dot: BlockDot<B>,
) where
    B::VecDotType: Block,
{
    // The activation blocks must line up one-to-one with the weight blocks.
    const { assert!(B::BLCK_SIZE == B::VecDotType::BLCK_SIZE) };
    let w = as_blocks::<B>(w).unwrap_or_else(|e| panic!("matmul_quant: {e}"));
    let nb = cols / B::BLCK_SIZE;

    let xq = scratch.blocks::<B::VecDotType>(t * nb);
    xq.par_chunks_mut(nb)
        .zip(x.par_chunks(cols))
        .with_min_len((16_384 / cols).max(1))
        .for_each(|(q, x)| B::VecDotType::from_float(x, q));
    let xq = &*xq;

    let chunk = rows_per_task(rows, cols);
    let out = SharedOut(y.as_mut_ptr());
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        for r in c * chunk..((c + 1) * chunk).min(rows) {
            let wr = &w[r * nb..(r + 1) * nb];
            for (tk, xr) in xq.chunks_exact(nb).enumerate() {
                let v = dot(cols, wr, xr);
                // SAFETY: row r belongs to this task only; tk * rows + r < t * rows.
                unsafe { *out.at(tk * rows + r) = v };
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
fn q4k_dot_avx2(_n: usize, xs: &[BlockQ4K], ys: &[BlockQ8K]) -> f32 {
    // SAFETY: both block types are repr(C) plain data; the caller checked
    // that the CPU has AVX2 and FMA.
    unsafe {
        let w = std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs));
        let a = std::slice::from_raw_parts(ys.as_ptr().cast::<u8>(), std::mem::size_of_val(ys));
        q4k_x86::dot(w, a, xs.len().min(ys.len()))
    }
}

/// Q4_K weights against Q8_K activations with AVX2 integer arithmetic.
///
/// A Q4_K block is 256 weights: f16 `d` and `dmin`, twelve bytes packing
/// eight 6-bit scales and eight 6-bit mins, then 128 bytes of nibbles (each
/// 32-byte run holds a 64-weight chunk: low nibbles first, high second). A
/// Q8_K block is f32 `d`, 256 i8 and sixteen i16 sums of 16. The weight is
/// `d*scale_j*q - dmin*min_j`, so a block's dot product is
/// `d*d8*sum_j scale_j*(q4.q8)_j - dmin*d8*sum_j min_j*sum(q8)_j`; the
/// second sum comes from the precomputed `bsums`.
#[cfg(target_arch = "x86_64")]
mod q4k_x86 {
    use std::arch::x86_64::*;

    const Q4K: usize = 144;
    const Q8K: usize = 292;

    /// The eight (scale, min) pairs of a block, as in ggml's get_scale_min_k4.
    #[inline]
    fn scales_mins(s: &[u8]) -> ([i16; 8], [i16; 8]) {
        let (mut sc, mut mn) = ([0i16; 8], [0i16; 8]);
        for j in 0..8 {
            let (a, b) = if j < 4 {
                (s[j] & 63, s[j + 4] & 63)
            } else {
                (
                    (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
                    (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                )
            };
            sc[j] = a as i16;
            mn[j] = b as i16;
        }
        (sc, mn)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(w: &[u8], a: &[u8], blocks: usize) -> f32 {
        assert!(w.len() >= blocks * Q4K && a.len() >= blocks * Q8K);
        let low = _mm256_set1_epi8(0x0F);
        let mut total = 0.0f32;
        for b in 0..blocks {
            let wb = &w[b * Q4K..(b + 1) * Q4K];
            let ab = &a[b * Q8K..(b + 1) * Q8K];
            let d = half::f16::from_le_bytes([wb[0], wb[1]]).to_f32();
            let dmin = half::f16::from_le_bytes([wb[2], wb[3]]).to_f32();
            let d8 = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
            let (sc, mn) = scales_mins(&wb[4..16]);
            let q4 = wb[16..].as_ptr();
            let q8 = ab[4..].as_ptr();
            let mut acc = _mm256_setzero_si256();
            for c in 0..4 {
                let bits = _mm256_loadu_si256(q4.add(32 * c).cast());
                let lo = _mm256_and_si256(bits, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low);
                let a_lo = _mm256_loadu_si256(q8.add(64 * c).cast());
                let a_hi = _mm256_loadu_si256(q8.add(64 * c + 32).cast());
                // u8 x i8 pairs summed into i16: at most 2*15*128, no overflow.
                let p_lo = _mm256_maddubs_epi16(lo, a_lo);
                let p_hi = _mm256_maddubs_epi16(hi, a_hi);
                let s_lo = _mm256_madd_epi16(p_lo, _mm256_set1_epi16(sc[2 * c]));
                let s_hi = _mm256_madd_epi16(p_hi, _mm256_set1_epi16(sc[2 * c + 1]));
                acc = _mm256_add_epi32(acc, _mm256_add_epi32(s_lo, s_hi));
            }
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc);
            let sumi: i32 = lanes.iter().sum();
            let mut mins = 0i32;
            for k in 0..16 {
                let bs = i16::from_le_bytes([ab[260 + 2 * k], ab[261 + 2 * k]]);
                mins += bs as i32 * mn[k / 2] as i32;
            }
            total += d * d8 * sumi as f32 - dmin * d8 * mins as f32;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 Q4_K path against candle's portable one on the same blocks:
    /// both sum the same integers, so only the f32 combination per block
    /// differs; 1e-5 of the products' scale covers that.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q4k_avx2_matches_candle_scalar() {
        if !super::super::simd::has_avx2() {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        for (i, cols) in [256usize, 512, 2048].into_iter().enumerate() {
            let w = quantize(QuantType::Q4K, &normal(cols, 30 + i as u64), cols);
            let wb = as_blocks::<BlockQ4K>(w.bytes()).unwrap();
            let x = normal(cols, 40 + i as u64);
            let mut xq = vec![BlockQ8K::zeros(); cols / 256];
            BlockQ8K::from_float(&x, &mut xq);
            let want = BlockQ4K::vec_dot_unopt(cols, wb, &xq);
            let got = q4k_dot_avx2(cols, wb, &xq);
            let scale: f32 = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(
                (got - want).abs() <= 1e-5 * scale.max(1.0),
                "cols {cols}: {got} vs {want}"
            );
        }
    }
    use crate::quant::dequantize_rows;
    use crate::quant::tests::{normal, quantize, Aligned};

    /// Products from the dequantized weights and unquantized activations in
    /// f64, with the scale each is compared at: `sqrt(sum_i (w_i x_i)^2)`,
    /// the size of a sum of products with random signs.
    fn reference(qt: QuantType, w: &[u8], cols: usize, x: &[f32]) -> Vec<(f64, f64)> {
        let rows = w.len() / qt.row_bytes(cols).unwrap();
        let mut wd = vec![0.0; rows * cols];
        dequantize_rows(qt, w, cols, &mut wd).unwrap();
        x.chunks(cols)
            .flat_map(|xr| {
                wd.chunks(cols).map(move |wr| {
                    let p = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64);
                    (p.clone().sum(), p.map(|v| v * v).sum::<f64>().sqrt())
                })
            })
            .collect()
    }

    /// Every format and token count, on shapes whose row count is not a
    /// multiple of the task chunk (at least 16K weights, so 64 rows of 256
    /// and 32 of 512) and, for the 32-weight formats, rows that are not a
    /// multiple of 256.
    #[test]
    fn matmul_quant_matches_dequantized_reference() {
        let mut scratch = QuantScratch::default();
        let mut worst = 0.0f64;
        for qt in QuantType::ALL {
            let mut shapes = vec![(100, 256), (77, 512)];
            if qt.block_elems() == 32 {
                shapes.push((200, 96));
            }
            for (rows, cols) in shapes {
                let w = quantize(qt, &normal(rows * cols, 10), cols);
                for t in [1, 3, 5] {
                    let x = normal(t * cols, 20 + t as u64);
                    let mut y = vec![f32::NAN; t * rows];
                    matmul_quant(qt, w.bytes(), rows, cols, &x, t, &mut y, &mut scratch);
                    for (i, (&got, (want, scale))) in
                        y.iter().zip(reference(qt, w.bytes(), cols, &x)).enumerate()
                    {
                        let rel = (got as f64 - want).abs() / scale;
                        worst = worst.max(rel);
                        // Rounding the activations to 8 bits costs an RMS
                        // 0.55% of the scale with Q8_0 (max/127 steps over 32
                        // values) and 0.75% with Q8K (max/128 over 256); the
                        // worst of these ~15K outputs measured 0.032. A wrong
                        // block or row index would be off by ~100%.
                        assert!(
                            rel < 0.05,
                            "{} [{rows}, {cols}] t={t} y[{}, {}]: {got} vs {want} ({rel:.4})",
                            qt.name(),
                            i / rows,
                            i % rows
                        );
                    }
                }
            }
        }
        println!("worst error relative to the product scale: {worst:.4}");
    }

    #[test]
    fn warm_scratch_is_reused() {
        let (qt, rows, cols) = (QuantType::Q4K, 8, 512);
        let w = quantize(qt, &normal(rows * cols, 5), cols);
        let mut scratch = QuantScratch::default();
        let mut run = |t: usize| {
            let x = normal(t * cols, 6);
            let mut y = vec![0.0; t * rows];
            matmul_quant(qt, w.bytes(), rows, cols, &x, t, &mut y, &mut scratch);
            scratch.words.as_ptr()
        };
        let warm = run(4);
        assert_eq!(run(1), warm);
        assert_eq!(run(4), warm);
    }

    #[test]
    fn zero_tokens_rows_or_cols_are_empty_products() {
        let (qt, mut s) = (QuantType::Q8_0, QuantScratch::default());
        let w = quantize(qt, &normal(2 * 32, 7), 32);
        matmul_quant(qt, w.bytes(), 2, 32, &[], 0, &mut [], &mut s);
        matmul_quant(qt, &[], 0, 32, &[1.0; 32], 1, &mut [], &mut s);
        let mut y = [f32::NAN; 3];
        matmul_quant(qt, &[], 3, 0, &[], 1, &mut y, &mut s);
        assert_eq!(y, [0.0; 3]);
    }

    #[test]
    #[should_panic(expected = "matmul_quant: Q4K block data at")]
    fn misaligned_weights_panic() {
        let w = Aligned::zeroed(144 + 1);
        let mut y = [0.0];
        let x = [0.0; 256];
        let mut s = QuantScratch::default();
        matmul_quant(
            QuantType::Q4K,
            &w.bytes()[1..],
            1,
            256,
            &x,
            1,
            &mut y,
            &mut s,
        );
    }

    #[test]
    #[should_panic(expected = "matmul_quant: q4_k weight bytes for a [2, 256] matrix")]
    fn short_weights_panic() {
        let w = Aligned::zeroed(144);
        let mut y = [0.0; 2];
        let x = [0.0; 256];
        let mut s = QuantScratch::default();
        matmul_quant(QuantType::Q4K, w.bytes(), 2, 256, &x, 1, &mut y, &mut s);
    }

    #[test]
    #[should_panic(expected = "do not split into blocks of 256")]
    fn partial_blocks_panic() {
        let mut y = [0.0];
        let x = [0.0; 96];
        let mut s = QuantScratch::default();
        matmul_quant(QuantType::Q4K, &[], 1, 96, &x, 1, &mut y, &mut s);
    }

    /// Weight bandwidth of one-token products at the Qwen3-30B-A3B expert
    /// shapes. "hot" reuses one matrix (cache-resident after the first call);
    /// "cold" cycles through copies filling 512 MiB, so weights come from
    /// DRAM as a routed expert's do. Prints which candle dot-product path
    /// this build compiled.
    #[test]
    #[ignore = "timing: cargo test -p smoe --release --lib -- --ignored --nocapture matvec_bandwidth"]
    fn matvec_bandwidth() {
        let path = if cfg!(target_feature = "avx2") {
            "avx2"
        } else {
            "portable scalar (vec_dot_unopt)"
        };
        println!(
            "candle vec_dot path: {path}; {} rayon threads",
            rayon::current_num_threads()
        );
        let mut scratch = QuantScratch::default();
        for qt in [QuantType::Q4K, QuantType::Q8_0] {
            for (rows, cols) in [(2048, 768), (768, 2048)] {
                let one = quantize(qt, &normal(rows * cols, 8), cols);
                let len = one.bytes().len();
                let copies = (512 << 20) / len + 1;
                let mut all = Aligned::zeroed(copies * len);
                for c in all.bytes_mut().chunks_exact_mut(len) {
                    c.copy_from_slice(one.bytes());
                }
                let x = normal(cols, 9);
                let mut y = vec![0.0; rows];
                // Best of five rounds: the minimum is the least disturbed by
                // other load on a shared machine.
                let mut time = |pick: &dyn Fn(usize) -> usize| {
                    let best = (0..5)
                        .map(|_| {
                            let start = std::time::Instant::now();
                            for i in 0..copies {
                                let w = &all.bytes()[pick(i) * len..][..len];
                                matmul_quant(qt, w, rows, cols, &x, 1, &mut y, &mut scratch);
                            }
                            start.elapsed().as_secs_f64() / copies as f64
                        })
                        .fold(f64::INFINITY, f64::min);
                    (best * 1e6, len as f64 / best / 1e9)
                };
                let (hot_us, hot_gbs) = time(&|_| 0);
                let (cold_us, cold_gbs) = time(&|i| i);
                println!(
                    "{} [{rows}, {cols}] {len} bytes: hot {hot_us:.1} us {hot_gbs:.2} GB/s, \
                     cold {cold_us:.1} us {cold_gbs:.2} GB/s",
                    qt.name()
                );
            }
        }
    }
}
