//! Model architectures, one file each, assembled from the shared building
//! blocks in [`blocks`]. An architecture knows its tensor names and the order
//! of its operations; the arithmetic lives in the blocks and the kernels.

pub mod blocks;
mod qwen3_moe;

pub use qwen3_moe::Qwen3Moe;

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};

/// Which positions the caller wants logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: what generation needs.
    Last,
    /// Every position of the call, `[t, vocab]` row-major.
    All,
}

/// A causal language model: tokens in, next-token logits out, with the
/// sequence's state kept in a [`Session`].
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// A fresh, empty sequence.
    fn new_session(&self) -> Session;

    /// Appends `ids` to the session (one batched pass for any number of
    /// tokens) and returns logits for the positions asked for. The slice
    /// lives in the session and is overwritten by the next call.
    fn forward<'s>(
        &self,
        ids: &[u32],
        session: &'s mut Session,
        logits: Logits,
    ) -> Result<&'s mut [f32]>;
}

/// Opens the model a checkpoint's config names.
pub fn load(ckpt: &Checkpoint) -> Result<Box<dyn CausalLm>> {
    match ckpt.config.architecture {
        Architecture::Qwen3Moe => Ok(Box::new(Qwen3Moe::load(ckpt)?)),
    }
}

/// Keys and values of every layer for positions `0..len`, position-major.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    width: usize,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, width: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| Default::default()).collect(),
            width,
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on, so a conversation that shares a
    /// prefix with the cached one prefills only what is new.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for (k, v) in &mut self.layers {
            k.truncate(self.len * self.width);
            v.truncate(self.len * self.width);
        }
    }

    /// Appends `t` positions to one layer; `advance` commits them once every
    /// layer has.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (kc, vc) = &mut self.layers[layer];
        kc.truncate(self.len * self.width);
        vc.truncate(self.len * self.width);
        kc.extend_from_slice(k);
        vc.extend_from_slice(v);
    }

    fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// The state of one sequence: its KV cache, and reusable buffers so that a
/// decode step allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Session {
    pub kv: KvCache,
    pub(crate) scratch: blocks::Scratch,
    logits: Vec<f32>,
}

impl Session {
    pub fn new(kv: KvCache) -> Self {
        Self {
            kv,
            ..Default::default()
        }
    }

    /// Tokens already processed.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }
}

/// Rejects ids outside the embedding table and sequences past the context,
/// before any work is done.
pub(crate) fn check_input(cfg: &ModelConfig, ids: &[u32], cached: usize) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid("no tokens to process"));
    }
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(Error::invalid(format!(
            "token id {bad} is outside the vocabulary (vocab_size {})",
            cfg.vocab_size
        )));
    }
    if cached + ids.len() > cfg.max_position_embeddings {
        return Err(Error::invalid(format!(
            "{} tokens ({cached} cached + {} new) exceed the model's context of {} (max_position_embeddings)",
            cached + ids.len(),
            ids.len(),
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}
