//! The Hugging Face tokenizer a GGUF was converted from, rebuilt from its
//! `tokenizer.ggml.*` metadata, and the special tokens and chat template that
//! go with it.
//!
//! llama.cpp's converter keeps the vocabulary, merges (BPE) or scores
//! (SentencePiece) and token types, and names the pre-tokenizer with
//! `tokenizer.ggml.pre`; it drops the pre-tokenizer's regexes and the
//! normalizer. Those are put back here per `pre` name from the
//! `tokenizer.json` files of the models that use them, so that encoding
//! matches transformers (which is what llama.cpp's own vocabulary test
//! vectors were made with).

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::{Array, Gguf, Value};
use crate::template::{ChatTemplate, SpecialTokens, TOOL_USE_NAME};
use crate::{Error, Result};

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i128 = 1;
const UNKNOWN: i128 = 2;
const CONTROL: i128 = 3;
const USER_DEFINED: i128 = 4;
const BYTE: i128 = 6;

/// Token texts that llama.cpp treats as ending generation whatever the
/// metadata says (`llama_vocab::impl::load`), limited to the ones the
/// supported families' vocabularies use or may use.
const END_OF_GENERATION: [&str; 9] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
];

/// GPT-2's pattern, which HF's `ByteLevel` pre-tokenizer applies itself
/// when `use_regex` is set (GPT-2, GPT-NeoX and so OLMo(E)).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// A BPE `pre` type: the `Split` regexes of its `tokenizer.json` (applied in
/// order, each isolating its matches), whether it normalizes to NFC, and
/// whether a word already in the vocabulary skips the merges.
struct Pre {
    regexes: &'static [&'static str],
    nfc: bool,
    ignore_merges: bool,
}

/// The pre-tokenizer of each supported `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Option<Pre> {
    let (regexes, nfc, ignore_merges): (&'static [&'static str], bool, bool) = match pre {
        // Qwen1.5/2/2.5/3 (MoE included).
        "qwen2" | "deepseek-r1-qwen" => (
            &[r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
            true,
            false,
        ),
        // Llama 3.
        "llama3" | "llama-v3" | "llama-bpe" => (
            &[r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
            false,
            true,
        ),
        // DeepSeek LLM and DeepSeek-V2 / V2-Lite.
        "deepseek-llm" => (
            &[
                r"[\r\n]",
                "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
                "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
                r"\s+$",
                "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
                r"\p{N}+",
            ],
            false,
            false,
        ),
        // DeepSeek Coder.
        "deepseek-coder" => (
            &[
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
                r"\p{N}",
            ],
            false,
            false,
        ),
        // DeepSeek-V3, R1, Moonlight.
        "deepseek-v3" => (
            &[
                r"\p{N}{1,3}",
                "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
                r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
            ],
            false,
            false,
        ),
        // GPT-NeoX's tokenizer (OLMo, OLMoE) normalizes to NFC; GPT-2's does not.
        "olmo" => (&[GPT2], true, false),
        "gpt-2" => (&[GPT2], false, false),
        _ => return None,
    };
    Some(Pre {
        regexes,
        nfc,
        ignore_merges,
    })
}

/// The `pre` values [`pre_tokenizer`] knows, for error messages.
const SUPPORTED_PRE: &str =
    "qwen2, deepseek-r1-qwen, llama3, llama-bpe, deepseek-llm, deepseek-coder, deepseek-v3, olmo, gpt-2";

/// A GGUF's tokenizer with the ids and strings around it.
pub struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Every id that ends generation: the EOS, EOT and EOM ids the metadata
    /// names, and tokens llama.cpp recognizes by their text. Sorted.
    pub end_of_generation: Vec<u32>,
    /// Whether raw text gets the BOS (and EOS) token, as the tokenizer's
    /// post-processor adds it.
    pub add_bos: bool,
    pub add_eos: bool,
    /// `tokenizer.chat_template`, if the file has one.
    pub chat_template: Option<String>,
    /// `tokenizer.chat_template.NAME`, by name: llama.cpp's converter
    /// stores a checkpoint's named templates other than `default` there
    /// (`tool_use`, `rag`, ...).
    pub named_templates: Vec<(String, String)>,
    /// The special-token strings a chat template sees.
    pub special: SpecialTokens,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("end_of_generation", &self.end_of_generation)
            .finish_non_exhaustive()
    }
}

impl GgufTokenizer {
    /// smoe's tokenizer wrapper around it, naming `g`'s file in errors.
    pub fn to_tokenizer(&self, g: &Gguf) -> Result<crate::tokenizer::Tokenizer> {
        crate::tokenizer::Tokenizer::from_tokenizer(self.tokenizer.clone(), g.path())
    }

    /// The file's chat template with its special tokens, or an error naming
    /// the file when it has none.
    pub fn chat_template(&self, g: &Gguf) -> Result<ChatTemplate> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            Error::format(
                g.path(),
                "no tokenizer.chat_template: pass one with --chat-template FILE",
            )
        })?;
        match self.named(TOOL_USE_NAME) {
            Some(tool_use) => ChatTemplate::with_tool_use(source, tool_use, self.special.clone()),
            None => ChatTemplate::new(source, self.special.clone()),
        }
    }

    /// The named template `name`, if the file has one.
    pub fn named(&self, name: &str) -> Option<&str> {
        self.named_templates
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

/// Builds the tokenizer of `g` from its metadata.
pub fn load(g: &Gguf) -> Result<GgufTokenizer> {
    let err = |msg: String| Error::format(g.path(), msg);
    let model = g.str("tokenizer.ggml.model")?;
    let tokens = match g.opt_array("tokenizer.ggml.tokens")? {
        Some(Array::String(t)) if !t.is_empty() => t,
        Some(_) => {
            return Err(err(
                "tokenizer.ggml.tokens: expected a non-empty array of strings".into(),
            ))
        }
        None => return Err(err("metadata key tokenizer.ggml.tokens is missing".into())),
    };
    let n = tokens.len();
    let types = match g.opt_array("tokenizer.ggml.token_type")? {
        None => vec![NORMAL; n],
        Some(a) => match a.ints() {
            Some(t) if t.len() == n => t,
            _ => {
                return Err(err(format!(
                    "tokenizer.ggml.token_type: expected {n} integers (one per token), found {} of another type or count",
                    a.len()
                )))
            }
        },
    };
    let token_id = |key: &str| -> Result<Option<u32>> {
        match g.opt_usize(key)? {
            Some(id) if id < n => Ok(Some(id as u32)),
            Some(id) => Err(err(format!(
                "{key} is {id}, but the vocabulary has {n} tokens"
            ))),
            None => Ok(None),
        }
    };
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    let eos = token_id("tokenizer.ggml.eos_token_id")?;
    let unk = token_id("tokenizer.ggml.unknown_token_id")?;
    let pad = token_id("tokenizer.ggml.padding_token_id")?;

    let (mut tokenizer, default_add_bos) = match model {
        "gpt2" => {
            let pre = g.str("tokenizer.ggml.pre")?;
            let pre = pre_tokenizer(pre).ok_or_else(|| {
                err(format!(
                    "tokenizer.ggml.pre is {pre:?}, which smoe does not know the pre-tokenizer of (known: {SUPPORTED_PRE})"
                ))
            })?;
            (byte_level_bpe(g, tokens, &pre)?, false)
        }
        "llama" => (sentencepiece_bpe(g, tokens, &types, unk)?, true),
        other => {
            return Err(err(format!(
                "tokenizer.ggml.model is {other:?}; smoe reads \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece)"
            )))
        }
    };

    // Added tokens: control tokens are special (skipped when decoding with
    // skip_special_tokens), user-defined ones are not; both are matched as
    // a whole in text before the model sees it, as transformers does.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED || t == UNKNOWN)
        .map(|(text, &t)| AddedToken::from(text.as_str(), t != USER_DEFINED).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&added);

    let add_bos = g
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_add_bos);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let mut single: Vec<String> = Vec::new();
    let mut specials: Vec<(String, u32)> = Vec::new();
    for (wanted, id, key) in [
        (add_bos, bos, "tokenizer.ggml.bos_token_id"),
        (true, None, ""),
        (add_eos, eos, "tokenizer.ggml.eos_token_id"),
    ] {
        if key.is_empty() {
            single.push("$A".into());
            continue;
        }
        if wanted {
            let id = id.ok_or_else(|| {
                err(format!(
                    "the file asks for the token {key} names, but {key} is missing"
                ))
            })?;
            single.push(tokens[id as usize].clone());
            specials.push((tokens[id as usize].clone(), id));
        }
    }
    if !specials.is_empty() {
        let processor = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| {
                b.special_tokens(specials)
                    .build()
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| err(format!("cannot add the BOS/EOS token: {e}")))?;
        tokenizer.with_post_processor(Some(processor));
    }

    let mut end_of_generation: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        end_of_generation.extend(token_id(key)?);
    }
    end_of_generation.extend(
        tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| END_OF_GENERATION.contains(&t.as_str()))
            .map(|(id, _)| id as u32),
    );
    end_of_generation.sort_unstable();
    end_of_generation.dedup();

    let chat_template = match g.metadata().get("tokenizer.chat_template") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(err(format!(
                "tokenizer.chat_template: expected a string, found {}",
                v.type_name()
            )))
        }
    };
    let named_templates = named_templates(g)?;
    let text = |id: Option<u32>| id.map(|id| tokens[id as usize].clone());
    let special = SpecialTokens {
        bos: text(bos),
        eos: text(eos),
        unk: text(unk),
        pad: text(pad),
    };
    Ok(GgufTokenizer {
        tokenizer,
        bos,
        eos,
        end_of_generation,
        add_bos,
        add_eos,
        chat_template,
        named_templates,
        special,
    })
}

/// The `tokenizer.chat_template.NAME` templates, each a string, and every
/// name that `tokenizer.chat_templates` lists among them.
fn named_templates(g: &Gguf) -> Result<Vec<(String, String)>> {
    const PREFIX: &str = "tokenizer.chat_template.";
    let mut named = Vec::new();
    for (key, value) in g.metadata().iter() {
        let Some(name) = key.strip_prefix(PREFIX) else {
            continue;
        };
        match value {
            Value::String(t) => named.push((name.to_string(), t.clone())),
            v => {
                return Err(Error::format(
                    g.path(),
                    format!("{key}: expected a string, found {}", v.type_name()),
                ))
            }
        }
    }
    let listed = match g.opt_array("tokenizer.chat_templates")? {
        None => Vec::new(),
        Some(Array::String(names)) => names.clone(),
        Some(_) => {
            return Err(Error::format(
                g.path(),
                "tokenizer.chat_templates: expected an array of template names",
            ))
        }
    };
    if let Some(missing) = listed.iter().find(|n| !named.iter().any(|(m, _)| m == *n)) {
        return Err(Error::format(
            g.path(),
            format!(
                "tokenizer.chat_templates names \"{missing}\" but there is no {PREFIX}{missing}"
            ),
        ));
    }
    Ok(named)
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the vocabulary and
/// merges as stored, the pre-tokenizer that `pre` names.
fn byte_level_bpe(g: &Gguf, tokens: &[String], pre: &Pre) -> Result<tokenizers::Tokenizer> {
    let merges =
        match g.opt_array("tokenizer.ggml.merges")? {
            Some(Array::String(m)) => m,
            _ => return Err(Error::format(
                g.path(),
                "tokenizer.ggml.merges: a BPE tokenizer needs its merges as an array of strings",
            )),
        };
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // As llama.cpp: the separator is the first space after the
            // first character, so a merge may start with a space.
            let cut = m.char_indices().nth(1).map_or(m.len(), |(i, _)| i);
            match m[cut..].find(' ') {
                Some(at) => Ok((m[..cut + at].to_string(), m[cut + at + 1..].to_string())),
                None => Err(Error::format(
                    g.path(),
                    format!(
                        "tokenizer.ggml.merges[{i}] is {m:?}, not two tokens separated by a space"
                    ),
                )),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab(tokens), merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| Error::format(g.path(), format!("the BPE vocabulary and merges: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    if pre.nfc {
        tokenizer.with_normalizer(Some(NFC));
    }
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::format(g.path(), format!("pre-tokenizer regex {regex:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece BPE (`tokenizer.ggml.model = "llama"`, Mixtral): no merges
/// are stored, so they are derived from the scores as transformers' own
/// SentencePiece converter does: every way of splitting a piece into two
/// pieces is a merge, ranked by the merged piece's score. Characters
/// missing from the vocabulary fall back to `<0xXX>` byte tokens.
fn sentencepiece_bpe(
    g: &Gguf,
    tokens: &[String],
    types: &[i128],
    unk: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let scores = match g.opt_array("tokenizer.ggml.scores")? {
        Some(Array::F32(s)) if s.len() == tokens.len() => s,
        _ => {
            return Err(Error::format(
                g.path(),
                format!(
                    "tokenizer.ggml.scores: a SentencePiece tokenizer needs one float32 score per token ({})",
                    tokens.len()
                ),
            ))
        }
    };
    let vocab = vocab(tokens);
    let mut ranked: Vec<(f32, u32, usize, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] == BYTE {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(cut);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((scores[id], id as u32, cut, left.into(), right.into()));
            }
        }
    }
    // Higher score first; ties by id, then the shorter left part.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::format(g.path(), format!("the SentencePiece vocabulary: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let space_prefix = g
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(
        Replace::new(" ", "▁")
            .map_err(|e| Error::format(g.path(), format!("the space normalizer: {e}")))?
            .into(),
    );
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ")
            .map_err(|e| Error::format(g.path(), format!("the space decoder: {e}")))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Token text to id; when a text repeats, the last id keeps it, as in
/// llama.cpp's `token_to_id`.
fn vocab(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), id as u32);
    }
    vocab
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// `fixtures/gguf-vocab`: llama.cpp's `models/ggml-vocab-*.gguf` with the
    /// `.inp`/`.out` vectors its `test-tokenizer-0` checks (made with
    /// transformers by llama.cpp's `convert_hf_to_gguf_update.py`).
    pub(crate) fn vocab_dir() -> PathBuf {
        let in_repo = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/gguf-vocab"
        ));
        if in_repo.is_dir() {
            return in_repo.to_path_buf();
        }
        let root = std::env::var_os("SMOE_FIXTURES")
            .expect("fixtures/gguf-vocab not found; set SMOE_FIXTURES to the fixtures dir");
        PathBuf::from(root).join("gguf-vocab")
    }

    /// The vectors of `name`, read as `test-tokenizer-0` reads them.
    fn vectors(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
        let inp = std::fs::read_to_string(dir.join(format!("{name}.inp"))).unwrap();
        let out = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap();
        let sep = "\n__ggml_vocab_test__\n";
        let mut texts = Vec::new();
        let mut rest = inp.as_str();
        while !rest.is_empty() {
            match rest.find(sep) {
                Some(at) => {
                    texts.push(rest[..at].to_string());
                    rest = &rest[at + sep.len()..];
                }
                None => {
                    texts.push(rest.to_string());
                    rest = "";
                }
            }
        }
        let ids: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        assert_eq!(texts.len(), ids.len(), "{name}");
        texts.into_iter().zip(ids).collect()
    }

    fn check_vocab(file: &str, pre: Option<&str>) {
        let dir = vocab_dir();
        let g = Gguf::open(&dir.join(file)).unwrap();
        assert_eq!(g.opt_str("tokenizer.ggml.pre").unwrap(), pre, "{file}");
        let t = load(&g).unwrap();
        let cases = vectors(&dir, file);
        assert!(cases.len() > 30, "{file}");
        let mut failed = Vec::new();
        for (text, want) in &cases {
            let got = t.tokenizer.encode_fast(text.as_str(), false).unwrap();
            if got.get_ids() != &want[..] {
                failed.push(format!("{text:?}: got {:?}, want {want:?}", got.get_ids()));
            }
        }
        assert!(
            failed.is_empty(),
            "{file}: {} of {} differ:\n{}",
            failed.len(),
            cases.len(),
            failed.join("\n")
        );
    }

    #[test]
    fn qwen2_vectors() {
        check_vocab("ggml-vocab-qwen2.gguf", Some("qwen2"));
    }

    #[test]
    fn deepseek_llm_vectors() {
        check_vocab("ggml-vocab-deepseek-llm.gguf", Some("deepseek-llm"));
    }

    #[test]
    fn deepseek_coder_vectors() {
        check_vocab("ggml-vocab-deepseek-coder.gguf", Some("deepseek-coder"));
    }

    #[test]
    fn gpt2_vectors() {
        check_vocab("ggml-vocab-gpt-2.gguf", Some("gpt-2"));
    }

    #[test]
    fn sentencepiece_vectors() {
        check_vocab("ggml-vocab-llama-spm.gguf", Some("default"));
    }

    /// What llama.cpp's converter writes for a Qwen tokenizer directory:
    /// tokens by id, merges as "a b", control / user-defined types for the
    /// added tokens, EOS and padding ids, and the chat template.
    pub(crate) fn gguf_like_converter(dir: &Path) -> super::super::write::Builder {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        let mut tokens: Vec<(u32, String, i32)> = json["model"]["vocab"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(t, id)| (id.as_u64().unwrap() as u32, t.clone(), NORMAL as i32))
            .collect();
        for added in json["added_tokens"].as_array().unwrap() {
            let ty = if added["special"].as_bool().unwrap() {
                CONTROL
            } else {
                USER_DEFINED
            };
            let id = added["id"].as_u64().unwrap() as u32;
            tokens.retain(|t| t.0 != id);
            tokens.push((id, added["content"].as_str().unwrap().into(), ty as i32));
        }
        tokens.sort();
        assert!(tokens.iter().enumerate().all(|(i, t)| t.0 == i as u32));
        let merges: Vec<String> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                pair => format!(
                    "{} {}",
                    pair[0].as_str().unwrap(),
                    pair[1].as_str().unwrap()
                ),
            })
            .collect();
        let id_of = |key: &str| {
            let text = config[key].as_str().unwrap();
            Value::U32(tokens.iter().find(|t| t.1 == text).unwrap().0)
        };
        super::super::write::Builder::new()
            .kv("general.architecture", Value::String("qwen3moe".into()))
            .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", Value::String("qwen2".into()))
            .kv(
                "tokenizer.ggml.tokens",
                Value::Array(Array::String(tokens.iter().map(|t| t.1.clone()).collect())),
            )
            .kv(
                "tokenizer.ggml.token_type",
                Value::Array(Array::I32(tokens.iter().map(|t| t.2).collect())),
            )
            .kv("tokenizer.ggml.merges", Value::Array(Array::String(merges)))
            .kv("tokenizer.ggml.eos_token_id", id_of("eos_token"))
            .kv("tokenizer.ggml.padding_token_id", id_of("pad_token"))
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))
            .kv(
                "tokenizer.chat_template",
                Value::String(config["chat_template"].as_str().unwrap().into()),
            )
    }

    #[test]
    fn a_converted_tokenizer_and_template_match_the_originals() {
        let dir = vocab_dir().join("../tokenizer");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.gguf");
        std::fs::write(&path, gguf_like_converter(&dir).build()).unwrap();
        let g = Gguf::open(&path).unwrap();
        let loaded = load(&g).unwrap();
        let ours = loaded.to_tokenizer(&g).unwrap();
        let theirs = crate::tokenizer::Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(ours.max_id(), theirs.max_id());
        let im_end = theirs.token_to_id("<|im_end|>").unwrap();
        let endoftext = theirs.token_to_id("<|endoftext|>").unwrap();
        assert_eq!(loaded.eos, Some(im_end));
        assert_eq!(loaded.end_of_generation, [endoftext, im_end]);
        assert_eq!(loaded.special.eos.as_deref(), Some("<|im_end|>"));
        assert_eq!(loaded.special.pad.as_deref(), Some("<|endoftext|>"));
        for text in [
            "Say hello.",
            "Schöne Grüße aus München, Äpfel und Öl! e\u{301}",
            "你好，世界！ 🙂👍🏽 🇩🇪",
            "<|im_start|>user\nhi<|im_end|>\n<think>\nhm\n</think>\n\n  x",
        ] {
            for special in [false, true] {
                let ids = ours.encode(text, special).unwrap();
                assert_eq!(ids, theirs.encode(text, special).unwrap(), "{text:?}");
                for skip in [false, true] {
                    assert_eq!(
                        ours.decode(&ids, skip).unwrap(),
                        theirs.decode(&ids, skip).unwrap()
                    );
                }
            }
        }
        let template = loaded.chat_template(&g).unwrap();
        let original = ChatTemplate::from_dir(&dir).unwrap();
        let messages = crate::check::sample_conversation();
        let none = serde_json::Map::new();
        assert_eq!(
            template.render(&messages, None, true, &none).unwrap(),
            original.render(&messages, None, true, &none).unwrap()
        );
    }

    /// A file with `tokenizer.chat_template.tool_use` (as llama.cpp's
    /// converter stores a checkpoint's named templates) renders it when
    /// tools are passed and the default otherwise, as transformers picks;
    /// converted to a vault, the named templates become
    /// tokenizer_config.json's list and pick alike.
    #[test]
    fn a_tool_use_template_is_picked_when_tools_are_passed() {
        let dir = vocab_dir().join("../tokenizer");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.gguf");
        let s = |v: &str| Value::String(v.into());
        let named = gguf_like_converter(&dir)
            .kv(
                "tokenizer.chat_template.tool_use",
                s("{% for t in tools %}tool {{ t.function.name }}\n{% endfor %}{{ messages | length }}"),
            )
            .kv("tokenizer.chat_template.rag", s("rag"))
            .kv(
                "tokenizer.chat_templates",
                Value::Array(Array::String(vec!["tool_use".into(), "rag".into()])),
            );
        std::fs::write(&path, named.build()).unwrap();
        let g = Gguf::open(&path).unwrap();
        let loaded = load(&g).unwrap();
        assert_eq!(loaded.named("rag"), Some("rag"));
        let described = g.describe().unwrap().join("\n");
        assert!(described.contains(" + tool_use + rag"), "{described}");
        let template = loaded.chat_template(&g).unwrap();
        let original = ChatTemplate::from_dir(&dir).unwrap();
        let messages = crate::check::sample_conversation();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let none = serde_json::Map::new();
        let n = messages.as_array().unwrap().len();
        let default = original.render(&messages, None, true, &none).unwrap();
        assert_eq!(
            template.render(&messages, None, true, &none).unwrap(),
            default
        );
        assert_eq!(
            template
                .render(&messages, Some(&tools), true, &none)
                .unwrap(),
            format!("tool f\n{n}")
        );

        let vault = tmp.path().join("v");
        std::fs::create_dir(&vault).unwrap();
        super::super::convert::write_text_files(&g, &vault).unwrap();
        let from_vault = ChatTemplate::from_dir(&vault).unwrap();
        assert_eq!(
            from_vault.render(&messages, None, true, &none).unwrap(),
            default
        );
        assert_eq!(
            from_vault
                .render(&messages, Some(&tools), true, &none)
                .unwrap(),
            format!("tool f\n{n}")
        );

        // Named templates the metadata gets wrong are named.
        for (b, expect) in [
            (
                gguf_like_converter(&dir).kv("tokenizer.chat_template.tool_use", Value::U32(1)),
                "tokenizer.chat_template.tool_use: expected a string, found uint32",
            ),
            (
                gguf_like_converter(&dir).kv(
                    "tokenizer.chat_templates",
                    Value::Array(Array::String(vec!["tool_use".into()])),
                ),
                "tokenizer.chat_templates names \"tool_use\" but there is no tokenizer.chat_template.tool_use",
            ),
        ] {
            std::fs::write(&path, b.build()).unwrap();
            let err = load(&Gguf::open(&path).unwrap()).unwrap_err().to_string();
            assert!(err.contains(expect) && err.contains("t.gguf"), "{err}");
        }
    }

    #[test]
    fn bad_tokenizer_metadata_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.gguf");
        let base = || {
            super::super::write::Builder::new()
                .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
                .kv(
                    "tokenizer.ggml.tokens",
                    Value::Array(Array::String(vec!["a".into(), "b".into(), "ab".into()])),
                )
                .kv(
                    "tokenizer.ggml.merges",
                    Value::Array(Array::String(vec!["a b".into()])),
                )
        };
        let cases = [
            (base(), "tokenizer.ggml.pre is missing"),
            (
                base().kv("tokenizer.ggml.pre", Value::String("klingon".into())),
                "tokenizer.ggml.pre is \"klingon\"",
            ),
            (
                base()
                    .kv("tokenizer.ggml.pre", Value::String("qwen2".into()))
                    .kv("tokenizer.ggml.eos_token_id", Value::U32(3)),
                "tokenizer.ggml.eos_token_id is 3, but the vocabulary has 3 tokens",
            ),
            (
                base()
                    .kv("tokenizer.ggml.pre", Value::String("qwen2".into()))
                    .kv(
                        "tokenizer.ggml.token_type",
                        Value::Array(Array::I32(vec![1])),
                    ),
                "expected 3 integers",
            ),
            (
                super::super::write::Builder::new()
                    .kv("tokenizer.ggml.model", Value::String("bert".into()))
                    .kv(
                        "tokenizer.ggml.tokens",
                        Value::Array(Array::String(vec!["a".into()])),
                    ),
                "tokenizer.ggml.model is \"bert\"",
            ),
        ];
        for (b, expect) in cases {
            std::fs::write(&path, b.build()).unwrap();
            let g = Gguf::open(&path).unwrap();
            let err = load(&g).unwrap_err().to_string();
            assert!(err.contains(expect) && err.contains("t.gguf"), "{err}");
        }
        std::fs::write(
            &path,
            base()
                .kv("tokenizer.ggml.pre", Value::String("qwen2".into()))
                .build(),
        )
        .unwrap();
        let g = Gguf::open(&path).unwrap();
        let t = load(&g).unwrap();
        assert_eq!(t.tokenizer.encode_fast("ab", false).unwrap().get_ids(), [2]);
        let err = t.chat_template(&g).unwrap_err().to_string();
        assert!(err.contains("no tokenizer.chat_template"), "{err}");
    }
}
