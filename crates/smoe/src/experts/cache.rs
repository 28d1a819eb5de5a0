//! The expert cache: a fixed number of slots in one aligned allocation, each
//! holding one expert record read straight from experts.bin.
//!
//! A layer asks for the experts its router picked ([`ExpertCache::fetch`]):
//! resident ones are hits, the rest are read together through the reader
//! pool and the compute thread waits for exactly those. Before that, the
//! model may [`prefetch`](ExpertCache::prefetch) the experts it predicts for
//! the next layer: they are read at low priority into free slots while the
//! current layer computes, and protected from eviction until their layer
//! asks. Slots a layer computes on are pinned. Among the rest, the policy
//! picks the victim: least recently used, or least frequently used with
//! decay. Eviction scans the slot table: at a few thousand slots that is
//! microseconds, against milliseconds for the read it precedes.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use smallvec::smallvec;

use super::io::{AlignedBuf, DirectFile, Priority, ReadJob, ReaderPool, Segment};
use super::Stats;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{expert_tensors, ExpertTensors, Gguf};
use crate::kernels::Matrix;
use crate::quant::DType;
use crate::vault::{align_up, ExpertLayer, Vault, ALIGN};

/// Expert requests after which a past use keeps half its weight (LFU): about
/// ten tokens of Qwen3-30B-A3B (48 layers x 8 experts a token), long enough
/// to see which experts are hot, short enough to follow a change of topic.
pub const LFU_HALF_LIFE: f64 = 4096.0;

/// Which unpinned, unprotected slot gives way to a new expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Least recently used.
    Lru,
    /// Least frequently used, each use's weight halving every `half_life`
    /// expert requests, so yesterday's favourites fade.
    Lfu { half_life: f64 },
}

impl Policy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lru" => Some(Policy::Lru),
            "lfu" => Some(Policy::Lfu {
                half_life: LFU_HALF_LIFE,
            }),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::Lfu { .. } => "lfu",
        }
    }
}

/// When the next layer's predicted experts are read ahead.
///
/// A prompt chunk computes each layer for a long while after its reads
/// (hundreds of milliseconds for 512 tokens) with the disk idle, so
/// reading the next layer's guesses then delays no demand read: on the
/// 8-layer bench vault at a quarter of the experts `Prompts` took time to
/// first token from 2.5 to 1.8 s. But the guesses take slots that LFU
/// would have kept for decoding (decode after it 0-12% slower at 25-50%),
/// and while decoding a wrong guess also takes bandwidth from the misses a
/// layer waits for (`On`: decode 8-18% slower at 74% recall). So the
/// default is `Off`; `Prompts` is for long prompts and short answers
/// (README, "Read-ahead, cache policy and grouped prefill").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAhead {
    Off,
    /// While a prompt is processed, not while decoding.
    Prompts,
    /// Always.
    On,
}

impl ReadAhead {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(ReadAhead::Off),
            "prompts" => Some(ReadAhead::Prompts),
            "on" => Some(ReadAhead::On),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ReadAhead::Off => "off",
            ReadAhead::Prompts => "prompts",
            ReadAhead::On => "on",
        }
    }

    /// Whether a forward pass reads ahead; `prompt` when it processes
    /// prompt tokens.
    pub fn reads(self, prompt: bool) -> bool {
        match self {
            ReadAhead::Off => false,
            ReadAhead::Prompts => prompt,
            ReadAhead::On => true,
        }
    }
}

/// One part (gate, up or down) of a layer's experts: its type and shape,
/// where its region starts in a slot, and its bytes.
#[derive(Debug, Clone, Copy)]
struct Part {
    dtype: DType,
    rows: usize,
    cols: usize,
    slot_offset: usize,
    len: usize,
}

/// Where a layer's experts are on disk.
#[derive(Debug, Clone)]
enum Reads {
    /// A vault: expert `e` is one record at `offsets[e]` of the one file,
    /// its parts at fixed places inside it.
    Record { offsets: Vec<u64>, crc32: Vec<u32> },
    /// A GGUF: part `p` of expert `e` is `len` bytes at `base[p] + e * len`
    /// of file `files[p]`, read rounded out to [`ALIGN`] into the part's
    /// region, so where the bytes start in it depends on the expert.
    Extents {
        files: [usize; 3],
        base: [u64; 3],
        experts: usize,
    },
}

/// Where each part of an expert lies, per layer.
#[derive(Debug, Clone)]
struct LayerLayout {
    parts: [Part; 3],
    /// Bytes of a slot this layer's experts use.
    record_len: usize,
    reads: Reads,
}

impl LayerLayout {
    fn experts(&self) -> usize {
        match &self.reads {
            Reads::Record { offsets, .. } => offsets.len(),
            Reads::Extents { experts, .. } => *experts,
        }
    }

    /// Where part `p` of expert `e` starts, from its slot's start.
    fn part_offset(&self, p: usize, e: u32) -> usize {
        let part = &self.parts[p];
        match &self.reads {
            Reads::Record { .. } => part.slot_offset,
            Reads::Extents { base, .. } => {
                let at = base[p] + e as u64 * part.len as u64;
                part.slot_offset + (at % ALIGN) as usize
            }
        }
    }

    /// A GGUF layer: each part's region holds its extent rounded out.
    fn of_gguf(t: &ExpertTensors) -> Self {
        let mut slot_offset = 0;
        let parts = t.parts.map(|p| {
            let part = Part {
                dtype: p.dtype,
                rows: p.shape[0],
                cols: p.shape[1],
                slot_offset,
                len: p.len as usize,
            };
            slot_offset += (align_up(p.len) + ALIGN) as usize;
            part
        });
        Self {
            parts,
            record_len: t.slot_bytes() as usize,
            reads: Reads::Extents {
                files: t.parts.map(|p| p.shard),
                base: t.parts.map(|p| p.offset),
                experts: t.experts,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    Empty,
    /// A read is queued or in flight.
    Loading,
    Ready,
    /// The read failed; the message is kept in `State::failures`.
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: Option<(usize, u32)>,
    fill: Fill,
    /// Layers computing on the slot right now.
    pins: u32,
    /// Predicted for a layer that has not run yet.
    protected: bool,
    /// Loaded by a prefetch and not yet asked for.
    prefetched: bool,
    last_used: u64,
    /// Decayed use count at `last_used` (LFU).
    freq: f64,
}

#[derive(Debug)]
struct State {
    map: HashMap<(usize, u32), usize>,
    slots: Vec<Slot>,
    tick: u64,
    failures: HashMap<usize, String>,
    /// Predicted experts per layer, for recall and precision.
    predicted: HashMap<usize, Vec<u32>>,
    /// Slot lists of released [`Pinned`]s and the read list of the last
    /// request, kept for the next one so that decode allocates nothing but
    /// each read's completion.
    spare_pins: Vec<Vec<(u32, usize)>>,
    spare_jobs: Vec<ReadJob>,
}

struct Inner {
    /// The vault's experts file, or a GGUF's shards.
    files: Vec<Arc<DirectFile>>,
    layers: HashMap<usize, LayerLayout>,
    slot_len: usize,
    memory: Arc<AlignedBuf>,
    state: Mutex<State>,
    /// Signalled whenever a read completes.
    loaded: Condvar,
    verify: bool,
    policy: Policy,
    stats: Stats,
}

pub struct ExpertCache {
    inner: Arc<Inner>,
    reader: ReaderPool,
    read_ahead: ReadAhead,
}

/// Experts of one layer made resident and pinned; unpinned on drop.
pub struct Pinned<'a> {
    cache: &'a ExpertCache,
    layer: usize,
    /// (expert, slot) in the order asked.
    slots: Vec<(u32, usize)>,
    /// Hits, prefetch hits and misses of the request, counted once waited.
    counts: Option<(u64, u64, u64)>,
}

impl ExpertCache {
    /// A cache of `slots` slots over the vault's experts file.
    pub fn new(
        vault: &Vault,
        slots: usize,
        read_threads: usize,
        verify: bool,
        policy: Policy,
        read_ahead: ReadAhead,
    ) -> Result<Self> {
        let path = vault.experts_path();
        let file = Arc::new(DirectFile::open(&path)?);
        let manifest = vault.dir.join(crate::vault::MANIFEST);
        let mut layers = HashMap::new();
        for l in &vault.manifest.experts {
            layers.insert(l.layer, layout(l, &manifest)?);
        }
        let files = vec![file];
        Self::build(
            files,
            layers,
            slots,
            read_threads,
            verify,
            policy,
            read_ahead,
        )
    }

    /// A cache of `slots` slots over a GGUF's experts tensors, read in
    /// place: no checksums, so `verify` has nothing to check.
    pub fn from_gguf(
        g: &Gguf,
        cfg: &ModelConfig,
        slots: usize,
        read_threads: usize,
        policy: Policy,
        read_ahead: ReadAhead,
    ) -> Result<Self> {
        let files = g
            .shards()
            .iter()
            .map(|s| DirectFile::open(s.path()).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let layers = expert_tensors(g, cfg)?
            .iter()
            .map(|t| (t.layer, LayerLayout::of_gguf(t)))
            .collect();
        Self::build(
            files,
            layers,
            slots,
            read_threads,
            false,
            policy,
            read_ahead,
        )
    }

    fn build(
        files: Vec<Arc<DirectFile>>,
        layers: HashMap<usize, LayerLayout>,
        slots: usize,
        read_threads: usize,
        verify: bool,
        policy: Policy,
        read_ahead: ReadAhead,
    ) -> Result<Self> {
        let slot_len = layers.values().map(|l| l.record_len).max().unwrap_or(0);
        if slots == 0 || slot_len == 0 {
            return Err(Error::invalid("the expert cache needs at least one slot"));
        }
        let empty = Slot {
            key: None,
            fill: Fill::Empty,
            pins: 0,
            protected: false,
            prefetched: false,
            last_used: 0,
            freq: 0.0,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                files,
                layers,
                slot_len,
                memory: Arc::new(AlignedBuf::new(slots * slot_len)),
                state: Mutex::new(State {
                    map: HashMap::new(),
                    slots: vec![empty; slots],
                    tick: 0,
                    failures: HashMap::new(),
                    predicted: HashMap::new(),
                    spare_pins: Vec::new(),
                    spare_jobs: Vec::new(),
                }),
                loaded: Condvar::new(),
                verify,
                policy,
                stats: Stats::default(),
            }),
            reader: ReaderPool::new(read_threads),
            read_ahead,
        })
    }

    /// When predictions are read ahead (else only scored).
    pub fn read_ahead(&self) -> ReadAhead {
        self.read_ahead
    }

    pub fn capacity(&self) -> usize {
        self.inner.lock().slots.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.inner.slot_len
    }

    /// The slots' one allocation, for a GPU backend to page-lock: copies
    /// from locked memory run at full PCIe speed. Whoever copies from a
    /// slot must finish before releasing its [`Pinned`].
    pub fn memory(&self) -> &Arc<AlignedBuf> {
        &self.inner.memory
    }

    pub fn direct_io(&self) -> bool {
        self.inner.files.iter().all(|f| f.direct)
    }

    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The vault's experts file (a GGUF's first shard), for tools that
    /// measure the device with the engine's own reader.
    pub fn file(&self) -> &Arc<DirectFile> {
        &self.inner.files[0]
    }

    /// Records the predicted `experts` of `layer` (most likely first) for
    /// recall and precision and, where [`ReadAhead`] says so for this pass
    /// (`prompt`: it processes prompt tokens), reads the missing ones into
    /// free slots at low priority and protects them until `layer` runs.
    /// Never waits, never evicts a pinned or protected slot, and drops the
    /// tail of the list when no slot is free.
    pub fn prefetch(&self, layer: usize, experts: &[u32], prompt: bool) {
        let Some(lay) = self.inner.layers.get(&layer) else {
            return;
        };
        let mut st = self.inner.lock();
        // Reuse the layer's list: the decode loop allocates nothing.
        let pred = st.predicted.entry(layer).or_default();
        pred.clear();
        pred.extend_from_slice(experts);
        if !self.read_ahead.reads(prompt) {
            return;
        }
        let mut jobs = std::mem::take(&mut st.spare_jobs);
        for &e in experts {
            if e as usize >= lay.experts() {
                continue;
            }
            if let Some(&s) = st.map.get(&(layer, e)) {
                st.slots[s].protected = true;
                continue;
            }
            let Some(victim) = self.inner.victim(&st, false) else {
                break;
            };
            self.inner.assign(&mut st, victim, (layer, e));
            st.slots[victim].protected = true;
            st.slots[victim].prefetched = true;
            jobs.push(self.job(layer, lay, e, victim, Priority::Prefetch));
        }
        drop(st);
        self.inner
            .stats
            .add_prefetches(jobs.len() as u64, (jobs.len() * lay.record_len) as u64);
        for job in jobs.drain(..) {
            self.reader.submit(job);
        }
        self.inner.lock().spare_jobs = jobs;
    }

    /// Pins those of `experts` of `layer` that are resident now, in the
    /// order asked, without reading the others or counting anything: for
    /// copying a layer's likely experts to a GPU while the layer before it
    /// runs. The layer's own request pins and counts them as it always
    /// does.
    pub fn pin_resident(&self, layer: usize, experts: &[u32]) -> Pinned<'_> {
        let mut st = self.inner.lock();
        let mut slots = st.spare_pins.pop().unwrap_or_default();
        slots.clear();
        for &e in experts {
            if let Some(&s) = st.map.get(&(layer, e)) {
                if st.slots[s].fill == Fill::Ready {
                    st.slots[s].pins += 1;
                    slots.push((e, s));
                }
            }
        }
        drop(st);
        Pinned {
            cache: self,
            layer,
            slots,
            counts: None,
        }
    }

    /// Makes `experts` of `layer` resident and pins them. At most
    /// [`capacity`](Self::capacity) experts at once.
    pub fn fetch(&self, layer: usize, experts: &[u32]) -> Result<Pinned<'_>> {
        let mut pinned = self.request(layer, experts)?;
        pinned.wait()?;
        Ok(pinned)
    }

    /// Pins `experts` of `layer` and starts reading the missing ones, without
    /// waiting: the caller can queue prefetches behind these demand reads,
    /// then [`Pinned::wait`].
    pub fn request(&self, layer: usize, experts: &[u32]) -> Result<Pinned<'_>> {
        let lay =
            self.inner.layers.get(&layer).ok_or_else(|| {
                Error::invalid(format!("layer {layer} has no experts in the vault"))
            })?;
        // Prefetches for this layer that are still queued were guesses the
        // router just refuted: drop them before they take a reader.
        for job in self
            .reader
            .cancel_prefetches(|(l, e)| l == layer && !experts.contains(&e))
        {
            let mut st = self.inner.lock();
            if let Some(&s) = st.map.get(&job.key) {
                st.map.remove(&job.key);
                st.slots[s] = Slot {
                    key: None,
                    fill: Fill::Empty,
                    protected: false,
                    prefetched: false,
                    ..st.slots[s]
                };
            }
            self.inner.stats.cancel_prefetch(lay.record_len as u64);
        }
        let mut st = self.inner.lock();
        if experts.len() > st.slots.len() {
            return Err(Error::invalid(format!(
                "{} experts requested at once but the cache has {} slots",
                experts.len(),
                st.slots.len()
            )));
        }
        if let Some(pred) = st.predicted.get_mut(&layer).filter(|p| !p.is_empty()) {
            let hit = pred.iter().filter(|e| experts.contains(e)).count();
            self.inner
                .stats
                .add_prediction(pred.len() as u64, hit as u64, experts.len() as u64);
            pred.clear();
        }
        // This layer's predictions are being consumed now.
        for s in st
            .slots
            .iter_mut()
            .filter(|s| s.key.is_some_and(|k| k.0 == layer))
        {
            s.protected = false;
        }
        let mut slots = st.spare_pins.pop().unwrap_or_default();
        slots.clear();
        let mut jobs = std::mem::take(&mut st.spare_jobs);
        let (mut hits, mut prefetch_hits) = (0u64, 0u64);
        for &e in experts {
            if e as usize >= lay.experts() {
                return Err(Error::invalid(format!("layer {layer} has no expert {e}")));
            }
            if let Some(&s) = st.map.get(&(layer, e)) {
                if st.slots[s].fill == Fill::Failed {
                    // A failed prefetch: forget it and read on demand.
                    st.map.remove(&(layer, e));
                    st.failures.remove(&s);
                    st.slots[s].key = None;
                    st.slots[s].fill = Fill::Empty;
                }
            }
            if let Some(&s) = st.map.get(&(layer, e)) {
                if st.slots[s].prefetched {
                    prefetch_hits += 1;
                    st.slots[s].prefetched = false;
                } else {
                    hits += 1;
                }
                self.inner.touch(&mut st, s);
                st.slots[s].pins += 1;
                slots.push((e, s));
                continue;
            }
            // Demand beats prediction: a protected slot may go if nothing
            // else can, and a slot still loading a guess is waited for.
            let victim = loop {
                if let Some(v) = self
                    .inner
                    .victim(&st, false)
                    .or_else(|| self.inner.victim(&st, true))
                {
                    break v;
                }
                if !st
                    .slots
                    .iter()
                    .any(|s| s.fill == Fill::Loading && s.pins == 0)
                {
                    return Err(Error::invalid("every cache slot is pinned"));
                }
                st = self
                    .inner
                    .loaded
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            };
            self.inner.assign(&mut st, victim, (layer, e));
            self.inner.touch(&mut st, victim);
            st.slots[victim].pins += 1;
            slots.push((e, victim));
            jobs.push(self.job(layer, lay, e, victim, Priority::Demand));
        }
        drop(st);
        let misses = jobs.len() as u64;
        for job in jobs.drain(..) {
            self.reader.submit(job);
        }
        self.inner.lock().spare_jobs = jobs;
        Ok(Pinned {
            cache: self,
            layer,
            slots,
            counts: Some((hits, prefetch_hits, misses)),
        })
    }

    fn job(
        &self,
        layer: usize,
        lay: &LayerLayout,
        e: u32,
        slot: usize,
        priority: Priority,
    ) -> ReadJob {
        let inner = Arc::clone(&self.inner);
        let len = lay.record_len;
        let start = slot * self.inner.slot_len;
        let (reads, crc) = match &lay.reads {
            Reads::Record { offsets, crc32 } => (
                smallvec![Segment {
                    file: Arc::clone(&self.inner.files[0]),
                    offset: offsets[e as usize],
                    dst_start: start,
                    len,
                    need: len,
                }],
                Some(crc32[e as usize]),
            ),
            Reads::Extents { files, base, .. } => {
                let reads = (0..3)
                    .map(|p| {
                        let part = &lay.parts[p];
                        let at = base[p] + e as u64 * part.len as u64;
                        let first = at / ALIGN * ALIGN;
                        let end = align_up(at + part.len as u64);
                        Segment {
                            file: Arc::clone(&self.inner.files[files[p]]),
                            offset: first,
                            dst_start: start + part.slot_offset,
                            len: (end - first) as usize,
                            need: (at - first) as usize + part.len,
                        }
                    })
                    .collect();
                (reads, None)
            }
        };
        ReadJob {
            reads,
            dst: Arc::clone(&self.inner.memory),
            priority,
            key: (layer, e),
            done: Box::new(move |result, secs| inner.complete(slot, result, secs, len, crc)),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot to reuse: never pinned or loading; protected ones only when
    /// `take_protected`.
    fn victim(&self, st: &State, take_protected: bool) -> Option<usize> {
        let now = st.tick;
        let score = |s: &Slot| match self.policy {
            Policy::Lru => s.last_used as f64,
            Policy::Lfu { half_life } => {
                s.freq * 0.5f64.powf((now - s.last_used) as f64 / half_life)
            }
        };
        (0..st.slots.len())
            .filter(|&i| {
                let s = &st.slots[i];
                s.pins == 0 && s.fill != Fill::Loading && (take_protected || !s.protected)
            })
            .min_by(|&a, &b| {
                // Empty slots first, then the policy's least valuable.
                let (sa, sb) = (&st.slots[a], &st.slots[b]);
                (sa.key.is_some(), score(sa))
                    .partial_cmp(&(sb.key.is_some(), score(sb)))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
    }

    /// Gives `slot` to `key`, not yet used: a guess read ahead counts as a
    /// use only when its layer asks for it (else every read-ahead expert
    /// counted twice, and LFU kept guesses over the experts decoding uses).
    fn assign(&self, st: &mut State, slot: usize, key: (usize, u32)) {
        if let Some(old) = st.slots[slot].key.take() {
            st.map.remove(&old);
            if st.slots[slot].prefetched {
                self.stats.waste_prefetch();
            }
        }
        st.failures.remove(&slot);
        st.map.insert(key, slot);
        st.slots[slot] = Slot {
            key: Some(key),
            fill: Fill::Loading,
            pins: 0,
            protected: false,
            prefetched: false,
            last_used: 0,
            freq: 0.0,
        };
    }

    fn touch(&self, st: &mut State, slot: usize) {
        st.tick += 1;
        let now = st.tick;
        let s = &mut st.slots[slot];
        if let Policy::Lfu { half_life } = self.policy {
            s.freq = s.freq * 0.5f64.powf((now - s.last_used) as f64 / half_life) + 1.0;
        }
        s.last_used = now;
    }

    /// Called by a reader thread when a record has arrived (or failed).
    fn complete(
        &self,
        slot: usize,
        result: std::io::Result<()>,
        secs: f64,
        len: usize,
        crc: Option<u32>,
    ) {
        // A GGUF has no record checksums (crc is None): nothing to verify.
        let check = crc.filter(|_| self.verify);
        let outcome = match (result, check) {
            (Err(e), _) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(format!(
                "the file ends inside this record ({len} bytes): it was truncated after loading; run smoe verify"
            )),
            (Err(e), _) => Err(e.to_string()),
            (Ok(()), Some(crc)) => {
                // SAFETY: the slot is Loading: only this job writes it and
                // nobody reads it until it is marked Ready below.
                let data = unsafe { self.memory.slice(slot * self.slot_len, len) };
                match crc32fast::hash(data) {
                    found if found == crc => Ok(()),
                    found => Err(format!(
                        "checksum mismatch: CRC32 {found:08x}, the manifest says {crc:08x} (corrupt record); run smoe verify"
                    )),
                }
            }
            (Ok(()), None) => Ok(()),
        };
        self.stats.add_read_time(secs);
        let mut st = self.lock();
        match outcome {
            Ok(()) => st.slots[slot].fill = Fill::Ready,
            Err(msg) => {
                st.slots[slot].fill = Fill::Failed;
                st.failures.insert(slot, msg);
            }
        }
        drop(st);
        self.loaded.notify_all();
    }
}

impl Pinned<'_> {
    /// Blocks until every pinned expert is resident; counts the wait.
    pub fn wait(&mut self) -> Result<()> {
        let inner = &self.cache.inner;
        let lay = &inner.layers[&self.layer];
        let layer = self.layer;
        let start = Instant::now();
        let _awake = crate::kernels::stay_awake();
        let mut st = inner.lock();
        let mut waited = false;
        while self
            .slots
            .iter()
            .any(|&(_, s)| st.slots[s].fill == Fill::Loading)
        {
            waited = true;
            st = inner.loaded.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let blocked = if waited {
            start.elapsed().as_secs_f64()
        } else {
            0.0
        };
        if let Some((hits, prefetch_hits, misses)) = self.counts.take() {
            inner.stats.add_demand(
                hits,
                prefetch_hits,
                misses,
                misses * lay.record_len as u64,
                blocked,
            );
        }
        let failed: Vec<(u32, usize)> = self
            .slots
            .iter()
            .copied()
            .filter(|&(_, s)| st.slots[s].fill == Fill::Failed)
            .collect();
        if let Some(&(e, s)) = failed.first() {
            let why = st.failures.get(&s).cloned().unwrap_or_default();
            // Forget the failed loads so a retry reads them again.
            for &(fe, fs) in &failed {
                st.map.remove(&(layer, fe));
                st.failures.remove(&fs);
                st.slots[fs].key = None;
                st.slots[fs].fill = Fill::Empty;
            }
            return Err(Error::format(
                &inner.files[0].path,
                format!("layer {layer} expert {e}: {why}"),
            ));
        }
        Ok(())
    }

    /// How many experts are pinned.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Reorders the pinned experts so that those already resident (hits,
    /// and reads that have landed) come first, and returns how many they
    /// are: the caller can compute them while the others arrive. Without
    /// waiting; `get(i)` for `i` below the count is safe before [`wait`].
    ///
    /// [`wait`]: Self::wait
    pub(crate) fn resident_first(&mut self) -> usize {
        let st = self.cache.inner.lock();
        let ready = |s: usize| st.slots[s].fill == Fill::Ready;
        // Stable, so each part keeps the order asked.
        self.slots.sort_by_key(|&(_, s)| !ready(s));
        self.slots.iter().take_while(|&&(_, s)| ready(s)).count()
    }

    /// The `i`-th expert asked for: (expert id, [gate, up, down]).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub(crate) fn get(&self, i: usize) -> (u32, [Matrix<'_>; 3]) {
        let inner = &self.cache.inner;
        let lay = &inner.layers[&self.layer];
        let (e, slot) = self.slots[i];
        let base = slot * inner.slot_len;
        let mats = [0, 1, 2].map(|p| {
            let part = &lay.parts[p];
            let off = lay.part_offset(p, e);
            // SAFETY: the slot is pinned (not rewritten) and fully read.
            let data = unsafe { inner.memory.slice(base + off, part.len) };
            Matrix::new(part.dtype, data, part.rows, part.cols)
        });
        (e, mats)
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let mut st = self.cache.inner.lock();
        for &(_, s) in &self.slots {
            st.slots[s].pins = st.slots[s].pins.saturating_sub(1);
        }
        st.spare_pins.push(std::mem::take(&mut self.slots));
    }
}

fn layout(l: &ExpertLayer, manifest: &std::path::Path) -> Result<LayerLayout> {
    let mut parts = [Part {
        dtype: DType::BF16,
        rows: 0,
        cols: 0,
        slot_offset: 0,
        len: 0,
    }; 3];
    for (p, out) in l.parts.iter().zip(parts.iter_mut()) {
        let dtype = DType::parse(&p.dtype).ok_or_else(|| {
            Error::format(
                manifest,
                format!("layer {}: unknown dtype {}", l.layer, p.dtype),
            )
        })?;
        *out = Part {
            dtype,
            rows: p.shape[0],
            cols: p.shape[1],
            slot_offset: p.offset as usize,
            len: p.len as usize,
        };
    }
    Ok(LayerLayout {
        parts,
        record_len: l.record_len as usize,
        reads: Reads::Record {
            offsets: l.offsets.clone(),
            crc32: l.crc32.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::engine::Engine;
    use crate::model::{Budget, LoadOptions, Logits};
    use crate::quant::DType;
    use crate::vault::convert::{convert, ConvertOptions};
    use crate::vault::io::faults::Fault;
    use crate::vault::ALIGN;

    const IDS: [u32; 6] = [50, 375, 289, 7, 400, 12];

    /// The fixture as a q8_0 vault in `dir`, loaded with a third of its
    /// experts' room, so that each forward pass reads experts from disk.
    fn streamed(dir: &Path) -> Engine {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-moe-a");
        let vault = dir.join("vault");
        let q8 = DType::parse("q8_0").unwrap();
        let opts = ConvertOptions {
            experts: q8,
            backbone: q8,
            allow_lossy: false,
            stop_after_layers: None,
        };
        convert(&src, &vault, &opts, &mut |_| {}).unwrap();
        let load = LoadOptions {
            ram_budget: Budget::Bytes(64 << 10),
            read_threads: 2,
            ..LoadOptions::default()
        };
        Engine::load_with(&vault, &load).unwrap()
    }

    fn logits(engine: &Engine) -> crate::Result<Vec<f32>> {
        let mut session = engine.new_session();
        let out = engine.model().forward(&IDS, &mut session, Logits::Last)?;
        Ok(out.to_vec())
    }

    /// A disk that fails (EIO) or ends early under the expert reads fails
    /// the forward pass that needed them, with the file, layer and expert
    /// named; nothing is left pinned or poisoned, so once the disk heals
    /// the same pass gives the same logits. Reads that come back short but
    /// whole in the end are no error at all.
    #[test]
    fn failed_and_short_expert_reads() {
        let dir = tempfile::tempdir().unwrap();
        let engine = streamed(dir.path());
        let want = logits(&engine).unwrap();
        let file = engine.cache().unwrap().file();
        for (fault, why) in [
            (Fault::Eio, "Input/output error"),
            (Fault::EndAt(ALIGN), "the file ends inside this record"),
        ] {
            file.inject(Some(fault));
            let err = logits(&engine).unwrap_err().to_string();
            assert!(
                err.contains("experts.bin")
                    && err.contains("layer ")
                    && err.contains(" expert ")
                    && err.contains(why),
                "{fault:?}: {err}"
            );
            file.inject(None);
            assert_eq!(logits(&engine).unwrap(), want, "after {fault:?}");
        }
        let misses = || engine.cache().unwrap().stats().snapshot().misses;
        let before = misses();
        file.inject(Some(Fault::Short(ALIGN as usize)));
        assert_eq!(logits(&engine).unwrap(), want, "short reads");
        assert!(misses() > before, "the pass read no experts");
    }

    /// `pin_resident` pins what is resident, in the order asked, and
    /// neither reads the rest nor counts a hit or a miss; what it pins
    /// stays until dropped, so a request evicting everything else keeps it.
    #[test]
    fn pinning_what_is_resident_reads_and_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let engine = streamed(dir.path());
        let cache = engine.cache().unwrap();
        let (&layer, lay) = cache.inner.layers.iter().min_by_key(|l| l.0).unwrap();
        let all: Vec<u32> = (0..lay.experts() as u32).collect();
        drop(cache.fetch(layer, &[3, 1]).unwrap());
        let before = cache.stats().snapshot();
        let pinned = cache.pin_resident(layer, &all);
        let ids: Vec<u32> = pinned.slots.iter().map(|&(e, _)| e).collect();
        assert!(ids.contains(&1) && ids.contains(&3), "{ids:?}");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "not in the order asked: {ids:?}"
        );
        assert!(ids.len() < all.len(), "the cache holds every expert");
        assert_eq!(cache.stats().snapshot(), before);
        let (e, mats) = pinned.get(0);
        let want: Vec<Vec<u8>> = mats.iter().map(|m| m.data.to_vec()).collect();
        // Every other expert of the layer through the cache, a slot at a time.
        for &other in all.iter().filter(|o| !ids.contains(o)) {
            drop(cache.fetch(layer, &[other]).unwrap());
        }
        let (again, mats) = pinned.get(0);
        assert_eq!(again, e);
        let got: Vec<Vec<u8>> = mats.iter().map(|m| m.data.to_vec()).collect();
        assert!(got == want, "a pinned expert was overwritten");
    }
}
