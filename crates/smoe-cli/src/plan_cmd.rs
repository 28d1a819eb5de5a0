//! `smoe plan MODEL`: the memory plan and speed forecast of a model (a
//! vault, a GGUF, a checkpoint, or a bare config.json) on this machine or on one
//! described by flags or a TOML file; the model lives in `smoe::plan`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use smoe::compute::Device;
use smoe::kernels::DType;
use smoe::model::{available_memory, human_bytes, parse_bytes, Budget, MemoryPlan};
use smoe::plan::{self, gpu, HitCurve, Machine, Sizes};

/// q4_k GFLOP/s per core of the multi-token product, for a machine given
/// without `gflops`: what `smoe plan --measure` found on a 2-core AVX2
/// x86-64 VM (2026-12-02). Other CPUs differ; give `--gflops` when known.
const GFLOPS_PER_CORE: f64 = 30.0;

/// What one parallel loop costs an idle machine beyond its work, for a
/// machine given without `loop_us`: smoe's pool hands a loop to spinning
/// workers in microseconds (README, the thread pool's A/B).
const IDLE_LOOP_US: f64 = 5.0;

#[derive(Args)]
pub(crate) struct PlanArgs {
    /// A vault, a GGUF file (or the first shard of a split set), a
    /// checkpoint directory, or a bare config.json.
    model: PathBuf,
    /// Type of the routed experts in the vault to plan for (ignored for a
    /// vault or a GGUF, which are planned as stored).
    #[arg(long, default_value = "q4_k")]
    quant: String,
    /// Type of the backbone, with the recipe's exceptions.
    #[arg(long, default_value = "q4_k")]
    backbone: String,
    /// Memory of the machine (default: what is available here).
    #[arg(long, value_name = "SIZE")]
    ram: Option<String>,
    /// Expert cache: auto (what RAM leaves), a size, or a share of the
    /// expert bytes such as 25%.
    #[arg(long, default_value = "auto")]
    ram_budget: String,
    /// Context the KV cache is planned for.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Sequences decoding at once, each with a KV cache of --ctx tokens:
    /// `serve --parallel` (run and chat decode one), which takes 1 to 256.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
    /// Where the model runs: cpu, cuda, cuda:N, or auto (the GPU where
    /// there is one). On a GPU: the backbone, KV and as many layers'
    /// experts as fit in VRAM, the rest streamed from RAM over PCIe or run
    /// on the CPU.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPU memory, for --device cuda (default: the GPU's, when this binary
    /// has CUDA and finds it).
    #[arg(long, value_name = "SIZE")]
    vram: Option<String>,
    /// VRAM for routed experts, as run's --vram-budget: auto (what the
    /// GPU leaves), a size, or a share of the expert bytes such as 25%;
    /// whole layers, first layers first, up to it.
    #[arg(long, default_value = "auto")]
    vram_budget: String,
    /// Measure this machine: direct reads on the model's disk and the
    /// kernels' memory bandwidth and compute (the default for any figure
    /// not given).
    #[arg(long)]
    measure: bool,
    /// Sequential read GB/s of the disk holding the model.
    #[arg(long, value_name = "GB/S")]
    disk_gbps: Option<f64>,
    /// Memory bandwidth in GB/s.
    #[arg(long, value_name = "GB/S")]
    mem_gbps: Option<f64>,
    /// Host-to-GPU GB/s from page-locked memory, for --device cuda
    /// (default 25, PCIe 4.0 x16).
    #[arg(long, value_name = "GB/S")]
    pcie_gbps: Option<f64>,
    /// Quantized multi-token matmul GFLOP/s of all cores.
    #[arg(long, value_name = "GFLOP/S")]
    gflops: Option<f64>,
    /// CPU cores (for the GFLOP/s estimate when --gflops is not given).
    #[arg(long, value_name = "N")]
    cores: Option<usize>,
    /// A target machine's figures: ram, disk_gbps, mem_gbps, gflops, cores,
    /// as TOML; flags override it.
    #[arg(long, value_name = "FILE.toml")]
    machine: Option<PathBuf>,
    /// The decode hit-rate curve from `smoe bench --json` runs of this
    /// model at a few --ram-budget values (JSON lines).
    #[arg(long, value_name = "FILE")]
    hit_curve: Option<PathBuf>,
    /// Kernel threads for --measure (default: one per physical core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// A machine described in TOML.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MachineFile {
    name: Option<String>,
    ram: Option<String>,
    disk_gbps: Option<f64>,
    mem_gbps: Option<f64>,
    gflops: Option<f64>,
    cores: Option<usize>,
    loop_us: Option<f64>,
    /// mem_gbps and pcie_gbps are this engine's own rates measured on
    /// that machine (`smoe bench`'s ways), not rated figures, so the
    /// forecast takes the narrow range for them that a plan measured here
    /// takes. A disk probe is not what a layer's few reads get: disk_gbps
    /// keeps the wide range.
    rates_measured: Option<bool>,
    /// The GPU, for --device cuda: its memory, host-to-device GB/s,
    /// milliseconds of one layer of a decoded token and of one layer over
    /// a 512-token prompt, and the LM head's GB/s (default: this engine on
    /// an H100).
    vram: Option<String>,
    pcie_gbps: Option<f64>,
    gpu_layer_decode_ms: Option<f64>,
    gpu_layer_prefill_ms: Option<f64>,
    gpu_head_gbps: Option<f64>,
}

/// Keys a machine file may have, for the message that names a wrong one.
const MACHINE_KEYS: &str = "name, ram, disk_gbps, mem_gbps, gflops, cores, loop_us, rates_measured, vram, pcie_gbps, gpu_layer_decode_ms, gpu_layer_prefill_ms, gpu_head_gbps";

fn machine_file(path: &Path) -> Result<MachineFile> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let m: MachineFile = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {} (expected keys: {MACHINE_KEYS})",
            path.display(),
            e.to_string().trim_end().replace('\n', " ")
        )
    })?;
    let at = |key: &str| format!("{}: {key}", path.display());
    positive([
        (at("disk_gbps"), m.disk_gbps),
        (at("mem_gbps"), m.mem_gbps),
        (at("gflops"), m.gflops),
        (at("pcie_gbps"), m.pcie_gbps),
        (at("gpu_layer_decode_ms"), m.gpu_layer_decode_ms),
        (at("gpu_layer_prefill_ms"), m.gpu_layer_prefill_ms),
        (at("gpu_head_gbps"), m.gpu_head_gbps),
    ])?;
    if m.loop_us.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
        bail!(
            "{}: loop_us must be a number of microseconds, 0 or more",
            path.display()
        );
    }
    if m.cores == Some(0) {
        bail!("{}: cores must be at least 1", path.display());
    }
    Ok(m)
}

/// Refuses a figure given as zero, negative or not a number.
fn positive<const N: usize>(figures: [(String, Option<f64>); N]) -> Result<()> {
    for (what, v) in figures {
        if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{what} must be a positive number");
        }
    }
    Ok(())
}

fn size(what: &str, s: &str) -> Result<u64> {
    parse_bytes(s).with_context(|| format!("{what} \"{s}\" is not a size (e.g. 48GiB, 512MiB)"))
}

/// An expert budget (`flag`): auto, a size, or a share of the expert
/// bytes; none at all only where the experts have another tier (VRAM's
/// have RAM, RAM's have none).
fn budget(flag: &str, s: &str, sizes: &Sizes, none_ok: bool) -> Result<Budget> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Budget::Auto);
    }
    if let Some(p) = s.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(v) if (v > 0.0 || (none_ok && v == 0.0)) && v <= 100.0 => {
                Ok(plan::share(sizes, v / 100.0))
            }
            _ if none_ok => bail!("{flag} \"{s}\": a share must be from 0% to 100%"),
            _ => bail!("{flag} \"{s}\": a share must be above 0% and at most 100%"),
        };
    }
    Ok(Budget::Bytes(size(flag, s)?))
}

fn dtype(flag: &str, s: &str) -> Result<DType> {
    match DType::parse(s) {
        Some(DType::F32) | None => {
            bail!("{flag} \"{s}\": expected q4_k, q4_0, q8_0, q6_k, q5_k or bf16")
        }
        Some(t) => Ok(t),
    }
}

pub(crate) fn plan_cmd(a: PlanArgs) -> Result<()> {
    // The engine's own parsing of --device; `auto` plans the GPU where
    // this binary finds one (or --vram says there is one).
    let gpu_ordinal = match Device::parse(&a.device)? {
        Device::Cpu => None,
        Device::Cuda(n) => Some(n),
        Device::Auto => (a.vram.is_some() || gpu_memory(0).is_ok()).then_some(0),
    };
    let on_gpu = gpu_ordinal.is_some();
    let vram_budget_given = !a.vram_budget.eq_ignore_ascii_case("auto");
    if !on_gpu && (a.vram.is_some() || a.pcie_gbps.is_some() || vram_budget_given) {
        let flags: Vec<String> = [
            a.vram.as_ref().map(|v| format!("--vram {v}")),
            vram_budget_given.then(|| format!("--vram-budget {}", a.vram_budget)),
            a.pcie_gbps.map(|p| format!("--pcie-gbps {p}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        bail!("{}: a GPU's figures; add --device cuda", flags.join(", "));
    }
    positive([
        ("--disk-gbps".into(), a.disk_gbps),
        ("--mem-gbps".into(), a.mem_gbps),
        ("--gflops".into(), a.gflops),
        ("--pcie-gbps".into(), a.pcie_gbps),
    ])?;
    if a.cores == Some(0) {
        bail!("--cores must be at least 1");
    }
    let file = a
        .machine
        .as_deref()
        .map(machine_file)
        .transpose()?
        .unwrap_or_default();
    let experts = dtype("--quant", &a.quant)?;
    let backbone = dtype("--backbone", &a.backbone)?;
    let sizes = plan::sizes_of(&a.model, experts, backbone)?;
    let curve = match &a.hit_curve {
        Some(p) => HitCurve::from_bench(p)?,
        None => HitCurve::builtin(),
    };

    let ram = match a.ram.as_deref().or(file.ram.as_deref()) {
        Some(s) => size("--ram", s)?,
        None => available_memory()
            .context("cannot read this machine's available memory; give --ram SIZE")?,
    };
    // A file's word that its rates are the engine's own holds only for
    // the rate it gave, not one a flag put in its place.
    let rates_measured = file.rates_measured == Some(true) && a.mem_gbps.is_none();
    let disk = a.disk_gbps.or(file.disk_gbps);
    let mem = a.mem_gbps.or(file.mem_gbps);
    let gflops = a.gflops.or(file.gflops);
    let cores = a.cores.or(file.cores);
    let memory = plan::memory_plan(
        &sizes,
        ram,
        budget("--ram-budget", &a.ram_budget, &sizes, false)?,
        a.ctx,
        a.parallel as usize,
    )
    .with_context(|| format!("{}: no plan", a.model.display()))?;
    let machine = if a.measure || (disk.is_none() && mem.is_none()) {
        crate::set_threads(a.threads)?;
        let here = plan::measure(&sizes, &a.model, ram)?;
        Machine {
            reads: if disk.is_some() {
                Vec::new()
            } else {
                here.reads
            },
            disk_gbps: disk.unwrap_or(here.disk_gbps),
            measured: mem.is_none() && gflops.is_none(),
            mem_measured: mem.is_none() || rates_measured,
            layer: here.layer.filter(|_| mem.is_none() && gflops.is_none()),
            mem_gbps: mem.unwrap_or(here.mem_gbps),
            gflops: gflops.unwrap_or(here.gflops),
            cores: cores.unwrap_or(here.cores),
            loop_us: file.loop_us.unwrap_or(IDLE_LOOP_US),
            ram,
        }
    } else {
        let (Some(disk_gbps), Some(mem_gbps)) = (disk, mem) else {
            bail!("give both --disk-gbps and --mem-gbps (or --measure to measure the rest here)");
        };
        let cores = cores.unwrap_or(1);
        Machine {
            ram,
            disk_gbps,
            reads: Vec::new(),
            mem_gbps,
            gflops: gflops.unwrap_or(cores as f64 * GFLOPS_PER_CORE),
            loop_us: file.loop_us.unwrap_or(IDLE_LOOP_US),
            cores,
            layer: None,
            measured: false,
            mem_measured: rates_measured,
        }
    };
    let forecast = plan::forecast(&sizes, &memory, &machine, &curve);
    let gpu = if on_gpu {
        let vram = match a.vram.as_deref().or(file.vram.as_deref()) {
            Some(s) => size("--vram", s)?,
            None => gpu_memory(gpu_ordinal.unwrap_or(0)).map_err(|why| {
                anyhow::anyhow!(
                    "--device {}: give --vram SIZE, the GPU's memory (not found here: {why})",
                    a.device
                )
            })?,
        };
        let ms = |v: Option<f64>, default: f64| v.map_or(default, |ms| ms * 1e-3);
        let g = gpu::Gpu {
            vram,
            pcie_gbps: a
                .pcie_gbps
                .or(file.pcie_gbps)
                .unwrap_or(gpu::DEFAULT_PCIE_GBPS),
            layer_decode_s: ms(file.gpu_layer_decode_ms, gpu::MEASURED_LAYER_DECODE_S),
            layer_prefill_s: ms(file.gpu_layer_prefill_ms, gpu::MEASURED_LAYER_PREFILL_S),
            head_gbps: file.gpu_head_gbps.unwrap_or(gpu::MEASURED_HEAD_GBPS),
            assumed: file.gpu_layer_decode_ms.is_none(),
        };
        let vram_budget = budget("--vram-budget", &a.vram_budget, &sizes, true)?;
        let placed = gpu::vram_plan(&sizes, &memory, vram, vram_budget)
            .with_context(|| format!("{}: no plan", a.model.display()))?;
        let f = gpu::forecast(&sizes, &memory, &placed, &machine, &g, &curve);
        Some((g, placed, f))
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = plan::to_json(&sizes, &memory, &machine, &curve, &forecast);
        v["machine"]["name"] = file.name.into();
        v["device"] = if on_gpu { "cuda" } else { "cpu" }.into();
        if let Some((g, placed, f)) = &gpu {
            // The GPU's forecast replaces the CPU engine's; its tiers go
            // beside the RAM plan.
            let mut j = gpu::to_json(placed, g, f);
            v["forecast"] = j["forecast"].take();
            v["memory"]["vram"] = j["vram"].take();
            v["gpu"] = j;
        }
        writeln!(out, "{v}")?;
        return Ok(());
    }
    print(
        &mut out,
        &a.model,
        file.name.as_deref(),
        &sizes,
        &memory,
        &machine,
        &curve,
        &forecast,
        gpu.as_ref(),
    )?;
    Ok(())
}

fn types(m: &std::collections::BTreeMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .map(|(t, b)| format!("{t} {}", human_bytes(**b)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[allow(clippy::too_many_arguments)]
fn print(
    out: &mut impl Write,
    model: &Path,
    name: Option<&str>,
    s: &Sizes,
    t: &MemoryPlan,
    m: &Machine,
    curve: &HitCurve,
    f: &plan::Forecast,
    on_gpu: Option<&(gpu::Gpu, gpu::VramPlan, gpu::GpuForecast)>,
) -> Result<()> {
    let c = &s.config;
    let params = (s.backbone_params + s.expert_params) as f64 / 1e9;
    let fraction = plan::fraction(s, t);
    writeln!(
        out,
        "model      {} ({}, {}): {params:.1} B parameters, {:.1} B active per token; {} as bf16",
        model.display(),
        c.family.model_types[0],
        s.source,
        (s.active_params() + s.lm_head_params) as f64 / 1e9,
        human_bytes(s.bf16_bytes())
    )?;
    writeln!(out, "stored as  {}", s.quant)?;
    writeln!(
        out,
        "backbone   {} resident ({}){}",
        human_bytes(s.resident_bytes()),
        types(&s.resident),
        if s.embed_on_disk > 0 {
            format!(
                " + embedding table {} read from SSD a row per token",
                human_bytes(s.embed_on_disk)
            )
        } else {
            String::new()
        }
    )?;
    writeln!(
        out,
        "experts    {} ({}): {} records of {}, {} sparse layers x {} experts, top {}",
        human_bytes(s.expert_bytes()),
        types(&s.experts),
        s.records,
        human_bytes(s.record_bytes),
        s.moe_layers,
        c.num_experts,
        c.num_experts_per_tok
    )?;
    let machine = match m.layer {
        Some(l) => format!(
            "SSD {:.2} GB/s ({} at once: {}) | memory {:.1} GB/s | one layer here: prefill of {} tokens {:.1} ms ({:.0} GFLOP/s) + {:.1} ms a new session, decode {:.2} ms | {} threads (measured)",
            m.disk_gbps,
            human_bytes(s.record_bytes),
            m.reads
                .iter()
                .map(|(n, t)| format!("{n} {:.1} ms", t * 1e3))
                .collect::<Vec<_>>()
                .join(", "),
            m.mem_gbps,
            plan::PROMPT_TOKENS,
            l.prefill_s * 1e3,
            m.gflops,
            l.session_s * 1e3,
            l.decode_s * 1e3,
            m.cores
        ),
        None => format!(
            "SSD {:.2} GB/s | memory {:.1} GB/s{} | {:.0} GFLOP/s | {} cores, {:.0} us a parallel loop (given)",
            m.disk_gbps,
            m.mem_gbps,
            if m.mem_measured { " (this engine's, measured there)" } else { "" },
            m.gflops,
            m.cores,
            m.loop_us
        ),
    };
    writeln!(
        out,
        "machine    {}RAM {} | {machine}",
        name.map_or(String::new(), |n| format!("{n}: ")),
        human_bytes(m.ram),
    )?;
    writeln!(
        out,
        "RAM        backbone {} + KV {} ({}) + activations {} + headroom {} + expert cache {} ({} slots, {:.1}% of the experts) = {}; {} left",
        human_bytes(t.backbone_bytes),
        human_bytes(t.kv_bytes),
        crate::kv_extent(t.sequences, t.ctx),
        human_bytes(t.activation_bytes),
        human_bytes(t.headroom_bytes),
        human_bytes(t.cache_bytes),
        t.cache_slots,
        100.0 * fraction,
        human_bytes(t.planned_bytes() + t.headroom_bytes),
        human_bytes(t.room_bytes.unwrap_or(0).saturating_sub(t.cache_bytes))
    )?;
    if let Some((g, v, _)) = on_gpu {
        writeln!(
            out,
            "VRAM       backbone {} + KV {} + headroom {} + routed experts of {} of {} sparse layers {} = {} of {}; PCIe {:.1} GB/s{}",
            human_bytes(v.backbone_bytes),
            human_bytes(v.kv_bytes),
            human_bytes(v.headroom_bytes),
            v.expert_layers,
            s.moe_layers,
            human_bytes(v.expert_bytes),
            human_bytes(v.backbone_bytes + v.kv_bytes + v.headroom_bytes + v.expert_bytes),
            human_bytes(v.vram),
            g.pcie_gbps,
            if g.assumed {
                "; the GPU's own time is this engine's on an H100 (gpu_layer_decode_ms, gpu_layer_prefill_ms and gpu_head_gbps in --machine for another)"
            } else {
                ""
            }
        )?;
    }
    writeln!(
        out,
        "SSD        {} (expert records{})",
        human_bytes(plan::ssd_bytes(s)),
        if s.embed_on_disk > 0 {
            ", embedding table"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "locality   decode hit rate {:.1}% at {:.1}% cached: h(f) linear between measured points of {}",
        100.0 * f.hit_rate,
        100.0 * fraction,
        curve.source
    )?;
    writeln!(
        out,
        "           prompt: {:.1}% of its experts cached (uniform routing touches U per layer; LFU keeps (C-U)/(L-1) of each layer's)",
        100.0 * f.prefill_hit_rate
    )?;
    writeln!(
        out,
        "           recalibrate on this model: smoe bench --model VAULT --prompts FILE --ram-budget SIZE --json >> curve.jsonl (a few sizes), then --hit-curve curve.jsonl"
    )?;
    if let Some((_, v, g)) = on_gpu {
        return print_gpu(out, s, v, g);
    }
    writeln!(
        out,
        "per token  RAM {} (backbone {}, experts {}, KV {}) | SSD {} ({:.2} expert misses x {} layers x {})",
        human_bytes(f.ram_bytes_per_token),
        human_bytes(t.backbone_bytes),
        human_bytes(s.expert_bytes_per_token()),
        human_bytes(f.kv_bytes_per_token),
        human_bytes(f.ssd_bytes_per_token),
        (1.0 - f.hit_rate) * c.num_experts_per_tok as f64,
        s.moe_layers,
        human_bytes(s.record_bytes)
    )?;
    let ms = |x: &plan::Range| match x.expected {
        s if s >= 10.0 => format!("{s:.1} s"),
        s => format!("{:.1} ms", s * 1e3),
    };
    writeln!(
        out,
        "decode     {} tok/s, limited by {}; a token: layers and LM head {}, waiting for misses {}",
        range(&f.decode_tok_s, 2),
        f.decode_limit,
        ms(&f.decode_compute_s),
        ms(&f.decode_read_s)
    )?;
    writeln!(
        out,
        "prefill    {} tok/s for a {}-token prompt, limited by {}; compute {}, reads {} ({} of experts; {} on a cold cache)",
        range(&f.prefill_tok_s, 1),
        plan::PROMPT_TOKENS,
        f.prefill_limit,
        ms(&f.prefill_compute_s),
        ms(&f.prefill_read_s),
        human_bytes(f.prefill_read.0),
        human_bytes(f.prefill_read.1)
    )?;
    writeln!(
        out,
        "first token {} s after a {}-token prompt ({} s on a cold cache)",
        range(&f.ttft_s, 2),
        plan::PROMPT_TOKENS,
        range(&f.ttft_cold_s, 2)
    )?;
    Ok(())
}

/// The per-token traffic and the forecast on a GPU.
fn print_gpu(
    out: &mut impl Write,
    s: &Sizes,
    v: &gpu::VramPlan,
    g: &gpu::GpuForecast,
) -> Result<()> {
    let k = s.config.num_experts_per_tok;
    writeln!(
        out,
        "GPU tiers  {} sparse layers' experts in VRAM, {} streamed: RAM cache hit rate {:.1}% over those, {:.1}% of a prompt's",
        v.expert_layers,
        g.streamed_layers,
        100.0 * g.hit_rate,
        100.0 * g.prompt_hit_rate
    )?;
    writeln!(
        out,
        "per token  from RAM {} ({k} experts x {} layers, run by {}) | SSD {} ({:.2} misses a layer x {})",
        human_bytes(g.streamed_bytes_per_token),
        g.streamed_layers,
        g.stream_way,
        human_bytes(g.ssd_bytes_per_token),
        (1.0 - g.hit_rate) * k as f64,
        human_bytes(s.record_bytes)
    )?;
    let ms = |x: &plan::Range| format!("{:.2} ms", x.expected * 1e3);
    writeln!(
        out,
        "decode     {} tok/s, limited by {}; a token: GPU {}, streamed experts {}, waiting for misses {}",
        range(&g.decode_tok_s, 1),
        g.decode_limit,
        ms(&g.decode_gpu_s),
        ms(&g.decode_stream_s),
        ms(&g.decode_read_s)
    )?;
    writeln!(
        out,
        "prefill    {} tok/s for a {}-token prompt, limited by {}",
        range(&g.prefill_tok_s, 0),
        plan::PROMPT_TOKENS,
        g.prefill_limit
    )?;
    writeln!(
        out,
        "first token {} s after a {}-token prompt",
        range(&g.ttft_s, 3),
        plan::PROMPT_TOKENS
    )?;
    Ok(())
}

/// `low-high (expected e)` with `p` decimals.
fn range(x: &plan::Range, p: usize) -> String {
    format!("{:.p$}-{:.p$} (expected {:.p$})", x.low, x.high, x.expected)
}

/// The memory of GPU `n` on this machine, for a plan of the GPU at hand
/// when no `--vram` is given.
#[cfg(feature = "cuda")]
fn gpu_memory(n: usize) -> Result<u64> {
    Ok(smoe::compute::cuda::probe(n)?.total_memory as u64)
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory(_n: usize) -> Result<u64> {
    bail!("this binary was built without the cuda feature")
}
