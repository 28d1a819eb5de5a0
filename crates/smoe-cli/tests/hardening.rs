//! Issue 21's defects, one regression test each: damaged checkpoints and
//! vaults refused with the file and the tensor or key named, resumes that
//! cannot mix two checkpoints, sizes checked before allocation, tiny
//! temperatures, and a server that hostile clients cannot hold open or
//! make allocate.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::server::Server;
use common::*;
use serde_json::{json, Value};

/// The tensors of a safetensors file as owned (name, dtype, shape, bytes).
type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites `dir/model.safetensors` through `edit`.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Tensors)) {
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, v.to_string()).unwrap();
}

fn manifest(vault: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(vault.join("manifest.json")).unwrap()).unwrap()
}

fn convert_args<'a>(src: &'a Path, dst: &'a Path) -> Vec<&'a str> {
    vec![
        "convert",
        path_str(src),
        "-o",
        path_str(dst),
        "--experts",
        "q8_0",
        "--quiet",
    ]
}

/// A q8_0 vault of `fixture` at `dir/name`.
fn vault_of(fixture_dir: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    let v = dir.join(name);
    smoe_ok(&convert_args(fixture_dir, &v));
    v
}

fn logits_err(model: &Path) -> String {
    smoe_err(&["logits", "--model", path_str(model), "--ids", "1,2,3"])
}

/// Defect 1: a partial conversion of checkpoint A, resumed with checkpoint
/// B of the same config, gave layers of both and passed `verify`.
#[test]
fn resume_does_not_mix_two_checkpoints() {
    let a = copy_fixture("qwen3-moe-a");
    let b = copy_fixture("qwen3-moe-a");
    edit_tensors(b.path(), |t| {
        for (_, _, _, bytes) in t.iter_mut() {
            // The low byte of every bf16 weight: other values, same shapes.
            for x in bytes.iter_mut().step_by(2) {
                *x ^= 0x5a;
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v");
    let mut crash = convert_args(a.path(), &out);
    crash.extend(["--stop-after-layers", "1"]);
    let err = smoe_err(&crash);
    assert!(err.contains("stopped after 1"), "{err}");
    smoe_ok(&convert_args(b.path(), &out));
    let fresh = vault_of(b.path(), dir.path(), "fresh");
    let (resumed, fresh) = (manifest(&out), manifest(&fresh));
    for (r, f) in resumed["experts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(fresh["experts"].as_array().unwrap())
    {
        assert_eq!(r["crc32"], f["crc32"], "layer {} comes from B", r["layer"]);
    }
    assert_eq!(resumed["backbone"], fresh["backbone"]);
}

/// Defect 2: an expert part's shape edited in the manifest (same bytes,
/// rows and columns swapped) panicked in the matmul at run time.
#[test]
fn a_wrong_expert_shape_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault_of(&fixture("qwen3-moe-a"), dir.path(), "v");
    edit_json(&v.join("manifest.json"), |m| {
        m["experts"][1]["parts"][0]["shape"] = json!([64, 32]);
    });
    let err = smoe_err(&[
        "run",
        "--model",
        path_str(&v),
        "--ids",
        "1,2,3",
        "--max-tokens",
        "2",
    ]);
    assert!(
        err.contains("manifest.json")
            && err.contains("layer 1")
            && err.contains("gate_proj")
            && err.contains("[32, 64]"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // A checkpoint whose expert header lies about its shape: refused at
    // convert, not written into a vault that panics later.
    let src = copy_fixture("qwen3-moe-a");
    edit_tensors(src.path(), |t| {
        let e = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.2.mlp.experts.3.down_proj.weight")
            .unwrap();
        e.2.reverse();
    });
    let err = smoe_err(&convert_args(src.path(), &dir.path().join("w")));
    assert!(
        err.contains("model.layers.2.mlp.experts.3.down_proj.weight")
            && err.contains("[32, 64]")
            && err.contains("[64, 32]"),
        "{err}"
    );
}

/// Defect 3: checkpoints that do not match their config.json converted
/// with rc 0 and failed only at load.
#[test]
fn convert_checks_every_tensor_against_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let drop = |name: &'static str| move |t: &mut Tensors| t.retain(|(n, ..)| n != name);
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, Vec<&str>)> = vec![
        (
            "no-lm-head",
            Box::new(move |d| edit_tensors(d, drop("lm_head.weight"))),
            vec!["missing tensor", "lm_head.weight"],
        ),
        (
            "no-router",
            Box::new(move |d| edit_tensors(d, drop("model.layers.1.mlp.gate.weight"))),
            vec!["missing tensor", "model.layers.1.mlp.gate.weight"],
        ),
        (
            "no-norm",
            Box::new(move |d| edit_tensors(d, drop("model.norm.weight"))),
            vec!["missing tensor", "model.norm.weight"],
        ),
        (
            "no-q-norm",
            Box::new(move |d| edit_tensors(d, drop("model.layers.0.self_attn.q_norm.weight"))),
            vec!["missing tensor", "q_norm"],
        ),
        (
            "hidden-size",
            Box::new(|d| edit_json(&d.join("config.json"), |c| c["hidden_size"] = 48.into())),
            vec!["model.safetensors", "config.json implies", "48"],
        ),
        (
            "vocab-size",
            Box::new(|d| edit_json(&d.join("config.json"), |c| c["vocab_size"] = 500.into())),
            vec!["model.embed_tokens.weight", "[500, 64]"],
        ),
        (
            "transposed",
            Box::new(|d| {
                edit_tensors(d, |t| {
                    let q = t
                        .iter_mut()
                        .find(|(n, ..)| n == "model.layers.0.self_attn.k_proj.weight")
                        .unwrap();
                    q.2.reverse();
                })
            }),
            vec![
                "model.layers.0.self_attn.k_proj.weight",
                "config.json implies",
            ],
        ),
        (
            "no-experts",
            Box::new(|d| edit_json(&d.join("config.json"), |c| c["num_experts"] = 0.into())),
            vec!["config.json", "num_experts is 0"],
        ),
    ];
    for (name, damage, want) in cases {
        let src = copy_fixture("qwen3-moe-a");
        damage(src.path());
        let out = dir.path().join(name);
        let err = smoe_err(&convert_args(src.path(), &out));
        for w in want {
            assert!(err.contains(w), "{name}: {err}");
        }
        assert!(!out.exists() && !dir.path().join(format!("{name}.partial")).exists());
    }
}

/// Defect 4: a config saying 10^12 layers aborted `inspect` on an
/// allocation and made `convert` grow without bound; `--threads 100000`
/// aborted.
#[test]
fn absurd_sizes_are_refused_before_allocating() {
    let src = copy_fixture("qwen3-moe-a");
    edit_json(&src.path().join("config.json"), |c| {
        c["num_hidden_layers"] = 1_000_000_000_000u64.into()
    });
    let err = smoe_err(&["inspect", path_str(src.path())]);
    assert!(
        err.contains("config.json") && err.contains("num_hidden_layers is 1000000000000"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = smoe_err(&convert_args(src.path(), &dir.path().join("v")));
    assert!(err.contains("num_hidden_layers"), "{err}");
    let err = smoe_err(&[
        "run",
        "--model",
        path_str(&fixture("qwen3-moe-a")),
        "--ids",
        "1",
        "--threads",
        "100000",
    ]);
    assert!(err.contains("--threads 100000"), "{err}");
}

/// Defect 6: the backbone and the manifest's config were trusted: a
/// flipped byte in a router row ran with other tokens, a wrong CRC in the
/// manifest went unnoticed, and a config with fewer layers than its
/// weights ran those layers only.
#[test]
fn backbone_and_config_are_verified_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let good = vault_of(&fixture("qwen3-moe-a"), dir.path(), "good");
    let copy = |name: &str| {
        let d = dir.path().join(name);
        fs::create_dir(&d).unwrap();
        for e in fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    // Loads once, so the copies below carry a stamp of the good files.
    smoe_ok(&["logits", "--model", path_str(&good), "--ids", "1"]);
    let router = "model.layers.1.mlp.gate.weight";
    let offset = manifest(&good)["backbone"][router]["offset"]
        .as_u64()
        .unwrap() as usize;

    let v = copy("flipped");
    let mut bytes = fs::read(v.join("backbone.bin")).unwrap();
    bytes[offset + 10] ^= 0x10;
    fs::write(v.join("backbone.bin"), &bytes).unwrap();
    for args in [
        vec!["logits", "--model", path_str(&v), "--ids", "1"],
        vec![
            "run",
            "--model",
            path_str(&v),
            "--ids",
            "1",
            "--verify-experts",
        ],
    ] {
        let err = smoe_err(&args);
        assert!(
            err.contains("backbone.bin") && err.contains(router) && err.contains("CRC32"),
            "{err}"
        );
    }

    let v = copy("wrong-crc");
    edit_json(&v.join("manifest.json"), |m| {
        m["backbone"][router]["crc32"] = 12345.into();
    });
    let err = logits_err(&v);
    assert!(err.contains(router) && err.contains("00003039"), "{err}");

    // The manifest's config edited alone disagrees with the copy beside it;
    // edited in both, with the weights.
    let v = copy("fewer-layers");
    edit_json(&v.join("manifest.json"), |m| {
        m["config"]["num_hidden_layers"] = 2.into();
    });
    let err = logits_err(&v);
    assert!(
        err.contains("manifest.json") && err.contains("config.json"),
        "{err}"
    );
    edit_json(&v.join("config.json"), |c| {
        c["num_hidden_layers"] = 2.into()
    });
    let err = logits_err(&v);
    assert!(
        err.contains("num_hidden_layers is 2") && err.contains("layer 2"),
        "{err}"
    );

    let src = copy_fixture("qwen3-moe-a");
    edit_json(&src.path().join("config.json"), |c| {
        c["num_hidden_layers"] = 2.into()
    });
    for cmd in ["logits", "check"] {
        let mut args = vec![cmd, "--model", path_str(src.path())];
        if cmd == "logits" {
            args.extend(["--ids", "1"]);
        }
        // check lists it among its findings (stdout) and exits 1.
        let out = smoe(&args);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("config.json") && text.contains("num_hidden_layers is 2"),
            "{cmd}: {text}"
        );
    }
}

/// Defect 7: `--temperature 1e-40` repeated token 0; a vanishing
/// temperature is greedy.
#[test]
fn tiny_temperatures_decode_greedily() {
    let tokens = |t: &str| {
        let out = smoe_ok(&[
            "run",
            "--model",
            path_str(&fixture("qwen3-moe-a")),
            "--ids",
            "50,375,289",
            "--max-tokens",
            "8",
            "--temperature",
            t,
            "--json",
        ]);
        serde_json::from_str::<Value>(out.trim()).unwrap()["tokens"].clone()
    };
    let greedy = tokens("0");
    for t in ["1e-40", "1e-38"] {
        assert_eq!(tokens(t), greedy, "temperature {t}");
    }
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    // Far above the server's 1 s under test: on a server without read
    // timeouts the reads below time out instead of hanging the suite.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn read_all(s: &mut TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Defect 8: a half-sent request held its connection forever, and a huge
/// Content-Length was not refused before the body.
#[test]
fn the_server_does_not_wait_for_slow_or_huge_requests() {
    let server = Server::start(&["--read-timeout", "1"]);
    let mut s = connect(&server.addr);
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let closed = read_all(&mut s);
    assert!(closed.is_ok(), "half-sent headers: {closed:?}");

    let mut s = connect(&server.addr);
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"messages\":",
    )
    .unwrap();
    let reply = read_all(&mut s).unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");

    let mut s = connect(&server.addr);
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 99999999999999\r\n\r\n{",
    )
    .unwrap();
    let reply = read_all(&mut s).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 413") && reply.contains("99999999999999"),
        "{reply}"
    );
    assert_eq!(server.health()["status"], "ok");
}

/// Peak resident memory of a process, from /proc (None elsewhere).
fn peak_rss(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Defect 9: a 4 MiB prompt was tokenized whole (millions of tokens,
/// 450-600 MB) before the context check refused it.
#[test]
fn an_overlong_prompt_is_refused_without_tokenizing_it_all() {
    let server = Server::start(&[]);
    let text = "ab ".repeat(1_300_000);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": text}]}),
        ),
        ("/v1/completions", json!({"prompt": text})),
    ] {
        let r = server.post(path, &body);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    }
    let Some(peak) = peak_rss(server.pid()) else {
        eprintln!("no /proc here: peak RSS not measured");
        return;
    };
    assert!(peak < 200 << 20, "peak RSS {} MiB", peak >> 20);
    assert_eq!(server.health()["status"], "ok");
}

/// Fault injection: experts.bin cut short under a running server. Requests
/// fail alone with the file named; the server keeps answering, `/health`
/// says it is not ready and why, and once the file is whole again the same
/// request succeeds.
#[test]
fn a_vault_truncated_under_a_running_server_fails_requests_not_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault_of(&fixture(common::server::SERVE_MODEL), dir.path(), "v");
    let experts = v.join("experts.bin");
    let whole = fs::read(&experts).unwrap();
    // One slot per expert a token needs: every request reads from disk.
    let slot = manifest(&v)["experts"][0]["record_len"].as_u64().unwrap();
    let budget = (slot * 2).to_string();
    let server = Server::start_with(&v, &["--ram-budget", &budget, "--verify-experts"]);
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let before = server.post("/v1/chat/completions", &body);
    assert_eq!(before.status, 200, "{}", before.text());

    truncate_to(&experts, 4096 + slot);
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 500, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("experts.bin") && msg.contains("cut short"),
        "{msg}"
    );
    // The failed request is counted and nothing is left running.
    let health = unready_health(&server, "experts.bin");
    assert_eq!(health["generations"]["failed"], 1, "{health}");

    fs::write(&experts, &whole).unwrap();
    let after = server.post("/v1/chat/completions", &body);
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(reply_text(&after), reply_text(&before));
    assert_eq!(server.idle_health()["status"], "ok");
}

fn reply_text(r: &common::server::Reply) -> Value {
    r.json()["choices"][0]["message"]["content"].clone()
}

/// `/health` once nothing runs: 503, status "error", naming `file`.
fn unready_health(server: &Server, file: &str) -> Value {
    loop {
        let r = server.get("/health");
        let h = r.json();
        if h["queue"]["in_flight"] == 0 && h["queue"]["waiting"] == 0 {
            assert_eq!(r.status, 503, "{h}");
            assert_eq!(h["status"], "error", "{h}");
            assert!(h["error"].as_str().unwrap().contains(file), "{h}");
            return h;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fault injection: vault files cut short or overwritten (as `cp` does, in
/// place) under a running server, while it is idle. The next request fails
/// alone, naming the file, before it reads a byte of it (a backbone cut
/// short under its mapping would otherwise kill the process with SIGBUS);
/// `/health` says why it is not ready; once the file is restored the same
/// request gives the same reply. A file replaced by a rename is not the
/// one the server has open, so nothing changes.
#[test]
fn vault_files_cut_short_or_replaced_under_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture(common::server::SERVE_MODEL);
    let v = vault_of(&model, dir.path(), "v");
    // Same weights, another conversion: only the header pages differ.
    let other = vault_of(&model, dir.path(), "other");
    let server = Server::start_with(&v, &[]);
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let before = server.post("/v1/chat/completions", &body);
    assert_eq!(before.status, 200, "{}", before.text());
    for name in ["backbone.bin", "experts.bin"] {
        let path = v.join(name);
        let whole = fs::read(&path).unwrap();
        for what in ["cut short", "overwritten"] {
            if what == "cut short" {
                truncate_to(&path, whole.len() as u64 / 2);
            } else {
                fs::copy(other.join(name), &path).unwrap();
            }
            let r = server.post("/v1/chat/completions", &body);
            assert_eq!(r.status, 500, "{name} {what}: {}", r.text());
            let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(msg.contains(name) && msg.contains(what), "{msg}");
            unready_health(&server, name);
            fs::write(&path, &whole).unwrap();
            let after = server.post("/v1/chat/completions", &body);
            assert_eq!(after.status, 200, "{name} {what}: {}", after.text());
            assert_eq!(reply_text(&after), reply_text(&before), "{name} {what}");
        }
        let fresh = v.join(format!("{name}.new"));
        fs::copy(other.join(name), &fresh).unwrap();
        fs::rename(&fresh, &path).unwrap();
        let after = server.post("/v1/chat/completions", &body);
        assert_eq!(after.status, 200, "{name} renamed: {}", after.text());
        assert_eq!(reply_text(&after), reply_text(&before), "{name} renamed");
    }
    assert_eq!(server.idle_health()["status"], "ok");
}

fn truncate_to(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}
