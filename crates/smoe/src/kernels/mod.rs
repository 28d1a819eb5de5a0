//! CPU kernels. Activations are always f32; weights stay in the dtype they
//! were stored in and are widened inside the inner loops, so no resident
//! weight is ever converted or copied wholesale.
//!
//! Work is split across output rows on the kernels' own pool (`pool`: built
//! once, sized by `--threads`), which keeps every thread streaming its own
//! slice of the weight matrix.

mod attention;
mod ops;
mod pool;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod qdot;
#[cfg(target_arch = "aarch64")]
mod qdot_arm;
#[cfg(target_arch = "x86_64")]
mod qdot_avx512;
#[cfg(target_arch = "x86_64")]
mod qdot_x86;
mod qmatmul;
mod simd;

pub use attention::{attention, AttnShape};
pub use ops::{
    add_in_place, rms_norm, rms_norm_rows, sigmoid, silu_mul, silu_mul_rows, softmax, Rope,
};
#[cfg(feature = "cuda")]
pub(crate) use pool::beside;
pub(crate) use pool::{for_each_task, stay_awake};
pub use pool::{set_threads, threads};
pub use simd::{axpy, dot, dot_f32, widen};

use std::cell::RefCell;

pub use crate::quant::DType;

/// A row-major weight matrix `[rows, cols]` in its stored dtype.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub dtype: DType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Matrix<'a> {
    pub fn new(dtype: DType, data: &'a [u8], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * dtype.row_bytes(cols));
        Self {
            dtype,
            data,
            rows,
            cols,
        }
    }

    pub fn row(&self, i: usize) -> &'a [u8] {
        let n = self.dtype.row_bytes(self.cols);
        &self.data[i * n..(i + 1) * n]
    }

    /// Rows `range` as a matrix of their own.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Matrix<'a> {
        let n = self.dtype.row_bytes(self.cols);
        Matrix::new(
            self.dtype,
            &self.data[range.start * n..range.end * n],
            range.len(),
            self.cols,
        )
    }
}

/// Output rows per parallel task: large enough that handing a task out costs
/// nothing against its row work, small enough to balance two to 64 cores.
fn rows_per_task(rows: usize, cols: usize) -> usize {
    let threads = threads();
    let min_rows = (16_384 / cols.max(1)).max(1);
    (rows / (threads * 4)).max(min_rows).min(rows.max(1))
}

/// Runs `f` with this thread's reusable f32 buffer (contents unspecified),
/// so that tasks allocate nothing once warm. A loop nested inside `f` runs
/// on the same thread and may ask again; that rare case gets a fresh buffer.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    thread_local!(static BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) });
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut Vec::new()),
    })
}

/// A raw output pointer shared by tasks that write disjoint elements.
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// SAFETY: every task writes a disjoint set of indices (its own output rows).
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// Through a method so closures capture the whole (Sync) wrapper rather
    /// than the raw pointer field.
    pub(crate) fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }

    /// Elements `start..start + len` as a slice.
    ///
    /// # Safety
    /// The range lies inside the buffer, and no other task touches it while
    /// the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.at(start), len)
    }
}

/// `y[t, o] = sum_i x[t, i] * w[o, i]` for `t` tokens: `x` is `[t, w.cols]`,
/// `y` is `[t, w.rows]`, both row-major f32.
///
/// One token is a matrix-vector product, memory-bound: each weight row is
/// streamed once. Several tokens share each weight row: it is widened to f32
/// once into a per-task buffer and then dotted with four tokens at a time;
/// quantized weights stay quantized and each block is applied to four tokens
/// (eight with AVX-512) per unpacking.
pub fn matmul(x: &[f32], t: usize, w: Matrix<'_>, y: &mut [f32]) {
    matmul_passes(x, t, w, y, qmatmul::MAX_PASS)
}

/// [`matmul`] with quantized weights dotted with one token at a time, so
/// every weight block is unpacked again for each token: the path before the
/// multi-token kernels, kept so that `benches/kernels.rs` measures their gain.
pub fn matmul_token_by_token(x: &[f32], t: usize, w: Matrix<'_>, y: &mut [f32]) {
    matmul_passes(x, t, w, y, 1)
}

thread_local! {
    /// The quantized activations and task lists of this thread's quantized
    /// products, so that the decode loop allocates nothing once warm.
    static QUANT_SCRATCH: RefCell<qmatmul::QuantScratch> = RefCell::default();
}

/// One product of [`matmul_batch`]: `y[t, w.rows] = x[t, w.cols] · w^T`.
#[derive(Clone, Copy)]
pub(crate) struct Product<'a> {
    pub w: Matrix<'a>,
    pub x: &'a [f32],
    pub t: usize,
    pub y: SharedOut<f32>,
}

/// [`matmul`] of `n` independent products (`product(i)` is the i-th): when
/// all are quantized alike they share two parallel loops with the work
/// split evenly across the whole batch ([`qmatmul::matmul_quant_parts`] says
/// why); any other mix runs product by product.
///
/// # Safety
/// Each product's `y` points at `t * w.rows` writable floats that no other
/// product and nothing else touches during the call.
pub(crate) unsafe fn matmul_batch<'a>(n: usize, product: impl Fn(usize) -> Product<'a> + Sync) {
    let Some(first) = (n > 0).then(|| product(0)) else {
        return;
    };
    let alike = (1..n)
        .map(&product)
        .all(|p| p.w.dtype == first.w.dtype && p.w.cols == first.w.cols);
    if let (true, DType::Quant(q)) = (alike, first.w.dtype) {
        let part = |i| {
            let p = product(i);
            qmatmul::Part {
                w: p.w.data,
                rows: p.w.rows,
                x: p.x,
                t: p.t,
                y: p.y,
            }
        };
        QUANT_SCRATCH.with_borrow_mut(|s| {
            // SAFETY: the caller's contract, part for product.
            unsafe { qmatmul::matmul_quant_parts(q, first.w.cols, n, part, s, qmatmul::MAX_PASS) }
        });
        return;
    }
    for p in (0..n).map(product) {
        // SAFETY: the caller's contract on `y`.
        matmul(p.x, p.t, p.w, unsafe { p.y.slice(0, p.t * p.w.rows) });
    }
}

fn matmul_passes(x: &[f32], t: usize, w: Matrix<'_>, y: &mut [f32], pass: usize) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(x.len(), t * cols, "matmul: activation shape");
    assert_eq!(y.len(), t * rows, "matmul: output shape");
    if t == 0 || rows == 0 {
        return;
    }
    if let DType::Quant(q) = w.dtype {
        QUANT_SCRATCH
            .with_borrow_mut(|s| qmatmul::matmul_quant(q, w.data, rows, cols, x, t, y, s, pass));
        return;
    }
    let chunk = rows_per_task(rows, cols);
    let out = SharedOut(y.as_mut_ptr());
    let n_tasks = rows.div_ceil(chunk);
    if t == 1 {
        for_each_task(n_tasks, |c| {
            for r in c * chunk..((c + 1) * chunk).min(rows) {
                // SAFETY: row r belongs to this task only; r < rows = y.len().
                unsafe { *out.at(r) = dot(w.dtype, w.row(r), x) };
            }
        });
        return;
    }
    // Rows widened together, and tokens per tile: 16 rows and a tile of
    // 64 KiB of activations stay in L2 while each row meets each token of
    // the tile, where row after row over all of a long prompt's tokens
    // streamed the whole activation matrix from L3 once per row.
    const WIDE_ROWS: usize = 16;
    let tile = ((64 << 10) / (4 * cols)).next_multiple_of(4);
    for_each_task(n_tasks, |c| {
        with_scratch(|wide| {
            let task = c * chunk..((c + 1) * chunk).min(rows);
            for r0 in task.clone().step_by(WIDE_ROWS) {
                let group = r0..(r0 + WIDE_ROWS).min(task.end);
                wide.resize(group.len() * cols, 0.0);
                for (wrow, r) in wide.chunks_exact_mut(cols).zip(group.clone()) {
                    widen(w.dtype, w.row(r), wrow);
                }
                for t0 in (0..t).step_by(tile) {
                    let t1 = (t0 + tile).min(t);
                    for (wrow, r) in wide.chunks_exact(cols).zip(group.clone()) {
                        let mut tok = t0;
                        while tok + 4 <= t1 {
                            let xs = [0, 1, 2, 3].map(|k| &x[(tok + k) * cols..][..cols]);
                            let v = simd::dot4_f32(wrow, xs);
                            for (k, val) in v.into_iter().enumerate() {
                                // SAFETY: row r belongs to this task only;
                                // index < t * rows.
                                unsafe { *out.at((tok + k) * rows + r) = val };
                            }
                            tok += 4;
                        }
                        for tk in tok..t1 {
                            let val = dot_f32(wrow, &x[tk * cols..][..cols]);
                            // SAFETY: as above.
                            unsafe { *out.at(tk * rows + r) = val };
                        }
                    }
                }
            }
        })
    });
}

/// How a SIMD test reports a kernel it could not run: never a silent pass.
#[cfg(test)]
pub(crate) mod simd_test {
    use std::io::Write;

    /// Whether /proc/cpuinfo lists every one of `flags` (an account of the
    /// CPU independent of the run-time detection the kernels use); None
    /// where it is not there or lists no flags (other systems, qemu-user).
    fn cpuinfo_has(flags: &[&str]) -> Option<bool> {
        let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("flags") || l.starts_with("Features"))?;
        let have: Vec<&str> = line.split(':').nth(1)?.split_whitespace().collect();
        Some(flags.iter().all(|f| have.contains(f)))
    }

    /// True when a test's kernel (`available`) can run here. Otherwise the
    /// test is skipped, and says so on the real stderr, which the test
    /// harness does not capture, so a passing run still shows it. Under
    /// `CI=true` a skip is a failure when /proc/cpuinfo says the CPU has
    /// `flags`: the detection missed it and the kernel went untested.
    pub fn runs(what: &str, available: bool, flags: &[&str]) -> bool {
        if available {
            return true;
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {what}: not available on this CPU, not tested"
        );
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !(ci && cpuinfo_has(flags) == Some(true)),
            "{what}: /proc/cpuinfo lists {flags:?} but the kernels' detection says no"
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// A token's outputs are the same bits alone (the one-token path) and
    /// at any place among up to nine tokens (four at a time, then one), for
    /// every float type: batched decode must give each sequence the logits
    /// it gets alone. Widths with and without tails of every loop.
    #[test]
    fn a_token_gets_the_same_bits_in_any_call() {
        let rows = 19;
        for cols in [53, 300] {
            let wf: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
                .collect();
            let f32s: Vec<u8> = wf.iter().flat_map(|v| v.to_le_bytes()).collect();
            let bf16s: Vec<u8> = wf
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let f16s: Vec<u8> = wf
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            // u32 storage, aligned for every type's view.
            let aligned = |b: &[u8]| -> Vec<u32> {
                b.chunks(4)
                    .map(|c| {
                        u32::from_le_bytes(std::array::from_fn(|i| c.get(i).copied().unwrap_or(0)))
                    })
                    .collect()
            };
            for (dtype, bytes) in [(DType::F32, f32s), (DType::BF16, bf16s), (DType::F16, f16s)] {
                let words = aligned(&bytes);
                let data =
                    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), bytes.len()) };
                let w = Matrix::new(dtype, data, rows, cols);
                let x: Vec<f32> = (0..9 * cols)
                    .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
                    .collect();
                let mut alone = vec![0.0; 9 * rows];
                for (xr, yr) in x.chunks(cols).zip(alone.chunks_mut(rows)) {
                    matmul(xr, 1, w, yr);
                }
                for t in 2..=9 {
                    let mut y = vec![0.0; t * rows];
                    matmul(&x[..t * cols], t, w, &mut y);
                    for (i, (a, b)) in y.iter().zip(&alone).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{dtype:?} cols={cols} t={t} y[{i}]"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_matches_naive_for_all_token_counts() {
        let (rows, cols) = (37, 53);
        let wf: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
            .collect();
        let wb: Vec<u16> = wf.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(wb.as_ptr().cast(), wb.len() * 2) };
        let w = Matrix::new(DType::BF16, bytes, rows, cols);
        // 700 tokens: three tiles of the multi-token loop at this width.
        for t in [1, 2, 3, 4, 5, 9, 700] {
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
                .collect();
            let mut y = vec![0.0; t * rows];
            matmul(&x, t, w, &mut y);
            for tk in 0..t {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|i| {
                            bf16::from_bits(wb[r * cols + i]).to_f64() * x[tk * cols + i] as f64
                        })
                        .sum();
                    // f32 sums of 53 terms below 0.25 in magnitude.
                    assert!(
                        (y[tk * rows + r] as f64 - want).abs() < 1e-4,
                        "t={t} tk={tk} r={r}"
                    );
                }
            }
        }
    }
}
