//! Which device a model runs on: `--device cpu|cuda|cuda:N|auto`, and
//! the reason given for the choice in the start-up summary.

use crate::error::{Error, Result};

/// What was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend: the library's default, so that nothing changes
    /// for callers that do not ask.
    #[default]
    Cpu,
    /// GPU `N`; an error when it cannot be used, never a fallback.
    Cuda(usize),
    /// CUDA when this binary has it and GPU 0 works, else the CPU.
    Auto,
}

impl Device {
    pub fn parse(spec: &str) -> Result<Self> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            s if s.starts_with("cuda") => cuda_ordinal(s).map(Device::Cuda),
            _ => Err(Error::invalid(format!(
                "--device {spec}: expected cpu, cuda, cuda:N or auto"
            ))),
        }
    }
}

/// The ordinal of `cuda` or `cuda:N`.
pub(crate) fn cuda_ordinal(spec: &str) -> Result<usize> {
    let bad = || Error::invalid(format!("--device {spec}: expected cuda or cuda:N"));
    match spec.strip_prefix("cuda") {
        Some("") => Ok(0),
        Some(n) => n
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad),
        None => Err(bad()),
    }
}

/// Where a model will run, decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    /// GPU `N`.
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

/// Decides `device`: the placement and a line saying what and why. Asking
/// for CUDA in a binary built without it, or where no usable GPU is, is an
/// `Error::Device` that says which.
pub fn choose(device: Device) -> Result<(Placement, String)> {
    match device {
        Device::Cpu => Ok((Placement::Cpu, "CPU (--device cpu)".into())),
        Device::Cuda(n) => cuda(n, false),
        Device::Auto => cuda(0, true),
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize, auto: bool) -> Result<(Placement, String)> {
    match super::cuda::probe(ordinal) {
        Ok(info) => Ok((Placement::Cuda(ordinal), info.to_string())),
        Err(e) if auto => Ok((Placement::Cpu, format!("CPU (no CUDA: {e})"))),
        Err(e) => Err(e),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize, auto: bool) -> Result<(Placement, String)> {
    if auto {
        return Ok((
            Placement::Cpu,
            "CPU (this binary was built without the cuda feature)".into(),
        ));
    }
    Err(Error::Device(format!(
        "--device cuda:{ordinal}: this binary was built without CUDA \
         (rebuild with `cargo build --release --features cuda`)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("auto").unwrap(), Device::Auto);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:2").unwrap(), Device::Cuda(2));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda2", ""] {
            assert!(Device::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(choose(Device::Cpu).unwrap().0, Placement::Cpu);
    }

    /// Without the feature, asking for CUDA says how to get it, and auto
    /// says why it chose the CPU.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn no_cuda_in_this_build() {
        let e = choose(Device::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("built without CUDA"), "{e}");
        let (p, why) = choose(Device::Auto).unwrap();
        assert_eq!(p, Placement::Cpu);
        assert!(why.contains("without the cuda feature"), "{why}");
    }
}
