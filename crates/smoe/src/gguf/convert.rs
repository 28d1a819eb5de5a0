//! `smoe convert FILE.gguf -o VAULT`: a vault from a GGUF without
//! requantizing. Every tensor keeps its stored type and its blocks are
//! copied byte for byte; the only rearrangements are the ones loading a
//! GGUF makes anyway ([`super::GgufWeights`]: the `llama` architecture's
//! q/k rows put back in order, DeepSeek's split `kv_b_proj` joined in f32).
//! The tokenizer and chat template come along as the files a checkpoint
//! would carry.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use super::{config, expert_tensors, tokenizer, ExpertTensors, Extent, Gguf, GgufWeights};
use crate::checkpoint::TensorSource;
use crate::config::ModelConfig;
use crate::model::Decoder;
use crate::vault::convert::{
    new_conversion_id, partial_dir, write_synced, ConvertReport, Progress,
};
use crate::vault::{
    align_up, header_page, part_start, ExpertLayer, Manifest, PartEntry, QuantChoice, TensorEntry,
    Vault, ALIGN, BACKBONE_FILE, EXPERTS_FILE, FORMAT, MANIFEST, VERSION,
};
use crate::{Error, Result};

/// The vault a GGUF converts to, known before a byte is copied.
pub struct Layout {
    pub config: ModelConfig,
    /// The manifest `convert` writes, its checksums still 0 and its
    /// conversion id empty.
    pub manifest: Manifest,
    /// Backbone tensors by name and shape, in backbone.bin's order.
    pub backbone: Vec<(String, Vec<usize>)>,
    /// Where each expert layer of the manifest is in the GGUF.
    pub layers: Vec<ExpertTensors>,
}

/// The vault of the GGUF `g`, from its metadata and tensor table alone:
/// the backbone is what the decoder loads, each tensor in the type
/// [`GgufWeights`] hands it out in; an expert record is the GGUF's three
/// slices at [`part_start`]s, padded to [`ALIGN`].
pub fn layout(g: &Gguf) -> Result<Layout> {
    let source_config = config::config_json(g)?;
    let cfg = ModelConfig::from_json(&source_config, g.path())?;
    let weights = GgufWeights::new(g, &cfg);
    let (mut backbone, mut entries, mut backbone_types) =
        (Vec::new(), BTreeMap::new(), BTreeMap::new());
    let mut offset = ALIGN;
    for (name, shape) in crate::plan::decoder_tensors(&cfg)? {
        if cfg.family.is_routed_expert(&name) || entries.contains_key(&name) {
            continue;
        }
        let (dtype, len) = weights.layout(&name, &shape)?;
        if shape.len() == 2 {
            *backbone_types.entry(dtype.name()).or_insert(0usize) += 1;
        }
        entries.insert(
            name.clone(),
            TensorEntry {
                dtype: dtype.name().into(),
                shape: shape.clone(),
                offset,
                len,
                crc32: 0,
            },
        );
        offset += align_up(len);
        backbone.push((name, shape));
    }
    let layers = expert_tensors(g, &cfg)?;
    let mut at = ALIGN;
    let mut experts = Vec::with_capacity(layers.len());
    let mut expert_types = BTreeMap::new();
    for l in &layers {
        let mut end = 0;
        let parts = l.parts.map(|p| {
            let off = part_start(end);
            end = off + p.len as usize;
            *expert_types.entry(p.dtype.name()).or_insert(0usize) += 1;
            PartEntry {
                dtype: p.dtype.name().into(),
                shape: p.shape,
                offset: off as u64,
                len: p.len,
            }
        });
        let record_len = align_up(end as u64);
        experts.push(ExpertLayer {
            layer: l.layer,
            parts,
            record_len,
            offsets: (0..l.experts as u64).map(|e| at + e * record_len).collect(),
            crc32: vec![0; l.experts],
        });
        at += l.experts as u64 * record_len;
    }
    let most = |m: BTreeMap<&str, usize>| {
        m.into_iter()
            .max_by_key(|&(_, n)| n)
            .map_or(String::new(), |(t, _)| t.to_string())
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        conversion_id: String::new(),
        architecture: cfg.family.model_types[0].into(),
        config: source_config,
        quant: QuantChoice {
            experts: most(expert_types),
            backbone: most(backbone_types),
        },
        backbone: entries,
        experts,
        quant_error: BTreeMap::new(),
    };
    Ok(Layout {
        config: cfg,
        manifest,
        backbone,
        layers,
    })
}

/// Converts the GGUF at `src` (or the split set it belongs to) into a
/// vault at `dst`.
pub fn convert(
    src: &Path,
    dst: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<ConvertReport> {
    let start = Instant::now();
    let g = Gguf::open(src)?;
    let Layout {
        config: cfg,
        mut manifest,
        backbone,
        layers,
    } = layout(&g)?;
    if dst.exists() {
        return Err(Error::format(
            dst,
            "already exists; remove it or choose another output directory",
        ));
    }
    let weights = GgufWeights::new(&g, &cfg);
    // The vault must load: what the decoder refuses of these weights is
    // refused before anything is written.
    Decoder::load(&weights, &cfg, None, None)?;
    let total = manifest.backbone.values().map(|t| t.len).sum::<u64>()
        + layers
            .iter()
            .map(|l| l.parts.iter().map(|p| p.len).sum::<u64>() * l.experts as u64)
            .sum::<u64>();
    let mut done = 0;

    let work = partial_dir(dst);
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    }
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    manifest.conversion_id = new_conversion_id();
    let id = &manifest.conversion_id;

    let path = work.join(BACKBONE_FILE);
    let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(&header_page(id))
        .map_err(|e| Error::io(&path, e))?;
    for (name, shape) in &backbone {
        let w = weights.tensor(name, shape)?;
        let bytes = w.bytes();
        let entry = manifest
            .backbone
            .get_mut(name)
            .filter(|e| e.len == bytes.len() as u64)
            .ok_or_else(|| Error::invalid(format!("{name}: not the bytes its layout says")))?;
        let padded = align_up(entry.len);
        f.write_all(bytes).map_err(|e| Error::io(&path, e))?;
        f.write_all(&vec![0u8; (padded - entry.len) as usize])
            .map_err(|e| Error::io(&path, e))?;
        entry.crc32 = crc32fast::hash(bytes);
        done += entry.len;
        progress(Progress { done, total });
    }
    f.sync_all().map_err(|e| Error::io(&path, e))?;

    let path = work.join(EXPERTS_FILE);
    let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(&header_page(id))
        .map_err(|e| Error::io(&path, e))?;
    for (l, entry) in layers.iter().zip(&mut manifest.experts) {
        let mut record = vec![0u8; entry.record_len as usize];
        for (e, crc) in entry.crc32.iter_mut().enumerate() {
            for (p, part) in l.parts.iter().zip(&entry.parts) {
                let src = g.extent_data(Extent {
                    shard: p.shard,
                    offset: p.offset + e as u64 * p.len,
                    len: p.len,
                });
                record[part.offset as usize..][..p.len as usize].copy_from_slice(src);
                done += p.len;
            }
            f.write_all(&record).map_err(|e| Error::io(&path, e))?;
            *crc = crc32fast::hash(&record);
            progress(Progress { done, total });
        }
    }
    f.sync_all().map_err(|e| Error::io(&path, e))?;

    write_text_files(&g, &work)?;
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::invalid(e.to_string()))?;
    let config = serde_json::to_string_pretty(&manifest.config)
        .map_err(|e| Error::invalid(e.to_string()))?;
    write_synced(&work.join("config.json"), config.as_bytes())?;
    write_synced(&work.join(MANIFEST), text.as_bytes())?;
    std::fs::rename(&work, dst).map_err(|e| Error::io(dst, e))?;

    let vault = Vault::open(dst)?;
    Ok(ConvertReport {
        dir: dst.to_path_buf(),
        backbone_bytes: vault.backbone_bytes(),
        expert_bytes: vault.expert_bytes(),
        quant: manifest.stored_quant(),
        quant_error: manifest.quant_error,
        resumed_layers: 0,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The metadata's tokenizer and template as `tokenizer.json`,
/// `tokenizer_config.json` and `generation_config.json` (its end-of-
/// generation ids), the files a checkpoint carries; nothing when the file
/// has no tokenizer.
fn write_text_files(g: &Gguf, dir: &Path) -> Result<()> {
    if g.metadata().get("tokenizer.ggml.model").is_none() {
        return Ok(());
    }
    let t = tokenizer::load(g)?;
    let json = t
        .tokenizer
        .to_string(true)
        .map_err(|e| Error::format(g.path(), format!("writing its tokenizer as JSON: {e}")))?;
    write_synced(&dir.join("tokenizer.json"), json.as_bytes())?;
    let mut cfg = serde_json::Map::new();
    for (key, value) in [
        ("bos_token", &t.special.bos),
        ("eos_token", &t.special.eos),
        ("unk_token", &t.special.unk),
        ("pad_token", &t.special.pad),
    ] {
        if let Some(v) = value {
            cfg.insert(key.into(), json!(v));
        }
    }
    if let Some(source) = &t.chat_template {
        cfg.insert("chat_template".into(), json!(source));
    }
    let text = serde_json::to_string_pretty(&Value::Object(cfg))
        .map_err(|e| Error::invalid(e.to_string()))?;
    write_synced(&dir.join("tokenizer_config.json"), text.as_bytes())?;
    let generation = json!({ "eos_token_id": t.end_of_generation });
    write_synced(
        &dir.join("generation_config.json"),
        generation.to_string().as_bytes(),
    )
}
