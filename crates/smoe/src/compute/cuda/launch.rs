//! Kernel launches through `cuLaunchKernelEx`, so that a launch can carry
//! the programmatic-serialization attribute (programmatic dependent launch,
//! sm_90 on): the driver sets a kernel up while the one before it on the
//! stream is still running, and the kernel's first statement
//! (`grid_wait()` in common.cu) waits for that one's writes. cudarc's
//! launch builder has no launch attributes; with its event tracking off
//! (see `Gpu::new`) it does nothing this module does not.

use std::ffi::c_void;

use cudarc::driver::sys::{
    self, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DriverError,
    LaunchConfig,
};

#[cfg(target_endian = "big")]
compile_error!("kernel arguments are passed in little-endian 8-byte slots");

/// A kernel argument as one 8-byte slot. Every argument smoe's kernels take
/// is a device pointer, a 64-bit integer or a 32-bit integer or float; the
/// driver copies each parameter's own size from the start of its slot, so
/// a 32-bit value sits in the low bytes (little-endian).
pub trait KernelArg {
    fn slot(&self, stream: &CudaStream) -> u64;
}

impl KernelArg for u64 {
    fn slot(&self, _: &CudaStream) -> u64 {
        *self
    }
}

impl KernelArg for i32 {
    fn slot(&self, _: &CudaStream) -> u64 {
        *self as u32 as u64
    }
}

impl KernelArg for u32 {
    fn slot(&self, _: &CudaStream) -> u64 {
        *self as u64
    }
}

impl KernelArg for f32 {
    fn slot(&self, _: &CudaStream) -> u64 {
        self.to_bits() as u64
    }
}

impl<T> KernelArg for CudaSlice<T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for CudaView<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for CudaViewMut<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

/// Queues `f` on `stream` with arguments `slots` (one per kernel
/// parameter, in order); with `programmatic`, as a programmatic dependent
/// of the stream's previous kernel.
///
/// # Safety
/// `slots` must match `f`'s parameters, and the buffers they point to
/// must bound everything the kernel reads and writes for `cfg`.
pub unsafe fn launch<const N: usize>(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    slots: &mut [u64; N],
    programmatic: bool,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let mut params: [*mut c_void; N] =
        std::array::from_fn(|i| &mut slots[i] as *mut u64 as *mut c_void);
    // SAFETY: a plain-data union; the field set is the one the id names.
    let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attr = CUlaunchAttribute {
        id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: programmatic as u32,
    };
    // SAFETY: the caller's contract; `params` and `attr` outlive the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}
