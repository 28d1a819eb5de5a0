//! What a model's reply text means to an API client: reasoning between
//! `<think>` tags, tool calls in Qwen3's `<tool_call>` JSON, plain content,
//! and where a stop string ends it all. Both parsers take the text as it
//! streams, in pieces cut anywhere, and hold back only what may be the
//! start of a tag or of a stop string, so a client sees each character as
//! soon as its meaning is known.

use serde_json::Value;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// One meaningful piece of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Reasoning(String),
    Content(String),
    ToolCall(ToolCall),
}

/// A parsed call: `arguments` is the JSON object the model wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolCall {
    /// Reads `{"name": ..., "arguments": {...}}`, the format Qwen3's
    /// template asks for. `arguments` may also come as a JSON string
    /// holding the object, as some models write it.
    fn parse(text: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = match v.get("arguments") {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(a) => a.clone(),
        };
        arguments.is_object().then_some(Self { name, arguments })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Content,
    Reasoning,
    ToolCall,
}

/// Splits streamed reply text into [`Part`]s.
#[derive(Debug)]
pub struct ReplyParser {
    mode: Mode,
    pending: String,
    /// Whitespace right after a tag only separates blocks: it is dropped
    /// until the block's first visible character.
    trim_start: bool,
}

impl ReplyParser {
    /// `in_reasoning`: the prompt already opened a `<think>` block (some
    /// templates end the generation prompt with it).
    pub fn new(in_reasoning: bool) -> Self {
        Self {
            mode: if in_reasoning {
                Mode::Reasoning
            } else {
                Mode::Content
            },
            pending: String::new(),
            trim_start: true,
        }
    }

    /// Whether a rendered prompt leaves the reply inside a `<think>` block.
    pub fn prompt_opens_reasoning(prompt: &str) -> bool {
        match prompt.rfind(THINK_OPEN) {
            Some(open) => !prompt[open..].contains(THINK_CLOSE),
            None => false,
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<Part> {
        self.pending.push_str(text);
        let mut parts = Vec::new();
        loop {
            let tags: &[&str] = match self.mode {
                Mode::Content => &[THINK_OPEN, CALL_OPEN],
                Mode::Reasoning => &[THINK_CLOSE],
                Mode::ToolCall => &[CALL_CLOSE],
            };
            let found = tags
                .iter()
                .filter_map(|t| self.pending.find(t).map(|at| (at, *t)))
                .min_by_key(|(at, _)| *at);
            match found {
                Some((at, tag)) => {
                    let before: String = self.pending.drain(..at).collect();
                    self.pending.drain(..tag.len());
                    // What follows a broken call continues its text.
                    self.trim_start = self.close_block(before, &mut parts);
                    self.mode = match tag {
                        THINK_OPEN => Mode::Reasoning,
                        CALL_OPEN => Mode::ToolCall,
                        _ => Mode::Content,
                    };
                }
                None => {
                    if self.mode != Mode::ToolCall {
                        let keep = held_back(&self.pending, tags);
                        let ready: String = self.pending.drain(..keep).collect();
                        self.emit(ready, &mut parts);
                    }
                    return parts;
                }
            }
        }
    }

    /// The rest at the end of the reply. A tool call cut short (the token
    /// limit) that still parses counts; one that does not stays text.
    pub fn finish(&mut self) -> Vec<Part> {
        let rest = std::mem::take(&mut self.pending);
        let mut parts = Vec::new();
        if self.mode == Mode::ToolCall && ToolCall::parse(&rest).is_none() {
            self.mode = Mode::Content;
            self.trim_start = false;
            self.emit(format!("{CALL_OPEN}{rest}"), &mut parts);
        } else {
            self.close_block(rest, &mut parts);
        }
        parts
    }

    /// Text that ends the current block at a tag; false when it was a
    /// tool call that did not parse and went out as text.
    fn close_block(&mut self, text: String, parts: &mut Vec<Part>) -> bool {
        if self.mode != Mode::ToolCall {
            self.emit(text, parts);
            return true;
        }
        match ToolCall::parse(&text) {
            Some(call) => {
                parts.push(Part::ToolCall(call));
                true
            }
            // Not a call after all: the client gets the text as written.
            None => {
                self.mode = Mode::Content;
                self.trim_start = false;
                self.emit(format!("{CALL_OPEN}{text}{CALL_CLOSE}"), parts);
                false
            }
        }
    }

    fn emit(&mut self, mut text: String, parts: &mut Vec<Part>) {
        if self.trim_start {
            let visible = text.len() - text.trim_start().len();
            text.drain(..visible);
            if text.is_empty() {
                return;
            }
            self.trim_start = false;
        }
        if text.is_empty() {
            return;
        }
        match self.mode {
            Mode::Reasoning => parts.push(Part::Reasoning(text)),
            _ => parts.push(Part::Content(text)),
        }
    }
}

/// Where the part of `text` that could still grow into one of `needles`
/// begins: the start of its longest suffix that is a proper prefix of a
/// needle, or `text.len()` when there is none.
fn held_back(text: &str, needles: &[&str]) -> usize {
    text.char_indices()
        .map(|(i, _)| i)
        .find(|&i| {
            let tail = &text[i..];
            needles
                .iter()
                .any(|n| n.len() > tail.len() && n.starts_with(tail))
        })
        .unwrap_or(text.len())
}

/// The `stop` strings of a request, matched across streamed pieces.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds a piece; returns the text that is safe to send and, when a stop
    /// string now appears, which one (the text before it is all that is
    /// sent; the stop string itself is not).
    pub fn push(&mut self, text: &str) -> (String, Option<String>) {
        if self.stops.is_empty() {
            return (text.to_string(), None);
        }
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = hit {
            let stop = stop.clone();
            let ready = self.pending[..at].to_string();
            self.pending.clear();
            return (ready, Some(stop));
        }
        let needles: Vec<&str> = self.stops.iter().map(String::as_str).collect();
        let keep = held_back(&self.pending, &needles);
        (self.pending.drain(..keep).collect(), None)
    }

    /// What was held back, at the end of a reply that no stop string ended.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Feeds `text` in pieces of `n` characters and merges adjacent parts
    /// of one kind, so every split gives the same answer.
    fn parse_in_pieces(text: &str, n: usize, in_reasoning: bool) -> Vec<Part> {
        let mut p = ReplyParser::new(in_reasoning);
        let chars: Vec<char> = text.chars().collect();
        let mut parts = Vec::new();
        for piece in chars.chunks(n) {
            parts.extend(p.push(&piece.iter().collect::<String>()));
        }
        parts.extend(p.finish());
        let mut merged: Vec<Part> = Vec::new();
        for part in parts {
            match (merged.last_mut(), part) {
                (Some(Part::Content(a)), Part::Content(b)) => a.push_str(&b),
                (Some(Part::Reasoning(a)), Part::Reasoning(b)) => a.push_str(&b),
                (_, part) => merged.push(part),
            }
        }
        merged
    }

    fn every_split(text: &str, in_reasoning: bool) -> Vec<Part> {
        let whole = parse_in_pieces(text, usize::MAX, in_reasoning);
        for n in 1..8 {
            assert_eq!(
                parse_in_pieces(text, n, in_reasoning),
                whole,
                "pieces of {n}"
            );
        }
        whole
    }

    #[test]
    fn qwen3_reasoning_then_content() {
        let parts = every_split("<think>\nLet me see.\n</think>\n\nThe answer is 4.", false);
        assert_eq!(
            parts,
            vec![
                Part::Reasoning("Let me see.\n".into()),
                Part::Content("The answer is 4.".into())
            ]
        );
    }

    #[test]
    fn reasoning_opened_by_the_prompt() {
        assert!(ReplyParser::prompt_opens_reasoning(
            "<|im_start|>assistant\n<think>\n"
        ));
        assert!(!ReplyParser::prompt_opens_reasoning(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        let parts = every_split("hmm</think>ok", true);
        assert_eq!(
            parts,
            vec![Part::Reasoning("hmm".into()), Part::Content("ok".into())]
        );
    }

    #[test]
    fn qwen3_tool_calls() {
        let text = "<think>\nweather tool\n</think>\n\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{\\\"tz\\\": \\\"CET\\\"}\"}\n</tool_call>";
        let parts = every_split(text, false);
        assert_eq!(
            parts,
            vec![
                Part::Reasoning("weather tool\n".into()),
                Part::Content("Checking.\n".into()),
                Part::ToolCall(ToolCall {
                    name: "get_weather".into(),
                    arguments: json!({"city": "Paris"})
                }),
                Part::ToolCall(ToolCall {
                    name: "get_time".into(),
                    arguments: json!({"tz": "CET"})
                }),
            ]
        );
    }

    #[test]
    fn a_broken_tool_call_stays_text() {
        let parts = every_split("<tool_call>\n{\"name\": oops}\n</tool_call> after", false);
        assert_eq!(
            parts,
            vec![Part::Content(
                "<tool_call>\n{\"name\": oops}\n</tool_call> after".into()
            )]
        );
        // Cut off by the token limit: text too.
        let parts = every_split("a <tool_call>{\"name\": \"f\", \"argu", false);
        assert_eq!(
            parts,
            vec![Part::Content(
                "a <tool_call>{\"name\": \"f\", \"argu".into()
            )]
        );
        // Cut off just before the closing tag, but complete: a call.
        let parts = every_split("<tool_call>{\"name\": \"f\", \"arguments\": {}}", false);
        assert_eq!(
            parts,
            vec![Part::ToolCall(ToolCall {
                name: "f".into(),
                arguments: json!({})
            })]
        );
    }

    #[test]
    fn partial_tags_are_held_back_and_released() {
        let mut p = ReplyParser::new(false);
        assert_eq!(p.push("a <thi"), vec![Part::Content("a ".into())]);
        assert_eq!(
            p.push("s is < not a tag"),
            vec![Part::Content("<this is < not a tag".into())]
        );
        assert_eq!(p.push("ü<"), vec![Part::Content("ü".into())]);
        assert_eq!(p.finish(), vec![Part::Content("<".into())]);
    }

    #[test]
    fn stop_strings_across_pieces() {
        let mut s = StopStrings::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(s.push("hello E"), ("hello ".into(), None));
        assert_eq!(s.push("N"), (String::new(), None));
        assert_eq!(s.push("X and\n"), ("ENX and".into(), None));
        assert_eq!(s.push("\nrest"), (String::new(), Some("\n\n".into())));

        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("abcEN"), ("abc".into(), None));
        assert_eq!(s.finish(), "EN");

        let mut s = StopStrings::new(vec![]);
        assert_eq!(s.push("EN"), ("EN".into(), None));
    }
}
