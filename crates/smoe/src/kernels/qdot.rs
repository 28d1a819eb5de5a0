//! What the integer dot kernels of every architecture (`qdot_x86`,
//! `qdot_avx512`, `qdot_arm`) share: the GGML block layouts they read by
//! hand, and their small helpers.
//!
//! Every block format smoe computes with has kernels: the three it stores
//! experts and backbones in by default (Q4_K and Q8_0, and Q4_0, the
//! fallback for rows that are not a multiple of 256, small models' down
//! projections), Q6_K (the LM head of a 4-bit backbone), and every other
//! one a GGUF file brings (listed below). Each kernel takes one
//! weight row and `N` activation rows (tokens) at once: a weight block is
//! loaded and unpacked once and then applied to every token, which is what
//! makes prefill fast, since unpacking nibbles and scales costs as much as the
//! products themselves. `N = 1` is the matrix-vector product of decode. The
//! products inside a block are exact integers, so results differ from
//! candle's scalar code only in the order of f32 additions; the activation
//! quantizers write exactly the scalar `quant::Activations` bytes
//! (llama.cpp's), only faster.
//!
//! The layouts (all little-endian, `repr(C)` in candle):
//! - Q8_0 and Q4_0: f16 scale `d`, then 32 i8 values, or 16 bytes of nibbles
//!   (element i in the low nibble of byte i, element i+16 in the high one,
//!   stored offset by 8);
//! - Q8_K: f32 `d`, 256 i8, then sixteen i16 sums of 16 consecutive values;
//! - Q4_K: f16 `d` and `dmin`, twelve bytes packing eight 6-bit scales and
//!   eight 6-bit mins, then 128 bytes of nibbles in four 32-byte runs, each
//!   holding 64 weights (32 in the low nibbles, the next 32 in the high). The
//!   weight is `d*scale_j*q - dmin*min_j`. A block's product with a Q8_K
//!   block is `d*d8*sum_j scale_j*(q4.q8)_j - dmin*d8*sum_j min_j*sum(q8)_j`,
//!   where the sums of q8 come precomputed in the activation block.
//!
//! - Q5_K: Q4_K's header, then 32 bytes `qh` of fifth bits and Q4_K's 128
//!   bytes of nibbles; weight `64c + i` (`i < 32`) of run `c` has bit `2c`
//!   of `qh[i]` as its fifth bit, weight `64c + 32 + i` bit `2c + 1`;
//! - Q6_K: see `qdot_x86::q6k`;
//! - Q3_K: 32 bytes `hmask`, 64 bytes of 2-bit values, twelve bytes packing
//!   sixteen 6-bit scales (stored offset by 32, one per 16 weights), f16 `d`.
//!   Each half of 128 weights takes 32 bytes `qs`: its run
//!   `j` (32 weights) is bits `2j..2j+2` of `qs[i]`, minus 4 where bit
//!   `4*half + j` of `hmask[i]` is clear. The weight is `d*scale*q`;
//! - Q2_K: sixteen bytes of 4-bit scales (low nibble) and mins (high
//!   nibble), one each per 16 weights, 64 bytes of 2-bit values laid out as
//!   Q3_K's, then f16 `d` and `dmin`; weight `d*scale*q - dmin*min`.
//!
//! The K-quants with a scale per 16 weights (Q6_K, Q3_K, Q2_K) all go
//! through unsigned weights: Q6_K's `q` and Q3_K's `q + 4` (its high bit set
//! reads as 4) are unsigned, which `maddubs`/`dpbusd` want, and the offset
//! comes off once per block as `offset*sum_j scale_j*bsum_j` from the
//! activations' sums of 16, exactly in i32.
//!
//! The formats of GGUF files smoe does not write itself (Q4_1, Q5_0, Q5_1,
//! IQ4_NL and IQ4_XS) are laid out in `quant::formats`. The 32-weight ones
//! take Q8_0 activations, IQ4_XS and the K-quants Q8_K. Q4_1 and Q5_1 add
//! `m*d8*sum(y)` per block, the activations' sum taken in the kernel.

/// Bytes per block of each format.
pub const Q4K: usize = 144;
pub const Q8K: usize = 292;
pub const Q8_0: usize = 34;
pub const Q4_0: usize = 18;
pub const Q4_1: usize = 20;
pub const Q5_0: usize = 22;
pub const Q5_1: usize = 24;
pub const IQ4_NL: usize = 18;
pub const IQ4_XS: usize = 136;
pub const Q5K: usize = 176;
pub const Q6K: usize = 210;
pub const Q3K: usize = 110;
pub const Q2K: usize = 84;

pub(crate) use crate::quant::KVALUES_IQ4NL;

/// Sub-block `i`'s scale `ls - 32` of an IQ4_XS block from its `scales_h`
/// (`h`) and `scales_l` (`l`, as a little-endian word).
#[inline(always)]
pub fn iq4xs_scale(h: u16, l: u32, i: usize) -> i32 {
    (((l >> (4 * i)) & 0x0F) | (((h as u32) >> (2 * i)) & 3) << 4) as i32 - 32
}

/// The `scales_h` and `scales_l` words of the IQ4_XS block at `p`.
///
/// # Safety
/// `p` must point to a whole IQ4_XS block.
#[inline(always)]
pub unsafe fn iq4xs_scale_words(p: *const u8) -> (u16, u32) {
    (
        p.add(2).cast::<u16>().read_unaligned(),
        p.add(4).cast::<u32>().read_unaligned(),
    )
}

/// `f` applied to each of `R` rows, its `N` results regrouped by token:
/// `[k][r]` is token `k`'s product with row `r`.
pub fn by_row<W, const R: usize, const N: usize>(
    w: [W; R],
    f: impl Fn(W) -> [f32; N],
) -> [[f32; R]; N] {
    let v = w.map(f);
    std::array::from_fn(|k| v.map(|v| v[k]))
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K block, unpacked
/// from its twelve bytes into one byte each: scales in the bytes of the
/// first word, mins in the second (ggml's `get_scale_min_k4`, done on whole
/// words without branches). Returned in registers: building them in a byte
/// array and reloading it as wider words stalls store-to-load forwarding,
/// which cost the prefill kernel a third of its time.
#[inline(always)]
pub fn scales_mins(p: &[u8]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let scales = (w0 & LOW6) as u64 | (((w2 & LOW4) | (((w0 >> 6) & TOP2) << 4)) as u64) << 32;
    let mins = (w1 & LOW6) as u64 | ((((w2 >> 4) & LOW4) | (((w1 >> 6) & TOP2) << 4)) as u64) << 32;
    (scales, mins)
}

/// The sixteen 6-bit scales of a Q3_K block, unpacked from its twelve bytes
/// into one byte each (still offset by 32), scales 0..8 in the first word:
/// the low nibbles of bytes 0..8 then their high nibbles, each with two
/// bits of bytes 8..12 on top (ggml's `kmask` shuffle, on whole words).
#[inline(always)]
pub fn q3k_scales(p: &[u8]) -> (u64, u64) {
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let s = |w: u32, shift: u32| (w & LOW4 | ((w2 >> shift) & TOP2) << 4) as u64;
    (
        s(w0, 0) | s(w1, 2) << 32,
        s(w0 >> 4, 4) | s(w1 >> 4, 6) << 32,
    )
}
