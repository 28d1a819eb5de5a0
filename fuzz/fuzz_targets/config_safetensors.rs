//! config.json and the safetensors header: an even first byte makes the
//! rest a config.json, parsed and validated; an odd one makes it a
//! `model.safetensors` beside the qwen3-moe-a fixture's config, opened and
//! validated against it. Run from the repository root.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smoe::checkpoint::Checkpoint;
use smoe::config::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    if kind % 2 == 0 {
        if let Ok(v) = serde_json::from_slice(rest) {
            let _ = ModelConfig::from_json(&v, Path::new("config.json"));
        }
        return;
    }
    let dir = std::env::temp_dir().join(format!("smoe-fuzz-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy("fixtures/qwen3-moe-a/config.json", dir.join("config.json")).unwrap();
    std::fs::write(dir.join("model.safetensors"), rest).unwrap();
    if let Ok(ckpt) = Checkpoint::open(&dir) {
        let _ = smoe::validate::checkpoint(&ckpt);
    }
});
