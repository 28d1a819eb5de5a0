//! Writes small GGUF files: the tests' fixtures are built in code with this,
//! so that every reader path (shards, bad headers, truncation) is exercised
//! without committing binary files.

use super::file::{Array, Value, DEFAULT_ALIGNMENT, MAGIC};
use super::types::GgmlType;

/// A GGUF file being assembled in memory.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key (in order; a repeated key is written twice, which
    /// is how a test makes a bad file).
    pub fn kv(mut self, key: &str, value: Value) -> Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor; `data` must be its exact bytes.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// The same tensors under other metadata.
    pub fn with_metadata(&self, metadata: Vec<(String, Value)>) -> Self {
        Self {
            metadata,
            tensors: self.tensors.clone(),
        }
    }

    /// The same file with tensor `name` declared as `ty`, its bytes zeros
    /// of the size that type needs.
    pub fn with_tensor_type(&self, name: &str, ty: GgmlType) -> Self {
        let mut out = self.clone();
        for t in out.tensors.iter_mut().filter(|t| t.0 == name) {
            let rows: u64 = t.1[1..].iter().product();
            let bytes = ty.bytes_for(t.1[0]).expect("whole blocks") * rows;
            t.2 = ty;
            t.3 = vec![0; bytes as usize];
        }
        out
    }

    /// The set split into `n` shards as llama.cpp's `gguf-split` makes
    /// them: the tensors in `n` runs in order, the metadata in the first
    /// shard only, and every shard with its `split.*` keys.
    pub fn split(&self, n: usize) -> Vec<Vec<u8>> {
        let total = self.tensors.len();
        (0..n)
            .map(|k| {
                let mut shard = Builder::new()
                    .kv("split.no", Value::U16(k as u16))
                    .kv("split.count", Value::U16(n as u16))
                    .kv("split.tensors.count", Value::I32(total as i32));
                if k == 0 {
                    shard.metadata.extend(self.metadata.iter().cloned());
                }
                shard.tensors = self.tensors[k * total / n..(k + 1) * total / n].to_vec();
                shard.build()
            })
            .collect()
    }

    /// The file's bytes, version 3, tensors laid out in order at the
    /// alignment that `general.alignment` sets (32 without it).
    pub fn build(&self) -> Vec<u8> {
        let alignment = self
            .metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_int())
            .map_or(DEFAULT_ALIGNMENT, |a| a as u64) as usize;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            string(&mut out, key);
            out.extend_from_slice(&value_type(value).to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + data.len()).next_multiple_of(alignment);
        }
        for (_, _, _, data) in &self.tensors {
            out.resize(out.len().next_multiple_of(alignment), 0);
            out.extend_from_slice(data);
        }
        out
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn array_type(a: &Array) -> u32 {
    match a {
        Array::U8(_) => 0,
        Array::I8(_) => 1,
        Array::U16(_) => 2,
        Array::I16(_) => 3,
        Array::U32(_) => 4,
        Array::I32(_) => 5,
        Array::F32(_) => 6,
        Array::Bool(_) => 7,
        Array::String(_) => 8,
        Array::Array(_) => 9,
        Array::U64(_) => 10,
        Array::I64(_) => 11,
        Array::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => string(out, s),
        Value::Array(a) => write_array(out, a),
    }
}

fn write_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&array_type(a).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| string(out, s)),
        Array::Array(v) => v.iter().for_each(|a| write_array(out, a)),
    }
}
