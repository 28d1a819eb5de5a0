//! `--model FILE.gguf` for the commands that need no weights yet: template,
//! inspect and check, on llama.cpp's Qwen2 vocabulary file; and the errors
//! for a file that is not a usable GGUF.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use smoe::gguf::write::Builder;
use smoe::gguf::{GgmlType, Gguf};

fn qwen2_vocab() -> PathBuf {
    fixtures().join("gguf-vocab/ggml-vocab-qwen2.gguf")
}

/// The vocabulary file's metadata with an f32 embedding table of one row
/// per token, every row alike so that none looks untrained.
fn with_embeddings(dir: &Path) -> PathBuf {
    let g = Gguf::open(&qwen2_vocab()).unwrap();
    let mut b = Builder::new();
    for (k, v) in g.metadata().iter() {
        b = b.kv(k, v.clone());
    }
    let rows = 151936u64;
    let row: Vec<u8> = [0.5f32, -0.25, 1.0, 0.125]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let table = row.repeat(rows as usize);
    b = b.tensor("token_embd.weight", &[4, rows], GgmlType::F32, table);
    let path = dir.join("qwen2-embd.gguf");
    fs::write(&path, b.build()).unwrap();
    path
}

#[test]
fn template_renders_the_gguf_template_with_its_tokenizer() {
    let scratch = tempfile::tempdir().unwrap();
    let messages = scratch.path().join("m.json");
    fs::write(
        &messages,
        r#"[{"role":"user","content":"Grüße, 你好 🙂"},{"role":"assistant","content":"Hi!"},{"role":"user","content":"2+2?"}]"#,
    )
    .unwrap();
    let model = qwen2_vocab();
    let text = smoe_ok(&[
        "template",
        "--model",
        path_str(&model),
        "--messages",
        path_str(&messages),
    ]);
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nGrüße, 你好 🙂<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&fs::read_to_string(&messages).unwrap()).unwrap();
    let ids = template_ids(&model, &list);
    // <|im_start|> and <|im_end|> are single ids; "system" after it is 8948
    // in Qwen2's vocabulary.
    assert_eq!(&ids[..2], [151644, 8948]);
    assert_eq!(ids.iter().filter(|&&i| i == 151645).count(), 4);
}

#[test]
fn inspect_and_check_a_gguf() {
    let scratch = tempfile::tempdir().unwrap();
    let model = with_embeddings(scratch.path());
    let out = smoe_ok(&["inspect", path_str(&model)]);
    for part in [
        "GGUF v3 | 1 file",
        "architecture: qwen2 | name: qwen2",
        "tensors by type: F32 1 (2.32 MiB)",
        "routed experts: none",
        "tokenizer: gpt2 (pre qwen2) | 151936 tokens | chat template:",
    ] {
        assert!(out.contains(part), "{part:?} not in:\n{out}");
    }
    // Its tokenizer is sound, but check also asks whether smoe runs it,
    // and a dense Qwen2 is not a family smoe runs.
    let err = smoe_err(&["check", "--model", path_str(&model)]);
    assert!(
        err.contains("general.architecture is \"qwen2\", which smoe does not run"),
        "{err}"
    );
}

#[test]
fn bad_gguf_files_are_named() {
    let scratch = tempfile::tempdir().unwrap();
    let good = fs::read(qwen2_vocab()).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("magic.gguf", b"GGML0000".to_vec(), "not a GGUF file"),
        ("short.gguf", good[..good.len() / 2].to_vec(), "truncated"),
        (
            "version.gguf",
            [&good[..4], &7u32.to_le_bytes(), &good[8..]].concat(),
            "unsupported GGUF version 7",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = scratch.path().join(name);
        fs::write(&path, bytes).unwrap();
        for args in [
            vec!["inspect", path_str(&path)],
            vec!["check", "--model", path_str(&path)],
            vec![
                "template",
                "--model",
                path_str(&path),
                "--messages",
                path_str(&path),
            ],
        ] {
            let err = smoe_err(&args);
            assert!(
                err.contains(expect) && err.contains(name),
                "{args:?}: {err}"
            );
        }
    }
    // The second of two shards, without the first.
    let shard = scratch.path().join("m-00002-of-00002.gguf");
    let b = Builder::new()
        .kv("split.no", smoe::gguf::Value::U16(1))
        .kv("split.count", smoe::gguf::Value::U16(2));
    fs::write(&shard, b.build()).unwrap();
    let err = smoe_err(&["inspect", path_str(&shard)]);
    assert!(
        err.contains("m-00001-of-00002.gguf") && err.contains("shard 1 of 2 is missing"),
        "{err}"
    );
}
