//! The block dot products of `qdot_x86` with AVX-512 and VNNI, chosen at run
//! time over the AVX2 ones where the CPU has both.
//!
//! VNNI's `dpbusd` multiplies unsigned by signed bytes and adds each four
//! products straight into an i32 lane: one instruction where AVX2 needs
//! `maddubs` and a `madd`, on vectors twice as wide. It is required, not
//! optional: every AVX-512 CPU since Cascade Lake and Zen 4 has it, and the
//! one family without (Skylake-SP/X) keeps the AVX2 kernels. The activation
//! quantizers stay those of `qdot_x86`.
//!
//! As there, each call applies one unpacked weight block (eight rows' for
//! `q4k_rows8`) to `N` tokens, the products inside a block are exact
//! integers, and results differ from candle's scalar code only in the order
//! of f32 additions. Layouts are described in `qdot_x86`.

use std::arch::x86_64::*;
use std::mem::transmute;

use super::qdot::{iq4xs_scale, iq4xs_scale_words, scales_mins};
use super::qdot::{IQ4_NL, IQ4_XS, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8K, Q8_0};
use super::qdot_x86::{bit_bytes, iq4_table, nibbles32, prefetch_share, stream_ahead};
use super::qdot_x86::{q2k_head, q3k_head, q6k_head, Head16};

/// Whether these kernels can run here.
pub fn available() -> bool {
    super::qdot_x86::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// i32 lane indices: lanes 0..8 take element 0, lanes 8..16 element 1.
const HALVES: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];

/// The f16 values at `p` and `q`, in the two low lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16_pair(p: *const u8, q: *const u8) -> __m128 {
    let lo = p.cast::<u16>().read_unaligned() as u32;
    let hi = q.cast::<u16>().read_unaligned() as u32;
    _mm_cvtph_ps(_mm_cvtsi32_si128((lo | hi << 16) as i32))
}

/// The 64 signed weights of Q8_0 or Q4_0 (`Q4`) blocks `wb` and the next
/// (`TWO`), or 32 of `wb` and a high half whose products the caller zeroes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn weights<const Q4: bool, const TWO: bool>(wb: *const u8) -> __m512i {
    if Q4 {
        let next = if TWO {
            _mm_loadu_si128(wb.add(2 + Q4_0).cast())
        } else {
            _mm_setzero_si128()
        };
        let this = _mm256_broadcastsi128_si256(_mm_loadu_si128(wb.add(2).cast()));
        let v = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(this),
            _mm256_broadcastsi128_si256(next),
        );
        // Each block's nibbles twice; the second copy's high nibbles are
        // elements 16..32.
        let v = _mm512_mask_srli_epi16::<4>(v, 0xFF00_FF00, v);
        _mm512_sub_epi8(
            _mm512_and_si512(v, _mm512_set1_epi8(0x0F)),
            _mm512_set1_epi8(8),
        )
    } else {
        let this = _mm256_loadu_si256(wb.add(2).cast());
        if TWO {
            let next = _mm256_loadu_si256(wb.add(2 + Q8_0).cast());
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(this), next)
        } else {
            _mm512_zextsi256_si512(this)
        }
    }
}

/// Adds the products of two blocks' signed weights `x` (scales `dw` in the
/// two low lanes) with the Q8_0 blocks at `a[k]` and the next to `acc[k]`;
/// with `TWO` false, of the low block only.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair<const N: usize, const TWO: bool>(
    acc: &mut [__m512; N],
    x: __m512i,
    dw: __m128,
    a: [*const u8; N],
) {
    // `dpbusd` wants one unsigned operand, so the sign of `x` moves onto
    // the activations (`abs(-128)` reads as 128 unsigned, still right). Q8
    // quantizers produce [-127, 127], so the negation cannot overflow.
    let ax = _mm512_abs_epi8(x);
    let neg = _mm512_movepi8_mask(x);
    let halves: __m512i = transmute(HALVES);
    for k in 0..N {
        let this = _mm256_loadu_si256(a[k].add(2).cast());
        let (y, da) = if TWO {
            let next = _mm256_loadu_si256(a[k].add(2 + Q8_0).cast());
            let y = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(this), next);
            (y, f16_pair(a[k], a[k].add(Q8_0)))
        } else {
            // Zero activations zero the high half's products.
            (_mm512_zextsi256_si512(this), f16_pair(a[k], a[k]))
        };
        let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy);
        let d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_mul_ps(dw, da)));
        acc[k] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[k]);
    }
}

/// Q8_0 or Q4_0 (`Q4`) weights against the Q8_0 activations of `N` tokens,
/// two blocks per step.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot32<const N: usize, const Q4: bool>(
    w: &[u8],
    a: [&[u8]; N],
    blocks: usize,
) -> [f32; N] {
    let size = if Q4 { Q4_0 } else { Q8_0 };
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8_0));
    let (w, a) = (w.as_ptr(), a.map(<[u8]>::as_ptr));
    let mut acc = [_mm512_setzero_ps(); N];
    let mut b = 0;
    while b + 2 <= blocks {
        let (wb, ab) = (w.add(b * size), a.map(|a| a.add(b * Q8_0)));
        let dw = f16_pair(wb, wb.add(size));
        pair::<N, true>(&mut acc, weights::<Q4, true>(wb), dw, ab);
        b += 2;
    }
    if b < blocks {
        let (wb, ab) = (w.add(b * size), a.map(|a| a.add(b * Q8_0)));
        pair::<N, false>(&mut acc, weights::<Q4, false>(wb), f16_pair(wb, wb), ab);
    }
    acc.map(|v| _mm512_reduce_add_ps(v))
}

/// Q8_0 weights against the Q8_0 activations of `N` tokens, `blocks` blocks
/// of each.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q8_0<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32::<N, false>(w, a, blocks)
}

/// Q4_0 weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4_0<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32::<N, true>(w, a, blocks)
}

/// Adds the products of two blocks' unsigned weights `x` (scales `dw` and
/// minimums `m` in the two low lanes) with the Q8_0 blocks at `a[k]` and
/// the next to `acc[k]`: `dw*d8*sum(x*y) + m*d8*sum(y)` per block; with
/// `TWO` false, of the low block only.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair_min<const N: usize, const TWO: bool>(
    acc: &mut [__m512; N],
    x: __m512i,
    dw: __m128,
    m: __m128,
    a: [*const u8; N],
) {
    let halves: __m512i = transmute(HALVES);
    let ones = _mm512_set1_epi8(1);
    for k in 0..N {
        let this = _mm256_loadu_si256(a[k].add(2).cast());
        let (y, da) = if TWO {
            let next = _mm256_loadu_si256(a[k].add(2 + Q8_0).cast());
            let y = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(this), next);
            (y, f16_pair(a[k], a[k].add(Q8_0)))
        } else {
            (_mm512_zextsi256_si512(this), f16_pair(a[k], a[k]))
        };
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, y);
        let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, y);
        let d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_mul_ps(dw, da)));
        let dm = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_mul_ps(m, da)));
        acc[k] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[k]);
        acc[k] = _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(sum), acc[k]);
    }
}

/// Blocks of a 32-weight format of `size` bytes (f16 scale first, f16
/// minimum next where `MIN`) against the Q8_0 activations of `N` tokens,
/// two blocks per step: `unpack` gives a block's 32 weights in element
/// order, signed, or unsigned where `MIN`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot32_unpacked<const N: usize, const MIN: bool>(
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    unpack: impl Fn(*const u8) -> __m256i,
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8_0));
    let (w, a) = (w.as_ptr(), a.map(<[u8]>::as_ptr));
    let mut acc = [_mm512_setzero_ps(); N];
    let mut b = 0;
    while b + 2 <= blocks {
        let (wb, ab) = (w.add(b * size), a.map(|a| a.add(b * Q8_0)));
        let next = wb.add(size);
        let x = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(unpack(wb)), unpack(next));
        let dw = f16_pair(wb, next);
        if MIN {
            pair_min::<N, true>(&mut acc, x, dw, f16_pair(wb.add(2), next.add(2)), ab);
        } else {
            pair::<N, true>(&mut acc, x, dw, ab);
        }
        b += 2;
    }
    if b < blocks {
        let (wb, ab) = (w.add(b * size), a.map(|a| a.add(b * Q8_0)));
        let x = _mm512_zextsi256_si512(unpack(wb));
        let dw = f16_pair(wb, wb);
        if MIN {
            pair_min::<N, false>(&mut acc, x, dw, f16_pair(wb.add(2), wb.add(2)), ab);
        } else {
            pair::<N, false>(&mut acc, x, dw, ab);
        }
    }
    acc.map(|v| _mm512_reduce_add_ps(v))
}

/// Q4_1 weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4_1<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32_unpacked::<N, true>(w, Q4_1, a, blocks, |wb| nibbles32(wb.add(4)))
}

/// Q5_0 weights against the Q8_0 activations of `N` tokens (unpacked as in
/// `qdot_x86::q5_0`).
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q5_0<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32_unpacked::<N, false>(w, Q5_0, a, blocks, |wb| {
        let clear = _mm256_andnot_si256(bit_bytes(wb.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles32(wb.add(6)), clear)
    })
}

/// Q5_1 weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q5_1<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32_unpacked::<N, true>(w, Q5_1, a, blocks, |wb| {
        let high = _mm256_and_si256(bit_bytes(wb.add(4)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles32(wb.add(8)), high)
    })
}

/// IQ4_NL weights against the Q8_0 activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn iq4nl<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    let table = iq4_table();
    dot32_unpacked::<N, false>(w, IQ4_NL, a, blocks, |wb| {
        _mm256_shuffle_epi8(table, nibbles32(wb.add(2)))
    })
}

/// IQ4_XS weights against the Q8_K activations of `N` tokens, two
/// sub-blocks per vector.
///
/// `dpbusd` takes the table shifted by 128 into 1..=241 as its unsigned
/// operand against the activations as they are (which reach -128): each
/// sub-block's sum then holds 128 times its activations' sum too, taken
/// off once per block from the stored sums of 16. A lane's four products
/// exceed i16, so the sub-block scale is a 32-bit multiply.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn iq4xs<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    assert!(w.len() >= blocks * IQ4_XS && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    let table = _mm256_add_epi8(iq4_table(), _mm256_set1_epi8(-128));
    let halves: __m512i = transmute(HALVES);
    let mut acc = [_mm512_setzero_ps(); N];
    for (b, wb) in w.chunks_exact(IQ4_XS).take(blocks).enumerate() {
        let ab = a.map(|a| a.add(b * Q8K));
        let (h, l) = iq4xs_scale_words(wb.as_ptr());
        let scales: [i32; 8] = std::array::from_fn(|i| iq4xs_scale(h, l, i));
        let scales = _mm256_loadu_si256(scales.as_ptr().cast());
        // The scales as i16, against each sub-block's sum of activations.
        let scales16 = _mm256_cvtepi32_epi16(scales);
        let scales = _mm512_zextsi256_si512(scales);
        let q = wb.as_ptr().add(8);

        let mut sumi = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            let lo = _mm256_shuffle_epi8(table, nibbles32(q.add(32 * c)));
            let hi = _mm256_shuffle_epi8(table, nibbles32(q.add(32 * c + 16)));
            let x = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            // Sub-block 2c's scale in the low eight lanes, 2c+1's in the high.
            let s = _mm512_permutexvar_epi32(
                _mm512_add_epi32(halves, _mm512_set1_epi32(2 * c as i32)),
                scales,
            );
            for k in 0..N {
                let y = _mm512_loadu_si512(ab[k].add(4 + 64 * c).cast());
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, y);
                sumi[k] = _mm512_add_epi32(sumi[k], _mm512_mullo_epi32(p, s));
            }
        }

        let d = _mm_cvtss_f32(f16_pair(wb.as_ptr(), wb.as_ptr()));
        for k in 0..N {
            let d8 = ab[k].cast::<f32>().read_unaligned();
            let offset = _mm_slli_epi32::<7>(_mm_madd_epi16(scales16, pair_sums(ab[k])));
            let s = _mm512_sub_epi32(sumi[k], _mm512_zextsi128_si512(offset));
            acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(d * d8), _mm512_cvtepi32_ps(s), acc[k]);
        }
    }
    acc.map(|v| _mm512_reduce_add_ps(v))
}

/// The eight sums of 32 activations of Q8_K block `ab` (its sixteen stored
/// sums of 16, added in pairs), which a Q4_K block's eight mins multiply in
/// its correction `dmin*d8*sum_j min_j*sum(q8)_j`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair_sums(ab: *const u8) -> __m128i {
    let bsums = _mm256_loadu_si256(ab.add(260).cast());
    _mm_hadd_epi16(
        _mm256_castsi256_si128(bsums),
        _mm256_extracti128_si256(bsums, 1),
    )
}

/// Q4_K weights against the Q8_K activations of `N` tokens (see
/// `qdot_x86::q4k`). A 32-byte run of nibbles is loaded twice into one
/// vector, low nibbles in the low half and high nibbles in the high half,
/// which is the order of its 64 activations in memory.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot_k32(w, Q4K, a, blocks, |wb, c| nibbles64(wb.add(16 + 32 * c)))
}

/// Q5_K weights against the Q8_K activations of `N` tokens: [`q4k`]'s
/// nibbles with their fifth bits added.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q5k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot_k32(w, Q5K, a, blocks, |wb, c| {
        let q = nibbles64(wb.add(48 + 32 * c));
        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(wb.add(16).cast()));
        // Bit 2c of `qh` for the low half, bit 2c + 1 for the high half.
        let bit = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi8(1 << (2 * c))),
            _mm256_set1_epi8(1 << (2 * c + 1)),
        );
        let set = _mm512_test_epi8_mask(qh, bit);
        _mm512_mask_add_epi8(q, set, q, _mm512_set1_epi8(16))
    })
}

/// The 64 nibbles of the 32 bytes at `p` in element order: low nibbles
/// are elements 0..32, high nibbles 32..64.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn nibbles64(p: *const u8) -> __m512i {
    let bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()));
    _mm512_and_si512(
        _mm512_mask_srli_epi16::<4>(bits, 0xFFFF_0000, bits),
        _mm512_set1_epi8(0x0F),
    )
}

/// Blocks of `size` bytes with Q4_K's header against the Q8_K activations
/// of `N` tokens: `unpack` gives the unsigned weights (at most 31) of
/// sub-blocks `2c` and `2c + 1`, in element order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_k32<const N: usize>(
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    unpack: impl Fn(*const u8, usize) -> __m512i,
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    let halves: __m512i = transmute(HALVES);
    let mut acc = [_mm512_setzero_ps(); N];
    for (b, wb) in w.chunks_exact(size).take(blocks).enumerate() {
        stream_ahead::<N>(wb.as_ptr());
        let ab = a.map(|a| a.add(b * Q8K));
        let (sc, mn) = scales_mins(&wb[4..16]);
        let sm = _mm_set_epi64x(mn as i64, sc as i64);
        // Scales in lanes 0..8 (mins in 8..16, unused here).
        let scales = _mm512_cvtepu8_epi32(sm);
        let mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));

        let mut sumi = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            let q = unpack(wb.as_ptr(), c);
            // Sub-block 2c's scale in the low eight lanes, 2c+1's in the high.
            let s = _mm512_permutexvar_epi32(
                _mm512_add_epi32(halves, _mm512_set1_epi32(2 * c as i32)),
                scales,
            );
            for k in 0..N {
                let y = _mm512_loadu_si512(ab[k].add(4 + 64 * c).cast());
                // Four u5 x i8 products per lane, at most 4*31*128: the lane
                // is its low i16, and `madd` with the scale (high i16 zero)
                // multiplies exactly.
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, y);
                sumi[k] = _mm512_add_epi32(sumi[k], _mm512_madd_epi16(p, s));
            }
        }

        let dd = f16_pair(wb.as_ptr(), wb.as_ptr().add(2));
        let (d, dmin) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));
        for k in 0..N {
            let d8 = ab[k].cast::<f32>().read_unaligned();
            let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins, pair_sums(ab[k])));
            acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(d * d8), _mm512_cvtepi32_ps(sumi[k]), acc[k]);
            acc[k] = _mm512_fnmadd_ps(_mm512_set1_ps(dmin * d8), _mm512_zextps128_ps512(m), acc[k]);
        }
    }
    acc.map(|v| _mm512_reduce_add_ps(v))
}

/// i32 lane indices: four lanes each of elements 0, 1, 2 and 3.
const QUARTERS: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];

/// Blocks of `size` bytes of a K-quant with a scale per 16 weights against
/// the Q8_K activations of `N` tokens (see `qdot_x86::dot_k16`): `runs`
/// gives the unsigned weights (at most 63) of half `h`'s 128 weights, in
/// element order, 64 per vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_k16<const N: usize, const OFFSET: i32, const MIN: bool>(
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    head: impl Fn(*const u8) -> Head16,
    runs: impl Fn(*const u8, usize) -> [__m512i; 2],
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    let quarters: __m512i = transmute(QUARTERS);
    let mut acc = [_mm512_setzero_ps(); N];
    for (b, wb) in w.chunks_exact(size).take(blocks).enumerate() {
        stream_ahead::<N>(wb.as_ptr());
        let ab = a.map(|a| a.add(b * Q8K));
        let h = head(wb.as_ptr());
        let scales = _mm256_cvtepi8_epi16(h.scales);
        // Each scale in the low i16 of an i32 lane, the high i16 zero, so
        // that `madd` multiplies a lane's sum by it alone.
        let scales32 = _mm512_cvtepu16_epi32(scales);
        let mut sumi = [_mm512_setzero_si512(); N];
        for half in 0..2 {
            let q = runs(wb.as_ptr(), half);
            // Vector v covers scales 4i..4i+4, four lanes each.
            let s = [0, 1].map(|v| {
                let i = 4 * (2 * half + v) as i32;
                _mm512_permutexvar_epi32(_mm512_add_epi32(quarters, _mm512_set1_epi32(i)), scales32)
            });
            for k in 0..N {
                let q8 = ab[k].add(4 + 128 * half);
                for v in 0..2 {
                    // Four u6 x i8 products per lane, at most 4*63*128 in
                    // magnitude: the lane is its low i16.
                    let y = _mm512_loadu_si512(q8.add(64 * v).cast());
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[v], y);
                    sumi[k] = _mm512_add_epi32(sumi[k], _mm512_madd_epi16(p, s[v]));
                }
            }
        }
        let mins = _mm256_cvtepi8_epi16(h.mins);
        for k in 0..N {
            let d8 = ab[k].cast::<f32>().read_unaligned();
            let bsums = _mm256_loadu_si256(ab[k].add(260).cast());
            let offset =
                _mm256_mullo_epi32(_mm256_madd_epi16(scales, bsums), _mm256_set1_epi32(OFFSET));
            let s = _mm512_sub_epi32(sumi[k], _mm512_zextsi256_si512(offset));
            acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(h.d * d8), _mm512_cvtepi32_ps(s), acc[k]);
            if MIN {
                let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums));
                let m = _mm512_zextps256_ps512(m);
                acc[k] = _mm512_fnmadd_ps(_mm512_set1_ps(h.dmin * d8), m, acc[k]);
            }
        }
    }
    acc.map(|v| _mm512_reduce_add_ps(v))
}

/// Q6_K weights against the Q8_K activations of `N` tokens (layout in
/// `qdot_x86::q6k`): a half's 64 bytes of nibbles load as one vector, the
/// low nibbles of both 32-byte runs being its first 64 weights.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    let low = _mm512_set1_epi8(0x0F);
    let top = _mm512_set1_epi8(0x30);
    dot_k16::<N, 32, false>(
        w,
        Q6K,
        a,
        blocks,
        |wb| q6k_head(wb),
        |wb, half| {
            let l = _mm512_loadu_si512(wb.add(64 * half).cast());
            let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(wb.add(128 + 32 * half).cast()));
            // Bits 0-1 of `qh` top the low half's first run, 2-3 the high
            // half's, then 4-5 and 6-7 for the high nibbles; the 0x30 mask
            // keeps only each byte's own pair after the 16-bit shifts.
            let h01 =
                _mm512_mask_blend_epi64(0xF0, _mm512_slli_epi16::<4>(h), _mm512_slli_epi16::<2>(h));
            let h23 = _mm512_mask_blend_epi64(0xF0, h, _mm512_srli_epi16::<2>(h));
            [
                _mm512_or_si512(_mm512_and_si512(l, low), _mm512_and_si512(h01, top)),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(l), low),
                    _mm512_and_si512(h23, top),
                ),
            ]
        },
    )
}

/// The 2-bit values of a Q3_K or Q2_K half (the 32 bytes at `qs`) in
/// element order: bits `2j..2j+2` are run `j`, runs 0 and 1 in the first
/// vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn crumbs(qs: *const u8) -> [__m512i; 2] {
    let bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(qs.cast()));
    let three = _mm512_set1_epi8(3);
    let pair = |v: __m512i| _mm512_and_si512(_mm512_mask_srli_epi16::<2>(v, 0xFFFF_0000, v), three);
    [pair(bits), pair(_mm512_srli_epi16::<4>(bits))]
}

/// Q3_K weights against the Q8_K activations of `N` tokens, as `q + 4`
/// (see `qdot_x86::q3k`).
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q3k<const N: usize>(w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot_k16::<N, 4, false>(
        w,
        Q3K,
        a,
        blocks,
        |wb| q3k_head(wb),
        |wb, half| {
            let hmask = _mm512_broadcast_i64x4(_mm256_loadu_si256(wb.cast()));
            let runs = crumbs(wb.add(32 + 32 * half));
            std::array::from_fn(|v| {
                // Run j = 2v (low half) and 2v + 1 (high half) take bit
                // 4*half + j of `hmask`.
                let j = 4 * half + 2 * v;
                let bit = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_set1_epi8(1 << j)),
                    _mm256_set1_epi8(1 << (j + 1)),
                );
                let set = _mm512_test_epi8_mask(hmask, bit);
                _mm512_mask_add_epi8(runs[v], set, runs[v], _mm512_set1_epi8(4))
            })
        },
    )
}

/// Q2_K weights against the Q8_K activations of `N` tokens.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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

/// The headers of eight rows' Q4_K blocks, unpacked side by side.
struct Heads8 {
    /// Row r's eight 6-bit scales, one byte each, in 64-bit lane r.
    scales: __m512i,
    /// Row r's eight mins as i16, in 128-bit lane r % 4 of `mins[r / 4]`.
    mins: [__m512i; 2],
    /// Row r's `d` and `dmin` in f32 lanes 2r and 2r + 1.
    d_dmin: __m512,
}

/// `qdot_x86::scales_mins` for eight rows at once: unpacked one row at a
/// time, the headers cost as much as four tokens' products.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn heads8(wb: [*const u8; 8]) -> Heads8 {
    // Rows 4i..4i+4's first 16 bytes, one row per 128-bit lane: the d/dmin
    // word, then the three words packing scales and mins.
    let z = [0, 1].map(|i| {
        let v = _mm512_castsi128_si512(_mm_loadu_si128(wb[4 * i].cast()));
        let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(wb[4 * i + 1].cast()));
        let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(wb[4 * i + 2].cast()));
        _mm512_inserti32x4::<3>(v, _mm_loadu_si128(wb[4 * i + 3].cast()))
    });
    let low6 = _mm512_set1_epi32(0x3f3f_3f3f);
    let low4 = _mm512_set1_epi32(0x0f0f_0f0f);
    let top2 = _mm512_set1_epi32(0x0303_0303);
    let top =
        |w: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(w), top2));
    // Each row's scales then mins, 16 bytes per 128-bit lane.
    let sm = z.map(|v| {
        let w0 = _mm512_shuffle_epi32::<0x55>(v);
        let w1 = _mm512_shuffle_epi32::<0xAA>(v);
        let w2 = _mm512_shuffle_epi32::<0xFF>(v);
        let s_hi = _mm512_or_si512(_mm512_and_si512(w2, low4), top(w0));
        let m_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(w2), low4), top(w1));
        let v = _mm512_mask_blend_epi32(0x2222, _mm512_and_si512(w0, low6), s_hi);
        let v = _mm512_mask_blend_epi32(0x4444, v, _mm512_and_si512(w1, low6));
        _mm512_mask_blend_epi32(0x8888, v, m_hi)
    });
    let evens: __m512i = transmute([0i64, 2, 4, 6, 8, 10, 12, 14]);
    let odds: __m512i = transmute([1i64, 3, 5, 7, 9, 11, 13, 15]);
    let mins = _mm512_permutex2var_epi64(sm[0], odds, sm[1]);
    let firsts: __m512i = transmute([0i32, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0]);
    let halves = _mm512_castsi512_si256(_mm512_permutex2var_epi32(z[0], firsts, z[1]));
    Heads8 {
        scales: _mm512_permutex2var_epi64(sm[0], evens, sm[1]),
        mins: [
            _mm512_cvtepu8_epi16(_mm512_castsi512_si256(mins)),
            _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(mins)),
        ],
        d_dmin: _mm512_cvtph_ps(halves),
    }
}

/// Q4_K weights of eight rows against the Q8_K activations of `N` tokens:
/// `out[k][r]` is row `r` dotted with token `k`.
///
/// `qdot_x86::q4k_rows4` on twice the rows: each run of nibbles is
/// transposed so that vector m holds bytes 8m..8m+8 of row r in 64-bit lane
/// r, and each token's eight activations are broadcast to every lane. Four
/// `dpbusd` then sum a row's 32-weight sub-block into its two i32 lanes (at
/// most 16*15*128, so each lane is its low i16), and one `madd` applies the
/// eight rows' scales: 10 multiplies per 512 products, against 10 per 256
/// in `q4k_rows4`.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4k_rows8<const N: usize>(
    w: [&[u8]; 8],
    a: [&[u8]; N],
    blocks: usize,
) -> [[f32; 8]; N] {
    assert!(w.iter().all(|w| w.len() >= blocks * Q4K));
    assert!(a.iter().all(|a| a.len() >= blocks * Q8K));
    let (w, a) = (w.map(<[u8]>::as_ptr), a.map(<[u8]>::as_ptr));
    let low = _mm512_set1_epi8(0x0F);
    // Picks byte j of each 64-bit lane into the low byte of both its i32
    // lanes, once j is added (shuffles index within 128-bit lanes); 0x80
    // zeroes a byte.
    const PICK: [u64; 2] = [0x8080_8000_8080_8000, 0x8080_8008_8080_8008];
    let pick: __m512i = transmute([PICK, PICK, PICK, PICK]);
    // Qwords m and m+1 of rows 0..4 from two vectors of two rows' runs.
    let lo_pairs: __m512i = transmute([0i64, 4, 8, 12, 1, 5, 9, 13]);
    let hi_pairs: __m512i = transmute([2i64, 6, 10, 14, 3, 7, 11, 15]);
    // The first two i32 lanes of each 128-bit lane of two vectors.
    let firsts: __m512i = transmute([0i32, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]);
    let mut acc = [_mm512_setzero_ps(); N];
    // The eight rows after these, a block's share (18 lines) a step
    // ([`prefetch_share`]): a decode step's weights come from DRAM, and
    // cold one-token products on one EPYC core went 6.9 -> 12.5 GB/s at
    // Qwen3-30B-A3B's gate/up shape (kernels bench).
    let next = w[0].wrapping_add(8 * blocks * Q4K);
    for b in 0..blocks {
        let wb = w.map(|w| w.add(b * Q4K));
        let ab = a.map(|a| a.add(b * Q8K));
        prefetch_share(next, b, 8 * Q4K);
        let h = heads8(wb);

        let mut sumi = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            let run = [0, 1, 2, 3].map(|i| {
                let r0 = _mm256_loadu_si256(wb[2 * i].add(16 + 32 * c).cast());
                let r1 = _mm256_loadu_si256(wb[2 * i + 1].add(16 + 32 * c).cast());
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(r0), r1)
            });
            let t = [
                _mm512_permutex2var_epi64(run[0], lo_pairs, run[1]),
                _mm512_permutex2var_epi64(run[0], hi_pairs, run[1]),
                _mm512_permutex2var_epi64(run[2], lo_pairs, run[3]),
                _mm512_permutex2var_epi64(run[2], hi_pairs, run[3]),
            ];
            let v = [
                _mm512_shuffle_i64x2::<0x44>(t[0], t[2]),
                _mm512_shuffle_i64x2::<0xEE>(t[0], t[2]),
                _mm512_shuffle_i64x2::<0x44>(t[1], t[3]),
                _mm512_shuffle_i64x2::<0xEE>(t[1], t[3]),
            ];
            let q_lo = v.map(|v| _mm512_and_si512(v, low));
            let q_hi = v.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), low));
            let scale =
                |j: i32| _mm512_shuffle_epi8(h.scales, _mm512_add_epi8(pick, _mm512_set1_epi32(j)));
            let (s_lo, s_hi) = (scale(2 * c as i32), scale(2 * c as i32 + 1));
            for k in 0..N {
                let q8 = ab[k].add(4 + 64 * c);
                let bcast =
                    |i: usize| _mm512_set1_epi64(q8.add(8 * i).cast::<i64>().read_unaligned());
                let mut p_lo = _mm512_setzero_si512();
                let mut p_hi = _mm512_setzero_si512();
                for m in 0..4 {
                    p_lo = _mm512_dpbusd_epi32(p_lo, q_lo[m], bcast(m));
                    p_hi = _mm512_dpbusd_epi32(p_hi, q_hi[m], bcast(4 + m));
                }
                let s =
                    _mm512_add_epi32(_mm512_madd_epi16(p_lo, s_lo), _mm512_madd_epi16(p_hi, s_hi));
                sumi[k] = _mm512_add_epi32(sumi[k], s);
            }
        }

        let d = _mm512_moveldup_ps(h.d_dmin);
        let dmin = _mm512_movehdup_ps(h.d_dmin);
        for k in 0..N {
            let d8 = _mm512_set1_ps(ab[k].cast::<f32>().read_unaligned());
            // Each row's mins against the sub-blocks' activation sums, four
            // i32 per row folded to two, then gathered into the
            // accumulators' order.
            let ps = _mm512_broadcast_i32x4(pair_sums(ab[k]));
            let m = h.mins.map(|mins| {
                let m = _mm512_madd_epi16(mins, ps);
                _mm512_add_epi32(m, _mm512_shuffle_epi32::<0b01_00_11_10>(m))
            });
            let m = _mm512_permutex2var_epi32(m[0], firsts, m[1]);
            acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(d, d8), _mm512_cvtepi32_ps(sumi[k]), acc[k]);
            acc[k] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, d8), _mm512_cvtepi32_ps(m), acc[k]);
        }
    }
    acc.map(|v| {
        let mut s = [0.0f32; 16];
        _mm512_storeu_ps(s.as_mut_ptr(), _mm512_add_ps(v, _mm512_movehdup_ps(v)));
        std::array::from_fn(|r| s[2 * r])
    })
}
