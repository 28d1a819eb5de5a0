//! `smoe check`: finds out, before an evening is wasted on garbled output,
//! whether a checkpoint's tokenizer and chat template belong to its weights,
//! and whether the model fits this machine the way it is stored.
//!
//! A template written for another model (or an instruct template on base
//! weights) feeds the model tokens it never learned: their embedding rows
//! are still at their initialisation, near zero, and the model answers
//! with noise such as a stream of "::". So the check renders a sample
//! conversation exactly as a chat would, tokenizes it, and looks at the
//! embedding row of every token it produced.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::checkpoint::Checkpoint;
use crate::config::{GenerationConfig, ModelConfig};
use crate::engine::Engine;
use crate::error::{read_json, Result};
use crate::load::LoadOptions;
use crate::memory::{available_memory, human_bytes, Budget};
// The footprint the fit findings are about; it lives with the planner.
pub use crate::memory::Footprint;
use crate::model::blocks::{Embedding, EMBED};
use crate::template::{ChatTemplate, SpecialTokens};
use crate::tokenizer::Tokenizer;
use crate::vault::{self, Vault};
/// A row whose norm is below this fraction of the median row norm was
/// never trained.
const UNTRAINED_FRACTION: f64 = 0.1;
/// Rows the median is estimated from: a few thousand rows pin a median
/// down well, and reading all of Qwen3's 151,936 would cost a second.
const MEDIAN_SAMPLE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The model will not work as shipped: `smoe check` exits with 1.
    Error,
    /// Probably wrong, or slower than it could be.
    Warning,
}

/// What a finding is about, for callers that treat some differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A token of the rendered prompt has an untrained embedding row.
    UntrainedToken,
    /// The embedding table is all zeros around its median.
    ZeroEmbeddings,
    /// `vocab_size` is smaller than the tokenizer's id range.
    VocabTooSmall,
    NoTokenizer,
    NoChatTemplate,
    /// The template raised on a plain conversation.
    TemplateFails,
    /// An eos token or id that the tokenizer does not have.
    EosNotInVocab,
    /// The template writes `<think>`, the vocabulary has no such token.
    ThinkWithoutToken,
    /// The tokenizer files name another model family than config.json.
    TokenizerMismatch,
    /// `generation_config.json` stops on ids the template never writes.
    EosNotEmitted,
    /// A raw checkpoint that cannot be held in RAM: it needs a vault.
    NeedsVault,
    /// Not even a vault's backbone fits in the available memory.
    BackboneTooLarge,
    /// An explicit budget that, with the backbone, exceeds available RAM.
    OverCommitted,
    /// The vault's filesystem refuses O_DIRECT.
    NoDirectIo,
    /// The weights do not match their config (a tensor missing or of
    /// another shape, layers beyond or missing) or a vault is damaged:
    /// [`crate::validate`].
    WeightsInvalid,
}

impl Code {
    /// Problems that make loading pointless: the start-up check stops on
    /// these instead of letting the machine swap itself to a halt.
    pub fn blocks_loading(self) -> bool {
        matches!(self, Code::NeedsVault | Code::BackboneTooLarge)
    }
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub code: Code,
    pub message: String,
}

impl Finding {
    pub(crate) fn error(code: Code, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn warning(code: Code, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            code,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{label}: {}", self.message)
    }
}

/// Everything `smoe check` looks at: the fit on this machine, then the
/// tokenizer and template against the weights.
pub fn check(dir: &Path, opts: &LoadOptions) -> Result<Vec<Finding>> {
    let valid = if vault::is_vault(dir) {
        let v = Vault::open(dir)?;
        let cfg = ModelConfig::from_json(&v.manifest.config, &dir.join(vault::MANIFEST))?;
        crate::validate::vault(&v, &cfg).and_then(|()| crate::validate::backbone_checksums(&v))
    } else {
        crate::validate::checkpoint(&Checkpoint::open(dir)?)
    };
    let mut findings = preflight(dir, opts)?;
    if let Err(e) = valid {
        findings.push(Finding::error(Code::WeightsInvalid, e.to_string()));
    }
    findings.extend(check_model(dir)?);
    Ok(findings)
}

/// The conversation every check renders: each role once, and a second
/// user turn so that templates which treat earlier turns differently
/// (Qwen3 drops old reasoning) show both paths.
pub fn sample_conversation() -> Value {
    json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello! Can you add two numbers for me?"},
        {"role": "assistant", "content": "Of course: which two numbers?"},
        {"role": "user", "content": "What is 2 + 2?"}
    ])
}

/// The tokenizer, template and eos settings against the weights.
pub fn check_model(dir: &Path) -> Result<Vec<Finding>> {
    let tok = dir
        .join("tokenizer.json")
        .is_file()
        .then(|| Tokenizer::from_dir(dir))
        .transpose()?;
    let template = crate::engine::has_chat_template(dir)?
        .then(|| ChatTemplate::from_dir(dir))
        .transpose()?;
    check_parts(dir, tok.as_ref(), template.as_ref())
}

/// [`check_model`] for a loaded engine, with the tokenizer and template it
/// already holds (Qwen3's tokenizer takes a while to build).
pub fn check_engine(engine: &Engine) -> Result<Vec<Finding>> {
    // A GGUF's tokenizer and template are its metadata, checked there.
    if crate::gguf::is_gguf(&engine.dir) {
        return crate::gguf::check::check(&crate::gguf::Gguf::open(&engine.dir)?);
    }
    check_parts(
        &engine.dir,
        engine.tokenizer.as_ref(),
        engine.template.as_ref(),
    )
}

fn check_parts(
    dir: &Path,
    tok: Option<&Tokenizer>,
    template: Option<&ChatTemplate>,
) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    let vault = vault::is_vault(dir).then(|| Vault::open(dir)).transpose()?;
    let config_json = match &vault {
        Some(v) => v.manifest.config.clone(),
        None => read_json(&dir.join("config.json"))?,
    };
    let config_path = match &vault {
        Some(_) => dir.join(vault::MANIFEST),
        None => dir.join("config.json"),
    };
    let cfg = ModelConfig::from_json(&config_json, &config_path)?;

    let Some(tok) = tok else {
        out.push(Finding::error(
            Code::NoTokenizer,
            format!(
                "{}: no tokenizer.json, so text cannot be encoded; copy the tokenizer files of the checkpoint the weights came from",
                dir.display()
            ),
        ));
        return Ok(out);
    };
    let ids_in_tokenizer = tok.max_id() as usize + 1;
    if cfg.vocab_size < ids_in_tokenizer {
        out.push(Finding::error(
            Code::VocabTooSmall,
            format!(
                "{}: vocab_size {} is smaller than the tokenizer's {ids_in_tokenizer} ids (highest {}): ids from {} on have no embedding row; the tokenizer belongs to another model",
                config_path.display(),
                cfg.vocab_size,
                tok.max_id(),
                cfg.vocab_size
            ),
        ));
    }
    out.extend(tokenizer_family(dir, &config_json));

    let special = SpecialTokens::from_dir(dir)?;
    if let Some(eos) = &special.eos {
        if tok.token_to_id(eos).is_none() {
            out.push(Finding::error(
                Code::EosNotInVocab,
                format!(
                    "{}: eos_token {eos:?} is not in the tokenizer's vocabulary, so generation cannot stop on it",
                    dir.join("tokenizer_config.json").display()
                ),
            ));
        }
    }
    let gen_eos = GenerationConfig::from_dir(dir)?.eos_token_ids;
    let gen_path = dir.join("generation_config.json");
    for &id in &gen_eos {
        if id as usize >= cfg.vocab_size {
            out.push(Finding::error(
                Code::EosNotInVocab,
                format!(
                    "{}: eos id {id} is outside the model's vocabulary (vocab_size {}): the model can never produce it, so generation cannot stop on it",
                    gen_path.display(),
                    cfg.vocab_size
                ),
            ));
        } else if tok.id_to_token(id).is_none() {
            out.push(Finding::error(
                Code::EosNotInVocab,
                format!(
                    "{}: eos id {id} is not a token of tokenizer.json (highest id {})",
                    gen_path.display(),
                    tok.max_id()
                ),
            ));
        }
    }

    let Some(template) = template else {
        out.push(Finding::error(
            Code::NoChatTemplate,
            format!(
                "{}: no chat template (tokenizer_config.json has no \"chat_template\" and there is no chat_template.jinja): chat cannot format a conversation; copy the template of the checkpoint the weights came from",
                dir.display()
            ),
        ));
        return Ok(out);
    };
    let text = match template.render(&sample_conversation(), None, true, &Map::new()) {
        Ok(text) => text,
        Err(e) => {
            out.push(Finding::error(
                Code::TemplateFails,
                format!("{}: the chat template fails on a plain system/user/assistant conversation: {e}", dir.display()),
            ));
            return Ok(out);
        }
    };
    let ids = tok.encode(&text, false)?;

    if template.source().contains("<think>") && tok.token_to_id("<think>").is_none() {
        out.push(Finding::warning(
            Code::ThinkWithoutToken,
            format!(
                "{}: the chat template writes <think> blocks, but the vocabulary has no <think> token: the weights look non-thinking, the template is a reasoning model's",
                dir.display()
            ),
        ));
    }
    out.extend(eos_emitted(tok, &gen_eos, &ids, &gen_path));

    out.extend(untrained_tokens(dir, vault.as_ref(), tok, &ids)?);
    Ok(out)
}

/// `tokenizer_class` against `model_type`, by family: Qwen2Tokenizer is
/// Qwen3's own, Mixtral and DeepSeek publish Llama tokenizers (Moonlight,
/// a `deepseek_v3`, and Kimi-K2 a tiktoken one), OLMoE GPT-NeoX's. Only families this build runs have a known tokenizer; a
/// generic class (PreTrainedTokenizerFast) says nothing either way.
fn tokenizer_family(dir: &Path, config: &Value) -> Option<Finding> {
    const KNOWN: &[(&str, &[&str])] = &[
        ("qwen", &["qwen"]),
        ("mixtral", &["llama", "mistral"]),
        ("olmoe", &["gptneox", "olmo"]),
        ("deepseek", &["llama", "deepseek", "tiktoken"]),
        ("kimi", &["tiktoken"]),
    ];
    let path = dir.join("tokenizer_config.json");
    let class = read_json(&path).ok()?;
    let class = class.get("tokenizer_class")?.as_str()?;
    let model_type = config.get("model_type")?.as_str()?;
    let (_, expected) = KNOWN.iter().find(|(m, _)| *m == family(model_type))?;
    let got = family(class.trim_end_matches("Fast").trim_end_matches("Tokenizer"));
    if got == "pretrained" || expected.contains(&got.as_str()) {
        return None;
    }
    Some(Finding::warning(
        Code::TokenizerMismatch,
        format!(
            "{}: tokenizer_class {class} is a {got} tokenizer, but config.json's model_type {model_type} is a {} model: the tokenizer files may belong to another model",
            path.display(),
            family(model_type)
        ),
    ))
}

/// "qwen3_moe" → "qwen", "Qwen2" → "qwen", "Llama" → "llama".
fn family(name: &str) -> String {
    name.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Stop ids against what the template writes. An extra document-end id
/// beside the turn-end one is normal (Qwen3 lists <|endoftext|> next to
/// <|im_end|>); what goes wrong is a list the template never ends a turn
/// with (generation runs to the limit), or an ordinary text token in it
/// (generation stops mid-sentence).
pub(crate) fn eos_emitted(
    tok: &Tokenizer,
    eos: &[u32],
    rendered: &[u32],
    path: &Path,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let known: Vec<u32> = eos
        .iter()
        .copied()
        .filter(|&id| tok.id_to_token(id).is_some())
        .collect();
    let name = |id: u32| format!("{:?} (id {id})", tok.id_to_token(id).unwrap_or_default());
    if !known.is_empty() && !known.iter().any(|id| rendered.contains(id)) {
        let names: Vec<String> = known.iter().map(|&id| name(id)).collect();
        out.push(Finding::warning(
            Code::EosNotEmitted,
            format!(
                "{}: the chat template ends turns with none of the eos ids ({}), so a reply will run on to --max-tokens",
                path.display(),
                names.join(", ")
            ),
        ));
    }
    for &id in &known {
        let ordinary = tok
            .decode(&[id], true)
            .map(|text| !text.is_empty())
            .unwrap_or(false);
        if ordinary && !rendered.contains(&id) {
            out.push(Finding::warning(
                Code::EosNotEmitted,
                format!(
                    "{}: eos id {} is ordinary text that the chat template never writes: generation stops whenever the model writes it",
                    path.display(),
                    name(id)
                ),
            ));
        }
    }
    out
}

/// The L2 norm of row `row` of `table`, with `buf` as scratch of one row.
fn row_norm(table: &Embedding, row: usize, buf: &mut [f32]) -> Result<f64> {
    table.row(row as u32, buf)?;
    Ok(buf
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt())
}

/// Tokens of the rendered prompt whose embedding row is far below the
/// median: rows the model never trained.
fn untrained_tokens(
    dir: &Path,
    vault: Option<&Vault>,
    tok: &Tokenizer,
    prompt: &[u32],
) -> Result<Vec<Finding>> {
    // A vault's rows are read from disk, as the engine reads them: mapping
    // the table would pull hundreds of MB into the resident set that the
    // memory plan accounts for (a page fault maps its cached neighbours
    // too). A checkpoint's table is mapped by the engine anyway.
    let embed = match vault {
        Some(v) => Embedding::on_disk(v)?,
        None => Embedding::mapped(Checkpoint::open(dir)?.tensor_any(EMBED)?)?,
    };
    let (rows, cols) = embed.shape();
    let mut buf = vec![0.0f32; cols];
    untrained_rows(rows, tok, prompt, &mut |row| {
        row_norm(&embed, row, &mut buf)
    })
}

/// [`untrained_tokens`] over any embedding table of `rows` rows, given the
/// L2 norm of a row (a GGUF's rows are GGML blocks).
pub(crate) fn untrained_rows(
    rows: usize,
    tok: &Tokenizer,
    prompt: &[u32],
    norm: &mut dyn FnMut(usize) -> Result<f64>,
) -> Result<Vec<Finding>> {
    // Padding rows past the tokenizer's ids are often zero by design; the
    // median is over real tokens only.
    let real = rows.min(tok.max_id() as usize + 1);
    let step = real.div_ceil(MEDIAN_SAMPLE).max(1);
    let mut norms: Vec<f64> = (0..real)
        .step_by(step)
        .map(&mut *norm)
        .collect::<Result<_>>()?;
    let mid = norms.len() / 2;
    let (_, &mut median, _) = norms.select_nth_unstable_by(mid, f64::total_cmp);
    if median <= 0.0 {
        return Ok(vec![Finding::error(
            Code::ZeroEmbeddings,
            format!("{EMBED}: most embedding rows are zero: the weights are empty or damaged"),
        )]);
    }
    let unique: BTreeSet<u32> = prompt.iter().copied().collect();
    let mut out = Vec::new();
    for id in unique {
        let token = tok.id_to_token(id).unwrap_or_default();
        if id as usize >= rows {
            // Reported once as VocabTooSmall; naming the token helps.
            out.push(Finding::error(
                Code::UntrainedToken,
                format!("token {token:?} (id {id}) of the rendered chat prompt is past the {rows} rows of the embedding table"),
            ));
            continue;
        }
        let norm = norm(id as usize)?;
        if norm < UNTRAINED_FRACTION * median {
            out.push(Finding::error(
                Code::UntrainedToken,
                format!(
                    "token {token:?} (id {id}) of the rendered chat prompt has an untrained embedding (row norm {norm:.4}, median {median:.4}): the chat template does not belong to these weights"
                ),
            ));
        }
    }
    Ok(out)
}

/// Whether the model fits this machine as stored, and the disk it
/// streams from.
pub fn preflight(dir: &Path, opts: &LoadOptions) -> Result<Vec<Finding>> {
    let fp = Footprint::of(dir, opts)?;
    Ok(memory_findings(
        dir,
        &fp,
        opts.ram_budget,
        available_memory(),
    ))
}

fn memory_findings(
    dir: &Path,
    fp: &Footprint,
    budget: Budget,
    available: Option<u64>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let d = dir.display();
    let convert = format!(
        "convert it once to stream its experts from SSD: smoe convert {d} -o {}, then pass that vault as --model",
        vault_name(dir)
    );
    if !fp.vault {
        match (budget, available) {
            (Budget::Bytes(b), _) if fp.expert_bytes > b => out.push(Finding::error(
                Code::NeedsVault,
                format!(
                    "{d}: a raw checkpoint is mapped whole, and its {} of routed experts exceed --ram-budget {}; {convert}",
                    human_bytes(fp.expert_bytes),
                    human_bytes(b)
                ),
            )),
            (Budget::Auto, Some(avail)) if fp.fixed_bytes() > avail => {
                out.push(Finding::error(
                    Code::NeedsVault,
                    format!(
                        "{d}: this checkpoint's {} of weights (+ {} KV for {} tokens) exceed the {} of RAM available; {convert}",
                        human_bytes(fp.resident_bytes),
                        human_bytes(fp.kv_bytes),
                        fp.ctx,
                        human_bytes(avail)
                    ),
                ))
            }
            _ => {}
        }
        return out;
    }
    if fp.direct_io == Some(false) {
        out.push(Finding::warning(
            Code::NoDirectIo,
            format!(
                "{d}: this filesystem refuses direct I/O (O_DIRECT), so expert reads go through the page cache: slower, and they crowd other memory; keep the vault on a local SSD with ext4 or XFS"
            ),
        ));
    }
    let Some(avail) = available else {
        return out;
    };
    // The planner's own floor, so that this check refuses exactly what
    // loading would.
    let least = fp.least_memory(avail);
    match budget {
        Budget::Auto if least > avail => {
            let mut fixes = Vec::new();
            if let Some((q, bytes)) = fp.smaller_backbone {
                let verdict = if least - fp.resident_bytes + bytes <= avail {
                    "would fit"
                } else {
                    "would still not fit"
                };
                fixes.push(format!(
                    "a --backbone {} conversion needs {} ({verdict})",
                    q.name(),
                    human_bytes(bytes)
                ));
            }
            if fp.kv_bytes > avail / 4 {
                fixes.push(format!(
                    "a smaller --ctx shrinks the KV cache ({} now)",
                    human_bytes(fp.kv_bytes)
                ));
            }
            fixes.push("or free memory / use a machine with more RAM".into());
            out.push(Finding::error(
                Code::BackboneTooLarge,
                format!(
                    "{d}: not enough memory even for the backbone: it needs {} resident + {} KV for {} tokens + {} activations + {} headroom + {} for one token's experts, and {} is available; {}",
                    human_bytes(fp.resident_bytes),
                    human_bytes(fp.kv_bytes),
                    fp.ctx,
                    human_bytes(fp.activation_bytes),
                    human_bytes(crate::memory::headroom(avail)),
                    human_bytes(fp.min_cache_bytes),
                    human_bytes(avail),
                    fixes.join("; ")
                ),
            ));
        }
        Budget::Bytes(b) if fp.fixed_bytes() + b > avail => out.push(Finding::warning(
            Code::OverCommitted,
            format!(
                "{d}: backbone {} + KV {} + activations {} + --ram-budget {} exceed the {} available: expect swapping; lower --ram-budget or use auto",
                human_bytes(fp.resident_bytes),
                human_bytes(fp.kv_bytes),
                human_bytes(fp.activation_bytes),
                human_bytes(b),
                human_bytes(avail)
            ),
        )),
        _ => {}
    }
    out
}

/// Where `smoe convert` should put the vault: beside the checkpoint.
fn vault_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    dir.with_file_name(format!("{name}-vault"))
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footprint(vault: bool) -> Footprint {
        Footprint {
            vault,
            resident_bytes: 10 << 30,
            expert_bytes: 50 << 30,
            min_cache_bytes: 100 << 20,
            slot_bytes: 25 << 20,
            records: 1000,
            smaller_backbone: vault.then_some((crate::quant::QuantType::Q4K, 5 << 30)),
            kv_bytes: 1 << 30,
            ctx: 4096,
            sequences: 1,
            activation_bytes: 256 << 20,
            quant: "bf16".into(),
            direct_io: vault.then_some(true),
        }
    }

    fn codes(f: &[Finding]) -> Vec<Code> {
        f.iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_checkpoint_larger_than_ram_needs_a_vault() {
        let dir = Path::new("/models/big");
        let fp = Footprint {
            resident_bytes: 60 << 30,
            ..footprint(false)
        };
        let f = memory_findings(dir, &fp, Budget::Auto, Some(32 << 30));
        assert_eq!(codes(&f), [Code::NeedsVault]);
        assert!(f[0].is_error());
        assert!(
            f[0].message
                .contains("smoe convert /models/big -o /models/big-vault"),
            "{}",
            f[0].message
        );
        assert!(memory_findings(dir, &fp, Budget::Auto, Some(128 << 30)).is_empty());
        // An explicit budget smaller than the experts: streaming is needed.
        let f = memory_findings(dir, &fp, Budget::Bytes(8 << 30), Some(128 << 30));
        assert_eq!(codes(&f), [Code::NeedsVault]);
        assert!(Code::NeedsVault.blocks_loading());
    }

    #[test]
    fn a_backbone_that_does_not_fit_says_what_would() {
        let dir = Path::new("/v");
        let fp = footprint(true);
        assert!(memory_findings(dir, &fp, Budget::Auto, Some(64 << 30)).is_empty());
        let f = memory_findings(dir, &fp, Budget::Auto, Some(8 << 30));
        assert_eq!(codes(&f), [Code::BackboneTooLarge]);
        assert!(f[0].message.contains("--backbone q4_k"), "{}", f[0].message);
        assert!(f[0].message.contains("would fit"), "{}", f[0].message);
        let f = memory_findings(dir, &fp, Budget::Auto, Some(2 << 30));
        assert!(
            f[0].message.contains("would still not fit"),
            "{}",
            f[0].message
        );
        assert!(f[0].message.contains("--ctx"), "{}", f[0].message);
        // An explicit budget is the user's call: a warning, not a stop.
        let f = memory_findings(dir, &fp, Budget::Bytes(4 << 30), Some(12 << 30));
        assert_eq!(codes(&f), [Code::OverCommitted]);
        assert!(!f[0].is_error() && !f[0].code.blocks_loading());
    }

    #[test]
    fn auto_refuses_exactly_what_the_planner_refuses() {
        let dir = Path::new("/v");
        let fp = footprint(true);
        // Smallest memory the planner accepts: find it, then check both
        // sides of it.
        let (mut lo, mut hi) = (1u64 << 30, 64u64 << 30);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fp.plan(Budget::Auto, Some(mid)).is_ok() {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        assert!(memory_findings(dir, &fp, Budget::Auto, Some(hi)).is_empty());
        let f = memory_findings(dir, &fp, Budget::Auto, Some(lo));
        assert_eq!(codes(&f), [Code::BackboneTooLarge]);
        assert!(f[0].message.contains("headroom"), "{}", f[0].message);
    }

    #[test]
    fn a_disk_without_direct_io_is_named() {
        let fp = Footprint {
            direct_io: Some(false),
            ..footprint(true)
        };
        let f = memory_findings(Path::new("/v"), &fp, Budget::Auto, None);
        assert_eq!(codes(&f), [Code::NoDirectIo]);
        assert!(f[0].message.contains("ext4"), "{}", f[0].message);
    }

    #[test]
    fn families() {
        assert_eq!(family("qwen3_moe"), "qwen");
        assert_eq!(family("Qwen2"), "qwen");
        assert_eq!(family("Llama"), "llama");
    }
}
