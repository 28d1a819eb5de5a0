//! The generation loop: a model, its tokenizer and chat template, and the
//! stop rules, behind one type that the CLI and the server drive.

use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Map, Value};

use std::sync::Arc;

use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::experts::ExpertCache;
use crate::model::{self, CausalLm, LoadOptions, Logits, MemoryPlan, Session};
use crate::sampler::{Sampler, SamplingParams};
use crate::template::{ChatTemplate, SpecialTokens};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What the user asked the model to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// One user message (and an optional system message), rendered with the
    /// checkpoint's chat template and a generation prompt.
    Chat {
        system: Option<String>,
        user: String,
    },
    /// Text tokenized as is.
    Raw(String),
    /// Token ids, fed unchanged.
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was generated.
    Eos,
    /// `max_tokens` was reached, or the context is full.
    Length,
    /// The caller's `on_token` asked to stop (Ctrl-C in a chat).
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::Length => "length",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// What an `on_token` callback returns: `()` for one that never stops
/// generation, `ControlFlow<()>` for one that may.
pub trait TokenFlow {
    fn flow(self) -> ControlFlow<()>;
}

impl TokenFlow for () {
    fn flow(self) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

impl TokenFlow for ControlFlow<()> {
    fn flow(self) -> ControlFlow<()> {
        self
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Prompt processing up to the first token's logits.
    pub prefill_s: f64,
    pub prefill_tokens: usize,
    /// Decode steps after the first token.
    pub decode_s: f64,
    pub decode_tokens: usize,
}

impl Timings {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_s)
    }

    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_s)
    }
}

/// `n` per second over `s` seconds; 0 for no time at all.
pub fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, including the end-of-sequence token if one stopped it.
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// What the expert cache did, and the memory around it: the one stats
/// object that `smoe run --json` (as `stats`) and the server's `/health`
/// (as `cache`) print.
#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    pub hits: u64,
    pub prefetch_hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub bytes_read: u64,
    pub demand_bytes: u64,
    pub prefetch_bytes: u64,
    pub prefetches: u64,
    pub prefetch_cancelled: u64,
    pub prefetch_wasted: u64,
    /// Null where nothing was predicted.
    pub recall: Option<f64>,
    pub precision: Option<f64>,
    pub prefetch: &'static str,
    pub cache_policy: &'static str,
    pub read_gb_s: f64,
    pub blocked_s: f64,
    /// Per processed token, when the caller says how many there were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_read_per_token: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_ms_per_token: Option<f64>,
    pub cache_slots: usize,
    pub cache_bytes: usize,
    pub direct_io: bool,
    pub peak_rss_bytes: Option<u64>,
    /// Resident set before the model loaded, where the caller measured it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_rss_bytes: Option<Option<u64>>,
    pub plan: Option<MemoryPlan>,
    /// On a GPU, the tiers above the RAM cache: VRAM hits, experts copied
    /// over PCIe and their bytes, experts run on the CPU. The counts above
    /// are the RAM cache's, of the experts that were not in VRAM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::model::GpuExpertStats>,
}

/// A loaded model with everything needed to turn text into text.
pub struct Engine {
    pub(crate) dir: PathBuf,
    pub(crate) model: Box<dyn CausalLm>,
    pub(crate) tokenizer: Option<Tokenizer>,
    pub(crate) template: Option<ChatTemplate>,
    /// Every id that ends generation: `generation_config.json`'s list and the
    /// tokenizer's eos token.
    pub(crate) eos_ids: Vec<u32>,
    /// The expert cache, when streaming from a vault.
    pub(crate) cache: Option<Arc<ExpertCache>>,
    /// A vault's data files as loaded, checked before each generation.
    pub(crate) files: Option<crate::vault::Watch>,
    pub(crate) plan: Option<MemoryPlan>,
    /// Prompt tokens per forward pass.
    pub(crate) prefill_chunk: usize,
    /// Where the model runs and why ([`crate::compute::choose`]).
    pub(crate) placement: crate::compute::Placement,
    pub(crate) device: String,
}

impl Engine {
    /// Opens a checkpoint or vault with default options.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::default())
    }

    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let opened = model::open(dir, opts)?;
        if crate::gguf::is_gguf(dir) {
            let (tokenizer, template, eos_ids) = gguf_text(dir)?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                model: opened.model,
                tokenizer,
                template,
                eos_ids,
                cache: opened.cache,
                plan: opened.plan,
                files: opened.files,
                prefill_chunk: opts.prefill_chunk.max(1),
                placement: opened.placement,
                device: opened.device,
            });
        }
        let generation = GenerationConfig::from_dir(dir)?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Tokenizer::from_dir(dir)?)
        } else {
            None
        };
        let template = if has_chat_template(dir)? {
            Some(ChatTemplate::from_dir(dir)?)
        } else {
            None
        };
        let eos_ids = eos_ids(&generation, dir, tokenizer.as_ref())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model: opened.model,
            tokenizer,
            template,
            eos_ids,
            cache: opened.cache,
            files: opened.files,
            plan: opened.plan,
            prefill_chunk: opts.prefill_chunk.max(1),
            placement: opened.placement,
            device: opened.device,
        })
    }

    /// Where the model runs and why: the CPU, or which GPU.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Whether the model runs on the CPU.
    pub fn on_cpu(&self) -> bool {
        self.placement == crate::compute::Placement::Cpu
    }

    /// The checkpoint or vault directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model(&self) -> &dyn CausalLm {
        &*self.model
    }

    pub fn config(&self) -> &crate::config::ModelConfig {
        self.model.config()
    }

    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// The chat template, if the checkpoint has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Every id that ends generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Replaces the ids that end generation.
    pub fn set_eos_ids(&mut self, ids: Vec<u32>) {
        self.eos_ids = ids;
    }

    /// Whether a vault's data files are still the ones loaded, whole
    /// ([`crate::vault::Watch`]); a checkpoint always is.
    pub fn check_files(&self) -> Result<()> {
        self.files.as_ref().map_or(Ok(()), |w| w.check())
    }

    /// The expert cache, when streaming from a vault.
    pub fn cache(&self) -> Option<&Arc<ExpertCache>> {
        self.cache.as_ref()
    }

    /// The memory plan, for a vault.
    pub fn plan(&self) -> Option<&MemoryPlan> {
        self.plan.as_ref()
    }

    /// Prompt tokens per forward pass.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::format(
                &self.dir,
                "no tokenizer.json; pass token ids with --ids instead",
            )
        })
    }

    /// Token ids for a prompt, rendered and tokenized as transformers would.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Raw(text) => self.tokenizer()?.encode(text, true),
            Prompt::Chat { system, user } => {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(json!({"role": "system", "content": s}));
                }
                messages.push(json!({"role": "user", "content": user}));
                self.conversation_ids(&Value::Array(messages))
            }
        }
    }

    /// A whole conversation (a JSON list of messages), rendered with the
    /// chat template and a generation prompt, as token ids.
    pub fn conversation_ids(&self, messages: &Value) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, None, &Map::new())?;
        self.tokenizer()?.encode(&text, false)
    }

    /// A conversation rendered with the chat template and a generation
    /// prompt, with tool schemas and extra template variables (such as
    /// `enable_thinking`), as text.
    pub fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let template = self.template.as_ref().ok_or_else(|| {
            Error::format(
                &self.dir,
                "no chat template (tokenizer_config.json or chat_template.jinja); use --raw to send text as is",
            )
        })?;
        template.render(messages, tools, true, extra)
    }

    /// On a GPU, what its expert tiers above the RAM cache served since
    /// load; `None` on the CPU.
    pub fn gpu_expert_stats(&self) -> Option<crate::model::GpuExpertStats> {
        self.model.gpu_expert_stats()
    }

    /// The expert cache's counters since start, with rates per token over
    /// `tokens` processed tokens when given; None without a vault.
    pub fn cache_report(&self, tokens: Option<usize>) -> Option<CacheReport> {
        let c = self.cache.as_ref()?;
        let st = c.stats().snapshot();
        let per_token = tokens.map(|n| n.max(1) as f64);
        Some(CacheReport {
            hits: st.hits,
            prefetch_hits: st.prefetch_hits,
            misses: st.misses,
            hit_rate: st.hit_rate(),
            bytes_read: st.bytes_read(),
            demand_bytes: st.demand_bytes,
            prefetch_bytes: st.prefetch_bytes,
            prefetches: st.prefetches,
            prefetch_cancelled: st.prefetch_cancelled,
            prefetch_wasted: st.prefetch_wasted,
            recall: st.recall(),
            precision: st.precision(),
            prefetch: c.read_ahead().name(),
            cache_policy: c.policy().name(),
            read_gb_s: st.read_gb_s(),
            blocked_s: st.blocked_s,
            bytes_read_per_token: per_token.map(|n| st.bytes_read() as f64 / n),
            blocked_ms_per_token: per_token.map(|n| 1e3 * st.blocked_s / n),
            cache_slots: c.capacity(),
            cache_bytes: c.capacity() * c.slot_bytes(),
            direct_io: c.direct_io(),
            peak_rss_bytes: crate::memory::peak_rss(),
            base_rss_bytes: None,
            plan: self.plan.clone(),
            gpu: self.model.gpu_expert_stats(),
        })
    }

    pub fn new_session(&self) -> Session {
        self.model.new_session()
    }

    /// Runs `prompt` through the model after whatever the session already
    /// holds, then samples up to `max_tokens` tokens. `on_token` sees each
    /// token as soon as it is chosen, for streaming; one that returns
    /// `ControlFlow::Break` stops generation after that token.
    pub fn generate<F: TokenFlow>(
        &self,
        session: &mut Session,
        prompt: &[u32],
        params: &SamplingParams,
        max_tokens: usize,
        mut on_token: impl FnMut(u32) -> F,
    ) -> Result<Generation> {
        self.check_files()?;
        let mut dec = Decoding::new(self, session, prompt, params, max_tokens)?;
        session.record(prompt);
        let start = Instant::now();
        // Layer-major over a chunk at a time: each chunk reads an expert once
        // per layer however many of its tokens route there.
        let mut chunks = prefill_chunks(prompt.len(), self.prefill_chunk).peekable();
        loop {
            // An empty prompt is one empty chunk, which `forward` refuses.
            let chunk = chunks.next().unwrap_or(0..0);
            self.model.forward(&prompt[chunk], session, Logits::Last)?;
            if chunks.peek().is_none() {
                break;
            }
        }
        dec.timings.prefill_s = start.elapsed().as_secs_f64();

        let decode_start = Instant::now();
        // A greedy pick the model made where the logits are, if it could.
        let greedy = dec.greedy();
        let mut picked = None;
        let stop_reason = loop {
            let held = session.len();
            let next = match picked.take() {
                Some(tok) => dec.accept(self, tok, held, |tok| on_token(tok).flow()),
                None => dec.pick(self, session.logits(), held, |tok| on_token(tok).flow()),
            };
            match next {
                Err(reason) => break reason,
                Ok(tok) => {
                    session.record(&[tok]);
                    if greedy {
                        picked = self.model.forward_greedy(&[tok], session)?;
                    } else {
                        self.model.forward(&[tok], session, Logits::Last)?;
                    }
                    dec.timings.decode_tokens += 1;
                }
            }
        };
        dec.timings.decode_s = decode_start.elapsed().as_secs_f64();
        Ok(dec.finish(stop_reason))
    }

    /// The whole text of generated ids, as [`TextStream`] streams it.
    pub fn reply_text(&self, tokens: &[u32]) -> Result<String> {
        match &self.tokenizer {
            Some(t) => {
                let ids: Vec<u32> = tokens
                    .iter()
                    .copied()
                    .filter(|&id| id <= t.max_id())
                    .collect();
                t.decode(&ids, true)
            }
            None => Ok(String::new()),
        }
    }
}

/// The prompt tokens `0..n` as the forward passes that prefill them, in
/// order: whole chunks of `chunk`, the remainder first-sized so that the
/// last pass (whose logits start generation) is the shorter one. `n = 0`
/// gives none. Batched and single-sequence generation split a prompt the
/// same way, so each sequence's passes, and with them its results, agree.
pub(crate) fn prefill_chunks(n: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    let head = n.saturating_sub((n.max(1) - 1) % chunk + 1);
    (0..head)
        .step_by(chunk)
        .map(move |a| a..a + chunk)
        .chain((n > 0).then_some(head..n))
}

/// One sequence's generation after its prompt: the sampler, the ids the
/// repetition penalty sees, the tokens so far and the stop rules. Shared by
/// [`Engine::generate`] and [`crate::batch::Batch`], so that a sequence
/// stops at the same token either way.
pub(crate) struct Decoding {
    sampler: Sampler,
    history: Vec<u32>,
    tokens: Vec<u32>,
    max_tokens: usize,
    pub(crate) timings: Timings,
}

impl Decoding {
    /// Checks `params` and sizes everything that grows per token for the
    /// whole generation up front, so that the decode loop does not allocate.
    pub(crate) fn new(
        engine: &Engine,
        session: &mut Session,
        prompt: &[u32],
        params: &SamplingParams,
        max_tokens: usize,
    ) -> Result<Self> {
        params.validate()?;
        let max_ctx = engine.model.config().max_position_embeddings;
        let held = session.len();
        let room = max_tokens.min(max_ctx.saturating_sub(held + prompt.len()));
        session.reserve(prompt.len() + room);
        // The repetition penalty sees the conversation so far, not just
        // the part this call prefills.
        let mut history = Vec::with_capacity(held + prompt.len() + room);
        history.extend_from_slice(session.tokens().unwrap_or_default());
        history.extend_from_slice(prompt);
        Ok(Self {
            sampler: Sampler::new(params.clone()),
            history,
            tokens: Vec::with_capacity(room),
            max_tokens,
            timings: Timings {
                prefill_tokens: prompt.len(),
                ..Default::default()
            },
        })
    }

    /// The next token from `logits`, to be fed back, or why generation
    /// ends here. `held` is the session's length; `on_token` sees the token
    /// before the stop rules do.
    pub(crate) fn pick(
        &mut self,
        engine: &Engine,
        logits: &mut [f32],
        held: usize,
        on_token: impl FnOnce(u32) -> ControlFlow<()>,
    ) -> std::result::Result<u32, StopReason> {
        let tok = self.sampler.sample(logits, &self.history);
        self.accept(engine, tok, held, on_token)
    }

    /// Whether the next token is the logits' argmax
    /// ([`Sampler::is_greedy`]), which the model may pick itself.
    pub(crate) fn greedy(&self) -> bool {
        self.sampler.is_greedy()
    }

    /// [`Decoding::pick`] of a token already chosen (by the model:
    /// [`crate::model::CausalLm::forward_greedy`]).
    pub(crate) fn accept(
        &mut self,
        engine: &Engine,
        tok: u32,
        held: usize,
        on_token: impl FnOnce(u32) -> ControlFlow<()>,
    ) -> std::result::Result<u32, StopReason> {
        if self.tokens.len() >= self.max_tokens {
            return Err(StopReason::Length);
        }
        self.tokens.push(tok);
        self.history.push(tok);
        let flow = on_token(tok);
        if engine.eos_ids.contains(&tok) {
            return Err(StopReason::Eos);
        }
        if flow.is_break() {
            return Err(StopReason::Cancelled);
        }
        let max_ctx = engine.model.config().max_position_embeddings;
        if self.tokens.len() >= self.max_tokens || held >= max_ctx {
            return Err(StopReason::Length);
        }
        Ok(tok)
    }

    pub(crate) fn finish(self, stop_reason: StopReason) -> Generation {
        Generation {
            tokens: self.tokens,
            stop_reason,
            timings: self.timings,
        }
    }
}

/// Generated ids as text while they stream: whole characters only,
/// special tokens left out, and ids past the tokenizer (padding rows of
/// the embedding, which have no text) skipped.
pub struct TextStream<'t> {
    stream: Option<StreamDecoder<'t>>,
    text_max: u32,
}

impl<'t> TextStream<'t> {
    pub fn new(engine: &'t Engine) -> Self {
        Self {
            stream: engine.tokenizer.as_ref().map(|t| t.stream(true)),
            text_max: engine.tokenizer.as_ref().map_or(0, |t| t.max_id()),
        }
    }

    pub fn push(&mut self, tok: u32) -> Result<Option<String>> {
        match self.stream.as_mut().filter(|_| tok <= self.text_max) {
            Some(s) => s.push(tok),
            None => Ok(None),
        }
    }

    pub fn finish(&mut self) -> Result<Option<String>> {
        self.stream
            .as_mut()
            .map(|s| s.finish())
            .transpose()
            .map(Option::flatten)
    }
}

/// A GGUF's tokenizer, chat template and end-of-generation ids, from its
/// metadata; a file without `tokenizer.ggml.model` runs on ids alone.
fn gguf_text(path: &Path) -> Result<(Option<Tokenizer>, Option<ChatTemplate>, Vec<u32>)> {
    let g = crate::gguf::Gguf::open(path)?;
    if g.metadata().get("tokenizer.ggml.model").is_none() {
        return Ok((None, None, Vec::new()));
    }
    let t = crate::gguf::tokenizer::load(&g)?;
    let template = match t.chat_template {
        Some(_) => Some(t.chat_template(&g)?),
        None => None,
    };
    Ok((
        Some(t.to_tokenizer(&g)?),
        template,
        t.end_of_generation.clone(),
    ))
}

/// Whether the checkpoint ships a chat template at all; a broken one is an
/// error when it is loaded, a missing one only when a chat prompt needs it.
pub(crate) fn has_chat_template(dir: &Path) -> Result<bool> {
    if dir.join("chat_template.jinja").exists() {
        return Ok(true);
    }
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.exists() {
        return Ok(false);
    }
    let v = crate::error::read_json(&cfg)?;
    Ok(v.get("chat_template").is_some_and(|t| !t.is_null()))
}

fn eos_ids(gen: &GenerationConfig, dir: &Path, tok: Option<&Tokenizer>) -> Result<Vec<u32>> {
    let mut ids = gen.eos_token_ids.clone();
    if let (Some(tok), Some(eos)) = (tok, SpecialTokens::from_dir(dir)?.eos) {
        if let Some(id) = tok.token_to_id(&eos) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}
