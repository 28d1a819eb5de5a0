//! `smoe bench`: medians of repeated prefill + decode runs (of a synthetic
//! prompt, or of a file of chat prompts), the streaming counters, and the
//! I/O roofline measured with the engine's own reader.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

use smoe::engine::{Engine, Prompt};
use smoe::model::human_bytes;
use smoe::vault::Vault;

use crate::{load, ModelArgs};

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length (seeded random ordinary tokens).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode per run (end-of-sequence is ignored).
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Seed of the synthetic prompt: another seed is another prompt of the
    /// same kind, e.g. to calibrate `smoe plan --hit-curve` on text the
    /// measurement it is checked against never saw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Chat prompts to run instead of a synthetic one: a JSON list of
    /// strings or of objects with a "prompt" (models/builtin/eval.json).
    /// Each run answers them all in turn, greedily, each reply ending on its
    /// end-of-turn token or --gen-tokens; the counters are their sums.
    #[arg(long, value_name = "FILE.json")]
    prompts: Option<PathBuf>,
    /// Runs; the report gives medians. The cache stays warm between runs.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Time every tensor op and report where prefill and decode spend
    /// their time, per op; what no op accounts for is waiting on expert
    /// reads and the model's own bookkeeping.
    #[arg(long)]
    profile: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn bench_cmd(mut a: BenchArgs) -> Result<()> {
    a.model.resolve()?;
    if a.prompt_tokens == 0 || a.repeat == 0 {
        bail!("--prompt-tokens and --repeat must be at least 1");
    }
    if a.profile {
        smoe::compute::profile::enable();
    }
    let mut engine = load(&a.model)?;
    let opts = smoe::bench::BenchOptions {
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        seed: a.seed,
    };
    let chats = a
        .prompts
        .as_deref()
        .map(|f| chat_prompts(&engine, f))
        .transpose()?;
    let runs = (0..a.repeat)
        .map(|_| match &chats {
            Some(p) => smoe::bench::run_prompts(&engine, p, a.gen_tokens),
            None => smoe::bench::run(&mut engine, &opts),
        })
        .collect::<smoe::Result<Vec<_>>>()?;
    let med = |f: &dyn Fn(&smoe::bench::BenchRun) -> f64| median(runs.iter().map(f).collect());
    // The median of the runs that have the figure, if any has.
    let med_of = |f: &dyn Fn(&smoe::bench::BenchRun) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let per_tok = |r: &smoe::bench::BenchRun, x: f64| x / r.decode_tokens.max(1) as f64;
    let decode_bytes = med(&|r| per_tok(r, r.decode.bytes_read() as f64));
    let streaming = engine.cache().map(|c| {
        let path = &a.model.model;
        let disk = if smoe::gguf::is_gguf(path) {
            smoe::gguf::Gguf::open(path).and_then(|g| {
                let cfg = engine.config();
                let layers = (0..cfg.num_hidden_layers)
                    .filter(|&l| cfg.is_moe_layer(l))
                    .count();
                let records = layers * cfg.num_experts;
                let bw = smoe::bench::read_bandwidth_gguf(&g, cfg, 16, 1 << 30)?;
                Ok((bw, c.capacity() as f64 / records.max(1) as f64))
            })
        } else {
            Vault::open(path).and_then(|v| {
                let records: usize = v.manifest.experts.iter().map(|l| l.offsets.len()).sum();
                let bw = smoe::bench::read_bandwidth(&v, 16, 1 << 30)?;
                Ok((bw, c.capacity() as f64 / records.max(1) as f64))
            })
        };
        (c, disk)
    });
    let mut report = json!({
        "model": a.model.model.display().to_string(),
        "prompts": chats.as_ref().map(|p| p.len()),
        "prompt_tokens": med(&|r| r.prefill_tokens as f64) as u64,
        "gen_tokens": med(&|r| r.decode_tokens as f64) as u64,
        "repeat": a.repeat,
        "threads": smoe::kernels::threads(),
        "device": engine.device(),
        "prefill_tok_s": med(&|r| r.prefill_tok_s),
        "decode_tok_s": med(&|r| r.decode_tok_s),
        "ttft_s": med(&|r| r.ttft_s),
    });
    if a.profile {
        // The median run's, as for the rates: the first run also reads
        // the experts into a cold cache.
        let median_run = |key: &dyn Fn(&smoe::bench::BenchRun) -> f64| {
            let mut by: Vec<_> = runs.iter().collect();
            by.sort_by(|x, y| key(x).total_cmp(&key(y)));
            by[by.len() / 2]
        };
        let (p, d) = (median_run(&|r| r.prefill_s), median_run(&|r| r.decode_s));
        report["profile"] = json!({
            "prefill": profile_json(&p.prefill_ops, p.prefill_s),
            "decode": profile_json(&d.decode_ops, d.decode_s),
        });
        if d.decode_kernels.total().calls + p.prefill_kernels.total().calls > 0 {
            report["profile"]["gpu_kernels"] = json!({
                "prefill": kernels_json(&p.prefill_kernels, p.prefill_s),
                "decode": kernels_json(&d.decode_kernels, d.decode_s),
            });
        }
    }
    if let Some((cache, disk)) = streaming {
        let ((disk_gb_s, direct), fraction) = disk?;
        let roofline = if decode_bytes > 0.0 {
            disk_gb_s * 1e9 / decode_bytes
        } else {
            f64::INFINITY
        };
        let decode = med(&|r| r.decode_tok_s);
        report["streaming"] = json!({
            "ram_budget_bytes": cache.capacity() * cache.slot_bytes(),
            "cache_slots": cache.capacity(),
            // What `smoe plan --hit-curve` reads the hit rate against.
            "expert_fraction": fraction,
            "prefetch": cache.read_ahead().name(),
            "cache_policy": cache.policy().name(),
            "prefill_chunk": engine.prefill_chunk(),
            "prefill_hit_rate": med(&|r| r.prefill.hit_rate()),
            "prefill_bytes_read": med(&|r| r.prefill.bytes_read() as f64),
            "decode_hit_rate": med(&|r| r.decode.hit_rate()),
            "recall": med_of(&|r| r.decode.recall()),
            "precision": med_of(&|r| r.decode.precision()),
            "bytes_read_per_token": decode_bytes,
            "read_gb_s": med(&|r| r.decode.read_gb_s()),
            "blocked_ms_per_token": med(&|r| per_tok(r, 1e3 * r.decode.blocked_s)),
            "disk_read_gb_s": disk_gb_s,
            "direct_io": direct,
            "io_roofline_tok_s": if roofline.is_finite() { json!(roofline) } else { Value::Null },
            "decode_vs_roofline": if roofline.is_finite() { json!(decode / roofline) } else { Value::Null },
        });
    }
    if let Some(g) = engine.gpu_expert_stats() {
        // Counted since load: every run of this bench, the uncounted first
        // one too.
        report["gpu_experts"] = json!(g);
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{report}")?;
        return Ok(());
    }
    let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
    writeln!(
        out,
        "model {} | {}prompt {} tokens, {} generated, median of {} | {} threads",
        report["model"].as_str().unwrap_or(""),
        chats
            .as_ref()
            .map_or(String::new(), |p| format!("{} chat prompts: ", p.len())),
        report["prompt_tokens"],
        report["gen_tokens"],
        a.repeat,
        report["threads"]
    )?;
    writeln!(out, "device {}", engine.device())?;
    writeln!(
        out,
        "prefill {:.1} tok/s | decode {:.2} tok/s | time to first token {:.3} s",
        f("prefill_tok_s"),
        f("decode_tok_s"),
        f("ttft_s")
    )?;
    if let Some(g) = engine.gpu_expert_stats() {
        writeln!(
            out,
            "GPU tiers over all runs: VRAM hits {}, copied {} ({}), run on the CPU {}; \
             steps run as one CUDA graph {} ({} replayed), stretches between the host's \
             waits {} ({} replayed)",
            g.vram_hits,
            g.copied,
            human_bytes(g.pcie_bytes),
            g.cpu_runs,
            g.graph_steps,
            g.graph_replays,
            g.graph_stretches,
            g.stretch_replays
        )?;
        if g.copied_ahead > 0 {
            writeln!(
                out,
                "copied while the layer before ran (its prediction): {} experts, {} of them used ({:.1}%)",
                g.copied_ahead,
                g.ahead_used,
                100.0 * g.ahead_used as f64 / g.copied_ahead as f64
            )?;
        }
        if let Some(w) = g.one_token {
            let gb = |r: f64| r / 1e9;
            writeln!(
                out,
                "one-token batches of streamed experts: {} (median expert GB/s: copied to the GPU {:.1}, on the CPU {:.1}, split between them {:.1})",
                w.kept.map_or("still measuring".to_string(), |k| format!("{k} kept")),
                gb(w.copy_bytes_s),
                gb(w.cpu_bytes_s),
                gb(w.split_bytes_s)
            )?;
        }
    }
    if let Some(st) = report.get("streaming") {
        let g = |k: &str| st[k].as_f64().unwrap_or(0.0);
        writeln!(
            out,
            "cache {} in {} slots, policy {}, read-ahead {} | prefill: hit {:.1}%, {} read",
            human_bytes(g("ram_budget_bytes") as u64),
            st["cache_slots"],
            st["cache_policy"].as_str().unwrap_or(""),
            st["prefetch"].as_str().unwrap_or(""),
            100.0 * g("prefill_hit_rate"),
            human_bytes(g("prefill_bytes_read") as u64)
        )?;
        let prediction = match (st["recall"].as_f64(), st["precision"].as_f64()) {
            (Some(r), Some(p)) => format!(
                "prediction recall {:.1}%, precision {:.1}%",
                100.0 * r,
                100.0 * p
            ),
            _ => "no prediction (nothing read or copied ahead)".to_string(),
        };
        writeln!(
            out,
            "decode: hit {:.1}% | {prediction} | {:.1} MB read/token at {:.2} GB/s | blocked {:.1} ms/token",
            100.0 * g("decode_hit_rate"),
            g("bytes_read_per_token") / 1e6,
            g("read_gb_s"),
            g("blocked_ms_per_token")
        )?;
        match st["io_roofline_tok_s"].as_f64() {
            Some(roof) => writeln!(
                out,
                "I/O roofline: disk reads {:.2} GB/s{} -> at most {:.2} tok/s for {:.1} MB/token; decode runs at {:.0}% of it",
                g("disk_read_gb_s"),
                if st["direct_io"] == true { " (direct)" } else { " (buffered: page cache may inflate it)" },
                roof,
                g("bytes_read_per_token") / 1e6,
                100.0 * g("decode_vs_roofline")
            )?,
            None => writeln!(out, "I/O roofline: nothing read while decoding (everything cached)")?,
        }
    }
    if let Some(p) = report.get("profile") {
        for phase in ["prefill", "decode"] {
            writeln!(out, "{phase} of the median run, by op:")?;
            for op in p[phase].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "  {:<14} {:>7} calls {:>10.2} ms {:>5.1}%",
                    op["op"].as_str().unwrap_or(""),
                    op["calls"],
                    op["ms"].as_f64().unwrap_or(0.0),
                    op["percent"].as_f64().unwrap_or(0.0),
                )?;
            }
        }
        for phase in ["prefill", "decode"] {
            let Some(rows) = p["gpu_kernels"][phase].as_array() else {
                continue;
            };
            writeln!(
                out,
                "{phase} of the median run, GPU kernels (device time; host time launching):"
            )?;
            for k in rows {
                writeln!(
                    out,
                    "  {:<22} {:>7} calls {:>10.2} ms {:>5.1}%  launch {:>8.2} ms",
                    k["kernel"].as_str().unwrap_or(""),
                    k["calls"],
                    k["device_ms"].as_f64().unwrap_or(0.0),
                    k["percent"].as_f64().unwrap_or(0.0),
                    k["launch_ms"].as_f64().unwrap_or(0.0),
                )?;
            }
        }
    }
    Ok(())
}

/// One phase's op times, longest first, with the time outside every op
/// last: each op's share of the phase's wall time.
fn profile_json(ops: &smoe::compute::profile::OpTimes, wall_s: f64) -> Value {
    let share = |s: f64| 100.0 * s / wall_s.max(f64::MIN_POSITIVE);
    let mut rows: Vec<Value> = ops
        .ops()
        .into_iter()
        .map(|(op, calls, s)| json!({"op": op.name(), "calls": calls, "ms": 1e3 * s, "percent": share(s)}))
        .collect();
    let outside = (wall_s - ops.total_s()).max(0.0);
    rows.push(
        json!({"op": "(outside ops)", "calls": 0, "ms": 1e3 * outside, "percent": share(outside)}),
    );
    Value::Array(rows)
}

/// One phase's GPU kernels, longest on the device first, with their sum
/// last: device and launch time, and the device time's share of the
/// phase's wall time (what is left is the device idle, waiting for the
/// host).
fn kernels_json(k: &smoe::compute::profile::KernelTimes, wall_s: f64) -> Value {
    let share = |s: f64| 100.0 * s / wall_s.max(f64::MIN_POSITIVE);
    let row = |name: &str, t: smoe::compute::profile::KernelTime| {
        json!({"kernel": name, "calls": t.calls, "device_ms": 1e3 * t.device_s,
               "launch_ms": 1e3 * t.launch_s, "percent": share(t.device_s)})
    };
    let mut rows: Vec<Value> = k.kernels().into_iter().map(|(n, t)| row(n, t)).collect();
    rows.push(row("(all kernels)", k.total()));
    Value::Array(rows)
}

/// The chat-templated ids of each prompt in a JSON list of strings or of
/// objects with a "prompt".
fn chat_prompts(engine: &Engine, file: &Path) -> Result<Vec<Vec<u32>>> {
    let list = smoe::error::read_json(file)?;
    let items = list
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| anyhow::anyhow!("{}: expected a non-empty JSON list", file.display()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let user = item
                .as_str()
                .or_else(|| item["prompt"].as_str())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: item {i} is neither a string nor an object with a \"prompt\"",
                        file.display()
                    )
                })?;
            Ok(engine.prompt_ids(&Prompt::Chat {
                system: None,
                user: user.to_string(),
            })?)
        })
        .collect()
}
