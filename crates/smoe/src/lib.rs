//! smoe: Mixture-of-Experts inference for models larger than memory.
//!
//! The crate is split the way data flows through it. A checkpoint is found
//! and described ([`config`], [`checkpoint`]); [`vault`] converts it once
//! into a resident backbone plus one 4 KiB-aligned record per routed expert
//! and reads it back with direct I/O ([`vault::io`]); [`experts`] streams
//! those records into a bounded RAM cache (prefetch, LRU/LFU, counters).
//! [`memory`] plans the RAM between backbone, KV cache and expert cache,
//! and [`load`] opens a checkpoint or a vault under that plan. A [`model`]
//! family (one file each, registered in [`model::family`]) builds the
//! decoder's layers from its tensors; every tensor op they run is a call
//! on a [`compute::Backend`], whose CPU implementation is the [`kernels`].
//! Text goes in through the [`template`] and [`tokenizer`], the [`engine`]
//! drives prefill and decode while the [`sampler`] picks tokens, and
//! [`check`] tells before a long download is wasted whether a tokenizer,
//! template and machine suit the weights.

pub mod batch;
pub mod bench;
pub mod check;
pub mod checkpoint;
pub mod compute;
pub mod config;
pub mod engine;
pub mod error;
pub mod experts;
pub mod gguf;
pub mod kernels;
pub mod load;
pub mod memory;
pub mod model;
pub mod paths;
pub mod plan;
pub mod quant;
pub mod sampler;
pub mod template;
pub mod tokenizer;
pub mod validate;
pub mod vault;

pub use error::{Error, Result};
