//! The bad-input corpus: damaged copies of a committed fixture checkpoint
//! and of a vault converted from it, made at test time (dropped, reshaped
//! and retyped tensors, truncated and bit-flipped files, config and
//! manifest edits). Each must be refused with an error that names a file,
//! or load and run correctly: never panic, never hang.

use std::fs;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

mod support;

use serde_json::{json, Value};
use smoe::model::{Budget, LoadOptions, Logits};
use smoe::vault::convert::convert;
use support::{fixture, q8_0_options, q8_0_vault};

/// Deterministic choices (splitmix64), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

type Damage = Box<dyn Fn(&Path) + Send>;

struct Case {
    name: String,
    /// Whether the damaged directory is a vault (else a checkpoint).
    vault: bool,
    damage: Damage,
}

fn case(name: impl Into<String>, vault: bool, damage: impl Fn(&Path) + Send + 'static) -> Case {
    Case {
        name: name.into(),
        vault,
        damage: Box::new(damage),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, v.to_string()).unwrap();
}

/// The safetensors header (JSON) of `dir/model.safetensors` through `edit`,
/// the data left as it is: headers that lie about the bytes behind them.
fn edit_header(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    // Keep the data where it was: pad the header to its old length where
    // it shrank (safetensors allows trailing spaces).
    if text.len() < n {
        text.resize(n, b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(&path, out).unwrap();
}

fn truncate(path: &Path, len: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len).unwrap();
}

fn flip(path: &Path, at: usize, mask: u8) {
    let mut bytes = fs::read(path).unwrap();
    let at = at % bytes.len();
    bytes[at] ^= mask;
    fs::write(path, bytes).unwrap();
}

fn checkpoint_cases(src: &Path, rng: &mut Rng) -> Vec<Case> {
    let st_path = src.join("model.safetensors");
    let bytes = fs::read(&st_path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort();
    let size = bytes.len() as u64;
    let mut cases = Vec::new();

    // Every non-expert tensor dropped, and a sample of the experts.
    for name in names.iter().filter(|n| !n.contains(".experts.")) {
        let t = name.clone();
        cases.push(case(format!("drop {t}"), false, move |d| {
            edit_header(d, |h| {
                h.remove(&t);
            })
        }));
    }
    let experts: Vec<&String> = names.iter().filter(|n| n.contains(".experts.")).collect();
    for _ in 0..12 {
        let t = experts[rng.below(experts.len())].clone();
        cases.push(case(format!("drop {t}"), false, move |d| {
            edit_header(d, |h| {
                h.remove(&t);
            })
        }));
    }
    // Shapes that lie: reversed, one dimension off (data too short or too
    // long for it), and an extra dimension.
    for _ in 0..24 {
        let t = names[rng.below(names.len())].clone();
        let how = rng.below(3);
        cases.push(case(format!("reshape {how} {t}"), false, move |d| {
            edit_header(d, |h| {
                let shape = h[&t]["shape"].as_array_mut().unwrap();
                match how {
                    0 => shape.reverse(),
                    1 => {
                        let x = shape[0].as_u64().unwrap();
                        shape[0] = json!(x + 1);
                    }
                    _ => shape.push(json!(1)),
                }
            })
        }));
    }
    // Other dtypes over the same bytes, and offsets out of their file.
    for (i, dtype) in ["F32", "F16", "I8", "F8_E4M3", "BOOL", "U64"]
        .into_iter()
        .enumerate()
    {
        let t = names[(i * 17) % names.len()].clone();
        cases.push(case(format!("dtype {dtype} {t}"), false, move |d| {
            edit_header(d, |h| h[&t]["dtype"] = json!(dtype))
        }));
    }
    for (i, offsets) in [[0u64, 1 << 40], [7, 3], [u64::MAX - 1, u64::MAX], [0, 0]]
        .into_iter()
        .enumerate()
    {
        let t = names[(i * 29 + 3) % names.len()].clone();
        cases.push(case(format!("offsets {offsets:?} {t}"), false, move |d| {
            edit_header(d, |h| h[&t]["data_offsets"] = json!(offsets))
        }));
    }
    // Truncations: inside the length prefix, the header, the data.
    for len in [0, 4, 8, 100, n as u64, n as u64 + 8, size / 2, size - 1] {
        cases.push(case(
            format!("truncate safetensors to {len}"),
            false,
            move |d| truncate(&d.join("model.safetensors"), len),
        ));
    }
    // Flipped bytes in the header text, and in the length prefix.
    for _ in 0..16 {
        let at = 8 + rng.below(n);
        let mask = 1u8 << rng.below(8);
        cases.push(case(format!("flip header byte {at}"), false, move |d| {
            flip(&d.join("model.safetensors"), at, mask)
        }));
    }
    for at in [0, 3, 7] {
        cases.push(case(format!("flip length byte {at}"), false, move |d| {
            flip(&d.join("model.safetensors"), at, 0x80)
        }));
    }
    // Config values: zero, one, absurd, negative, wrong type, missing.
    let keys = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "intermediate_size",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "decoder_sparse_step",
    ];
    let values = [
        json!(0),
        json!(1),
        json!(1u64 << 62),
        json!(-3),
        json!("64"),
        json!(null),
        json!(2.5),
    ];
    for key in keys {
        for v in &values {
            let v = v.clone();
            cases.push(case(format!("config {key} = {v}"), false, move |d| {
                edit_json(&d.join("config.json"), |c| c[key] = v.clone())
            }));
        }
        cases.push(case(format!("config without {key}"), false, move |d| {
            edit_json(&d.join("config.json"), |c| {
                c.as_object_mut().unwrap().remove(key);
            })
        }));
    }
    for (what, text) in [
        ("empty", ""),
        ("not json", "{\"model_type\": "),
        ("array", "[1, 2]"),
        ("other family", "{\"model_type\": \"llama\"}"),
    ] {
        cases.push(case(format!("config {what}"), false, move |d| {
            fs::write(d.join("config.json"), text).unwrap()
        }));
    }
    cases.push(case("no config.json", false, |d| {
        fs::remove_file(d.join("config.json")).unwrap()
    }));
    cases.push(case("no model.safetensors", false, |d| {
        fs::remove_file(d.join("model.safetensors")).unwrap()
    }));
    cases.push(case("index naming a missing shard", false, |d| {
        fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"lm_head.weight": "model-00002.safetensors"}}"#,
        )
        .unwrap()
    }));
    cases.push(case("index escaping the directory", false, |d| {
        fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"lm_head.weight": "../model.safetensors"}}"#,
        )
        .unwrap()
    }));
    cases
}

/// An edit of one part of a manifest.
type Edit = fn(&mut Value);

fn vault_cases(good: &Path, rng: &mut Rng) -> Vec<Case> {
    let manifest: Value =
        serde_json::from_str(&fs::read_to_string(good.join("manifest.json")).unwrap()).unwrap();
    let backbone_len = fs::metadata(good.join("backbone.bin")).unwrap().len();
    let experts_len = fs::metadata(good.join("experts.bin")).unwrap().len();
    let tensors: Vec<String> = manifest["backbone"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut cases = Vec::new();

    for (file, len) in [("backbone.bin", backbone_len), ("experts.bin", experts_len)] {
        for cut in [0, 100, 4096, len / 3, len / 2, len - 4096, len - 1] {
            cases.push(case(format!("truncate {file} to {cut}"), true, move |d| {
                truncate(&d.join(file), cut)
            }));
        }
        for _ in 0..8 {
            let at = 4096 + rng.below((len - 4096) as usize);
            let mask = 1u8 << rng.below(8);
            cases.push(case(format!("flip {file} byte {at}"), true, move |d| {
                flip(&d.join(file), at, mask)
            }));
        }
        cases.push(case(format!("flip {file} header"), true, move |d| {
            flip(&d.join(file), 20, 0x01)
        }));
        cases.push(case(format!("no {file}"), true, move |d| {
            fs::remove_file(d.join(file)).unwrap()
        }));
    }
    // Backbone entries: offsets, lengths, shapes, types, checksums.
    for _ in 0..20 {
        let t = tensors[rng.below(tensors.len())].clone();
        let how = rng.below(7);
        cases.push(case(format!("backbone entry {how} {t}"), true, move |d| {
            edit_json(&d.join("manifest.json"), |m| {
                let e = &mut m["backbone"][&t];
                match how {
                    0 => e["offset"] = json!(e["offset"].as_u64().unwrap() + 1),
                    1 => e["offset"] = json!(u64::MAX - 10),
                    2 => e["len"] = json!(e["len"].as_u64().unwrap() * 2),
                    3 => e["shape"].as_array_mut().unwrap().reverse(),
                    4 => e["dtype"] = json!("q3_x"),
                    5 => e["crc32"] = json!(e["crc32"].as_u64().unwrap() ^ 1),
                    _ => e["shape"] = json!([]),
                }
            })
        }));
    }
    // Expert layers: parts, record lengths, offsets, counts.
    let edits: Vec<(&str, Edit)> = vec![
        ("part shape swapped", |l| {
            l["parts"][0]["shape"].as_array_mut().unwrap().reverse()
        }),
        ("part shape doubled", |l| {
            l["parts"][2]["shape"][0] = json!(l["parts"][2]["shape"][0].as_u64().unwrap() * 2)
        }),
        ("part offset past record", |l| {
            l["parts"][1]["offset"] = json!(1u64 << 40)
        }),
        ("part len huge", |l| l["parts"][1]["len"] = json!(u64::MAX)),
        // Found by the vault_manifest fuzz target: a misaligned part
        // panicked in the quantized matmul.
        ("part offset unaligned", |l| {
            l["parts"][2]["offset"] = json!(l["parts"][2]["offset"].as_u64().unwrap() + 1)
        }),
        ("part dtype unknown", |l| {
            l["parts"][0]["dtype"] = json!("f8")
        }),
        ("part dtype other", |l| {
            l["parts"][0]["dtype"] = json!("q4_0")
        }),
        ("record_len 0", |l| l["record_len"] = json!(0)),
        ("record_len unaligned", |l| {
            l["record_len"] = json!(l["record_len"].as_u64().unwrap() + 8)
        }),
        ("record_len huge", |l| l["record_len"] = json!(u64::MAX / 2)),
        ("offset unaligned", |l| {
            l["offsets"][3] = json!(l["offsets"][3].as_u64().unwrap() + 512)
        }),
        ("offset past the file", |l| {
            l["offsets"][0] = json!(1u64 << 50)
        }),
        ("offset overflowing", |l| l["offsets"][1] = json!(u64::MAX)),
        ("one expert fewer", |l| {
            l["offsets"].as_array_mut().unwrap().pop();
            l["crc32"].as_array_mut().unwrap().pop();
        }),
        ("checksums fewer", |l| {
            l["crc32"].as_array_mut().unwrap().pop();
        }),
        ("checksum wrong", |l| l["crc32"][2] = json!(7)),
        ("layer renumbered", |l| l["layer"] = json!(9)),
        ("parts missing", |l| l["parts"] = json!([])),
    ];
    for (what, f) in edits {
        for layer in [0, 2] {
            cases.push(case(
                format!("expert layer {layer}: {what}"),
                true,
                move |d| edit_json(&d.join("manifest.json"), |m| f(&mut m["experts"][layer])),
            ));
        }
    }
    let top: Vec<(&str, Edit)> = vec![
        ("format", |m| m["format"] = json!("gguf")),
        ("version", |m| m["version"] = json!(1000)),
        ("conversion_id", |m| m["conversion_id"] = json!("other")),
        ("no experts", |m| m["experts"] = json!([])),
        ("layer dropped", |m| {
            m["experts"].as_array_mut().unwrap().remove(1);
        }),
        ("config layers", |m| {
            m["config"]["num_hidden_layers"] = json!(2)
        }),
        ("config hidden", |m| m["config"]["hidden_size"] = json!(32)),
        ("config experts", |m| m["config"]["num_experts"] = json!(16)),
        ("config layers huge", |m| {
            m["config"]["num_hidden_layers"] = json!(1u64 << 40)
        }),
        ("config not object", |m| m["config"] = json!(3)),
        ("backbone not object", |m| m["backbone"] = json!([])),
        ("architecture", |m| m["architecture"] = json!("llama")),
    ];
    for (what, f) in top {
        cases.push(case(format!("manifest {what}"), true, move |d| {
            edit_json(&d.join("manifest.json"), f)
        }));
    }
    for (what, text) in [("empty", ""), ("cut", "{\"format\": \"smoe-vault\", ")] {
        cases.push(case(format!("manifest {what}"), true, move |d| {
            fs::write(d.join("manifest.json"), text).unwrap()
        }));
    }
    cases.push(case("config.json edited beside the manifest", true, |d| {
        edit_json(&d.join("config.json"), |c| c["vocab_size"] = json!(449))
    }));
    cases
}

const IDS: [u32; 6] = [50, 375, 289, 7, 400, 12];

fn options() -> LoadOptions {
    LoadOptions {
        ram_budget: Budget::Bytes(64 << 20),
        verify_experts: true,
        read_threads: 2,
        ..LoadOptions::default()
    }
}

/// Loads `dir` and runs the prompt: the last position's logits.
fn run(dir: &Path) -> smoe::Result<Vec<f32>> {
    let opened = smoe::model::open(dir, &options())?;
    let mut session = opened.model.new_session();
    let logits = opened.model.forward(&IDS, &mut session, Logits::Last)?;
    Ok(logits.to_vec())
}

/// What became of one damaged input.
enum Outcome {
    Refused(String),
    Ran(Vec<f32>),
}

/// Runs `f` on its own thread: a panic or a hang is reported, not fatal.
fn guarded<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(format!("{name}: panicked")),
        Err(_) => Err(format!("{name}: hung (no answer in 120 s)")),
    }
}

/// An error is clear when it is one line and names the file at fault (or
/// the damaged directory, with the tensor it lacks), or, for a prompt the
/// damaged config leaves no room for, the limit it is over.
fn clear(msg: &str, dir: &Path) -> bool {
    !msg.contains('\n')
        && [
            "config.json",
            "model.safetensors",
            "manifest.json",
            "backbone.bin",
            "experts.bin",
            "max_position_embeddings",
            dir.to_str().unwrap(),
        ]
        .iter()
        .any(|f| msg.contains(f))
}

#[test]
fn damaged_checkpoints_and_vaults_are_refused_or_run_correctly() {
    let work = tempfile::tempdir().unwrap();
    let src = fixture("qwen3-moe-a");
    let good_vault = work.path().join("good-vault");
    q8_0_vault(&src, &good_vault);
    let opts = q8_0_options();
    let want_ckpt = run(&src).unwrap();
    let want_vault = run(&good_vault).unwrap();

    let mut rng = Rng(21);
    let mut cases = checkpoint_cases(&src, &mut rng);
    let n_ckpt = cases.len();
    cases.extend(vault_cases(&good_vault, &mut rng));
    assert!(cases.len() >= 150, "{} cases", cases.len());

    let mut problems = Vec::new();
    let (mut refused, mut ran) = (0, 0);
    for (i, c) in cases.into_iter().enumerate() {
        let dir = work.path().join(format!("case-{i}"));
        copy_dir(if c.vault { &good_vault } else { &src }, &dir);
        (c.damage)(&dir);
        let name = c.name.clone();
        let d = dir.clone();
        let outcome = guarded(&name, move || match run(&d) {
            Ok(logits) => Outcome::Ran(logits),
            Err(e) => Outcome::Refused(e.to_string()),
        });
        let want = if c.vault { &want_vault } else { &want_ckpt };
        match outcome {
            Err(p) => problems.push(p),
            Ok(Outcome::Refused(msg)) => {
                refused += 1;
                if !clear(&msg, &dir) {
                    problems.push(format!("{name}: unclear error: {msg}"));
                }
            }
            // Loading what is intact must give the model's own logits.
            // Config values (rope_theta, eps, a longer context) may change
            // them, and so may a tensor relabelled as another float type of
            // the same width (a legitimate mixed-dtype checkpoint, as far
            // as anyone can tell): those are checked only to run.
            Ok(Outcome::Ran(logits)) => {
                ran += 1;
                let may_differ = name.starts_with("config ") || name.starts_with("dtype ");
                if !may_differ && &logits != want {
                    problems.push(format!("{name}: ran with different logits"));
                }
            }
        }
        // Converting a damaged checkpoint: refused, or a vault that runs.
        if !c.vault {
            let out = work.path().join(format!("case-{i}-vault"));
            let (d, o, opts) = (dir.clone(), out.clone(), opts.clone());
            let name = format!("convert {name}");
            match guarded(&name, move || convert(&d, &o, &opts, &mut |_| {})) {
                Err(p) => problems.push(p),
                Ok(Err(e)) if !clear(&e.to_string(), &dir) => {
                    problems.push(format!("{name}: unclear error: {e}"))
                }
                Ok(Err(_)) => {}
                Ok(Ok(_)) => {
                    if let Err(p) = guarded(&name, move || run(&out).map(drop)) {
                        problems.push(p);
                    }
                }
            }
        }
    }
    eprintln!(
        "{} checkpoint and {} vault cases: {refused} refused, {ran} ran",
        n_ckpt,
        refused + ran - n_ckpt
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
