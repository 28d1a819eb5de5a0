//! Inputs on which the fuzz targets (`fuzz/fuzz_targets/`) crashed, replayed
//! through the same calls against today's code: each must now be an error
//! that names its file, or run, never a panic, an abort or a hang.
//! `fixtures/fuzz-crashes/TARGET/` holds libFuzzer's artifacts as they came
//! out of `tools/fuzz.sh`; a new one dropped there is replayed without any
//! change here.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use smoe::checkpoint::Checkpoint;
use smoe::config::ModelConfig;
use smoe::model::{Budget, LoadOptions, Logits};
use smoe::tokenizer::Tokenizer;
use support::{fixture, q8_0_vault};

/// libFuzzer's `-timeout` in `tools/fuzz.sh`: slower than this is a crash
/// there, so it is one here.
const BOUND: Duration = Duration::from_secs(30);

fn crashes(target: &str) -> Vec<PathBuf> {
    let dir = fixture("fuzz-crashes").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no crash inputs in {}", dir.display());
    files
}

/// Runs `replay` on every crash input of `target`, each within [`BOUND`].
fn replay_all(target: &str, mut replay: impl FnMut(&Path)) {
    for file in crashes(target) {
        let start = Instant::now();
        replay(&file);
        let took = start.elapsed();
        assert!(took < BOUND, "{}: took {took:?}", file.display());
    }
}

#[test]
fn config_safetensors_crashes_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(
        fixture("qwen3-moe-a").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    replay_all("config_safetensors", |file| {
        let data = std::fs::read(file).unwrap();
        let Some((&kind, rest)) = data.split_first() else {
            return;
        };
        // As the fuzz target does: an even first byte makes the rest a
        // config.json, an odd one a model.safetensors beside the fixture's.
        if kind % 2 == 0 {
            // DeepSeek's latent dimensions were summed and its shared
            // experts multiplied before any bound, overflowing.
            if let Ok(v) = serde_json::from_slice(rest) {
                if let Err(e) = ModelConfig::from_json(&v, Path::new("config.json")) {
                    assert!(e.to_string().contains("config.json"), "{e}");
                }
            }
            return;
        }
        std::fs::write(dir.join("model.safetensors"), rest).unwrap();
        match Checkpoint::open(dir) {
            Ok(ckpt) => {
                let _ = smoe::validate::checkpoint(&ckpt);
            }
            Err(e) => assert!(e.to_string().contains(&*dir.to_string_lossy()), "{e}"),
        }
    });
}

#[test]
fn tokenizer_json_crashes_are_errors() {
    replay_all("tokenizer_json", |file| {
        // The tokenizers crate panicked on JSON syntax errors inside the
        // decoder, and padding from the file allocated without bound on
        // every encode. As the fuzz target does: load, encode, decode.
        match Tokenizer::from_file(file) {
            Ok(tok) => {
                if let Ok(ids) = tok.encode("Hello, world! 2 + 2 = 4 <|im_end|>", true) {
                    assert!(ids.len() <= 64, "{}: {} ids", file.display(), ids.len());
                    let _ = tok.decode(&ids, false);
                }
                let _ = tok.encode_at_most("a b c d e f g h", false, 3);
            }
            Err(e) => assert!(
                e.to_string().contains(&*file.to_string_lossy())
                    && e.to_string().contains("not a valid tokenizer"),
                "{e}"
            ),
        }
    });
}

#[test]
fn vault_manifest_crashes_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let vault = tmp.path().join("vault");
    q8_0_vault(&fixture("qwen3-moe-a"), &vault);
    let id = smoe::vault::Vault::open(&vault)
        .unwrap()
        .manifest
        .conversion_id;
    replay_all("vault_manifest", |file| {
        // As the fuzz target does: the real conversion id, so that the
        // input gets past the header check to the parts it damaged.
        let data = std::fs::read(file).unwrap();
        let bytes = match serde_json::from_slice::<serde_json::Value>(&data) {
            Ok(mut v) if v.get("conversion_id").is_some() => {
                v["conversion_id"] = id.clone().into();
                v.to_string().into_bytes()
            }
            _ => data,
        };
        std::fs::write(vault.join("manifest.json"), bytes).unwrap();
        let opts = LoadOptions {
            ram_budget: Budget::Bytes(16 << 20),
            verify_experts: true,
            read_threads: 1,
            ..LoadOptions::default()
        };
        // Expert parts off their blocks' alignment panicked in the
        // quantized matmul; widths near 2^64 overflowed the row size
        // checked against a part's length; an embedding table whose shape
        // and length disagreed overflowed the sizes of its row reads.
        match smoe::model::open(&vault, &opts) {
            Ok(opened) => {
                let mut session = opened.model.new_session();
                let _ = opened.model.forward(&[1, 2, 3], &mut session, Logits::Last);
            }
            Err(e) => assert!(
                e.to_string().contains("manifest.json"),
                "{}: {e}",
                file.display()
            ),
        }
    });
}
