//! Model families, one file each and one registry ([`family`]), assembled
//! from the shared building blocks in [`blocks`] into one [`Decoder`]. A
//! family knows its config keys, its tensor names and the order of its
//! operations; the arithmetic is the [`crate::compute::Backend`]'s.

pub mod blocks;
mod decoder;
mod deepseek;
pub mod family;
#[cfg(feature = "cuda")]
mod gpu;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;
mod session;

pub use crate::compute::KvCache;
pub use decoder::Decoder;
pub use family::{Family, FAMILIES};
#[cfg(feature = "cuda")]
pub use gpu::GpuDecoder;
pub(crate) use session::check_input;
pub use session::Session;

// Where these lived before memory planning and loading left this module;
// callers outside the crate still name them here.
pub use crate::load::{open, LoadOptions, Opened};
pub use crate::memory::{available_memory, human_bytes, parse_bytes, Budget, MemoryPlan};

use crate::config::ModelConfig;
use crate::error::Result;

/// Which positions the caller wants logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: what generation needs.
    Last,
    /// Every position of the call, `[t, vocab]` row-major.
    All,
}

/// One sequence's part of a batched forward pass
/// ([`CausalLm::forward_batch`]).
#[derive(Debug)]
pub struct Step<'a> {
    /// Ids to append to the sequence.
    pub ids: &'a [u32],
    pub session: &'a mut Session,
    /// Whether to leave the next token's logits in the session
    /// ([`Session::logits`]); a prompt chunk that is not the last needs none.
    pub logits: bool,
    /// Whether the caller takes the argmax of those logits (a greedy
    /// sampler), which a model may then pick itself and leave in the
    /// session instead of the logits ([`Session::take_pick`]), as
    /// [`CausalLm::forward_greedy`] does.
    pub greedy: bool,
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

    /// Appends `ids` to the session as [`CausalLm::forward`] does and
    /// returns the greedy next token (the sampler's argmax of the last
    /// position's logits: the largest, the lowest id among equal ones, NaN
    /// never chosen) where the model picks it without handing the host
    /// every logit (a GPU's 608 KB of Qwen3 logits a step become 4 bytes);
    /// the session then holds no logits. `None` where it cannot: the
    /// logits are in the session, as after `forward`.
    fn forward_greedy(&self, ids: &[u32], session: &mut Session) -> Result<Option<u32>> {
        self.forward(ids, session, Logits::Last)?;
        Ok(None)
    }

    /// Appends each step's ids to its session in one pass over the layers:
    /// the rows of all steps go through every projection, norm and expert
    /// together (each routed expert is read once for all the tokens that
    /// chose it), attention runs per sequence over its own cache. A row's
    /// result is the same as in [`CausalLm::forward`] with the same ids on
    /// the same session. `scratch` holds the batch's activations.
    fn forward_batch(&self, steps: &mut [Step<'_>], scratch: &mut blocks::Scratch) -> Result<()>;

    /// What a GPU decoder's expert tiers served since load; `None` for a
    /// model on the CPU, whose only tiers are the expert cache's.
    fn gpu_expert_stats(&self) -> Option<GpuExpertStats> {
        None
    }
}

/// The tiers above the RAM expert cache on a GPU: the expert cache's own
/// counters say what RAM and the SSD served of the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GpuExpertStats {
    /// Routed experts a token used from a layer whose experts are in VRAM.
    pub vram_hits: u64,
    /// Experts copied from their RAM slots to the GPU, and the bytes that
    /// crossed PCIe for them.
    pub copied: u64,
    pub pcie_bytes: u64,
    /// Of those, copied while the layer before ran (its prediction of
    /// this layer's experts), and how many of them the layer then used.
    pub copied_ahead: u64,
    pub ahead_used: u64,
    /// Experts run on the CPU from their RAM slots instead (a small
    /// batch's, where that was measured faster).
    pub cpu_runs: u64,
    /// Forward steps run as one captured CUDA graph (decode steps with
    /// every layer on the GPU).
    pub graph_steps: u64,
    /// Of those, steps whose graphs were replayed as captured before,
    /// without recording the step's launches again.
    pub graph_replays: u64,
    /// Where the host drives some layers' experts (streamed ones), the
    /// stretches of a decode step between its waits for their routing,
    /// each run as a captured CUDA graph, and of those the ones replayed
    /// as captured before.
    pub graph_stretches: u64,
    pub stretch_replays: u64,
    /// How one-token batches of streamed experts ran, once measured.
    pub one_token: Option<ExpertWays>,
}

/// The ways a small batch's streamed experts can run (copied to the GPU,
/// on the CPU, or both at once on shares), as the decoder measured them:
/// each way's median rate over its trials, in expert bytes per second,
/// and the way it kept (`None` while still trying them).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ExpertWays {
    pub kept: Option<&'static str>,
    pub copy_bytes_s: f64,
    pub cpu_bytes_s: f64,
    pub split_bytes_s: f64,
}

impl GpuExpertStats {
    /// What was counted after `before`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            vram_hits: self.vram_hits.saturating_sub(before.vram_hits),
            copied: self.copied.saturating_sub(before.copied),
            pcie_bytes: self.pcie_bytes.saturating_sub(before.pcie_bytes),
            copied_ahead: self.copied_ahead.saturating_sub(before.copied_ahead),
            ahead_used: self.ahead_used.saturating_sub(before.ahead_used),
            cpu_runs: self.cpu_runs.saturating_sub(before.cpu_runs),
            graph_steps: self.graph_steps.saturating_sub(before.graph_steps),
            graph_replays: self.graph_replays.saturating_sub(before.graph_replays),
            graph_stretches: self.graph_stretches.saturating_sub(before.graph_stretches),
            stretch_replays: self.stretch_replays.saturating_sub(before.stretch_replays),
            one_token: self.one_token,
        }
    }
}
