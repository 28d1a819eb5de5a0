//! Routed experts on disk: the cache that holds some of them in RAM, the
//! direct-I/O reads that fill it, and the counters that say how it went.

pub mod cache;
pub mod io;

use std::sync::atomic::{AtomicU64, Ordering};

pub use cache::{ExpertCache, Pinned};

/// Honest counters: every routed expert a layer asks for is a hit or a
/// miss, every miss is bytes read, and the time the compute thread waited
/// for those reads is measured, not estimated.
#[derive(Debug, Default)]
pub struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_read: AtomicU64,
    /// Summed time readers spent inside read calls (overlapping reads add).
    read_ns: AtomicU64,
    /// Wall time the compute thread was blocked waiting for reads.
    blocked_ns: AtomicU64,
}

/// A copy of the counters at one moment; subtract two to get an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub bytes_read: u64,
    pub read_s: f64,
    pub blocked_s: f64,
}

impl Stats {
    fn add_hits(&self, n: u64) {
        self.hits.fetch_add(n, Ordering::Relaxed);
    }

    fn add_misses(&self, n: u64, bytes: u64, read_s: f64, blocked_s: f64) {
        self.misses.fetch_add(n, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        self.read_ns
            .fetch_add((read_s * 1e9) as u64, Ordering::Relaxed);
        self.blocked_ns
            .fetch_add((blocked_s * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            read_s: self.read_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            blocked_s: self.blocked_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }
}

impl StatsSnapshot {
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            bytes_read: self.bytes_read - earlier.bytes_read,
            read_s: self.read_s - earlier.read_s,
            blocked_s: self.blocked_s - earlier.blocked_s,
        }
    }

    /// Hits over all expert requests; 1.0 when nothing was requested.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            1.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    /// Bytes read per second of blocked compute time: the read throughput
    /// the model actually experienced.
    pub fn read_gb_s(&self) -> f64 {
        if self.blocked_s > 0.0 {
            self.bytes_read as f64 / self.blocked_s / 1e9
        } else {
            0.0
        }
    }
}
