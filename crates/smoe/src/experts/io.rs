//! Reads that bypass the page cache, and a pool of reader threads that keeps
//! many of them in flight.
//!
//! The expert cache owns the RAM budget; letting the kernel cache the same
//! bytes again would double-count memory and evict the backbone. So expert
//! records are read with O_DIRECT on Linux (F_NOCACHE on macOS), and where
//! the filesystem refuses direct I/O (tmpfs, some overlays) with plain reads
//! followed by `posix_fadvise(DONTNEED)` to drop what the kernel kept.
//!
//! One expert is one contiguous aligned read. NVMe drives reach their
//! bandwidth only with many reads outstanding, so a layer's misses are all
//! handed to the pool at once and the compute thread waits for the batch.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::vault::ALIGN;

/// A file opened for direct reads when the filesystem allows it.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    pub path: PathBuf,
    /// True when reads bypass the page cache at the device level.
    pub direct: bool,
}

impl DirectFile {
    pub fn open(path: &Path) -> Result<Self> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let flags = rustix::fs::OFlags::DIRECT.bits() as i32;
            if let Ok(file) = OpenOptions::new().read(true).custom_flags(flags).open(path) {
                // Some filesystems accept the flag and fail the first read;
                // probe once so the fallback is chosen here, not mid-token.
                let probe = AlignedBuf::new(ALIGN as usize);
                // SAFETY: the buffer is exclusively ours.
                if file
                    .read_at(unsafe { probe.slice_mut(0, ALIGN as usize) }, 0)
                    .is_ok()
                {
                    return Ok(Self {
                        file,
                        path: path.to_path_buf(),
                        direct: true,
                    });
                }
            }
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        #[cfg(target_os = "macos")]
        {
            if rustix::fs::fcntl_nocache(&file, true).is_ok() {
                return Ok(Self {
                    file,
                    path: path.to_path_buf(),
                    direct: true,
                });
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            direct: false,
        })
    }

    /// Reads exactly `buf.len()` bytes at `offset`. With direct I/O, `buf`,
    /// its length and `offset` must be multiples of [`ALIGN`].
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        if !self.direct {
            #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
            {
                let len = std::num::NonZeroU64::new(buf.len() as u64);
                let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::DontNeed);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, e))
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// A zeroed heap buffer aligned to [`ALIGN`], as direct I/O requires.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain bytes; callers coordinate access to disjoint
// regions (the cache hands each slot to one reader, then to readers only).
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let len = len.max(ALIGN as usize);
        let layout = Layout::from_size_align(len, ALIGN as usize).expect("aligned layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Safety
    /// No other live reference may overlap `start..start + len` mutably.
    pub unsafe fn slice(&self, start: usize, len: usize) -> &[u8] {
        assert!(start + len <= self.len);
        std::slice::from_raw_parts(self.ptr.add(start), len)
    }

    /// # Safety
    /// No other live reference may overlap `start..start + len`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [u8] {
        assert!(start + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN as usize).expect("aligned layout");
        // SAFETY: allocated with this layout in new().
        unsafe { dealloc(self.ptr, layout) };
    }
}

/// Demand reads block the compute thread; prefetches only guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Prefetch,
}

/// One read: `len` bytes at `offset` of `file` into `dst`, then `done`.
pub struct ReadJob {
    pub file: Arc<DirectFile>,
    pub offset: u64,
    pub dst: Arc<AlignedBuf>,
    pub dst_start: usize,
    pub len: usize,
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
            .field("offset", &self.offset)
            .field("len", &self.len)
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
        // SAFETY: the cache hands each loading slot to exactly one job and
        // nobody reads it until the job's completion marks it ready.
        let buf = unsafe { job.dst.slice_mut(job.dst_start, job.len) };
        let result = job.file.read_exact_at(buf, job.offset);
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
