//! `smoe check` on a GGUF: the tokenizer and chat template in its metadata
//! against its weights, with the same findings as for a checkpoint.

use serde_json::Map;

use super::{tokenizer, Gguf};
use crate::check::{eos_emitted, sample_conversation, untrained_rows, Code, Finding};
use crate::kernels::widen;
use crate::{Error, Result};

/// llama.cpp's name for the token embedding table.
pub const TOKEN_EMBD: &str = "token_embd.weight";

/// The tokenizer and template findings for a GGUF.
pub fn check(g: &Gguf) -> Result<Vec<Finding>> {
    let path = g.path();
    let mut out = Vec::new();
    let loaded = match tokenizer::load(g) {
        Ok(t) => t,
        Err(e) => {
            out.push(Finding::error(
                Code::NoTokenizer,
                format!("the tokenizer in the metadata cannot be used: {e}"),
            ));
            return Ok(out);
        }
    };
    let tok = loaded.to_tokenizer(g)?;
    let (_, embd) = g.require(TOKEN_EMBD)?;
    let (cols, rows) = match embd.dims[..] {
        [cols, rows] => (cols as usize, rows as usize),
        _ => {
            return Err(Error::format(
                path,
                format!("{TOKEN_EMBD} has dims {:?}, expected 2", embd.dims),
            ))
        }
    };
    let ids = tok.max_id() as usize + 1;
    if rows < ids {
        out.push(Finding::error(
            Code::VocabTooSmall,
            format!(
                "{}: {TOKEN_EMBD} has {rows} rows but the tokenizer has {ids} ids: ids from {rows} on have no embedding row",
                path.display()
            ),
        ));
    }
    if loaded.chat_template.is_none() {
        out.push(Finding::error(
            Code::NoChatTemplate,
            format!(
                "{}: no tokenizer.chat_template: chat cannot format a conversation; pass one with --chat-template",
                path.display()
            ),
        ));
        return Ok(out);
    }
    let template = loaded.chat_template(g)?;
    let text = match template.render(&sample_conversation(), None, true, &Map::new()) {
        Ok(text) => text,
        Err(e) => {
            out.push(Finding::error(
                Code::TemplateFails,
                format!(
                    "{}: the chat template fails on a plain system/user/assistant conversation: {e}",
                    path.display()
                ),
            ));
            return Ok(out);
        }
    };
    let prompt = tok.encode(&text, false)?;
    if template.source().contains("<think>") && tok.token_to_id("<think>").is_none() {
        out.push(Finding::warning(
            Code::ThinkWithoutToken,
            format!(
                "{}: the chat template writes <think> blocks, but the vocabulary has no <think> token",
                path.display()
            ),
        ));
    }
    out.extend(eos_emitted(&tok, &loaded.end_of_generation, &prompt, path));

    let Some(dtype) = embd.ggml_type.dtype() else {
        out.push(Finding::warning(
            Code::UntrainedToken,
            format!(
                "{}: {TOKEN_EMBD} is {}, whose rows smoe cannot read yet: the untrained-token check was skipped",
                path.display(),
                embd.ggml_type
            ),
        ));
        return Ok(out);
    };
    let table = g.data(TOKEN_EMBD)?;
    let row_bytes = embd.row_bytes() as usize;
    let mut buf = vec![0.0f32; cols];
    let mut norm = |row: usize| -> Result<f64> {
        widen(
            dtype,
            &table[row * row_bytes..(row + 1) * row_bytes],
            &mut buf,
        );
        Ok(buf
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt())
    };
    out.extend(untrained_rows(rows, &tok, &prompt, &mut norm)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::tokenizer::tests::{gguf_like_converter, vocab_dir};
    use super::super::write::Builder;
    use super::super::{GgmlType, Value};
    use super::*;
    use crate::quant::tests::normal;

    /// The converter-shaped GGUF of the Qwen fixture tokenizer with an f32
    /// embedding table of `rows` rows, `zero` of them zeroed.
    fn model(rows: usize, zero: &[u32], b: impl FnOnce(Builder) -> Builder) -> Vec<Finding> {
        let cols = 16;
        let mut table = normal(rows * cols, 7);
        for &z in zero {
            table[z as usize * cols..(z as usize + 1) * cols].fill(0.0);
        }
        let bytes = table.iter().flat_map(|x| x.to_le_bytes()).collect();
        let builder = b(gguf_like_converter(&vocab_dir().join("../tokenizer"))).tensor(
            TOKEN_EMBD,
            &[cols as u64, rows as u64],
            GgmlType::F32,
            bytes,
        );
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.gguf");
        std::fs::write(&path, builder.build()).unwrap();
        check(&Gguf::open(&path).unwrap()).unwrap()
    }

    fn codes(f: &[Finding]) -> Vec<Code> {
        f.iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_matching_gguf_is_clean() {
        let f = model(426, &[], |b| b);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn an_untrained_template_token_is_named() {
        // <|im_start|> is id 401 in the fixture.
        let f = model(426, &[401], |b| b);
        assert_eq!(codes(&f), [Code::UntrainedToken], "{f:?}");
        assert!(f[0].message.contains("<|im_start|>"), "{}", f[0].message);
    }

    #[test]
    fn a_short_embedding_table_is_named() {
        let f = model(405, &[], |b| b);
        assert_eq!(codes(&f)[0], Code::VocabTooSmall, "{f:?}");
        assert!(f[0].message.contains("405 rows"), "{}", f[0].message);
    }

    #[test]
    fn a_gguf_without_a_usable_template_or_tokenizer_is_named() {
        let f = model(426, &[], |_| {
            Builder::new().kv("general.architecture", Value::String("qwen3moe".into()))
        });
        assert_eq!(codes(&f), [Code::NoTokenizer], "{f:?}");
        assert!(
            f[0].message.contains("tokenizer.ggml.model is missing"),
            "{}",
            f[0].message
        );
    }
}
