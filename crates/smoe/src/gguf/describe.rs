//! What `smoe inspect` says about a GGUF before any weight is loaded: the
//! files, the architecture, bytes per tensor type, the routed experts'
//! extents, and the tokenizer.

use std::collections::BTreeMap;

use super::{GgmlType, Gguf};
use crate::model::human_bytes;
use crate::Result;

/// The suffixes of the three routed-expert tensors of a layer, in the
/// order an expert is read.
pub const EXPERT_TENSORS: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

impl Gguf {
    /// Lines describing the file for `smoe inspect`.
    pub fn describe(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let first = &self.shards()[0];
        out.push(format!(
            "GGUF v{} | {} file{} | {} | alignment {} | {} metadata keys | {} tensors",
            first.version(),
            self.shards().len(),
            if self.shards().len() == 1 { "" } else { "s" },
            human_bytes(self.file_bytes()),
            first.alignment(),
            self.metadata().len(),
            self.tensors().count()
        ));
        for (i, s) in self.shards().iter().enumerate().skip(1) {
            out.push(format!(
                "  shard {}: {} ({} tensors)",
                i + 1,
                s.path().display(),
                s.tensors().len()
            ));
        }
        let arch = self.architecture()?;
        let name = self.opt_str("general.name")?.unwrap_or("(unnamed)");
        out.push(format!("architecture: {arch} | name: {name}"));

        let mut by_type: BTreeMap<GgmlType, (usize, u64)> = BTreeMap::new();
        for (_, t) in self.tensors() {
            let e = by_type.entry(t.ggml_type).or_default();
            e.0 += 1;
            e.1 += t.bytes;
        }
        let types: Vec<String> = by_type
            .iter()
            .map(|(t, (n, b))| format!("{t} {n} ({})", human_bytes(*b)))
            .collect();
        out.push(format!("tensors by type: {}", types.join(", ")));

        let blocks = self.block_count()?.unwrap_or(0);
        let mut layers = 0usize;
        let mut expert_bytes = 0u64;
        let mut first_layer: Option<(u64, u64, Vec<String>)> = None;
        for block in 0..blocks {
            let names = EXPERT_TENSORS.map(|s| format!("blk.{block}.{s}.weight"));
            if names.iter().any(|n| self.tensor(n).is_none()) {
                continue;
            }
            layers += 1;
            let (mut one, mut parts) = (0, Vec::new());
            let mut experts = 0;
            for (n, short) in names.iter().zip(EXPERT_TENSORS) {
                let (_, t) = self.require(n)?;
                let x = self.expert_extent(n, 0)?;
                experts = t.dims[2];
                expert_bytes += t.bytes;
                one += x.len;
                parts.push(format!("{short} {} {}", t.ggml_type, human_bytes(x.len)));
            }
            first_layer.get_or_insert((experts, one, parts));
        }
        match first_layer {
            Some((experts, one, parts)) => out.push(format!(
                "routed experts: {layers} of {blocks} layers x {experts} | one expert: 3 extents ({}) = {} | all experts {}",
                parts.join(", "),
                human_bytes(one),
                human_bytes(expert_bytes)
            )),
            None => out.push("routed experts: none (no blk.N.ffn_*_exps tensors)".into()),
        }
        let unsupported: Vec<String> = by_type
            .iter()
            .filter(|(t, _)| {
                t.quant_type().is_none()
                    && !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
            })
            .map(|(t, (n, _))| format!("{t} ({n} tensors)"))
            .collect();
        if !unsupported.is_empty() {
            out.push(format!(
                "types smoe's kernels do not multiply yet: {}",
                unsupported.join(", ")
            ));
        }
        let model = self.opt_str("tokenizer.ggml.model")?.unwrap_or("(none)");
        let pre = self.opt_str("tokenizer.ggml.pre")?.unwrap_or("-");
        let vocab = self
            .opt_array("tokenizer.ggml.tokens")?
            .map_or(0, |a| a.len());
        let mut template = self
            .opt_str("tokenizer.chat_template")?
            .map_or("none".to_string(), |t| human_bytes(t.len() as u64));
        for (key, _) in self.metadata().iter() {
            if let Some(name) = key.strip_prefix("tokenizer.chat_template.") {
                template += &format!(" + {name}");
            }
        }
        out.push(format!(
            "tokenizer: {model} (pre {pre}) | {vocab} tokens | chat template: {template}"
        ));
        Ok(out)
    }
}
