//! Continuous batching on the committed fixtures: every sequence of a batch
//! gets exactly the tokens it gets alone, with many requests of mixed
//! lengths joining and leaving between steps, on resident and streamed
//! experts, grouped-query and latent attention, prompts longer than a
//! prefill chunk; a cancelled sequence does not disturb the others; and
//! alternating conversations each keep their slot's cache.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use smoe::batch::{Batch, Request};
use smoe::engine::{Engine, Generation, StopReason};
use smoe::memory::Footprint;
use smoe::model::{Budget, LoadOptions};
use smoe::quant::{DType, QuantType};
use smoe::sampler::SamplingParams;
use smoe::vault::convert::{convert, ConvertOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// Twelve requests: prompts of 1 to 23 ids, each starting with its own id
/// (so that no slot's cache is reused by accident), replies of 0 to 20
/// tokens, greedy and seeded sampling with a repetition penalty.
fn requests(vocab: u32) -> Vec<Request> {
    (0..12u32)
        .map(|i| {
            let len = 1 + (i * 7) % 23;
            let prompt = (0..len)
                .map(|j| (i * 37 + j * j * 11 + 3) % vocab)
                .collect();
            let params = match i % 3 {
                2 => SamplingParams {
                    temperature: 0.8,
                    top_k: 20,
                    repeat_penalty: 1.3,
                    seed: u64::from(i),
                    ..Default::default()
                },
                _ => SamplingParams::default(),
            };
            Request {
                prompt,
                params,
                max_tokens: [20, 3, 12, 0, 17, 8][i as usize % 6],
            }
        })
        .collect()
}

/// Each request alone on a fresh session.
fn alone(engine: &Engine, reqs: &[Request]) -> Vec<Generation> {
    reqs.iter()
        .map(|r| {
            let mut session = engine.new_session();
            engine
                .generate(&mut session, &r.prompt, &r.params, r.max_tokens, |_| ())
                .unwrap()
        })
        .collect()
}

/// The requests through a batch of `parallel` slots, request `i` free to
/// join from step `i / 2` on (so that they arrive while others run), and
/// `cancel` = (request, n) ending request's generation after its n-th
/// token. Every token a callback sees must be its sequence's next.
fn batched(
    engine: &Engine,
    parallel: usize,
    reqs: &[Request],
    cancel: Option<(usize, usize)>,
) -> Vec<Generation> {
    let mut batch = Batch::new(engine, parallel);
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
    let mut out: Vec<Option<Generation>> = (0..reqs.len()).map(|_| None).collect();
    let (mut next, mut step, mut most) = (0, 0, 0);
    while out.iter().any(Option::is_none) {
        while next < reqs.len() && next / 2 <= step && !batch.is_full() {
            batch.join(next, &reqs[next]).map_err(|(_, e)| e).unwrap();
            next += 1;
        }
        most = most.max(batch.len());
        let finished = batch
            .step(|&mut i, tok| {
                seen[i].push(tok);
                match cancel {
                    Some((c, n)) if c == i && seen[i].len() == n => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                }
            })
            .unwrap();
        for f in finished {
            assert_eq!(f.generation.tokens, seen[f.key], "request {}", f.key);
            assert!(out[f.key].replace(f.generation).is_none());
        }
        step += 1;
    }
    assert_eq!(most, parallel, "the batch never filled");
    out.into_iter().map(Option::unwrap).collect()
}

fn assert_same(engine: &Engine, parallel: usize, what: &str) {
    let reqs = requests(engine.config().vocab_size as u32);
    let want = alone(engine, &reqs);
    let got = batched(engine, parallel, &reqs, None);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.tokens, w.tokens,
            "{what}, parallel {parallel}: request {i}"
        );
        assert_eq!(g.stop_reason, w.stop_reason, "{what}: request {i}");
    }
}

#[test]
fn batched_sequences_get_what_they_get_alone() {
    for name in ["qwen3-moe-a", "deepseek-v2-lite", "mixtral"] {
        let engine = Engine::load(&fixture(name)).unwrap();
        for parallel in [1, 3, 5] {
            assert_same(&engine, parallel, name);
        }
    }
}

#[test]
fn prompts_longer_than_a_chunk_prefill_beside_decoding_sequences() {
    let opts = LoadOptions {
        prefill_chunk: 5,
        ..LoadOptions::default()
    };
    let engine = Engine::load_with(&fixture("qwen3-moe-a"), &opts).unwrap();
    assert_same(&engine, 4, "chunks of 5");
}

#[test]
fn streamed_experts_read_in_groups_for_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let opts = ConvertOptions {
        experts: DType::Quant(QuantType::Q8_0),
        backbone: DType::Quant(QuantType::Q8_0),
        allow_lossy: false,
        stop_after_layers: None,
    };
    convert(&fixture("qwen3-moe-a"), &vault, &opts, &mut |_| ()).unwrap();
    // 8 KiB records: 3 slots, fewer than a batch's step routes to, so a
    // layer's experts are read in groups.
    let load = LoadOptions {
        ram_budget: Budget::Bytes(24 << 10),
        ..LoadOptions::default()
    };
    let engine = Engine::load_with(&vault, &load).unwrap();
    assert_same(&engine, 4, "q8_0 vault");
    let stats = engine.cache().unwrap().stats().snapshot();
    assert!(stats.misses > 0 && stats.demand_bytes > 0, "{stats:?}");
}

#[test]
fn a_cancelled_sequence_leaves_the_others_alone() {
    let engine = Engine::load(&fixture("qwen3-moe-a")).unwrap();
    let reqs = requests(engine.config().vocab_size as u32);
    let want = alone(&engine, &reqs);
    assert!(want[0].tokens.len() > 3);
    let got = batched(&engine, 4, &reqs, Some((0, 3)));
    assert_eq!(got[0].stop_reason, StopReason::Cancelled);
    assert_eq!(got[0].tokens, want[0].tokens[..3]);
    for (i, (g, w)) in got.iter().zip(&want).enumerate().skip(1) {
        assert_eq!(g.tokens, w.tokens, "request {i}");
    }
    // And a sequence removed between steps, as a client that hung up is.
    let mut batch = Batch::new(&engine, 2);
    for i in [0, 4] {
        batch.join(i, &reqs[i]).map_err(|(_, e)| e).unwrap();
    }
    let mut four = Vec::new();
    let mut done = Vec::new();
    for step in 0.. {
        if step == 2 {
            assert_eq!(batch.cancel(|&k| k == 0), vec![0]);
        }
        done.extend(
            batch
                .step(|&mut k, tok| {
                    if k == 4 {
                        four.push(tok);
                    }
                    ControlFlow::Continue(())
                })
                .unwrap(),
        );
        if batch.is_empty() {
            break;
        }
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].key, 4);
    assert_eq!(four, want[4].tokens);
}

#[test]
fn alternating_conversations_each_keep_their_cache() {
    let engine = Engine::load(&fixture("qwen3-moe-a")).unwrap();
    let params = SamplingParams::default();
    let first = [vec![5, 17, 99, 3, 250], vec![7, 8, 9, 10, 11, 12, 13]];
    // Each conversation alone on its own session, two turns: the reference.
    let mut want = Vec::new();
    let mut turns = Vec::new();
    for p in &first {
        let mut s = engine.new_session();
        let one = engine.generate(&mut s, p, &params, 6, |_| ()).unwrap();
        let mut next = p.clone();
        next.extend(&one.tokens);
        next.extend([42, 43, 44]);
        let cached = s.reuse_prefix(&next);
        let two = engine
            .generate(&mut s, &next[cached..], &params, 6, |_| ())
            .unwrap();
        want.push((one.tokens, two.tokens, cached));
        turns.push(next);
    }
    // Both in a batch of two slots, turn by turn: A, B, then A and B again.
    let mut batch = Batch::new(&engine, 2);
    let mut run = |key: usize, prompt: &[u32]| {
        let req = Request {
            prompt: prompt.to_vec(),
            params: params.clone(),
            max_tokens: 6,
        };
        batch.join(key, &req).map_err(|(_, e)| e).unwrap();
        loop {
            let mut done = batch.step(|_, _| ControlFlow::Continue(())).unwrap();
            if let Some(f) = done.pop() {
                return (f.generation.tokens, f.cached);
            }
        }
    };
    let a1 = run(0, &first[0]);
    let b1 = run(1, &first[1]);
    let a2 = run(0, &turns[0]);
    let b2 = run(1, &turns[1]);
    for (conv, (one, two)) in [(a1, a2), (b1, b2)].into_iter().enumerate() {
        let (w1, w2, cached) = &want[conv];
        assert_eq!(&one.0, w1, "conversation {conv}, turn 1");
        assert_eq!(&two.0, w2, "conversation {conv}, turn 2");
        assert_eq!(two.1, *cached, "conversation {conv}: its cache was kept");
        assert!(*cached >= first[conv].len());
    }
}

#[test]
fn a_request_that_cannot_run_is_handed_back() {
    let engine = Engine::load(&fixture("qwen3-moe-a")).unwrap();
    let mut batch = Batch::new(&engine, 1);
    let bad = Request {
        prompt: vec![1, 2, 100_000],
        params: SamplingParams::default(),
        max_tokens: 4,
    };
    let (key, err) = batch.join("bad", &bad).unwrap_err();
    assert_eq!(key, "bad");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert!(batch.is_empty());
    let ok = Request {
        prompt: vec![1, 2, 3],
        ..bad
    };
    batch.join("ok", &ok).map_err(|(_, e)| e).unwrap();
    let (key, err) = batch.join("late", &ok).unwrap_err();
    assert_eq!(key, "late");
    assert!(err.to_string().contains("slot"), "{err}");
}

#[test]
fn the_memory_plan_holds_a_kv_cache_per_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let opts = ConvertOptions {
        experts: DType::Quant(QuantType::Q8_0),
        backbone: DType::BF16,
        allow_lossy: false,
        stop_after_layers: None,
    };
    convert(&fixture("qwen3-moe-a"), &vault, &opts, &mut |_| ()).unwrap();
    let opts = |parallel| LoadOptions {
        ctx: 512,
        parallel,
        ..LoadOptions::default()
    };
    let (one, four) = (
        Footprint::of(&vault, &opts(1)).unwrap(),
        Footprint::of(&vault, &opts(4)).unwrap(),
    );
    assert_eq!((one.sequences, four.sequences), (1, 4));
    assert!(one.kv_bytes > 0);
    assert_eq!(four.kv_bytes, 4 * one.kv_bytes);
    assert!(four.activation_bytes > one.activation_bytes);
    // Memory for the backbone, four caches, a batch's activations, the
    // headroom and a few slots: one sequence leaves room to cache every
    // expert, four do not.
    let avail = smoe::memory::headroom(0)
        + one.resident_bytes
        + four.kv_bytes
        + four.activation_bytes
        + 12 * one.slot_bytes;
    let (one, four) = (
        one.plan(Budget::Auto, Some(avail)).unwrap(),
        four.plan(Budget::Auto, Some(avail)).unwrap(),
    );
    assert_eq!(four.kv_bytes, 4 * one.kv_bytes);
    assert!(one.cache_slots > 12, "{one:?}");
    assert_eq!(four.cache_slots, 12, "{four:?}");
}
