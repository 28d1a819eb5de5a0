//! Reads that bypass the page cache: a file opened for direct I/O and the
//! aligned buffers it reads into.
//!
//! The expert cache owns the RAM budget; letting the kernel cache the same
//! bytes again would double-count memory and evict the backbone. So expert
//! records (and an on-disk embedding table's rows) are read with O_DIRECT on
//! Linux (F_NOCACHE on macOS), and where the filesystem refuses direct I/O
//! (tmpfs, some overlays) with plain reads followed by
//! `posix_fadvise(DONTNEED)` to drop what the kernel kept.

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

use crate::quant::DType;

use super::{align_up, ALIGN};

/// A file opened for direct reads when the filesystem allows it.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    pub path: PathBuf,
    /// True when reads bypass the page cache at the device level.
    pub direct: bool,
    /// Unit tests' failing disk: what the next reads do instead of reading.
    #[cfg(test)]
    fault: std::sync::Mutex<Option<faults::Fault>>,
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
                    return Ok(Self::new(file, path, true));
                }
            }
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        #[cfg(target_os = "macos")]
        {
            if rustix::fs::fcntl_nocache(&file, true).is_ok() {
                return Ok(Self::new(file, path, true));
            }
        }
        Ok(Self::new(file, path, false))
    }

    fn new(file: File, path: &Path, direct: bool) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            direct,
            #[cfg(test)]
            fault: Default::default(),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`. With direct I/O, `buf`,
    /// its length and `offset` must be multiples of [`ALIGN`].
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_at_least(buf, offset, buf.len())
    }

    /// Reads into `buf` at `offset` until at least `need` bytes are there:
    /// a direct read rounded out to [`ALIGN`] may run past the end of the
    /// file, which is only an error if it ends before `need`.
    pub fn read_at_least(&self, buf: &mut [u8], offset: u64, need: usize) -> std::io::Result<()> {
        let mut done = 0;
        while done < need {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ends {done} bytes into a read of {need} at offset {offset}"
                        ),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.direct {
            #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
            {
                let len = std::num::NonZeroU64::new(buf.len() as u64);
                let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::DontNeed);
            }
        }
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        #[cfg(test)]
        if let Some(fault) = *self.fault.lock().unwrap() {
            return fault.read(&self.file, buf, offset);
        }
        self.file.read_at(buf, offset)
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

/// A zeroed buffer aligned to [`ALIGN`], as direct I/O requires, mapped
/// from the kernel rather than the heap so that a large one sits on
/// transparent huge pages where Linux has them.
///
/// The block layer splits a direct read into one disk request per run of
/// physically contiguous pages it can gather, up to the queue's segment
/// limit (254 on a virtio disk). In 4 KiB pages scattered by the
/// allocator a 2.6 MB expert record became four requests instead of one on
/// the build VM's disk, and took 2.0 ms instead of 1.0; the engine's reads
/// ran at either rate depending on where its cache happened to land. On
/// 2 MiB pages every record is one request however fragmented memory is,
/// and the kernel pins a few pages per read instead of hundreds.
#[derive(Debug)]
pub struct AlignedBuf {
    /// Owns the mapping; `ptr` points into it.
    _map: memmap2::MmapMut,
    ptr: *mut u8,
    len: usize,
}

/// The huge page size a large buffer is aligned to.
const HUGE_PAGE: usize = 2 << 20;

// SAFETY: the buffer is plain bytes; callers coordinate access to disjoint
// regions (the cache hands each slot to one reader, then to readers only).
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let len = len.max(ALIGN as usize);
        // A mapping is page-aligned; a large one is mapped a huge page
        // longer and starts at the first huge-page boundary inside, so
        // that all but its tail can be huge pages.
        let align = if len >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            ALIGN as usize
        };
        let Ok(mut map) = memmap2::MmapMut::map_anon(len + align - ALIGN as usize) else {
            std::alloc::handle_alloc_error(
                Layout::from_size_align(len, align).expect("aligned layout"),
            );
        };
        let at = map.as_ptr() as usize;
        let skip = at.next_multiple_of(align) - at;
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // Advice: where huge pages are off or short the buffer is in
            // small pages, as a heap buffer would be.
            let _ = map.advise_range(memmap2::Advice::HugePage, skip, len);
        }
        // SAFETY: `skip + len` is within the mapping (`skip < align`).
        let ptr = unsafe { map.as_mut_ptr().add(skip) };
        // Fault every page in now, as the heap's zeroing did: a page first
        // touched by a direct read is allocated (a huge page zeroed, maybe
        // compacted for) inside that read, which made a cold cache's first
        // prompt 1.5x slower.
        for at in (0..len).step_by(ALIGN as usize) {
            // SAFETY: within the buffer; nothing else refers to it yet.
            unsafe { ptr.add(at).write_volatile(0) };
        }
        Self {
            _map: map,
            ptr,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte, for a driver that page-locks the buffer so a device
    /// copies from it directly (`Gpu::pin_host`).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
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

/// Rows of a matrix stored at `offset` in a file read with direct I/O.
pub struct DiskRows {
    pub file: DirectFile,
    pub rows: usize,
    pub offset: u64,
    pub dtype: DType,
    pub cols: usize,
    pub row_bytes: usize,
    /// Bytes of one direct read of a row: a row may straddle a block
    /// boundary, so two blocks of slack.
    span: usize,
}

thread_local! {
    /// Each thread's buffer for [`DiskRows::read`], so that a prompt's rows
    /// are read in parallel rather than one after another under a lock.
    static ROW_BUF: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

impl DiskRows {
    pub fn new(file: DirectFile, offset: u64, rows: usize, dtype: DType, cols: usize) -> Self {
        let row_bytes = dtype.row_bytes(cols);
        Self {
            file,
            rows,
            offset,
            dtype,
            cols,
            row_bytes,
            span: align_up(row_bytes as u64) as usize + 2 * ALIGN as usize,
        }
    }

    /// The whole table's bytes in order, `each(first_byte, bytes)` per
    /// piece of at most 32 MiB: for a copy kept elsewhere (a GPU's) without
    /// holding all of it in RAM at once.
    pub fn read_table(&self, mut each: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<()> {
        const PIECE: u64 = 32 << 20;
        let total = (self.rows * self.row_bytes) as u64;
        let buf = AlignedBuf::new((PIECE + 2 * ALIGN) as usize);
        let mut at = 0;
        while at < total {
            let n = PIECE.min(total - at);
            let start = self.offset + at;
            let first = start / ALIGN * ALIGN;
            let skip = (start - first) as usize;
            let end = align_up(start + n);
            // SAFETY: the buffer is this call's own.
            let span = unsafe { buf.slice_mut(0, (end - first) as usize) };
            self.file
                .read_at_least(span, first, skip + n as usize)
                .map_err(|e| {
                    Error::format(&self.file.path, format!("reading the embedding table: {e}"))
                })?;
            each(at as usize, &span[skip..skip + n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// Row `id`, widened into `out`.
    pub fn read(&self, id: u32, out: &mut [f32]) -> Result<()> {
        let align = ALIGN;
        let start = self.offset + id as u64 * self.row_bytes as u64;
        let first = start / align * align;
        let end = align_up(start + self.row_bytes as u64);
        ROW_BUF.with_borrow_mut(|buf| {
            let buf = match buf {
                Some(b) if b.len() >= self.span => b,
                _ => buf.insert(AlignedBuf::new(self.span)),
            };
            // SAFETY: the buffer is this thread's, borrowed for this call only.
            let span = unsafe { buf.slice_mut(0, (end - first) as usize) };
            let skip = (start - first) as usize;
            self.file
                .read_at_least(span, first, skip + self.row_bytes)
                .map_err(|e| {
                    Error::format(&self.file.path, format!("reading embedding row {id}: {e}"))
                })?;
            crate::kernels::widen(
                self.dtype,
                &span[skip..skip + self.row_bytes],
                &mut out[..self.cols],
            );
            Ok(())
        })
    }
}

/// A failing disk under [`DirectFile`], for unit tests of what reads that
/// fail or come back short do to the expert cache and the decoder above.
#[cfg(test)]
pub(crate) mod faults {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use super::DirectFile;

    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Fault {
        /// Every read fails as a dying disk's do (EIO).
        Eio,
        /// Reads return at most this many bytes, as a network or FUSE
        /// filesystem's may: legal, and the data must come out whole.
        Short(usize),
        /// Reads at or past this offset find the end of the file, as when
        /// it was cut short since it was opened.
        EndAt(u64),
    }

    impl Fault {
        pub(crate) fn read(
            self,
            file: &File,
            buf: &mut [u8],
            offset: u64,
        ) -> std::io::Result<usize> {
            match self {
                Fault::Eio => Err(std::io::Error::from_raw_os_error(5)),
                Fault::Short(n) => {
                    let n = n.min(buf.len());
                    file.read_at(&mut buf[..n], offset)
                }
                Fault::EndAt(end) if offset >= end => Ok(0),
                Fault::EndAt(end) => {
                    let n = buf.len().min((end - offset) as usize);
                    file.read_at(&mut buf[..n], offset)
                }
            }
        }
    }

    impl DirectFile {
        /// Makes every later read go through `fault` (None: the disk heals).
        pub(crate) fn inject(&self, fault: Option<Fault>) {
            *self.fault.lock().unwrap() = fault;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{AlignedBuf, ALIGN, HUGE_PAGE};

    #[test]
    fn buffers_are_aligned_zeroed_and_writable_to_the_end() {
        for len in [1, 4096, 5000, HUGE_PAGE, 3 * HUGE_PAGE + 17] {
            let buf = AlignedBuf::new(len);
            assert!(buf.len() >= len);
            let at = buf.as_ptr() as usize;
            assert_eq!(at % ALIGN as usize, 0, "{len} bytes");
            if len >= HUGE_PAGE {
                assert_eq!(at % HUGE_PAGE, 0, "{len} bytes");
            }
            // SAFETY: the buffer is ours alone.
            let bytes = unsafe { buf.slice_mut(0, buf.len()) };
            assert!(bytes.iter().all(|&b| b == 0));
            bytes.fill(7);
            assert!(unsafe { buf.slice(0, buf.len()) }.iter().all(|&b| b == 7));
        }
    }

    /// Where the kernel offers transparent huge pages for advised memory,
    /// a large buffer is advised (the `hg` flag of its mapping). x86-64
    /// only: CI's aarch64 run is under qemu's user-mode emulator, which
    /// accepts the advice and drops it.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn a_large_buffer_asks_for_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if !thp.is_ok_and(|s| !s.contains("[never]")) {
            eprintln!("SKIPPED: transparent huge pages are off on this kernel");
            return;
        }
        let buf = AlignedBuf::new(4 * HUGE_PAGE);
        let at = buf.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // Each mapping: a "start-end ..." line, then fields, VmFlags last.
        let mut inside = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= at && at < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.to_string());
                }
            }
        }
        let flags = flags.expect("the buffer's mapping in /proc/self/smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "VmFlags:{flags}"
        );
    }
}
