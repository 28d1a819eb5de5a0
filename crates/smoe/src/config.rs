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
use crate::model::family::{self, Family};

/// How router logits become expert weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub scoring: Scoring,
    /// Experts are chosen only within the best `topk_group` of `n_group`
    /// equal groups (DeepSeek's group-limited routing).
    pub groups: Option<GroupLimit>,
    /// Renormalise the chosen weights to sum to one.
    pub norm_topk_prob: bool,
    /// Multiplies the final weights (`routed_scaling_factor`).
    pub scale: f32,
}

impl Routing {
    /// Softmax over all experts, the plain top-k.
    pub fn softmax(top_k: usize, norm_topk_prob: bool) -> Self {
        Self {
            top_k,
            scoring: Scoring::Softmax,
            groups: None,
            norm_topk_prob,
            scale: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts; the top-k probabilities are the weights.
    Softmax,
    /// Independent sigmoids; a per-expert correction bias steers the choice
    /// but not the weights (DeepSeek-V3's `noaux_tc`).
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    pub n_group: usize,
    pub topk_group: usize,
}

/// Multi-head latent attention (DeepSeek-V2/V3): keys and values are
/// expanded per head from one compressed latent per position, which is
/// all the cache keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mla {
    /// Queries go through a low-rank bottleneck when set.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// How positions are turned into rotary angles.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE with the configured theta.
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear { factor: f64 },
    /// YaRN: low frequencies interpolated by `factor`, high ones kept,
    /// a linear ramp between, and cos/sin scaled by an attention factor.
    Yarn(Yarn),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

impl Yarn {
    /// `0.1 * mscale * ln(scale) + 1` for `scale > 1`, as DeepSeek and
    /// transformers define it.
    pub fn get_mscale(scale: f64, mscale: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    }

    /// The factor cos and sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        match (self.attention_factor, self.mscale, self.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                Self::get_mscale(self.factor, m) / Self::get_mscale(self.factor, all)
            }
            _ => Self::get_mscale(self.factor, 1.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Everything family-specific: tensor names, layer structure, keys.
    pub family: &'static Family,
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
    pub routing: Routing,
    /// Width of the always-on shared expert(s) of a sparse layer, 0 for
    /// none (Qwen2-MoE's `shared_expert_intermediate_size`, DeepSeek's
    /// `n_shared_experts * moe_intermediate_size`).
    pub shared_expert_intermediate_size: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    /// The first this many layers are dense (DeepSeek).
    pub first_k_dense_replace: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (and DeepSeek's down-projections).
    pub attention_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// q, k and v are clamped to `[-clip, clip]` (OLMoE).
    pub clip_qkv: Option<f32>,
    /// Set for multi-head latent attention.
    pub mla: Option<Mla>,
    /// Rotary pairs are adjacent elements rather than the two halves.
    pub rope_interleave: bool,
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
        let family = family::lookup(&model_type).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "unsupported model_type \"{model_type}\"; supported: {}",
                    family::model_types().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;

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
        let (rope_theta, rope_scaling) = keys.rope()?;
        let top_k = keys.usize("num_experts_per_tok")?;
        let mut cfg = ModelConfig {
            family,
            vocab_size: keys.usize("vocab_size")?,
            hidden_size,
            intermediate_size: keys.usize("intermediate_size")?,
            moe_intermediate_size: 0,
            num_hidden_layers: keys.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_experts: 0,
            num_experts_per_tok: top_k,
            routing: Routing::softmax(top_k, false),
            shared_expert_intermediate_size: 0,
            decoder_sparse_step: keys.opt_usize("decoder_sparse_step")?.unwrap_or(1),
            mlp_only_layers: keys.usize_list("mlp_only_layers")?,
            first_k_dense_replace: keys.opt_usize("first_k_dense_replace")?.unwrap_or(0),
            rms_norm_eps: keys.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: keys.usize("max_position_embeddings")?,
            tie_word_embeddings: keys.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: false,
            o_bias: false,
            clip_qkv: None,
            mla: None,
            rope_interleave: false,
            sliding_window: None,
            dtype: keys.agreeing_string("torch_dtype", "dtype")?,
        };
        (family.config)(&keys, &mut cfg)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Whether layer `i` has a routed-expert block rather than a dense MLP,
    /// by the same rule as transformers' Qwen3MoeDecoderLayer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && i >= self.first_k_dense_replace
            && self.num_experts > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// What sets this model apart from its siblings, one line each: the
    /// attention variant, the routing rule, the shared and dense parts.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.push(match self.mla {
            Some(m) => format!(
                "attention: multi-head latent, {} heads, kv_lora_rank {}, q_lora_rank {}, nope/rope/v head dims {}/{}/{}; the cache holds the latent",
                self.num_attention_heads,
                m.kv_lora_rank,
                m.q_lora_rank.map_or("none".into(), |r| r.to_string()),
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim
            ),
            None => {
                let mut a = format!(
                    "attention: grouped-query, {} heads / {} kv heads x {}",
                    self.num_attention_heads, self.num_key_value_heads, self.head_dim
                );
                a += self.family.attention_note;
                if self.attention_bias {
                    a += ", q/k/v biases";
                }
                if let Some(c) = self.clip_qkv {
                    a += &format!(", clip_qkv {c}");
                }
                if let Some(w) = self.sliding_window {
                    a += &format!(", sliding window {w}");
                }
                a
            }
        });
        let r = &self.routing;
        let mut routing = format!(
            "routing: {} top-{} of {}",
            match r.scoring {
                Scoring::Softmax => "softmax",
                Scoring::Sigmoid => "sigmoid with correction bias",
            },
            r.top_k,
            self.num_experts
        );
        if let Some(g) = r.groups.filter(|g| g.n_group > 1) {
            routing += &format!(" within the best {} of {} groups", g.topk_group, g.n_group);
        }
        if r.norm_topk_prob {
            routing += ", renormalised";
        }
        if r.scale != 1.0 {
            routing += &format!(", scaled by {}", r.scale);
        }
        out.push(routing);
        let dense = (0..self.num_hidden_layers)
            .filter(|&i| !self.is_moe_layer(i))
            .count();
        let mut resident = format!("dense layers: {dense} of {}", self.num_hidden_layers);
        if self.shared_expert_intermediate_size > 0 {
            resident += &format!(
                "; shared expert {} wide{} in every sparse layer (resident)",
                self.shared_expert_intermediate_size, self.family.shared_note
            );
        }
        out.push(resident);
        out
    }

    /// Dimensions that RoPE rotates per head.
    pub fn rope_dim(&self) -> usize {
        self.mla.map_or(self.head_dim, |m| m.qk_rope_head_dim)
    }

    /// f32 values the KV cache holds per layer and position: keys and
    /// values of every KV head, or MLA's latent and shared rotary key.
    pub fn kv_floats_per_position(&self) -> usize {
        match self.mla {
            Some(m) => m.kv_lora_rank + m.qk_rope_head_dim,
            None => 2 * self.num_key_value_heads * self.head_dim,
        }
    }

    /// KV cache bytes for `ctx` positions.
    pub fn kv_bytes(&self, ctx: usize) -> u64 {
        (self.num_hidden_layers * ctx * self.kv_floats_per_position() * 4) as u64
    }

    /// Bytes of activations a forward pass over `tokens` tokens of
    /// `sequences` sequences holds at once. Its buffers are reused layer
    /// after layer, so this is one layer's largest, in f32: the residual
    /// stream and its norm, RoPE's tables, attention's queries, keys, values
    /// and outputs (MLA's latents and absorbed queries instead), the
    /// router's logits, the MoE's rows gathered by expert with their outputs
    /// and the experts' gate and up products, a dense or shared FFN's gate
    /// and up, a row of LM-head logits per sequence; the routing's
    /// bookkeeping, and the quantized copy a quantized product makes of its
    /// widest input (the gathered rows: a byte a value and block scales).
    /// What is left out does not grow with `tokens`: the kernels'
    /// per-thread buffers, a few KiB each (`tests/alloc.rs` measures both).
    pub fn activation_bytes(&self, tokens: usize, sequences: usize) -> u64 {
        let attention = match self.mla {
            Some(m) => {
                // Queries (later the values), absorbed queries, each
                // head's latent output and its absorbed copy; the shared
                // latent row, one head's latent and values.
                let (rank, row) = (m.kv_lora_rank, m.kv_lora_rank + m.qk_rope_head_dim);
                let q = (m.qk_nope_head_dim + m.qk_rope_head_dim).max(m.v_head_dim);
                self.num_attention_heads * (q + row + 2 * rank) + row + rank + m.v_head_dim
            }
            None => 2 * (self.num_attention_heads + self.num_key_value_heads) * self.head_dim,
        };
        let k = self.num_experts_per_tok;
        let widest = k * self.hidden_size.max(self.moe_intermediate_size);
        let moe = if self.num_experts > 0 {
            // Router logits; each (token, expert) pair's id and weight and
            // its place in expert order (16 bytes); gathered rows, outputs,
            // gate and up.
            self.num_experts + 4 * k + 2 * k * (self.hidden_size + self.moe_intermediate_size)
        } else {
            0
        };
        let dense = (0..self.num_hidden_layers).any(|i| !self.is_moe_layer(i));
        let ffn = 2 * if dense {
            self.intermediate_size
                .max(self.shared_expert_intermediate_size)
        } else {
            self.shared_expert_intermediate_size
        };
        // The call's cos and sin tables, and one sequence's before joining.
        let rope = 2 * self.rope_dim();
        let floats = 3 * self.hidden_size + rope + attention + moe + ffn;
        // q8 blocks: 32 values in 34 bytes, or 256 in 292 (q8_k).
        let quantized = widest + widest / 7;
        (tokens as u64)
            .saturating_mul((4 * floats + quantized) as u64)
            .saturating_add((4 * sequences * self.vocab_size) as u64)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        crate::validate::sizes(self, path)?;
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
        if !self.rope_dim().is_multiple_of(2) {
            return bad(format!(
                "the rotary head dimension ({}) must be even",
                self.rope_dim()
            ));
        }
        if let Some(m) = self.mla {
            for (name, v) in [
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_rope_head_dim", m.qk_rope_head_dim),
                ("v_head_dim", m.v_head_dim),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
            ] {
                if v == 0 {
                    return bad(format!("\"{name}\" must be positive"));
                }
            }
        }
        if let Some(g) = self.routing.groups {
            if g.n_group == 0
                || !self.num_experts.is_multiple_of(g.n_group)
                || g.topk_group == 0
                || g.topk_group > g.n_group
            {
                return bad(format!(
                    "n_group ({}) must divide the {} experts and topk_group ({}) must be between 1 and n_group",
                    g.n_group, self.num_experts, g.topk_group
                ));
            }
            let per_group = self.num_experts / g.n_group;
            if self.routing.scoring == Scoring::Sigmoid && per_group < 2 {
                return bad(format!(
                    "noaux_tc routing scores groups by their best two experts, but each of the {} groups has {per_group}",
                    g.n_group
                ));
            }
            if g.topk_group * per_group < self.num_experts_per_tok {
                return bad(format!(
                    "topk_group ({}) groups of {per_group} experts cannot hold num_experts_per_tok ({})",
                    g.topk_group, self.num_experts_per_tok
                ));
            }
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
        if self.clip_qkv.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return bad("\"clip_qkv\" must be positive".into());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!("rms_norm_eps ({}) must be >= 0", self.rms_norm_eps));
        }
        Ok(())
    }
}

/// Typed access to config keys with errors that name the file and key.
pub struct Keys<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    pub(crate) fn err(&self, msg: String) -> Error {
        Error::format(self.path, msg)
    }

    pub(crate) fn present(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn string(&self, key: &str) -> Result<String> {
        match self.present(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(format!("\"{key}\" must be a string, found {v}"))),
            None => Err(self.err(format!("missing key \"{key}\""))),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
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

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing key \"{key}\"")))
    }

    /// A size that a family adds or multiplies into another before the
    /// config's bounds ([`crate::validate::sizes`]) are checked: bounded
    /// here, so the arithmetic cannot overflow (found by fuzzing).
    pub(crate) fn opt_dim(&self, key: &str) -> Result<Option<usize>> {
        let max = crate::validate::MAX_DIM;
        match self.opt_usize(key)? {
            Some(v) if v > max => {
                Err(self.err(format!("\"{key}\" is {v}, expected at most {max}")))
            }
            v => Ok(v),
        }
    }

    pub(crate) fn dim(&self, key: &str) -> Result<usize> {
        self.opt_dim(key)?
            .ok_or_else(|| self.err(format!("missing key \"{key}\"")))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(format!("\"{key}\" must be a number, found {v}")))
            })
            .transpose()
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.present(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(format!("\"{key}\" must be true or false, found {v}")))
            })
            .transpose()
    }

    pub(crate) fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
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
    pub(crate) fn agreeing_usize(&self, hub: &str, v5: &str) -> Result<Option<usize>> {
        match (self.opt_usize(hub)?, self.opt_usize(v5)?) {
            (Some(a), Some(b)) if a != b => Err(self.err(format!(
                "contradictory keys: \"{hub}\" is {a} but \"{v5}\" is {b}"
            ))),
            (a, b) => Ok(a.or(b)),
        }
    }

    pub(crate) fn agreeing_string(&self, hub: &str, v5: &str) -> Result<Option<String>> {
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
    pub(crate) fn rope(&self) -> Result<(f64, RopeScaling)> {
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
                    "yarn" => {
                        let num = |k: &str| m.get(k).and_then(Value::as_f64);
                        let factor = num("factor").ok_or_else(|| {
                            self.err("yarn rope scaling needs a numeric \"factor\"".into())
                        })?;
                        if factor.is_nan() || factor <= 0.0 {
                            return Err(
                                self.err(format!("rope scaling factor {factor} must be positive"))
                            );
                        }
                        let original = m
                            .get("original_max_position_embeddings")
                            .and_then(Value::as_u64)
                            .ok_or_else(|| {
                                self.err("yarn rope scaling needs \"original_max_position_embeddings\"".into())
                            })?;
                        RopeScaling::Yarn(Yarn {
                            factor,
                            original_max_position_embeddings: original as usize,
                            beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                            beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                            mscale: num("mscale"),
                            mscale_all_dim: num("mscale_all_dim"),
                            attention_factor: num("attention_factor"),
                            truncate: m.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                        })
                    }
                    other => {
                        return Err(self.err(format!(
                            "unsupported rope scaling type \"{other}\" (supported: default, linear, yarn)"
                        )))
                    }
                }
            }
        };
        Ok((theta, scaling))
    }

    /// The routed experts' count, spelled `hub` on the hub and
    /// `num_local_experts` by transformers 5.
    pub(crate) fn num_experts(&self, hub: &str) -> Result<usize> {
        self.agreeing_usize(hub, "num_local_experts")?
            .ok_or_else(|| {
                self.err("missing key \"num_experts\" (or \"num_local_experts\")".into())
            })
    }

    /// An optional string key that, when present, must be `want`.
    pub(crate) fn expect(&self, key: &str, want: &str, model_type: &str) -> Result<()> {
        match self.present(key) {
            None => Ok(()),
            Some(Value::String(s)) if s == want => Ok(()),
            Some(v) => Err(self.err(format!(
                "\"{key}\" {v} is not supported for {model_type} (only \"{want}\")"
            ))),
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

    #[test]
    fn every_family_parses_with_its_own_keys() {
        let mixtral = parse(&json!({
            "model_type": "mixtral", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 128, "sliding_window": 16
        }))
        .unwrap();
        assert_eq!(mixtral.family.name, "Mixtral");
        assert_eq!(
            (mixtral.num_experts, mixtral.moe_intermediate_size),
            (4, 48)
        );
        assert_eq!((mixtral.head_dim, mixtral.sliding_window), (8, Some(16)));
        assert!(mixtral.routing.norm_topk_prob);

        let qwen2 = parse(&json!({
            "model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 128, "use_sliding_window": false, "sliding_window": 4096
        }))
        .unwrap();
        assert!(qwen2.attention_bias && !qwen2.o_bias && !qwen2.routing.norm_topk_prob);
        assert_eq!(
            (qwen2.shared_expert_intermediate_size, qwen2.sliding_window),
            (48, None)
        );

        let v3 = parse(&json!({
            "model_type": "deepseek_v3", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "moe_intermediate_size": 8, "num_hidden_layers": 3,
            "num_attention_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "n_shared_experts": 2, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 2.5, "kv_lora_rank": 16, "q_lora_rank": null,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "max_position_embeddings": 128, "topk_method": "noaux_tc",
            "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32,
                             "mscale": 1.0, "mscale_all_dim": 1.0}
        }))
        .unwrap();
        assert_eq!(v3.routing.scoring, Scoring::Sigmoid);
        assert_eq!(
            v3.routing.groups,
            Some(GroupLimit {
                n_group: 4,
                topk_group: 2
            })
        );
        assert!(v3.routing.norm_topk_prob && v3.routing.scale == 2.5);
        assert_eq!(v3.shared_expert_intermediate_size, 16);
        assert_eq!(
            (0..3).map(|i| v3.is_moe_layer(i)).collect::<Vec<_>>(),
            [false, true, true]
        );
        // The latent and the shared rotary key, not 2 * heads * head_dim.
        assert_eq!(v3.kv_floats_per_position(), 20);
        assert_eq!(v3.mla.unwrap().q_lora_rank, None);
        assert!(v3.rope_interleave);
        match &v3.rope_scaling {
            RopeScaling::Yarn(y) => {
                assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 32));
                assert_eq!(y.attention_factor(), 1.0, "equal mscales cancel");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn family_specific_mistakes_are_named() {
        let v2 = json!({
            "model_type": "deepseek_v2", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "moe_intermediate_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "max_position_embeddings": 128, "topk_method": "group_limited_greedy",
            "n_group": 3, "topk_group": 1
        });
        let e = parse(&v2).unwrap_err().to_string();
        assert!(e.contains("n_group (3) must divide the 8 experts"), "{e}");

        let mut v = v2.clone();
        v["topk_method"] = json!("noaux_tc");
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("topk_method \"noaux_tc\" is not supported for deepseek_v2"),
            "{e}"
        );

        // Summed and multiplied before the size bounds (config_safetensors
        // fuzz target): refused by name instead of overflowing.
        for key in ["qk_nope_head_dim", "n_shared_experts"] {
            let mut v = v2.clone();
            v[key] = json!(u64::MAX);
            let e = parse(&v).unwrap_err().to_string();
            assert!(
                e.contains(&format!("\"{key}\" is {}, expected at most", u64::MAX)),
                "{e}"
            );
        }

        let mut v = v2.clone();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("missing key \"kv_lora_rank\""), "{e}");

        let mut v = v2;
        v["model_type"] = json!("deepseek_v3");
        v["scoring_func"] = json!("softmax");
        v["topk_method"] = json!("noaux_tc");
        v["n_group"] = json!(4);
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("\"scoring_func\" \"softmax\" is not supported for deepseek_v3"),
            "{e}"
        );

        let mut v = base();
        v["model_type"] = json!("gpt_oss");
        let e = parse(&v).unwrap_err().to_string();
        for t in family::model_types() {
            assert!(e.contains(t), "{e}");
        }
    }

    #[test]
    fn kimi_k2_is_deepseek_v3() {
        let mut v = base();
        let m = v.as_object_mut().unwrap();
        m.remove("num_experts");
        for (k, val) in [
            ("model_type", json!("kimi_k2")),
            ("n_routed_experts", json!(8)),
            ("kv_lora_rank", json!(16)),
            ("q_lora_rank", json!(12)),
            ("qk_nope_head_dim", json!(8)),
            ("qk_rope_head_dim", json!(4)),
            ("v_head_dim", json!(8)),
            ("n_group", json!(1)),
            ("topk_group", json!(1)),
            ("routed_scaling_factor", json!(2.827)),
        ] {
            m.insert(k.into(), val);
        }
        let c = parse(&v).unwrap();
        assert_eq!(c.family.name, "DeepseekV3");
        assert_eq!(c.routing.scoring, Scoring::Sigmoid);
    }

    #[test]
    fn unsupported_types_list_the_supported() {
        let mut v = base();
        v["model_type"] = json!("gpt_oss");
        let e = parse(&v).unwrap_err().to_string();
        for t in family::model_types() {
            assert!(e.contains(t), "{e}");
        }
    }
}
