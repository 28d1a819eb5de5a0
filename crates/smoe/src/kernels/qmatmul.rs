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
//! portable scalar loops, 5-8x slower per core than its AVX2 ones; every
//! block format runs our own run-time-dispatched AVX2 or AVX-512 dot
//! products instead (`qdot_x86`, `qdot_avx512`), and NEON ones on ARM
//! (`qdot_arm`). `cargo bench -p smoe --bench kernels` measures them.

use std::mem::{align_of, size_of};

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::qdot::by_row;
use super::{for_each_task, threads, SharedOut};
#[cfg(target_arch = "x86_64")]
use super::{qdot_avx512, qdot_x86};
#[cfg(not(target_arch = "aarch64"))]
use crate::quant::with_block_type;
use crate::quant::{as_blocks, Activations, Block, QuantType, WeightBlock};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::quant::{bytes_of, bytes_of_mut, BlockIq4Nl, BlockIq4Xs};

/// Reusable storage for quantized activations: once it has grown to the
/// largest `[t, cols]` seen, calls allocate nothing.
#[derive(Default)]
pub struct QuantScratch {
    /// u64 words so that any block type (at most 4-byte aligned) fits.
    words: Vec<u64>,
    /// Each part's first activation row in `words`.
    first_token: Vec<usize>,
    /// (part, first, end) of every task of a parallel loop.
    tasks: Vec<(usize, usize, usize)>,
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

/// `n` blocks of `B` in `words`, grown on demand, holding whatever the last
/// call left.
fn blocks<B: Block>(words: &mut Vec<u64>, n: usize) -> &mut [B] {
    const { assert!(align_of::<B>() <= align_of::<u64>()) };
    let len = (n * size_of::<B>()).div_ceil(size_of::<u64>());
    if words.len() < len {
        words.resize(len, 0);
    }
    // SAFETY: the words cover `n` blocks and are aligned for `B` (checked
    // above); `Block` makes any bit pattern a valid `B`; the borrow of
    // `words` is exclusive.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), n) }
}

/// `y[t, o] = sum_i x[t, i] * W[o, i]` with `W` a row-major `[rows, cols]`
/// matrix of `qt` blocks in `w` (`rows * qt.row_bytes(cols)` bytes, 2-byte
/// aligned), `x` a row-major `[t, cols]` f32 matrix and `y` `[t, rows]`.
///
/// Output rows are split across the kernels' pool (or all run on the
/// calling thread inside a pool task: `for_each_task`); within a task each
/// weight row is dotted with every token before the next is loaded, so with
/// several tokens a row is read from memory once, and each kernel call
/// applies the row to `pass` tokens (at most [`MAX_PASS`]), unpacking each
/// weight block once for all of them. Quantizing the activations
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
    pass: usize,
) {
    assert_eq!(y.len(), t * rows, "matmul_quant: output shape");
    let part = Part {
        w,
        rows,
        x,
        t,
        y: SharedOut(y.as_mut_ptr()),
    };
    // SAFETY: the one part's output is `y`, borrowed mutably for the call.
    unsafe { matmul_quant_parts(qt, cols, 1, |_| part, scratch, pass) }
}

/// One product of a batch: `y[t, rows] = x[t, cols] · w^T`, `w` being
/// `rows` rows of the batch's block type.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub w: &'a [u8],
    pub rows: usize,
    pub x: &'a [f32],
    pub t: usize,
    pub y: SharedOut<f32>,
}

/// [`matmul_quant`] for `n` independent products of one block type and one
/// width (`part(i)` is the i-th), as two parallel loops for all of them:
/// activations quantized, then every part's output rows in tasks sized to
/// an equal share of the whole batch's work.
///
/// This is how a layer's routed experts run: split expert by expert, the
/// busiest expert of a prefill chunk (routing is far from uniform) ran alone
/// on one thread while the others idled, and with one token each of its
/// small products paid a loop's synchronization. Handed out in equal pieces
/// across all experts, every thread streams weights until the batch ends.
///
/// # Safety
/// Each part's `y` points at `t * rows` writable floats that no other part
/// and nothing else touches during the call.
///
/// # Panics
/// As [`matmul_quant`], for any part.
pub unsafe fn matmul_quant_parts<'a>(
    qt: QuantType,
    cols: usize,
    n: usize,
    part: impl Fn(usize) -> Part<'a> + Sync,
    scratch: &mut QuantScratch,
    pass: usize,
) {
    let row_bytes = qt.row_bytes(cols).unwrap_or_else(|| {
        panic!(
            "matmul_quant: {} rows of {cols} weights do not split into blocks of {}",
            qt.name(),
            qt.block_elems()
        )
    });
    for p in (0..n).map(&part) {
        assert_eq!(p.x.len(), p.t * cols, "matmul_quant: activation shape");
        assert_eq!(
            p.w.len(),
            p.rows * row_bytes,
            "matmul_quant: {} weight bytes for a [{}, {cols}] matrix",
            qt.name(),
            p.rows
        );
    }
    if cols == 0 {
        for p in (0..n).map(&part) {
            // SAFETY: the caller's contract on `y`.
            unsafe { p.y.slice(0, p.t * p.rows) }.fill(0.0);
        }
        return;
    }
    // candle picks its SIMD dot products at compile time, so a portable
    // build runs them scalar; every format gets run-time AVX2 and AVX-512
    // paths of our own (candle's remain for CPUs without AVX2).
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! run {
            ($kernel:expr) => {
                return matmul_typed(cols, n, &part, scratch, pass, $kernel)
            };
        }
        match (x86_kernels(), qt) {
            (X86Kernels::Avx512, QuantType::Q4K) => run!(&Avx512Q4K),
            (X86Kernels::Avx512, QuantType::Q8_0) => run!(&Avx512Q8_0),
            (X86Kernels::Avx512, QuantType::Q4_0) => run!(&Avx512Q4_0),
            (X86Kernels::Avx2, QuantType::Q4K) => run!(&Avx2Q4K),
            (X86Kernels::Avx2, QuantType::Q8_0) => run!(&Avx2Q8_0),
            (X86Kernels::Avx2, QuantType::Q4_0) => run!(&Avx2Q4_0),
            (X86Kernels::Avx512, QuantType::Q4_1) => run!(&Avx512Q4_1),
            (X86Kernels::Avx512, QuantType::Q5_0) => run!(&Avx512Q5_0),
            (X86Kernels::Avx512, QuantType::Q5_1) => run!(&Avx512Q5_1),
            (X86Kernels::Avx512, QuantType::Iq4Nl) => run!(&Avx512Iq4Nl),
            (X86Kernels::Avx512, QuantType::Iq4Xs) => run!(&Avx512Iq4Xs),
            (X86Kernels::Avx2, QuantType::Q4_1) => run!(&Avx2Q4_1),
            (X86Kernels::Avx2, QuantType::Q5_0) => run!(&Avx2Q5_0),
            (X86Kernels::Avx2, QuantType::Q5_1) => run!(&Avx2Q5_1),
            (X86Kernels::Avx2, QuantType::Iq4Nl) => run!(&Avx2Iq4Nl),
            (X86Kernels::Avx2, QuantType::Iq4Xs) => run!(&Avx2Iq4Xs),
            (X86Kernels::Avx512, QuantType::Q6K) => run!(&Avx512Q6K),
            (X86Kernels::Avx512, QuantType::Q5K) => run!(&Avx512Q5K),
            (X86Kernels::Avx512, QuantType::Q3K) => run!(&Avx512Q3K),
            (X86Kernels::Avx512, QuantType::Q2K) => run!(&Avx512Q2K),
            (X86Kernels::Avx2, QuantType::Q6K) => run!(&Avx2Q6K),
            (X86Kernels::Avx2, QuantType::Q5K) => run!(&Avx2Q5K),
            (X86Kernels::Avx2, QuantType::Q3K) => run!(&Avx2Q3K),
            (X86Kernels::Avx2, QuantType::Q2K) => run!(&Avx2Q2K),
            _ => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use super::qdot_arm::{dotprod, BASELINE};
        macro_rules! run {
            ($s:expr) => {{
                macro_rules! neon {
                    ($block:ty) => {
                        return matmul_typed::<$block, _>(cols, n, &part, scratch, pass, &Neon($s))
                    };
                }
                match qt {
                    QuantType::Q4K => neon!(BlockQ4K),
                    QuantType::Q8_0 => neon!(BlockQ8_0),
                    QuantType::Q4_0 => neon!(BlockQ4_0),
                    QuantType::Q4_1 => neon!(BlockQ4_1),
                    QuantType::Q5_0 => neon!(BlockQ5_0),
                    QuantType::Q5_1 => neon!(BlockQ5_1),
                    QuantType::Iq4Nl => neon!(BlockIq4Nl),
                    QuantType::Iq4Xs => neon!(BlockIq4Xs),
                    QuantType::Q6K => neon!(BlockQ6K),
                    QuantType::Q5K => neon!(BlockQ5K),
                    QuantType::Q3K => neon!(BlockQ3K),
                    QuantType::Q2K => neon!(BlockQ2K),
                }
            }};
        }
        match dotprod() {
            Some(s) => run!(s),
            None => run!(BASELINE),
        }
    }
    // ARM always has NEON kernels; elsewhere candle's are what is left.
    #[cfg(not(target_arch = "aarch64"))]
    with_block_type!(qt, B => matmul_typed::<B, _>(cols, n, &part, scratch, pass, &Candle));
}

/// The most tokens a kernel call takes: eight tokens' accumulators plus one
/// unpacked weight block fill AVX-512's 32 registers. Kernels with fewer
/// registers take fewer ([`RowDot::PASS`]).
pub const MAX_PASS: usize = 8;

/// Dot products of `R` weight rows with `N` activation rows: `[k][r]` is row
/// `r` dotted with token `k`. Generic rather than a fn pointer, so each
/// kernel is called directly: a row of a down projection is only three Q4_K
/// blocks, where an indirect call per row is measurable.
trait RowDot<B: WeightBlock>: Sync {
    /// The most tokens `dot` takes at once: four tokens' accumulators plus
    /// one unpacked weight block fill AVX2's sixteen registers.
    const PASS: usize = 4;

    fn dot<const R: usize, const N: usize>(
        &self,
        w: [&[B]; R],
        a: [&[B::VecDotType]; N],
    ) -> [[f32; R]; N];

    /// One row of activations in the kernels' format.
    fn quantize(&self, x: &[f32], q: &mut [B::VecDotType]) {
        B::VecDotType::quantize(x, q)
    }
}

/// candle's dot products, one row and token at a time.
#[cfg(not(target_arch = "aarch64"))]
struct Candle;

#[cfg(not(target_arch = "aarch64"))]
impl<B: WeightBlock> RowDot<B> for Candle {
    fn dot<const R: usize, const N: usize>(
        &self,
        w: [&[B]; R],
        a: [&[B::VecDotType]; N],
    ) -> [[f32; R]; N] {
        a.map(|a| w.map(|w| B::vec_dot(w, a)))
    }
}

/// Which of our x86 kernels this CPU runs: the best it has, unless the
/// environment variable `SMOE_KERNELS=avx2` holds AVX-512 CPUs to the AVX2
/// ones (to compare the two on one machine).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum X86Kernels {
    Candle,
    Avx2,
    Avx512,
}

#[cfg(target_arch = "x86_64")]
fn x86_kernels() -> X86Kernels {
    static CHOICE: std::sync::OnceLock<X86Kernels> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let avx2_only = match std::env::var_os("SMOE_KERNELS") {
            None => false,
            Some(v) if v == "avx2" => true,
            Some(v) => {
                // Read once, deep in the kernels, where no error can be
                // returned: say it rather than ignore it silently.
                eprintln!(
                    "warning: SMOE_KERNELS={} is not a kernel choice (only avx2 is); \
                     using the best kernels this CPU has",
                    v.to_string_lossy()
                );
                false
            }
        };
        if qdot_avx512::available() && !avx2_only {
            X86Kernels::Avx512
        } else if qdot_x86::available() {
            X86Kernels::Avx2
        } else {
            X86Kernels::Candle
        }
    })
}

/// `R` rows' products through a kernel of `G` rows, group by group; `None`
/// where `G` does not divide `R`.
#[cfg(target_arch = "x86_64")]
fn in_groups<T: Copy, const R: usize, const N: usize, const G: usize>(
    w: [T; R],
    mut kernel: impl FnMut([T; G]) -> [[f32; G]; N],
) -> Option<[[f32; R]; N]> {
    if !R.is_multiple_of(G) {
        return None;
    }
    let mut out = [[0.0; R]; N];
    for (g, rows) in w.chunks_exact(G).enumerate() {
        let v = kernel(rows.try_into().expect("chunks of G"));
        for (o, v) in out.iter_mut().zip(v) {
            o[g * G..][..G].copy_from_slice(&v);
        }
    }
    Some(out)
}

/// A kernel type over our x86 kernels: `dot` evaluates `$dot` with the
/// weight rows bound to `$w` and the activations' bytes to `$a`; activations
/// are quantized by `$quantize`. Constructed only where the kernels' module
/// says they are `available`, which makes the calls sound.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernel {
    ($name:ident, $block:ty, $quantize:path, $pass:expr, |$w:ident, $a:ident| $dot:expr) => {
        struct $name;
        impl RowDot<$block> for $name {
            const PASS: usize = $pass;

            fn dot<const R: usize, const N: usize>(
                &self,
                $w: [&[$block]; R],
                a: [&[<$block as WeightBlock>::VecDotType]; N],
            ) -> [[f32; R]; N] {
                let $a = a.map(bytes_of);
                // SAFETY: see the macro.
                unsafe { $dot }
            }

            fn quantize(&self, x: &[f32], q: &mut [<$block as WeightBlock>::VecDotType]) {
                // SAFETY: as above.
                unsafe { $quantize(x, bytes_of_mut(q)) }
            }
        }
    };
}

// One row at a time, the tokens of a call sharing each unpacked block.
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q8_0, BlockQ8_0, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_x86::q8_0(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q4_0, BlockQ4_0, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_x86::q4_0(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q6K, BlockQ6K, qdot_x86::quantize_q8k, 4, |w, a| {
    by_row(w, |w| qdot_x86::q6k(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q5K, BlockQ5K, qdot_x86::quantize_q8k, 4, |w, a| {
    by_row(w, |w| qdot_x86::q5k(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q3K, BlockQ3K, qdot_x86::quantize_q8k, 4, |w, a| {
    by_row(w, |w| qdot_x86::q3k(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q2K, BlockQ2K, qdot_x86::quantize_q8k, 4, |w, a| {
    by_row(w, |w| qdot_x86::q2k(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q4_1, BlockQ4_1, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_x86::q4_1(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q5_0, BlockQ5_0, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_x86::q5_0(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q5_1, BlockQ5_1, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_x86::q5_1(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Iq4Nl, BlockIq4Nl, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_x86::iq4nl(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Iq4Xs, BlockIq4Xs, qdot_x86::quantize_q8k, 4, |w, a| {
    by_row(w, |w| qdot_x86::iq4xs(bytes_of(w), a, w.len()))
});
// AVX-512 runs the formats GGUF files bring in four-token passes, as Q8_0:
// unpacking a block costs them little against the products.
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx512Q4_1, BlockQ4_1, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_avx512::q4_1(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx512Q5_0, BlockQ5_0, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_avx512::q5_0(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx512Q5_1, BlockQ5_1, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_avx512::q5_1(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Iq4Nl,
    BlockIq4Nl,
    qdot_x86::quantize_q8_0,
    4,
    |w, a| by_row(w, |w| qdot_avx512::iq4nl(bytes_of(w), a, w.len()))
);
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Iq4Xs,
    BlockIq4Xs,
    qdot_x86::quantize_q8k,
    4,
    |w, a| by_row(w, |w| qdot_avx512::iq4xs(bytes_of(w), a, w.len()))
);
// The K-quants other than Q4_K with AVX-512, one row at a time in
// eight-token passes, as Q4_K's one-row kernel.
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Q6K,
    BlockQ6K,
    qdot_x86::quantize_q8k,
    MAX_PASS,
    |w, a| by_row(w, |w| qdot_avx512::q6k(bytes_of(w), a, w.len()))
);
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Q5K,
    BlockQ5K,
    qdot_x86::quantize_q8k,
    MAX_PASS,
    |w, a| by_row(w, |w| qdot_avx512::q5k(bytes_of(w), a, w.len()))
);
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Q3K,
    BlockQ3K,
    qdot_x86::quantize_q8k,
    MAX_PASS,
    |w, a| by_row(w, |w| qdot_avx512::q3k(bytes_of(w), a, w.len()))
);
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Q2K,
    BlockQ2K,
    qdot_x86::quantize_q8k,
    MAX_PASS,
    |w, a| by_row(w, |w| qdot_avx512::q2k(bytes_of(w), a, w.len()))
);
// AVX-512 Q8_0 keeps four-token passes: with eight, a Sapphire Rapids core
// ran its products 0.76-0.88x as fast (kernels bench, normalized by the
// one-token rows), while Q4_0 and Q4_K gained 1.1-1.2x.
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx512Q8_0, BlockQ8_0, qdot_x86::quantize_q8_0, 4, |w, a| {
    by_row(w, |w| qdot_avx512::q8_0(bytes_of(w), a, w.len()))
});
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Q4_0,
    BlockQ4_0,
    qdot_x86::quantize_q8_0,
    MAX_PASS,
    |w, a| by_row(w, |w| qdot_avx512::q4_0(bytes_of(w), a, w.len()))
);

// Q4_K with AVX2: four rows at a time share each token's activation loads
// and half the scale multiplies ([`qdot_x86::q4k_rows4`]) where there are
// several tokens; otherwise one row at a time.
#[cfg(target_arch = "x86_64")]
x86_kernel!(Avx2Q4K, BlockQ4K, qdot_x86::quantize_q8k, 4, |w, a| {
    let blocks = w.first().map_or(0, |w| w.len());
    let rows4 = |w: [&[BlockQ4K]; 4]| qdot_x86::q4k_rows4(w.map(bytes_of), a, blocks);
    (N > 1)
        .then(|| in_groups(w, rows4))
        .flatten()
        .unwrap_or_else(|| by_row(w, |w| qdot_x86::q4k(bytes_of(w), a, blocks)))
});

// Q4_K with AVX-512: eight rows at a time for any token count (unpacking
// eight rows' headers together costs less per row than one row's alone),
// then one row at a time. Which kernel a row gets must not depend on the
// token count, or a row would round differently in a batch than alone: a
// matrix's last `rows % 8` rows always go one at a time.
#[cfg(target_arch = "x86_64")]
x86_kernel!(
    Avx512Q4K,
    BlockQ4K,
    qdot_x86::quantize_q8k,
    MAX_PASS,
    |w, a| {
        let blocks = w.first().map_or(0, |w| w.len());
        let rows8 = |w: [&[BlockQ4K]; 8]| qdot_avx512::q4k_rows8(w.map(bytes_of), a, blocks);
        in_groups(w, rows8)
            .unwrap_or_else(|| by_row(w, |w| qdot_avx512::q4k(bytes_of(w), a, blocks)))
    }
);

/// The NEON kernels of one flavour ([`QDot`](super::qdot_arm::QDot)), one
/// row at a time with the tokens of a call sharing each unpacked block.
#[cfg(target_arch = "aarch64")]
struct Neon<S>(S);

#[cfg(target_arch = "aarch64")]
macro_rules! neon_kernel {
    ($block:ty, $f:ident, $quantize:ident) => {
        impl<S: super::qdot_arm::QDot> RowDot<$block> for Neon<S> {
            fn dot<const R: usize, const N: usize>(
                &self,
                w: [&[$block]; R],
                a: [&[<$block as WeightBlock>::VecDotType]; N],
            ) -> [[f32; R]; N] {
                let a = a.map(bytes_of);
                by_row(w, |w| self.0.$f(bytes_of(w), a, w.len()))
            }

            fn quantize(&self, x: &[f32], q: &mut [<$block as WeightBlock>::VecDotType]) {
                self.0.$quantize(x, bytes_of_mut(q))
            }
        }
    };
}
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ4K, q4k, quantize_q8k);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ8_0, q8_0, quantize_q8_0);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ4_0, q4_0, quantize_q8_0);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ4_1, q4_1, quantize_q8_0);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ5_0, q5_0, quantize_q8_0);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ5_1, q5_1, quantize_q8_0);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockIq4Nl, iq4nl, quantize_q8_0);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockIq4Xs, iq4xs, quantize_q8k);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ6K, q6k, quantize_q8k);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ5K, q5k, quantize_q8k);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ3K, q3k, quantize_q8k);
#[cfg(target_arch = "aarch64")]
neon_kernel!(BlockQ2K, q2k, quantize_q8k);

fn matmul_typed<'a, B: WeightBlock, K: RowDot<B>>(
    cols: usize,
    n: usize,
    part: &(impl Fn(usize) -> Part<'a> + Sync),
    scratch: &mut QuantScratch,
    pass: usize,
    kernel: &K,
) {
    // The activation blocks must line up one-to-one with the weight blocks.
    const { assert!(B::BLCK_SIZE == B::VecDotType::BLCK_SIZE) };
    let nb = cols / B::BLCK_SIZE;
    let pass = pass.clamp(1, MAX_PASS);
    let QuantScratch {
        words,
        first_token,
        tasks,
    } = scratch;

    first_token.clear();
    let mut tokens = 0;
    let mut work = 0;
    for p in (0..n).map(part) {
        as_blocks::<B>(p.w).unwrap_or_else(|e| panic!("matmul_quant: {e}"));
        first_token.push(tokens);
        tokens += p.t;
        work += p.t * p.rows;
    }
    let xq = blocks::<B::VecDotType>(words, tokens * nb);

    let per_task = (16_384 / cols).max(1);
    tasks.clear();
    for (i, p) in (0..n).map(part).enumerate() {
        tasks.extend(
            (0..p.t)
                .step_by(per_task)
                .map(|a| (i, a, (a + per_task).min(p.t))),
        );
    }
    let xq_out = SharedOut(xq.as_mut_ptr());
    for_each_task(tasks.len(), |i| {
        let (p, a, b) = tasks[i];
        let (x, first) = (part(p).x, first_token[p]);
        for tok in a..b {
            // SAFETY: token `tok` of part `p` has its own `nb` blocks,
            // written by this task only, inside the `tokens * nb` of `xq`.
            let q = unsafe { xq_out.slice((first + tok) * nb, nb) };
            kernel.quantize(&x[tok * cols..][..cols], q);
        }
    });
    let xq = &*xq;

    // Every task the same share of the batch's row-token products, in
    // whole groups of eight rows where it can (the widest row kernel).
    let share = work.div_ceil(threads() * 4).max(16_384 / cols);
    tasks.clear();
    for (i, p) in (0..n).map(part).enumerate() {
        if p.t == 0 {
            continue;
        }
        let chunk = share.div_ceil(p.t).next_multiple_of(8).min(p.rows).max(1);
        tasks.extend(
            (0..p.rows)
                .step_by(chunk)
                .map(|a| (i, a, (a + chunk).min(p.rows))),
        );
    }
    let tile = token_tile(nb * size_of::<B::VecDotType>());
    for_each_task(tasks.len(), |i| {
        let (p, first, end) = tasks[i];
        let Part { w, rows, t, y, .. } = part(p);
        let w = as_blocks::<B>(w).unwrap_or_else(|e| panic!("matmul_quant: {e}"));
        let xq = &xq[first_token[p] * nb..][..t * nb];
        // Token tiles outermost: the task's weight rows and one tile of
        // activations stay in L2 while every row group runs over the tile,
        // where all of a long prompt's activations would be streamed from
        // L3 again for each group of eight rows.
        for t0 in (0..t).step_by(tile) {
            let xq = &xq[t0 * nb..(t0 + tile).min(t) * nb];
            let out = SharedOut(y.at(t0 * rows));
            let mut r = first;
            while r < end {
                let step = [8, 4].into_iter().find(|&s| end - r >= s).unwrap_or(1);
                let group = RowGroup {
                    w,
                    xq,
                    nb,
                    first: r,
                    rows,
                    pass,
                    out,
                };
                match step {
                    8 => group.run::<8, _>(kernel),
                    4 => group.run::<4, _>(kernel),
                    _ => group.run::<1, _>(kernel),
                }
                r += step;
            }
        }
    });
}

/// Tokens per tile of a task's loop: quantized activations of about 128 KiB
/// (56 tokens of a 2048-wide Q8K row, 28 of a 4096-wide one), which leaves
/// most of a 1-2 MiB L2 to the task's weight rows. A multiple of
/// [`MAX_PASS`], so tiles split no kernel pass.
fn token_tile(token_bytes: usize) -> usize {
    ((128 << 10) / token_bytes.max(1)).next_multiple_of(MAX_PASS)
}

/// Rows `first..first + R` of a product, to be dotted with every token.
struct RowGroup<'a, B: WeightBlock> {
    w: &'a [B],
    xq: &'a [B::VecDotType],
    nb: usize,
    first: usize,
    rows: usize,
    pass: usize,
    out: SharedOut<f32>,
}

impl<B: WeightBlock> RowGroup<'_, B> {
    fn run<const R: usize, K: RowDot<B>>(&self, kernel: &K) {
        let (nb, first) = (self.nb, self.first);
        let wr: [&[B]; R] = std::array::from_fn(|i| &self.w[(first + i) * nb..][..nb]);
        let t = self.xq.len() / nb;
        let mut tk = 0;
        while tk < t {
            let n = self.pass.min(K::PASS).min(t - tk);
            let put = |vals: &[[f32; R]]| {
                for (k, v) in vals.iter().enumerate() {
                    for (i, &v) in v.iter().enumerate() {
                        // SAFETY: rows first..first + R belong to this task
                        // only; (tk + k) * rows + first + i < t * rows.
                        unsafe { *self.out.at((tk + k) * self.rows + first + i) = v };
                    }
                }
            };
            let tok = |k: usize| &self.xq[(tk + k) * nb..][..nb];
            macro_rules! tokens {
                ($($n:literal)*) => {
                    match n {
                        $($n => put(&kernel.dot::<R, $n>(wr, std::array::from_fn(tok))),)*
                        _ => unreachable!("passes hold 1..={MAX_PASS} tokens"),
                    }
                };
            }
            tokens!(1 2 3 4 5 6 7 8);
            tk += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every output of a kernel type, called with every pass size up to
    /// [`MAX_PASS`] tokens, against candle's portable `vec_dot_unopt` on the
    /// same quantized blocks: random row, block and token counts, including
    /// token counts that leave remainders of each pass size, row counts that
    /// leave remainders of the eight- and four-row groups, and odd block
    /// counts (the AVX-512 Q8_0/Q4_0 kernels take two blocks per step). Both
    /// sum the same exact integers per block and differ only in the order of
    /// the f32 sums across blocks, so they agree to f32 rounding: 1e-5 of the
    /// products' scale `|x|*|w|`. A wrong nibble, scale, min or token would
    /// be off by ~10%.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn check_kernel<B: WeightBlock, K: RowDot<B>>(qt: QuantType, kernel: &K, seed: u64) {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut scratch = QuantScratch::default();
        let mut upto = |n: u64| 1 + (rng.next_u64() % n) as usize;
        for case in 0..12u64 {
            let (nb, rows, t) = (upto(12), upto(21), upto(13));
            let cols = nb * B::BLCK_SIZE;
            let w = quantize(qt, &normal(rows * cols, 30 + case), cols);
            let wb = as_blocks::<B>(w.bytes()).unwrap();
            let mut wd = vec![0.0; rows * cols];
            dequantize_rows(qt, w.bytes(), cols, &mut wd).unwrap();
            // Activations of uneven magnitude, as hidden states are.
            let x: Vec<f32> = normal(t * cols, 130 + case)
                .iter()
                .enumerate()
                .map(|(j, v)| v * (1.0 + (j % 7) as f32))
                .collect();
            let mut xq = vec![B::VecDotType::zeros(); t * nb];
            for (q, xr) in xq.chunks_mut(nb).zip(x.chunks(cols)) {
                B::VecDotType::quantize(xr, q);
            }
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            for pass in 1..=MAX_PASS {
                let mut y = vec![f32::NAN; t * rows];
                let part = Part {
                    w: w.bytes(),
                    rows,
                    x: &x,
                    t,
                    y: SharedOut(y.as_mut_ptr()),
                };
                matmul_typed(cols, 1, &|_| part, &mut scratch, pass, kernel);
                for (i, &got) in y.iter().enumerate() {
                    let (tk, r) = (i / rows, i % rows);
                    let xr = &xq[tk * nb..(tk + 1) * nb];
                    let want = B::vec_dot_unopt(&wb[r * nb..(r + 1) * nb], xr);
                    let scale = norm(&x[tk * cols..][..cols]) * norm(&wd[r * cols..][..cols]);
                    assert!(
                        (got - want).abs() <= 1e-5 * scale,
                        "{} [{rows}, {cols}] t={t} pass={pass} y[{tk}, {r}]: {got} vs {want}",
                        qt.name()
                    );
                }
            }
        }
    }

    use crate::kernels::simd_test;
    /// What /proc/cpuinfo calls the features each x86 kernel set needs.
    #[cfg(target_arch = "x86_64")]
    const AVX2_FLAGS: &[&str] = &["avx2", "fma", "f16c"];
    #[cfg(target_arch = "x86_64")]
    const AVX512_FLAGS: &[&str] = &[
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
    ];

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_candle_scalar() {
        if !simd_test::runs("AVX2 kernels", qdot_x86::available(), AVX2_FLAGS) {
            return;
        }
        check_kernel::<BlockQ4K, _>(QuantType::Q4K, &Avx2Q4K, 17);
        check_kernel::<BlockQ8_0, _>(QuantType::Q8_0, &Avx2Q8_0, 18);
        check_kernel::<BlockQ4_0, _>(QuantType::Q4_0, &Avx2Q4_0, 19);
        check_kernel::<BlockQ6K, _>(QuantType::Q6K, &Avx2Q6K, 20);
        check_kernel::<BlockQ4_1, _>(QuantType::Q4_1, &Avx2Q4_1, 21);
        check_kernel::<BlockQ5_0, _>(QuantType::Q5_0, &Avx2Q5_0, 22);
        check_kernel::<BlockQ5_1, _>(QuantType::Q5_1, &Avx2Q5_1, 23);
        check_kernel::<BlockIq4Nl, _>(QuantType::Iq4Nl, &Avx2Iq4Nl, 24);
        check_kernel::<BlockIq4Xs, _>(QuantType::Iq4Xs, &Avx2Iq4Xs, 25);
        check_kernel::<BlockQ5K, _>(QuantType::Q5K, &Avx2Q5K, 26);
        check_kernel::<BlockQ3K, _>(QuantType::Q3K, &Avx2Q3K, 27);
        check_kernel::<BlockQ2K, _>(QuantType::Q2K, &Avx2Q2K, 28);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_kernels_match_candle_scalar() {
        if !simd_test::runs("AVX-512 kernels", qdot_avx512::available(), AVX512_FLAGS) {
            return;
        }
        check_kernel::<BlockQ4K, _>(QuantType::Q4K, &Avx512Q4K, 17);
        check_kernel::<BlockQ8_0, _>(QuantType::Q8_0, &Avx512Q8_0, 18);
        check_kernel::<BlockQ4_0, _>(QuantType::Q4_0, &Avx512Q4_0, 19);
        check_kernel::<BlockQ4_1, _>(QuantType::Q4_1, &Avx512Q4_1, 21);
        check_kernel::<BlockQ5_0, _>(QuantType::Q5_0, &Avx512Q5_0, 22);
        check_kernel::<BlockQ5_1, _>(QuantType::Q5_1, &Avx512Q5_1, 23);
        check_kernel::<BlockIq4Nl, _>(QuantType::Iq4Nl, &Avx512Iq4Nl, 24);
        check_kernel::<BlockIq4Xs, _>(QuantType::Iq4Xs, &Avx512Iq4Xs, 25);
        check_kernel::<BlockQ6K, _>(QuantType::Q6K, &Avx512Q6K, 20);
        check_kernel::<BlockQ5K, _>(QuantType::Q5K, &Avx512Q5K, 26);
        check_kernel::<BlockQ3K, _>(QuantType::Q3K, &Avx512Q3K, 27);
        check_kernel::<BlockQ2K, _>(QuantType::Q2K, &Avx512Q2K, 28);
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_kernels_match_candle_scalar() {
        use super::super::qdot_arm::{dotprod, QDot, BASELINE};
        fn check_all<S: QDot>(s: S) {
            check_kernel::<BlockQ4K, _>(QuantType::Q4K, &Neon(s), 17);
            check_kernel::<BlockQ8_0, _>(QuantType::Q8_0, &Neon(s), 18);
            check_kernel::<BlockQ4_0, _>(QuantType::Q4_0, &Neon(s), 19);
            check_kernel::<BlockQ4_1, _>(QuantType::Q4_1, &Neon(s), 21);
            check_kernel::<BlockQ5_0, _>(QuantType::Q5_0, &Neon(s), 22);
            check_kernel::<BlockQ5_1, _>(QuantType::Q5_1, &Neon(s), 23);
            check_kernel::<BlockIq4Nl, _>(QuantType::Iq4Nl, &Neon(s), 24);
            check_kernel::<BlockIq4Xs, _>(QuantType::Iq4Xs, &Neon(s), 25);
            check_kernel::<BlockQ6K, _>(QuantType::Q6K, &Neon(s), 20);
            check_kernel::<BlockQ5K, _>(QuantType::Q5K, &Neon(s), 26);
            check_kernel::<BlockQ3K, _>(QuantType::Q3K, &Neon(s), 27);
            check_kernel::<BlockQ2K, _>(QuantType::Q2K, &Neon(s), 28);
        }
        check_all(BASELINE);
        let Some(s) = dotprod() else {
            simd_test::runs("NEON dotprod kernels", false, &["asimddp"]);
            return;
        };
        check_all(s);
    }

    /// The SIMD quantizers write the bytes the scalar ones do: blocks of
    /// uneven magnitude, an all-zero block, a block of exact halves (the
    /// rounding rule shows) and one whose largest magnitude occurs with
    /// both signs (for Q8_K, the first sets the scale's sign).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn simd_quantizers_match_scalar() {
        use candle_core::quantized::k_quants::BlockQ8K;
        /// `full`: the largest magnitude that makes the scale exactly 1.
        fn check<B: Activations>(quantize: impl Fn(&[f32], &mut [u8]), full: f32) {
            let (n, blocks) = (B::BLCK_SIZE, 8);
            let mut x: Vec<f32> = normal(n * blocks, 3)
                .iter()
                .enumerate()
                .map(|(j, v)| v * (1.0 + (j % 7) as f32))
                .collect();
            x[n..2 * n].fill(0.0);
            for (j, v) in x[2 * n..3 * n].iter_mut().enumerate() {
                *v = if j == 0 { -full } else { j as f32 - full - 0.5 };
            }
            for v in &mut x[3 * n..4 * n] {
                *v *= 0.1;
            }
            (x[3 * n + 5], x[4 * n - 3]) = (3.0, -3.0);
            let mut want = vec![B::zeros(); blocks];
            B::quantize(&x, &mut want);
            let mut got = vec![0u8; std::mem::size_of_val(&want[..])];
            quantize(&x, &mut got);
            let size = size_of::<B>();
            for (b, (w, g)) in want.iter().zip(got.chunks(size)).enumerate() {
                assert_eq!(bytes_of(std::slice::from_ref(w)), g, "block {b}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            if !simd_test::runs("AVX2 quantizers", qdot_x86::available(), AVX2_FLAGS) {
                return;
            }
            // SAFETY (both): AVX2, FMA and F16C are available.
            check::<BlockQ8K>(|x, o| unsafe { qdot_x86::quantize_q8k(x, o) }, 127.0);
            check::<BlockQ8_0>(|x, o| unsafe { qdot_x86::quantize_q8_0(x, o) }, 127.0);
        }
        #[cfg(target_arch = "aarch64")]
        {
            use super::super::qdot_arm::{dotprod, QDot, BASELINE};
            check::<BlockQ8K>(|x, o| BASELINE.quantize_q8k(x, o), 127.0);
            check::<BlockQ8_0>(|x, o| BASELINE.quantize_q8_0(x, o), 127.0);
            if let Some(s) = dotprod() {
                check::<BlockQ8K>(|x, o| s.quantize_q8k(x, o), 127.0);
                check::<BlockQ8_0>(|x, o| s.quantize_q8_0(x, o), 127.0);
            }
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
                let w = w.bytes();
                for t in [1, 3, 5, 9] {
                    let x = normal(t * cols, 20 + t as u64);
                    let mut y = vec![f32::NAN; t * rows];
                    let s = &mut scratch;
                    matmul_quant(qt, w, rows, cols, &x, t, &mut y, s, MAX_PASS);
                    for (i, (&got, (want, scale))) in
                        y.iter().zip(reference(qt, w, cols, &x)).enumerate()
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

    /// Prompts longer than two token tiles: every tile's outputs land on
    /// their own tokens (a tile offset wrong in the activations or in the
    /// output would put another token's products there).
    #[test]
    fn long_prompts_span_token_tiles() {
        use candle_core::quantized::k_quants::BlockQ8K;
        let mut scratch = QuantScratch::default();
        let q8_0 = size_of::<BlockQ8_0>();
        let q8k = size_of::<BlockQ8K>();
        for (qt, cols, token_bytes) in [(QuantType::Q8_0, 32, q8_0), (QuantType::Q4K, 256, q8k)] {
            let (rows, t) = (11, 2 * token_tile(token_bytes) + 5);
            let w = quantize(qt, &normal(rows * cols, 3), cols);
            let x = normal(t * cols, 4);
            let mut y = vec![f32::NAN; t * rows];
            matmul_quant(
                qt,
                w.bytes(),
                rows,
                cols,
                &x,
                t,
                &mut y,
                &mut scratch,
                MAX_PASS,
            );
            for (i, (&got, (want, scale))) in
                y.iter().zip(reference(qt, w.bytes(), cols, &x)).enumerate()
            {
                let rel = (got as f64 - want).abs() / scale;
                assert!(
                    rel < 0.05,
                    "{} t={t} y[{}, {}]: {got} vs {want}",
                    qt.name(),
                    i / rows,
                    i % rows
                );
            }
        }
    }

    /// A batch gives every part exactly what the part alone gives: tasks
    /// split rows differently, but each output is the same row and token
    /// products in the same order. Parts of 0 to 40 tokens and uneven rows.
    #[test]
    fn batch_of_parts_equals_each_part_alone() {
        for qt in [QuantType::Q4K, QuantType::Q8_0, QuantType::Q6K] {
            let cols = 512;
            let shapes = [(24, 3), (8, 0), (37, 1), (64, 40), (5, 17)];
            let ws: Vec<_> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(rows, _))| quantize(qt, &normal(rows * cols, 20 + i as u64), cols))
                .collect();
            let xs: Vec<_> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(_, t))| normal(t * cols, 40 + i as u64))
                .collect();
            let mut alone: Vec<Vec<f32>> = Vec::new();
            let mut scratch = QuantScratch::default();
            for (i, &(rows, t)) in shapes.iter().enumerate() {
                let mut y = vec![f32::NAN; t * rows];
                let (w, s) = (ws[i].bytes(), &mut scratch);
                matmul_quant(qt, w, rows, cols, &xs[i], t, &mut y, s, MAX_PASS);
                alone.push(y);
            }
            let mut ys: Vec<Vec<f32>> =
                shapes.iter().map(|&(r, t)| vec![f32::NAN; r * t]).collect();
            let outs: Vec<_> = ys.iter_mut().map(|y| SharedOut(y.as_mut_ptr())).collect();
            let part = |i: usize| Part {
                w: ws[i].bytes(),
                rows: shapes[i].0,
                x: &xs[i],
                t: shapes[i].1,
                y: outs[i],
            };
            // SAFETY: each part writes its own `ys[i]`, of `t * rows` floats.
            unsafe { matmul_quant_parts(qt, cols, shapes.len(), part, &mut scratch, MAX_PASS) };
            for (i, (got, want)) in ys.iter().zip(&alone).enumerate() {
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{} part {i}", qt.name());
            }
        }
    }

    /// A token's outputs are the same bits whatever else shares the call:
    /// alone (one-token kernels), or at any place among up to a dozen
    /// tokens (multi-token and multi-row kernels, passes with remainders).
    /// Batched decode of several sequences relies on it: each must get the
    /// logits it gets alone. Rows that leave every remainder of the four-
    /// and eight-row groups.
    #[test]
    fn a_token_gets_the_same_bits_in_any_call() {
        let mut scratch = QuantScratch::default();
        for qt in QuantType::ALL {
            let cols = 512;
            for rows in [45, 64] {
                let w = quantize(qt, &normal(rows * cols, 60), cols);
                let x = normal(12 * cols, 61);
                let mut alone = vec![f32::NAN; 12 * rows];
                for (xr, yr) in x.chunks(cols).zip(alone.chunks_mut(rows)) {
                    matmul_quant(qt, w.bytes(), rows, cols, xr, 1, yr, &mut scratch, MAX_PASS);
                }
                for t in 2..=12 {
                    let mut y = vec![f32::NAN; t * rows];
                    let (xs, s) = (&x[..t * cols], &mut scratch);
                    matmul_quant(qt, w.bytes(), rows, cols, xs, t, &mut y, s, MAX_PASS);
                    for (i, (a, b)) in y.iter().zip(&alone).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{} [{rows}, {cols}] t={t} y[{}, {}]",
                            qt.name(),
                            i / rows,
                            i % rows
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn warm_scratch_is_reused() {
        let (qt, rows, cols) = (QuantType::Q4K, 8, 512);
        let w = quantize(qt, &normal(rows * cols, 5), cols);
        let mut scratch = QuantScratch::default();
        let mut run = |t: usize| {
            let x = normal(t * cols, 6);
            let mut y = vec![0.0; t * rows];
            let s = &mut scratch;
            matmul_quant(qt, w.bytes(), rows, cols, &x, t, &mut y, s, MAX_PASS);
            s.words.as_ptr()
        };
        let warm = run(4);
        assert_eq!(run(1), warm);
        assert_eq!(run(4), warm);
    }

    #[test]
    fn zero_tokens_rows_or_cols_are_empty_products() {
        let (qt, mut s) = (QuantType::Q8_0, QuantScratch::default());
        let w = quantize(qt, &normal(2 * 32, 7), 32);
        matmul_quant(qt, w.bytes(), 2, 32, &[], 0, &mut [], &mut s, MAX_PASS);
        matmul_quant(qt, &[], 0, 32, &[1.0; 32], 1, &mut [], &mut s, MAX_PASS);
        let mut y = [f32::NAN; 3];
        matmul_quant(qt, &[], 3, 0, &[], 1, &mut y, &mut s, MAX_PASS);
        assert_eq!(y, [0.0; 3]);
    }

    #[test]
    #[should_panic(expected = "matmul_quant: q4_k block data at")]
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
            MAX_PASS,
        );
    }

    #[test]
    #[should_panic(expected = "matmul_quant: q4_k weight bytes for a [2, 256] matrix")]
    fn short_weights_panic() {
        let w = Aligned::zeroed(144);
        let mut y = [0.0; 2];
        let x = [0.0; 256];
        let mut s = QuantScratch::default();
        matmul_quant(QuantType::Q4K, w.bytes(), 2, 256, &x, 1, &mut y, &mut s, 1);
    }

    #[test]
    #[should_panic(expected = "do not split into blocks of 256")]
    fn partial_blocks_panic() {
        let mut y = [0.0];
        let x = [0.0; 96];
        let mut s = QuantScratch::default();
        matmul_quant(QuantType::Q4K, &[], 1, 96, &x, 1, &mut y, &mut s, 1);
    }
}
