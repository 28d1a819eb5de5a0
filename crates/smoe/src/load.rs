//! Opening a model: a checkpoint directory (mapped whole), or a vault or a
//! GGUF (backbone mapped, routed experts streamed through a cache planned
//! by [`crate::memory`]; a GGUF's straight from its experts tensors).

use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::compute::{Device, Placement};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::{ExpertCache, Policy, ReadAhead, LFU_HALF_LIFE};
use crate::gguf::{self, Gguf, GgufWeights};
use crate::memory::{available_memory, Budget, Footprint, MemoryPlan};
use crate::model::blocks::Embedding;
use crate::model::{CausalLm, Decoder};
use crate::vault::{self, Vault};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub ram_budget: Budget,
    /// Check every expert record's CRC32 as it is read.
    pub verify_experts: bool,
    /// Reader threads: the queue depth the SSD sees.
    pub read_threads: usize,
    /// Context the KV cache is planned for, per sequence.
    pub ctx: usize,
    /// Sequences decoding at once (`smoe serve --parallel`), each with a
    /// KV cache of its own.
    pub parallel: usize,
    /// When the next layer's predicted experts are read while this one
    /// computes.
    pub prefetch: ReadAhead,
    pub policy: Policy,
    /// Prompt tokens per batched forward pass. Each chunk reads every
    /// expert it routes to at most once per layer.
    pub prefill_chunk: usize,
    /// Where the model runs (`--device`).
    pub device: Device,
    /// VRAM for routed experts on CUDA (`--vram-budget`): whole layers'
    /// experts are uploaded while they fit, the rest stream from the RAM
    /// cache. `Auto` is the free VRAM after the backbone, less headroom.
    pub vram_budget: Budget,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ram_budget: Budget::Auto,
            verify_experts: false,
            read_threads: 16,
            ctx: 4096,
            parallel: 1,
            // Measured on the 8-layer synthetic Qwen3-30B-A3B (README,
            // bench/readahead.sh): LFU beat LRU at 25% and 10% budgets, and
            // read-ahead cost decoding more than it saved (see `ReadAhead`).
            prefetch: ReadAhead::Off,
            policy: Policy::Lfu {
                half_life: LFU_HALF_LIFE,
            },
            prefill_chunk: 512,
            device: Device::Cpu,
            vram_budget: Budget::Auto,
        }
    }
}

/// A model ready to run, and what it was built from.
pub struct Opened {
    pub model: Box<dyn CausalLm>,
    pub config: ModelConfig,
    /// Set for vaults: the streaming cache and its plan.
    pub cache: Option<Arc<ExpertCache>>,
    pub plan: Option<MemoryPlan>,
    /// Set for vaults: its data files as loaded.
    pub files: Option<vault::Watch>,
    /// Where the model runs, and why, for the start-up summary.
    pub placement: Placement,
    pub device: String,
}

/// Opens a checkpoint directory, a vault or a GGUF file.
pub fn open(dir: &Path, opts: &LoadOptions) -> Result<Opened> {
    if vault::is_vault(dir) {
        return open_vault(dir, opts);
    }
    if gguf::is_gguf(dir) {
        return open_gguf(dir, opts);
    }
    let (placement, device) = crate::compute::choose(opts.device)?;
    let ckpt = Checkpoint::open(dir)?;
    crate::validate::checkpoint_layers(&ckpt)?;
    let (model, device) = place(
        Decoder::load(&ckpt, &ckpt.config, None, None)?,
        placement,
        opts,
        device,
    )?;
    Ok(Opened {
        model,
        config: ckpt.config.clone(),
        cache: None,
        plan: None,
        files: None,
        placement,
        device,
    })
}

/// The decoder on the device chosen for it: on CUDA its backbone is
/// uploaded now, with as many layers' streamed experts as `--vram-budget`
/// holds, and the device line says where the experts are.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn place(
    model: Decoder,
    placement: Placement,
    opts: &LoadOptions,
    device: String,
) -> Result<(Box<dyn CausalLm>, String)> {
    Ok(match placement {
        Placement::Cpu => (Box::new(model), device),
        #[cfg(feature = "cuda")]
        Placement::Cuda(n) => {
            let gpu = crate::model::GpuDecoder::new(model, n, opts.vram_budget)?;
            let device = match gpu.vram_experts() {
                Some(note) => format!("{device}; {note}"),
                None => device,
            };
            (Box::new(gpu), device)
        }
    })
}

/// A GGUF runs as a vault does, the file standing in for both of its
/// parts: the backbone is mapped in its stored types and the experts
/// tensors are read an expert at a time.
fn open_gguf(path: &Path, opts: &LoadOptions) -> Result<Opened> {
    let (placement, device) = crate::compute::choose(opts.device)?;
    let g = Gguf::open(path)?;
    let cfg = gguf::config::model_config(&g)?;
    let mut plan = Footprint::of_gguf(&g, &cfg, opts)?.plan(opts.ram_budget, available_memory())?;
    let cache = Arc::new(ExpertCache::from_gguf(
        &g,
        &cfg,
        plan.cache_slots,
        opts.read_threads,
        opts.policy,
        opts.prefetch,
    )?);
    plan.direct_io = cache.direct_io();
    let rows = (!cfg.tie_word_embeddings)
        .then(|| Embedding::on_disk_gguf(&g))
        .transpose()?;
    let weights = GgufWeights::new(&g, &cfg);
    let (model, device) = place(
        Decoder::load(&weights, &cfg, Some(&cache), rows)?,
        placement,
        opts,
        device,
    )?;
    Ok(Opened {
        model,
        config: cfg,
        cache: Some(cache),
        plan: Some(plan),
        files: None,
        placement,
        device,
    })
}

fn open_vault(dir: &Path, opts: &LoadOptions) -> Result<Opened> {
    let (placement, device) = crate::compute::choose(opts.device)?;
    let vault = Vault::open(dir)?;
    // Before mapping: the files watched are the ones the model reads.
    let files = vault::Watch::new(&vault)?;
    let cfg = ModelConfig::from_json(&vault.manifest.config, &dir.join(vault::MANIFEST))?;
    crate::validate::vault(&vault, &cfg)?;
    crate::validate::backbone_checksums(&vault)?;
    let backbone = vault.backbone()?;
    let mut plan: MemoryPlan =
        Footprint::of_vault(&vault, &cfg, opts)?.plan(opts.ram_budget, available_memory())?;
    let cache = Arc::new(ExpertCache::new(
        &vault,
        plan.cache_slots,
        opts.read_threads,
        opts.verify_experts,
        opts.policy,
        opts.prefetch,
    )?);
    plan.direct_io = cache.direct_io();
    // An untied table is only read a row per token: it stays on disk.
    let rows = (!cfg.tie_word_embeddings)
        .then(|| Embedding::on_disk(&vault))
        .transpose()?;
    let (model, device) = place(
        Decoder::load(&backbone, &cfg, Some(&cache), rows)?,
        placement,
        opts,
        device,
    )?;
    Ok(Opened {
        model,
        config: cfg,
        cache: Some(cache),
        plan: Some(plan),
        files: Some(files),
        placement,
        device,
    })
}
