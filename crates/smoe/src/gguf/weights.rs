//! A GGUF's tensors under the checkpoint names the model code asks for.
//!
//! llama.cpp renames every tensor (`model.layers.3.self_attn.q_proj.weight`
//! is `blk.3.attn_q.weight`), stores each layer's routed experts as one 3-D
//! tensor per projection, and reverses the dimension order. [`gguf_name`]
//! translates a name, with the family's expert spelling from the registry;
//! [`GgufWeights`] hands out the stored bytes in their stored type, undoing
//! the two rearrangements llama.cpp's converter makes: the `llama`
//! architecture's q/k row permutation and DeepSeek's split of `kv_b_proj`
//! into `attn_k_b` and `attn_v_b`.

use super::{engine_dtype, Extent, Gguf};
use crate::checkpoint::{TensorSource, Weight, EMBED};
use crate::config::{Mla, ModelConfig};
use crate::model::family::{ExpertNames, Family};
use crate::quant::DType;
use crate::vault::{align_up, ALIGN};
use crate::{Error, Result};

/// Where a checkpoint tensor is in a GGUF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    Tensor(String),
    /// Expert `.1`'s slice of a 3-D `*_exps` tensor.
    Expert(String, usize),
}

/// Checkpoint name (after `model.layers.L.`, before `.weight`) and
/// llama.cpp's (after `blk.L.`), for every family's non-expert tensors.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("self_attn.q_a_proj", "attn_q_a"),
    ("self_attn.q_a_layernorm", "attn_q_a_norm"),
    ("self_attn.q_b_proj", "attn_q_b"),
    ("self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"),
    ("self_attn.kv_a_layernorm", "attn_kv_a_norm"),
    ("self_attn.kv_b_proj", "attn_kv_b"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"),
    ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
    ("mlp.shared_expert.down_proj", "ffn_down_shexp"),
    ("mlp.shared_experts.gate_proj", "ffn_gate_shexp"),
    ("mlp.shared_experts.up_proj", "ffn_up_shexp"),
    ("mlp.shared_experts.down_proj", "ffn_down_shexp"),
    ("mlp.shared_expert_gate", "ffn_gate_inp_shexp"),
];

/// Whole-model tensors.
const MODEL_NAMES: &[(&str, &str)] = &[
    (EMBED, "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// llama.cpp's experts tensors, in the order gate, up, down.
pub const EXPERT_PARTS: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

/// llama.cpp's name for checkpoint tensor `name` of a `family` model.
pub fn gguf_name(family: &Family, name: &str) -> Option<Mapped> {
    if let Some(&(_, g)) = MODEL_NAMES.iter().find(|(hf, _)| *hf == name) {
        return Some(Mapped::Tensor(g.to_string()));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (stem, suffix) = rest.rsplit_once('.')?;
    let ExpertNames { block, proj } = family.experts;
    if let Some(r) = stem
        .strip_prefix(block)
        .and_then(|r| r.strip_prefix(".experts."))
    {
        let (expert, p) = r.split_once('.')?;
        let part = proj.iter().position(|x| *x == p)?;
        return Some(Mapped::Expert(
            format!("blk.{layer}.{}.{suffix}", EXPERT_PARTS[part]),
            expert.parse().ok()?,
        ));
    }
    if stem.strip_prefix(block) == Some(".gate") {
        return match suffix {
            "weight" => Some(Mapped::Tensor(format!("blk.{layer}.ffn_gate_inp.weight"))),
            "e_score_correction_bias" => {
                Some(Mapped::Tensor(format!("blk.{layer}.exp_probs_b.bias")))
            }
            _ => None,
        };
    }
    let &(_, g) = LAYER_NAMES.iter().find(|(hf, _)| *hf == stem)?;
    Some(Mapped::Tensor(format!("blk.{layer}.{g}.{suffix}")))
}

/// The checkpoint name of a non-expert GGUF tensor (the first spelling
/// where families differ; the model code asks by its own).
pub fn checkpoint_name(family: &Family, gguf: &str) -> Option<String> {
    if let Some(&(hf, _)) = MODEL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    let block = family.experts.block;
    let hf = match (stem, suffix) {
        ("ffn_gate_inp", "weight") => format!("{block}.gate.weight"),
        ("exp_probs_b", "bias") => format!("{block}.gate.e_score_correction_bias"),
        _ => {
            let &(hf, _) = LAYER_NAMES.iter().find(|(_, g)| *g == stem)?;
            format!("{hf}.{suffix}")
        }
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// A GGUF's tensors as a [`TensorSource`] for the decoder.
pub struct GgufWeights<'a> {
    g: &'a Gguf,
    family: &'static Family,
    heads: usize,
    kv_heads: usize,
    mla: Option<Mla>,
}

impl<'a> GgufWeights<'a> {
    pub fn new(g: &'a Gguf, cfg: &ModelConfig) -> Self {
        Self {
            g,
            family: cfg.family,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            mla: cfg.mla,
        }
    }

    fn err(&self, msg: String) -> Error {
        Error::format(self.g.path(), msg)
    }

    /// Where tensor `gguf` (for `name`) is and its stored type, checked to
    /// hold `shape` in the checkpoint's order; an expert's slice when
    /// `expert` is set.
    fn locate(
        &self,
        name: &str,
        gguf: &str,
        expert: Option<usize>,
        shape: &[usize],
    ) -> Result<(DType, Extent)> {
        let (_, t) = self.g.require(gguf)?;
        let dtype = engine_dtype(t, self.g.path())?;
        let dims = match expert {
            Some(_) if t.dims.len() == 3 => &t.dims[..2],
            Some(_) => {
                return Err(self.err(format!(
                    "tensor {gguf} has dims {:?}; an experts tensor has 3",
                    t.dims
                )))
            }
            None => &t.dims[..],
        };
        if !same_shape(dims, shape) {
            return Err(self.err(format!(
                "tensor {gguf} ({name}) has dims {dims:?}, the metadata implies {:?}",
                shape.iter().rev().collect::<Vec<_>>()
            )));
        }
        let extent = match expert {
            Some(e) => self.g.expert_extent(gguf, e)?,
            None => self.g.extent(gguf)?,
        };
        Ok((dtype, extent))
    }

    /// The tensor `gguf` (for `name`), as [`Self::locate`] finds it.
    fn stored(
        &self,
        name: &str,
        gguf: &str,
        expert: Option<usize>,
        shape: &[usize],
    ) -> Result<Weight> {
        let (dtype, extent) = self.locate(name, gguf, expert, shape)?;
        let start = extent.offset as usize;
        let file = self.g.shards()[extent.shard].mapped();
        Ok(file.weight(start..start + extent.len as usize, dtype, shape.to_vec()))
    }

    /// Where checkpoint tensor `name` comes from: a stored tensor (or an
    /// expert's slice of one), or DeepSeek's `kv_b_proj` of layer `.0`
    /// that the file holds split.
    fn source(&self, name: &str) -> Result<Source> {
        let mapped = gguf_name(self.family, name).ok_or_else(|| {
            self.err(format!(
                "{name} has no GGUF spelling for {}",
                self.family.name
            ))
        })?;
        Ok(match mapped {
            Mapped::Tensor(t)
                if t.ends_with(".attn_kv_b.weight") && self.g.tensor(&t).is_none() =>
            {
                let layer = name.strip_prefix("model.layers.").unwrap_or_default();
                Source::SplitKvB(layer.split('.').next().unwrap_or_default().to_string())
            }
            Mapped::Tensor(t) => Source::Stored(t, None),
            Mapped::Expert(t, e) => Source::Stored(t, Some(e)),
        })
    }

    /// The type and bytes [`TensorSource::tensor`] hands out for `name`,
    /// without reading them: what a vault converted from the file stores.
    pub fn layout(&self, name: &str, shape: &[usize]) -> Result<(DType, u64)> {
        match self.source(name)? {
            Source::SplitKvB(layer) => {
                self.split_kv_b_halves(&layer)?;
                let n: usize = shape.iter().product();
                Ok((DType::F32, DType::F32.row_bytes(n) as u64))
            }
            Source::Stored(gguf, expert) => {
                let (dtype, extent) = self.locate(name, &gguf, expert, shape)?;
                Ok((dtype, extent.len))
            }
        }
    }

    /// Layer `layer`'s `attn_k_b` and `attn_v_b`, checked against the
    /// latent attention's sizes, and those sizes.
    fn split_kv_b_halves(&self, layer: &str) -> Result<(Weight, Weight, Mla)> {
        let m = self
            .mla
            .ok_or_else(|| self.err(format!("blk.{layer}.attn_k_b without latent attention")))?;
        let (nh, nope, v, rank) = (self.heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
        let k_b = self.stored(
            &format!("model.layers.{layer}.self_attn.k_b"),
            &format!("blk.{layer}.attn_k_b.weight"),
            None,
            &[nh, rank, nope],
        )?;
        let v_b = self.stored(
            &format!("model.layers.{layer}.self_attn.v_b"),
            &format!("blk.{layer}.attn_v_b.weight"),
            None,
            &[nh, v, rank],
        )?;
        Ok((k_b, v_b, m))
    }

    /// DeepSeek's `kv_b_proj` `[heads * (nope + v), rank]` from the halves
    /// llama.cpp stores apart: `attn_k_b` `[heads][rank][nope]` (each head's
    /// key rows transposed) and `attn_v_b` `[heads][v][rank]`. Quantized
    /// rows cannot be transposed in place, so the result is f32, which holds
    /// every dequantized value exactly.
    fn split_kv_b(&self, layer: &str, shape: &[usize]) -> Result<Weight> {
        let (k_b, v_b, m) = self.split_kv_b_halves(layer)?;
        let (nh, nope, v, rank) = (self.heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
        let (k, vv) = (k_b.to_f32(), v_b.to_f32());
        let row = nope + v;
        let mut out = vec![0f32; nh * row * rank];
        for h in 0..nh {
            for r in 0..rank {
                for i in 0..nope {
                    out[(h * row + i) * rank + r] = k[(h * rank + r) * nope + i];
                }
            }
            for j in 0..v {
                let dst = (h * row + nope + j) * rank;
                out[dst..dst + rank].copy_from_slice(&vv[(h * v + j) * rank..][..rank]);
            }
        }
        let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(Weight::owned(&bytes, DType::F32, shape.to_vec()))
    }
}

/// Where [`GgufWeights`] finds a checkpoint tensor.
enum Source {
    /// A tensor by its GGUF name; an expert's slice of it when set.
    Stored(String, Option<usize>),
    /// `kv_b_proj` of this layer, from `attn_k_b` and `attn_v_b`.
    SplitKvB(String),
}

/// GGUF dims (fastest first) against a checkpoint shape (slowest first);
/// a `[1, n]` vector may be stored with the 1 dropped.
fn same_shape(dims: &[u64], shape: &[usize]) -> bool {
    let rev = dims.iter().rev().map(|&d| d as usize);
    if rev.clone().eq(shape.iter().copied()) {
        return true;
    }
    rev.filter(|&d| d != 1)
        .eq(shape.iter().copied().filter(|&d| d != 1))
}

/// Undoes llama.cpp's `LlamaModel.permute` on the rows of a q or k
/// projection: within each head, the converter moved row `half * d/2 + i`
/// to `2 * i + half`, so that adjacent rows form RoPE's rotated pairs.
fn unpermute_rows(w: &Weight, heads: usize) -> Weight {
    let rows = w.shape[0];
    let row_bytes = w.bytes().len() / rows;
    let d = rows / heads;
    let src = w.bytes();
    let mut out = vec![0u8; src.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..d / 2 {
                let to = h * d + half * (d / 2) + i;
                let from = h * d + 2 * i + half;
                out[to * row_bytes..][..row_bytes]
                    .copy_from_slice(&src[from * row_bytes..][..row_bytes]);
            }
        }
    }
    Weight::owned(&out, w.dtype, w.shape.clone())
}

impl TensorSource for GgufWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let w = match self.source(name)? {
            Source::SplitKvB(layer) => return self.split_kv_b(&layer, shape),
            Source::Stored(gguf, expert) => self.stored(name, &gguf, expert, shape)?,
        };
        let permuted = self.family.gguf.as_ref().is_some_and(|g| g.permute_qk);
        let heads = if name.ends_with("self_attn.q_proj.weight")
            || name.ends_with("self_attn.q_proj.bias")
        {
            self.heads
        } else if name.ends_with("self_attn.k_proj.weight")
            || name.ends_with("self_attn.k_proj.bias")
        {
            self.kv_heads
        } else {
            return Ok(w);
        };
        Ok(if permuted {
            unpermute_rows(&w, heads)
        } else {
            w
        })
    }
}

/// One part (gate, up or down) of every routed expert of a layer.
#[derive(Debug, Clone, Copy)]
pub struct ExpertPart {
    pub shard: usize,
    pub dtype: DType,
    /// One expert's `[rows, cols]`.
    pub shape: [usize; 2],
    /// Where expert 0's bytes start; expert `e`'s are `e * len` further.
    pub offset: u64,
    pub len: u64,
}

/// A layer's routed experts in a GGUF: three 3-D tensors.
#[derive(Debug, Clone)]
pub struct ExpertTensors {
    pub layer: usize,
    pub experts: usize,
    /// Gate, up, down.
    pub parts: [ExpertPart; 3],
}

impl ExpertTensors {
    /// Bytes one expert takes in the cache: each part is read rounded out
    /// to [`ALIGN`] on both sides, as direct I/O requires, since GGUF
    /// aligns tensors to 32 bytes only.
    pub fn slot_bytes(&self) -> u64 {
        self.parts.iter().map(|p| align_up(p.len) + ALIGN).sum()
    }
}

/// The routed experts of every sparse layer, checked against the config.
pub fn expert_tensors(g: &Gguf, cfg: &ModelConfig) -> Result<Vec<ExpertTensors>> {
    let (h, inter, n) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let mut out = Vec::new();
    for layer in (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)) {
        let mut parts = Vec::with_capacity(3);
        for (i, p) in EXPERT_PARTS.iter().enumerate() {
            let name = format!("blk.{layer}.{p}.weight");
            let (shard, t) = g.require(&name)?;
            let want = if i == 2 { [inter, h] } else { [h, inter] };
            let [cols, rows] = want;
            if t.dims[..] != [cols as u64, rows as u64, n as u64] {
                return Err(Error::format(
                    g.path(),
                    format!(
                        "tensor {name} has dims {:?}, the metadata implies {:?} ({n} experts)",
                        t.dims,
                        [cols, rows, n]
                    ),
                ));
            }
            let len = t.bytes / n as u64;
            parts.push(ExpertPart {
                shard,
                dtype: engine_dtype(t, g.path())?,
                shape: [rows, cols],
                offset: t.offset,
                len,
            });
        }
        let parts: [ExpertPart; 3] = parts
            .try_into()
            .map_err(|_| Error::invalid("three parts"))?;
        out.push(ExpertTensors {
            layer,
            experts: n,
            parts,
        });
    }
    Ok(out)
}
