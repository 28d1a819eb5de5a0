//! GGUF: llama.cpp's model files, read in place.
//!
//! [`Gguf::open`] takes one `.gguf` file or any shard of a split set
//! (`<prefix>-0000K-of-0000N.gguf`), finds and checks every shard, and
//! indexes all tensors by name with the file and byte range that hold them.
//! Routed experts are 3-D `blk.N.ffn_{gate,up,down}_exps` tensors with the
//! expert as the slowest dimension, so one expert's part of each is one
//! contiguous extent ([`Gguf::expert_extent`]).
//!
//! [`tokenizer`] rebuilds the Hugging Face tokenizer from the metadata.

pub mod check;
pub mod config;
pub mod convert;
mod describe;
mod file;
pub mod tokenizer;
mod types;
mod weights;
pub mod write;

#[cfg(test)]
pub(crate) mod run_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use describe::EXPERT_TENSORS;
pub use file::{is_gguf, Array, GgufFile, Metadata, TensorInfo, Value, DEFAULT_ALIGNMENT, MAGIC};
pub use types::{engine_dtype, GgmlType};
pub use weights::{
    checkpoint_name, expert_tensors, gguf_name, ExpertPart, ExpertTensors, GgufWeights, Mapped,
    EXPERT_PARTS,
};

use crate::validate::MAX_LAYERS;
use crate::{Error, Result};

/// Bytes `len` at `offset` of shard `shard`: where a tensor, or one
/// expert's slice of one, lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub shard: usize,
    pub offset: u64,
    pub len: u64,
}

/// A GGUF model: one file or every shard of a split set, with one index of
/// tensors across them. Metadata comes from the first shard, the only one
/// that holds the model's.
#[derive(Debug)]
pub struct Gguf {
    shards: Vec<GgufFile>,
    /// (shard, index in that shard's tensors), in shard then file order.
    order: Vec<(usize, usize)>,
    by_name: HashMap<String, usize>,
}

/// The parts of a split file's name: `<prefix>-0000K-of-0000N.gguf` gives
/// (prefix, K, N).
fn split_name(path: &Path) -> Option<(String, u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if prefix.is_empty() || !digits(no) || !digits(count) {
        return None;
    }
    Some((prefix.to_string(), no.parse().ok()?, count.parse().ok()?))
}

/// llama.cpp's `llama_split_path`: the file name of shard `no` (1-based)
/// of `count`.
pub fn shard_path(dir: &Path, prefix: &str, no: u32, count: u32) -> PathBuf {
    dir.join(format!("{prefix}-{no:05}-of-{count:05}.gguf"))
}

impl Gguf {
    /// Opens a `.gguf` file, or a split set from any of its shards.
    pub fn open(path: &Path) -> Result<Self> {
        let first = GgufFile::open(path)?;
        let count = split_key(&first, "split.count")?;
        let shards = match split_name(path) {
            None => {
                if count.is_some_and(|n| n > 1) {
                    return Err(Error::format(
                        path,
                        format!(
                            "split.count is {} but the file name does not end in -0000K-of-0000N.gguf, so the other shards cannot be found",
                            count.unwrap_or(0)
                        ),
                    ));
                }
                vec![first]
            }
            Some((prefix, no, n)) => {
                if let Some(c) = count.filter(|&c| c != u64::from(n)) {
                    return Err(Error::format(
                        path,
                        format!("split.count is {c} but the file name says {no} of {n}"),
                    ));
                }
                let dir = path.parent().unwrap_or(Path::new("."));
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                check_no_extra_shards(dir, &prefix, n)?;
                let mut given = Some(first);
                let mut shards = Vec::with_capacity(n as usize);
                for k in 1..=n {
                    let shard = if k == no {
                        given.take().expect("the given shard is used once")
                    } else {
                        let p = shard_path(dir, &prefix, k, n);
                        if !p.is_file() {
                            return Err(Error::format(
                                &p,
                                format!("shard {k} of {n} is missing (opening {})", path.display()),
                            ));
                        }
                        GgufFile::open(&p)?
                    };
                    check_shard(&shard, k, n)?;
                    shards.push(shard);
                }
                shards
            }
        };
        Self::index(shards)
    }

    fn index(shards: Vec<GgufFile>) -> Result<Self> {
        let mut order = Vec::new();
        let mut by_name = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (i, t) in shard.tensors().iter().enumerate() {
                if let Some(&prev) = by_name.get(&t.name) {
                    let (ps, _): (usize, usize) = order[prev];
                    return Err(Error::format(
                        shard.path(),
                        format!(
                            "tensor {} is also in {}; no tensor may be in two shards",
                            t.name,
                            shards[ps].path().display()
                        ),
                    ));
                }
                by_name.insert(t.name.clone(), order.len());
                order.push((s, i));
            }
        }
        if shards.len() > 1 {
            let first = &shards[0];
            if let Some(expected) = split_key(first, "split.tensors.count")? {
                if expected as usize != order.len() {
                    return Err(Error::format(
                        first.path(),
                        format!(
                            "split.tensors.count is {expected} but the {} shards hold {} tensors",
                            shards.len(),
                            order.len()
                        ),
                    ));
                }
            }
        }
        Ok(Gguf {
            shards,
            order,
            by_name,
        })
    }

    /// The first shard (the whole model when not split).
    pub fn path(&self) -> &Path {
        self.shards[0].path()
    }

    pub fn shards(&self) -> &[GgufFile] {
        &self.shards
    }

    /// The model's metadata (the first shard's).
    pub fn metadata(&self) -> &Metadata {
        self.shards[0].metadata()
    }

    /// Every tensor with its shard, in shard then file order.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &TensorInfo)> {
        self.order
            .iter()
            .map(|&(s, i)| (s, &self.shards[s].tensors()[i]))
    }

    /// A tensor by name, with its shard.
    pub fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        let &(s, i) = self.order.get(*self.by_name.get(name)?)?;
        Some((s, &self.shards[s].tensors()[i]))
    }

    /// A tensor by name, or an error naming it and the file.
    pub fn require(&self, name: &str) -> Result<(usize, &TensorInfo)> {
        self.tensor(name)
            .ok_or_else(|| Error::format(self.path(), format!("tensor {name} is missing")))
    }

    /// The mapped bytes of a tensor.
    pub fn data(&self, name: &str) -> Result<&[u8]> {
        let (s, t) = self.require(name)?;
        Ok(self.shards[s].data(t))
    }

    /// Where a whole tensor's bytes are.
    pub fn extent(&self, name: &str) -> Result<Extent> {
        let (shard, t) = self.require(name)?;
        Ok(Extent {
            shard,
            offset: t.offset,
            len: t.bytes,
        })
    }

    /// Where expert `expert`'s slice of a 3-D `*_exps` tensor is: the
    /// expert is the slowest dimension, so the slice is contiguous.
    pub fn expert_extent(&self, name: &str, expert: usize) -> Result<Extent> {
        let (shard, t) = self.require(name)?;
        let experts = match t.dims[..] {
            [_, _, e] => e,
            _ => {
                return Err(Error::format(
                    self.path(),
                    format!(
                    "tensor {name} has dims {:?}; an experts tensor has 3 (columns, rows, experts)",
                    t.dims
                ),
                ))
            }
        };
        if expert as u64 >= experts {
            return Err(Error::invalid(format!(
                "{}: expert {expert} of tensor {name}, which has {experts}",
                self.path().display()
            )));
        }
        let len = t.bytes / experts;
        Ok(Extent {
            shard,
            offset: t.offset + expert as u64 * len,
            len,
        })
    }

    /// The mapped bytes of an extent.
    pub fn extent_data(&self, extent: Extent) -> &[u8] {
        self.shards[extent.shard].bytes(extent.offset, extent.len)
    }

    /// Bytes of every file together.
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(GgufFile::len).sum()
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.str("general.architecture")
    }

    /// A metadata value, or an error naming the key.
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.metadata()
            .get(key)
            .ok_or_else(|| Error::format(self.path(), format!("metadata key {key} is missing")))
    }

    /// A string value, or an error naming the key and what it holds.
    pub fn str(&self, key: &str) -> Result<&str> {
        match self.value(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(key, "a string", other)),
        }
    }

    /// A string value, if the key is present.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(_) => self.str(key).map(Some),
        }
    }

    /// A non-negative integer of any width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        v.as_int()
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A non-negative integer, if the key is present.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    /// `{arch}.block_count`, if present, bounded as a config's layer count
    /// is: the loops over a GGUF's blocks run before the config is
    /// validated, and a damaged count (2^60) would never end.
    pub fn block_count(&self) -> Result<Option<usize>> {
        let key = format!("{}.block_count", self.architecture()?);
        match self.opt_usize(&key)? {
            Some(n) if n > MAX_LAYERS => Err(Error::format(
                self.path(),
                format!("{key} is {n}, expected at most {MAX_LAYERS}"),
            )),
            n => Ok(n),
        }
    }

    /// A number of any type as f64, if the key is present.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    /// A bool, if the key is present.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    /// An array value, if the key is present.
    pub fn opt_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::format(
            self.path(),
            format!(
                "metadata key {key}: expected {expected}, found {} {}",
                found.type_name(),
                short_debug(found)
            ),
        )
    }
}

/// A value for an error message, cut short for arrays.
fn short_debug(v: &Value) -> String {
    let s = format!("{v:?}");
    if s.len() > 80 {
        let cut = (0..=80).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        format!("{}...", &s[..cut])
    } else {
        s
    }
}

/// A `split.*` key of a shard, as an integer of any width.
fn split_key(file: &GgufFile, key: &str) -> Result<Option<u64>> {
    match file.metadata().get(key) {
        None => Ok(None),
        Some(v) => v
            .as_int()
            .and_then(|i| u64::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::format(
                    file.path(),
                    format!("{key}: expected a non-negative integer, found {v:?}"),
                )
            }),
    }
}

/// A shard must say it is shard `k` of `n` (`split.no` counts from 0).
fn check_shard(shard: &GgufFile, k: u32, n: u32) -> Result<()> {
    let no = split_key(shard, "split.no")?;
    let count = split_key(shard, "split.count")?;
    if no != Some(u64::from(k - 1)) || count != Some(u64::from(n)) {
        let show = |v: Option<u64>| v.map_or("missing".to_string(), |v| v.to_string());
        return Err(Error::format(
            shard.path(),
            format!(
                "expected shard {k} of {n} (split.no = {}, split.count = {n}), found split.no = {}, split.count = {}",
                k - 1,
                show(no),
                show(count)
            ),
        ));
    }
    Ok(())
}

/// Files of the same prefix that are not shards 1..=n of n: a shard from
/// another split of the model, or one past the end, would otherwise be
/// silently ignored while the set is mixed up.
fn check_no_extra_shards(dir: &Path, prefix: &str, n: u32) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if let Some((p, k, c)) = split_name(&path) {
            if p == prefix && (c != n || k == 0 || k > n) {
                return Err(Error::format(
                    &path,
                    format!(
                        "an extra shard: {} is shard {k} of {c}, but the set being opened has {n} shards; move it away",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}
