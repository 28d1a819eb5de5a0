//! Routed experts on disk: the cache that holds some of them in RAM, the
//! direct-I/O reads that fill it, and the counters that say how it went.

pub mod cache;
pub mod io;

use std::sync::atomic::{AtomicU64, Ordering};

pub use cache::{ExpertCache, Pinned, Policy, ReadAhead, LFU_HALF_LIFE};

/// Honest counters: every routed expert a layer asks for is a hit (already
/// resident), a prefetch hit (brought in by a prediction) or a miss (read
/// while the compute thread waits); every byte read from disk is counted,
/// prefetched or not; and the time the compute thread was blocked is
/// measured, not estimated.
#[derive(Debug, Default)]
pub struct Stats {
    hits: AtomicU64,
    prefetch_hits: AtomicU64,
    misses: AtomicU64,
    demand_bytes: AtomicU64,
    prefetches: AtomicU64,
    prefetch_bytes: AtomicU64,
    prefetch_cancelled: AtomicU64,
    prefetch_wasted: AtomicU64,
    predicted: AtomicU64,
    predicted_used: AtomicU64,
    routed: AtomicU64,
    /// Summed time readers spent inside read calls (overlapping reads add).
    read_ns: AtomicU64,
    /// Wall time the compute thread was blocked waiting for reads.
    blocked_ns: AtomicU64,
}

/// A copy of the counters at one moment; subtract two to get an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub prefetch_hits: u64,
    pub misses: u64,
    /// Bytes of demand reads.
    pub demand_bytes: u64,
    pub prefetches: u64,
    pub prefetch_bytes: u64,
    /// Prefetches dropped from the queue before they started.
    pub prefetch_cancelled: u64,
    /// Prefetched experts evicted before anyone asked for them.
    pub prefetch_wasted: u64,
    /// Predicted experts, how many of them were then routed, and how many
    /// experts were routed in the layers that had a prediction.
    pub predicted: u64,
    pub predicted_used: u64,
    pub routed: u64,
    pub read_s: f64,
    pub blocked_s: f64,
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn add_demand(
        &self,
        hits: u64,
        prefetch_hits: u64,
        misses: u64,
        bytes: u64,
        blocked_s: f64,
    ) {
        add(&self.hits, hits);
        add(&self.prefetch_hits, prefetch_hits);
        add(&self.misses, misses);
        add(&self.demand_bytes, bytes);
        add(&self.blocked_ns, (blocked_s * 1e9) as u64);
    }

    pub(crate) fn add_prefetches(&self, n: u64, bytes: u64) {
        add(&self.prefetches, n);
        add(&self.prefetch_bytes, bytes);
    }

    /// A queued prefetch was dropped: its bytes were never read.
    pub(crate) fn cancel_prefetch(&self, bytes: u64) {
        add(&self.prefetch_cancelled, 1);
        self.prefetch_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn waste_prefetch(&self) {
        add(&self.prefetch_wasted, 1);
    }

    pub(crate) fn add_prediction(&self, predicted: u64, used: u64, routed: u64) {
        add(&self.predicted, predicted);
        add(&self.predicted_used, used);
        add(&self.routed, routed);
    }

    pub(crate) fn add_read_time(&self, s: f64) {
        add(&self.read_ns, (s * 1e9) as u64);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            hits: get(&self.hits),
            prefetch_hits: get(&self.prefetch_hits),
            misses: get(&self.misses),
            demand_bytes: get(&self.demand_bytes),
            prefetches: get(&self.prefetches),
            prefetch_bytes: get(&self.prefetch_bytes),
            prefetch_cancelled: get(&self.prefetch_cancelled),
            prefetch_wasted: get(&self.prefetch_wasted),
            predicted: get(&self.predicted),
            predicted_used: get(&self.predicted_used),
            routed: get(&self.routed),
            read_s: get(&self.read_ns) as f64 * 1e-9,
            blocked_s: get(&self.blocked_ns) as f64 * 1e-9,
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Counters of separate stretches of work, taken together.
impl std::ops::AddAssign for StatsSnapshot {
    fn add_assign(&mut self, o: StatsSnapshot) {
        self.hits += o.hits;
        self.prefetch_hits += o.prefetch_hits;
        self.misses += o.misses;
        self.demand_bytes += o.demand_bytes;
        self.prefetches += o.prefetches;
        self.prefetch_bytes += o.prefetch_bytes;
        self.prefetch_cancelled += o.prefetch_cancelled;
        self.prefetch_wasted += o.prefetch_wasted;
        self.predicted += o.predicted;
        self.predicted_used += o.predicted_used;
        self.routed += o.routed;
        self.read_s += o.read_s;
        self.blocked_s += o.blocked_s;
    }
}

impl StatsSnapshot {
    pub fn since(&self, e: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits - e.hits,
            prefetch_hits: self.prefetch_hits - e.prefetch_hits,
            misses: self.misses - e.misses,
            demand_bytes: self.demand_bytes - e.demand_bytes,
            prefetches: self.prefetches - e.prefetches,
            prefetch_bytes: self.prefetch_bytes - e.prefetch_bytes,
            prefetch_cancelled: self.prefetch_cancelled - e.prefetch_cancelled,
            prefetch_wasted: self.prefetch_wasted - e.prefetch_wasted,
            predicted: self.predicted - e.predicted,
            predicted_used: self.predicted_used - e.predicted_used,
            routed: self.routed - e.routed,
            read_s: self.read_s - e.read_s,
            blocked_s: self.blocked_s - e.blocked_s,
        }
    }

    /// Expert requests.
    pub fn requests(&self) -> u64 {
        self.hits + self.prefetch_hits + self.misses
    }

    /// Requests served without a demand read; 1.0 when nothing was asked.
    pub fn hit_rate(&self) -> f64 {
        if self.requests() == 0 {
            1.0
        } else {
            ratio(self.hits + self.prefetch_hits, self.requests())
        }
    }

    /// Every byte read from disk, demand and prefetch.
    pub fn bytes_read(&self) -> u64 {
        self.demand_bytes + self.prefetch_bytes
    }

    /// Share of routed experts that had been predicted, over the layers
    /// that had a prediction; none where nothing was predicted (the CUDA
    /// decoder guesses only where a read-ahead or a copy ahead uses it),
    /// which a share of 0 would misreport.
    pub fn recall(&self) -> Option<f64> {
        (self.routed > 0).then(|| ratio(self.predicted_used, self.routed))
    }

    /// Share of predicted experts that were then routed; none where
    /// nothing was predicted.
    pub fn precision(&self) -> Option<f64> {
        (self.predicted > 0).then(|| ratio(self.predicted_used, self.predicted))
    }

    /// Demand bytes per second of blocked compute time: the read throughput
    /// the compute thread actually experienced.
    pub fn read_gb_s(&self) -> f64 {
        if self.blocked_s > 0.0 {
            self.demand_bytes as f64 / self.blocked_s / 1e9
        } else {
            0.0
        }
    }
}
