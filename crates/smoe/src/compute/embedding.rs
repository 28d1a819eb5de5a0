//! The token-embedding table, and the one reader of its rows: the decoder
//! (through [`super::Backend::embed`]) and `smoe check` read them here.

use crate::checkpoint::{Weight, EMBED};
use crate::error::{Error, Result};
use crate::gguf::{check::TOKEN_EMBD, engine_dtype, Gguf};
use crate::vault::io::{DirectFile, DiskRows};
use crate::vault::Vault;

/// The token-embedding table: mapped, or left on disk and read one row per
/// token. On disk it costs no resident RAM at all (0.6 GB for
/// Qwen3-30B-A3B), and a prompt touches only a few thousand rows.
pub enum Embedding {
    Mapped(Weight),
    OnDisk(DiskRows),
}

impl std::fmt::Debug for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Embedding::Mapped(w) => write!(f, "Mapped({:?})", w.shape),
            Embedding::OnDisk(d) => write!(f, "OnDisk({} bytes per row)", d.row_bytes),
        }
    }
}

impl Embedding {
    /// A vault's table, left in its backbone file and read a row at a time
    /// with direct I/O.
    /// A GGUF's `token_embd.weight`, read a row at a time from its shard.
    pub fn on_disk_gguf(g: &Gguf) -> Result<Self> {
        let (shard, t) = g.require(TOKEN_EMBD)?;
        let &[cols, rows] = &t.dims[..] else {
            return Err(Error::format(
                g.path(),
                format!("{TOKEN_EMBD} has dims {:?}, expected 2", t.dims),
            ));
        };
        Ok(Embedding::OnDisk(DiskRows::new(
            DirectFile::open(g.shards()[shard].path())?,
            t.offset,
            rows as usize,
            engine_dtype(t, g.path())?,
            cols as usize,
        )))
    }

    pub fn on_disk(vault: &Vault) -> Result<Self> {
        let path = vault.backbone_path();
        let entry = vault.manifest.backbone.get(EMBED).ok_or_else(|| {
            Error::format(
                vault.dir.join(crate::vault::MANIFEST),
                format!("missing tensor \"{EMBED}\""),
            )
        })?;
        let &[rows, cols] = &entry.shape[..] else {
            return Err(Error::format(
                &path,
                format!("{EMBED} has shape {:?}, expected 2 dimensions", entry.shape),
            ));
        };
        // Rows are read at offsets and into buffers sized from the shape:
        // a manifest whose shape and length disagree overflowed that
        // arithmetic (found by fuzzing).
        let file = DirectFile::open(&path)?;
        let (dtype, range) = entry.extent(EMBED, &path, file.len()?)?;
        Ok(Embedding::OnDisk(DiskRows::new(
            file,
            range.start as u64,
            rows,
            dtype,
            cols,
        )))
    }

    /// A mapped table of any shape, refused unless it has two dimensions.
    pub fn mapped(table: Weight) -> Result<Self> {
        match table.shape[..] {
            [_, _] => Ok(Embedding::Mapped(table)),
            _ => Err(Error::invalid(format!(
                "{EMBED} has shape {:?}, expected 2 dimensions",
                table.shape
            ))),
        }
    }

    /// Rows and columns of the table.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Embedding::Mapped(w) => (w.shape[0], w.shape[1]),
            Embedding::OnDisk(d) => (d.rows, d.cols),
        }
    }

    /// Row `id`, widened into `out`.
    pub fn row(&self, id: u32, out: &mut [f32]) -> Result<()> {
        match self {
            Embedding::Mapped(w) => {
                let table = w.matrix();
                crate::kernels::widen(table.dtype, table.row(id as usize), out);
                Ok(())
            }
            Embedding::OnDisk(d) => d.read(id, out),
        }
    }
}
