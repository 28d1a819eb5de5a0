//! Model architectures, one file each, assembled from the shared building
//! blocks in [`blocks`]. An architecture knows its tensor names and the order
//! of its operations; the arithmetic lives in the blocks and the kernels.

pub mod blocks;
mod decoder;
mod deepseek;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;

pub use decoder::Decoder;

use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::io::DirectFile;
use crate::experts::{ExpertCache, Policy, LFU_HALF_LIFE};
use crate::kernels::DType;
use crate::vault::{self, Vault};

/// The checkpoint names of routed expert `expert` of `layer`: gate, up and
/// down projections, in the family's own spelling.
pub fn expert_tensor_names(arch: Architecture, layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}");
    match arch {
        Architecture::Mixtral => {
            ["w1", "w3", "w2"].map(|w| format!("{p}.block_sparse_moe.experts.{expert}.{w}.weight"))
        }
        _ => ["gate_proj", "up_proj", "down_proj"]
            .map(|w| format!("{p}.mlp.experts.{expert}.{w}.weight")),
    }
}

/// Whether a checkpoint tensor belongs to a routed expert (what a vault
/// streams) rather than the backbone. Shared experts are backbone.
pub fn is_routed_expert_tensor(name: &str) -> bool {
    name.contains(".mlp.experts.") || name.contains(".block_sparse_moe.experts.")
}

/// Which positions the caller wants logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: what generation needs.
    Last,
    /// Every position of the call, `[t, vocab]` row-major.
    All,
}

/// A causal language model: tokens in, next-token logits out, with the
/// sequence's state kept in a [`Session`].
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// A fresh, empty sequence.
    fn new_session(&self) -> Session;

    /// Appends `ids` to the session (one batched pass for any number of
    /// tokens) and returns logits for the positions asked for. The slice
    /// lives in the session and is overwritten by the next call.
    fn forward<'s>(
        &self,
        ids: &[u32],
        session: &'s mut Session,
        logits: Logits,
    ) -> Result<&'s mut [f32]>;
}

/// How much RAM the expert cache may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Available memory minus backbone, KV cache and headroom.
    Auto,
    Bytes(u64),
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub ram_budget: Budget,
    /// Check every expert record's CRC32 as it is read.
    pub verify_experts: bool,
    /// Reader threads: the queue depth the SSD sees.
    pub read_threads: usize,
    /// Context the KV cache is planned for.
    pub ctx: usize,
    /// Read the next layer's predicted experts while this one computes.
    pub prefetch: bool,
    pub policy: Policy,
    /// Prompt tokens per batched forward pass. Each chunk reads every
    /// expert it routes to at most once per layer.
    pub prefill_chunk: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ram_budget: Budget::Auto,
            verify_experts: false,
            read_threads: 16,
            ctx: 4096,
            // Measured on the 8-layer synthetic Qwen3-30B-A3B (README,
            // bench/readahead.sh): LFU beat LRU at 25% and 10% budgets, and
            // read-ahead at 67% recall cost as much bandwidth as it saved.
            prefetch: false,
            policy: Policy::Lfu {
                half_life: LFU_HALF_LIFE,
            },
            prefill_chunk: 512,
        }
    }
}

/// Where the memory goes, decided before anything is allocated.
#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    /// Mapped backbone bytes the forward pass touches (the on-disk
    /// embedding table excluded).
    pub backbone_bytes: u64,
    pub cache_bytes: u64,
    pub cache_slots: usize,
    pub slot_bytes: u64,
    /// f32 keys and values for `ctx` positions.
    pub kv_bytes: u64,
    pub ctx: usize,
    /// Memory the OS reported available at start, if known.
    pub available_bytes: Option<u64>,
    pub expert_bytes: u64,
    pub direct_io: bool,
}

/// A model ready to run, and what it was built from.
pub struct Opened {
    pub model: Box<dyn CausalLm>,
    pub config: ModelConfig,
    /// Set for vaults: the streaming cache and its plan.
    pub cache: Option<Arc<ExpertCache>>,
    pub plan: Option<MemoryPlan>,
}

/// Opens a checkpoint directory or a vault.
pub fn open(dir: &Path, opts: &LoadOptions) -> Result<Opened> {
    if vault::is_vault(dir) {
        return open_vault(dir, opts);
    }
    let ckpt = Checkpoint::open(dir)?;
    let model = Box::new(Decoder::load(&ckpt, &ckpt.config, None, None)?);
    Ok(Opened {
        model,
        config: ckpt.config.clone(),
        cache: None,
        plan: None,
    })
}

fn open_vault(dir: &Path, opts: &LoadOptions) -> Result<Opened> {
    let vault = Vault::open(dir)?;
    let cfg = ModelConfig::from_json(&vault.manifest.config, &dir.join(vault::MANIFEST))?;
    let backbone = vault.backbone()?;
    let embed_name = "model.embed_tokens.weight";
    let embed = backbone.entry(embed_name).ok_or_else(|| {
        Error::format(backbone.path(), format!("missing tensor \"{embed_name}\""))
    })?;
    let embed_on_disk = !cfg.tie_word_embeddings;
    let mut plan = plan_memory(
        &vault,
        &cfg,
        opts,
        if embed_on_disk { embed.len } else { 0 },
    )?;
    let cache = Arc::new(ExpertCache::new(
        &vault,
        plan.cache_slots,
        opts.read_threads,
        opts.verify_experts,
        opts.policy,
        opts.prefetch,
    )?);
    plan.direct_io = cache.direct_io();
    let rows = if embed_on_disk {
        let dtype = DType::parse(&embed.dtype).ok_or_else(|| {
            Error::format(backbone.path(), format!("{embed_name}: unknown dtype"))
        })?;
        Some(blocks::DiskRows::new(
            DirectFile::open(backbone.path())?,
            embed.offset,
            dtype,
            cfg.hidden_size,
        ))
    } else {
        None
    };
    let model = Box::new(Decoder::load(&backbone, &cfg, Some(&cache), rows)?);
    Ok(Opened {
        model,
        config: cfg,
        cache: Some(cache),
        plan: Some(plan),
    })
}

/// The expert cache gets the budget, in whole slots: at least one token's
/// experts of one layer (fewer could not run a layer at all), at most every
/// expert (more would be waste).
fn plan_memory(
    vault: &Vault,
    cfg: &ModelConfig,
    opts: &LoadOptions,
    embed_on_disk: u64,
) -> Result<MemoryPlan> {
    let slot_bytes = vault.max_record_len();
    let n_records: u64 = vault
        .manifest
        .experts
        .iter()
        .map(|l| l.offsets.len() as u64)
        .sum();
    let backbone_bytes = vault.backbone_bytes() - embed_on_disk;
    let ctx = opts.ctx.min(cfg.max_position_embeddings);
    let kv_bytes = cfg.kv_bytes(ctx);
    let available_bytes = available_memory();
    let budget = match opts.ram_budget {
        Budget::Bytes(b) => b,
        Budget::Auto => {
            let avail = available_bytes.ok_or_else(|| {
                Error::invalid(
                    "cannot read available memory on this system; pass --ram-budget SIZE",
                )
            })?;
            avail.saturating_sub(backbone_bytes + kv_bytes + headroom(avail))
        }
    };
    let min_slots = cfg.num_experts_per_tok.max(1) as u64;
    let slots = budget.checked_div(slot_bytes).unwrap_or(0).min(n_records);
    if slot_bytes > 0 && slots < min_slots {
        return Err(Error::invalid(format!(
            "a RAM budget of {} holds {slots} experts of {}, but one token needs {min_slots} per layer: give --ram-budget {} or more",
            human_bytes(budget),
            human_bytes(slot_bytes),
            human_bytes(min_slots * slot_bytes)
        )));
    }
    Ok(MemoryPlan {
        backbone_bytes,
        cache_bytes: slots * slot_bytes,
        cache_slots: slots as usize,
        slot_bytes,
        kv_bytes,
        ctx,
        available_bytes,
        expert_bytes: vault.expert_bytes(),
        direct_io: false,
    })
}

/// What `--ram-budget auto` leaves beside backbone, KV and cache out of
/// `avail` bytes: the binary's pages, tokenizer, activations, thread stacks.
/// Under an 824 MiB cgroup with the 8-layer bench vault (331 MiB backbone,
/// 48 MiB KV), peak usage stayed 140-190 MiB above backbone + budget
/// (`bench/vs-llama.cpp.sh`).
pub fn headroom(avail: u64) -> u64 {
    (avail / 10).max(192 << 20)
}

/// Memory this process can still use: MemAvailable from /proc/meminfo,
/// capped by what its memory cgroup has left. In a container (or under a
/// systemd or cgroup limit) the host's free memory is not ours, and a budget
/// derived from it would get the process OOM-killed. None where neither is
/// known (not Linux).
pub fn available_memory() -> Option<u64> {
    let host = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|own| cgroup_headroom(&own, Path::new("/sys/fs/cgroup")));
    match (host, cgroup) {
        (Some(h), Some(c)) => Some(h.min(c)),
        (h, c) => h.or(c),
    }
}

/// Limit minus usage of the memory cgroup named in `own` (the text of
/// /proc/self/cgroup), under the cgroup filesystem at `root`: v2's
/// `memory.max`/`memory.current`, or v1's `memory/…/memory.limit_in_bytes`/
/// `memory.usage_in_bytes`. Usage counts the page cache, so its inactive
/// file pages, which the kernel reclaims before it kills anything, are
/// counted as free. None without a finite limit.
fn cgroup_headroom(own: &str, root: &Path) -> Option<u64> {
    let read = |dir: &Path, file: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let stat = |dir: &Path, key: &str| -> u64 {
        std::fs::read_to_string(dir.join("memory.stat"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    // Unlimited v1 groups report a page-rounded i64::MAX.
    const UNLIMITED: u64 = 1 << 60;
    for line in own.lines() {
        // hierarchy-id:controllers:path
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        let (limit, usage, inactive) = if controllers.is_empty() {
            let dir = root.join(rel);
            (
                read(&dir, "memory.max"),
                read(&dir, "memory.current"),
                stat(&dir, "inactive_file"),
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = root.join("memory").join(rel);
            (
                read(&dir, "memory.limit_in_bytes"),
                read(&dir, "memory.usage_in_bytes"),
                stat(&dir, "total_inactive_file"),
            )
        } else {
            continue;
        };
        if let (Some(limit), Some(usage)) = (limit, usage) {
            if limit < UNLIMITED {
                return Some(limit.saturating_sub(usage.saturating_sub(inactive)));
            }
        }
    }
    None
}

/// "1.50 GiB"-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses sizes like `2GiB`, `512MiB`, `1.5GB`, `4096`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        _ => return None,
    };
    (v.is_finite() && v >= 0.0).then_some((v * mult) as u64)
}

/// Keys and values of every layer for positions `0..len`, position-major:
/// `k_width` and `v_width` floats per position (multi-head latent
/// attention keeps only its latent, as "keys" with no separate values).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    k_width: usize,
    v_width: usize,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, k_width: usize, v_width: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| Default::default()).collect(),
            k_width,
            v_width,
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on, so a conversation that shares a
    /// prefix with the cached one prefills only what is new.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for (k, v) in &mut self.layers {
            k.truncate(self.len * self.k_width);
            v.truncate(self.len * self.v_width);
        }
    }

    /// Makes room for `extra` more positions in every layer at once.
    pub fn reserve(&mut self, extra: usize) {
        let (kw, vw) = (self.k_width, self.v_width);
        for (k, v) in &mut self.layers {
            k.reserve(((self.len + extra) * kw).saturating_sub(k.len()));
            v.reserve(((self.len + extra) * vw).saturating_sub(v.len()));
        }
    }

    /// Appends `t` positions to one layer; `advance` commits them once every
    /// layer has.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (kc, vc) = &mut self.layers[layer];
        kc.truncate(self.len * self.k_width);
        vc.truncate(self.len * self.v_width);
        kc.extend_from_slice(k);
        vc.extend_from_slice(v);
    }

    fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// The state of one sequence: its KV cache, the ids it holds, and reusable
/// buffers so that a decode step allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Session {
    pub kv: KvCache,
    pub(crate) scratch: blocks::Scratch,
    logits: Vec<f32>,
    /// The ids behind the KV cache, as recorded by the engine.
    tokens: Vec<u32>,
    /// Set when the cache changed without the engine recording it (a bare
    /// `forward`, a truncation from outside): `tokens` can no longer be
    /// trusted until the cache is emptied.
    untracked: bool,
}

impl Session {
    pub fn new(kv: KvCache) -> Self {
        Self {
            kv,
            ..Default::default()
        }
    }

    /// Makes room for `extra` more positions in the KV cache and the id
    /// record, so that a generation allocates once instead of per doubling.
    pub fn reserve(&mut self, extra: usize) {
        self.kv.reserve(extra);
        self.tokens.reserve(extra);
    }

    /// Tokens already processed.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// The ids the KV cache holds, if every one of them is known.
    pub fn tokens(&self) -> Option<&[u32]> {
        (!self.untracked && self.tokens.len() == self.kv.len()).then_some(&self.tokens)
    }

    /// Notes that `ids` are about to be appended to the cache. Should that
    /// fail, the cache stays shorter than the ids and [`Self::tokens`]
    /// says nothing is known.
    pub(crate) fn record(&mut self, ids: &[u32]) {
        if !self.untracked && self.tokens.len() == self.kv.len() {
            self.tokens.extend_from_slice(ids);
        } else {
            self.tokens.clear();
            self.untracked = true;
        }
    }

    /// Prepares the session to continue as `ids`: keeps the longest prefix
    /// of the cache that `ids` starts with, forgets the rest, and returns
    /// how many of `ids` need no prefill. At least the last id is left to
    /// process, since its logits are what generation starts from. A
    /// conversation re-rendered each turn reuses everything up to its
    /// first changed token.
    pub fn reuse_prefix(&mut self, ids: &[u32]) -> usize {
        let common = match self.tokens() {
            Some(held) => held.iter().zip(ids).take_while(|(a, b)| a == b).count(),
            None => 0,
        }
        .min(ids.len().saturating_sub(1));
        self.kv.truncate(common);
        self.tokens.truncate(common);
        if common == 0 {
            self.tokens.clear();
            self.untracked = false;
        }
        common
    }
}

/// Rejects ids outside the embedding table and sequences past the context,
/// before any work is done.
pub(crate) fn check_input(cfg: &ModelConfig, ids: &[u32], cached: usize) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid("no tokens to process"));
    }
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(Error::invalid(format!(
            "token id {bad} is outside the vocabulary (vocab_size {})",
            cfg.vocab_size
        )));
    }
    if cached + ids.len() > cfg.max_position_embeddings {
        return Err(Error::invalid(format!(
            "{} tokens ({cached} cached + {} new) exceed the model's context of {} (max_position_embeddings)",
            cached + ids.len(),
            ids.len(),
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cgroup_headroom_reads_v1_and_v2_limits() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("user.slice/job");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "1073741824\n").unwrap();
        std::fs::write(v2.join("memory.current"), "400000000\n").unwrap();
        std::fs::write(v2.join("memory.stat"), "anon 1\ninactive_file 100000000\n").unwrap();
        let own = "0::/user.slice/job\n";
        assert_eq!(
            super::cgroup_headroom(own, root.path()),
            Some(1073741824 - 300000000)
        );
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(super::cgroup_headroom(own, root.path()), None);

        let v1 = root.path().join("memory/bench");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "536870912\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "600000000\n").unwrap();
        let own = "12:pids:/x\n9:memory:/bench\n0::/\n";
        // Over the limit with no reclaimable cache: nothing is left.
        assert_eq!(super::cgroup_headroom(own, root.path()), Some(0));
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(super::cgroup_headroom(own, root.path()), None);
    }
}
