//! Sizes of a GGUF run as it is: everything it stores is what the vault
//! `smoe convert` makes of it would store (the types each tensor really
//! has, the backbone the decoder loads), read from the metadata and tensor
//! table alone; an expert is what the engine reads of it, its three slices
//! each rounded out to 4 KiB.

use std::sync::Arc;

use super::Sizes;
use crate::error::{Error, Result};
use crate::experts::io::DirectFile;
use crate::gguf::{convert, Gguf};
use crate::vault::ALIGN;

impl Sizes {
    /// Sizes of the GGUF `g` (one file or a split set) streamed in place.
    pub fn of_gguf(g: &Gguf) -> Result<Self> {
        let layout = convert::layout(g)?;
        let mut s = Sizes::of_manifest(&layout.manifest, g.path(), "gguf")?;
        // A cache slot holds an expert's slices as direct I/O reads them,
        // not a vault record: the rounding is what the vault's padding was.
        let stored: u64 = s
            .experts
            .iter()
            .filter(|(t, _)| *t != "padding")
            .map(|(_, b)| b)
            .sum();
        let slots: u64 = layout
            .layers
            .iter()
            .map(|l| l.experts as u64 * l.slot_bytes())
            .sum();
        s.experts.remove("padding");
        if slots > stored {
            s.experts.insert("padding".into(), slots - stored);
        }
        s.record_bytes = layout
            .layers
            .iter()
            .map(|l| l.slot_bytes())
            .max()
            .unwrap_or(0);
        Ok(s)
    }
}

/// For the disk probe: the shard holding the most experts' gate slices,
/// and where reads of `len` bytes from each of those slices (rounded down
/// to [`ALIGN`], as the engine reads them) start within it, by layer.
pub(super) fn gguf_records(g: &Gguf, len: u64) -> Result<(Arc<DirectFile>, Vec<Vec<u64>>)> {
    let cfg = crate::gguf::config::model_config(g)?;
    let layers = crate::gguf::expert_tensors(g, &cfg)?;
    let mut by_shard = vec![Vec::new(); g.shards().len()];
    for l in &layers {
        let gate = l.parts[0];
        let end = g.shards()[gate.shard].len();
        let layer: Vec<u64> = (0..l.experts as u64)
            .map(|e| (gate.offset + e * gate.len) / ALIGN * ALIGN)
            .filter(|&at| at + len <= end)
            .collect();
        if !layer.is_empty() {
            by_shard[gate.shard].push(layer);
        }
    }
    let (shard, offsets) = by_shard
        .into_iter()
        .enumerate()
        .max_by_key(|(_, o)| o.iter().map(Vec::len).sum::<usize>())
        .filter(|(_, o)| !o.is_empty())
        .ok_or_else(|| Error::format(g.path(), "no expert slices to read"))?;
    let file = DirectFile::open(g.shards()[shard].path())?;
    Ok((Arc::new(file), offsets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::run_tests::{from_fixture, wide_qwen3, write, write_split, FAMILIES};
    use crate::gguf::{expert_tensors, GgmlType};
    use crate::kernels::DType;
    use crate::memory::Footprint;
    use crate::vault::Vault;

    /// What a GGUF stores, as [`Sizes`] prints it, with what only the way
    /// experts are read decides (their slot and its rounding) left out.
    fn stored(mut s: Sizes) -> String {
        s.source = "";
        s.record_bytes = 0;
        s.experts.remove("padding");
        format!("{s:?}")
    }

    /// A GGUF is planned as the vault `smoe convert` makes of it: every
    /// tensor's stored type and bytes, by type, by layer, the LM head and
    /// the on-disk embedding alike. An expert's slot is its three slices
    /// each rounded out to 4 KiB, as the engine caches them, and the
    /// memory plan has the engine's slots for the file.
    #[test]
    fn a_gguf_is_planned_as_the_vault_it_converts_to() {
        let d = tempfile::tempdir().unwrap();
        let mut cases: Vec<(String, crate::gguf::write::Builder)> = FAMILIES
            .iter()
            .map(|n| (n.to_string(), from_fixture(n, GgmlType::Q8_0).1))
            .collect();
        // Q4_K experts with Q6_K parts, as Q4_K_M mixes them.
        cases.push(("wide-q4_k".into(), wide_qwen3(GgmlType::Q4K)));
        cases.push(("wide-q6_k".into(), wide_qwen3(GgmlType::Q6K)));
        for (name, b) in cases {
            let path = write(d.path(), &format!("{name}.gguf"), &b.build());
            let vault = d.path().join(format!("{name}-vault"));
            convert::convert(&path, &vault, None, &mut |_| {}).unwrap();
            let g = Gguf::open(&path).unwrap();
            let planned = Sizes::of_gguf(&g).unwrap();
            let converted = Sizes::of_vault(&Vault::open(&vault).unwrap()).unwrap();
            assert_eq!(planned.source, "gguf");
            assert!(planned.records > 0 && planned.lm_head_bytes > 0, "{name}");
            assert_eq!(stored(planned.clone()), stored(converted), "{name}");

            let cfg = crate::gguf::config::model_config(&g).unwrap();
            let layers = expert_tensors(&g, &cfg).unwrap();
            let slot = layers[0].slot_bytes();
            assert_eq!(planned.record_bytes, slot, "{name}");
            assert_eq!(planned.expert_bytes(), planned.records * slot, "{name}");
            let opts = crate::load::LoadOptions::default();
            let engine = Footprint::of_gguf(&g, &cfg, &opts).unwrap();
            let budget = super::super::share(&planned, 0.5);
            let ram = 64 << 30;
            let want = engine.plan(budget, Some(ram)).unwrap();
            let got = super::super::memory_plan(&planned, ram, budget, opts.ctx, 1).unwrap();
            assert_eq!(
                (got.slot_bytes, got.cache_slots, got.cache_bytes),
                (want.slot_bytes, want.cache_slots, want.cache_bytes),
                "{name}"
            );
            assert!(got.cache_slots > 0 && got.cache_slots < planned.records as usize);
        }
    }

    /// The first shard of a split set (or any shard) is planned as the
    /// whole file, through the same entry `smoe plan` takes.
    #[test]
    fn a_split_gguf_is_planned_from_its_first_shard() {
        let d = tempfile::tempdir().unwrap();
        let (_, b) = from_fixture("qwen3-moe-a", GgmlType::Q8_0);
        let whole = write(d.path(), "whole.gguf", &b.build());
        let shards = write_split(d.path(), "m", &b, 3);
        let q4 = DType::parse("q4_k").unwrap();
        let want = format!("{:?}", super::super::sizes_of(&whole, q4, q4).unwrap());
        for s in &shards {
            let got = format!("{:?}", super::super::sizes_of(s, q4, q4).unwrap());
            assert_eq!(got, want, "{}", s.display());
        }
    }

    /// A GGUF with a type smoe has no kernels for is refused by `plan` as
    /// by `run`: one error naming the file, the tensor and the type.
    #[test]
    fn a_gguf_smoe_cannot_run_is_named() {
        let d = tempfile::tempdir().unwrap();
        let (_, b) = from_fixture("qwen3-moe-a", GgmlType::Q8_0);
        let q4 = DType::parse("q4_k").unwrap();
        for name in ["blk.1.attn_q.weight", "blk.2.ffn_down_exps.weight"] {
            let path = write(
                d.path(),
                "bad.gguf",
                &b.with_tensor_type(name, GgmlType::Q8_1).build(),
            );
            let err = super::super::sizes_of(&path, q4, q4)
                .unwrap_err()
                .to_string();
            for part in ["bad.gguf", name, "Q8_1"] {
                assert!(err.contains(part), "{part} not in {err}");
            }
        }
    }

    /// `--measure` on a GGUF times direct reads of its own expert slices:
    /// each read starts at an expert's gate slice rounded down to 4 KiB and
    /// stays inside the shard that holds it.
    #[test]
    fn measure_reads_a_ggufs_own_expert_slices() {
        let d = tempfile::tempdir().unwrap();
        let (_, b) = from_fixture("olmoe", GgmlType::Q8_0);
        let shards = write_split(d.path(), "o", &b, 2);
        let g = Gguf::open(&shards[0]).unwrap();
        let len = Sizes::of_gguf(&g).unwrap().record_bytes;
        let (file, offsets) = gguf_records(&g, len).unwrap();
        let cfg = crate::gguf::config::model_config(&g).unwrap();
        let gates: Vec<u64> = expert_tensors(&g, &cfg)
            .unwrap()
            .iter()
            .filter(|l| g.shards()[l.parts[0].shard].path() == file.path)
            .flat_map(|l| {
                let p = l.parts[0];
                (0..l.experts as u64).map(move |e| p.offset + e * p.len)
            })
            .collect();
        let size = std::fs::metadata(&file.path).unwrap().len();
        assert!(!offsets.is_empty());
        for at in offsets.iter().flatten() {
            assert!(at % ALIGN == 0 && at + len <= size, "{at}");
            assert!(gates.iter().any(|g| (*at..at + ALIGN).contains(g)), "{at}");
        }
        let reads = super::super::probe_reads(file, &offsets, len as usize).unwrap();
        assert_eq!(reads.len(), super::super::BATCHES.len());
        assert!(reads.iter().all(|&(n, s)| n > 0 && s > 0.0), "{reads:?}");
    }
}
