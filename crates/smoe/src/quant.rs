//! How weights are stored: the element types ([`DType`]) and GGML block
//! quantization of weight rows: the formats, their sizes, and
//! conversion to and from f32. The matrix products live in `kernels::qmatmul`.
//!
//! The block layouts and the (de)quantization routines are candle's
//! re-implementation of ggml's, used directly on our own byte slices so a
//! quantized row is never copied: a row of `cols` weights is `cols /
//! block_elems` consecutive blocks, each a `#[repr(C)]` struct of scales and
//! packed integers, byte-compatible with GGUF tensor data.

use std::mem::{align_of, size_of, size_of_val};

use candle_core::quantized::k_quants::{
    self, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8K, BlockQ8_0,
};
use rayon::prelude::*;

use crate::{Error, Result};

mod formats;
pub(crate) use formats::{BlockIq4Nl, BlockIq4Xs, KVALUES_IQ4NL};

/// Element types of stored weights: plain floats, or GGML blocks of
/// quantized values with their scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    Quant(QuantType),
}

impl DType {
    /// Bytes of one row of `cols` elements. Quantized rows must be whole
    /// blocks; the converter only picks a block type whose size divides the
    /// row. A row that is not, or whose size does not fit a `usize`, gives
    /// `usize::MAX`, which matches no stored length: `cols` can come from a
    /// damaged manifest, checked against its lengths with this before any
    /// bound on it applies (found by fuzzing).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            DType::F32 => cols.saturating_mul(4),
            DType::F16 | DType::BF16 => cols.saturating_mul(2),
            DType::Quant(q) => q.row_bytes(cols).unwrap_or(usize::MAX),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Quant(q) => q.name(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            other => QuantType::parse(other).map(DType::Quant),
        }
    }
}

/// A GGML block quantization format for weight rows.
///
/// Serialized under the same lowercase names that [`QuantType::name`]
/// returns, so a manifest and the command line spell types alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum QuantType {
    /// 4.5 bits: 256-weight super-blocks of eight 32-weight sub-blocks, each
    /// with a 6-bit scale and minimum.
    #[serde(rename = "q4_k")]
    Q4K,
    /// 4.5 bits: 32-weight blocks with one f16 scale, symmetric.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// 8.5 bits: 32-weight blocks with one f16 scale; near-lossless.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 6.5625 bits: 256-weight super-blocks of sixteen 16-weight sub-blocks.
    #[serde(rename = "q6_k")]
    Q6K,
    /// 5.5 bits: like Q4K with one extra high bit per weight.
    #[serde(rename = "q5_k")]
    Q5K,
    /// 3.4375 bits; visibly lossy, only for an explicit request.
    #[serde(rename = "q3_k")]
    Q3K,
    /// 2.625 bits; visibly lossy, only for an explicit request.
    #[serde(rename = "q2_k")]
    Q2K,
    /// 5 bits: 32-weight blocks with an f16 scale and an f16 minimum.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// 5.5 bits: 32-weight blocks of 5-bit values with one f16 scale,
    /// symmetric; llama.cpp's fallback for rows not a multiple of 256.
    #[serde(rename = "q5_0")]
    Q5_0,
    /// 6 bits: Q5_0 with an f16 minimum.
    #[serde(rename = "q5_1")]
    Q5_1,
    /// 4.5 bits: 32-weight blocks of 4-bit indices into a fixed non-linear
    /// table of 16 values, with one f16 scale.
    #[serde(rename = "iq4_nl")]
    Iq4Nl,
    /// 4.25 bits: IQ4_NL's table in 256-weight super-blocks of eight
    /// 32-weight sub-blocks, each with a 6-bit scale.
    #[serde(rename = "iq4_xs")]
    Iq4Xs,
}

/// Runs `$body` with `$b` bound to the block type of `$qt` (candle's, or
/// ours where candle has none), so each
/// generic routine is instantiated once per format from one mapping.
macro_rules! with_block_type {
    ($qt:expr, $b:ident => $body:expr) => {
        match $qt {
            $crate::quant::QuantType::Q4K => {
                type $b = candle_core::quantized::k_quants::BlockQ4K;
                $body
            }
            $crate::quant::QuantType::Q4_0 => {
                type $b = candle_core::quantized::k_quants::BlockQ4_0;
                $body
            }
            $crate::quant::QuantType::Q8_0 => {
                type $b = candle_core::quantized::k_quants::BlockQ8_0;
                $body
            }
            $crate::quant::QuantType::Q6K => {
                type $b = candle_core::quantized::k_quants::BlockQ6K;
                $body
            }
            $crate::quant::QuantType::Q5K => {
                type $b = candle_core::quantized::k_quants::BlockQ5K;
                $body
            }
            $crate::quant::QuantType::Q3K => {
                type $b = candle_core::quantized::k_quants::BlockQ3K;
                $body
            }
            $crate::quant::QuantType::Q2K => {
                type $b = candle_core::quantized::k_quants::BlockQ2K;
                $body
            }
            $crate::quant::QuantType::Q4_1 => {
                type $b = candle_core::quantized::k_quants::BlockQ4_1;
                $body
            }
            $crate::quant::QuantType::Q5_0 => {
                type $b = candle_core::quantized::k_quants::BlockQ5_0;
                $body
            }
            $crate::quant::QuantType::Q5_1 => {
                type $b = candle_core::quantized::k_quants::BlockQ5_1;
                $body
            }
            $crate::quant::QuantType::Iq4Nl => {
                type $b = $crate::quant::BlockIq4Nl;
                $body
            }
            $crate::quant::QuantType::Iq4Xs => {
                type $b = $crate::quant::BlockIq4Xs;
                $body
            }
        }
    };
}
// Outside this module only x86's fallback to candle's dot products uses it.
#[cfg(not(target_arch = "aarch64"))]
pub(crate) use with_block_type;

impl QuantType {
    /// Every format, in the order of the enum.
    pub const ALL: [QuantType; 12] = [
        QuantType::Q4K,
        QuantType::Q4_0,
        QuantType::Q8_0,
        QuantType::Q6K,
        QuantType::Q5K,
        QuantType::Q3K,
        QuantType::Q2K,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Iq4Nl,
        QuantType::Iq4Xs,
    ];

    /// The lowercase llama.cpp name: `"q4_k"`, `"q4_0"`, `"q8_0"`, ...
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4K => "q4_k",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q6K => "q6_k",
            QuantType::Q5K => "q5_k",
            QuantType::Q3K => "q3_k",
            QuantType::Q2K => "q2_k",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q5_0 => "q5_0",
            QuantType::Q5_1 => "q5_1",
            QuantType::Iq4Nl => "iq4_nl",
            QuantType::Iq4Xs => "iq4_xs",
        }
    }

    /// The inverse of [`QuantType::name`], ignoring ASCII case so that
    /// llama.cpp's `Q4_K` spelling is accepted too.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Weights per block: 256 for the k-quants and iq4_xs, 32 for the
    /// others.
    pub fn block_elems(self) -> usize {
        with_block_type!(self, B => B::BLCK_SIZE)
    }

    /// Bytes per block, scales included (144 for q4_k, 18 for q4_0, 34 for
    /// q8_0).
    pub fn block_bytes(self) -> usize {
        with_block_type!(self, B => size_of::<B>())
    }

    /// Bytes of one quantized row of `cols` weights, or `None` when the row
    /// does not split into whole blocks or its size overflows a `usize`.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_elems()) {
            return None;
        }
        (cols / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Storage cost including the per-block scales.
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8) as f64 / self.block_elems() as f64
    }

    /// The 2- and 3-bit formats, which change a model's outputs enough that
    /// they must never be chosen implicitly.
    pub fn is_lossy_below_4bit(self) -> bool {
        matches!(self, QuantType::Q3K | QuantType::Q2K)
    }

    /// The format to store a row of `cols` weights in when `self` was asked
    /// for: `self` if the row splits into its blocks, else a 32-weight format
    /// with at least as many bits (q4_0 for the k-quants of 4 bits or less,
    /// q8_0 for q5_k and q6_k), else `None`: keep the row unquantized.
    ///
    /// llama.cpp falls back the same way for rows that are not a multiple of
    /// 256, but to q5_0/q5_1 for q4_k/q5_k: vaults made before those had
    /// kernels of their own keep q4_0 and q8_0, so the recipe stays. iq4_xs
    /// falls back to iq4_nl, its table in 32-weight blocks, as in llama.cpp;
    /// the other 32-weight formats fit every row they can be asked for.
    pub fn for_row(self, cols: usize) -> Option<QuantType> {
        let fallback = match self {
            QuantType::Q4K | QuantType::Q3K | QuantType::Q2K | QuantType::Q4_0 => QuantType::Q4_0,
            QuantType::Q5K | QuantType::Q6K | QuantType::Q8_0 => QuantType::Q8_0,
            QuantType::Iq4Xs | QuantType::Iq4Nl => QuantType::Iq4Nl,
            QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 => self,
        };
        [self, fallback]
            .into_iter()
            .find(|t| t.row_bytes(cols).is_some())
    }
}

/// A block format viewed in place over arbitrary bytes: its geometry and
/// its conversion to and from f32.
///
/// candle's own trait cannot be implemented for the formats it lacks (its
/// `DTYPE` enum has no IQ4), and pairs Q4_1 and Q5_1 with Q8_1 activations
/// where smoe's kernels take Q8_0, so smoe has its own, forwarding to
/// candle where candle has the format.
///
/// # Safety
/// Implementors must be `#[repr(C)]` structs of integers, f16 and f32 only,
/// without padding and at most 4-byte aligned, so that every bit pattern is
/// a valid value.
pub(crate) unsafe trait Block: Sized + Clone + Send + Sync {
    /// How messages name the format.
    const NAME: &'static str;
    /// Weights per block.
    const BLCK_SIZE: usize;

    /// An all-zero block, for tests that fill blocks through slices.
    #[cfg(test)]
    fn zeros() -> Self {
        // SAFETY: the trait's contract makes all-zero bytes a valid value.
        unsafe { std::mem::MaybeUninit::zeroed().assume_init() }
    }

    /// Dequantizes whole blocks: `ys.len() == xs.len() * BLCK_SIZE`.
    fn to_float(xs: &[Self], ys: &mut [f32]);

    /// Quantizes whole blocks: `xs.len() == ys.len() * BLCK_SIZE`.
    fn from_float(xs: &[f32], ys: &mut [Self]);
}

/// A weight format and the activation format its integer dot products take.
pub(crate) trait WeightBlock: Block {
    /// The activations' blocks, one per weight block.
    type VecDotType: Activations;

    /// The product of weight blocks `xs` with as many activation blocks
    /// `ys`, by plain loops: the reference the SIMD kernels are tested
    /// against. ARM runs NEON kernels for every format, so there only the
    /// tests call it.
    #[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
    fn vec_dot_unopt(xs: &[Self], ys: &[Self::VecDotType]) -> f32;

    /// [`WeightBlock::vec_dot_unopt`], or a faster equivalent where the
    /// build has one. Not on ARM, whose NEON kernels take every format.
    #[cfg(not(target_arch = "aarch64"))]
    fn vec_dot(xs: &[Self], ys: &[Self::VecDotType]) -> f32 {
        Self::vec_dot_unopt(xs, ys)
    }
}

/// A format activations are quantized to for the integer dot products,
/// bit for bit as llama.cpp's CPU backend does it, so that smoe and
/// llama.cpp give the same products on the same GGUF. That is not how
/// either quantizes weights ([`Block::from_float`]): llama.cpp rounds
/// activations half to even (its SIMD rows and `nearest_int`), weights half
/// away from zero, and its Q8_K scale became `-127/max` where candle kept
/// the older `-128/max`.
pub(crate) trait Activations: Block {
    /// Quantizes whole blocks: `xs.len() == ys.len() * BLCK_SIZE`.
    fn quantize(xs: &[f32], ys: &mut [Self]);
}

/// `d = amax/127` stored as f16, each value times `1/d` rounded half to
/// even (llama.cpp's `quantize_row_q8_0` on AVX2 and NEON).
impl Activations for BlockQ8_0 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        assert_eq!(xs.len(), ys.len() * 32, "Q8_0 activations");
        // candle keeps the blocks' fields private: write the GGML layout,
        // f16 `d` then 32 i8.
        for (x, y) in xs
            .chunks_exact(32)
            .zip(bytes_of_mut(ys).chunks_exact_mut(34))
        {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            y[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
            for (q, v) in y[2..].iter_mut().zip(x) {
                *q = (v * id).round_ties_even() as i8 as u8;
            }
        }
    }
}

/// `d = max/-127` with `max` the first value of largest magnitude, each
/// value rounded half to even and capped at 127, and the sums of each 16
/// (llama.cpp's `quantize_row_q8_K_ref`).
impl Activations for BlockQ8K {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        assert_eq!(xs.len(), ys.len() * 256, "Q8_K activations");
        // The GGML layout: f32 `d`, 256 i8, sixteen i16 sums.
        for (x, y) in xs
            .chunks_exact(256)
            .zip(bytes_of_mut(ys).chunks_exact_mut(292))
        {
            let mut max = 0.0f32;
            for &v in x {
                if v.abs() > max.abs() {
                    max = v;
                }
            }
            if max == 0.0 {
                y.fill(0);
                continue;
            }
            let iscale = -127.0 / max;
            let (qs, sums) = y[4..].split_at_mut(256);
            for (q, v) in qs.iter_mut().zip(x) {
                *q = (iscale * v).round_ties_even().min(127.0) as i8 as u8;
            }
            for (s, q) in sums.chunks_exact_mut(2).zip(qs.chunks_exact(16)) {
                let sum: i16 = q.iter().map(|&q| q as i8 as i16).sum();
                s.copy_from_slice(&sum.to_le_bytes());
            }
            y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
        }
    }
}

/// [`Block`] for a candle block type, forwarding to candle.
macro_rules! candle_block {
    ($($b:ty => $name:literal),* $(,)?) => {$(
        // SAFETY: candle's blocks are `#[repr(C)]` structs of u8/i8/i16
        // arrays, f16 and f32 fields whose sizes candle asserts equal the sum
        // of their fields (no padding).
        unsafe impl Block for $b {
            const NAME: &'static str = $name;
            const BLCK_SIZE: usize = <$b as k_quants::GgmlType>::BLCK_SIZE;

            fn to_float(xs: &[Self], ys: &mut [f32]) {
                <$b as k_quants::GgmlType>::to_float(xs, ys)
            }

            fn from_float(xs: &[f32], ys: &mut [Self]) {
                <$b as k_quants::GgmlType>::from_float(xs, ys)
            }
        }
    )*};
}
candle_block!(
    BlockQ4K => "q4_k",
    BlockQ4_0 => "q4_0",
    BlockQ8_0 => "q8_0",
    BlockQ6K => "q6_k",
    BlockQ5K => "q5_k",
    BlockQ3K => "q3_k",
    BlockQ2K => "q2_k",
    BlockQ8K => "q8_k",
    BlockQ4_1 => "q4_1",
    BlockQ5_0 => "q5_0",
    BlockQ5_1 => "q5_1",
);

/// [`WeightBlock`] for a candle block type with candle's activation type
/// and dot products.
macro_rules! candle_weight_block {
    ($($b:ty),*) => {$(
        impl WeightBlock for $b {
            type VecDotType = <$b as k_quants::GgmlType>::VecDotType;

            fn vec_dot_unopt(xs: &[Self], ys: &[Self::VecDotType]) -> f32 {
                <$b as k_quants::GgmlType>::vec_dot_unopt(xs.len() * Self::BLCK_SIZE, xs, ys)
            }

            #[cfg(not(target_arch = "aarch64"))]
            fn vec_dot(xs: &[Self], ys: &[Self::VecDotType]) -> f32 {
                <$b as k_quants::GgmlType>::vec_dot(xs.len() * Self::BLCK_SIZE, xs, ys)
            }
        }
    )*};
}
candle_weight_block!(BlockQ4K, BlockQ4_0, BlockQ8_0, BlockQ6K, BlockQ5K, BlockQ3K, BlockQ2K);

/// The bytes of a block slice.
pub(crate) fn bytes_of<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: `Block` types are plain `repr(C)` data without padding; the
    // byte view lives as long as the borrow.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), size_of_val(blocks)) }
}

/// The bytes of a block slice, writable.
pub(crate) fn bytes_of_mut<B: Block>(blocks: &mut [B]) -> &mut [u8] {
    // SAFETY: as `bytes_of`; `Block` types accept any bytes.
    unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast(), size_of_val(blocks)) }
}

/// Checks that `bytes` can be viewed as a slice of `B`: a whole number of
/// blocks, starting at `B`'s alignment (2 for every weight format).
fn check_blocks<B: Block>(bytes: &[u8]) -> Result<usize> {
    let (size, align) = (size_of::<B>(), align_of::<B>());
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::invalid(format!(
            "{} bytes are not a whole number of {} blocks of {size} bytes",
            bytes.len(),
            B::NAME
        )));
    }
    if !(bytes.as_ptr() as usize).is_multiple_of(align) {
        return Err(Error::invalid(format!(
            "{} block data at {:p} is not {align}-byte aligned",
            B::NAME,
            bytes.as_ptr()
        )));
    }
    Ok(bytes.len() / size)
}

/// Views quantized bytes as blocks, without copying.
pub(crate) fn as_blocks<B: Block>(bytes: &[u8]) -> Result<&[B]> {
    // An empty slice's pointer is dangling and need not be aligned for `B`.
    if bytes.is_empty() {
        return Ok(&[]);
    }
    let n = check_blocks::<B>(bytes)?;
    // SAFETY: length and alignment were checked; `Block` guarantees every bit
    // pattern is a valid `B`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), n) })
}

/// Views a destination for quantized data as blocks, without copying.
pub(crate) fn as_blocks_mut<B: Block>(bytes: &mut [u8]) -> Result<&mut [B]> {
    if bytes.is_empty() {
        return Ok(&mut []);
    }
    let n = check_blocks::<B>(bytes)?;
    // SAFETY: as in `as_blocks`; the borrow is exclusive.
    Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), n) })
}

/// The row count of an `f32` matrix `cols` wide whose quantized form is
/// `quantized_len` bytes, after checking that both sides agree.
fn check_rows(t: QuantType, f32_len: usize, cols: usize, quantized_len: usize) -> Result<usize> {
    let row_bytes = t.row_bytes(cols).filter(|_| cols > 0).ok_or_else(|| {
        Error::invalid(format!(
            "{}: rows of {cols} weights do not split into blocks of {}",
            t.name(),
            t.block_elems()
        ))
    })?;
    let rows = f32_len / cols;
    if !f32_len.is_multiple_of(cols) || quantized_len != rows * row_bytes {
        return Err(Error::invalid(format!(
            "{}: {f32_len} f32 values and {quantized_len} bytes are not the same \
             whole number of {cols}-wide rows ({row_bytes} bytes each)",
            t.name()
        )));
    }
    Ok(rows)
}

/// Rows per rayon task: quantizing is a few hundred cycles per block, so
/// 16K weights per task amortise the scheduling.
fn min_rows_per_task(cols: usize) -> usize {
    (16_384 / cols).max(1)
}

/// Quantizes `src`, a row-major `[rows, cols]` f32 matrix, into `dst`, which
/// must be exactly `rows * t.row_bytes(cols)` bytes aligned to 2 (for the
/// k-quants' f16 scales). Rows are quantized in parallel.
pub fn quantize_rows(t: QuantType, src: &[f32], cols: usize, dst: &mut [u8]) -> Result<()> {
    check_rows(t, src.len(), cols, dst.len())?;
    with_block_type!(t, B => {
        let blocks = as_blocks_mut::<B>(dst)?;
        blocks
            .par_chunks_mut(cols / B::BLCK_SIZE)
            .zip(src.par_chunks(cols))
            .with_min_len(min_rows_per_task(cols))
            .for_each(|(q, x)| B::from_float(x, q));
    });
    Ok(())
}

/// The inverse of [`quantize_rows`]: `src` holds whole quantized rows of
/// `cols` weights, `dst` receives them as row-major f32.
pub fn dequantize_rows(t: QuantType, src: &[u8], cols: usize, dst: &mut [f32]) -> Result<()> {
    check_rows(t, dst.len(), cols, src.len())?;
    with_block_type!(t, B => {
        let blocks = as_blocks::<B>(src)?;
        blocks
            .par_chunks(cols / B::BLCK_SIZE)
            .zip(dst.par_chunks_mut(cols))
            .with_min_len(min_rows_per_task(cols))
            .for_each(|(q, x)| B::to_float(q, x));
    });
    Ok(())
}

/// Relative RMS error of `dequantized` against `original`:
/// `sqrt(sum((d - x)^2) / sum(x^2))`, accumulated in f64. Zero when they are
/// equal (all zeros included), infinite when only `original` is all zeros.
pub fn relative_rms_error(original: &[f32], dequantized: &[f32]) -> f64 {
    assert_eq!(
        original.len(),
        dequantized.len(),
        "relative_rms_error: lengths differ"
    );
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (&x, &d) in original.iter().zip(dequantized) {
        let (x, d) = (x as f64, d as f64);
        err += (d - x) * (d - x);
        norm += x * x;
    }
    if err == 0.0 {
        0.0
    } else {
        (err / norm).sqrt()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `n` samples of N(0, 1) (Box-Muller), reproducible from `seed`.
    pub(crate) fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (0..n)
            .map(|_| {
                let (u, v) = (1.0 - uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }

    /// Byte storage aligned to 8, as the checkpoint loader guarantees for
    /// tensor data, so tests can also offset it to misalign on purpose.
    pub(crate) struct Aligned(Vec<u64>, usize);

    impl Aligned {
        pub(crate) fn zeroed(len: usize) -> Self {
            Aligned(vec![0; len.div_ceil(8)], len)
        }
        pub(crate) fn bytes(&self) -> &[u8] {
            // SAFETY: the Vec holds at least `self.1` initialised bytes.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.1) }
        }
        pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as above, borrowed exclusively.
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.1) }
        }
    }

    pub(crate) fn quantize(t: QuantType, src: &[f32], cols: usize) -> Aligned {
        let rows = src.len() / cols;
        let mut q = Aligned::zeroed(rows * t.row_bytes(cols).unwrap());
        quantize_rows(t, src, cols, q.bytes_mut()).unwrap();
        q
    }

    /// Activations quantize as llama.cpp's CPU backend does, where candle's
    /// weight quantizers differ: halves round to even, and Q8_K's scale is
    /// `max/-127` (candle's `-128` put the products of every k-quant
    /// weight a rounding away from llama.cpp's).
    #[test]
    fn activations_quantize_as_llama_cpp() {
        let ints = |b: &[u8]| b.iter().map(|&v| v as i8).collect::<Vec<_>>();
        // amax 127: d is exactly 1.
        let mut x = [0.0f32; 32];
        x[..6].copy_from_slice(&[127.0, 2.5, -2.5, 3.5, -0.5, 1.4]);
        let mut q = [BlockQ8_0::zeros()];
        BlockQ8_0::quantize(&x, &mut q);
        let b = bytes_of(&q);
        assert_eq!(half::f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.0);
        assert_eq!(ints(&b[2..8]), [127, 2, -2, 4, 0, 1]);

        // The first of -127 and 127 sets the scale, -127/-127 = 1 (candle's
        // -128/-127 would make the first -128).
        let mut x = [0.0f32; 256];
        x[..5].copy_from_slice(&[-127.0, 127.0, 2.5, -3.5, 0.5]);
        x[16] = 1.5;
        let mut q = [BlockQ8K::zeros()];
        BlockQ8K::quantize(&x, &mut q);
        let b = bytes_of(&q);
        assert_eq!(f32::from_le_bytes(b[..4].try_into().unwrap()), 1.0);
        assert_eq!(ints(&b[4..9]), [-127, 127, 2, -4, 0]);
        assert_eq!(ints(&b[20..21]), [2]);
        let sum = |j: usize| i16::from_le_bytes([b[260 + 2 * j], b[261 + 2 * j]]);
        assert_eq!((sum(0), sum(1), sum(2)), (-2, 2, 0));
    }

    #[test]
    fn names_parse_and_serialize_alike() {
        for t in QuantType::ALL {
            assert_eq!(QuantType::parse(t.name()), Some(t));
            assert_eq!(QuantType::parse(&t.name().to_uppercase()), Some(t));
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.name()));
            assert_eq!(serde_json::from_str::<QuantType>(&json).unwrap(), t);
        }
        assert_eq!(QuantType::parse("q4k"), None);
    }

    #[test]
    fn sizes_match_ggml() {
        let expect = [
            (QuantType::Q4K, 256, 144, 4.5),
            (QuantType::Q4_0, 32, 18, 4.5),
            (QuantType::Q8_0, 32, 34, 8.5),
            (QuantType::Q6K, 256, 210, 6.5625),
            (QuantType::Q5K, 256, 176, 5.5),
            (QuantType::Q3K, 256, 110, 3.4375),
            (QuantType::Q2K, 256, 84, 2.625),
            (QuantType::Q4_1, 32, 20, 5.0),
            (QuantType::Q5_0, 32, 22, 5.5),
            (QuantType::Q5_1, 32, 24, 6.0),
            (QuantType::Iq4Nl, 32, 18, 4.5),
            (QuantType::Iq4Xs, 256, 136, 4.25),
        ];
        for (t, elems, bytes, bits) in expect {
            assert_eq!((t.block_elems(), t.block_bytes()), (elems, bytes), "{t:?}");
            assert_eq!(t.bits_per_weight(), bits, "{t:?}");
            assert_eq!(t.is_lossy_below_4bit(), bits < 4.0, "{t:?}");
        }
        assert_eq!(QuantType::Q4K.row_bytes(2048), Some(8 * 144));
        assert_eq!(QuantType::Q4K.row_bytes(96), None);
        assert_eq!(QuantType::Q8_0.row_bytes(96), Some(3 * 34));
        // Widths from a damaged manifest (vault_manifest fuzz target).
        let huge = usize::MAX - 31;
        assert_eq!(QuantType::Q8_0.row_bytes(huge), None);
        assert_eq!(DType::Quant(QuantType::Q8_0).row_bytes(huge), usize::MAX);
        assert_eq!(DType::F32.row_bytes(1 << 63), usize::MAX);
        assert_eq!(DType::BF16.row_bytes(usize::MAX), usize::MAX);
    }

    #[test]
    fn for_row_falls_back_to_32_blocks_then_none() {
        assert_eq!(QuantType::Q4K.for_row(2048), Some(QuantType::Q4K));
        assert_eq!(QuantType::Q4K.for_row(96), Some(QuantType::Q4_0));
        assert_eq!(QuantType::Q2K.for_row(96), Some(QuantType::Q4_0));
        assert_eq!(QuantType::Q6K.for_row(96), Some(QuantType::Q8_0));
        assert_eq!(QuantType::Q8_0.for_row(96), Some(QuantType::Q8_0));
        assert_eq!(QuantType::Iq4Xs.for_row(96), Some(QuantType::Iq4Nl));
        assert_eq!(QuantType::Q5_1.for_row(96), Some(QuantType::Q5_1));
        for t in QuantType::ALL {
            assert_eq!(t.for_row(40), None, "{t:?}");
        }
    }

    /// Round-trip error on N(0, 1) rows. The data and the algorithms are
    /// deterministic, so the bounds sit ~15% above the measured values (in
    /// the comments): loose enough for a change of seed, tight enough to
    /// catch a format or layout that went wrong. The values follow from the
    /// step sizes: q8_0 steps by max/127 over 32 weights, q4_0 by max/8 over
    /// 32 with no offset, the k-quants fit a scale (and a minimum, except
    /// q6_k and q3_k) per 16 or 32 weights; the IQ4 formats' table is denser
    /// near zero, where most normal values fall.
    #[test]
    fn round_trip_error_per_type() {
        let cols = 512;
        let x = normal(64 * cols, 1);
        let bounds = [
            (QuantType::Q8_0, 0.0062), // measured 0.00540
            (QuantType::Q6K, 0.021),   // measured 0.0183
            (QuantType::Q5K, 0.042),   // measured 0.0370
            (QuantType::Q4K, 0.086),   // measured 0.0746
            (QuantType::Q4_0, 0.099),  // measured 0.0864
            (QuantType::Q3K, 0.17),    // measured 0.150
            (QuantType::Q2K, 0.33),    // measured 0.288
            (QuantType::Q4_1, 0.090),  // measured 0.0783
            (QuantType::Q5_0, 0.049),  // measured 0.0428
            (QuantType::Q5_1, 0.044),  // measured 0.0378
            (QuantType::Iq4Nl, 0.088), // measured 0.0768
            (QuantType::Iq4Xs, 0.089), // measured 0.0774
        ];
        for (t, bound) in bounds {
            let q = quantize(t, &x, cols);
            let mut d = vec![0.0; x.len()];
            dequantize_rows(t, q.bytes(), cols, &mut d).unwrap();
            let err = relative_rms_error(&x, &d);
            println!("{}: relative RMS error {err:.5}", t.name());
            assert!(err < bound, "{}: {err} >= {bound}", t.name());
        }
    }

    #[test]
    fn zero_rows_round_trip_to_zero() {
        let x = vec![0.0f32; 2 * 256];
        for t in QuantType::ALL {
            let q = quantize(t, &x, 256);
            let mut d = vec![1.0; x.len()];
            dequantize_rows(t, q.bytes(), 256, &mut d).unwrap();
            assert!(d.iter().all(|&v| v == 0.0), "{t:?}");
        }
    }

    #[test]
    fn bad_lengths_and_alignment_are_errors() {
        let x = normal(2 * 256, 2);
        let t = QuantType::Q4K;
        let mut buf = Aligned::zeroed(2 * 144 + 2);
        let err = |r: Result<()>| r.unwrap_err().to_string();

        let msg = err(quantize_rows(
            t,
            &x,
            256,
            &mut buf.bytes_mut()[..2 * 144 - 1],
        ));
        assert!(msg.contains("not the same whole number"), "{msg}");
        let msg = err(quantize_rows(
            t,
            &x[..300],
            256,
            &mut buf.bytes_mut()[..144],
        ));
        assert!(msg.contains("not the same whole number"), "{msg}");
        let msg = err(quantize_rows(t, &x, 96, &mut buf.bytes_mut()[..144]));
        assert!(msg.contains("do not split into blocks of 256"), "{msg}");
        let msg = err(quantize_rows(t, &[], 0, &mut []));
        assert!(msg.contains("do not split"), "{msg}");
        let msg = err(quantize_rows(
            t,
            &x,
            256,
            &mut buf.bytes_mut()[1..2 * 144 + 1],
        ));
        assert!(msg.contains("not 2-byte aligned"), "{msg}");

        let mut d = vec![0.0; 2 * 256];
        let msg = err(dequantize_rows(
            t,
            &buf.bytes()[1..2 * 144 + 1],
            256,
            &mut d,
        ));
        assert!(msg.contains("not 2-byte aligned"), "{msg}");
        let msg = err(dequantize_rows(t, &buf.bytes()[..2 * 144 + 2], 256, &mut d));
        assert!(msg.contains("not the same whole number"), "{msg}");
        assert!(dequantize_rows(t, &buf.bytes()[..2 * 144], 256, &mut d).is_ok());
    }
}
