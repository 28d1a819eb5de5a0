//! Continuous batching: several sequences decoding at once on one engine.
//!
//! A [`Batch`] has a fixed number of slots, each with its own session (KV
//! cache and the ids behind it). Sequences join a free slot between steps
//! and leave when they finish or are cancelled. Each [`Batch::step`] is one
//! forward pass over one token of every decoding sequence plus the next
//! prompt chunks of sequences still prefilling
//! ([`crate::model::CausalLm::forward_batch`]): every projection runs once
//! over all those rows, and a layer's routed experts are grouped across all
//! of them, so an expert two sequences route to is read and applied once.
//!
//! A sequence gets exactly the tokens [`Engine::generate`] gives it alone:
//! its prompt is cut into the same chunks, its rows round the same in any
//! batch (the kernels compute each row alone), and it samples and stops by
//! the same rules ([`Decoding`]).
//!
//! A slot keeps its cache after its sequence leaves, and a new sequence
//! takes the free slot whose cache shares the longest prefix with its prompt
//! (else the one used longest ago), so alternating conversations each
//! prefill only what they added.

use std::ops::{ControlFlow, Range};
use std::time::Instant;

use crate::engine::{prefill_chunks, Decoding, Engine, Generation, StopReason};
use crate::error::{Error, Result};
use crate::model::blocks::Scratch;
use crate::model::{check_input, Session, Step};
use crate::sampler::SamplingParams;

/// What a sequence asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The whole prompt; what a slot's cache already holds of it is reused.
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
}

/// A sequence that left the batch.
#[derive(Debug)]
pub struct Finished<K> {
    pub key: K,
    /// Its tokens, why it stopped, and its own prefill and decode timings.
    pub generation: Generation,
    /// Prompt tokens whose KV the slot already held.
    pub cached: usize,
}

/// A sequence in a slot.
struct Seq<K> {
    key: K,
    /// The prompt past what the slot held, and its prefill passes to go.
    prompt: Vec<u32>,
    chunks: std::collections::VecDeque<Range<usize>>,
    /// The token to feed next, once prefill is done.
    next: Option<u32>,
    dec: Decoding,
    cached: usize,
    joined: Instant,
    decoding_since: Option<Instant>,
}

struct Slot<K> {
    session: Session,
    seq: Option<Seq<K>>,
    /// When a sequence last joined, for picking among equal slots.
    used: u64,
}

/// Up to `parallel` sequences decoding together on one engine; `K` is the
/// caller's handle for each (its reply channel, say).
pub struct Batch<'e, K> {
    engine: &'e Engine,
    slots: Vec<Slot<K>>,
    scratch: Scratch,
    joins: u64,
}

impl<'e, K> Batch<'e, K> {
    /// `parallel` slots (at least one), each with an empty session.
    pub fn new(engine: &'e Engine, parallel: usize) -> Self {
        Self {
            engine,
            slots: (0..parallel.max(1))
                .map(|_| Slot {
                    session: engine.new_session(),
                    seq: None,
                    used: 0,
                })
                .collect(),
            scratch: Scratch::default(),
            joins: 0,
        }
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every slot has a sequence.
    pub fn is_full(&self) -> bool {
        self.len() == self.slots.len()
    }

    /// Adds a sequence in a free slot; it starts with the next step.
    /// Returns how many prompt tokens the slot's cache already held, or
    /// the key back with the reason it cannot run (no free slot, bad
    /// parameters, ids outside the vocabulary, a prompt past the context).
    pub fn join(&mut self, key: K, req: &Request) -> std::result::Result<usize, (K, Error)> {
        // A vault file cut short or replaced under a running server fails
        // the request that would read it, naming the file.
        if let Err(e) = self.engine.check_files() {
            return Err((key, e));
        }
        let Some(i) = self.pick_slot(&req.prompt) else {
            return Err((key, Error::invalid("every slot of the batch is taken")));
        };
        self.joins += 1;
        let slot = &mut self.slots[i];
        slot.used = self.joins;
        let session = &mut slot.session;
        let cached = session.reuse_prefix(&req.prompt);
        let prompt = req.prompt[cached..].to_vec();
        let cfg = self.engine.config();
        let dec = check_input(cfg, &prompt, cached).and_then(|()| {
            Decoding::new(self.engine, session, &prompt, &req.params, req.max_tokens)
        });
        let dec = match dec {
            Ok(d) => d,
            Err(e) => return Err((key, e)),
        };
        slot.seq = Some(Seq {
            key,
            chunks: prefill_chunks(prompt.len(), self.engine.prefill_chunk()).collect(),
            prompt,
            next: None,
            dec,
            cached,
            joined: Instant::now(),
            decoding_since: None,
        });
        Ok(cached)
    }

    /// The free slot whose cache shares the longest prefix with `prompt`;
    /// among equals, the one joined longest ago.
    fn pick_slot(&self, prompt: &[u32]) -> Option<usize> {
        let shared = |s: &Session| {
            s.tokens().map_or(0, |held| {
                held.iter().zip(prompt).take_while(|(a, b)| a == b).count()
            })
        };
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq.is_none())
            .max_by_key(|(_, s)| (shared(&s.session), std::cmp::Reverse(s.used)))
            .map(|(i, _)| i)
    }

    /// Removes the sequences whose key `gone` says are gone (a client that
    /// hung up), between steps, and returns their keys.
    pub fn cancel(&mut self, mut gone: impl FnMut(&K) -> bool) -> Vec<K> {
        let mut out = Vec::new();
        for slot in &mut self.slots {
            if slot.seq.as_ref().is_some_and(|q| gone(&q.key)) {
                out.extend(slot.seq.take().map(|q| q.key));
            }
        }
        out
    }

    /// Removes every sequence and empties every cache: what is left after a
    /// failed or panicked step cannot be trusted.
    pub fn clear(&mut self) -> Vec<K> {
        let mut out = Vec::new();
        for slot in &mut self.slots {
            out.extend(slot.seq.take().map(|q| q.key));
            slot.session = self.engine.new_session();
        }
        out
    }

    /// One forward pass over every sequence: a token each for those
    /// decoding, the next prompt chunk for those prefilling (as many as fit
    /// in one prefill chunk's worth of tokens, at least one). `on_token`
    /// sees each sequence's new token as it is chosen; one that returns
    /// `ControlFlow::Break` ends that sequence after the token. Returns the
    /// sequences that finished. On an error no sequence has moved on, and
    /// the caller should [`Batch::clear`] the batch.
    pub fn step(
        &mut self,
        mut on_token: impl FnMut(&mut K, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Finished<K>>> {
        let engine = self.engine;
        let mut budget = engine.prefill_chunk();
        let mut prefilled_any = false;
        // Slot index, the rows it feeds, and whether they end its prompt.
        let mut plan: Vec<(usize, Option<Range<usize>>, bool)> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(seq) = &slot.seq else { continue };
            match seq.chunks.front() {
                None => plan.push((i, None, true)),
                Some(c) if !prefilled_any || c.len() <= budget => {
                    budget = budget.saturating_sub(c.len());
                    prefilled_any = true;
                    plan.push((i, Some(c.clone()), seq.chunks.len() == 1));
                }
                Some(_) => {}
            }
        }
        if plan.is_empty() {
            return Ok(Vec::new());
        }

        let mut steps = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some((_, rows, logits)) = planned.next_if(|p| p.0 == i) else {
                continue;
            };
            let seq = slot.seq.as_ref().expect("planned slots hold a sequence");
            let ids = match rows {
                Some(r) => &seq.prompt[r.clone()],
                None => std::slice::from_ref(
                    seq.next.as_ref().expect("a decoding sequence has a token"),
                ),
            };
            slot.session.record(ids);
            steps.push(Step {
                ids,
                session: &mut slot.session,
                logits: *logits,
                greedy: seq.dec.greedy(),
            });
        }
        engine.model.forward_batch(&mut steps, &mut self.scratch)?;
        drop(steps);

        let mut finished = Vec::new();
        for (i, rows, logits) in plan {
            let slot = &mut self.slots[i];
            let seq = slot.seq.as_mut().expect("planned slots hold a sequence");
            match rows {
                Some(_) => {
                    seq.chunks.pop_front();
                }
                None => seq.dec.timings.decode_tokens += 1,
            }
            if !logits {
                continue;
            }
            if seq.decoding_since.is_none() {
                seq.dec.timings.prefill_s = seq.joined.elapsed().as_secs_f64();
                seq.decoding_since = Some(Instant::now());
            }
            let held = slot.session.len();
            let key = &mut seq.key;
            let next = match slot.session.take_pick() {
                Some(tok) => seq.dec.accept(engine, tok, held, |tok| on_token(key, tok)),
                None => seq.dec.pick(engine, slot.session.logits(), held, |tok| {
                    on_token(key, tok)
                }),
            };
            match next {
                Ok(tok) => seq.next = Some(tok),
                Err(reason) => finished.extend(slot.seq.take().map(|q| q.finish(reason))),
            }
        }
        Ok(finished)
    }
}

impl<K> Seq<K> {
    fn finish(mut self, reason: StopReason) -> Finished<K> {
        if let Some(t) = self.decoding_since {
            self.dec.timings.decode_s = t.elapsed().as_secs_f64();
        }
        Finished {
            key: self.key,
            generation: self.dec.finish(reason),
            cached: self.cached,
        }
    }
}
