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
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

use super::{config, expert_tensors, tokenizer, Extent, Gguf, GgufWeights};
use crate::checkpoint::{TensorSource, Weight};
use crate::model::Decoder;
use crate::vault::convert::{
    new_conversion_id, partial_dir, write_synced, ConvertReport, Progress,
};
use crate::vault::{
    align_up, header_page, part_start, ExpertLayer, Manifest, PartEntry, QuantChoice, TensorEntry,
    Vault, ALIGN, BACKBONE_FILE, EXPERTS_FILE, FORMAT, MANIFEST, VERSION,
};
use crate::{Error, Result};

/// Hands out a GGUF's tensors and remembers the backbone ones asked for,
/// so that the vault holds exactly what the decoder loads, under the names
/// and shapes it asks by.
struct Recorder<'a> {
    weights: GgufWeights<'a>,
    family: &'static crate::model::Family,
    asked: Mutex<Vec<(String, Weight)>>,
}

impl TensorSource for Recorder<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let w = self.weights.tensor(name, shape)?;
        if !self.family.is_routed_expert(name) {
            let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
            if !asked.iter().any(|(n, _)| n == name) {
                asked.push((name.to_string(), w.clone()));
            }
        }
        Ok(w)
    }
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
    let source_config = config::config_json(&g)?;
    let cfg = crate::config::ModelConfig::from_json(&source_config, g.path())?;
    if dst.exists() {
        return Err(Error::format(
            dst,
            "already exists; remove it or choose another output directory",
        ));
    }
    let recorder = Recorder {
        weights: GgufWeights::new(&g, &cfg),
        family: cfg.family,
        asked: Mutex::new(Vec::new()),
    };
    Decoder::load(&recorder, &cfg, None, None)?;
    let backbone = recorder
        .asked
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let layers = expert_tensors(&g, &cfg)?;
    let total = backbone
        .iter()
        .map(|(_, w)| w.bytes().len() as u64)
        .sum::<u64>()
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
    let id = new_conversion_id();

    let path = work.join(BACKBONE_FILE);
    let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(&header_page(&id))
        .map_err(|e| Error::io(&path, e))?;
    let mut offset = ALIGN;
    let mut entries = BTreeMap::new();
    let mut backbone_types = BTreeMap::new();
    for (name, w) in &backbone {
        let bytes = w.bytes();
        let padded = align_up(bytes.len() as u64);
        f.write_all(bytes).map_err(|e| Error::io(&path, e))?;
        f.write_all(&vec![0u8; (padded - bytes.len() as u64) as usize])
            .map_err(|e| Error::io(&path, e))?;
        if w.shape.len() == 2 {
            *backbone_types.entry(w.dtype.name()).or_insert(0usize) += 1;
        }
        entries.insert(
            name.clone(),
            TensorEntry {
                dtype: w.dtype.name().into(),
                shape: w.shape.clone(),
                offset,
                len: bytes.len() as u64,
                crc32: crc32fast::hash(bytes),
            },
        );
        offset += padded;
        done += bytes.len() as u64;
        progress(Progress { done, total });
    }
    f.sync_all().map_err(|e| Error::io(&path, e))?;

    let path = work.join(EXPERTS_FILE);
    let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(&header_page(&id))
        .map_err(|e| Error::io(&path, e))?;
    let mut at = ALIGN;
    let mut experts = Vec::with_capacity(layers.len());
    let mut expert_types = BTreeMap::new();
    for l in &layers {
        let mut record = Vec::new();
        let mut parts = Vec::with_capacity(3);
        for p in &l.parts {
            let off = part_start(record.len());
            record.resize(off, 0);
            record.resize(off + p.len as usize, 0);
            parts.push(PartEntry {
                dtype: p.dtype.name().into(),
                shape: p.shape,
                offset: off as u64,
                len: p.len,
            });
            *expert_types.entry(p.dtype.name()).or_insert(0usize) += 1;
        }
        let record_len = align_up(record.len() as u64);
        record.resize(record_len as usize, 0);
        let (mut offsets, mut crcs) = (Vec::new(), Vec::new());
        for e in 0..l.experts as u64 {
            for (p, entry) in l.parts.iter().zip(&parts) {
                let src = g.extent_data(Extent {
                    shard: p.shard,
                    offset: p.offset + e * p.len,
                    len: p.len,
                });
                record[entry.offset as usize..][..p.len as usize].copy_from_slice(src);
                done += p.len;
            }
            f.write_all(&record).map_err(|e| Error::io(&path, e))?;
            offsets.push(at);
            crcs.push(crc32fast::hash(&record));
            at += record_len;
            progress(Progress { done, total });
        }
        let parts: [PartEntry; 3] = parts
            .try_into()
            .map_err(|_| Error::invalid("three parts"))?;
        experts.push(ExpertLayer {
            layer: l.layer,
            parts,
            record_len,
            offsets,
            crc32: crcs,
        });
    }
    f.sync_all().map_err(|e| Error::io(&path, e))?;

    write_text_files(&g, &work)?;
    let most = |m: BTreeMap<&str, usize>| {
        m.into_iter()
            .max_by_key(|&(_, n)| n)
            .map_or(String::new(), |(t, _)| t.to_string())
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        conversion_id: id,
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
