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
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
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

/// Completion of a group of reads issued together.
#[derive(Debug, Default)]
pub struct Batch {
    state: Mutex<BatchState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct BatchState {
    pending: usize,
    errors: Vec<(usize, std::io::Error)>,
    /// Seconds the readers spent in read calls, summed.
    busy_s: f64,
}

impl Batch {
    pub fn new(pending: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(BatchState {
                pending,
                ..Default::default()
            }),
            cv: Condvar::new(),
        })
    }

    fn finish(&self, tag: usize, result: std::io::Result<()>, secs: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = result {
            s.errors.push((tag, e));
        }
        s.busy_s += secs;
        s.pending -= 1;
        if s.pending == 0 {
            self.cv.notify_all();
        }
    }

    /// Blocks until every read finished; returns failures by tag and the
    /// readers' busy time.
    pub fn wait(&self) -> (Vec<(usize, std::io::Error)>, f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.pending > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        (std::mem::take(&mut s.errors), s.busy_s)
    }
}

/// One read: `len` bytes at `offset` of `file` into `dst`.
pub struct ReadJob {
    pub file: Arc<DirectFile>,
    pub offset: u64,
    pub dst: Arc<AlignedBuf>,
    pub dst_start: usize,
    pub len: usize,
    /// Returned with an error so the caller can name the record.
    pub tag: usize,
    pub batch: Arc<Batch>,
}

/// A fixed pool of threads executing [`ReadJob`]s; its size is the queue
/// depth the device sees.
pub struct ReaderPool {
    tx: Option<Sender<ReadJob>>,
    threads: Vec<JoinHandle<()>>,
}

impl ReaderPool {
    pub fn new(threads: usize) -> Self {
        let (tx, rx) = channel::<ReadJob>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("smoe-read-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        };
                        let start = Instant::now();
                        // SAFETY: the cache gives each in-flight slot to exactly one job
                        // and nobody reads it until the batch completes.
                        let buf = unsafe { job.dst.slice_mut(job.dst_start, job.len) };
                        let r = job.file.read_exact_at(buf, job.offset);
                        job.batch.finish(job.tag, r, start.elapsed().as_secs_f64());
                    })
                    .expect("spawning a reader thread")
            })
            .collect();
        Self {
            tx: Some(tx),
            threads,
        }
    }

    pub fn submit(&self, job: ReadJob) {
        if let Some(tx) = &self.tx {
            if let Err(e) = tx.send(job) {
                // The pool only stops on drop; fail the job rather than hang.
                let job = e.0;
                job.batch.finish(
                    job.tag,
                    Err(std::io::Error::other("reader pool stopped")),
                    0.0,
                );
            }
        }
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
