//! Scaled dot-product attention of new queries against the KV cache.
//!
//! Keys and values are stored position-major (`[pos][kv_head][dim]`), so
//! appending a token is one contiguous write and a head's keys are read
//! with a fixed stride. Keys and values may share one buffer: multi-head
//! latent attention's values are the first `v_dim` elements of its keys. Work is split over (token, head) pairs; each query
//! reads only the keys its causal (and sliding-window) mask allows, so no
//! masked score is ever computed.

use rayon::prelude::*;

use super::{ops::softmax, simd::dot_f32};

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Query and key elements per head.
    pub head_dim: usize,
    /// Value (and output) elements per head.
    pub v_dim: usize,
    /// Elements per position in `keys` and in `values`.
    pub k_stride: usize,
    pub v_stride: usize,
    /// Multiplies the scores before the softmax.
    pub scale: f32,
    /// Position of the first query; queries are `pos0..pos0 + t`.
    pub pos0: usize,
    pub window: Option<usize>,
}

impl AttnShape {
    /// Grouped-query attention: keys and values of `n_kv_heads` heads of
    /// `head_dim` each, scores scaled by `1/sqrt(head_dim)`.
    pub fn grouped(
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        pos0: usize,
        window: Option<usize>,
    ) -> Self {
        Self {
            n_heads,
            n_kv_heads,
            head_dim,
            v_dim: head_dim,
            k_stride: n_kv_heads * head_dim,
            v_stride: n_kv_heads * head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            pos0,
            window,
        }
    }
}

/// `q` is `[t, n_heads * head_dim]`; `keys`/`values` hold positions
/// `0..pos0 + t`; `out` is `[t, n_heads * v_dim]`.
pub fn attention(q: &[f32], keys: &[f32], values: &[f32], s: AttnShape, out: &mut [f32]) {
    let (hd, vd) = (s.head_dim, s.v_dim);
    let group = s.n_heads / s.n_kv_heads;
    out.par_chunks_mut(vd).enumerate().for_each(|(i, o)| {
        super::with_scratch(|scores| {
            let (tok, head) = (i / s.n_heads, i % s.n_heads);
            let kvh = head / group;
            let qpos = s.pos0 + tok;
            let first = s.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
            let qv = &q[i * hd..(i + 1) * hd];
            scores.clear();
            scores.extend((first..=qpos).map(|p| {
                let k = &keys[p * s.k_stride + kvh * hd..][..hd];
                dot_f32(qv, k) * s.scale
            }));
            softmax(scores);
            o.fill(0.0);
            for (p, w) in (first..=qpos).zip(scores.iter()) {
                let v = &values[p * s.v_stride + kvh * vd..][..vd];
                super::simd::axpy(*w, v, o);
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_key_returns_its_value_and_window_masks() {
        let s = AttnShape::grouped(2, 1, 2, 0, None);
        let q = [1.0, 0.0, 0.0, 1.0];
        let mut out = [0.0; 4];
        attention(&q, &[0.5, 0.5], &[3.0, 4.0], s, &mut out);
        assert_eq!(out, [3.0, 4.0, 3.0, 4.0]);

        // Two positions, window 1: the query at position 1 sees only itself.
        let s = AttnShape::grouped(1, 1, 2, 1, Some(1));
        let mut out = [0.0; 2];
        attention(
            &[1.0, 1.0],
            &[9.0, 9.0, 0.0, 0.0],
            &[1.0, 1.0, 5.0, 6.0],
            s,
            &mut out,
        );
        assert_eq!(out, [5.0, 6.0]);
    }
}
