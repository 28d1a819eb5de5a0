//! The registry of model families. A family is one file in this directory
//! that defines a [`Family`]: the `model_type`s it loads, the config keys
//! only it has, where its routed experts live in a checkpoint, and how one
//! decoder layer is built from its tensors. Adding a family is that file
//! plus one line in [`FAMILIES`]; nothing else in the tree matches on the
//! family or on tensor-name patterns.

use std::fmt;

use serde_json::{Map, Value};

use crate::config::{Keys, ModelConfig};
use crate::error::Result;
use crate::gguf::config::ArchKeys;

use super::decoder::LayerFn;
use super::{deepseek, mixtral, olmoe, qwen2_moe, qwen3_moe};

/// Every family this build runs, in the order `--help` and errors list them.
pub static FAMILIES: &[&Family] = &[
    &qwen3_moe::FAMILY,
    &qwen2_moe::FAMILY,
    &mixtral::FAMILY,
    &olmoe::FAMILY,
    &deepseek::V2,
    &deepseek::V3,
];

/// One family's definition.
pub struct Family {
    /// Its name in messages (`smoe inspect`, the chat banner).
    pub name: &'static str,
    /// The `model_type` values of config.json it loads; the first is the
    /// one a vault's manifest records.
    pub model_types: &'static [&'static str],
    /// Reads the config keys that only this family has (or spells its own
    /// way) into `cfg`, whose shared keys are already read.
    pub config: fn(keys: &Keys<'_>, cfg: &mut ModelConfig) -> Result<()>,
    /// Where routed experts live: `model.layers.L.{block}.experts.E.{proj}.weight`.
    pub experts: ExpertNames,
    /// What its attention adds to the plain grouped-query kind, for
    /// [`ModelConfig::describe`] ("" for nothing).
    pub attention_note: &'static str,
    /// How the shared expert's output is scaled, for `describe` ("" for not at all).
    pub shared_note: &'static str,
    /// Builds one decoder layer.
    pub layer: LayerFn,
    /// Its checkpoints may store layers past `num_hidden_layers`
    /// (DeepSeek-V3's multi-token prediction), which smoe does not run.
    pub extra_layers: bool,
    /// How llama.cpp's GGUF files spell it.
    pub gguf: Option<GgufArch>,
}

/// A family as llama.cpp stores it in a GGUF.
pub struct GgufArch {
    /// `general.architecture`. Families that share one (DeepSeek-V2 and V3)
    /// list it in both; the first in [`FAMILIES`] reads the metadata and
    /// names the `model_type`.
    pub arch: &'static str,
    /// Writes the config.json keys only this family has from the metadata,
    /// and the values llama.cpp hard-codes for the architecture instead of
    /// storing them. The shared keys are already in `out`.
    pub config: fn(keys: &ArchKeys<'_>, out: &mut Map<String, Value>) -> Result<()>,
    /// llama.cpp's converter permuted the q and k rows of each head for its
    /// interleaved RoPE (the `llama` architecture); loading undoes it.
    pub permute_qk: bool,
}

impl fmt::Debug for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

/// The family that loads `model_type`, if any.
pub fn lookup(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_types.contains(&model_type))
}

/// The family that reads GGUFs of `general.architecture` `arch`.
pub fn lookup_gguf(arch: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.gguf.as_ref().is_some_and(|g| g.arch == arch))
}

/// Every GGUF architecture this build runs.
pub fn gguf_archs() -> impl Iterator<Item = &'static str> {
    let mut seen: Vec<&'static str> = Vec::new();
    for f in FAMILIES {
        if let Some(g) = &f.gguf {
            if !seen.contains(&g.arch) {
                seen.push(g.arch);
            }
        }
    }
    seen.into_iter()
}

/// Every `model_type` this build loads.
pub fn model_types() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().flat_map(|f| f.model_types.iter().copied())
}

/// The checkpoint names of a family's routed experts.
#[derive(Debug, Clone, Copy)]
pub struct ExpertNames {
    /// The layer's sparse block: `mlp`, `block_sparse_moe`.
    pub block: &'static str,
    /// The gate, up and down projections.
    pub proj: [&'static str; 3],
}

impl ExpertNames {
    /// The common spelling: `mlp.experts.E.{gate,up,down}_proj`.
    pub const MLP: Self = Self {
        block: "mlp",
        proj: ["gate_proj", "up_proj", "down_proj"],
    };
}

impl Family {
    /// The checkpoint names of routed expert `expert` of `layer`: gate, up
    /// and down projections.
    pub fn expert_tensor_names(&self, layer: usize, expert: usize) -> [String; 3] {
        let ExpertNames { block, proj } = self.experts;
        proj.map(|p| format!("model.layers.{layer}.{block}.experts.{expert}.{p}.weight"))
    }

    /// Whether a checkpoint tensor belongs to a routed expert (what a vault
    /// streams) rather than the backbone. Shared experts are backbone.
    pub fn is_routed_expert(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix("model.layers.") else {
            return false;
        };
        let Some((layer, rest)) = rest.split_once('.') else {
            return false;
        };
        layer.bytes().all(|b| b.is_ascii_digit())
            && rest
                .strip_prefix(self.experts.block)
                .is_some_and(|r| r.starts_with(".experts."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_expert_names_round_trip_and_nothing_else_matches() {
        for f in FAMILIES {
            let names = f.expert_tensor_names(3, 7);
            assert!(names.iter().all(|n| f.is_routed_expert(n)), "{f:?}");
            for other in [
                "model.layers.3.mlp.shared_experts.gate_proj.weight",
                "model.layers.3.mlp.shared_expert.up_proj.weight",
                "model.layers.3.mlp.gate.weight",
                "model.embed_tokens.weight",
                "lm_head.weight",
            ] {
                assert!(!f.is_routed_expert(other), "{f:?}: {other}");
            }
        }
        let mixtral = lookup("mixtral").unwrap();
        assert!(mixtral.is_routed_expert("model.layers.0.block_sparse_moe.experts.1.w2.weight"));
        assert!(!mixtral.is_routed_expert("model.layers.0.mlp.experts.1.down_proj.weight"));
        assert_eq!(lookup("kimi_k2"), lookup("deepseek_v3"));
        assert!(lookup("llama").is_none());
    }
}
