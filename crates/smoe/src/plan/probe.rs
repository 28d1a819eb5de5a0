//! The engine's own sparse layer, run on this CPU at a model's shapes and
//! stored types: what a layer of prefill and of decode costs here, with
//! every overhead smoe pays (attention, routing, the counting sort,
//! gathering and scattering, the batched experts, the pool's hand-offs),
//! measured rather than added up from peak rates.
//!
//! The model's config is cut to one layer, routed (a dense-first family
//! such as DeepSeek-V3 gets its sparse layer), with a small vocabulary; its
//! tensors get the types the model stores them in and synthetic values
//! (valid quantized blocks, a random router, so routing spreads as on a
//! synthetic model). Weights are real pages of an arena of at most
//! [`ARENA`] bytes: past that, experts share memory with earlier experts of
//! the same shape, still far beyond any CPU cache. A prompt of
//! [`PROMPT_TOKENS`](super::PROMPT_TOKENS) runs as one chunk, in a warm
//! session and in a new one (whose buffers a whole model faults in once
//! per prompt, not once per layer), then decode steps at that context. Before each decode step the CPU caches are
//! flushed by streaming what the rest of the model streams between two
//! uses of a layer (its other layers and the LM head), so a step's weights
//! come from DRAM as they do in the whole model, or stay cached as they do
//! in a model small enough.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use crate::checkpoint::{filled, MappedFile, TensorSource, Weight};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::{for_each_task, matmul, DType};
use crate::model::{CausalLm, Decoder, Logits, Session};
use crate::quant::quantize_rows;

use super::{Shapes, Sizes, PROMPT_TOKENS};

/// Most memory the probe's weights take.
const ARENA: usize = 512 << 20;
/// Most bytes streamed to flush the caches before a decode step.
const FLUSH: u64 = 256 << 20;
/// Vocabulary of the cut model: the LM head is accounted for apart.
const VOCAB: usize = 256;
/// Decode steps: at least the first, up to the second while under half a
/// second.
const MIN_STEPS: usize = 8;
const MAX_STEPS: usize = 64;

/// Seconds one sparse layer takes here.
#[derive(Debug, Clone, Copy)]
pub struct LayerTimes {
    /// A prompt of `PROMPT_TOKENS` as one chunk, in a session whose
    /// buffers an earlier prompt sized (the mean of the runs).
    pub prefill_s: f64,
    /// What a prompt pays once beyond its layers: a new session's buffers,
    /// sized to the chunk and faulted in on first touch. All layers share
    /// them, so a whole model pays this once, not once per layer.
    pub session_s: f64,
    /// One decoded token at that context (mean of the steps).
    pub decode_s: f64,
}

/// Runs one sparse layer of `sizes`' model; `between` is the bytes the
/// rest of the model streams between two uses of one layer in decode.
pub fn layer(sizes: &Sizes, between: u64) -> Result<LayerTimes> {
    let cfg = probe_config(&sizes.config);
    let arena = Arena::lay_out(tensors(sizes, &cfg)?)?;
    let model = Decoder::load(&arena, &cfg, None, None)?;
    let ids: Vec<u32> = (0..PROMPT_TOKENS)
        .map(|i| ((i * 7919) % VOCAB) as u32)
        .collect();
    let prompt = |session: &mut Session| -> Result<f64> {
        session.kv.truncate(0);
        let t = Instant::now();
        model.forward(&ids, session, Logits::Last)?;
        Ok(t.elapsed().as_secs_f64())
    };

    // A whole prompt first, untimed: it starts the pool and grows every
    // thread's scratch to the chunk, once per process as in `smoe bench`,
    // whose median run is not its first.
    let mut session = model.new_session();
    prompt(&mut session)?;
    // Each round a prompt in a new session, as every generation starts,
    // then one in the warm session. A prompt in a new session faults in
    // some 60 MiB of buffers (16k pages at 512 tokens of Qwen3-30B-A3B),
    // which the whole model pays once: timed in new sessions alone and
    // charged to every layer, they made the forecast prefill of the 8-layer
    // bench model on 16 cores 1.4-1.8x too slow. Means, not
    // medians: what a run pays includes the steps that wait for a
    // descheduled thread on a busy machine. Up to three rounds while they
    // take under a second in all.
    let (mut fresh, mut warm) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while fresh.len() < 3 && (fresh.is_empty() || start.elapsed().as_secs_f64() < 1.0) {
        fresh.push(prompt(&mut model.new_session())?);
        warm.push(prompt(&mut session)?);
    }
    let flush = Flush::new(between.min(FLUSH) as usize);
    let mut decode = Vec::new();
    let start = Instant::now();
    while decode.len() < MIN_STEPS
        || (decode.len() < MAX_STEPS && start.elapsed().as_secs_f64() < 0.5)
    {
        flush.run();
        let t = Instant::now();
        model.forward(&[ids[decode.len()]], &mut session, Logits::Last)?;
        decode.push(t.elapsed().as_secs_f64());
    }
    Ok(LayerTimes {
        prefill_s: mean(&warm),
        session_s: (mean(&fresh) - mean(&warm)).max(0.0),
        decode_s: mean(&decode),
    })
}

/// GB/s the one-token product streams the model's LM head at here: its own
/// stored type and width, at most [`ARENA`] bytes of its rows, far past any
/// cache, the median of five passes. The head is the largest tensor a token
/// reads, and kernels stream types at different rates where they are
/// compute-bound (few threads): priced at q4_k's rate, as this probe once
/// was, the resident 8-layer bench model's decode on 2 threads forecast
/// 59 ms a token against 36 ms measured.
pub fn head_rate(sizes: &Sizes) -> Result<f64> {
    let c = &sizes.config;
    let name = if c.tie_word_embeddings {
        super::EMBED
    } else {
        super::LM_HEAD
    };
    let cols = c.hidden_size.max(1);
    let dtype = sizes.stored_type(name, &[c.vocab_size, cols], 0);
    let row = dtype.row_bytes(cols).max(1);
    let rows = (ARENA / row).clamp(1, c.vocab_size.max(1));
    let pattern = pattern(dtype)?;
    let map = filled(rows * row, |bytes| repeat_into(bytes, &pattern))?;
    let w = map.weight(0..rows * row, dtype, vec![rows, cols]);
    let x = vec![0.5f32; cols];
    let mut y = vec![0.0f32; rows];
    // One pass untimed to start the pool; then the median of five: on a
    // shared machine one pass may land in another process's time slice.
    let mut pass = || {
        let start = Instant::now();
        matmul(&x, 1, w.matrix(), &mut y);
        (rows * row) as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    pass();
    let mut v: Vec<f64> = (0..5).map(|_| pass()).collect();
    v.sort_by(f64::total_cmp);
    Ok(v[2])
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// `c` cut to one routed layer and a small vocabulary.
fn probe_config(c: &ModelConfig) -> ModelConfig {
    let mut p = c.clone();
    p.num_hidden_layers = 1;
    p.vocab_size = VOCAB.min(c.vocab_size);
    if c.num_experts > 0 {
        p.first_k_dense_replace = 0;
        p.mlp_only_layers.clear();
        p.decoder_sparse_step = 1;
    }
    p.max_position_embeddings = p.max_position_embeddings.max(2 * PROMPT_TOKENS);
    p
}

/// The tensors of the probe model `cfg` with the types `sizes` stores
/// them in: its one layer as the model's first sparse layer.
fn tensors(sizes: &Sizes, cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>, DType)>> {
    let shapes = Shapes::default();
    Decoder::load(&shapes, cfg, None, None)?;
    let sparse = (0..sizes.config.num_hidden_layers)
        .find(|&i| sizes.config.is_moe_layer(i))
        .unwrap_or(0);
    Ok(shapes
        .seen
        .into_inner()
        .into_iter()
        .map(|(name, shape)| {
            let dtype = sizes.stored_type(&name, &shape, sparse);
            (name, shape, dtype)
        })
        .collect())
}

/// Where the tensors of one type and shape start, and which of them the
/// next tensor past the arena's end shares.
type Aliases = (Vec<usize>, usize);

/// The probe's weights: each tensor a range of one filled mapping.
struct Arena {
    map: MappedFile,
    tensors: HashMap<String, (Range<usize>, DType, Vec<usize>)>,
}

impl Arena {
    fn lay_out(list: Vec<(String, Vec<usize>, DType)>) -> Result<Self> {
        let mut tensors = HashMap::new();
        let mut fresh: Vec<(Range<usize>, DType)> = Vec::new();
        let mut same: HashMap<(&str, Vec<usize>), Aliases> = HashMap::new();
        let mut end = 0usize;
        for (name, shape, dtype) in list {
            let cols = *shape.last().unwrap_or(&1);
            let rows = shape.iter().product::<usize>() / cols.max(1);
            let len = rows * dtype.row_bytes(cols);
            let key = (dtype.name(), shape.clone());
            let range = match same.get_mut(&key) {
                // Past the arena, share an earlier tensor's memory.
                Some((starts, next)) if end + len > ARENA => {
                    let s = starts[*next % starts.len()];
                    *next += 1;
                    s..s + len
                }
                _ => {
                    let s = end.next_multiple_of(64);
                    end = s + len;
                    fresh.push((s..end, dtype));
                    same.entry(key).or_default().0.push(s);
                    s..end
                }
            };
            tensors.insert(name, (range, dtype, shape));
        }
        let mut patterns: HashMap<&str, Vec<u8>> = HashMap::new();
        for (_, dtype) in &fresh {
            if !patterns.contains_key(dtype.name()) {
                patterns.insert(dtype.name(), pattern(*dtype)?);
            }
        }
        let map = filled(end, |bytes| {
            for (range, dtype) in &fresh {
                repeat_into(&mut bytes[range.clone()], &patterns[dtype.name()]);
            }
        })?;
        Ok(Arena { map, tensors })
    }
}

impl TensorSource for Arena {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        match self.tensors.get(name) {
            Some((range, dtype, s)) if s == shape => {
                Ok(self.map.weight(range.clone(), *dtype, s.clone()))
            }
            _ => Err(Error::invalid(format!(
                "plan probe: no tensor {name} of shape {shape:?}"
            ))),
        }
    }
}

/// Rows of small pseudo-random values stored as `dtype`, whole blocks, so
/// that any tensor of that type can be filled by repeating them.
fn pattern(dtype: DType) -> Result<Vec<u8>> {
    let (rows, cols) = (16, 4096);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    Ok(match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::Quant(q) => {
            let mut out = vec![0u8; rows * q.row_bytes(cols).unwrap_or(0)];
            quantize_rows(q, &values, cols, &mut out)?;
            out
        }
    })
}

/// Fills `dst` with copies of `pattern`, the last one cut short.
fn repeat_into(dst: &mut [u8], pattern: &[u8]) {
    for chunk in dst.chunks_mut(pattern.len()) {
        chunk.copy_from_slice(&pattern[..chunk.len()]);
    }
}

/// Streams a buffer through the CPU caches, as the rest of a model's
/// weights would between two uses of one layer: on the kernels' threads,
/// so that they stay awake as they do between a real token's layers.
struct Flush(Vec<u64>);

impl Flush {
    fn new(bytes: usize) -> Self {
        Flush((0..bytes / 8).map(|i| i as u64).collect())
    }

    fn run(&self) {
        const WORDS: usize = 1 << 16;
        for_each_task(self.0.len().div_ceil(WORDS), |i| {
            let part = &self.0[i * WORDS..((i + 1) * WORDS).min(self.0.len())];
            // One word per cache line brings the whole line in.
            let sum = part.iter().step_by(8).fold(0u64, |a, &b| a.wrapping_add(b));
            std::hint::black_box(sum);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::fixture as sizes;
    use super::*;
    use crate::quant::QuantType;

    #[test]
    fn the_probe_layer_is_a_sparse_layer_stored_as_the_model_stores_it() {
        // DeepSeek-V3's first three layers are dense: the probe's one
        // layer takes the types of layer 3.
        for (model, v) in [
            ("DeepSeek-V3", "self_attn.kv_b_proj.weight"),
            ("Qwen3-30B-A3B", "self_attn.v_proj.weight"),
        ] {
            let s = sizes(model);
            let cfg = probe_config(&s.config);
            let list = tensors(&s, &cfg).unwrap();
            let of = |suffix: &str| {
                list.iter()
                    .find(|(n, _, _)| n.ends_with(suffix))
                    .map(|(_, _, t)| *t)
                    .unwrap_or_else(|| panic!("{model}: no {suffix}"))
            };
            let experts = list
                .iter()
                .filter(|(n, _, _)| s.config.family.is_routed_expert(n))
                .count();
            assert_eq!(experts, 3 * s.config.num_experts, "{model}");
            assert_eq!(
                of("experts.0.down_proj.weight"),
                DType::Quant(QuantType::Q4K)
            );
            assert_eq!(of("mlp.gate.weight"), DType::BF16, "{model}: router");
            let real = s.types[&format!("model.layers.3.{v}")];
            assert_eq!(of(v), real, "{model}: {v}");
            assert_eq!(of("input_layernorm.weight"), DType::F32);
            assert_eq!(cfg.vocab_size, VOCAB);
        }
    }

    #[test]
    fn patterns_are_whole_blocks_of_their_type() {
        for q in [
            QuantType::Q4K,
            QuantType::Q6K,
            QuantType::Q8_0,
            QuantType::Q4_0,
        ] {
            let p = pattern(DType::Quant(q)).unwrap();
            assert_eq!(p.len() % q.block_bytes(), 0, "{}", q.name());
        }
        assert_eq!(pattern(DType::BF16).unwrap().len(), 2 * 16 * 4096);
    }
}
