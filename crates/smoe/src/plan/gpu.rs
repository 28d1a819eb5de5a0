//! The plan on a CUDA GPU: what goes to VRAM, what streams from RAM over
//! PCIe (or runs on the CPU), what from the SSD, and how fast that decodes.
//!
//! VRAM is placed as `run --device cuda --vram-budget auto` places it
//! (`model::GpuDecoder`): the backbone and the KV caches, a headroom of a
//! twentieth of the device (at least 2 GiB), then routed experts a whole
//! layer at a time, first layers first, while they fit. The layers left
//! stream through the RAM expert cache as on the CPU; a decoded token's
//! chosen experts cross PCIe to the GPU, or run on the CPU from their
//! slots, or split between the two at once, whichever the engine finds
//! faster, so the forecast takes the fastest of the three rates.
//!
//! The GPU's own time is the one figure not derived from bytes: at these
//! sizes a decoded token's layer is bound by kernel launches, not by HBM.
//! It is taken from this engine measured on an H100 (`bench/cuda.sh` at
//! 998069f, the 8-layer Qwen3-30B-A3B q4_k vault with every expert in
//! VRAM: 1,598.6 tok/s decode, 31,117 tok/s prefill of 512 tokens; the
//! q6_k LM head at 2,360 GB/s in `cuda_bench` at 389b76e), and can be
//! given for another GPU. (The H200 figures of 3a745b5, 408.1 and
//! 5,976 tok/s, were an engine three times slower.)

use serde_json::{json, Value};

use super::{
    fraction, prompt_hit, prompt_touched, time, HitCurve, Machine, Range, Sizes, PROMPT_TOKENS,
};
use crate::error::{Error, Result};
use crate::memory::{vram_headroom, Budget, MemoryPlan};
use crate::model::human_bytes;

/// One decoded token's layer on the H100, seconds: (1 / 1,598.6 - the LM
/// head's 0.108 ms) / 8 layers.
pub const MEASURED_LAYER_DECODE_S: f64 = 0.0647e-3;
/// One layer over a 512-token prompt on the H100, seconds: 512 / 31,117
/// / 8 layers.
pub const MEASURED_LAYER_PREFILL_S: f64 = 2.06e-3;
/// The LM head's matrix-vector product on the H100, GB/s.
pub const MEASURED_HEAD_GBPS: f64 = 2360.0;
/// Host-to-device copies when no figure is given: PCIe 4.0 x16 as
/// measured on common desktops from page-locked memory.
pub const DEFAULT_PCIE_GBPS: f64 = 25.0;
/// The share of the CPU's and the copies' rates added that a layer split
/// between the two gets: 74.8 GB/s against 53.5 + 47.2 on the H100 bench
/// machine (`smoe bench`'s ways, db10a79), the two drawing on one host's
/// memory and the layer waiting for the slower side.
pub const SPLIT_SHARE: f64 = 0.74;

/// The GPU a plan is for.
#[derive(Debug, Clone, Copy)]
pub struct Gpu {
    pub vram: u64,
    pub pcie_gbps: f64,
    /// Seconds of one layer of a decoded token, and of one layer over a
    /// 512-token prompt, on this GPU.
    pub layer_decode_s: f64,
    pub layer_prefill_s: f64,
    pub head_gbps: f64,
    /// Whether the GPU figures are the measured H100's defaults.
    pub assumed: bool,
}

/// VRAM by use.
#[derive(Debug, Clone)]
pub struct VramPlan {
    pub vram: u64,
    pub backbone_bytes: u64,
    pub kv_bytes: u64,
    pub headroom_bytes: u64,
    /// Sparse layers whose routed experts are all in VRAM, and their bytes.
    pub expert_layers: usize,
    pub expert_bytes: u64,
}

/// VRAM as the engine fills it, routed experts up to `budget` (`Auto`: all
/// the backbone, KV and headroom leave); an error where those alone do not
/// fit.
pub fn vram_plan(sizes: &Sizes, ram: &MemoryPlan, vram: u64, budget: Budget) -> Result<VramPlan> {
    let (backbone, kv, head) = (sizes.resident_bytes(), ram.kv_bytes, vram_headroom(vram));
    let need = backbone + kv + head;
    if need > vram {
        return Err(Error::invalid(format!(
            "a GPU of {} cannot hold the backbone {} + KV {} + headroom {} = {}",
            human_bytes(vram),
            human_bytes(backbone),
            human_bytes(kv),
            human_bytes(head),
            human_bytes(need)
        )));
    }
    let layer = sizes.config.num_experts as u64 * sizes.record_bytes;
    let room = match budget {
        Budget::Auto => vram - need,
        Budget::Bytes(b) if b > vram - need => {
            return Err(Error::invalid(format!(
                "a VRAM budget of {} does not fit: a GPU of {} holds {} of experts beside the \
                 backbone {} + KV {} + headroom {}",
                human_bytes(b),
                human_bytes(vram),
                human_bytes(vram - need),
                human_bytes(backbone),
                human_bytes(kv),
                human_bytes(head)
            )));
        }
        Budget::Bytes(b) => b,
    };
    let expert_layers = match layer {
        0 => 0,
        l => ((room / l) as usize).min(sizes.moe_layers),
    };
    Ok(VramPlan {
        vram,
        backbone_bytes: backbone,
        kv_bytes: kv,
        headroom_bytes: head,
        expert_layers,
        expert_bytes: expert_layers as u64 * layer,
    })
}

#[derive(Debug, Clone)]
pub struct GpuForecast {
    /// Decode hit rate of the RAM cache over the layers that stream.
    pub hit_rate: f64,
    /// The share of a prompt's experts in those layers the cache holds.
    pub prompt_hit_rate: f64,
    pub streamed_layers: usize,
    /// Per decoded token: expert bytes that come from RAM (to the GPU or
    /// to the CPU) and from the SSD.
    pub streamed_bytes_per_token: u64,
    pub ssd_bytes_per_token: u64,
    /// How a decoded token's streamed experts run, the fastest way here:
    /// copied over PCIe, on the CPU, or split between the two.
    pub stream_way: &'static str,
    pub decode_gpu_s: Range,
    pub decode_stream_s: Range,
    pub decode_read_s: Range,
    pub decode_tok_s: Range,
    pub decode_limit: &'static str,
    pub prefill_tok_s: Range,
    pub ttft_s: Range,
    pub prefill_limit: &'static str,
}

/// Decode and a 512-token prompt on `gpu` with `vram` placed and `ram`'s
/// expert cache under the layers that stream.
pub fn forecast(
    sizes: &Sizes,
    ram: &MemoryPlan,
    vram: &VramPlan,
    m: &Machine,
    gpu: &Gpu,
    curve: &HitCurve,
) -> GpuForecast {
    let c = &sizes.config;
    let eff = m.efficiency();
    let k = c.num_experts_per_tok;
    let layers = c.num_hidden_layers.max(1);
    let streamed = sizes.moe_layers - vram.expert_layers;
    let record = sizes.record_bytes;
    // The cache serves only the streamed layers' records.
    let share = streamed as f64 / sizes.moe_layers.max(1) as f64;
    let f = (fraction(sizes, ram) / share.max(1e-9)).min(1.0);
    let hit = if streamed == 0 {
        1.0
    } else if (ram.cache_slots as u64) < (streamed * k) as u64 {
        0.0
    } else {
        curve.at(f)
    };
    let per_layer = k as u64 * record;
    // The fastest way for a small batch's experts: copied over PCIe, run
    // by the CPU where they lie (its decode streams a matrix once), or a
    // layer's experts split between the two.
    let (way, stream_gbps) = [
        ("the CPU", m.mem_gbps),
        ("PCIe", gpu.pcie_gbps),
        (
            "the CPU and PCIe, split",
            SPLIT_SHARE * (m.mem_gbps + gpu.pcie_gbps),
        ),
    ]
    .into_iter()
    .max_by(|a, b| a.1.total_cmp(&b.1))
    .expect("three ways");
    let gpu_eff = if gpu.assumed { (0.5, 1.5) } else { (0.8, 1.2) };
    let decode_gpu = time(
        layers as f64 * gpu.layer_decode_s + sizes.lm_head_bytes as f64 / (gpu.head_gbps * 1e9),
        gpu_eff,
    );
    let decode_stream = time(
        (streamed as u64 * per_layer) as f64 / (stream_gbps * 1e9),
        eff.mem,
    );
    let decode_read = time(
        streamed as f64 * m.misses_s(k, 1.0 - hit, record, 0.0),
        eff.disk,
    );
    let decode = super::sum(super::sum(decode_gpu, decode_stream), decode_read);
    let decode_limit = limit([
        (decode_gpu, "the GPU (kernel launches at these sizes)"),
        (
            decode_stream,
            "streamed experts from RAM (PCIe, the CPU or both, the fastest)",
        ),
        (decode_read, "SSD reads of expert misses"),
    ]);

    // A prompt copies each expert it routes to in a streamed layer once
    // (one copy serves all its rows), reading the misses first. The copies
    // of a layer overlap its compute (the engine runs the uploaded experts
    // a group at a time while the next group copies), so a streamed
    // layer takes the longer of the two.
    // The prompt's hit rate, not decode's: a prompt touches most of a
    // layer's experts, and the cache keeps only a share of each streamed
    // layer's between prompts.
    let touched = prompt_touched(c);
    let prompt_hit = prompt_hit(ram.cache_slots as f64, streamed as f64, touched);
    let prefill_copy = time(
        streamed as f64 * touched * record as f64 / (gpu.pcie_gbps * 1e9),
        eff.mem,
    );
    let prefill_read = time(
        streamed as f64 * m.read_s(touched * (1.0 - prompt_hit), record),
        eff.disk,
    );
    let streamed_gpu = time(streamed as f64 * gpu.layer_prefill_s, gpu_eff);
    let resident_gpu = time((layers - streamed) as f64 * gpu.layer_prefill_s, gpu_eff);
    let prefill_gpu = super::sum(resident_gpu, streamed_gpu);
    let prefill_layers = super::sum(resident_gpu, super::longer(streamed_gpu, prefill_copy));
    let ttft = super::sum(prefill_layers, prefill_read);
    let prefill_limit = limit([
        (prefill_gpu, "the GPU"),
        (prefill_copy, "PCIe copies of the prompt's experts"),
        (prefill_read, "SSD reads of the prompt's experts"),
    ]);
    GpuForecast {
        hit_rate: hit,
        prompt_hit_rate: prompt_hit,
        streamed_layers: streamed,
        streamed_bytes_per_token: streamed as u64 * per_layer,
        ssd_bytes_per_token: ((1.0 - hit) * (streamed as u64 * per_layer) as f64) as u64,
        stream_way: way,
        decode_gpu_s: decode_gpu,
        decode_stream_s: decode_stream,
        decode_read_s: decode_read,
        decode_tok_s: Range::rate(1.0, decode),
        decode_limit,
        prefill_tok_s: Range::rate(PROMPT_TOKENS as f64, ttft),
        ttft_s: ttft,
        prefill_limit,
    }
}

/// The part that takes longest, by its expected time.
fn limit(parts: [(Range, &'static str); 3]) -> &'static str {
    parts
        .into_iter()
        .max_by(|a, b| a.0.expected.total_cmp(&b.0.expected))
        .map_or("", |(_, what)| what)
}

pub fn to_json(v: &VramPlan, g: &Gpu, f: &GpuForecast) -> Value {
    json!({
        "vram": {
            "bytes": v.vram,
            "backbone_bytes": v.backbone_bytes,
            "kv_bytes": v.kv_bytes,
            "headroom_bytes": v.headroom_bytes,
            "expert_layers": v.expert_layers,
            "expert_bytes": v.expert_bytes,
        },
        "figures": {
            "pcie_gbps": g.pcie_gbps,
            "layer_decode_s": g.layer_decode_s,
            "layer_prefill_s": g.layer_prefill_s,
            "head_gbps": g.head_gbps,
            "assumed": g.assumed,
        },
        "streamed_layers": f.streamed_layers,
        "ram_hit_rate": f.hit_rate,
        "ram_prompt_hit_rate": f.prompt_hit_rate,
        "per_token": {
            "streamed_bytes": f.streamed_bytes_per_token,
            "streamed_way": f.stream_way,
            "ssd_bytes": f.ssd_bytes_per_token,
        },
        "forecast": {
            "decode_gpu_s": f.decode_gpu_s.json(),
            "decode_stream_s": f.decode_stream_s.json(),
            "decode_read_s": f.decode_read_s.json(),
            "decode_tok_s": f.decode_tok_s.json(),
            "decode_limit": f.decode_limit,
            "prompt_tokens": PROMPT_TOKENS,
            "prefill_tok_s": f.prefill_tok_s.json(),
            "ttft_s": f.ttft_s.json(),
            "prefill_limit": f.prefill_limit,
        },
    })
}
