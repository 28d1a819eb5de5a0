//! The engine on the committed fixtures: KV-cached prefill in pieces equals
//! one batched pass, every weight dtype gives the same model, and generation
//! stops where it should.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use smoe::engine::{Engine, StopReason};
use smoe::model::Logits;
use smoe::sampler::SamplingParams;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn ref_logits(r: &Value) -> Vec<Vec<f32>> {
    r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn prefill_in_pieces_equals_one_batch() {
    for name in ["qwen3-moe-a", "qwen3-moe-b"] {
        let engine = Engine::load(&fixture(name)).unwrap();
        let r = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let want = ref_logits(&r);
        let vocab = engine.config().vocab_size;
        let mut session = engine.new_session();
        // 5 tokens, then 1 (decode path), then the rest as a batch.
        let mut pos = 0;
        for piece in [&prompt[..5], &prompt[5..6], &prompt[6..]] {
            let out = engine
                .model()
                .forward(piece, &mut session, Logits::All)
                .unwrap();
            for (i, row) in out.chunks(vocab).enumerate() {
                let d = max_diff(row, &want[pos + i]);
                assert!(d < 1e-3, "{name}: position {} differs by {d}", pos + i);
            }
            pos += piece.len();
        }
        assert_eq!(session.len(), prompt.len());
    }
}

/// Rewrites every tensor of a checkpoint in another dtype.
fn convert(src: &Path, dst: &Path, dtype: Dtype) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !name.ends_with(".safetensors") {
            std::fs::copy(entry.path(), dst.join(&name)).unwrap();
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for (tname, view) in st.iter() {
            assert_eq!(view.dtype(), Dtype::BF16);
            let vals = view
                .data()
                .chunks(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32());
            let data: Vec<u8> = match dtype {
                Dtype::F32 => vals.flat_map(f32::to_le_bytes).collect(),
                Dtype::F16 => vals.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
                other => panic!("unsupported {other:?}"),
            };
            out.push((tname.to_string(), data, view.shape().to_vec()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = out
            .iter()
            .map(|(n, d, s)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dst.join(&name)).unwrap();
    }
}

#[test]
fn f32_and_f16_checkpoints_give_the_same_model() {
    for name in ["qwen3-moe-a", "qwen3-moe-b"] {
        let r = reference(name);
        let prompt = ids(&r["prompt_ids"]);
        let want = ref_logits(&r);
        // f32 holds bf16 exactly: same tolerance as bf16. f16 has more
        // mantissa but less range: the smallest weights lose bits, which on
        // logits of magnitude ~30 stays well under 5e-2.
        for (dtype, tol) in [(Dtype::F32, 1e-3), (Dtype::F16, 5e-2)] {
            let dir = tempfile::tempdir().unwrap();
            convert(&fixture(name), dir.path(), dtype);
            let engine = Engine::load(dir.path()).unwrap();
            let mut session = engine.new_session();
            let out = engine
                .model()
                .forward(&prompt, &mut session, Logits::All)
                .unwrap();
            let vocab = engine.config().vocab_size;
            for (p, row) in out.chunks(vocab).enumerate() {
                let d = max_diff(row, &want[p]);
                assert!(d < tol, "{name} {dtype:?}: position {p} differs by {d}");
            }
        }
    }
}

#[test]
fn generation_stops_on_every_eos_id() {
    let name = "qwen3-moe-a";
    let mut engine = Engine::load(&fixture(name)).unwrap();
    // generation_config.json lists [<|im_end|>, <|endoftext|>]; the
    // tokenizer's eos is <|im_end|>: two distinct ids.
    let tok = engine.tokenizer().unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(engine.eos_ids(), [im_end, eot]);

    let r = reference(name);
    let prompt = ids(&r["prompt_ids"]);
    let greedy = ids(&r["greedy_ids"]);
    engine.set_eos_ids(vec![greedy[6]]);
    let mut session = engine.new_session();
    let mut streamed = Vec::new();
    let gen = engine
        .generate(
            &mut session,
            &prompt,
            &SamplingParams::default(),
            100,
            |t| streamed.push(t),
        )
        .unwrap();
    let first = greedy.iter().position(|&t| t == greedy[6]).unwrap();
    assert_eq!(gen.stop_reason, StopReason::Eos);
    assert_eq!(gen.tokens, greedy[..=first]);
    assert_eq!(streamed, gen.tokens);

    let mut session = engine.new_session();
    let gen = engine
        .generate(&mut session, &prompt, &SamplingParams::default(), 3, |_| {})
        .unwrap();
    assert_eq!((gen.stop_reason, gen.tokens.len()), (StopReason::Length, 3));
}

#[test]
fn integer_eos_in_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("qwen3-moe-b")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 400}"#,
    )
    .unwrap();
    let engine = Engine::load(dir.path()).unwrap();
    let im_end = engine
        .tokenizer()
        .unwrap()
        .token_to_id("<|im_end|>")
        .unwrap();
    assert_eq!(engine.eos_ids(), [400, im_end]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let engine = Engine::load(&fixture("qwen3-moe-a")).unwrap();
    let prompt = ids(&reference("qwen3-moe-a")["prompt_ids"]);
    let run = |seed| {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed,
            ..Default::default()
        };
        let mut s = engine.new_session();
        engine
            .generate(&mut s, &prompt, &params, 24, |_| {})
            .unwrap()
            .tokens
    };
    assert_eq!(run(7), run(7));
    assert_ne!(
        run(7),
        run(8),
        "different seeds should (almost surely) differ over 24 tokens"
    );
}
