//! Inner loops: dot products and widening of bf16/f16/f32 weight rows
//! against f32 activations.
//!
//! Each has a portable version that LLVM autovectorises for the baseline
//! target and, on x86-64, an AVX2+FMA(+F16C) version picked at run time, so
//! one binary runs everywhere and still uses the wide units where they
//! exist. On aarch64, NEON is part of the baseline, so its versions are
//! always used and the portable ones serve only as the tests' reference.
//! Every SIMD path is tested against the portable one.

use half::f16;

use super::DType;

#[inline]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Reinterprets little-endian bytes as u16 words. The checkpoint loader
/// guarantees alignment (it copies the rare misaligned tensor).
#[inline]
pub(crate) fn as_u16(bytes: &[u8]) -> &[u16] {
    // SAFETY: u16 has no invalid bit patterns; alignment and length are
    // checked by align_to leaving empty prefix/suffix.
    let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
    assert!(
        pre.is_empty() && post.is_empty(),
        "weight bytes not 2-byte aligned"
    );
    mid
}

#[inline]
pub(crate) fn as_f32(bytes: &[u8]) -> &[f32] {
    // SAFETY: every bit pattern is a valid f32; see as_u16.
    let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
    assert!(
        pre.is_empty() && post.is_empty(),
        "weight bytes not 4-byte aligned"
    );
    mid
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    has_avx2() && is_x86_feature_detected!("f16c")
}

/// `dot(w, x)` where `w` is one weight row in `dtype` and `x` is f32.
#[inline]
pub fn dot(dtype: DType, w: &[u8], x: &[f32]) -> f32 {
    match dtype {
        DType::F32 => dot_f32(as_f32(w), x),
        DType::BF16 => {
            let w = as_u16(w);
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU supports the features the function enables.
                return unsafe { x86::dot_bf16(w, x) };
            }
            #[cfg(target_arch = "aarch64")]
            return neon::dot_bf16(w, x);
            #[cfg(not(target_arch = "aarch64"))]
            portable::dot_bf16(w, x)
        }
        DType::F16 => {
            let w = as_u16(w);
            #[cfg(target_arch = "x86_64")]
            if has_f16c() {
                // SAFETY: as above.
                return unsafe { x86::dot_f16(w, x) };
            }
            #[cfg(target_arch = "aarch64")]
            return neon::dot_f16(w, x);
            #[cfg(not(target_arch = "aarch64"))]
            portable::dot_f16(w, x)
        }
        DType::Quant(_) => {
            // Quantized matrices go through kernels::qmatmul as a whole and
            // never reach this row-at-a-time path (the float matmul's
            // decode loop); a caller that does gets the widened product.
            let mut row = vec![0.0; x.len()];
            widen(dtype, w, &mut row);
            dot_f32(&row, x)
        }
    }
}

/// `dot(w, x)` for f32 slices.
#[inline]
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::dot_f32(w, x) };
    }
    #[cfg(target_arch = "aarch64")]
    return neon::dot_f32(w, x);
    #[cfg(not(target_arch = "aarch64"))]
    portable::dot_f32(w, x)
}

/// Four dot products sharing one weight row: the weight is loaded once for
/// four tokens, which is what makes prefill compute-bound rather than
/// memory-bound.
#[inline]
pub fn dot4_f32(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::dot4_f32(w, x) };
    }
    #[cfg(target_arch = "aarch64")]
    return neon::dot4_f32(w, x);
    #[cfg(not(target_arch = "aarch64"))]
    x.map(|xi| portable::dot_f32(w, xi))
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Widens `out.len()` elements of `dtype` from `bytes` into f32.
pub fn widen(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let n = out.len();
    match dtype {
        DType::F32 => out.copy_from_slice(&as_f32(bytes)[..n]),
        DType::BF16 => {
            for (o, &b) in out.iter_mut().zip(&as_u16(bytes)[..n]) {
                *o = bf16_to_f32(b);
            }
        }
        DType::F16 => {
            for (o, &b) in out.iter_mut().zip(&as_u16(bytes)[..n]) {
                *o = f16::from_bits(b).to_f32();
            }
        }
        DType::Quant(q) => crate::quant::dequantize_rows(q, bytes, n, out)
            .expect("vault validation guarantees whole, aligned blocks"),
    }
}

/// Plain Rust, written with independent accumulators so that LLVM can
/// vectorise without reassociating floating-point sums.
#[cfg(any(not(target_arch = "aarch64"), test))]
pub(crate) mod portable {
    use super::*;

    const LANES: usize = 16;

    #[inline]
    fn dot_with(n: usize, x: &[f32], w: impl Fn(usize) -> f32) -> f32 {
        let mut acc = [0.0f32; LANES];
        let full = n / LANES * LANES;
        for base in (0..full).step_by(LANES) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += w(base + l) * x[base + l];
            }
        }
        let tail: f32 = (full..n).map(|i| w(i) * x[i]).sum();
        acc.iter().sum::<f32>() + tail
    }

    pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        dot_with(n, x, |i| w[i])
    }

    pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        dot_with(n, x, |i| bf16_to_f32(w[i]))
    }

    pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        dot_with(n, x, |i| f16::from_bits(w[i]).to_f32())
    }
}

/// The shared shape of the SIMD dots: four accumulators of `LANES` lanes
/// to hide FMA latency, one single-vector loop, then a scalar tail. Expanded
/// inside an architecture's module, whose `LANES`, `zero`, `load`, `fma`,
/// `add` and `hsum` it calls; `$load` widens `LANES` weights at a pointer.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! dot_body {
    ($w:ident, $x:ident, $load:expr, $scalar:expr) => {{
        let n = $w.len().min($x.len());
        let (wp, xp) = ($w.as_ptr(), $x.as_ptr());
        let mut acc = [zero(); 4];
        let mut i = 0;
        while i + 4 * LANES <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let o = i + LANES * k;
                *a = fma($load(wp.add(o)), load(xp.add(o)), *a);
            }
            i += 4 * LANES;
        }
        while i + LANES <= n {
            acc[0] = fma($load(wp.add(i)), load(xp.add(i)), acc[0]);
            i += LANES;
        }
        let mut sum = hsum(add(add(acc[0], acc[1]), add(acc[2], acc[3])));
        while i < n {
            sum += $scalar(*wp.add(i)) * *xp.add(i);
            i += 1;
        }
        sum
    }};
}

/// `$tokens` dots sharing the weight row's loads, in the same scope as
/// `dot_body`. Each token's sum is formed exactly as `dot_body` forms it
/// (four accumulators, the same single-vector loop, reduction and tail), so
/// that a row of a matrix product does not round differently with the
/// number of tokens in the call: a sequence decoded in a batch must get the
/// logits it gets alone.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! dots_body {
    ($w:ident, $x:ident, $tokens:literal) => {{
        let n = $x.iter().fold($w.len(), |n, xi| n.min(xi.len()));
        let wp = $w.as_ptr();
        let xp = $x.map(|xi| xi.as_ptr());
        let mut acc = [[zero(); 4]; $tokens];
        let mut i = 0;
        while i + 4 * LANES <= n {
            for k in 0..4 {
                let o = i + LANES * k;
                let wv = load(wp.add(o));
                for (a, p) in acc.iter_mut().zip(&xp) {
                    a[k] = fma(wv, load(p.add(o)), a[k]);
                }
            }
            i += 4 * LANES;
        }
        while i + LANES <= n {
            let wv = load(wp.add(i));
            for (a, p) in acc.iter_mut().zip(&xp) {
                a[0] = fma(wv, load(p.add(i)), a[0]);
            }
            i += LANES;
        }
        let mut out = acc.map(|a| hsum(add(add(a[0], a[1]), add(a[2], a[3]))));
        while i < n {
            for (o, p) in out.iter_mut().zip(&xp) {
                *o += *wp.add(i) * *p.add(i);
            }
            i += 1;
        }
        out
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const LANES: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(a: __m256, b: __m256, acc: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let raw = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        dot_body!(w, x, |p| load_bf16(p), super::bf16_to_f32)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
        dot_body!(
            w,
            x,
            |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            |b: u16| half::f16::from_bits(b).to_f32()
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        dot_body!(w, x, |p| load(p), |v: f32| v)
    }

    /// Two tokens at a time: four tokens' sixteen accumulators would take
    /// every register AVX2 has, and the weight row is in L1 for the second
    /// pair.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_f32(w: &[f32], [x0, x1, x2, x3]: [&[f32]; 4]) -> [f32; 4] {
        let (a, b) = ([x0, x1], [x2, x3]);
        let [d0, d1] = dots_body!(w, a, 2);
        let [d2, d3] = dots_body!(w, b, 2);
        [d0, d1, d2, d3]
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;
    use std::arch::asm;

    const LANES: usize = 4;

    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        vdupq_n_f32(0.0)
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        vld1q_f32(p)
    }

    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, acc: float32x4_t) -> float32x4_t {
        vfmaq_f32(acc, a, b)
    }

    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vaddq_f32(a, b)
    }

    #[inline(always)]
    unsafe fn hsum(v: float32x4_t) -> f32 {
        vaddvq_f32(v)
    }

    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> float32x4_t {
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p)))
    }

    /// `fcvtl` is baseline ARMv8, but the intrinsic (`vcvt_f32_f16`) needs
    /// Rust's f16 vector type, which is newer than this crate's MSRV.
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> float32x4_t {
        let out: float32x4_t;
        asm!(
            "fcvtl {out:v}.4s, {h:v}.4h",
            out = out(vreg) out,
            h = in(vreg) vld1_u16(p),
            options(pure, nomem, nostack, preserves_flags),
        );
        out
    }

    // SAFETY (all): NEON is part of the aarch64 baseline; the bodies read
    // only within the slices.
    pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        unsafe { dot_body!(w, x, |p| load_bf16(p), super::bf16_to_f32) }
    }

    pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
        unsafe { dot_body!(w, x, |p| load_f16(p), |b| half::f16::from_bits(b).to_f32()) }
    }

    pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        unsafe { dot_body!(w, x, |p| load(p), |v: f32| v) }
    }

    pub fn dot4_f32(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        unsafe { dots_body!(w, x, 4) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Reference in f64 so the tolerance measures the kernel, not the
    /// reference. f32 accumulation over n terms of magnitude <= 1 errs by
    /// about n * 2^-24 in the worst case; 1e-5 * n is a comfortable bound.
    fn check(dtype: DType, n: usize, seed: u64) {
        let mut s = seed;
        let x: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let wf: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let bytes: Vec<u8> = match dtype {
            DType::F32 => wf.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => wf
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            DType::F16 => wf
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            DType::Quant(_) => unreachable!("float types only; kernels::qmatmul tests its own"),
        };
        // Copy into u32 storage so the bytes are aligned for every dtype.
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        let wb: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 4) };
        wb[..bytes.len()].copy_from_slice(&bytes);
        let wb = &wb[..bytes.len()];
        let mut widened = vec![0.0; n];
        widen(dtype, wb, &mut widened);
        let reference: f64 = widened
            .iter()
            .zip(&x)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let got = dot(dtype, wb, &x);
        let tol = 1e-5 * n.max(1) as f64;
        assert!(
            (got as f64 - reference).abs() <= tol,
            "{dtype:?} n={n}: {got} vs {reference}"
        );
        // Bit for bit what one token gets, or a row of a batched product
        // would round differently from the same row decoded alone.
        let four = dot4_f32(&widened, [&x, &x, &x, &x]);
        for v in four {
            assert_eq!(
                v.to_bits(),
                got.to_bits(),
                "dot4 {dtype:?} n={n}: {v} vs {got}"
            );
        }
    }

    #[test]
    fn dots_match_reference_including_tails() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (i, n) in [0, 1, 7, 8, 9, 31, 32, 33, 63, 100, 257, 1000]
                .into_iter()
                .enumerate()
            {
                check(dtype, n, 17 + i as u64);
            }
        }
    }

    /// The SIMD dots sum the same products as the portable ones in another
    /// order: 77 terms below 1 in magnitude (a tail for every lane width)
    /// agree to well within 1e-4.
    #[test]
    fn portable_matches_dispatched() {
        let mut s = 5;
        let x: Vec<f32> = (0..77).map(|_| lcg(&mut s)).collect();
        let wf: Vec<f32> = (0..77).map(|_| lcg(&mut s)).collect();
        let wb: Vec<u16> = wf.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
        let wh: Vec<u16> = wf.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
        fn bytes(w: &[u16]) -> &[u8] {
            // SAFETY: u16 storage, so aligned for the u16 view `dot` takes.
            unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), w.len() * 2) }
        }
        let mut pairs = vec![
            (dot_f32(&wf, &x), portable::dot_f32(&wf, &x)),
            (
                dot(DType::BF16, bytes(&wb), &x),
                portable::dot_bf16(&wb, &x),
            ),
            (dot(DType::F16, bytes(&wh), &x), portable::dot_f16(&wh, &x)),
        ];
        let xs = [0, 1, 2, 3].map(|k| &x[k..k + 73]);
        let four_ref = xs.map(|xi| portable::dot_f32(&wf, xi));
        pairs.extend(dot4_f32(&wf, xs).into_iter().zip(four_ref));
        for (i, (a, b)) in pairs.into_iter().enumerate() {
            assert!((a - b).abs() < 1e-4, "case {i}: {a} vs {b}");
        }
    }
}
