//! The `smoe` command line. Library errors arrive here and are printed as one
//! line naming the file and the problem; nothing below this edge panics on
//! user input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};

use smoe::engine::{Engine, Prompt};
use smoe::model::Logits;
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
    /// Print the model's f32 logits for a sequence of token ids as JSON.
    Logits(LogitsArgs),
    /// Render a conversation with the checkpoint's chat template.
    Template(TemplateArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer files).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
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
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
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
    /// Directory with tokenizer_config.json / chat_template.jinja (weights not needed).
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
        Command::Logits(a) => logits(a),
        Command::Template(a) => template(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(m: &ModelArgs) -> Result<Engine> {
    if let Some(n) = m.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(Engine::load(&m.model)?)
}

fn run(a: RunArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let prompt = match (a.ids, a.prompt) {
        (Some(Ids(ids)), _) => Prompt::Ids(ids),
        (None, Some(text)) if a.raw => Prompt::Raw(text),
        (None, Some(user)) => Prompt::Chat {
            system: a.system,
            user,
        },
        (None, None) => bail!("give --prompt TEXT or --ids 1,2,3"),
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        seed: a.seed,
        ..Default::default()
    };
    params.validate()?;
    let prompt_ids = engine.prompt_ids(&prompt)?;
    let mut session = engine.new_session();

    let mut stream = engine.tokenizer.as_ref().map(|t| t.stream(true));
    let text_max = engine.tokenizer.as_ref().map_or(0, |t| t.max_id());
    let mut stdout = std::io::stdout().lock();
    let mut stream_err = None;
    let gen = engine.generate(&mut session, &prompt_ids, &params, a.max_tokens, |tok| {
        if a.json || stream_err.is_some() {
            return;
        }
        // Embedding rows past the tokenizer's last id (padding) have no text.
        if let Some(s) = stream.as_mut().filter(|_| tok <= text_max) {
            match s.push(tok) {
                Ok(Some(piece)) => {
                    let _ = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush());
                }
                Ok(None) => {}
                Err(e) => stream_err = Some(e),
            }
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e.into());
    }

    let text = match &engine.tokenizer {
        Some(t) => {
            let ids: Vec<u32> = gen
                .tokens
                .iter()
                .copied()
                .filter(|&id| id <= text_max)
                .collect();
            t.decode(&ids, true)?
        }
        None => String::new(),
    };
    let tm = &gen.timings;
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
        writeln!(stdout, "{out}")?;
    } else {
        if let Some(rest) = stream.as_mut().map(|s| s.finish()).transpose()?.flatten() {
            stdout.write_all(rest.as_bytes())?;
        }
        if engine.tokenizer.is_none() {
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

fn logits(a: LogitsArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let mut session = engine.new_session();
    let mode = if a.all { Logits::All } else { Logits::Last };
    let out = engine.model.forward(&a.ids.0, &mut session, mode)?;
    let vocab = engine.model.config().vocab_size;
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
    let template = match &a.chat_template {
        Some(file) => {
            let source = smoe::error::read_to_string(file)?;
            ChatTemplate::new(&source, SpecialTokens::from_dir(&a.model)?)?
        }
        None => ChatTemplate::from_dir(&a.model)?,
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
        let ids = Tokenizer::from_dir(&a.model)?.encode(&text, false)?;
        writeln!(stdout, "{}", Value::from(ids))?;
    } else {
        stdout.write_all(text.as_bytes())?;
    }
    Ok(())
}
