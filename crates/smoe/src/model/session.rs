//! The state of one sequence: its KV cache and the ids behind it.

use crate::config::ModelConfig;
use crate::error::{Error, Result};

use super::blocks;
use crate::compute::KvCache;

/// The state of one sequence: its KV cache, the ids it holds, and reusable
/// buffers so that a decode step allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Session {
    pub kv: KvCache,
    pub(crate) scratch: blocks::Scratch,
    pub(crate) logits: Vec<f32>,
    /// A GPU decoder's logits, where it downloads them: page-locked
    /// memory the device copies into directly. Once set, the logits are
    /// these, not [`Session::logits`]'s vector.
    #[cfg(feature = "cuda")]
    pub(crate) host_logits: Option<crate::compute::cuda::HostBuf<f32>>,
    /// The next token a batched pass picked on the device for a greedy
    /// step ([`super::Step::greedy`]), in place of its logits.
    pub(crate) picked: Option<u32>,
    /// The ids behind the KV cache, as recorded by the engine.
    tokens: Vec<u32>,
    /// Set when the cache changed without the engine recording it (a bare
    /// `forward`, a truncation from outside): `tokens` can no longer be
    /// trusted until the cache is emptied.
    untracked: bool,
}

impl Session {
    pub fn new(kv: KvCache) -> Self {
        Self {
            kv,
            ..Default::default()
        }
    }

    /// Makes room for `extra` more positions in the KV cache and the id
    /// record, so that a generation allocates once instead of per doubling.
    pub fn reserve(&mut self, extra: usize) {
        self.kv.reserve(extra);
        self.tokens.reserve(extra);
    }

    /// The logits the last forward pass left here: a single pass's
    /// positions, or a batched pass's next-token row
    /// ([`super::Step::logits`]).
    pub fn logits(&mut self) -> &mut [f32] {
        #[cfg(feature = "cuda")]
        if let Some(host) = &mut self.host_logits {
            return host.as_mut_slice();
        }
        &mut self.logits
    }

    /// The token the last batched pass picked for this sequence, where it
    /// left a pick instead of logits ([`super::Step::greedy`]); taken once.
    pub fn take_pick(&mut self) -> Option<u32> {
        self.picked.take()
    }

    /// Drops the logits a pass left, when a pass picked the next token on
    /// the device instead ([`super::CausalLm::forward_greedy`]): they are
    /// an earlier position's.
    #[cfg(feature = "cuda")]
    pub(crate) fn forget_logits(&mut self) {
        if let Some(l) = &mut self.host_logits {
            l.clear();
        }
        self.logits.clear();
    }

    /// Tokens already processed.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// The ids the KV cache holds, if every one of them is known.
    pub fn tokens(&self) -> Option<&[u32]> {
        (!self.untracked && self.tokens.len() == self.kv.len()).then_some(&self.tokens)
    }

    /// Notes that `ids` are about to be appended to the cache. Should that
    /// fail, the cache stays shorter than the ids and [`Self::tokens`]
    /// says nothing is known.
    pub(crate) fn record(&mut self, ids: &[u32]) {
        if !self.untracked && self.tokens.len() == self.kv.len() {
            self.tokens.extend_from_slice(ids);
        } else {
            self.tokens.clear();
            self.untracked = true;
        }
    }

    /// Prepares the session to continue as `ids`: keeps the longest prefix
    /// of the cache that `ids` starts with, forgets the rest, and returns
    /// how many of `ids` need no prefill. At least the last id is left to
    /// process, since its logits are what generation starts from. A
    /// conversation re-rendered each turn reuses everything up to its
    /// first changed token.
    pub fn reuse_prefix(&mut self, ids: &[u32]) -> usize {
        let common = match self.tokens() {
            Some(held) => held.iter().zip(ids).take_while(|(a, b)| a == b).count(),
            None => 0,
        }
        .min(ids.len().saturating_sub(1));
        self.kv.truncate(common);
        self.tokens.truncate(common);
        if common == 0 {
            self.tokens.clear();
            self.untracked = false;
        }
        common
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
