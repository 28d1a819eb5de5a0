//! Kernel micro-benchmarks: weight bandwidth of quantized matrix-vector and
//! matrix-matrix products at Qwen3-30B-A3B's expert shapes (and Q6_K's
//! matrix-vector product at its LM head's), with bf16 (the
//! unquantized backbone's format) as the baseline measured in the same run,
//! and each quantized format also through the token-by-token path, to show
//! what the multi-token kernels gain.
//!
//! Attention is timed at Qwen3-30B-A3B's shape (32 query heads, 4 KV heads
//! of 128): prefill of 512 and 2048 tokens from position 0, and one decode
//! token after as many, reported as time per call and GFLOP/s of the visible
//! (unmasked) scores and weighted values.
//!
//! The `gguf` group is one table of every GGML type smoe computes with
//! (F32, F16, BF16 and every block format, from `GgmlType::computed`): the
//! decode matrix-vector product's GB/s at the expert shapes, cold and hot,
//! with bits per weight and the time against bf16's in the same run, and a
//! 32-token (prefill) product's.
//!
//! `cargo bench -p smoe --bench kernels` (add `-- --threads N` to size the
//! pool; default: one thread per logical CPU; `-- matmul`, `-- gguf` or
//! `-- attention` runs only that group).
//!
//! "cold" cycles through copies of the matrix filling 512 MiB, so every call
//! streams its weights from DRAM as a routed expert's first use does; "hot"
//! reuses one copy that stays in cache. Each figure is the median of 7
//! rounds; a round times one call per copy for one token, and 1/t as many
//! calls, spread over the copies, for t tokens.

use std::time::Instant;

use smoe::gguf::GgmlType;
use smoe::kernels::{attention, matmul, matmul_token_by_token, AttnShape, DType, Matrix};
use smoe::quant::{quantize_rows, QuantType};

/// Tokens per product: decode, prefill chunks' shares of one expert, and a
/// 128-token attention projection.
const TOKENS: [usize; 4] = [1, 8, 32, 128];
const BF16: DType = DType::BF16;
const Q8_0: DType = DType::Quant(QuantType::Q8_0);
const Q4K: DType = DType::Quant(QuantType::Q4K);
const Q4_0: DType = DType::Quant(QuantType::Q4_0);
const Q6K: DType = DType::Quant(QuantType::Q6K);
/// `(rows, cols, tokens, types)`, bf16 first as the baseline: the expert
/// projections, gate/up `[768, 2048]` and down `[2048, 768]`; then the
/// matrix-vector product of Q6_K, the LM head's type in a 4-bit backbone,
/// at the down shape and at the LM head's own, `[151936, 2048]`.
const CASES: [Case; 4] = [
    (768, 2048, &TOKENS, &[BF16, Q8_0, Q4K, Q4_0]),
    (2048, 768, &TOKENS, &[BF16, Q8_0, Q4K, Q4_0]),
    (2048, 768, &[1], &[BF16, Q6K]),
    (151_936, 2048, &[1], &[BF16, Q8_0, Q4K, Q6K]),
];
/// The expert shapes the GGUF table times, `(rows, cols)`: gate/up and
/// down; both are whole 256-weight blocks.
const GGUF_SHAPES: [(usize, usize); 2] = [(768, 2048), (2048, 768)];
/// Tokens of the GGUF table's prefill column: weight bytes over the time
/// of one product with this many tokens, at the first expert shape.
const PREFILL: usize = 32;
type Case = (usize, usize, &'static [usize], &'static [DType]);
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
        DType::F16 => {
            for (d, v) in bytes.chunks_exact_mut(2).zip(&src) {
                d.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        DType::F32 => {
            for (d, v) in bytes.chunks_exact_mut(4).zip(&src) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
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
        smoe::kernels::set_threads(n);
    }
    let groups = ["matmul", "gguf", "attention"];
    let only = |group: &str| {
        !args.iter().any(|a| groups.contains(&a.as_str())) || args.iter().any(|a| a == group)
    };
    if only("matmul") {
        bench_matmul(&CASES);
    }
    if only("gguf") {
        bench_gguf();
    }
    if only("attention") {
        bench_attention();
    }
}

fn bench_matmul(cases: &[Case]) {
    println!(
        "{} threads; GB/s = weight bytes / time, median of {ROUNDS}; \
         \"1-tok\" rows: quantized weights dotted with one token per kernel call",
        smoe::kernels::threads()
    );
    println!(
        "{:<6} {:>6} {:>12} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "dtype",
        "path",
        "shape",
        "tokens",
        "hot us",
        "hot GB/s",
        "cold us",
        "cold GB/s",
        "vs bf16",
        "vs 1-tok"
    );
    let paths: [(&str, Matmul); 2] = [("1-tok", matmul_token_by_token), ("tiled", matmul)];
    for &(rows, cols, tokens, dtypes) in cases {
        for &t in tokens {
            let mut bf16_cold = None;
            for &dtype in dtypes {
                let len = rows * dtype.row_bytes(cols);
                let quant = matches!(dtype, DType::Quant(_));
                let paths = if quant { &paths[..] } else { &paths[1..] };
                let funcs: Vec<Matmul> = paths.iter().map(|p| p.1).collect();
                let (hot, cold) = time_products(dtype, rows, cols, t, &funcs);
                let base = *bf16_cold.get_or_insert(cold[0]);
                for (p, (name, _)) in paths.iter().enumerate() {
                    let vs_one = if quant {
                        format!("{:.2}x", cold[0] / cold[p])
                    } else {
                        String::new()
                    };
                    println!(
                        "{:<6} {:>6} {:>12} {:>6} {:>10.1} {:>10.2} {:>10.1} {:>10.2} {:>8.2}x {:>9}",
                        dtype.name(),
                        if quant { name } else { "" },
                        format!("{rows}x{cols}"),
                        t,
                        hot[p] * 1e6,
                        len as f64 / hot[p] / 1e9,
                        cold[p] * 1e6,
                        len as f64 / cold[p] / 1e9,
                        base / cold[p],
                        vs_one
                    );
                }
            }
        }
    }
}

type Matmul = fn(&[f32], usize, Matrix<'_>, &mut [f32]);

/// Seconds per call of each of `funcs` on `t` tokens of a `rows x cols`
/// matrix of `dtype`, hot and cold, the medians of [`ROUNDS`].
fn time_products(
    dtype: DType,
    rows: usize,
    cols: usize,
    t: usize,
    funcs: &[Matmul],
) -> (Vec<f64>, Vec<f64>) {
    let len = rows * dtype.row_bytes(cols);
    let one = weights(dtype, rows, cols);
    let copies = COLD_BYTES / len + 1;
    let mut all = vec![0u64; copies * len.div_ceil(8)];
    let stride = len.div_ceil(8);
    for c in all.chunks_exact_mut(stride) {
        c.copy_from_slice(&one);
    }
    // Products of many tokens take long enough that fewer calls, spread
    // over the copies, keep each round's time near that of one token.
    let calls = (copies / t).max(4);
    let x = values(t * cols, 9);
    let mut y = vec![0.0f32; t * rows];
    // The functions are timed round by round, interleaved, so that their
    // ratio sees the same machine load.
    let mut time = |cold: bool| {
        let mut per_call = vec![Vec::new(); funcs.len()];
        for _ in 0..ROUNDS {
            for (p, f) in funcs.iter().enumerate() {
                let start = Instant::now();
                for i in 0..calls {
                    let at = if cold { i * copies / calls * stride } else { 0 };
                    let w = Matrix::new(dtype, bytes(&all[at..], len), rows, cols);
                    f(&x, t, w, &mut y);
                }
                per_call[p].push(start.elapsed().as_secs_f64() / calls as f64);
            }
        }
        per_call.into_iter().map(median).collect::<Vec<_>>()
    };
    let hot = time(false);
    let cold = time(true);
    (hot, cold)
}

/// One line per GGML type smoe computes with: one decoded token's product
/// at each expert shape, weights streamed from DRAM (cold) and from cache
/// (hot), with bf16's cold time over its own; then a [`PREFILL`]-token
/// product at the first shape.
fn bench_gguf() {
    let types: Vec<(GgmlType, DType)> = GgmlType::computed().collect();
    let bf16: Vec<f64> = GGUF_SHAPES
        .iter()
        .map(|&(rows, cols)| time_products(BF16, rows, cols, 1, &[matmul]).1[0])
        .collect();
    println!(
        "\nGGUF types, one decoded token (matrix-vector), {} threads; GB/s = stored bytes / time, \
         median of {ROUNDS}; cold: weights from DRAM, hot: from cache; vs bf16: bf16's cold time / this one's",
        smoe::kernels::threads()
    );
    let mut header = format!("{:<8} {:>6}", "type", "bits/w");
    for (rows, cols) in GGUF_SHAPES {
        let shape = format!("{rows}x{cols}");
        header += &format!(" | {shape:>9} cold GB/s {:>8} {:>7}", "hot GB/s", "vs bf16");
    }
    let (rows, cols) = GGUF_SHAPES[0];
    header += &format!(" | {PREFILL}-tok {rows}x{cols} GB/s");
    println!("{header}");
    for (g, dtype) in types {
        let cols = GGUF_SHAPES[0].1;
        let bits = 8.0 * dtype.row_bytes(cols) as f64 / cols as f64;
        let mut line = format!("{:<8} {bits:>6.2}", g.name());
        for (&(rows, cols), base) in GGUF_SHAPES.iter().zip(&bf16) {
            let len = (rows * dtype.row_bytes(cols)) as f64;
            let (hot, cold) = time_products(dtype, rows, cols, 1, &[matmul]);
            line += &format!(
                " | {:>19.2} {:>8.2} {:>6.2}x",
                len / cold[0] / 1e9,
                len / hot[0] / 1e9,
                base / cold[0]
            );
        }
        // A prefill chunk's share of an expert: compute-bound, so hot only.
        let (rows, cols) = GGUF_SHAPES[0];
        let len = (rows * dtype.row_bytes(cols)) as f64;
        let (hot, _) = time_products(dtype, rows, cols, PREFILL, &[matmul]);
        line += &format!(" | {:>22.2}", len / hot[0] / 1e9);
        println!("{line}");
    }
}

/// Qwen3-30B-A3B's attention: query heads, KV heads, head size.
const ATTN: (usize, usize, usize) = (32, 4, 128);

fn bench_attention() {
    let (nh, nkv, hd) = ATTN;
    println!("\nattention {nh} heads, {nkv} KV heads of {hd}; median of {ROUNDS} calls");
    println!(
        "{:<8} {:>8} {:>8} {:>10} {:>8}",
        "phase", "keys", "tokens", "ms", "GFLOP/s"
    );
    for ctx in [512, 2048] {
        for (phase, pos0, t) in [("prefill", 0, ctx), ("decode", ctx, 1)] {
            let total = pos0 + t;
            let q = values(t * nh * hd, 3);
            let keys = values(total * nkv * hd, 4);
            let vals = values(total * nkv * hd, 5);
            let mut out = vec![0.0f32; t * nh * hd];
            let s = AttnShape::grouped(nh, nkv, hd, pos0, None);
            let times: Vec<f64> = (0..ROUNDS + 1)
                .map(|_| {
                    let start = Instant::now();
                    attention(&q, &keys, &vals, s, &mut out);
                    start.elapsed().as_secs_f64()
                })
                .skip(1)
                .collect();
            let secs = median(times);
            // Each visible (query, key) pair costs a dot product and an
            // axpy of `hd` elements per head: 4 * hd flops.
            let visible: usize = (pos0 + 1..=total).sum();
            let flops = 4.0 * (hd * nh * visible) as f64;
            println!(
                "{:<8} {:>8} {:>8} {:>10.3} {:>8.1}",
                phase,
                total,
                t,
                secs * 1e3,
                flops / secs / 1e9
            );
        }
    }
}
