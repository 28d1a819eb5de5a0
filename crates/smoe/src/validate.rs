//! One validation pass over a model's tensors against its config, for
//! checkpoints (at convert and at load) and vaults (at load), run before
//! anything is sized from the config: every tensor the family needs is
//! present with the shape the config implies, no weights lie beyond the
//! layers the config declares, every size is sane before it is allocated,
//! and a vault's expert records have the shapes its config implies.
//!
//! A damaged input is refused here with the file and the tensor or key
//! named, rather than converting to a vault that fails at load or running
//! into a kernel's shape assertion in the middle of a request.

use std::collections::BTreeSet;
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::vault::{self, Vault, ALIGN};

/// Largest layer count accepted; published MoE models have at most ~100.
/// Checked before the per-layer tables are allocated, so a config that
/// says 10^12 gets an error instead of an allocation failure.
pub const MAX_LAYERS: usize = 4096;
/// Most routed experts over all layers (layers x experts a layer): the
/// loader and the planner hold a record of each, so a count near
/// `MAX_LAYERS x MAX_DIM` would exhaust memory before any tensor is
/// read. Kimi-K2 has 23,424 (61 x 384), Qwen3-235B-A22B 12,032.
pub const MAX_ROUTED_EXPERTS: usize = 1 << 18;
/// Largest single dimension (hidden size, vocabulary, expert count, widths):
/// far above any published model, small enough that products of two of
/// them cannot overflow when memory is planned.
pub const MAX_DIM: usize = 1 << 24;
/// Most elements in one weight matrix: 2^36 (128 GiB as bf16), 58x the
/// largest published one (Kimi-K2's embedding, 163,840 x 7,168). Two
/// dimensions under [`MAX_DIM`] can still multiply to terabytes, which the
/// planner's tensor listing would try to map.
pub const MAX_MATRIX: u64 = 1 << 36;

/// Bounds on the config's sizes, before any allocation or per-layer loop
/// depends on them; [`ModelConfig`]'s own validation runs this first.
pub fn sizes(cfg: &ModelConfig, path: &Path) -> Result<()> {
    let bad = |msg: String| Err(Error::format(path, msg));
    if cfg.num_hidden_layers > MAX_LAYERS {
        return bad(format!(
            "num_hidden_layers is {}, expected at most {MAX_LAYERS}",
            cfg.num_hidden_layers
        ));
    }
    for (key, v) in [
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("moe_intermediate_size", cfg.moe_intermediate_size),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("head_dim", cfg.head_dim),
        ("num_experts", cfg.num_experts),
        ("num_experts_per_tok", cfg.num_experts_per_tok),
        (
            "shared_expert_intermediate_size",
            cfg.shared_expert_intermediate_size,
        ),
    ] {
        if v > MAX_DIM {
            return bad(format!("{key} is {v}, expected at most {MAX_DIM}"));
        }
    }
    let hidden = cfg.hidden_size;
    let mut matrices = vec![
        ("vocab_size", cfg.vocab_size, "hidden_size", hidden),
        (
            "intermediate_size",
            cfg.intermediate_size,
            "hidden_size",
            hidden,
        ),
        (
            "moe_intermediate_size",
            cfg.moe_intermediate_size,
            "hidden_size",
            hidden,
        ),
        (
            "shared_expert_intermediate_size",
            cfg.shared_expert_intermediate_size,
            "hidden_size",
            hidden,
        ),
        (
            "num_attention_heads x head_dim",
            cfg.num_attention_heads * cfg.head_dim,
            "hidden_size",
            hidden,
        ),
    ];
    if let Some(m) = cfg.mla {
        let heads = cfg.num_attention_heads;
        matrices.extend([
            (
                "num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim)",
                heads * (m.qk_nope_head_dim + m.qk_rope_head_dim),
                "q_lora_rank",
                m.q_lora_rank.unwrap_or(hidden),
            ),
            (
                "num_attention_heads x (qk_nope_head_dim + v_head_dim)",
                heads * (m.qk_nope_head_dim + m.v_head_dim),
                "kv_lora_rank",
                m.kv_lora_rank,
            ),
            (
                "num_attention_heads x v_head_dim",
                heads * m.v_head_dim,
                "hidden_size",
                hidden,
            ),
        ]);
    }
    for (rows_key, rows, cols_key, cols) in matrices {
        let elements = (rows as u64).saturating_mul(cols as u64);
        if elements > MAX_MATRIX {
            return bad(format!(
                "{rows_key} ({rows}) x {cols_key} ({cols}) is a matrix of {elements} elements, expected at most {MAX_MATRIX}"
            ));
        }
    }
    if cfg.num_experts == 0 {
        return bad("num_experts is 0, expected a Mixture-of-Experts model's expert count".into());
    }
    let routed = cfg.num_hidden_layers * cfg.num_experts;
    if routed > MAX_ROUTED_EXPERTS {
        return bad(format!(
            "num_hidden_layers {} x num_experts {} is {routed} routed experts, expected at most {MAX_ROUTED_EXPERTS}",
            cfg.num_hidden_layers, cfg.num_experts
        ));
    }
    Ok(())
}

/// The layer index of a tensor named `model.layers.{i}.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Weights of layers the config does not declare mean config.json and the
/// weights disagree (a config edited down, or weights of another model):
/// running would silently skip them, except in a family whose checkpoints
/// store extra layers by design ([`Family::extra_layers`](crate::model::family::Family)).
fn no_layers_beyond<'a>(
    cfg: &ModelConfig,
    names: impl Iterator<Item = &'a str>,
    config_path: &Path,
) -> Result<()> {
    if cfg.family.extra_layers {
        return Ok(());
    }
    let beyond = names
        .filter_map(|n| layer_of(n).map(|l| (l, n)))
        .filter(|&(l, _)| l >= cfg.num_hidden_layers)
        .max_by_key(|&(l, _)| l);
    match beyond {
        Some((l, name)) => Err(Error::format(
            config_path,
            format!(
                "num_hidden_layers is {}, but the weights hold layer {l} (tensor \"{name}\"): \
                 config.json and the weights disagree",
                cfg.num_hidden_layers
            ),
        )),
        None => Ok(()),
    }
}

/// Every layer the config declares must have weights; checked by name
/// before the model is built, so a config claiming more layers than there
/// are is refused without building (or allocating for) any of them.
fn layers_present<'a>(
    cfg: &ModelConfig,
    names: impl Iterator<Item = &'a str>,
    config_path: &Path,
) -> Result<()> {
    let present: BTreeSet<usize> = names.filter_map(layer_of).collect();
    if let Some(missing) = (0..cfg.num_hidden_layers).find(|l| !present.contains(l)) {
        let held = present.range(..cfg.num_hidden_layers).count();
        return Err(Error::format(
            config_path,
            format!(
                "num_hidden_layers is {}, but the weights hold no tensor of layer {missing} \
                 ({held} of the declared layers have weights)",
                cfg.num_hidden_layers
            ),
        ));
    }
    Ok(())
}

/// The checkpoint's layers against the config's count, by tensor name:
/// what loading checks before the decoder (which checks each tensor's
/// presence and shape as it asks for it) is built.
pub fn checkpoint_layers(ckpt: &Checkpoint) -> Result<()> {
    let cfg = &ckpt.config;
    let config_path = ckpt.dir.join("config.json");
    layers_present(cfg, ckpt.tensor_names(), &config_path)?;
    no_layers_beyond(cfg, ckpt.tensor_names(), &config_path)
}

/// A checkpoint against its config.json: layer coverage, then every
/// tensor's presence, dtype (only float types are mapped at all) and shape,
/// routed experts included. Cheap: the weights are mapped views, only the
/// norms are read.
pub fn checkpoint(ckpt: &Checkpoint) -> Result<()> {
    let cfg = &ckpt.config;
    checkpoint_layers(ckpt)?;
    // Building the decoder asks for each tensor by name and shape exactly
    // as loading will; the views it makes are dropped.
    Decoder::load(ckpt, cfg, None, None)?;
    Ok(())
}

/// A vault against the config in its manifest: the manifest's
/// config against the config.json copied beside it, layer coverage of the
/// backbone, and every expert layer's record layout against the shapes
/// the config implies. The backbone's own tensors are shape-checked when
/// the decoder is built from it.
pub fn vault(v: &Vault, cfg: &ModelConfig) -> Result<()> {
    let manifest_path = v.dir.join(vault::MANIFEST);
    let copied = v.dir.join("config.json");
    if copied.is_file() {
        let on_disk = crate::error::read_json(&copied)?;
        if on_disk != v.manifest.config {
            return Err(Error::format(
                &manifest_path,
                format!(
                    "its \"config\" differs from {}, which was copied from the same checkpoint: \
                     one of them was edited; re-convert",
                    copied.display()
                ),
            ));
        }
    }
    let names = || v.manifest.backbone.keys().map(String::as_str);
    layers_present(cfg, names(), &manifest_path)?;
    no_layers_beyond(cfg, names(), &manifest_path)?;

    let moe: Vec<usize> = (0..cfg.num_hidden_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .collect();
    let stored: Vec<usize> = v.manifest.experts.iter().map(|l| l.layer).collect();
    if stored != moe {
        return Err(Error::format(
            &manifest_path,
            format!("holds experts of layers {stored:?}, the config's sparse layers are {moe:?}"),
        ));
    }
    let (h, m) = (cfg.hidden_size, cfg.moe_intermediate_size);
    for l in &v.manifest.experts {
        if l.offsets.len() != cfg.num_experts {
            return Err(Error::format(
                &manifest_path,
                format!(
                    "layer {}: {} expert records, the config says num_experts {}",
                    l.layer,
                    l.offsets.len(),
                    cfg.num_experts
                ),
            ));
        }
        for ((name, p), want) in
            vault::convert::PARTS
                .iter()
                .zip(&l.parts)
                .zip([[m, h], [m, h], [h, m]])
        {
            if p.shape != want {
                return Err(Error::format(
                    &manifest_path,
                    format!(
                        "layer {} experts' {name} has shape {:?}, the config implies {want:?}",
                        l.layer, p.shape
                    ),
                ));
            }
        }
        // The kernels read blocks in place; convert puts each part on a
        // 64-byte boundary of its record.
        if let Some((name, p)) = vault::convert::PARTS
            .iter()
            .zip(&l.parts)
            .find(|(_, p)| !p.offset.is_multiple_of(64))
        {
            return Err(Error::format(
                &manifest_path,
                format!(
                    "layer {} experts' {name} starts at byte {} of its record, expected a multiple of 64",
                    l.layer, p.offset
                ),
            ));
        }
        if !l.record_len.is_multiple_of(ALIGN) {
            return Err(Error::format(
                &manifest_path,
                format!(
                    "layer {}: record_len {} is not a multiple of {ALIGN}, which direct reads need",
                    l.layer, l.record_len
                ),
            ));
        }
        if let Some((e, off)) = l
            .offsets
            .iter()
            .enumerate()
            .find(|(_, o)| !o.is_multiple_of(ALIGN))
        {
            return Err(Error::format(
                &manifest_path,
                format!(
                    "layer {} expert {e}: offset {off} is not a multiple of {ALIGN}, which direct reads need",
                    l.layer
                ),
            ));
        }
    }
    Ok(())
}

/// Beside the backbone: the identity of the file and manifest whose
/// checksums last matched, so a vault is hashed once, not at every load.
pub const VERIFIED_STAMP: &str = "backbone.verified";

/// The backbone's tensors against the CRC32s in the manifest, so that a
/// flipped byte (a router row, a norm) or a manifest edited by hand is
/// refused instead of running with different tokens. Hashing reads the
/// whole backbone once (crc32fast runs at several GB/s, so the cost is the
/// read: well under a second for the 331 MiB of the 8-layer bench vault);
/// afterwards a stamp beside it records the file's size, mtime, ctime and
/// inode and the manifest's own checksum, and an unchanged pair is
/// trusted without reading. Any write to either file changes the stamp's
/// key. Where the vault directory is read-only the stamp cannot be
/// written and every load hashes.
pub fn backbone_checksums(v: &Vault) -> Result<()> {
    let manifest_path = v.dir.join(vault::MANIFEST);
    let path = v.backbone_path();
    let key = stamp_key(&path, &manifest_path)?;
    let stamp_path = v.dir.join(VERIFIED_STAMP);
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == key) {
        return Ok(());
    }
    let map = crate::checkpoint::map_file(&path)?;
    for (name, t) in &v.manifest.backbone {
        let bytes = usize::try_from(t.offset)
            .ok()
            .zip(usize::try_from(t.offset.saturating_add(t.len)).ok())
            .and_then(|(start, end)| map.bytes().get(start..end))
            .ok_or_else(|| {
                Error::format(
                    &path,
                    format!(
                        "tensor \"{name}\": bytes {}..{} lie past the end of the file ({} bytes)",
                        t.offset,
                        t.offset.saturating_add(t.len),
                        map.len()
                    ),
                )
            })?;
        let crc = crc32fast::hash(bytes);
        if crc != t.crc32 {
            return Err(Error::format(
                &path,
                format!(
                    "tensor \"{name}\" has CRC32 {crc:08x}, the manifest says {:08x}: \
                     the file or the manifest is damaged; re-convert",
                    t.crc32
                ),
            ));
        }
    }
    // Best effort: without the stamp the next load hashes again.
    let tmp = v.dir.join(format!("{VERIFIED_STAMP}.tmp"));
    if std::fs::write(&tmp, &key).is_ok() {
        let _ = std::fs::rename(&tmp, &stamp_path);
    }
    Ok(())
}

/// What identifies the backbone and manifest as hashed: any write to
/// either changes it.
fn stamp_key(backbone: &Path, manifest: &Path) -> Result<String> {
    let meta = std::fs::metadata(backbone).map_err(|e| Error::io(backbone, e))?;
    let manifest_crc =
        crc32fast::hash(&std::fs::read(manifest).map_err(|e| Error::io(manifest, e))?);
    #[cfg(unix)]
    let file = {
        use std::os::unix::fs::MetadataExt;
        format!(
            "dev {} ino {} size {} mtime {}.{} ctime {}.{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        )
    };
    // Without inode and ctime a stamp could not notice a file replaced in
    // place; never trust one.
    #[cfg(not(unix))]
    let file = format!(
        "size {} unstamped {:?}",
        meta.len(),
        std::time::SystemTime::now()
    );
    Ok(format!("{file} manifest {manifest_crc:08x}\n"))
}
