//! The KV cache as the CPU backend keeps it: one growable f32 buffer of
//! keys and one of values per layer; on CUDA, device buffers instead
//! (`cuda::DeviceKv`), with the length and widths kept here all the same.

/// Keys and values of every layer for positions `0..len`, position-major:
/// `k_width` and `v_width` floats per position (multi-head latent
/// attention keeps only its latent, as "keys" with no separate values).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    k_width: usize,
    v_width: usize,
    len: usize,
    /// The device's buffers, when the model runs on CUDA: then `layers`
    /// stay empty.
    #[cfg(feature = "cuda")]
    device: Option<super::cuda::DeviceKv>,
}

impl KvCache {
    pub fn new(n_layers: usize, k_width: usize, v_width: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| Default::default()).collect(),
            k_width,
            v_width,
            len: 0,
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    /// An empty cache kept on the device.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_device(n_layers: usize, k_width: usize, v_width: usize) -> Self {
        Self {
            layers: Vec::new(),
            k_width,
            v_width,
            len: 0,
            device: Some(super::cuda::DeviceKv::new(n_layers)),
        }
    }

    /// Whether the cache is on the device (and so not for the CPU).
    #[cfg(feature = "cuda")]
    pub(crate) fn is_on_device(&self) -> bool {
        self.device.is_some()
    }

    /// The device's buffers and `(k_width, v_width)`, if the cache is on
    /// the device.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_mut(&mut self) -> Option<(&mut super::cuda::DeviceKv, (usize, usize))> {
        let widths = (self.k_width, self.v_width);
        self.device.as_mut().map(|d| (d, widths))
    }

    /// Whether `t` more positions fit the device's buffers of every layer
    /// as they are (no growth, which a captured graph cannot hold).
    #[cfg(feature = "cuda")]
    pub(crate) fn device_fits(&self, t: usize) -> bool {
        self.device.as_ref().is_some_and(|d| d.fits(self.len, t))
    }

    /// The device buffers' addresses, layer by layer (empty off the
    /// device): a captured step holds them.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_addresses(
        &self,
        stream: &std::sync::Arc<super::cuda::CudaStream>,
    ) -> Vec<u64> {
        self.device
            .as_ref()
            .map_or_else(Vec::new, |d| d.addresses(stream))
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on, so a conversation that shares a
    /// prefix with the cached one prefills only what is new.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for (k, v) in &mut self.layers {
            k.truncate(self.len * self.k_width);
            v.truncate(self.len * self.v_width);
        }
    }

    /// Makes room for `extra` more positions in every layer at once. A
    /// device cache grows in its appends instead, where a failed
    /// allocation can be reported.
    pub fn reserve(&mut self, extra: usize) {
        let (kw, vw) = (self.k_width, self.v_width);
        for (k, v) in &mut self.layers {
            k.reserve(((self.len + extra) * kw).saturating_sub(k.len()));
            v.reserve(((self.len + extra) * vw).saturating_sub(v.len()));
        }
    }

    /// Appends `t` positions to one layer; `advance` commits them once every
    /// layer has.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (kc, vc) = &mut self.layers[layer];
        kc.truncate(self.len * self.k_width);
        vc.truncate(self.len * self.v_width);
        kc.extend_from_slice(k);
        vc.extend_from_slice(v);
    }

    /// Keys and values of `layer`; latent attention's values are read
    /// from its keys (the latent).
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        if self.v_width == 0 {
            (k, k)
        } else {
            (k, v)
        }
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
