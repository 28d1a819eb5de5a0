//! Kernel micro-benchmarks: weight bandwidth of quantized matrix-vector and
//! matrix-matrix products at Qwen3-30B-A3B's expert shapes, with bf16 (the
//! unquantized backbone's format) as the baseline measured in the same run.
//!
//! `cargo bench -p smoe --bench kernels` (add `-- --threads N` to pin the
//! pool; default: rayon's, one per logical CPU).
//!
//! "cold" cycles through copies of the matrix filling 512 MiB, so every call
//! streams its weights from DRAM as a routed expert's first use does; "hot"
//! reuses one copy that stays in cache. Each figure is the median of 7
//! rounds, each round timing every copy once.

use std::time::Instant;

use smoe::kernels::{matmul, DType, Matrix};
use smoe::quant::{quantize_rows, QuantType};

/// The expert projections: gate/up `[768, 2048]`, down `[2048, 768]`.
const SHAPES: [(usize, usize); 2] = [(768, 2048), (2048, 768)];
/// Tokens per product: decode, and a prefill chunk's share of one expert.
const TOKENS: [usize; 2] = [1, 32];
const COLD_BYTES: usize = 512 << 20;
const ROUNDS: usize = 7;

/// Deterministic values of unit scale (no RNG crate needed for a benchmark).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Weight bytes in u64 words, so block data is aligned as the loader's is.
fn weights(dtype: DType, rows: usize, cols: usize) -> Vec<u64> {
    let len = rows * dtype.row_bytes(cols);
    let mut words = vec![0u64; len.div_ceil(8)];
    let bytes = bytes_mut(&mut words, len);
    let src = values(rows * cols, 7);
    match dtype {
        DType::Quant(q) => quantize_rows(q, &src, cols, bytes).expect("quantize"),
        DType::BF16 => {
            for (d, v) in bytes.chunks_exact_mut(2).zip(&src) {
                d.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
        _ => unreachable!("not benchmarked"),
    }
    words
}

fn bytes_mut(words: &mut [u64], len: usize) -> &mut [u8] {
    // SAFETY: the words hold at least `len` bytes; u8 has no alignment needs.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), len) }
}

fn bytes(words: &[u64], len: usize) -> &[u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), len) }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--threads N");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .expect("thread pool");
    }
    println!(
        "{} threads; GB/s = weight bytes / time, median of {ROUNDS}",
        rayon::current_num_threads()
    );
    println!(
        "{:<6} {:>12} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "dtype", "shape", "tokens", "hot us", "hot GB/s", "cold us", "cold GB/s", "vs bf16"
    );
    for (rows, cols) in SHAPES {
        for t in TOKENS {
            let mut bf16_cold = None;
            for dtype in [
                DType::BF16,
                DType::Quant(QuantType::Q8_0),
                DType::Quant(QuantType::Q4K),
            ] {
                let len = rows * dtype.row_bytes(cols);
                let one = weights(dtype, rows, cols);
                let copies = COLD_BYTES / len + 1;
                let mut all = vec![0u64; copies * len.div_ceil(8)];
                let stride = len.div_ceil(8);
                for c in all.chunks_exact_mut(stride) {
                    c.copy_from_slice(&one);
                }
                let x = values(t * cols, 9);
                let mut y = vec![0.0f32; t * rows];
                let mut time = |cold: bool| {
                    let per_call: Vec<f64> = (0..ROUNDS)
                        .map(|_| {
                            let start = Instant::now();
                            for i in 0..copies {
                                let at = if cold { i * stride } else { 0 };
                                let w = Matrix::new(dtype, bytes(&all[at..], len), rows, cols);
                                matmul(&x, t, w, &mut y);
                            }
                            start.elapsed().as_secs_f64() / copies as f64
                        })
                        .collect();
                    let s = median(per_call);
                    (s * 1e6, len as f64 / s / 1e9)
                };
                let (hot_us, hot_gbs) = time(false);
                let (cold_us, cold_gbs) = time(true);
                let base = *bf16_cold.get_or_insert(cold_us);
                println!(
                    "{:<6} {:>12} {:>6} {:>10.1} {:>10.2} {:>10.1} {:>10.2} {:>8.2}x",
                    dtype.name(),
                    format!("{rows}x{cols}"),
                    t,
                    hot_us,
                    hot_gbs,
                    cold_us,
                    cold_gbs,
                    base / cold_us
                );
            }
        }
    }
}
