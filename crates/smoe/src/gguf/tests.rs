//! The reader against GGUFs built in code: every value type, tensors and
//! expert slices, split sets, and the ways a file can be wrong.

use std::path::{Path, PathBuf};

use super::write::Builder;
use super::*;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Distinct bytes so that a slice read from the wrong place shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

/// A small model-shaped file: metadata of every type, a 2-D f32 tensor and
/// a 3-D Q4_K experts tensor of 4 experts.
fn model() -> Builder {
    Builder::new()
        .kv("general.architecture", s("qwen3moe"))
        .kv("qwen3moe.block_count", Value::U32(1))
        .kv("a.u8", Value::U8(7))
        .kv("a.i8", Value::I8(-7))
        .kv("a.u16", Value::U16(700))
        .kv("a.i16", Value::I16(-700))
        .kv("a.i32", Value::I32(-70000))
        .kv("a.u64", Value::U64(1 << 40))
        .kv("a.i64", Value::I64(-(1 << 40)))
        .kv("a.f32", Value::F32(0.5))
        .kv("a.f64", Value::F64(0.25))
        .kv("a.bool", Value::Bool(true))
        .kv(
            "a.strings",
            Value::Array(Array::String(vec!["x".into(), "ÿ ü".into(), "".into()])),
        )
        .kv("a.f32s", Value::Array(Array::F32(vec![1.0, -2.0])))
        .kv(
            "a.nested",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::Bool(vec![false]),
            ])),
        )
        .tensor("norm.weight", &[8], GgmlType::F32, pattern(32, 1))
        .tensor(
            "blk.0.ffn_up_exps.weight",
            &[256, 2, 4],
            GgmlType::Q4K,
            pattern(144 * 2 * 4, 2),
        )
        .tensor(
            "blk.0.attn_v.weight",
            &[32, 3],
            GgmlType::Q5_0,
            pattern(66, 3),
        )
}

#[test]
fn reads_metadata_tensors_and_expert_slices() {
    let d = dir();
    let path = write(d.path(), "m.gguf", &model().build());
    assert!(is_gguf(&path));
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.architecture().unwrap(), "qwen3moe");
    assert_eq!(g.usize("qwen3moe.block_count").unwrap(), 1);
    assert_eq!(g.usize("a.u64").unwrap(), 1 << 40);
    assert_eq!(g.metadata().get("a.i8"), Some(&Value::I8(-7)));
    assert_eq!(
        g.metadata().get("a.i16").and_then(Value::as_int),
        Some(-700)
    );
    assert_eq!(
        g.metadata().get("a.i64").and_then(Value::as_int),
        Some(-(1 << 40))
    );
    assert_eq!(g.opt_f64("a.f32").unwrap(), Some(0.5));
    assert_eq!(g.opt_f64("a.f64").unwrap(), Some(0.25));
    assert_eq!(g.opt_bool("a.bool").unwrap(), Some(true));
    assert_eq!(g.opt_bool("a.missing").unwrap(), None);
    assert_eq!(
        g.opt_array("a.strings").unwrap(),
        Some(&Array::String(vec!["x".into(), "ÿ ü".into(), "".into()]))
    );
    assert_eq!(
        g.opt_array("a.nested").unwrap(),
        Some(&Array::Array(vec![
            Array::I32(vec![1, 2]),
            Array::Bool(vec![false])
        ]))
    );
    assert_eq!(g.metadata().len(), 15);

    let err = g.usize("a.i32").unwrap_err().to_string();
    assert!(
        err.contains("a.i32") && err.contains("non-negative"),
        "{err}"
    );
    let err = g.str("a.u8").unwrap_err().to_string();
    assert!(err.contains("expected a string, found uint8"), "{err}");
    let err = g.str("no.such.key").unwrap_err().to_string();
    assert!(err.contains("no.such.key is missing"), "{err}");

    let names: Vec<&str> = g.tensors().map(|(_, t)| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "norm.weight",
            "blk.0.ffn_up_exps.weight",
            "blk.0.attn_v.weight"
        ]
    );
    assert_eq!(g.data("norm.weight").unwrap(), pattern(32, 1));
    let (_, up) = g.tensor("blk.0.ffn_up_exps.weight").unwrap();
    assert_eq!(up.ggml_type, GgmlType::Q4K);
    assert_eq!(up.row_bytes(), 144);
    assert_eq!(up.elems(), 256 * 8);
    assert_eq!(up.offset % DEFAULT_ALIGNMENT, 0);
    let all = pattern(144 * 8, 2);
    for e in 0..4 {
        let x = g.expert_extent("blk.0.ffn_up_exps.weight", e).unwrap();
        assert_eq!(x.len, 288);
        assert_eq!(x.offset, up.offset + 288 * e as u64);
        assert_eq!(g.extent_data(x), &all[288 * e..288 * (e + 1)]);
    }
    let err = g.expert_extent("blk.0.ffn_up_exps.weight", 4).unwrap_err();
    assert!(err.to_string().contains("expert 4"), "{err}");
    let err = g.expert_extent("norm.weight", 0).unwrap_err();
    assert!(err.to_string().contains("has dims [8]"), "{err}");
    assert_eq!(g.data("blk.0.attn_v.weight").unwrap(), pattern(66, 3));
    assert!(g
        .require("nope")
        .unwrap_err()
        .to_string()
        .contains("tensor nope is missing"));
}

#[test]
fn alignment_is_honoured() {
    let d = dir();
    let b = model().kv("general.alignment", Value::U32(4096));
    let path = write(d.path(), "a.gguf", &b.build());
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.shards()[0].alignment(), 4096);
    for (_, t) in g.tensors() {
        assert_eq!(t.offset % 4096, 0, "{}", t.name);
    }
    assert_eq!(g.data("blk.0.attn_v.weight").unwrap(), pattern(66, 3));

    let b = model().kv("general.alignment", Value::U32(48));
    let path = write(d.path(), "b.gguf", &b.build());
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("general.alignment must be a power of two"),
        "{err}"
    );
}

fn open_err(bytes: &[u8]) -> String {
    let d = dir();
    let path = write(d.path(), "bad.gguf", bytes);
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(err.contains("bad.gguf"), "the error names the file: {err}");
    err
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = model().build();
    for len in 0..bytes.len() {
        let err = open_err(&bytes[..len]);
        assert!(
            err.contains("truncated")
                || err.contains("not a GGUF")
                || err.contains("more than the"),
            "{len}: {err}"
        );
    }
    let err = open_err(&bytes[..bytes.len() - 1]);
    assert!(
        err.contains("tensor blk.0.attn_v.weight: truncated tensor data"),
        "{err}"
    );
}

#[test]
fn bad_headers_are_named() {
    let good = model().build();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(open_err(&b).contains("not a GGUF file"));
    for (version, expect) in [
        (1u32, "version 1 is not supported"),
        (4, "unsupported GGUF version 4"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&version.to_le_bytes());
        let err = open_err(&b);
        assert!(err.contains(expect), "{err}");
    }
    // Absurd counts fail before anything is allocated.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&b).contains("the tensor count is 18446744073709551615"));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open_err(&b).contains("the metadata key count"));
    let mut b = good.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&b).contains("length of metadata key #0"));
}

#[test]
fn bad_metadata_and_tensor_infos_are_named() {
    let err = open_err(
        &Builder::new()
            .kv("k", Value::U8(1))
            .kv("k", Value::U8(2))
            .build(),
    );
    assert!(err.contains("metadata key k appears twice"), "{err}");

    // Value type 13 does not exist: patch the type of the only key.
    let mut b = Builder::new().kv("k", Value::U8(1)).build();
    let at = 24 + 8 + 1;
    b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(open_err(&b).contains("value type 13"));

    let mut b = Builder::new().kv("k", Value::Bool(true)).build();
    *b.last_mut().unwrap() = 2;
    assert!(open_err(&b).contains("bool byte is 2"));

    let mut b = Builder::new().kv("k", s("é")).build();
    *b.last_mut().unwrap() = 0xff;
    assert!(open_err(&b).contains("not valid UTF-8"));

    // Type 4 (the removed Q4_2) is unknown.
    let b = Builder::new().tensor("t", &[32], GgmlType::Q4_0, vec![0; 18]);
    let mut bytes = b.build();
    let at = 24 + 8 + 1 + 4 + 8;
    bytes[at..at + 4].copy_from_slice(&4u32.to_le_bytes());
    assert!(open_err(&bytes).contains("tensor t has ggml type 4, which is not a known type"));

    let err = open_err(
        &Builder::new()
            .tensor("t", &[100], GgmlType::Q4K, vec![0; 144])
            .build(),
    );
    assert!(
        err.contains("tensor t: rows of 100 weights do not split into Q4_K blocks of 256"),
        "{err}"
    );

    let err = open_err(
        &Builder::new()
            .tensor("t", &[1, 2, 3, 4, 5], GgmlType::F32, vec![])
            .build(),
    );
    assert!(err.contains("tensor t has 5 dims"), "{err}");

    let err = open_err(
        &Builder::new()
            .tensor("t", &[u64::MAX, 2], GgmlType::F32, vec![])
            .build(),
    );
    assert!(err.contains("tensor t:"), "{err}");

    let err = open_err(
        &Builder::new()
            .tensor("t", &[8], GgmlType::F32, vec![0; 32])
            .tensor("t", &[8], GgmlType::F32, vec![0; 32])
            .build(),
    );
    assert!(err.contains("tensor t appears twice"), "{err}");

    // Point the second tensor's offset at the first one's bytes.
    let b = Builder::new()
        .tensor("a", &[16], GgmlType::F32, vec![0; 64])
        .tensor("b", &[8], GgmlType::F32, vec![0; 32]);
    let mut bytes = b.build();
    let second = 24 + (8 + 1 + 4 + 8 + 4 + 8) + 8 + 1 + 4 + 8 + 4;
    bytes[second..second + 8].copy_from_slice(&32u64.to_le_bytes());
    assert!(open_err(&bytes).contains("tensors a and b overlap"));
    bytes[second..second + 8].copy_from_slice(&33u64.to_le_bytes());
    assert!(
        open_err(&bytes).contains("tensor b: data offset 33 is not a multiple of the alignment 32")
    );
}

/// Shard `k` (1-based) of a 3-shard set: the first holds the metadata,
/// each holds two tensors.
fn shard(k: u32, n: u32, total: i32) -> Builder {
    let mut b = Builder::new()
        .kv("split.no", Value::U16((k - 1) as u16))
        .kv("split.count", Value::U16(n as u16))
        .kv("split.tensors.count", Value::I32(total));
    if k == 1 {
        b = b.kv("general.architecture", s("qwen3moe"));
    }
    for t in 0..2 {
        let name = format!("t{k}.{t}");
        b = b.tensor(
            &name,
            &[32, 2, 2],
            GgmlType::Q8_0,
            pattern(136, (k * 10 + t) as u8),
        );
    }
    b
}

fn write_set(dir: &Path, n: u32) -> Vec<PathBuf> {
    (1..=n)
        .map(|k| {
            write(
                dir,
                &format!("model-{k:05}-of-{n:05}.gguf"),
                &shard(k, n, 2 * n as i32).build(),
            )
        })
        .collect()
}

#[test]
fn a_split_set_is_found_indexed_and_read_from_any_shard() {
    let d = dir();
    let paths = write_set(d.path(), 3);
    for given in &paths {
        let g = Gguf::open(given).unwrap();
        assert_eq!(g.shards().len(), 3);
        assert_eq!(g.path(), paths[0]);
        assert_eq!(g.architecture().unwrap(), "qwen3moe");
        assert_eq!(g.tensors().count(), 6);
        for k in 1..=3u32 {
            for t in 0..2u32 {
                let name = format!("t{k}.{t}");
                let (s, info) = g.tensor(&name).unwrap();
                assert_eq!(s, k as usize - 1);
                assert_eq!(g.data(&name).unwrap(), pattern(136, (k * 10 + t) as u8));
                let e1 = g.expert_extent(&name, 1).unwrap();
                assert_eq!(e1.shard, s);
                assert_eq!(e1.offset, info.offset + 68);
                assert_eq!(g.extent_data(e1), &pattern(136, (k * 10 + t) as u8)[68..]);
            }
        }
        assert_eq!(
            g.file_bytes(),
            paths
                .iter()
                .map(|p| p.metadata().unwrap().len())
                .sum::<u64>()
        );
    }
}

#[test]
fn missing_extra_and_mismatched_shards_are_named() {
    let d = dir();
    let paths = write_set(d.path(), 3);
    std::fs::remove_file(&paths[1]).unwrap();
    let err = Gguf::open(&paths[0]).unwrap_err().to_string();
    assert!(
        err.contains("model-00002-of-00003.gguf") && err.contains("shard 2 of 3 is missing"),
        "{err}"
    );

    let d = dir();
    let paths = write_set(d.path(), 3);
    write(
        d.path(),
        "model-00001-of-00002.gguf",
        &shard(1, 2, 4).build(),
    );
    let err = Gguf::open(&paths[0]).unwrap_err().to_string();
    assert!(
        err.contains("an extra shard") && err.contains("model-00001-of-00002.gguf"),
        "{err}"
    );

    let d = dir();
    let paths = write_set(d.path(), 3);
    write(
        d.path(),
        "model-00004-of-00003.gguf",
        &shard(3, 3, 6).build(),
    );
    let err = Gguf::open(&paths[2]).unwrap_err().to_string();
    assert!(err.contains("shard 4 of 3"), "{err}");

    // Shards swapped on disk: the second file says it is the third.
    let d = dir();
    write(
        d.path(),
        "model-00001-of-00003.gguf",
        &shard(1, 3, 6).build(),
    );
    write(
        d.path(),
        "model-00002-of-00003.gguf",
        &shard(3, 3, 6).build(),
    );
    write(
        d.path(),
        "model-00003-of-00003.gguf",
        &shard(2, 3, 6).build(),
    );
    let err = Gguf::open(&d.path().join("model-00001-of-00003.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected shard 2 of 3") && err.contains("found split.no = 2"),
        "{err}"
    );

    // split.tensors.count disagrees with the shards.
    let d = dir();
    write(d.path(), "m-00001-of-00002.gguf", &shard(1, 2, 5).build());
    write(d.path(), "m-00002-of-00002.gguf", &shard(2, 2, 5).build());
    let err = Gguf::open(&d.path().join("m-00002-of-00002.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("split.tensors.count is 5 but the 2 shards hold 4 tensors"),
        "{err}"
    );

    // A tensor in two shards.
    let d = dir();
    write(d.path(), "m-00001-of-00002.gguf", &shard(1, 2, 4).build());
    let dup = shard(2, 2, 4).tensor("t1.0", &[32], GgmlType::Q8_0, vec![0; 34]);
    write(d.path(), "m-00002-of-00002.gguf", &dup.build());
    let err = Gguf::open(&d.path().join("m-00001-of-00002.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor t1.0 is also in"), "{err}");

    // A split shard renamed so its siblings cannot be found.
    let d = dir();
    let p = write(d.path(), "renamed.gguf", &shard(1, 3, 6).build());
    let err = Gguf::open(&p).unwrap_err().to_string();
    assert!(err.contains("split.count is 3 but the file name"), "{err}");

    // The file name and split.count disagree.
    let d = dir();
    let p = write(d.path(), "x-00001-of-00002.gguf", &shard(1, 3, 6).build());
    let err = Gguf::open(&p).unwrap_err().to_string();
    assert!(
        err.contains("split.count is 3 but the file name says 1 of 2"),
        "{err}"
    );
}

#[test]
fn split_names() {
    assert_eq!(
        split_name(Path::new("/m/Qwen3-235B-A22B-Q4_K_M-00002-of-00003.gguf")),
        Some(("Qwen3-235B-A22B-Q4_K_M".into(), 2, 3))
    );
    assert_eq!(split_name(Path::new("model.gguf")), None);
    assert_eq!(split_name(Path::new("m-1-of-3.gguf")), None);
    assert_eq!(split_name(Path::new("-00001-of-00003.gguf")), None);
    assert_eq!(
        shard_path(Path::new("/m"), "x", 2, 3),
        Path::new("/m/x-00002-of-00003.gguf")
    );
}
