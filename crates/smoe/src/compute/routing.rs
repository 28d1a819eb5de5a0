//! Routing: a token's router logits to its experts and their weights.

use crate::config::{Routing, Scoring};
use crate::kernels;

/// Buffers of [`route`], kept between calls.
#[derive(Debug, Default)]
pub struct RouteScratch {
    /// Scores the choice is made on (bias-corrected ones, for V3).
    choice: Vec<f32>,
    /// (group, score), best first.
    groups: Vec<(usize, f32)>,
}

/// Turns one token's router logits into `top_k` (expert, weight) pairs
/// appended to `chosen`, as transformers does for each family:
///
/// - scores: softmax over all experts, or independent sigmoids;
/// - the choice is made on the scores plus `bias` when given (the weights
///   stay the unbiased scores);
/// - with a group limit, only experts of the best `topk_group` groups
///   compete, a group scored by its best expert (softmax) or the sum of
///   its best two (sigmoid);
/// - the `top_k` best win, ties to the lower index; their weights are
///   optionally renormalised, then multiplied by `scale`.
///
/// `logits` is overwritten with the scores.
pub fn route(
    logits: &mut [f32],
    r: &Routing,
    bias: Option<&[f32]>,
    scratch: &mut RouteScratch,
    chosen: &mut Vec<(u32, f32)>,
) {
    let RouteScratch { choice, groups } = scratch;
    match r.scoring {
        Scoring::Softmax => kernels::softmax(logits),
        Scoring::Sigmoid => {
            for v in logits.iter_mut() {
                *v = kernels::sigmoid(*v);
            }
        }
    }
    let scores = &*logits;
    choice.clear();
    match bias {
        Some(b) => choice.extend(scores.iter().zip(b).map(|(s, b)| s + b)),
        None => choice.extend_from_slice(scores),
    }
    if let Some(g) = r.groups {
        let per = choice.len() / g.n_group;
        let group_score = |grp: &[f32]| match r.scoring {
            Scoring::Softmax => grp.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            Scoring::Sigmoid => {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in grp {
                    if v > a {
                        (a, b) = (v, a);
                    } else if v > b {
                        b = v;
                    }
                }
                a + b
            }
        };
        groups.clear();
        groups.extend(choice.chunks_exact(per).map(group_score).enumerate());
        groups.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for &(grp, _) in &groups[g.topk_group..] {
            choice[grp * per..(grp + 1) * per].fill(f32::NEG_INFINITY);
        }
    }
    let first = chosen.len();
    for _ in 0..r.top_k {
        let mut best = 0;
        for (e, &p) in choice.iter().enumerate() {
            if p > choice[best] {
                best = e;
            }
        }
        chosen.push((best as u32, scores[best]));
        choice[best] = f32::NEG_INFINITY;
    }
    if r.norm_topk_prob {
        let sum: f32 = chosen[first..].iter().map(|c| c.1).sum();
        for c in &mut chosen[first..] {
            c.1 /= sum;
        }
    }
    if r.scale != 1.0 {
        for c in &mut chosen[first..] {
            c.1 *= r.scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GroupLimit;

    fn routed(logits: &[f32], r: Routing, bias: Option<&[f32]>) -> Vec<(u32, f32)> {
        let (mut l, mut chosen) = (logits.to_vec(), Vec::new());
        route(&mut l, &r, bias, &mut RouteScratch::default(), &mut chosen);
        chosen
    }

    #[test]
    fn group_limits_and_correction_bias_steer_the_choice() {
        let plain = Routing {
            top_k: 2,
            scoring: Scoring::Softmax,
            groups: None,
            norm_topk_prob: false,
            scale: 1.0,
        };
        let logits = [3.0, 2.9, 0.0, 2.8, 0.1, 0.2];
        let ids = |c: Vec<(u32, f32)>| c.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(ids(routed(&logits, plain, None)), [0, 1]);

        // Three groups of two, one allowed: group {0, 1} has the best
        // expert, so both picks come from it.
        let grouped = Routing {
            groups: Some(GroupLimit {
                n_group: 3,
                topk_group: 1,
            }),
            ..plain
        };
        assert_eq!(ids(routed(&logits, grouped, None)), [0, 1]);
        let logits = [3.0, -5.0, 2.9, 2.8, 0.0, 0.0];
        // Max-scored groups: {0,1} wins on 3.0 alone, so expert 1 is
        // chosen over 2 and 3 although its score is the lowest.
        assert_eq!(ids(routed(&logits, grouped, None)), [0, 1]);
        let sigmoid = Routing {
            scoring: Scoring::Sigmoid,
            norm_topk_prob: true,
            scale: 2.0,
            ..grouped
        };
        // Best-two sums: {2, 3} beats {0, 1}.
        let chosen = routed(&logits, sigmoid, None);
        assert_eq!(ids(chosen.clone()), [2, 3]);
        let sum: f32 = chosen.iter().map(|c| c.1).sum();
        assert!((sum - 2.0).abs() < 1e-6, "renormalised, then scaled");

        // The bias changes the choice but not the weights.
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 9.0];
        let chosen = routed(
            &logits,
            Routing {
                norm_topk_prob: false,
                scale: 1.0,
                ..sigmoid
            },
            Some(&bias),
        );
        assert_eq!(chosen[0].0, 5);
        assert!((chosen[0].1 - 0.5).abs() < 1e-6, "sigmoid(0), unbiased");
    }
}
