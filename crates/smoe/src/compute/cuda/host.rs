//! Host buffers the device copies results into: page-locked, so that a
//! download is one DMA instead of the driver staging it through its own
//! buffer (7.9 GB/s for pageable transfers on the H200 machine against 55
//! page-locked), which for a decode step's 608 KB of Qwen3 logits is tens
//! of microseconds of a step of under a millisecond.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

use super::{Gpu, HostPin};
use crate::experts::io::AlignedBuf;

/// Past this many bytes a buffer stays pageable: page-locked memory is
/// taken from the whole machine, and a download that large (every
/// position's logits of a long prompt, for `smoe logits`) is rare enough to
/// pay the staging.
const PIN_MAX: usize = 16 << 20;

/// Idle buffers a [`HostPool`] keeps for the next session, in bytes.
const POOL_MAX: usize = 64 << 20;

/// Memory a [`HostBuf`] holds, page-locked where the driver allowed.
struct Locked {
    mem: Arc<AlignedBuf>,
    // Unlocks before `mem` is freed: the guard holds its own reference.
    pin: Option<HostPin>,
}

/// Buffers of dropped [`HostBuf`]s, for the next to take: locking memory
/// costs the driver milliseconds (a session's first step, 608 KB of
/// logits, prefilled 512 tokens 7% slower on the H100 when each session
/// locked its own), reusing it nothing.
#[derive(Default)]
pub(super) struct HostPool(Mutex<Vec<Locked>>);

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: usize = idle.iter().map(|b| b.mem.len()).sum();
        write!(f, "HostPool({} idle, {bytes} bytes)", idle.len())
    }
}

impl HostPool {
    fn take(&self, bytes: usize) -> Option<Locked> {
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..idle.len())
            .filter(|&i| idle[i].mem.len() >= bytes)
            .min_by_key(|&i| idle[i].mem.len())?;
        Some(idle.swap_remove(best))
    }

    fn give(&self, buf: Locked) {
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = idle.iter().map(|b| b.mem.len()).sum();
        if held + buf.mem.len() <= POOL_MAX {
            idle.push(buf);
        }
    }
}

/// `len` values of `T` in host memory the device can copy into directly,
/// grown (never shrunk) by [`HostBuf::resize`]. Where the driver will not
/// lock memory the buffer is pageable, which is slower but still correct.
/// Dropped, its memory goes back to the GPU's pool.
pub struct HostBuf<T> {
    // Always `Some` but in `drop`.
    mem: Option<Locked>,
    pool: Arc<HostPool>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> Drop for HostBuf<T> {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            self.pool.give(mem);
        }
    }
}

impl<T> std::fmt::Debug for HostBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (bytes, locked) = self
            .mem
            .as_ref()
            .map_or((0, false), |m| (m.mem.len(), m.pin.is_some()));
        write!(
            f,
            "HostBuf({} of {bytes} bytes, {})",
            self.len * size_of::<T>(),
            if locked { "page-locked" } else { "pageable" }
        )
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> HostBuf<T> {
    /// Makes `buf` hold `len` values (their contents unspecified), taking
    /// a larger buffer (from the pool, else allocated and locked) only
    /// when it must grow.
    pub fn resize<'b>(buf: &'b mut Option<Self>, gpu: &Gpu, len: usize) -> &'b mut Self {
        let bytes = len * size_of::<T>();
        if buf.as_ref().is_none_or(|b| b.bytes() < bytes) {
            // Back to the pool first: it may be what the pool hands out
            // next, were it large enough.
            *buf = None;
            let mem = gpu.host_pool.take(bytes).unwrap_or_else(|| {
                let mem = Arc::new(AlignedBuf::new(bytes));
                let pin = (bytes <= PIN_MAX)
                    .then(|| gpu.pin_host(mem.clone()).ok())
                    .flatten();
                Locked { mem, pin }
            });
            *buf = Some(Self {
                mem: Some(mem),
                pool: gpu.host_pool.clone(),
                len,
                _t: PhantomData,
            });
        }
        let b = buf.as_mut().expect("allocated above");
        b.len = len;
        b
    }

    /// Whether `len` values fit without growing.
    pub fn holds(&self, len: usize) -> bool {
        self.bytes() >= len * size_of::<T>()
    }

    /// Whether the driver locked the memory (else it is pageable).
    pub fn locked(&self) -> bool {
        self.mem.as_ref().is_some_and(|m| m.pin.is_some())
    }

    fn bytes(&self) -> usize {
        self.mem.as_ref().map_or(0, |m| m.mem.len())
    }

    fn ptr(&self) -> *const u8 {
        self.mem
            .as_ref()
            .expect("a HostBuf holds memory until dropped")
            .mem
            .as_ptr()
    }

    /// Holds no values (the memory stays for the next [`HostBuf::resize`]).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the buffer is at least `len` values long (`resize`),
        // page-aligned, and zeroed when mapped, which is a valid `T`
        // (`ValidAsZeroBits`); `&self` keeps writers out.
        unsafe { std::slice::from_raw_parts(self.ptr().cast(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`; `&mut self` is the only way to the
        // memory (the lock guard never reads or writes it, and the pool
        // gets it back only when this is dropped).
        unsafe { std::slice::from_raw_parts_mut(self.ptr().cast_mut().cast(), self.len) }
    }
}
