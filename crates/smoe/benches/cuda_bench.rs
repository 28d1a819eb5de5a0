//! CUDA kernel timings: the decode matrix-vector product on a
//! Qwen3-30B-A3B q4_k expert (gate/up `[768, 2048]`, down `[2048, 768]`),
//! alone and 8 of 128 by id as a decode step runs them, and on a q6_k LM
//! head `[151936, 2048]` (bf16 beside it as the
//! unquantized baseline), as weight GB/s; the tiled product on a 512-token
//! prefill chunk through the expert, as TFLOP/s; and attention at 32 query
//! heads and 4 KV heads of 128, decode after 4096 positions and a
//! 512-token prefill.
//!
//! `cargo bench -p smoe --features cuda --bench cuda_bench` (exits 0 with a
//! message where there is no GPU, 1 when `SMOE_REQUIRE_CUDA=1`).
//!
//! Times come from CUDA events around `CALLS` back-to-back launches on the
//! compute stream, median of `ROUNDS`. The expert cycles through copies
//! filling 512 MiB, more than any L2, so each call streams its weights from
//! HBM as a routed expert's first use does; the LM head is larger than L2
//! by itself. At expert sizes a call is short enough that launch overhead
//! shows; the "per call" column says how short.

#[path = "../tests/cuda_common/mod.rs"]
mod cuda_common;

use cuda_common::{values, Weights};
use cudarc::driver::sys::CUevent_flags;
use smoe::compute::cuda::{Gpu, GpuMatrix};
use smoe::compute::AttnShape;
use smoe::kernels::DType;
use smoe::quant::QuantType;

const ROUNDS: usize = 7;
const CALLS: usize = 50;
const COLD_BYTES: usize = 512 << 20;

/// Milliseconds per call of `f(i)` for call `i`, median of the rounds.
fn time(gpu: &Gpu, mut f: impl FnMut(usize)) -> f64 {
    let stream = gpu.stream();
    let event = || {
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .expect("event")
    };
    for i in 0..CALLS {
        f(i);
    }
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = event();
            for i in 0..CALLS {
                f(i);
            }
            let end = event();
            start.elapsed_ms(&end).expect("elapsed") as f64 / CALLS as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn matvec(gpu: &Gpu, name: &str, dtype: DType, rows: usize, cols: usize) {
    let w = Weights::new(dtype, rows, cols, 1);
    let bytes = w.bytes().len();
    let copies: Vec<GpuMatrix> = (0..(COLD_BYTES / bytes).clamp(1, 600))
        .map(|_| gpu.upload_matrix(w.matrix()).expect("upload"))
        .collect();
    let x = gpu.upload(&values(cols, 2)).expect("upload");
    let mut y = gpu.zeros::<f32>(rows).expect("alloc");
    let ms = time(gpu, |i| {
        gpu.matmul(
            &x.as_view(),
            1,
            &copies[i % copies.len()],
            &mut y.as_view_mut(),
        )
        .expect("matmul")
    });
    let line = |kernel: &str, ms: f64| {
        println!(
            "{kernel} {name:<28} {:>5} [{rows:>6}, {cols}] {:>8.1} MB {:>9.2} us/call {:>7.0} GB/s",
            dtype.name(),
            bytes as f64 / 1e6,
            ms * 1e3,
            bytes as f64 / (ms * 1e-3) / 1e9
        )
    };
    line("matvec ", ms);
    // The int8-activation kernels on the same copies, where they apply
    // (their activation rounding is inside the time).
    if matches!(dtype, DType::Quant(QuantType::Q4K | QuantType::Q6K)) && cols.is_multiple_of(256) {
        // The choice by width, then each fixed lanes-per-row count.
        for (lanes, label) in [
            (None, "mmvq   "),
            (Some(8), "mmvq/8 "),
            (Some(16), "mmvq/16"),
            (Some(32), "mmvq/32"),
        ] {
            gpu.set_q8_lanes_per_row(lanes);
            let ms = time(gpu, |i| {
                gpu.matmul_q8(
                    &x.as_view(),
                    1,
                    &copies[i % copies.len()],
                    &mut y.as_view_mut(),
                )
                .expect("matmul_q8")
            });
            line(label, ms);
        }
        gpu.set_q8_lanes_per_row(None);
    }
}

/// A decode step's routed experts as the decoder runs them: 8 of 128 q4_k
/// experts (gate/up `[768, 2048]`, down `[2048, 768]`) by id, `swiglu_id`
/// then `matvec_id`, a different 8 each call, with the f32 and the int8
/// kernels; GB/s of the 24 matrices read.
fn experts_by_id(gpu: &Gpu) {
    let (n, k, inter, hidden) = (128usize, 8usize, 768usize, 2048usize);
    let dtype = DType::Quant(QuantType::Q4K);
    let mats: Vec<[GpuMatrix; 3]> = (0..n as u64)
        .map(|e| {
            [(inter, hidden), (inter, hidden), (hidden, inter)].map(|(r, c)| {
                let w = Weights::new(dtype, r, c, 50 + e);
                gpu.upload_matrix(w.matrix()).expect("upload")
            })
        })
        .collect();
    let table = |i: usize| {
        let m: Vec<_> = mats.iter().map(|f| &f[i]).collect();
        gpu.expert_table(&m).expect("table").expect("a table")
    };
    let (gate, up, down) = (table(0), table(1), table(2));
    // 16 sets of 8 distinct ids, stepping through all 128 experts.
    let sets: Vec<_> = (0..16u32)
        .map(|s| {
            let ids: Vec<u32> = (0..k as u32).map(|j| (s * 8 + j * 17) % n as u32).collect();
            gpu.upload(&ids).expect("upload")
        })
        .collect();
    let x = gpu.upload(&values(hidden, 5)).expect("upload");
    let mut act = gpu.zeros::<f32>(k * inter).expect("alloc");
    let mut y = gpu.zeros::<f32>(k * hidden).expect("alloc");
    let bytes = 3 * k * mats[0][0].dtype.row_bytes(hidden) * inter;
    let was = gpu.int8_activations();
    for (int8, lanes) in [
        (false, None),
        (true, None),
        (true, Some(8)),
        (true, Some(16)),
        (true, Some(32)),
    ] {
        gpu.set_int8_activations(int8);
        gpu.set_q8_lanes_per_row(lanes);
        let ms = time(gpu, |i| {
            let ids = sets[i % sets.len()].as_view();
            gpu.swiglu_id(&gate, &up, &ids, &x.as_view(), k, &mut act.as_view_mut())
                .expect("swiglu_id");
            gpu.matvec_id(&down, &ids, &act.as_view(), &mut y.as_view_mut())
                .expect("matvec_id");
        });
        println!(
            "{} experts by id, {k} of {n} q4_k          {:>8.1} MB {:>9.2} us/call {:>7.0} GB/s",
            match (int8, lanes) {
                (false, _) => "matvec ".to_string(),
                (true, None) => "mmvq   ".to_string(),
                (true, Some(l)) => format!("mmvq/{l:<2}"),
            },
            bytes as f64 / 1e6,
            ms * 1e3,
            bytes as f64 / (ms * 1e-3) / 1e9
        );
    }
    gpu.set_int8_activations(was);
    gpu.set_q8_lanes_per_row(None);
}

fn gemm(gpu: &Gpu, t: usize, rows: usize, cols: usize) {
    let dtype = DType::Quant(QuantType::Q4K);
    let w = gpu
        .upload_matrix(Weights::new(dtype, rows, cols, 3).matrix())
        .expect("upload");
    let x = gpu.upload(&values(t * cols, 4)).expect("upload");
    let mut y = gpu.zeros::<f32>(t * rows).expect("alloc");
    // The widened weights first (the path of f32/bf16 rows, and of q4_k
    // before Ampere), then one TF32 product, then the int8 tiles (q4_k's
    // default on Ampere and newer, the activations' rounding included).
    let int8 = gpu.int8_tiles();
    gpu.set_int8_tiles(false);
    let ms = time(gpu, |_| {
        gpu.matmul(&x.as_view(), t, &w, &mut y.as_view_mut())
            .expect("matmul")
    });
    let flops = 2.0 * (t * rows * cols) as f64;
    let line = |ms: f64, how: &str| {
        println!(
            "gemm   {t} tokens through q4_k [{rows}, {cols}] {:>9.2} us/call {:>7.2} TFLOP/s ({how})",
            ms * 1e3,
            flops / (ms * 1e-3) / 1e12
        )
    };
    line(ms, "3xTF32");
    gpu.set_exact_gemm(false);
    let ms = time(gpu, |_| {
        gpu.matmul(&x.as_view(), t, &w, &mut y.as_view_mut())
            .expect("matmul")
    });
    gpu.set_exact_gemm(true);
    line(ms, "TF32");
    gpu.set_int8_tiles(true);
    if gpu.int8_tiles() {
        let ms = time(gpu, |_| {
            gpu.matmul(&x.as_view(), t, &w, &mut y.as_view_mut())
                .expect("matmul")
        });
        line(ms, "int8 mmq");
    }
    gpu.set_int8_tiles(int8);
}

fn attention(gpu: &Gpu, pos0: usize, t: usize) {
    let s = AttnShape::grouped(32, 4, 128, pos0, None);
    let total = pos0 + t;
    let q = gpu.upload(&values(t * 32 * 128, 5)).expect("upload");
    let kv = gpu.upload(&values(total * s.k_stride, 6)).expect("upload");
    let mut out = gpu.zeros::<f32>(t * 32 * 128).expect("alloc");
    let ms = time(gpu, |_| {
        gpu.attention(
            &q.as_view(),
            &kv.as_view(),
            &kv.as_view(),
            s,
            None,
            t,
            &mut out.as_view_mut(),
        )
        .expect("attention")
    });
    // Visible (query, key) pairs, each a 128-wide score and value row.
    let pairs: usize = (pos0 + 1..=total).sum();
    let flops = 4.0 * 128.0 * 32.0 * pairs as f64;
    println!(
        "attention {t} tokens after {pos0} {:>9.2} us/call {:>7.2} TFLOP/s",
        ms * 1e3,
        flops / (ms * 1e-3) / 1e12
    );
}

fn main() {
    let required = std::env::var("SMOE_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("no usable GPU: {e}");
            std::process::exit(required as i32);
        }
    };
    println!("{}; median of {ROUNDS} rounds of {CALLS} calls", gpu.info());
    let q4k = DType::Quant(QuantType::Q4K);
    let q6k = DType::Quant(QuantType::Q6K);
    // `matmul` is the f32 kernel in the "matvec" lines; `matmul_q8` the
    // int8 one in the "mmvq" lines.
    gpu.set_int8_activations(false);
    experts_by_id(&gpu);
    matvec(&gpu, "expert gate/up", q4k, 768, 2048);
    matvec(&gpu, "expert down", q4k, 2048, 768);
    matvec(&gpu, "attention q", q4k, 4096, 2048);
    matvec(&gpu, "LM head", q6k, 151_936, 2048);
    matvec(&gpu, "LM head", DType::BF16, 151_936, 2048);
    gemm(&gpu, 512, 768, 2048);
    attention(&gpu, 600, 1);
    attention(&gpu, 4096, 1);
    attention(&gpu, 0, 512);
}
