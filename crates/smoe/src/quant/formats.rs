//! The block formats that GGUF files use and candle either lacks (IQ4_NL,
//! IQ4_XS) or pairs with other activations (Q4_1, Q5_0 and Q5_1, whose dot
//! products here take Q8_0 activations, as smoe's SIMD kernels do, rather
//! than candle's Q8_1): their scalar dot products, and IQ4's layouts,
//! dequantization and quantizer.
//!
//! The layouts are ggml's (`ggml-common.h`), all little-endian:
//! - Q4_1: f16 `d`, f16 `m`, 16 bytes of nibbles; weight `d*q + m`, q in 0..16.
//! - Q5_0: f16 `d`, 32 high bits (u32), 16 bytes of nibbles; weight
//!   `d*(q - 16)`, q in 0..32 its nibble plus 16 times its high bit.
//! - Q5_1: f16 `d`, f16 `m`, the high bits, the nibbles; weight `d*q + m`.
//! - IQ4_NL: f16 `d`, 16 bytes of nibbles; weight `d*KVALUES_IQ4NL[q]`.
//! - IQ4_XS: f16 `d`, u16 `scales_h`, four bytes `scales_l`, 128 bytes of
//!   nibbles; eight 32-weight sub-blocks, sub-block `i` with the 6-bit scale
//!   `ls` of nibble `i % 2` of `scales_l[i / 2]` and bits `2i..2i+2` of
//!   `scales_h` on top, weight `d*(ls - 32)*KVALUES_IQ4NL[q]`, its nibbles
//!   the 16 bytes at `16*i`.
//!
//! In every 32-weight run, element `j < 16` is the low nibble of byte `j`
//! and element `j + 16` its high nibble; for Q5, bit `j` of the high bits
//! belongs to element `j`.

use std::mem::size_of;

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8K, BlockQ8_0};
use half::f16;

use super::{bytes_of, Block, WeightBlock};

/// The sixteen values an IQ4 nibble indexes: ggml's `kvalues_iq4nl`
/// (`ggml-common.h`, MIT licence, copyright the ggml authors; the IQ4
/// formats are Iwan Kawrakow's), a non-linear grid denser near zero.
pub(crate) const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Bytes of a Q8_0 and a Q8_K activation block (for the scalar dot
/// products, only the tests' reference on ARM).
#[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
const Q8_0_BYTES: usize = 34;
#[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
const Q8K_BYTES: usize = 292;

/// ggml's `block_iq4_nl`.
#[derive(Debug, Clone)]
#[repr(C)]
pub(crate) struct BlockIq4Nl {
    d: f16,
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockIq4Nl>() == 18);

/// ggml's `block_iq4_xs`.
#[derive(Debug, Clone)]
#[repr(C)]
pub(crate) struct BlockIq4Xs {
    d: f16,
    scales_h: [u8; 2],
    scales_l: [u8; 4],
    qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockIq4Xs>() == 136);

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The 32 nibbles of a run in element order.
fn nibbles(qs: &[u8]) -> [u8; 32] {
    std::array::from_fn(|j| {
        if j < 16 {
            qs[j] & 0x0F
        } else {
            qs[j - 16] >> 4
        }
    })
}

/// A 32-weight format read by the scalar code: each block's integer
/// weights `q`, scale `d` and minimum `m`, the weights being `d*q + m`.
trait Block32: Block {
    fn unpack(b: &[u8]) -> ([i8; 32], f32, f32);
}

impl Block32 for BlockQ4_1 {
    fn unpack(b: &[u8]) -> ([i8; 32], f32, f32) {
        let q = nibbles(&b[4..20]).map(|v| v as i8);
        (q, f16_at(b, 0), f16_at(b, 2))
    }
}

/// Nibbles with the high bits of `qh` on top, as Q5 stores them.
fn five_bits(qh: u32, qs: &[u8]) -> [u8; 32] {
    let n = nibbles(qs);
    std::array::from_fn(|j| n[j] | (((qh >> j) & 1) as u8) << 4)
}

impl Block32 for BlockQ5_0 {
    fn unpack(b: &[u8]) -> ([i8; 32], f32, f32) {
        let q = five_bits(u32_at(b, 2), &b[6..22]).map(|v| v as i8 - 16);
        (q, f16_at(b, 0), 0.0)
    }
}

impl Block32 for BlockQ5_1 {
    fn unpack(b: &[u8]) -> ([i8; 32], f32, f32) {
        let q = five_bits(u32_at(b, 4), &b[8..24]).map(|v| v as i8);
        (q, f16_at(b, 0), f16_at(b, 2))
    }
}

impl Block32 for BlockIq4Nl {
    fn unpack(b: &[u8]) -> ([i8; 32], f32, f32) {
        let q = nibbles(&b[2..18]).map(|v| KVALUES_IQ4NL[v as usize]);
        (q, f16_at(b, 0), 0.0)
    }
}

/// The dot product of 32-weight blocks with Q8_0 activations:
/// `d*d8*sum(q*y) + m*d8*sum(y)` per block.
macro_rules! block32_dot {
    ($($b:ty),*) => {$(
        impl WeightBlock for $b {
            type VecDotType = BlockQ8_0;

            fn vec_dot_unopt(xs: &[Self], ys: &[BlockQ8_0]) -> f32 {
                let (w, a) = (bytes_of(xs), bytes_of(ys));
                let size = size_of::<Self>();
                let mut sum = 0.0;
                for (wb, ab) in w.chunks_exact(size).zip(a.chunks_exact(Q8_0_BYTES)) {
                    let (q, d, m) = <Self as Block32>::unpack(wb);
                    let y = &ab[2..];
                    let dot: i32 = q.iter().zip(y).map(|(&q, &y)| q as i32 * y as i8 as i32).sum();
                    let ysum: i32 = y.iter().map(|&y| y as i8 as i32).sum();
                    let d8 = f16_at(ab, 0);
                    sum += d * d8 * dot as f32 + m * d8 * ysum as f32;
                }
                sum
            }
        }
    )*};
}
block32_dot!(BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockIq4Nl);

/// Below this magnitude a sub-block is all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// The index of the table value nearest `x` (ggml's `best_index_int8`):
/// ties go to the upper value.
fn best_index(x: f32) -> u8 {
    let v = KVALUES_IQ4NL.map(f32::from);
    if x <= v[0] {
        return 0;
    }
    if x >= v[15] {
        return 15;
    }
    let (mut lo, mut hi) = (0, 15);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < v[mid] {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if x - v[hi - 1] < v[hi] - x {
        hi as u8 - 1
    } else {
        hi as u8
    }
}

/// Candidate scales tried on each side of the first guess.
const NTRY: i32 = 7;

/// The scale that fits sub-block `xb` to the table best, weighting each
/// value by its square; 0 for a sub-block of zeros.
///
/// A port of the per-block search of ggml's `quantize_row_iq4_nl_impl`
/// (`ggml-quants.c`, MIT licence, copyright the ggml authors) without an
/// importance matrix: least squares at the scale that maps the largest
/// magnitude onto the table's end, then at the `2*NTRY + 1` scales that map
/// it onto `-127 + i`, keeping the best. The table is asymmetric, so mapping
/// the largest value onto its negative end is often better.
fn sub_block_scale(xb: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in xb {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let fit = |id: f32| {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for &x in xb {
            let q = f32::from(KVALUES_IQ4NL[best_index(id * x) as usize]);
            let w = x * x;
            sumqx += w * q * x;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let v0 = f32::from(KVALUES_IQ4NL[0]);
    let (sumqx, sumq2) = fit(1.0 / (-max / v0));
    let mut d = sumqx / sumq2;
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let (sumqx, sumq2) = fit((itry as f32 + v0) / max);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// The table indices of `x` at scale `d` (all zero values' index for 0),
/// packed two per byte in ggml's order.
fn pack_indices(x: &[f32], d: f32, qs: &mut [u8]) {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (j, q) in qs.iter_mut().enumerate() {
        *q = best_index(id * x[j]) | best_index(id * x[j + 16]) << 4;
    }
}

// SAFETY: `repr(C)` structs of an f16 and byte arrays, sizes asserted above
// (no padding), 2-byte aligned.
unsafe impl Block for BlockIq4Nl {
    const NAME: &'static str = "iq4_nl";
    const BLCK_SIZE: usize = 32;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (b, y) in xs.iter().zip(ys.chunks_exact_mut(32)) {
            let (q, d, _) = Self::unpack(bytes_of(std::slice::from_ref(b)));
            for (y, q) in y.iter_mut().zip(q) {
                *y = d * f32::from(q);
            }
        }
    }

    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, b) in xs.chunks_exact(32).zip(ys) {
            let d = sub_block_scale(x);
            b.d = f16::from_f32(d);
            pack_indices(x, d, &mut b.qs);
        }
    }
}

impl BlockIq4Xs {
    /// Sub-block `i`'s scale, `ls - 32`.
    fn scale(&self, i: usize) -> i32 {
        let low = (self.scales_l[i / 2] >> (4 * (i % 2))) & 0x0F;
        let high = (u16::from_le_bytes(self.scales_h) >> (2 * i)) & 3;
        (low as i32 | (high as i32) << 4) - 32
    }
}

// SAFETY: as for `BlockIq4Nl`.
unsafe impl Block for BlockIq4Xs {
    const NAME: &'static str = "iq4_xs";
    const BLCK_SIZE: usize = 256;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (b, y) in xs.iter().zip(ys.chunks_exact_mut(256)) {
            let d = b.d.to_f32();
            for (i, (y, qs)) in y
                .chunks_exact_mut(32)
                .zip(b.qs.chunks_exact(16))
                .enumerate()
            {
                let dl = d * b.scale(i) as f32;
                for (y, q) in y.iter_mut().zip(nibbles(qs)) {
                    *y = dl * f32::from(KVALUES_IQ4NL[q as usize]);
                }
            }
        }
    }

    /// The second half of ggml's `quantize_row_iq4_nl_impl` for super-blocks
    /// (ported as [`sub_block_scale`] is): the sub-blocks' scales become
    /// 6-bit multiples of the one of largest magnitude over 32, and the
    /// values are refit to the rounded scales.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, b) in xs.chunks_exact(256).zip(ys) {
            let scales: [f32; 8] = std::array::from_fn(|i| sub_block_scale(&x[32 * i..][..32]));
            let mut max_scale = 0.0f32;
            for &s in &scales {
                if s.abs() > max_scale.abs() {
                    max_scale = s;
                }
            }
            let d = -max_scale / 32.0;
            b.d = f16::from_f32(d);
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (mut scales_h, mut scales_l) = (0u16, [0u8; 4]);
            for (i, &s) in scales.iter().enumerate() {
                let l = ((id * s).round_ties_even() as i32).clamp(-32, 31);
                pack_indices(&x[32 * i..][..32], d * l as f32, &mut b.qs[16 * i..][..16]);
                let ls = (l + 32) as u8;
                scales_l[i / 2] |= (ls & 0x0F) << (4 * (i % 2));
                scales_h |= u16::from(ls >> 4) << (2 * i);
            }
            (b.scales_h, b.scales_l) = (scales_h.to_le_bytes(), scales_l);
        }
    }
}

impl WeightBlock for BlockIq4Xs {
    type VecDotType = BlockQ8K;

    fn vec_dot_unopt(xs: &[Self], ys: &[BlockQ8K]) -> f32 {
        let a = bytes_of(ys);
        let mut sum = 0.0;
        for (b, ab) in xs.iter().zip(a.chunks_exact(Q8K_BYTES)) {
            let mut sumi = 0i32;
            for (i, (qs, y)) in
                b.qs.chunks_exact(16)
                    .zip(ab[4..260].chunks_exact(32))
                    .enumerate()
            {
                let dot: i32 = nibbles(qs)
                    .iter()
                    .zip(y)
                    .map(|(&q, &y)| KVALUES_IQ4NL[q as usize] as i32 * y as i8 as i32)
                    .sum();
                sumi += b.scale(i) * dot;
            }
            let d8 = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
            sum += b.d.to_f32() * d8 * sumi as f32;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::{normal, quantize};
    use crate::quant::{as_blocks, dequantize_rows, Activations, QuantType};

    /// Dequantizes one block's bytes as format `t`.
    fn dequantize(t: QuantType, bytes: &[u8]) -> Vec<f32> {
        let mut q = crate::quant::tests::Aligned::zeroed(bytes.len());
        q.bytes_mut().copy_from_slice(bytes);
        let mut y = vec![f32::NAN; t.block_elems()];
        dequantize_rows(t, q.bytes(), t.block_elems(), &mut y).unwrap();
        y
    }

    /// Byte `j` of a run holds nibble `j % 16` low and `15 - j % 16` high:
    /// element `j < 16` is `j`, element `j + 16` is `15 - j`.
    fn ramp() -> Vec<u8> {
        (0..16u8).map(|j| j | (15 - j) << 4).collect()
    }

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    /// One hand-made block of each 32-weight format against the weights
    /// ggml's definitions give it, element by element.
    #[test]
    fn block32_formats_dequantize_as_ggml_defines_them() {
        let nib = |e: usize| if e < 16 { e as i32 } else { 31 - e as i32 };
        // High bits of Q5: bit e set for e in 4..12 and 20..28.
        let qh: u32 = 0x0FF0_0FF0;
        let bit = |e: usize| (qh >> e) as i32 & 1;

        let q4_1 = [&f16_bytes(0.5)[..], &f16_bytes(-1.0), &ramp()].concat();
        let want: Vec<f32> = (0..32).map(|e| 0.5 * nib(e) as f32 - 1.0).collect();
        assert_eq!(dequantize(QuantType::Q4_1, &q4_1), want);

        let q5_0 = [&f16_bytes(0.25)[..], &qh.to_le_bytes(), &ramp()].concat();
        let want: Vec<f32> = (0..32)
            .map(|e| 0.25 * (nib(e) + 16 * bit(e) - 16) as f32)
            .collect();
        assert_eq!(dequantize(QuantType::Q5_0, &q5_0), want);
        assert_eq!(want[4], 0.25 * (4 + 16 - 16) as f32);
        assert_eq!(want[0], 0.25 * -16.0);

        let q5_1 = [
            &f16_bytes(0.5)[..],
            &f16_bytes(2.0),
            &qh.to_le_bytes(),
            &ramp(),
        ]
        .concat();
        let want: Vec<f32> = (0..32)
            .map(|e| 0.5 * (nib(e) + 16 * bit(e)) as f32 + 2.0)
            .collect();
        assert_eq!(dequantize(QuantType::Q5_1, &q5_1), want);
        assert_eq!(want[20], 0.5 * (11 + 16) as f32 + 2.0);

        let iq4nl = [&f16_bytes(2.0)[..], &ramp()].concat();
        let got = dequantize(QuantType::Iq4Nl, &iq4nl);
        assert_eq!(&got[..4], [-254.0, -208.0, -166.0, -130.0]);
        assert_eq!(&got[14..18], [178.0, 226.0, 226.0, 178.0]);
        assert_eq!(got[31], -254.0);
    }

    /// A hand-made IQ4_XS block: sub-block scales from known bits, the
    /// ramp of nibbles in every sub-block.
    #[test]
    fn iq4_xs_dequantizes_as_ggml_defines_it() {
        // Low scale nibbles 0..8 in order, high bit pairs 0, 1, 2, 3 twice:
        // ls = [0, 17, 34, 51, 4, 21, 38, 55], scales ls - 32.
        let scales = [-32, -15, 2, 19, -28, -11, 6, 23];
        let mut block = [
            &f16_bytes(0.5)[..],
            &0b11_10_01_00_11_10_01_00u16.to_le_bytes(),
        ]
        .concat();
        block.extend([0x10, 0x32, 0x54, 0x76]);
        for _ in 0..8 {
            block.extend(ramp());
        }
        let got = dequantize(QuantType::Iq4Xs, &block);
        for (e, &v) in got.iter().enumerate() {
            let (i, r) = (e / 32, e % 32);
            let q = if r < 16 { r } else { 31 - r };
            let want = 0.5 * scales[i] as f32 * KVALUES_IQ4NL[q] as f32;
            assert_eq!(v, want, "element {e}");
        }
        assert_eq!(got[32 + 1], 0.5 * -15.0 * -104.0);
    }

    /// The scalar dot products equal the dequantized weights dotted with
    /// the dequantized activations, up to f32 rounding: exact integer
    /// sums scaled per block.
    #[test]
    fn scalar_dots_match_dequantized_products() {
        fn check<B: WeightBlock>(t: QuantType) {
            let cols = 512;
            let w = quantize(t, &normal(cols, 3), cols);
            let wb = as_blocks::<B>(w.bytes()).unwrap();
            let x = normal(cols, 4);
            let mut xq = vec![B::VecDotType::zeros(); cols / B::VecDotType::BLCK_SIZE];
            B::VecDotType::quantize(&x, &mut xq);
            let (mut wd, mut xd) = (vec![0.0; cols], vec![0.0; cols]);
            B::to_float(wb, &mut wd);
            B::VecDotType::to_float(&xq, &mut xd);
            let want: f64 = wd.iter().zip(&xd).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = wd
                .iter()
                .zip(&xd)
                .map(|(&a, &b)| (a as f64 * b as f64).powi(2))
                .sum();
            let got = B::vec_dot_unopt(wb, &xq) as f64;
            assert!(
                (got - want).abs() < 1e-5 * scale.sqrt().max(1.0),
                "{t:?}: {got} vs {want}"
            );
        }
        check::<BlockQ4_1>(QuantType::Q4_1);
        check::<BlockQ5_0>(QuantType::Q5_0);
        check::<BlockQ5_1>(QuantType::Q5_1);
        check::<BlockIq4Nl>(QuantType::Iq4Nl);
        check::<BlockIq4Xs>(QuantType::Iq4Xs);
    }

    #[test]
    fn best_index_picks_the_nearest_value() {
        assert_eq!(best_index(-1000.0), 0);
        assert_eq!(best_index(1000.0), 15);
        assert_eq!(best_index(0.0), 8);
        assert_eq!(best_index(-4.6), 7);
        assert_eq!(best_index(-4.4), 8);
        for (i, &v) in KVALUES_IQ4NL.iter().enumerate() {
            assert_eq!(best_index(f32::from(v)), i as u8);
        }
    }
}
