//! Memory: what a model needs on this machine as it is stored
//! ([`Footprint`]), the one planner that splits the RAM between backbone,
//! KV cache and expert cache ([`Footprint::plan`]), and what the OS says
//! (available memory under a cgroup, this process's resident set).

use std::collections::BTreeSet;
use std::path::Path;

use crate::checkpoint::{Checkpoint, EMBED};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{self, Gguf};
use crate::load::LoadOptions;
use crate::quant::{DType, QuantType};
use crate::vault::io::DirectFile;
use crate::vault::recipe::{self, Role};
use crate::vault::{self, Vault};

/// How much memory an expert tier may use: RAM for the expert cache
/// (`--ram-budget`), VRAM for experts on CUDA (`--vram-budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Available memory minus backbone, KV cache and headroom.
    Auto,
    Bytes(u64),
}

/// Where the memory goes, decided before anything is allocated.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MemoryPlan {
    /// Mapped backbone bytes the forward pass touches (the on-disk
    /// embedding table excluded).
    pub backbone_bytes: u64,
    pub cache_bytes: u64,
    pub cache_slots: usize,
    pub slot_bytes: u64,
    /// f32 keys and values for `ctx` positions of each of `sequences`.
    pub kv_bytes: u64,
    pub ctx: usize,
    pub sequences: usize,
    /// One forward pass's activations at the largest batch it runs.
    pub activation_bytes: u64,
    /// Memory the OS reported available at start, if known.
    pub available_bytes: Option<u64>,
    /// What is kept free of that beside backbone, KV, activations and cache.
    pub headroom_bytes: u64,
    /// What the available memory leaves for the expert cache; a budget
    /// given above it may not fit.
    pub room_bytes: Option<u64>,
    pub expert_bytes: u64,
    pub direct_io: bool,
}

impl MemoryPlan {
    /// Everything planned but the headroom: backbone, KV cache,
    /// activations and expert cache.
    pub fn planned_bytes(&self) -> u64 {
        self.backbone_bytes + self.kv_bytes + self.activation_bytes + self.cache_bytes
    }
}

/// What a model needs in RAM on this machine as it is stored, known
/// before anything is loaded.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// Streams its experts: a vault, or a GGUF read in place.
    pub vault: bool,
    /// Bytes that must stay resident: a checkpoint's every tensor (it is
    /// mapped whole), a vault's backbone less an on-disk embedding table.
    pub resident_bytes: u64,
    /// Routed-expert bytes (for a vault: on SSD, streamed).
    pub expert_bytes: u64,
    /// One token's experts of one layer: the least cache a vault runs with.
    pub min_cache_bytes: u64,
    /// A vault's largest expert record (one cache slot), and how many
    /// records it holds; 0 for a checkpoint.
    pub slot_bytes: u64,
    pub records: u64,
    /// The smallest backbone `smoe convert --backbone` makes (q4_k with its
    /// recipe) and its resident bytes, when that is smaller than this one.
    pub smaller_backbone: Option<(QuantType, u64)>,
    /// KV cache of `sequences` sequences of `ctx` positions each.
    pub kv_bytes: u64,
    pub ctx: usize,
    pub sequences: usize,
    /// One forward pass's activations at the largest batch it runs
    /// ([`activation_bytes`]).
    pub activation_bytes: u64,
    /// What the tensors are stored as, e.g. "bf16" or "experts q4_k,
    /// backbone bf16".
    pub quant: String,
    /// For a vault: whether its filesystem takes O_DIRECT.
    pub direct_io: Option<bool>,
}

impl Footprint {
    pub fn of(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if gguf::is_gguf(dir) {
            let g = Gguf::open(dir)?;
            let cfg = gguf::config::model_config(&g)?;
            return Self::of_gguf(&g, &cfg, opts);
        }
        if vault::is_vault(dir) {
            let vault = Vault::open(dir)?;
            let cfg = ModelConfig::from_json(&vault.manifest.config, &dir.join(vault::MANIFEST))?;
            return Self::of_vault(&vault, &cfg, opts);
        }
        let ckpt = Checkpoint::open(dir)?;
        let cfg = &ckpt.config;
        let (mut experts, mut all) = (0, 0);
        let mut dtypes = BTreeSet::new();
        for name in ckpt.tensor_names() {
            let bytes = ckpt.tensor_bytes(name);
            all += bytes;
            if cfg.family.is_routed_expert(name) {
                experts += bytes;
            }
            dtypes.insert(ckpt.tensor_any(name)?.dtype.name());
        }
        let ctx = opts.ctx.min(cfg.max_position_embeddings);
        Ok(Self {
            vault: false,
            resident_bytes: all,
            expert_bytes: experts,
            min_cache_bytes: 0,
            slot_bytes: 0,
            records: 0,
            smaller_backbone: None,
            kv_bytes: cfg.kv_bytes(ctx) * sequences(opts) as u64,
            ctx,
            sequences: sequences(opts),
            activation_bytes: activation_bytes(cfg, opts.prefill_chunk.min(ctx), sequences(opts)),
            quant: dtypes.into_iter().collect::<Vec<_>>().join(", "),
            direct_io: None,
        })
    }

    /// A GGUF's footprint: it streams like a vault (`vault` is set), one
    /// cache slot holding an expert's three parts each rounded out to 4 KiB.
    pub fn of_gguf(g: &Gguf, cfg: &ModelConfig, opts: &LoadOptions) -> Result<Self> {
        let layers = gguf::expert_tensors(g, cfg)?;
        let slot = layers.iter().map(|l| l.slot_bytes()).max().unwrap_or(0);
        let records: u64 = layers.iter().map(|l| l.experts as u64).sum();
        let is_expert = |name: &str| {
            gguf::EXPERT_PARTS
                .iter()
                .any(|p| name.ends_with(&format!(".{p}.weight")))
        };
        let (mut stored, mut experts, mut backbone) = (0, BTreeSet::new(), BTreeSet::new());
        for (_, t) in g.tensors() {
            if is_expert(&t.name) {
                experts.insert(t.ggml_type.name());
            } else {
                if cfg.tie_word_embeddings || t.name != gguf::check::TOKEN_EMBD {
                    stored += t.bytes;
                }
                if t.dims.len() > 1 {
                    backbone.insert(t.ggml_type.name());
                }
            }
        }
        let join = |s: BTreeSet<&str>| s.into_iter().collect::<Vec<_>>().join("/");
        let ctx = opts.ctx.min(cfg.max_position_embeddings);
        Ok(Self {
            vault: true,
            resident_bytes: stored,
            expert_bytes: slot * records,
            min_cache_bytes: slot * cfg.num_experts_per_tok.max(1) as u64,
            slot_bytes: slot,
            records,
            smaller_backbone: None,
            kv_bytes: cfg.kv_bytes(ctx) * sequences(opts) as u64,
            ctx,
            sequences: sequences(opts),
            activation_bytes: activation_bytes(cfg, opts.prefill_chunk.min(ctx), sequences(opts)),
            quant: format!("experts {}, backbone {}", join(experts), join(backbone)),
            direct_io: Some(DirectFile::open(g.path())?.direct),
        })
    }

    /// A vault's footprint, its config already parsed.
    pub fn of_vault(vault: &Vault, cfg: &ModelConfig, opts: &LoadOptions) -> Result<Self> {
        let m = &vault.manifest;
        let on_disk = if cfg.tie_word_embeddings {
            0
        } else {
            m.backbone.get(EMBED).map_or(0, |e| e.len)
        };
        // Resident bytes as `convert --backbone q4_k` would store them:
        // each tensor's recipe type, its row fallback, the on-disk
        // embedding left out.
        let tied = !m.backbone.contains_key("lm_head.weight");
        let smallest = QuantType::Q4K;
        let as_smallest: u64 = m
            .backbone
            .iter()
            .filter(|(name, _)| cfg.tie_word_embeddings || name.as_str() != EMBED)
            .map(|(name, t)| match t.shape[..] {
                [rows, cols] => {
                    let target = Role::of(name, &t.shape, tied).target(DType::Quant(smallest));
                    (rows * recipe::row_type(target, cols).row_bytes(cols)) as u64
                }
                _ => t.len,
            })
            .sum();
        let resident = vault.backbone_bytes() - on_disk;
        let slot = vault.max_record_len();
        let ctx = opts.ctx.min(cfg.max_position_embeddings);
        Ok(Self {
            vault: true,
            resident_bytes: resident,
            expert_bytes: vault.expert_bytes(),
            min_cache_bytes: slot * cfg.num_experts_per_tok.max(1) as u64,
            slot_bytes: slot,
            records: m.experts.iter().map(|l| l.offsets.len() as u64).sum(),
            smaller_backbone: (as_smallest < resident).then_some((smallest, as_smallest)),
            kv_bytes: cfg.kv_bytes(ctx) * sequences(opts) as u64,
            ctx,
            sequences: sequences(opts),
            activation_bytes: activation_bytes(cfg, opts.prefill_chunk.min(ctx), sequences(opts)),
            quant: m.stored_quant(),
            direct_io: Some(DirectFile::open(&vault.experts_path())?.direct),
        })
    }

    /// What stays in RAM beside the expert cache: the resident weights, the
    /// KV cache and one forward pass's activations.
    pub fn fixed_bytes(&self) -> u64 {
        self.resident_bytes + self.kv_bytes + self.activation_bytes
    }

    /// The least memory `--ram-budget auto` runs a vault in, out of `avail`
    /// bytes: what stays beside the cache, the [`headroom`] and one
    /// token's experts of one layer.
    pub fn least_memory(&self, avail: u64) -> u64 {
        self.fixed_bytes() + headroom(avail) + self.min_cache_bytes
    }

    /// The one memory planner (run, chat, serve, check, inspect, plan): a
    /// vault's expert cache gets the budget, in whole slots: at least one
    /// token's experts of one layer (fewer could not run a layer at all),
    /// at most every expert (more would be waste). With `Budget::Auto` the
    /// budget is what `available_bytes` leaves beside backbone, KV and
    /// [`headroom`], and for a vault, memory that cannot hold those and the
    /// least cache is refused with the sum it needed.
    pub fn plan(&self, budget: Budget, available_bytes: Option<u64>) -> Result<MemoryPlan> {
        let (slot_bytes, kv_bytes) = (self.slot_bytes, self.kv_bytes);
        let (backbone_bytes, activation_bytes) = (self.resident_bytes, self.activation_bytes);
        let headroom_bytes = available_bytes.map_or(0, headroom);
        let base = self.fixed_bytes() + headroom_bytes;
        let room_bytes = available_bytes.map(|a| a.saturating_sub(base));
        let budget = match budget {
            Budget::Bytes(b) => b,
            Budget::Auto => {
                let avail = available_bytes.ok_or_else(|| {
                    Error::invalid(
                        "cannot read available memory on this system; pass --ram-budget SIZE",
                    )
                })?;
                // A checkpoint is mapped whole and may page; a vault's
                // backbone and cache are read into memory and must fit.
                if slot_bytes > 0 && self.least_memory(avail) > avail {
                    return Err(Error::invalid(format!(
                        "{} of memory is smaller than the backbone's needs: {} resident + {} KV for {} tokens + {} activations + {} headroom + {} for one token's experts of one layer = {}; a smaller --ctx, a q4_k backbone, or more memory",
                        human_bytes(avail),
                        human_bytes(backbone_bytes),
                        human_bytes(kv_bytes),
                        self.ctx,
                        human_bytes(activation_bytes),
                        human_bytes(headroom_bytes),
                        human_bytes(self.min_cache_bytes),
                        human_bytes(self.least_memory(avail))
                    )));
                }
                avail - base
            }
        };
        let min_slots = self.min_cache_bytes.checked_div(slot_bytes).unwrap_or(1);
        let slots = budget
            .checked_div(slot_bytes)
            .unwrap_or(0)
            .min(self.records);
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
            ctx: self.ctx,
            sequences: self.sequences,
            activation_bytes,
            available_bytes,
            headroom_bytes,
            room_bytes,
            expert_bytes: self.expert_bytes,
            direct_io: self.direct_io.unwrap_or(false),
        })
    }
}

/// Sequences whose KV cache the plan holds: at least one.
fn sequences(opts: &LoadOptions) -> usize {
    opts.parallel.max(1)
}

/// Activations of the largest forward pass `sequences` sequences run with
/// prompts cut into `prefill_chunk`-token chunks: a batch step feeds one
/// chunk's worth of prompt tokens beside a token of each other sequence.
/// Callers pass a chunk no longer than the context, as no prompt is.
pub fn activation_bytes(cfg: &ModelConfig, prefill_chunk: usize, sequences: usize) -> u64 {
    let sequences = sequences.max(1);
    cfg.activation_bytes(
        prefill_chunk.max(1).saturating_add(sequences - 1),
        sequences,
    )
}

/// What `--ram-budget auto` leaves beside backbone, KV, activations and
/// cache out of `avail` bytes: the binary's pages, tokenizer, thread stacks,
/// the allocator's slack. Under an 824 MiB cgroup with the 8-layer bench
/// vault (331 MiB backbone, 48 MiB KV, 129 MiB of activations for a
/// 512-token chunk), peak usage stayed 140-190 MiB above backbone + budget
/// (`bench/vs-llama.cpp.sh`).
pub fn headroom(avail: u64) -> u64 {
    (avail / 10).max(192 << 20)
}

/// VRAM a GPU keeps free under `--vram-budget auto` for KV caches and
/// activations, out of `total`: a twentieth of the device, at least 2 GiB.
/// `smoe plan --device cuda` places VRAM by the same rule.
pub fn vram_headroom(total: u64) -> u64 {
    (total / 20).max(2 << 30)
}

/// Memory this process can still use: MemAvailable from /proc/meminfo,
/// capped by what its memory cgroup has left. In a container (or under a
/// systemd or cgroup limit) the host's free memory is not ours, and a budget
/// derived from it would get the process OOM-killed. None where neither is
/// known (not Linux).
pub fn available_memory() -> Option<u64> {
    let host = proc_kb("/proc/meminfo", "MemAvailable:");
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

/// A field in kB of a /proc file (`/proc/self/status`, `/proc/meminfo`),
/// in bytes, where the OS has one.
fn proc_kb(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Resident set of this process now (VmRSS).
pub fn current_rss() -> Option<u64> {
    proc_kb("/proc/self/status", "VmRSS:")
}

/// Peak resident set of this process (VmHWM).
pub fn peak_rss() -> Option<u64> {
    proc_kb("/proc/self/status", "VmHWM:")
}

/// The machine's memory (MemTotal).
pub fn mem_total() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemTotal:")
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
