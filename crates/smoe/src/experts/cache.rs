//! The expert cache: a fixed number of slots in one aligned allocation, each
//! holding one expert record read straight from experts.bin.
//!
//! A layer asks for the experts its router picked; those already resident
//! are hits, the rest are misses read together through the reader pool.
//! Slots in use by the computing layer are pinned so eviction never takes
//! them; among the unpinned, the least recently used is evicted. Eviction
//! scans the slot table: at a few thousand slots that is microseconds,
//! against milliseconds for the read it precedes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::io::{AlignedBuf, Batch, DirectFile, ReadJob, ReaderPool};
use super::Stats;
use crate::error::{Error, Result};
use crate::kernels::{DType, Matrix};
use crate::vault::{ExpertLayer, Vault};

/// Where each part of a record lies, per layer.
#[derive(Debug, Clone)]
struct LayerLayout {
    parts: [(DType, usize, usize, usize, usize); 3], // dtype, rows, cols, offset, len
    record_len: usize,
    offsets: Vec<u64>,
    crc32: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: Option<(usize, u32)>,
    last_used: u64,
    pins: u32,
}

#[derive(Debug)]
struct State {
    map: HashMap<(usize, u32), usize>,
    slots: Vec<Slot>,
    tick: u64,
}

pub struct ExpertCache {
    file: Arc<DirectFile>,
    layers: HashMap<usize, LayerLayout>,
    slot_len: usize,
    memory: Arc<AlignedBuf>,
    state: Mutex<State>,
    reader: ReaderPool,
    verify: bool,
    pub stats: Stats,
}

/// Experts of one layer made resident and pinned; unpinned on drop.
pub struct Pinned<'a> {
    cache: &'a ExpertCache,
    layer: usize,
    /// (expert, slot) in the order asked.
    slots: Vec<(u32, usize)>,
}

impl ExpertCache {
    /// A cache of `slots` slots over the vault's experts file.
    pub fn new(vault: &Vault, slots: usize, read_threads: usize, verify: bool) -> Result<Self> {
        let path = vault.experts_path();
        let file = Arc::new(DirectFile::open(&path)?);
        let manifest = vault.dir.join(crate::vault::MANIFEST);
        let mut layers = HashMap::new();
        let mut slot_len = 0;
        for l in &vault.manifest.experts {
            layers.insert(l.layer, layout(l, &manifest)?);
            slot_len = slot_len.max(l.record_len as usize);
        }
        if slots == 0 || slot_len == 0 {
            return Err(Error::invalid("the expert cache needs at least one slot"));
        }
        Ok(Self {
            file,
            layers,
            slot_len,
            memory: Arc::new(AlignedBuf::new(slots * slot_len)),
            state: Mutex::new(State {
                map: HashMap::new(),
                slots: vec![
                    Slot {
                        key: None,
                        last_used: 0,
                        pins: 0
                    };
                    slots
                ],
                tick: 0,
            }),
            reader: ReaderPool::new(read_threads),
            verify,
            stats: Stats::default(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_len
    }

    pub fn direct_io(&self) -> bool {
        self.file.direct
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `experts` of `layer` resident and pins them. At most
    /// [`capacity`](Self::capacity) experts at once.
    pub fn fetch(&self, layer: usize, experts: &[u32]) -> Result<Pinned<'_>> {
        let lay = self
            .layers
            .get(&layer)
            .ok_or_else(|| Error::invalid(format!("layer {layer} has no experts in the vault")))?;
        let mut st = self.lock();
        if experts.len() > st.slots.len() {
            return Err(Error::invalid(format!(
                "{} experts requested at once but the cache has {} slots",
                experts.len(),
                st.slots.len()
            )));
        }
        let mut slots = Vec::with_capacity(experts.len());
        let mut misses = Vec::new();
        for &e in experts {
            if e as usize >= lay.offsets.len() {
                return Err(Error::invalid(format!("layer {layer} has no expert {e}")));
            }
            st.tick += 1;
            let tick = st.tick;
            if let Some(&s) = st.map.get(&(layer, e)) {
                st.slots[s].pins += 1;
                st.slots[s].last_used = tick;
                slots.push((e, s));
                continue;
            }
            // Least recently used unpinned slot; empty slots have tick 0.
            let victim = (0..st.slots.len())
                .filter(|&s| st.slots[s].pins == 0)
                .min_by_key(|&s| st.slots[s].last_used)
                .ok_or_else(|| Error::invalid("every cache slot is pinned"))?;
            if let Some(old) = st.slots[victim].key.take() {
                st.map.remove(&old);
            }
            st.slots[victim] = Slot {
                key: Some((layer, e)),
                last_used: tick,
                pins: 1,
            };
            st.map.insert((layer, e), victim);
            slots.push((e, victim));
            misses.push((e, victim));
        }
        drop(st);
        let pinned = Pinned {
            cache: self,
            layer,
            slots,
        };
        let hits = experts.len() - misses.len();
        self.stats.add_hits(hits as u64);
        if !misses.is_empty() {
            self.read(layer, lay, &misses)?;
        }
        Ok(pinned)
    }

    fn read(&self, layer: usize, lay: &LayerLayout, misses: &[(u32, usize)]) -> Result<()> {
        let start = Instant::now();
        let batch = Batch::new(misses.len());
        for (i, &(e, slot)) in misses.iter().enumerate() {
            self.reader.submit(ReadJob {
                file: Arc::clone(&self.file),
                offset: lay.offsets[e as usize],
                dst: Arc::clone(&self.memory),
                dst_start: slot * self.slot_len,
                len: lay.record_len,
                tag: i,
                batch: Arc::clone(&batch),
            });
        }
        let (errors, busy) = batch.wait();
        let blocked = start.elapsed().as_secs_f64();
        let bytes = (misses.len() * lay.record_len) as u64;
        self.stats
            .add_misses(misses.len() as u64, bytes, busy, blocked);
        let mut failure = errors.into_iter().next().map(|(i, e)| {
            Error::format(
                &self.file.path,
                format!("reading layer {layer} expert {}: {e}", misses[i].0),
            )
        });
        if failure.is_none() && self.verify {
            for &(e, slot) in misses {
                // SAFETY: the slot is pinned by us and its read completed.
                let data = unsafe { self.memory.slice(slot * self.slot_len, lay.record_len) };
                if crc32fast::hash(data) != lay.crc32[e as usize] {
                    failure = Some(Error::format(
                        &self.file.path,
                        format!("layer {layer} expert {e}: checksum mismatch (corrupt record); run smoe verify"),
                    ));
                    break;
                }
            }
        }
        if let Some(err) = failure {
            // Forget the failed loads so a retry reads them again.
            let mut st = self.lock();
            for &(e, slot) in misses {
                st.map.remove(&(layer, e));
                st.slots[slot].key = None;
            }
            return Err(err);
        }
        Ok(())
    }
}

impl Pinned<'_> {
    /// (expert id, [gate, up, down]) for each pinned expert, in the order
    /// asked.
    pub fn experts(&self) -> impl Iterator<Item = (u32, [Matrix<'_>; 3])> + '_ {
        let lay = &self.cache.layers[&self.layer];
        self.slots.iter().map(move |&(e, slot)| {
            let base = slot * self.cache.slot_len;
            let mats = lay.parts.map(|(dtype, rows, cols, off, len)| {
                // SAFETY: the slot is pinned (not rewritten) and fully read.
                let data = unsafe { self.cache.memory.slice(base + off, len) };
                Matrix::new(dtype, data, rows, cols)
            });
            (e, mats)
        })
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let mut st = self.cache.lock();
        for &(_, s) in &self.slots {
            st.slots[s].pins = st.slots[s].pins.saturating_sub(1);
        }
    }
}

fn layout(l: &ExpertLayer, manifest: &std::path::Path) -> Result<LayerLayout> {
    let mut parts = [(DType::BF16, 0, 0, 0, 0); 3];
    for (p, out) in l.parts.iter().zip(parts.iter_mut()) {
        let dtype = DType::parse(&p.dtype).ok_or_else(|| {
            Error::format(
                manifest,
                format!("layer {}: unknown dtype {}", l.layer, p.dtype),
            )
        })?;
        *out = (
            dtype,
            p.shape[0],
            p.shape[1],
            p.offset as usize,
            p.len as usize,
        );
    }
    Ok(LayerLayout {
        parts,
        record_len: l.record_len as usize,
        offsets: l.offsets.clone(),
        crc32: l.crc32.clone(),
    })
}
