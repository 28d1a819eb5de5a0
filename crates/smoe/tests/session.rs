//! Sessions across turns: a conversation that reuses the cached prefix
//! continues exactly as a fresh prefill of the whole would, a callback can
//! stop generation, and a cache the engine did not fill is never trusted.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use smoe::engine::{Engine, StopReason};
use smoe::model::Logits;
use smoe::sampler::SamplingParams;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn greedy(
    engine: &Engine,
    session: &mut smoe::model::Session,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    engine
        .generate(session, prompt, &SamplingParams::default(), n, |_| ())
        .unwrap()
        .tokens
}

#[test]
fn reusing_a_prefix_continues_exactly_like_a_fresh_prefill() {
    // Grouped-query caches, a sliding window (mixtral) and latent caches
    // (deepseek) all truncate to a shared prefix.
    for name in ["qwen3-moe-a", "qwen3-moe-b", "mixtral", "deepseek-v3"] {
        let engine = Engine::load(&fixture(name)).unwrap();
        let turn1: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 400).collect();
        let mut session = engine.new_session();
        let reply = greedy(&engine, &mut session, &turn1, 8);
        let held = session.tokens().unwrap().to_vec();
        assert_eq!(held.len(), turn1.len() + reply.len() - 1);
        assert_eq!(held[..turn1.len()], turn1[..]);

        // The next turn shares the first 30 ids, then differs.
        let mut turn2 = turn1[..30].to_vec();
        turn2.extend((0..25).map(|i| (i * 11 + 5) % 400));
        let reused = session.reuse_prefix(&turn2);
        assert_eq!(reused, 30);
        assert_eq!(session.len(), 30);
        let continued = greedy(&engine, &mut session, &turn2[reused..], 8);
        let fresh = greedy(&engine, &mut engine.new_session(), &turn2, 8);
        assert_eq!(continued, fresh, "{name}");

        // The logits themselves, not just the argmax, to float rounding
        // (a prefix computed inside a longer batch groups its rows
        // differently).
        let mut reusing = engine.new_session();
        greedy(&engine, &mut reusing, &turn1, 8);
        let reused = reusing.reuse_prefix(&turn2);
        let a = engine
            .model()
            .forward(&turn2[reused..], &mut reusing, Logits::Last)
            .unwrap()
            .to_vec();
        let mut whole = engine.new_session();
        let b = engine
            .model()
            .forward(&turn2, &mut whole, Logits::Last)
            .unwrap()
            .to_vec();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-3, "{name}: logits differ by {diff}");
    }
}

#[test]
fn the_same_conversation_again_prefills_one_token() {
    let engine = Engine::load(&fixture("qwen3-moe-a")).unwrap();
    let prompt: Vec<u32> = (0..20).collect();
    let mut session = engine.new_session();
    greedy(&engine, &mut session, &prompt, 1);
    // The last id is always left to process: its logits start the reply.
    assert_eq!(session.reuse_prefix(&prompt), prompt.len() - 1);
    assert_eq!(session.reuse_prefix(&[5, 6]), 0);
    assert!(session.is_empty());
}

#[test]
fn on_token_can_stop_generation() {
    let engine = Engine::load(&fixture("qwen3-moe-a")).unwrap();
    let prompt: Vec<u32> = (0..16).collect();
    let mut session = engine.new_session();
    let mut seen = 0;
    let gen = engine
        .generate(
            &mut session,
            &prompt,
            &SamplingParams::default(),
            50,
            |_| {
                seen += 1;
                if seen == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
    assert_eq!(gen.stop_reason, StopReason::Cancelled);
    assert_eq!(gen.stop_reason.as_str(), "cancelled");
    assert_eq!(gen.tokens.len(), 3);
    // The last token was chosen but not fed back.
    assert_eq!(session.tokens().unwrap().len(), prompt.len() + 2);
}

#[test]
fn a_cache_filled_behind_the_engines_back_is_not_reused() {
    let engine = Engine::load(&fixture("qwen3-moe-a")).unwrap();
    let prompt: Vec<u32> = (0..16).collect();
    let mut session = engine.new_session();
    greedy(&engine, &mut session, &prompt, 2);
    engine
        .model()
        .forward(&[7, 8], &mut session, Logits::Last)
        .unwrap();
    assert_eq!(session.tokens(), None);
    assert_eq!(session.reuse_prefix(&prompt), 0);
    assert!(session.is_empty());
    // Known again once emptied.
    greedy(&engine, &mut session, &prompt, 2);
    assert_eq!(session.tokens().map(<[u32]>::len), Some(prompt.len() + 1));
}
