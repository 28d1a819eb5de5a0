//! `smoe convert FILE.gguf -o VAULT`: a vault from a GGUF without
//! requantizing. Every tensor keeps its stored type and its blocks are
//! copied byte for byte; the only rearrangements are the ones loading a
//! GGUF makes anyway ([`super::GgufWeights`]: the `llama` architecture's
//! q/k rows put back in order, DeepSeek's split `kv_b_proj` joined in f32).
//! The tokenizer and chat template come along as the files a checkpoint
//! would carry.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::{config, expert_tensors, tokenizer, ExpertTensors, Extent, Gguf, GgufWeights};
use crate::checkpoint::TensorSource;
use crate::config::ModelConfig;
use crate::model::Decoder;
use crate::vault::convert::{
    finish, load_journal, open_experts, partial_dir, save_journal, source_fingerprint, write,
    write_synced, ConvertReport, Progress,
};
use crate::vault::{
    align_up, header_page, part_start, ExpertLayer, Manifest, PartEntry, QuantChoice, TensorEntry,
    Vault, ALIGN, BACKBONE_FILE, EXPERTS_FILE, FORMAT, VERSION,
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

/// What a GGUF's journal records as the types asked for: none are, its
/// blocks are copied as stored.
const AS_STORED: &str = "as stored in the GGUF";

/// Converts the GGUF at `src` (or the split set it belongs to) into a
/// vault at `dst`. As a checkpoint's conversion, it is written under
/// `VAULT.partial/` with expert layers journaled as they finish, so the
/// same command resumes an interrupted one after its last finished layer;
/// `stop_after_layers` stops it with an error after that many, as a crash
/// would (for tests).
pub fn convert(
    src: &Path,
    dst: &Path,
    stop_after_layers: Option<usize>,
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
    let layer_bytes =
        |l: &ExpertTensors| l.parts.iter().map(|p| p.len).sum::<u64>() * l.experts as u64;
    let backbone_bytes: u64 = manifest.backbone.values().map(|t| t.len).sum();
    let total = backbone_bytes + layers.iter().map(layer_bytes).sum::<u64>();
    let mut done = 0;

    let work = partial_dir(dst);
    let files: Vec<PathBuf> = g.shards().iter().map(|s| s.path().to_path_buf()).collect();
    let mut journal = load_journal(
        &work,
        &manifest.config,
        &source_fingerprint(&files)?,
        AS_STORED,
        AS_STORED,
    )?;
    let resumed_layers = journal.layers_done.len();
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    manifest.conversion_id = journal.conversion_id.clone();

    match &journal.backbone_done {
        Some(entries) => {
            manifest.backbone = entries.clone();
            done += backbone_bytes;
        }
        None => {
            let path = work.join(BACKBONE_FILE);
            let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
            write(&mut f, &path, &header_page(&manifest.conversion_id))?;
            for (name, shape) in &backbone {
                let w = weights.tensor(name, shape)?;
                let bytes = w.bytes();
                let entry = manifest
                    .backbone
                    .get_mut(name)
                    .filter(|e| e.len == bytes.len() as u64)
                    .ok_or_else(|| {
                        Error::invalid(format!("{name}: not the bytes its layout says"))
                    })?;
                write(&mut f, &path, bytes)?;
                let pad = align_up(entry.len) - entry.len;
                write(&mut f, &path, &vec![0u8; pad as usize])?;
                entry.crc32 = crc32fast::hash(bytes);
                done += entry.len;
                progress(Progress { done, total });
            }
            f.sync_all().map_err(|e| Error::io(&path, e))?;
            journal.backbone_done = Some(manifest.backbone.clone());
            save_journal(&work, &journal)?;
        }
    }

    let path = work.join(EXPERTS_FILE);
    let mut f = open_experts(&path, &mut journal)?;
    for (l, entry) in layers.iter().zip(&mut manifest.experts) {
        if let Some(j) = journal.layers_done.iter().find(|j| j.layer == l.layer) {
            entry.crc32.clone_from(&j.crc32);
            done += layer_bytes(l);
            progress(Progress { done, total });
            continue;
        }
        // Layers are written in order, each where the layout put it.
        if entry.offsets.first() != Some(&journal.experts_len) {
            return Err(Error::format(
                &work,
                format!(
                    "the journal of this partial conversion does not match layer {}'s place in the vault; remove the directory and convert again",
                    l.layer
                ),
            ));
        }
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
            write(&mut f, &path, &record)?;
            *crc = crc32fast::hash(&record);
            progress(Progress { done, total });
        }
        f.sync_data().map_err(|e| Error::io(&path, e))?;
        journal.experts_len += entry.record_len * l.experts as u64;
        journal.layers_done.push(entry.clone());
        save_journal(&work, &journal)?;
        if stop_after_layers == Some(journal.layers_done.len() - resumed_layers) {
            return Err(Error::invalid(format!(
                "stopped after {} expert layers as asked; run again to finish",
                journal.layers_done.len()
            )));
        }
    }
    drop(f);

    write_text_files(&g, &work)?;
    let config = serde_json::to_string_pretty(&manifest.config)
        .map_err(|e| Error::invalid(e.to_string()))?;
    write_synced(&work.join("config.json"), config.as_bytes())?;
    finish(&work, dst, &manifest)?;

    let vault = Vault::open(dst)?;
    Ok(ConvertReport {
        dir: dst.to_path_buf(),
        backbone_bytes: vault.backbone_bytes(),
        expert_bytes: vault.expert_bytes(),
        quant: manifest.stored_quant(),
        quant_error: manifest.quant_error,
        resumed_layers,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The metadata's tokenizer and template as `tokenizer.json`,
/// `tokenizer_config.json` and `generation_config.json` (its end-of-
/// generation ids), the files a checkpoint carries; nothing when the file
/// has no tokenizer.
pub(super) fn write_text_files(g: &Gguf, dir: &Path) -> Result<()> {
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
    // Named templates go back into transformers' list form, where the
    // vault's loader (as transformers) picks `tool_use` when tools are
    // passed; without a default the GGUF has no template, nor the vault.
    match &t.chat_template {
        Some(source) if !t.named_templates.is_empty() => {
            let named = t
                .named_templates
                .iter()
                .map(|(name, template)| json!({"name": name, "template": template}));
            let list: Vec<Value> = std::iter::once(json!({"name": "default", "template": source}))
                .chain(named)
                .collect();
            cfg.insert("chat_template".into(), Value::Array(list));
        }
        Some(source) => {
            cfg.insert("chat_template".into(), json!(source));
        }
        None => {}
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
