//! Writes a random-weight Hugging Face checkpoint with the exact tensor names,
//! shapes, dtype (bf16), sharding and config.json of a real model, for
//! benchmarks of models larger than RAM.
//!
//! ```text
//! cargo run --release -p smoe-cli --example synth -- \
//!     --preset qwen3-30b-a3b [--layers N] [--tokenizer DIR] [--seed S] \
//!     [--shard-size 4GiB] [--force] -o OUT_DIR
//! ```
//!
//! Memory stays bounded (a few buffers of `BUF_BYTES`): tensors are generated
//! piece by piece in parallel while a writer thread streams the previous
//! piece to disk. Values are a pure function of (seed, tensor, element), so
//! the output does not depend on the thread count.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Map, Value};

/// Bytes generated per step (split across threads) and handed to the writer.
const BUF_BYTES: usize = 16 << 20;
/// Buffers in flight between the generator and the writer.
const BUFS: usize = 3;

#[derive(Parser)]
#[command(
    name = "synth",
    about = "Write a random-weight bf16 checkpoint shaped like a real model"
)]
struct Cli {
    /// Model to imitate (qwen3-30b-a3b, qwen3-235b-a22b).
    #[arg(long)]
    preset: String,
    /// Keep only the first N decoder layers (num_hidden_layers = N).
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// Copy tokenizer files (tokenizer.json, tokenizer_config.json, ...) from DIR.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Seed for the weights; the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most tensor bytes per shard, e.g. 512MiB, 4GiB, 2GB.
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    shard_size: u64,
    /// Generator threads (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Replace OUT_DIR if it exists.
    #[arg(long)]
    force: bool,
    /// Output checkpoint directory.
    #[arg(short = 'o', long = "out", value_name = "OUT_DIR")]
    out: PathBuf,
}

// ---------------------------------------------------------------------------
// Presets

struct Preset {
    name: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    experts: usize,
    experts_per_tok: usize,
    moe_intermediate: usize,
    intermediate: usize,
    vocab: usize,
    max_pos: usize,
    rope_theta: f64,
}

const PRESETS: &[Preset] = &[
    // Qwen/Qwen3-30B-A3B
    Preset {
        name: "qwen3-30b-a3b",
        hidden: 2048,
        layers: 48,
        heads: 32,
        kv_heads: 4,
        head_dim: 128,
        experts: 128,
        experts_per_tok: 8,
        moe_intermediate: 768,
        intermediate: 6144,
        vocab: 151936,
        max_pos: 40960,
        rope_theta: 1_000_000.0,
    },
    // Qwen/Qwen3-235B-A22B-Instruct-2507
    Preset {
        name: "qwen3-235b-a22b",
        hidden: 4096,
        layers: 94,
        heads: 64,
        kv_heads: 4,
        head_dim: 128,
        experts: 128,
        experts_per_tok: 8,
        moe_intermediate: 1536,
        intermediate: 12288,
        vocab: 151936,
        max_pos: 262144,
        rope_theta: 5_000_000.0,
    },
];

const BOS: u64 = 151643;
const EOS: u64 = 151645;

/// config.json as the hub has it (keys sorted, as transformers writes them).
fn hub_config(p: &Preset, layers: usize) -> Value {
    json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "decoder_sparse_step": 1,
        "eos_token_id": EOS,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate,
        "max_position_embeddings": p.max_pos,
        "max_window_layers": layers,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": p.moe_intermediate,
        "norm_topk_prob": true,
        "num_attention_heads": p.heads,
        "num_experts": p.experts,
        "num_experts_per_tok": p.experts_per_tok,
        "num_hidden_layers": layers,
        "num_key_value_heads": p.kv_heads,
        "output_router_logits": false,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": p.rope_theta,
        "router_aux_loss_coef": 0.001,
        "sliding_window": null,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": p.vocab
    })
}

fn generation_config() -> Value {
    json!({
        "bos_token_id": BOS,
        "do_sample": true,
        "eos_token_id": [EOS, BOS],
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95
    })
}

// ---------------------------------------------------------------------------
// Tensors

/// How a tensor's values are drawn: uniform on [center - half, center + half].
#[derive(Clone, Copy)]
struct Dist {
    center: f32,
    half: f32,
}

impl Dist {
    /// Mean 0, standard deviation `std`.
    fn std(std: f32) -> Self {
        Dist {
            center: 0.0,
            half: std * 3f32.sqrt(),
        }
    }
    /// Norm weights: 1 plus a little noise.
    fn norm() -> Self {
        Dist {
            center: 1.0,
            half: 0.05,
        }
    }
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    dist: Dist,
    expert: bool,
    /// Per-tensor PRNG key (from the seed and the name).
    key: u64,
}

impl Tensor {
    fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
    fn bytes(&self) -> u64 {
        self.numel() * 2
    }
}

/// All tensors in module order (the order of the model's state dict, which is
/// the order HF fills shards in).
fn tensor_list(p: &Preset, layers: usize, seed: u64) -> Vec<Tensor> {
    let (h, hd, v) = (p.hidden, p.head_dim, p.vocab);
    let q = p.heads * hd;
    let kv = p.kv_heads * hd;
    let i = p.moe_intermediate;
    let lin = |fan_in: usize| Dist::std(1.0 / (fan_in as f32).sqrt());
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, dist: Dist, expert: bool| {
        let key = splitmix(seed ^ fnv1a(name.as_bytes()));
        out.push(Tensor {
            name,
            shape,
            dist,
            expert,
            key,
        });
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        Dist::std(1.0),
        false,
    );
    for l in 0..layers {
        let pre = format!("model.layers.{l}");
        add(
            format!("{pre}.self_attn.q_proj.weight"),
            vec![q, h],
            lin(h),
            false,
        );
        add(
            format!("{pre}.self_attn.k_proj.weight"),
            vec![kv, h],
            lin(h),
            false,
        );
        add(
            format!("{pre}.self_attn.v_proj.weight"),
            vec![kv, h],
            lin(h),
            false,
        );
        add(
            format!("{pre}.self_attn.o_proj.weight"),
            vec![h, q],
            lin(q),
            false,
        );
        add(
            format!("{pre}.self_attn.q_norm.weight"),
            vec![hd],
            Dist::norm(),
            false,
        );
        add(
            format!("{pre}.self_attn.k_norm.weight"),
            vec![hd],
            Dist::norm(),
            false,
        );
        add(
            format!("{pre}.mlp.gate.weight"),
            vec![p.experts, h],
            lin(h),
            false,
        );
        for e in 0..p.experts {
            let ep = format!("{pre}.mlp.experts.{e}");
            add(format!("{ep}.gate_proj.weight"), vec![i, h], lin(h), true);
            add(format!("{ep}.up_proj.weight"), vec![i, h], lin(h), true);
            add(format!("{ep}.down_proj.weight"), vec![h, i], lin(i), true);
        }
        add(
            format!("{pre}.input_layernorm.weight"),
            vec![h],
            Dist::norm(),
            false,
        );
        add(
            format!("{pre}.post_attention_layernorm.weight"),
            vec![h],
            Dist::norm(),
            false,
        );
    }
    add("model.norm.weight".into(), vec![h], Dist::norm(), false);
    add("lm_head.weight".into(), vec![v, h], lin(h), false);
    out
}

/// Packs tensors into shards like `split_torch_state_dict_into_shards`: in
/// order, a new shard when the next tensor would overflow the current one (a
/// tensor bigger than the limit gets a shard of its own). Each shard's data is
/// then laid out sorted by name, as the safetensors serializer does.
fn shard(tensors: &[Tensor], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut size = 0;
    for (i, t) in tensors.iter().enumerate() {
        if !cur.is_empty() && size + t.bytes() > max {
            shards.push(std::mem::take(&mut cur));
            size = 0;
        }
        cur.push(i);
        size += t.bytes();
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    for s in &mut shards {
        s.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    }
    shards
}

/// The safetensors header of a shard, padded with spaces so that the data
/// starts at a multiple of 8.
fn shard_header(tensors: &[Tensor], idx: &[usize]) -> Result<Vec<u8>> {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut off = 0u64;
    for &i in idx {
        let t = &tensors[i];
        m.insert(
            t.name.clone(),
            json!({ "dtype": "BF16", "shape": t.shape, "data_offsets": [off, off + t.bytes()] }),
        );
        off += t.bytes();
    }
    let mut header = serde_json::to_vec(&Value::Object(m))?;
    while (8 + header.len()) % 8 != 0 {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Values

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The splitmix64 output function: a good 64-bit mixer.
#[inline(always)]
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// f32 to bf16 bits, rounding to nearest even (inputs are finite).
#[inline(always)]
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Fills `out` with elements `start..start + out.len()` of a tensor. Element
/// `n` takes 16 bits of `splitmix(key + (n / 4) * gamma)`: a counter-based
/// stream, so any range can be generated independently.
fn fill(t: &Tensor, start: u64, out: &mut [u16]) {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    let scale = t.dist.half / 32767.5;
    let offset = t.dist.center - 32767.5 * scale;
    let val = |r: u64| bf16((r & 0xffff) as f32 * scale + offset);
    let word = |g: u64| splitmix(t.key.wrapping_add(g.wrapping_mul(GAMMA)));

    let mut n = start;
    let mut out = out;
    // Head: up to a multiple of 4.
    while !n.is_multiple_of(4) && !out.is_empty() {
        out[0] = val(word(n / 4) >> (16 * (n % 4)));
        out = &mut out[1..];
        n += 1;
    }
    // Body: four values per word.
    let mut chunks = out.chunks_exact_mut(4);
    let mut g = n / 4;
    for c in &mut chunks {
        let w = word(g);
        c[0] = val(w);
        c[1] = val(w >> 16);
        c[2] = val(w >> 32);
        c[3] = val(w >> 48);
        g += 1;
    }
    // Tail.
    for (k, o) in chunks.into_remainder().iter_mut().enumerate() {
        *o = val(word(g) >> (16 * k));
    }
}

/// Fills `out` with the shard's data bytes `pos..pos + out.len()` (as u16
/// elements), walking the tensors that overlap that range.
fn fill_range(tensors: &[Tensor], idx: &[usize], starts: &[u64], pos: u64, out: &mut [u16]) {
    // Last tensor whose start <= pos.
    let mut k = starts.partition_point(|&s| s <= pos) - 1;
    let mut pos = pos;
    let mut out = out;
    while !out.is_empty() {
        let t = &tensors[idx[k]];
        let within = pos - starts[k];
        let n = ((t.numel() - within) as usize).min(out.len());
        let (head, rest) = out.split_at_mut(n);
        fill(t, within, head);
        out = rest;
        pos += n as u64;
        k += 1;
    }
}

// ---------------------------------------------------------------------------
// Writing

enum Msg {
    Open(PathBuf, Vec<u8>),
    Data(Vec<u16>),
    Close,
}

/// Writes what it is sent, one shard at a time; returns spent buffers.
fn writer(rx: mpsc::Receiver<Msg>, back: mpsc::SyncSender<Vec<u16>>, nshards: usize) -> Result<()> {
    let mut file: Option<(BufWriter<File>, PathBuf, u64, Instant)> = None;
    let mut done = 0;
    let start = Instant::now();
    let mut total = 0u64;
    for msg in rx {
        match msg {
            Msg::Open(path, header) => {
                let f =
                    File::create(&path).with_context(|| format!("creating {}", path.display()))?;
                let mut w = BufWriter::with_capacity(4 << 20, f);
                w.write_all(&header)
                    .with_context(|| format!("writing {}", path.display()))?;
                file = Some((w, path, header.len() as u64, Instant::now()));
            }
            Msg::Data(buf) => {
                let (w, path, bytes, _) = file.as_mut().context("data before open")?;
                let b = as_bytes(&buf);
                w.write_all(b)
                    .with_context(|| format!("writing {}", path.display()))?;
                *bytes += b.len() as u64;
                // The generator may have stopped waiting (on its own error).
                let _ = back.send(buf);
            }
            Msg::Close => {
                let (w, path, bytes, t0) = file.take().context("close before open")?;
                let f = w
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("writing {}", path.display()))?;
                f.sync_all()
                    .with_context(|| format!("syncing {}", path.display()))?;
                done += 1;
                total += bytes;
                let s = t0.elapsed().as_secs_f64();
                eprintln!(
                    "[{done}/{nshards}] {}: {:.2} GB in {s:.1} s, {:.0} MB/s (overall {:.0} MB/s)",
                    path.file_name().unwrap_or_default().to_string_lossy(),
                    bytes as f64 / 1e9,
                    bytes as f64 / 1e6 / s,
                    total as f64 / 1e6 / start.elapsed().as_secs_f64(),
                );
            }
        }
    }
    Ok(())
}

fn as_bytes(v: &[u16]) -> &[u8] {
    // Data is little-endian on disk; convert on big-endian hosts.
    #[cfg(target_endian = "big")]
    compile_error!("synth writes native u16 as little-endian bf16");
    // SAFETY: u16 has no padding and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Generates every shard's data and sends it to the writer.
fn generate(
    tensors: &[Tensor],
    shards: &[Vec<usize>],
    names: &[String],
    dir: &Path,
    threads: usize,
    tx: &mpsc::SyncSender<Msg>,
    back: &mpsc::Receiver<Vec<u16>>,
) -> Result<()> {
    let gone = || anyhow::anyhow!("writer stopped");
    let mut free: Vec<Vec<u16>> = (0..BUFS).map(|_| vec![0u16; BUF_BYTES / 2]).collect();
    for (idx, name) in shards.iter().zip(names) {
        tx.send(Msg::Open(dir.join(name), shard_header(tensors, idx)?))
            .map_err(|_| gone())?;
        let mut starts = Vec::with_capacity(idx.len());
        let mut total = 0u64;
        for &i in idx {
            starts.push(total);
            total += tensors[i].numel();
        }
        let mut pos = 0u64;
        while pos < total {
            let mut buf = match free.pop() {
                Some(b) => b,
                None => back.recv().map_err(|_| gone())?,
            };
            let n = ((total - pos) as usize).min(BUF_BYTES / 2);
            buf.resize(n, 0);
            let per = n.div_ceil(threads).next_multiple_of(4).max(4096);
            std::thread::scope(|s| {
                for (j, piece) in buf.chunks_mut(per).enumerate() {
                    let at = pos + (j * per) as u64;
                    let starts = &starts;
                    s.spawn(move || fill_range(tensors, idx, starts, at, piece));
                }
            });
            pos += n as u64;
            tx.send(Msg::Data(buf)).map_err(|_| gone())?;
        }
        tx.send(Msg::Close).map_err(|_| gone())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("\"{s}\" is not a size (expected e.g. 512MiB, 4GiB, 2GB, 1000000)");
    let x: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        _ => return Err(bad()),
    };
    let v = (x * mult).round();
    if v < 1.0 {
        return Err(format!("shard size \"{s}\" must be at least 1 byte"));
    }
    Ok(v as u64)
}

fn copy_tokenizer(src: &Path, dst: &Path) -> Result<Vec<String>> {
    let skip = [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ];
    let mut copied = Vec::new();
    let entries = fs::read_dir(src).with_context(|| format!("reading {}", src.display()))?;
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let wanted = ((name.ends_with(".json") || name.ends_with(".jinja"))
            && !skip.contains(&name.as_str()))
            || matches!(name.as_str(), "merges.txt" | "tokenizer.model");
        if wanted && e.path().is_file() {
            let to = dst.join(&name);
            fs::copy(e.path(), &to).with_context(|| format!("copying {}", e.path().display()))?;
            // fs::copy keeps the source's mode; a read-only source (a shared
            // cache) would make a read-only copy.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mut perm = fs::metadata(&to)?.permissions();
                perm.set_mode(perm.mode() | 0o200);
                fs::set_permissions(&to, perm)?;
            }
            copied.push(name);
        }
    }
    copied.sort();
    Ok(copied)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let preset = PRESETS
        .iter()
        .find(|p| p.name == cli.preset)
        .with_context(|| {
            let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
            format!(
                "unknown preset \"{}\" (valid: {})",
                cli.preset,
                names.join(", ")
            )
        })?;
    let layers = cli.layers.unwrap_or(preset.layers);
    ensure!(layers >= 1, "--layers must be at least 1");
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ensure!(threads >= 1, "--threads must be at least 1");

    let out = cli.out.clone();
    let out_name = out
        .file_name()
        .with_context(|| format!("-o {}: needs a directory name", out.display()))?
        .to_string_lossy()
        .into_owned();
    if out.exists() && !cli.force {
        bail!(
            "{} already exists (pass --force to replace it)",
            out.display()
        );
    }
    if out.exists() && !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    if let Some(t) = &cli.tokenizer {
        ensure!(
            t.join("tokenizer.json").is_file(),
            "--tokenizer {}: no tokenizer.json there",
            t.display()
        );
    }

    let tensors = tensor_list(preset, layers, cli.seed);
    let shards = shard(&tensors, cli.shard_size);
    let k = shards.len();
    let names: Vec<String> = (1..=k)
        .map(|i| format!("model-{i:05}-of-{k:05}.safetensors"))
        .collect();
    let total_bytes: u64 = tensors.iter().map(Tensor::bytes).sum();
    let expert_bytes: u64 = tensors.iter().filter(|t| t.expert).map(Tensor::bytes).sum();
    let params: u64 = tensors.iter().map(Tensor::numel).sum();

    let tmp = out.with_file_name(format!("{out_name}.tmp-{}", std::process::id()));
    eprintln!(
        "synth: {} with {layers} layers: {} tensors, {:.3} B params, {} in {k} shard(s), {threads} threads -> {}",
        preset.name,
        tensors.len(),
        params as f64 / 1e9,
        gb(total_bytes),
        out.display()
    );
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let t0 = Instant::now();
    let result = (|| -> Result<()> {
        write_json(&tmp.join("config.json"), &hub_config(preset, layers))?;
        write_json(&tmp.join("generation_config.json"), &generation_config())?;
        if let Some(src) = &cli.tokenizer {
            let copied = copy_tokenizer(src, &tmp)?;
            eprintln!("synth: copied {}", copied.join(", "));
        }
        // Index: weight_map sorted by tensor name, as transformers writes it.
        let mut map: Vec<(&str, &str)> = Vec::with_capacity(tensors.len());
        for (idx, name) in shards.iter().zip(&names) {
            map.extend(
                idx.iter()
                    .map(|&i| (tensors[i].name.as_str(), name.as_str())),
            );
        }
        map.sort();
        let weight_map: Map<String, Value> = map
            .into_iter()
            .map(|(t, f)| (t.to_string(), Value::from(f)))
            .collect();
        write_json(
            &tmp.join("model.safetensors.index.json"),
            &json!({ "metadata": { "total_size": total_bytes }, "weight_map": weight_map }),
        )?;

        let (tx, rx) = mpsc::sync_channel::<Msg>(BUFS);
        let (back_tx, back_rx) = mpsc::sync_channel::<Vec<u16>>(BUFS);
        std::thread::scope(|s| {
            let w = s.spawn(move || writer(rx, back_tx, k));
            let g = generate(&tensors, &shards, &names, &tmp, threads, &tx, &back_rx);
            drop(tx);
            let w = w
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("writer thread panicked")));
            // A writer error explains a generator's "writer stopped".
            w.and(g)
        })
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }

    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing old {}", out.display()))?;
    }
    fs::rename(&tmp, &out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;

    let s = t0.elapsed().as_secs_f64();
    eprintln!(
        "synth: wrote {} in {s:.1} s ({:.0} MB/s): {:.3} B params, experts {} ({:.1}%), backbone {}",
        gb(total_bytes),
        total_bytes as f64 / 1e6 / s,
        params as f64 / 1e9,
        gb(expert_bytes),
        100.0 * expert_bytes as f64 / total_bytes as f64,
        gb(total_bytes - expert_bytes),
    );
    println!("{}", out.display());
    Ok(())
}
