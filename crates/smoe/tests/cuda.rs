//! The CUDA kernels against the CPU backend, on random data at a
//! Qwen3-30B-A3B layer's shapes (hidden 2048, expert intermediate 768, 32
//! query heads and 4 KV heads of 128), plus DeepSeek's odd ones (latent
//! attention, interleaved RoPE after a non-rotated part, group-limited
//! routing).
//!
//! Needs the `cuda` feature. Without a usable GPU every test prints
//! SKIPPED and passes, unless `SMOE_REQUIRE_CUDA=1`, when it fails with the
//! probe's reason. Each comparison prints its error and tolerance
//! (`--nocapture` shows them); errors are the largest absolute difference
//! divided by the reference's RMS, so one tolerance fits outputs of any
//! scale.

mod cuda_common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cuda_common::{values, Weights};
use smoe::compute::cuda::{self, Gpu, KvTarget, MATVEC_MAX_TOKENS};
use smoe::compute::{route, AttnShape, Backend, Cpu, Device, Placement, Rope, RouteScratch};
use smoe::config::{GroupLimit, RopeScaling, Routing, Scoring};
use smoe::engine::Engine;
use smoe::kernels::{self, DType};
use smoe::model::blocks::Scratch;
use smoe::model::{Budget, LoadOptions, Logits, Step};
use smoe::quant::{dequantize_rows, QuantType};
use smoe::sampler::{Sampler, SamplingParams};
use smoe::vault::convert::{convert, ConvertOptions};

const HIDDEN: usize = 2048;
const INTER: usize = 768;

/// The GPU every test shares, or `None` (after saying why) without one.
fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        let required = std::env::var("SMOE_REQUIRE_CUDA").is_ok_and(|v| v == "1");
        match cuda::probe(0) {
            Ok(info) => {
                println!("CUDA device: {info}");
                let started = std::time::Instant::now();
                let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{info} found, but: {e}"));
                println!("kernels compiled and loaded in {:?}", started.elapsed());
                Some(gpu)
            }
            Err(e) if required => panic!("SMOE_REQUIRE_CUDA=1 and no usable GPU: {e}"),
            Err(e) => {
                println!("no usable GPU: {e}");
                None
            }
        }
    })
    .as_ref()
}

/// The shared GPU, or prints SKIPPED for `test`.
fn gpu_or_skip(test: &str) -> Option<&'static Gpu> {
    let g = gpu();
    if g.is_none() {
        println!("SKIPPED {test}: no CUDA device");
    }
    g
}

/// Largest absolute difference over the reference's RMS; prints it and
/// fails above `tol`.
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let rms = (want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64)
        .sqrt()
        .max(1e-30);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w as f64).abs();
        // NaN compares false, so it would hide; make it the worst.
        if d.is_nan() || d > worst {
            (worst, at) = (if d.is_nan() { f64::INFINITY } else { d }, i);
        }
    }
    let err = worst / rms;
    println!(
        "{what}: max err {err:.2e} of RMS {rms:.3e} (at {at}: {} vs {}; tolerance {tol:.0e})",
        got.get(at).copied().unwrap_or(0.0),
        want.get(at).copied().unwrap_or(0.0)
    );
    assert!(err <= tol, "{what}: error {err:.3e} above {tol:.0e}");
}

/// `w` widened to f32 through the CPU's own dequantization.
fn dequantized(w: &Weights) -> Vec<f32> {
    let mut out = vec![0.0f32; w.rows * w.cols];
    match w.dtype {
        DType::Quant(q) => dequantize_rows(q, w.bytes(), w.cols, &mut out).expect("dequantize"),
        d => {
            for (r, row) in out.chunks_exact_mut(w.cols).enumerate() {
                kernels::widen(d, w.matrix().row(r), row);
            }
        }
    }
    out
}

/// `x` rounded as the int8-activation kernels round it (`quantize_q8`): per
/// 32-block, scale the largest magnitude / 127, values to the nearest
/// multiple (ties to even, as `__float2int_rn`), in f32 as there.
fn q8_rounded(x: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    for b in out.chunks_mut(32) {
        let d = b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        for v in b.iter_mut() {
            *v = if d == 0.0 {
                0.0
            } else {
                (*v / d).round_ties_even() * d
            };
        }
    }
    out
}

/// Whether `gpu.matmul` takes an int8-activation kernel for `t` tokens
/// through `dtype` rows of `cols` (the matrix-vector one up to
/// MATVEC_MAX_TOKENS, the tiled one past it).
fn takes_int8(gpu: &Gpu, dtype: DType, t: usize, cols: usize) -> bool {
    let on = if t <= MATVEC_MAX_TOKENS {
        gpu.int8_activations()
    } else {
        gpu.int8_tiles()
    };
    on && cols.is_multiple_of(256) && matches!(dtype, DType::Quant(QuantType::Q4K | QuantType::Q6K))
}

/// Against the exact product of `x` as the kernel sees it: rounded to int8
/// where the int8 kernel runs, with 1e-3 instead of 1e-4 there (one value
/// landing on the other side of a rounding tie moves an output by about
/// 5e-4 of the RMS; a wrong nibble, scale or block by 1e-2 and more).
fn check_exact(gpu: &Gpu, what: &str, got: &[f32], x: &[f32], w: &Weights, wf: &[f32], t: usize) {
    let int8 = takes_int8(gpu, w.dtype, t, w.cols);
    let (x, tol, how) = if int8 {
        (q8_rounded(x), 1e-3, " (int8 activations)")
    } else {
        (x.to_vec(), 1e-4, "")
    };
    check(
        &format!("{what} vs exact{how}"),
        got,
        &exact_matmul(&x, t, wf, w.rows, w.cols),
        tol,
    );
}

/// `x · wᵀ` in f64 from the dequantized weights: the exact answer for the
/// weights as stored.
fn exact_matmul(x: &[f32], t: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; t * rows];
    for tok in 0..t {
        let xr = &x[tok * cols..][..cols];
        for (r, wr) in w.chunks_exact(cols).enumerate() {
            y[tok * rows + r] = wr
                .iter()
                .zip(xr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

#[test]
fn probe_names_the_device_or_says_why_not() {
    assert_eq!(cuda::parse_device("cuda").unwrap(), 0);
    assert_eq!(cuda::parse_device("cuda:3").unwrap(), 3);
    for bad in ["cuda:", "cuda:x", "cuda3", "cpu"] {
        let e = cuda::parse_device(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
    match cuda::probe(0) {
        Ok(info) => {
            println!("{info}");
            assert!(!info.name.is_empty() && info.compute_capability >= (7, 5));
            assert!(info.total_memory >= info.free_memory && info.total_memory > 0);
            let e = cuda::probe(1000).unwrap_err().to_string();
            assert!(e.contains("cuda:1000"), "{e}");
        }
        Err(e) => {
            let e = e.to_string();
            println!("SKIPPED device checks: {e}");
            assert!(
                e.starts_with("no CUDA driver")
                    || e.starts_with("no NVRTC")
                    || e.starts_with("CUDA"),
                "{e}"
            );
        }
    }
}

/// Every weight type the vault stores, at both expert shapes, for decode
/// (1 token), small batches (the matrix-vector kernel up to
/// MATVEC_MAX_TOKENS) and prefill (the tiled kernel, with ragged tiles).
///
/// Tolerances: against the exact product of the stored weights, 1e-4 (f32
/// sums of 2048 terms, about 1e-6 relative each; see `check_exact` where
/// the activations are rounded to int8 first). Against the CPU backend,
/// 1e-4 for float weights; for quantized ones the CPU rounds activations
/// to 8 bits per 32-block (a relative error up to 1/254 per element), so
/// 3e-2, which a wrong scale or nibble order exceeds many times over.
#[test]
fn matmul_matches_cpu_for_every_weight_type() {
    let Some(gpu) = gpu_or_skip("matmul") else {
        return;
    };
    let types = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Quant(QuantType::Q4_0),
        DType::Quant(QuantType::Q8_0),
        DType::Quant(QuantType::Q4K),
        DType::Quant(QuantType::Q5K),
        DType::Quant(QuantType::Q6K),
    ];
    let tokens = [1, 3, MATVEC_MAX_TOKENS, MATVEC_MAX_TOKENS + 1, 70];
    for (seed, dtype) in types.into_iter().enumerate() {
        for (rows, cols) in [(INTER, HIDDEN), (HIDDEN, INTER)] {
            let w = Weights::new(dtype, rows, cols, seed as u64 + 1);
            let wf = dequantized(&w);
            let dw = gpu.upload_matrix(w.matrix()).expect("upload");
            for t in tokens {
                let x = values(t * cols, 100 + t as u64);
                let dx = gpu.upload(&x).unwrap();
                let mut dy = gpu.zeros::<f32>(t * rows).unwrap();
                gpu.matmul(&dx.as_view(), t, &dw, &mut dy.as_view_mut())
                    .expect("matmul");
                let got = gpu.download(&dy).unwrap();
                let what = format!("matmul {} [{rows}, {cols}] t={t}", dtype.name());
                check_exact(gpu, &what, &got, &x, &w, &wf, t);
                let mut cpu = vec![0.0f32; t * rows];
                Cpu.matmul(&x, t, w.matrix(), &mut cpu);
                let tol = if matches!(dtype, DType::Quant(_)) {
                    3e-2
                } else {
                    1e-4
                };
                check(&format!("{what} vs CPU"), &got, &cpu, tol);
            }
        }
    }
    // Many tokens through few output tiles split the columns into parts
    // summed after (on 132 SMs the shapes above split two to eight ways):
    // a prompt's router (eight ways), one with a 32-column tail in its
    // last split, and one with tiles enough not to split; each twice, the
    // same bits both times.
    for (rows, cols, t) in [(128, HIDDEN, 512), (128, 1056, 512), (HIDDEN, INTER, 512)] {
        let w = Weights::new(DType::BF16, rows, cols, 77);
        let dw = gpu.upload_matrix(w.matrix()).unwrap();
        let x = values(t * cols, 78);
        let dx = gpu.upload(&x).unwrap();
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut dy = gpu.zeros::<f32>(t * rows).unwrap();
            gpu.matmul(&dx.as_view(), t, &dw, &mut dy.as_view_mut())
                .unwrap();
            runs.push(gpu.download(&dy).unwrap());
        }
        let what = format!("matmul bf16 [{rows}, {cols}] t={t}");
        check_exact(gpu, &what, &runs[0], &x, &w, &dequantized(&w), t);
        assert_eq!(runs[0], runs[1], "{what}: not the same twice");
    }
}

/// The int8-activation kernels (`Gpu::matmul_q8`) against the exact
/// product of the stored q4_k/q6_k weights with the activations rounded as
/// the kernel rounds them (1e-3, `check_exact`), and with them unrounded:
/// the rounding to 8 bits per 32-block alone moves outputs by 1.2-1.8e-2 of
/// their RMS at these shapes (computed on the CPU), so 3e-2 as for the CPU
/// backend, whose activations are rounded too. Shapes and token counts it
/// does not take are errors.
#[test]
fn int8_matvec_matches_the_exact_product() {
    if gpu_or_skip("matmul_q8").is_none() {
        return;
    }
    // A handle of its own: the lanes-per-row choice is the device's.
    let gpu = &Gpu::new(0).expect("a second handle on the GPU");
    for lanes in [None, Some(8), Some(16), Some(32)] {
        gpu.set_q8_lanes_per_row(lanes);
        int8_matvec_at(gpu, &format!("{lanes:?} lanes a row"));
    }
    gpu.set_q8_lanes_per_row(None);
    let x = gpu.upload(&values(9 * HIDDEN, 1)).unwrap();
    let mut y = gpu.zeros::<f32>(9 * INTER).unwrap();
    let q4k = Weights::new(DType::Quant(QuantType::Q4K), INTER, HIDDEN, 1);
    let q8 = Weights::new(DType::Quant(QuantType::Q8_0), INTER, HIDDEN, 1);
    let (q4k, q8) = (
        gpu.upload_matrix(q4k.matrix()).unwrap(),
        gpu.upload_matrix(q8.matrix()).unwrap(),
    );
    for (t, w, want) in [(9, &q4k, "1 to 8"), (1, &q8, "q4_k and q6_k only")] {
        let err = gpu
            .matmul_q8(&x.as_view(), t, w, &mut y.as_view_mut())
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
}

fn int8_matvec_at(gpu: &Gpu, how: &str) {
    for (seed, q) in [QuantType::Q4K, QuantType::Q6K].into_iter().enumerate() {
        let dtype = DType::Quant(q);
        // 768 columns: three super-blocks, so a row's second and third are
        // 144- and 210-byte offsets (q6_k's only 2-byte aligned).
        for (rows, cols) in [(INTER, HIDDEN), (HIDDEN, INTER), (37, 256)] {
            let w = Weights::new(dtype, rows, cols, 40 + seed as u64);
            let wf = dequantized(&w);
            let dw = gpu.upload_matrix(w.matrix()).expect("upload");
            for t in [1, 3, MATVEC_MAX_TOKENS] {
                let x = values(t * cols, 200 + t as u64);
                let dx = gpu.upload(&x).unwrap();
                let mut dy = gpu.zeros::<f32>(t * rows).unwrap();
                gpu.matmul_q8(&dx.as_view(), t, &dw, &mut dy.as_view_mut())
                    .expect("matmul_q8");
                let got = gpu.download(&dy).unwrap();
                let what = format!("matmul_q8 {} [{rows}, {cols}] t={t}, {how}", dtype.name());
                check(
                    &format!("{what} vs exact (int8 activations)"),
                    &got,
                    &exact_matmul(&q8_rounded(&x), t, &wf, rows, cols),
                    1e-3,
                );
                check(
                    &format!("{what} vs exact"),
                    &got,
                    &exact_matmul(&x, t, &wf, rows, cols),
                    3e-2,
                );
            }
        }
    }
}

/// The int8 tiled products (`mmq`, prefill's default for q4_k/q6_k rows on
/// Ampere and newer, `Gpu::set_int8_tiles`) against the exact product of
/// the stored q4_k/q6_k weights with the activations rounded as the
/// kernel rounds them (1e-3, as for
/// the matrix-vector kernels: the int8 products are exact, the scaling in
/// f32) and unrounded (3e-2): whole and ragged tiles of tokens and rows,
/// one super-block and eight, and the grouped experts' kernel against each
/// expert's exact product.
#[test]
fn int8_tiles_match_the_exact_product() {
    if gpu_or_skip("int8 tiles").is_none() {
        return;
    }
    // A handle of its own: the switch is the device's.
    let gpu = &Gpu::new(0).expect("a second handle on the GPU");
    gpu.set_int8_tiles(true);
    if !gpu.int8_tiles() {
        println!("SKIPPED int8 tiles: the int8 tensor-core product needs compute capability 8.0");
        return;
    }
    for (seed, q) in [QuantType::Q4K, QuantType::Q6K].into_iter().enumerate() {
        let dtype = DType::Quant(q);
        for (rows, cols) in [(INTER, HIDDEN), (HIDDEN, INTER), (37, 256)] {
            let w = Weights::new(dtype, rows, cols, 60 + seed as u64);
            let wf = dequantized(&w);
            let dw = gpu.upload_matrix(w.matrix()).expect("upload");
            for t in [MATVEC_MAX_TOKENS + 1, 64, 70, 130] {
                let x = values(t * cols, 300 + t as u64);
                let dx = gpu.upload(&x).unwrap();
                let mut dy = gpu.zeros::<f32>(t * rows).unwrap();
                gpu.matmul(&dx.as_view(), t, &dw, &mut dy.as_view_mut())
                    .expect("matmul");
                let got = gpu.download(&dy).unwrap();
                let what = format!("int8 tiles {} [{rows}, {cols}] t={t}", dtype.name());
                check(
                    &format!("{what} vs exact (int8 activations)"),
                    &got,
                    &exact_matmul(&q8_rounded(&x), t, &wf, rows, cols),
                    1e-3,
                );
                check(
                    &format!("{what} vs exact"),
                    &got,
                    &exact_matmul(&x, t, &wf, rows, cols),
                    3e-2,
                );
            }
        }
    }
    grouped_experts(gpu);
}

/// The tiled product with one TF32 product instead of 3xTF32
/// (`Gpu::set_exact_gemm(false)`, an experiment) against the exact
/// product: TF32 keeps 10 bits of mantissa, so each operand moves by up to
/// 2^-11 of itself and each product by about 1e-3; over 2048 terms of
/// either sign that is ~5e-4 of the outputs' RMS, the largest of 50,000
/// outputs a few times that: 1e-2, which a wrong fragment or tile exceeds
/// many times over. Prefill sizes, ragged tiles, and the grouped kernel.
#[test]
fn one_tf32_product_stays_close() {
    if gpu_or_skip("TF32 tiled product").is_none() {
        return;
    }
    // A handle of its own: the switch is the device's.
    let gpu = &Gpu::new(0).expect("a second handle on the GPU");
    gpu.set_exact_gemm(false);
    // The widened-weights kernel, not the int8 tiles that q4_k takes by
    // default (those round the activations: their own test).
    gpu.set_int8_tiles(false);
    for (seed, dtype) in [DType::F32, DType::Quant(QuantType::Q4K)]
        .into_iter()
        .enumerate()
    {
        let w = Weights::new(dtype, INTER, HIDDEN, 700 + seed as u64);
        let wf = dequantized(&w);
        let dw = gpu.upload_matrix(w.matrix()).unwrap();
        let t = 70;
        let x = values(t * HIDDEN, 701 + seed as u64);
        let mut dy = gpu.zeros::<f32>(t * INTER).unwrap();
        gpu.matmul(
            &gpu.upload(&x).unwrap().as_view(),
            t,
            &dw,
            &mut dy.as_view_mut(),
        )
        .unwrap();
        check(
            &format!(
                "one TF32 product, {} [{INTER}, {HIDDEN}] t={t} vs exact",
                dtype.name()
            ),
            &gpu.download(&dy).unwrap(),
            &exact_matmul(&x, t, &wf, INTER, HIDDEN),
            1e-2,
        );
    }
}

/// The LM head of a 4-bit backbone: q6_k, 151936 rows, one token.
#[test]
fn matvec_of_a_q6k_lm_head_matches_cpu() {
    let Some(gpu) = gpu_or_skip("LM head") else {
        return;
    };
    let (rows, cols) = (151_936, HIDDEN);
    let w = Weights::new(DType::Quant(QuantType::Q6K), rows, cols, 9);
    let dw = gpu.upload_matrix(w.matrix()).unwrap();
    let x = values(cols, 10);
    let mut dy = gpu.zeros::<f32>(rows).unwrap();
    gpu.matmul(
        &gpu.upload(&x).unwrap().as_view(),
        1,
        &dw,
        &mut dy.as_view_mut(),
    )
    .unwrap();
    let got = gpu.download(&dy).unwrap();
    check_exact(gpu, "q6_k LM head", &got, &x, &w, &dequantized(&w), 1);
    let mut cpu = vec![0.0f32; rows];
    Cpu.matmul(&x, 1, w.matrix(), &mut cpu);
    check("q6_k LM head vs CPU", &got, &cpu, 3e-2);
}

/// Several products of one activation (attention's q, k and v) in one
/// launch (`matmul_each`: one rounding, one `mmvq_each` for two or three
/// q4_k/q6_k matrices) against each alone through `matmul`: the same
/// rounding and lanes, the warps a row chosen for all the rows rather
/// than each matrix's (another summation order), so 1e-5.
#[test]
fn products_of_one_input_match_each_alone() {
    let Some(gpu) = gpu_or_skip("products of one input") else {
        return;
    };
    let (q4, q6) = (DType::Quant(QuantType::Q4K), DType::Quant(QuantType::Q6K));
    let sets: [&[(DType, usize)]; 3] = [
        &[(q4, 4096), (q4, 512), (q6, 512)],
        &[(q6, 1536), (q4, 256)],
        &[(q4, 300), (q6, 7), (q4, 33)],
    ];
    for (i, set) in sets.iter().enumerate() {
        let mats: Vec<_> = set
            .iter()
            .enumerate()
            .map(|(j, &(d, rows))| {
                let w = Weights::new(d, rows, HIDDEN, 500 + 10 * i as u64 + j as u64);
                gpu.upload_matrix(w.matrix()).unwrap()
            })
            .collect();
        for t in [1, 3] {
            let x = gpu.upload(&values(t * HIDDEN, 77 + t as u64)).unwrap();
            let mut alone = Vec::new();
            for m in &mats {
                let mut y = gpu.zeros::<f32>(t * m.rows).unwrap();
                gpu.matmul(&x.as_view(), t, m, &mut y.as_view_mut())
                    .unwrap();
                alone.push(gpu.download(&y).unwrap());
            }
            let mut ys: Vec<_> = mats
                .iter()
                .map(|m| gpu.zeros::<f32>(t * m.rows).unwrap())
                .collect();
            {
                let mut views: Vec<_> = ys.iter_mut().map(|y| y.as_view_mut()).collect();
                let mut outs: Vec<_> = mats.iter().zip(views.iter_mut()).collect();
                gpu.matmul_each(&x.as_view(), t, &mut outs).unwrap();
            }
            for (j, (y, want)) in ys.iter().zip(&alone).enumerate() {
                let what = format!("set {i}, matrix {j} of {}, {t} tokens", set.len());
                check(&what, &gpu.download(y).unwrap(), want, 1e-5);
            }
        }
    }
}

/// A norm that rounds its output for the int8 kernels as it writes it
/// (`norm_rows_rounded`, with and without the residual add) against the
/// norm then the products rounding it themselves: the same values, the
/// same rounding, so the products agree to 1e-6 and the norm's outputs
/// exactly; and the experts' gate/up from the rounded rows likewise, their
/// outputs rounded as written (for the down projection) to the bytes
/// `quantize_q8` makes of them: the down projections and sum from either
/// agree exactly.
#[test]
fn rounded_norms_match_norm_then_round() {
    let Some(gpu) = gpu_or_skip("rounded norms") else {
        return;
    };
    if !gpu.int8_activations() {
        println!("SKIPPED rounded norms: int8 activations off (SMOE_CUDA_MMVQ=0)");
        return;
    }
    let (q4, q6) = (DType::Quant(QuantType::Q4K), DType::Quant(QuantType::Q6K));
    let mats: Vec<_> = [(q4, 1024), (q4, 256), (q6, 256)]
        .iter()
        .enumerate()
        .map(|(j, &(d, rows))| {
            let w = Weights::new(d, rows, HIDDEN, 900 + j as u64);
            gpu.upload_matrix(w.matrix()).unwrap()
        })
        .collect();
    let w = gpu.upload(&values(HIDDEN, 41)).unwrap();
    for (t, add) in [(1, false), (1, true), (3, true)] {
        let what = format!("{t} rows, {}", if add { "add then norm" } else { "norm" });
        let x0 = values(t * HIDDEN, 42);
        let d = gpu.upload(&values(t * HIDDEN, 43)).unwrap();
        let run = |rounded: bool| {
            let mut x = gpu.upload(&x0).unwrap();
            let mut h = gpu.zeros::<f32>(t * HIDDEN).unwrap();
            let mut ys: Vec<_> = mats
                .iter()
                .map(|m| gpu.zeros::<f32>(t * m.rows).unwrap())
                .collect();
            {
                let mut views: Vec<_> = ys.iter_mut().map(|y| y.as_view_mut()).collect();
                let mut outs: Vec<_> = mats.iter().zip(views.iter_mut()).collect();
                let dv = d.as_view();
                let dx = add.then_some(&dv);
                if rounded {
                    let r = gpu
                        .norm_rows_rounded(
                            &mut x.as_view_mut(),
                            dx,
                            &w.as_view(),
                            1e-6,
                            &mut h.as_view_mut(),
                        )
                        .unwrap();
                    gpu.matmul_each_rounded(&r, t, &mut outs).unwrap();
                } else {
                    match dx {
                        Some(dv) => gpu
                            .add_rms_norm_rows(
                                &mut x.as_view_mut(),
                                dv,
                                &w.as_view(),
                                1e-6,
                                &mut h.as_view_mut(),
                            )
                            .unwrap(),
                        None => gpu
                            .rms_norm_rows(&x.as_view(), &w.as_view(), 1e-6, &mut h.as_view_mut())
                            .unwrap(),
                    }
                    gpu.matmul_each(&h.as_view(), t, &mut outs).unwrap();
                }
            }
            let ys: Vec<_> = ys.iter().map(|y| gpu.download(y).unwrap()).collect();
            (gpu.download(&x).unwrap(), gpu.download(&h).unwrap(), ys)
        };
        let ((x1, h1, y1), (x2, h2, y2)) = (run(false), run(true));
        assert_eq!(x1, x2, "{what}: residual");
        assert_eq!(h1, h2, "{what}: normed rows");
        for (j, (a, b)) in y2.iter().zip(&y1).enumerate() {
            check(&format!("{what}: product {j}"), a, b, 1e-6);
        }
    }

    // A decode step's experts' gate and up from the rounded rows.
    let (n_exp, k, t) = (4, 2, 3);
    let tables: Vec<_> = (0..2u64)
        .map(|m| {
            let experts: Vec<_> = (0..n_exp as u64)
                .map(|e| {
                    let w = Weights::new(q4, INTER, HIDDEN, 950 + 10 * m + e);
                    gpu.upload_matrix(w.matrix()).unwrap()
                })
                .collect();
            let refs: Vec<_> = experts.iter().collect();
            (gpu.expert_table(&refs).unwrap().expect("a table"), experts)
        })
        .collect();
    let ids = gpu.upload(&[3u32, 0, 1, 3, 2, 1]).unwrap();
    let mut x = gpu.upload(&values(t * HIDDEN, 44)).unwrap();
    let mut h = gpu.zeros::<f32>(t * HIDDEN).unwrap();
    let (mut a, mut b) = (
        gpu.zeros::<f32>(t * k * INTER).unwrap(),
        gpu.zeros::<f32>(t * k * INTER).unwrap(),
    );
    let (gate, up) = (&tables[0].0, &tables[1].0);
    let downs: Vec<_> = (0..n_exp as u64)
        .map(|e| {
            let w = Weights::new(q4, HIDDEN, INTER, 970 + e);
            gpu.upload_matrix(w.matrix()).unwrap()
        })
        .collect();
    let refs: Vec<_> = downs.iter().collect();
    let down = gpu.expert_table(&refs).unwrap().expect("a table");
    let weights = gpu.upload(&values(t * k, 45)).unwrap();
    let mut ys = gpu.zeros::<f32>(t * k * HIDDEN).unwrap();
    let (mut y1, mut y2) = (
        gpu.zeros::<f32>(t * HIDDEN).unwrap(),
        gpu.zeros::<f32>(t * HIDDEN).unwrap(),
    );
    {
        let r = gpu
            .norm_rows_rounded(
                &mut x.as_view_mut(),
                None,
                &w.as_view(),
                1e-6,
                &mut h.as_view_mut(),
            )
            .unwrap();
        let act = gpu
            .swiglu_id_rounded(gate, up, &ids.as_view(), &r, k, &mut a.as_view_mut(), true)
            .unwrap();
        assert!(act.is_some(), "768 rows a pair are whole 32-blocks");
        gpu.matvec_id_sum(
            &down,
            &ids.as_view(),
            (&a.as_view(), act.as_ref()),
            &weights.as_view(),
            k,
            t,
            &mut ys.as_view_mut(),
            &mut y1.as_view_mut(),
        )
        .unwrap();
    }
    gpu.matvec_id_sum(
        &down,
        &ids.as_view(),
        (&a.as_view(), None),
        &weights.as_view(),
        k,
        t,
        &mut ys.as_view_mut(),
        &mut y2.as_view_mut(),
    )
    .unwrap();
    assert_eq!(
        gpu.download(&y1).unwrap(),
        gpu.download(&y2).unwrap(),
        "down and sum from the rounding swiglu made against quantize_q8's"
    );
    gpu.swiglu_id(
        gate,
        up,
        &ids.as_view(),
        &h.as_view(),
        k,
        &mut b.as_view_mut(),
    )
    .unwrap();
    check(
        "experts' gate and up from rounded rows",
        &gpu.download(&a).unwrap(),
        &gpu.download(&b).unwrap(),
        1e-6,
    );
}

/// A decode step's routed experts run by id in one launch per matrix
/// (`swiglu_id`, `matvec_id`, `moe_combine`) against each expert run alone
/// through `matmul` and `silu_mul`, summed on the host in ascending expert
/// id: the same products in the same order, so 1e-5 (the kernels may sum
/// a row's lanes in another order).
#[test]
fn experts_by_id_match_one_by_one() {
    let Some(gpu) = gpu_or_skip("experts by id") else {
        return;
    };
    let on = gpu.int8_activations();
    experts_by_id(gpu, if on { ", int8 activations" } else { "" });
    // The other kernels on a GPU handle of its own (the switch is the
    // device's): with int8 activations on both sides the id kernels round
    // each pair's rows per 32-block as matmul_q8 rounds one row, so they
    // agree as closely.
    let other = Gpu::new(0).expect("a second handle on the GPU");
    other.set_int8_activations(!on);
    experts_by_id(&other, if on { "" } else { ", int8 activations" });
}

fn experts_by_id(gpu: &Gpu, what: &str) {
    let n_exp = 16;
    // (k, tokens, ids): unsorted, as `route` writes them (best first).
    // One and two a token (a warp a pair: blocks of one and two warps),
    // Qwen3's eight, and more pairs a token than the fused kernel's eight
    // warps (a warp then takes two).
    let cases: [(usize, usize, Vec<u32>); 5] = [
        (1, 3, vec![5, 12, 0]),
        (2, 3, vec![9, 4, 15, 1, 3, 8]),
        (4, 3, vec![7, 2, 15, 0, 3, 9, 2, 11, 14, 13, 1, 6]),
        (
            8,
            2,
            vec![3, 14, 0, 9, 5, 12, 7, 1, 15, 2, 8, 11, 4, 6, 13, 10],
        ),
        (10, 1, vec![9, 0, 13, 4, 11, 2, 15, 6, 1, 8]),
    ];
    for (seed, dtype) in [
        DType::BF16,
        DType::Quant(QuantType::Q4K),
        DType::Quant(QuantType::Q6K),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 1000 * (seed as u64 + 1);
        let experts: Vec<[cuda::GpuMatrix; 3]> = (0..n_exp as u64)
            .map(|e| {
                [(INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]
                    .into_iter()
                    .enumerate()
                    .map(|(i, (r, c))| {
                        let w = Weights::new(dtype, r, c, seed + 3 * e + i as u64);
                        gpu.upload_matrix(w.matrix()).unwrap()
                    })
                    .collect::<Vec<_>>()
                    .try_into()
                    .unwrap()
            })
            .collect();
        let table = |i: usize| {
            let mats: Vec<_> = experts.iter().map(|f| &f[i]).collect();
            gpu.expert_table(&mats).unwrap().expect("a table")
        };
        let (gate, up, down) = (table(0), table(1), table(2));
        for (k, t, ids) in &cases {
            let (k, t) = (*k, *t);
            let weights = values(t * k, 31);
            let x = values(t * HIDDEN, seed + 99);
            let dx = gpu.upload(&x).unwrap();
            let dids = gpu.upload(ids).unwrap();
            let dw = gpu.upload(&weights).unwrap();
            let mut act = gpu.zeros::<f32>(t * k * INTER).unwrap();
            let mut ys = gpu.zeros::<f32>(t * k * HIDDEN).unwrap();
            let mut out = gpu.zeros::<f32>(t * HIDDEN).unwrap();
            gpu.swiglu_id(
                &gate,
                &up,
                &dids.as_view(),
                &dx.as_view(),
                k,
                &mut act.as_view_mut(),
            )
            .unwrap();
            gpu.matvec_id(
                &down,
                &dids.as_view(),
                &act.as_view(),
                &mut ys.as_view_mut(),
            )
            .unwrap();
            gpu.moe_combine(
                &ys.as_view(),
                &dids.as_view(),
                &dw.as_view(),
                k,
                t,
                &mut out.as_view_mut(),
            )
            .unwrap();
            let got = gpu.download(&out).unwrap();

            let mut want = vec![0.0f32; t * HIDDEN];
            for tok in 0..t {
                let mut pairs: Vec<usize> = (tok * k..(tok + 1) * k).collect();
                pairs.sort_by_key(|&p| ids[p]);
                let xt = gpu.upload(&x[tok * HIDDEN..][..HIDDEN]).unwrap();
                for p in pairs {
                    let [g, u, d] = &experts[ids[p] as usize];
                    let (mut dg, mut du) =
                        (gpu.zeros::<f32>(INTER).unwrap(), gpu.zeros(INTER).unwrap());
                    let mut dy = gpu.zeros::<f32>(HIDDEN).unwrap();
                    gpu.matmul(&xt.as_view(), 1, g, &mut dg.as_view_mut())
                        .unwrap();
                    gpu.matmul(&xt.as_view(), 1, u, &mut du.as_view_mut())
                        .unwrap();
                    gpu.silu_mul(&mut dg.as_view_mut(), &du.as_view()).unwrap();
                    gpu.matmul(&dg.as_view(), 1, d, &mut dy.as_view_mut())
                        .unwrap();
                    let y = gpu.download(&dy).unwrap();
                    for (o, v) in want[tok * HIDDEN..][..HIDDEN].iter_mut().zip(y) {
                        *o += weights[p] * v;
                    }
                }
            }
            check(
                &format!("experts by id, k {k}, {}{what}", dtype.name()),
                &got,
                &want,
                1e-5,
            );
            // The down projections and the sum in one launch (where the int8
            // kernels take the rows; the two launches above otherwise): the
            // same products summed in the same order.
            let mut fused = gpu.zeros::<f32>(t * HIDDEN).unwrap();
            gpu.matvec_id_sum(
                &down,
                &dids.as_view(),
                (&act.as_view(), None),
                &dw.as_view(),
                k,
                t,
                &mut ys.as_view_mut(),
                &mut fused.as_view_mut(),
            )
            .unwrap();
            check(
                &format!(
                    "experts by id, down and sum in one, k {k}, {}{what}",
                    dtype.name()
                ),
                &gpu.download(&fused).unwrap(),
                &want,
                1e-5,
            );
        }
    }
}

/// A prefill's grouped experts in one launch (`gemm_id`: expert `e` over
/// its rows `start[e]..start[e + 1]`) against the exact product of each
/// expert's rows (not `matmul` on them: up to MATVEC_MAX_TOKENS rows that
/// is the int8-activation kernel). On sm_80 and later the tiled kernel's
/// 3xTF32 products drop the low-by-low term (about 2^-22 of each product),
/// so the bound is `matmul_matches_cpu`'s against the exact sum, 1e-4
/// (the H200 measured 5.2e-5 for f32 rows, where 1e-5 failed).
#[test]
fn grouped_experts_match_one_by_one() {
    let Some(gpu) = gpu_or_skip("grouped experts") else {
        return;
    };
    grouped_experts(gpu);
}

/// Against each expert's exact product, its activations rounded where the
/// int8 tiles take them (`check_exact`'s tolerances).
fn grouped_experts(gpu: &Gpu) {
    let n_exp = 8;
    // Rows per expert: none, fewer than a tile, several tiles.
    let counts = [5usize, 0, 70, 1, 0, 12, 0, 64];
    let mut start = vec![0u32];
    for c in counts {
        start.push(start.last().unwrap() + c as u32);
    }
    let pairs = *start.last().unwrap() as usize;
    let used: Vec<u32> = (0..n_exp as u32)
        .filter(|&e| counts[e as usize] > 0)
        .collect();
    for (seed, dtype) in [
        DType::F32,
        DType::Quant(QuantType::Q4K),
        DType::Quant(QuantType::Q6K),
    ]
    .into_iter()
    .enumerate()
    {
        let ws: Vec<Weights> = (0..n_exp as u64)
            .map(|e| Weights::new(dtype, INTER, HIDDEN, 500 + 10 * seed as u64 + e))
            .collect();
        let mats: Vec<cuda::GpuMatrix> = ws
            .iter()
            .map(|w| gpu.upload_matrix(w.matrix()).unwrap())
            .collect();
        let table = gpu
            .expert_table(&mats.iter().collect::<Vec<_>>())
            .unwrap()
            .expect("a table");
        let x = values(pairs * HIDDEN, 77 + seed as u64);
        let dx = gpu.upload(&x).unwrap();
        let (du, ds) = (gpu.upload(&used).unwrap(), gpu.upload(&start).unwrap());
        let mut dy = gpu.zeros::<f32>(pairs * INTER).unwrap();
        let most = *counts.iter().max().unwrap();
        gpu.gemm_id(
            &table,
            &du.as_view(),
            &ds.as_view(),
            most,
            pairs,
            &dx.as_view(),
            &mut dy.as_view_mut(),
        )
        .unwrap();
        let got = gpu.download(&dy).unwrap();
        // Past MATVEC_MAX_TOKENS: the tiled kernels' choice.
        let int8 = takes_int8(gpu, dtype, MATVEC_MAX_TOKENS + 1, HIDDEN);
        let xr = if int8 { q8_rounded(&x) } else { x.clone() };
        let mut want = vec![0.0f32; pairs * INTER];
        for &e in &used {
            let (s, n) = (start[e as usize] as usize, counts[e as usize]);
            let xe = &xr[s * HIDDEN..(s + n) * HIDDEN];
            let we = dequantized(&ws[e as usize]);
            want[s * INTER..(s + n) * INTER]
                .copy_from_slice(&exact_matmul(xe, n, &we, INTER, HIDDEN));
        }
        let (tol, how) = if int8 {
            (1e-3, ", int8 tiles")
        } else {
            (1e-4, "")
        };
        check(
            &format!("grouped experts, {}{how}", dtype.name()),
            &got,
            &want,
            tol,
        );
    }
}

/// An expert copied in on the copy stream is complete for the next kernel.
#[test]
fn matrix_uploaded_on_the_copy_stream_is_ready_for_compute() {
    let Some(gpu) = gpu_or_skip("copy stream") else {
        return;
    };
    let w = Weights::new(DType::Quant(QuantType::Q4K), INTER, HIDDEN, 21);
    let x = gpu.upload(&values(HIDDEN, 22)).unwrap();
    let (mut a, mut b) = (
        gpu.zeros::<f32>(INTER).unwrap(),
        gpu.zeros::<f32>(INTER).unwrap(),
    );
    let sync = gpu.upload_matrix(w.matrix()).unwrap();
    gpu.matmul(&x.as_view(), 1, &sync, &mut a.as_view_mut())
        .unwrap();
    let mut uploads = gpu.upload_experts(&[[w.matrix()]]).unwrap();
    let ([copied], ready) = uploads.pop().unwrap();
    gpu.wait_upload(&ready).unwrap();
    gpu.matmul(&x.as_view(), 1, &copied, &mut b.as_view_mut())
        .unwrap();
    gpu.finish_uploads().unwrap();
    assert_eq!(copied.bytes(), w.bytes().len());
    assert_eq!(gpu.download(&a).unwrap(), gpu.download(&b).unwrap());
    gpu.synchronize().unwrap();
}

/// A recycled expert matrix takes the next upload of its shape without an
/// allocation, and holds the new expert's rows once its copy is in, even
/// while a kernel queued before still reads the old ones.
#[test]
fn recycled_matrices_take_the_next_upload() {
    if gpu_or_skip("recycle").is_none() {
        return;
    }
    // A handle of its own: its allocation count and spares are this
    // test's alone, whatever other tests run beside it.
    let gpu = &Gpu::new(0).expect("a second handle on the GPU");
    let (w1, w2) = (
        Weights::new(DType::Quant(QuantType::Q4K), INTER, HIDDEN, 31),
        Weights::new(DType::Quant(QuantType::Q4K), INTER, HIDDEN, 32),
    );
    let x = gpu.upload(&values(HIDDEN, 33)).unwrap();
    let mut want = [
        gpu.zeros::<f32>(INTER).unwrap(),
        gpu.zeros::<f32>(INTER).unwrap(),
    ];
    for (w, y) in [&w1, &w2].into_iter().zip(&mut want) {
        let m = gpu.upload_matrix(w.matrix()).unwrap();
        gpu.matmul(&x.as_view(), 1, &m, &mut y.as_view_mut())
            .unwrap();
    }
    let mut got = [
        gpu.zeros::<f32>(INTER).unwrap(),
        gpu.zeros::<f32>(INTER).unwrap(),
    ];
    let ([first], ready) = gpu.upload_experts(&[[w1.matrix()]]).unwrap().pop().unwrap();
    gpu.wait_upload(&ready).unwrap();
    gpu.matmul(&x.as_view(), 1, &first, &mut got[0].as_view_mut())
        .unwrap();
    gpu.finish_uploads().unwrap();
    gpu.recycle([first]);
    assert_eq!(gpu.spare_matrices(), 1, "recycled");
    let ([second], ready) = gpu.upload_experts(&[[w2.matrix()]]).unwrap().pop().unwrap();
    assert_eq!(gpu.spare_matrices(), 0, "the spare took the upload");
    gpu.wait_upload(&ready).unwrap();
    gpu.matmul(&x.as_view(), 1, &second, &mut got[1].as_view_mut())
        .unwrap();
    gpu.finish_uploads().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(gpu.download(g).unwrap(), gpu.download(w).unwrap());
    }
    // Another shape finds no spare.
    gpu.recycle([second]);
    let other = Weights::new(DType::Quant(QuantType::Q4K), HIDDEN, INTER, 34);
    let uploads = gpu.upload_experts(&[[other.matrix()]]).unwrap();
    assert_eq!(gpu.spare_matrices(), 1, "no spare of the other shape");
    // The copy writes the matrix until it is done: then it may go.
    gpu.finish_uploads().unwrap();
    drop(uploads);
    gpu.synchronize().unwrap();
}

#[test]
fn bad_shapes_and_types_are_errors() {
    let Some(gpu) = gpu_or_skip("errors") else {
        return;
    };
    let q3 = Weights::new(DType::Quant(QuantType::Q3K), 4, 256, 1);
    let e = gpu.upload_matrix(q3.matrix()).unwrap_err().to_string();
    assert!(e.contains("q3_k"), "{e}");
    let w = gpu
        .upload_matrix(Weights::new(DType::BF16, 8, 64, 1).matrix())
        .unwrap();
    let x = gpu.zeros::<f32>(64).unwrap();
    let mut y = gpu.zeros::<f32>(8).unwrap();
    let e = gpu
        .matmul(&x.as_view(), 2, &w, &mut y.as_view_mut())
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 tokens"), "{e}");
}

/// Row norms, and per-head norms in place inside wider rows (Qwen3's q/k
/// norms; DeepSeek's latent norm over the first 512 of 576). Tolerance
/// 1e-5: one f32 sum of squares per row, summed in another order.
#[test]
fn rms_norm_matches_cpu() {
    let Some(gpu) = gpu_or_skip("rms_norm") else {
        return;
    };
    let (t, eps) = (5, 1e-6);
    let x = values(t * HIDDEN, 31);
    let w = values(HIDDEN, 32);
    let mut want = vec![0.0f32; x.len()];
    Cpu.rms_norm_rows(&x, &w, eps, &mut want);
    let mut out = gpu.zeros::<f32>(x.len()).unwrap();
    let (dx, dw) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
    gpu.rms_norm_rows(&dx.as_view(), &dw.as_view(), eps, &mut out.as_view_mut())
        .unwrap();
    check("rms_norm_rows", &gpu.download(&out).unwrap(), &want, 1e-5);

    // A residual add and the norm in one launch: the sum kept in x.
    let d = values(t * HIDDEN, 35);
    let sum: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
    Cpu.rms_norm_rows(&sum, &w, eps, &mut want);
    let (mut dx, dd) = (gpu.upload(&x).unwrap(), gpu.upload(&d).unwrap());
    gpu.add_rms_norm_rows(
        &mut dx.as_view_mut(),
        &dd.as_view(),
        &dw.as_view(),
        eps,
        &mut out.as_view_mut(),
    )
    .unwrap();
    check(
        "add_rms_norm_rows, sum",
        &gpu.download(&dx).unwrap(),
        &sum,
        0.0,
    );
    check(
        "add_rms_norm_rows",
        &gpu.download(&out).unwrap(),
        &want,
        1e-5,
    );

    for (stride, width) in [(128, 128), (576, 512)] {
        let x = values(t * 32 * stride, 33);
        let w = values(width, 34);
        let mut want = x.clone();
        Cpu.rms_norm(&mut want, stride, &w, eps);
        let mut dx = gpu.upload(&x).unwrap();
        gpu.rms_norm(
            &mut dx.as_view_mut(),
            stride,
            &gpu.upload(&w).unwrap().as_view(),
            eps,
        )
        .unwrap();
        let what = format!("rms_norm in place, {width} of {stride}");
        check(&what, &gpu.download(&dx).unwrap(), &want, 1e-5);
    }
}

/// NeoX over whole heads (Qwen3: 32 heads of 128) and interleaved over
/// the last 64 of each 192-wide head (DeepSeek), with YaRN tables.
/// Tolerance 1e-5: two products and a sum per element.
#[test]
fn rope_matches_cpu() {
    let Some(gpu) = gpu_or_skip("rope") else {
        return;
    };
    let t = 7;
    let cases = [
        (
            "neox",
            32,
            128,
            0,
            false,
            Rope::new(128, 1e6, &RopeScaling::None),
        ),
        (
            "interleaved",
            16,
            192,
            128,
            true,
            Rope::new(64, 1e4, &RopeScaling::None),
        ),
    ];
    for (name, heads, head, skip, interleaved, rope) in cases {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        Cpu.rope_tables(&rope, 1000..1000 + t, &mut cos, &mut sin);
        let x = values(t * heads * head, 41);
        let mut want = x.clone();
        Cpu.rope(&mut want, t, head, skip, &cos, &sin, interleaved);
        let mut dx = gpu.upload(&x).unwrap();
        let (dc, ds) = (gpu.upload(&cos).unwrap(), gpu.upload(&sin).unwrap());
        gpu.rope(
            &mut dx.as_view_mut(),
            t,
            head,
            skip,
            &dc.as_view(),
            &ds.as_view(),
            interleaved,
        )
        .unwrap();
        check(
            &format!("rope {name}"),
            &gpu.download(&dx).unwrap(),
            &want,
            1e-5,
        );
    }

    // Qwen3's per-head q/k norms and the rotation in one launch, against
    // the CPU's norm then rotation: 32 q heads and 4 k heads of 128.
    let (head, eps) = (128, 1e-6);
    let rope = Rope::new(head, 1e6, &RopeScaling::None);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    Cpu.rope_tables(&rope, 500..500 + t, &mut cos, &mut sin);
    let (q, k) = (values(t * 32 * head, 42), values(t * 4 * head, 43));
    let (wq, wk) = (values(head, 44), values(head, 45));
    let (mut want_q, mut want_k) = (q.clone(), k.clone());
    for (x, w) in [(&mut want_q, &wq), (&mut want_k, &wk)] {
        Cpu.rms_norm(x, head, w, eps);
        Cpu.rope(x, t, head, 0, &cos, &sin, false);
    }
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    let (dwq, dwk, dc, ds) = (up(&wq), up(&wk), up(&cos), up(&sin));
    // Alone, then writing a layer's cache at position 5 in the same launch
    // (the rotated keys, and values copied), as kv_write would, rows after
    // them left as they were.
    let (kw, pos) = (4 * head, 5);
    let cap = pos + t + 2;
    let v = values(t * kw, 46);
    let (dv, dpos) = (up(&v), gpu.upload(&[pos as u32]).unwrap());
    for cached in [false, true] {
        let what = if cached {
            "qk_norm_rope with the cache"
        } else {
            "qk_norm_rope"
        };
        let (mut dq, mut dk) = (up(&q), up(&k));
        let mut keys = gpu.zeros::<f32>(cap * kw).unwrap();
        let mut vals = gpu.zeros::<f32>(cap * kw).unwrap();
        let target = cached.then(|| KvTarget {
            v: dv.as_view(),
            keys: keys.as_view_mut(),
            values: vals.as_view_mut(),
            pos,
            pos_at: dpos.as_view(),
        });
        gpu.qk_norm_rope(
            &mut dq.as_view_mut(),
            &mut dk.as_view_mut(),
            &dwq.as_view(),
            &dwk.as_view(),
            t,
            &dc.as_view(),
            &ds.as_view(),
            eps,
            target,
        )
        .unwrap();
        let got_k = gpu.download(&dk).unwrap();
        check(
            &format!("{what}: q"),
            &gpu.download(&dq).unwrap(),
            &want_q,
            1e-5,
        );
        check(&format!("{what}: k"), &got_k, &want_k, 1e-5);
        let (keys, vals) = (gpu.download(&keys).unwrap(), gpu.download(&vals).unwrap());
        let at = pos * kw..(pos + t) * kw;
        if cached {
            assert_eq!(&keys[at.clone()], &got_k[..], "{what}: cached keys");
            assert_eq!(&vals[at.clone()], &v[..], "{what}: cached values");
        }
        let untouched = |c: &[f32]| c[..at.start].iter().chain(&c[at.end..]).all(|&x| x == 0.0);
        assert!(
            untouched(&keys) && untouched(&vals),
            "{what}: wrote outside its rows"
        );
        if !cached {
            assert!(
                keys.iter().chain(&vals).all(|&x| x == 0.0),
                "{what}: wrote a cache"
            );
        }
    }
}

/// Tolerance 1e-5: one exp per element.
#[test]
fn silu_mul_matches_cpu() {
    let Some(gpu) = gpu_or_skip("silu_mul") else {
        return;
    };
    let n = 9 * INTER;
    let gate: Vec<f32> = values(n, 51).iter().map(|v| v * 8.0).collect();
    let up = values(n, 52);
    let mut want = gate.clone();
    Cpu.silu_mul(&mut want, &up);
    let mut dg = gpu.upload(&gate).unwrap();
    gpu.silu_mul(&mut dg.as_view_mut(), &gpu.upload(&up).unwrap().as_view())
        .unwrap();
    check("silu_mul", &gpu.download(&dg).unwrap(), &want, 1e-5);
}

/// Router logits whose values are a shuffled ladder with a little noise,
/// so no two experts (nor two groups) tie and the choice is unambiguous.
fn router_logits(t: usize, n: usize, seed: u64) -> Vec<f32> {
    let noise = values(t * n, seed);
    let mut out = Vec::with_capacity(t * n);
    for tok in 0..t {
        let mut order: Vec<usize> = (0..n).collect();
        let keys = values(n, seed + 1000 + tok as u64);
        order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
        for (i, &rank) in order.iter().enumerate() {
            let ladder = (rank as f32 - n as f32 / 2.0) * (4.0 / n as f32);
            out.push(ladder + noise[tok * n + i] * 0.1 / n as f32);
        }
    }
    out
}

/// Each family's routing: ids identical to the CPU's, weights within 1e-5
/// (an exp and a sum over at most 256 experts).
#[test]
fn routing_matches_cpu() {
    let Some(gpu) = gpu_or_skip("routing") else {
        return;
    };
    let softmax = |top_k, norm| Routing {
        top_k,
        scoring: Scoring::Softmax,
        groups: None,
        norm_topk_prob: norm,
        scale: 1.0,
    };
    let cases = [
        ("qwen3 128 top-8", 128, softmax(8, true), false),
        ("mixtral 8 top-2", 8, softmax(2, true), false),
        ("qwen2 60 top-4", 60, softmax(4, false), false),
        (
            "deepseek-v2 group-limited",
            160,
            Routing {
                groups: Some(GroupLimit {
                    n_group: 8,
                    topk_group: 3,
                }),
                scale: 16.0,
                ..softmax(6, false)
            },
            false,
        ),
        (
            "deepseek-v3 sigmoid, bias",
            256,
            Routing {
                top_k: 8,
                scoring: Scoring::Sigmoid,
                groups: Some(GroupLimit {
                    n_group: 8,
                    topk_group: 4,
                }),
                norm_topk_prob: true,
                scale: 2.5,
            },
            true,
        ),
    ];
    let t = 9;
    for (seed, (name, n, r, with_bias)) in cases.into_iter().enumerate() {
        let logits = router_logits(t, n, 60 + seed as u64);
        let bias: Option<Vec<f32>> =
            with_bias.then(|| values(n, 70).iter().map(|v| v * 0.05).collect());
        let mut want = Vec::new();
        let mut scratch = RouteScratch::default();
        for row in logits.chunks_exact(n) {
            route(
                &mut row.to_vec(),
                &r,
                bias.as_deref(),
                &mut scratch,
                &mut want,
            );
        }
        let dl = gpu.upload(&logits).unwrap();
        let db = bias.as_ref().map(|b| gpu.upload(b).unwrap());
        let db = db.as_ref().map(|b| b.as_view());
        let got = gpu
            .route_to_host(&dl.as_view(), t, &r, db.as_ref())
            .unwrap();
        let ids = |c: &[(u32, f32)]| c.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(&want), "{name}: chosen experts");
        let weights = |c: &[(u32, f32)]| c.iter().map(|c| c.1).collect::<Vec<_>>();
        check(
            &format!("route {name} weights"),
            &weights(&got),
            &weights(&want),
            1e-5,
        );

        // The router's product and the routing in one launch
        // (`router_route`, up to MATVEC_MAX_TOKENS tokens; more take the
        // two launches): an identity router (columns padded to 32) gives
        // the logits back exactly, so the choice is the same as above.
        let cols = n.next_multiple_of(32);
        let mut eye = vec![0f32; n * cols];
        for e in 0..n {
            eye[e * cols + e] = 1.0;
        }
        let bytes: Vec<u8> = eye.iter().flat_map(|v| v.to_le_bytes()).collect();
        let router = gpu
            .upload_matrix(kernels::Matrix::new(DType::F32, &bytes, n, cols))
            .unwrap();
        for tt in [1, MATVEC_MAX_TOKENS, t] {
            let mut x = vec![0f32; tt * cols];
            for tok in 0..tt {
                x[tok * cols..tok * cols + n].copy_from_slice(&logits[tok * n..(tok + 1) * n]);
            }
            let dx = gpu.upload(&x).unwrap();
            let mut dlog = gpu.zeros::<f32>(tt * n).unwrap();
            let mut di = gpu.zeros::<u32>(tt * r.top_k).unwrap();
            let mut ws = gpu.zeros::<f32>(tt * r.top_k).unwrap();
            for _ in 0..2 {
                // Twice: the first launch must leave its counter at zero.
                gpu.router_route(
                    &dx.as_view(),
                    tt,
                    &router,
                    &r,
                    db.as_ref(),
                    &mut dlog.as_view_mut(),
                    &mut di.as_view_mut(),
                    &mut ws.as_view_mut(),
                )
                .unwrap();
            }
            let what = format!("router_route {name}, {tt} tokens");
            let rows = tt * r.top_k;
            // Exact through the matrix-vector kernel (products by 1 and 0);
            // past MATVEC_MAX_TOKENS the tiled kernel's split TF32 keeps
            // about 21 bits.
            check(
                &format!("{what}: logits"),
                &gpu.download(&dlog).unwrap(),
                &logits[..tt * n],
                1e-6,
            );
            assert_eq!(
                gpu.download(&di).unwrap(),
                ids(&want[..rows]),
                "{what}: chosen experts"
            );
            check(
                &format!("{what}: weights"),
                &gpu.download(&ws).unwrap(),
                &weights(&want[..rows]),
                1e-5,
            );
        }
    }
}

/// Decode and prefill (causal, from 0 and continuing a cache, with a
/// sliding window) at Qwen3's GQA shape, and latent attention's shape
/// (one KV head of 576, values its first 512, read from the keys).
/// Tolerance 1e-4: a softmax over up to 301 keys and a weighted sum, in
/// another order than the CPU's.
#[test]
fn attention_matches_cpu() {
    let Some(gpu) = gpu_or_skip("attention") else {
        return;
    };
    let gqa = |pos0, window| AttnShape::grouped(32, 4, 128, pos0, window);
    let mla = AttnShape {
        n_heads: 16,
        n_kv_heads: 1,
        head_dim: 576,
        v_dim: 512,
        k_stride: 576,
        v_stride: 576,
        scale: 0.1352,
        pos0: 20,
        window: None,
    };
    let cases = [
        ("decode at 300", gqa(300, None), 1, false),
        ("prefill 40", gqa(0, None), 40, false),
        (
            "prefill 23 after 17, window 16",
            gqa(17, Some(16)),
            23,
            false,
        ),
        ("latent, 5 after 20", mla, 5, true),
        // The tiled prompt kernel's rows: groups of 6 heads (not dividing
        // its 32 rows a block), heads of 64, a partial last block.
        (
            "prefill 30 after 5, 24 heads of 64 in 4 groups",
            AttnShape::grouped(24, 4, 64, 5, None),
            30,
            false,
        ),
        // Few queries over many keys: split over the keys and merged.
        ("2 tokens at 700", gqa(700, None), 2, false),
        ("decode at 1000, window 200", gqa(1000, Some(200)), 1, false),
        (
            "latent decode at 300",
            AttnShape { pos0: 300, ..mla },
            1,
            true,
        ),
        // A short context: one split, one query.
        ("decode at 30", gqa(30, None), 1, false),
        // Decode by KV group: 16 heads a group (Qwen3-235B) over 32
        // splits; 32 a group (past the grouped kernel's 16: one block a
        // head); heads of 64 (half the lanes) and of 80.
        (
            "decode at 2000, 64 heads in 4 groups",
            AttnShape::grouped(64, 4, 128, 2000, None),
            1,
            false,
        ),
        (
            "decode at 100, 32 heads of one group",
            AttnShape::grouped(32, 1, 128, 100, None),
            1,
            false,
        ),
        (
            "decode at 70, 16 heads of 64 in 2 groups",
            AttnShape::grouped(16, 2, 64, 70, None),
            1,
            false,
        ),
        (
            "decode at 40, 8 heads of 80 in 2 groups",
            AttnShape::grouped(8, 2, 80, 40, None),
            1,
            false,
        ),
        // The tiled kernel with a KV head per query head (OLMoE) and with
        // heads of 80 (neither a power of two nor a multiple of 32).
        (
            "prefill 9 after 3, 16 heads of 64, no groups",
            AttnShape::grouped(16, 16, 64, 3, None),
            9,
            false,
        ),
        (
            "prefill 12, 8 heads of 80 in 2 groups",
            AttnShape::grouped(8, 2, 80, 0, None),
            12,
            false,
        ),
    ];
    for (seed, (name, s, t, shared)) in cases.into_iter().enumerate() {
        let total = s.pos0 + t;
        let seed = 80 + 3 * seed as u64;
        let q = values(t * s.n_heads * s.head_dim, seed);
        let keys = values(total * s.k_stride, seed + 1);
        let values_own = values(total * s.v_stride, seed + 2);
        let vals = if shared { &keys } else { &values_own };
        let mut want = vec![0.0f32; t * s.n_heads * s.v_dim];
        kernels::attention(&q, &keys, vals, s, &mut want);
        let (dq, dk) = (gpu.upload(&q).unwrap(), gpu.upload(&keys).unwrap());
        let dv = gpu.upload(vals).unwrap();
        let mut out = gpu.zeros::<f32>(want.len()).unwrap();
        gpu.attention(
            &dq.as_view(),
            &dk.as_view(),
            &dv.as_view(),
            s,
            None,
            t,
            &mut out.as_view_mut(),
        )
        .unwrap();
        check(
            &format!("attention {name}"),
            &gpu.download(&out).unwrap(),
            &want,
            1e-4,
        );
        // As a captured decode step runs it: the position read on the
        // device, the split sized for a cache holding more positions than
        // are filled (the rest garbage the kernel must not read).
        let spare = 300;
        let pad = |v: &[f32], stride: usize| {
            let mut v = v.to_vec();
            v.extend(values(spare * stride, seed + 7).iter().map(|x| x * 1e3));
            v
        };
        let dk = gpu.upload(&pad(&keys, s.k_stride)).unwrap();
        let dv = if shared {
            gpu.upload(&pad(&keys, s.k_stride)).unwrap()
        } else {
            gpu.upload(&pad(&values_own, s.v_stride)).unwrap()
        };
        let pos = gpu.upload(&[s.pos0 as u32]).unwrap();
        let mut out = gpu.zeros::<f32>(want.len()).unwrap();
        gpu.attention(
            &dq.as_view(),
            &dk.as_view(),
            &dv.as_view(),
            s,
            Some(&pos.as_view()),
            t,
            &mut out.as_view_mut(),
        )
        .unwrap();
        check(
            &format!("attention {name}, position on the device"),
            &gpu.download(&out).unwrap(),
            &want,
            1e-4,
        );
    }
}

#[test]
fn rounded_attention_matches_attention_then_round() {
    let Some(gpu) = gpu_or_skip("rounded attention") else {
        return;
    };
    if !gpu.int8_activations() {
        println!("SKIPPED rounded attention: int8 activations off (SMOE_CUDA_MMVQ=0)");
        return;
    }
    // Qwen3's shape at a context of several splits; heads of 64 (eight
    // lanes of each warp past the head); heads of 80 (not whole 32-blocks:
    // not rounded).
    let cases = [
        (AttnShape::grouped(32, 4, 128, 300, None), true),
        (AttnShape::grouped(16, 2, 64, 70, None), true),
        (AttnShape::grouped(8, 2, 80, 40, None), false),
    ];
    for (i, (s, rounds)) in cases.into_iter().enumerate() {
        let what = format!("{} heads of {} at {}", s.n_heads, s.v_dim, s.pos0);
        let seed = 700 + 5 * i as u64;
        let cols = s.n_heads * s.v_dim;
        let q = gpu.upload(&values(s.n_heads * s.head_dim, seed)).unwrap();
        let keys = gpu
            .upload(&values((s.pos0 + 1) * s.k_stride, seed + 1))
            .unwrap();
        let vals = gpu
            .upload(&values((s.pos0 + 1) * s.v_stride, seed + 2))
            .unwrap();
        let pos = gpu.upload(&[s.pos0 as u32]).unwrap();
        let (mut out, mut plain) = (
            gpu.zeros::<f32>(cols).unwrap(),
            gpu.zeros::<f32>(cols).unwrap(),
        );
        let w = Weights::new(
            DType::Quant(QuantType::Q4K),
            64,
            cols.next_multiple_of(256),
            seed,
        );
        let m = gpu.upload_matrix(w.matrix()).unwrap();
        let (mut y1, mut y2) = (gpu.zeros::<f32>(64).unwrap(), gpu.zeros::<f32>(64).unwrap());
        let run = |out: &mut cuda::CudaSlice<f32>, round: bool| {
            gpu.attention_rounded(
                &q.as_view(),
                &keys.as_view(),
                &vals.as_view(),
                s,
                Some(&pos.as_view()),
                1,
                &mut out.as_view_mut(),
                round,
            )
            .unwrap()
        };
        run(&mut plain, false);
        let rounded = run(&mut out, true);
        assert_eq!(rounded.is_some(), rounds, "{what}: rounded or not");
        assert_eq!(
            gpu.download(&out).unwrap(),
            gpu.download(&plain).unwrap(),
            "{what}: the output as without rounding"
        );
        let Some(r) = rounded else {
            continue;
        };
        if cols % 256 != 0 {
            continue;
        }
        gpu.matmul_each_rounded(&r, 1, &mut [(&m, &mut y1.as_view_mut())])
            .unwrap();
        drop(r);
        gpu.matmul_each(&out.as_view(), 1, &mut [(&m, &mut y2.as_view_mut())])
            .unwrap();
        check(
            &format!("{what}: product of the rounded output"),
            &gpu.download(&y1).unwrap(),
            &gpu.download(&y2).unwrap(),
            1e-6,
        );
    }
}

// ---- Whole models: every family's fixture on CUDA against the CPU.

/// A committed fixture: `SMOE_FIXTURES` when set, else the source tree's,
/// else `fixtures/` under the working directory (the repository root on a
/// GPU machine that has the tree but not this build's paths).
fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let root = match std::env::var_os("SMOE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None if built.is_dir() => built,
        None => PathBuf::from("fixtures"),
    };
    root.join(name)
}

const FAMILIES: [&str; 8] = [
    "qwen3-moe-a",
    "qwen3-moe-b",
    "qwen2-moe",
    "mixtral",
    "olmoe",
    "deepseek-v2",
    "deepseek-v2-lite",
    "deepseek-v3",
];

fn engine(dir: &Path, device: Device, ram_budget: Budget) -> Engine {
    engine_in(dir, device, ram_budget, Budget::Auto)
}

/// [`engine`] with `--vram-budget` set.
fn engine_in(dir: &Path, device: Device, ram_budget: Budget, vram_budget: Budget) -> Engine {
    let opts = LoadOptions {
        device,
        ram_budget,
        vram_budget,
        ..LoadOptions::default()
    };
    Engine::load_with(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn prompt(name: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Every position's logits of `ids` in one prefill, then `steps` greedy
/// decode steps one token at a time: the ids chosen and each step's logits.
fn prefill_and_decode(e: &Engine, ids: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let m = e.model();
    let mut s = m.new_session();
    let all = m.forward(ids, &mut s, Logits::All).unwrap().to_vec();
    let vocab = m.config().vocab_size;
    let mut next = argmax(&all[all.len() - vocab..]);
    let (mut chosen, mut logits) = (vec![next], Vec::new());
    for _ in 1..steps {
        let row = m.forward(&[next], &mut s, Logits::Last).unwrap();
        logits.extend_from_slice(row);
        next = argmax(row);
        chosen.push(next);
    }
    (all, chosen, logits)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits against the CPU backend's on the bf16 fixtures. Both widen the
/// same bf16 weights exactly to f32 and compute in f32; they differ only in
/// summation order (warp trees against SIMD lanes), about 1e-7 of a dot
/// product, grown through a few layers, softmaxes and norms to about 1e-5
/// of the logits' RMS. 1e-3 leaves two orders of magnitude over that while
/// still catching any wrong index, shape or missing term (those move the
/// logits by tens of percent). Greedy ids must match exactly: the fixtures'
/// smallest top-2 margins (reference.json's `min_margin`) are far wider.
#[test]
fn every_family_matches_the_cpu() {
    if gpu_or_skip("every family on CUDA").is_none() {
        return;
    }
    const TOL: f64 = 1e-3;
    for name in FAMILIES {
        let dir = fixture(name);
        let cpu = engine(&dir, Device::Cpu, Budget::Auto);
        let gpu = engine(&dir, Device::Cuda(0), Budget::Auto);
        let ids = prompt(name);
        let (want_all, want_ids, want_steps) = prefill_and_decode(&cpu, &ids, 8);
        let (got_all, got_ids, got_steps) = prefill_and_decode(&gpu, &ids, 8);
        check(&format!("{name}: prefill logits"), &got_all, &want_all, TOL);
        assert_eq!(got_ids, want_ids, "{name}: greedy ids");
        check(
            &format!("{name}: decode logits"),
            &got_steps,
            &want_steps,
            TOL,
        );
        // Generation with the greedy sampler: the GPU picks each token
        // where its logits are (`forward_greedy`), the CPU from the logits.
        let generate = |e: &Engine| {
            let mut s = e.new_session();
            e.generate(&mut s, &ids, &SamplingParams::default(), 8, |_| ())
                .unwrap()
                .tokens
        };
        assert_eq!(generate(&gpu), generate(&cpu), "{name}: generated greedily");
        println!("{name}: greedy ids {got_ids:?} as on the CPU");
    }
}

/// The device's greedy pick against the sampler's on rows that test its
/// rule: ties to the lowest index (also -0 against 0), NaN never chosen
/// (a row of NaN gives 0), a row of -inf its first, a maximum at either
/// end, and Qwen3's vocabulary width (64 parts a row) with a tie far
/// apart, NaN but for one value in the last part, and NaN alone.
#[test]
fn greedy_pick_on_the_device_is_the_samplers() {
    let Some(gpu) = gpu_or_skip("argmax_rows") else {
        return;
    };
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let mut wide = values(151_936, 41);
    wide[150_001] = 9.0;
    wide[77_777] = 9.0;
    let mut nans = vec![nan; 151_936];
    let all_nan = nans.clone();
    nans[151_000] = -5.0;
    let rows: Vec<Vec<f32>> = vec![
        nans,
        all_nan,
        vec![0.1, 3.0, -2.0, 2.9],
        vec![1.0, 5.0, 5.0, 5.0],
        vec![nan, -1.0, nan, -0.5],
        vec![nan, nan, nan],
        vec![-inf, -inf, -inf],
        vec![nan, -inf, nan, -inf],
        vec![-0.0, 0.0, -1.0],
        vec![-1.0, 0.0, -0.0],
        vec![7.0, 1.0, 2.0],
        (0..1000).map(|i| i as f32).collect(),
        vec![inf, nan, inf],
        wide,
    ];
    let mut sampler = Sampler::new(SamplingParams::default());
    for row in &rows {
        let want = sampler.sample(&mut row.clone(), &[]);
        let mut out = gpu.zeros::<u32>(1).unwrap();
        gpu.argmax_rows(
            &gpu.upload(row).unwrap().as_view(),
            row.len(),
            &mut out.as_view_mut(),
        )
        .unwrap();
        let got = gpu.download(&out).unwrap()[0];
        assert_eq!(got, want, "row of {} beginning {:?}", row.len(), &row[..3]);
    }
    // Several rows in one launch, each its own (and its parts' count).
    let wide = [&rows[0], &rows[1], &rows[rows.len() - 1]];
    let flat: Vec<f32> = wide.iter().flat_map(|r| r.to_vec()).collect();
    let mut out = gpu.zeros::<u32>(3).unwrap();
    gpu.argmax_rows(
        &gpu.upload(&flat).unwrap().as_view(),
        151_936,
        &mut out.as_view_mut(),
    )
    .unwrap();
    assert_eq!(gpu.download(&out).unwrap(), [151_000, 0, 77_777]);
}

/// Captured decode steps replay only where they still hold: two sessions
/// decoding in turn (same step shape, other caches) and each session's
/// cache outgrowing its buffers (64 positions, then doubled) force a new
/// capture; every step's logits stay the CPU's.
#[test]
fn replayed_steps_follow_sessions_and_cache_growth() {
    if gpu_or_skip("replayed CUDA steps").is_none() {
        return;
    }
    let name = "qwen3-moe-a";
    let (cpu, gpu) = (
        engine(&fixture(name), Device::Cpu, Budget::Auto),
        engine(&fixture(name), Device::Cuda(0), Budget::Auto),
    );
    let ids = prompt(name);
    let prompts = [&ids[..], &ids[2..]];
    // Each session alone on the CPU; on the GPU the two in turn.
    let steps = 90;
    let want: Vec<_> = prompts
        .iter()
        .map(|p| prefill_and_decode(&cpu, p, steps))
        .collect();
    let m = gpu.model();
    let mut sessions: Vec<_> = prompts.iter().map(|_| m.new_session()).collect();
    let mut next: Vec<u32> = prompts
        .iter()
        .zip(&mut sessions)
        .map(|(p, s)| argmax(m.forward(p, s, Logits::Last).unwrap()))
        .collect();
    let vocab = m.config().vocab_size;
    for step in 1..steps {
        for (i, s) in sessions.iter_mut().enumerate() {
            let row = m.forward(&[next[i]], s, Logits::Last).unwrap();
            let at = (step - 1) * vocab;
            check(
                &format!("session {i}, decode step {step}"),
                row,
                &want[i].2[at..at + vocab],
                1e-3,
            );
            next[i] = argmax(row);
            assert_eq!(next[i], want[i].1[step], "session {i}, step {step}");
        }
    }
    // The other session's turn between two steps of one: no replays
    // there; but one session decoding alone replays.
    let mut s = m.new_session();
    let mut id = argmax(m.forward(prompts[0], &mut s, Logits::Last).unwrap());
    let before = gpu.gpu_expert_stats().unwrap();
    for step in 1..steps {
        let row = m.forward(&[id], &mut s, Logits::Last).unwrap();
        let at = (step - 1) * vocab;
        check(
            &format!("alone, decode step {step}"),
            row,
            &want[0].2[at..at + vocab],
            1e-3,
        );
        id = argmax(row);
    }
    let g = gpu.gpu_expert_stats().unwrap().since(&before);
    println!("{name}: one session alone, {} steps: {g:?}", steps - 1);
    if Gpu::new(0).unwrap().graphs() {
        // Captures at the first step of the shape's second use, and again
        // where the cache grew past 64 and 128 positions.
        assert!(g.graph_replays + 8 >= (steps - 1) as u64, "{g:?}");
    }
}

/// Two sequences in one batched pass on the GPU (a prompt beside a
/// decoding sequence, as `serve --parallel` runs them) give what each
/// gives alone.
#[test]
fn a_batch_on_cuda_equals_its_sequences_alone() {
    if gpu_or_skip("batch on CUDA").is_none() {
        return;
    }
    for name in ["qwen3-moe-a", "deepseek-v3"] {
        let gpu = engine(&fixture(name), Device::Cuda(0), Budget::Auto);
        let m = gpu.model();
        let ids = prompt(name);
        let (a, b) = (&ids[..5], &ids[3..]);
        let alone = |ids: &[u32]| {
            let mut s = m.new_session();
            m.forward(ids, &mut s, Logits::Last).unwrap().to_vec()
        };
        let (want_a, want_b) = (alone(&ids[..6]), alone(b));
        let (mut sa, mut sb) = (m.new_session(), m.new_session());
        m.forward(a, &mut sa, Logits::Last).unwrap();
        let mut scratch = Scratch::default();
        let mut steps = [
            Step {
                ids: &ids[5..6],
                session: &mut sa,
                logits: true,
                greedy: false,
            },
            Step {
                ids: b,
                session: &mut sb,
                logits: true,
                greedy: false,
            },
        ];
        m.forward_batch(&mut steps, &mut scratch).unwrap();
        // The same kernels on the same rows: only the row count of the
        // calls differs, which picks matvec or gemm, so allow their order.
        check(
            &format!("{name}: batched decode row"),
            sa.logits(),
            &want_a,
            1e-4,
        );
        check(
            &format!("{name}: batched prompt"),
            sb.logits(),
            &want_b,
            1e-4,
        );
        // The same batch with greedy steps: picks in place of the logits,
        // the argmax of the logits above; where one step is not greedy,
        // logits for both and no picks.
        let want = [argmax(sa.logits()), argmax(sb.logits())];
        for greedy in [[true, true], [true, false]] {
            let (mut ga, mut gb) = (m.new_session(), m.new_session());
            m.forward(a, &mut ga, Logits::Last).unwrap();
            let mut steps = [
                Step {
                    ids: &ids[5..6],
                    session: &mut ga,
                    logits: true,
                    greedy: greedy[0],
                },
                Step {
                    ids: b,
                    session: &mut gb,
                    logits: true,
                    greedy: greedy[1],
                },
            ];
            m.forward_batch(&mut steps, &mut scratch).unwrap();
            for (s, want) in [&mut ga, &mut gb].into_iter().zip(want) {
                if greedy == [true, true] {
                    assert_eq!(s.take_pick(), Some(want), "{name}: picked in a batch");
                    assert!(s.logits().is_empty(), "{name}: no logits beside a pick");
                } else {
                    assert_eq!(s.take_pick(), None, "{name}: a mixed batch picks nothing");
                    assert_eq!(argmax(s.logits()), want, "{name}: a mixed batch's logits");
                }
            }
        }
    }
}

/// Family fixture `name` as a vault under `dir` that keeps bf16 (see
/// `streamed_experts_match_the_cpu` for why).
fn bf16_vault(dir: &Path, name: &str) -> PathBuf {
    let vault = dir.join(name);
    let opts = ConvertOptions {
        experts: DType::BF16,
        backbone: DType::BF16,
        allow_lossy: false,
        stop_after_layers: None,
    };
    convert(&fixture(name), &vault, &opts, &mut |_| ()).unwrap();
    vault
}

/// One-token steps that copy the next layer's predicted experts while the
/// layer before runs (`SMOE_COPY_AHEAD`), the way forced: copying every
/// expert, and splitting them with the CPU, whose run of experts then
/// skips those copied ahead (the GPU's share two runs of rows either side
/// of it). The same greedy ids and logits as the CPU's, the copies made
/// ahead counted, none used that was not copied.
#[test]
fn experts_copied_ahead_match_the_cpu() {
    if gpu_or_skip("experts copied ahead").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let name = "qwen3-moe-a";
    let vault = bf16_vault(tmp.path(), name);
    let cpu = engine(&vault, Device::Cpu, Budget::Auto);
    let ids = prompt(name);
    // Enough steps that each stretch between the host's waits is captured
    // and then replayed (the first step sizes the buffers).
    let steps = 24;
    let (want_all, want_ids, want_steps) = prefill_and_decode(&cpu, &ids, steps);
    for (way, ahead) in [("copy", "8"), ("split", "1"), ("cpu", "0")] {
        // Read once, as the decoder is made; the GPU tests run one at a
        // time (tools/test-cuda.sh), and any other decoder made meanwhile
        // would only take another way.
        std::env::set_var("SMOE_STREAMED_WAY", way);
        std::env::set_var("SMOE_COPY_AHEAD", ahead);
        std::env::set_var("SMOE_CUDA_STRETCHES", "1");
        let gpu = engine_in(&vault, Device::Cuda(0), Budget::Auto, Budget::Bytes(0));
        std::env::remove_var("SMOE_STREAMED_WAY");
        std::env::remove_var("SMOE_COPY_AHEAD");
        std::env::remove_var("SMOE_CUDA_STRETCHES");
        let what = format!(
            "{name} vault, {way}, {ahead} copied ahead ({})",
            gpu.device()
        );
        let (got_all, got_ids, got_steps) = prefill_and_decode(&gpu, &ids, steps);
        check(&format!("{what}: prefill"), &got_all, &want_all, 1e-3);
        assert_eq!(got_ids, want_ids, "{what}: greedy ids");
        check(&format!("{what}: decode"), &got_steps, &want_steps, 1e-3);
        let g = gpu
            .gpu_expert_stats()
            .expect("a GPU decoder counts its tiers");
        println!("{what}: {g:?}");
        assert!(g.ahead_used <= g.copied_ahead, "{what}: {g:?}");
        assert_eq!(g.copied_ahead > 0, way != "cpu", "{what}: {g:?}");
        assert_eq!(g.cpu_runs > 0, way != "copy", "{what}: {g:?}");
        // The whole step never runs as one graph (its layers wait on the
        // host); its stretches do from the second decode step on (the
        // first sizes the buffers), recorded once and then replayed: at
        // most two steps' worth recorded (the streamed experts' copies
        // allocate as they go, which must not make the graphs stale).
        assert_eq!(g.graph_steps, 0, "{what}: {g:?}");
        if Gpu::new(0).unwrap().graphs() {
            let per_step = g.graph_stretches / (steps as u64 - 2);
            let recorded = g.graph_stretches - g.stretch_replays;
            assert!(per_step > 0 && recorded <= 2 * per_step, "{what}: {g:?}");
        }
    }
}

/// Experts streamed from a vault through a 3-slot RAM cache (so a
/// prefill's experts come in groups), uploaded per use, against the CPU on
/// the same vault; then with about half and with all of the layers'
/// experts in VRAM (`--vram-budget`), run by id as resident ones are. The vault keeps bf16 so that both sides multiply the
/// same floats (with quantized weights the CPU rounds activations to 8 bits
/// and the GPU does not, which on these random fixtures flips close
/// routing choices; the kernel tests hold the quantized products to the
/// CPU's instead): the tolerance is the families' 1e-3.
#[test]
fn streamed_experts_match_the_cpu() {
    // The engines make handles of their own; this one, which never
    // captures, says whether theirs will (`SMOE_CUDA_GRAPH=0` says not).
    let Some(handle) = gpu_or_skip("streamed experts on CUDA") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3-moe-a", "olmoe"] {
        let vault = bf16_vault(tmp.path(), name);
        // Three experts' records.
        let budget = Budget::Bytes(3 * 3 * 2 * 64 * 32 + 4096);
        let cpu = engine(&vault, Device::Cpu, budget);
        let ids = prompt(name);
        let (want_all, want_ids, want_steps) = prefill_and_decode(&cpu, &ids, 8);
        // Every expert streamed, about half the layers' experts in VRAM,
        // all of them.
        let half = smoe::vault::Vault::open(&vault).unwrap().expert_bytes() / 2;
        for vram in [Budget::Bytes(0), Budget::Bytes(half), Budget::Auto] {
            let gpu = engine_in(&vault, Device::Cuda(0), budget, vram);
            let what = format!("{name} vault, VRAM {vram:?} ({})", gpu.device());
            let (got_all, got_ids, got_steps) = prefill_and_decode(&gpu, &ids, 8);
            check(&format!("{what}: prefill"), &got_all, &want_all, 1e-3);
            assert_eq!(got_ids, want_ids, "{what}: greedy ids");
            check(&format!("{what}: decode"), &got_steps, &want_steps, 1e-3);
            let cache = gpu.cache().unwrap();
            let stats = cache.stats().snapshot();
            println!("{what}: {} slots, {stats:?}", cache.capacity());
            assert!(stats.misses > 0, "{what}: {stats:?}");
            // The tiers above the cache: no layer in VRAM, about half, all.
            let g = gpu
                .gpu_expert_stats()
                .expect("a GPU decoder counts its tiers");
            println!("{what}: {g:?}");
            let streamed = g.copied + g.cpu_runs;
            match vram {
                Budget::Bytes(0) => {
                    assert_eq!(g.vram_hits, 0, "{what}: {g:?}");
                    // Streamed layers wait on the host: no whole step
                    // runs as one graph (its stretches may).
                    assert_eq!(g.graph_steps, 0, "{what}: {g:?}");
                    // A small batch tries both ways before it settles.
                    assert!(g.copied > 0 && g.cpu_runs > 0, "{what}: {g:?}");
                }
                // Every layer on the GPU: the decode steps after the first
                // (which sizes the buffers) run as captured graphs, and
                // those after the second replay the second's as they are
                // (the position read on the device), unless graphs are off.
                Budget::Auto => assert!(
                    g.vram_hits > 0
                        && streamed == 0
                        && ((g.graph_steps >= 5 && g.graph_replays >= 4) || !handle.graphs()),
                    "{what}: {g:?}"
                ),
                Budget::Bytes(_) => assert!(g.vram_hits > 0 && streamed > 0, "{what}: {g:?}"),
            }
            assert_eq!(g.pcie_bytes > 0, g.copied > 0, "{what}: {g:?}");
        }
        // A budget past what the GPU has is refused before any upload.
        let opts = LoadOptions {
            device: Device::Cuda(0),
            ram_budget: budget,
            vram_budget: Budget::Bytes(1 << 50),
            ..LoadOptions::default()
        };
        let err = Engine::load_with(&vault, &opts)
            .err()
            .expect("1 PiB of VRAM refused");
        assert!(
            err.to_string().contains("--vram-budget 1048576.00 GiB"),
            "{err}"
        );
    }
}

/// The int8 paths end to end: the family fixtures are 64 wide, and the
/// int8 kernels take rows of whole 256-weight blocks, so none of their
/// steps reaches them. This model (Qwen3-MoE, written here: 256 wide,
/// heads of 64, eight experts of 256, two layers, random bf16 weights
/// converted to q4_k with the default recipe's q6_k values and head) runs
/// the rounded norms, q/k/v in one launch, the fused down-and-sum and the
/// graphs with every expert in VRAM, and with none (a token's copied
/// experts through the id kernels, the one download a layer, recycled
/// device matrices) and half. The GPU follows the CPU's greedy ids, so a
/// close call between tokens cannot send the two down different paths.
///
/// Tolerance: both sides round activations to int8 for these products
/// (the CPU per 256, the GPU per 32), each about 0.5% of a product's
/// RMS; through two layers and the head a row's logits differ by 1-2% of
/// their RMS. Each row of logits (a token's) must be within 5% (RMS of
/// its difference over the part's RMS) and 25% at its largest, except
/// the worst row of each part: a close call between two experts (a
/// 1.3e-4 gap in router probability was seen on the CPU) goes the other
/// way under that noise about half the time, and moves that token's row
/// by ~6% RMS, ~66% at its largest (measured on the CPU by forcing the
/// flip); the seeds are ones whose closest call was far wider. A wrong
/// expert, pair weight or row moves every row it touches by tens of
/// percent.
#[test]
fn int8_paths_match_the_cpu_on_a_wide_model() {
    let Some(handle) = gpu_or_skip("a 256-wide q4_k model") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let vault = wide_q4_k_vault(tmp.path());
    let ids = prompt("qwen3-moe-a");
    let cpu = engine(&vault, Device::Cpu, Budget::Auto);
    let (want_all, greedy, want_steps) = prefill_and_decode(&cpu, &ids, 12);
    let vocab = cpu.model().config().vocab_size;
    let half = smoe::vault::Vault::open(&vault).unwrap().expert_bytes() / 2;
    for vram in [Budget::Auto, Budget::Bytes(half), Budget::Bytes(0)] {
        let gpu = engine_in(&vault, Device::Cuda(0), Budget::Auto, vram);
        let what = format!("wide q4_k, VRAM {vram:?} ({})", gpu.device());
        let (got_all, got_steps) = follow(&gpu, &ids, &greedy);
        for (part, got, want) in [
            ("prefill", &got_all, &want_all),
            ("decode", &got_steps, &want_steps),
        ] {
            check_rows(&format!("{what}: {part}"), got, want, vocab);
        }
        let g = gpu.gpu_expert_stats().expect("a GPU decoder counts");
        println!("{what}: {g:?}");
        let streamed = g.copied + g.cpu_runs;
        match vram {
            // Every expert in VRAM: decode steps as graphs.
            Budget::Auto => assert!(
                g.vram_hits > 0 && streamed == 0 && (g.graph_steps > 0 || !handle.graphs()),
                "{what}: {g:?}"
            ),
            // None: both ways tried, the copies through the id kernels.
            Budget::Bytes(0) => assert!(
                g.vram_hits == 0 && g.copied > 0 && g.cpu_runs > 0,
                "{what}: {g:?}"
            ),
            Budget::Bytes(_) => assert!(g.vram_hits > 0 && streamed > 0, "{what}: {g:?}"),
        }
    }
}

/// Rows of `width` logits against the CPU's, as
/// [`int8_paths_match_the_cpu_on_a_wide_model`] bounds them: every row but
/// the worst within 5% of the part's RMS (RMS of its difference) and 25%
/// at its largest.
fn check_rows(what: &str, got: &[f32], want: &[f32], width: usize) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let sq = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>();
    let rms = (sq(&mut want.iter().map(|&w| w as f64)) / want.len().max(1) as f64)
        .sqrt()
        .max(1e-30);
    let mut rows: Vec<(f64, f64, usize)> = got
        .chunks(width)
        .zip(want.chunks(width))
        .enumerate()
        .map(|(i, (g, w))| {
            let d = || g.iter().zip(w).map(|(&g, &w)| g as f64 - w as f64);
            let r = (sq(&mut d()) / width as f64).sqrt() / rms;
            let m = d().map(f64::abs).fold(0.0, f64::max) / rms;
            // NaN sorts last and fails below.
            (if r.is_nan() { f64::INFINITY } else { r }, m, i)
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!("{what}: rows by RMS error (err, max, row): {rows:.3?}");
    for &(r, m, i) in &rows[..rows.len().saturating_sub(1)] {
        assert!(
            r <= 0.05 && m <= 0.25,
            "{what}: row {i} off by {r:.3e} RMS, {m:.3e} at most"
        );
    }
}

/// The prompt's logits, then those of decoding `chosen` (a greedy run's
/// ids, the first one the prompt's) one at a time.
fn follow(e: &Engine, ids: &[u32], chosen: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let m = e.model();
    let mut s = m.new_session();
    let all = m.forward(ids, &mut s, Logits::All).unwrap().to_vec();
    let mut logits = Vec::new();
    for &next in &chosen[..chosen.len().saturating_sub(1)] {
        logits.extend_from_slice(m.forward(&[next], &mut s, Logits::Last).unwrap());
    }
    (all, logits)
}

/// A Qwen3-MoE checkpoint 256 wide (the fixture qwen3-moe-a's config and
/// tokenizer, wider), random bf16 weights, converted to a q4_k vault in
/// `dir`; returns the vault's path.
fn wide_q4_k_vault(dir: &Path) -> PathBuf {
    let (hidden, inter, heads, kv, hd, n_exp, layers) = (256, 256, 4, 2, 64, 8, 2);
    let src = fixture("qwen3-moe-a");
    let ckpt = dir.join("wide-checkpoint");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), ckpt.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (k, v) in [
        ("hidden_size", hidden),
        ("intermediate_size", 2 * inter),
        ("moe_intermediate_size", inter),
        ("num_hidden_layers", layers),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv),
        ("head_dim", hd),
        ("num_experts", n_exp),
    ] {
        cfg[k] = v.into();
    }
    let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    std::fs::write(ckpt.join("config.json"), cfg.to_string()).unwrap();

    // (name, shape); matrices scaled by 1/sqrt(columns) so that
    // activations keep their size through the layers, norms all ones.
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, hidden]),
        ("lm_head.weight".into(), vec![vocab, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
            ("self_attn.q_norm", vec![hd]),
            ("self_attn.k_norm", vec![hd]),
            ("self_attn.q_proj", vec![heads * hd, hidden]),
            ("self_attn.k_proj", vec![kv * hd, hidden]),
            ("self_attn.v_proj", vec![kv * hd, hidden]),
            ("self_attn.o_proj", vec![hidden, heads * hd]),
            ("mlp.gate", vec![n_exp, hidden]),
        ] {
            tensors.push((format!("{p}.{n}.weight"), shape));
        }
        for e in 0..n_exp {
            for (n, shape) in [
                ("gate_proj", vec![inter, hidden]),
                ("up_proj", vec![inter, hidden]),
                ("down_proj", vec![hidden, inter]),
            ] {
                tensors.push((format!("{p}.mlp.experts.{e}.{n}.weight"), shape));
            }
        }
    }
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (seed, (name, shape)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let vals = match shape.len() {
            1 => vec![1.0; n],
            _ => {
                let scale = 1.0 / (shape[1] as f32).sqrt();
                values(n, 11_000 + seed as u64)
                    .iter()
                    .map(|v| v * scale)
                    .collect()
            }
        };
        let start = data.len();
        for v in vals {
            data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&head);
    file.extend_from_slice(&data);
    std::fs::write(ckpt.join("model.safetensors"), file).unwrap();

    let vault = dir.join("wide-vault");
    let q4k = DType::Quant(QuantType::Q4K);
    let opts = ConvertOptions {
        experts: q4k,
        backbone: q4k,
        allow_lossy: false,
        stop_after_layers: None,
    };
    convert(&ckpt, &vault, &opts, &mut |_| ()).unwrap();
    vault
}

/// `--device` on the library side: the chosen device is named, and a
/// device that does not exist is an error, not a panic or a fallback.
#[test]
fn device_choice_names_the_gpu_or_says_why_not() {
    if gpu_or_skip("device choice").is_none() {
        return;
    }
    let (placement, why) = smoe::compute::choose(Device::Auto).unwrap();
    assert_eq!(placement, Placement::Cuda(0), "{why}");
    assert!(why.starts_with("cuda:0 "), "{why}");
    let e = smoe::compute::choose(Device::Cuda(99)).unwrap_err();
    assert!(e.to_string().contains("cuda:99"), "{e}");
    let gpu = engine(&fixture("qwen3-moe-a"), Device::Cuda(0), Budget::Auto);
    assert!(gpu.device().starts_with("cuda:0"), "{}", gpu.device());
}

/// Float rows of a width that is no multiple of 32 (the fixtures' 24, 40
/// and 48) take the one-weight-at-a-time kernel, for any token count.
#[test]
fn ragged_float_rows_match_cpu() {
    let Some(gpu) = gpu_or_skip("ragged rows") else {
        return;
    };
    for (seed, dtype) in [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .enumerate()
    {
        for (rows, cols) in [(40, 24), (24, 40), (96, 48)] {
            let w = Weights::new(dtype, rows, cols, 40 + seed as u64);
            let dw = gpu.upload_matrix(w.matrix()).expect("upload");
            for t in [1, 9, 70] {
                let x = values(t * cols, 200 + t as u64);
                let mut dy = gpu.zeros::<f32>(t * rows).unwrap();
                let dx = gpu.upload(&x).unwrap();
                gpu.matmul(&dx.as_view(), t, &dw, &mut dy.as_view_mut())
                    .expect("matmul");
                let mut cpu = vec![0.0f32; t * rows];
                Cpu.matmul(&x, t, w.matrix(), &mut cpu);
                let what = format!("ragged {} [{rows}, {cols}] t={t}", dtype.name());
                check(&what, &gpu.download(&dy).unwrap(), &cpu, 1e-5);
            }
        }
    }
}
