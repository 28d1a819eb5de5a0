//! smoe: Mixture-of-Experts inference for models larger than memory.
//!
//! The crate is split the way data flows through it: a checkpoint is found
//! and described ([`config`], [`checkpoint`]), its weights feed an
//! architecture ([`model`]) built from CPU [`kernels`]; text goes in through
//! the [`template`] and [`tokenizer`], and the [`engine`] drives prefill and
//! decode while the [`sampler`] picks tokens.

pub mod bench;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod experts;
pub mod kernels;
pub mod model;
pub mod plan;
pub mod quant;
pub mod sampler;
pub mod template;
pub mod tokenizer;
pub mod vault;

pub use error::{Error, Result};
