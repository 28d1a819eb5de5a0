//! Integer dot products of GGML weight blocks against 8-bit activation
//! blocks with AVX2, chosen at run time.
//!
//! candle has AVX2 versions of these, but selects them with
//! `cfg(target_feature)`, so the portable x86-64 build that users install
//! runs its scalar loops. These are the formats smoe stores experts and
//! backbones in by default: Q4_K and Q8_0, Q4_0, the fallback for rows that
//! are not a multiple of 256 (small models' down projections), and Q6_K, the
//! LM head of a 4-bit backbone; and those GGUF files bring: Q5_K, Q3_K and
//! Q2_K, Q4_1, Q5_0 and Q5_1 (llama.cpp's fallbacks for such rows), IQ4_NL
//! and IQ4_XS.
//!
//! Each takes one weight row (four for Q4_K's `q4k_rows4`) and `N`
//! activation rows (tokens) at once: a weight block is loaded and unpacked
//! once and then applied to every token, which is what makes prefill fast,
//! since unpacking nibbles and scales costs as much as the products
//! themselves. `N = 1` is the matrix-vector product of decode. Each token
//! keeps eight f32 partial sums across blocks, reduced once per row; the
//! products inside a block are exact integers, so results differ from
//! candle's scalar code only in the order of f32 additions. The activation
//! quantizers here write exactly the scalar `quant::Activations` bytes
//! (llama.cpp's), only faster.
//!
//! The block layouts are described in `kernels::qdot`.

use std::arch::x86_64::*;

use super::qdot::{iq4xs_scale, iq4xs_scale_words, q3k_scales, scales_mins, KVALUES_IQ4NL};
use super::qdot::{IQ4_NL, IQ4_XS, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8K, Q8_0};

/// Whether these kernels can run here.
pub fn available() -> bool {
    super::simd::has_avx2() && is_x86_feature_detected!("f16c")
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        u16::from_le_bytes([*p, *p.add(1)]) as i32,
    )))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// Adds one block's products of 32 signed weights `x` (scale `dw`) with the
/// Q8_0 block at `a[k]` of each token to `acc[k]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block32<const N: usize>(acc: &mut [__m256; N], x: __m256i, dw: f32, a: [*const u8; N]) {
    // `maddubs` wants one unsigned operand, so the sign of `x` moves onto
    // the activations. Q8 quantizers produce [-127, 127], so no pair of
    // products saturates its i16.
    let ax = _mm256_sign_epi8(x, x);
    let ones = _mm256_set1_epi16(1);
    for k in 0..N {
        let y = _mm256_loadu_si256(a[k].add(2).cast());
        let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(y, x));
        let d = _mm256_set1_ps(dw * f16_at(a[k]));
        acc[k] = _mm256_fmadd_ps(
            d,
            _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)),
            acc[k],
        );
    }
}

/// Blocks of a 32-weight format of `size` bytes (f16 scale first, f16
/// minimum next where `MIN`) against the Q8_0 activations of `N` tokens:
/// `unpack` gives a block's 32 weights as bytes in element order, signed,
/// or unsigned where `MIN`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot32<const N: usize, const MIN: bool>(
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    unpack: impl Fn(*const u8) -> __m256i,
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8_0));
    let (w, a) = (w.as_ptr(), a.map(<[u8]>::as_ptr));
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..blocks {
        let wb = w.add(b * size);
        let (x, ab) = (unpack(wb), a.map(|a| a.add(b * Q8_0)));
        if MIN {
            block32_min(&mut acc, x, f16_at(wb), f16_at(wb.add(2)), ab);
        } else {
            block32(&mut acc, x, f16_at(wb), ab);
        }
    }
    acc.map(|v| hsum(v))
}

/// Adds one block's products of 32 unsigned weights `x` (scale `dw`,
/// minimum `m`) with the Q8_0 block at `a[k]` of each token to `acc[k]`:
/// `dw*d8*sum(x*y) + m*d8*sum(y)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block32_min<const N: usize>(
    acc: &mut [__m256; N],
    x: __m256i,
    dw: f32,
    m: f32,
    a: [*const u8; N],
) {
    // Weights of at most 31 against [-127, 127]: no pair saturates.
    let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
    for k in 0..N {
        let y = _mm256_loadu_si256(a[k].add(2).cast());
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), ones16);
        let s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, y), ones16);
        let d8 = f16_at(a[k]);
        acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d8), _mm256_cvtepi32_ps(p), acc[k]);
        acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(m * d8), _mm256_cvtepi32_ps(s), acc[k]);
    }
}

/// The 32 nibbles of the 16 bytes at `p` in element order: low nibbles are
/// elements 0..16, high nibbles 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles32(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// 32 bytes, byte `i` all ones where bit `i` of the word at `p` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bit_bytes(p: *const u8) -> __m256i {
    let bits = _mm256_set1_epi32(p.cast::<i32>().read_unaligned());
    // Byte i takes byte i / 8 of the word, then keeps its own bit i % 8.
    let spread = _mm256_shuffle_epi8(
        bits,
        _mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask)
}

/// IQ4's table in both 128-bit lanes, for `shuffle_epi8` lookups.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn iq4_table() -> __m256i {
    _mm256_broadcastsi128_si256(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr().cast()))
}

/// Q8_0 weights against the Q8_0 activations of `N` tokens, `blocks` blocks
/// of each.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32::<N, false>(w, Q8_0, a, blocks, |wb| {
        _mm256_loadu_si256(wb.add(2).cast())
    })
}

/// Q4_0 weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_0<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32::<N, false>(w, Q4_0, a, blocks, |wb| {
        _mm256_sub_epi8(nibbles32(wb.add(2)), _mm256_set1_epi8(8))
    })
}

/// Q4_1 weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_1<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32::<N, true>(w, Q4_1, a, blocks, |wb| nibbles32(wb.add(4)))
}

/// Q5_0 weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q5_0<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32::<N, false>(w, Q5_0, a, blocks, |wb| {
        // `q - 16` is the nibble where the high bit is set and the nibble
        // with its top four bits set (minus 16 as i8) where it is not.
        let clear = _mm256_andnot_si256(bit_bytes(wb.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles32(wb.add(6)), clear)
    })
}

/// Q5_1 weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q5_1<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32::<N, true>(w, Q5_1, a, blocks, |wb| {
        let high = _mm256_and_si256(bit_bytes(wb.add(4)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles32(wb.add(8)), high)
    })
}

/// IQ4_NL weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn iq4nl<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    let table = iq4_table();
    dot32::<N, false>(w, IQ4_NL, a, blocks, |wb| {
        _mm256_shuffle_epi8(table, nibbles32(wb.add(2)))
    })
}

/// IQ4_XS weights against the Q8_K activations of `N` tokens: per 32-weight
/// sub-block, the table's values of its nibbles times the activations,
/// times the sub-block's scale; `d*d8` once per block.
///
/// Q8_K activations reach -128, which `maddubs` cannot take negated: the
/// activations' magnitudes are its unsigned operand and their signs move
/// onto the weights (at most 127 in magnitude), so a pair sums to at most
/// 2*128*127 and never saturates.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn iq4xs<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    assert!(w.len() >= blocks * IQ4_XS && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    let table = iq4_table();
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, wb) in w.chunks_exact(IQ4_XS).take(blocks).enumerate() {
        stream_ahead::<N>(wb.as_ptr());
        let ab = a.map(|a| a.add(b * Q8K));
        let (h, l) = iq4xs_scale_words(wb.as_ptr());
        let mut sumi = [_mm256_setzero_si256(); N];
        for i in 0..8 {
            let x = _mm256_shuffle_epi8(table, nibbles32(wb.as_ptr().add(8 + 16 * i)));
            let s = _mm256_set1_epi16(iq4xs_scale(h, l, i) as i16);
            for k in 0..N {
                let y = _mm256_loadu_si256(ab[k].add(4 + 32 * i).cast());
                let p = _mm256_maddubs_epi16(_mm256_abs_epi8(y), _mm256_sign_epi8(x, y));
                sumi[k] = _mm256_add_epi32(sumi[k], _mm256_madd_epi16(p, s));
            }
        }
        let d = f16_at(wb.as_ptr());
        for k in 0..N {
            let d8 = ab[k].cast::<f32>().read_unaligned();
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(sumi[k]), acc[k]);
        }
    }
    acc.map(|v| hsum(v))
}

/// With one token (decode) the weights stream through once, and a core
/// keeps too few cache misses in flight to fill DRAM's bandwidth: asks for
/// the bytes 1 KiB past block `p` (the rest of the row, then the next row's,
/// which follows it in memory). Several tokens reuse each block from cache.
#[inline(always)]
pub(super) unsafe fn stream_ahead<const N: usize>(p: *const u8) {
    if N == 1 {
        for off in [1024, 1088, 1152] {
            // A prefetch never faults, even past the end of the weights.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
        }
    }
}

/// What [`stream_ahead`] is to one row, for a kernel that reads several
/// rows a block at a time: those are short interleaved streams the
/// hardware prefetchers do not follow, so block `b`'s step asks for its
/// share (`share` bytes) of the rows after the kernel's own, from `next`
/// (where they start, as `matmul` hands rows over in order).
#[inline(always)]
pub(super) unsafe fn prefetch_share(next: *const u8, b: usize, share: usize) {
    for line in (0..share).step_by(64) {
        // A prefetch never faults, even past the end of the weights.
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * share + line).cast());
    }
}

/// Q4_K weights against the Q8_K activations of `N` tokens. A block's
/// product is `d*d8*sum_j scale_j*(q4.q8)_j - dmin*d8*sum_j min_j*sum(q8)_j`,
/// where the sums of q8 come precomputed in the activation block.
///
/// Its f32 arithmetic is [`q4k_rows4`]'s for one row, bit for bit: the
/// block's integer sums are folded to the same two partial sums (elements
/// `0..4` and `4..8` of every eight, exact in i32) and accumulated in two
/// f32 lanes with the same fused operations. One token runs here and
/// several run there, so without this a sequence decoded in a batch got
/// other logits than alone.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    let low = _mm256_set1_epi8(0x0F);
    dot_k32(w, Q4K, a, blocks, |wb, c| {
        let bits = _mm256_loadu_si256(wb.add(16 + 32 * c).cast());
        (
            _mm256_and_si256(bits, low),
            _mm256_and_si256(_mm256_srli_epi16(bits, 4), low),
        )
    })
}

/// Q5_K weights against the Q8_K activations of `N` tokens: Q4_K's
/// arithmetic on nibbles with their fifth bits added.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q5k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    let (low, fifth) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
    dot_k32(w, Q5K, a, blocks, |wb, c| {
        let bits = _mm256_loadu_si256(wb.add(48 + 32 * c).cast());
        let qh = _mm256_loadu_si256(wb.add(16).cast());
        let high = |bit: usize| {
            let m = _mm256_set1_epi8(1 << bit);
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m), fifth)
        };
        (
            _mm256_or_si256(_mm256_and_si256(bits, low), high(2 * c)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(bits, 4), low),
                high(2 * c + 1),
            ),
        )
    })
}

/// Blocks of `size` bytes with Q4_K's header (`d`, `dmin`, packed 6-bit
/// scales and mins) against the Q8_K activations of `N` tokens: `unpack`
/// gives the unsigned weights (at most 31) of run `c`'s two 32-weight
/// sub-blocks `2c` and `2c + 1`. See [`q4k`] for the arithmetic.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k32<const N: usize>(
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    unpack: impl Fn(*const u8, usize) -> (__m256i, __m256i),
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    // Lanes 0 and 1 are the row's two partial sums; 2 and 3 stay unused.
    let mut acc = [_mm_setzero_ps(); N];
    for (b, wb) in w.chunks_exact(size).take(blocks).enumerate() {
        stream_ahead::<N>(wb.as_ptr());
        let ab = a.map(|a| a.add(b * Q8K));
        let (scales, mins) = scales_mins(&wb[4..16]);
        let sm = _mm256_cvtepu8_epi16(_mm_set_epi64x(mins as i64, scales as i64));
        let mut scales = [0i16; 8];
        _mm_storeu_si128(scales.as_mut_ptr().cast(), _mm256_castsi256_si128(sm));

        let mut sumi = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            let (lo, hi) = unpack(wb.as_ptr(), c);
            let s_lo = _mm256_set1_epi16(scales[2 * c]);
            let s_hi = _mm256_set1_epi16(scales[2 * c + 1]);
            for k in 0..N {
                let q8 = ab[k].add(4 + 64 * c);
                let a_lo = _mm256_loadu_si256(q8.cast());
                let a_hi = _mm256_loadu_si256(q8.add(32).cast());
                // u8 x i8 pairs summed into i16: at most 2*31*128, no overflow.
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), s_hi);
                sumi[k] = _mm256_add_epi32(sumi[k], _mm256_add_epi32(p_lo, p_hi));
            }
        }

        let mins = _mm256_extracti128_si256(sm, 1);
        let (d, dmin) = (f16_at(wb.as_ptr()), f16_at(wb.as_ptr().add(2)));
        for k in 0..N {
            let d8 = ab[k].cast::<f32>().read_unaligned();
            // The sixteen sums of 16 activations, added in pairs to match the
            // eight mins (each covers 32 weights); their four i32 products
            // take the low lanes of an eight-lane vector.
            let bsums = _mm256_loadu_si256(ab[k].add(260).cast());
            let pair_sums = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256(bsums, 1),
            );
            let m = _mm_madd_epi16(mins, pair_sums);
            let m = _mm_cvtepi32_ps(_mm_hadd_epi32(m, m));
            // Lane l of `sumi` holds elements 4l..4l+4 of each 32: the even
            // lanes are the first partial sum, the odd lanes the second.
            let s = sumi[k];
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_cvtepi32_ps(_mm_add_epi32(s, _mm_unpackhi_epi64(s, s)));
            acc[k] = _mm_fmadd_ps(_mm_set1_ps(d * d8), s, acc[k]);
            acc[k] = _mm_fnmadd_ps(_mm_set1_ps(dmin * d8), m, acc[k]);
        }
    }
    acc.map(|v| _mm_cvtss_f32(v) + _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

/// Q4_K weights of four rows against the Q8_K activations of `N` tokens:
/// `out[k][r]` is row `r` dotted with token `k`.
///
/// With one row per call, every 32 products cost two multiplies, `maddubs`
/// and the `madd` that applies their sub-block's scale. Here the four rows'
/// nibbles are interleaved in registers, eight bytes of each row per 64-bit
/// lane, against each token's eight activations broadcast to every lane: the
/// four `maddubs` results of a 32-weight sub-block then share lanes with one
/// row each, so they are added as i16 (at most 4*2*15*128, no overflow)
/// before a single `madd` with a vector of the four rows' scales, 10
/// multiplies per 256 products instead of 16.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k_rows4<const N: usize>(
    w: [&[u8]; 4],
    a: [&[u8]; N],
    blocks: usize,
) -> [[f32; 4]; N] {
    assert!(w.iter().all(|w| w.len() >= blocks * Q4K));
    assert!(a.iter().all(|a| a.len() >= blocks * Q8K));
    let (w, a) = (w.map(<[u8]>::as_ptr), a.map(<[u8]>::as_ptr));
    let low = _mm256_set1_epi8(0x0F);
    // Picks byte `8*r + j` of a 128-bit half into the four i16 lanes of
    // row r (two rows per half), once `j` is added; 0x80 zeroes a byte.
    let pick = _mm256_set1_epi64x(0x8000_8000_8000_8000u64 as i64);
    let pick = _mm256_or_si256(
        pick,
        _mm256_setr_epi64x(0, 0x0008_0008_0008_0008, 0, 0x0008_0008_0008_0008),
    );
    let mut acc = [_mm256_setzero_ps(); N];
    // The next four rows (see `q4k_rows8`).
    let next = w[0].wrapping_add(4 * blocks * Q4K);
    for b in 0..blocks {
        let wb = w.map(|w| w.add(b * Q4K));
        let ab = a.map(|a| a.add(b * Q8K));
        prefetch_share(next, b, 4 * Q4K);
        // A loop rather than `map`: the closure `map` takes is not inlined
        // into this function (2-3% of its time in calls).
        let (mut sc, mut mn) = ([0i64; 4], [0i64; 4]);
        for r in 0..4 {
            let (s, m) = scales_mins(std::slice::from_raw_parts(wb[r].add(4), 12));
            (sc[r], mn[r]) = (s as i64, m as i64);
        }
        // Row r's eight scales in 64-bit lane r; its mins as i16, two rows
        // per vector, row r's in half r % 2.
        let scales = _mm256_setr_epi64x(sc[0], sc[1], sc[2], sc[3]);
        let mins01 = _mm256_cvtepu8_epi16(_mm_set_epi64x(mn[1], mn[0]));
        let mins23 = _mm256_cvtepu8_epi16(_mm_set_epi64x(mn[3], mn[2]));
        // d and dmin of each row, as f32 pairs matching the accumulators'
        // layout: two lanes per row, row r in lanes 2r and 2r+1.
        let d_dmin = _mm256_cvtph_ps(_mm_setr_epi32(
            wb[0].cast::<i32>().read_unaligned(),
            wb[1].cast::<i32>().read_unaligned(),
            wb[2].cast::<i32>().read_unaligned(),
            wb[3].cast::<i32>().read_unaligned(),
        ));
        let d = _mm256_permutevar8x32_ps(d_dmin, _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6));
        let dmin = _mm256_permutevar8x32_ps(d_dmin, _mm256_setr_epi32(1, 1, 3, 3, 5, 5, 7, 7));

        let mut sumi = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            // Four rows' 32 bytes of run c, transposed so that vector m
            // holds bytes 8m..8m+8 of row r in 64-bit lane r.
            let run = wb.map(|p| _mm256_loadu_si256(p.add(16 + 32 * c).cast()));
            let lo01 = _mm256_unpacklo_epi64(run[0], run[1]);
            let hi01 = _mm256_unpackhi_epi64(run[0], run[1]);
            let lo23 = _mm256_unpacklo_epi64(run[2], run[3]);
            let hi23 = _mm256_unpackhi_epi64(run[2], run[3]);
            let v = [
                _mm256_permute2x128_si256(lo01, lo23, 0x20),
                _mm256_permute2x128_si256(hi01, hi23, 0x20),
                _mm256_permute2x128_si256(lo01, lo23, 0x31),
                _mm256_permute2x128_si256(hi01, hi23, 0x31),
            ];
            let q_lo = v.map(|v| _mm256_and_si256(v, low));
            let q_hi = v.map(|v| _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
            let s_lo =
                _mm256_shuffle_epi8(scales, _mm256_add_epi8(pick, _mm256_set1_epi8(2 * c as i8)));
            let s_hi = _mm256_shuffle_epi8(
                scales,
                _mm256_add_epi8(pick, _mm256_set1_epi8(2 * c as i8 + 1)),
            );
            for k in 0..N {
                let q8 = ab[k].add(4 + 64 * c);
                let bcast =
                    |i: usize| _mm256_set1_epi64x(q8.add(8 * i).cast::<i64>().read_unaligned());
                let mut p_lo = _mm256_setzero_si256();
                let mut p_hi = _mm256_setzero_si256();
                for m in 0..4 {
                    p_lo = _mm256_add_epi16(p_lo, _mm256_maddubs_epi16(q_lo[m], bcast(m)));
                    p_hi = _mm256_add_epi16(p_hi, _mm256_maddubs_epi16(q_hi[m], bcast(4 + m)));
                }
                let s =
                    _mm256_add_epi32(_mm256_madd_epi16(p_lo, s_lo), _mm256_madd_epi16(p_hi, s_hi));
                sumi[k] = _mm256_add_epi32(sumi[k], s);
            }
        }

        for k in 0..N {
            let d8 = _mm256_set1_ps(ab[k].cast::<f32>().read_unaligned());
            // Each sub-block's sum of activations against the four rows'
            // mins, reduced to two lanes per row in the accumulators' order.
            let bsums = _mm256_loadu_si256(ab[k].add(260).cast());
            let pair_sums = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256(bsums, 1),
            );
            let pair_sums = _mm256_broadcastsi128_si256(pair_sums);
            let m = _mm256_hadd_epi32(
                _mm256_madd_epi16(mins01, pair_sums),
                _mm256_madd_epi16(mins23, pair_sums),
            );
            let m = _mm256_permute4x64_epi64(m, 0b11_01_10_00);
            acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, d8), _mm256_cvtepi32_ps(sumi[k]), acc[k]);
            acc[k] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, d8), _mm256_cvtepi32_ps(m), acc[k]);
        }
    }
    acc.map(|v| {
        let mut s = [0.0f32; 8];
        _mm256_storeu_ps(s.as_mut_ptr(), _mm256_hadd_ps(v, v));
        [s[0], s[1], s[4], s[5]]
    })
}

/// Quantizes rows of 256 activations to Q8_K blocks, bit for bit as
/// [`Activations`](crate::quant::Activations) (llama.cpp) does: `d =
/// max/-127` with `max` the first value of largest magnitude, each value
/// rounded half to even and capped at 127, and the sums of each 16.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    let blocks = out.len() / Q8K;
    assert!(x.len() == blocks * 256 && out.len() == blocks * Q8K);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let ones = _mm256_set1_epi16(1);
    for (xs, y) in x.chunks_exact(256).zip(out.chunks_exact_mut(Q8K)) {
        let mut m = _mm256_setzero_ps();
        for v in xs.chunks_exact(8) {
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(v.as_ptr()), abs));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let Some(&max) = xs.iter().find(|v| v.abs() == amax).filter(|_| amax != 0.0) else {
            // All zeros, or a NaN that makes the product meaningless anyway.
            y.fill(0);
            continue;
        };
        let iscale = -127.0 / max;
        let scale = _mm256_set1_ps(iscale);
        let (qs, rest) = y[4..].split_at_mut(256);
        for (g, (xg, q)) in xs.chunks_exact(32).zip(qs.chunks_exact_mut(32)).enumerate() {
            let b = quantize32(xg, scale, 127.0);
            _mm256_storeu_si256(q.as_mut_ptr().cast(), b);
            for h in 0..2 {
                let part = if h == 0 {
                    _mm256_castsi256_si128(b)
                } else {
                    _mm256_extracti128_si256(b, 1)
                };
                let s = _mm256_madd_epi16(_mm256_cvtepi8_epi16(part), ones);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                let j = 2 * g + h;
                rest[2 * j..2 * j + 2]
                    .copy_from_slice(&(_mm_cvtsi128_si32(s) as i16).to_le_bytes());
            }
        }
        y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// 32 values times `scale`, each rounded half to even, capped at `cap` and
/// saturated to i8, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize32(x: &[f32], scale: __m256, cap: f32) -> __m256i {
    let i = [0, 1, 2, 3].map(|k| {
        let v = _mm256_mul_ps(scale, _mm256_loadu_ps(x[8 * k..8 * k + 8].as_ptr()));
        let r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_cvttps_epi32(_mm256_min_ps(r, _mm256_set1_ps(cap)))
    });
    // The packs interleave 128-bit halves; the permutation restores order.
    let w01 = _mm256_packs_epi32(i[0], i[1]);
    let w23 = _mm256_packs_epi32(i[2], i[3]);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), order)
}

/// Quantizes rows of activations to Q8_0 blocks, bit for bit as
/// [`Activations`](crate::quant::Activations) (llama.cpp) does: `d =
/// amax/127` (stored as f16), each value times `1/d` rounded half to even.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    let blocks = out.len() / Q8_0;
    assert!(x.len() == blocks * 32 && out.len() == blocks * Q8_0);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (xs, y) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0)) {
        let v = [0, 1, 2, 3].map(|k| _mm256_and_ps(_mm256_loadu_ps(xs[8 * k..].as_ptr()), abs));
        let m = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let q = quantize32(xs, _mm256_set1_ps(id), 127.0);
        _mm256_storeu_si256(y[2..].as_mut_ptr().cast(), q);
    }
}

/// The header of a K-quant block with a scale per 16 weights: weight `i`
/// is `d*scale_{i/16}*(q_i - offset) - dmin*min_{i/16}`, `q_i` unsigned.
#[derive(Clone, Copy)]
pub(super) struct Head16 {
    /// The sixteen scales, as i8.
    pub scales: __m128i,
    pub d: f32,
    /// Q2_K's sixteen mins, as i8, and their `dmin`; zeros elsewhere.
    pub mins: __m128i,
    pub dmin: f32,
}

/// The header of the Q6_K block at `wb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k_head(wb: *const u8) -> Head16 {
    Head16 {
        scales: _mm_loadu_si128(wb.add(192).cast()),
        d: f16_at(wb.add(208)),
        mins: _mm_setzero_si128(),
        dmin: 0.0,
    }
}

/// The header of the Q3_K block at `wb`, its scales less their offset 32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q3k_head(wb: *const u8) -> Head16 {
    let (lo, hi) = q3k_scales(std::slice::from_raw_parts(wb.add(96), 12));
    Head16 {
        scales: _mm_sub_epi8(_mm_set_epi64x(hi as i64, lo as i64), _mm_set1_epi8(32)),
        d: f16_at(wb.add(108)),
        mins: _mm_setzero_si128(),
        dmin: 0.0,
    }
}

/// The header of the Q2_K block at `wb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q2k_head(wb: *const u8) -> Head16 {
    let sm = _mm_loadu_si128(wb.cast());
    let low = _mm_set1_epi8(0x0F);
    Head16 {
        scales: _mm_and_si128(sm, low),
        d: f16_at(wb.add(80)),
        mins: _mm_and_si128(_mm_srli_epi16(sm, 4), low),
        dmin: f16_at(wb.add(82)),
    }
}

/// Blocks of `size` bytes of a K-quant with a scale per 16 weights against
/// the Q8_K activations of `N` tokens: `head` reads a block's scales, and
/// `runs` gives the unsigned weights (at most 63) of the four 32-weight
/// runs of its 128-weight half `h`, in element order. `OFFSET` comes off
/// every `q` exactly, through the activations' sums of 16; the mins only
/// where `MIN`, in f32 as candle takes them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k16<const N: usize, const OFFSET: i32, const MIN: bool>(
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    head: impl Fn(*const u8) -> Head16,
    runs: impl Fn(*const u8, usize) -> [__m256i; 4],
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, wb) in w.chunks_exact(size).take(blocks).enumerate() {
        stream_ahead::<N>(wb.as_ptr());
        let ab = a.map(|a| a.add(b * Q8K));
        let h = head(wb.as_ptr());
        let mut sumi = [_mm256_setzero_si256(); N];
        for half in 0..2 {
            let q = runs(wb.as_ptr(), half);
            // Run c covers scales 8*half + 2c (its first 16 weights, the
            // low i16 lanes of a `maddubs`) and the next (the high lanes).
            let s = [0, 1, 2, 3].map(|c| {
                let j = (8 * half + 2 * c) as i64;
                let pick =
                    _mm_set_epi64x((j + 1) * 0x0101_0101_0101_0101, j * 0x0101_0101_0101_0101);
                _mm256_cvtepi8_epi16(_mm_shuffle_epi8(h.scales, pick))
            });
            for k in 0..N {
                let q8 = ab[k].add(4 + 128 * half);
                for c in 0..4 {
                    // u6 x i8 pairs: at most 2*63*128, no overflow.
                    let y = _mm256_loadu_si256(q8.add(32 * c).cast());
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], y), s[c]);
                    sumi[k] = _mm256_add_epi32(sumi[k], p);
                }
            }
        }
        let scales = _mm256_cvtepi8_epi16(h.scales);
        let mins = _mm256_cvtepi8_epi16(h.mins);
        for k in 0..N {
            let d8 = ab[k].cast::<f32>().read_unaligned();
            let bsums = _mm256_loadu_si256(ab[k].add(260).cast());
            let offset =
                _mm256_mullo_epi32(_mm256_madd_epi16(scales, bsums), _mm256_set1_epi32(OFFSET));
            let s = _mm256_sub_epi32(sumi[k], offset);
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(h.d * d8), _mm256_cvtepi32_ps(s), acc[k]);
            if MIN {
                let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums));
                acc[k] = _mm256_fnmadd_ps(_mm256_set1_ps(h.dmin * d8), m, acc[k]);
            }
        }
    }
    acc.map(|v| hsum(v))
}

/// Q6_K weights against the Q8_K activations of `N` tokens.
///
/// A Q6_K block (210 bytes) holds 256 weights as 128 bytes of low nibbles,
/// 64 bytes of high 2-bit pairs, sixteen i8 scales (one per 16 weights) and
/// an f16 `d`; weight `i` is `d*scale_{i/16}*(q_i - 32)` with `q_i` in
/// 0..64. Each 128-weight half takes 64 nibble bytes `ql` and 32 bytes `qh`:
/// its four 32-weight runs are the low nibbles of `ql[0..32]`, of
/// `ql[32..64]`, then their high nibbles, with bits 0-1, 2-3, 4-5 and 6-7 of
/// `qh` as their top two bits.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    let low = _mm256_set1_epi8(0x0F);
    let top = _mm256_set1_epi8(0x30);
    dot_k16::<N, 32, false>(
        w,
        Q6K,
        a,
        blocks,
        |wb| q6k_head(wb),
        |wb, half| {
            let l0 = _mm256_loadu_si256(wb.add(64 * half).cast());
            let l1 = _mm256_loadu_si256(wb.add(64 * half + 32).cast());
            let h = _mm256_loadu_si256(wb.add(128 + 32 * half).cast());
            // The 16-bit shifts move bits across bytes, but the 0x30 mask keeps
            // only each byte's own pair.
            [
                _mm256_or_si256(
                    _mm256_and_si256(l0, low),
                    _mm256_and_si256(_mm256_slli_epi16(h, 4), top),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(l1, low),
                    _mm256_and_si256(_mm256_slli_epi16(h, 2), top),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                    _mm256_and_si256(h, top),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                    _mm256_and_si256(_mm256_srli_epi16(h, 2), top),
                ),
            ]
        },
    )
}

/// The four runs of 2-bit values of a Q3_K or Q2_K half: bits `2j..2j+2`
/// of the 32 bytes at `qs` are run `j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn crumbs(qs: *const u8) -> [__m256i; 4] {
    let bits = _mm256_loadu_si256(qs.cast());
    // The 16-bit shifts move bits across bytes, but the mask keeps only
    // each byte's own pair.
    let three = _mm256_set1_epi8(3);
    [
        _mm256_and_si256(bits, three),
        _mm256_and_si256(_mm256_srli_epi16(bits, 2), three),
        _mm256_and_si256(_mm256_srli_epi16(bits, 4), three),
        _mm256_and_si256(_mm256_srli_epi16(bits, 6), three),
    ]
}

/// Q3_K weights against the Q8_K activations of `N` tokens, as `q + 4` (0..8)
/// with the offset 4 taken off per block.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q3k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    let four = _mm256_set1_epi8(4);
    dot_k16::<N, 4, false>(
        w,
        Q3K,
        a,
        blocks,
        |wb| q3k_head(wb),
        |wb, half| {
            let hmask = _mm256_loadu_si256(wb.cast());
            let runs = crumbs(wb.add(32 + 32 * half));
            std::array::from_fn(|j| {
                let m = _mm256_set1_epi8(1 << (4 * half + j));
                let high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hmask, m), m), four);
                _mm256_or_si256(runs[j], high)
            })
        },
    )
}

/// Q2_K weights against the Q8_K activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q2k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot_k16::<N, 0, true>(
        w,
        Q2K,
        a,
        blocks,
        |wb| q2k_head(wb),
        |wb, half| crumbs(wb.add(16 + 32 * half)),
    )
}
