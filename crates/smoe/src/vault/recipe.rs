//! Which type each backbone tensor is stored as, given the `--backbone`
//! type asked for: the one place that departs from a uniform backbone.
//!
//! The backbone is read whole for every decoded token, so its type sets the
//! decode speed once the experts are cached, but not all of it is equal:
//! - Norms and biases (1-D) stay f32: tiny, and applied to every value.
//! - MoE routers (`mlp.gate`, `block_sparse_moe.gate`, Qwen2-MoE's
//!   `shared_expert_gate`) are never stored below bf16: a few hundred KB per
//!   layer, and an error there changes which experts run, not just how
//!   precisely; llama.cpp keeps them (`ffn_gate_inp`) in f32 in every type.
//! - Under a backbone type narrower than q6_k, the LM head (the embedding
//!   table when the two are tied) and the attention value projections get
//!   q6_k, as llama.cpp's Q4_K_M does: the LM head's error goes straight
//!   into the logits, and `v_proj` is the projection whose error survives
//!   attention's averaging; both are small beside the rest of a wide model.
//!
//! Row widths that do not split into the chosen type's blocks still fall
//! back per [`QuantType::for_row`] when the tensor is encoded.

use crate::quant::DType;
use crate::quant::QuantType;

/// What a backbone tensor does, as far as its storage type is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// 1-D: norms, biases, DeepSeek's routing score bias.
    Vector,
    Router,
    /// The LM head, or the embedding table that doubles as it.
    LmHead,
    ValueProj,
    /// Everything else: attention, embeddings, dense and shared MLPs.
    Other,
}

impl Role {
    /// The role of tensor `name` of `shape` in a checkpoint that has its own
    /// `lm_head.weight` (`tied` false) or reuses the embeddings (`tied`).
    pub fn of(name: &str, shape: &[usize], tied: bool) -> Role {
        const ROUTERS: [&str; 3] = [
            ".mlp.gate.weight",
            ".block_sparse_moe.gate.weight",
            ".mlp.shared_expert_gate.weight",
        ];
        if shape.len() == 1 {
            Role::Vector
        } else if ROUTERS.iter().any(|s| name.ends_with(s)) {
            Role::Router
        } else if name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight") {
            Role::LmHead
        } else if name.ends_with(".self_attn.v_proj.weight") {
            Role::ValueProj
        } else {
            Role::Other
        }
    }

    /// How [`Manifest::stored_quant`](super::Manifest::stored_quant) names
    /// the role's tensors, for the roles that may differ from the rest.
    pub fn label(self) -> Option<&'static str> {
        match self {
            Role::LmHead => Some("lm_head"),
            Role::ValueProj => Some("v_proj"),
            Role::Router => Some("routers"),
            Role::Vector | Role::Other => None,
        }
    }

    /// The type to store this role in when the backbone asked for `asked`
    /// (before any per-row fallback).
    pub fn target(self, asked: DType) -> DType {
        let narrow = matches!(asked, DType::Quant(q)
            if q.bits_per_weight() < QuantType::Q6K.bits_per_weight());
        match (self, asked) {
            (Role::Vector, _) => DType::F32,
            (Role::Router, DType::Quant(_)) => DType::BF16,
            (Role::LmHead | Role::ValueProj, _) if narrow => DType::Quant(QuantType::Q6K),
            _ => asked,
        }
    }
}

/// The type a tensor with rows of `cols` is stored as when `target` was
/// chosen for it: a quantized target whose blocks do not split the row falls
/// back per [`QuantType::for_row`], and to bf16 where none does.
pub fn row_type(target: DType, cols: usize) -> DType {
    match target {
        DType::Quant(q) => q.for_row(cols).map(DType::Quant).unwrap_or(DType::BF16),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_stay_wide_and_a_4bit_backbone_keeps_q6k_head_and_values() {
        let q = |t| DType::Quant(t);
        let (q4k, q6k, q8) = (q(QuantType::Q4K), q(QuantType::Q6K), q(QuantType::Q8_0));
        let role = |n: &str| Role::of(n, &[8, 8], false);
        for router in [
            "model.layers.0.mlp.gate.weight",
            "model.layers.3.block_sparse_moe.gate.weight",
            "model.layers.1.mlp.shared_expert_gate.weight",
        ] {
            assert_eq!(role(router), Role::Router, "{router}");
            for asked in [q4k, q8, q(QuantType::Q4_0)] {
                assert_eq!(Role::Router.target(asked), DType::BF16);
            }
        }
        assert_eq!(role("model.layers.0.mlp.gate_proj.weight"), Role::Other);
        assert_eq!(
            role("model.layers.0.mlp.shared_expert.gate_proj.weight"),
            Role::Other
        );
        assert_eq!(role("lm_head.weight"), Role::LmHead);
        assert_eq!(role("model.embed_tokens.weight"), Role::Other);
        let tied = Role::of("model.embed_tokens.weight", &[8, 8], true);
        assert_eq!(tied, Role::LmHead);
        assert_eq!(
            role("model.layers.2.self_attn.v_proj.weight"),
            Role::ValueProj
        );
        let bias = "model.layers.0.mlp.gate.e_score_correction_bias";
        assert_eq!(Role::of(bias, &[8], false), Role::Vector);

        for r in [Role::LmHead, Role::ValueProj] {
            assert_eq!(r.target(q4k), q6k);
            assert_eq!(r.target(q(QuantType::Q5K)), q6k);
            assert_eq!(r.target(q8), q8);
            assert_eq!(r.target(DType::BF16), DType::BF16);
        }
        assert_eq!(Role::Other.target(q4k), q4k);
        assert_eq!(Role::Router.target(DType::BF16), DType::BF16);
        assert_eq!(Role::Vector.target(q4k), DType::F32);
    }
}
