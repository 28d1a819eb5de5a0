//! `smoe plan` on the published configs, on a vault against the config it
//! came from, and on bad input (a GGUF is planned in the library's tests,
//! which build GGUFs from the fixtures).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn config(name: &str) -> PathBuf {
    fixture("configs").join(name).join("config.json")
}

fn plan_json(args: &[&str]) -> Value {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&smoe_ok(&all)).expect("plan --json prints one JSON object")
}

const GIVEN: [&str; 6] = ["--disk-gbps", "6", "--mem-gbps", "100", "--cores", "8"];

#[test]
fn published_configs_give_plans_of_their_published_size() {
    // (fixture, published parameters in billions): the bf16 checkpoint is
    // twice that in bytes.
    for (name, published) in [
        ("Qwen3-235B-A22B", 235.1),
        ("Qwen3-30B-A3B", 30.5),
        ("Qwen3-Coder-480B-A35B", 480.2),
        ("DeepSeek-V3", 671.0),
        ("Mixtral-8x7B", 46.7),
        ("OLMoE-1B-7B", 6.92),
    ] {
        let path = config(name);
        let mut args = vec![path_str(&path), "--ram", "1TiB"];
        args.extend(GIVEN);
        let p = plan_json(&args);
        let bf16 = p["model"]["bf16_bytes"].as_f64().unwrap() / 1e9;
        assert!(
            (bf16 / (2.0 * published) - 1.0).abs() < 0.02,
            "{name}: {bf16:.1} GB in bf16, published {published} B parameters"
        );
        // q4_k experts are 4.5 bits a weight, padding aside.
        let experts: f64 = p["model"]["expert_bytes"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        let ratio = experts / (p["model"]["params"].as_f64().unwrap() * 4.5 / 8.0);
        assert!(ratio > 0.8 && ratio < 1.02, "{name}: experts {experts}");
        let f = &p["forecast"];
        for k in ["decode_tok_s", "prefill_tok_s", "ttft_s"] {
            let (lo, hi) = (
                f[k]["low"].as_f64().unwrap(),
                f[k]["high"].as_f64().unwrap(),
            );
            assert!(
                lo > 0.0 && lo <= hi && hi.is_finite(),
                "{name} {k}: {lo}-{hi}"
            );
        }
        assert!(f["decode_limit"].as_str().is_some_and(|s| !s.is_empty()));
        let hit = p["locality"]["hit_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&hit), "{name}: hit rate {hit}");
    }
}

/// A matrix larger than this machine's memory and swap is listed in
/// address space the kernel does not charge: `smoe plan` once refused a
/// config with one on a host without overcommit ("mapping 137438953472
/// bytes of address space: Cannot allocate memory").
#[test]
fn a_config_larger_than_this_machine_is_planned() {
    let dir = tempfile::tempdir().unwrap();
    let mut wide: Value =
        serde_json::from_str(&fs::read_to_string(config("Qwen3-235B-A22B")).unwrap()).unwrap();
    // Each expert matrix 2^24 x 4096 = 2^36 elements, 128 GiB as bf16.
    wide["moe_intermediate_size"] = (1u64 << 24).into();
    fs::write(dir.path().join("config.json"), wide.to_string()).unwrap();
    let path = dir.path().join("config.json");
    let mut args = vec![path_str(&path), "--ram", "4096TiB"];
    args.extend(GIVEN);
    let plan = plan_json(&args);
    let experts = plan["model"]["expert_bytes"]["q4_k"].as_f64().unwrap();
    // 94 layers x 128 experts x 3 matrices of 2^36 q4_k weights (4.5 bits).
    let expected = 94.0 * 128.0 * 3.0 * (1u64 << 36) as f64 * 4.5 / 8.0;
    assert!(
        (experts / expected - 1.0).abs() < 0.01,
        "{experts} expert bytes, expected about {expected}"
    );
}

#[test]
fn a_vault_is_planned_exactly_as_its_config_predicted() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let src = fixture("qwen3-moe-a");
    smoe_ok(&[
        "convert",
        path_str(&src),
        "-o",
        path_str(&vault),
        "--experts",
        "q8_0",
        "--quiet",
    ]);
    let mut args = vec![path_str(&vault), "--ram", "8GiB"];
    args.extend(GIVEN);
    let stored = plan_json(&args);
    let mut args = vec![path_str(&src), "--ram", "8GiB", "--quant", "q8_0"];
    args.extend(GIVEN);
    let predicted = plan_json(&args);
    assert_eq!(stored["model"]["source"], "vault");
    for k in [
        "backbone_bytes",
        "embedding_on_disk_bytes",
        "expert_bytes",
        "expert_record_bytes",
        "expert_records",
        "params",
    ] {
        assert_eq!(stored["model"][k], predicted["model"][k], "{k}");
    }
    assert_eq!(stored["memory"], predicted["memory"]);
}

#[test]
fn a_target_machine_comes_from_toml_and_flags_override_it() {
    let path = config("Qwen3-235B-A22B");
    let machine = fixture("machines").join("laptop-48gb.toml");
    let p = plan_json(&[
        path_str(&path),
        "--machine",
        path_str(&machine),
        "--disk-gbps",
        "5",
    ]);
    let m = &p["machine"];
    assert_eq!(m["ram_bytes"], 48_000_000_000u64);
    assert_eq!(m["disk_gbps"], 5.0);
    assert_eq!(m["mem_gbps"], 273.0);
    assert_eq!(m["measured"], false);
    let budget = plan_json(&[
        path_str(&path),
        "--machine",
        path_str(&machine),
        "--ram-budget",
        "10%",
    ]);
    let f = budget["memory"]["ram"]["expert_fraction"].as_f64().unwrap();
    assert!((f - 0.1).abs() < 0.001, "{f}");
}

/// `--device cuda`: VRAM filled as `run --device cuda --vram-budget auto`
/// fills it (backbone, KV, headroom, then whole layers' experts), the rest
/// streamed; more VRAM or a faster bus never forecasts slower.
#[test]
fn a_gpu_plan_places_whole_layers_in_vram_and_streams_the_rest() {
    let path = config("Qwen3-235B-A22B");
    let gpu = |vram: &str, pcie: &str| {
        let mut args = vec![path_str(&path), "--ram", "128GB"];
        args.extend(GIVEN);
        args.extend(["--device", "cuda", "--vram", vram, "--pcie-gbps", pcie]);
        plan_json(&args)
    };
    let p = gpu("24GB", "25");
    assert_eq!(p["device"], "cuda");
    let v = &p["memory"]["vram"];
    let n = |x: &Value| x.as_u64().unwrap();
    let records = n(&p["model"]["expert_records"]);
    let layer = n(&p["model"]["expert_record_bytes"]) * records / 94;
    let fixed = n(&v["backbone_bytes"]) + n(&v["kv_bytes"]) + n(&v["headroom_bytes"]);
    // 2 GiB of headroom at 24 GB (a twentieth is less).
    assert_eq!(n(&v["headroom_bytes"]), 2 << 30);
    assert_eq!(n(&v["expert_layers"]), (24_000_000_000 - fixed) / layer);
    assert_eq!(n(&v["expert_bytes"]), n(&v["expert_layers"]) * layer);
    assert_eq!(n(&p["gpu"]["streamed_layers"]), 94 - n(&v["expert_layers"]));
    let decode = |p: &Value| p["forecast"]["decode_tok_s"]["expected"].as_f64().unwrap();
    let limit = p["forecast"]["decode_limit"].as_str().unwrap();
    assert!(limit.contains("streamed experts"), "{limit}");
    // The CPU streams experts at 100 GB/s (GIVEN), faster than 25 over PCIe.
    assert_eq!(p["gpu"]["per_token"]["streamed_way"], "the CPU");

    let big = gpu("141GB", "25");
    assert_eq!(n(&big["memory"]["vram"]["expert_layers"]), 94);
    assert_eq!(n(&big["gpu"]["per_token"]["ssd_bytes"]), 0);
    let gpu_limit = big["forecast"]["decode_limit"].as_str().unwrap();
    assert!(gpu_limit.contains("GPU"), "{gpu_limit}");
    assert!(decode(&big) > decode(&p));
    let fast_bus = gpu("24GB", "400");
    assert_eq!(fast_bus["gpu"]["per_token"]["streamed_way"], "PCIe");
    assert!(decode(&fast_bus) > decode(&p));
    // Rates close enough that a layer split between the two beats either
    // (0.74 of 100 + 55 against 100): the engine's split way.
    let both = gpu("24GB", "55");
    assert_eq!(
        both["gpu"]["per_token"]["streamed_way"],
        "the CPU and PCIe, split"
    );
    assert!(decode(&both) > decode(&p) && decode(&both) < decode(&fast_bus));
    // --vram-budget caps the experts' share as run's does: none, a
    // quarter of the expert bytes (whole layers under it), or a size.
    let capped = |budget: &str| {
        let mut args = vec![path_str(&path), "--ram", "128GB"];
        args.extend(GIVEN);
        args.extend(["--device", "cuda", "--vram", "141GB"]);
        args.extend(["--vram-budget", budget]);
        plan_json(&args)
    };
    let layers = |p: &Value| n(&p["memory"]["vram"]["expert_layers"]);
    assert_eq!(layers(&capped("0")), 0);
    assert_eq!(n(&capped("0")["gpu"]["streamed_layers"]), 94);
    assert_eq!(layers(&capped("25%")), 94 / 4);
    assert_eq!(layers(&capped(&format!("{}", 3 * layer + 1))), 3);
    assert!(decode(&capped("25%")) < decode(&big));
    // A machine file's own GPU figures (the H100 bench machine's parse),
    // and a slower LM head forecasts a slower token.
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow.toml");
    fs::write(&slow, "gpu_head_gbps = 100.0\n").unwrap();
    let h100 = fixture("machines").join("h100-host.toml");
    let with = |machine: &Path| {
        let mut args = vec![path_str(&path), "--machine", path_str(machine)];
        args.extend(["--ram", "128GB"]);
        args.extend(GIVEN);
        args.extend(["--device", "cuda", "--vram", "141GB"]);
        plan_json(&args)
    };
    assert!(decode(&with(&slow)) < decode(&big));
    assert!(decode(&with(&h100)) > 0.0);
    // Its rates are the engine's own (rates_measured): the same figures
    // as rated ones forecast a slower streamed token, since the engine
    // gets only a share of a rated figure; a --mem-gbps flag in the
    // file's place is a rated figure again.
    let text = fs::read_to_string(&h100).unwrap();
    assert!(text.contains("rates_measured = true"));
    let rated = dir.path().join("rated.toml");
    fs::write(&rated, text.replace("rates_measured = true", "")).unwrap();
    let streamed = |machine: &Path, extra: &[&str]| {
        let mut args = vec![path_str(&path), "--machine", path_str(machine)];
        args.extend(["--ram", "512GB"]);
        args.extend(["--device", "cuda", "--vram-budget", "0"]);
        args.extend_from_slice(extra);
        plan_json(&args)
    };
    let (own, given) = (streamed(&h100, &[]), streamed(&rated, &[]));
    assert_eq!(own["machine"]["mem_measured"], true);
    assert_eq!(given["machine"]["mem_measured"], false);
    assert!(decode(&own) > 1.3 * decode(&given), "{own}\n{given}");
    let flagged = streamed(&h100, &["--mem-gbps", "52"]);
    assert_eq!(flagged["machine"]["mem_measured"], false);
    // A prompt's hit rate is its own, not a token's: all in RAM holds
    // every expert it touches; a cache of a tenth of the expert bytes
    // holds what LFU keeps of each of the 94 streamed layers beside the
    // one computing, (C - U) / (93 U) of the U = 128 (1 - (1 - 8/128)^512)
    // experts a 512-token prompt touches in a layer.
    let f = |p: &Value, key: &str| p["gpu"][key].as_f64().unwrap();
    assert_eq!(f(&own, "ram_prompt_hit_rate"), 1.0);
    let tenth = streamed(&h100, &["--ram-budget", "10%"]);
    let c = tenth["memory"]["ram"]["expert_cache_slots"]
        .as_f64()
        .unwrap();
    let u = 128.0 * (1.0 - (1.0f64 - 8.0 / 128.0).powi(512));
    let prompt = f(&tenth, "ram_prompt_hit_rate");
    assert!((prompt - (c - u) / (93.0 * u)).abs() < 1e-9, "{prompt}");
    assert!(prompt < f(&tenth, "ram_hit_rate"));
    // The CPU engine's forecast is not what a GPU plan prints.
    let mut cpu_args = vec![path_str(&path), "--ram", "128GB"];
    cpu_args.extend(GIVEN);
    let cpu = plan_json(&cpu_args);
    assert_eq!(cpu["device"], "cpu");
    assert!(cpu["memory"]["vram"].is_null() && cpu["gpu"].is_null());
}

#[test]
fn bad_input_gets_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let llama = dir.path().join("config.json");
    fs::write(
        &llama,
        r#"{"model_type": "llama", "hidden_size": 4096, "vocab_size": 32000}"#,
    )
    .unwrap();
    let big = config("Qwen3-235B-A22B");
    let machine = dir.path().join("m.toml");
    let gguf = dir.path().join("model.gguf");
    fs::write(&gguf, b"GGUF").unwrap();
    let bad = |args: &[&str], parts: &[&str]| {
        let mut all = vec!["plan"];
        all.extend_from_slice(args);
        all.extend(GIVEN);
        let err = smoe_err(&all);
        for p in parts {
            assert!(err.contains(p), "{args:?}: should mention {p:?}: {err}");
        }
    };
    bad(
        &[path_str(&llama)],
        &[
            "config.json",
            "unsupported model_type \"llama\"",
            "qwen3_moe",
        ],
    );
    bad(
        &[path_str(&big), "--ram", "4GiB"],
        &[
            "4.00 GiB of memory is smaller than the backbone's needs",
            "resident",
        ],
    );
    bad(
        &[path_str(&big), "--ram", "48GB", "--ram-budget", "60GiB"],
        &["expert cache of 60.00 GiB does not fit"],
    );
    bad(
        &[path_str(&big), "--ram", "48GB", "--ram-budget", "1MiB"],
        &["one token needs 8 per layer"],
    );
    bad(&[path_str(&big), "--ram-budget", "150%"], &["at most 100%"]);
    // Sizes each within bounds whose product is not: 94 layers of 2^24
    // experts once took the planner's listing of every expert's tensors
    // past all memory (an abort, not an error).
    let mut many: Value = serde_json::from_str(&fs::read_to_string(&big).unwrap()).unwrap();
    many["num_experts"] = (1u64 << 24).into();
    let many_dir = dir.path().join("many");
    fs::create_dir(&many_dir).unwrap();
    fs::write(many_dir.join("config.json"), many.to_string()).unwrap();
    bad(
        &[path_str(&many_dir.join("config.json"))],
        &[
            "config.json",
            "num_hidden_layers 94 x num_experts 16777216 is 1577058304 routed experts, expected at most 262144",
        ],
    );
    // Dimensions within bounds whose matrix is terabytes: the planner once
    // planned them where the host lends that much address space, and
    // failed with the OS's error where it does not.
    for (key, value, expect) in [
        (
            "hidden_size",
            1u64 << 24,
            "vocab_size (151936) x hidden_size (16777216) is a matrix of 2549063090176 elements",
        ),
        (
            "num_attention_heads",
            1 << 20,
            "num_attention_heads x head_dim (134217728) x hidden_size (4096)",
        ),
    ] {
        let mut wide: Value = serde_json::from_str(&fs::read_to_string(&big).unwrap()).unwrap();
        wide[key] = value.into();
        let wide_dir = dir.path().join(format!("wide-{key}"));
        fs::create_dir(&wide_dir).unwrap();
        fs::write(wide_dir.join("config.json"), wide.to_string()).unwrap();
        bad(
            &[path_str(&wide_dir.join("config.json"))],
            &["config.json", expect, "expected at most 68719476736"],
        );
    }
    bad(&[path_str(&gguf)], &["model.gguf", "truncated"]);
    bad(&[path_str(&big), "--device", "cuda"], &["give --vram"]);
    bad(&[path_str(&big), "--device", "tpu"], &["tpu", "cpu, cuda"]);
    bad(
        &[path_str(&big), "--vram", "24GB"],
        &["--vram 24GB", "add --device cuda"],
    );
    bad(
        &[path_str(&big), "--vram-budget", "0"],
        &["--vram-budget 0", "add --device cuda"],
    );
    // A 24 GB GPU with one more flag.
    let gpu24 = |extra: &[&str], parts: &[&str]| {
        let mut args = vec![path_str(&big), "--device", "cuda", "--vram", "24GB"];
        args.extend_from_slice(extra);
        bad(&args, parts)
    };
    gpu24(
        &["--vram-budget", "101%"],
        &["--vram-budget \"101%\"", "from 0% to 100%"],
    );
    gpu24(
        &["--vram-budget", "100GB"],
        &[
            "VRAM budget of 93.13 GiB does not fit",
            "a GPU of 22.35 GiB",
        ],
    );
    bad(
        &[path_str(&big), "--device", "cuda", "--vram", "4GB"],
        &["cannot hold the backbone"],
    );
    gpu24(
        &["--pcie-gbps", "0"],
        &["--pcie-gbps must be a positive number"],
    );
    // A directory without a config, a config that is not one.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    bad(&[path_str(&empty)], &["empty", "config.json"]);
    fs::write(&llama, "[1, 2]").unwrap();
    bad(&[path_str(&llama)], &["config.json"]);
    bad(&[path_str(&big), "--ram-budget", "0"], &["holds 0 experts"]);
    for (text, parts) in [
        ("ram = 48GB\n", vec!["m.toml", "expected keys"]),
        ("pcie_gbps = 0.0\n", vec!["m.toml", "pcie_gbps", "positive"]),
        (
            "gpu_layer_decode_ms = -1.0\n",
            vec!["m.toml", "gpu_layer_decode_ms", "positive"],
        ),
        (
            "gpu_head_gbps = 0.0\n",
            vec!["m.toml", "gpu_head_gbps", "positive"],
        ),
        ("vram = 24\n", vec!["m.toml", "expected keys"]),
        ("ram = \"lots\"\n", vec!["\"lots\" is not a size"]),
        ("disk_gbps = 0.0\n", vec!["m.toml", "disk_gbps", "positive"]),
        (
            "mem_gbps = -270.0\n",
            vec!["m.toml", "mem_gbps", "positive"],
        ),
        ("gflops = nan\n", vec!["m.toml", "gflops", "positive"]),
        ("loop_us = -1.0\n", vec!["m.toml", "loop_us"]),
        ("cores = 0\n", vec!["m.toml", "cores"]),
        ("ram = \"0\"\n", vec!["smaller than the backbone's needs"]),
        ("[ram]\nsize = 1\n", vec!["m.toml", "expected keys"]),
    ] {
        fs::write(&machine, text).unwrap();
        bad(&[path_str(&big), "--machine", path_str(&machine)], &parts);
    }
}
