//! Model configuration as found in a checkpoint's `config.json` and
//! `generation_config.json`.
//!
//! Two spellings of the same facts exist in the wild: the one on the hub
//! (`num_experts`, top-level `rope_theta`/`rope_scaling`, `torch_dtype`) and
//! the one transformers 5 writes (`num_local_experts`,
//! `rope_parameters.rope_theta`, `dtype`). Both are accepted; when a file
//! carries both spellings they must agree, because silently preferring one
//! would run a different model than the author meant.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{read_json, Error, Result};

/// Architectures this build can run, by `model_type`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["qwen3_moe"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen3Moe,
}

/// How positions are turned into rotary angles.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE with the configured theta.
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear { factor: f64 },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Keys older than this many positions are masked out, when set.
    pub sliding_window: Option<usize>,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`).
    pub dtype: Option<String>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let value = read_json(&path)?;
        Self::from_json(&value, &path)
    }

    /// Parses a config already read from `path` (used in errors only).
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        let keys = Keys { obj, path };

        let model_type = keys.string("model_type")?;
        let architecture = match model_type.as_str() {
            "qwen3_moe" => Architecture::Qwen3Moe,
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "unsupported model_type \"{other}\"; supported: {}",
                        SUPPORTED_MODEL_TYPES.join(", ")
                    ),
                ))
            }
        };

        let hidden_size = keys.usize("hidden_size")?;
        let num_attention_heads = keys.usize("num_attention_heads")?;
        let num_key_value_heads = keys
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match keys.opt_usize("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let num_experts = keys.agreeing_usize("num_experts", "num_local_experts")?;
        let (rope_theta, rope_scaling) = keys.rope()?;
        let dtype = keys.agreeing_string("torch_dtype", "dtype")?;

        let cfg = ModelConfig {
            architecture,
            vocab_size: keys.usize("vocab_size")?,
            hidden_size,
            intermediate_size: keys.usize("intermediate_size")?,
            moe_intermediate_size: keys.usize("moe_intermediate_size")?,
            num_hidden_layers: keys.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_experts: num_experts.ok_or_else(|| {
                Error::format(
                    path,
                    "missing key \"num_experts\" (or \"num_local_experts\")",
                )
            })?,
            num_experts_per_tok: keys.usize("num_experts_per_tok")?,
            norm_topk_prob: keys.opt_bool("norm_topk_prob")?.unwrap_or(false),
            decoder_sparse_step: keys.opt_usize("decoder_sparse_step")?.unwrap_or(1),
            mlp_only_layers: keys.usize_list("mlp_only_layers")?,
            rms_norm_eps: keys.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: keys.usize("max_position_embeddings")?,
            tie_word_embeddings: keys.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: keys.opt_bool("attention_bias")?.unwrap_or(false),
            sliding_window: keys.sliding_window()?,
            dtype,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Whether layer `i` has a routed-expert block rather than a dense MLP,
    /// by the same rule as transformers' Qwen3MoeDecoderLayer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::format(path, msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("decoder_sparse_step", self.decoder_sparse_step),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("\"{name}\" must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        let any_moe = (0..self.num_hidden_layers).any(|i| self.is_moe_layer(i));
        if any_moe {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return bad(format!(
                    "num_experts_per_tok ({}) must be between 1 and num_experts ({})",
                    self.num_experts_per_tok, self.num_experts
                ));
            }
            if self.moe_intermediate_size == 0 {
                return bad("\"moe_intermediate_size\" must be positive".into());
            }
        }
        if self.intermediate_size == 0 && (0..self.num_hidden_layers).any(|i| !self.is_moe_layer(i))
        {
            return bad("\"intermediate_size\" must be positive".into());
        }
        if let Some(&l) = self
            .mlp_only_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return bad(format!(
                "mlp_only_layers names layer {l} but the model has {} layers",
                self.num_hidden_layers
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!("rms_norm_eps ({}) must be >= 0", self.rms_norm_eps));
        }
        Ok(())
    }
}

/// Typed access to config keys with errors that name the file and key.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    fn err(&self, msg: String) -> Error {
        Error::format(self.path, msg)
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.present(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(format!("\"{key}\" must be a string, found {v}"))),
            None => Err(self.err(format!("missing key \"{key}\""))),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.present(key)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    self.err(format!(
                        "\"{key}\" must be a non-negative integer, found {v}"
                    ))
                })
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing key \"{key}\"")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(format!("\"{key}\" must be a number, found {v}")))
            })
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.present(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(format!("\"{key}\" must be true or false, found {v}")))
            })
            .transpose()
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        self.err(format!("\"{key}\" must hold layer indices, found {v}"))
                    })
                })
                .collect(),
            Some(v) => Err(self.err(format!("\"{key}\" must be a list, found {v}"))),
        }
    }

    /// A value spelled two ways; both present and different is an error.
    fn agreeing_usize(&self, hub: &str, v5: &str) -> Result<Option<usize>> {
        match (self.opt_usize(hub)?, self.opt_usize(v5)?) {
            (Some(a), Some(b)) if a != b => Err(self.err(format!(
                "contradictory keys: \"{hub}\" is {a} but \"{v5}\" is {b}"
            ))),
            (a, b) => Ok(a.or(b)),
        }
    }

    fn agreeing_string(&self, hub: &str, v5: &str) -> Result<Option<String>> {
        let get = |k: &str| -> Result<Option<String>> {
            match self.present(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(self.err(format!("\"{k}\" must be a string, found {v}"))),
            }
        };
        match (get(hub)?, get(v5)?) {
            (Some(a), Some(b)) if a != b => Err(self.err(format!(
                "contradictory keys: \"{hub}\" is \"{a}\" but \"{v5}\" is \"{b}\""
            ))),
            (a, b) => Ok(a.or(b)),
        }
    }

    /// Theta and scaling from either the top level (hub) or
    /// `rope_parameters` (transformers 5).
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let params = match self.present("rope_parameters") {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => {
                return Err(self.err(format!("\"rope_parameters\" must be an object, found {v}")))
            }
        };
        let nested_theta = params
            .and_then(|m| m.get("rope_theta"))
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    self.err(format!(
                        "\"rope_parameters.rope_theta\" must be a number, found {v}"
                    ))
                })
            })
            .transpose()?;
        let theta = match (self.opt_f64("rope_theta")?, nested_theta) {
            (Some(a), Some(b)) if a != b => {
                return Err(self.err(format!(
                    "contradictory keys: \"rope_theta\" is {a} but \"rope_parameters.rope_theta\" is {b}"
                )))
            }
            (a, b) => a.or(b).unwrap_or(10_000.0),
        };
        let scaling_obj = match (self.present("rope_scaling"), params) {
            (Some(Value::Object(m)), _) => Some(m),
            (Some(v), _) => {
                return Err(self.err(format!(
                    "\"rope_scaling\" must be an object or null, found {v}"
                )))
            }
            (None, p) => p,
        };
        let scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(m) => {
                let kind = m
                    .get("rope_type")
                    .or_else(|| m.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => {
                        let factor = m.get("factor").and_then(Value::as_f64).ok_or_else(|| {
                            self.err("linear rope scaling needs a numeric \"factor\"".into())
                        })?;
                        if factor.is_nan() || factor <= 0.0 {
                            return Err(
                                self.err(format!("rope scaling factor {factor} must be positive"))
                            );
                        }
                        RopeScaling::Linear { factor }
                    }
                    other => {
                        return Err(self.err(format!(
                            "unsupported rope scaling type \"{other}\" (supported: default, linear)"
                        )))
                    }
                }
            }
        };
        Ok((theta, scaling))
    }

    /// Qwen3 configs carry `sliding_window` even when it is off; only
    /// `use_sliding_window: true` turns it on.
    fn sliding_window(&self) -> Result<Option<usize>> {
        if self.opt_bool("use_sliding_window")?.unwrap_or(false) {
            let w = self.usize("sliding_window")?;
            if w == 0 {
                return Err(self.err("\"sliding_window\" must be positive".into()));
            }
            Ok(Some(w))
        } else {
            Ok(None)
        }
    }
}

/// What `generation_config.json` says about stopping. The file is optional.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let value = read_json(&path)?;
        let ids = match value.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_token_id(v, &path))
                .collect::<Result<_>>()?,
            Some(v) => vec![as_token_id(v, &path)?],
        };
        Ok(Self { eos_token_ids: ids })
    }
}

fn as_token_id(v: &Value, path: &Path) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            Error::format(
                path,
                format!("\"eos_token_id\" must hold token ids, found {v}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "qwen3_moe",
            "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "moe_intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "num_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 128, "rope_theta": 10000.0,
            "torch_dtype": "bfloat16"
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::from_json(v, Path::new("config.json"))
    }

    #[test]
    fn hub_and_v5_spellings_agree() {
        let hub = parse(&base()).unwrap();
        let mut v5 = base();
        let m = v5.as_object_mut().unwrap();
        m.remove("num_experts");
        m.remove("rope_theta");
        m.remove("torch_dtype");
        m.insert("num_local_experts".into(), json!(4));
        m.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 10000.0}),
        );
        m.insert("dtype".into(), json!("bfloat16"));
        let v5 = parse(&v5).unwrap();
        assert_eq!(hub.num_experts, v5.num_experts);
        assert_eq!(hub.rope_theta, v5.rope_theta);
        assert_eq!(hub.dtype, v5.dtype);
        assert_eq!(v5.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn contradictions_and_missing_keys_are_named() {
        let mut v = base();
        v["num_local_experts"] = json!(8);
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("num_local_experts"),
            "{e}"
        );

        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("missing key \"hidden_size\""), "{e}");

        let mut v = base();
        v["model_type"] = json!("llama");
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("unsupported model_type \"llama\"") && e.contains("qwen3_moe"),
            "{e}"
        );

        let mut v = base();
        v["num_experts_per_tok"] = json!(5);
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("num_experts_per_tok"));

        let mut v = base();
        v["hidden_size"] = json!("big");
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("non-negative integer"));
    }

    #[test]
    fn sparse_layer_rule() {
        let mut v = base();
        v["num_hidden_layers"] = json!(4);
        v["mlp_only_layers"] = json!([0]);
        v["decoder_sparse_step"] = json!(1);
        let c = parse(&v).unwrap();
        assert_eq!(
            (0..4).map(|i| c.is_moe_layer(i)).collect::<Vec<_>>(),
            [false, true, true, true]
        );
        v["mlp_only_layers"] = json!([]);
        v["decoder_sparse_step"] = json!(2);
        let c = parse(&v).unwrap();
        assert_eq!(
            (0..4).map(|i| c.is_moe_layer(i)).collect::<Vec<_>>(),
            [false, true, false, true]
        );
    }
}
