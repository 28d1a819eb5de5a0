//! `smoe plan`: whether a model will run on a machine, what goes where, and
//! roughly how fast, known before anything is downloaded.
//!
//! **Sizes.** A vault's are read from its manifest, a GGUF's from its
//! metadata and tensor table as the vault it converts to, but with an
//! expert's slot as the engine reads it from the file ([`gguf_sizes`]).
//! For a checkpoint or a bare `config.json` the decoder itself says which
//! tensors the config implies: [`Decoder::load`] runs on a source that
//! records every tensor it asks for and hands back zeros (address space,
//! never memory), and each
//! tensor's stored type and bytes come from the conversion recipe
//! ([`recipe`]) and the record layout `smoe convert` writes, so a plan is
//! exact to the byte for the vault `convert` would make.
//!
//! **Memory.** The RAM plan is the engine's own ([`Footprint::plan`], the
//! planner `run`, `chat` and `serve` use), on the footprint of that vault.
//!
//! **Locality model.** The expert cache holds a fraction `f` of all expert
//! records (LFU eviction, no read-ahead: the defaults). The decode hit rate
//! is a curve `h(f)`, linear between measured points, through (0, 0) and,
//! without a point at 1, up to (1, 1): a whole-model cache misses only
//! each expert's first use. A cache of fewer slots than one token's experts
//! (sparse layers x top-k) hits nothing: LFU evicts every expert before its
//! next use (measured: 0.0% on the built-in model with 25 slots under 32).
//! The default curve was measured on the built-in model's learned routing
//! (`smoe bench --prompts models/builtin/eval.json` at budgets of 10-100%
//! of its expert bytes, [`HitCurve::builtin`]); a trained model routes more
//! repetitively than the uniform `h = f`. Any model's own curve comes from
//! `smoe bench --json --prompts FILE` at a few `--ram-budget`s on it:
//! `smoe plan --hit-curve FILE` takes those JSON lines
//! ([`HitCurve::from_bench`]). The curve is the workload's as much as the
//! model's (a randomly initialised model hits 0.44 at 25% decoding after
//! a 512-token random prompt, 0.61 answering short chats), so it is
//! measured with prompts like the ones to be run. A prompt of `t` tokens routed uniformly
//! touches `U = E (1 - (1 - k/E)^t)` experts per layer; the cache pins a
//! layer's `U` while it computes and LFU keeps a stable set of the rest
//! from prompt to prompt, `(C - U) / (L - 1)` per layer of `C` slots.
//!
//! **Forecast.** Measured here (`--measure`, the default), the engine's own
//! sparse layer runs at the model's shapes and stored types ([`probe`]): a
//! 512-token prompt as one chunk and decode steps at that context, with
//! the caches flushed between steps by what the rest of the model streams.
//! That is the layer's compute with every overhead smoe pays. A decoded
//! token is then the layers (a dense layer in proportion to its bytes) and
//! the LM head at the measured DRAM rate, plus, per sparse layer, the wait
//! for its misses: they are read at once, and the disk probe timed batches
//! of 1-16 records of the model's size, so the reads take the expected batch
//! time over how many of the `k` experts miss (binomial in `1 - h`), and
//! the layer waits for what of that outlasts computing its hits (the
//! engine runs the cached experts while the misses arrive; the experts'
//! share of a layer's compute is their share of the bytes it streams). A
//! prompt is the layers' prefill time, a new session's buffers once (all
//! layers share them), plus, per sparse layer, the wait for reading the
//! experts it touches that the cache lacks, 16 at a time, less computing
//! the ones it has.
//! For a machine given by figures instead, a layer is its bytes over the
//! memory bandwidth plus its parallel loops' hand-offs, a prompt two flops
//! per active weight per token plus attention at the given GFLOP/s, reads
//! at the disk's GB/s. Each figure is a range from the spread of how much
//! of a rate the engine gets (narrow when measured here, wide for figures
//! given for another machine); the resource with the larger share of the
//! time is named.

mod gguf_sizes;
pub mod gpu;
mod probe;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use gguf_sizes::gguf_records;
pub use probe::LayerTimes;

use crate::checkpoint::{zeros, MappedFile, TensorSource, Weight};
use crate::config::ModelConfig;
use crate::error::{read_json, Error, Result};
use crate::experts::io::DirectFile;
use crate::gguf::{self, Gguf};
use crate::kernels::{threads, DType};
use crate::memory::{Budget, Footprint, MemoryPlan};
use crate::model::{human_bytes, Decoder};
use crate::quant::QuantType;
use crate::vault::recipe::{row_type, Role};
use crate::vault::{self, align_up, part_start, Vault};

const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// The prompt length time to first token is forecast for.
pub const PROMPT_TOKENS: usize = 512;

/// What a model stores and what a token reads, in the vault's layout.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub config: ModelConfig,
    /// "vault" when read from one, else "config.json + recipe".
    pub source: &'static str,
    /// Stored types, e.g. "experts q4_k, backbone q4_k + lm_head q6_k".
    pub quant: String,
    pub backbone_params: u64,
    pub expert_params: u64,
    /// Backbone bytes kept in RAM, by stored type.
    pub resident: BTreeMap<String, u64>,
    /// The untied embedding table, read from disk a row per token.
    pub embed_on_disk: u64,
    /// Routed-expert bytes, by stored type (records' padding included).
    pub experts: BTreeMap<String, u64>,
    /// One expert record: gate, up and down, 4 KiB-aligned.
    pub record_bytes: u64,
    pub records: u64,
    pub moe_layers: usize,
    /// Parameters of one routed expert.
    pub params_per_expert: u64,
    /// Parameters of the LM head (or the tied table), used once per prompt.
    pub lm_head_params: u64,
    /// Its stored bytes.
    pub lm_head_bytes: u64,
    /// Stored bytes of each layer's backbone tensors, by layer.
    pub layer_bytes: Vec<u64>,
    /// Stored type of every backbone tensor.
    pub types: BTreeMap<String, DType>,
    /// Stored type of the routed experts' parts, by shape.
    pub expert_types: Vec<(Vec<usize>, DType)>,
}

impl Sizes {
    pub fn resident_bytes(&self) -> u64 {
        self.resident.values().sum()
    }

    pub fn expert_bytes(&self) -> u64 {
        self.experts.values().sum()
    }

    /// What the published checkpoint weighs in bf16.
    pub fn bf16_bytes(&self) -> u64 {
        2 * (self.backbone_params + self.expert_params)
    }

    /// Weights one token multiplies, the LM head and embedding left out.
    pub fn active_params(&self) -> u64 {
        let experts = self.moe_layers as u64
            * self.config.num_experts_per_tok as u64
            * self.params_per_expert;
        let embed = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head_params
        };
        self.backbone_params - self.lm_head_params - embed + experts
    }

    /// Expert bytes a decoded token multiplies (cached or read).
    pub fn expert_bytes_per_token(&self) -> u64 {
        self.moe_layers as u64 * self.config.num_experts_per_tok as u64 * self.record_bytes
    }

    /// The type layer `sparse`'s tensor stores, for the probe's one layer
    /// (`model.layers.0.*`) and the rest of its tensors by their own name.
    fn stored_type(&self, name: &str, shape: &[usize], sparse: usize) -> DType {
        if self.config.family.is_routed_expert(name) {
            if let Some((_, t)) = self.expert_types.iter().find(|(s, _)| s == shape) {
                return *t;
            }
        }
        let real = match name.strip_prefix("model.layers.0.") {
            Some(rest) => format!("model.layers.{sparse}.{rest}"),
            None => name.to_string(),
        };
        self.types.get(&real).copied().unwrap_or(match shape.len() {
            1 => DType::F32,
            _ => DType::BF16,
        })
    }

    /// Sizes of the vault at `dir`, as stored.
    pub fn of_vault(vault: &Vault) -> Result<Self> {
        Self::of_manifest(&vault.manifest, &vault.dir.join(vault::MANIFEST), "vault")
    }

    /// Sizes of the vault a manifest describes (`path` names it in errors).
    fn of_manifest(m: &vault::Manifest, path: &Path, source: &'static str) -> Result<Self> {
        let config = ModelConfig::from_json(&m.config, path)?;
        let mut s = Sizes::empty(config, source, m.stored_quant());
        for (name, t) in &m.backbone {
            s.add_backbone(name, &t.shape, &t.dtype, t.len);
        }
        for layer in &m.experts {
            let n = layer.offsets.len() as u64;
            for p in &layer.parts {
                *s.experts.entry(p.dtype.clone()).or_default() += n * p.len;
                if let Some(t) = DType::parse(&p.dtype) {
                    s.expert_types.push((p.shape.to_vec(), t));
                }
            }
            let parts: u64 = layer.parts.iter().map(|p| p.len).sum();
            *s.experts.entry("padding".into()).or_default() += n * (layer.record_len - parts);
            s.params_per_expert = layer
                .parts
                .iter()
                .map(|p| (p.shape[0] * p.shape[1]) as u64)
                .sum();
            s.expert_params += n * s.params_per_expert;
            s.record_bytes = s.record_bytes.max(layer.record_len);
            s.records += n;
            s.moe_layers += 1;
        }
        s.experts.retain(|_, b| *b > 0);
        Ok(s)
    }

    /// Sizes of the vault `smoe convert --experts experts --backbone
    /// backbone` would make from a checkpoint with this config.
    pub fn of_config(config: ModelConfig, experts: DType, backbone: DType) -> Result<Self> {
        let seen = decoder_tensors(&config)?;
        let tied = !seen.iter().any(|(n, _)| n == LM_HEAD);
        let quant = format!(
            "experts {}, backbone {}{}",
            experts.name(),
            backbone.name(),
            match backbone {
                DType::Quant(q) if q.bits_per_weight() < QuantType::Q6K.bits_per_weight() =>
                    " + lm_head q6_k + v_proj q6_k + routers bf16",
                DType::Quant(_) => " + routers bf16",
                _ => "",
            }
        );
        let family = config.family;
        let mut s = Sizes::empty(config, "config.json + recipe", quant);
        let mut layers = BTreeMap::<usize, Vec<&[usize]>>::new();
        for (name, shape) in &seen {
            if family.is_routed_expert(name) {
                let layer = name
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0);
                layers.entry(layer).or_default().push(shape);
                continue;
            }
            let stored = match shape[..] {
                [_, cols] => row_type(Role::of(name, shape, tied).target(backbone), cols),
                _ => DType::F32,
            };
            let cols = *shape.last().unwrap_or(&0);
            let rows: usize = shape.iter().product::<usize>() / cols.max(1);
            let len = (rows * stored.row_bytes(cols)) as u64;
            s.add_backbone(name, shape, stored.name(), len);
        }
        // Gate, up and down of one expert, in record order.
        let parts = 3;
        for shapes in layers.values() {
            let n = (shapes.len() / parts) as u64;
            let (mut end, mut stored, mut params) = (0usize, 0u64, 0u64);
            for shape in &shapes[..parts] {
                let [rows, cols] = shape[..] else {
                    return Err(Error::invalid("an expert tensor is not 2-D"));
                };
                let t = row_type(experts, cols);
                let len = rows * t.row_bytes(cols);
                s.expert_types.push((shape.to_vec(), t));
                end = part_start(end) + len;
                stored += len as u64;
                params += (rows * cols) as u64;
                *s.experts.entry(t.name().into()).or_default() += n * len as u64;
            }
            let record = align_up(end as u64);
            *s.experts.entry("padding".into()).or_default() += n * (record - stored);
            s.params_per_expert = params;
            s.expert_params += n * params;
            s.record_bytes = s.record_bytes.max(record);
            s.records += n;
            s.moe_layers += 1;
        }
        s.experts.retain(|_, b| *b > 0);
        Ok(s)
    }

    fn empty(config: ModelConfig, source: &'static str, quant: String) -> Self {
        let layers = config.num_hidden_layers;
        Sizes {
            config,
            source,
            quant,
            backbone_params: 0,
            expert_params: 0,
            resident: BTreeMap::new(),
            embed_on_disk: 0,
            experts: BTreeMap::new(),
            record_bytes: 0,
            records: 0,
            moe_layers: 0,
            params_per_expert: 0,
            lm_head_params: 0,
            lm_head_bytes: 0,
            layer_bytes: vec![0; layers],
            types: BTreeMap::new(),
            expert_types: Vec::new(),
        }
    }

    fn add_backbone(&mut self, name: &str, shape: &[usize], dtype: &str, len: u64) {
        let params = shape.iter().product::<usize>() as u64;
        self.backbone_params += params;
        let tied = self.config.tie_word_embeddings;
        if name == LM_HEAD || (tied && name == EMBED) {
            self.lm_head_params = params;
            self.lm_head_bytes = len;
        }
        if let Some(t) = DType::parse(dtype) {
            self.types.insert(name.to_string(), t);
        }
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(b) = layer.and_then(|i| self.layer_bytes.get_mut(i)) {
            *b += len;
        }
        if name == EMBED && !tied {
            self.embed_on_disk += len;
        } else {
            *self.resident.entry(dtype.to_string()).or_default() += len;
        }
    }
}

/// A [`TensorSource`] that records what is asked of it and answers with
/// zeros, so that the decoder lists a config's tensors in its own spelling.
#[derive(Default)]
struct Shapes {
    zeros: RefCell<Option<MappedFile>>,
    seen: RefCell<Vec<(String, Vec<usize>)>>,
}

impl TensorSource for Shapes {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let bytes = DType::BF16.row_bytes(shape.iter().product());
        let mut z = self.zeros.borrow_mut();
        if z.as_ref().is_none_or(|m| m.len() < bytes) {
            // Sizes within each bound can still make one tensor larger
            // than the address space this machine lends; say which.
            *z = Some(zeros(bytes).map_err(|e| {
                Error::invalid(format!("tensor {name} {shape:?} cannot be laid out: {e}"))
            })?);
        }
        self.seen
            .borrow_mut()
            .push((name.to_string(), shape.to_vec()));
        let map = z.as_ref().ok_or_else(|| Error::invalid("no zero map"))?;
        Ok(map.weight(0..bytes, DType::BF16, shape.to_vec()))
    }
}

/// The tensors the decoder loads for `config`, by name and shape, in the
/// order it asks for them; nothing is read and no memory is committed.
pub(crate) fn decoder_tensors(config: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let shapes = Shapes::default();
    Decoder::load(&shapes, config, None, None)?;
    Ok(shapes.seen.into_inner())
}

/// The decode hit rate as a function of the share of expert bytes cached.
#[derive(Debug, Clone)]
pub struct HitCurve {
    /// (fraction cached, hit rate), sorted by fraction.
    pub points: Vec<(f64, f64)>,
    pub source: String,
}

impl HitCurve {
    /// Measured on the built-in model (8 layers of 32 experts, top-4,
    /// learned routing): `smoe bench --prompts models/builtin/eval.json
    /// --gen-tokens 64 --repeat 1 --json` at each budget, all 68 chats
    /// through one warm cache (`bench/plan-vs-bench.sh --calibrate`).
    pub fn builtin() -> Self {
        HitCurve {
            points: BUILTIN_CURVE.to_vec(),
            source: "the built-in model's routing (smoe bench --prompts models/builtin/eval.json)"
                .into(),
        }
    }

    /// The curve from `smoe bench --json` output: one JSON object per line
    /// (or a list of them), each with `streaming.expert_fraction` and
    /// `streaming.decode_hit_rate`.
    pub fn from_bench(path: &Path) -> Result<Self> {
        let text = crate::error::read_to_string(path)?;
        let mut objects = Vec::new();
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(list)) => objects = list,
            Ok(v) => objects.push(v),
            Err(_) => {
                for (i, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    objects.push(serde_json::from_str(line).map_err(|e| {
                        Error::format(path, format!("line {}: invalid JSON: {e}", i + 1))
                    })?);
                }
            }
        }
        let mut points = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            let get = |k: &str| o["streaming"][k].as_f64();
            match (get("expert_fraction"), get("decode_hit_rate")) {
                (Some(f), Some(h)) if (0.0..=1.0).contains(&h) && f > 0.0 => {
                    points.push((f.min(1.0), h))
                }
                _ => {
                    return Err(Error::format(
                        path,
                        format!(
                            "entry {}: expected smoe bench --json output of a vault, with \"streaming\": {{\"expert_fraction\", \"decode_hit_rate\"}}",
                            i + 1
                        ),
                    ))
                }
            }
        }
        if points.is_empty() {
            return Err(Error::format(path, "no smoe bench --json results in it"));
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(HitCurve {
            points,
            source: format!("{} (smoe bench --json)", path.display()),
        })
    }

    /// The expected decode hit rate with `fraction` of the experts cached.
    pub fn at(&self, fraction: f64) -> f64 {
        let f = fraction.clamp(0.0, 1.0);
        let mut pts = vec![(0.0, 0.0)];
        pts.extend(self.points.iter().copied());
        if pts.last().is_some_and(|p| p.0 < 1.0) {
            pts.push((1.0, 1.0));
        }
        for w in pts.windows(2) {
            let ((f0, h0), (f1, h1)) = (w[0], w[1]);
            if f <= f1 {
                let t = if f1 > f0 { (f - f0) / (f1 - f0) } else { 1.0 };
                return h0 + t * (h1 - h0);
            }
        }
        pts.last().map_or(f, |p| p.1)
    }
}

/// (fraction of expert bytes cached, decode hit rate) on the built-in
/// model, from `bench/plan-vs-bench.sh --calibrate`.
const BUILTIN_CURVE: [(f64, f64); 4] = [(0.156, 0.231), (0.25, 0.515), (0.5, 0.846), (1.0, 0.997)];

/// The figures of the machine a plan is for.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Memory the process may use.
    pub ram: u64,
    /// Read bandwidth of the disk holding the vault, at the reader pool's
    /// queue depth (16).
    pub disk_gbps: f64,
    /// Seconds to read `n` expert records at once through the reader pool,
    /// `(n, seconds)` by ascending `n`, when measured here; a given machine
    /// has only `disk_gbps`.
    pub reads: Vec<(usize, f64)>,
    /// Memory bandwidth: with `measured`, the rate the one-token kernel
    /// streamed the model's own LM head at here; else the machine's rated
    /// figure.
    pub mem_gbps: f64,
    /// Multi-token quantized matmul rate, GFLOP/s: given, or what the
    /// engine's measured layer did with a prompt.
    pub gflops: f64,
    /// What one parallel loop costs beyond its work, in microseconds, for a
    /// given machine (a measured one's layer times include it).
    pub loop_us: f64,
    pub cores: usize,
    /// The engine's own sparse layer on this model, run here.
    pub layer: Option<LayerTimes>,
    /// Measured here by [`measure`] rather than given.
    pub measured: bool,
    /// `mem_gbps` (and a GPU plan's PCIe rate) is this engine's own rate,
    /// measured here or on the machine a file describes (`smoe bench`'s
    /// ways), which it gets nearly whole rather than a rated figure's
    /// share, even where other figures are given; set wherever `measured`
    /// is.
    pub mem_measured: bool,
}

impl Machine {
    /// Share of a figure the engine gets: low and high. Measured figures
    /// are the engine's own layer and reader on this model's shapes; a rated
    /// DRAM figure is more than CPU cores stream (two cores here: 17 of ~20
    /// GB/s), a rated SSD figure more than a layer's few reads get.
    fn efficiency(&self) -> Efficiency {
        let pick = |measured: bool, narrow, wide| if measured { narrow } else { wide };
        Efficiency {
            mem: pick(self.mem_measured, (0.85, 1.15), (0.45, 0.85)),
            disk: pick(self.measured, (0.8, 1.2), (0.5, 0.9)),
            compute: pick(self.measured, (0.85, 1.15), (0.5, 1.0)),
        }
    }

    /// Seconds to read `n` records of `len` bytes at once: between the
    /// measured batch sizes linearly (through 0 at 0), past the largest at
    /// its time per record (the pool keeps 16 in flight); for a given
    /// machine, at `disk_gbps`.
    fn read_s(&self, n: f64, len: u64) -> f64 {
        if n <= 0.0 {
            return 0.0;
        }
        let mut prev = (0usize, 0.0);
        for &(k, s) in &self.reads {
            if n <= k as f64 {
                let t = (n - prev.0 as f64) / (k - prev.0) as f64;
                return prev.1 + t * (s - prev.1);
            }
            prev = (k, s);
        }
        match prev {
            (0, _) => n * len as f64 / (self.disk_gbps * 1e9),
            (k, s) => n * s / k as f64,
        }
    }

    /// Expected seconds a layer waits for its misses when each of its `k`
    /// experts misses with probability `p`, all misses read at once while
    /// its hits compute, `hit_s` each (0 where nothing overlaps the reads).
    fn misses_s(&self, k: usize, p: f64, len: u64, hit_s: f64) -> f64 {
        let mut prob = (1.0 - p).powi(k as i32);
        let mut sum = 0.0;
        for n in 0..=k {
            let wait = self.read_s(n as f64, len) - (k - n) as f64 * hit_s;
            sum += prob * wait.max(0.0);
            // Binomial(k, p): P(n + 1) from P(n).
            if p < 1.0 {
                prob *= (k - n) as f64 / (n + 1) as f64 * p / (1.0 - p);
            } else {
                prob = if n + 1 == k { 1.0 } else { 0.0 };
            }
        }
        sum
    }
}

struct Efficiency {
    mem: (f64, f64),
    disk: (f64, f64),
    compute: (f64, f64),
}

/// The memory plan for `sizes` on a machine of `ram` bytes: the engine's
/// own planner ([`Footprint::plan`]) on the footprint of the vault the
/// plan is about, and a budget that does not fit beside the backbone
/// refused.
pub fn memory_plan(
    sizes: &Sizes,
    ram: u64,
    budget: Budget,
    ctx: usize,
    sequences: usize,
) -> Result<MemoryPlan> {
    let c = &sizes.config;
    let ctx = ctx.min(c.max_position_embeddings);
    let sequences = sequences.max(1);
    let fp = Footprint {
        vault: true,
        resident_bytes: sizes.resident_bytes(),
        expert_bytes: sizes.expert_bytes(),
        min_cache_bytes: sizes.record_bytes * c.num_experts_per_tok as u64,
        slot_bytes: sizes.record_bytes,
        records: sizes.records,
        smaller_backbone: None,
        kv_bytes: c.kv_bytes(ctx) * sequences as u64,
        ctx,
        sequences,
        activation_bytes: crate::memory::activation_bytes(c, PROMPT_TOKENS.min(ctx), sequences),
        quant: sizes.quant.clone(),
        direct_io: None,
    };
    let plan = fp.plan(budget, Some(ram))?;
    let room = plan.room_bytes.unwrap_or(0);
    if let Budget::Bytes(asked) = budget {
        if plan.cache_bytes > room {
            return Err(Error::invalid(format!(
                "an expert cache of {} does not fit: {} of RAM leaves {} beside backbone {}, KV {}, activations {} and headroom {}",
                human_bytes(asked),
                human_bytes(ram),
                human_bytes(room),
                human_bytes(plan.backbone_bytes),
                human_bytes(plan.kv_bytes),
                human_bytes(plan.activation_bytes),
                human_bytes(plan.headroom_bytes)
            )));
        }
    }
    Ok(plan)
}

/// A share of the expert bytes as a budget.
pub fn share(sizes: &Sizes, fraction: f64) -> Budget {
    Budget::Bytes((fraction * sizes.expert_bytes() as f64) as u64)
}

/// Share of the expert records the cache holds.
pub fn fraction(sizes: &Sizes, plan: &MemoryPlan) -> f64 {
    if sizes.records == 0 {
        1.0
    } else {
        plan.cache_slots as f64 / sizes.records as f64
    }
}

/// Bytes on SSD: expert records and the untied embedding table.
pub fn ssd_bytes(sizes: &Sizes) -> u64 {
    sizes.expert_bytes() + sizes.embed_on_disk
}

/// A low-high range and the value the model expects.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub low: f64,
    pub high: f64,
    pub expected: f64,
}

impl Range {
    fn json(&self) -> Value {
        json!({"low": self.low, "high": self.high, "expected": self.expected})
    }

    /// The rate `n / s` of a time range: fast is high.
    fn rate(n: f64, s: Range) -> Range {
        Range {
            low: n / s.high,
            high: n / s.low,
            expected: n / s.expected,
        }
    }
}

/// Seconds as a range: `work` seconds at the nominal rate, of which the
/// engine gets a share between `eff.0` and `eff.1` (expected: their
/// geometric mean).
fn time(work: f64, eff: (f64, f64)) -> Range {
    Range {
        low: work / eff.1,
        high: work / eff.0,
        expected: work / (eff.0 * eff.1).sqrt(),
    }
}

/// Distinct experts a layer routes a prompt of [`PROMPT_TOKENS`] to, by
/// uniform routing: `E (1 - (1 - k/E)^t)`.
fn prompt_touched(c: &ModelConfig) -> f64 {
    let (e, k) = (c.num_experts.max(1) as f64, c.num_experts_per_tok as f64);
    e * (1.0 - (1.0 - k / e).powf(PROMPT_TOKENS as f64))
}

/// The share of a prompt's experts the cache of `slots` holds over
/// `layers` streamed layers that each touch `touched`. The cache pins a
/// layer's `U = touched` while it computes and, by LFU, keeps a stable set
/// of the rest from prompt to prompt: s per layer with L s = C - (U - s),
/// so s = (C - U) / (L - 1), all of them once C holds every layer's U.
fn prompt_hit(slots: f64, layers: f64, touched: f64) -> f64 {
    if slots >= layers * touched {
        1.0
    } else if layers <= 1.0 {
        0.0
    } else {
        ((slots - touched) / ((layers - 1.0) * touched)).clamp(0.0, 1.0)
    }
}

/// The longer of two times that overlap, bound by bound.
fn longer(a: Range, b: Range) -> Range {
    Range {
        low: a.low.max(b.low),
        high: a.high.max(b.high),
        expected: a.expected.max(b.expected),
    }
}

fn sum(a: Range, b: Range) -> Range {
    Range {
        low: a.low + b.low,
        high: a.high + b.high,
        expected: a.expected + b.expected,
    }
}

#[derive(Debug, Clone)]
pub struct Forecast {
    pub hit_rate: f64,
    /// Bytes a decoded token streams from RAM: backbone, experts, KV.
    pub ram_bytes_per_token: u64,
    pub kv_bytes_per_token: u64,
    /// Expert bytes a decoded token reads from SSD.
    pub ssd_bytes_per_token: u64,
    /// Seconds of a decoded token: the resident layers and LM head, and
    /// the waits for expert misses.
    pub decode_compute_s: Range,
    pub decode_read_s: Range,
    pub decode_tok_s: Range,
    pub decode_limit: &'static str,
    /// Share of a prompt's experts found cached when it arrives at a cache
    /// warm from earlier prompts.
    pub prefill_hit_rate: f64,
    pub prefill_compute_s: Range,
    pub prefill_read_s: Range,
    pub prefill_tok_s: Range,
    pub prefill_limit: &'static str,
    pub ttft_s: Range,
    /// The same prompt on a cache holding nothing yet.
    pub ttft_cold_s: Range,
    /// Expert bytes a 512-token prompt reads: warm cache, cold cache.
    pub prefill_read: (u64, u64),
}

/// Parallel loops of one decoded token's layer `i`, for a given machine's
/// hand-off cost: a quantized product is two (its activations, then its
/// rows), so a layer's four attention projections, attention, router and
/// routed experts make about 12, a dense MLP or shared expert 6 more.
fn loops(c: &ModelConfig, i: usize) -> f64 {
    let extra = !c.is_moe_layer(i) || c.shared_expert_intermediate_size > 0;
    if extra {
        18.0
    } else {
        12.0
    }
}

/// The decode and prefill forecast for `sizes` on `m` with `plan`.
///
/// Decode: each layer streams its backbone, its top-k experts and its KV
/// from RAM (the engine's measured layer, else bytes over bandwidth plus
/// the loops' hand-offs) and, without read-ahead, waits for the experts it
/// misses, read at once (the measured batch times at that count, averaged
/// over how many of its k miss), less the compute of its hits, which runs
/// meanwhile; the LM head is streamed once. Prefill of a 512-token chunk:
/// each layer's measured time and a new session's once (else two flops per
/// active weight per token and attention at the given GFLOP/s), and each
/// sparse layer waits for reading the experts the prompt routes to that
/// the cache does not hold, 16 at a time, less computing those it holds.
pub fn forecast(sizes: &Sizes, plan: &MemoryPlan, m: &Machine, curve: &HitCurve) -> Forecast {
    let c = &sizes.config;
    let eff = m.efficiency();
    let f = fraction(sizes, plan);
    let k = c.num_experts_per_tok;
    // A cache smaller than one token's experts evicts each of them before
    // its next use: the built-in model's 25 slots, under its 8 x 4, hit 0%.
    let working_set = (sizes.moe_layers * k) as u64;
    let hit = if (plan.cache_slots as u64) < working_set.min(sizes.records) {
        0.0
    } else {
        curve.at(f)
    };
    let experts = sizes.expert_bytes_per_token();
    // Decode attends over the prompt and what it wrote.
    let pos = (PROMPT_TOKENS + 32).min(plan.ctx);
    let kv = c.kv_bytes(pos);
    let layers = c.num_hidden_layers.max(1);
    let record = sizes.record_bytes;
    let sparse: Vec<bool> = (0..layers).map(|i| c.is_moe_layer(i)).collect();
    // What layer i streams for one token, experts and KV included.
    let token_bytes = |i: usize| {
        sizes.layer_bytes.get(i).copied().unwrap_or(0)
            + if sparse[i] { k as u64 * record } else { 0 }
            + kv / layers as u64
    };
    let n_sparse = sparse.iter().filter(|&&s| s).count().max(1);
    let sparse_bytes = (0..layers)
        .filter(|&i| sparse[i])
        .map(token_bytes)
        .sum::<u64>() as f64
        / n_sparse as f64;
    let head = time(sizes.lm_head_bytes as f64 / (m.mem_gbps * 1e9), eff.mem);

    // The layers as so many sparse layers: a dense one in proportion to
    // its bytes.
    let scale: f64 = (0..layers)
        .map(|i| token_bytes(i) as f64 / sparse_bytes.max(1.0))
        .sum();
    // Seconds of the layers for a token and for a prompt, and of the
    // hand-offs among the former (given machines only).
    let (layers_dec, layers_pre, handoffs) = match m.layer {
        // The measured layer, `scale` times.
        Some(l) => {
            (
                time(scale * l.decode_s, eff.compute),
                // A prompt's new session once, its layers each.
                time(scale * l.prefill_s + l.session_s, eff.compute),
                0.0,
            )
        }
        None => {
            let bytes = (0..layers).map(token_bytes).sum::<u64>() as f64;
            let handoffs = (0..layers).map(|i| loops(c, i)).sum::<f64>() * m.loop_us * 1e-6;
            let t = PROMPT_TOKENS as f64;
            let attn_dims = match c.mla {
                Some(m) => m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim,
                None => 2 * c.head_dim,
            } * c.num_attention_heads;
            let flops =
                2.0 * t * sizes.active_params() as f64 + layers as f64 * attn_dims as f64 * t * t;
            (
                sum(
                    time(bytes / (m.mem_gbps * 1e9), eff.mem),
                    // A busy machine's scheduling moved its median hand-off
                    // by a quarter either way between runs.
                    time(handoffs, (0.75, 1.25)),
                ),
                time(flops / (m.gflops * 1e9), eff.compute),
                handoffs,
            )
        }
    };
    // A sparse layer's routed experts' share of its compute (by the bytes
    // a token streams there), and its compute: the engine runs the experts
    // it finds cached while its misses are read, so a layer waits only for
    // the reads that outlast them.
    let expert_share = (k as u64 * record) as f64 / sparse_bytes.max(1.0);
    let (sparse_dec_s, sparse_pre_s) = match m.layer {
        Some(l) => (l.decode_s, l.prefill_s),
        None => (
            layers_dec.expected / scale.max(1.0),
            layers_pre.expected / scale.max(1.0),
        ),
    };
    let waits =
        |reads: f64, hits: f64, compute: f64| reads - reads.min(hits * expert_share * compute);
    let decode_compute = sum(layers_dec, head);
    // One token's hit: a k-th of its layer's experts.
    let hit_s = expert_share * sparse_dec_s / k.max(1) as f64;
    let decode_read = time(
        sizes.moe_layers as f64 * m.misses_s(k, 1.0 - hit, record, hit_s),
        eff.disk,
    );
    let decode = sum(decode_compute, decode_read);
    let decode_limit = if decode_read.expected > decode_compute.expected {
        "SSD reads of expert misses"
    } else if m.layer.is_some() {
        "the resident layers (the engine's own layer, measured here: weights from RAM, attention, routing, experts)"
    } else if 2.0 * handoffs > decode_compute.expected {
        "the threads' hand-offs between parallel loops"
    } else {
        "memory bandwidth (resident weights and cached experts)"
    };

    // Prefill: one chunk of PROMPT_TOKENS, layer-major.
    let touched = prompt_touched(c);
    let ls = sizes.moe_layers as f64;
    let prefill_hit = prompt_hit(plan.cache_slots as f64, ls, touched);
    let cold_reads = time(ls * m.read_s(touched, record), eff.disk);
    let warm_reads = time(
        ls * waits(
            m.read_s(touched * (1.0 - prefill_hit), record),
            prefill_hit,
            sparse_pre_s,
        ),
        eff.disk,
    );
    let prefill_compute = sum(layers_pre, head);
    let ttft = sum(prefill_compute, warm_reads);
    let cold = (ls * touched * record as f64) as u64;
    let prefill_limit = if warm_reads.expected > prefill_compute.expected {
        "SSD reads of the experts the prompt routes to"
    } else if m.layer.is_some() {
        "compute (the engine's own layer on 512 tokens, measured here)"
    } else {
        "compute (quantized matrix products)"
    };
    Forecast {
        hit_rate: hit,
        ram_bytes_per_token: plan.backbone_bytes + experts + kv,
        kv_bytes_per_token: kv,
        ssd_bytes_per_token: ((1.0 - hit) * experts as f64) as u64,
        decode_compute_s: decode_compute,
        decode_read_s: decode_read,
        decode_tok_s: Range::rate(1.0, decode),
        decode_limit,
        prefill_hit_rate: prefill_hit,
        prefill_compute_s: prefill_compute,
        prefill_read_s: warm_reads,
        prefill_tok_s: Range::rate(PROMPT_TOKENS as f64, ttft),
        prefill_limit,
        ttft_s: ttft,
        ttft_cold_s: sum(prefill_compute, cold_reads),
        prefill_read: (((1.0 - prefill_hit) * cold as f64) as u64, cold),
    }
}

/// The machine's figures, measured here: batches of direct reads of
/// expert-record size on the model's disk (a vault's own records, a GGUF's
/// own expert slices, else a file written next to the model and removed),
/// the one-token kernel's DRAM bandwidth, and the engine's own layer at
/// this model's shapes, with the configured threads.
pub fn measure(sizes: &Sizes, model: &Path, ram: u64) -> Result<Machine> {
    let len = align_up(sizes.record_bytes.max(1)) as usize;
    let reads = if vault::is_vault(model) {
        let v = Vault::open(model)?;
        let file = Arc::new(DirectFile::open(&v.experts_path())?);
        let offsets: Vec<Vec<u64>> = v
            .manifest
            .experts
            .iter()
            .map(|l| l.offsets.clone())
            .collect();
        probe_reads(file, &offsets, v.max_record_len() as usize)?
    } else if gguf::is_gguf(model) {
        let (file, offsets) = gguf_records(&Gguf::open(model)?, len as u64)?;
        probe_reads(file, &offsets, len)?
    } else {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent().unwrap_or(Path::new("."))
        };
        probe_disk(dir, len)?
    };
    let &(n, s) = reads
        .last()
        .ok_or_else(|| Error::invalid("no disk reads measured"))?;
    let disk_gbps = (n * len) as f64 / s / 1e9;
    let mem_gbps = probe::head_rate(sizes)?;
    // Between two uses of one layer a decoded token streams the others and
    // the LM head.
    let k = sizes.config.num_experts_per_tok as u64;
    let one = sizes.layer_bytes.iter().max().copied().unwrap_or(0) + k * sizes.record_bytes;
    let between = (sizes.resident_bytes() + sizes.expert_bytes_per_token()).saturating_sub(one);
    let layer = probe::layer(sizes, between)?;
    let per_layer = sizes.active_params() as f64 / sizes.config.num_hidden_layers.max(1) as f64;
    Ok(Machine {
        ram,
        disk_gbps,
        reads,
        mem_gbps,
        gflops: 2.0 * PROMPT_TOKENS as f64 * per_layer / layer.prefill_s / 1e9,
        loop_us: 0.0,
        cores: threads(),
        layer: Some(layer),
        measured: true,
        mem_measured: true,
    })
}

/// Batch sizes the read probe times.
const BATCHES: [usize; 5] = [1, 2, 4, 8, 16];

/// Seconds to read `n` records of `len` bytes at once (each batch through
/// the engine's reader pool, as it takes a layer's `n` misses), for each of
/// [`BATCHES`]: the median of [`ROUNDS`] rounds, each timing every batch
/// size once, after one round not counted. `offsets` are the records'
/// starts by layer: a batch reads records of one layer, the next batch the
/// next layer's, as decoding does.
///
/// Every round reads the same records: the timed reads are re-reads, as
/// nearly all of the engine's are (its misses are the same experts again
/// and again). A disk behind a cache of its own (a cloud VM's virtual
/// disk, a RAID controller) serves those faster than a first read: 8
/// records of 2.5 MiB never read before took 200-250 ms on the build VM's
/// disk and 37-51 ms when read again (for a model larger than such a
/// cache this is optimistic: give `--disk-gbps`). Rounds rather than all of one
/// size and then the next, because such a disk's rate drifts over seconds.
/// A batch can take no longer than a larger one, so a small batch's outlier
/// (a reader thread scheduled late) is capped by the larger batches' times.
fn probe_reads(
    file: Arc<DirectFile>,
    offsets: &[Vec<u64>],
    len: usize,
) -> Result<Vec<(usize, f64)>> {
    let layers: Vec<&Vec<u64>> = offsets.iter().filter(|l| !l.is_empty()).collect();
    if layers.is_empty() {
        return Err(Error::format(&file.path, "no expert records to read"));
    }
    let reader = crate::bench::RecordReader::new(BATCHES[BATCHES.len() - 1], len);
    // Reads as the engine waits for them: its kernel threads spinning (see
    // `stay_awake`), so no core is halted when a read completes. On a
    // 16-vCPU guest an idle machine's reads took 2.3 ms a record against
    // the engine's 1.55.
    let _awake = crate::kernels::stay_awake();
    crate::kernels::for_each_task(crate::kernels::threads(), |_| {});
    // One round's batches: the i-th on layer i, its records a stride prime
    // to the layer's count apart, none twice where the layer has enough.
    let mut used = vec![0usize; layers.len()];
    let round: Vec<Vec<(u64, usize)>> = BATCHES
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let l = i % layers.len();
            (0..n)
                .map(|_| {
                    used[l] += 1;
                    (layers[l][(used[l] * 7919) % layers[l].len()], len)
                })
                .collect()
        })
        .collect();
    for records in &round {
        reader.read(&file, records)?;
    }
    let mut times = vec![Vec::with_capacity(ROUNDS); BATCHES.len()];
    for _ in 0..ROUNDS {
        for (t, records) in times.iter_mut().zip(&round) {
            t.push(reader.read(&file, records)?);
        }
    }
    let mut out: Vec<(usize, f64)> = BATCHES
        .into_iter()
        .zip(times)
        .map(|(n, mut t)| {
            t.sort_by(f64::total_cmp);
            (n, t[t.len() / 2])
        })
        .collect();
    for i in (0..out.len() - 1).rev() {
        out[i].1 = out[i].1.min(out[i + 1].1);
    }
    Ok(out)
}

/// Rounds of the read probe: with [`BATCHES`], 279 reads, a second or two
/// on a disk that reads 2.5 MiB records in 2 ms.
const ROUNDS: usize = 9;

/// [`probe_reads`] on a file of records of `len` bytes written in `dir`
/// and removed.
fn probe_disk(dir: &Path, len: usize) -> Result<Vec<(usize, f64)>> {
    const CHUNK: usize = 1 << 20;
    let records = ((512usize << 20) / len).clamp(1, 64);
    let size = (records * len).next_multiple_of(CHUNK);
    let path = dir.join(format!(".smoe-plan-probe-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&path)?;
        // Data that no filesystem compresses or dedups into nothing.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let chunk: Vec<u8> = (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for _ in 0..size / CHUNK {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    };
    let result = write().map_err(|e| Error::io(&path, e)).and_then(|()| {
        let file = Arc::new(DirectFile::open(&path)?);
        let offsets: Vec<u64> = (0..records).map(|i| (i * len) as u64).collect();
        probe_reads(file, &[offsets], len)
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// Reads a model for planning: a vault, a GGUF file (or a shard of a
/// split set), a checkpoint directory or a bare config.json (then the vault
/// `smoe convert` would make with these types).
pub fn sizes_of(model: &Path, experts: DType, backbone: DType) -> Result<Sizes> {
    if gguf::is_gguf(model) {
        return Sizes::of_gguf(&Gguf::open(model)?);
    }
    if vault::is_vault(model) {
        return Sizes::of_vault(&Vault::open(model)?);
    }
    let path = if model.is_dir() {
        model.join("config.json")
    } else {
        model.to_path_buf()
    };
    let config = ModelConfig::from_json(&read_json(&path)?, &path)?;
    Sizes::of_config(config, experts, backbone).map_err(|e| match e {
        Error::Invalid(msg) => Error::format(&path, msg),
        e => e,
    })
}

/// The whole plan as one JSON object, for tools.
pub fn to_json(
    sizes: &Sizes,
    plan: &MemoryPlan,
    m: &Machine,
    curve: &HitCurve,
    f: &Forecast,
) -> Value {
    json!({
        "model": {
            "model_type": sizes.config.family.model_types[0],
            "source": sizes.source,
            "quant": sizes.quant,
            "params": sizes.backbone_params + sizes.expert_params,
            "active_params": sizes.active_params(),
            "bf16_bytes": sizes.bf16_bytes(),
            "backbone_bytes": sizes.resident,
            "embedding_on_disk_bytes": sizes.embed_on_disk,
            "expert_bytes": sizes.experts,
            "expert_record_bytes": sizes.record_bytes,
            "expert_records": sizes.records,
            "moe_layers": sizes.moe_layers,
        },
        "machine": {
            "ram_bytes": m.ram,
            "disk_gbps": m.disk_gbps,
            "reads_s": m.reads,
            "mem_gbps": m.mem_gbps,
            "gflops": m.gflops,
            "loop_us": m.loop_us,
            "layer_s": m.layer.map(|l| json!({"prefill": l.prefill_s, "session": l.session_s, "decode": l.decode_s})),
            "cores": m.cores,
            "measured": m.measured,
            "mem_measured": m.mem_measured,
        },
        "memory": {
            "ram": {
                "backbone_bytes": plan.backbone_bytes,
                "kv_bytes": plan.kv_bytes,
                "ctx": plan.ctx,
                "sequences": plan.sequences,
                "activation_bytes": plan.activation_bytes,
                "headroom_bytes": plan.headroom_bytes,
                "expert_cache_bytes": plan.cache_bytes,
                "expert_cache_slots": plan.cache_slots,
                "expert_fraction": fraction(sizes, plan),
                "free_bytes": plan.room_bytes.unwrap_or(0).saturating_sub(plan.cache_bytes),
            },
            "ssd": {"bytes": ssd_bytes(sizes)},
        },
        "locality": {
            "model": "decode hit rate h(f), linear between measured points of fraction cached f, through (0,0) and (1,1) unless measured; 0 below one token's experts",
            "source": curve.source,
            "points": curve.points,
            "hit_rate": f.hit_rate,
            "prefill_model": "a prompt touches U = E(1-(1-k/E)^512) experts per layer; the LFU cache keeps s = (C-U)/(L-1) of each layer's from prompt to prompt",
            "prefill_hit_rate": f.prefill_hit_rate,
            "recalibrate": "smoe bench --model VAULT --prompts FILE --ram-budget SIZE --json >> curve.jsonl (a few budgets), then smoe plan --hit-curve curve.jsonl",
        },
        "per_token": {
            "ram_bytes": f.ram_bytes_per_token,
            "kv_bytes": f.kv_bytes_per_token,
            "ssd_bytes": f.ssd_bytes_per_token,
        },
        "forecast": {
            "decode_compute_s": f.decode_compute_s.json(),
            "decode_read_s": f.decode_read_s.json(),
            "decode_tok_s": f.decode_tok_s.json(),
            "decode_limit": f.decode_limit,
            "prompt_tokens": PROMPT_TOKENS,
            "prefill_compute_s": f.prefill_compute_s.json(),
            "prefill_read_s": f.prefill_read_s.json(),
            "prefill_tok_s": f.prefill_tok_s.json(),
            "prefill_limit": f.prefill_limit,
            "ttft_s": f.ttft_s.json(),
            "ttft_cold_s": f.ttft_cold_s.json(),
            "prefill_read_bytes": {"warm": f.prefill_read.0, "cold": f.prefill_read.1},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A published config of `fixtures/configs/`, q4_k throughout.
    pub(super) fn fixture(name: &str) -> Sizes {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/configs")
            .join(name)
            .join("config.json");
        let q4k = DType::Quant(QuantType::Q4K);
        sizes_of(&path, q4k, q4k).unwrap()
    }

    fn qwen3_235b() -> Sizes {
        fixture("Qwen3-235B-A22B")
    }

    fn laptop(loop_us: f64) -> Machine {
        Machine {
            ram: 48 << 30,
            disk_gbps: 6.0,
            mem_gbps: 270.0,
            reads: Vec::new(),
            gflops: 400.0,
            loop_us,
            cores: 12,
            layer: None,
            measured: false,
            mem_measured: false,
        }
    }

    #[test]
    fn the_limit_moves_from_ssd_to_memory_as_the_cache_grows() {
        let s = qwen3_235b();
        let curve = HitCurve::builtin();
        let at = |f: f64, ram: u64, loop_us: f64| {
            let m = Machine {
                ram,
                ..laptop(loop_us)
            };
            let t = memory_plan(&s, ram, share(&s, f), 4096, 1).unwrap();
            forecast(&s, &t, &m, &curve)
        };
        let small = at(0.1, 48 << 30, 5.0);
        let whole = at(1.0, 256 << 30, 5.0);
        assert_eq!(small.decode_limit, "SSD reads of expert misses");
        assert!(whole.decode_limit.starts_with("memory bandwidth"));
        assert!(small.ssd_bytes_per_token > 10 * whole.ssd_bytes_per_token);
        assert!(small.decode_tok_s.high < whole.decode_tok_s.low);
        // The same token's bytes on a CPU whose loops wait a time slice.
        let busy = at(1.0, 256 << 30, 10_000.0);
        assert!(busy.decode_limit.starts_with("the threads' hand-offs"));
        assert!(busy.decode_tok_s.high < whole.decode_tok_s.low);
        for f in [&small, &whole] {
            assert!(f.ttft_s.low <= f.ttft_s.high && f.prefill_read.0 <= f.prefill_read.1);
        }
    }

    #[test]
    fn a_cache_below_one_tokens_experts_hits_nothing() {
        let s = qwen3_235b();
        // 94 sparse layers x top-8 = 752 slots; 700 is less.
        let bytes = 700 * s.record_bytes;
        let t = memory_plan(&s, 256 << 30, Budget::Bytes(bytes), 4096, 1).unwrap();
        assert_eq!(t.cache_slots, 700);
        let f = forecast(&s, &t, &laptop(5.0), &HitCurve::builtin());
        assert_eq!(f.hit_rate, 0.0);
        assert_eq!(f.ssd_bytes_per_token, s.expert_bytes_per_token());
    }

    #[test]
    fn misses_wait_for_the_batch_they_make() {
        let m = Machine {
            reads: vec![(1, 0.010), (2, 0.012), (4, 0.016), (8, 0.024), (16, 0.040)],
            ..laptop(5.0)
        };
        assert_eq!(m.read_s(0.0, 1), 0.0);
        assert!((m.read_s(3.0, 1) - 0.014).abs() < 1e-12);
        // Past 16 at once, 16 stay in flight.
        assert!((m.read_s(32.0, 1) - 0.080).abs() < 1e-12);
        assert_eq!(m.misses_s(8, 0.0, 1, 0.0), 0.0);
        assert!((m.misses_s(8, 1.0, 1, 0.0) - 0.024).abs() < 1e-12);
        // Each of two misses with p = 1/2: one read half the time, two a quarter.
        assert!((m.misses_s(2, 0.5, 1, 0.0) - (0.5 * 0.010 + 0.25 * 0.012)).abs() < 1e-12);
        // The other expert computing for 4 ms hides as much of one read,
        assert!((m.misses_s(2, 0.5, 1, 0.004) - (0.5 * 0.006 + 0.25 * 0.012)).abs() < 1e-12);
        // and for longer than the read all of it.
        assert!((m.misses_s(2, 0.5, 1, 0.020) - 0.25 * 0.012).abs() < 1e-12);
        // A given machine reads at its GB/s.
        assert!((laptop(5.0).read_s(2.0, 3_000_000) - 0.001).abs() < 1e-12);
    }

    #[test]
    fn a_prompt_finds_the_lfu_stable_share_of_its_experts() {
        let s = fixture("Qwen3-30B-A3B");
        let at = |f: f64| {
            let t = memory_plan(&s, 256 << 30, share(&s, f), 4096, 1).unwrap();
            forecast(&s, &t, &laptop(5.0), &HitCurve::builtin())
        };
        let whole = at(1.0);
        assert_eq!(whole.prefill_hit_rate, 1.0);
        assert_eq!(whole.prefill_read.0, 0);
        // 512 tokens of top-8 touch nearly all 128 experts of each of the
        // 48 layers; a tenth of the records keeps (C - U) / 47 a layer.
        let tenth = at(0.1);
        let slots = memory_plan(&s, 256 << 30, share(&s, 0.1), 4096, 1)
            .unwrap()
            .cache_slots;
        let (c, u) = (slots as f64, 128.0 * (1.0 - (120.0f64 / 128.0).powi(512)));
        assert!((tenth.prefill_hit_rate - (c - u) / (47.0 * u)).abs() < 1e-9);
        assert!(tenth.ttft_s.expected > whole.ttft_s.expected);
        assert!(tenth.ttft_cold_s.expected >= tenth.ttft_s.expected);
    }

    #[test]
    fn a_prompt_pays_a_new_session_once_not_once_per_layer() {
        let s = fixture("Qwen3-30B-A3B");
        let t = memory_plan(&s, 256 << 30, share(&s, 1.0), 4096, 1).unwrap();
        let at = |session_s: f64| {
            let m = Machine {
                layer: Some(LayerTimes {
                    prefill_s: 0.05,
                    session_s,
                    decode_s: 0.001,
                }),
                measured: true,
                mem_measured: true,
                ..laptop(5.0)
            };
            forecast(&s, &t, &m, &HitCurve::builtin()).prefill_compute_s
        };
        let (warm, fresh) = (at(0.0), at(0.04));
        // The measured range's middle: 0.04 s over sqrt(0.85 x 1.15).
        let once = 0.04 / (0.85f64 * 1.15).sqrt();
        assert!((fresh.expected - warm.expected - once).abs() < 1e-9);
        // 48 layers of 50 ms and the LM head.
        assert!(warm.expected > 48.0 * 0.05 / 1.15);
    }

    #[test]
    fn the_curve_interpolates_and_ends_at_one() {
        let c = HitCurve {
            points: vec![(0.5, 0.8)],
            source: String::new(),
        };
        assert_eq!(c.at(0.0), 0.0);
        assert!((c.at(0.25) - 0.4).abs() < 1e-12);
        assert!((c.at(0.75) - 0.9).abs() < 1e-12);
        assert_eq!(c.at(1.0), 1.0);
        let b = HitCurve::builtin();
        assert!(b.at(0.25) > 0.25, "learned routing beats uniform");
    }
}
