//! The CUDA device: finding a usable GPU ([`probe`]), its context and
//! streams ([`Gpu`]), device buffers, and the kernels that a CUDA
//! [`Backend`](super::Backend) will be built from, each one a method on
//! [`Gpu`] that computes what the CPU backend computes (the tests in
//! `tests/cuda.rs` hold them to it).
//!
//! Built only with the `cuda` feature. cudarc loads `libcuda` and
//! `libnvrtc` at run time (`dynamic-loading`), so the feature builds on a
//! machine without CUDA and the same binary runs with or without a GPU:
//! [`probe`] says which GPU would be used, or why none can be, which is
//! what `--device auto` needs to fall back to the CPU. The bindings are
//! cudarc's for CUDA 13.0 (`cuda-13000`), the oldest 13.x: the entry points
//! used here are all in driver 580, the first CUDA 13 driver, and in every
//! 12.x driver too; newer driver calls are never named, so nothing fails to
//! resolve at run time on a 13.0 driver.
//!
//! The kernels are CUDA C (`*.cu` beside this file), compiled by NVRTC
//! for the device's architecture when the first [`Gpu`] is made (see
//! `load.rs`). Activations are row-major f32 device buffers; weights are
//! [`GpuMatrix`] uploads of the stored rows, quantized blocks included.

mod host;
mod kv;
mod launch;
mod load;

pub use host::HostBuf;
pub use kv::DeviceKv;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    self, CudaContext, CudaEvent, CudaFunction, CudaModule, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, ValidAsZeroBits,
};
pub use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};

use super::profile::{self, Op};
use super::{AttnShape, Matrix, MlaShape};
use crate::config::{Routing, Scoring};
use crate::experts::io::AlignedBuf;
use crate::memory::human_bytes;
use crate::quant::{DType, QuantType};
use crate::{Error, Result};
use load::device_error;

/// Queues kernel `$name` on `$gpu`'s compute stream with `$arg`s.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name = $name;
        let timing = $gpu.time_start()?;
        let f = $gpu.function(&name)?;
        let mut slots = [$(launch::KernelArg::slot(&*$arg, &$gpu.compute)),+];
        // SAFETY: every caller checks its buffers against the shapes it
        // passes, which bound what the kernel reads and writes.
        unsafe { launch::launch(&$gpu.compute, &f, $cfg, &mut slots, $gpu.programmatic) }
            .map_err(|e| device_error(format!("launching {name}"), e))?;
        $gpu.time_end(timing, &name)
    }};
}

/// Tokens up to which [`Gpu::matmul`] runs the matrix-vector kernel (one
/// weight pass for all of them); more take the tiled kernel.
/// `MV_TOKENS` in `matmul.cu`.
pub const MATVEC_MAX_TOKENS: usize = 8;
/// Output rows per matrix-vector block (`MV_ROWS`), and the tiled
/// kernel's square tile (`TILE`).
const MV_ROWS: u32 = 4;
const TILE: u32 = 64;
/// Warps of an int8-activation kernel's block (`MQ_WARPS` in `matmul.cu`)
/// and the units (32 weights each) a lane loads at once (`MQ_UNROLL`;
/// see [`q8_lanes`]).
const MQ_WARPS: u32 = 4;
const MQ_UNROLL: usize = 2;
/// Most pairs a token `mmvq_id_sum` takes (`SUM_MAX_K`).
const SUM_MAX_K: usize = 32;
/// Most experts and groups the routing kernel takes (`ROUTE_MAX`,
/// `ROUTE_MAX_GROUPS`).
const ROUTE_MAX: usize = 1024;
const ROUTE_MAX_GROUPS: usize = 64;
/// Widest query/key head and value head of the attention kernel
/// (`ATT_MAX_HEAD`, `ATT_MAX_V`), and its warps per block (`ATT_WARPS`).
const ATT_MAX_HEAD: usize = 1024;
const ATT_MAX_V: usize = 512;
const ATT_THREADS: u32 = 8 * 32;
/// Query rows and threads of a block of the tiled prompt kernel
/// (`attention_rows`: `PR_ROWS`, `PR_WARPS`).
const PR_ROWS: usize = 16;
const PR_THREADS: u32 = 4 * 32;
/// Split attention: blocks wanted per SM, and the fewest keys a split
/// takes (eight per warp).
const ATT_BLOCKS_PER_SM: usize = 4;
const ATT_MIN_SPLIT: usize = 64;
/// Decode attention by KV group (`attention_group4/8/16`, named by the
/// most query heads a KV head they take): most splits of the keys, fewest
/// keys a split (`GQA_MAX_SPLITS`, `GQA_MIN_KEYS`); heads and values at
/// most 128 wide.
const GQA_MAX_GROUP: usize = 16;
const GQA_MAX_SPLITS: usize = 64;
const GQA_MIN_KEYS: usize = 32;

/// A usable GPU, as [`probe`] found it.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`: `(9, 0)` for H100 and H200.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub free_memory: usize,
    /// The CUDA version the driver supports, and NVRTC's.
    pub driver_version: (i32, i32),
    pub nvrtc_version: (i32, i32),
    /// Streaming multiprocessors: how many blocks a launch needs to fill
    /// the device.
    pub sm_count: usize,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const GIB: f64 = (1u64 << 30) as f64;
        let (cc, drv, rtc) = (
            self.compute_capability,
            self.driver_version,
            self.nvrtc_version,
        );
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {:.1} GiB, {:.1} GiB free; driver CUDA {}.{}, NVRTC {}.{})",
            self.ordinal,
            self.name,
            cc.0,
            cc.1,
            self.total_memory as f64 / GIB,
            self.free_memory as f64 / GIB,
            drv.0,
            drv.1,
            rtc.0,
            rtc.1
        )
    }
}

/// The device ordinal of a `--device` value: `cuda` is `cuda:0`.
pub fn parse_device(spec: &str) -> Result<usize> {
    super::device::cuda_ordinal(spec)
}

/// GPU `ordinal`, if it can run smoe's kernels; otherwise an error that
/// says why not (no driver, no NVRTC, no such device, too old), never a
/// panic.
pub fn probe(ordinal: usize) -> Result<GpuInfo> {
    probe_context(ordinal).map(|(info, _)| info)
}

/// Lets the device's default memory pool keep freed memory for the next
/// stream-ordered allocation: by default it gives all of it back to the
/// system at every synchronisation, and a streamed layer, which waits for
/// the device once a layer, would map fresh memory for its buffers each
/// time. [`Gpu::memory`] trims the pool before it counts free memory.
/// Where the device has no such pool nothing changes.
fn keep_freed_memory(ctx: &CudaContext) {
    let mut keep = u64::MAX;
    // SAFETY: the context's own device; the threshold attribute takes a
    // u64, which `keep` is.
    unsafe {
        if let Ok(pool) = driver::result::device::get_default_mem_pool(ctx.cu_device()) {
            let _ = driver::result::mem_pool::set_attribute(
                pool,
                driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            );
        }
    }
}

fn probe_context(ordinal: usize) -> Result<(GpuInfo, Arc<CudaContext>)> {
    load::libraries()?;
    driver::result::init().map_err(|e| device_error("the driver did not initialise", e))?;
    let count = CudaContext::device_count().map_err(|e| device_error("counting devices", e))?;
    if ordinal >= count as usize {
        return Err(Error::Device(format!(
            "CUDA: no device cuda:{ordinal}: the driver sees {count}"
        )));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| device_error(format!("creating a context on cuda:{ordinal}"), e))?;
    let what = |e| device_error(format!("querying cuda:{ordinal}"), e);
    let compute_capability = ctx.compute_capability().map_err(what)?;
    let (free_memory, total_memory) = ctx.mem_get_info().map_err(what)?;
    let mut driver = 0;
    // SAFETY: an out-parameter; the driver is initialised.
    unsafe { driver::sys::cuDriverGetVersion(&mut driver) }
        .result()
        .map_err(what)?;
    let info = GpuInfo {
        ordinal,
        name: ctx.name().map_err(what)?,
        compute_capability,
        total_memory,
        free_memory,
        driver_version: (driver / 1000, driver % 1000 / 10),
        nvrtc_version: load::nvrtc_version()?,
        sm_count: ctx
            .attribute(driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(what)?
            .max(1) as usize,
    };
    // NVRTC 13 builds for Turing (7.5) and newer only.
    if compute_capability < (7, 5) {
        return Err(Error::Device(format!(
            "CUDA: {info}: compute capability {}.{} is older than 7.5, the oldest NVRTC 13 builds for",
            compute_capability.0, compute_capability.1
        )));
    }
    Ok((info, ctx))
}

/// Where each of a layer's experts' matrices of one kind (gate, up or
/// down) starts on the device, for the kernels that run every chosen
/// expert in one launch ([`Gpu::swiglu_id`], [`Gpu::matvec_id`]). The
/// experts share type and shape. It holds raw addresses: whoever owns it
/// keeps the matrices alive as long as it (the decoder keeps both in the
/// same layer).
#[derive(Debug)]
pub struct ExpertTable {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    ptrs: CudaSlice<u64>,
}

/// Activations rounded to int8 per 32-block by the norm that wrote them
/// ([`Gpu::norm_rows_rounded`]): the values and their `(d, d * sum)` pairs,
/// locked while held.
pub type Rounded<'a> = std::sync::MutexGuard<'a, Option<(CudaSlice<u8>, CudaSlice<f32>)>>;

/// A layer's cache writes that [`Gpu::qk_norm_rope`] makes in the same
/// launch, as [`Gpu::kv_write`] would: the step's values `v` (`t` rows),
/// the layer's key and value buffers, and the position to write at, on
/// the host (for the bounds) and on the device (for the kernel, so that a
/// captured step replays at the next).
pub struct KvTarget<'a> {
    pub v: CudaView<'a, f32>,
    pub keys: CudaViewMut<'a, f32>,
    pub values: CudaViewMut<'a, f32>,
    pub pos: usize,
    pub pos_at: CudaView<'a, u32>,
}

/// A weight matrix on the device, rows as stored (quantized blocks stay
/// quantized).
#[derive(Debug)]
pub struct GpuMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    data: CudaSlice<u8>,
}

impl GpuMatrix {
    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

/// Host memory page-locked by [`Gpu::pin_host`]; unlocked on drop, and
/// kept allocated until then.
pub struct HostPin {
    ptr: *mut std::ffi::c_void,
    ctx: Arc<CudaContext>,
    _mem: Arc<AlignedBuf>,
}

// SAFETY: the pointer only names the registration; the memory is owned by
// `_mem`, which is Send and Sync.
unsafe impl Send for HostPin {}
unsafe impl Sync for HostPin {}

impl std::fmt::Debug for HostPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostPin({} bytes)", self._mem.len())
    }
}

impl Drop for HostPin {
    fn drop(&mut self) {
        // Nothing to do about a failure here: the memory is freed next
        // either way, and the driver forgets the range with the context.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: registered by `pin_host` with this pointer.
            unsafe { driver::sys::cuMemHostUnregister(self.ptr) };
        }
    }
}

/// One GPU: its context, a compute stream, a copy stream for uploads that
/// overlap compute, and the kernels loaded for it.
#[derive(Debug)]
pub struct Gpu {
    info: GpuInfo,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    /// Whether q6_k matrix-vector products stage their rows through shared
    /// memory (`mmvq_q6_k_staged`): on unless `SMOE_CUDA_STAGED=0` (so
    /// that one binary measures both).
    staged_q6k: bool,
    /// Whether [`Gpu::upload_experts`] copies a decode step's experts in
    /// one driver call: on CUDA 13 drivers unless `SMOE_COPY_BATCH=0`,
    /// which copies matrix by matrix (so that one binary measures both).
    batch_copies: bool,
    /// Recorded on the compute stream for the copy stream to wait on
    /// ([`Gpu::upload_experts`]).
    computed: CudaEvent,
    module: Arc<CudaModule>,
    /// Kernels by name, looked up in the module once: a lookup costs a
    /// driver call, about as much as the launch itself.
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Whether kernels launch as programmatic dependents of the one before
    /// ([`launch::launch`]): on sm_90 and later unless `SMOE_CUDA_PDL=0`.
    programmatic: bool,
    /// Launches timed but not yet read back, when profiling
    /// ([`super::profile::enable`] before the GPU was opened).
    timed: Option<Mutex<Vec<Timed>>>,
    /// Split attention's partial results and its counters of finished
    /// splits per (head, token) ([`Gpu::attention`]), grown to the largest
    /// call; every use is on the compute stream, in order.
    attn_parts: Mutex<Option<(CudaSlice<f32>, CudaSlice<u32>)>>,
    /// Counts of finished blocks for the kernels whose last block to
    /// finish does the rest (`router_route` routes, `mmvq_swiglu_id`
    /// rounds): each kernel leaves them at zero, and kernels use them one
    /// after another (the compute stream's order).
    done: Mutex<Option<CudaSlice<u32>>>,
    /// [`Gpu::argmax_rows`]' picks of each part of a row.
    argmax_parts: Mutex<Option<CudaSlice<u32>>>,
    /// Page-locked host buffers no [`HostBuf`] holds now.
    host_pool: Arc<host::HostPool>,
    /// [`Gpu::matmul_q8`]'s rounded activations and their block scales.
    q8: Mutex<Option<(CudaSlice<u8>, CudaSlice<f32>)>>,
    /// The rows a norm rounded as it wrote them ([`Gpu::norm_rows_rounded`]),
    /// apart from `q8` so that other products may round theirs meanwhile.
    rounded: Mutex<Option<(CudaSlice<u8>, CudaSlice<f32>)>>,
    /// [`Gpu::matmul`] and the id kernels take the int8-activation kernels
    /// where they apply: on unless `SMOE_CUDA_MMVQ=0` or
    /// [`Gpu::set_int8_activations`] say otherwise (so that one binary
    /// measures both; the float kernels stay for the exact product).
    mmvq: std::sync::atomic::AtomicBool,
    /// Lanes per row of the int8 kernels when set (8, 16 or 32), else
    /// chosen per call by [`q8_lanes`]; `cuda_bench` sets it to time each.
    q8_lanes: std::sync::atomic::AtomicU32,
    /// The last graph captured by [`Gpu::captured`] in each slot (a step's
    /// part), instantiated: the next capture of the slot updates it in
    /// place.
    graphs: Mutex<Vec<Option<GraphExec>>>,
    /// While [`Gpu::captured`] records: anything that would allocate,
    /// copy to or from the host or wait is refused instead (in a graph it
    /// would not run when the caller thinks it does).
    capturing: std::sync::atomic::AtomicBool,
    /// The tiled products of q4_k and q6_k rows on int8 activations
    /// (`mmq`, as llama.cpp's prefill rounds them) instead of widened
    /// weights in 3xTF32: 4.7x the rate on the H200 (36.1 against 7.7
    /// TFLOP/s, 512 tokens through [768, 2048]). Off with `SMOE_CUDA_MMQ=0`
    /// or [`Gpu::set_int8_tiles`].
    mmq: std::sync::atomic::AtomicBool,
    /// The tiled products' 3xTF32 (f32 accuracy); off, one TF32 product
    /// (`SMOE_CUDA_TF32=1` or [`Gpu::set_exact_gemm`], to measure both).
    exact_gemm: std::sync::atomic::AtomicBool,
    /// Captures that fell back to running eagerly; past
    /// [`GRAPH_FALLBACKS`] no more are tried.
    graph_fallbacks: std::sync::atomic::AtomicU32,
    /// Device allocations made so far that a captured graph may hold:
    /// it holds the addresses of the buffers it was captured with, so it
    /// is replayed only while this count is the one it was captured at.
    /// Streamed experts' matrices and the tables of their addresses,
    /// made as a layer runs and read only by launches made then, are not
    /// counted: a streamed layer makes some every step, which made every
    /// stretch of a streamed step look stale (66 recorded, none replayed).
    allocations: std::sync::atomic::AtomicU64,
    /// Streamed experts' device matrices given back after use
    /// ([`Gpu::recycle`]), for [`Gpu::upload_experts`] to copy the next
    /// experts of the same shape into instead of allocating (a decode step
    /// of Qwen3-30B-A3B with its experts in RAM would otherwise allocate
    /// and free 24 matrices a layer).
    spare: Mutex<Vec<GpuMatrix>>,
    /// A split tiled product's partial sums ([`Gpu::gemm_splits`]), grown
    /// to the largest call; every use is on the compute stream, in order.
    split_parts: Mutex<Option<CudaSlice<f32>>>,
}

/// Most matrices [`Gpu::recycle`] keeps: a decode step's experts of a
/// layer several times over (each of Qwen3-30B-A3B's is 0.9 MB), not a
/// prompt's every expert of a layer, which would hold that much VRAM for
/// good.
const MAX_SPARE: usize = 96;

/// Most experts whose copies [`Gpu::upload_experts`] makes in one driver
/// call (a decode step's share of a layer); more go one by one.
const UPLOAD_BATCH: usize = 8;

/// Most bytes those matrices hold: a count alone would keep 0.8 GB of
/// DeepSeek-V3's 8.3 MB matrices; 256 MiB still holds a decode step's
/// layer of them (24), and is an eighth of the 2 GiB or more that
/// `--vram-budget auto` leaves free for KV caches and activations
/// ([`crate::memory::vram_headroom`]).
const MAX_SPARE_BYTES: usize = 256 << 20;

/// An instantiated CUDA graph, destroyed on drop.
#[derive(Debug)]
struct GraphExec(cudarc::driver::sys::CUgraphExec);

// SAFETY: a graph exec is a driver handle, usable from any thread that has
// the context current (every use binds it); the Mutex serialises uses.
unsafe impl Send for GraphExec {}

impl Drop for GraphExec {
    fn drop(&mut self) {
        // SAFETY: the handle came from instantiation and is dropped once.
        // Nothing to do about a failure: the memory goes with the context.
        let _ = unsafe { cudarc::driver::result::graph::exec_destroy(self.0) };
    }
}

/// Captures [`Gpu::captured`] lets fall back before it stops trying: each
/// costs the step's launches twice. A decode has a few (the KV cache or
/// the split attention's scratch growing mid-step).
const GRAPH_FALLBACKS: u32 = 16;

/// One profiled launch: events on the compute stream before and after it,
/// and the host's time in the launch call.
#[derive(Debug)]
struct Timed {
    name: String,
    start: CudaEvent,
    end: CudaEvent,
    launch_s: f64,
}

/// Profiled launches kept before their events are read back at the latest
/// (each holds two driver events).
const MAX_TIMED: usize = 4096;

impl Gpu {
    /// Opens GPU `ordinal` and loads the kernels, compiling them on the
    /// first call for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        let (info, ctx) = probe_context(ordinal)?;
        // SAFETY: cudarc's event tracking records an event on every buffer
        // a launch or copy touches, so that another stream waits for it;
        // it costs host time on every launch. Here every kernel, copy,
        // allocation and free runs on the compute stream, in call order,
        // which already orders each buffer's writes, reads and free. The
        // copy stream is used only by `upload_experts`, which orders it
        // against compute itself.
        // Called before any buffer is made, so none is tracked.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx);
        let programmatic = info.compute_capability.0 >= 9
            && std::env::var_os("SMOE_CUDA_PDL").is_none_or(|v| v != "0");
        let cubin = load::cubin(info.compute_capability)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| device_error("loading the kernels", e))?;
        let stream = |what| {
            ctx.new_stream()
                .map_err(|e| device_error(format!("creating the {what} stream"), e))
        };
        Ok(Self {
            compute: stream("compute")?,
            copy: stream("copy")?,
            staged_q6k: std::env::var_os("SMOE_CUDA_STAGED").is_none_or(|v| v != "0"),
            batch_copies: info.driver_version.0 >= 13
                && std::env::var_os("SMOE_COPY_BATCH").is_none_or(|v| v != "0"),
            computed: ctx
                .new_event(None)
                .map_err(|e| device_error("creating an event", e))?,
            info,
            module,
            functions: Mutex::default(),
            programmatic,
            timed: profile::enabled().then(Mutex::default),
            attn_parts: Mutex::default(),
            done: Mutex::default(),
            argmax_parts: Mutex::default(),
            host_pool: Arc::default(),
            q8: Mutex::default(),
            rounded: Mutex::default(),
            mmvq: std::env::var_os("SMOE_CUDA_MMVQ")
                .is_none_or(|v| v != "0")
                .into(),
            q8_lanes: 0.into(),
            graphs: Mutex::default(),
            mmq: std::env::var_os("SMOE_CUDA_MMQ")
                .is_none_or(|v| v != "0")
                .into(),
            exact_gemm: std::env::var_os("SMOE_CUDA_TF32")
                .is_none_or(|v| v != "1")
                .into(),
            capturing: false.into(),
            allocations: 0.into(),
            spare: Mutex::default(),
            split_parts: Mutex::default(),
            // SMOE_CUDA_GRAPH=0 runs every step eagerly (to measure both).
            graph_fallbacks: if std::env::var_os("SMOE_CUDA_GRAPH").is_some_and(|v| v == "0") {
                GRAPH_FALLBACKS
            } else {
                0
            }
            .into(),
        })
    }

    /// When profiling, an event recorded before a launch and the host
    /// clock.
    fn time_start(&self) -> Result<Option<(CudaEvent, std::time::Instant)>> {
        if self.timed.is_none() {
            return Ok(None);
        }
        Ok(Some((self.timing_event()?, std::time::Instant::now())))
    }

    /// A timing event recorded on the compute stream now.
    fn timing_event(&self) -> Result<CudaEvent> {
        self.compute
            .record_event(Some(driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| device_error("recording a profiling event", e))
    }

    /// Closes what [`Gpu::time_start`] opened with an event after the
    /// launch; read back at the next download (which waits for the stream
    /// anyway) or when too many are pending.
    fn time_end(&self, started: Option<(CudaEvent, std::time::Instant)>, name: &str) -> Result<()> {
        let (Some((start, at)), Some(timed)) = (started, &self.timed) else {
            return Ok(());
        };
        let launch_s = at.elapsed().as_secs_f64();
        let end = self.timing_event()?;
        let full = {
            let mut t = timed.lock().unwrap_or_else(|e| e.into_inner());
            t.push(Timed {
                name: name.to_owned(),
                start,
                end,
                launch_s,
            });
            t.len() >= MAX_TIMED
        };
        if full {
            self.read_timings()
        } else {
            Ok(())
        }
    }

    /// Waits for the profiled launches still pending and adds their times
    /// to [`super::profile::KernelTimes`].
    fn read_timings(&self) -> Result<()> {
        let Some(timed) = &self.timed else {
            return Ok(());
        };
        let done = std::mem::take(&mut *timed.lock().unwrap_or_else(|e| e.into_inner()));
        for t in done {
            let ms = t
                .start
                .elapsed_ms(&t.end)
                .map_err(|e| device_error(format!("timing {}", t.name), e))?;
            profile::record_kernel(&t.name, f64::from(ms) * 1e-3, t.launch_s);
        }
        Ok(())
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Free and total device memory now, in bytes, counting what the
    /// driver's pool holds of freed buffers as free ([`keep_freed_memory`]).
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.synchronize()?;
        // SAFETY: the device's own default pool; trimming releases only
        // memory no allocation holds.
        unsafe {
            if let Ok(pool) =
                driver::result::device::get_default_mem_pool(self.compute.context().cu_device())
            {
                let _ = driver::result::mem_pool::trim_to(pool, 0);
            }
        }
        self.compute
            .context()
            .mem_get_info()
            .map_err(|e| device_error("querying free memory", e))
    }

    /// The stream every kernel runs on, in call order.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    /// Waits for everything queued on both streams.
    /// Refuses `what` while a step is being captured ([`Gpu::captured`]):
    /// also before dropping a buffer to grow it, as a free in a capture
    /// would be recorded, not done.
    pub(crate) fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::invalid(format!(
                "CUDA: {what} while a step is captured as a graph"
            )));
        }
        Ok(())
    }

    /// Whether [`Gpu::captured`] will try: not when profiling (the events
    /// between launches), nor after too many fallbacks, nor with
    /// `SMOE_CUDA_GRAPH=0`.
    pub fn graphs(&self) -> bool {
        self.timed.is_none()
            && self
                .graph_fallbacks
                .load(std::sync::atomic::Ordering::Relaxed)
                < GRAPH_FALLBACKS
    }

    /// Runs `step`'s launches as one CUDA graph: recorded on the compute
    /// stream (nothing runs while it records), then the graph last
    /// captured in `slot` updated in place with them where the two have
    /// the same shape (kernels and their order; arguments and grids may
    /// differ), else instantiated anew, and launched. A decode step is
    /// ~200 small kernels whose launches, one by one, left the GPU idle
    /// between them; a caller that captures a step in parts (slots) lets
    /// the GPU run one part while the next is recorded.
    ///
    /// `Ok(false)` when `step` failed or did something a graph cannot hold
    /// (an allocation, a host copy, a wait: refused while recording) or
    /// the driver refused the graph: then nothing of it ran, and the caller
    /// runs the step again eagerly (and a real error shows there).
    pub fn captured(&self, slot: usize, step: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
        use cudarc::driver::{result, sys};
        use std::sync::atomic::Ordering::Relaxed;
        let stream = self.compute.cu_stream();
        self.compute
            .context()
            .bind_to_thread()
            .map_err(|e| device_error("binding the context", e))?;
        // SAFETY: the stream is this device's, alive as long as self.
        unsafe {
            result::stream::begin_capture(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| device_error("starting a graph capture", e))?;
        self.capturing.store(true, Relaxed);
        let ran = step();
        self.capturing.store(false, Relaxed);
        // SAFETY: as above; capture was begun on this stream.
        let graph = unsafe { result::stream::end_capture(stream) };
        let graph = match (ran, graph) {
            (Ok(()), Ok(g)) if !g.is_null() => g,
            (_, graph) => {
                if let Some(g) = graph.ok().filter(|g| !g.is_null()) {
                    // SAFETY: a graph the capture returned, not used again.
                    let _ = unsafe { result::graph::destroy(g) };
                }
                self.graph_fallbacks.fetch_add(1, Relaxed);
                return Ok(false);
            }
        };
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        if graphs.len() <= slot {
            graphs.resize_with(slot + 1, || None);
        }
        let slot = &mut graphs[slot];
        let updated = slot.take().filter(|exec| {
            let mut info = std::mem::MaybeUninit::<sys::CUgraphExecUpdateResultInfo>::zeroed();
            // SAFETY: both handles are live; info is written by the call.
            let r = unsafe { sys::cuGraphExecUpdate_v2(exec.0, graph, info.as_mut_ptr()) };
            r == sys::CUresult::CUDA_SUCCESS
        });
        let exec = match updated {
            Some(exec) => Ok(exec),
            // SAFETY: a complete graph from the capture.
            None => unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
                .map(GraphExec),
        };
        // SAFETY: the exec holds what it needs of the graph.
        let _ = unsafe { result::graph::destroy(graph) };
        let Ok(exec) = exec else {
            self.graph_fallbacks.fetch_add(1, Relaxed);
            return Ok(false);
        };
        // SAFETY: a live exec on this device's stream.
        unsafe { result::graph::launch(exec.0, stream) }
            .map_err(|e| device_error("launching a captured step", e))?;
        *slot = Some(exec);
        Ok(true)
    }

    fn allocated(&self) {
        self.allocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Device allocations made so far ([`Gpu::replay`]'s validity).
    pub fn allocations(&self) -> u64 {
        self.allocations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Launches the graph [`Gpu::captured`] last kept in `slot` again, as
    /// captured: false (nothing launched) where there is none. The caller
    /// knows that every address and launch shape in it still holds (the
    /// same step shape, no allocation since, values that vary per step
    /// read from device buffers).
    pub fn replay(&self, slot: usize) -> Result<bool> {
        let graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Some(exec)) = graphs.get(slot) else {
            return Ok(false);
        };
        self.compute
            .context()
            .bind_to_thread()
            .map_err(|e| device_error("binding the context", e))?;
        // SAFETY: a live exec on this device's stream.
        unsafe { cudarc::driver::result::graph::launch(exec.0, self.compute.cu_stream()) }
            .map_err(|e| device_error("replaying a captured step", e))?;
        Ok(true)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.not_capturing("waiting for the GPU")?;
        let _w = profile::wait(Op::wait_gpu);
        for s in [&self.copy, &self.compute] {
            s.synchronize()
                .map_err(|e| device_error("synchronize", e))?;
        }
        Ok(())
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.allocated();
        self.upload_transient(host)
    }

    /// [`Gpu::upload`] of a buffer no captured graph holds (see
    /// [`Gpu::allocations`]).
    fn upload_transient<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.not_capturing("an upload")?;
        self.compute
            .clone_htod(host)
            .map_err(|e| device_error(format!("uploading {} bytes", size_of_val(host)), e))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.not_capturing("an allocation")?;
        self.allocated();
        self.compute
            .alloc_zeros(n)
            .map_err(|e| device_error(format!("allocating {n} elements"), e))
    }

    /// Copies a device buffer back, after the work queued before it.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.not_capturing("a download")?;
        let _w = profile::wait(Op::wait_gpu);
        self.compute
            .clone_dtoh(dev)
            .map_err(|e| device_error(format!("downloading {} elements", dev.len()), e))
    }

    /// Copies `host` into `dst` (as long as `host`) on the compute stream.
    pub fn upload_into<T: DeviceRepr>(
        &self,
        host: &[T],
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        self.not_capturing("an upload")?;
        if dst.len() < host.len() {
            return Err(Error::invalid(format!(
                "CUDA upload: {} elements into {}",
                host.len(),
                dst.len()
            )));
        }
        self.compute
            .memcpy_htod(host, dst)
            .map_err(|e| device_error(format!("uploading {} bytes", size_of_val(host)), e))
    }

    /// Copies `src` back into `dst` (resized to it), after the work queued
    /// before, and waits for it. Into page-locked memory the copy is
    /// asynchronous, so this waits on the compute stream alone: the copy
    /// stream may be carrying the next layer's experts meanwhile.
    pub fn download_into<'d, T: DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &CudaView<'_, T>,
        dst: &'d mut Option<HostBuf<T>>,
    ) -> Result<&'d mut [T]> {
        self.not_capturing("a download")?;
        self.download_queued(src, dst)?;
        self.downloaded(dst, src.len())
    }

    /// Queues the copy of `src` into `dst` (resized to it) on the compute
    /// stream, without waiting: [`Gpu::downloaded`] waits and reads it.
    /// While a step is captured the copy becomes a node of its graph, so
    /// `dst` must already be page-locked and large enough (a graph cannot
    /// copy into pageable memory, nor may the buffer move before a replay).
    pub fn download_queued<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &CudaView<'_, T>,
        dst: &mut Option<HostBuf<T>>,
    ) -> Result<()> {
        let n = src.len();
        let capturing = self.capturing.load(std::sync::atomic::Ordering::Relaxed);
        if capturing && !dst.as_ref().is_some_and(|d| d.holds(n) && d.locked()) {
            return Err(Error::invalid(
                "CUDA: a download into memory not yet page-locked while a step is captured",
            ));
        }
        let dst = HostBuf::resize(dst, self, n);
        self.compute
            .memcpy_dtoh(src, dst.as_mut_slice())
            .map_err(|e| device_error(format!("downloading {n} elements"), e))
    }

    /// Waits for the compute stream, so for the `n` values
    /// [`Gpu::download_queued`] copied into `dst` (directly or in a
    /// replayed graph), and returns them. A replayed copy fills the start
    /// of the buffer it was recorded with, whatever length the last eager
    /// one left it at: hence the count, not the buffer's length.
    pub fn downloaded<'d, T: DeviceRepr + ValidAsZeroBits>(
        &self,
        dst: &'d mut Option<HostBuf<T>>,
        n: usize,
    ) -> Result<&'d mut [T]> {
        self.not_capturing("waiting for a download")?;
        {
            let _w = profile::wait(Op::wait_gpu);
            self.compute
                .synchronize()
                .map_err(|e| device_error("waiting for a download", e))?;
        }
        self.read_timings()?;
        let all = dst.as_mut().map_or(&mut [][..], |d| d.as_mut_slice());
        let held = all.len();
        all.get_mut(..n).ok_or_else(|| {
            Error::invalid(format!(
                "CUDA: {held} values downloaded where {n} were queued"
            ))
        })
    }

    /// Copies `src` into `dst` on the device, in stream order.
    pub fn copy<T: DeviceRepr>(
        &self,
        src: &CudaView<'_, T>,
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        if dst.len() < src.len() {
            return Err(Error::invalid(format!(
                "CUDA copy: {} elements into {}",
                src.len(),
                dst.len()
            )));
        }
        let mut head = dst.slice_mut(..src.len());
        self.compute
            .memcpy_dtod(src, &mut head)
            .map_err(|e| device_error(format!("copying {} elements", src.len()), e))
    }

    /// Uploads a weight matrix on the compute stream.
    pub fn upload_matrix(&self, w: Matrix<'_>) -> Result<GpuMatrix> {
        self.allocated();
        self.matrix_on(&self.compute, w, true)
    }

    /// A `rows x cols` matrix of `dtype` whose bytes `fill` hands over in
    /// pieces (`piece(first_byte, bytes)`), for a table read from disk
    /// without all of it in RAM; every byte must be given.
    pub fn upload_matrix_pieces(
        &self,
        (dtype, rows, cols): (DType, usize, usize),
        fill: impl FnOnce(&mut dyn FnMut(usize, &[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<GpuMatrix> {
        let len = rows * dtype.row_bytes(cols);
        self.allocated();
        let mut m = self.matrix_on(
            &self.compute,
            Matrix {
                dtype,
                rows,
                cols,
                data: &[],
            },
            false,
        )?;
        let mut given = 0;
        fill(&mut |at, bytes| {
            if at + bytes.len() > len {
                return Err(Error::invalid(format!(
                    "CUDA: {} bytes at {at} of a {len}-byte matrix",
                    bytes.len()
                )));
            }
            given += bytes.len();
            self.upload_into(bytes, &mut m.data.slice_mut(at..at + bytes.len()))
        })?;
        if given != len {
            return Err(Error::invalid(format!(
                "CUDA: {given} bytes given of a {len}-byte matrix"
            )));
        }
        Ok(m)
    }

    /// Whether the kernels take `dtype` weights.
    pub fn has_kernels(&self, dtype: DType) -> bool {
        kernel_dtype(dtype).is_ok()
    }

    /// Rows `ids` (`t` of them, on the device) of `table`, widened into `x`
    /// (`[t, cols]`): the embedding lookup of a table kept in VRAM. An id
    /// past the table's rows (which the model's input check refuses
    /// first) gives a row of zeros.
    pub fn get_rows(
        &self,
        table: &GpuMatrix,
        ids: &CudaView<'_, u32>,
        t: usize,
        x: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let cols = table.cols;
        if ids.len() < t || x.len() < t * cols {
            return Err(Error::invalid(format!(
                "CUDA get_rows: {t} rows of {cols} from {} ids into {}",
                ids.len(),
                x.len()
            )));
        }
        if t == 0 {
            return Ok(());
        }
        let name = format!("get_rows_{}", kernel_dtype(table.dtype)?);
        let per = if matches!(table.dtype, DType::Quant(_)) {
            cols / 32
        } else {
            cols
        };
        let cfg = LaunchConfig {
            grid_dim: (int(per.div_ceil(128))? as u32, int(t)? as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (row_bytes, cols) = (table.dtype.row_bytes(cols) as u64, int(cols)?);
        let rows = u32::try_from(table.rows).unwrap_or(u32::MAX);
        launch!(
            self,
            name,
            cfg,
            &table.data,
            &row_bytes,
            &rows,
            ids,
            x,
            &cols
        )
    }

    /// Page-locks `mem` (the RAM expert cache's slots) with the driver, so
    /// that uploads from it are DMA at full PCIe speed instead of going
    /// through the driver's staging buffer: 55 GB/s against 7.9 on the H200
    /// machine. Locking touches every page once (about a second per 10
    /// GiB). Uploads from locked memory return before the copy is done: see
    /// [`Gpu::upload_experts`].
    pub fn pin_host(&self, mem: Arc<AlignedBuf>) -> Result<HostPin> {
        let ctx = self.compute.context().clone();
        ctx.bind_to_thread()
            .map_err(|e| device_error("binding the context", e))?;
        let ptr = mem.as_ptr() as *mut std::ffi::c_void;
        // SAFETY: `ptr..ptr + len` is one live allocation, kept alive by
        // the returned guard until it unregisters it; PORTABLE because the
        // decoder's context is the only one, but costs nothing.
        let r = unsafe {
            driver::sys::cuMemHostRegister_v2(
                ptr,
                mem.len(),
                driver::sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        };
        if r != driver::sys::cudaError_enum::CUDA_SUCCESS {
            return Err(device_error(
                format!(
                    "page-locking {} of host memory",
                    human_bytes(mem.len() as u64)
                ),
                r,
            ));
        }
        Ok(HostPin {
            ptr,
            ctx,
            _mem: mem,
        })
    }

    /// Uploads `experts` (each `N` matrices) one after another on the copy
    /// stream, with an event the compute stream waits on ([`Gpu::wait_upload`])
    /// just before an expert's kernels, so that later experts copy while
    /// earlier ones compute. On CUDA 13 drivers up to [`UPLOAD_BATCH`]
    /// experts (a decode step's) go in one driver call and share an event:
    /// each call costs the host microseconds (a one-token layer's four
    /// experts took 40 us to queue as twelve copies and four events, time
    /// the CPU's share of a split waited out), while a prefill's many
    /// experts gain from starting on each as soon as it lands (in groups of
    /// eight, its rate fell by a tenth). The host
    /// memory must stay unchanged until [`Gpu::finish_uploads`] returns:
    /// from page-locked memory the copies run after this call has returned.
    #[allow(clippy::type_complexity)]
    pub fn upload_experts<const N: usize>(
        &self,
        experts: &[[Matrix<'_>; N]],
    ) -> Result<Vec<([GpuMatrix; N], Arc<CudaEvent>)>> {
        self.not_capturing("an upload")?;
        let _w = profile::wait(Op::queue_copies);
        // Allocated on the compute stream, which orders their frees after
        // the kernels that read them; the copies wait for the allocations.
        let mut out = Vec::with_capacity(experts.len());
        for mats in experts {
            let dev = mats
                .iter()
                .map(|&m| match self.spare_for(m) {
                    Some(d) => Ok(d),
                    None => self.matrix_on(&self.compute, m, false),
                })
                .collect::<Result<Vec<_>>>()?;
            let dev: [GpuMatrix; N] = dev.try_into().expect("one matrix each");
            out.push(dev);
        }
        // One event, recorded anew each time: a fresh one is two more
        // driver calls (its creation and destruction).
        let order = |e| device_error("ordering the copy stream after compute", e);
        self.computed
            .record(&self.compute)
            .and_then(|()| self.copy.wait(&self.computed))
            .map_err(order)?;
        let batched = self.batch_copies && experts.len() <= UPLOAD_BATCH;
        let mut out = out.into_iter();
        let mut queued = Vec::with_capacity(experts.len());
        for group in experts.chunks(if batched { UPLOAD_BATCH } else { 1 }) {
            let mut dev: Vec<[GpuMatrix; N]> = out.by_ref().take(group.len()).collect();
            let pairs = group
                .iter()
                .zip(&mut dev)
                .flat_map(|(m, d)| m.iter().zip(d));
            let copied = if batched {
                let mut copies: Vec<_> = pairs
                    .map(|(m, d)| (d.data.device_ptr_mut(&self.copy).0, m.data))
                    .collect();
                self.copy_batch(&mut copies)
            } else {
                pairs.into_iter().try_for_each(|(m, d)| {
                    self.copy.memcpy_htod(m.data, &mut d.data).map_err(|e| {
                        device_error(format!("uploading a {} matrix", m.dtype.name()), e)
                    })
                })
            };
            let ready = copied.and_then(|()| {
                self.copy
                    .record_event(None)
                    .map_err(|e| device_error("recording an upload", e))
            });
            match ready {
                Ok(ready) => {
                    let ready = Arc::new(ready);
                    queued.extend(dev.into_iter().map(|d| (d, ready.clone())));
                }
                Err(e) => {
                    // The matrices already queued are freed on return: not
                    // before their copies are done. The error at hand is
                    // what to report.
                    let _ = self.copy.synchronize();
                    return Err(e);
                }
            }
        }
        Ok(queued)
    }

    /// Host-to-device copies `(destination, source)` in one driver call on
    /// the copy stream (`cuMemcpyBatchAsync`, CUDA 13 drivers), the sources
    /// read in the stream's order: page-locked, or left untouched until the
    /// copy stream has passed them.
    fn copy_batch(&self, copies: &mut [(u64, &[u8])]) -> Result<()> {
        use cudarc::driver::sys;
        let fail = |e| {
            device_error(
                format!("uploading {} matrices in one call", copies.len()),
                e,
            )
        };
        let (mut dsts, mut srcs, mut sizes): (Vec<u64>, Vec<u64>, Vec<usize>) = (
            copies.iter().map(|c| c.0).collect(),
            copies.iter().map(|c| c.1.as_ptr() as u64).collect(),
            copies.iter().map(|c| c.1.len()).collect(),
        );
        let location = |type_, id| sys::CUmemLocation { type_, id };
        let mut attrs = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: location(sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, 0),
            dstLocHint: location(
                sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                self.info.ordinal as i32,
            ),
            flags: 0,
        };
        let mut first = 0usize;
        self.copy.context().bind_to_thread().map_err(fail)?;
        // SAFETY: three arrays of copies.len() entries each, one attribute
        // for all of them (from copy 0); destinations are device
        // allocations of at least each size, sources host memory of it.
        unsafe {
            sys::cuMemcpyBatchAsync_v2(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                copies.len(),
                &mut attrs,
                &mut first,
                1,
                self.copy.cu_stream(),
            )
        }
        .result()
        .map_err(fail)
    }

    /// A matrix [`Gpu::recycle`] kept of `w`'s type and shape, if any.
    /// Its last readers were queued on the compute stream before, and
    /// `upload_experts` orders its copies after everything queued there.
    fn spare_for(&self, w: Matrix<'_>) -> Option<GpuMatrix> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let i = spare
            .iter()
            .position(|d| (d.dtype, d.rows, d.cols) == (w.dtype, w.rows, w.cols))?;
        Some(spare.swap_remove(i))
    }

    /// Keeps streamed experts' device matrices, once their kernels are
    /// queued, for the next [`Gpu::upload_experts`] (up to [`MAX_SPARE`]
    /// of them and [`MAX_SPARE_BYTES`]; the rest are freed).
    pub fn recycle(&self, mats: impl IntoIterator<Item = GpuMatrix>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: usize = spare.iter().map(GpuMatrix::bytes).sum();
        for m in mats {
            if spare.len() >= MAX_SPARE || held + m.bytes() > MAX_SPARE_BYTES {
                break;
            }
            held += m.bytes();
            spare.push(m);
        }
    }

    /// Device matrices kept by [`Gpu::recycle`] for the next uploads.
    pub fn spare_matrices(&self) -> usize {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Makes the kernels queued from now on wait for one expert's upload.
    pub fn wait_upload(&self, ready: &CudaEvent) -> Result<()> {
        self.compute
            .wait(ready)
            .map_err(|e| device_error("waiting for an upload", e))
    }

    /// An event after every upload queued so far, for
    /// [`Gpu::finish_uploads_to`]: uploads queued later are not waited for.
    pub fn uploads_mark(&self) -> Result<CudaEvent> {
        self.copy
            .record_event(None)
            .map_err(|e| device_error("marking the uploads", e))
    }

    /// Blocks until every upload queued before `mark` has read its host
    /// memory.
    pub fn finish_uploads_to(&self, mark: &CudaEvent) -> Result<()> {
        self.not_capturing("waiting for uploads")?;
        let _w = profile::wait(Op::wait_copies);
        mark.synchronize()
            .map_err(|e| device_error("finishing uploads", e))
    }

    /// Blocks until every upload queued so far has read its host memory.
    pub fn finish_uploads(&self) -> Result<()> {
        self.not_capturing("waiting for uploads")?;
        let _w = profile::wait(Op::wait_copies);
        self.copy
            .synchronize()
            .map_err(|e| device_error("finishing uploads", e))
    }

    /// A matrix of `w`'s shape on `stream`, holding `w`'s rows when
    /// `fill`, else uninitialised for the caller to fill (`w.data` then
    /// unread). Not counted in [`Gpu::allocations`]: the callers that
    /// upload weights a graph reads count theirs.
    fn matrix_on(&self, stream: &Arc<CudaStream>, w: Matrix<'_>, fill: bool) -> Result<GpuMatrix> {
        self.not_capturing("an allocation")?;
        let name = w.dtype.name();
        kernel_dtype(w.dtype)?;
        // Quantized rows are whole blocks (32 or 256 weights); float rows
        // of any width go to the `ragged` kernel.
        let quantized = matches!(w.dtype, DType::Quant(_));
        let len = w.rows * w.dtype.row_bytes(w.cols);
        if (quantized && !w.cols.is_multiple_of(32)) || (fill && w.data.len() != len) {
            return Err(Error::invalid(format!(
                "CUDA: a {name} matrix of {} rows x {} columns in {} bytes: the kernels take \
                 whole rows, of whole blocks when quantized",
                w.rows,
                w.cols,
                w.data.len()
            )));
        }
        let data = if fill {
            stream.clone_htod(w.data)
        } else {
            // SAFETY: the caller overwrites every byte before any kernel
            // reads them.
            unsafe { stream.alloc::<u8>(len) }
        }
        .map_err(|e| device_error(format!("uploading a {name} matrix"), e))?;
        Ok(GpuMatrix {
            dtype: w.dtype,
            rows: w.rows,
            cols: w.cols,
            data,
        })
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| device_error(format!("kernel {name}"), e))?;
        functions.insert(name.to_owned(), f.clone());
        Ok(f)
    }

    /// The table of `mats`' device addresses, one per expert, when they
    /// share a type and shape the id kernels take; `None` otherwise (the
    /// caller runs the experts one by one).
    pub fn expert_table(&self, mats: &[&GpuMatrix]) -> Result<Option<ExpertTable>> {
        // A VRAM layer's table, which graphs read (`expert_table_of`'s
        // own are a streamed layer's, per call).
        self.allocated();
        let all: Vec<_> = mats.iter().copied().enumerate().collect();
        self.expert_table_of(mats.len(), &all)
    }

    /// As [`Gpu::expert_table`] for some of `n` experts: `(id, matrix)`
    /// pairs, the other ids' addresses null (the grouped kernels read only
    /// the ids they are given).
    pub fn expert_table_of(
        &self,
        n: usize,
        mats: &[(usize, &GpuMatrix)],
    ) -> Result<Option<ExpertTable>> {
        let Some(&(_, first)) = mats.first() else {
            return Ok(None);
        };
        let (dtype, rows, cols) = (first.dtype, first.rows, first.cols);
        let quantized = matches!(dtype, DType::Quant(_));
        if (quantized && kernel_dtype(dtype).is_err())
            || mats
                .iter()
                .any(|(e, m)| *e >= n || (m.dtype, m.rows, m.cols) != (dtype, rows, cols))
        {
            return Ok(None);
        }
        let mut ptrs = vec![0u64; n];
        for &(e, m) in mats {
            // The address only: nothing is read here, and without event
            // tracking the returned guard records nothing.
            let (ptr, _guard) = m.data.device_ptr(&self.compute);
            ptrs[e] = ptr;
        }
        Ok(Some(ExpertTable {
            dtype,
            rows,
            cols,
            ptrs: self.upload_transient(&ptrs)?,
        }))
    }

    /// `y[t, rows] = x[t, cols] · wᵀ`, as the CPU backend's `matmul`: up to
    /// MATVEC_MAX_TOKENS tokens through q4_k or q6_k rows with activations
    /// rounded to int8 per 32 ([`Gpu::matmul_q8`], unless
    /// [`Gpu::set_int8_activations`] turned that off), everything else
    /// with f32 activations (the CPU rounds them to 8 bits per 256 for
    /// every quantized type).
    pub fn matmul(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        w: &GpuMatrix,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        if x.len() < t * w.cols || y.len() < t * w.rows {
            return Err(Error::invalid(format!(
                "CUDA matmul: {t} tokens through [{}, {}] need {} inputs and {} outputs, \
                 buffers hold {} and {}",
                w.rows,
                w.cols,
                t * w.cols,
                t * w.rows,
                x.len(),
                y.len()
            )));
        }
        if t == 0 || w.rows == 0 {
            return Ok(());
        }
        if self.int8_activations() && takes_q8(w, t) {
            return self.matmul_q8(x, t, w, y);
        }
        if t > MATVEC_MAX_TOKENS && self.int8_tiles() && q8_rows(w.dtype, w.cols) {
            return self.mmq(x, t, w, y);
        }
        let (rows, cols, tokens) = (int(w.rows)?, int(w.cols)?, int(t)?);
        let row_bytes = w.dtype.row_bytes(w.cols) as u64;
        let per_warp = LaunchConfig {
            grid_dim: (w.rows.div_ceil(MV_ROWS as usize) as u32, 1, 1),
            block_dim: (32, MV_ROWS, 1),
            shared_mem_bytes: 0,
        };
        let (name, cfg) = if !w.cols.is_multiple_of(32) {
            ("ragged", per_warp)
        } else if t <= MATVEC_MAX_TOKENS {
            ("matvec", per_warp)
        } else {
            ("gemm", Self::tiles(w.rows, t, 1)?)
        };
        let tiled = name == "gemm";
        let name = format!("{name}_{}", kernel_dtype(w.dtype)?);
        if tiled {
            let exact = self.exact_gemm();
            let k_tiles = w.cols.div_ceil(TILE as usize);
            let per = k_tiles.div_ceil(self.gemm_splits(w.rows, t, w.cols));
            let splits = k_tiles.div_ceil(per.max(1));
            let kc = int(per * TILE as usize)?;
            if splits <= 1 {
                return launch!(
                    self, &name, cfg, &w.data, &row_bytes, x, y, &rows, &cols, &tokens, &exact,
                    &cols
                );
            }
            let n = t * w.rows;
            let mut parts = self.split_parts.lock().unwrap_or_else(|e| e.into_inner());
            if parts.as_ref().is_none_or(|p| p.len() < splits * n) {
                self.not_capturing("growing the split product's scratch")?;
                *parts = None;
                *parts = Some(self.zeros(splits * n)?);
            }
            let parts = parts.as_mut().expect("allocated above");
            let cfg = LaunchConfig {
                grid_dim: (cfg.grid_dim.0, cfg.grid_dim.1, splits as u32),
                ..cfg
            };
            launch!(
                self,
                &name,
                cfg,
                &w.data,
                &row_bytes,
                x,
                &mut *parts,
                &rows,
                &cols,
                &tokens,
                &exact,
                &kc
            )?;
            let (n64, splits) = (n as u64, int(splits)?);
            return launch!(self, "sum_parts", elems(n)?, &*parts, y, &n64, &splits);
        }
        launch!(self, &name, cfg, &w.data, &row_bytes, x, y, &rows, &cols, &tokens)
    }

    /// The first `n` activations of `x` rounded to 8 bits per 32-block
    /// into the q8 scratch (`(int8 values, (d, d * sum) per block)`), held
    /// locked for the launch that reads them.
    fn quantize_q8(&self, x: &CudaView<'_, f32>, n: usize) -> Result<Rounded<'_>> {
        if !n.is_multiple_of(32) || x.len() < n {
            return Err(Error::invalid(format!(
                "CUDA quantize_q8: {n} values (whole 32-blocks) of {}",
                x.len()
            )));
        }
        let blocks = n / 32;
        let mut q8 = self.int8_scratch(&self.q8, n)?;
        let (xq, xds) = q8.as_mut().expect("allocated by int8_scratch");
        // Four 32-blocks a warp (matmul.cu).
        let warps = 4u32;
        let cfg = LaunchConfig {
            grid_dim: ((int(blocks.div_ceil(4))? as u32).div_ceil(warps), 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: 0,
        };
        let blocks = blocks as u64;
        launch!(self, "quantize_q8", cfg, x, &mut *xq, &mut *xds, &blocks)?;
        Ok(q8)
    }

    /// `scratch` locked, holding room for `n` activations rounded to int8
    /// and their (d, d * sum) pairs per 32-block.
    fn int8_scratch<'a>(
        &self,
        scratch: &'a Mutex<Option<(CudaSlice<u8>, CudaSlice<f32>)>>,
        n: usize,
    ) -> Result<Rounded<'a>> {
        let mut r = scratch.lock().unwrap_or_else(|e| e.into_inner());
        if r.as_ref().is_none_or(|(q, _)| q.len() < n) {
            self.not_capturing("growing an int8 scratch")?;
            *r = None;
            *r = Some((self.zeros(n)?, self.zeros(n.div_ceil(32) * 2)?));
        }
        Ok(r)
    }

    /// The attention splits' scratch locked ([`Gpu::attention`]): grown
    /// where smaller to `need` partial values and `counters` counters
    /// (made zero, as the kernels leave them).
    #[allow(clippy::type_complexity)]
    fn attn_scratch(
        &self,
        need: usize,
        counters: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<(CudaSlice<f32>, CudaSlice<u32>)>>> {
        let mut parts = self.attn_parts.lock().unwrap_or_else(|e| e.into_inner());
        if parts
            .as_ref()
            .is_none_or(|(p, d)| p.len() < need || d.len() < counters)
        {
            self.not_capturing("growing the attention scratch")?;
            *parts = None;
            *parts = Some((self.zeros(need)?, self.zeros(counters)?));
        }
        Ok(parts)
    }

    /// The counts of finished blocks ([`Gpu::done`]) locked, at least `n`
    /// of them (a few thousand at first, so that a captured step never
    /// finds them growing).
    fn done_counters(&self, n: usize) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<u32>>>> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if done.as_ref().is_none_or(|d| d.len() < n) {
            self.not_capturing("growing the block counters")?;
            *done = None;
            *done = Some(self.zeros(n.max(4096))?);
        }
        Ok(done)
    }

    /// `v`'s device address, or a null pointer for `None`: how a kernel
    /// takes a buffer it may go without.
    fn address<T, P: DevicePtr<T>>(&self, v: Option<&P>) -> u64 {
        v.map_or(0, |p| p.device_ptr(&self.compute).0)
    }

    /// The tiled products (prefill) in 3xTF32, f32's accuracy (`true`, the
    /// default), or in one TF32 product each (an experiment: a third of
    /// the tensor work, 10 bits of mantissa), for what is queued from now
    /// on.
    pub fn set_exact_gemm(&self, exact: bool) {
        self.exact_gemm
            .store(exact, std::sync::atomic::Ordering::Relaxed);
    }

    fn exact_gemm(&self) -> i32 {
        self.exact_gemm.load(std::sync::atomic::Ordering::Relaxed) as i32
    }

    /// Turns the int8 tiled products (`mmq`) on or off for what is queued
    /// from now on.
    pub fn set_int8_tiles(&self, on: bool) {
        self.mmq.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether prefill's tiled products of q4_k and q6_k rows (and their
    /// grouped experts) round the activations to int8 and multiply on the
    /// int8 tensor cores (Ampere and newer).
    pub fn int8_tiles(&self) -> bool {
        self.mmq.load(std::sync::atomic::Ordering::Relaxed)
            && self.info.compute_capability >= (8, 0)
    }

    /// Column splits for a tiled product whose output tiles alone would
    /// leave most SMs idle: a prompt's router (128 rows, 512 tokens: 16
    /// tiles on 132 SMs, 142 us a layer on the H200) runs eight splits of
    /// four column tiles each, their parts summed in order after. Each
    /// split keeps at least four column tiles, so the sums stay few. The
    /// last bits of such a product then depend on the token count and the
    /// GPU's SMs (the split): a prompt chunked otherwise may differ there.
    fn gemm_splits(&self, rows: usize, tokens: usize, cols: usize) -> usize {
        let tiles = rows.div_ceil(TILE as usize) * tokens.div_ceil(TILE as usize);
        let sms = self.info.sm_count;
        if 2 * tiles > sms {
            return 1;
        }
        (sms / tiles.max(1))
            .min(cols.div_ceil(TILE as usize) / 4)
            .max(1)
    }

    /// The tiled kernel's grid for `rows` rows of `tokens` tokens, over
    /// `experts` experts (1 for one matrix).
    fn tiles(rows: usize, tokens: usize, experts: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (
                int(rows.div_ceil(TILE as usize))? as u32,
                int(tokens.div_ceil(TILE as usize))? as u32,
                int(experts)? as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// [`Gpu::matmul`] of many tokens through q4_k or q6_k rows on int8
    /// activations: rounded per 32-block as for the matrix-vector kernels,
    /// multiplied in int8 on the tensor cores, 64 x 64 tiles as `gemm`.
    fn mmq(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        w: &GpuMatrix,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (rows, cols, tokens) = (int(w.rows)?, int(w.cols)?, int(t)?);
        let row_bytes = w.dtype.row_bytes(w.cols) as u64;
        let q8 = self.quantize_q8(x, t * w.cols)?;
        let (xq, xds) = q8.as_ref().expect("quantized above");
        let name = format!("mmq_{}", kernel_dtype(w.dtype)?);
        let cfg = Self::tiles(w.rows, t, 1)?;
        launch!(self, &name, cfg, &w.data, &row_bytes, xq, xds, y, &rows, &cols, &tokens)
    }

    /// Turns the int8-activation kernels on or off for what is queued
    /// from now on.
    pub fn set_int8_activations(&self, on: bool) {
        self.mmvq.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`Gpu::matmul`] and the id kernels round a few tokens'
    /// activations to int8 for q4_k and q6_k rows.
    pub fn int8_activations(&self) -> bool {
        self.mmvq.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fixes the int8 kernels' lanes per row (8, 16 or 32; `None` for the
    /// choice by width, [`q8_lanes`]), for timing each.
    pub fn set_q8_lanes_per_row(&self, lanes: Option<u32>) {
        let lanes = lanes.map_or(0, |l| l.clamp(8, 32).next_power_of_two());
        self.q8_lanes
            .store(lanes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lanes per row for rows `cols` wide: the fixed count, else
    /// [`q8_lanes`].
    fn q8_lanes_for(&self, cols: usize) -> u32 {
        match self.q8_lanes.load(std::sync::atomic::Ordering::Relaxed) {
            0 => q8_lanes(cols),
            lanes => lanes,
        }
    }

    /// The int8 kernels' blocks for `rows` rows `cols` wide of `pairs`
    /// pairs (a grid row per pair), and their lanes per row.
    fn per_q8_row(&self, rows: usize, cols: usize, pairs: usize) -> Result<(LaunchConfig, i32)> {
        let lanes = self.q8_lanes_for(cols);
        let per_block = (MQ_WARPS * (32 / lanes)) as usize;
        let cfg = LaunchConfig {
            grid_dim: (int(rows.div_ceil(per_block))? as u32, int(pairs)? as u32, 1),
            block_dim: (32, MQ_WARPS, 1),
            shared_mem_bytes: 0,
        };
        Ok((cfg, lanes as i32))
    }

    /// Whether the id kernels take the int8-activation path for `w`.
    fn mmvq_for(&self, w: &ExpertTable) -> bool {
        self.int8_activations() && q8_rows(w.dtype, w.cols)
    }

    /// As [`Gpu::matmul`] for a few tokens through q4_k or q6_k rows, with
    /// the activations rounded to 8 bits per 32-block first (as the CPU
    /// backend rounds them) and the products taken four at a time in
    /// int8 (`dp4a`), as llama.cpp's mmvq does: 2.7x the f32 kernel's rate
    /// on a q6_k LM head (`cuda_bench` times both).
    pub fn matmul_q8(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        w: &GpuMatrix,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let name = q8_kernel(w, t, x, y)?;
        let q8 = self.quantize_q8(x, t * w.cols)?;
        let (xq, xds) = q8.as_ref().expect("quantized above");
        self.mmvq(name, xq, xds, t, w, y)
    }

    /// `matmul` of one `x` through several matrices (attention's q, k and
    /// v): with int8 activations they are rounded once for all.
    pub fn matmul_each(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        outs: &mut [(&GpuMatrix, &mut CudaViewMut<'_, f32>)],
    ) -> Result<()> {
        let cols = outs.first().map(|(w, _)| w.cols);
        // Every product's int8 kernel, where all take one and are as wide.
        let kernels: Option<Vec<&str>> = self
            .int8_activations()
            .then(|| {
                outs.iter()
                    .map(|(w, y)| q8_kernel(w, t, x, y).ok().filter(|_| Some(w.cols) == cols))
                    .collect()
            })
            .flatten();
        let (Some(cols), Some(kernels)) = (cols, kernels) else {
            for (w, y) in outs.iter_mut() {
                self.matmul(x, t, w, y)?;
            }
            return Ok(());
        };
        let q8 = self.quantize_q8(x, t * cols)?;
        let (xq, xds) = q8.as_ref().expect("quantized above");
        self.mmvq_all(xq, xds, t, outs, &kernels)
    }

    /// As [`Gpu::matmul_each`] on rows a norm rounded as it wrote them;
    /// every matrix must take the int8 kernels ([`Gpu::takes_int8`]).
    pub fn matmul_each_rounded(
        &self,
        rounded: &Rounded<'_>,
        t: usize,
        outs: &mut [(&GpuMatrix, &mut CudaViewMut<'_, f32>)],
    ) -> Result<()> {
        let Some((xq, xds)) = rounded.as_ref() else {
            return Err(Error::invalid("CUDA matmul_each_rounded: nothing rounded"));
        };
        let cols = outs.first().map_or(0, |(w, _)| w.cols);
        let kernels = outs
            .iter()
            .map(|(w, y)| {
                match w.dtype {
                    DType::Quant(QuantType::Q4K) => Ok("mmvq_q4_k"),
                    DType::Quant(QuantType::Q6K) => Ok("mmvq_q6_k"),
                    _ => Err(w.dtype),
                }
                .ok()
                .filter(|_| {
                    w.cols == cols
                        && cols.is_multiple_of(256)
                        && (1..=MATVEC_MAX_TOKENS).contains(&t)
                        && y.len() >= t * w.rows
                        && xq.len() >= t * cols
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Error::invalid(format!(
                    "CUDA matmul_each_rounded: {t} rounded rows of {} through {:?}",
                    xq.len(),
                    outs.iter()
                        .map(|(w, _)| (w.dtype.name(), w.rows, w.cols))
                        .collect::<Vec<_>>()
                ))
            })?;
        self.mmvq_all(xq, xds, t, outs, &kernels)
    }

    /// Whether `t` rows through `w` take the int8 kernels.
    pub fn takes_int8(&self, w: &GpuMatrix, t: usize) -> bool {
        self.int8_activations() && takes_q8(w, t)
    }

    /// Whether a layer's experts of `w` take the int8 id kernels.
    pub fn takes_int8_experts(&self, w: &ExpertTable) -> bool {
        self.mmvq_for(w)
    }

    /// The int8 products `kernels` of rounded rows `xq`/`xds`: two or
    /// three in one `mmvq_each` launch, else one launch each.
    fn mmvq_all(
        &self,
        xq: &CudaSlice<u8>,
        xds: &CudaSlice<f32>,
        t: usize,
        outs: &mut [(&GpuMatrix, &mut CudaViewMut<'_, f32>)],
        kernels: &[&str],
    ) -> Result<()> {
        if let [a, b, c @ ..] = &mut outs[..] {
            if c.len() <= 1 {
                return self.mmvq_each([a, b], c.first_mut(), xq, xds, t);
            }
        }
        for ((w, y), name) in outs.iter_mut().zip(kernels) {
            self.mmvq(name, xq, xds, t, w, y)?;
        }
        Ok(())
    }

    /// Two or three products of the same rounded activations (each matrix
    /// q4_k or q6_k, checked by the caller) in one `mmvq_each` launch.
    fn mmvq_each(
        &self,
        [a, b]: [&mut (&GpuMatrix, &mut CudaViewMut<'_, f32>); 2],
        c: Option<&mut (&GpuMatrix, &mut CudaViewMut<'_, f32>)>,
        xq: &CudaSlice<u8>,
        xds: &CudaSlice<f32>,
        t: usize,
    ) -> Result<()> {
        // The kernels' type numbers (T_Q4_K, T_Q6_K in matmul.cu); the
        // kernel reads any other number as q6_k, so refuse the rest here.
        let ty = |w: &GpuMatrix| match w.dtype {
            DType::Quant(QuantType::Q4K) => Ok(5i32),
            DType::Quant(QuantType::Q6K) => Ok(7i32),
            other => Err(Error::invalid(format!(
                "CUDA mmvq_each: a {} matrix (q4_k and q6_k only)",
                other.name()
            ))),
        };
        let lanes = self.q8_lanes_for(a.0.cols);
        let per = (MQ_WARPS * (32 / lanes)) as usize;
        let blocks = |w: &GpuMatrix| w.rows.div_ceil(per);
        let n = blocks(a.0) + blocks(b.0) + c.as_ref().map_or(0, |c| blocks(c.0));
        let cfg = LaunchConfig {
            grid_dim: (int(n)? as u32, 1, 1),
            block_dim: (32, MQ_WARPS, 1),
            shared_mem_bytes: 0,
        };
        let rb = |w: &GpuMatrix| w.dtype.row_bytes(w.cols) as u64;
        let (cols, t, lanes) = (int(a.0.cols)?, int(t)?, lanes as i32);
        // A missing third matrix: 0 rows, never read (the second's
        // pointers stand in).
        let third = c.as_ref().map_or(b.0, |c| c.0);
        let rows = [
            int(a.0.rows)?,
            int(b.0.rows)?,
            c.as_ref().map_or(Ok(0), |c| int(c.0.rows))?,
        ];
        let (rbs, tys) = (
            [rb(a.0), rb(b.0), rb(third)],
            [ty(a.0)?, ty(b.0)?, ty(third)?],
        );
        let (w0, w1, w2) = (&a.0.data, &b.0.data, &third.data);
        // A missing third output is never written: a null address.
        let y2 = c.map_or(0, |c| c.1.device_ptr_mut(&self.compute).0);
        launch!(
            self,
            "mmvq_each",
            cfg,
            w0,
            w1,
            w2,
            &rbs[0],
            &rbs[1],
            &rbs[2],
            &rows[0],
            &rows[1],
            &rows[2],
            &tys[0],
            &tys[1],
            &tys[2],
            &mut *a.1,
            &mut *b.1,
            &y2,
            xq,
            xds,
            &cols,
            &t,
            &lanes
        )
    }

    /// The int8 kernel `name` on activations already rounded.
    fn mmvq(
        &self,
        name: &str,
        xq: &CudaSlice<u8>,
        xds: &CudaSlice<f32>,
        t: usize,
        w: &GpuMatrix,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (rows, cols, tokens) = (int(w.rows)?, int(w.cols)?, int(t)?);
        let row_bytes = w.dtype.row_bytes(w.cols) as u64;
        let (mut cfg, lanes) = self.per_q8_row(w.rows, w.cols, 1)?;
        // q6_k rows through shared memory (`mmvq_q6_k_staged`), where
        // they are 16-byte aligned and a block's fit the default 48 KiB.
        let staged = MQ_WARPS as u64 * (32 / lanes as u64) * row_bytes;
        let name = match name {
            "mmvq_q6_k"
                if row_bytes.is_multiple_of(16) && staged <= 48 << 10 && self.staged_q6k =>
            {
                cfg.shared_mem_bytes = staged as u32;
                "mmvq_q6_k_staged"
            }
            other => other,
        };
        launch!(self, name, cfg, &w.data, &row_bytes, xq, xds, y, &rows, &cols, &tokens, &lanes)
    }

    /// RMSNorm of each `w.len()`-wide row of `x` into `out`.
    pub fn rms_norm_rows(
        &self,
        x: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let width = w.len();
        if width == 0 || !x.len().is_multiple_of(width) || out.len() < x.len() {
            return Err(Error::invalid(format!(
                "CUDA rms_norm_rows: {} inputs, {} outputs, rows of {width}",
                x.len(),
                out.len()
            )));
        }
        let (rows, width) = (x.len() / width, int(width)?);
        if rows == 0 {
            return Ok(());
        }
        launch!(self, "rms_norm", per_row(rows)?, x, out, w, &width, &eps)
    }

    /// The greedy pick of each `width`-wide row of `x` into `out`, by the
    /// sampler's rule (`sampler::argmax`: the largest value, the lowest
    /// index among equal ones, NaN never chosen, 0 for a row of NaN).
    pub fn argmax_rows(
        &self,
        x: &CudaView<'_, f32>,
        width: usize,
        out: &mut CudaViewMut<'_, u32>,
    ) -> Result<()> {
        if width == 0 || !x.len().is_multiple_of(width) || out.len() < x.len() / width {
            return Err(Error::invalid(format!(
                "CUDA argmax_rows: {} values in rows of {width}, {} outputs",
                x.len(),
                out.len()
            )));
        }
        let rows = x.len() / width;
        if rows == 0 {
            return Ok(());
        }
        // Parts of about 2,400 values (Qwen3's row in 64), a block each.
        let per_row = width.div_ceil(2048 + 256).clamp(1, 64);
        let mut parts = self.argmax_parts.lock().unwrap_or_else(|e| e.into_inner());
        if parts.as_ref().is_none_or(|p| p.len() < rows * per_row * 2) {
            self.not_capturing("growing argmax_rows' parts")?;
            *parts = None;
            *parts = Some(self.zeros(rows * per_row * 2)?);
        }
        let parts = parts.as_mut().expect("allocated above");
        let mut done = self.done_counters(rows)?;
        let done = done.as_mut().expect("allocated by done_counters");
        let cfg = LaunchConfig {
            grid_dim: (per_row as u32, int(rows)? as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "argmax_rows", cfg, x, &int(width)?, parts, done, out)
    }

    /// `x += d`, then RMSNorm of each `w.len()`-wide row of the sum into
    /// `out`: a residual add and the next norm in one launch.
    pub fn add_rms_norm_rows(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        d: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let width = w.len();
        if width == 0 || !x.len().is_multiple_of(width) || out.len() < x.len() || d.len() < x.len()
        {
            return Err(Error::invalid(format!(
                "CUDA add_rms_norm_rows: {} values plus {}, {} outputs, rows of {width}",
                x.len(),
                d.len(),
                out.len()
            )));
        }
        let (rows, width) = (x.len() / width, int(width)?);
        if rows == 0 {
            return Ok(());
        }
        launch!(
            self,
            "add_rms_norm",
            per_row(rows)?,
            x,
            d,
            out,
            w,
            &width,
            &eps
        )
    }

    /// [`Gpu::add_rms_norm_rows`] (`d` none: [`Gpu::rms_norm_rows`] of `x`,
    /// left as it is), the output also rounded to int8 per 32-block as the
    /// int8 kernels round their input, for [`Gpu::matmul_each_rounded`] and
    /// [`Gpu::swiglu_id_rounded`]: one launch for two.
    pub fn norm_rows_rounded(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        d: Option<&CudaView<'_, f32>>,
        w: &CudaView<'_, f32>,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<Rounded<'_>> {
        let width = w.len();
        if width == 0
            || !width.is_multiple_of(32)
            || !x.len().is_multiple_of(width)
            || out.len() < x.len()
            || d.is_some_and(|d| d.len() < x.len())
        {
            return Err(Error::invalid(format!(
                "CUDA norm_rows_rounded: {} values plus {:?}, {} outputs, rows of {width} (a \
                 multiple of 32)",
                x.len(),
                d.map(|d| d.len()),
                out.len()
            )));
        }
        let n = x.len();
        let mut r = self.int8_scratch(&self.rounded, n)?;
        let (rows, width) = (n / width, int(width)?);
        if rows == 0 {
            return Ok(r);
        }
        let (xq, xds) = r.as_mut().expect("allocated by int8_scratch");
        let d = self.address(d);
        launch!(
            self,
            "norm_q8",
            per_row(rows)?,
            x,
            &d,
            out,
            w,
            &width,
            &eps,
            &mut *xq,
            &mut *xds
        )?;
        Ok(r)
    }

    /// Per-head RMSNorm (weights `wq`, `wk`, one head wide) then NeoX
    /// rotary embedding of `t` rows of q's and k's heads, in place, in
    /// one launch: as [`Gpu::rms_norm`] then [`Gpu::rope`] on each. With
    /// `cache`, the same launch also makes [`Gpu::kv_write`]'s writes of
    /// the rotated keys and of `cache.v` into a layer's buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope(
        &self,
        q: &mut CudaViewMut<'_, f32>,
        k: &mut CudaViewMut<'_, f32>,
        wq: &CudaView<'_, f32>,
        wk: &CudaView<'_, f32>,
        t: usize,
        cos: &CudaView<'_, f32>,
        sin: &CudaView<'_, f32>,
        eps: f32,
        cache: Option<KvTarget<'_>>,
    ) -> Result<()> {
        let head = wq.len();
        let half = head / 2;
        if t == 0 {
            return Ok(());
        }
        if head == 0
            || !head.is_multiple_of(2)
            || wk.len() != head
            || !q.len().is_multiple_of(t * head)
            || !k.len().is_multiple_of(t * head)
            || cos.len() < t * half
            || sin.len() < t * half
        {
            return Err(Error::invalid(format!(
                "CUDA qk_norm_rope: {} and {} values in {t} rows of heads {head} wide \
                 (norms of {} and {}); tables of {} and {}",
                q.len(),
                k.len(),
                wq.len(),
                wk.len(),
                cos.len(),
                sin.len()
            )));
        }
        let (q_heads, k_heads) = (q.len() / (t * head), k.len() / (t * head));
        // A warp a head, QK_WARPS heads a block (ops.cu).
        let head_blocks = (t * (q_heads + k_heads)).div_ceil(QK_WARPS);
        let blocks = |n| -> Result<LaunchConfig> {
            Ok(LaunchConfig {
                grid_dim: (int(n)? as u32, 1, 1),
                block_dim: (32 * QK_WARPS as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        let (head, q_heads, k_heads, t32) = (int(head)?, int(q_heads)?, int(k_heads)?, int(t)?);
        let Some(mut c) = cache else {
            return launch!(
                self,
                "qk_norm_rope",
                blocks(head_blocks)?,
                q,
                k,
                wq,
                wk,
                cos,
                sin,
                &head,
                &q_heads,
                &k_heads,
                &t32,
                &eps,
                &0u64,
                &0u64,
                &0u64,
                &0i32,
                &0u64
            );
        };
        let (kw, vw) = (k.len() / t, c.v.len() / t);
        if c.keys.len() < (c.pos + t) * kw
            || c.values.len() < (c.pos + t) * vw
            || c.v.len() != t * vw
            || c.pos_at.is_empty()
        {
            return Err(Error::invalid(format!(
                "CUDA qk_norm_rope: {t} rows of {kw} keys and {} values at {} into caches of {} \
                 and {}",
                c.v.len(),
                c.pos,
                c.keys.len(),
                c.values.len()
            )));
        }
        // The value copy's blocks, after the heads'.
        let cfg = blocks(head_blocks + (t * vw).div_ceil(32 * QK_WARPS))?;
        let vw = int(vw)?;
        launch!(
            self,
            "qk_norm_rope",
            cfg,
            q,
            k,
            wq,
            wk,
            cos,
            sin,
            &head,
            &q_heads,
            &k_heads,
            &t32,
            &eps,
            &c.v,
            &mut c.keys,
            &mut c.values,
            &vw,
            &c.pos_at
        )
    }

    /// RMSNorm in place of the first `w.len()` values of each
    /// `stride`-wide row of `x` (per-head q/k norms).
    pub fn rms_norm(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        stride: usize,
        w: &CudaView<'_, f32>,
        eps: f32,
    ) -> Result<()> {
        let width = w.len();
        if width == 0 || width > stride || !x.len().is_multiple_of(stride) {
            return Err(Error::invalid(format!(
                "CUDA rms_norm: {} values, rows of {stride}, norms of {width}",
                x.len()
            )));
        }
        let rows = x.len() / stride;
        if rows == 0 {
            return Ok(());
        }
        let (width, stride) = (int(width)?, int(stride)?);
        launch!(
            self,
            "rms_norm_in_place",
            per_row(rows)?,
            x,
            w,
            &width,
            &stride,
            &eps
        )
    }

    /// Rotates `x` (`t` rows of heads `head` wide) in place from element
    /// `skip` of each head, NeoX or interleaved pairs, with `cos`/`sin`
    /// `t` rows of `(head - skip) / 2` (as [`super::Rope::tables`] makes).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        t: usize,
        head: usize,
        skip: usize,
        cos: &CudaView<'_, f32>,
        sin: &CudaView<'_, f32>,
        interleaved: bool,
    ) -> Result<()> {
        if t == 0 {
            return Ok(());
        }
        let width = x.len() / t;
        let half = head.saturating_sub(skip) / 2;
        if head == 0
            || width * t != x.len()
            || !width.is_multiple_of(head)
            || cos.len() < t * half
            || sin.len() < t * half
        {
            return Err(Error::invalid(format!(
                "CUDA rope: {} values in {t} rows of heads {head} wide from {skip}; \
                 tables of {} and {} for {half} per row",
                x.len(),
                cos.len(),
                sin.len()
            )));
        }
        let pairs = t * (width / head) * half;
        let (t, width, head, skip) = (int(t)?, int(width)?, int(head)?, int(skip)?);
        let interleaved = interleaved as i32;
        launch!(
            self,
            "rope",
            LaunchConfig::for_num_elems(int(pairs)? as u32),
            x,
            cos,
            sin,
            &t,
            &width,
            &head,
            &skip,
            &interleaved
        )
    }

    /// `gate = silu(gate) * up`.
    pub fn silu_mul(&self, gate: &mut CudaViewMut<'_, f32>, up: &CudaView<'_, f32>) -> Result<()> {
        if up.len() < gate.len() {
            return Err(Error::invalid(format!(
                "CUDA silu_mul: {} gates, {} ups",
                gate.len(),
                up.len()
            )));
        }
        let n = gate.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig::for_num_elems(int(gate.len())? as u32);
        launch!(self, "silu_mul", cfg, gate, up, &n)
    }

    /// Each of `t` tokens' top-k (expert, weight) pairs from its router
    /// logits (`[t, n]`), as [`super::route`] chooses them, into `ids` and
    /// `weights` (`[t, top_k]` each).
    pub fn route(
        &self,
        logits: &CudaView<'_, f32>,
        t: usize,
        r: &Routing,
        bias: Option<&CudaView<'_, f32>>,
        ids: &mut CudaViewMut<'_, u32>,
        weights: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        if t == 0 {
            return Ok(());
        }
        let a = route_args(
            logits.len(),
            t,
            r,
            bias.map(|b| b.len()),
            ids.len(),
            weights.len(),
        )?;
        // A block a token, an expert or more a thread.
        let cfg = LaunchConfig {
            grid_dim: (int(t)? as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // Without a bias the kernel never reads the second buffer.
        launch!(
            self,
            "route",
            cfg,
            logits,
            bias.unwrap_or(logits),
            &a.has_bias,
            &a.n,
            &a.k,
            &a.sigmoid,
            &a.n_group,
            &a.topk_group,
            &a.norm,
            &r.scale,
            ids,
            weights
        )
    }

    /// `x`'s router logits through `router` into `logits` (`[t, n]`) and
    /// their routing into `ids` and `weights`, as [`Gpu::matmul`] then
    /// [`Gpu::route`]: in one launch for a few tokens through a float
    /// router (`router_route`: its last block to finish routes), else those
    /// two.
    #[allow(clippy::too_many_arguments)]
    pub fn router_route(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        router: &GpuMatrix,
        r: &Routing,
        bias: Option<&CudaView<'_, f32>>,
        logits: &mut CudaViewMut<'_, f32>,
        ids: &mut CudaViewMut<'_, u32>,
        weights: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let fused = matches!(router.dtype, DType::F32 | DType::F16 | DType::BF16)
            && router.cols.is_multiple_of(32)
            && (1..=MATVEC_MAX_TOKENS).contains(&t)
            && x.len() >= t * router.cols
            && logits.len() >= t * router.rows;
        if !fused {
            self.matmul(x, t, router, logits)?;
            let logits = logits.slice(..t * router.rows);
            return self.route(&logits, t, r, bias, ids, weights);
        }
        let n = router.rows;
        let a = route_args(t * n, t, r, bias.map(|b| b.len()), ids.len(), weights.len())?;
        let mut done = self.done_counters(1)?;
        let done = done.as_mut().expect("allocated by done_counters");
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(MV_ROWS as usize) as u32, 1, 1),
            block_dim: (32, MV_ROWS, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("router_route_{}", kernel_dtype(router.dtype)?);
        let (row_bytes, cols, t) = (
            router.dtype.row_bytes(router.cols) as u64,
            int(router.cols)?,
            int(t)?,
        );
        // Without a bias the kernel never reads the bias argument.
        let x_bias = bias.map_or(x.slice(..1), |b| b.slice(..));
        launch!(
            self,
            &name,
            cfg,
            &router.data,
            &row_bytes,
            x,
            logits,
            &a.n,
            &cols,
            &t,
            &x_bias,
            &a.has_bias,
            &a.k,
            &a.sigmoid,
            &a.n_group,
            &a.topk_group,
            &a.norm,
            &r.scale,
            ids,
            weights,
            &mut *done
        )
    }

    /// [`Gpu::route`], then the chosen pairs on the host, each token's in
    /// choice order: all the host needs from routing to drive expert I/O.
    pub fn route_to_host(
        &self,
        logits: &CudaView<'_, f32>,
        t: usize,
        r: &Routing,
        bias: Option<&CudaView<'_, f32>>,
    ) -> Result<Vec<(u32, f32)>> {
        let mut ids = self.zeros::<u32>(t * r.top_k)?;
        let mut weights = self.zeros::<f32>(t * r.top_k)?;
        let (mut iv, mut wv) = (ids.as_view_mut(), weights.as_view_mut());
        self.route(logits, t, r, bias, &mut iv, &mut wv)?;
        let (ids, weights) = (self.download(&ids)?, self.download(&weights)?);
        Ok(ids.into_iter().zip(weights).collect())
    }

    /// Causal attention of `t` queries (`[t, n_heads * head_dim]`, positions
    /// `s.pos0..s.pos0 + t`) over `keys`/`values` holding positions
    /// `0..s.pos0 + t`, into `out` (`[t, n_heads * v_dim]`), as the CPU's
    /// `kernels::attention`. With `pos_at`, the kernel reads `pos0` from
    /// the device (it must equal `s.pos0` now) and the launch does not
    /// depend on it: a captured step replays at later positions while the
    /// cache's buffers stay.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaView<'_, f32>,
        keys: &CudaView<'_, f32>,
        values: &CudaView<'_, f32>,
        s: AttnShape,
        pos_at: Option<&CudaView<'_, u32>>,
        t: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.attention_rounded(q, keys, values, s, pos_at, t, out, false)
            .map(drop)
    }

    /// [`Gpu::attention`]; with `round`, where the launch can also round its
    /// output to int8 per 32-block (one token, the heads of a KV group in
    /// one block, values a multiple of 32 wide, int8 activations on), it
    /// does, and returns the rounded rows locked for
    /// [`Gpu::matmul_each_rounded`] (the output projection's input, one
    /// launch fewer); else `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rounded(
        &self,
        q: &CudaView<'_, f32>,
        keys: &CudaView<'_, f32>,
        values: &CudaView<'_, f32>,
        s: AttnShape,
        pos_at: Option<&CudaView<'_, u32>>,
        t: usize,
        out: &mut CudaViewMut<'_, f32>,
        round: bool,
    ) -> Result<Option<Rounded<'_>>> {
        if t == 0 {
            return Ok(None);
        }
        let total = s.pos0 + t;
        let bad = s.n_kv_heads == 0
            || !s.n_heads.is_multiple_of(s.n_kv_heads)
            || s.head_dim > ATT_MAX_HEAD
            || s.v_dim > ATT_MAX_V
            || s.window == Some(0)
            || q.len() < t * s.n_heads * s.head_dim
            || out.len() < t * s.n_heads * s.v_dim
            || keys.len() < (total - 1) * s.k_stride + s.n_kv_heads * s.head_dim
            || values.len() < (total - 1) * s.v_stride + s.n_kv_heads * s.v_dim
            || pos_at.is_some_and(|p| p.is_empty());
        if bad {
            return Err(Error::invalid(format!(
                "CUDA attention: {s:?} for {t} tokens (heads at most {ATT_MAX_HEAD} wide, \
                 values {ATT_MAX_V}) with {} queries, {} keys, {} values, {} outputs",
                q.len(),
                keys.len(),
                values.len(),
                out.len()
            )));
        }
        let (n_heads, n_kv) = (int(s.n_heads)?, int(s.n_kv_heads)?);
        let (hd, vd) = (int(s.head_dim)?, int(s.v_dim)?);
        let (ks, vs) = (int(s.k_stride)?, int(s.v_stride)?);
        let (pos0, window) = (int(s.pos0)?, int(s.window.unwrap_or(0))?);
        // Enough blocks for every SM to hold several, each at least
        // ATT_MIN_SPLIT keys of the longest row (decode's few heads);
        // prefill fills the device unsplit.
        // Where the position comes from the device, the split is sized
        // for every position the cache's buffers hold.
        let held = match pos_at {
            Some(_) => (keys.len() - s.n_kv_heads * s.head_dim) / s.k_stride.max(1) + 1,
            None => total,
        };
        let longest = s.window.map_or(held, |w| w.min(held));
        // Rows of whole 16-byte loads: the tiled prompt kernel and the
        // grouped decode kernel read keys, values and queries 4 at a time.
        let aligned = |p: u64| p.is_multiple_of(16);
        let by_4 = [s.head_dim, s.v_dim, s.k_stride, s.v_stride]
            .iter()
            .all(|d| d.is_multiple_of(4))
            && s.head_dim <= 128
            && s.v_dim <= 128
            && aligned(q.device_ptr(&self.compute).0)
            && aligned(keys.device_ptr(&self.compute).0)
            && aligned(values.device_ptr(&self.compute).0)
            && aligned(out.device_ptr(&self.compute).0);
        // A null pointer: the kernel takes `pos0` as given.
        let pos_at = self.address(pos_at);
        if t == 1 && by_4 && s.n_heads / s.n_kv_heads <= GQA_MAX_GROUP {
            let splits = longest.div_ceil(GQA_MIN_KEYS).clamp(1, GQA_MAX_SPLITS);
            let cfg = LaunchConfig {
                grid_dim: (n_kv as u32, splits as u32, 1),
                block_dim: (ATT_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let need = s.n_heads * GQA_MAX_SPLITS * (s.v_dim + 4);
            let mut parts = self.attn_scratch(need, s.n_kv_heads)?;
            let (parts, done) = parts.as_mut().expect("allocated by attn_scratch");
            let name = match s.n_heads / s.n_kv_heads {
                ..=4 => "attention_group4",
                5..=8 => "attention_group8",
                _ => "attention_group16",
            };
            let round = round && s.v_dim.is_multiple_of(32) && self.int8_activations();
            let rounded = match round {
                true => Some(self.int8_scratch(&self.q8, s.n_heads * s.v_dim)?),
                false => None,
            };
            let (xq, xds) = match rounded.as_ref().and_then(|r| r.as_ref()) {
                Some((xq, xds)) => (self.address(Some(xq)), self.address(Some(xds))),
                None => (0, 0),
            };
            launch!(
                self,
                name,
                cfg,
                q,
                keys,
                values,
                &mut *out,
                &mut *parts,
                &n_heads,
                &n_kv,
                &hd,
                &vd,
                &ks,
                &vs,
                &s.scale,
                &pos0,
                &pos_at,
                &window,
                &mut *done,
                &xq,
                &xds
            )?;
            return Ok(rounded);
        }
        let blocks = s.n_heads * t;
        let want = ATT_BLOCKS_PER_SM * self.info.sm_count;
        let splits = if blocks >= want {
            1
        } else {
            want.div_ceil(blocks)
                .min(longest.div_ceil(ATT_MIN_SPLIT))
                .max(1)
        };
        let cfg = LaunchConfig {
            grid_dim: (n_heads as u32, int(t)? as u32, int(splits)? as u32),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // Sized for the most splits this shape reaches as the keys grow (a
        // few hundred KB), not this call's: a decode step captured as a
        // graph must not find it growing.
        // With it, a counter per (head, token): the split finishing last
        // merges them, and leaves it at zero.
        let (need, counters) = if blocks < want {
            (blocks * want.div_ceil(blocks) * (s.v_dim + 2), blocks)
        } else {
            (1, 1)
        };
        let mut parts = self.attn_scratch(need, counters)?;
        let (parts, done) = parts.as_mut().expect("allocated by attn_scratch");
        let n_splits = int(splits)?;
        // A prompt (blocks enough unsplit) with heads the tiled kernel
        // takes: keys and values read once per block of query rows.
        if splits == 1 && t > 1 && by_4 {
            let rows = t * (s.n_heads / s.n_kv_heads);
            let cfg = LaunchConfig {
                grid_dim: (n_kv as u32, int(rows.div_ceil(PR_ROWS))? as u32, 1),
                block_dim: (PR_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let t = int(t)?;
            launch!(
                self,
                "attention_rows",
                cfg,
                q,
                keys,
                values,
                out,
                &n_heads,
                &n_kv,
                &hd,
                &vd,
                &ks,
                &vs,
                &s.scale,
                &pos0,
                &pos_at,
                &window,
                &t
            )?;
            return Ok(None);
        }
        launch!(
            self,
            "attention",
            cfg,
            q,
            keys,
            values,
            &mut *out,
            &mut *parts,
            &n_heads,
            &n_kv,
            &hd,
            &vd,
            &ks,
            &vs,
            &s.scale,
            &pos0,
            &pos_at,
            &window,
            &n_splits,
            done
        )?;
        Ok(None)
    }
}

impl Gpu {
    /// `t` rows of keys `k` (`[t, kw]`) into `keys` and, when given, of
    /// values (`[t, vw]`) into their cache, at the position `pos_at` holds on
    /// the device, in one launch; `pos` is that position, to check the
    /// caches against.
    pub fn kv_write(
        &self,
        (k, keys, kw): (&CudaView<'_, f32>, &mut CudaViewMut<'_, f32>, usize),
        v: Option<(&CudaView<'_, f32>, &mut CudaViewMut<'_, f32>, usize)>,
        t: usize,
        (pos, pos_at): (usize, &CudaView<'_, u32>),
    ) -> Result<()> {
        let vw = v.as_ref().map_or(0, |v| v.2);
        let short = |src: usize, dst: usize, w: usize| src < t * w || dst < (pos + t) * w;
        if short(k.len(), keys.len(), kw)
            || v.as_ref()
                .is_some_and(|(v, values, vw)| short(v.len(), values.len(), *vw))
            || pos_at.is_empty()
        {
            return Err(Error::invalid(format!(
                "CUDA kv_write: {t} rows of {kw} keys and {vw} values at {pos} into caches of {} \
                 and {}",
                keys.len(),
                v.as_ref().map_or(0, |v| v.1.len())
            )));
        }
        let n = t * (kw + vw);
        if n == 0 {
            return Ok(());
        }
        let (kw, vw, t, cfg) = (int(kw)?, int(vw)?, int(t)?, elems(n)?);
        match v {
            Some((v, values, _)) => {
                launch!(self, "kv_write", cfg, k, keys, &kw, v, values, &vw, &t, pos_at)
            }
            // No values: null pointers the kernel never reads.
            None => launch!(self, "kv_write", cfg, k, keys, &kw, &0u64, &0u64, &vw, &t, pos_at),
        }
    }

    /// `y += x`.
    pub fn add(&self, y: &mut CudaViewMut<'_, f32>, x: &CudaView<'_, f32>) -> Result<()> {
        if x.len() < y.len() {
            return Err(Error::invalid(format!(
                "CUDA add: {} values plus {}",
                y.len(),
                x.len()
            )));
        }
        if y.is_empty() {
            return Ok(());
        }
        let n = y.len() as u64;
        let cfg = elems(y.len())?;
        launch!(self, "add", cfg, y, x, &n)
    }

    /// Adds `row` to every row of `y`.
    pub fn add_rows(&self, y: &mut CudaViewMut<'_, f32>, row: &CudaView<'_, f32>) -> Result<()> {
        if row.is_empty() || !y.len().is_multiple_of(row.len()) {
            return Err(Error::invalid(format!(
                "CUDA add_rows: {} values in rows of {}",
                y.len(),
                row.len()
            )));
        }
        if y.is_empty() {
            return Ok(());
        }
        let (n, width) = (y.len() as u64, int(row.len())?);
        let cfg = elems(y.len())?;
        launch!(self, "add_rows", cfg, y, row, &n, &width)
    }

    /// Clamps every value to `[-limit, limit]`.
    pub fn clamp(&self, x: &mut CudaViewMut<'_, f32>, limit: f32) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as u64;
        let cfg = elems(x.len())?;
        launch!(self, "clamp", cfg, x, &n, &limit)
    }

    /// `y[i] += sigmoid(g[i]) * x[i]` for each `width`-wide row `i`.
    pub fn gated_add(
        &self,
        y: &mut CudaViewMut<'_, f32>,
        x: &CudaView<'_, f32>,
        g: &CudaView<'_, f32>,
    ) -> Result<()> {
        let rows = g.len();
        if rows == 0 || !y.len().is_multiple_of(rows) || x.len() < y.len() {
            return Err(Error::invalid(format!(
                "CUDA gated_add: {} values, {} inputs, {rows} gates",
                y.len(),
                x.len()
            )));
        }
        if y.is_empty() {
            return Ok(());
        }
        let (n, width) = (y.len() as u64, int(y.len() / rows)?);
        let cfg = elems(y.len())?;
        launch!(self, "gated_add", cfg, y, x, g, &n, &width)
    }

    /// Row `i` of `out` is row `order[i] / k` of `x` (`width` wide).
    pub fn gather(
        &self,
        x: &CudaView<'_, f32>,
        width: usize,
        order: &CudaView<'_, u32>,
        k: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let n = order.len() * width;
        if k == 0 || out.len() < n {
            return Err(Error::invalid(format!(
                "CUDA gather: {} rows of {width} (k {k}) into {}",
                order.len(),
                out.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (rows, k, width) = (x.len() / width.max(1), int(k)?, int(width)?);
        let (n64, rows) = (n as u64, int(rows)?);
        launch!(
            self,
            "gather",
            elems(n)?,
            x,
            order,
            &k,
            &width,
            &rows,
            out,
            &n64
        )
    }

    /// Row `tok` of `y` (`t` rows of `width`) is `Σ_j w[tok * k + j] ·
    /// ys[pos[tok * k + j]]`, summed from zero in `j` order.
    #[allow(clippy::too_many_arguments)]
    pub fn scatter(
        &self,
        ys: &CudaView<'_, f32>,
        pos: &CudaView<'_, u32>,
        w: &CudaView<'_, f32>,
        k: usize,
        t: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let width = y.len() / t.max(1);
        if k == 0 || pos.len() < t * k || w.len() < t * k || width * t != y.len() {
            return Err(Error::invalid(format!(
                "CUDA scatter: {t} tokens of {k} into {} values; {} positions, {} weights",
                y.len(),
                pos.len(),
                w.len()
            )));
        }
        if y.is_empty() {
            return Ok(());
        }
        let rows = int(ys.len() / width)?;
        let (n, k, width) = (y.len() as u64, int(k)?, int(width)?);
        let cfg = elems(y.len())?;
        launch!(self, "scatter", cfg, ys, pos, w, &k, &width, &rows, y, &n)
    }

    /// Each of `ids.len()` (token, slot) pairs through its expert's gate
    /// and up rows: `y[p] = silu(gate_e · x[p / k]) * (up_e · x[p / k])`
    /// with `e = ids[p]`, as `silu_mul` over the two products, every
    /// chosen expert in one launch with the ids left on the device.
    pub fn swiglu_id(
        &self,
        gate: &ExpertTable,
        up: &ExpertTable,
        ids: &CudaView<'_, u32>,
        x: &CudaView<'_, f32>,
        k: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let pairs = ids.len();
        let same = (gate.dtype, gate.rows, gate.cols, gate.ptrs.len())
            == (up.dtype, up.rows, up.cols, up.ptrs.len());
        if !same || k == 0 || x.len() < pairs.div_ceil(k) * gate.cols || y.len() < pairs * gate.rows
        {
            return Err(Error::invalid(format!(
                "CUDA swiglu_id: {pairs} pairs (k {k}) through gates [{}, {}] and ups [{}, {}] \
                 with {} inputs and {} outputs",
                gate.rows,
                gate.cols,
                up.rows,
                up.cols,
                x.len(),
                y.len()
            )));
        }
        if pairs == 0 || gate.rows == 0 {
            return Ok(());
        }
        let (n_exp, k, rows, cols) = (
            int(gate.ptrs.len())?,
            int(k)?,
            int(gate.rows)?,
            int(gate.cols)?,
        );
        let row_bytes = gate.dtype.row_bytes(gate.cols) as u64;
        if self.mmvq_for(gate) {
            let tokens = pairs.div_ceil(k as usize);
            let q8 = self.quantize_q8(x, tokens * gate.cols)?;
            let (xq, xds) = q8.as_ref().expect("quantized above");
            return self.swiglu_id_q8(gate, up, ids, (xq, xds), k as usize, y, None);
        }
        let name = format!("swiglu_id_{}", kernel_dtype(gate.dtype)?);
        launch!(
            self,
            &name,
            per_pair(gate.rows, pairs)?,
            &gate.ptrs,
            &up.ptrs,
            ids,
            &n_exp,
            &row_bytes,
            x,
            &k,
            y,
            &rows,
            &cols
        )
    }

    /// As [`Gpu::swiglu_id`] on rows a norm rounded as it wrote them; the
    /// experts must take the int8 kernels ([`Gpu::takes_int8_experts`]).
    /// With `round` (and rows a multiple of 32), `y` is also rounded to
    /// int8 as it is written, as [`Gpu::matvec_id_sum`] would round it
    /// first: returned for that call, a launch fewer a layer.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_id_rounded(
        &self,
        gate: &ExpertTable,
        up: &ExpertTable,
        ids: &CudaView<'_, u32>,
        rounded: &Rounded<'_>,
        k: usize,
        y: &mut CudaViewMut<'_, f32>,
        round: bool,
    ) -> Result<Option<Rounded<'_>>> {
        let pairs = ids.len();
        let ok = rounded.as_ref().filter(|(xq, _)| {
            let same = (gate.dtype, gate.rows, gate.cols, gate.ptrs.len())
                == (up.dtype, up.rows, up.cols, up.ptrs.len());
            same && k > 0
                && self.mmvq_for(gate)
                && xq.len() >= pairs.div_ceil(k) * gate.cols
                && y.len() >= pairs * gate.rows
        });
        let Some((xq, xds)) = ok else {
            return Err(Error::invalid(format!(
                "CUDA swiglu_id_rounded: {pairs} pairs (k {k}) through [{}, {}] ({}) with {} \
                 rounded inputs and {} outputs",
                gate.rows,
                gate.cols,
                gate.dtype.name(),
                rounded.as_ref().map_or(0, |(q, _)| q.len()),
                y.len()
            )));
        };
        if pairs == 0 || gate.rows == 0 {
            return Ok(None);
        }
        let mut out = match round && gate.rows.is_multiple_of(32) {
            true => Some(self.int8_scratch(&self.q8, pairs * gate.rows)?),
            false => None,
        };
        let yq = out.as_mut().and_then(|o| o.as_mut()).map(|(q, d)| (q, d));
        self.swiglu_id_q8(gate, up, ids, (xq, xds), k, y, yq)?;
        Ok(out)
    }

    /// The int8 `swiglu_id` launch on rounded rows, its outputs also
    /// rounded into `yq` when given.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_id_q8(
        &self,
        gate: &ExpertTable,
        up: &ExpertTable,
        ids: &CudaView<'_, u32>,
        (xq, xds): (&CudaSlice<u8>, &CudaSlice<f32>),
        k: usize,
        y: &mut CudaViewMut<'_, f32>,
        yq: Option<(&mut CudaSlice<u8>, &mut CudaSlice<f32>)>,
    ) -> Result<()> {
        let pairs = ids.len();
        let (n_exp, k, rows, cols) = (
            int(gate.ptrs.len())?,
            int(k)?,
            int(gate.rows)?,
            int(gate.cols)?,
        );
        let row_bytes = gate.dtype.row_bytes(gate.cols) as u64;
        let name = format!("mmvq_swiglu_id_{}", kernel_dtype(gate.dtype)?);
        let (cfg, lanes) = self.per_q8_row(gate.rows, gate.cols, pairs)?;
        let mut done = match yq {
            Some(_) => Some(self.done_counters(pairs * gate.rows / 32)?),
            None => None,
        };
        let (q, ds, done) = (
            self.address(yq.as_ref().map(|y| &*y.0)),
            self.address(yq.as_ref().map(|y| &*y.1)),
            self.address(done.as_mut().and_then(|d| d.as_ref())),
        );
        launch!(
            self, &name, cfg, &gate.ptrs, &up.ptrs, ids, &n_exp, &row_bytes, xq, xds, &k, y, &rows,
            &cols, &lanes, &q, &ds, &done
        )
    }

    /// Each of `ids.len()` pairs' own row of `x` (`[pairs, cols]`) through
    /// its expert: `y[p] = w_e · x[p]` with `e = ids[p]`, in one launch.
    pub fn matvec_id(
        &self,
        w: &ExpertTable,
        ids: &CudaView<'_, u32>,
        x: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let pairs = ids.len();
        if x.len() < pairs * w.cols || y.len() < pairs * w.rows {
            return Err(Error::invalid(format!(
                "CUDA matvec_id: {pairs} pairs through [{}, {}] with {} inputs and {} outputs",
                w.rows,
                w.cols,
                x.len(),
                y.len()
            )));
        }
        if pairs == 0 || w.rows == 0 {
            return Ok(());
        }
        let (n_exp, rows, cols) = (int(w.ptrs.len())?, int(w.rows)?, int(w.cols)?);
        let row_bytes = w.dtype.row_bytes(w.cols) as u64;
        let one = 1i32;
        if self.mmvq_for(w) {
            let mut q8 = self.quantize_q8(x, pairs * w.cols)?;
            let (xq, xds) = q8.as_mut().expect("quantized above");
            let name = format!("mmvq_id_{}", kernel_dtype(w.dtype)?);
            let (cfg, lanes) = self.per_q8_row(w.rows, w.cols, pairs)?;
            return launch!(
                self, &name, cfg, &w.ptrs, ids, &n_exp, &row_bytes, &*xq, &*xds, &one, y, &rows,
                &cols, &lanes
            );
        }
        let name = format!("matvec_id_{}", kernel_dtype(w.dtype)?);
        launch!(
            self,
            &name,
            per_pair(w.rows, pairs)?,
            &w.ptrs,
            ids,
            &n_exp,
            &row_bytes,
            x,
            &one,
            y,
            &rows,
            &cols
        )
    }

    /// The experts `used` over their gathered rows of `x` (`[pairs, cols]`,
    /// expert `e`'s rows `start[e]..start[e + 1]`, at most `most` of them)
    /// into the same rows of `y`, every expert in one launch: a prefill's
    /// grouped experts as [`Gpu::matmul`]'s tiled kernel runs each.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_id(
        &self,
        w: &ExpertTable,
        used: &CudaView<'_, u32>,
        start: &CudaView<'_, u32>,
        most: usize,
        pairs: usize,
        x: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        if x.len() < pairs * w.cols
            || y.len() < pairs * w.rows
            || start.len() != w.ptrs.len() + 1
            || used.len() > w.ptrs.len()
        {
            return Err(Error::invalid(format!(
                "CUDA gemm_id: {pairs} rows of {} experts used of {} through [{}, {}] with {} \
                 inputs and {} outputs, {} row starts",
                used.len(),
                w.ptrs.len(),
                w.rows,
                w.cols,
                x.len(),
                y.len(),
                start.len()
            )));
        }
        if used.is_empty() || most == 0 || w.rows == 0 {
            return Ok(());
        }
        let (rows, cols) = (int(w.rows)?, int(w.cols)?);
        let row_bytes = w.dtype.row_bytes(w.cols) as u64;
        let cfg = Self::tiles(w.rows, most, used.len())?;
        if self.int8_tiles() && q8_rows(w.dtype, w.cols) {
            let q8 = self.quantize_q8(x, pairs * w.cols)?;
            let (xq, xds) = q8.as_ref().expect("quantized above");
            let name = format!("mmq_id_{}", kernel_dtype(w.dtype)?);
            return launch!(
                self, &name, cfg, &w.ptrs, used, start, &row_bytes, xq, xds, y, &rows, &cols
            );
        }
        let name = format!("gemm_id_{}", kernel_dtype(w.dtype)?);
        let exact = self.exact_gemm();
        launch!(self, &name, cfg, &w.ptrs, used, start, &row_bytes, x, y, &rows, &cols, &exact)
    }

    /// `matvec_id` of `x` through `w` (each pair's own row) then
    /// `moe_combine` of the outputs with `weights` into `y` (`[t, w.rows]`),
    /// in one launch where the int8 kernels take `w` and `k` is at most
    /// SUM_MAX_K: a decode step's experts' down projections and their sum.
    /// `ys` (`[t * k, w.rows]`) holds the outputs where it takes two.
    /// `rounded`: `x` as [`Gpu::swiglu_id_rounded`] rounded it, if it did
    /// (else the int8 kernel rounds `x` first).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_id_sum(
        &self,
        w: &ExpertTable,
        ids: &CudaView<'_, u32>,
        (x, rounded): (&CudaView<'_, f32>, Option<&Rounded<'_>>),
        weights: &CudaView<'_, f32>,
        k: usize,
        t: usize,
        ys: &mut CudaViewMut<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let pairs = t * k;
        if k == 0
            || ids.len() < pairs
            || weights.len() < pairs
            || x.len() < pairs * w.cols
            || y.len() < t * w.rows
        {
            return Err(Error::invalid(format!(
                "CUDA matvec_id_sum: {t} tokens of {k} pairs through [{}, {}] with {} ids, {} \
                 weights, {} inputs and {} outputs",
                w.rows,
                w.cols,
                ids.len(),
                weights.len(),
                x.len(),
                y.len()
            )));
        }
        if !self.mmvq_for(w) || k > SUM_MAX_K {
            self.matvec_id(w, &ids.slice(..pairs), x, ys)?;
            // `moe_combine` takes the row width from `y`: only the rows
            // the fused kernel would write.
            let y = &mut y.slice_mut(..t * w.rows);
            return self.moe_combine(&ys.as_view(), &ids.slice(..pairs), weights, k, t, y);
        }
        if pairs == 0 || w.rows == 0 {
            return Ok(());
        }
        let (n_exp, rows, cols) = (int(w.ptrs.len())?, int(w.rows)?, int(w.cols)?);
        let (row_bytes, k) = (w.dtype.row_bytes(w.cols) as u64, int(k)?);
        let n = pairs * w.cols;
        // A guard given holds the scratch `quantize_q8` would lock.
        let given = match rounded {
            Some(r) => match r.as_ref().filter(|(xq, _)| xq.len() >= n) {
                Some(r) => Some(r),
                None => {
                    return Err(Error::invalid(format!(
                        "CUDA matvec_id_sum: fewer than {n} rounded inputs"
                    )))
                }
            },
            None => None,
        };
        let q8 = match given {
            Some(_) => None,
            None => Some(self.quantize_q8(x, n)?),
        };
        let (xq, xds) = given
            .or_else(|| q8.as_ref().and_then(|q| q.as_ref()))
            .expect("rounded above");
        let name = format!("mmvq_id_sum_{}", kernel_dtype(w.dtype)?);
        // A group of lanes a pair, up to MQ_WARPS warps of them (Mixtral's
        // two pairs leave no warp idle).
        let lanes = self.q8_lanes_for(w.cols);
        let warps = (k as u32 * lanes).div_ceil(32).min(MQ_WARPS);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, int(t)? as u32, 1),
            block_dim: (32, warps, 1),
            shared_mem_bytes: 0,
        };
        let lanes = lanes as i32;
        launch!(
            self, &name, cfg, &w.ptrs, ids, &n_exp, &row_bytes, xq, xds, weights, &k, y, &rows,
            &cols, &lanes
        )
    }

    /// Row `tok` of `y` (`t` rows) is `Σ_j w[tok * k + j] · ys[tok * k + j]`
    /// over its `k` pairs in ascending expert id, summed from zero as the
    /// CPU sums a token's experts.
    pub fn moe_combine(
        &self,
        ys: &CudaView<'_, f32>,
        ids: &CudaView<'_, u32>,
        w: &CudaView<'_, f32>,
        k: usize,
        t: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let width = y.len() / t.max(1);
        if k == 0
            || ids.len() < t * k
            || w.len() < t * k
            || width * t != y.len()
            || ys.len() < t * k * width
        {
            return Err(Error::invalid(format!(
                "CUDA moe_combine: {t} tokens of {k} into {} values; {} ids, {} weights, {} rows",
                y.len(),
                ids.len(),
                w.len(),
                ys.len()
            )));
        }
        if y.is_empty() {
            return Ok(());
        }
        let (n, k, width) = (y.len() as u64, int(k)?, int(width)?);
        let cfg = elems(y.len())?;
        launch!(self, "moe_combine", cfg, ys, ids, w, &k, &width, y, &n)
    }

    /// Latent attention's queries in latent space, as the CPU backend's
    /// `mla_absorb`: `q` `[t, heads, nope + rope]` through `kv_b` (widened
    /// to f32, `[heads * (nope + v_dim), rank]`) into `qa`
    /// `[t, heads, rank + rope]`.
    pub fn mla_absorb(
        &self,
        q: &CudaView<'_, f32>,
        t: usize,
        kv_b: &CudaView<'_, f32>,
        s: MlaShape,
        qa: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let n = t * s.n_heads * (s.rank + s.rope);
        if q.len() < t * s.n_heads * (s.nope + s.rope)
            || qa.len() < n
            || kv_b.len() < mla_weights(s)
        {
            return Err(Error::invalid(format!(
                "CUDA mla_absorb: {s:?} for {t} tokens with {} queries, {} weights, {} outputs",
                q.len(),
                kv_b.len(),
                qa.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let [t, nh, nope, rope, vd, rank] =
            [t, s.n_heads, s.nope, s.rope, s.v_dim, s.rank].map(int);
        let (t, nh, nope, rope, vd, rank) = (t?, nh?, nope?, rope?, vd?, rank?);
        launch!(
            self,
            "mla_absorb",
            elems(n)?,
            q,
            kv_b,
            qa,
            &t,
            &nh,
            &nope,
            &rope,
            &vd,
            &rank
        )
    }

    /// Each head's latent output `lat` `[t, heads, rank]` through its value
    /// rows of `kv_b` (widened, as for [`Gpu::mla_absorb`]) into `out`
    /// `[t, heads, v_dim]`.
    pub fn mla_values(
        &self,
        lat: &CudaView<'_, f32>,
        t: usize,
        kv_b: &CudaView<'_, f32>,
        s: MlaShape,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let n = t * s.n_heads * s.v_dim;
        if lat.len() < t * s.n_heads * s.rank || out.len() < n || kv_b.len() < mla_weights(s) {
            return Err(Error::invalid(format!(
                "CUDA mla_values: {s:?} for {t} tokens with {} latents, {} weights, {} outputs",
                lat.len(),
                kv_b.len(),
                out.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let [t, nh, nope, vd, rank] = [t, s.n_heads, s.nope, s.v_dim, s.rank].map(int);
        let (t, nh, nope, vd, rank) = (t?, nh?, nope?, vd?, rank?);
        launch!(
            self,
            "mla_values",
            elems(n)?,
            lat,
            kv_b,
            out,
            &t,
            &nh,
            &nope,
            &vd,
            &rank
        )
    }
}

/// `kv_b`'s floats: `heads * (nope + v_dim)` rows of `rank`.
fn mla_weights(s: MlaShape) -> usize {
    s.n_heads * (s.nope + s.v_dim) * s.rank
}

/// One thread per element.
fn elems(n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig::for_num_elems(int(n)? as u32))
}

/// The kernels' name for a weight type, or an error for one they lack.
fn kernel_dtype(d: DType) -> Result<&'static str> {
    match d {
        DType::Quant(QuantType::Q3K | QuantType::Q2K) => Err(Error::invalid(format!(
            "CUDA: no kernel for {} weights (f32, f16, bf16, q4_0, q8_0, q4_k, q5_k, q6_k)",
            d.name()
        ))),
        _ => Ok(d.name()),
    }
}

/// Lanes of the int8 kernels per row `cols` wide (`cols / 32` units of 32
/// weights): about four units a lane (two rounds of [`MQ_UNROLL`]), from
/// 16 to 32 lanes. `cuda_bench` on the H200, 8 / 16 / 32 lanes: the q6_k
/// LM head [151,936, 2,048] 116 / 118 / 130 us, a decode step's 8 experts
/// (gate/up [768, 2,048], down [2,048, 768]) 21.4 / 20.1 / 23.1 us,
/// attention's q [4,096, 2,048] 10.0 / 8.8 / 9.0 us: 16 for the
/// 2,048-wide rows all three read, and for an expert's 768-wide down
/// projection too (24 units).
fn q8_lanes(cols: usize) -> u32 {
    ((cols / 32).div_ceil(2 * MQ_UNROLL).next_power_of_two() as u32).clamp(16, 32)
}

/// Whether the int8 kernels take rows of `dtype`, `cols` wide.
fn q8_rows(dtype: DType, cols: usize) -> bool {
    cols.is_multiple_of(256) && matches!(dtype, DType::Quant(QuantType::Q4K | QuantType::Q6K))
}

/// Whether the int8 kernels take `t` tokens through `w`.
fn takes_q8(w: &GpuMatrix, t: usize) -> bool {
    t <= MATVEC_MAX_TOKENS && q8_rows(w.dtype, w.cols)
}

/// The int8 kernel for `t` tokens of `x` through `w` into `y`, or why not.
fn q8_kernel(
    w: &GpuMatrix,
    t: usize,
    x: &CudaView<'_, f32>,
    y: &CudaViewMut<'_, f32>,
) -> Result<&'static str> {
    let name = match w.dtype {
        DType::Quant(QuantType::Q4K) => "mmvq_q4_k",
        DType::Quant(QuantType::Q6K) => "mmvq_q6_k",
        other => {
            return Err(Error::invalid(format!(
                "CUDA matmul_q8: {} rows (q4_k and q6_k only)",
                other.name()
            )))
        }
    };
    if t == 0
        || t > MATVEC_MAX_TOKENS
        || !w.cols.is_multiple_of(256)
        || x.len() < t * w.cols
        || y.len() < t * w.rows
    {
        return Err(Error::invalid(format!(
            "CUDA matmul_q8: {t} tokens (1 to {MATVEC_MAX_TOKENS}) through [{}, {}] \
             (columns a multiple of 256) with {} inputs and {} outputs",
            w.rows,
            w.cols,
            x.len(),
            y.len()
        )));
    }
    Ok(name)
}

/// The id kernels' blocks: `MV_ROWS` warps over an expert's rows, one
/// grid row per pair.
fn per_pair(rows: usize, pairs: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            rows.div_ceil(MV_ROWS as usize) as u32,
            int(pairs)? as u32,
            1,
        ),
        block_dim: (32, MV_ROWS, 1),
        shared_mem_bytes: 0,
    })
}

/// The routing kernels' arguments, checked: `len` logits of `t` tokens.
struct RouteArgs {
    n: i32,
    k: i32,
    has_bias: i32,
    sigmoid: i32,
    n_group: i32,
    topk_group: i32,
    norm: i32,
}

fn route_args(
    len: usize,
    t: usize,
    r: &Routing,
    bias: Option<usize>,
    ids: usize,
    weights: usize,
) -> Result<RouteArgs> {
    let n = len / t.max(1);
    let (n_group, topk_group) = r.groups.map_or((0, 0), |g| (g.n_group, g.topk_group));
    let bad = n * t != len
        || n > ROUTE_MAX
        || r.top_k == 0
        || r.top_k > n
        || ids < t * r.top_k
        || weights < t * r.top_k
        || bias.is_some_and(|b| b < n)
        || (n_group > 0
            && (n_group > ROUTE_MAX_GROUPS
                || !n.is_multiple_of(n_group)
                || topk_group == 0
                || topk_group > n_group
                || topk_group * (n / n_group) < r.top_k));
    if bad {
        return Err(Error::invalid(format!(
            "CUDA route: {len} logits for {t} tokens, top {} of at most {ROUTE_MAX} experts, \
             groups {n_group} (best {topk_group}, at most {ROUTE_MAX_GROUPS}); outputs of {ids} \
             and {weights}",
            r.top_k,
        )));
    }
    Ok(RouteArgs {
        n: int(n)?,
        k: int(r.top_k)?,
        has_bias: bias.is_some() as i32,
        sigmoid: matches!(r.scoring, Scoring::Sigmoid) as i32,
        n_group: int(n_group)?,
        topk_group: int(topk_group)?,
        norm: r.norm_topk_prob as i32,
    })
}

/// Threads of a norm's block: a decode step's one row is one block, so
/// the more warps share its values, the fewer each waits through one
/// after another (`ROW_REGS` in `ops.cu` holds 8,192 values in registers
/// at this size).
const ROW_THREADS: u32 = 512;

/// `qk_norm_rope`'s heads a block, a warp each (ops.cu's `QK_WARPS`).
const QK_WARPS: usize = 8;

/// One [`ROW_THREADS`]-thread block per row (the norms).
fn per_row(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (int(rows)? as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A size as the kernels' `int`.
fn int(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::invalid(format!("CUDA: {n} does not fit a kernel's int")))
}
