//! Element-wise and row-wise operations of the transformer block. They are
//! O(hidden) per token, negligible next to the matrix products, so they are
//! plain loops that LLVM vectorises.

use crate::config::{RopeScaling, Yarn};

/// RMSNorm of each `dim`-wide row of `x` into `out`, in f32 as transformers
/// does (`x * rsqrt(mean(x^2) + eps) * weight`).
pub fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let inv = inv_rms(xr, eps);
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// RMSNorm in place over each `weight.len()`-wide row (per-head q/k norms).
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for xr in x.chunks_exact_mut(dim) {
        let inv = inv_rms(xr, eps);
        for (v, w) in xr.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// `gate = silu(gate) * up`, the SwiGLU activation.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// [`silu_mul`] over many rows at once, split across the kernels' pool: a
/// prefill chunk's routed experts hold thousands of intermediate rows, and
/// one thread's `exp` over all of them costs as much as a layer's matmuls
/// on many cores.
pub fn silu_mul_rows(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul_rows: shapes");
    const CHUNK: usize = 16_384;
    let out = super::SharedOut(gate.as_mut_ptr());
    let n = gate.len();
    super::for_each_task(n.div_ceil(CHUNK), |c| {
        let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
        // SAFETY: elements a..b belong to this task only, inside `gate`.
        silu_mul(unsafe { out.slice(a, b - a) }, &up[a..b]);
    });
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

pub fn add_in_place(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// Rotary position embedding. [`Rope::apply`] is the NeoX layout
/// (rotate-half: element `i` pairs with `i + dim/2`), which is what HF Qwen,
/// Llama, Mixtral and OLMoE use; [`Rope::apply_interleaved`] pairs adjacent
/// elements, as DeepSeek does.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    position_scale: f32,
    /// cos and sin are multiplied by this (YaRN's attention factor).
    magnitude: f32,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        // Same formula and f32 rounding as transformers'
        // compute_default_rope_parameters.
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let (inv_freq, position_scale, magnitude) = match scaling {
            RopeScaling::None => (base, 1.0, 1.0),
            RopeScaling::Linear { factor } => (base, 1.0 / factor, 1.0),
            RopeScaling::Yarn(y) => (
                yarn_inv_freq(&base, head_dim, theta, y),
                1.0,
                y.attention_factor(),
            ),
        };
        Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
            position_scale: position_scale as f32,
            magnitude: magnitude as f32,
        }
    }

    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }

    /// cos/sin tables for `positions`, `half_dim` values per position; built
    /// once per forward call and shared by every layer and head.
    pub fn tables(
        &self,
        positions: std::ops::Range<usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        cos.clear();
        sin.clear();
        for p in positions {
            let p = p as f32 * self.position_scale;
            for f in &self.inv_freq {
                let a = p * f;
                cos.push(a.cos() * self.magnitude);
                sin.push(a.sin() * self.magnitude);
            }
        }
    }

    /// Rotates every head of one token's `x` (`n_heads * 2 * half_dim`)
    /// with that token's table rows.
    pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in x.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }

    /// Like [`Rope::apply`] with pairs `(2i, 2i + 1)`.
    pub fn apply_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in x.chunks_exact_mut(2 * half) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * cos[i] - x1 * sin[i];
                pair[1] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

/// YaRN's frequencies (transformers' `_compute_yarn_parameters`): each
/// frequency blends its interpolated (divided by `factor`) and original
/// value along a linear ramp between the dimensions that turn `beta_fast`
/// and `beta_slow` times over the original context.
fn yarn_inv_freq(base: &[f64], dim: usize, theta: f64, y: &Yarn) -> Vec<f64> {
    let correction_dim = |rotations: f64| {
        dim as f64
            * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
            / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001;
    }
    base.iter()
        .enumerate()
        .map(|(i, &f)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            f / y.factor * (1.0 - extrapolation) + f * extrapolation
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let rope = Rope::new(4, 10000.0, &RopeScaling::None);
        let (mut c, mut s) = (Vec::new(), Vec::new());
        rope.tables(0..3, &mut c, &mut s);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        Rope::apply(&mut x, &c[0..2], &s[0..2]);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0], "position 0 is the identity");
        let mut y = [1.0, 0.0, 0.0, 0.0];
        Rope::apply(&mut y, &c[2..4], &s[2..4]);
        // Position 1, first frequency 1: (cos 1, 0, sin 1, 0).
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6);
        let norm: f32 = y.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_and_norm() {
        let mut v = [1.0, 2.0, 3.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6 && v[2] > v[1]);
        let mut x = [3.0, 4.0];
        rms_norm(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
    }
}
