//! Where a forward pass spends its time, op by op: a [`Backend`] wrapper
//! that times every call into process-wide counters.
//!
//! Scaling questions (why does prefill gain 1.5x from 8 to 16 cores and
//! not 1.9x?) are answered by which ops do not shrink with more threads,
//! and a sampling profiler is not on every machine a user benchmarks on.
//! The seam already makes one call per op per layer, so timing each call
//! costs two clock reads per call, nothing next to the work, and only when
//! [`enable`] was called before the model was built: otherwise the decoder
//! gets the bare backend. Time outside every op (waiting for expert reads,
//! the model's own bookkeeping) is what remains of the wall time.
//!
//! A GPU decoder's ops are kernels ([`KernelTimes`]); what its host thread
//! does between them is timed here too, as [`wait`] spans: blocked on the
//! device, on expert copies, on the expert cache, or queueing copies. A
//! decode step slower than its kernels sum to is one of those or the
//! launches themselves (what is left outside every op).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::{
    AttnShape, Backend, Embedding, ExpertFn, KvCache, Matrix, MlaShape, Rope, RouteScratch,
};
use crate::config::Routing;
use crate::error::Result;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Times every op of models built from now on ([`super::backend`]).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

macro_rules! ops {
    ($($op:ident => $name:literal),* $(,)?) => {
        /// The timed ops: one per [`Backend`] method, then a GPU decoder's
        /// host waits ([`wait`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum Op { $($op),* }

        impl Op {
            pub const ALL: &[Op] = &[$(Op::$op),*];

            pub fn name(self) -> &'static str {
                match self { $(Op::$op => $name),* }
            }
        }
    };
}

ops! {
    matmul => "matmul",
    add_rows => "add_rows",
    add => "add",
    rms_norm_rows => "rms_norm_rows",
    rms_norm => "rms_norm",
    clamp => "clamp",
    silu_mul => "silu_mul",
    rope_tables => "rope_tables",
    rope => "rope",
    kv_cache => "kv_cache",
    kv_append => "kv_append",
    attention => "attention",
    route => "route",
    gather => "gather",
    experts => "experts",
    scatter => "scatter",
    swiglu => "swiglu",
    gated_add => "gated_add",
    embed => "embed",
    mla_absorb => "mla_absorb",
    mla_values => "mla_values",
    wait_gpu => "wait_gpu",
    wait_copies => "wait_copies",
    wait_experts => "wait_experts",
    queue_copies => "queue_copies",
}

const N: usize = Op::ALL.len();

static CALLS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

/// Calls and nanoseconds per op, summed since the process started; take
/// two and subtract ([`OpTimes::since`]) for one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTimes {
    calls: [u64; N],
    nanos: [u64; N],
}

impl OpTimes {
    pub fn now() -> Self {
        let mut t = Self::default();
        for i in 0..N {
            t.calls[i] = CALLS[i].load(Ordering::Relaxed);
            t.nanos[i] = NANOS[i].load(Ordering::Relaxed);
        }
        t
    }

    pub fn since(&self, earlier: &Self) -> Self {
        let mut t = *self;
        for i in 0..N {
            t.calls[i] -= earlier.calls[i];
            t.nanos[i] -= earlier.nanos[i];
        }
        t
    }

    pub fn add(&mut self, other: &Self) {
        for i in 0..N {
            self.calls[i] += other.calls[i];
            self.nanos[i] += other.nanos[i];
        }
    }

    /// (op, calls, seconds) of every op that ran, longest first.
    pub fn ops(&self) -> Vec<(Op, u64, f64)> {
        let mut v: Vec<_> = Op::ALL
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.calls[i] > 0)
            .map(|(i, &op)| (op, self.calls[i], self.nanos[i] as f64 * 1e-9))
            .collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// Seconds inside ops, all of them.
    pub fn total_s(&self) -> f64 {
        self.nanos.iter().sum::<u64>() as f64 * 1e-9
    }
}

/// Counts one call of `op` when dropped.
struct Span(Op, Instant);

impl Drop for Span {
    fn drop(&mut self) {
        let i = self.0 as usize;
        CALLS[i].fetch_add(1, Ordering::Relaxed);
        NANOS[i].fetch_add(self.1.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

fn span(op: Op) -> Span {
    Span(op, Instant::now())
}

/// Times what the host does until the guard drops, as `op`, when
/// profiling: for a GPU decoder's waits (`wait_gpu`, `wait_copies`,
/// `wait_experts`) and copy queueing (`queue_copies`), which no backend
/// method covers. Nothing when not profiling. `wait_copies` includes
/// the kernels queued before the copies: those start after them.
#[must_use]
pub struct Wait {
    _span: Option<Span>,
}

pub fn wait(op: Op) -> Wait {
    Wait {
        _span: enabled().then(|| span(op)),
    }
}

/// `B` with every call timed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Profiled<B>(pub B);

impl<B: Backend> Backend for Profiled<B> {
    fn matmul(&self, x: &[f32], t: usize, w: Matrix<'_>, y: &mut [f32]) {
        let _s = span(Op::matmul);
        self.0.matmul(x, t, w, y)
    }

    fn add_rows(&self, y: &mut [f32], row: &[f32]) {
        let _s = span(Op::add_rows);
        self.0.add_rows(y, row)
    }

    fn add(&self, y: &mut [f32], x: &[f32]) {
        let _s = span(Op::add);
        self.0.add(y, x)
    }

    fn rms_norm_rows(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let _s = span(Op::rms_norm_rows);
        self.0.rms_norm_rows(x, w, eps, out)
    }

    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) {
        let _s = span(Op::rms_norm);
        self.0.rms_norm(x, stride, w, eps)
    }

    fn clamp(&self, x: &mut [f32], limit: f32) {
        let _s = span(Op::clamp);
        self.0.clamp(x, limit)
    }

    fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        let _s = span(Op::silu_mul);
        self.0.silu_mul(gate, up)
    }

    fn rope_tables(
        &self,
        rope: &Rope,
        positions: std::ops::Range<usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let _s = span(Op::rope_tables);
        self.0.rope_tables(rope, positions, cos, sin)
    }

    fn rope(
        &self,
        x: &mut [f32],
        t: usize,
        head: usize,
        skip: usize,
        cos: &[f32],
        sin: &[f32],
        interleaved: bool,
    ) {
        let _s = span(Op::rope);
        self.0.rope(x, t, head, skip, cos, sin, interleaved)
    }

    fn kv_cache(&self, layers: usize, k_width: usize, v_width: usize) -> KvCache {
        let _s = span(Op::kv_cache);
        self.0.kv_cache(layers, k_width, v_width)
    }

    fn kv_append(&self, kv: &mut KvCache, layer: usize, k: &[f32], v: &[f32]) {
        let _s = span(Op::kv_append);
        self.0.kv_append(kv, layer, k, v)
    }

    fn attention(&self, q: &[f32], kv: &KvCache, layer: usize, s: AttnShape, out: &mut [f32]) {
        let _s = span(Op::attention);
        self.0.attention(q, kv, layer, s, out)
    }

    fn route(
        &self,
        x: &[f32],
        t: usize,
        router: Matrix<'_>,
        r: &Routing,
        bias: Option<&[f32]>,
        logits: &mut Vec<f32>,
        scratch: &mut RouteScratch,
        chosen: &mut Vec<(u32, f32)>,
    ) {
        let _s = span(Op::route);
        self.0.route(x, t, router, r, bias, logits, scratch, chosen)
    }

    fn gather(&self, x: &[f32], width: usize, order: &[usize], k: usize, out: &mut [f32]) {
        let _s = span(Op::gather);
        self.0.gather(x, width, order, k, out)
    }

    fn experts(
        &self,
        n: usize,
        expert: &ExpertFn<'_>,
        start: &[usize],
        xs: &[f32],
        ys: &mut [f32],
    ) {
        let _s = span(Op::experts);
        self.0.experts(n, expert, start, xs, ys)
    }

    fn scatter(&self, ys: &[f32], order: &[usize], chosen: &[(u32, f32)], k: usize, y: &mut [f32]) {
        let _s = span(Op::scatter);
        self.0.scatter(ys, order, chosen, k, y)
    }

    fn swiglu(
        &self,
        w: [Matrix<'_>; 3],
        x: &[f32],
        t: usize,
        y: &mut [f32],
        gate: &mut Vec<f32>,
        up: &mut Vec<f32>,
    ) {
        let _s = span(Op::swiglu);
        self.0.swiglu(w, x, t, y, gate, up)
    }

    fn gated_add(&self, y: &mut [f32], x: &[f32], g: &[f32]) {
        let _s = span(Op::gated_add);
        self.0.gated_add(y, x, g)
    }

    fn embed(&self, table: &Embedding, ids: &[u32], x: &mut [f32]) -> Result<()> {
        let _s = span(Op::embed);
        self.0.embed(table, ids, x)
    }

    fn mla_absorb(
        &self,
        q: &[f32],
        t: usize,
        kv_b: Matrix<'_>,
        s: MlaShape,
        absorbed: &mut Vec<f32>,
        rows: &mut Vec<f32>,
        qa: &mut [f32],
    ) {
        let _s = span(Op::mla_absorb);
        self.0.mla_absorb(q, t, kv_b, s, absorbed, rows, qa)
    }

    fn mla_values(
        &self,
        lat: &[f32],
        t: usize,
        kv_b: Matrix<'_>,
        s: MlaShape,
        one: &mut Vec<f32>,
        vals: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let _s = span(Op::mla_values);
        self.0.mla_values(lat, t, kv_b, s, one, vals, out)
    }
}

/// One GPU kernel's launches: how many, their time on the device
/// (between CUDA events recorded around each launch) and the host's time
/// in the launch calls. A decode step whose device time is well under its
/// wall time is bound by the host (launches, syncs, expert reads), not by
/// the kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelTime {
    pub calls: u64,
    pub device_s: f64,
    pub launch_s: f64,
}

static KERNELS: Mutex<BTreeMap<String, KernelTime>> = Mutex::new(BTreeMap::new());

/// Adds one launch of kernel `name` (the CUDA device calls it when
/// profiling, as its events complete).
pub fn record_kernel(name: &str, device_s: f64, launch_s: f64) {
    let mut k = KERNELS.lock().unwrap_or_else(|e| e.into_inner());
    let t = k.entry(name.to_owned()).or_default();
    t.calls += 1;
    t.device_s += device_s;
    t.launch_s += launch_s;
}

/// GPU kernel times by name summed since the process started; empty
/// without a GPU or unless [`enable`] was called before it was opened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelTimes(BTreeMap<String, KernelTime>);

impl KernelTimes {
    pub fn now() -> Self {
        Self(KERNELS.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    pub fn since(&self, earlier: &Self) -> Self {
        let mut t = self.clone();
        for (name, e) in &earlier.0 {
            if let Some(k) = t.0.get_mut(name) {
                k.calls -= e.calls;
                k.device_s -= e.device_s;
                k.launch_s -= e.launch_s;
            }
        }
        t.0.retain(|_, k| k.calls > 0);
        t
    }

    pub fn add(&mut self, other: &Self) {
        for (name, o) in &other.0 {
            let k = self.0.entry(name.clone()).or_default();
            k.calls += o.calls;
            k.device_s += o.device_s;
            k.launch_s += o.launch_s;
        }
    }

    /// Every kernel that ran, longest on the device first.
    pub fn kernels(&self) -> Vec<(&str, KernelTime)> {
        let mut v: Vec<_> = self.0.iter().map(|(n, k)| (n.as_str(), *k)).collect();
        v.sort_by(|a, b| b.1.device_s.total_cmp(&a.1.device_s));
        v
    }

    /// Seconds on the device and seconds launching, all kernels.
    pub fn total(&self) -> KernelTime {
        let mut t = KernelTime::default();
        for k in self.0.values() {
            t.calls += k.calls;
            t.device_s += k.device_s;
            t.launch_s += k.launch_s;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Cpu;

    #[test]
    fn times_each_call_of_an_op() {
        let be = Profiled(Cpu);
        let before = OpTimes::now();
        let mut y = vec![1.0f32; 64];
        be.add(&mut y, &[2.0; 64]);
        be.add(&mut y, &[2.0; 64]);
        be.clamp(&mut y, 4.0);
        let d = OpTimes::now().since(&before);
        let ops = d.ops();
        // Other tests may run ops concurrently through their own Profiled
        // backends, so count at least ours.
        let calls = |op| ops.iter().find(|o| o.0 == op).map_or(0, |o| o.1);
        assert!(calls(Op::add) >= 2, "{ops:?}");
        assert!(calls(Op::clamp) >= 1, "{ops:?}");
        assert!(y.iter().all(|&v| v == 4.0), "the wrapped op ran");
        assert!(d.total_s() > 0.0);
    }

    #[test]
    fn waits_count_once_profiling_is_on() {
        // Process-wide: every model built later in this test binary is
        // timed too, which changes no result.
        enable();
        let before = OpTimes::now();
        drop(wait(Op::wait_gpu));
        let _w = wait(Op::wait_experts);
        drop(_w);
        let d = OpTimes::now().since(&before);
        let calls = |op| d.ops().iter().find(|o| o.0 == op).map_or(0, |o| o.1);
        assert!(calls(Op::wait_gpu) >= 1 && calls(Op::wait_experts) >= 1);
        assert_eq!(Op::wait_copies.name(), "wait_copies");
    }

    #[test]
    fn kernel_times_subtract_per_name() {
        let before = KernelTimes::now();
        record_kernel("profile_test_kernel", 0.5, 0.25);
        record_kernel("profile_test_kernel", 0.5, 0.25);
        let d = KernelTimes::now().since(&before);
        let k = d.kernels();
        let ours = k.iter().find(|k| k.0 == "profile_test_kernel").unwrap().1;
        assert_eq!(ours.calls, 2);
        assert_eq!((ours.device_s, ours.launch_s), (1.0, 0.5));
        assert!(d.total().device_s >= 1.0);
    }
}
