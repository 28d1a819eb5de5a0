//! Data shared by the CUDA tests (`tests/cuda.rs`) and benchmark
//! (`benches/cuda_bench.rs`): deterministic values, and weight matrices in
//! every stored type.

use smoe::kernels::{DType, Matrix};
use smoe::quant::quantize_rows;

/// Deterministic values in [-1, 1) (xorshift; no RNG crate needed).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A `[rows, cols]` weight matrix of random values stored as `dtype`, in
/// u64 words so that block data is aligned as the loader's is.
pub struct Weights {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    words: Vec<u64>,
}

impl Weights {
    pub fn new(dtype: DType, rows: usize, cols: usize, seed: u64) -> Self {
        let len = rows * dtype.row_bytes(cols);
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: the words hold at least `len` bytes; u8 has no alignment needs.
        let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) };
        let src = values(rows * cols, seed);
        match dtype {
            DType::Quant(q) => quantize_rows(q, &src, cols, bytes).expect("quantize"),
            DType::F32 => {
                for (d, v) in bytes.chunks_exact_mut(4).zip(&src) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::F16 => {
                for (d, v) in bytes.chunks_exact_mut(2).zip(&src) {
                    d.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            DType::BF16 => {
                for (d, v) in bytes.chunks_exact_mut(2).zip(&src) {
                    d.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
        }
        Self {
            dtype,
            rows,
            cols,
            words,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        let len = self.rows * self.dtype.row_bytes(self.cols);
        // SAFETY: as in `new`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), len) }
    }

    pub fn matrix(&self) -> Matrix<'_> {
        Matrix::new(self.dtype, self.bytes(), self.rows, self.cols)
    }
}
