//! The decoder on a CUDA GPU: the same layers as [`Decoder`], their
//! backbone weights uploaded once in their stored types, activations and
//! each sequence's KV cache resident on the device. What crosses to the
//! host per layer is only what the host must act on: a sparse layer's
//! chosen `(expert, weight)` pairs, which drive the expert cache, and the
//! final logits. A decode step of a model whose experts are all resident
//! sends nothing back but the logits: its experts run by the ids routing
//! left on the device. Routed experts come from where the CPU decoder takes
//! them: uploaded with the backbone when resident (a vault's, whole layers
//! while `--vram-budget` holds them), or from the RAM expert cache's
//! slots, page-locked, copied as each layer uses them; a small batch's may
//! instead run on the CPU where they lie, when that is measured faster.
//!
//! This is a second forward pass beside [`Decoder`]'s rather than the
//! same model code over a generic backend (docs/cuda.md says why): it
//! walks the CPU decoder's own layer structs, so a family defines its
//! layers once, and the CPU path is untouched.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

use crate::checkpoint::Weight;
use crate::compute::cuda::{
    ExpertTable, Gpu, GpuMatrix, HostBuf, HostPin, KvTarget, Rounded, MATVEC_MAX_TOKENS,
};
use crate::compute::profile::{self, Op};
use crate::compute::{AttnShape, Embedding, KvCache, Matrix, MlaShape};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::experts::{ExpertCache, Pinned};
use crate::memory::Budget;

use super::blocks::{
    group_by_expert, Attention, Experts, LatentAttention, Linear, Moe, QueryProj, Scratch,
};
use super::decoder::{Attn, Decoder, Layer, Mlp};
use super::{check_input, CausalLm, ExpertWays, GpuExpertStats, Logits, Session, Step};

/// A [`Decoder`] running on GPU `N`.
pub struct GpuDecoder {
    cpu: Decoder,
    gpu: Gpu,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<f32>,
    lm_head: GpuMatrix,
    /// The embedding table in VRAM: a step uploads its token ids, not
    /// their rows (a vault's table is read from disk a row at a time,
    /// about 0.2 ms a decode step on the H200 machine). `None` for a type
    /// the kernels lack, looked up on the host as before.
    embed: Option<GpuMatrix>,
    /// Where a model's streamed experts went, for the start-up line.
    vram_experts: Option<String>,
    /// The RAM expert caches' slots, page-locked while this decoder
    /// uploads from them.
    _pins: Vec<HostPin>,
    tiers: TierCounters,
    /// How many of the next streamed layer's predicted experts a
    /// one-token step copies ahead ([`Ahead`]) where `SMOE_COPY_AHEAD=n`
    /// says; unset, [`GpuDecoder::ahead_n`] decides.
    ahead: Option<usize>,
    /// Whether a decode step's experts' gate/up launch also rounds its
    /// output for the down projection (a `quantize_q8` launch fewer a
    /// layer): on unless `SMOE_CUDA_FUSE=0` (so that one binary measures
    /// both).
    fuse: bool,
    /// Whether a streamed step's stretches run as captured graphs
    /// ([`GpuDecoder::stretch`]): only with `SMOE_CUDA_STRETCHES=1`, since
    /// their replays, correct on an H100, decoded the host-RAM row slower
    /// than the eager stretches (docs/cuda.md).
    stretch_graphs: bool,
    /// The device's activations; one forward pass at a time uses them, as
    /// the GPU runs one pass at a time on its compute stream anyway.
    bufs: Mutex<Bufs>,
}

impl std::fmt::Debug for GpuDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuDecoder({})", self.gpu.info())
    }
}

struct GpuLinear {
    w: GpuMatrix,
    bias: Option<CudaSlice<f32>>,
}

enum GpuQuery {
    Full(GpuLinear),
    LowRank {
        a: GpuLinear,
        norm: CudaSlice<f32>,
        b: GpuLinear,
    },
}

enum GpuAttn {
    Grouped {
        q: GpuLinear,
        k: GpuLinear,
        v: GpuLinear,
        o: GpuLinear,
        q_norm: Option<CudaSlice<f32>>,
        k_norm: Option<CudaSlice<f32>>,
    },
    Latent {
        q: GpuQuery,
        kv_a: GpuLinear,
        kv_norm: CudaSlice<f32>,
        /// `kv_b_proj` widened to f32: the absorb and value kernels read
        /// it by column as well as by row.
        kv_b: CudaSlice<f32>,
        o: GpuLinear,
    },
}

/// Gate, up and down.
type GpuFfn = [GpuMatrix; 3];

/// An expert copied to the GPU, and the event its copy (with others of
/// its batch) finishes at ([`Gpu::upload_experts`]).
type Copied = (GpuFfn, Arc<CudaEvent>);

// One per layer, never moved after load: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum GpuMlp {
    Dense(GpuFfn),
    Sparse {
        router: GpuMatrix,
        score_bias: Option<CudaSlice<f32>>,
        /// Uploaded with the backbone when the experts are resident;
        /// `None` when they stream through the expert cache.
        experts: Option<Vec<GpuFfn>>,
        /// The resident experts' gate, up and down addresses, for decode
        /// steps that run every chosen expert in one launch each, routing
        /// ids never leaving the device.
        tables: Option<[ExpertTable; 3]>,
        shared: Option<(GpuFfn, Option<GpuMatrix>)>,
    },
}

struct GpuLayer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    attn: GpuAttn,
    mlp: GpuMlp,
}

impl GpuDecoder {
    /// Uploads `cpu`'s backbone (and its experts, when resident) to GPU
    /// `ordinal` and compiles the kernels; streamed experts go to VRAM a
    /// whole layer at a time, first layers first, while `vram_budget`
    /// holds them.
    pub fn new(cpu: Decoder, ordinal: usize, vram_budget: Budget) -> Result<Self> {
        let gpu = Gpu::new(ordinal)?;
        let mut layers: Vec<GpuLayer> = cpu
            .layers
            .iter()
            .map(|l| upload_layer(&gpu, l))
            .collect::<Result<_>>()?;
        let norm = gpu.upload(&cpu.norm)?;
        let lm_head = gpu.upload_matrix(cpu.lm_head.matrix())?;
        let embed = upload_embedding(&gpu, &cpu.embed)?;
        let (pins, pinning) = pin_expert_slots(&gpu, &cpu);
        let vram_experts = vram_experts(&gpu, &cpu, &mut layers, vram_budget)?
            .map(|placed| format!("{placed}; {pinning}"));
        Ok(Self {
            cpu,
            gpu,
            layers,
            norm,
            lm_head,
            embed,
            vram_experts,
            _pins: pins,
            tiers: TierCounters::default(),
            ahead: match std::env::var("SMOE_COPY_AHEAD") {
                Ok(v) => Some(v.parse().map_err(|_| {
                    Error::invalid(format!(
                        "SMOE_COPY_AHEAD={v:?}: a count of experts to copy ahead (0 for none)"
                    ))
                })?),
                Err(_) => None,
            },
            fuse: std::env::var_os("SMOE_CUDA_FUSE").is_none_or(|v| v != "0"),
            stretch_graphs: std::env::var_os("SMOE_CUDA_STRETCHES").is_some_and(|v| v == "1"),
            bufs: Mutex::new(Bufs::default()),
        })
    }

    /// How many layers' streamed experts are in VRAM, for the start-up
    /// line; `None` for a model with no streamed experts.
    pub fn vram_experts(&self) -> Option<&str> {
        self.vram_experts.as_deref()
    }
}

/// [`GpuExpertStats`] as they are counted, from any thread.
#[derive(Default)]
struct TierCounters {
    vram_hits: AtomicU64,
    copied: AtomicU64,
    pcie_bytes: AtomicU64,
    copied_ahead: AtomicU64,
    ahead_used: AtomicU64,
    cpu_runs: AtomicU64,
    graph_steps: AtomicU64,
    graph_replays: AtomicU64,
    graph_stretches: AtomicU64,
    stretch_replays: AtomicU64,
}

/// Page-locks the slots of every RAM expert cache the model streams
/// through, so each upload from them is one DMA at PCIe speed (55 GB/s on
/// the H200 machine, 7.9 from pageable memory); what it did, in words.
/// Where the driver refuses (a memlock limit), uploads stay pageable:
/// slower, still correct.
fn pin_expert_slots(gpu: &Gpu, cpu: &Decoder) -> (Vec<HostPin>, String) {
    let mut caches: Vec<&Arc<ExpertCache>> = Vec::new();
    for l in &cpu.layers {
        if let Mlp::Sparse(m) = &l.mlp {
            if let Experts::Streamed { cache, .. } = &m.experts {
                if !caches.iter().any(|c| Arc::ptr_eq(c, cache)) {
                    caches.push(cache);
                }
            }
        }
    }
    let bytes: usize = caches.iter().map(|c| c.memory().len()).sum();
    let pins: Result<Vec<HostPin>> = caches
        .iter()
        .map(|c| gpu.pin_host(c.memory().clone()))
        .collect();
    let size = format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64);
    match pins {
        Ok(pins) => (pins, format!("RAM expert slots ({size}) page-locked")),
        Err(e) => (
            Vec::new(),
            format!("RAM expert slots ({size}) left pageable, slower to upload: {e}"),
        ),
    }
}

/// Uploads streamed layers' experts, all of a layer's at once, first
/// layers first, while they fit `budget` (as llama.cpp's `-ncmoe` keeps
/// the last layers' experts on the host); what it did, in words.
fn vram_experts(
    gpu: &Gpu,
    cpu: &Decoder,
    layers: &mut [GpuLayer],
    budget: Budget,
) -> Result<Option<String>> {
    let streamed: Vec<(usize, &Arc<ExpertCache>, usize)> = cpu
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match &l.mlp {
            Mlp::Sparse(m) => match &m.experts {
                Experts::Streamed { cache, layer } => Some((i, cache, *layer)),
                Experts::Resident(_) => None,
            },
            Mlp::Dense(_) => None,
        })
        .collect();
    if streamed.is_empty() {
        return Ok(None);
    }
    const GIB: f64 = (1u64 << 30) as f64;
    let (free, total) = gpu.memory()?;
    let headroom = crate::memory::vram_headroom(total as u64) as usize;
    let room = free.saturating_sub(headroom);
    let limit = match budget {
        // More than the GPU has would fail part-way through the uploads
        // with the driver's out-of-memory error: say which number is wrong.
        Budget::Bytes(b) if b as usize > room => {
            return Err(Error::invalid(format!(
                "--vram-budget {:.2} GiB: the GPU has {:.2} GiB free for experts after the \
                 backbone and {:.2} GiB of headroom for KV caches and activations; give at \
                 most that, or auto",
                b as f64 / GIB,
                room as f64 / GIB,
                headroom as f64 / GIB
            )))
        }
        Budget::Bytes(b) => b as usize,
        Budget::Auto => room,
    };
    let (mut used, mut placed) = (0usize, 0usize);
    for &(i, cache, cache_layer) in &streamed {
        let GpuMlp::Sparse {
            router,
            experts,
            tables,
            ..
        } = &mut layers[i].mlp
        else {
            return Err(Error::invalid("CUDA decoder: layer kinds differ"));
        };
        let n_exp = router.rows;
        let bytes = n_exp * cache.slot_bytes();
        if used + bytes > limit {
            break;
        }
        let mut uploaded: Vec<Option<GpuFfn>> = (0..n_exp).map(|_| None).collect();
        let all: Vec<u32> = (0..n_exp as u32).collect();
        for group in all.chunks(cache.capacity()) {
            let mut pinned = cache.request(cache_layer, group)?;
            pinned.wait()?;
            let (ids, mats) = pinned_group(&pinned);
            let uploads = gpu.upload_experts(&mats)?;
            // The slots are read after `upload_experts` returns.
            gpu.finish_uploads()?;
            for (e, (w, _)) in ids.into_iter().zip(uploads) {
                uploaded[e as usize] = Some(w);
            }
        }
        let resident: Vec<GpuFfn> = uploaded
            .into_iter()
            .collect::<Option<_>>()
            .ok_or_else(|| Error::invalid("CUDA decoder: an expert was not read"))?;
        *tables = expert_tables(gpu, &resident)?;
        *experts = Some(resident);
        used += bytes;
        placed += 1;
    }
    Ok(Some(format!(
        "routed experts of {placed} of {} sparse layers in VRAM ({:.2} GiB of a {} budget), \
         the rest streamed from RAM",
        streamed.len(),
        used as f64 / GIB,
        match budget {
            Budget::Bytes(b) => format!("{:.2} GiB", b as f64 / GIB),
            Budget::Auto => format!("{:.2} GiB auto", limit as f64 / GIB),
        }
    )))
}

/// The id kernels' address tables of a layer's resident experts, when
/// they share types and shapes.
fn expert_tables(gpu: &Gpu, experts: &[GpuFfn]) -> Result<Option<[ExpertTable; 3]>> {
    let table = |i: usize| gpu.expert_table(&experts.iter().map(|f| &f[i]).collect::<Vec<_>>());
    Ok(match (table(0)?, table(1)?, table(2)?) {
        (Some(g), Some(u), Some(d)) => Some([g, u, d]),
        _ => None,
    })
}

/// The embedding table on the device, from its mapping or read from disk
/// in pieces; `None` where the kernels have no such type.
fn upload_embedding(gpu: &Gpu, table: &Embedding) -> Result<Option<GpuMatrix>> {
    let m = match table {
        Embedding::Mapped(w) => {
            let m = w.matrix();
            if !gpu.has_kernels(m.dtype) {
                return Ok(None);
            }
            gpu.upload_matrix(m)?
        }
        Embedding::OnDisk(d) => {
            if !gpu.has_kernels(d.dtype) {
                return Ok(None);
            }
            gpu.upload_matrix_pieces((d.dtype, d.rows, d.cols), |piece| d.read_table(piece))?
        }
    };
    Ok(Some(m))
}

fn linear(gpu: &Gpu, l: &Linear) -> Result<GpuLinear> {
    Ok(GpuLinear {
        w: gpu.upload_matrix(l.weight.matrix())?,
        bias: l.bias.as_deref().map(|b| gpu.upload(b)).transpose()?,
    })
}

fn ffn(gpu: &Gpu, [gate, up, down]: [&Weight; 3]) -> Result<GpuFfn> {
    Ok([
        gpu.upload_matrix(gate.matrix())?,
        gpu.upload_matrix(up.matrix())?,
        gpu.upload_matrix(down.matrix())?,
    ])
}

fn upload_layer(gpu: &Gpu, l: &Layer) -> Result<GpuLayer> {
    let norm = |w: &Option<Vec<f32>>| w.as_deref().map(|w| gpu.upload(w)).transpose();
    let attn = match &l.attn {
        Attn::Grouped(a) => GpuAttn::Grouped {
            q: linear(gpu, &a.q)?,
            k: linear(gpu, &a.k)?,
            v: linear(gpu, &a.v)?,
            o: linear(gpu, &a.o)?,
            q_norm: norm(&a.q_norm)?,
            k_norm: norm(&a.k_norm)?,
        },
        Attn::Latent(a) => GpuAttn::Latent {
            q: match &a.q {
                QueryProj::Full(p) => GpuQuery::Full(linear(gpu, p)?),
                QueryProj::LowRank { a, norm, b } => GpuQuery::LowRank {
                    a: linear(gpu, a)?,
                    norm: gpu.upload(norm)?,
                    b: linear(gpu, b)?,
                },
            },
            kv_a: linear(gpu, &a.kv_a)?,
            kv_norm: gpu.upload(&a.kv_norm)?,
            kv_b: gpu.upload(&a.kv_b.to_f32())?,
            o: linear(gpu, &a.o)?,
        },
    };
    let mlp = match &l.mlp {
        Mlp::Dense(f) => GpuMlp::Dense(ffn(gpu, [&f.gate, &f.up, &f.down])?),
        Mlp::Sparse(m) => {
            let experts: Option<Vec<GpuFfn>> = match &m.experts {
                Experts::Resident(e) => Some(
                    e.iter()
                        .map(|f| ffn(gpu, [&f.gate, &f.up, &f.down]))
                        .collect::<Result<_>>()?,
                ),
                Experts::Streamed { .. } => None,
            };
            let tables = match &experts {
                Some(e) => expert_tables(gpu, e)?,
                None => None,
            };
            GpuMlp::Sparse {
                router: gpu.upload_matrix(m.router.matrix())?,
                score_bias: m.score_bias.as_deref().map(|b| gpu.upload(b)).transpose()?,
                experts,
                tables,
                shared: m
                    .shared
                    .as_ref()
                    .map(|s| -> Result<_> {
                        let f = &s.ffn;
                        let gate = s.gate.as_ref().map(|g| gpu.upload_matrix(g.matrix()));
                        Ok((ffn(gpu, [&f.gate, &f.up, &f.down])?, gate.transpose()?))
                    })
                    .transpose()?,
            }
        }
    };
    Ok(GpuLayer {
        input_norm: gpu.upload(&l.input_norm)?,
        post_norm: gpu.upload(&l.post_norm)?,
        attn,
        mlp,
    })
}

/// A device buffer that grows to the largest call seen and is then kept.
#[derive(Default)]
struct Buf<T>(Option<CudaSlice<T>>);

impl<T: DeviceRepr + ValidAsZeroBits> Buf<T> {
    /// The first `n` elements to write, growing the buffer (contents lost)
    /// if it is shorter.
    fn m(&mut self, gpu: &Gpu, n: usize) -> Result<CudaViewMut<'_, T>> {
        if self.0.as_ref().is_none_or(|b| b.len() < n) {
            gpu.not_capturing("growing a buffer")?;
            self.0 = None;
            self.0 = Some(gpu.zeros(n.max(1))?);
        }
        let b = self.0.as_mut().expect("allocated above");
        Ok(b.slice_mut(..n))
    }

    /// Elements `range` to read, after [`Buf::m`] wrote them.
    fn v(&self, range: std::ops::Range<usize>) -> Result<CudaView<'_, T>> {
        match &self.0 {
            Some(b) if range.end <= b.len() => Ok(b.slice(range)),
            _ => Err(Error::invalid(format!(
                "CUDA decoder: reading {range:?} of a buffer of {}",
                self.0.as_ref().map_or(0, |b| b.len())
            ))),
        }
    }

    /// Elements `range` to update in place.
    fn part(&mut self, range: std::ops::Range<usize>) -> Result<CudaViewMut<'_, T>> {
        let len = self.0.as_ref().map_or(0, |b| b.len());
        match &mut self.0 {
            Some(b) if range.end <= len => Ok(b.slice_mut(range)),
            _ => Err(Error::invalid(format!(
                "CUDA decoder: writing {range:?} of a buffer of {len}"
            ))),
        }
    }
}

/// The activations of one forward pass, on the device, and the host side
/// of routing.
#[derive(Default)]
struct Bufs {
    /// `(tokens, sequences)` of the last step: a step of the same shape
    /// finds its buffers sized, so it can be captured as a graph.
    last_shape: Option<(usize, usize)>,
    /// What the graphs of the last capture are valid for, and the VRAM
    /// expert hits recording them counted (a replay counts them again).
    graph: Option<GraphKey>,
    graph_hits: u64,
    /// A step with layers the host drives, captured stretch by stretch
    /// ([`GpuDecoder::stretch`]): what every stretch's graph holds in
    /// common (the host buffer the routing comes down into among it),
    /// then each stretch's own, with the VRAM expert hits its recording
    /// counted (a replay counts them again).
    stretch_step: Option<StretchStep>,
    stretches: Vec<Option<(StretchKey, u64)>>,
    /// Stretches recorded since one was last replayed: past
    /// [`STRETCH_TRIES`] steps' worth the decoder stops recording them
    /// ([`GpuDecoder::stretches_given_up`]), since a graph recorded for
    /// one launch costs more host time than the launches it holds.
    recorded_unused: usize,
    /// Each sequence's position (its cache's length) for the step, then
    /// the token ids when the embedding lookup is on the device.
    step: Buf<u32>,
    x: Buf<f32>,
    h: Buf<f32>,
    q: Buf<f32>,
    k: Buf<f32>,
    v: Buf<f32>,
    attn: Buf<f32>,
    out: Buf<f32>,
    /// Where the step's RoPE cosines (`rope_len` of them) then sines
    /// start in [`Bufs::step`].
    rope_at: usize,
    rope_len: usize,
    gate: Buf<f32>,
    up: Buf<f32>,
    xs: Buf<f32>,
    ys: Buf<f32>,
    shared: Buf<f32>,
    shared_gate: Buf<f32>,
    router: Buf<f32>,
    ids: Buf<u32>,
    weights: Buf<f32>,
    /// What a streamed layer sends the host, back to back for one
    /// download ([`GpuDecoder::layer_to_host`]).
    to_host: Buf<u32>,
    /// What the host sends a streamed layer back, in one upload: its pairs
    /// in expert order, each token's pairs' rows of that order, and their
    /// weights (as bits) ([`Host::routes`]).
    routes: Buf<u32>,
    used: Buf<u32>,
    start: Buf<u32>,
    head: Buf<f32>,
    logits: Buf<f32>,
    /// A batch's logits rows on the host, before they go to their sessions.
    host_logits: Option<HostBuf<f32>>,
    /// A greedy step's pick ([`CausalLm::forward_greedy`]), there and here.
    token: Buf<u32>,
    host_token: Option<HostBuf<u32>>,
    host: Host,
    paths: ExpertPaths,
    /// This pass processes prompt tokens (for [`crate::experts::ReadAhead`]).
    prompt: bool,
}

/// A step's shape, the device's allocation count and its sequences' cache
/// buffers ([`Gpu::replay`]): equal keys, equal captured graphs.
#[derive(PartialEq)]
struct GraphKey {
    shape: (usize, usize),
    allocations: u64,
    caches: Vec<u64>,
}

/// What every stretch's graph of a step holds ([`Bufs::stretch_step`]):
/// the step's shape, its sequences' cache buffers and the host buffer the
/// routes come down into.
#[derive(PartialEq)]
struct StretchStep {
    shape: (usize, usize),
    caches: Vec<u64>,
    to_host: u64,
}

/// What a stretch's captured graph was recorded for ([`Bufs::stretches`]),
/// beside its step's [`StretchStep`]: its layers, the plan of the layer that
/// ends it, and the device's allocation count when it was recorded (a
/// buffer grown since may be one it holds).
#[derive(PartialEq)]
struct StretchKey {
    layers: std::ops::Range<usize>,
    plan: Option<HostLayer>,
    allocations: u64,
}

/// How a sparse layer whose experts the host drives (streamed ones, or a
/// prompt's) runs its step, settled before its device work is queued: a
/// captured stretch holds that work. `predicted`: the next layer's guess
/// launched and downloaded with the routes, its `(pairs, experts)`.
#[derive(Clone, Copy, PartialEq, Debug)]
struct HostLayer {
    predicted: Option<(usize, usize)>,
    path: ExpertPath,
}

/// Host buffers: the embedding rows and RoPE tables before upload,
/// routing's pairs and the expert grouping they give.
#[derive(Default)]
struct Host {
    x: Vec<f32>,
    step: Vec<u32>,
    rope: Vec<f32>,
    sin: Vec<f32>,
    seq_cos: Vec<f32>,
    seq_sin: Vec<f32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    pred_ids: Vec<u32>,
    pred_weights: Vec<f32>,
    to_host: Option<HostBuf<u32>>,
    /// A small batch's normed rows, for the CPU's gather.
    h: Vec<f32>,
    chosen: Vec<(u32, f32)>,
    start: Vec<usize>,
    fill: Vec<usize>,
    order: Vec<usize>,
    start32: Vec<u32>,
    used: Vec<u32>,
    /// [`Bufs::routes`]: the order, then the rows, then the weights.
    routes: Vec<u32>,
    pos_weights: Vec<f32>,
    slots: Vec<usize>,
    best: Vec<f32>,
    predicted: Vec<u32>,
    /// A small batch's gathered rows and their experts' outputs, when the
    /// CPU computes streamed experts.
    xs: Vec<f32>,
    ys: Vec<f32>,
}

/// Which way a streamed expert reaches a small batch: copied to the GPU
/// from its page-locked RAM slot and run there, or run on the CPU where
/// it lies, only the batch's rows crossing the bus, or both at once on a
/// share of the layer's experts each (the copies and the GPU's kernels
/// run while the CPU computes its share: PCIe and the cores' memory
/// bandwidth add up). Which is faster depends on the machine (PCIe
/// against the cores' memory bandwidth: 55 GB/s against ~96 on 16 threads
/// of the H200 host, but ~14 on two cores) and on the batch (the CPU's
/// cost grows with its rows, the copy's does not), so it is measured as
/// the model runs: each batch size's first calls alternate copy and CPU,
/// the first of each uncounted (it sizes buffers); once each has
/// [`ExpertPaths::TRIALS`] counted, the split is tried as often, its CPU
/// share what the two rates give (the CPU's rate over their sum), and the
/// way with the least median time per expert byte is kept for the
/// process: the median, because one call that a page fault or another
/// process stretched tenfold moved a mean of four enough to flip the
/// choice between two runs of the same bench. Kept, not re-checked: the
/// ways round differently (the CPU's kernels round activations to 8 bits
/// per 256, the GPU's per 32), so a later switch would change a run's
/// outputs mid-way.
///
/// `SMOE_STREAMED_WAY=copy|cpu|split` forces one way for every small
/// batch (the split half on the CPU), to measure each in a bench.
struct ExpertPaths {
    /// Per batch size `i + 1`, per way `[copy, cpu, split]`: calls, and
    /// the seconds per expert byte of each counted one.
    trials: [[(u32, Vec<f64>); 3]; MATVEC_MAX_TOKENS],
    kept: [Option<ExpertPath>; MATVEC_MAX_TOKENS],
    forced: Option<ExpertPath>,
}

impl Default for ExpertPaths {
    fn default() -> Self {
        let forced = match std::env::var("SMOE_STREAMED_WAY").as_deref() {
            Ok("copy") => Some(ExpertPath::Copy),
            Ok("cpu") => Some(ExpertPath::Cpu),
            Ok("split") => Some(ExpertPath::Split),
            _ => None,
        };
        Self {
            trials: Default::default(),
            kept: Default::default(),
            forced,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum ExpertPath {
    Copy = 0,
    Cpu = 1,
    Split = 2,
}

impl ExpertPaths {
    /// Counted calls of each way: a decode step of an 8-layer model makes
    /// eight, so the choice (nine calls of copy and of the CPU, eight of
    /// the split) is made within its first four tokens.
    const TRIALS: u32 = 8;

    fn pick(&self, t: usize) -> ExpertPath {
        let Some(i) = t.checked_sub(1).filter(|&i| i < MATVEC_MAX_TOKENS) else {
            return ExpertPath::Copy;
        };
        let [copy, cpu, _] = &self.trials[i];
        match self.kept[i].or(self.forced) {
            Some(way) => way,
            None if cpu.0 < copy.0 => ExpertPath::Cpu,
            None if cpu.0 > Self::TRIALS => ExpertPath::Split,
            None => ExpertPath::Copy,
        }
    }

    /// Whether batch size `t`'s way is kept (or `t` is too large to have
    /// a choice): then nothing needs its time.
    fn settled(&self, t: usize) -> bool {
        self.forced.is_some()
            || t.checked_sub(1)
                .filter(|&i| i < MATVEC_MAX_TOKENS)
                .is_none_or(|i| self.kept[i].is_some())
    }

    /// Median seconds per expert byte of way `way` at batch index `i`
    /// (infinite before any counted call).
    fn median(&self, i: usize, way: ExpertPath) -> f64 {
        let mut v = self.trials[i][way as usize].1.clone();
        if v.is_empty() {
            return f64::INFINITY;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    /// The CPU's share of a split's experts for batch size `t`: its rate
    /// over the sum of both ways' rates, measured alone.
    fn cpu_share(&self, t: usize) -> f64 {
        let Some(i) = t.checked_sub(1).filter(|&i| i < MATVEC_MAX_TOKENS) else {
            return 0.0;
        };
        let rate = |way| 1.0 / self.median(i, way).max(1e-18);
        let (copy, cpu) = (rate(ExpertPath::Copy), rate(ExpertPath::Cpu));
        if (copy + cpu).is_finite() && copy + cpu > 0.0 {
            cpu / (copy + cpu)
        } else {
            0.5
        }
    }

    /// Batch size `t`'s trials so far, for the stats.
    fn ways(&self, t: usize) -> Option<ExpertWays> {
        let i = t.checked_sub(1).filter(|&i| i < MATVEC_MAX_TOKENS)?;
        let rate = |way| {
            let m = self.median(i, way);
            if m.is_finite() && m > 0.0 {
                1.0 / m
            } else {
                0.0
            }
        };
        Some(ExpertWays {
            kept: self.kept[i].map(|w| match w {
                ExpertPath::Copy => "copy",
                ExpertPath::Cpu => "CPU",
                ExpertPath::Split => "split",
            }),
            copy_bytes_s: rate(ExpertPath::Copy),
            cpu_bytes_s: rate(ExpertPath::Cpu),
            split_bytes_s: rate(ExpertPath::Split),
        })
        .filter(|w| w.copy_bytes_s > 0.0 || w.cpu_bytes_s > 0.0)
    }

    fn record(&mut self, t: usize, way: ExpertPath, secs: f64, bytes: usize) {
        let Some(i) = t.checked_sub(1).filter(|&i| i < MATVEC_MAX_TOKENS) else {
            return;
        };
        if self.kept[i].is_some() || self.forced.is_some() {
            return;
        }
        let (calls, per_byte) = &mut self.trials[i][way as usize];
        if *calls > 0 || way == ExpertPath::Split {
            // The split needs no uncounted call: the other two sized the
            // buffers it uses.
            per_byte.push(secs / bytes.max(1) as f64);
        }
        *calls += 1;
        if self.trials[i][ExpertPath::Split as usize].0 >= Self::TRIALS {
            let ways = [ExpertPath::Copy, ExpertPath::Cpu, ExpertPath::Split];
            self.kept[i] = ways
                .into_iter()
                .min_by(|&a, &b| self.median(i, a).total_cmp(&self.median(i, b)));
        }
    }
}

/// A streamed layer's likely experts (the layer before's prediction)
/// copied to the GPU while the layer before ran, behind its own copies: a
/// one-token step's copies then overlap that layer's last kernels, the
/// next attention and the host's routing round trip, rather than all
/// following them (PCIe is most of a streamed layer's time). Their RAM
/// slots stay pinned until the copies have read them.
struct Ahead<'a> {
    gpu: &'a Gpu,
    /// The decoder layer they are for.
    layer: usize,
    _pins: Pinned<'a>,
    /// Per expert, its id and (until taken) its matrices and upload event.
    uploads: Vec<(u32, Option<Copied>)>,
    /// After the last of the copies.
    done: CudaEvent,
}

impl Ahead<'_> {
    /// Expert `e`'s upload, if it was copied ahead and not taken yet.
    fn take(&mut self, e: u32) -> Option<Copied> {
        let (_, upload) = self.uploads.iter_mut().find(|(id, _)| *id == e)?;
        upload.take()
    }
}

impl Drop for Ahead<'_> {
    fn drop(&mut self) {
        // The slots are unpinned after this returns: not before the copies
        // have read them (a device that fails this wait is lost anyway).
        let _ = self.done.synchronize();
        let unused = self.uploads.drain(..).filter_map(|(_, u)| u);
        self.gpu.recycle(unused.flat_map(|(m, _)| m));
    }
}

/// One sequence's rows of a call and its device cache.
struct Seq<'a> {
    kv: &'a mut KvCache,
    start: usize,
    len: usize,
}

impl GpuDecoder {
    fn cfg(&self) -> &ModelConfig {
        &self.cpu.cfg
    }

    /// Every layer over the rows of `seqs` (ids `ids`), leaving the
    /// residual stream before the last layer's MLP in `b.x` and that MLP's
    /// output in `b.out`, for [`GpuDecoder::head`] to add.
    fn rows(&self, ids: &[u32], seqs: &mut [Seq<'_>], b: &mut Bufs) -> Result<()> {
        let g = &self.gpu;
        let (t, h) = (ids.len(), self.cfg().hidden_size);
        if seqs.iter().any(|s| !s.kv.is_on_device()) {
            return Err(no_device_kv());
        }
        // A sequence of more than one row is a prompt (decoding gives one).
        b.prompt = seqs.iter().any(|s| s.len > 1);

        // What the step's kernels read that varies per step, in one
        // upload (each a driver call the GPU idles through): each
        // sequence's position (the KV writes and attention read it on the
        // device), the token ids, the RoPE tables' cosines then sines (as
        // bits).
        let host = &mut b.host;
        host.step.clear();
        host.step.extend(
            seqs.iter()
                .map(|s| s.kv.len().min(u32::MAX as usize) as u32),
        );
        if self.embed.is_some() {
            host.step.extend_from_slice(ids);
        }
        host.rope.clear();
        host.sin.clear();
        for seq in seqs.iter() {
            let pos0 = seq.kv.len();
            let range = pos0..pos0 + seq.len;
            self.cpu
                .rope
                .tables(range, &mut host.seq_cos, &mut host.seq_sin);
            host.rope.extend_from_slice(&host.seq_cos);
            host.sin.extend_from_slice(&host.seq_sin);
        }
        // The tables 16-byte aligned, as a buffer of their own would be.
        host.step.resize(host.step.len().next_multiple_of(4), 0);
        b.rope_at = host.step.len();
        b.rope_len = host.rope.len();
        host.step.extend(host.rope.iter().map(|c| c.to_bits()));
        host.step.extend(host.sin.iter().map(|s| s.to_bits()));
        g.upload_into(&host.step, &mut b.step.m(g, host.step.len())?)?;
        match &self.embed {
            Some(table) => {
                let ids = b.step.v(seqs.len()..seqs.len() + t)?;
                g.get_rows(table, &ids, t, &mut b.x.m(g, t * h)?)?;
            }
            None => {
                host.x.resize(t * h, 0.0);
                self.cpu.backend.embed(&self.cpu.embed, ids, &mut host.x)?;
                g.upload_into(&host.x, &mut b.x.m(g, t * h)?)?;
            }
        }

        // A step whose every launch stays on the GPU (nothing streamed,
        // no buffer growing), of the shape the previous step sized the
        // buffers for, runs as captured graphs.
        let shape = (t, seqs.len());
        let replayable = g.graphs()
            && b.last_shape == Some(shape)
            && seqs.iter().all(|s| s.kv.device_fits(s.len));
        let graph = replayable && self.on_gpu_only(t);
        b.last_shape = Some(shape);
        // The graphs of the last capture hold the addresses of every
        // buffer they touch (and the attention's split, sized for the
        // caches' capacity): while no allocation was made and the step
        // runs over the same caches, they replay as they are, without
        // the host recording a step's launches again.
        let key = GraphKey {
            shape,
            allocations: g.allocations(),
            caches: seqs
                .iter()
                .flat_map(|s| s.kv.device_addresses(g.stream()))
                .collect(),
        };
        let n = self.layers.len();
        let parts = n.div_ceil(GRAPH_LAYERS);
        if graph && b.graph.as_ref() == Some(&key) {
            for slot in 0..parts {
                if !g.replay(slot)? {
                    return Err(Error::invalid("CUDA decoder: a captured step is missing"));
                }
            }
            // What recording the step counted on the host.
            self.tiers.vram_hits.fetch_add(b.graph_hits, Relaxed);
            self.tiers.graph_steps.fetch_add(1, Relaxed);
            self.tiers.graph_replays.fetch_add(1, Relaxed);
        } else if graph {
            b.graph = None;
            // The stretches' graphs share the slots.
            b.stretch_step = None;
            // One graph per GRAPH_LAYERS layers: the GPU runs a part while
            // the host records the next. A part that cannot be captured
            // runs eagerly, after the parts before it in stream order.
            let hits = self.tiers.vram_hits.load(Relaxed);
            let mut whole = true;
            let mut ahead = None;
            for (slot, first) in (0..n).step_by(GRAPH_LAYERS).enumerate() {
                let part = first..(first + GRAPH_LAYERS).min(n);
                let mut run = || self.layers(part.clone(), t, seqs, b, &mut ahead, false);
                if !g.captured(slot, &mut run)? {
                    whole = false;
                    run()?;
                }
            }
            if whole {
                self.tiers.graph_steps.fetch_add(1, Relaxed);
                // Captured without allocating: valid for the next step.
                if key.allocations == g.allocations() {
                    b.graph_hits = self.tiers.vram_hits.load(Relaxed) - hits;
                    b.graph = Some(key);
                }
            }
        } else {
            b.graph = None;
            // Layers whose experts the host drives stop the device's work
            // at their routing: a small step runs the stretches between
            // those waits as graphs (`stretch`), for the same reason a
            // step on the GPU alone runs as one.
            let stretches = self.stretch_graphs
                && replayable
                && t <= MATVEC_MAX_TOKENS
                && !self.stretches_given_up(b);
            if stretches {
                let at = self.size_for_stretches(t, b)?;
                let step = StretchStep {
                    shape,
                    caches: key.caches,
                    to_host: at,
                };
                if b.stretch_step.as_ref() != Some(&step) {
                    b.stretches.clear();
                    b.stretch_step = Some(step);
                }
            } else {
                b.stretch_step = None;
            }
            let mut ahead = None;
            self.layers(0..n, t, seqs, b, &mut ahead, stretches)?;
        }
        for seq in seqs.iter_mut() {
            seq.kv.advance(seq.len);
        }
        Ok(())
    }

    /// Layers `range` of a step over `b.x` (after [`GpuDecoder::rows`] has
    /// uploaded the rows and tables): each adds the previous layer's MLP
    /// output into the residual, the last layer's is left in `b.out`.
    /// The device's work runs in stretches, each up to and including the
    /// routing of a layer whose experts the host drives, which the host
    /// then waits for and runs; with `graphs`, each stretch as a captured
    /// graph ([`GpuDecoder::stretch`]).
    fn layers<'s>(
        &'s self,
        range: std::ops::Range<usize>,
        t: usize,
        seqs: &mut [Seq<'_>],
        b: &mut Bufs,
        ahead: &mut Option<Ahead<'s>>,
        graphs: bool,
    ) -> Result<()> {
        let mut first = range.start;
        for slot in 0.. {
            if first >= range.end {
                break;
            }
            let host = (first..range.end).find_map(|i| Some((i, self.host_layer(i, t, b)?)));
            let end = host.map_or(range.end, |(i, _)| i + 1);
            let plan = host.map(|(_, plan)| plan);
            self.stretch(slot, first..end, plan, t, seqs, b, graphs)?;
            if let Some((i, plan)) = host {
                self.moe_experts(i, t, b, plan, ahead)?;
            }
            first = end;
        }
        Ok(())
    }

    /// The device's work of layers `range`, the last one's only up to its
    /// routing's download where `plan` says the host drives its experts:
    /// with `graphs`, replayed as the graph captured in `slot` when that
    /// was recorded for the same (a decode step's stretches repeat from
    /// token to token, the position read on the device), else captured
    /// there and launched; eagerly where not, or where it cannot be
    /// captured. A streamed layer's attention and routing are about a
    /// dozen small launches that the GPU, waiting on the host's, ran
    /// about as slowly as the host made them.
    #[allow(clippy::too_many_arguments)]
    fn stretch(
        &self,
        slot: usize,
        range: std::ops::Range<usize>,
        plan: Option<HostLayer>,
        t: usize,
        seqs: &mut [Seq<'_>],
        b: &mut Bufs,
        graphs: bool,
    ) -> Result<()> {
        let g = &self.gpu;
        let mut run = |b: &mut Bufs| {
            range.clone().try_for_each(|i| {
                self.layer_front(i, t, seqs, b, plan.filter(|_| i + 1 == range.end))
            })
        };
        if !graphs {
            return run(b);
        }
        let key = StretchKey {
            layers: range.clone(),
            plan,
            allocations: g.allocations(),
        };
        if let Some(Some((kept, hits))) = b.stretches.get(slot) {
            if *kept == key {
                if !g.replay(slot)? {
                    return Err(Error::invalid(
                        "CUDA decoder: a captured stretch is missing",
                    ));
                }
                self.tiers.vram_hits.fetch_add(*hits, Relaxed);
                self.tiers.graph_stretches.fetch_add(1, Relaxed);
                self.tiers.stretch_replays.fetch_add(1, Relaxed);
                b.recorded_unused = 0;
                return Ok(());
            }
        }
        if b.stretches.len() <= slot {
            b.stretches.resize_with(slot + 1, || None);
        }
        b.stretches[slot] = None;
        let hits = self.tiers.vram_hits.load(Relaxed);
        if !g.captured(slot, &mut || run(&mut *b))? {
            // Nothing recorded ran: neither do its hits count.
            let recorded = self.tiers.vram_hits.load(Relaxed) - hits;
            self.tiers.vram_hits.fetch_sub(recorded, Relaxed);
            return run(b);
        }
        self.tiers.graph_stretches.fetch_add(1, Relaxed);
        b.recorded_unused += 1;
        // Recorded without allocating: valid while nothing is.
        if key.allocations == g.allocations() {
            let hits = self.tiers.vram_hits.load(Relaxed) - hits;
            b.stretches[slot] = Some((key, hits));
        }
        Ok(())
    }

    /// Whether [`STRETCH_TRIES`] steps' worth of stretches were recorded
    /// and none replayed: then no more are (nothing records once this
    /// holds, so it holds for good).
    fn stretches_given_up(&self, b: &Bufs) -> bool {
        b.recorded_unused > STRETCH_TRIES * self.layers.len()
    }

    /// Layer `i`'s device work: its attention, and its MLP, of which only
    /// the routing and its download where `plan` says the host drives the
    /// experts ([`GpuDecoder::moe_experts`] then runs them).
    fn layer_front(
        &self,
        i: usize,
        t: usize,
        seqs: &mut [Seq<'_>],
        b: &mut Bufs,
        plan: Option<HostLayer>,
    ) -> Result<()> {
        let g = &self.gpu;
        let th = t * self.cfg().hidden_size;
        let (layer, dev) = (&self.cpu.layers[i], &self.layers[i]);
        // The previous layer's MLP output joins the residual in the same
        // launch as this layer's norm, which also rounds its output for
        // the int8 kernels where all that read it take them (its guard
        // dropped before the next norm's).
        {
            let round = t <= MATVEC_MAX_TOKENS
                && match &dev.attn {
                    GpuAttn::Grouped { q, k, v, .. } => {
                        [q, k, v].iter().all(|l| g.takes_int8(&l.w, t))
                    }
                    GpuAttn::Latent { .. } => false,
                };
            let rounded = self.norm(b, i > 0, &dev.input_norm, th, round)?;
            match (&layer.attn, &dev.attn) {
                (Attn::Grouped(a), GpuAttn::Grouped { .. }) => {
                    self.grouped(a, &dev.attn, i, t, seqs, b, rounded.as_ref())?
                }
                (Attn::Latent(a), GpuAttn::Latent { .. }) => {
                    self.latent(a, &dev.attn, i, t, seqs, b)?
                }
                _ => return Err(Error::invalid("CUDA decoder: layer kinds differ")),
            }
        }
        let round = t <= MATVEC_MAX_TOKENS
            && matches!(&dev.mlp, GpuMlp::Sparse { tables: Some([gate, ..]), .. }
                if g.takes_int8_experts(gate));
        let rounded = self.norm(b, true, &dev.post_norm, th, round)?;
        match (&layer.mlp, &dev.mlp) {
            (Mlp::Dense(_), GpuMlp::Dense(w)) => {
                swiglu(g, w, &b.h.v(0..th)?, t, &mut b.gate, &mut b.up, &mut b.out)
            }
            (Mlp::Sparse(m), GpuMlp::Sparse { .. }) => {
                self.moe(m, &dev.mlp, i, t, b, rounded.as_ref(), plan)
            }
            _ => Err(Error::invalid("CUDA decoder: layer kinds differ")),
        }
    }

    /// The RMSNorm of `b.x` (after adding `b.out` to it when `add`) with
    /// weights `w` into `b.h`, `th` values; with `round`, also rounded to
    /// int8 as it is written, for the int8 kernels that read it next.
    fn norm<'g>(
        &'g self,
        b: &mut Bufs,
        add: bool,
        w: &CudaSlice<f32>,
        th: usize,
        round: bool,
    ) -> Result<Option<Rounded<'g>>> {
        let g = &self.gpu;
        let eps = self.cfg().rms_norm_eps;
        let d = if add { Some(b.out.v(0..th)?) } else { None };
        let (w, h) = (w.as_view(), &mut b.h.m(g, th)?);
        if round {
            let x = &mut b.x.part(0..th)?;
            return g.norm_rows_rounded(x, d.as_ref(), &w, eps, h).map(Some);
        }
        match d {
            Some(d) => g.add_rms_norm_rows(&mut b.x.part(0..th)?, &d, &w, eps, h)?,
            None => g.rms_norm_rows(&b.x.v(0..th)?, &w, eps, h)?,
        }
        Ok(None)
    }

    /// Whether a step of `t` tokens a sequence runs on the GPU alone:
    /// every sparse layer's experts in VRAM, so their ids never go to the
    /// host (`moe`'s few-token path).
    fn on_gpu_only(&self, t: usize) -> bool {
        t <= MATVEC_MAX_TOKENS
            && self.layers.iter().all(|l| match &l.mlp {
                GpuMlp::Sparse { tables, .. } => tables.is_some(),
                GpuMlp::Dense(_) => true,
            })
    }

    /// Grouped-query attention of `b.h` into `b.out`, as
    /// [`Attention::forward`].
    #[allow(clippy::too_many_arguments)]
    fn grouped(
        &self,
        a: &Attention,
        dev: &GpuAttn,
        layer: usize,
        t: usize,
        seqs: &mut [Seq<'_>],
        b: &mut Bufs,
        rounded: Option<&Rounded<'_>>,
    ) -> Result<()> {
        let GpuAttn::Grouped {
            q: wq,
            k: wk,
            v: wv,
            o: wo,
            q_norm,
            k_norm,
        } = dev
        else {
            return Err(Error::invalid("CUDA decoder: not grouped attention"));
        };
        let g = &self.gpu;
        let (hd, h) = (a.head_dim, self.cfg().hidden_size);
        let (nq, nkv) = (a.n_heads * hd, a.n_kv_heads * hd);
        let hn = b.h.v(0..t * h)?;
        forward_each(
            g,
            (&hn, rounded),
            t,
            &mut [
                (wq, &mut b.q.m(g, t * nq)?),
                (wk, &mut b.k.m(g, t * nkv)?),
                (wv, &mut b.v.m(g, t * nkv)?),
            ],
        )?;
        let half = hd / 2;
        let (cos, sin) = rope_tables(&b.step, b.rope_at, b.rope_len, t * half)?;
        // One sequence's keys and values go into its cache in the launch
        // that rotates them, where there is one (Qwen3's per-head norms).
        let mut cached = false;
        match (q_norm, k_norm, a.clip) {
            // Qwen3's per-head norms: with the rotation, one launch.
            (Some(wq), Some(wk), None) if wq.len() == hd && wk.len() == hd => {
                let target = match seqs {
                    [seq] => {
                        let pos = seq.kv.len();
                        let (kv, widths) = seq.kv.device_mut().ok_or_else(no_device_kv)?;
                        kv.reserve(g, layer, pos, widths, t)?;
                        match kv.buffers_mut(layer) {
                            Some((keys, Some(values))) => Some(KvTarget {
                                v: b.v.v(0..t * nkv)?,
                                keys,
                                values,
                                pos,
                                pos_at: b.step.v(0..1)?,
                            }),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                cached = target.is_some();
                g.qk_norm_rope(
                    &mut b.q.part(0..t * nq)?,
                    &mut b.k.part(0..t * nkv)?,
                    &wq.as_view(),
                    &wk.as_view(),
                    t,
                    &cos,
                    &sin,
                    a.eps,
                    target,
                )?
            }
            _ => {
                if let Some(w) = q_norm {
                    g.rms_norm(&mut b.q.part(0..t * nq)?, w.len(), &w.as_view(), a.eps)?;
                }
                if let Some(w) = k_norm {
                    g.rms_norm(&mut b.k.part(0..t * nkv)?, w.len(), &w.as_view(), a.eps)?;
                }
                if let Some(c) = a.clip {
                    g.clamp(&mut b.q.part(0..t * nq)?, c)?;
                    g.clamp(&mut b.k.part(0..t * nkv)?, c)?;
                    g.clamp(&mut b.v.part(0..t * nkv)?, c)?;
                }
                g.rope(&mut b.q.part(0..t * nq)?, t, hd, 0, &cos, &sin, false)?;
                g.rope(&mut b.k.part(0..t * nkv)?, t, hd, 0, &cos, &sin, false)?;
            }
        }
        let mut attn = b.attn.m(g, t * nq)?;
        // One token of one sequence: the attention launch also rounds its
        // output for the output projection where that takes int8.
        let round = t == 1 && seqs.len() == 1 && g.takes_int8(&wo.w, 1);
        let mut attn_rounded = None;
        for (i, seq) in seqs.iter_mut().enumerate() {
            let (pos0, first, len) = (seq.kv.len(), seq.start, seq.len);
            let rows = |w: usize| first * w..(first + len) * w;
            let (kv, widths) = seq.kv.device_mut().ok_or_else(no_device_kv)?;
            let pos_at = b.step.v(i..i + 1)?;
            if !cached {
                let (k, v) = (b.k.v(rows(nkv))?, b.v.v(rows(nkv))?);
                kv.append(g, layer, (pos0, &pos_at), widths, len, &k, &v)?;
            }
            let (keys, values) = kv.layer(layer).ok_or_else(no_device_kv)?;
            let shape = AttnShape::grouped(a.n_heads, a.n_kv_heads, hd, pos0, a.window);
            let q = b.q.v(rows(nq))?;
            attn_rounded = g.attention_rounded(
                &q,
                &keys,
                &values,
                shape,
                Some(&pos_at),
                len,
                &mut attn.slice_mut(rows(nq)),
                round,
            )?;
        }
        let x = b.attn.v(0..t * nq)?;
        forward_each(
            g,
            (&x, attn_rounded.as_ref()),
            t,
            &mut [(wo, &mut b.out.m(g, t * h)?)],
        )
    }

    /// Multi-head latent attention of `b.h` into `b.out`, as
    /// [`LatentAttention::forward`].
    fn latent(
        &self,
        a: &LatentAttention,
        dev: &GpuAttn,
        layer: usize,
        t: usize,
        seqs: &mut [Seq<'_>],
        b: &mut Bufs,
    ) -> Result<()> {
        let GpuAttn::Latent {
            q: wq,
            kv_a,
            kv_norm,
            kv_b,
            o: wo,
        } = dev
        else {
            return Err(Error::invalid("CUDA decoder: not latent attention"));
        };
        let g = &self.gpu;
        let h = self.cfg().hidden_size;
        let (nh, nope, rope, rank) = (a.n_heads, a.nope, a.rope, a.rank);
        let (qk, row) = (nope + rope, rank + rope);
        let hn = b.h.v(0..t * h)?;
        match wq {
            GpuQuery::Full(p) => forward(g, p, &hn, t, &mut b.q.m(g, t * nh * qk)?)?,
            GpuQuery::LowRank { a: pa, norm, b: pb } => {
                let ra = pa.w.rows;
                forward(g, pa, &hn, t, &mut b.k.m(g, t * ra)?)?;
                g.rms_norm(
                    &mut b.k.part(0..t * ra)?,
                    norm.len(),
                    &norm.as_view(),
                    a.eps,
                )?;
                forward(g, pb, &b.k.v(0..t * ra)?, t, &mut b.q.m(g, t * nh * qk)?)?;
            }
        }
        forward(g, kv_a, &hn, t, &mut b.v.m(g, t * row)?)?;
        g.rms_norm(&mut b.v.part(0..t * row)?, row, &kv_norm.as_view(), a.eps)?;
        let half = rope / 2;
        let (cos, sin) = rope_tables(&b.step, b.rope_at, b.rope_len, t * half)?;
        let il = a.interleave;
        g.rope(&mut b.v.part(0..t * row)?, t, row, rank, &cos, &sin, il)?;
        g.rope(&mut b.q.part(0..t * nh * qk)?, t, qk, nope, &cos, &sin, il)?;

        let shape = MlaShape {
            n_heads: nh,
            nope,
            rope,
            v_dim: a.v_dim,
            rank,
        };
        let kv_b = kv_b.as_view();
        g.mla_absorb(
            &b.q.v(0..t * nh * qk)?,
            t,
            &kv_b,
            shape,
            &mut b.k.m(g, t * nh * row)?,
        )?;
        let mut out_lat = b.attn.m(g, t * nh * rank)?;
        for (i, seq) in seqs.iter_mut().enumerate() {
            let (pos0, first, len) = (seq.kv.len(), seq.start, seq.len);
            let rows = |w: usize| first * w..(first + len) * w;
            let (kv, widths) = seq.kv.device_mut().ok_or_else(no_device_kv)?;
            let latent = b.v.v(rows(row))?;
            let pos_at = b.step.v(i..i + 1)?;
            kv.append(g, layer, (pos0, &pos_at), widths, len, &latent, &latent)?;
            let (keys, values) = kv.layer(layer).ok_or_else(no_device_kv)?;
            let shape = AttnShape {
                n_heads: nh,
                n_kv_heads: 1,
                head_dim: row,
                v_dim: rank,
                k_stride: row,
                v_stride: row,
                scale: a.scale,
                pos0,
                window: None,
            };
            let q = b.k.v(rows(nh * row))?;
            let out = &mut out_lat.slice_mut(rows(nh * rank));
            g.attention(&q, &keys, &values, shape, Some(&pos_at), len, out)?;
        }
        let vd = nh * a.v_dim;
        let lat = b.attn.v(0..t * nh * rank)?;
        g.mla_values(&lat, t, &kv_b, shape, &mut b.q.m(g, t * vd)?)?;
        forward(g, wo, &b.q.v(0..t * vd)?, t, &mut b.out.m(g, t * h)?)
    }

    /// The sparse block over `b.h` into `b.out`, as [`Moe::forward`]:
    /// routing on the device; then, for a few tokens with resident experts,
    /// every chosen expert run in place by id; otherwise its pairs to the
    /// host, the tokens grouped by expert, each chosen expert once over its
    /// rows, the weighted sum.
    /// `rounded`: `b.h` rounded by its norm, for the few-token path's
    /// int8 experts.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        m: &Moe,
        dev: &GpuMlp,
        layer: usize,
        t: usize,
        b: &mut Bufs,
        rounded: Option<&Rounded<'_>>,
        plan: Option<HostLayer>,
    ) -> Result<()> {
        let GpuMlp::Sparse {
            router,
            score_bias,
            tables,
            shared,
            ..
        } = dev
        else {
            return Err(Error::invalid("CUDA decoder: not a sparse layer"));
        };
        let g = &self.gpu;
        let (hidden, k) = (router.cols, m.routing.top_k);
        let bias = score_bias.as_ref();
        let Some(plan) = plan else {
            let Some([gate, up, down]) = tables else {
                return Err(Error::invalid(
                    "CUDA decoder: streamed experts run on the device",
                ));
            };
            // Few tokens: every chosen expert in one launch per matrix,
            // reading the ids `route` wrote; nothing goes to the host.
            let (pairs, inter) = (t * k, gate.rows);
            {
                let x = b.h.v(0..t * hidden)?;
                let (mut ids, mut w) = (b.ids.m(g, pairs)?, b.weights.m(g, pairs)?);
                let out = (&mut ids, &mut w);
                self.route_on_device(m, router, bias, &x, t, &mut b.router, out)?;
            }
            self.tiers.vram_hits.fetch_add(pairs as u64, Relaxed);
            let ids = b.ids.v(0..pairs)?;
            let act = &mut b.gate.m(g, pairs * inter)?;
            // The down projection's int8 input rounded by the launch that
            // writes it, where that one takes rounded rows itself.
            let round_act = self.fuse && g.takes_int8_experts(down);
            let act_rounded = match rounded {
                Some(r) => g.swiglu_id_rounded(gate, up, &ids, r, k, act, round_act)?,
                None => {
                    g.swiglu_id(gate, up, &ids, &b.h.v(0..t * hidden)?, k, act)?;
                    None
                }
            };
            g.matvec_id_sum(
                down,
                &ids,
                (&b.gate.v(0..pairs * inter)?, act_rounded.as_ref()),
                &b.weights.v(0..pairs)?,
                k,
                t,
                &mut b.ys.m(g, pairs * hidden)?,
                &mut b.out.m(g, t * hidden)?,
            )?;
            return self.shared_expert(shared.as_ref(), t, hidden, b);
        };
        self.layer_to_host(m, router, bias, layer, t, plan, b)
    }

    /// How layer `layer`'s step of `t` tokens a sequence runs where the
    /// host drives its experts; `None` where it does not (a dense layer,
    /// or a small step over experts in VRAM: all on the device).
    fn host_layer(&self, layer: usize, t: usize, b: &Bufs) -> Option<HostLayer> {
        let (
            Mlp::Sparse(m),
            GpuMlp::Sparse {
                tables, experts, ..
            },
        ) = (&self.cpu.layers[layer].mlp, &self.layers[layer].mlp)
        else {
            return None;
        };
        if tables.is_some() && t <= MATVEC_MAX_TOKENS {
            return None;
        }
        let streamed =
            tables.is_none() && experts.is_none() && matches!(m.experts, Experts::Streamed { .. });
        let predicted = streamed.then(|| self.guess(layer, t, b)).flatten();
        let path = if streamed && t <= MATVEC_MAX_TOKENS {
            b.paths.pick(t)
        } else {
            ExpertPath::Copy
        };
        Some(HostLayer { predicted, path })
    }

    /// Sizes what a stretch's routing download and guess write for a step
    /// of `t` tokens a sequence, to the most any layer's plan needs: a
    /// buffer that grows while a stretch is recorded fails the capture
    /// (and past a few, graphs are given up), and the host buffer the
    /// routes come down into, which every stretch's graph holds, must not
    /// move. Its address.
    fn size_for_stretches(&self, t: usize, b: &mut Bufs) -> Result<u64> {
        let g = &self.gpu;
        // Every sparse layer routes by the config's rule.
        let (k, h) = (self.cfg().routing.top_k, self.cfg().hidden_size);
        let most = t * (4 * k + h);
        b.to_host.m(g, most)?;
        b.head.m(g, t * h)?;
        let host = HostBuf::resize(&mut b.host.to_host, g, most);
        Ok(host.as_slice().as_ptr() as u64)
    }

    /// Layer `layer`'s experts where the host drives them, once its
    /// routing's download ([`GpuDecoder::moe`] queued it) has come: the
    /// pairs grouped by expert, run the way `plan` says, and their outputs
    /// summed into `b.out`.
    fn moe_experts<'s>(
        &'s self,
        layer: usize,
        t: usize,
        b: &mut Bufs,
        plan: HostLayer,
        ahead: &mut Option<Ahead<'s>>,
    ) -> Result<()> {
        let (
            Mlp::Sparse(m),
            GpuMlp::Sparse {
                router,
                experts,
                tables,
                shared,
                ..
            },
        ) = (&self.cpu.layers[layer].mlp, &self.layers[layer].mlp)
        else {
            return Err(Error::invalid("CUDA decoder: not a sparse layer"));
        };
        let g = &self.gpu;
        let (hidden, n_exp, k) = (router.cols, router.rows, m.routing.top_k);
        let HostLayer { predicted, path } = plan;
        self.layer_from_host(t * k, plan, t * hidden, b)?;
        if let Some((_, n_exp)) = predicted {
            self.digest_prediction(n_exp, b)?;
        }
        let host = &mut b.host;
        host.chosen.clear();
        host.chosen
            .extend(host.ids.iter().copied().zip(host.weights.iter().copied()));

        // Grouped by expert as on the CPU; the ids came from the device, so
        // check them before they index the host's tables.
        if let Some(&(e, _)) = host.chosen.iter().find(|&&(e, _)| e as usize >= n_exp) {
            return Err(Error::invalid(format!(
                "CUDA routing chose expert {e} of {n_exp}"
            )));
        }
        group_by_expert(
            &host.chosen,
            n_exp,
            &mut host.start,
            &mut host.order,
            &mut host.fill,
            &mut host.used,
        );
        // Each token's pairs by their row of the gathered outputs,
        // ascending: the order the CPU sums them in.
        host.slots.resize(host.order.len(), 0);
        for (i, &slot) in host.order.iter().enumerate() {
            host.slots[slot] = i;
        }
        host.routes.clear();
        host.routes.extend(host.order.iter().map(|&o| o as u32));
        host.pos_weights.clear();
        for tok in 0..t {
            let mut pairs: smallvec::SmallVec<[(usize, f32); 16]> = (tok * k..(tok + 1) * k)
                .map(|s| (host.slots[s], host.chosen[s].1))
                .collect();
            pairs.sort_by_key(|p| p.0);
            host.routes.extend(pairs.iter().map(|p| p.0 as u32));
            host.pos_weights.extend(pairs.iter().map(|p| p.1));
        }
        host.routes
            .extend(host.pos_weights.iter().map(|w| w.to_bits()));

        // One upload: each is a driver call the GPU idles through.
        let pairs = host.order.len();
        g.upload_into(&host.routes, &mut b.routes.m(g, 3 * pairs)?)?;
        if path != ExpertPath::Cpu {
            let (hn, order) = (b.h.v(0..t * hidden)?, b.routes.v(0..pairs)?);
            g.gather(&hn, hidden, &order, k, &mut b.xs.m(g, pairs * hidden)?)?;
        }
        b.ys.m(g, pairs * hidden)?;

        let used = std::mem::take(&mut b.host.used);
        let grouped = tables.as_ref().filter(|t| tiled(t));
        if tables.is_some() || experts.is_some() {
            self.tiers.vram_hits.fetch_add(pairs as u64, Relaxed);
        }
        let ran = match (grouped, experts, &m.experts) {
            (Some(tables), _, _) => run_grouped(g, tables, &used, pairs, hidden, b),
            (None, Some(resident), _) => used.iter().try_for_each(|&e| {
                let rows = b.host.start[e as usize]..b.host.start[e as usize + 1];
                run_expert(g, &resident[e as usize], rows, hidden, b)
            }),
            (None, None, Experts::Streamed { cache, layer: l }) => self.streamed(
                cache,
                *l,
                layer,
                &used,
                hidden,
                k,
                t,
                path,
                predicted.is_some(),
                b,
                ahead,
            ),
            (None, None, Experts::Resident(_)) => Err(Error::invalid(
                "CUDA decoder: resident experts not uploaded",
            )),
        };
        b.host.used = used;
        ran?;

        let ys = b.ys.v(0..pairs * hidden)?;
        let pos = b.routes.v(pairs..2 * pairs)?;
        let w = recast(b.routes.v(2 * pairs..3 * pairs)?)?;
        g.scatter(&ys, &pos, &w, k, t, &mut b.out.m(g, t * hidden)?)?;
        self.shared_expert(shared.as_ref(), t, hidden, b)
    }

    /// The shared expert (if any) of `b.h` added to `b.out`, gated as
    /// Qwen2-MoE's.
    fn shared_expert(
        &self,
        shared: Option<&(GpuFfn, Option<GpuMatrix>)>,
        t: usize,
        hidden: usize,
        b: &mut Bufs,
    ) -> Result<()> {
        let g = &self.gpu;
        if let Some((w, gate)) = shared {
            let hn = b.h.v(0..t * hidden)?;
            swiglu(g, w, &hn, t, &mut b.gate, &mut b.up, &mut b.shared)?;
            let ysh = b.shared.v(0..t * hidden)?;
            match gate {
                Some(gate) => {
                    g.matmul(&hn, t, gate, &mut b.shared_gate.m(g, t)?)?;
                    let gv = b.shared_gate.v(0..t)?;
                    g.gated_add(&mut b.out.part(0..t * hidden)?, &ysh, &gv)?;
                }
                None => g.add(&mut b.out.part(0..t * hidden)?, &ysh)?,
            }
        }
        Ok(())
    }

    /// Streamed experts: pinned in the RAM cache in groups that fit it
    /// (the next sparse layer's predicted experts queued behind the first
    /// group's reads, as on the CPU), then, for a small batch, each
    /// group run the way [`ExpertPaths`] has found faster; a larger batch's
    /// always copied to the GPU, where its rows run in one pass over
    /// each expert. Only the time after the reads is what a way costs.
    #[allow(clippy::too_many_arguments)]
    fn streamed<'s>(
        &'s self,
        cache: &Arc<ExpertCache>,
        cache_layer: usize,
        layer: usize,
        used: &[u32],
        hidden: usize,
        k: usize,
        t: usize,
        path: ExpertPath,
        mut predict: bool,
        b: &mut Bufs,
        ahead: &mut Option<Ahead<'s>>,
    ) -> Result<()> {
        let g = &self.gpu;
        let predicted_next = predict;
        // What the layer before copied ahead for this one, if anything
        // (dropped here, after its copies, when this layer does not copy).
        let mut early = ahead
            .take()
            .filter(|a| a.layer == layer && path != ExpertPath::Cpu);
        let small = t <= MATVEC_MAX_TOKENS;
        let pairs = b.host.order.len();
        let mut spent = std::time::Duration::ZERO;
        // The CPU's workers spin between this layer's experts and the
        // next's rather than park (waking them costs milliseconds on a VM,
        // which the CPU's trials would be charged): see `stay_awake`.
        let _awake = (path != ExpertPath::Copy).then(crate::kernels::stay_awake);
        if path != ExpertPath::Copy {
            // The rows in expert order, as the `gather` kernel would have
            // put them (its rows are the ones `moe` downloaded).
            let start = std::time::Instant::now();
            let host = &mut b.host;
            host.xs.resize(pairs * hidden, 0.0);
            host.ys.clear();
            host.ys.resize(pairs * hidden, 0.0);
            for (row, &pair) in host.xs.chunks_exact_mut(hidden).zip(&host.order) {
                let tok = pair / k;
                row.copy_from_slice(&host.h[tok * hidden..(tok + 1) * hidden]);
            }
            spent += start.elapsed();
        }
        // Once the way is kept nothing times it: the host goes on queueing
        // the layer's last kernels and the next layer's without waiting.
        let timed = !b.paths.settled(t);
        for group in used.chunks(cache.capacity()) {
            let waiting = profile::wait(Op::wait_experts);
            let mut pinned = cache.request(cache_layer, group)?;
            if predict {
                cache.prefetch(layer + 1, &b.host.predicted, b.prompt);
                predict = false;
            }
            pinned.wait()?;
            drop(waiting);
            let start = std::time::Instant::now();
            match path {
                ExpertPath::Cpu => {
                    let host = &mut b.host;
                    self.cpu_experts(
                        &pinned,
                        0..pinned.len(),
                        &host.start,
                        &host.xs,
                        &mut host.ys,
                    )
                }
                ExpertPath::Copy => {
                    let (ids, mats) = pinned_group(&pinned);
                    // Those copied ahead, and the rest now.
                    let mut uploads: Vec<_> = ids
                        .iter()
                        .map(|&e| early.as_mut().and_then(|a| a.take(e)))
                        .collect();
                    let (fresh_at, fresh): (Vec<usize>, Vec<_>) = (0..ids.len())
                        .filter(|&i| uploads[i].is_none())
                        .map(|i| (i, mats[i]))
                        .unzip();
                    let copied = g.upload_experts(&fresh)?;
                    self.count_copies(&fresh);
                    let used_ahead = (ids.len() - fresh.len()) as u64;
                    self.tiers.ahead_used.fetch_add(used_ahead, Relaxed);
                    for (i, u) in fresh_at.into_iter().zip(copied) {
                        uploads[i] = Some(u);
                    }
                    let uploads: Vec<_> = uploads.into_iter().flatten().collect();
                    let ran = if small {
                        run_copied(g, t, &[(&ids, &uploads)], hidden, b)
                    } else {
                        run_uploaded(g, &ids, &uploads, pairs, hidden, b)
                    };
                    // The next layer's likely experts queue behind this
                    // layer's copies. The copies read the slots, and write
                    // the device matrices, after `upload_experts` has
                    // returned: both (the matrices kept for the next
                    // upload, the pins dropped with this scope) wait for
                    // this layer's, not for those.
                    let mark = g.uploads_mark();
                    let next = match (&ran, &mark) {
                        (Ok(()), Ok(_)) if predicted_next => self.copy_ahead(layer, t, b),
                        _ => Ok(None),
                    };
                    let finished = match &mark {
                        Ok(mark) => g.finish_uploads_to(mark),
                        Err(_) => g.finish_uploads(),
                    };
                    ran.and(mark.map(drop)).and(finished)?;
                    *ahead = next?;
                    g.recycle(uploads.into_iter().flat_map(|(m, _)| m));
                    if small && timed {
                        // What the choice compares: the experts' kernels too.
                        g.synchronize()?;
                    }
                }
                ExpertPath::Split => {
                    // The CPU computes a run of the experts (rows go by
                    // expert id, as the group does) while the GPU copies and
                    // runs the rest, those copied ahead among them whatever
                    // the share: their copies and kernels are queued beside
                    // the CPU's first loop (`beside`), so that neither waits
                    // for the other to start, and the next layer's likely
                    // experts are copied ahead behind them, while PCIe would
                    // otherwise idle through the CPU's tail, the next
                    // attention and the routing round trip.
                    let (ids, mats) = pinned_group(&pinned);
                    let mut ready: Vec<Option<Copied>> = ids
                        .iter()
                        .map(|&e| early.as_mut().and_then(|a| a.take(e)))
                        .collect();
                    let hits = ready.iter().filter(|u| u.is_some()).count();
                    self.tiers.ahead_used.fetch_add(hits as u64, Relaxed);
                    let share = b.paths.cpu_share(t);
                    let want = ((ids.len() - hits) as f64 * share).round() as usize;
                    let ahead_of: Vec<bool> = ready.iter().map(Option::is_some).collect();
                    let cpu = cpu_run(&ahead_of, want);
                    let (xs, mut ys) = (
                        std::mem::take(&mut b.host.xs),
                        std::mem::take(&mut b.host.ys),
                    );
                    let cpu_start = b.host.start.clone();
                    let mut used = Vec::new();
                    let mut queued = Ok(None);
                    let mut next = Ok(None);
                    let gpu_share = || {
                        queued = self.queue_split_share(
                            t,
                            &ids,
                            &mats,
                            &mut ready,
                            cpu.clone(),
                            hidden,
                            b,
                            &mut used,
                        );
                        if matches!(queued, Ok(Some(_))) && predicted_next {
                            next = self.copy_ahead(layer, t, b);
                        }
                    };
                    crate::kernels::beside(gpu_share, || {
                        self.cpu_experts(&pinned, cpu.clone(), &cpu_start, &xs, &mut ys)
                    });
                    let ran = queued.and_then(|mark| {
                        if let (Some(&first), Some(&last)) =
                            (ids[cpu.clone()].first(), ids[cpu.clone()].last())
                        {
                            let rows = cpu_start[first as usize] * hidden
                                ..cpu_start[last as usize + 1] * hidden;
                            g.upload_into(&ys[rows.clone()], &mut b.ys.part(rows)?)?;
                        }
                        Ok(mark)
                    });
                    (b.host.xs, b.host.ys) = (xs, ys);
                    // This layer's copies only: those ahead go on.
                    let finished = match &ran {
                        Ok(Some(mark)) => g.finish_uploads_to(mark),
                        _ => g.finish_uploads(),
                    };
                    ran.and(finished)?;
                    *ahead = next?;
                    g.recycle(used.into_iter().flat_map(|(m, _)| m));
                    if timed {
                        g.synchronize()?;
                    }
                }
            }
            spent += start.elapsed();
        }
        if path == ExpertPath::Cpu {
            let start = std::time::Instant::now();
            g.upload_into(&b.host.ys, &mut b.ys.m(g, pairs * hidden)?)?;
            spent += start.elapsed();
        }
        if small {
            let bytes = used.len() * cache.slot_bytes();
            b.paths.record(t, path, spent.as_secs_f64(), bytes);
        }
        Ok(())
    }

    /// After layer `layer`'s one-token step has queued its own copies, the
    /// next layer's predicted experts that are in RAM, copied to the GPU
    /// ([`Ahead`]), as many as [`GpuDecoder::ahead_n`] says, where the
    /// cache has room beside them for the next layer's own request.
    fn copy_ahead(&self, layer: usize, t: usize, b: &Bufs) -> Result<Option<Ahead<'_>>> {
        let n = self.ahead_n(t, b);
        if n == 0 {
            return Ok(None);
        }
        let Some((m, ..)) = self.next_streamed(layer) else {
            return Ok(None);
        };
        let Experts::Streamed { cache, layer: l } = &m.experts else {
            return Ok(None);
        };
        let k = m.routing.top_k;
        if cache.capacity() < 4 * k {
            return Ok(None);
        }
        let predicted = &b.host.predicted;
        let pins = cache.pin_resident(*l, &predicted[..n.min(predicted.len())]);
        if pins.len() == 0 {
            return Ok(None);
        }
        let g = &self.gpu;
        let (ids, uploads) = {
            let (ids, mats) = pinned_group(&pins);
            let uploads = g.upload_experts(&mats)?;
            self.count_copies(&mats);
            (ids, uploads)
        };
        self.tiers.copied_ahead.fetch_add(ids.len() as u64, Relaxed);
        let done = match g.uploads_mark() {
            Ok(done) => done,
            Err(e) => {
                // The pins go with this return: not before the copies.
                g.finish_uploads()?;
                return Err(e);
            }
        };
        let uploads = ids.into_iter().zip(uploads.into_iter().map(Some)).collect();
        Ok(Some(Ahead {
            gpu: g,
            layer: layer + 1,
            _pins: pins,
            uploads,
            done,
        }))
    }

    /// Experts `run` of `pinned`'s on the CPU, over the host's gathered
    /// rows into its outputs.
    fn cpu_experts(
        &self,
        pinned: &Pinned<'_>,
        run: std::ops::Range<usize>,
        start: &[usize],
        xs: &[f32],
        ys: &mut [f32],
    ) {
        let n = run.len();
        self.cpu
            .backend
            .experts(n, &|i| pinned.get(run.start + i), start, xs, ys);
        self.tiers.cpu_runs.fetch_add(n as u64, Relaxed);
    }

    /// A split's GPU share queued: the experts of group `ids` (matrices
    /// `mats`) outside the CPU's run `cpu` copied, where not copied ahead
    /// (`ready`), and run on either side of the CPU's rows; what it
    /// uploads and ran moved into `used`. The mark after its copies, or
    /// none where it copied nothing.
    #[allow(clippy::too_many_arguments)]
    fn queue_split_share(
        &self,
        t: usize,
        ids: &[u32],
        mats: &[[Matrix<'_>; 3]],
        ready: &mut [Option<Copied>],
        cpu: std::ops::Range<usize>,
        hidden: usize,
        b: &mut Bufs,
        used: &mut Vec<Copied>,
    ) -> Result<Option<CudaEvent>> {
        let g = &self.gpu;
        let fresh_at: Vec<usize> = (0..ids.len())
            .filter(|&i| !cpu.contains(&i) && ready[i].is_none())
            .collect();
        let fresh: Vec<_> = fresh_at.iter().map(|&i| mats[i]).collect();
        let copied = g.upload_experts(&fresh)?;
        self.count_copies(&fresh);
        for (i, u) in fresh_at.into_iter().zip(copied) {
            ready[i] = Some(u);
        }
        let mark = g.uploads_mark()?;
        let mut take = |r: std::ops::Range<usize>| {
            ready[r]
                .iter_mut()
                .map(|u| {
                    u.take()
                        .ok_or_else(|| Error::invalid("CUDA split: an expert not copied"))
                })
                .collect::<Result<Vec<Copied>>>()
        };
        let (before, after) = (take(0..cpu.start)?, take(cpu.end..ids.len())?);
        let runs = [
            (&ids[..cpu.start], &before[..]),
            (&ids[cpu.end..], &after[..]),
        ];
        let ran = run_copied(g, t, &runs, hidden, b);
        used.extend(before.into_iter().chain(after));
        ran.map(|()| Some(mark))
    }

    /// Counts experts copied to the GPU and their bytes.
    fn count_copies(&self, mats: &[[Matrix<'_>; 3]]) {
        let bytes: usize = mats.iter().flatten().map(|m| m.data.len()).sum();
        self.tiers.copied.fetch_add(mats.len() as u64, Relaxed);
        self.tiers.pcie_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// The next layer's sparse block, when its experts stream.
    fn next_streamed(&self, layer: usize) -> Option<NextSparse<'_>> {
        let (
            Some(next),
            Some(GpuLayer {
                mlp:
                    GpuMlp::Sparse {
                        router,
                        score_bias,
                        experts: None,
                        tables: None,
                        ..
                    },
                post_norm,
                ..
            }),
        ) = (self.cpu.layers.get(layer + 1), self.layers.get(layer + 1))
        else {
            return None;
        };
        let Mlp::Sparse(m) = &next.mlp else {
            return None;
        };
        matches!(m.experts, Experts::Streamed { .. }).then_some((
            m,
            router,
            score_bias.as_ref(),
            post_norm,
        ))
    }

    /// Whether layer `layer`'s step guesses the next layer's experts, and
    /// then the guess's `(pairs, experts)`: only where something acts on
    /// it, the next layer's cache reading ahead for this pass or the
    /// copies ahead ([`Ahead`]). A guess is a norm and a router launch
    /// (15 µs a layer on the H100) that the host's one wait per layer
    /// waits out, and with the experts in RAM the guesses fed only the
    /// recall figure (which then reads as no prediction).
    fn guess(&self, layer: usize, t: usize, b: &Bufs) -> Option<(usize, usize)> {
        let (m, router, ..) = self.next_streamed(layer)?;
        let Experts::Streamed { cache, .. } = &m.experts else {
            return None;
        };
        (cache.read_ahead().reads(b.prompt) || self.ahead_n(t, b) > 0)
            .then_some((t * m.routing.top_k, router.rows))
    }

    /// How many predicted experts a `t`-token step copies ahead: none but
    /// for one-token steps whose way is settled on copying or splitting,
    /// and there [`GpuDecoder::ahead`] (`SMOE_COPY_AHEAD`) or, unset, one
    /// in a split and none when copying. One fits the time the PCIe link
    /// idles between a split layer's copies and the next layer's (about
    /// 70 us on the H100 host, an expert's copy 56): with one ahead the
    /// host-RAM row decoded 358/347/368/335/366 tok/s against
    /// 357/332/357/341/344 without (five alternating rounds, medians of
    /// three, one call, H100, 2026-12-06), and two no better than one
    /// (medians of three rounds: 384.8, 396.5, 396.9 with 0, 1, 2). More
    /// spilled into the next layer's demand copies before: two ahead
    /// decoded 305 against 319, and copying every expert with eight ahead
    /// 189.8 against 224-226 splitting.
    fn ahead_n(&self, t: usize, b: &Bufs) -> usize {
        if t != 1 || !b.paths.settled(1) {
            return 0;
        }
        match b.paths.pick(1) {
            ExpertPath::Cpu => 0,
            way => self.ahead.unwrap_or(usize::from(way == ExpertPath::Split)),
        }
    }

    /// Layer `layer + 1`'s experts (sparse and streamed) guessed from the
    /// residual stream `x` as it is now (as [`Moe::predict`]), its norm
    /// into `head`: ids then weights into `out` (`2 * t * k` words).
    fn launch_prediction(
        &self,
        layer: usize,
        t: usize,
        (x, head, logits): (&Buf<f32>, &mut Buf<f32>, &mut Buf<f32>),
        out: &mut CudaViewMut<'_, u32>,
    ) -> Result<()> {
        let Some((m, router, score_bias, post_norm)) = self.next_streamed(layer) else {
            return Err(Error::invalid("CUDA decoder: a guess of no streamed layer"));
        };
        let g = &self.gpu;
        let th = t * router.cols;
        let eps = self.cfg().rms_norm_eps;
        g.rms_norm_rows(&x.v(0..th)?, &post_norm.as_view(), eps, &mut head.m(g, th)?)?;
        let (mut ids, mut w) = out.split_at_mut(t * m.routing.top_k);
        let x = head.v(0..th)?;
        let routes = (&mut ids, &mut recast_mut(&mut w)?);
        self.route_on_device(m, router, score_bias, &x, t, logits, routes)
    }

    /// The routes [`GpuDecoder::launch_prediction`] launched, downloaded
    /// into `b.host.pred_ids` and `pred_weights` (of `n_exp` experts), as
    /// `b.host.predicted`: the experts chosen, most likely first.
    fn digest_prediction(&self, n_exp: usize, b: &mut Bufs) -> Result<()> {
        let host = &mut b.host;
        host.best.clear();
        host.best.resize(n_exp, f32::NEG_INFINITY);
        for (&e, &w) in host.pred_ids.iter().zip(&host.pred_weights) {
            // The device chose it: check before it indexes.
            let best = host.best.get_mut(e as usize).ok_or_else(|| {
                Error::invalid(format!("CUDA routing chose expert {e} of {n_exp}"))
            })?;
            *best = best.max(w);
        }
        let best = &host.best;
        host.predicted.clear();
        host.predicted
            .extend((0..best.len() as u32).filter(|&e| best[e as usize] > f32::NEG_INFINITY));
        host.predicted.sort_by(|&a, &c| {
            best[c as usize]
                .total_cmp(&best[a as usize])
                .then(a.cmp(&c))
        });
        Ok(())
    }

    /// Router logits of `x` (`t` rows) through `router` into `logits`, the
    /// top-k on the device into `ids` and `w`.
    #[allow(clippy::too_many_arguments)]
    fn route_on_device(
        &self,
        m: &Moe,
        router: &GpuMatrix,
        bias: Option<&CudaSlice<f32>>,
        x: &CudaView<'_, f32>,
        t: usize,
        logits: &mut Buf<f32>,
        (ids, w): (&mut CudaViewMut<'_, u32>, &mut CudaViewMut<'_, f32>),
    ) -> Result<()> {
        let g = &self.gpu;
        let bias = bias.map(|b| b.as_view());
        let logits = &mut logits.m(g, t * router.rows)?;
        g.router_route(x, t, router, &m.routing, bias.as_ref(), logits, ids, w)
    }

    /// Layer `layer`'s routing where the host drives its experts, and
    /// everything else the host needs of it, written back to back into
    /// `b.to_host` (all are four-byte words) and queued for one download:
    /// its `t * k` chosen ids, then their weights, the next layer's guess
    /// where `plan` has one, and, where the CPU runs experts, the normed
    /// rows (for its own gather). The host waits for the device and the
    /// bus once ([`GpuDecoder::layer_from_host`]), not once a buffer.
    #[allow(clippy::too_many_arguments)]
    fn layer_to_host(
        &self,
        m: &Moe,
        router: &GpuMatrix,
        bias: Option<&CudaSlice<f32>>,
        layer: usize,
        t: usize,
        plan: HostLayer,
        b: &mut Bufs,
    ) -> Result<()> {
        let g = &self.gpu;
        let pairs = t * m.routing.top_k;
        let (predicted, rows) = to_host_words(plan, t * router.cols);
        let n = 2 * pairs + 2 * predicted + rows;
        {
            let Bufs {
                to_host,
                h,
                x,
                head,
                router: logits,
                ..
            } = b;
            let mut stage = to_host.m(g, n)?;
            let (mut routes, mut rest) = stage.split_at_mut(2 * pairs);
            let (mut ids, mut w) = routes.split_at_mut(pairs);
            let hn = h.v(0..t * router.cols)?;
            let out = (&mut ids, &mut recast_mut(&mut w)?);
            self.route_on_device(m, router, bias, &hn, t, logits, out)?;
            let (mut guess, mut normed) = rest.split_at_mut(2 * predicted);
            if predicted > 0 {
                self.launch_prediction(layer, t, (x, head, logits), &mut guess)?;
            }
            if rows > 0 {
                g.copy(&h.v(0..rows)?, &mut recast_mut(&mut normed)?)?;
            }
        }
        g.download_queued(&b.to_host.v(0..n)?, &mut b.host.to_host)
    }

    /// Waits for what [`GpuDecoder::layer_to_host`] queued (the same
    /// arguments) and puts it under the same names on `b.host`.
    fn layer_from_host(
        &self,
        pairs: usize,
        plan: HostLayer,
        rows: usize,
        b: &mut Bufs,
    ) -> Result<()> {
        let (predicted, rows) = to_host_words(plan, rows);
        let host = &mut b.host;
        let n = 2 * pairs + 2 * predicted + rows;
        let got = self.gpu.downloaded(&mut host.to_host, n)?;
        let (ids, rest) = got.split_at(pairs);
        let (weights, rest) = rest.split_at(pairs);
        let (pred_ids, rest) = rest.split_at(predicted);
        let (pred_weights, h) = rest.split_at(predicted);
        let floats = |dst: &mut Vec<f32>, src: &[u32]| {
            dst.clear();
            dst.extend(src.iter().map(|&w| f32::from_bits(w)));
        };
        host.ids.clear();
        host.ids.extend_from_slice(ids);
        floats(&mut host.weights, weights);
        host.pred_ids.clear();
        host.pred_ids.extend_from_slice(pred_ids);
        floats(&mut host.pred_weights, pred_weights);
        floats(&mut host.h, h);
        Ok(())
    }

    /// Logits of rows `rows` of the `t` rows of the last hidden states
    /// (`b.x` plus `b.out`, see [`GpuDecoder::rows`]) into `out`,
    /// `[rows, vocab]`, page-locked ([`HostBuf`]).
    fn head<'o>(
        &self,
        b: &mut Bufs,
        t: usize,
        rows: &[usize],
        out: &'o mut Option<HostBuf<f32>>,
    ) -> Result<&'o mut [f32]> {
        let n = self.head_on_device(b, t, rows)?;
        self.gpu.download_into(&b.logits.v(0..n)?, out)
    }

    /// The greedy picks of [`GpuDecoder::head`]'s rows (the sampler's
    /// argmax, on the device): a token a row comes back, not its logits.
    fn head_picks<'b>(&self, b: &'b mut Bufs, t: usize, rows: &[usize]) -> Result<&'b [u32]> {
        let n = self.head_on_device(b, t, rows)?;
        let (g, vocab) = (&self.gpu, self.cfg().vocab_size);
        g.argmax_rows(&b.logits.v(0..n)?, vocab, &mut b.token.m(g, rows.len())?)?;
        Ok(g.download_into(&b.token.v(0..rows.len())?, &mut b.host_token)?)
    }

    /// [`GpuDecoder::head`]'s logits, left in `b.logits`; how many.
    fn head_on_device(&self, b: &mut Bufs, t: usize, rows: &[usize]) -> Result<usize> {
        let g = &self.gpu;
        let (h, vocab) = (self.cfg().hidden_size, self.cfg().vocab_size);
        let n = rows.len();
        let eps = self.cfg().rms_norm_eps;
        // The last layer's output is left in `b.out` for this to add.
        let added = (!self.layers.is_empty())
            .then(|| b.out.v(0..t * h))
            .transpose()?;
        if n > 0 && rows.iter().copied().eq(0..t) && g.takes_int8(&self.lm_head, n) {
            // Every row (a decode step): the add, the norm and the int8
            // rounding the head reads in one launch.
            let r = g.norm_rows_rounded(
                &mut b.x.part(0..t * h)?,
                added.as_ref(),
                &self.norm.as_view(),
                eps,
                &mut b.head.m(g, t * h)?,
            )?;
            let logits = &mut b.logits.m(g, n * vocab)?;
            g.matmul_each_rounded(&r, n, &mut [(&self.lm_head, logits)])?;
            return Ok(n * vocab);
        }
        if let Some(d) = &added {
            g.add(&mut b.x.part(0..t * h)?, d)?;
        }
        {
            let mut picked = b.attn.m(g, n * h)?;
            for (i, &r) in rows.iter().enumerate() {
                let src = b.x.v(r * h..(r + 1) * h)?;
                g.copy(&src, &mut picked.slice_mut(i * h..(i + 1) * h))?;
            }
        }
        let picked = b.attn.v(0..n * h)?;
        g.rms_norm_rows(&picked, &self.norm.as_view(), eps, &mut b.head.m(g, n * h)?)?;
        let hn = b.head.v(0..n * h)?;
        g.matmul(&hn, n, &self.lm_head, &mut b.logits.m(g, n * vocab)?)?;
        Ok(n * vocab)
    }

    /// One sequence's `ids` through every layer after its cache `kv`
    /// ([`CausalLm::forward`] and [`CausalLm::forward_greedy`]): the
    /// buffers, holding the last hidden states for the head.
    fn run_one(&self, ids: &[u32], kv: &mut KvCache) -> Result<std::sync::MutexGuard<'_, Bufs>> {
        check_input(self.cfg(), ids, kv.len())?;
        let mut b = self.bufs();
        let mut seqs = [Seq {
            kv,
            start: 0,
            len: ids.len(),
        }];
        self.rows(ids, &mut seqs, &mut b)?;
        Ok(b)
    }

    fn bufs(&self) -> std::sync::MutexGuard<'_, Bufs> {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A sparse layer whose experts stream: its block, router, score bias
/// and the norm before it.
type NextSparse<'a> = (
    &'a Moe,
    &'a GpuMatrix,
    Option<&'a CudaSlice<f32>>,
    &'a CudaSlice<f32>,
);

/// Of [`GpuDecoder::layer_to_host`]'s download under `plan`, the guessed
/// pairs and the normed rows' words (`rows` where the CPU runs experts).
fn to_host_words(plan: HostLayer, rows: usize) -> (usize, usize) {
    let rows = if plan.path == ExpertPath::Copy {
        0
    } else {
        rows
    };
    (plan.predicted.map_or(0, |p| p.0), rows)
}

/// The step's first `n` RoPE cosines and sines (`rope` holds the
/// cosines, then the sines from `at`).
/// The first `n` RoPE cosines and sines of the step, `len` of each from
/// `at` in `step` ([`Bufs::rope_at`]).
fn rope_tables(
    step: &Buf<u32>,
    at: usize,
    len: usize,
    n: usize,
) -> Result<(CudaView<'_, f32>, CudaView<'_, f32>)> {
    Ok((
        recast(step.v(at..at + n)?)?,
        recast(step.v(at + len..at + len + n)?)?,
    ))
}

fn no_device_kv() -> Error {
    Error::invalid("a session made by a CPU model was given to the CUDA one")
}

/// `y = x · wᵀ (+ bias)`.
fn forward(
    g: &Gpu,
    l: &GpuLinear,
    x: &CudaView<'_, f32>,
    t: usize,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    forward_each(g, (x, None), t, &mut [(l, y)])
}

/// [`forward`] of one `x` through several layers (attention's q, k and
/// v), which [`Gpu::matmul_each`] lets share one activation rounding.
fn forward_each(
    g: &Gpu,
    (x, rounded): (&CudaView<'_, f32>, Option<&Rounded<'_>>),
    t: usize,
    outs: &mut [(&GpuLinear, &mut CudaViewMut<'_, f32>)],
) -> Result<()> {
    let mut products: Vec<_> = outs.iter_mut().map(|(l, y)| (&l.w, &mut **y)).collect();
    match rounded {
        Some(r) => g.matmul_each_rounded(r, t, &mut products)?,
        None => g.matmul_each(x, t, &mut products)?,
    }
    for (l, y) in outs.iter_mut() {
        if let Some(bias) = &l.bias {
            g.add_rows(y, &bias.as_view())?;
        }
    }
    Ok(())
}

/// `down(silu(gate(x)) * up(x))` into `y`.
fn swiglu(
    g: &Gpu,
    [gate, up, down]: &GpuFfn,
    x: &CudaView<'_, f32>,
    t: usize,
    gate_buf: &mut Buf<f32>,
    up_buf: &mut Buf<f32>,
    y: &mut Buf<f32>,
) -> Result<()> {
    let inter = gate.rows;
    g.matmul(x, t, gate, &mut gate_buf.m(g, t * inter)?)?;
    g.matmul(x, t, up, &mut up_buf.m(g, t * inter)?)?;
    g.silu_mul(&mut gate_buf.part(0..t * inter)?, &up_buf.v(0..t * inter)?)?;
    g.matmul(
        &gate_buf.v(0..t * inter)?,
        t,
        down,
        &mut y.m(g, t * down.rows)?,
    )
}

/// Every used expert's SwiGLU over its rows of the gathered `b.xs` (as
/// grouped in `b.host.start`) into the same rows of `b.ys`, one launch per
/// matrix for all of them.
fn run_grouped(
    g: &Gpu,
    [gate, up, down]: &[ExpertTable; 3],
    used: &[u32],
    pairs: usize,
    hidden: usize,
    b: &mut Bufs,
) -> Result<()> {
    let start = &b.host.start;
    let most = used
        .iter()
        .map(|&e| start[e as usize + 1] - start[e as usize])
        .max()
        .unwrap_or(0);
    b.host.start32.clear();
    b.host.start32.extend(start.iter().map(|&s| s as u32));
    let n = b.host.start32.len();
    g.upload_into(used, &mut b.used.m(g, used.len())?)?;
    g.upload_into(&b.host.start32, &mut b.start.m(g, n)?)?;
    let (u, s) = (b.used.v(0..used.len())?, b.start.v(0..n)?);
    let inter = gate.rows;
    let x = b.xs.v(0..pairs * hidden)?;
    g.gemm_id(
        gate,
        &u,
        &s,
        most,
        pairs,
        &x,
        &mut b.gate.m(g, pairs * inter)?,
    )?;
    g.gemm_id(up, &u, &s, most, pairs, &x, &mut b.up.m(g, pairs * inter)?)?;
    g.silu_mul(
        &mut b.gate.part(0..pairs * inter)?,
        &b.up.v(0..pairs * inter)?,
    )?;
    let act = b.gate.v(0..pairs * inter)?;
    g.gemm_id(
        down,
        &u,
        &s,
        most,
        pairs,
        &act,
        &mut b.ys.part(0..pairs * hidden)?,
    )
}

/// Whether the tiled kernel (`gemm_id`) takes these experts: rows of
/// whole 32-weight groups only.
fn tiled(tables: &[ExpertTable; 3]) -> bool {
    tables.iter().all(|m| m.cols.is_multiple_of(32))
}

/// A pinned group's expert ids and matrices, unzipped for
/// [`Gpu::upload_experts`].
fn pinned_group<'a>(pinned: &'a Pinned<'_>) -> (Vec<u32>, Vec<[Matrix<'a>; 3]>) {
    (0..pinned.len()).map(|i| pinned.get(i)).unzip()
}

/// Layers per captured graph of a decode step ([`Gpu::captured`]'s
/// slots): small enough that the GPU starts on the first part early, large
/// enough that each part's launch and update cost little against its
/// kernels (an 8-layer model: two parts).
const GRAPH_LAYERS: usize = 4;

/// Steps' worth of stretches ([`GpuDecoder::stretch`]) recorded with none
/// replayed after which a decoder records no more: while the way a
/// streamed layer's experts run is being chosen its stretches change from
/// step to step (a few steps), after that one that still never repeats
/// would only pay for recording.
const STRETCH_TRIES: usize = 16;

/// Experts a grouped launch takes at a time from a prompt's uploads.
const UPLOADED_GROUP: usize = 16;

/// A prompt's uploaded experts (`ids`, their matrices and copy events), run
/// UPLOADED_GROUP at a time by one grouped launch per matrix once the
/// group's last copy is in, while the next group copies: one small tiled
/// product per expert (32 rows each, for 512 tokens of top-8 routing over
/// 128 experts) ran a layer's streamed experts 7x slower than the grouped
/// launch runs the same experts resident. Experts whose matrices the
/// grouped kernel does not take run one by one.
fn run_uploaded(
    g: &Gpu,
    ids: &[u32],
    uploads: &[Copied],
    pairs: usize,
    hidden: usize,
    b: &mut Bufs,
) -> Result<()> {
    let n_exp = b.host.start.len().saturating_sub(1);
    for (ids, ups) in ids
        .chunks(UPLOADED_GROUP)
        .zip(uploads.chunks(UPLOADED_GROUP))
    {
        let Some((_, last)) = ups.last() else {
            continue;
        };
        g.wait_upload(last)?;
        let experts: Vec<_> = ids.iter().copied().zip(ups).collect();
        let grouped = uploaded_tables(g, n_exp, &experts)?.filter(tiled);
        match grouped {
            Some(tables) => run_grouped(g, &tables, ids, pairs, hidden, b)?,
            None => {
                for (&e, (w, _)) in ids.iter().zip(ups) {
                    let rows = b.host.start[e as usize]..b.host.start[e as usize + 1];
                    run_expert(g, w, rows, hidden, b)?;
                }
            }
        }
    }
    Ok(())
}

/// Copied experts on their rows of `b.xs` into the same rows of `b.ys`,
/// in runs of consecutive rows: each run's expert ids, and beside each its
/// upload (copied now or ahead, so its event may be any of a few).
fn run_copied(
    g: &Gpu,
    t: usize,
    runs: &[(&[u32], &[Copied])],
    hidden: usize,
    b: &mut Bufs,
) -> Result<()> {
    if run_copied_by_id(g, t, runs, hidden, b)? {
        return Ok(());
    }
    for (ids, uploads) in runs {
        ids.iter().zip(*uploads).try_for_each(|(&e, (w, ready))| {
            g.wait_upload(ready)?;
            let rows = b.host.start[e as usize]..b.host.start[e as usize + 1];
            run_expert(g, w, rows, hidden, b)
        })?;
    }
    Ok(())
}

/// A one-token batch's copied experts in two launches a run (gate and up
/// together, then down), after their copies, where one by one takes four
/// launches an expert: the host queues them in a few microseconds and gets
/// on with its own share of a split. One upload of the ids and one table a
/// matrix serve every run: an upload from pageable memory behind queued
/// kernels would hold the host until they ran. False, with nothing
/// queued, where the batch has several tokens, an expert has other than
/// one row (routing that repeated an expert) or the id kernels do not take
/// the matrices.
fn run_copied_by_id(
    g: &Gpu,
    t: usize,
    runs: &[(&[u32], &[Copied])],
    hidden: usize,
    b: &mut Bufs,
) -> Result<bool> {
    let all: Vec<(u32, &Copied)> = runs
        .iter()
        .flat_map(|(ids, ups)| ids.iter().copied().zip(ups.iter()))
        .collect();
    if all.is_empty() {
        return Ok(false);
    }
    let start = &b.host.start;
    let one_row = |e: u32| {
        let e = e as usize;
        start
            .get(e + 1)
            .zip(start.get(e))
            .is_some_and(|(b, a)| b - a == 1)
    };
    if t != 1 || !all.iter().all(|&(e, _)| one_row(e)) {
        return Ok(false);
    }
    let n_exp = start.len().saturating_sub(1);
    let Some([gate, up, down]) = uploaded_tables(g, n_exp, &all)? else {
        return Ok(false);
    };
    let ids: Vec<u32> = all.iter().map(|&(e, _)| e).collect();
    g.upload_into(&ids, &mut b.used.m(g, ids.len())?)?;
    // Copies ahead and now were queued apart, each batch with its event.
    let mut events: Vec<&Arc<CudaEvent>> = Vec::new();
    for (_, (_, ready)) in &all {
        if !events.iter().any(|e| Arc::ptr_eq(e, ready)) {
            events.push(ready);
            g.wait_upload(ready)?;
        }
    }
    let inter = gate.rows;
    let mut at = 0;
    for (run, _) in runs {
        let Some(&first) = run.first() else {
            continue;
        };
        // One row per expert, in ascending id: a run's rows are one block.
        let (pairs, row) = (run.len(), b.host.start[first as usize]);
        let used = b.used.v(at..at + pairs)?;
        g.swiglu_id(
            &gate,
            &up,
            &used,
            &b.h.v(0..hidden)?,
            pairs,
            &mut b.gate.m(g, pairs * inter)?,
        )?;
        let act = b.gate.v(0..pairs * inter)?;
        g.matvec_id(
            &down,
            &used,
            &act,
            &mut b.ys.part(row * hidden..(row + pairs) * hidden)?,
        )?;
        at += pairs;
    }
    Ok(true)
}

/// The id kernels' tables (gate, up, down) of copied experts (ids among
/// `n_exp`, each with its upload); `None` where the kernels do not take
/// the matrices.
fn uploaded_tables(
    g: &Gpu,
    n_exp: usize,
    experts: &[(u32, &Copied)],
) -> Result<Option<[ExpertTable; 3]>> {
    let table = |i: usize| {
        let mats: Vec<_> = experts
            .iter()
            .map(|&(e, (m, _))| (e as usize, &m[i]))
            .collect();
        g.expert_table_of(n_exp, &mats)
    };
    Ok(match (table(0)?, table(1)?, table(2)?) {
        (Some(gate), Some(up), Some(down)) => Some([gate, up, down]),
        _ => None,
    })
}

/// The experts of a split's group (by index) that the CPU computes: `want`
/// consecutive ones none of which was copied ahead (`ahead`), the first
/// such run; where no run of them is that long, the longest (the GPU takes
/// the rest). The CPU's rows are then one block, uploaded at once.
fn cpu_run(ahead: &[bool], want: usize) -> std::ops::Range<usize> {
    let mut best = 0..0;
    if want == 0 {
        return best;
    }
    let mut i = 0;
    while i < ahead.len() {
        if ahead[i] {
            i += 1;
            continue;
        }
        let from = i;
        while i < ahead.len() && !ahead[i] {
            i += 1;
        }
        if i - from >= want {
            return from..from + want;
        }
        if i - from > best.len() {
            best = from..i;
        }
    }
    best
}

/// A 4-byte type every bit pattern of which is a value.
trait Word {}
impl Word for u32 {}
impl Word for f32 {}

/// [`recast`] of a view to write.
fn recast_mut<'a, A: Word, B: Word>(v: &'a mut CudaViewMut<'_, A>) -> Result<CudaViewMut<'a, B>> {
    const { assert!(size_of::<A>() == 4 && size_of::<B>() == 4) };
    let len = v.len();
    // SAFETY: as in `recast`.
    unsafe { v.transmute_mut::<B>(len) }
        .ok_or_else(|| Error::invalid("CUDA decoder: a view as another type"))
}

/// A view as another 4-byte type: floats among the words
/// [`GpuDecoder::layer_to_host`] downloads, and back among those the host
/// uploads ([`Bufs::routes`]).
fn recast<A: Word, B: Word>(v: CudaView<'_, A>) -> Result<CudaView<'_, B>> {
    const { assert!(size_of::<A>() == 4 && size_of::<B>() == 4) };
    // SAFETY: one size, and every bit pattern of either is a value of the
    // other; the other side turns them back with `to_bits`/`from_bits`.
    unsafe { v.transmute::<B>(v.len()) }
        .ok_or_else(|| Error::invalid("CUDA decoder: a view as another type"))
}

/// One expert's SwiGLU over its rows `rows` of the gathered `b.xs` into
/// the same rows of `b.ys`.
fn run_expert(
    g: &Gpu,
    [gate, up, down]: &GpuFfn,
    rows: std::ops::Range<usize>,
    hidden: usize,
    b: &mut Bufs,
) -> Result<()> {
    let (n, inter) = (rows.len(), gate.rows);
    let x = b.xs.v(rows.start * hidden..rows.end * hidden)?;
    g.matmul(&x, n, gate, &mut b.gate.m(g, n * inter)?)?;
    g.matmul(&x, n, up, &mut b.up.m(g, n * inter)?)?;
    g.silu_mul(&mut b.gate.part(0..n * inter)?, &b.up.v(0..n * inter)?)?;
    let y = &mut b.ys.part(rows.start * hidden..rows.end * hidden)?;
    g.matmul(&b.gate.v(0..n * inter)?, n, down, y)
}

impl CausalLm for GpuDecoder {
    fn gpu_expert_stats(&self) -> Option<GpuExpertStats> {
        let t = &self.tiers;
        Some(GpuExpertStats {
            vram_hits: t.vram_hits.load(Relaxed),
            copied: t.copied.load(Relaxed),
            pcie_bytes: t.pcie_bytes.load(Relaxed),
            copied_ahead: t.copied_ahead.load(Relaxed),
            ahead_used: t.ahead_used.load(Relaxed),
            cpu_runs: t.cpu_runs.load(Relaxed),
            graph_steps: t.graph_steps.load(Relaxed),
            graph_replays: t.graph_replays.load(Relaxed),
            graph_stretches: t.graph_stretches.load(Relaxed),
            stretch_replays: t.stretch_replays.load(Relaxed),
            // Not while a step holds the buffers (a status line mid-step).
            one_token: self.bufs.try_lock().ok().and_then(|b| b.paths.ways(1)),
        })
    }

    fn config(&self) -> &ModelConfig {
        self.cfg()
    }

    fn new_session(&self) -> Session {
        let c = self.cfg();
        let kv = match c.mla {
            Some(_) => KvCache::on_device(c.num_hidden_layers, c.kv_floats_per_position(), 0),
            None => {
                let width = c.num_key_value_heads * c.head_dim;
                KvCache::on_device(c.num_hidden_layers, width, width)
            }
        };
        Session::new(kv)
    }

    fn forward<'s>(
        &self,
        ids: &[u32],
        session: &'s mut Session,
        logits: Logits,
    ) -> Result<&'s mut [f32]> {
        let t = ids.len();
        let mut b = self.run_one(ids, &mut session.kv)?;
        let rows: Vec<usize> = match logits {
            Logits::Last => vec![t - 1],
            Logits::All => (0..t).collect(),
        };
        self.head(&mut b, t, &rows, &mut session.host_logits)
    }

    fn forward_greedy(&self, ids: &[u32], session: &mut Session) -> Result<Option<u32>> {
        let t = ids.len();
        let mut b = self.run_one(ids, &mut session.kv)?;
        let tok = self.head_picks(&mut b, t, &[t - 1])?[0];
        session.forget_logits();
        Ok(Some(tok))
    }

    fn forward_batch(&self, steps: &mut [Step<'_>], s: &mut Scratch) -> Result<()> {
        let mut ids = std::mem::take(&mut s.ids);
        ids.clear();
        let mut last = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            check_input(self.cfg(), step.ids, step.session.kv.len())?;
            ids.extend_from_slice(step.ids);
            if step.logits {
                last.push(ids.len() - 1);
            }
        }
        let mut b = self.bufs();
        let mut start = 0;
        let mut seqs: Vec<Seq<'_>> = steps
            .iter_mut()
            .map(|step| {
                let seq = Seq {
                    kv: &mut step.session.kv,
                    start,
                    len: step.ids.len(),
                };
                start += seq.len;
                seq
            })
            .collect();
        let ran = self.rows(&ids, &mut seqs, &mut b);
        let t = ids.len();
        s.ids = ids;
        ran?;
        drop(seqs);
        // Where every sequence wanting a token takes the argmax, the device
        // picks them and only the picks come back.
        let wanted = || steps.iter().filter(|step| step.logits);
        if !last.is_empty() && wanted().all(|step| step.greedy) {
            let picks = self.head_picks(&mut b, t, &last)?;
            let wanted = steps.iter_mut().filter(|step| step.logits);
            for (step, &tok) in wanted.zip(picks) {
                step.session.forget_logits();
                step.session.picked = Some(tok);
            }
            return Ok(());
        }
        // The rows come down together, then each goes to its session's own
        // page-locked buffer (a copy on the host, where a download each
        // would wait on the device once a sequence).
        let mut all = b.host_logits.take();
        let vocab = self.cfg().vocab_size;
        let done = self.head(&mut b, t, &last, &mut all).map(|rows| {
            let wanted = steps.iter_mut().filter(|step| step.logits);
            for (step, row) in wanted.zip(rows.chunks_exact(vocab)) {
                HostBuf::resize(&mut step.session.host_logits, &self.gpu, vocab)
                    .as_mut_slice()
                    .copy_from_slice(row);
            }
        });
        b.host_logits = all;
        done
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_run, ExpertPath, ExpertPaths};

    #[test]
    fn the_cpu_takes_a_run_of_experts_not_copied_ahead() {
        let (o, x) = (false, true);
        // Nothing ahead: the first `want`, as a split without copies ahead.
        assert_eq!(cpu_run(&[o; 8], 5), 0..5);
        assert_eq!(cpu_run(&[o; 8], 0), 0..0);
        assert_eq!(cpu_run(&[o; 8], 9), 0..8);
        // The first run long enough, from its start.
        assert_eq!(cpu_run(&[x, o, x, o, o, o, o, x], 3), 3..6);
        assert_eq!(cpu_run(&[o, o, x, o, o, o, x, o], 2), 0..2);
        // None long enough: the longest (the GPU takes the rest).
        assert_eq!(cpu_run(&[o, x, o, o, x, o, x, o], 3), 2..4);
        assert_eq!(cpu_run(&[x; 8], 2), 0..0);
    }

    #[test]
    fn each_way_is_tried_in_turn_then_the_faster_kept() {
        use ExpertPath::{Copy, Cpu, Split};
        // Copy at 2 ms and the CPU at 1 ms per MB; the split at `split`;
        // with `stalled`, the CPU's third counted call 100 ms (a page
        // fault, another process).
        let run_with = |split: f64, stalled: bool| {
            let mut p = ExpertPaths::default();
            let mut ways = Vec::new();
            for _ in 0..2 * (ExpertPaths::TRIALS + 1) + ExpertPaths::TRIALS {
                let way = p.pick(1);
                ways.push(way);
                // Uncounted first calls as slow as can be: they do not decide.
                let secs = match (way, ways.iter().filter(|&&w| w == way).count()) {
                    (Copy | Cpu, 1) => 1.0,
                    (Cpu, 4) if stalled => 0.1,
                    (Copy, _) => 2e-3,
                    (Cpu, _) => 1e-3,
                    (Split, _) => split,
                };
                p.record(1, way, secs, 1_000_000);
            }
            (p, ways)
        };
        let run = |split| run_with(split, false);
        let (mut p, ways) = run(0.7e-3);
        let pairs = 2 * (ExpertPaths::TRIALS as usize + 1);
        assert!(
            ways[..pairs].chunks(2).all(|w| w == [Copy, Cpu]),
            "{ways:?}"
        );
        assert!(ways[pairs..].iter().all(|&w| w == Split), "{ways:?}");
        // The CPU, twice the copy's rate, takes two thirds of a split.
        assert!((p.cpu_share(1) - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(p.pick(1), Split);
        // Kept: nothing times batch size 1 any more.
        assert!(p.settled(1));
        assert!(!run(0.7e-3).0.settled(2));
        // Kept, whatever comes later.
        for _ in 0..10 {
            p.record(1, Cpu, 1.0, 1);
        }
        assert_eq!(p.pick(1), Split);
        // A split slower than the CPU alone loses to it.
        assert_eq!(run(1.5e-3).0.pick(1), Cpu);
        // One stalled call moves neither the choice nor the split's share.
        let stalled = run_with(1.5e-3, true).0;
        assert_eq!(stalled.pick(1), Cpu);
        assert!((stalled.cpu_share(1) - 2.0 / 3.0).abs() < 1e-9);
        // Another batch size decides on its own.
        assert_eq!(p.pick(4), Copy);
        // Sizes it does not learn for copy, and record nothing.
        assert_eq!(p.pick(0), Copy);
        assert_eq!(p.pick(1000), Copy);
        assert!(p.settled(1000) && !p.settled(4));
        p.record(1000, Cpu, 1.0, 1);
    }
}
