//! A vault's manifest.json beside real data files: opened (the manifest
//! checks and the validation pass against its config) and, when it opens,
//! one forward pass with every expert record's checksum verified, which
//! decodes the records the manifest points at. The vault is converted
//! once from the qwen3-moe-a fixture. Run from the repository root.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smoe::kernels::DType;
use smoe::model::{Budget, LoadOptions, Logits};
use smoe::vault::convert::{convert, ConvertOptions};

fn vault() -> &'static PathBuf {
    static V: OnceLock<PathBuf> = OnceLock::new();
    V.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("smoe-fuzz-vault-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let q8 = DType::parse("q8_0").unwrap();
        let opts = ConvertOptions {
            experts: q8,
            backbone: q8,
            allow_lossy: false,
            stop_after_layers: None,
        };
        convert("fixtures/qwen3-moe-a".as_ref(), &dir, &opts, &mut |_| {}).unwrap();
        dir
    })
}

/// The conversion id of the vault's data files: put into any manifest
/// that names one, so inputs get past the header check to the rest.
fn conversion_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        smoe::vault::Vault::open(vault())
            .unwrap()
            .manifest
            .conversion_id
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = vault();
    let id = conversion_id();
    let bytes = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(mut v) if v.get("conversion_id").is_some() => {
            v["conversion_id"] = id.into();
            v.to_string().into_bytes()
        }
        _ => data.to_vec(),
    };
    std::fs::write(dir.join("manifest.json"), bytes).unwrap();
    let opts = LoadOptions {
        ram_budget: Budget::Bytes(16 << 20),
        verify_experts: true,
        read_threads: 1,
        ..LoadOptions::default()
    };
    if let Ok(opened) = smoe::model::open(dir, &opts) {
        let mut session = opened.model.new_session();
        let _ = opened
            .model
            .forward(&[1, 2, 3], &mut session, Logits::Last);
    }
});
