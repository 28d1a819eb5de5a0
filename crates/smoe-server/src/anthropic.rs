//! Anthropic's Messages API on the same engine: content blocks (text,
//! thinking, tool_use, tool_result) mapped to and from the OpenAI-shaped
//! messages the chat template takes, and the stream as Anthropic's named
//! events.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event as Sse;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, Dialect};
use crate::openai::{call_id, collect, mapped, sampling_params, sse, template_messages};
use crate::reply::{Part, ReplyParser};
use crate::worker::{Event, Finish, Outcome};
use crate::{body_bytes, new_id, parse_json, AppState, Generate, Parsed, PromptInput};

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    max_tokens: u64,
    messages: Vec<Message>,
    system: Option<Content>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Debug, Deserialize)]
struct Tool {
    name: String,
    description: Option<String>,
    input_schema: Value,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg).dialect(Dialect::Anthropic)
}

/// The text of a `tool_result`'s or system prompt's content.
fn plain_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => blocks
            .iter()
            .map(
                |b| match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(invalid("only text blocks are supported here")),
                },
            )
            .collect(),
        _ => Err(invalid("content must be a string or a list of blocks")),
    }
}

/// Anthropic's conversation as OpenAI-style messages: tool_use blocks
/// become an assistant's `tool_calls`, each tool_result a `tool` message.
fn to_openai(system: Option<Content>, messages: Vec<Message>) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = system {
        let text = match system {
            Content::Text(s) => s,
            Content::Blocks(b) => plain_text(&Value::Array(b))?,
        };
        out.push(json!({"role": "system", "content": text}));
    }
    for (i, m) in messages.into_iter().enumerate() {
        if m.role != "user" && m.role != "assistant" {
            return Err(invalid(format!(
                "messages.{i}.role must be user or assistant"
            )));
        }
        let blocks = match m.content {
            Content::Text(t) => {
                out.push(json!({"role": m.role, "content": t}));
                continue;
            }
            Content::Blocks(b) => b,
        };
        let (mut text, mut thinking, mut calls) = (String::new(), String::new(), Vec::new());
        for b in blocks {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => match b.get("text") {
                    Some(Value::String(t)) => text += t,
                    _ => return Err(invalid(format!("messages.{i}: a text block needs a string text"))),
                },
                Some("thinking") => {
                    thinking += b.get("thinking").and_then(Value::as_str).unwrap_or("");
                }
                Some("tool_use") => calls.push(json!({
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b.get("name"), "arguments": b.get("input").cloned().unwrap_or(json!({}))},
                })),
                Some("tool_result") => out.push(json!({
                    "role": "tool",
                    "tool_call_id": b.get("tool_use_id"),
                    "content": plain_text(b.get("content").unwrap_or(&Value::Null))?,
                })),
                Some(other) => {
                    return Err(invalid(format!(
                        "messages.{i}: {other} blocks are not supported"
                    )))
                }
                None => return Err(invalid(format!("messages.{i}: a block has no type"))),
            }
        }
        if text.is_empty() && calls.is_empty() && thinking.is_empty() {
            continue;
        }
        let mut msg = json!({"role": m.role, "content": text});
        if !thinking.is_empty() {
            msg["reasoning_content"] = Value::from(thinking);
        }
        if !calls.is_empty() {
            msg["tool_calls"] = Value::from(calls);
        }
        out.push(msg);
    }
    Ok(out)
}

/// A messages body checked and mapped as the engine takes it.
pub(crate) fn messages_request(body: &[u8]) -> Result<Parsed, ApiError> {
    let req: MessagesRequest = parse_json(body, Dialect::Anthropic)?;
    if req.max_tokens == 0 {
        return Err(invalid("max_tokens must be at least 1"));
    }
    let messages = to_openai(req.system, req.messages)?;
    let messages = template_messages(messages).map_err(|e| e.dialect(Dialect::Anthropic))?;
    let tools = match req
        .tool_choice
        .as_ref()
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
    {
        Some("none") => None,
        _ => req.tools.filter(|t| !t.is_empty()).map(|tools| {
            tools
                .into_iter()
                .map(|t| {
                    json!({"type": "function", "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    }})
                })
                .collect::<Vec<_>>()
                .into()
        }),
    };
    let params = sampling_params(req.temperature, req.top_p, req.top_k, None, None, None)
        .map_err(|e| e.dialect(Dialect::Anthropic))?;
    Ok(Parsed {
        gen: Generate {
            prompt: PromptInput::Chat {
                messages,
                tools,
                kwargs: Default::default(),
            },
            params,
            max_tokens: Some(usize::try_from(req.max_tokens).unwrap_or(usize::MAX)),
            stop: req.stop_sequences.unwrap_or_default(),
        },
        stream: req.stream.unwrap_or(false),
        include_usage: false,
    })
}

pub(crate) async fn messages(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let Parsed {
            gen,
            stream: streaming,
            ..
        } = messages_request(&body_bytes(body, Dialect::Anthropic)?)?;
        let started = app.start(gen, Dialect::Anthropic).await?;
        let reply = Reply {
            id: new_id("msg_"),
            model: app.config.model_name.clone(),
            parser: ReplyParser::new(started.in_reasoning),
            open: None,
            blocks: 0,
            calls: 0,
        };
        if streaming {
            let start = reply.event(
                "message_start",
                json!({"message": {
                    "id": reply.id, "type": "message", "role": "assistant",
                    "model": reply.model, "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0},
                }}),
            );
            let rest = mapped(started.events, reply, Reply::on_event);
            return Ok::<_, ApiError>(sse(stream::once(async { start }).chain(rest)));
        }
        let mut reply = reply;
        let mut events = started.events;
        let (text, outcome) = collect(&mut events)
            .await
            .map_err(|e| e.dialect(Dialect::Anthropic))?;
        let mut parts = reply.parser.push(&text);
        parts.extend(reply.parser.finish());
        let mut content: Vec<Value> = Vec::new();
        for p in parts {
            let block = reply.block(p);
            match (content.last_mut(), block) {
                (Some(last), b) if last["type"] == "text" && b["type"] == "text" => {
                    let joined = format!(
                        "{}{}",
                        last["text"].as_str().unwrap_or(""),
                        b["text"].as_str().unwrap_or("")
                    );
                    last["text"] = Value::from(joined);
                }
                (Some(last), b) if last["type"] == "thinking" && b["type"] == "thinking" => {
                    let joined = format!(
                        "{}{}",
                        last["thinking"].as_str().unwrap_or(""),
                        b["thinking"].as_str().unwrap_or("")
                    );
                    last["thinking"] = Value::from(joined);
                }
                (_, b) => content.push(b),
            }
        }
        let (stop_reason, stop_sequence) = reply.stop_reason(&outcome);
        Ok(Json(json!({
            "id": reply.id,
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": outcome.prompt_tokens,
                "output_tokens": outcome.completion_tokens,
                "cache_read_input_tokens": outcome.cached_tokens,
            },
        }))
        .into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Text,
    Thinking,
}

struct Reply {
    id: String,
    model: String,
    parser: ReplyParser,
    /// The content block being streamed, if one is open.
    open: Option<Open>,
    blocks: usize,
    calls: usize,
}

impl Reply {
    fn event(&self, name: &str, mut data: Value) -> Sse {
        data["type"] = Value::from(name);
        Sse::default().event(name).data(data.to_string())
    }

    /// A whole content block for a part.
    fn block(&mut self, part: Part) -> Value {
        match part {
            Part::Content(t) => json!({"type": "text", "text": t}),
            Part::Reasoning(t) => json!({"type": "thinking", "thinking": t, "signature": ""}),
            Part::ToolCall(call) => {
                self.calls += 1;
                json!({
                    "type": "tool_use",
                    "id": call_id(&self.id, self.calls - 1),
                    "name": call.name,
                    "input": call.arguments,
                })
            }
        }
    }

    fn stop_reason(&self, o: &Outcome) -> (&'static str, Option<String>) {
        match &o.finish {
            _ if self.calls > 0 => ("tool_use", None),
            Finish::Eos => ("end_turn", None),
            Finish::Length => ("max_tokens", None),
            Finish::Stop(s) => ("stop_sequence", Some(s.clone())),
        }
    }

    fn close(&mut self, out: &mut Vec<Sse>) {
        if self.open.take().is_some() {
            out.push(self.event("content_block_stop", json!({"index": self.blocks - 1})));
        }
    }

    /// Streams a part: text and thinking extend the open block of their
    /// kind; anything else closes it first. A tool call is a block of its
    /// own with its whole input in one delta.
    fn stream_part(&mut self, part: Part, out: &mut Vec<Sse>) {
        let (kind, delta) = match part {
            Part::Content(t) => (Open::Text, json!({"type": "text_delta", "text": t})),
            Part::Reasoning(t) => (
                Open::Thinking,
                json!({"type": "thinking_delta", "thinking": t}),
            ),
            call @ Part::ToolCall(_) => {
                self.close(out);
                let mut block = self.block(call);
                let input = block["input"].take().to_string();
                block["input"] = json!({});
                let index = self.blocks;
                self.blocks += 1;
                out.push(self.event(
                    "content_block_start",
                    json!({"index": index, "content_block": block}),
                ));
                out.push(self.event(
                    "content_block_delta",
                    json!({"index": index, "delta": {"type": "input_json_delta", "partial_json": input}}),
                ));
                out.push(self.event("content_block_stop", json!({"index": index})));
                return;
            }
        };
        if self.open != Some(kind) {
            self.close(out);
            let block = match kind {
                Open::Text => json!({"type": "text", "text": ""}),
                Open::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            };
            out.push(self.event(
                "content_block_start",
                json!({"index": self.blocks, "content_block": block}),
            ));
            self.blocks += 1;
            self.open = Some(kind);
        }
        out.push(self.event(
            "content_block_delta",
            json!({"index": self.blocks - 1, "delta": delta}),
        ));
    }

    fn on_event(&mut self, ev: Event) -> (Vec<Sse>, bool) {
        let mut out = Vec::new();
        match ev {
            Event::Text(t) => {
                for p in self.parser.push(&t) {
                    self.stream_part(p, &mut out);
                }
                (out, true)
            }
            Event::Done(o) => {
                for p in self.parser.finish() {
                    self.stream_part(p, &mut out);
                }
                self.close(&mut out);
                let (reason, seq) = self.stop_reason(&o);
                out.push(self.event(
                    "message_delta",
                    json!({
                        "delta": {"stop_reason": reason, "stop_sequence": seq},
                        "usage": {"output_tokens": o.completion_tokens},
                    }),
                ));
                out.push(self.event("message_stop", json!({})));
                (out, false)
            }
            Event::Failed(msg) => {
                let err = ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, msg)
                    .dialect(Dialect::Anthropic);
                out.push(Sse::default().event("error").data(err.body().to_string()));
                (out, false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_use_and_tool_result_blocks_become_openai_messages() {
        let req: MessagesRequest = serde_json::from_value(json!({
            "max_tokens": 8,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": ""},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
                    {"type": "text", "text": "Thanks"},
                ]},
            ],
        }))
        .unwrap();
        let got = to_openai(req.system, req.messages).unwrap();
        assert_eq!(
            Value::from(got),
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "Use the tool.",
                 "tool_calls": [{"id": "toolu_1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
                {"role": "user", "content": "Thanks"},
            ])
        );
    }

    #[test]
    fn unsupported_blocks_and_roles_are_refused() {
        for messages in [
            json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]),
            json!([{"role": "system", "content": "x"}]),
            json!([{"role": "user", "content": [{"text": "no type"}]}]),
        ] {
            let req: MessagesRequest =
                serde_json::from_value(json!({"max_tokens": 8, "messages": messages})).unwrap();
            let e = to_openai(req.system, req.messages).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.dialect, Dialect::Anthropic);
        }
    }
}
