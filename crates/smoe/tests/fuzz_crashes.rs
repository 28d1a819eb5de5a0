//! Inputs on which the fuzz targets (`fuzz/fuzz_targets/`) crashed, replayed
//! through the same calls against today's code: each must now be an error
//! or run, never a panic. `fixtures/fuzz-crashes/TARGET/` holds libFuzzer's
//! artifacts as they came out of `tools/fuzz.sh`.

mod support;

use std::path::PathBuf;

use smoe::model::{Budget, LoadOptions, Logits};
use smoe::tokenizer::Tokenizer;
use support::{fixture, q8_0_vault};

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

#[test]
fn tokenizer_json_crashes_are_errors() {
    for file in crashes("tokenizer_json") {
        // The tokenizers crate panicked on these malformed decoders.
        match Tokenizer::from_file(&file) {
            Ok(_) => panic!("{}: a damaged tokenizer.json loaded", file.display()),
            Err(e) => assert!(e.to_string().contains("not a valid tokenizer"), "{e}"),
        }
    }
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
    for file in crashes("vault_manifest") {
        // As the fuzz target does: the real conversion id, so that the
        // input gets past the header check to the parts it damaged.
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        manifest["conversion_id"] = id.clone().into();
        std::fs::write(vault.join("manifest.json"), manifest.to_string()).unwrap();
        let opts = LoadOptions {
            ram_budget: Budget::Bytes(16 << 20),
            verify_experts: true,
            read_threads: 1,
            ..LoadOptions::default()
        };
        // Expert parts off their blocks' alignment panicked in the
        // quantized matmul; the validation pass refuses them now.
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
    }
}
