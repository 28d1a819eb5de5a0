//! `smoe plan`: whether a model will run on a machine, what goes where, and
//! roughly how fast, known before anything is downloaded.
//!
//! **Sizes.** A vault's are read from its manifest. For a checkpoint or a
//! bare `config.json` the decoder itself says which tensors the config
//! implies: [`Decoder::load`] runs on a source that records every tensor it
//! asks for and hands back zeros (address space, never memory), and each
//! tensor's stored type and bytes come from the conversion recipe
//! ([`recipe`]) and the record layout `smoe convert` writes, so a plan is
//! exact to the byte for the vault `convert` would make.
//!
//! **Locality model.** The expert cache holds a fraction `f` of all expert
//! records (LFU eviction, no read-ahead: the defaults). The decode hit rate
//! is a curve `h(f)`, linear between measured points, through (0, 0) and,
//! without a point at 1, up to (1, 1): a whole-model cache misses only
//! each expert's first use. A cache of fewer slots than one token's experts
//! (sparse layers x top-k) hits nothing: LFU evicts every expert before its
//! next use (measured: 0.0% on the built-in model with 25 slots under 32). The default curve was measured on the built-in
//! model's learned routing (`smoe bench --prompts models/builtin/eval.json`
//! at budgets of 10-100% of its expert bytes, [`HitCurve::builtin`]); a
//! trained model routes more repetitively than the uniform `h = f`. Any
//! model's own curve comes from `smoe bench --json --prompts FILE` at a few
//! `--ram-budget`s on it: `smoe plan --hit-curve FILE` takes those JSON
//! lines ([`HitCurve::from_bench`]).
//!
//! **Forecast.** What a decoded token costs, as smoe runs it: every resident
//! backbone byte, the top-k experts of every sparse layer and the KV cache
//! are streamed from RAM by the kernels; the misses (`1 - h` of those
//! experts) are read from SSD first, and without read-ahead the layer waits
//! for them, so the two times add. Each of the token's ~12 parallel loops
//! per layer also costs the threads' hand-off, microseconds on an idle CPU
//! but a scheduler time slice on a busy one (measured: ~10 ms a loop on
//! this 2-core VM while other builds ran, which is what decode paid there). Prefill of a 512-token prompt (one
//! chunk) is compute: two flops per active weight per token, plus attention,
//! at the quantized kernels' multi-token rate, plus reading each expert the
//! chunk routes to once per layer (all of them cold; the uncached share warm).
//! Each figure is a range from the spread of how much of a bandwidth the
//! engine gets (narrow when measured here with the engine's own kernels and
//! reader, wide for figures given for another machine); the resource that
//! takes the larger share of the time is named.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::checkpoint::{zeros, MappedFile, TensorSource, Weight};
use crate::config::ModelConfig;
use crate::error::{read_json, Error, Result};
use crate::experts::io::DirectFile;
use crate::kernels::{for_each_task, matmul, threads, DType, Matrix};
use crate::memory::headroom;
use crate::model::{human_bytes, Decoder};
use crate::quant::{quantize_rows, QuantType};
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

    /// Sizes of the vault at `dir`, as stored.
    pub fn of_vault(vault: &Vault) -> Result<Self> {
        let m = &vault.manifest;
        let config = ModelConfig::from_json(&m.config, &vault.dir.join(vault::MANIFEST))?;
        let mut s = Sizes::empty(config, "vault", m.stored_quant());
        for (name, t) in &m.backbone {
            s.add_backbone(name, &t.shape, &t.dtype, t.len);
        }
        for layer in &m.experts {
            let n = layer.offsets.len() as u64;
            for p in &layer.parts {
                *s.experts.entry(p.dtype.clone()).or_default() += n * p.len;
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
        let shapes = Shapes::default();
        Decoder::load(&shapes, &config, None, None)?;
        let seen = shapes.seen.into_inner();
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
        }
    }

    fn add_backbone(&mut self, name: &str, shape: &[usize], dtype: &str, len: u64) {
        let params = shape.iter().product::<usize>() as u64;
        self.backbone_params += params;
        let tied = self.config.tie_word_embeddings;
        if name == LM_HEAD || (tied && name == EMBED) {
            self.lm_head_params = params;
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
            *z = Some(zeros(bytes)?);
        }
        self.seen
            .borrow_mut()
            .push((name.to_string(), shape.to_vec()));
        let map = z.as_ref().ok_or_else(|| Error::invalid("no zero map"))?;
        Ok(map.weight(0..bytes, DType::BF16, shape.to_vec()))
    }
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
    /// Sequential read bandwidth of the disk holding the vault.
    pub disk_gbps: f64,
    /// Memory bandwidth: with `measured`, what the decode kernel streamed
    /// here; else the machine's rated figure.
    pub mem_gbps: f64,
    /// Multi-token quantized matmul rate, GFLOP/s.
    pub gflops: f64,
    /// What one parallel loop costs beyond its work, in microseconds: the
    /// threads' hand-off, a few microseconds on an idle machine and
    /// milliseconds on one whose cores are all taken.
    pub loop_us: f64,
    pub cores: usize,
    /// Measured here by [`measure`] rather than given.
    pub measured: bool,
}

impl Machine {
    /// Share of a figure the engine gets: low and high. Measured figures
    /// are the engine's own kernels and reader; a rated DRAM figure is more
    /// than CPU cores stream (two cores here: 17 of ~20 GB/s).
    fn efficiency(&self) -> Efficiency {
        if self.measured {
            Efficiency {
                mem: (0.8, 1.0),
                disk: (0.6, 1.0),
                compute: (0.6, 1.0),
            }
        } else {
            Efficiency {
                mem: (0.45, 0.85),
                disk: (0.5, 0.9),
                compute: (0.5, 1.0),
            }
        }
    }
}

struct Efficiency {
    mem: (f64, f64),
    disk: (f64, f64),
    compute: (f64, f64),
}

/// How the expert cache is sized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheBudget {
    /// What RAM leaves beside backbone, KV and headroom.
    Auto,
    Bytes(u64),
    /// A share of the expert bytes.
    Fraction(f64),
}

/// Where every byte lives.
#[derive(Debug, Clone)]
pub struct Tiers {
    pub ram: u64,
    pub backbone: u64,
    pub kv: u64,
    pub ctx: usize,
    pub headroom: u64,
    pub cache: u64,
    pub cache_slots: u64,
    pub free: u64,
    /// Expert records and the untied embedding table.
    pub ssd: u64,
}

impl Tiers {
    pub fn plan(sizes: &Sizes, ram: u64, budget: CacheBudget, ctx: usize) -> Result<Self> {
        let c = &sizes.config;
        let ctx = ctx.min(c.max_position_embeddings);
        let kv = c.kv_bytes(ctx);
        let backbone = sizes.resident_bytes();
        let head = headroom(ram);
        let slot = sizes.record_bytes;
        let min_cache = slot * c.num_experts_per_tok as u64;
        if backbone + kv + head + min_cache > ram {
            return Err(Error::invalid(format!(
                "{} of RAM is smaller than the backbone's needs: {} resident + {} KV for {ctx} tokens + {} headroom + {} for one token's experts of one layer = {}; a smaller --ctx, a q4_k backbone, or a machine with more RAM",
                human_bytes(ram),
                human_bytes(backbone),
                human_bytes(kv),
                human_bytes(head),
                human_bytes(min_cache),
                human_bytes(backbone + kv + head + min_cache)
            )));
        }
        let room = ram - backbone - kv - head;
        let asked = match budget {
            CacheBudget::Auto => room,
            CacheBudget::Bytes(b) => b,
            CacheBudget::Fraction(f) => (f * sizes.expert_bytes() as f64) as u64,
        };
        if asked > room {
            return Err(Error::invalid(format!(
                "an expert cache of {} does not fit: {} of RAM leaves {} beside backbone {}, KV {} and headroom {}",
                human_bytes(asked),
                human_bytes(ram),
                human_bytes(room),
                human_bytes(backbone),
                human_bytes(kv),
                human_bytes(head)
            )));
        }
        let slots = asked.checked_div(slot).unwrap_or(0).min(sizes.records);
        if slot > 0 && slots < c.num_experts_per_tok as u64 {
            return Err(Error::invalid(format!(
                "an expert cache of {} holds {slots} experts of {}, but one token needs {} per layer: give --ram-budget {} or more",
                human_bytes(asked),
                human_bytes(slot),
                c.num_experts_per_tok,
                human_bytes(min_cache)
            )));
        }
        let cache = slots * slot;
        Ok(Tiers {
            ram,
            backbone,
            kv,
            ctx,
            headroom: head,
            cache,
            cache_slots: slots,
            free: room - cache,
            ssd: sizes.expert_bytes() + sizes.embed_on_disk,
        })
    }

    /// Share of the expert records the cache holds.
    pub fn fraction(&self, sizes: &Sizes) -> f64 {
        if sizes.records == 0 {
            1.0
        } else {
            self.cache_slots as f64 / sizes.records as f64
        }
    }
}

/// A low-high range and the value between them (their geometric mean).
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub low: f64,
    pub high: f64,
}

impl Range {
    pub fn mid(&self) -> f64 {
        (self.low * self.high).sqrt()
    }

    fn json(&self) -> Value {
        json!({"low": self.low, "high": self.high, "expected": self.mid()})
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
    pub decode_tok_s: Range,
    pub decode_limit: &'static str,
    pub prefill_tok_s: Range,
    pub prefill_limit: &'static str,
    pub ttft_s: Range,
    /// Expert bytes a 512-token prompt reads: warm cache, cold cache.
    pub prefill_read: (u64, u64),
}

/// Parallel loops of one decoded token: a quantized product is two (its
/// activations, then its rows), so a layer's four attention projections,
/// attention, router and routed experts make about 12, a dense MLP or
/// shared expert 6 more, the LM head 2 (the 8-layer bench model: about a
/// hundred, as the README's thread-pool measurement counted).
fn loops_per_token(sizes: &Sizes) -> u64 {
    let c = &sizes.config;
    let layers = c.num_hidden_layers as u64;
    let dense = layers - sizes.moe_layers as u64;
    let shared = if c.shared_expert_intermediate_size > 0 {
        sizes.moe_layers as u64
    } else {
        0
    };
    12 * layers + 6 * (dense + shared) + 2
}

/// The decode and prefill forecast for `sizes` on `m` with `tiers`.
pub fn forecast(sizes: &Sizes, tiers: &Tiers, m: &Machine, curve: &HitCurve) -> Forecast {
    let c = &sizes.config;
    let eff = m.efficiency();
    let f = tiers.fraction(sizes);
    // A cache smaller than one token's experts evicts each of them before
    // its next use: the built-in model's 25 slots, under its 8 x 4, hit 0%.
    let working_set = sizes.moe_layers as u64 * c.num_experts_per_tok as u64;
    let hit = if tiers.cache_slots < working_set.min(sizes.records) {
        0.0
    } else {
        curve.at(f)
    };
    let experts = sizes.expert_bytes_per_token();
    // Decode attends over the prompt and what it wrote: half a context.
    let pos = (PROMPT_TOKENS + 32).min(tiers.ctx);
    let kv = c.kv_bytes(pos);
    let ram = tiers.backbone + experts + kv;
    let ssd = ((1.0 - hit) * experts as f64) as u64;
    let secs = |bytes: u64, gbps: f64, e: f64| bytes as f64 / (gbps * e * 1e9);
    let mem_t = (
        secs(ram, m.mem_gbps, eff.mem.1),
        secs(ram, m.mem_gbps, eff.mem.0),
    );
    let io_t = (
        secs(ssd, m.disk_gbps, eff.disk.1),
        secs(ssd, m.disk_gbps, eff.disk.0),
    );
    let sync = loops_per_token(sizes) as f64 * m.loop_us * 1e-6;
    // The hand-off cost is a busy machine's scheduling: its median moved
    // by a quarter either way between runs here.
    let decode = Range {
        low: 1.0 / (mem_t.1 + io_t.1 + 1.25 * sync),
        high: 1.0 / (mem_t.0 + io_t.0 + 0.75 * sync),
    };
    let io = io_t.0 + io_t.1;
    let mem = mem_t.0 + mem_t.1;
    let decode_limit = if 2.0 * sync > io.max(mem) {
        "the threads' hand-offs between parallel loops (a busy CPU)"
    } else if io > mem {
        "SSD reads of expert misses"
    } else {
        "memory bandwidth (resident weights and cached experts)"
    };

    // Prefill: one chunk of PROMPT_TOKENS, layer-major.
    let t = PROMPT_TOKENS as f64;
    let (e, k) = (c.num_experts.max(1) as f64, c.num_experts_per_tok as f64);
    let touched = e * (1.0 - (1.0 - k / e).powf(t));
    let cold = (sizes.moe_layers as f64 * touched * sizes.record_bytes as f64) as u64;
    let warm = ((1.0 - f) * cold as f64) as u64;
    let attn_dims = match c.mla {
        Some(m) => m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim,
        None => 2 * c.head_dim,
    } * c.num_attention_heads;
    let flops = 2.0 * t * sizes.active_params() as f64
        + 2.0 * sizes.lm_head_params as f64
        + c.num_hidden_layers as f64 * attn_dims as f64 * t * t;
    let compute = |e: f64| flops / (m.gflops * e * 1e9);
    let stream = |e: f64| (tiers.backbone + cold) as f64 / (m.mem_gbps * e * 1e9);
    let fast = compute(eff.compute.1) + stream(eff.mem.1) + secs(warm, m.disk_gbps, eff.disk.1);
    let slow = compute(eff.compute.0) + stream(eff.mem.0) + secs(cold, m.disk_gbps, eff.disk.0);
    let prefill_limit = if secs(cold, m.disk_gbps, eff.disk.0) > compute(eff.compute.0) {
        "SSD reads of the experts the prompt routes to"
    } else {
        "compute (quantized matrix products)"
    };
    Forecast {
        hit_rate: hit,
        ram_bytes_per_token: ram,
        kv_bytes_per_token: kv,
        ssd_bytes_per_token: ssd,
        decode_tok_s: decode,
        decode_limit,
        prefill_tok_s: Range {
            low: t / slow,
            high: t / fast,
        },
        prefill_limit,
        ttft_s: Range {
            low: fast,
            high: slow,
        },
        prefill_read: (warm, cold),
    }
}

/// The machine's figures, measured here: direct reads of `disk_probe` (a
/// vault's experts, else a 256 MiB file written next to the model and
/// removed), the q4_k kernels on this CPU with the configured threads.
pub fn measure(model: &Path, ram: u64) -> Result<Machine> {
    let disk_gbps = if vault::is_vault(model) {
        crate::bench::read_bandwidth(&Vault::open(model)?, 16, 1 << 30)?.0
    } else {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent().unwrap_or(Path::new("."))
        };
        probe_disk(dir)?
    };
    let (mem_gbps, gflops, loop_us) = probe_kernels()?;
    Ok(Machine {
        ram,
        disk_gbps,
        mem_gbps,
        gflops,
        loop_us,
        cores: threads(),
        measured: true,
    })
}

fn probe_disk(dir: &Path) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 256;
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
        for _ in 0..CHUNKS {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    };
    let result = write().map_err(|e| Error::io(&path, e)).and_then(|()| {
        let file = Arc::new(DirectFile::open(&path)?);
        let records: Vec<(u64, usize)> = (0..CHUNKS).map(|i| ((i * CHUNK) as u64, CHUNK)).collect();
        crate::bench::read_records(file, &records, 16)
    });
    let _ = std::fs::remove_file(&path);
    Ok(result?.0)
}

/// The kernels on this CPU: GB/s of weights the one-token q4_k product
/// streams from DRAM (one matrix of 256 MiB, far past any cache), GFLOP/s
/// of the 32-token product at a projection's shape (4096 x 2048), and the
/// time one parallel loop costs beyond its work, in microseconds.
fn probe_kernels() -> Result<(f64, f64, f64)> {
    let q = QuantType::Q4K;
    let cols = 2048;
    let row = q.row_bytes(cols).unwrap_or(0);
    let group = 64;
    let src: Vec<f32> = (0..group * cols)
        .map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut block = vec![0u8; group * row];
    quantize_rows(q, &src, cols, &mut block)?;
    let rows = (256usize << 20) / row / group * group;
    let weights: Vec<u8> = block.iter().copied().cycle().take(rows * row).collect();
    let w = Matrix::new(DType::Quant(q), &weights, rows, cols);
    let t = 32;
    let x = vec![0.5f32; t * cols];
    let mut y = vec![0.0f32; rows.max(t * 4096)];
    // Medians of several passes: on a shared machine one pass may land in
    // another process's time slice, and the median is what a run sees.
    let median = |f: &mut dyn FnMut() -> f64| {
        let mut v: Vec<f64> = (0..5).map(|_| f()).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mem_gbps = median(&mut || {
        let start = Instant::now();
        matmul(&x[..cols], 1, w, &mut y[..rows]);
        (rows * row) as f64 / start.elapsed().as_secs_f64() / 1e9
    });
    let proj = w.rows(0..4096);
    let gflops = median(&mut || {
        let start = Instant::now();
        for _ in 0..4 {
            matmul(&x, t, proj, &mut y[..t * 4096]);
        }
        (4 * 2 * t * 4096 * cols) as f64 / start.elapsed().as_secs_f64() / 1e9
    });
    // Tasks of a few microseconds each, as a decode step's loops have:
    // the loop's cost beyond its work is its time less the work's when run
    // on one thread, shared out over the threads.
    let tasks = 2 * threads();
    let work = |i: usize| {
        let chunk = &weights[i * 65536..(i + 1) * 65536];
        chunk.iter().map(|&b| b as usize).sum::<usize>()
    };
    let sink = AtomicUsize::new(0);
    let loops = 200;
    let loop_us = median(&mut || {
        let start = Instant::now();
        for _ in 0..loops {
            for i in 0..tasks {
                sink.fetch_add(work(i), Ordering::Relaxed);
            }
        }
        let serial = start.elapsed().as_secs_f64() / threads() as f64;
        let start = Instant::now();
        for _ in 0..loops {
            for_each_task(tasks, |i| {
                sink.fetch_add(work(i), Ordering::Relaxed);
            });
        }
        (start.elapsed().as_secs_f64() - serial).max(0.0) * 1e6 / loops as f64
    });
    Ok((mem_gbps, gflops, loop_us))
}

/// Reads a model for planning: a vault, a checkpoint directory or a bare
/// config.json (then the vault `smoe convert` would make with these types).
pub fn sizes_of(model: &Path, experts: DType, backbone: DType) -> Result<Sizes> {
    if model
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return Err(Error::format(
            model,
            "smoe plan does not read GGUF files; give the model's config.json (from the same repository) instead",
        ));
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
    Sizes::of_config(config, experts, backbone)
}

/// The whole plan as one JSON object, for tools.
pub fn to_json(sizes: &Sizes, tiers: &Tiers, m: &Machine, curve: &HitCurve, f: &Forecast) -> Value {
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
            "mem_gbps": m.mem_gbps,
            "gflops": m.gflops,
            "loop_us": m.loop_us,
            "cores": m.cores,
            "measured": m.measured,
        },
        "memory": {
            "ram": {
                "backbone_bytes": tiers.backbone,
                "kv_bytes": tiers.kv,
                "ctx": tiers.ctx,
                "headroom_bytes": tiers.headroom,
                "expert_cache_bytes": tiers.cache,
                "expert_cache_slots": tiers.cache_slots,
                "expert_fraction": tiers.fraction(sizes),
                "free_bytes": tiers.free,
            },
            "ssd": {"bytes": tiers.ssd},
        },
        "locality": {
            "model": "decode hit rate h(f), linear between measured points of fraction cached f, through (0,0) and (1,1) unless measured",
            "source": curve.source,
            "points": curve.points,
            "hit_rate": f.hit_rate,
            "recalibrate": "smoe bench --model VAULT --prompts FILE --ram-budget SIZE --json >> curve.jsonl (a few budgets), then smoe plan --hit-curve curve.jsonl",
        },
        "per_token": {
            "ram_bytes": f.ram_bytes_per_token,
            "kv_bytes": f.kv_bytes_per_token,
            "ssd_bytes": f.ssd_bytes_per_token,
        },
        "forecast": {
            "decode_tok_s": f.decode_tok_s.json(),
            "decode_limit": f.decode_limit,
            "prompt_tokens": PROMPT_TOKENS,
            "prefill_tok_s": f.prefill_tok_s.json(),
            "prefill_limit": f.prefill_limit,
            "ttft_s": f.ttft_s.json(),
            "prefill_read_bytes": {"warm": f.prefill_read.0, "cold": f.prefill_read.1},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen3_235b() -> Sizes {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/configs/Qwen3-235B-A22B/config.json");
        let q4k = DType::Quant(QuantType::Q4K);
        sizes_of(&path, q4k, q4k).unwrap()
    }

    fn laptop(loop_us: f64) -> Machine {
        Machine {
            ram: 48 << 30,
            disk_gbps: 6.0,
            mem_gbps: 270.0,
            gflops: 400.0,
            loop_us,
            cores: 12,
            measured: false,
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
            let t = Tiers::plan(&s, ram, CacheBudget::Fraction(f), 4096).unwrap();
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
        let t = Tiers::plan(&s, 256 << 30, CacheBudget::Bytes(bytes), 4096).unwrap();
        assert_eq!(t.cache_slots, 700);
        let f = forecast(&s, &t, &laptop(5.0), &HitCurve::builtin());
        assert_eq!(f.hit_rate, 0.0);
        assert_eq!(f.ssd_bytes_per_token, s.expert_bytes_per_token());
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
