//! `smoe convert`: checkpoint → vault, one tensor at a time.
//!
//! Memory stays at a few tensors whatever the model size: the checkpoint is
//! memory-mapped, each tensor is read, converted, written and its pages
//! handed back to the OS before the next. Everything is written under
//! `VAULT.partial/` and renamed into place only when complete, so an
//! interrupted run never leaves a vault that loads. Expert layers are
//! journaled as they finish, so running the same command again resumes
//! after the last finished layer instead of starting over.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::recipe::{self, Role};
use super::{
    align_up, header_page, part_start, ExpertLayer, Manifest, PartEntry, QuantChoice, TensorEntry,
    ALIGN, BACKBONE_FILE, EXPERTS_FILE, FORMAT, MANIFEST, VERSION,
};
use crate::checkpoint::{Checkpoint, Weight};
use crate::error::{Error, Result};
use crate::kernels::widen;
use crate::quant;
use crate::quant::DType;

/// Parts of an expert record, in record order.
pub const PARTS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Type of routed-expert weights: a quantized type or bf16.
    pub experts: DType,
    /// Type of the backbone's 2-D weights: bf16 or a quantized type, with
    /// the exceptions of [`super::recipe`].
    pub backbone: DType,
    /// Allow 2- and 3-bit types, which ruin fine-grained MoE models.
    pub allow_lossy: bool,
    /// Stop with an error after this many expert layers, leaving the
    /// partial vault behind: how the tests simulate a crash.
    pub stop_after_layers: Option<usize>,
}

impl ConvertOptions {
    fn check(&self) -> Result<()> {
        for (what, t) in [("--experts", self.experts), ("--backbone", self.backbone)] {
            if let DType::Quant(q) = t {
                if q.is_lossy_below_4bit() && !self.allow_lossy {
                    return Err(Error::invalid(format!(
                        "{what} {}: 2- and 3-bit experts destroyed fine-grained MoE models in the prior art; \
                         4-bit is the floor. Pass --allow-lossy to convert anyway",
                        q.name()
                    )));
                }
            }
            if matches!(t, DType::F32) {
                return Err(Error::invalid(format!(
                    "{what} f32 is not a storage type; use bf16"
                )));
            }
        }
        Ok(())
    }
}

/// Progress, reported in source bytes.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What the conversion measured.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub dir: PathBuf,
    pub backbone_bytes: u64,
    pub expert_bytes: u64,
    /// What the weights are stored as: [`super::Manifest::stored_quant`].
    pub quant: String,
    /// Relative RMS error per tensor class, e.g. "experts.gate_proj".
    pub quant_error: BTreeMap<String, f64>,
    pub resumed_layers: usize,
    pub seconds: f64,
}

/// Journal of a partial conversion: what was asked and how far it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Journal {
    source_config: serde_json::Value,
    /// [`source_fingerprint`] of the checkpoint being converted: a
    /// checkpoint with the same config but other weights must not be
    /// resumed into (layers of two models, and `verify` would pass it).
    #[serde(default)]
    source_weights: String,
    experts: String,
    backbone: String,
    pub(crate) conversion_id: String,
    pub(crate) backbone_done: Option<BTreeMap<String, TensorEntry>>,
    pub(crate) layers_done: Vec<ExpertLayer>,
    pub(crate) experts_len: u64,
    error_sums: BTreeMap<String, (f64, f64)>,
}

pub(crate) const JOURNAL: &str = "journal.json";

/// Accumulates squared error and squared signal per tensor class.
#[derive(Debug, Default, Clone)]
struct ErrorSums(BTreeMap<String, (f64, f64)>);

impl ErrorSums {
    fn add(&mut self, class: &str, (err, sig): (f64, f64)) {
        let e = self.0.entry(class.to_string()).or_default();
        e.0 += err;
        e.1 += sig;
    }

    fn relative_rms(&self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(k, (e, s))| (k.clone(), if *s > 0.0 { (e / s).sqrt() } else { 0.0 }))
            .collect()
    }
}

pub fn partial_dir(dst: &Path) -> PathBuf {
    let mut name = dst
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    dst.with_file_name(name)
}

pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ConvertReport> {
    opts.check()?;
    let start = Instant::now();
    let ckpt = Checkpoint::open(src)?;
    crate::validate::checkpoint(&ckpt)?;
    let cfg = &ckpt.config;
    if dst.exists() {
        return Err(Error::format(
            dst,
            "already exists; remove it or choose another output directory",
        ));
    }
    let source_config = crate::error::read_json(&src.join("config.json"))?;
    let work = partial_dir(dst);

    let fingerprint = source_fingerprint(ckpt.files())?;
    let mut journal = load_journal(
        &work,
        &source_config,
        &fingerprint,
        opts.experts.name(),
        opts.backbone.name(),
    )?;
    let resumed_layers = journal.layers_done.len();
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;

    let (backbone_names, expert_layers) = classify(&ckpt)?;
    let total: u64 = backbone_names
        .iter()
        .cloned()
        .chain(expert_layers.iter().flat_map(|&l| {
            (0..cfg.num_experts).flat_map(move |e| cfg.family.expert_tensor_names(l, e))
        }))
        .map(|n| ckpt.tensor_bytes(&n))
        .sum();
    let mut done = 0u64;
    let mut errors = ErrorSums(journal.error_sums.clone());

    if journal.backbone_done.is_none() {
        let entries = write_backbone(
            &ckpt,
            &work,
            &backbone_names,
            opts,
            &journal.conversion_id,
            &mut errors,
            &mut |n| {
                done += n;
                progress(Progress { done, total });
            },
        )?;
        journal.backbone_done = Some(entries);
        journal.error_sums = errors.0.clone();
        save_journal(&work, &journal)?;
    } else {
        done += backbone_names
            .iter()
            .map(|n| ckpt.tensor_bytes(n))
            .sum::<u64>();
    }

    let experts_path = work.join(EXPERTS_FILE);
    let mut file = open_experts(&experts_path, &mut journal)?;

    for &layer in &expert_layers {
        let bytes_in: u64 = (0..cfg.num_experts)
            .flat_map(|e| cfg.family.expert_tensor_names(layer, e))
            .map(|n| ckpt.tensor_bytes(&n))
            .sum();
        if journal.layers_done.iter().any(|l| l.layer == layer) {
            done += bytes_in;
            progress(Progress { done, total });
            continue;
        }
        let entry = write_expert_layer(
            &ckpt,
            layer,
            opts,
            &mut file,
            &experts_path,
            &mut journal.experts_len,
            &mut errors,
            &mut |n| {
                done += n;
                progress(Progress { done, total });
            },
        )?;
        file.sync_data().map_err(|e| Error::io(&experts_path, e))?;
        journal.layers_done.push(entry);
        journal.error_sums = errors.0.clone();
        save_journal(&work, &journal)?;
        if opts.stop_after_layers == Some(journal.layers_done.len() - resumed_layers) {
            return Err(Error::invalid(format!(
                "stopped after {} expert layers as asked; run again to finish",
                journal.layers_done.len()
            )));
        }
    }
    drop(file);

    copy_side_files(src, &work)?;
    let backbone = journal.backbone_done.clone().unwrap_or_default();
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        conversion_id: journal.conversion_id.clone(),
        architecture: cfg.family.model_types[0].into(),
        config: source_config,
        quant: QuantChoice {
            experts: opts.experts.name().into(),
            backbone: opts.backbone.name().into(),
        },
        backbone,
        experts: journal.layers_done.clone(),
        quant_error: errors.relative_rms(),
    };
    finish(&work, dst, &manifest)?;

    let vault = super::Vault::open(dst)?;
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

/// The experts file of a conversion under way, positioned for the next
/// layer: new (its header written) when no layer is journaled, else cut
/// back to the journaled length.
pub(crate) fn open_experts(path: &Path, journal: &mut Journal) -> Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if journal.layers_done.is_empty() {
        file.set_len(0).map_err(|e| Error::io(path, e))?;
        write(&mut file, path, &header_page(&journal.conversion_id))?;
        journal.experts_len = ALIGN;
    } else {
        // Anything past the journaled length is a layer that did not finish.
        file.set_len(journal.experts_len)
            .map_err(|e| Error::io(path, e))?;
    }
    file.seek(SeekFrom::Start(journal.experts_len))
        .map_err(|e| Error::io(path, e))?;
    Ok(file)
}

/// Writes the manifest, the last file, and moves the finished vault from
/// `work` into place.
pub(crate) fn finish(work: &Path, dst: &Path, manifest: &Manifest) -> Result<()> {
    let text = serde_json::to_string_pretty(manifest).map_err(|e| Error::invalid(e.to_string()))?;
    write_synced(&work.join(MANIFEST), text.as_bytes())?;
    std::fs::remove_file(work.join(JOURNAL)).map_err(|e| Error::io(work.join(JOURNAL), e))?;
    std::fs::rename(work, dst).map_err(|e| Error::io(dst, e))
}

/// Splits the checkpoint into backbone tensors and the layers whose routed
/// experts go to the experts file; refuses checkpoints with missing experts.
fn classify(ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<usize>)> {
    let cfg = &ckpt.config;
    let layers: Vec<usize> = (0..cfg.num_hidden_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .collect();
    // DeepSeek-V3 checkpoints carry a multi-token-prediction layer past
    // `num_hidden_layers` that inference never runs: it stays behind.
    let beyond = |name: &str| {
        name.strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= cfg.num_hidden_layers)
    };
    let mut backbone: Vec<String> = ckpt
        .tensor_names()
        .filter(|n| !cfg.family.is_routed_expert(n) && !beyond(n))
        .map(String::from)
        .collect();
    backbone.sort();
    for &l in &layers {
        for e in 0..cfg.num_experts {
            for n in cfg.family.expert_tensor_names(l, e) {
                if !ckpt.contains(&n) {
                    return Err(Error::format(&ckpt.dir, format!("missing tensor \"{n}\"")));
                }
            }
        }
    }
    Ok((backbone, layers))
}

fn tensor_class(name: &str) -> String {
    // "model.layers.3.self_attn.q_proj.weight" -> "self_attn.q_proj"
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["model", "layers", _, rest @ ..] => rest[..rest.len().saturating_sub(1)].join("."),
        _ => name.trim_end_matches(".weight").to_string(),
    }
}

/// Converts one tensor's rows to `target`, returning the bytes and the
/// (squared error, squared signal) of the conversion.
fn encode(w: &Weight, target: DType) -> Result<(Vec<u8>, DType, (f64, f64))> {
    let (rows, cols) = w.dims2().unwrap_or((1, w.numel()));
    let chosen = recipe::row_type(target, cols);
    if chosen == w.dtype {
        return Ok((w.bytes().to_vec(), chosen, (0.0, 0.0)));
    }
    let mut f = vec![0.0f32; rows * cols];
    widen(w.dtype, w.bytes(), &mut f);
    let signal: f64 = f.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    let (bytes, back) = match chosen {
        DType::Quant(q) => {
            let mut out = vec![0u8; rows * q.row_bytes(cols).unwrap_or(0)];
            quant::quantize_rows(q, &f, cols, &mut out)?;
            let mut back = vec![0.0f32; f.len()];
            quant::dequantize_rows(q, &out, cols, &mut back)?;
            (out, back)
        }
        DType::BF16 => {
            let bits: Vec<u16> = f
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            let back = bits
                .iter()
                .map(|b| half::bf16::from_bits(*b).to_f32())
                .collect();
            (bits.iter().flat_map(|b| b.to_le_bytes()).collect(), back)
        }
        DType::F16 => {
            let bits: Vec<u16> = f
                .iter()
                .map(|v| half::f16::from_f32(*v).to_bits())
                .collect();
            let back = bits
                .iter()
                .map(|b| half::f16::from_bits(*b).to_f32())
                .collect();
            (bits.iter().flat_map(|b| b.to_le_bytes()).collect(), back)
        }
        DType::F32 => (f.iter().flat_map(|v| v.to_le_bytes()).collect(), f.clone()),
    };
    let err: f64 = f
        .iter()
        .zip(&back)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    Ok((bytes, chosen, (err, signal)))
}

fn write_backbone(
    ckpt: &Checkpoint,
    work: &Path,
    names: &[String],
    opts: &ConvertOptions,
    conversion_id: &str,
    errors: &mut ErrorSums,
    progress: &mut dyn FnMut(u64),
) -> Result<BTreeMap<String, TensorEntry>> {
    let path = work.join(BACKBONE_FILE);
    let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
    write(&mut f, &path, &header_page(conversion_id))?;
    let mut offset = ALIGN;
    let mut entries = BTreeMap::new();
    let tied = !names.iter().any(|n| n == "lm_head.weight");
    for name in names {
        let w = ckpt.tensor_any(name)?;
        let target = Role::of(name, &w.shape, tied).target(opts.backbone);
        let (bytes, dtype, err) = encode(&w, target)?;
        errors.add(&format!("backbone.{}", tensor_class(name)), err);
        write(&mut f, &path, &bytes)?;
        let padded = align_up(bytes.len() as u64);
        write(
            &mut f,
            &path,
            &vec![0u8; (padded - bytes.len() as u64) as usize],
        )?;
        entries.insert(
            name.clone(),
            TensorEntry {
                dtype: dtype.name().into(),
                shape: w.shape.clone(),
                offset,
                len: bytes.len() as u64,
                crc32: crc32fast::hash(&bytes),
            },
        );
        offset += padded;
        w.release_pages();
        progress(w.bytes().len() as u64);
    }
    f.sync_all().map_err(|e| Error::io(&path, e))?;
    Ok(entries)
}

/// Converts and appends all experts of one layer. Experts are converted in
/// parallel batches (bounded memory: a batch, not a layer) and written in
/// order.
#[allow(clippy::too_many_arguments)]
fn write_expert_layer(
    ckpt: &Checkpoint,
    layer: usize,
    opts: &ConvertOptions,
    file: &mut File,
    path: &Path,
    len: &mut u64,
    errors: &mut ErrorSums,
    progress: &mut dyn FnMut(u64),
) -> Result<ExpertLayer> {
    let n = ckpt.config.num_experts;
    let batch = (rayon::current_num_threads() * 2).max(4);
    let mut parts: Option<[PartEntry; 3]> = None;
    let mut record_len = 0u64;
    let mut offsets = Vec::with_capacity(n);
    let mut crcs = Vec::with_capacity(n);
    for first in (0..n).step_by(batch) {
        let experts: Vec<usize> = (first..(first + batch).min(n)).collect();
        let converted: Vec<Result<ExpertRecord>> = experts
            .par_iter()
            .map(|&e| build_record(ckpt, layer, e, opts))
            .collect();
        for rec in converted {
            let rec = rec?;
            let layout = rec.parts.clone();
            match &parts {
                None => {
                    record_len = rec.bytes.len() as u64;
                    parts = Some(layout);
                }
                Some(p)
                    if p.iter()
                        .zip(&layout)
                        .any(|(a, b)| a.dtype != b.dtype || a.len != b.len) =>
                {
                    return Err(Error::format(
                        &ckpt.dir,
                        format!("layer {layer}: experts have different shapes"),
                    ))
                }
                Some(_) => {}
            }
            for (class, err) in PARTS.iter().zip(rec.errors) {
                errors.add(&format!("experts.{class}"), err);
            }
            write(file, path, &rec.bytes)?;
            offsets.push(*len);
            crcs.push(crc32fast::hash(&rec.bytes));
            *len += rec.bytes.len() as u64;
            progress(rec.source_bytes);
        }
    }
    let parts =
        parts.ok_or_else(|| Error::format(&ckpt.dir, format!("layer {layer} has no experts")))?;
    Ok(ExpertLayer {
        layer,
        parts,
        record_len,
        offsets,
        crc32: crcs,
    })
}

struct ExpertRecord {
    bytes: Vec<u8>,
    parts: [PartEntry; 3],
    errors: [(f64, f64); 3],
    source_bytes: u64,
}

/// Parts start at [`part_start`]; the record is padded to [`ALIGN`].
fn build_record(
    ckpt: &Checkpoint,
    layer: usize,
    expert: usize,
    opts: &ConvertOptions,
) -> Result<ExpertRecord> {
    let mut bytes = Vec::new();
    let mut parts = Vec::with_capacity(3);
    let mut errors = [(0.0, 0.0); 3];
    let mut source_bytes = 0;
    let names = ckpt.config.family.expert_tensor_names(layer, expert);
    for (i, (part, name)) in PARTS.iter().zip(&names).enumerate() {
        let w = ckpt.tensor_any(name)?;
        let (rows, cols) = w.dims2().ok_or_else(|| {
            Error::format(
                &ckpt.dir,
                format!("layer {layer} expert {expert} {part} is not 2-D"),
            )
        })?;
        let (data, dtype, err) = encode(&w, opts.experts)?;
        errors[i] = err;
        source_bytes += w.bytes().len() as u64;
        w.release_pages();
        let offset = part_start(bytes.len());
        bytes.resize(offset, 0);
        bytes.extend_from_slice(&data);
        parts.push(PartEntry {
            dtype: dtype.name().into(),
            shape: [rows, cols],
            offset: offset as u64,
            len: data.len() as u64,
        });
    }
    bytes.resize(align_up(bytes.len() as u64) as usize, 0);
    let parts: [PartEntry; 3] = parts
        .try_into()
        .map_err(|_| Error::invalid("three parts"))?;
    Ok(ExpertRecord {
        bytes,
        parts,
        errors,
        source_bytes,
    })
}

/// The journal of the conversion in `work` if it converts the same source
/// (config and [`source_fingerprint`]) into the same types, else a fresh
/// one with `work` cleared.
pub(crate) fn load_journal(
    work: &Path,
    source_config: &serde_json::Value,
    source_weights: &str,
    experts: &str,
    backbone: &str,
) -> Result<Journal> {
    let fresh = Journal {
        source_config: source_config.clone(),
        source_weights: source_weights.into(),
        experts: experts.into(),
        backbone: backbone.into(),
        conversion_id: new_conversion_id(),
        backbone_done: None,
        layers_done: Vec::new(),
        experts_len: 0,
        error_sums: BTreeMap::new(),
    };
    let path = work.join(JOURNAL);
    if path.exists() {
        let text = crate::error::read_to_string(&path)?;
        if let Ok(j) = serde_json::from_str::<Journal>(&text) {
            if j.source_config == fresh.source_config
                && j.source_weights == fresh.source_weights
                && j.experts == fresh.experts
                && j.backbone == fresh.backbone
            {
                return Ok(j);
            }
        }
    }
    // Different source or options, or no usable journal: start over.
    if work.exists() {
        std::fs::remove_dir_all(work).map_err(|e| Error::io(work, e))?;
    }
    Ok(fresh)
}

/// Bytes read from each safetensors file for [`source_fingerprint`]: its
/// head (the header and the first tensors) and this many pages spread
/// evenly over the rest, about 1.3 MiB a shard, a few milliseconds.
const FINGERPRINT_HEAD: u64 = 1 << 20;
const FINGERPRINT_PAGES: u64 = 64;

/// What identifies the source's weights for a resume: every file's name,
/// size and CRC32 of its head and of pages sampled through it. Hashing
/// every byte would cost a full read of the checkpoint at each resume;
/// samples tell apart any two real checkpoints (a re-trained or re-saved
/// model differs in nearly every page), though not one edited in a
/// single unsampled byte.
pub(crate) fn source_fingerprint(files: &[PathBuf]) -> Result<String> {
    use std::io::Read;
    let mut out = String::new();
    for path in files {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; FINGERPRINT_HEAD.min(size) as usize];
        f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
        h.update(&buf);
        let rest = size.saturating_sub(FINGERPRINT_HEAD);
        let mut page = vec![0u8; ALIGN as usize];
        for i in 0..FINGERPRINT_PAGES {
            let at = FINGERPRINT_HEAD + rest * i / FINGERPRINT_PAGES;
            let n = size.saturating_sub(at).min(ALIGN) as usize;
            if n == 0 {
                break;
            }
            f.seek(SeekFrom::Start(at))
                .map_err(|e| Error::io(path, e))?;
            f.read_exact(&mut page[..n])
                .map_err(|e| Error::io(path, e))?;
            h.update(&page[..n]);
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        out += &format!("{name}:{size}:{:08x};", h.finalize());
    }
    Ok(out)
}

pub(crate) fn save_journal(work: &Path, j: &Journal) -> Result<()> {
    let text = serde_json::to_string(j).map_err(|e| Error::invalid(e.to_string()))?;
    let tmp = work.join("journal.json.tmp");
    write_synced(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, work.join(JOURNAL)).map_err(|e| Error::io(work.join(JOURNAL), e))
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    write(&mut f, path, bytes)?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Every write of a conversion, so that unit tests can fill the disk
/// ([`disk_full`]) at any byte of it.
pub(crate) fn write(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    #[cfg(test)]
    let (bytes, full) = disk_full::room(bytes);
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    #[cfg(test)]
    if full {
        return Err(Error::io(path, disk_full::enospc()));
    }
    Ok(())
}

/// A random-enough id: time and process id, hashed. It only has to differ
/// between conversions.
pub(crate) fn new_conversion_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = crc32fast::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    format!("{nanos:x}-{:08x}", h.finalize())
}

/// Tokenizer, template and config files travel with the vault verbatim, so
/// the vault carries the very tokenizer its weights were trained with.
fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = (name.ends_with(".json")
            || name.ends_with(".jinja")
            || name.ends_with(".txt")
            || name.ends_with(".model"))
            && name != "model.safetensors.index.json"
            && name != MANIFEST;
        if keep && entry.path().is_file() {
            // The destination is what fails on a full disk; name it.
            let to = dst.join(&name);
            #[cfg(test)]
            disk_full::copy(&entry.path(), &to)?;
            std::fs::copy(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(())
}

/// A disk that fills up after a set number of bytes, for unit tests of
/// conversions stopped by ENOSPC and resumed. Per thread: a conversion
/// writes from the thread that called it.
#[cfg(test)]
pub(crate) mod disk_full {
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::path::Path;

    use crate::error::{Error, Result};

    thread_local! {
        /// Bytes the disk still takes (None: no end to them).
        static ROOM: Cell<Option<u64>> = const { Cell::new(None) };
        static WRITTEN: Cell<u64> = const { Cell::new(0) };
    }

    pub(crate) fn set_room(room: Option<u64>) {
        ROOM.set(room);
    }

    /// Bytes this thread's conversions have written so far.
    pub(crate) fn written() -> u64 {
        WRITTEN.get()
    }

    pub(super) fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    fn take(len: u64) -> u64 {
        let n = ROOM.get().map_or(len, |r| r.min(len));
        ROOM.set(ROOM.get().map(|r| r - n));
        WRITTEN.set(WRITTEN.get() + n);
        n
    }

    /// The part of `bytes` that fits, and whether the disk is full now.
    pub(super) fn room(bytes: &[u8]) -> (&[u8], bool) {
        let n = take(bytes.len() as u64) as usize;
        (&bytes[..n], n < bytes.len())
    }

    /// Every file of a vault, with its conversion id (kept from the first
    /// attempt by a resume, new in each straight conversion) blanked.
    pub(crate) fn vault_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let id = crate::vault::Vault::open(dir)
            .unwrap()
            .manifest
            .conversion_id;
        let id = id.as_bytes();
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            let mut blanked = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i..].starts_with(id) {
                    blanked.extend(std::iter::repeat_n(b'#', id.len()));
                    i += id.len();
                } else {
                    blanked.push(bytes[i]);
                    i += 1;
                }
            }
            out.insert(e.file_name().to_string_lossy().into_owned(), blanked);
        }
        out
    }

    /// Expert layers the journal of the partial conversion into `out` holds.
    fn journaled(out: &Path) -> usize {
        std::fs::read(super::partial_dir(out).join(super::JOURNAL)).map_or(0, |j| {
            serde_json::from_slice::<super::Journal>(&j)
                .unwrap()
                .layers_done
                .len()
        })
    }

    /// Runs `convert` (into the directory it is given) once through into
    /// `dir/straight`, then into `dir/vN` with the disk full after N
    /// permille of the bytes that took, for each of `permilles`: each stops
    /// with ENOSPC named once, on a file of the partial directory, and
    /// running it again resumes after the layers journaled and ends in the
    /// straight vault, byte for byte. The permilles must stop one run in
    /// the backbone and one between layers.
    pub(crate) fn stop_and_resume(
        dir: &Path,
        permilles: &[u64],
        convert: &dyn Fn(&Path) -> Result<super::ConvertReport>,
    ) {
        let straight = dir.join("straight");
        let start = written();
        convert(&straight).unwrap();
        let total = written() - start;
        let want = vault_files(&straight);
        let mut kept = Vec::new();
        for &permille in permilles {
            let out = dir.join(format!("v{permille}"));
            set_room(Some(total * permille / 1000));
            let err = convert(&out);
            set_room(None);
            let err = err.unwrap_err().to_string();
            let partial = super::partial_dir(&out);
            assert!(
                err.starts_with(&*partial.to_string_lossy())
                    && err.matches("No space left on device").count() == 1,
                "{permille}: {err}"
            );
            let done = journaled(&out);
            let report = convert(&out).unwrap();
            assert_eq!(report.resumed_layers, done, "{permille}");
            assert!(
                vault_files(&out) == want,
                "{permille}: the resumed vault differs"
            );
            kept.push(done);
        }
        assert_eq!(kept[0], 0, "{kept:?}");
        assert!(
            kept.iter().any(|&k| k > 0 && k < kept[kept.len() - 1]),
            "{kept:?}"
        );
    }

    /// A side file's copy: whole, or ENOSPC naming the destination.
    pub(super) fn copy(from: &Path, to: &Path) -> Result<()> {
        let len = from.metadata().map_err(|e| Error::io(from, e))?.len();
        if take(len) < len {
            return Err(Error::io(to, enospc()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that fills up anywhere in a conversion (the backbone, an
    /// expert layer, the journal, the side files, the manifest) stops it
    /// with ENOSPC named once, on the file being written; the layers
    /// already journaled are kept, and the resumed conversion is the same
    /// vault, byte for byte, as one that never stopped.
    #[test]
    fn a_full_disk_stops_a_conversion_and_resume_finishes_it_byte_for_byte() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-moe-a");
        let dir = tempfile::tempdir().unwrap();
        let q8 = DType::parse("q8_0").unwrap();
        let opts = ConvertOptions {
            experts: q8,
            backbone: q8,
            allow_lossy: false,
            stop_after_layers: None,
        };
        disk_full::stop_and_resume(
            dir.path(),
            &[0, 100, 250, 400, 550, 700, 850, 950, 999],
            &|out| convert(&src, out, &opts, &mut |_| {}),
        );
    }
}
