//! The built-in model: a small Qwen3-MoE (models/builtin, trained by
//! tools/train_builtin.py) compiled into the binary, so that `smoe run` and
//! `smoe chat` work with no `--model`.
//!
//! On first use it is converted into a vault in the user's cache directory,
//! keyed by a checksum of the embedded files (a rebuilt binary with a new
//! model converts again), and streamed from there like any other vault.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use smoe::kernels::DType;
use smoe::vault::convert::ConvertOptions;
use smoe::vault::{is_vault, VERSION};

use crate::vault_cmd::convert_with_progress;

macro_rules! embed {
    ($($name:literal),*) => {
        &[$(($name, include_bytes!(concat!("../../../models/builtin/", $name)) as &[u8])),*]
    };
}

/// The checkpoint as `smoe convert` wants it; the model card, evaluation
/// set and training log stay in the repository.
const FILES: &[(&str, &[u8])] = embed!(
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json"
);

/// The fraction of its expert bytes the built-in model streams under by
/// default: small enough that the demonstration misses and reads, large
/// enough that it runs at interactive speed.
pub const DEFAULT_BUDGET_FRACTION: u64 = 4;

/// smoe's cache directory ([`smoe::paths::cache_dir`]), where the vault
/// goes.
fn cache_root() -> Result<PathBuf> {
    smoe::paths::cache_dir().context(
        "the built-in model needs a cache directory: set XDG_CACHE_HOME or HOME, or pass --model",
    )
}

/// Routed-expert type of the vault. q4_0 and not the converter's default
/// q4_k: the model's rows of 128 and 64 weights are not whole q4_k blocks,
/// and a vault that says q4_k while holding q4_0 would mislead.
const EXPERTS: &str = "q4_0";

/// Names the embedded files and what they convert to.
fn key() -> String {
    let mut crc = crc32fast::Hasher::new();
    for (name, bytes) in FILES {
        crc.update(name.as_bytes());
        crc.update(&(bytes.len() as u64).to_le_bytes());
        crc.update(bytes);
    }
    format!("builtin-v{VERSION}-{EXPERTS}-{:08x}", crc.finalize())
}

/// The built-in model's vault, converted on first use. Concurrent first
/// uses take turns on a lock file; a conversion that was interrupted
/// resumes (the converter journals its progress and renames the vault into
/// place only when it is whole).
pub fn vault() -> Result<PathBuf> {
    let dir = cache_root()?.join(key());
    let vault = dir.join("vault");
    if !is_vault(&vault) {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        // flock, not File::lock: that is newer than the supported Rust.
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        if !is_vault(&vault) {
            eprintln!(
                "built-in model: first use, converting it to a vault in {}",
                vault.display()
            );
            let source = dir.join("source");
            write_source(&source)?;
            let opts = ConvertOptions {
                experts: DType::parse(EXPERTS).context("a known type")?,
                // Not `smoe convert`'s q4_k: this backbone is 1.1 MB a
                // token, too little for its type to change the speed, and
                // its 128-wide rows would fall back to q4_0 (mean KL 0.097
                // against bf16 where q4_0 experts cost 0.033;
                // bench/quality.py).
                backbone: DType::BF16,
                allow_lossy: false,
                stop_after_layers: None,
            };
            convert_with_progress(&source, &vault, &opts, false)?;
            fs::remove_dir_all(&source)
                .with_context(|| format!("removing {}", source.display()))?;
        }
    }
    eprintln!("built-in model: {}", vault.display());
    Ok(vault)
}

/// Writes the embedded checkpoint under `source.partial` and renames it
/// into place, so a `source` directory is always whole.
fn write_source(source: &Path) -> Result<()> {
    let partial = source.with_extension("partial");
    for d in [source, partial.as_path()] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    for (name, bytes) in FILES {
        let path = partial.join(name);
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    fs::rename(&partial, source).with_context(|| format!("renaming to {}", source.display()))?;
    Ok(())
}
