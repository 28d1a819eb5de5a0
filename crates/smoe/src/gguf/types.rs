//! GGML tensor types as GGUF numbers them, with their block geometry.
//!
//! Every type any GGUF may hold is listed, whether or not smoe computes with
//! it: a reader that knows each type's block size can index, bound-check and
//! copy any tensor, and name the type when it refuses one.

use std::path::Path;

use super::file::TensorInfo;
use crate::kernels::DType;
use crate::quant::QuantType;
use crate::{Error, Result};

/// A GGML tensor type, by its number in the GGUF tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

/// (type, GGUF number, name, weights per block, bytes per block), from
/// ggml's type traits (gguf-py's `GGML_QUANT_SIZES`). Numbers 4, 5, 31-33
/// and 36-38 belonged to layouts ggml has removed; files holding them are
/// refused as unknown.
const TABLE: [(GgmlType, u32, &str, usize, usize); 32] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8K, 15, "Q8_K", 256, 292),
    (GgmlType::Iq2Xxs, 16, "IQ2_XXS", 256, 66),
    (GgmlType::Iq2Xs, 17, "IQ2_XS", 256, 74),
    (GgmlType::Iq3Xxs, 18, "IQ3_XXS", 256, 98),
    (GgmlType::Iq1S, 19, "IQ1_S", 256, 50),
    (GgmlType::Iq4Nl, 20, "IQ4_NL", 32, 18),
    (GgmlType::Iq3S, 21, "IQ3_S", 256, 110),
    (GgmlType::Iq2S, 22, "IQ2_S", 256, 82),
    (GgmlType::Iq4Xs, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::Iq1M, 29, "IQ1_M", 256, 56),
    (GgmlType::Bf16, 30, "BF16", 1, 2),
    (GgmlType::Tq1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::Tq2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::Mxfp4, 39, "MXFP4", 32, 17),
];

/// The GGML types that are vault block formats, byte for byte: the one
/// mapping both directions use.
const SHARED: [(GgmlType, QuantType); 12] = [
    (GgmlType::Q4K, QuantType::Q4K),
    (GgmlType::Q4_0, QuantType::Q4_0),
    (GgmlType::Q8_0, QuantType::Q8_0),
    (GgmlType::Q6K, QuantType::Q6K),
    (GgmlType::Q5K, QuantType::Q5K),
    (GgmlType::Q3K, QuantType::Q3K),
    (GgmlType::Q2K, QuantType::Q2K),
    (GgmlType::Q4_1, QuantType::Q4_1),
    (GgmlType::Q5_0, QuantType::Q5_0),
    (GgmlType::Q5_1, QuantType::Q5_1),
    (GgmlType::Iq4Nl, QuantType::Iq4Nl),
    (GgmlType::Iq4Xs, QuantType::Iq4Xs),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        // The table is in enum order, so the discriminant indexes it.
        &TABLE[self as usize]
    }

    /// Every type smoe computes with, with its kernels' type, in GGUF's
    /// numbering order.
    pub fn computed() -> impl Iterator<Item = (GgmlType, DType)> {
        TABLE
            .iter()
            .filter_map(|row| row.0.dtype().map(|d| (row.0, d)))
    }

    /// The type a GGUF tensor info's number names, if ggml still has it.
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|row| row.1 == id).map(|row| row.0)
    }

    /// The number GGUF stores for this type.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// llama.cpp's spelling: `"Q4_K"`, `"IQ4_XS"`, `"BF16"`, ...
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Weights per block (1 for the plain float and integer types).
    pub fn block_elems(self) -> usize {
        self.row().3
    }

    /// Bytes per block, scales included.
    pub fn block_bytes(self) -> usize {
        self.row().4
    }

    /// Bytes of `elems` consecutive weights along a row, or `None` when they
    /// do not split into whole blocks.
    pub fn bytes_for(self, elems: u64) -> Option<u64> {
        let per = self.block_elems() as u64;
        elems
            .is_multiple_of(per)
            .then(|| (elems / per).checked_mul(self.block_bytes() as u64))
            .flatten()
    }

    /// The vault's block format with the same bytes, for the types smoe's
    /// kernels multiply directly.
    pub fn quant_type(self) -> Option<QuantType> {
        SHARED.iter().find(|s| s.0 == self).map(|s| s.1)
    }

    /// The GGML type with the same bytes as a vault block format: every
    /// one has one.
    pub fn from_quant(q: QuantType) -> GgmlType {
        let shared = SHARED.iter().find(|s| s.1 == q);
        shared.expect("SHARED lists every QuantType").0
    }

    /// The kernels' element type for tensor `tensor` of this type, or an
    /// error naming the tensor and the type where smoe has no kernels for
    /// it (the other IQ types, the ternary ones, MXFP4, integers, f64).
    pub fn compute_dtype(self, tensor: &str) -> Result<DType> {
        self.dtype().ok_or_else(|| {
            Error::invalid(format!(
                "tensor {tensor}: GGML type {self} is not supported; smoe computes with \
                 F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K, \
                 IQ4_XS and IQ4_NL"
            ))
        })
    }

    /// The kernels' element type with the same bytes, where there is one.
    pub fn dtype(self) -> Option<DType> {
        match self {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::Bf16 => Some(DType::BF16),
            other => other.quant_type().map(DType::Quant),
        }
    }
}

/// The engine type a GGUF tensor is computed in: the one place where a
/// GGML type is accepted or refused, so a type that gains kernels (a line
/// in [`GgmlType::quant_type`]) runs everywhere at once.
pub fn engine_dtype(tensor: &TensorInfo, path: &Path) -> Result<DType> {
    tensor.ggml_type.dtype().ok_or_else(|| {
        Error::format(
            path,
            format!(
                "tensor {} is {}, a type smoe has no kernels for (it runs F32, F16, BF16, {})",
                tensor.name,
                tensor.ggml_type,
                TABLE
                    .iter()
                    .filter(|row| row.0.quant_type().is_some())
                    .map(|row| row.2)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel benchmark's GGUF table covers: the float types and
    /// every block format the vault shares with GGUF, each once.
    #[test]
    fn computed_types_are_the_floats_and_the_shared_block_formats() {
        let all: Vec<(GgmlType, DType)> = GgmlType::computed().collect();
        assert_eq!(all.len(), 3 + SHARED.len());
        for (g, q) in SHARED {
            assert!(all.contains(&(g, DType::Quant(q))), "{g}");
        }
        for (g, d) in [
            (GgmlType::F32, DType::F32),
            (GgmlType::F16, DType::F16),
            (GgmlType::Bf16, DType::BF16),
        ] {
            assert!(all.contains(&(g, d)), "{g}");
        }
    }

    #[test]
    fn table_is_in_enum_order_and_ids_are_unique() {
        for (i, row) in TABLE.iter().enumerate() {
            assert_eq!(row.0 as usize, i, "{}", row.2);
            assert_eq!(GgmlType::from_id(row.1), Some(row.0));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 40, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None);
        }
    }

    #[test]
    fn shared_formats_have_the_vaults_block_sizes() {
        for row in TABLE {
            if let Some(q) = row.0.quant_type() {
                assert_eq!(q.block_elems(), row.0.block_elems(), "{}", row.2);
                assert_eq!(q.block_bytes(), row.0.block_bytes(), "{}", row.2);
                assert!(q.name().eq_ignore_ascii_case(row.2));
            }
        }
    }

    #[test]
    fn every_vault_format_is_a_ggml_type_and_back() {
        for q in QuantType::ALL {
            assert_eq!(GgmlType::from_quant(q).quant_type(), Some(q), "{q:?}");
        }
    }

    #[test]
    fn types_without_kernels_are_refused_by_tensor_and_type() {
        let t = "blk.3.ffn_down_exps.weight";
        for ty in [
            GgmlType::Iq2Xxs,
            GgmlType::Iq1M,
            GgmlType::Iq3S,
            GgmlType::Tq1_0,
        ] {
            let msg = ty.compute_dtype(t).unwrap_err().to_string();
            assert!(msg.contains(t) && msg.contains(ty.name()), "{msg}");
        }
        assert_eq!(
            GgmlType::Iq4Xs.compute_dtype(t).unwrap(),
            DType::Quant(QuantType::Iq4Xs)
        );
        assert_eq!(GgmlType::Bf16.compute_dtype(t).unwrap(), DType::BF16);
    }

    #[test]
    fn row_bytes() {
        assert_eq!(GgmlType::Q4K.bytes_for(2048), Some(8 * 144));
        assert_eq!(GgmlType::Q4K.bytes_for(1408), None);
        assert_eq!(GgmlType::Q5_0.bytes_for(1408), Some(44 * 22));
        assert_eq!(GgmlType::Bf16.bytes_for(3), Some(6));
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
    }
}
