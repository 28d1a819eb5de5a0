//! The `smoe` command line. Library errors arrive here and are printed as one
//! line naming the file and the problem; nothing below this edge panics on
//! user input.

mod bench_cmd;
mod builtin;
mod chat;
mod plan_cmd;
mod serve_cmd;
mod vault_cmd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};

use smoe::check::Code;
use smoe::compute::Device;
use smoe::engine::{Engine, Prompt, TextStream};
use smoe::experts::{Policy, ReadAhead};
use smoe::model::{human_bytes, parse_bytes, Budget, LoadOptions, Logits, MemoryPlan};
use smoe::sampler::SamplingParams;
use smoe::template::{ChatTemplate, SpecialTokens};
use smoe::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(
    name = "smoe",
    version,
    about = "Mixture-of-Experts inference that streams experts from SSD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Talk with a model: multi-turn, streamed, with a live status line.
    Chat(chat::ChatArgs),
    /// Serve the model over OpenAI- and Anthropic-compatible HTTP, with a
    /// web chat page.
    Serve(serve_cmd::ServeArgs),
    /// Check that a model's tokenizer and chat template belong to its
    /// weights, and that it fits this machine.
    Check(CheckArgs),
    /// Print the model's f32 logits for a sequence of token ids as JSON.
    Logits(LogitsArgs),
    /// Render a conversation with the checkpoint's chat template.
    Template(TemplateArgs),
    /// Convert a Hugging Face checkpoint into a vault (done once).
    Convert(vault_cmd::ConvertArgs),
    /// Check every checksum of a vault.
    Verify(vault_cmd::VerifyArgs),
    /// Describe a checkpoint or vault and the memory plan on this machine.
    Inspect(vault_cmd::InspectArgs),
    /// Measure prefill, decode and streaming against the disk's roofline.
    Bench(bench_cmd::BenchArgs),
    /// Before a download: will a model fit this (or another) machine, what
    /// goes where, and how fast will it decode.
    Plan(plan_cmd::PlanArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint or vault directory (default: the built-in model, converted
    /// to a vault in the cache directory on first use).
    #[arg(long = "model", value_name = "PATH")]
    given: Option<PathBuf>,
    /// The directory in use, set by [`ModelArgs::resolve`].
    #[arg(skip)]
    model: PathBuf,
    /// Worker threads for the kernels (default: one per physical core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// RAM for the expert cache when streaming a vault: e.g. 2GiB, or auto
    /// (the built-in model: a quarter of its experts, to show streaming).
    #[arg(long, default_value = "auto", value_parser = parse_budget)]
    ram_budget: Budget,
    /// Check each expert record's checksum as it is read.
    #[arg(long)]
    verify_experts: bool,
    /// Context length to plan the KV cache for.
    #[arg(long, default_value_t = 4096, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    ctx: usize,
    /// Read the next layer's predicted experts ahead while a layer
    /// computes: off (the default: see the README's read-ahead
    /// measurements), prompts (while a prompt is processed: a shorter time
    /// to first token, a lower hit rate after it) or on (also while
    /// decoding).
    #[arg(long, default_value = "off", value_parser = ["off", "prompts", "on"])]
    prefetch: String,
    /// Expert cache eviction: lfu (frequency with decay) or lru.
    #[arg(long, default_value = "lfu", value_parser = ["lru", "lfu"])]
    cache_policy: String,
    /// Prompt tokens per batched forward pass.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    prefill_chunk: u64,
    /// Sequences whose KV cache the memory plan holds (`serve --parallel`).
    #[arg(skip = 1usize)]
    parallel: usize,
    /// Where the model runs: cpu, cuda, cuda:N, or auto (CUDA when this
    /// binary has it and a usable GPU is found, else the CPU; the start-up
    /// lines say which and why).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: Device,
    /// VRAM for routed experts on CUDA: e.g. 8GiB, 0 (every expert streams
    /// from RAM), or auto (the free VRAM after the backbone, less headroom).
    /// Whole layers' experts go to VRAM while they fit.
    #[arg(long, default_value = "auto", value_parser = parse_budget)]
    vram_budget: Budget,
}

impl ModelArgs {
    /// Sets the model directory: `--model`, else the built-in model's
    /// vault, converted on first use, whose automatic budget is a quarter
    /// of its expert bytes so that it streams.
    fn resolve(&mut self) -> Result<()> {
        // Before the conversion, whose workers would claim the global pool.
        set_threads(self.threads)?;
        match &self.given {
            Some(dir) => self.model = dir.clone(),
            None => {
                self.model = builtin::vault()?;
                if matches!(self.ram_budget, Budget::Auto) {
                    let experts = smoe::vault::Vault::open(&self.model)?.expert_bytes();
                    self.ram_budget = Budget::Bytes(experts / builtin::DEFAULT_BUDGET_FRACTION);
                }
            }
        }
        Ok(())
    }
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "ids"]))]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user message (rendered with the chat template unless --raw).
    #[arg(long)]
    prompt: Option<String>,
    /// Token ids to feed as is, e.g. 1,2,3.
    #[arg(long, value_parser = parse_ids)]
    ids: Option<Ids>,
    /// A system message to put before the user message.
    #[arg(long, conflicts_with_all = ["raw", "ids"])]
    system: Option<String>,
    /// Tokenize the prompt as is, without the chat template.
    #[arg(long, requires = "prompt")]
    raw: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Skip the start-up check of tokenizer, template and memory.
    #[arg(long)]
    no_check: bool,
}

#[derive(Args)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than P times the best (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalty for tokens seen in the last 64 (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed; the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> Result<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..Default::default()
        };
        params.validate()?;
        Ok(params)
    }
}

#[derive(Args)]
struct CheckArgs {
    /// Checkpoint or vault directory (default: the built-in model).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Budget to check the fit with, as for run.
    #[arg(long, default_value = "auto", value_parser = parse_budget)]
    ram_budget: Budget,
    /// Context length to plan the KV cache for.
    #[arg(long, default_value_t = 4096, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    ctx: usize,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, e.g. 1,2,3.
    #[arg(long, value_parser = parse_ids, required = true)]
    ids: Ids,
    /// Logits for every position, not just the last.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct TemplateArgs {
    /// Directory with tokenizer_config.json / chat_template.jinja, or a
    /// .gguf file (weights not needed).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// JSON file with a list of messages.
    #[arg(long, value_name = "FILE.json")]
    messages: PathBuf,
    /// JSON file with a list of tool definitions.
    #[arg(long, value_name = "FILE.json")]
    tools: Option<PathBuf>,
    /// Leave out the assistant header that asks the model to answer.
    #[arg(long)]
    no_generation_prompt: bool,
    /// Extra template variable, e.g. enable_thinking=false (value is JSON).
    #[arg(long = "var", value_name = "KEY=JSON", value_parser = parse_var)]
    vars: Vec<(String, Value)>,
    /// Use this template file instead of the checkpoint's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Print the token ids of the rendered prompt as a JSON array.
    #[arg(long)]
    ids: bool,
}

#[derive(Clone)]
struct Ids(Vec<u32>);

fn parse_ids(s: &str) -> std::result::Result<Ids, String> {
    let ids = s
        .split(',')
        .map(|p| {
            let p = p.trim();
            p.parse::<u32>()
                .map_err(|_| format!("\"{p}\" is not a token id (expected e.g. 1,2,3)"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Ids(ids))
}

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    Device::parse(s).map_err(|e| e.to_string())
}

fn parse_budget(s: &str) -> std::result::Result<Budget, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Budget::Auto);
    }
    parse_bytes(s)
        .map(Budget::Bytes)
        .ok_or_else(|| format!("\"{s}\" is not a size (e.g. 2GiB, 512MiB, auto)"))
}

fn parse_var(s: &str) -> std::result::Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("\"{s}\" is not KEY=JSON"))?;
    let value = serde_json::from_str(v).map_err(|e| format!("value of {k} is not JSON ({e})"))?;
    Ok((k.to_string(), value))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Serve(a) => serve_cmd::serve_cmd(a),
        Command::Check(a) => check_cmd(a),
        Command::Logits(a) => logits(a),
        Command::Template(a) => template(a),
        Command::Convert(a) => vault_cmd::convert_cmd(a),
        Command::Verify(a) => vault_cmd::verify_cmd(a),
        Command::Inspect(a) => vault_cmd::inspect_cmd(a),
        Command::Bench(a) => bench_cmd::bench_cmd(a),
        Command::Plan(a) => plan_cmd::plan_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`smoe logits | head`) is not a failure.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sizes the kernel thread pool: `--threads`, else one thread per physical
/// core. A second hyper-thread on a core shares its load units, so for
/// memory-bound matrix-vector work it adds contention, not bandwidth.
pub(crate) fn set_threads(threads: Option<usize>) -> Result<()> {
    let n = match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => {
            // Each thread is a stack and a spinning worker; far past the
            // CPUs it only costs, and 100,000 of them aborted the process.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let most = (cpus * 8).max(64);
            if n > most {
                bail!(
                    "--threads {n}: expected at most {most} (8 per CPU; this machine has {cpus})"
                );
            }
            n
        }
        None => match physical_cores() {
            Some(n) => n,
            None => return Ok(()),
        },
    };
    // Commands that check before loading size the pool first; the pool is
    // global and can be built once.
    static SIZED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if SIZED.set(()).is_err() {
        return Ok(());
    }
    let running = smoe::kernels::set_threads(n);
    if running != n {
        bail!("the kernel threads were started ({running}) before --threads could size them");
    }
    // The converter's quantization loops run on rayon's pool.
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("setting up the thread pool")
}

/// Distinct (package, core) pairs among the online CPUs (Linux sysfs).
fn physical_cores() -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
        let path = entry.ok()?.path();
        let is_cpu = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.strip_prefix("cpu")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        });
        if !is_cpu {
            continue;
        }
        let read = |f: &str| std::fs::read_to_string(path.join("topology").join(f)).ok();
        if let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) {
            cores.insert((pkg.trim().to_string(), core.trim().to_string()));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

fn load_options(m: &ModelArgs) -> LoadOptions {
    LoadOptions {
        ram_budget: m.ram_budget,
        verify_experts: m.verify_experts,
        ctx: m.ctx,
        prefetch: ReadAhead::parse(&m.prefetch).unwrap_or(LoadOptions::default().prefetch),
        policy: Policy::parse(&m.cache_policy).unwrap_or(LoadOptions::default().policy),
        prefill_chunk: m.prefill_chunk as usize,
        parallel: m.parallel,
        device: m.device,
        vram_budget: m.vram_budget,
        ..Default::default()
    }
}

fn load(m: &ModelArgs) -> Result<Engine> {
    set_threads(m.threads)?;
    BASE_RSS.get_or_init(smoe::memory::current_rss);
    Ok(Engine::load_with(&m.model, &load_options(m))?)
}

/// [`load`] inside `smoe check`, for run and chat: the fit first (a model
/// that cannot fit stops here, with what to do), then the tokenizer and
/// template, with the engine's own. Other findings come back as warning
/// lines for the caller to print, and the command goes on; a missing
/// tokenizer or template is left to the command, which says so itself
/// when (and only when) it needs one.
fn load_checked(m: &ModelArgs, check: bool) -> Result<(Engine, Vec<String>)> {
    set_threads(m.threads)?;
    if !check {
        return Ok((load(m)?, Vec::new()));
    }
    let fit = smoe::check::preflight(&m.model, &load_options(m))?;
    if let Some(f) = fit.iter().find(|f| f.code.blocks_loading()) {
        bail!("{} (or pass --no-check to load it anyway)", f.message);
    }
    let engine = load(m)?;
    let warnings = fit
        .into_iter()
        .chain(smoe::check::check_engine(&engine)?)
        .filter(|f| !matches!(f.code, Code::NoTokenizer | Code::NoChatTemplate))
        .map(|f| format!("warning: {}", f.message))
        .collect();
    Ok((engine, warnings))
}

fn check_cmd(a: CheckArgs) -> Result<()> {
    let model = match a.model {
        Some(dir) => dir,
        None => builtin::vault()?,
    };
    let opts = LoadOptions {
        ram_budget: a.ram_budget,
        ctx: a.ctx,
        ..Default::default()
    };
    // A GGUF's tokenizer and template are checked from its metadata, its
    // fit as it streams.
    let findings = if smoe::gguf::is_gguf(&model) {
        let mut f = smoe::check::preflight(&model, &opts)?;
        f.extend(smoe::gguf::check::check(&smoe::gguf::Gguf::open(&model)?)?);
        f
    } else {
        smoe::check::check(&model, &opts)?
    };
    let mut out = std::io::stdout().lock();
    for f in &findings {
        writeln!(out, "{f}")?;
    }
    let errors = findings.iter().filter(|f| f.is_error()).count();
    if errors > 0 {
        out.flush()?;
        bail!("{}: {errors} problem(s) found", model.display());
    }
    writeln!(out, "ok")?;
    Ok(())
}

fn describe_plan(p: &MemoryPlan) -> String {
    format!(
        "memory plan: backbone {} | expert cache {} ({} slots of {}, {:.0}% of {} experts) | KV {} for {} | activations {} | free {} | direct I/O {}",
        human_bytes(p.backbone_bytes),
        human_bytes(p.cache_bytes),
        p.cache_slots,
        human_bytes(p.slot_bytes),
        100.0 * p.cache_bytes as f64 / p.expert_bytes.max(1) as f64,
        human_bytes(p.expert_bytes),
        human_bytes(p.kv_bytes),
        kv_extent(p.sequences, p.ctx),
        human_bytes(p.activation_bytes),
        p.available_bytes
            .map(|a| human_bytes(a.saturating_sub(p.planned_bytes())))
            .unwrap_or_else(|| "unknown".into()),
        if p.direct_io { "on" } else { "off (buffered + fadvise)" },
    )
}

/// Resident set before the model loads: the binary, its libraries and the
/// allocator, which every engine pays and no budget covers.
static BASE_RSS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

fn run(mut a: RunArgs) -> Result<()> {
    a.model.resolve()?;
    let (engine, warnings) = load_checked(&a.model, !a.no_check)?;
    for w in warnings {
        eprintln!("{w}");
    }
    if let (Some(plan), false) = (engine.plan(), a.json) {
        eprintln!("{}", describe_plan(plan));
    }
    // With the start-up lines a vault gets, or whenever it is not the CPU:
    // a checkpoint on the CPU says nothing, as before.
    if !a.json && (engine.plan().is_some() || !engine.on_cpu()) {
        eprintln!("device: {}", engine.device());
    }
    let prompt = match (a.ids, a.prompt) {
        (Some(Ids(ids)), _) => Prompt::Ids(ids),
        (None, Some(text)) if a.raw => Prompt::Raw(text),
        (None, Some(user)) => Prompt::Chat {
            system: a.system,
            user,
        },
        (None, None) => bail!("give --prompt TEXT or --ids 1,2,3"),
    };
    let params = a.sampling.params()?;
    let prompt_ids = engine.prompt_ids(&prompt)?;
    let mut session = engine.new_session();

    let mut stream = TextStream::new(&engine);
    let mut stdout = std::io::stdout().lock();
    let mut stream_err = None;
    let max_tokens = a.sampling.max_tokens;
    let gen = engine.generate(&mut session, &prompt_ids, &params, max_tokens, |tok| {
        if a.json || stream_err.is_some() {
            return;
        }
        match stream.push(tok) {
            Ok(Some(piece)) => {
                let _ = stdout
                    .write_all(piece.as_bytes())
                    .and_then(|_| stdout.flush());
            }
            Ok(None) => {}
            Err(e) => stream_err = Some(e),
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e.into());
    }

    let text = engine.reply_text(&gen.tokens)?;
    let tm = &gen.timings;
    let stats = engine
        .cache_report(Some(tm.prefill_tokens + tm.decode_tokens))
        .map(|mut r| {
            r.base_rss_bytes = Some(BASE_RSS.get().copied().flatten());
            r
        });
    if a.json {
        let out = json!({
            "prompt_ids": prompt_ids,
            "tokens": gen.tokens,
            "text": text,
            "stop_reason": gen.stop_reason.as_str(),
            "timings": {
                "prefill_s": tm.prefill_s,
                "decode_s": tm.decode_s,
                "prefill_tok_s": tm.prefill_tok_s(),
                "decode_tok_s": tm.decode_tok_s(),
            },
        });
        let mut out = out;
        if let Some(stats) = stats {
            out["stats"] = serde_json::to_value(stats)?;
        }
        writeln!(stdout, "{out}")?;
    } else {
        if let Some(rest) = stream.finish()? {
            stdout.write_all(rest.as_bytes())?;
        }
        if !engine.has_tokenizer() {
            write!(stdout, "{:?}", gen.tokens)?;
        }
        writeln!(stdout)?;
        eprintln!(
            "[prefill {} tok {:.1} tok/s | decode {} tok {:.1} tok/s | stop: {}]",
            tm.prefill_tokens,
            tm.prefill_tok_s(),
            tm.decode_tokens,
            tm.decode_tok_s(),
            gen.stop_reason.as_str()
        );
    }
    Ok(())
}

fn logits(mut a: LogitsArgs) -> Result<()> {
    a.model.resolve()?;
    let engine = load(&a.model)?;
    if !engine.on_cpu() {
        eprintln!("device: {}", engine.device());
    }
    let mut session = engine.new_session();
    let mode = if a.all { Logits::All } else { Logits::Last };
    let out = engine.model().forward(&a.ids.0, &mut session, mode)?;
    let vocab = engine.config().vocab_size;
    let value = if a.all {
        Value::from(
            out.chunks(vocab)
                .map(|r| Value::from(r.to_vec()))
                .collect::<Vec<_>>(),
        )
    } else {
        Value::from(out.to_vec())
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", json!({ "logits": value }))?;
    Ok(())
}

fn read_json_file(path: &Path) -> Result<Value> {
    Ok(smoe::error::read_json(path)?)
}

fn template(a: TemplateArgs) -> Result<()> {
    // A GGUF carries its tokenizer and template in its metadata.
    let gguf = if smoe::gguf::is_gguf(&a.model) {
        let g = smoe::gguf::Gguf::open(&a.model)?;
        let t = smoe::gguf::tokenizer::load(&g)?;
        Some((g, t))
    } else {
        None
    };
    let template = match (&a.chat_template, &gguf) {
        (Some(file), _) => {
            let source = smoe::error::read_to_string(file)?;
            let special = match &gguf {
                Some((_, t)) => t.special.clone(),
                None => SpecialTokens::from_dir(&a.model)?,
            };
            ChatTemplate::new(&source, special)?.named(file.display().to_string())
        }
        (None, Some((g, t))) => t.chat_template(g)?,
        (None, None) => ChatTemplate::from_dir(&a.model)?,
    };
    let messages = read_json_file(&a.messages)?;
    let tools = a.tools.as_deref().map(read_json_file).transpose()?;
    if let Some(t) = &tools {
        if !t.is_array() {
            bail!(
                "{}: tools must be a JSON list",
                a.tools.as_deref().unwrap_or(Path::new("")).display()
            );
        }
    }
    let extra: Map<String, Value> = a.vars.into_iter().collect();
    let text = template
        .render(&messages, tools.as_ref(), !a.no_generation_prompt, &extra)
        .map_err(|e| match e {
            smoe::Error::Invalid(msg) => anyhow::anyhow!("{}: {msg}", a.messages.display()),
            other => other.into(),
        })?;
    let mut stdout = std::io::stdout().lock();
    if a.ids {
        let tokenizer = match &gguf {
            Some((g, t)) => t.to_tokenizer(g)?,
            None => Tokenizer::from_dir(&a.model)?,
        };
        let ids = tokenizer.encode(&text, false)?;
        writeln!(stdout, "{}", Value::from(ids))?;
    } else {
        stdout.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// What a KV cache holds, for the memory lines of the summary and the plan.
fn kv_extent(sequences: usize, ctx: usize) -> String {
    match sequences {
        1 => format!("{ctx} tokens"),
        n => format!("{n} sequences of {ctx} tokens"),
    }
}
