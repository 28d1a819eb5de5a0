//! The vault: a checkpoint converted once into the layout smoe streams from.
//!
//! ```text
//! VAULT/
//!   manifest.json   what is where: config, quant types, every tensor's and
//!                   every expert record's offset, length and CRC32
//!   backbone.bin    resident tensors (embeddings, attention, norms, routers,
//!                   dense layers, LM head), each 4 KiB-aligned; memory-mapped
//!   experts.bin     one record per (layer, expert): gate, up and down
//!                   back to back, 4 KiB-aligned and padded, so an expert is
//!                   exactly one aligned direct read
//!   config.json, generation_config.json, tokenizer*.json, chat template …
//!                   copied verbatim from the checkpoint
//! ```
//!
//! Both data files start with a 4 KiB header page naming the conversion they
//! belong to, so a backbone and an experts file from different runs are
//! refused instead of producing quietly wrong text.

pub mod convert;
pub mod io;
pub mod recipe;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{map_file, MappedFile, TensorSource, Weight};
use crate::error::{read_json, Error, Result};
use crate::quant::DType;
use io::{AlignedBuf, DirectFile};

pub const FORMAT: &str = "smoe-vault";
/// Bumped on any change a reader must know about; a vault from a newer
/// smoe is refused with a message saying so.
pub const VERSION: u32 = 1;
/// Direct I/O needs offsets and lengths aligned to the device's logical
/// block; 4 KiB covers every SSD in use.
pub const ALIGN: u64 = 4096;
pub const MANIFEST: &str = "manifest.json";
pub const BACKBONE_FILE: &str = "backbone.bin";
pub const EXPERTS_FILE: &str = "experts.bin";
const MAGIC: &[u8; 16] = b"smoe-vault-data\0";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Random id shared by the manifest and both data files' headers.
    pub conversion_id: String,
    pub architecture: String,
    /// The checkpoint's config.json, verbatim.
    pub config: serde_json::Value,
    pub quant: QuantChoice,
    pub backbone: BTreeMap<String, TensorEntry>,
    pub experts: Vec<ExpertLayer>,
    /// Relative RMS error of dequantized minus original, per tensor class.
    #[serde(default)]
    pub quant_error: BTreeMap<String, f64>,
}

impl Manifest {
    /// What the weights are stored as, which [`QuantChoice`] alone would
    /// misstate wherever rows fell back to another type, e.g. "experts q4_0
    /// (asked q4_k: rows of 64 and 128 weights are not whole q4_k blocks),
    /// backbone bf16", or where [`recipe`] stores a role apart: "backbone
    /// q4_k + lm_head q6_k + v_proj q6_k + routers bf16". A role is named
    /// when its tensors are not all of the asked type, so vaults written
    /// before the recipe, with routers as the rest, are described as they
    /// are. Norms and biases, always f32, are left out.
    pub fn stored_quant(&self) -> String {
        let experts = self
            .experts
            .iter()
            .flat_map(|l| l.parts.iter().map(|p| (p.dtype.as_str(), p.shape[1])));
        let asked = self.quant.backbone.as_str();
        let tied = !self.backbone.contains_key("lm_head.weight");
        let mut by_role: BTreeMap<Option<&str>, Vec<(&str, usize)>> = BTreeMap::new();
        for (name, t) in self.backbone.iter().filter(|(_, t)| t.shape.len() == 2) {
            let label = recipe::Role::of(name, &t.shape, tied).label();
            by_role
                .entry(label)
                .or_default()
                .push((t.dtype.as_str(), t.shape[1]));
        }
        let rest = by_role.remove(&None).unwrap_or_default();
        let mut backbone = stored_as(asked, rest.into_iter());
        for role in [
            recipe::Role::LmHead,
            recipe::Role::ValueProj,
            recipe::Role::Router,
        ] {
            let Some((label, tensors)) = role.label().zip(by_role.get(&role.label())) else {
                continue;
            };
            if tensors.iter().all(|(dtype, _)| *dtype == asked) {
                continue;
            }
            let target = DType::parse(asked).map_or(asked, |a| role.target(a).name());
            let stored = stored_as(target, tensors.iter().copied());
            backbone = format!("{backbone} + {label} {stored}");
        }
        format!(
            "experts {}, backbone {backbone}",
            stored_as(&self.quant.experts, experts),
        )
    }
}

/// One group of tensors' stored types, each with its number of tensors
/// when they differ, and why they are not `asked`.
fn stored_as<'a>(asked: &str, tensors: impl Iterator<Item = (&'a str, usize)>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut widths = BTreeSet::new();
    for (dtype, cols) in tensors {
        *counts.entry(dtype).or_default() += 1;
        if dtype != asked {
            widths.insert(cols);
        }
    }
    if widths.is_empty() {
        return asked.to_string();
    }
    let mut counts: Vec<(&str, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let types = match &counts[..] {
        [(only, _)] => only.to_string(),
        many => many
            .iter()
            .map(|(t, n)| format!("{t} ×{n}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    let widths: Vec<String> = widths.iter().map(usize::to_string).collect();
    let widths = match widths.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => widths.concat(),
    };
    format!("{types} (asked {asked}: rows of {widths} weights are not whole {asked} blocks)")
}

/// What the user asked for; individual tensors may have fallen back to a
/// wider type when their rows do not fit the block size (see the entries
/// and [`Manifest::stored_quant`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantChoice {
    pub experts: String,
    pub backbone: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

/// One part (gate, up or down) inside every record of a layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartEntry {
    pub dtype: String,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// Byte offset inside the record.
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpertLayer {
    pub layer: usize,
    /// gate, up, down.
    pub parts: [PartEntry; 3],
    /// Bytes read per expert: the parts plus padding to [`ALIGN`].
    pub record_len: u64,
    /// Offsets in experts.bin, by expert index.
    pub offsets: Vec<u64>,
    pub crc32: Vec<u32>,
}

/// Rounds up to the next multiple of [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Where the next part of an expert record starts after `end` bytes: parts
/// start at 64-byte boundaries (whole cache lines, aligned for every block
/// type).
pub fn part_start(end: usize) -> usize {
    end.div_ceil(64) * 64
}

/// The first page of a data file.
pub fn header_page(conversion_id: &str) -> Vec<u8> {
    let mut page = vec![0u8; ALIGN as usize];
    page[..16].copy_from_slice(MAGIC);
    let id = conversion_id.as_bytes();
    page[16..16 + id.len().min(64)].copy_from_slice(&id[..id.len().min(64)]);
    page
}

fn check_header(path: &Path, conversion_id: &str) -> Result<()> {
    let mut page = Vec::with_capacity(ALIGN as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(ALIGN).read_to_end(&mut page))
        .map_err(|e| Error::io(path, e))?;
    if page.len() < ALIGN as usize {
        return Err(Error::format(
            path,
            format!(
                "{} bytes, shorter than its {ALIGN}-byte header page; the vault is damaged",
                page.len()
            ),
        ));
    }
    if &page[..16] != MAGIC {
        return Err(Error::format(
            path,
            format!(
                "not a smoe vault data file: it starts {:?}, not {:?}",
                String::from_utf8_lossy(&page[..16]),
                String::from_utf8_lossy(MAGIC)
            ),
        ));
    }
    if page != header_page(conversion_id) {
        let found = String::from_utf8_lossy(&page[16..80]);
        return Err(Error::format(
            path,
            format!(
                "is from a different conversion (\"{}\") than manifest.json (\"{conversion_id}\"); re-run smoe convert",
                found.trim_end_matches('\0')
            ),
        ));
    }
    Ok(())
}

/// The vault's two data files as they were when it was loaded, checked
/// again before each generation and by the server's `/health`: a file cut
/// short or overwritten with another conversion's under a running process
/// fails the request that would read it, naming the file, instead of
/// feeding it other weights or faulting on the backbone's mapping (a file
/// cut short *during* a request can still fault that, as with any mapped
/// model). A file replaced by a rename is no change: the process goes on
/// reading the one it opened. Costs a stat and a 4 KiB read per file.
#[derive(Debug)]
pub struct Watch {
    /// File (opened at load), its path, the length the manifest needs.
    files: Vec<(std::fs::File, PathBuf, u64)>,
    header: Vec<u8>,
}

impl Watch {
    pub fn new(vault: &Vault) -> Result<Self> {
        let files = vault
            .data_files()
            .into_iter()
            .map(|(path, end)| {
                let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                Ok((f, path, end))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            files,
            header: header_page(&vault.manifest.conversion_id),
        })
    }

    pub fn check(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut page = vec![0u8; ALIGN as usize];
        for (f, path, end) in &self.files {
            let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
            if len < *end {
                return Err(Error::format(
                    path,
                    format!(
                        "cut short to {len} bytes since the model was loaded (the manifest needs \
                         {end}); restore it or convert again, then restart"
                    ),
                ));
            }
            f.read_exact_at(&mut page, 0)
                .map_err(|e| Error::io(path, e))?;
            if page != self.header {
                return Err(Error::format(
                    path,
                    "overwritten since the model was loaded: its header page is not this \
                     conversion's (manifest.json); restore it or restart with the new vault",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `dir` looks like a vault rather than a checkpoint.
pub fn is_vault(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// An opened, validated vault.
#[derive(Debug)]
pub struct Vault {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Vault {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let v = read_json(&path)?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(Error::format(
                &path,
                format!("not a smoe vault manifest (format \"{format}\")"),
            ));
        }
        let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
        if version > VERSION as u64 {
            return Err(Error::format(
                &path,
                format!(
                    "vault format version {version} is newer than this smoe understands ({VERSION}); upgrade smoe or re-convert"
                ),
            ));
        }
        let manifest: Manifest = serde_json::from_value(v)
            .map_err(|e| Error::format(&path, format!("malformed manifest: {e}")))?;
        let vault = Self {
            dir: dir.to_path_buf(),
            manifest,
        };
        vault.validate()?;
        Ok(vault)
    }

    pub fn backbone_path(&self) -> PathBuf {
        self.dir.join(BACKBONE_FILE)
    }

    pub fn experts_path(&self) -> PathBuf {
        self.dir.join(EXPERTS_FILE)
    }

    /// Both data files, each with the length its manifest entries need.
    fn data_files(&self) -> [(PathBuf, u64); 2] {
        let m = &self.manifest;
        [
            (
                self.backbone_path(),
                m.backbone
                    .values()
                    .map(|t| t.offset.saturating_add(t.len))
                    .max()
                    .unwrap_or(0),
            ),
            (
                self.experts_path(),
                m.experts
                    .iter()
                    .flat_map(|l| {
                        l.offsets
                            .iter()
                            .map(move |o| o.saturating_add(l.record_len))
                    })
                    .max()
                    .unwrap_or(0),
            ),
        ]
    }

    /// Every offset inside its file, every dtype known, both files from
    /// this conversion: checked once so later reads can trust the manifest.
    fn validate(&self) -> Result<()> {
        let m = &self.manifest;
        let manifest_path = self.dir.join(MANIFEST);
        for (file, end) in self.data_files() {
            let meta = std::fs::metadata(&file).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::format(&file, "missing from the vault"),
                _ => Error::io(&file, e),
            })?;
            check_header(&file, &m.conversion_id)?;
            if meta.len() < end {
                return Err(Error::format(
                    &file,
                    format!("truncated: {} bytes, the manifest needs {end}", meta.len()),
                ));
            }
        }
        for (name, t) in &m.backbone {
            if DType::parse(&t.dtype).is_none() {
                return Err(Error::format(
                    &manifest_path,
                    format!("tensor {name}: unknown dtype \"{}\"", t.dtype),
                ));
            }
        }
        for l in &m.experts {
            if l.offsets.len() != l.crc32.len() {
                return Err(Error::format(
                    &manifest_path,
                    format!("layer {}: offsets and checksums differ in count", l.layer),
                ));
            }
            for p in &l.parts {
                let dt = DType::parse(&p.dtype).ok_or_else(|| {
                    Error::format(
                        &manifest_path,
                        format!("layer {}: unknown dtype \"{}\"", l.layer, p.dtype),
                    )
                })?;
                if p.offset.saturating_add(p.len) > l.record_len
                    || dt.row_bytes(p.shape[1]).checked_mul(p.shape[0]) != Some(p.len as usize)
                {
                    return Err(Error::format(
                        &manifest_path,
                        format!("layer {}: part sizes are inconsistent", l.layer),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Bytes of the largest expert record: one cache slot.
    pub fn max_record_len(&self) -> u64 {
        self.manifest
            .experts
            .iter()
            .map(|l| l.record_len)
            .max()
            .unwrap_or(0)
    }

    /// Total bytes of all expert records.
    pub fn expert_bytes(&self) -> u64 {
        self.manifest
            .experts
            .iter()
            .map(|l| l.record_len * l.offsets.len() as u64)
            .sum()
    }

    pub fn backbone_bytes(&self) -> u64 {
        self.manifest.backbone.values().map(|t| t.len).sum()
    }
}

impl Vault {
    /// The resident part, memory-mapped.
    pub fn backbone(&self) -> Result<Backbone> {
        let path = self.backbone_path();
        Ok(Backbone {
            map: map_file(&path)?,
            entries: self.manifest.backbone.clone(),
            path,
        })
    }

    /// Reads every expert record and backbone tensor and checks its CRC32.
    /// Returns the corrupt ones by name, e.g. "layer 3 expert 17".
    pub fn verify(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Vec<String>> {
        let mut bad = Vec::new();
        let total = self.expert_bytes() + self.backbone_bytes();
        let mut done = 0;
        let backbone = self.backbone()?;
        for (name, t) in &self.manifest.backbone {
            let bytes = &backbone.map.bytes()[t.offset as usize..(t.offset + t.len) as usize];
            if crc32fast::hash(bytes) != t.crc32 {
                bad.push(format!("backbone tensor {name}"));
            }
            done += t.len;
            progress(done, total);
        }
        let file = DirectFile::open(&self.experts_path())?;
        let buf = AlignedBuf::new(self.max_record_len() as usize);
        for l in &self.manifest.experts {
            for (e, (&off, &crc)) in l.offsets.iter().zip(&l.crc32).enumerate() {
                // SAFETY: the buffer is ours alone.
                let data = unsafe { buf.slice_mut(0, l.record_len as usize) };
                file.read_exact_at(data, off).map_err(|err| {
                    Error::format(
                        &file.path,
                        format!("reading layer {} expert {e}: {err}", l.layer),
                    )
                })?;
                if crc32fast::hash(data) != crc {
                    bad.push(format!("layer {} expert {e}", l.layer));
                }
                done += l.record_len;
                progress(done, total);
            }
        }
        Ok(bad)
    }
}

/// The vault's resident tensors.
#[derive(Debug)]
pub struct Backbone {
    map: MappedFile,
    entries: BTreeMap<String, TensorEntry>,
    path: PathBuf,
}

impl Backbone {
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl TensorSource for Backbone {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let t = self
            .entries
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("missing tensor \"{name}\"")))?;
        if t.shape != shape {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor \"{name}\" has shape {:?}, the config implies {shape:?}",
                    t.shape
                ),
            ));
        }
        let (dtype, range) = t.extent(name, &self.path, self.map.len() as u64)?;
        Ok(self.map.weight(range, dtype, shape.to_vec()))
    }
}

impl TensorEntry {
    /// The tensor's type and byte range in the data file `file`
    /// (`file_len` bytes long), once its length is the one its shape and
    /// type imply, it lies inside the file and starts on a 64-byte
    /// boundary: readers size their buffers and reads from the shape, so a
    /// manifest whose shape and length disagree must stop here (found by
    /// fuzzing). Errors name the manifest, whose entry is at fault.
    pub fn extent(&self, name: &str, file: &Path, file_len: u64) -> Result<(DType, Range<usize>)> {
        let manifest = file.with_file_name(MANIFEST);
        let bad = |msg: String| Err(Error::format(&manifest, format!("tensor \"{name}\" {msg}")));
        let Some(dtype) = DType::parse(&self.dtype) else {
            return bad(format!("has unknown dtype \"{}\"", self.dtype));
        };
        let cols = *self.shape.last().unwrap_or(&1);
        if let DType::Quant(q) = dtype {
            if !cols.is_multiple_of(q.block_elems()) {
                return bad(format!(
                    "has rows of {cols} weights, not whole {} blocks of {}",
                    q.name(),
                    q.block_elems()
                ));
            }
        }
        let rows = self.shape[..self.shape.len().saturating_sub(1)]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        let need = rows.and_then(|r| r.checked_mul(dtype.row_bytes(cols)));
        if need != Some(self.len as usize) {
            let need = need.map_or("more than fits in memory".into(), |n| format!("{n}"));
            return bad(format!(
                "holds {} bytes, but shape {:?} in {} needs {need}",
                self.len,
                self.shape,
                dtype.name()
            ));
        }
        let end = self.offset.saturating_add(self.len);
        if end > file_len {
            return bad(format!(
                "ends at byte {end}, past the end of {} ({file_len} bytes)",
                file.display()
            ));
        }
        if !self.offset.is_multiple_of(64) {
            return bad(format!(
                "starts at byte {}, expected a multiple of 64",
                self.offset
            ));
        }
        Ok((dtype, self.offset as usize..end as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest of one layer's backbone, each 2-D tensor stored as the
    /// given type, and no experts.
    fn manifest(backbone: &str, tensors: &[(&str, &str, usize)]) -> Manifest {
        let entry = |dtype: &str, shape: Vec<usize>| TensorEntry {
            dtype: dtype.into(),
            shape,
            offset: 0,
            len: 0,
            crc32: 0,
        };
        let mut map: BTreeMap<String, TensorEntry> = tensors
            .iter()
            .map(|&(name, dtype, cols)| (name.to_string(), entry(dtype, vec![8, cols])))
            .collect();
        map.insert("model.norm.weight".into(), entry("f32", vec![8]));
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            conversion_id: String::new(),
            architecture: "qwen3_moe".into(),
            config: serde_json::Value::Null,
            quant: QuantChoice {
                experts: "q4_k".into(),
                backbone: backbone.into(),
            },
            backbone: map,
            experts: Vec::new(),
            quant_error: BTreeMap::new(),
        }
    }

    /// The recipe's roles are named with their types; a vault written
    /// before it, all of one type, reads as that type alone.
    #[test]
    fn stored_quant_names_the_roles_stored_apart() {
        let (q, k, v, g, head) = (
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.mlp.gate.weight",
            "lm_head.weight",
        );
        let recipe = manifest(
            "q4_k",
            &[
                (q, "q4_k", 2048),
                (k, "q4_k", 2048),
                (v, "q6_k", 2048),
                (g, "bf16", 2048),
                (head, "q6_k", 2048),
            ],
        );
        assert_eq!(
            recipe.stored_quant(),
            "experts q4_k, backbone q4_k + lm_head q6_k + v_proj q6_k + routers bf16"
        );
        let old: Vec<_> = [q, k, v, g, head].map(|n| (n, "q4_k", 2048)).into();
        assert_eq!(
            manifest("q4_k", &old).stored_quant(),
            "experts q4_k, backbone q4_k"
        );
        let q8 = manifest("q8_0", &[(q, "q8_0", 2048), (g, "bf16", 2048)]);
        assert_eq!(
            q8.stored_quant(),
            "experts q4_k, backbone q8_0 + routers bf16"
        );
        // Tied embeddings are the LM head; narrow rows fall back and say so.
        let tied = manifest(
            "q4_k",
            &[(q, "q4_0", 128), ("model.embed_tokens.weight", "q8_0", 128)],
        );
        assert_eq!(
            tied.stored_quant(),
            "experts q4_k, backbone q4_0 (asked q4_k: rows of 128 weights are not whole \
             q4_k blocks) + lm_head q8_0 (asked q6_k: rows of 128 weights are not whole q6_k blocks)"
        );
    }

    #[test]
    fn stored_types_say_what_fell_back_and_why() {
        let same = [("q8_0", 64), ("q8_0", 32)];
        assert_eq!(stored_as("q8_0", same.into_iter()), "q8_0");
        let all = [("q4_0", 128), ("q4_0", 128), ("q4_0", 64)];
        assert_eq!(
            stored_as("q4_k", all.into_iter()),
            "q4_0 (asked q4_k: rows of 64 and 128 weights are not whole q4_k blocks)"
        );
        let some = [("q4_k", 512), ("q4_k", 512), ("q4_0", 96), ("bf16", 40)];
        assert_eq!(
            stored_as("q4_k", some.into_iter()),
            "q4_k ×2, bf16 ×1, q4_0 ×1 \
             (asked q4_k: rows of 40 and 96 weights are not whole q4_k blocks)"
        );
    }
}
