//! Text <-> token ids through a Hugging Face `tokenizer.json`, plus an
//! incremental detokenizer for streaming output.
//!
//! The `tokenizers` crate does the actual work so that encoding matches
//! transformers bit for bit; this wrapper adds errors that name the file,
//! refuses ids the vocabulary does not have (the crate silently drops them),
//! and streams text without ever cutting a UTF-8 character in half.

use std::path::{Path, PathBuf};

use crate::error::{read_to_string, Error, Result};

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    max_id: u32,
    /// Ids of added tokens flagged `special`, sorted for binary search.
    special_ids: Vec<u32>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` via the tokenizers crate; errors name the
    /// file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_to_string(path)?;
        // Syntax first: the tokenizers crate buffers the decoder section
        // and panics (`expect("Helper")`) when that buffering meets a JSON
        // syntax error or nesting past serde_json's depth limit (found by
        // fuzzing). Checked text cannot fail that way, the error says where
        // the file is broken, and the check builds nothing.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| {
            Error::format(path, format!("not a valid tokenizer: invalid JSON: {e}"))
        })?;
        // The unwind guard stays for panics of the crate that no fuzzer has
        // reached yet: a damaged file must be an error that names it.
        let parsed =
            std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()).map_err(|_| {
                Error::format(
                    path,
                    "not a valid tokenizer: the tokenizers crate could not read it \
                     (malformed decoder or model)",
                )
            })?;
        let inner =
            parsed.map_err(|e| Error::format(path, format!("not a valid tokenizer: {e}")))?;
        Self::from_tokenizer(inner, path)
    }

    /// Wraps a tokenizer built in code (a GGUF's, rebuilt from its
    /// metadata); `path` is the file errors name.
    pub fn from_tokenizer(mut inner: tokenizers::Tokenizer, path: &Path) -> Result<Self> {
        // transformers turns a tokenizer.json's padding and truncation off
        // unless a call asks for them, and nothing here does: kept, a
        // prompt would be cut or padded unlike the reference, and a
        // `"padding": {"strategy": {"Fixed": 10^12}}` would allocate that
        // many tokens on every encode (found by fuzzing).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::format(path, format!("not a valid tokenizer: {e}")))?;
        let max_id = inner
            .get_vocab(true)
            .into_values()
            .max()
            .ok_or_else(|| Error::format(path, "the tokenizer has an empty vocabulary"))?;
        let mut special_ids: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        special_ids.sort_unstable();
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            max_id,
            special_ids,
        })
    }

    /// Encodes text. `add_special_tokens` = false for chat-template output
    /// (transformers' `apply_chat_template` does that, the template already
    /// wrote the special tokens), true for raw text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // encode_fast skips offset tracking, which only alignment tools need.
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| {
                Error::invalid(format!("{}: encoding failed: {e}", self.path.display()))
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`Self::encode`] for text that must fit `limit` tokens: `None` when
    /// it does not. A long text is first counted piece by piece, stopping
    /// as soon as the count is past the limit, because the tokenizers
    /// crate holds several hundred bytes per token while it works: a 4 MiB
    /// request (4 M tokens) took 450-600 MB to be refused. Pieces end at
    /// whitespace where there is some, and the count allows a few tokens
    /// per cut for merges a cut prevents, so a text is refused only when
    /// whole it would be over the limit too; one that may fit is then
    /// encoded whole, as before.
    pub fn encode_at_most(
        &self,
        text: &str,
        add_special_tokens: bool,
        limit: usize,
    ) -> Result<Option<Vec<u32>>> {
        // A token covers at least one byte (special tokens aside, which add
        // a few), so a text this short cannot be over the limit.
        const PIECE: usize = 32 << 10;
        const SLACK_PER_CUT: usize = 16;
        if text.len() > limit {
            let (mut rest, mut counted, mut cuts) = (text, 0usize, 0usize);
            while !rest.is_empty() {
                let mut cut = rest.len().min(PIECE);
                while !rest.is_char_boundary(cut) {
                    cut += 1;
                }
                if cut < rest.len() {
                    if let Some(ws) = rest[..cut].rfind(char::is_whitespace).filter(|&w| w > 0) {
                        cut = ws;
                    }
                }
                counted += self.encode(&rest[..cut], false)?.len();
                rest = &rest[cut..];
                cuts += usize::from(!rest.is_empty());
                if counted > limit.saturating_add(cuts * SLACK_PER_CUT) {
                    return Ok(None);
                }
            }
        }
        let ids = self.encode(text, add_special_tokens)?;
        Ok((ids.len() <= limit).then_some(ids))
    }

    /// Decodes ids to text. Ids the tokenizer does not know are an error
    /// rather than being dropped silently.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.decode_known(ids, skip_special_tokens)
    }

    /// The id of a token string (added tokens included), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (in the model's byte-level alphabet, not
    /// decoded text), if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Highest id the tokenizer can produce, added tokens included.
    pub fn max_id(&self) -> u32 {
        self.max_id
    }

    /// Starts an incremental decoder for streaming generated tokens.
    pub fn stream(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
        }
    }

    fn check_id(&self, id: u32) -> Result<()> {
        // Range first: the lookup allocates, and most bad ids are past the end.
        if id > self.max_id || self.inner.id_to_token(id).is_none() {
            return Err(Error::invalid(format!(
                "token id {id} is not in the vocabulary of {} (max id {})",
                self.path.display(),
                self.max_id
            )));
        }
        Ok(())
    }

    fn is_special(&self, id: u32) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }

    fn decode_known(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::invalid(format!("{}: decoding failed: {e}", self.path.display())))
    }
}

/// Incremental detokenizer for streaming: text is released only when it is
/// complete UTF-8 (byte-level BPE splits multi-byte characters across
/// tokens), and concatenating all pieces equals `decode(all ids)`.
///
/// Works like text-generation-inference: decode the already-emitted tokens
/// of the last piece (the prefix, kept as context because some decoders
/// treat the start of a text specially) together with the pending ones, and
/// release the part past the prefix's text once it no longer ends in U+FFFD.
/// Only the last piece's tokens and the pending ones are kept, so each step
/// costs O(window), not O(all tokens).
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The prefix tokens followed by the pending ones.
    ids: Vec<u32>,
    /// Where the pending tokens start in `ids`.
    read: usize,
}

impl StreamDecoder<'_> {
    /// Adds one token; returns the text that became complete, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tokenizer.check_id(id)?;
        // A skipped special token contributes nothing to the text (decode
        // filters it out before the decoder runs); keeping it would only
        // grow the window.
        if self.skip_special_tokens && self.tokenizer.is_special(id) {
            return Ok(None);
        }
        self.ids.push(id);
        let piece = self.pending_text()?;
        if piece.is_empty() || piece.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(Some(piece))
    }

    /// Whatever is still held back (e.g. an incomplete character at the end),
    /// lossily. The decoder is empty afterwards and can start a new stream.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let piece = if self.read < self.ids.len() {
            self.pending_text()?
        } else {
            String::new()
        };
        self.ids.clear();
        self.read = 0;
        Ok((!piece.is_empty()).then_some(piece))
    }

    /// Text of the pending tokens: the window's text past the prefix's.
    fn pending_text(&self) -> Result<String> {
        let t = self.tokenizer;
        let prefix = t.decode_known(&self.ids[..self.read], self.skip_special_tokens)?;
        let mut text = t.decode_known(&self.ids, self.skip_special_tokens)?;
        if text.starts_with(&prefix) {
            return Ok(text.split_off(prefix.len()));
        }
        // Only a decoder that rewrites earlier text once more tokens follow
        // gets here; the pending tokens decoded on their own are the best
        // that can be done without retracting text already sent.
        t.decode_known(&self.ids[self.read..], self.skip_special_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture made by tools/make_tokenizer.py: a 400-token byte-level
    /// BPE with Qwen3's settings and added tokens.
    fn fixture() -> Tokenizer {
        let in_repo = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/tokenizer"
        ));
        let dir = if in_repo.join("tokenizer.json").is_file() {
            in_repo.to_path_buf()
        } else {
            let root = std::env::var_os("SMOE_FIXTURES")
                .expect("fixtures/tokenizer not found; set SMOE_FIXTURES to the fixtures dir");
            PathBuf::from(root).join("tokenizer")
        };
        Tokenizer::from_dir(&dir).unwrap()
    }

    /// Streams `ids` and checks the pieces: each is complete text, and
    /// together they are exactly the full decode.
    fn stream_all(t: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
        let mut stream = t.stream(skip_special_tokens);
        let mut pieces = Vec::new();
        for &id in ids {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(!piece.is_empty());
                assert!(
                    !piece.ends_with(char::REPLACEMENT_CHARACTER),
                    "incomplete character released: {piece:?}"
                );
                pieces.push(piece);
            }
        }
        pieces.extend(stream.finish().unwrap());
        assert_eq!(
            pieces.concat(),
            t.decode(ids, skip_special_tokens).unwrap(),
            "pieces: {pieces:?}"
        );
        pieces
    }

    /// A temporary file that removes itself.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, content: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("smoe-tokenizer-{}-{name}", std::process::id()));
            std::fs::write(&path, content).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn fixture_has_qwen3_added_tokens() {
        let t = fixture();
        let endoftext = t.token_to_id("<|endoftext|>").unwrap();
        assert_eq!(t.token_to_id("<|im_start|>"), Some(endoftext + 1));
        assert_eq!(t.token_to_id("<|im_end|>"), Some(endoftext + 2));
        let last = t.token_to_id("</think>").unwrap();
        assert_eq!(t.max_id(), last);
        assert_eq!(t.id_to_token(last).as_deref(), Some("</think>"));
        assert_eq!(t.id_to_token(last + 1), None);
        assert_eq!(t.token_to_id("no such token"), None);
    }

    #[test]
    fn encode_decode_round_trip() {
        let t = fixture();
        for text in [
            "Say hello.",
            "Schöne Grüße aus München, Äpfel und Öl!",
            "你好，世界！我们一起去公园散步吧。",
            "emoji 🙂👍🏽 and 🇩🇪 flags",
            "def f(x):\n\treturn x * 2  # done\n",
        ] {
            let ids = t.encode(text, true).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), text);
        }
        // Qwen adds no BOS/EOS, so both modes agree on plain text.
        assert_eq!(
            t.encode("Say hello.", true).unwrap(),
            t.encode("Say hello.", false).unwrap()
        );
    }

    #[test]
    fn special_tokens_encode_as_one_id_and_can_be_skipped() {
        let t = fixture();
        let start = t.token_to_id("<|im_start|>").unwrap();
        let end = t.token_to_id("<|im_end|>").unwrap();
        let text = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n";
        let ids = t.encode(text, false).unwrap();
        // What transformers' apply_chat_template gives for this message with
        // the fixture (tools/make_tokenizer.py prints it).
        let expected = [
            401, 84, 335, 198, 320, 88, 353, 13, 402, 198, 401, 282, 82, 359, 273, 83, 198,
        ];
        assert_eq!(ids, expected);
        assert_eq!(ids[0], start);
        assert_eq!(ids.iter().filter(|&&id| id == end).count(), 1);
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        assert_eq!(
            t.decode(&ids, true).unwrap(),
            "user\nSay hello.\nassistant\n"
        );
        // <think> is an added token but not special: skipping keeps it.
        let think = t.encode("<think>\nhm\n</think>", false).unwrap();
        assert_eq!(think[0], t.token_to_id("<think>").unwrap());
        assert_eq!(t.decode(&think, true).unwrap(), "<think>\nhm\n</think>");
    }

    #[test]
    fn stream_ascii() {
        let t = fixture();
        let ids = t
            .encode(
                "Hello, world! The quick brown fox jumps over the lazy dog.",
                false,
            )
            .unwrap();
        let pieces = stream_all(&t, &ids, false);
        // ASCII never waits for more bytes: one piece per token.
        assert_eq!(pieces.len(), ids.len());
    }

    #[test]
    fn stream_multibyte_split_across_tokens() {
        let t = fixture();
        // The tiny vocabulary has no merges for the emoji, so its 4 bytes are
        // 4 tokens, and no single one of them decodes to valid text.
        let emoji = t.encode("🙂", false).unwrap();
        assert_eq!(emoji.len(), 4);
        assert!(t.decode(&emoji[..1], false).unwrap().contains('\u{FFFD}'));
        for text in [
            "Die Straße über die Brücke: Schöne Grüße!",
            "中国的首都是北京。上海是一个很大的城市。你好吗",
            "ok 🙂👍🏽 🇩🇪 done",
            "🙂",
            "mixed: Größe 大 🙂 end",
        ] {
            let ids = t.encode(text, false).unwrap();
            let pieces = stream_all(&t, &ids, false);
            assert_eq!(pieces.concat(), text);
        }
    }

    #[test]
    fn stream_with_special_tokens() {
        let t = fixture();
        let text = "<|im_start|>assistant\n<think>\n思考 🙂\n</think>\n\nGrüße!<|im_end|>";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(stream_all(&t, &ids, false).concat(), text);
        assert_eq!(
            stream_all(&t, &ids, true).concat(),
            "assistant\n<think>\n思考 🙂\n</think>\n\nGrüße!"
        );
    }

    #[test]
    fn stream_finish_releases_incomplete_tail_lossily() {
        let t = fixture();
        let emoji = t.encode("a🙂", false).unwrap();
        let cut = &emoji[..emoji.len() - 1];
        let mut stream = t.stream(false);
        let mut out = String::new();
        for &id in cut {
            out.extend(stream.push(id).unwrap());
        }
        assert_eq!(out, "a");
        let tail = stream.finish().unwrap().unwrap();
        assert!(tail.contains('\u{FFFD}'));
        assert_eq!(out + &tail, t.decode(cut, false).unwrap());
        // Finished means empty: a new stream starts cleanly.
        assert_eq!(stream.finish().unwrap(), None);
        assert_eq!(stream.push(emoji[0]).unwrap().as_deref(), Some("a"));
    }

    #[test]
    fn stream_window_stays_small() {
        let t = fixture();
        let text = "Guten Morgen! 你好，世界！ 🙂 ".repeat(50);
        let ids = t.encode(&text, false).unwrap();
        let mut stream = t.stream(false);
        let mut longest = 0;
        for &id in &ids {
            stream.push(id).unwrap();
            longest = longest.max(stream.ids.len());
        }
        // The last piece's tokens plus at most one character's 4 bytes.
        assert!(longest <= 8, "window grew to {longest} ids");
    }

    #[test]
    fn unknown_ids_are_errors() {
        let t = fixture();
        let bad = t.max_id() + 1;
        for err in [
            t.decode(&[bad], false).unwrap_err(),
            t.decode(&[0, u32::MAX], true).unwrap_err(),
            t.stream(false).push(bad).unwrap_err(),
        ] {
            assert!(matches!(err, Error::Invalid(_)), "{err}");
            assert!(err.to_string().contains("not in the vocabulary"), "{err}");
        }
        // A rejected id leaves the stream usable.
        let mut stream = t.stream(false);
        assert!(stream.push(bad).is_err());
        let ids = t.encode("ok", false).unwrap();
        let mut out = String::new();
        for &id in &ids {
            out.extend(stream.push(id).unwrap());
        }
        assert_eq!(out, "ok");
    }

    #[test]
    fn bad_tokenizer_json_names_the_file() {
        let file = TempFile::new("bad.json", "{\"model\": 42");
        let err = Tokenizer::from_file(&file.0).err().unwrap();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(
            err.to_string().contains(&*file.0.to_string_lossy()),
            "{err}"
        );

        let file = TempFile::new("wrong.json", "{\"version\": \"1.0\"}");
        let err = Tokenizer::from_file(&file.0).err().unwrap();
        assert!(
            err.to_string().contains(&*file.0.to_string_lossy()),
            "{err}"
        );

        // Found by the tokenizer_json fuzz target: the tokenizers crate
        // panicked on this file's decoder.
        let crash = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/tokenizer/fuzz-crash-decoder.json");
        let err = Tokenizer::from_file(&crash).err().unwrap();
        assert!(
            err.to_string().contains("fuzz-crash-decoder.json")
                && err.to_string().contains("not a valid tokenizer"),
            "{err}"
        );

        let dir = std::env::temp_dir().join("smoe-no-such-dir");
        let err = Tokenizer::from_dir(&dir).err().unwrap();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
