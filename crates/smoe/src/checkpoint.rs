//! A Hugging Face checkpoint directory: `config.json`, safetensors weights
//! (one file, or shards listed by `model.safetensors.index.json`) and the
//! tokenizer files.
//!
//! Weights are memory-mapped and handed out as [`Weight`] views into the
//! maps, so opening a 470 GB checkpoint costs page tables, not RAM; the OS
//! brings in only what the forward pass touches.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::error::{read_json, Error, Result};
use crate::kernels::Matrix;
use crate::quant::DType;

/// The token-embedding table's name in every supported family.
pub const EMBED: &str = "model.embed_tokens.weight";

/// Anything that hands out named, shape-checked weights: a checkpoint, or a
/// vault's backbone.
pub trait TensorSource {
    /// A tensor by name, checked against the shape the model expects.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight>;
}

/// Memory-maps a whole file for [`Weight`] views into it.
pub fn map_file(path: &Path) -> Result<MappedFile> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: see map_safetensors.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    Ok(MappedFile(Arc::new(Storage::Mapped(map))))
}

/// `len` bytes of zeros that [`Weight`]s can point into, costing address
/// space only: the planner hands them to [`crate::model::Decoder::load`] to
/// learn which tensors a config implies without any weights at hand. The
/// pages are never written, so they are not charged against the memory the
/// kernel lets a process commit (MAP_NORESERVE): a 100 GB tensor is
/// planned on a 24 GB machine without swap as on any other.
pub fn zeros(len: usize) -> Result<MappedFile> {
    let map = memmap2::MmapOptions::new()
        .len(len.max(1))
        .no_reserve_swap()
        .map_anon()
        .and_then(|m| m.make_read_only())
        .map_err(|e| Error::invalid(format!("mapping {len} bytes of address space: {e}")))?;
    Ok(MappedFile(Arc::new(Storage::Mapped(map))))
}

/// `len` bytes of memory written by `fill`, for weights that must be real
/// pages (zero pages all map one physical page, which no cache misses).
pub fn filled(len: usize, fill: impl FnOnce(&mut [u8])) -> Result<MappedFile> {
    let mut map = memmap2::MmapOptions::new()
        .len(len.max(1))
        .map_anon()
        .map_err(|e| Error::invalid(format!("allocating {len} bytes: {e}")))?;
    fill(&mut map[..len]);
    let map = map
        .make_read_only()
        .map_err(|e| Error::invalid(format!("sealing {len} bytes: {e}")))?;
    Ok(MappedFile(Arc::new(Storage::Mapped(map))))
}

/// A mapped file that [`Weight`]s can point into.
#[derive(Debug, Clone)]
pub struct MappedFile(Arc<Storage>);

impl MappedFile {
    pub fn len(&self) -> usize {
        self.0.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }

    /// A view of `range`, which must lie inside the file and be aligned
    /// for `dtype` (the vault writes every tensor 4 KiB-aligned).
    pub fn weight(&self, range: Range<usize>, dtype: DType, shape: Vec<usize>) -> Weight {
        Weight {
            storage: Arc::clone(&self.0),
            range,
            dtype,
            shape,
        }
    }
}

/// Bytes that back weights: a file mapping, or an aligned copy for the rare
/// file whose tensors are not aligned to their element size.
#[derive(Debug)]
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u32>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => {
                // SAFETY: a u32 buffer is valid as bytes of four times its length.
                unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) }
            }
        }
    }
}

/// A view of one tensor inside a mapped file. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Weight {
    storage: Arc<Storage>,
    range: Range<usize>,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Weight {
    pub fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.range.clone()]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A 2-D weight as (rows, cols).
    pub fn dims2(&self) -> Option<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Some((r, c)),
            _ => None,
        }
    }

    /// A 2-D weight as the kernels' matrix type.
    pub fn matrix(&self) -> Matrix<'_> {
        let (rows, cols) = self.dims2().unwrap_or((1, self.numel()));
        Matrix::new(self.dtype, self.bytes(), rows, cols)
    }

    /// A weight over its own copy of `bytes`: for tensors that must be
    /// rearranged on load (a GGUF's permuted or split rows).
    pub fn owned(bytes: &[u8], dtype: DType, shape: Vec<usize>) -> Weight {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u32::from_ne_bytes(b);
        }
        Weight {
            storage: Arc::new(Storage::Owned(words)),
            range: 0..bytes.len(),
            dtype,
            shape,
        }
    }

    /// Tells the OS that this tensor's pages will not be read again, so a
    /// converter walking a 470 GB checkpoint keeps its resident set at a few
    /// tensors instead of letting mapped pages pile up.
    pub fn release_pages(&self) {
        if let Storage::Mapped(map) = &*self.storage {
            let page = 4096;
            let start = self.range.start.div_ceil(page) * page;
            let end = self.range.end / page * page;
            if end > start {
                // SAFETY: a read-only shared file mapping; dropped pages are
                // re-read from the file if touched again, never zeroed.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// The whole tensor widened to f32, for the small ones (norms) that are
    /// read many times per token and not worth a kernel per dtype.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        crate::kernels::widen(self.dtype, self.bytes(), &mut out);
        out
    }
}

/// Where a named tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    storage: Arc<Storage>,
    range: Range<usize>,
    dtype: DType,
    shape: Vec<usize>,
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    files: Vec<PathBuf>,
    tensors: HashMap<String, Entry>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(
                dir,
                "not a directory (expected a checkpoint with config.json)",
            ));
        }
        let config = ModelConfig::from_dir(dir)?;
        let (names, weight_map) = shard_list(dir)?;
        let mut files = Vec::with_capacity(names.len());
        let mut tensors = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(name);
            tensors.extend(map_safetensors(&path, i)?);
            files.push(path);
        }
        // An index that points a tensor at a shard which does not hold it
        // means the shards and the index come from different saves.
        if let Some(map) = weight_map {
            let index = dir.join("model.safetensors.index.json");
            for (tensor, file) in map {
                match tensors.get(&tensor) {
                    Some(e) if names[e.file] == file => {}
                    Some(e) => {
                        return Err(Error::format(
                            &index,
                            format!("lists {tensor} in {file}, but it is in {}", names[e.file]),
                        ))
                    }
                    None => {
                        return Err(Error::format(
                            &index,
                            format!("lists {tensor} in {file}, but that file does not hold it"),
                        ))
                    }
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            files,
            tensors,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor by name, whatever its shape (for tools that copy tensors).
    pub fn tensor_any(&self, name: &str) -> Result<Weight> {
        let shape = self
            .tensors
            .get(name)
            .map(|e| e.shape.clone())
            .ok_or_else(|| Error::format(&self.dir, format!("missing tensor \"{name}\"")))?;
        self.tensor(name, &shape)
    }

    /// Stored size of a tensor in bytes (0 if absent).
    pub fn tensor_bytes(&self, name: &str) -> u64 {
        self.tensors.get(name).map_or(0, |e| e.range.len() as u64)
    }

    /// The safetensors files, in shard order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Names of all tensors, for tools that walk the checkpoint.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

impl TensorSource for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::format(&self.dir, format!("missing tensor \"{name}\"")))?;
        let path = &self.files[e.file];
        if e.shape != shape {
            return Err(Error::format(
                path,
                format!(
                    "tensor \"{name}\" has shape {:?}, config.json implies {shape:?}",
                    e.shape
                ),
            ));
        }
        Ok(Weight {
            storage: Arc::clone(&e.storage),
            range: e.range.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
        })
    }
}

type WeightMap = Vec<(String, String)>;

/// The safetensors files of a directory, and the index's tensor→file map.
fn shard_list(dir: &Path) -> Result<(Vec<String>, Option<WeightMap>)> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "missing object \"weight_map\""))?;
        let mut names: Vec<String> = Vec::new();
        let mut pairs = Vec::with_capacity(map.len());
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::format(
                    &index,
                    format!("weight_map[\"{tensor}\"] must be a file name"),
                )
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(Error::format(
                    &index,
                    format!("shard name \"{file}\" must be a plain file name"),
                ));
            }
            if !names.iter().any(|n| n == file) {
                names.push(file.to_string());
            }
            pairs.push((tensor.clone(), file.to_string()));
        }
        names.sort();
        return Ok((names, Some(pairs)));
    }
    if dir.join("model.safetensors").exists() {
        return Ok((vec!["model.safetensors".into()], None));
    }
    if [crate::vault::BACKBONE_FILE, crate::vault::EXPERTS_FILE]
        .iter()
        .any(|f| dir.join(f).exists())
    {
        return Err(Error::format(
            dir,
            "holds vault data files but no manifest.json: the vault is incomplete; re-run smoe convert",
        ));
    }
    Err(Error::format(
        dir,
        "no model.safetensors or model.safetensors.index.json",
    ))
}

fn map_safetensors(path: &Path, file: usize) -> Result<Vec<(String, Entry)>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified while we run is
    // outside what any engine can defend against, as with llama.cpp's mmap.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    let map = Arc::new(Storage::Mapped(map));
    let bytes = map.bytes();
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a valid safetensors file ({e}); is it truncated?"),
        )
    })?;
    let mut entries = Vec::new();
    for (name, view) in st.iter() {
        let dtype = dtype_of(view.dtype()).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "tensor \"{name}\" has dtype {:?}; supported: BF16, F16, F32",
                    view.dtype()
                ),
            )
        })?;
        let data = view.data();
        let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
        let (storage, range) = if start.is_multiple_of(dtype.row_bytes(1)) {
            (Arc::clone(&map), start..start + data.len())
        } else {
            // Kernels read elements as typed slices; copying an odd tensor
            // once is cheaper than unaligned loads in every kernel.
            let copy = Weight::owned(data, dtype, Vec::new());
            (copy.storage, copy.range)
        };
        let shape = view.shape().to_vec();
        entries.push((
            name.to_string(),
            Entry {
                file,
                storage,
                range,
                dtype,
                shape,
            },
        ));
    }
    Ok(entries)
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}
