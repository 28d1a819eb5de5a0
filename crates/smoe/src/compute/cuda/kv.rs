//! A sequence's KV cache on the device: per layer one buffer of keys and
//! one of values, position-major as the CPU's ([`crate::compute::KvCache`]
//! holds one of these in place of its host buffers when the model runs on
//! CUDA, and keeps the length and widths itself).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr};

use super::Gpu;
use crate::Result;

/// Keys and values of every layer; latent attention keeps only "keys".
#[derive(Debug, Default)]
pub struct DeviceKv {
    layers: Vec<Layer>,
}

#[derive(Debug, Default)]
struct Layer {
    k: Option<CudaSlice<f32>>,
    v: Option<CudaSlice<f32>>,
    /// Positions the buffers hold.
    cap: usize,
}

impl DeviceKv {
    /// `layers` empty layers; nothing is allocated until the first append.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| Layer::default()).collect(),
        }
    }

    /// Writes `t` positions of keys `k` (`t * k_width`) and values `v`
    /// (`t * v_width`, empty for latent attention) at position `len` of
    /// `layer`, growing its buffers ([`DeviceKv::reserve`]) when they are
    /// full. The kernels take the position from `pos_at` on the device
    /// (holding `len`), so a captured step replays at the next.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        (len, pos_at): (usize, &CudaView<'_, u32>),
        widths: (usize, usize),
        t: usize,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
    ) -> Result<()> {
        let (kw, vw) = widths;
        self.reserve(gpu, layer, len, widths, t)?;
        let Some((mut keys, mut values)) = self.buffers_mut(layer) else {
            return Ok(());
        };
        gpu.kv_write(
            (k, &mut keys, kw),
            values.as_mut().map(|b| (v, b, vw)),
            t,
            (len, pos_at),
        )
    }

    /// Room for `t` positions after the first `len` of `layer`, its
    /// buffers grown (doubling, so a long generation copies each position
    /// a bounded number of times) when they are full.
    pub fn reserve(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        len: usize,
        (kw, vw): (usize, usize),
        t: usize,
    ) -> Result<()> {
        let l = &mut self.layers[layer];
        if len + t > l.cap {
            let cap = (len + t).max(2 * l.cap).max(64);
            l.k = Some(grown(gpu, l.k.take(), len * kw, cap * kw)?);
            if vw > 0 {
                l.v = Some(grown(gpu, l.v.take(), len * vw, cap * vw)?);
            }
            l.cap = cap;
        }
        Ok(())
    }

    /// `layer`'s key buffer and value buffer (none for latent attention)
    /// to write; `None` before [`DeviceKv::reserve`].
    pub fn buffers_mut(
        &mut self,
        layer: usize,
    ) -> Option<(CudaViewMut<'_, f32>, Option<CudaViewMut<'_, f32>>)> {
        let l = &mut self.layers[layer];
        let keys = l.k.as_mut()?.as_view_mut();
        Some((keys, l.v.as_mut().map(|b| b.as_view_mut())))
    }

    /// Keys and values of `layer` (its keys twice for latent attention);
    /// `None` before anything was appended.
    /// Whether `t` positions after the first `len` fit every layer's
    /// buffers without growing them (a layer never appended to has none).
    pub fn fits(&self, len: usize, t: usize) -> bool {
        self.layers
            .iter()
            .all(|l| l.k.is_some() && len + t <= l.cap)
    }

    /// Every layer's key and value buffer addresses (0 for none).
    pub fn addresses(&self, stream: &Arc<CudaStream>) -> Vec<u64> {
        let at = |b: &Option<CudaSlice<f32>>| b.as_ref().map_or(0, |b| b.device_ptr(stream).0);
        self.layers
            .iter()
            .flat_map(|l| [at(&l.k), at(&l.v)])
            .collect()
    }

    pub fn layer(&self, layer: usize) -> Option<(CudaView<'_, f32>, CudaView<'_, f32>)> {
        let l = &self.layers[layer];
        let k = l.k.as_ref()?;
        let v = l.v.as_ref().unwrap_or(k);
        Some((k.as_view(), v.as_view()))
    }
}

/// A buffer of `n` floats holding the first `keep` of `old`.
fn grown(gpu: &Gpu, old: Option<CudaSlice<f32>>, keep: usize, n: usize) -> Result<CudaSlice<f32>> {
    let mut new = gpu.zeros::<f32>(n)?;
    if let Some(old) = old {
        if keep > 0 {
            gpu.copy(&old.slice(..keep), &mut new.slice_mut(..keep))?;
        }
    }
    Ok(new)
}
