//! Finding the CUDA driver and NVRTC at run time, and compiling the kernels.
//!
//! cudarc loads `libcuda` and `libnvrtc` by name on first use and panics
//! when a name does not resolve, so [`libraries`] checks both first and
//! turns a missing one into an error that says what to install. A CUDA
//! toolkit whose `lib64` is not on the loader's path is common (the .run
//! installer does not register it), so NVRTC is also looked for under the
//! usual install prefixes and loaded from there: once loaded, its soname
//! resolves for cudarc's own lookup by name.
//!
//! The kernels are compiled to a cubin for the device's own `sm_XY`, not to
//! PTX: PTX from an NVRTC newer than the driver fails to load
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), while a cubin needs no JIT and
//! loads on any driver of the same major version. NVRTC takes 3-4 s over
//! them on the H200 machine, so the cubin is kept in smoe's cache
//! directory, named by everything it depends on, and compiled again only
//! when one of those changes.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::{driver, nvrtc};

use crate::{Error, Result};

/// The kernels, one NVRTC program: shared helpers first.
const SOURCES: [(&str, &str); 5] = [
    ("common.cu", include_str!("common.cu")),
    ("matmul.cu", include_str!("matmul.cu")),
    ("ops.cu", include_str!("ops.cu")),
    ("route.cu", include_str!("route.cu")),
    ("attention.cu", include_str!("attention.cu")),
];

/// The NVRTC generation the bindings are for (cudarc's `cuda-13000`).
const NVRTC_MAJOR: &str = "13";

/// Where CUDA toolkits put NVRTC when the loader does not know about them.
const NVRTC_DIRS: [&str; 4] = [
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/local/cuda/targets/sbsa-linux/lib",
    "/usr/lib/x86_64-linux-gnu",
];

pub(super) fn device_error(what: impl std::fmt::Display, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("CUDA: {what}: {e:?}"))
}

/// Checks that the driver and NVRTC libraries can be loaded, so that
/// cudarc's loaders (which panic) never see a missing one.
pub(super) fn libraries() -> Result<()> {
    static FOUND: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            // SAFETY: loading the libraries runs their initialisers, which
            // is what using CUDA at all requires.
            if !unsafe { driver::sys::is_culib_present() } {
                return Err(
                    "no CUDA driver: libcuda.so was not found (install the NVIDIA \
                            driver, or run on a machine with an NVIDIA GPU)"
                        .into(),
                );
            }
            if unsafe { nvrtc::sys::is_culib_present() } || preload_nvrtc() {
                Ok(())
            } else {
                Err(format!(
                    "no NVRTC: libnvrtc.so.{} was not found on the loader path nor in {} \
                     (install the CUDA toolkit's NVRTC, or add its lib64 to LD_LIBRARY_PATH)",
                    NVRTC_MAJOR,
                    NVRTC_DIRS.join(", ")
                ))
            }
        })
        .clone()
        .map_err(Error::Device)
}

/// Loads NVRTC (and the builtins library it opens by name when compiling)
/// from a toolkit directory, keeping them loaded for the process.
fn preload_nvrtc() -> bool {
    let major = NVRTC_MAJOR;
    for dir in NVRTC_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let Some(nvrtc) = names.iter().find(|n| **n == format!("libnvrtc.so.{major}")) else {
            continue;
        };
        // The builtins first: NVRTC dlopens them by soname when it compiles.
        let builtins = names
            .iter()
            .filter(|n| n.starts_with(&format!("libnvrtc-builtins.so.{major}")));
        for name in builtins.chain(std::iter::once(nvrtc)) {
            // SAFETY: as in `libraries`; the handle is leaked so the
            // library stays loaded for cudarc's lookup by name.
            match unsafe { libloading::Library::new(format!("{dir}/{name}")) } {
                Ok(lib) => std::mem::forget(lib),
                Err(_) => return false,
            }
        }
        return unsafe { nvrtc::sys::is_culib_present() };
    }
    false
}

/// NVRTC's version, `(major, minor)`.
pub(super) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; the library is loaded (`libraries`).
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| device_error("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// The kernels' cubin for compute capability `cc`: from the disk cache, or
/// compiled; kept for the process.
pub(super) fn cubin(cc: (i32, i32)) -> Result<Arc<Vec<u8>>> {
    type Cubins = HashMap<(i32, i32), Arc<Vec<u8>>>;
    static CUBINS: OnceLock<Mutex<Cubins>> = OnceLock::new();
    let mut cache = CUBINS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(c) = cache.get(&cc) {
        return Ok(c.clone());
    }
    let c = Arc::new(cached_or_compiled(cc)?);
    cache.insert(cc, c.clone());
    Ok(c)
}

/// The one program's source and NVRTC options for compute capability `cc`.
fn program(cc: (i32, i32)) -> (String, Vec<String>) {
    let src = SOURCES
        .iter()
        .map(|(name, text)| format!("// ---- {name}\n{text}\n"))
        .collect();
    let options = [
        format!("--gpu-architecture=sm_{}{}", cc.0, cc.1),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ];
    (src, options.into())
}

/// The cubin a run before this one compiled from the same source with the
/// same options and NVRTC, else compiled now and stored for the next run.
/// The cache is best effort: one that cannot be read or written costs the
/// compile, a damaged file fails its checksum and is replaced.
fn cached_or_compiled(cc: (i32, i32)) -> Result<Vec<u8>> {
    let (src, options) = program(cc);
    let path = match crate::paths::cache_dir() {
        Some(dir) => {
            Some(
                dir.join("kernels")
                    .join(cubin_name(cc, nvrtc_version()?, &src, &options)),
            )
        }
        None => None,
    };
    if let Some(cubin) = path.as_deref().and_then(read_cubin) {
        return Ok(cubin);
    }
    let cubin = compile(&src, &options)?;
    if let Some(path) = &path {
        let _ = write_cubin(path, &cubin);
    }
    Ok(cubin)
}

/// A file name that changes with anything the cubin depends on: the
/// architecture, NVRTC's version, the options and the source.
fn cubin_name(cc: (i32, i32), nvrtc: (i32, i32), src: &str, options: &[String]) -> String {
    let mut crc = crc32fast::Hasher::new();
    for part in std::iter::once(src).chain(options.iter().map(String::as_str)) {
        crc.update(&(part.len() as u64).to_le_bytes());
        crc.update(part.as_bytes());
    }
    format!(
        "smoe-sm_{}{}-nvrtc{}.{}-{:08x}.cubin",
        cc.0,
        cc.1,
        nvrtc.0,
        nvrtc.1,
        crc.finalize()
    )
}

/// The cubin stored in `path`, when its trailing CRC32 matches.
fn read_cubin(path: &Path) -> Option<Vec<u8>> {
    let mut bytes = std::fs::read(path).ok()?;
    let n = bytes.len().checked_sub(4).filter(|&n| n > 0)?;
    let crc = u32::from_le_bytes(bytes[n..].try_into().ok()?);
    bytes.truncate(n);
    (crc32fast::hash(&bytes) == crc).then_some(bytes)
}

/// Stores `cubin` and its CRC32 in `path`, through a temporary file renamed
/// into place so that a concurrent start never reads half of one.
fn write_cubin(path: &Path, cubin: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = PathBuf::from(path);
    tmp.set_extension(format!("tmp{}", std::process::id()));
    let mut data = Vec::with_capacity(cubin.len() + 4);
    data.extend_from_slice(cubin);
    data.extend_from_slice(&crc32fast::hash(cubin).to_le_bytes());
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

fn compile(src: &str, options: &[String]) -> Result<Vec<u8>> {
    let src = CString::new(src).map_err(|e| device_error("kernel source", e))?;
    let prog = nvrtc::result::create_program(&src, Some(c"smoe.cu"))
        .map_err(|e| device_error("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` is a live program until the destroy below, and `src`
    // outlives it.
    let out = unsafe {
        let compiled = nvrtc::result::compile_program(prog, options);
        let log = nvrtc::result::get_program_log(prog)
            .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(Error::Device(format!(
                "CUDA: compiling the kernels ({}) failed ({e:?}):\n{log}",
                options.join(" ")
            ))),
            Ok(()) => get_cubin(prog),
        };
        let _ = nvrtc::result::destroy_program(prog);
        out
    };
    out
}

/// # Safety
/// `prog` was compiled successfully and is not destroyed yet.
unsafe fn get_cubin(prog: nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .map_err(|e| device_error("nvrtcGetCUBINSize", e))?;
    let mut cubin = vec![0u8; size];
    nvrtc::sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
        .result()
        .map_err(|e| device_error("nvrtcGetCUBIN", e))?;
    Ok(cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cubin_name_follows_source_options_and_nvrtc() {
        let (src, opts) = program((9, 0));
        let name = cubin_name((9, 0), (13, 0), &src, &opts);
        assert!(name.starts_with("smoe-sm_90-nvrtc13.0-"), "{name}");
        assert_eq!(name, cubin_name((9, 0), (13, 0), &src, &opts));
        let (_, opts89) = program((8, 9));
        for other in [
            cubin_name((9, 0), (13, 1), &src, &opts),
            cubin_name((9, 0), (13, 0), &format!("{src} "), &opts),
            cubin_name((8, 9), (13, 0), &src, &opts89),
        ] {
            assert_ne!(name, other);
        }
    }

    /// The kernels compile for the oldest and the newest architecture path
    /// (Turing's f32 tile, Hopper's tensor cores) wherever NVRTC loads,
    /// GPU or not: pip's `nvidia-cuda-nvrtc` wheel on LD_LIBRARY_PATH is
    /// enough, so a kernel edit is checked before a GPU machine is.
    #[test]
    fn the_kernels_compile_where_nvrtc_is() {
        // SAFETY: as in `libraries`.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            eprintln!("SKIPPED: no libnvrtc.so.{NVRTC_MAJOR} on the loader path");
            return;
        }
        for cc in [(7, 5), (9, 0)] {
            let (src, opts) = program(cc);
            let cubin = compile(&src, &opts).unwrap_or_else(|e| panic!("sm_{}{}: {e}", cc.0, cc.1));
            assert!(cubin.len() > 1000);
        }
    }

    #[test]
    fn a_stored_cubin_reads_back_and_a_damaged_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernels").join("x.cubin");
        let cubin: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        write_cubin(&path, &cubin).unwrap();
        assert_eq!(read_cubin(&path).as_deref(), Some(&cubin[..]));
        // No temporary file left beside it.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_cubin(&path), None);
        for len in [0, 3, 4] {
            std::fs::write(&path, &bytes[..len]).unwrap();
            assert_eq!(read_cubin(&path), None, "{len} bytes");
        }
        assert_eq!(read_cubin(&dir.path().join("missing")), None);
    }
}
