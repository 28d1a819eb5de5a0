//! The integer dot kernels of [`QDot`] with NEON, in two flavours that
//! differ only in how sixteen i8 products are summed: `sdot` where the CPU
//! has the dotprod extension (ARMv8.2 and later, chosen at run time), and
//! the widening multiplies of baseline ARMv8 elsewhere.
//!
//! candle's NEON dot products run one token at a time and without `sdot`,
//! and its Q8_K quantizer is scalar. Each token here keeps four f32 partial
//! sums across blocks, reduced once per row. The sum of a block's i32 lanes
//! is all that is used, so the flavours may place products in different
//! lanes.

use std::arch::aarch64::*;
use std::arch::asm;

use super::qdot::{iq4xs_scale, iq4xs_scale_words, q3k_scales, scales_mins, KVALUES_IQ4NL};
use super::qdot::{IQ4_NL, IQ4_XS, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8K, Q8_0};

/// The kernels of one NEON flavour. A value is a token that exists only
/// where the CPU has that flavour's instructions, which is what makes the
/// methods safe.
///
/// Every dot takes `blocks` blocks of one weight row (`w`) and of each of `N`
/// tokens' activations (`a`, Q8_K for the K-quants and IQ4_XS, Q8_0
/// otherwise) and returns token `k`'s product in `[k]`; the quantizers
/// write whole blocks of `out`
/// from as many values of `x`, bit for bit as `quant::Activations`.
pub trait QDot: Copy + Send + Sync {
    fn q4k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q8_0<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q4_0<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q4_1<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q5_0<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q5_1<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn iq4nl<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn iq4xs<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q6k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q5k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q3k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    fn q2k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N];

    /// Rows of 256 values to Q8_K: `d = max/-127` with `max` the first value
    /// of largest magnitude, each value rounded half to even and capped at
    /// 127, and the sums of each 16.
    fn quantize_q8k(self, x: &[f32], out: &mut [u8]);

    /// Rows of 32 values to Q8_0: `d = amax/127` (stored as f16), each value
    /// times `1/d` rounded half to even.
    fn quantize_q8_0(self, x: &[f32], out: &mut [u8]);
}

/// Adds the sixteen products of `a` and `b` to the lanes of `acc`.
pub trait I8Dot: Copy + Send + Sync {
    fn dot(self, acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// Baseline ARMv8: products widened to i16, added in pairs into i32 lanes.
#[derive(Clone, Copy)]
pub struct Widening;

impl I8Dot for Widening {
    #[inline(always)]
    fn dot(self, acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: NEON is part of the aarch64 baseline.
        unsafe {
            let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
            vpadalq_s16(acc, vmull_high_s8(a, b))
        }
    }
}

/// `sdot`: four products added into each i32 lane in one instruction. A
/// value exists only where the CPU has dotprod ([`dotprod`]).
#[derive(Clone, Copy)]
pub struct DotProd(());

impl I8Dot for DotProd {
    #[inline(always)]
    fn dot(self, mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // `vdotq_s32` is not stable Rust yet; this is the instruction it
        // emits. The directive lets the assembler accept it in a function
        // compiled for baseline ARMv8, which is what lets the kernels below
        // be generic over the flavour without a `target_feature` of their own.
        // SAFETY: `self` proves the CPU has dotprod; the instruction only
        // reads and writes these registers.
        unsafe {
            asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags),
            )
        };
        acc
    }
}

/// The kernels with the products of `D`.
#[derive(Clone, Copy)]
pub struct Neon<D>(D);

/// Kernels every aarch64 CPU can run.
pub const BASELINE: Neon<Widening> = Neon(Widening);

/// The `sdot` kernels, where the CPU has dotprod.
pub fn dotprod() -> Option<Neon<DotProd>> {
    std::arch::is_aarch64_feature_detected!("dotprod").then_some(Neon(DotProd(())))
}

impl<D: I8Dot> QDot for Neon<D> {
    fn q4k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        q4k(self.0, w, a, blocks)
    }

    fn q8_0<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        q8_0(self.0, w, a, blocks)
    }

    fn q4_0<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        q4_0(self.0, w, a, blocks)
    }

    fn q4_1<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        // SAFETY: (all four) `dot32_blocks` bounds each block it hands out.
        dot32_blocks::<_, N, true>(self.0, w, Q4_1, a, blocks, |wb| unsafe {
            nibbles32(wb.add(4))
        })
    }

    fn q5_0<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        dot32_blocks::<_, N, false>(self.0, w, Q5_0, a, blocks, |wb| unsafe {
            // `q - 16` is the nibble where the high bit is set and the nibble
            // with its top four bits set (minus 16 as i8) where it is not.
            let (n, bits) = (nibbles32(wb.add(6)), bit_bytes(wb.add(2)));
            [0, 1].map(|i| {
                let clear = vbicq_u8(vdupq_n_u8(0xF0), bits[i]);
                vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(n[i]), clear))
            })
        })
    }

    fn q5_1<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        dot32_blocks::<_, N, true>(self.0, w, Q5_1, a, blocks, |wb| unsafe {
            let (n, bits) = (nibbles32(wb.add(8)), bit_bytes(wb.add(4)));
            [0, 1].map(|i| {
                let high = vandq_u8(bits[i], vdupq_n_u8(0x10));
                vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(n[i]), high))
            })
        })
    }

    fn iq4nl<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        dot32_blocks::<_, N, false>(self.0, w, IQ4_NL, a, blocks, |wb| unsafe {
            iq4_values(nibbles32(wb.add(2)))
        })
    }

    fn iq4xs<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        iq4xs(self.0, w, a, blocks)
    }

    fn q6k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        q6k(self.0, w, a, blocks)
    }

    fn q5k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        q5k(self.0, w, a, blocks)
    }

    fn q3k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        q3k(self.0, w, a, blocks)
    }

    fn q2k<const N: usize>(self, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
        q2k(self.0, w, a, blocks)
    }

    fn quantize_q8k(self, x: &[f32], out: &mut [u8]) {
        quantize_q8k(x, out)
    }

    fn quantize_q8_0(self, x: &[f32], out: &mut [u8]) {
        quantize_q8_0(x, out)
    }
}

/// The f16 at `p`. `fcvt` from half precision is baseline ARMv8; `half`
/// would detect the fp16 extension per call and then emit the same.
///
/// # Safety
/// `p` must point to two readable bytes.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let h = u16::from_le_bytes([*p, *p.add(1)]);
    let out: f32;
    asm!(
        "fcvt {out:s}, {h:h}",
        out = lateout(vreg) out,
        h = in(vreg) h,
        options(pure, nomem, nostack, preserves_flags),
    );
    out
}

/// The sum of the 32 products of `x` and the i8 values at `y`, as four lanes.
///
/// # Safety
/// `y` must point to 32 readable bytes.
#[inline(always)]
unsafe fn dot32<D: I8Dot>(d: D, x: [int8x16_t; 2], y: *const u8) -> int32x4_t {
    let y = y.cast::<i8>();
    let s = d.dot(vdupq_n_s32(0), x[0], vld1q_s8(y));
    d.dot(s, x[1], vld1q_s8(y.add(16)))
}

/// Adds one block's products of 32 signed weights `x` (scale `dw`) with the
/// Q8_0 block at `a[k]` of each token to `acc[k]`.
///
/// # Safety
/// Each `a[k]` must point to a whole Q8_0 block.
#[inline(always)]
unsafe fn block32<D: I8Dot, const N: usize>(
    d: D,
    acc: &mut [float32x4_t; N],
    x: [int8x16_t; 2],
    dw: f32,
    a: [*const u8; N],
) {
    for k in 0..N {
        let s = vcvtq_f32_s32(dot32(d, x, a[k].add(2)));
        acc[k] = vfmaq_f32(acc[k], s, vdupq_n_f32(dw * f16_at(a[k])));
    }
}

/// Q8_0 weights against the Q8_0 activations of `N` tokens.
fn q8_0<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    // SAFETY: (both) `dot32_blocks` bounds each block it hands out.
    dot32_blocks::<_, N, false>(d, w, Q8_0, a, blocks, |wb| unsafe {
        [vld1q_s8(wb.add(2).cast()), vld1q_s8(wb.add(18).cast())]
    })
}

/// Q4_0 weights against the Q8_0 activations of `N` tokens.
fn q4_0<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    dot32_blocks::<_, N, false>(d, w, Q4_0, a, blocks, |wb| unsafe {
        nibbles32(wb.add(2)).map(|v| vsubq_s8(v, vdupq_n_s8(8)))
    })
}

/// The 32 nibbles of the 16 bytes at `p` in element order: low nibbles are
/// elements 0..16, high nibbles 16..32.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> [int8x16_t; 2] {
    let packed = vld1q_u8(p);
    [vandq_u8(packed, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(packed)].map(|v| vreinterpretq_s8_u8(v))
}

/// 32 bytes, byte `i` all ones where bit `i` of the word at `p` is set.
///
/// # Safety
/// `p` must point to 4 readable bytes.
#[inline(always)]
unsafe fn bit_bytes(p: *const u8) -> [uint8x16_t; 2] {
    let b = [0, 1, 2, 3].map(|i| vdup_n_u8(*p.add(i)));
    let masks = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    [
        vtstq_u8(vcombine_u8(b[0], b[1]), masks),
        vtstq_u8(vcombine_u8(b[2], b[3]), masks),
    ]
}

/// IQ4's table values of 32 nibbles.
#[inline(always)]
fn iq4_values(n: [int8x16_t; 2]) -> [int8x16_t; 2] {
    // SAFETY: NEON is baseline; the table is 16 bytes.
    unsafe {
        let table = vld1q_s8(KVALUES_IQ4NL.as_ptr());
        n.map(|n| vqtbl1q_s8(table, vreinterpretq_u8_s8(n)))
    }
}

/// Blocks of a 32-weight format of `size` bytes (f16 scale first, f16
/// minimum next where `MIN`) against the Q8_0 activations of `N` tokens:
/// `unpack` gives a block's 32 weights in element order (at most 31 where
/// `MIN`), `weight = d*q + m`.
#[inline(always)]
fn dot32_blocks<D: I8Dot, const N: usize, const MIN: bool>(
    d: D,
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    unpack: impl Fn(*const u8) -> [int8x16_t; 2],
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8_0));
    let (w, a) = (w.as_ptr(), a.map(<[u8]>::as_ptr));
    // SAFETY: NEON is baseline; the assert bounds every block read.
    unsafe {
        let ones = [vdupq_n_s8(1); 2];
        let mut acc = [vdupq_n_f32(0.0); N];
        for b in 0..blocks {
            let wb = w.add(b * size);
            let (x, ab) = (unpack(wb), a.map(|a| a.add(b * Q8_0)));
            block32(d, &mut acc, x, f16_at(wb), ab);
            if MIN {
                let m = f16_at(wb.add(2));
                for k in 0..N {
                    let s = vcvtq_f32_s32(dot32(d, ones, ab[k].add(2)));
                    acc[k] = vfmaq_f32(acc[k], s, vdupq_n_f32(m * f16_at(ab[k])));
                }
            }
        }
        acc.map(|v| vaddvq_f32(v))
    }
}

/// IQ4_XS weights against the Q8_K activations of `N` tokens: per 32-weight
/// sub-block, the table's values of its nibbles times the activations,
/// times the sub-block's scale; `d*d8` once per block.
fn iq4xs<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    assert!(w.len() >= blocks * IQ4_XS && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    // SAFETY: as in `q8_0`.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); N];
        for (b, wb) in w.chunks_exact(IQ4_XS).take(blocks).enumerate() {
            let ab = a.map(|a| a.add(b * Q8K));
            let (h, l) = iq4xs_scale_words(wb.as_ptr());
            let mut sumi = [vdupq_n_s32(0); N];
            for i in 0..8 {
                let x = iq4_values(nibbles32(wb.as_ptr().add(8 + 16 * i)));
                let s = iq4xs_scale(h, l, i);
                for k in 0..N {
                    // Products of at most 127*128, eight per lane, times a
                    // scale of at most 32: far from overflow.
                    sumi[k] = vmlaq_n_s32(sumi[k], dot32(d, x, ab[k].add(4 + 32 * i)), s);
                }
            }
            let dw = f16_at(wb.as_ptr());
            for k in 0..N {
                let d8 = ab[k].cast::<f32>().read_unaligned();
                acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(sumi[k]), vdupq_n_f32(dw * d8));
            }
        }
        acc.map(|v| vaddvq_f32(v))
    }
}

/// Q4_K weights against the Q8_K activations of `N` tokens.
fn q4k<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    // SAFETY: `dot_k32` bounds each block it hands out.
    dot_k32(d, w, Q4K, a, blocks, |wb, c| unsafe {
        let q4 = wb.add(16 + 32 * c);
        let bits = [vld1q_u8(q4), vld1q_u8(q4.add(16))];
        let lo = bits.map(|v| vandq_u8(v, vdupq_n_u8(0x0F)));
        (lo, bits.map(|v| vshrq_n_u8::<4>(v)))
    })
}

/// Q5_K weights against the Q8_K activations of `N` tokens: Q4_K's
/// arithmetic on nibbles with their fifth bits added.
fn q5k<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    // SAFETY: `dot_k32` bounds each block it hands out.
    dot_k32(d, w, Q5K, a, blocks, |wb, c| unsafe {
        let q4 = wb.add(48 + 32 * c);
        let bits = [vld1q_u8(q4), vld1q_u8(q4.add(16))];
        let qh = [vld1q_u8(wb.add(16)), vld1q_u8(wb.add(32))];
        let fifth = |i: usize, bit: usize| {
            vandq_u8(vtstq_u8(qh[i], vdupq_n_u8(1 << bit)), vdupq_n_u8(0x10))
        };
        let lo = [0, 1].map(|i| vorrq_u8(vandq_u8(bits[i], vdupq_n_u8(0x0F)), fifth(i, 2 * c)));
        let hi = [0, 1].map(|i| vorrq_u8(vshrq_n_u8::<4>(bits[i]), fifth(i, 2 * c + 1)));
        (lo, hi)
    })
}

/// Blocks of `size` bytes with Q4_K's header (`d`, `dmin`, packed 6-bit
/// scales and mins) against the Q8_K activations of `N` tokens: `unpack`
/// gives the unsigned weights (at most 31) of run `c`'s two 32-weight
/// sub-blocks `2c` and `2c + 1`. A block's product is
/// `d*d8*sum_j scale_j*(q.q8)_j - dmin*d8*sum_j min_j*sum(q8)_j`.
#[inline(always)]
fn dot_k32<D: I8Dot, const N: usize>(
    d: D,
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    unpack: impl Fn(*const u8, usize) -> ([uint8x16_t; 2], [uint8x16_t; 2]),
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    // SAFETY: NEON is baseline; the assert bounds every block read.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); N];
        for (b, wb) in w.chunks_exact(size).take(blocks).enumerate() {
            let ab = a.map(|a| a.add(b * Q8K));
            let (scales, mins) = scales_mins(&wb[4..16]);
            let sm = scales.to_le_bytes();
            let mut sumi = [vdupq_n_s32(0); N];
            for c in 0..4 {
                let (lo, hi) = unpack(wb.as_ptr(), c);
                let (lo, hi) = (
                    lo.map(|v| vreinterpretq_s8_u8(v)),
                    hi.map(|v| vreinterpretq_s8_u8(v)),
                );
                let (s_lo, s_hi) = (sm[2 * c] as i32, sm[2 * c + 1] as i32);
                for k in 0..N {
                    // u5 x i8 products, at most 8*31*128 per lane of a
                    // sub-block, times a 6-bit scale: far from overflow.
                    let q8 = ab[k].add(4 + 64 * c);
                    let s = vmlaq_n_s32(sumi[k], dot32(d, lo, q8), s_lo);
                    sumi[k] = vmlaq_n_s32(s, dot32(d, hi, q8.add(32)), s_hi);
                }
            }

            let mins = vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(mins)));
            let (dw, dmin) = (f16_at(wb.as_ptr()), f16_at(wb.as_ptr().add(2)));
            for k in 0..N {
                let d8 = ab[k].cast::<f32>().read_unaligned();
                // The sixteen sums of 16 activations, added in pairs to
                // match the eight mins (each covers 32 weights).
                let bsums = ab[k].add(260).cast::<i16>();
                let pair_sums = vpaddq_s16(vld1q_s16(bsums), vld1q_s16(bsums.add(8)));
                let m = vmull_s16(vget_low_s16(mins), vget_low_s16(pair_sums));
                let m = vmlal_high_s16(m, mins, pair_sums);
                acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(sumi[k]), vdupq_n_f32(dw * d8));
                acc[k] = vfmsq_f32(acc[k], vcvtq_f32_s32(m), vdupq_n_f32(dmin * d8));
            }
        }
        acc.map(|v| vaddvq_f32(v))
    }
}

/// The header of a K-quant block with a scale per 16 weights: weight `i`
/// is `d*scale_{i/16}*(q_i - offset) - dmin*min_{i/16}`, `q_i` unsigned.
struct Head16 {
    scales: int8x16_t,
    d: f32,
    /// Q2_K's sixteen mins and their `dmin`; zeros elsewhere.
    mins: int8x16_t,
    dmin: f32,
}

/// `sum_j x_j*y_j` over sixteen i8 `x` and the sixteen i16 at `y`, in four
/// lanes.
///
/// # Safety
/// `y` must point to 32 readable bytes.
#[inline(always)]
unsafe fn dot16_i16(x: int8x16_t, y: *const u8) -> int32x4_t {
    let y = y.cast::<i16>();
    let (lo, hi) = (vld1q_s16(y), vld1q_s16(y.add(8)));
    let (xl, xh) = (vmovl_s8(vget_low_s8(x)), vmovl_high_s8(x));
    let s = vmull_s16(vget_low_s16(xl), vget_low_s16(lo));
    let s = vmlal_high_s16(s, xl, lo);
    let s = vmlal_s16(s, vget_low_s16(xh), vget_low_s16(hi));
    vmlal_high_s16(s, xh, hi)
}

/// Blocks of `size` bytes of a K-quant with a scale per 16 weights against
/// the Q8_K activations of `N` tokens: `head` reads a block's scales, and
/// `runs` gives the unsigned weights (at most 63) of the four 32-weight
/// runs of its 128-weight half `h`, in element order. `OFFSET` comes off
/// every `q` exactly, through the activations' sums of 16; the mins only
/// where `MIN`, in f32 as candle takes them.
#[inline(always)]
fn dot_k16<D: I8Dot, const N: usize, const OFFSET: i32, const MIN: bool>(
    d: D,
    w: &[u8],
    size: usize,
    a: [&[u8]; N],
    blocks: usize,
    head: impl Fn(*const u8) -> Head16,
    runs: impl Fn(*const u8, usize) -> [[uint8x16_t; 2]; 4],
) -> [f32; N] {
    assert!(w.len() >= blocks * size && a.iter().all(|a| a.len() >= blocks * Q8K));
    let a = a.map(<[u8]>::as_ptr);
    // SAFETY: NEON is baseline; the assert bounds every block read.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); N];
        for (b, wb) in w.chunks_exact(size).take(blocks).enumerate() {
            let ab = a.map(|a| a.add(b * Q8K));
            let h = head(wb.as_ptr());
            let mut sc = [0i8; 16];
            vst1q_s8(sc.as_mut_ptr(), h.scales);
            let mut sumi = [vdupq_n_s32(0); N];
            for half in 0..2 {
                let q = runs(wb.as_ptr(), half).map(|r| r.map(|v| vreinterpretq_s8_u8(v)));
                for k in 0..N {
                    let q8 = ab[k].add(4 + 128 * half).cast::<i8>();
                    for (c, q) in q.iter().enumerate() {
                        // Sixteen u6 x i8 products per scale, at most
                        // 16*63*128, times an i8 scale: far from overflow.
                        for i in 0..2 {
                            let y = vld1q_s8(q8.add(32 * c + 16 * i));
                            let p = d.dot(vdupq_n_s32(0), q[i], y);
                            let s = sc[8 * half + 2 * c + i] as i32;
                            sumi[k] = vmlaq_n_s32(sumi[k], p, s);
                        }
                    }
                }
            }
            for k in 0..N {
                let d8 = ab[k].cast::<f32>().read_unaligned();
                let bsums = ab[k].add(260);
                let s = vmlsq_n_s32(sumi[k], dot16_i16(h.scales, bsums), OFFSET);
                acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(s), vdupq_n_f32(h.d * d8));
                if MIN {
                    let m = vcvtq_f32_s32(dot16_i16(h.mins, bsums));
                    acc[k] = vfmsq_f32(acc[k], m, vdupq_n_f32(h.dmin * d8));
                }
            }
        }
        acc.map(|v| vaddvq_f32(v))
    }
}

/// Q6_K weights against the Q8_K activations of `N` tokens (layout in
/// `qdot_x86::q6k`).
fn q6k<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    // SAFETY: (both) `dot_k16` bounds each block it hands out.
    let head = |wb: *const u8| unsafe {
        Head16 {
            scales: vld1q_s8(wb.add(192).cast()),
            d: f16_at(wb.add(208)),
            mins: vdupq_n_s8(0),
            dmin: 0.0,
        }
    };
    dot_k16::<_, N, 32, false>(d, w, Q6K, a, blocks, head, |wb, half| unsafe {
        let ql = wb.add(64 * half);
        let l0 = [vld1q_u8(ql), vld1q_u8(ql.add(16))];
        let l1 = [vld1q_u8(ql.add(32)), vld1q_u8(ql.add(48))];
        let qh = wb.add(128 + 32 * half);
        let h = [vld1q_u8(qh), vld1q_u8(qh.add(16))];
        let (low, top) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30));
        [
            [0, 1].map(|i| vorrq_u8(vandq_u8(l0[i], low), vandq_u8(vshlq_n_u8::<4>(h[i]), top))),
            [0, 1].map(|i| vorrq_u8(vandq_u8(l1[i], low), vandq_u8(vshlq_n_u8::<2>(h[i]), top))),
            [0, 1].map(|i| vorrq_u8(vshrq_n_u8::<4>(l0[i]), vandq_u8(h[i], top))),
            [0, 1].map(|i| vorrq_u8(vshrq_n_u8::<4>(l1[i]), vandq_u8(vshrq_n_u8::<2>(h[i]), top))),
        ]
    })
}

/// The four runs of 2-bit values of a Q3_K or Q2_K half: bits `2j..2j+2`
/// of the 32 bytes at `qs` are run `j`.
///
/// # Safety
/// `qs` must point to 32 readable bytes.
#[inline(always)]
unsafe fn crumbs(qs: *const u8) -> [[uint8x16_t; 2]; 4] {
    let bits = [vld1q_u8(qs), vld1q_u8(qs.add(16))];
    std::array::from_fn(|j| {
        // A negative count shifts right.
        let shift = vdupq_n_s8(-2 * j as i8);
        bits.map(|v| vandq_u8(vshlq_u8(v, shift), vdupq_n_u8(3)))
    })
}

/// Q3_K weights against the Q8_K activations of `N` tokens, as `q + 4`
/// (0..8, its high bit set reading as 4) with the offset 4 taken off per
/// block.
fn q3k<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    // SAFETY: (both) `dot_k16` bounds each block it hands out.
    let head = |wb: *const u8| unsafe {
        let (lo, hi) = q3k_scales(std::slice::from_raw_parts(wb.add(96), 12));
        let scales = vreinterpretq_s8_u8(vcombine_u8(vcreate_u8(lo), vcreate_u8(hi)));
        Head16 {
            scales: vsubq_s8(scales, vdupq_n_s8(32)),
            d: f16_at(wb.add(108)),
            mins: vdupq_n_s8(0),
            dmin: 0.0,
        }
    };
    dot_k16::<_, N, 4, false>(d, w, Q3K, a, blocks, head, |wb, half| unsafe {
        let hmask = [vld1q_u8(wb), vld1q_u8(wb.add(16))];
        let runs = crumbs(wb.add(32 + 32 * half));
        std::array::from_fn(|j| {
            let bit = vdupq_n_u8(1 << (4 * half + j));
            [0, 1].map(|i| vorrq_u8(runs[j][i], vandq_u8(vtstq_u8(hmask[i], bit), vdupq_n_u8(4))))
        })
    })
}

/// Q2_K weights against the Q8_K activations of `N` tokens.
fn q2k<D: I8Dot, const N: usize>(d: D, w: &[u8], a: [&[u8]; N], blocks: usize) -> [f32; N] {
    // SAFETY: (both) `dot_k16` bounds each block it hands out.
    let head = |wb: *const u8| unsafe {
        let sm = vld1q_u8(wb);
        Head16 {
            scales: vreinterpretq_s8_u8(vandq_u8(sm, vdupq_n_u8(0x0F))),
            d: f16_at(wb.add(80)),
            mins: vreinterpretq_s8_u8(vshrq_n_u8::<4>(sm)),
            dmin: f16_at(wb.add(82)),
        }
    };
    dot_k16::<_, N, 0, true>(d, w, Q2K, a, blocks, head, |wb, half| unsafe {
        crumbs(wb.add(16 + 32 * half))
    })
}

/// The largest magnitude among `x` (whose length is a multiple of 4); NaN
/// if any is NaN.
fn amax(x: &[f32]) -> f32 {
    // SAFETY: NEON is baseline; each load reads one whole chunk.
    unsafe {
        let m = x.chunks_exact(4).fold(vdupq_n_f32(0.0), |m, v| {
            vmaxq_f32(m, vabsq_f32(vld1q_f32(v.as_ptr())))
        });
        vmaxvq_f32(m)
    }
}

/// 16 values times `scale`, each rounded half to even (`vcvtnq`), capped
/// at 127 and saturated to i8.
#[inline(always)]
fn quantize16(x: &[f32], scale: f32) -> int8x16_t {
    assert!(x.len() >= 16);
    // SAFETY: NEON is baseline; the assert bounds the loads.
    unsafe {
        let i = [0, 1, 2, 3].map(|k| {
            let v = vmulq_n_f32(vld1q_f32(x.as_ptr().add(4 * k)), scale);
            vminq_s32(vcvtnq_s32_f32(v), vdupq_n_s32(127))
        });
        let lo = vcombine_s16(vqmovn_s32(i[0]), vqmovn_s32(i[1]));
        let hi = vcombine_s16(vqmovn_s32(i[2]), vqmovn_s32(i[3]));
        vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi))
    }
}

/// [`QDot::quantize_q8k`], a tenth of a Q4_K prefill product's time with
/// a scalar loop.
fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    let blocks = out.len() / Q8K;
    assert!(x.len() == blocks * 256 && out.len() == blocks * Q8K);
    for (xs, y) in x.chunks_exact(256).zip(out.chunks_exact_mut(Q8K)) {
        let amax = amax(xs);
        let Some(&max) = xs.iter().find(|v| v.abs() == amax).filter(|_| amax != 0.0) else {
            // All zeros, or a NaN that makes the product meaningless anyway.
            y.fill(0);
            continue;
        };
        let iscale = -127.0 / max;
        let (qs, bsums) = y[4..].split_at_mut(256);
        for (j, (xg, q)) in xs.chunks_exact(16).zip(qs.chunks_exact_mut(16)).enumerate() {
            let v = quantize16(xg, iscale);
            // SAFETY: NEON is baseline; `q` is 16 bytes.
            let sum = unsafe {
                vst1q_s8(q.as_mut_ptr().cast(), v);
                vaddlvq_s8(v)
            };
            bsums[2 * j..2 * j + 2].copy_from_slice(&sum.to_le_bytes());
        }
        y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// [`QDot::quantize_q8_0`].
fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    let blocks = out.len() / Q8_0;
    assert!(x.len() == blocks * 32 && out.len() == blocks * Q8_0);
    for (xs, y) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0)) {
        let d = amax(xs) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        for (xg, q) in xs.chunks_exact(16).zip(y[2..].chunks_exact_mut(16)) {
            // SAFETY: NEON is baseline; `q` is 16 bytes.
            unsafe { vst1q_s8(q.as_mut_ptr().cast(), quantize16(xg, id)) };
        }
    }
}
