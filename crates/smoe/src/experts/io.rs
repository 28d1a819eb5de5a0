//! A pool of reader threads that keeps many direct reads
//! ([`crate::vault::io`]) in flight.
//!
//! One expert is one contiguous aligned read from a vault, or three (gate,
//! up, down) from a GGUF, taken by one reader. NVMe drives reach their
//! bandwidth only with many reads outstanding, so a layer's misses are all
//! handed to the pool at once and the compute thread waits for the batch.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use smallvec::SmallVec;

pub use crate::vault::io::{AlignedBuf, DirectFile};

/// Demand reads block the compute thread; prefetches only guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Prefetch,
}

/// `len` bytes at `offset` of `file` into the job's buffer at `dst_start`,
/// of which the first `need` must be there: the rest only rounds the read
/// out to the direct-I/O alignment and may lie past the end of the file.
#[derive(Debug, Clone)]
pub struct Segment {
    pub file: Arc<DirectFile>,
    pub offset: u64,
    pub dst_start: usize,
    pub len: usize,
    pub need: usize,
}

/// An expert is one record (a vault) or three extents (a GGUF), held inline:
/// a job is made per read on the decode path, which otherwise allocates only
/// the completion.
pub type Segments = SmallVec<[Segment; 3]>;

/// The reads of one expert into `dst`, then `done`.
pub struct ReadJob {
    pub reads: Segments,
    pub dst: Arc<AlignedBuf>,
    pub priority: Priority,
    /// What the caller needs to recognise the job when cancelling.
    pub key: (usize, u32),
    /// Called by the reader with the outcome and the seconds the read took.
    pub done: Box<dyn FnOnce(std::io::Result<()>, f64) + Send>,
}

/// Everything but the callback, which has nothing to show.
impl std::fmt::Debug for ReadJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadJob")
            .field("reads", &self.reads)
            .field("priority", &self.priority)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Queues {
    demand: VecDeque<ReadJob>,
    prefetch: VecDeque<ReadJob>,
    prefetch_in_flight: usize,
    stop: bool,
}

/// A fixed pool of reader threads; its size is the queue depth the device
/// sees. Demand reads are always taken before prefetches, and prefetches
/// may occupy at most `max_prefetch` readers, so a demand read never waits
/// behind more than that many guesses.
pub struct ReaderPool {
    shared: Arc<(Mutex<Queues>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    max_prefetch: usize,
}

impl ReaderPool {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let max_prefetch = (threads / 2).max(1);
        let shared = Arc::new((Mutex::new(Queues::default()), Condvar::new()));
        let handles = (0..threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("smoe-read-{i}"))
                    .spawn(move || reader_loop(&shared, max_prefetch))
                    .expect("spawning a reader thread")
            })
            .collect();
        Self {
            shared,
            threads: handles,
            max_prefetch,
        }
    }

    pub fn submit(&self, job: ReadJob) {
        let (lock, cv) = &*self.shared;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        match job.priority {
            Priority::Demand => q.demand.push_back(job),
            Priority::Prefetch => q.prefetch.push_back(job),
        }
        cv.notify_one();
    }

    /// Removes queued (not yet started) prefetches whose key matches and
    /// returns them, so the caller can release what they reserved.
    pub fn cancel_prefetches(&self, mut matches: impl FnMut((usize, u32)) -> bool) -> Vec<ReadJob> {
        let (lock, _) = &*self.shared;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (cancel, keep): (Vec<_>, Vec<_>) = q.prefetch.drain(..).partition(|j| matches(j.key));
        q.prefetch = keep.into();
        cancel
    }

    pub fn max_prefetch(&self) -> usize {
        self.max_prefetch
    }
}

fn reader_loop(shared: &(Mutex<Queues>, Condvar), max_prefetch: usize) {
    let (lock, cv) = shared;
    loop {
        let job = {
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.stop {
                    return;
                }
                if let Some(job) = q.demand.pop_front() {
                    break job;
                }
                if q.prefetch_in_flight < max_prefetch {
                    if let Some(job) = q.prefetch.pop_front() {
                        q.prefetch_in_flight += 1;
                        break job;
                    }
                }
                q = cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let start = Instant::now();
        let result = job.reads.iter().try_for_each(|r| {
            // SAFETY: the cache hands each loading slot to exactly one job
            // and nobody reads it until the job's completion marks it ready.
            let buf = unsafe { job.dst.slice_mut(r.dst_start, r.len) };
            r.file.read_at_least(buf, r.offset, r.need)
        });
        if job.priority == Priority::Prefetch {
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            q.prefetch_in_flight -= 1;
            // A prefetch slot freed up: a waiting reader may take the next.
            cv.notify_one();
        }
        (job.done)(result, start.elapsed().as_secs_f64());
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
