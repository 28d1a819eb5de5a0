//! A GGUF's metadata as the engine's model config.
//!
//! The metadata is turned into the config.json that the Hugging Face
//! checkpoint would have had, and that goes through the same parser
//! ([`ModelConfig::from_json`]) as every checkpoint, so validation is
//! shared. The keys every architecture stores the same way are read here;
//! each family's own (and the values llama.cpp hard-codes instead of
//! storing) come from its [`GgufArch::config`](crate::model::family::GgufArch).

use serde_json::{json, Map, Value};

use super::Gguf;
use crate::config::ModelConfig;
use crate::model::family::{self, Family};
use crate::{Error, Result};

/// The `{arch}.*` keys of a GGUF, read for one architecture.
pub struct ArchKeys<'a> {
    pub g: &'a Gguf,
    pub arch: &'a str,
}

impl ArchKeys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    pub fn usize(&self, k: &str) -> Result<usize> {
        self.g.usize(&self.key(k))
    }

    pub fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        self.g.opt_usize(&self.key(k))
    }

    pub fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        self.g.opt_f64(&self.key(k))
    }

    pub fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        self.g.opt_bool(&self.key(k))
    }

    pub fn opt_str(&self, k: &str) -> Result<Option<&str>> {
        self.g.opt_str(&self.key(k))
    }

    /// An error naming the file and the key.
    pub fn err(&self, k: &str, msg: impl std::fmt::Display) -> Error {
        Error::format(self.g.path(), format!("{}: {msg}", self.key(k)))
    }

    /// Whether the file holds the tensor.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.g.tensor(name).is_some()
    }
}

/// The family whose models have `general.architecture` `arch`.
pub fn family_of(g: &Gguf) -> Result<&'static Family> {
    let arch = g.architecture()?;
    family::lookup_gguf(arch).ok_or_else(|| {
        Error::format(
            g.path(),
            format!(
                "general.architecture is \"{arch}\", which smoe does not run (it runs {})",
                family::gguf_archs().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// The config.json of the checkpoint the GGUF was made from, as far as the
/// engine needs it.
pub fn config_json(g: &Gguf) -> Result<Value> {
    let family = family_of(g)?;
    let arch = g.architecture()?;
    let k = ArchKeys { g, arch };
    let (_, embd) = g.require(super::check::TOKEN_EMBD)?;
    let vocab = match embd.dims[..] {
        [_, rows] => rows,
        _ => {
            return Err(Error::format(
                g.path(),
                format!(
                    "tensor {} has dims {:?}, expected 2",
                    super::check::TOKEN_EMBD,
                    embd.dims
                ),
            ))
        }
    };
    let layers = match g.block_count()? {
        Some(n) => n,
        None => k.usize("block_count")?,
    };
    let heads = k.usize("attention.head_count")?;
    let mut c = Map::new();
    c.insert("model_type".into(), json!(family.model_types[0]));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("hidden_size".into(), json!(k.usize("embedding_length")?));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert(
        "num_key_value_heads".into(),
        json!(k.opt_usize("attention.head_count_kv")?.unwrap_or(heads)),
    );
    if let Some(d) = k.opt_usize("attention.key_length")? {
        c.insert("head_dim".into(), json!(d));
    }
    let expert_ff = k.opt_usize("expert_feed_forward_length")?;
    let ff = match (k.opt_usize("feed_forward_length")?, expert_ff) {
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => k.usize("feed_forward_length")?,
    };
    c.insert("intermediate_size".into(), json!(ff));
    if let Some(f) = expert_ff {
        c.insert("moe_intermediate_size".into(), json!(f));
    }
    c.insert(
        "max_position_embeddings".into(),
        json!(k.usize("context_length")?),
    );
    c.insert(
        "rope_theta".into(),
        json!(k.opt_f64("rope.freq_base")?.unwrap_or(10_000.0)),
    );
    if let Some(eps) = k.opt_f64("attention.layer_norm_rms_epsilon")? {
        c.insert("rms_norm_eps".into(), json!(eps));
    }
    c.insert(
        "num_experts_per_tok".into(),
        json!(k.usize("expert_used_count")?),
    );
    c.insert("num_experts".into(), json!(k.usize("expert_count")?));
    // llama.cpp ties the head to the embedding table when it finds no
    // `output.weight`; no key says so.
    c.insert(
        "tie_word_embeddings".into(),
        json!(!k.has_tensor("output.weight")),
    );
    // Layers without a router are dense, however the family numbers them.
    let dense: Vec<usize> = (0..layers)
        .filter(|l| !k.has_tensor(&format!("blk.{l}.ffn_gate_inp.weight")))
        .collect();
    c.insert("mlp_only_layers".into(), json!(dense));
    if let Some(w) = k.opt_usize("attention.sliding_window")? {
        c.insert("sliding_window".into(), json!(w));
    }
    let gguf = family.gguf.as_ref().ok_or_else(|| {
        Error::invalid(format!("{}: the family has no GGUF spelling", family.name))
    })?;
    (gguf.config)(&k, &mut c)?;
    Ok(Value::Object(c))
}

/// The engine's config for a GGUF: [`config_json`] through the checkpoint
/// parser.
pub fn model_config(g: &Gguf) -> Result<ModelConfig> {
    ModelConfig::from_json(&config_json(g)?, g.path())
}
