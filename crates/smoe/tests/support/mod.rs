//! Helpers shared by the library's integration tests that damage or replay
//! inputs against vaults: the committed fixtures and the q8_0 vault they
//! convert to.

use std::path::{Path, PathBuf};

use smoe::kernels::DType;
use smoe::vault::convert::{convert, ConvertOptions};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// q8_0 throughout: lossless enough that a vault's logits are stable, and
/// the fastest conversion.
pub fn q8_0_options() -> ConvertOptions {
    let q8 = DType::parse("q8_0").unwrap();
    ConvertOptions {
        experts: q8,
        backbone: q8,
        allow_lossy: false,
        stop_after_layers: None,
    }
}

/// Converts the checkpoint `src` into a q8_0 vault at `dst`.
pub fn q8_0_vault(src: &Path, dst: &Path) {
    convert(src, dst, &q8_0_options(), &mut |_| {}).unwrap();
}
