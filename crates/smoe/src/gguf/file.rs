//! One GGUF file: header, typed metadata and tensor infos, parsed from a
//! memory map with every length and count checked against the bytes that
//! are actually there before anything is allocated.
//!
//! Layout (gguf-py's and ggml's `gguf.cpp`, little-endian, versions 2 and 3
//! alike): magic `GGUF`, version u32, tensor count u64, metadata count u64,
//! the metadata key/values, the tensor infos (name, dims, type, offset
//! relative to the data section), padding to `general.alignment`, then the
//! tensor data.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::types::GgmlType;
use crate::checkpoint::{map_file, MappedFile};
use crate::{Error, Result};

/// ggml's `GGML_MAX_DIMS`: no tensor has more.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are not something any writer makes,
/// and the limit keeps a hostile file from exhausting the stack.
const MAX_NESTING: usize = 8;
/// Alignment of the data section and of each tensor when the file does not
/// set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array, stored by element type so that a 150k-entry vocabulary
/// costs one `Vec<String>`, not 150k tagged values.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
}

impl Value {
    /// The GGUF spelling of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(a) => a.type_name(),
        }
    }

    /// Any integer type as i128 (writers differ on which width they use for
    /// the same key), else `None`.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Either float type, or an integer, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "array of uint8",
            Array::I8(_) => "array of int8",
            Array::U16(_) => "array of uint16",
            Array::I16(_) => "array of int16",
            Array::U32(_) => "array of uint32",
            Array::I32(_) => "array of int32",
            Array::U64(_) => "array of uint64",
            Array::I64(_) => "array of int64",
            Array::F32(_) => "array of float32",
            Array::F64(_) => "array of float64",
            Array::Bool(_) => "array of bool",
            Array::String(_) => "array of string",
            Array::Array(_) => "array of array",
        }
    }

    /// Integer elements as i128, whatever their width; `None` for other
    /// element types.
    pub fn ints(&self) -> Option<Vec<i128>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I8(v) => v.iter().map(|&x| x.into()).collect(),
            Array::U16(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I16(v) => v.iter().map(|&x| x.into()).collect(),
            Array::U32(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I32(v) => v.iter().map(|&x| x.into()).collect(),
            Array::U64(v) => v.iter().map(|&x| x.into()).collect(),
            Array::I64(v) => v.iter().map(|&x| x.into()).collect(),
            _ => return None,
        })
    }
}

/// The key/value metadata of a GGUF file, in file order.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Every key and value, in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One tensor's description and where its bytes are in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (columns), then rows, then
    /// (for `*_exps`) experts.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Number of weights.
    pub fn elems(&self) -> u64 {
        // Checked to fit when the file was opened.
        self.dims.iter().product()
    }

    /// Bytes of one row (`dims[0]` weights).
    pub fn row_bytes(&self) -> u64 {
        // Whole blocks were checked when the file was opened.
        self.ggml_type.bytes_for(self.dims[0]).unwrap_or(0)
    }
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    map: MappedFile,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// Whether `--model` names a GGUF rather than a checkpoint or vault
/// directory: a file ending in `.gguf` (opening it then says what is wrong
/// with it) or starting with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

impl GgufFile {
    /// Maps and parses `path`. Errors name the file and what is wrong.
    pub fn open(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let parsed = Parser::new(map.bytes(), path).parse()?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Bytes of the whole file.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The mapped bytes of a tensor of this file.
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        self.bytes(tensor.offset, tensor.bytes)
    }

    /// Mapped bytes by position. Callers pass ranges taken from tensor
    /// infos, which were checked against the file length when it was
    /// opened; anything else panics like any out-of-range slice.
    pub(crate) fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        &self.map.bytes()[offset as usize..(offset + len) as usize]
    }

    /// The mapping, for weights that point into it.
    pub(crate) fn mapped(&self) -> &MappedFile {
        &self.map
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
}

/// A bounds-checked reader over the mapped bytes.
struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Parser<'a> {
    fn new(buf: &'a [u8], path: &'a Path) -> Self {
        Parser { buf, pos: 0, path }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, msg.into())
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {} at byte {} needs {n} bytes, the file has {} bytes",
                what(),
                self.pos,
                self.buf.len()
            )));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let bytes = self.take(N, what)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit `min_size` bytes per item into what is left
    /// of the file, so that a corrupt count fails here instead of in an
    /// allocation.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.saturating_mul(min_size) <= self.remaining());
        fits.ok_or_else(|| {
            self.err(format!(
                "truncated or corrupt: {} is {n}, more than the {} bytes left in the file can hold",
                what(),
                self.remaining()
            ))
        })
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(1, &|| format!("length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(format!("{} is not valid UTF-8: {e}", what())))
    }

    fn parse(mut self) -> Result<Parsed> {
        let magic = self.take(4, &|| "the magic".into())?;
        if magic != MAGIC {
            return Err(self.err(format!(
                "not a GGUF file: it starts with {magic:02x?}, a GGUF file with \"GGUF\""
            )));
        }
        let version = self.u32(&|| "the version".into())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(self.err(
                    "GGUF version 1 is not supported (only 2 and 3): convert the model again with a current llama.cpp",
                ))
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(self.err("a big-endian GGUF; only little-endian files are supported"))
            }
            v => {
                return Err(self.err(format!(
                    "unsupported GGUF version {v} (2 and 3 are supported)"
                )))
            }
        }
        // A tensor info is at least a name length, a dim count, one dim,
        // a type and an offset; a key/value at least a key length and a type.
        let n_tensors = self.count(8 + 4 + 8 + 4 + 8, &|| "the tensor count".into())?;
        let n_kv = self.count(8 + 4, &|| "the metadata key count".into())?;

        let mut entries: Vec<(String, Value)> = Vec::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = self.string(&|| format!("metadata key #{i}"))?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(self.err(format!("metadata key {key} appears twice")));
            }
            let ty = self.u32(&|| format!("the type of metadata key {key}"))?;
            let value = self.value(ty, &key, 0)?;
            entries.push((key, value));
        }
        let metadata = Metadata { entries };

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_int() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= u32::MAX as i128 => {
                    a as u64
                }
                _ => {
                    return Err(self.err(format!(
                        "general.alignment must be a power of two, found {v:?}"
                    )))
                }
            },
        };

        let mut infos = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            infos.push(self.tensor_info(i)?);
        }
        let data_offset = (self.pos as u64).next_multiple_of(alignment);
        let len = self.buf.len() as u64;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ggml_type, rel) in infos {
            let err = |msg: String| self.err(format!("tensor {name}: {msg}"));
            if !rel.is_multiple_of(alignment) {
                return Err(err(format!(
                    "data offset {rel} is not a multiple of the alignment {alignment}"
                )));
            }
            let rows = dims[1..]
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let row = ggml_type.bytes_for(dims[0]).ok_or_else(|| {
                err(format!(
                    "rows of {} weights do not split into {} blocks of {}",
                    dims[0],
                    ggml_type,
                    ggml_type.block_elems()
                ))
            })?;
            let bytes = rows
                .and_then(|r| r.checked_mul(row))
                .ok_or_else(|| err(format!("dims {dims:?} overflow")))?;
            let offset = data_offset.checked_add(rel);
            let end = offset.and_then(|o| o.checked_add(bytes));
            match (offset, end) {
                (Some(offset), Some(end)) if end <= len => tensors.push(TensorInfo {
                    name,
                    dims,
                    ggml_type,
                    offset,
                    bytes,
                }),
                _ => {
                    return Err(err(format!(
                        "truncated tensor data: {bytes} bytes at offset {} run past the end of the file ({len} bytes)",
                        data_offset.saturating_add(rel)
                    )))
                }
            }
        }
        check_overlaps(&tensors).map_err(|m| self.err(m))?;
        Ok(Parsed {
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
        })
    }

    fn tensor_info(&mut self, i: usize) -> Result<(String, Vec<u64>, GgmlType, u64)> {
        let name = self.string(&|| format!("the name of tensor #{i}"))?;
        let n_dims = self.u32(&|| format!("the dim count of tensor {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.err(format!(
                "tensor {name} has {n_dims} dims; GGUF tensors have 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(&|| format!("dim {d} of tensor {name}"))?);
        }
        let ty = self.u32(&|| format!("the type of tensor {name}"))?;
        let ggml_type = GgmlType::from_id(ty).ok_or_else(|| {
            self.err(format!(
                "tensor {name} has ggml type {ty}, which is not a known type"
            ))
        })?;
        let offset = self.u64(&|| format!("the offset of tensor {name}"))?;
        Ok((name, dims, ggml_type, offset))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        let what = || format!("the value of {key}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => Value::Bool(self.bool(key)?),
            8 => Value::String(self.string(&what)?),
            9 => Value::Array(self.array_value(key, depth)?),
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            t => {
                return Err(self.err(format!(
                    "metadata key {key} has value type {t}, which GGUF does not define (0-12)"
                )))
            }
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool> {
        match self.array::<1>(&|| format!("the value of {key}"))?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("metadata key {key}: bool byte is {b}, not 0 or 1"))),
        }
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array> {
        if depth >= MAX_NESTING {
            return Err(self.err(format!(
                "metadata key {key} nests arrays more than {MAX_NESTING} deep"
            )));
        }
        let elem = self.u32(&|| format!("the element type of {key}"))?;
        let size = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            t => {
                return Err(self.err(format!(
                    "metadata key {key} is an array of value type {t}, which GGUF does not define"
                )))
            }
        };
        let n = self.count(size, &|| format!("the length of {key}"))?;
        let what = || format!("the elements of {key}");
        // Fixed-size elements: one bounds check for the whole run.
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let bytes = self.take(n * size, &what)?;
                Array::$variant(
                    bytes
                        .chunks_exact(size)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of size")))
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            0 => Array::U8(self.take(n, &what)?.to_vec()),
            1 => Array::I8(self.take(n, &what)?.iter().map(|&b| b as i8).collect()),
            2 => fixed!(U16, u16),
            3 => fixed!(I16, i16),
            4 => fixed!(U32, u32),
            5 => fixed!(I32, i32),
            6 => fixed!(F32, f32),
            7 => Array::Bool((0..n).map(|_| self.bool(key)).collect::<Result<_>>()?),
            8 => Array::String(
                (0..n)
                    .map(|i| self.string(&|| format!("{key}[{i}]")))
                    .collect::<Result<_>>()?,
            ),
            9 => Array::Array(
                (0..n)
                    .map(|_| self.array_value(key, depth + 1))
                    .collect::<Result<_>>()?,
            ),
            10 => fixed!(U64, u64),
            11 => fixed!(I64, i64),
            _ => fixed!(F64, f64),
        })
    }
}

/// Tensors that share bytes mean a corrupt or hand-edited file.
fn check_overlaps(tensors: &[TensorInfo]) -> std::result::Result<(), String> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if pair[0].offset + pair[0].bytes > pair[1].offset {
            return Err(format!(
                "tensors {} and {} overlap (offsets {} and {}, the first is {} bytes)",
                pair[0].name, pair[1].name, pair[0].offset, pair[1].offset, pair[0].bytes
            ));
        }
    }
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|p| p[0] == p[1]) {
        return Err(format!("tensor {} appears twice", pair[0]));
    }
    Ok(())
}
