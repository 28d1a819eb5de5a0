//! `smoe chat`: a conversation in the terminal.
//!
//! Each turn renders the whole conversation with the checkpoint's template
//! and tokenizes it; the session keeps the KV cache of everything it has
//! seen, so only the tokens after the longest common prefix are prefilled.
//! That prefix ends early when the template re-renders history differently
//! from how it was generated (Qwen3 drops the reasoning of earlier replies),
//! and then more is prefilled: correct, and shown in the turn's counters.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rustyline::error::ReadlineError;
use serde_json::{json, Value};

use smoe::checkpoint::{Checkpoint, Weight};
use smoe::config::ModelConfig;
use smoe::engine::{Engine, Generation, TextStream};
use smoe::experts::StatsSnapshot;
use smoe::model::blocks::EMBED;
use smoe::model::GpuExpertStats;
use smoe::model::{human_bytes, Session};
use smoe::sampler::SamplingParams;
use smoe::vault::{self, Vault};

use crate::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    /// Skip the start-up check of tokenizer, template and memory.
    #[arg(long)]
    no_check: bool,
    /// Sleep this long after each token. The pseudo-terminal test needs a
    /// reply that is still streaming when its Ctrl-C arrives, on any
    /// machine, without guessing at timings.
    #[arg(long, hide = true, default_value_t = 0)]
    token_delay_ms: u64,
}

const HELP: &str = "\
/help          this list
/reset         forget the conversation (the system message stays)
/system TEXT   set the system message (no TEXT: remove it)
/stats         counters: context, prefill and decode, memory, expert cache
/save FILE     write the conversation as OpenAI-style JSON messages
/load FILE     continue a conversation saved with /save
/quit          leave (or Ctrl-D)
A line ending in \\ continues on the next line; pasted text may span lines.
Ctrl-C stops a reply and keeps what was written of it.";

pub fn chat(mut a: ChatArgs) -> Result<()> {
    a.model.resolve()?;
    let params = a.sampling.params()?;
    let spinner = spinner(format!("loading {}", a.model.model.display()));
    let (engine, warnings) = crate::load_checked(&a.model, !a.no_check)?;
    spinner.finish_and_clear();
    for w in warnings {
        eprintln!("{w}");
    }
    if !engine.has_tokenizer() || engine.template().is_none() {
        bail!(
            "{}: smoe chat needs tokenizer.json and a chat template (smoe run --ids works without them)",
            a.model.model.display()
        );
    }
    warm(&a.model.model, engine.config())?;
    let ctx_limit = a.model.ctx.min(engine.config().max_position_embeddings);
    eprintln!("{}", summary(&engine, &a, &params, ctx_limit)?);

    let flags = Flags::install()?;
    let mut chat = Chat {
        session: engine.new_session(),
        engine: &engine,
        messages: Vec::new(),
        system: a.system.clone(),
        params,
        max_tokens: a.sampling.max_tokens,
        ctx_limit,
        token_delay: Duration::from_millis(a.token_delay_ms),
        tty: std::io::stdout().is_terminal(),
        flags,
        totals: Totals::default(),
        last: None,
    };
    chat.reset();
    let mut input = Input::open()?;
    loop {
        let text = match input.message()? {
            Line::Text(t) => t,
            Line::Interrupted => {
                eprintln!("(Ctrl-D or /quit leaves)");
                continue;
            }
            Line::Eof => break,
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            if !chat.command(cmd)? {
                break;
            }
        } else {
            chat.turn(text)?;
        }
    }
    Ok(())
}

fn spinner(msg: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner().with_message(msg);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Touches every page of the resident weights once, behind a progress
/// bar, so that the first reply does not stall for as long as it takes to
/// fault in gigabytes.
fn warm(dir: &Path, cfg: &ModelConfig) -> Result<()> {
    let weights = resident_weights(dir, cfg)?;
    let total: usize = weights.iter().map(|w| w.bytes().len()).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} warming the backbone [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    let mut sum = 0u8;
    for w in &weights {
        for chunk in w.bytes().chunks(4 << 20) {
            sum ^= chunk.iter().step_by(4096).fold(0, |a, &b| a ^ b);
            bar.inc(chunk.len() as u64);
        }
    }
    std::hint::black_box(sum);
    bar.finish_and_clear();
    Ok(())
}

/// The weights a token reads from RAM: not the routed experts (streamed,
/// or touched only when routed to), and not an untied embedding table (a
/// token reads one row of it).
fn resident_weights(dir: &Path, cfg: &ModelConfig) -> Result<Vec<Weight>> {
    let skip = |name: &str| {
        (!cfg.tie_word_embeddings && name == EMBED) || cfg.family.is_routed_expert(name)
    };
    Ok(if vault::is_vault(dir) {
        let vault = Vault::open(dir)?;
        let backbone = vault.backbone()?;
        vault
            .manifest
            .backbone
            .iter()
            .filter(|(name, _)| !skip(name))
            .map(|(name, t)| smoe::checkpoint::TensorSource::tensor(&backbone, name, &t.shape))
            .collect::<smoe::Result<_>>()?
    } else {
        let ckpt = Checkpoint::open(dir)?;
        ckpt.tensor_names()
            .filter(|name| !skip(name))
            .map(|name| ckpt.tensor_any(name))
            .collect::<smoe::Result<_>>()?
    })
}

/// The one-screen start-up summary.
fn summary(engine: &Engine, a: &ChatArgs, params: &SamplingParams, ctx: usize) -> Result<String> {
    let c = engine.config();
    let dir = &a.model.model;
    let mut out = format!(
        "smoe chat · {}\nmodel    {:?}: {} layers, hidden {}, {} experts (top {}), vocab {}, context {}\n",
        dir.display(),
        c.family,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_experts,
        c.num_experts_per_tok,
        c.vocab_size,
        c.max_position_embeddings
    );
    let fp = smoe::memory::Footprint::of(dir, &crate::load_options(&a.model))?;
    let plan = match engine.plan() {
        Some(plan) => {
            out += &format!("weights  vault: {}\n", fp.quant);
            crate::describe_plan(plan)
                .trim_start_matches("memory plan: ")
                .to_string()
        }
        None => {
            out += &format!(
                "weights  checkpoint: {}, memory-mapped (the OS pages them in as they are used)\n",
                fp.quant
            );
            let free = smoe::model::available_memory()
                .map(|a| human_bytes(a.saturating_sub(fp.fixed_bytes())))
                .unwrap_or_else(|| "unknown".into());
            format!(
                "weights {} | KV {} for {} tokens | free {free} | direct I/O not used (no vault: smoe convert makes one)",
                human_bytes(fp.resident_bytes),
                human_bytes(fp.kv_bytes),
                fp.ctx
            )
        }
    };
    // One item a line: the plan's one-line form is too wide for a screen.
    out += &format!("memory   {}\n", plan.replace(" | ", "\n         "));
    out += &format!("device   {}\n", engine.device());
    let sampling = if params.temperature == 0.0 {
        "greedy".to_string()
    } else {
        format!(
            "temperature {}, top-k {}, top-p {}, min-p {}, seed {}",
            params.temperature, params.top_k, params.top_p, params.min_p, params.seed
        )
    };
    out += &format!(
        "replies  {sampling}, up to {} tokens; the conversation may hold {ctx} tokens\n",
        a.sampling.max_tokens
    );
    out += "/help lists the commands · Ctrl-C stops a reply · Ctrl-D leaves";
    Ok(out)
}

/// Ctrl-C is a signal while a reply streams (the terminal is in cooked
/// mode) and a key at the prompt (rustyline reads raw). The handler runs
/// on ctrlc's own thread, not in signal context, so it may exit.
struct Flags {
    generating: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
}

impl Flags {
    fn install() -> Result<Self> {
        let generating = Arc::new(AtomicBool::new(false));
        let cancel = Arc::new(AtomicBool::new(false));
        let (g, c) = (Arc::clone(&generating), Arc::clone(&cancel));
        ctrlc::set_handler(move || {
            if g.load(Ordering::SeqCst) {
                c.store(true, Ordering::SeqCst);
            } else {
                // Piped input blocked in a read: nothing to keep.
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(Self { generating, cancel })
    }
}

enum Line {
    Text(String),
    Interrupted,
    Eof,
}

/// Lines from the terminal through rustyline (editing, history), or plain
/// lines from a pipe (no prompt, nothing echoed).
enum Input {
    Editor(Box<rustyline::DefaultEditor>, Option<PathBuf>),
    Piped(std::io::StdinLock<'static>),
}

impl Input {
    fn open() -> Result<Self> {
        if !std::io::stdin().is_terminal() {
            return Ok(Input::Piped(std::io::stdin().lock()));
        }
        let config = rustyline::Config::builder()
            .auto_add_history(false)
            .max_history_size(1000)?
            .build();
        let mut editor = rustyline::DefaultEditor::with_config(config)?;
        let history = history_path().filter(|p| {
            p.parent()
                .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        });
        if let Some(p) = history.as_ref().filter(|p| p.exists()) {
            if let Err(e) = editor.load_history(p) {
                eprintln!("warning: {}: history not loaded: {e}", p.display());
            }
        }
        Ok(Input::Editor(Box::new(editor), history))
    }

    fn line(&mut self, prompt: &str) -> Result<Line> {
        match self {
            Input::Editor(ed, _) => match ed.readline(prompt) {
                Ok(l) => Ok(Line::Text(l)),
                Err(ReadlineError::Interrupted) => Ok(Line::Interrupted),
                Err(ReadlineError::Eof) => Ok(Line::Eof),
                Err(e) => Err(e.into()),
            },
            Input::Piped(r) => {
                // Bytes, not read_line: invalid UTF-8 ended the session.
                // It is replaced (U+FFFD) and the conversation goes on.
                let mut raw = Vec::new();
                if r.read_until(b'\n', &mut raw)? == 0 {
                    return Ok(Line::Eof);
                }
                let mut s = String::from_utf8_lossy(&raw).into_owned();
                let end = s.trim_end_matches(['\n', '\r']).len();
                s.truncate(end);
                Ok(Line::Text(s))
            }
        }
    }

    /// One message: lines joined while they end in a backslash.
    fn message(&mut self) -> Result<Line> {
        let mut text = String::new();
        let mut prompt = "> ";
        loop {
            match self.line(prompt)? {
                Line::Text(l) => match l.strip_suffix('\\') {
                    Some(head) => {
                        text += head;
                        text.push('\n');
                        prompt = ". ";
                    }
                    None => {
                        text += &l;
                        break;
                    }
                },
                // Ctrl-D after a continuation sends what there is.
                Line::Eof if !text.is_empty() => break,
                other => return Ok(other),
            }
        }
        if let Input::Editor(ed, Some(path)) = self {
            if !text.trim().is_empty() && ed.add_history_entry(text.as_str())? {
                // Appended as we go, so a crash keeps the history.
                if let Err(e) = ed.append_history(path) {
                    eprintln!("warning: {}: history not saved: {e}", path.display());
                }
            }
        }
        Ok(Line::Text(text))
    }
}

/// `$XDG_STATE_HOME/smoe/history`, or `~/.local/state/smoe/history`.
fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("smoe").join("history"))
}

#[derive(Default)]
struct Totals {
    turns: usize,
    prefilled: usize,
    reused: usize,
    prefill_s: f64,
    decoded: usize,
    decode_s: f64,
}

struct Turn {
    gen: Generation,
    reused: usize,
    experts: Option<StatsSnapshot>,
}

struct Chat<'e> {
    engine: &'e Engine,
    session: Session,
    /// The conversation in OpenAI message format, system message included.
    messages: Vec<Value>,
    system: Option<String>,
    params: SamplingParams,
    max_tokens: usize,
    ctx_limit: usize,
    token_delay: Duration,
    tty: bool,
    flags: Flags,
    totals: Totals,
    last: Option<Turn>,
}

impl Chat<'_> {
    /// Runs a /command; false means leave.
    fn command(&mut self, cmd: &str) -> Result<bool> {
        let (name, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
        let arg = arg.trim();
        let mut out = std::io::stdout().lock();
        match name {
            "help" => writeln!(out, "{HELP}")?,
            "quit" | "exit" => return Ok(false),
            "reset" => {
                self.reset();
                writeln!(out, "(conversation cleared)")?;
            }
            "system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_string());
                self.set_system();
                match &self.system {
                    Some(_) => writeln!(out, "(system message set)")?,
                    None => writeln!(out, "(system message removed)")?,
                }
            }
            "stats" => writeln!(out, "{}", self.stats())?,
            "save" | "load" if arg.is_empty() => {
                eprintln!("error: /{name} needs a file name");
            }
            "save" => match save(Path::new(arg), &self.messages) {
                Ok(()) => writeln!(out, "(saved {} messages to {arg})", self.messages.len())?,
                Err(e) => eprintln!("error: {e}"),
            },
            "load" => match load(Path::new(arg)) {
                Ok(messages) => {
                    self.system = messages
                        .first()
                        .filter(|m| m["role"] == "system")
                        .and_then(|m| m["content"].as_str())
                        .map(str::to_string);
                    self.messages = messages;
                    writeln!(
                        out,
                        "(loaded {} messages from {arg}; the next message continues it)",
                        self.messages.len()
                    )?;
                }
                Err(e) => eprintln!("error: {e}"),
            },
            _ => eprintln!("error: unknown command /{name}; /help lists them"),
        }
        Ok(true)
    }

    fn reset(&mut self) {
        self.messages.clear();
        self.set_system();
        // A fresh session also gives the KV cache's memory back.
        self.session = self.engine.new_session();
    }

    fn set_system(&mut self) {
        if self.messages.first().is_some_and(|m| m["role"] == "system") {
            self.messages.remove(0);
        }
        if let Some(s) = &self.system {
            self.messages
                .insert(0, json!({"role": "system", "content": s}));
        }
    }

    /// One user message and the reply to it.
    fn turn(&mut self, text: &str) -> Result<()> {
        self.messages.push(json!({"role": "user", "content": text}));
        let ids = match self
            .engine
            .conversation_ids(&Value::Array(self.messages.clone()))
        {
            Ok(ids) => ids,
            Err(e) => {
                self.messages.pop();
                eprintln!("error: {e}");
                return Ok(());
            }
        };
        if ids.len() + self.max_tokens > self.ctx_limit {
            self.messages.pop();
            eprintln!(
                "error: the conversation is {} tokens, and a reply of up to {} more would pass the context of {} tokens ({}); nothing was sent or dropped: /reset starts over, /save keeps it to edit and /load",
                ids.len(),
                self.max_tokens,
                self.ctx_limit,
                if self.ctx_limit < self.engine.config().max_position_embeddings {
                    "--ctx"
                } else {
                    "the model's max_position_embeddings"
                }
            );
            return Ok(());
        }
        let reused = self.session.reuse_prefix(&ids);
        let before = self.engine.cache().map(|c| c.stats().snapshot());
        let gpu_before = self.engine.gpu_expert_stats();

        let mut stdout = std::io::stdout().lock();
        let mut text_out = TextStream::new(self.engine);
        let mut status = if self.tty {
            StatusLine::begin(&mut stdout)?
        } else {
            None
        };
        let mut stream_err = None;
        let mut first_at = None;
        let mut count = 0usize;
        let mut last_draw: Option<Instant> = None;
        self.flags.cancel.store(false, Ordering::SeqCst);
        self.flags.generating.store(true, Ordering::SeqCst);
        let engine = self.engine;
        let (delay, cancel, tty) = (self.token_delay, &self.flags.cancel, self.tty);
        let result = engine.generate(
            &mut self.session,
            &ids[reused..],
            &self.params,
            self.max_tokens,
            |tok| {
                match text_out.push(tok) {
                    Ok(Some(piece)) => {
                        let _ = stdout.write_all(printable(&piece, tty).as_bytes());
                    }
                    Ok(None) => {}
                    Err(e) => stream_err = Some(e),
                }
                count += 1;
                let now = Instant::now();
                let first = *first_at.get_or_insert(now);
                if let Some(st) = &status {
                    if last_draw.is_none_or(|t| now - t >= Duration::from_millis(200)) {
                        let rate = (count > 1)
                            .then(|| smoe::engine::rate(count - 1, (now - first).as_secs_f64()));
                        let _ = st.draw(
                            &mut stdout,
                            &status_text(engine, rate, before.as_ref(), gpu_before.as_ref()),
                        );
                        last_draw = Some(now);
                    }
                }
                let _ = stdout.flush();
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                if cancel.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        self.flags.generating.store(false, Ordering::SeqCst);
        if let Some(rest) = text_out.finish()? {
            stdout.write_all(printable(&rest, tty).as_bytes())?;
        }
        if let Some(st) = status.take() {
            st.end(&mut stdout)?;
        }
        writeln!(stdout)?;
        let gen = match result {
            Ok(gen) => gen,
            Err(e) => {
                self.messages.pop();
                stdout.flush()?;
                eprintln!("error: {e}");
                return Ok(());
            }
        };
        if let Some(e) = stream_err {
            eprintln!("error: {e}");
        }
        // A stopped reply stays in the conversation as far as it got.
        let reply = self.engine.reply_text(&gen.tokens)?;
        self.messages
            .push(json!({"role": "assistant", "content": reply}));

        let experts = before
            .as_ref()
            .zip(self.engine.cache())
            .map(|(b, c)| c.stats().snapshot().since(b));
        let t = &gen.timings;
        self.totals.turns += 1;
        self.totals.prefilled += t.prefill_tokens;
        self.totals.reused += reused;
        self.totals.prefill_s += t.prefill_s;
        self.totals.decoded += gen.tokens.len();
        self.totals.decode_s += t.decode_s;
        let turn = Turn {
            gen,
            reused,
            experts,
        };
        if self.tty {
            let rate = turn.gen.timings.decode_tok_s();
            writeln!(
                stdout,
                "{}",
                status_text(
                    self.engine,
                    Some(rate),
                    before.as_ref(),
                    gpu_before.as_ref()
                )
            )?;
        }
        stdout.flush()?;
        eprintln!("[{}]", self.turn_line(&turn));
        self.last = Some(turn);
        Ok(())
    }

    fn turn_line(&self, turn: &Turn) -> String {
        let t = &turn.gen.timings;
        format!(
            "prefill {} tok (reused {}) {:.1} tok/s | decode {} tok {:.2} tok/s | context {}/{} | stop: {}",
            t.prefill_tokens,
            turn.reused,
            t.prefill_tok_s(),
            turn.gen.tokens.len(),
            t.decode_tok_s(),
            self.session.len(),
            self.ctx_limit,
            turn.gen.stop_reason.as_str()
        )
    }

    fn stats(&self) -> String {
        let tt = &self.totals;
        let mut out = format!(
            "conversation  {} messages, {} turns; the KV cache holds {} of {} tokens\n",
            self.messages.len(),
            tt.turns,
            self.session.len(),
            self.ctx_limit
        );
        if let Some(turn) = &self.last {
            out += &format!("last turn     {}\n", self.turn_line(turn));
        }
        out += &format!(
            "all turns     prefilled {} tok in {:.2} s, reused {} | decoded {} tok in {:.2} s ({:.2} tok/s)\n",
            tt.prefilled,
            tt.prefill_s,
            tt.reused,
            tt.decoded,
            tt.decode_s,
            smoe::engine::rate(tt.decoded, tt.decode_s)
        );
        let size = |b: Option<u64>| b.map_or("?".into(), human_bytes);
        out += &format!(
            "memory        RSS {} (peak {}) of {} total\n",
            size(smoe::memory::current_rss()),
            size(smoe::memory::peak_rss()),
            size(smoe::memory::mem_total())
        );
        if let Some(c) = self.engine.cache() {
            let all = c.stats().snapshot();
            out += &format!(
                "expert cache  {} slots of {} ({}), direct I/O {}, read-ahead {}, {} eviction\n",
                c.capacity(),
                human_bytes(c.slot_bytes() as u64),
                human_bytes((c.capacity() * c.slot_bytes()) as u64),
                if c.direct_io() { "on" } else { "off" },
                c.read_ahead().name(),
                c.policy().name()
            );
            for (label, st) in [
                ("since start", Some(all)),
                ("last turn", self.last.as_ref().and_then(|t| t.experts)),
            ] {
                if let Some(st) = st {
                    out += &format!(
                        "  {label:<11} hits {} (prefetched {}), misses {}, hit rate {:.1}% | read {} at {:.2} GB/s, blocked {:.2} s\n",
                        st.hits,
                        st.prefetch_hits,
                        st.misses,
                        100.0 * st.hit_rate(),
                        human_bytes(st.bytes_read()),
                        st.read_gb_s(),
                        st.blocked_s
                    );
                }
            }
            if let Some(g) = self.engine.gpu_expert_stats() {
                out += &format!(
                    "  GPU tiers   VRAM hits {}, copied to the GPU {} ({} over PCIe), run on the CPU {}; \
                     steps run as one CUDA graph {} ({} replayed), stretches between the host's \
                     waits {} ({} replayed)\n",
                    g.vram_hits,
                    g.copied,
                    human_bytes(g.pcie_bytes),
                    g.cpu_runs,
                    g.graph_steps,
                    g.graph_replays,
                    g.graph_stretches,
                    g.stretch_replays
                );
            }
        }
        out.trim_end().to_string()
    }
}

/// Text as the terminal should see it: control characters a model wrote
/// (an escape sequence could move the cursor, retitle or reprogram the
/// terminal) become their visible symbols. The conversation keeps the
/// exact text; a pipe gets it as is.
fn printable(text: &str, tty: bool) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !tty || !text.chars().any(unsafe_char) {
        return text.into();
    }
    text.chars()
        .map(|c| match c {
            c if !unsafe_char(c) => c,
            '\x7f' => '\u{2421}',
            c if (c as u32) < 0x20 => char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'),
            _ => '\u{fffd}',
        })
        .collect::<String>()
        .into()
}

/// `smoe ▸ 1.84 tok/s │ RAM 21.3/48.0 GB │ cache 1534 slots 15.0 GB │ hit 84% │ SSD 2.9 GB/s`,
/// on a GPU with `│ VRAM 25% │ PCIe 3.2 GB` after it (the share of expert
/// uses VRAM served, the bytes copied to the GPU), the cache figures over
/// the current turn; no rate before a second token.
fn status_text(
    engine: &Engine,
    tok_s: Option<f64>,
    turn_start: Option<&StatsSnapshot>,
    gpu_start: Option<&GpuExpertStats>,
) -> String {
    let mut parts = vec![match tok_s {
        Some(r) => format!("{r:.2} tok/s"),
        None => "-- tok/s".into(),
    }];
    if let (Some(rss), Some(total)) = (smoe::memory::current_rss(), smoe::memory::mem_total()) {
        parts.push(format!("RAM {}/{}", short_size(rss), short_size(total)));
    }
    if let Some(c) = engine.cache() {
        let now = c.stats().snapshot();
        let st = turn_start.map_or(now, |b| now.since(b));
        parts.push(format!(
            "cache {} slots {}",
            c.capacity(),
            short_size((c.capacity() * c.slot_bytes()) as u64)
        ));
        parts.push(format!("hit {:.0}%", 100.0 * st.hit_rate()));
        parts.push(format!("SSD {:.1} GB/s", st.read_gb_s()));
        if let Some(now) = engine.gpu_expert_stats() {
            let g = gpu_start.map_or(now, |b| now.since(b));
            let uses = g.vram_hits + st.requests();
            if uses > 0 {
                parts.push(format!(
                    "VRAM {:.0}%",
                    100.0 * g.vram_hits as f64 / uses as f64
                ));
            }
            parts.push(format!("PCIe {}", short_size(g.pcie_bytes)));
        }
    }
    format!("smoe ▸ {}", parts.join(" │ "))
}

/// Sizes for the status line: decimal units, three figures at most.
fn short_size(bytes: u64) -> String {
    match bytes as f64 {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.0} MB", b / 1e6),
        b => format!("{:.0} kB", b / 1e3),
    }
}

/// A line kept at the bottom of the terminal while text scrolls above it:
/// the scroll region excludes the last row (as apt's progress bar does),
/// so streamed text never overwrites it and it never scrolls away.
struct StatusLine {
    rows: u16,
    cols: u16,
}

impl StatusLine {
    /// Starts with the cursor at the beginning of a line, as it is after
    /// the user's Enter. None on a terminal too small to spare a row.
    fn begin(out: &mut impl Write) -> Result<Option<Self>> {
        let Some((rows, cols)) = console::Term::stdout().size_checked() else {
            return Ok(None);
        };
        if rows < 3 || cols < 10 {
            return Ok(None);
        }
        // A newline and back up guarantee a free row below the cursor
        // (scrolling if it was on the last), then the region is set; the
        // cursor save/restore keeps the writing position.
        write!(out, "\n\x1b[1A\r\x1b7\x1b[1;{}r\x1b8", rows - 1)?;
        Ok(Some(Self { rows, cols }))
    }

    fn draw(&self, out: &mut impl Write, text: &str) -> std::io::Result<()> {
        let fit: String = text.chars().take(self.cols as usize - 1).collect();
        write!(out, "\x1b7\x1b[{};1H\x1b[2K{fit}\x1b8", self.rows)
    }

    fn end(self, out: &mut impl Write) -> std::io::Result<()> {
        write!(out, "\x1b7\x1b[{};1H\x1b[2K\x1b[r\x1b8", self.rows)
    }
}

fn save(path: &Path, messages: &[Value]) -> Result<()> {
    let text = serde_json::to_string_pretty(messages)?;
    std::fs::write(path, text + "\n").map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A conversation in OpenAI message format: a list of objects with a
/// string "role" (system, user, assistant or tool) and string "content".
fn load(path: &Path) -> Result<Vec<Value>> {
    let v = smoe::error::read_json(path)?;
    let Value::Array(messages) = v else {
        bail!("{}: expected a JSON list of messages", path.display());
    };
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        if !matches!(role, Some("system" | "user" | "assistant" | "tool")) {
            bail!(
                "{}: message {i} needs a \"role\" of system, user, assistant or tool",
                path.display()
            );
        }
        if !m.get("content").is_some_and(Value::is_string) {
            bail!("{}: message {i} has no string \"content\"", path.display());
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family's routed experts stay out of the warm set, Mixtral's
    /// `block_sparse_moe.experts` included (it was once missed, and chat
    /// on a Mixtral checkpoint faulted in every expert page).
    #[test]
    fn warming_skips_every_familys_routed_experts() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        for name in ["mixtral", "qwen3-moe-a", "deepseek-v3"] {
            let dir = fixtures.join(name);
            let cfg = ModelConfig::from_dir(&dir).unwrap();
            let all = Checkpoint::open(&dir).unwrap().tensor_names().count();
            let warm = resident_weights(&dir, &cfg).unwrap();
            let routed = 3
                * cfg.num_experts
                * (0..cfg.num_hidden_layers)
                    .filter(|&l| cfg.is_moe_layer(l))
                    .count();
            let embed = usize::from(!cfg.tie_word_embeddings);
            assert_eq!(warm.len(), all - routed - embed, "{name}");
        }
    }
}
