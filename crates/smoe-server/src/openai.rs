//! OpenAI's chat completions and (legacy) completions routes: request
//! fields mapped onto the engine, replies in the same shape as OpenAI's,
//! streamed as server-sent events or whole.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use smoe::sampler::SamplingParams;

use crate::error::{ApiError, Dialect};
use crate::reply::{Part, ReplyParser};
use crate::worker::{Event, Finish, Outcome};
use crate::{
    body_bytes, fresh_seed, new_id, parse_json, unix_time, AppState, Generate, Parsed, PromptInput,
};

/// Request fields that both routes share, as OpenAI names them; vLLM's
/// `top_k`, `min_p` and `repetition_penalty` too.
#[derive(Debug, Deserialize)]
struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<i64>,
}

impl Sampling {
    fn params(&self) -> Result<SamplingParams, ApiError> {
        sampling_params(
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.repetition_penalty,
            self.seed,
        )
    }
}

/// Sampling options with the APIs' defaults (temperature 1, no filters);
/// a top-k of 0 or less switches that filter off, as vLLM's -1 does.
pub(crate) fn sampling_params(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<i64>,
) -> Result<SamplingParams, ApiError> {
    let params = SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        top_k: top_k.map_or(0, |k| k.max(0) as usize),
        min_p: min_p.unwrap_or(0.0),
        repeat_penalty: repeat_penalty.unwrap_or(1.0),
        // The bits of a negative seed are as good a seed as any.
        seed: seed.map_or_else(fresh_seed, |s| s as u64),
        ..Default::default()
    };
    params.validate()?;
    Ok(params)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn list(stop: Option<Stop>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    stop: Option<Stop>,
    n: Option<u64>,
    chat_template_kwargs: Option<Map<String, Value>>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// Checks the shared options: `n`, and a positive `max_tokens`.
fn common_checks(n: Option<u64>, max_tokens: Option<u64>) -> Result<Option<usize>, ApiError> {
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n=1 is supported").param("n"));
    }
    match max_tokens {
        Some(0) => Err(ApiError::invalid("max_tokens must be at least 1").param("max_tokens")),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        None => Ok(None),
    }
}

/// OpenAI messages as chat templates expect them: `developer` is a system
/// message, content parts are joined into one string, a missing content is
/// empty, and tool-call arguments (a JSON string in the API) are objects,
/// which templates print with `tojson`.
pub(crate) fn template_messages(messages: Vec<Value>) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty").param("messages"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let Value::Object(mut m) = m else {
            return Err(
                ApiError::invalid(format!("messages[{i}] is not an object")).param("messages")
            );
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some("developer") => "system",
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            _ => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].role must be one of system, developer, user, assistant, tool"
                ))
                .param("messages"))
            }
        };
        m.insert("role".into(), Value::from(role));
        let content = match m.remove("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            Some(Value::Array(parts)) => content_text(&parts).map_err(|e| {
                ApiError::invalid(format!("messages[{i}].content: {e}")).param("messages")
            })?,
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].content must be a string or a list of parts"
                ))
                .param("messages"))
            }
        };
        m.insert("content".into(), Value::from(content));
        if let Some(calls) = m.get_mut("tool_calls") {
            let Value::Array(calls) = calls else {
                return Err(
                    ApiError::invalid(format!("messages[{i}].tool_calls must be a list"))
                        .param("messages"),
                );
            };
            for call in calls {
                let args = call.pointer_mut("/function/arguments");
                if let Some(args) = args {
                    if let Some(parsed) = args
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    {
                        *args = parsed;
                    }
                }
            }
        }
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

/// The text of a list of content parts; only text parts can be served.
fn content_text(parts: &[Value]) -> Result<String, String> {
    let mut text = String::new();
    for p in parts {
        match (p.get("type").and_then(Value::as_str), p.get("text")) {
            (Some("text"), Some(Value::String(t))) => text.push_str(t),
            (Some(kind), _) if kind != "text" => {
                return Err(format!("{kind} parts are not supported (text only)"))
            }
            _ => return Err("each part needs a type and, for text, a string text".into()),
        }
    }
    Ok(text)
}

/// A chat completions body checked and mapped as the engine takes it.
pub(crate) fn chat_request(body: &[u8]) -> Result<Parsed, ApiError> {
    let req: ChatRequest = parse_json(body, Dialect::OpenAi)?;
    let max_tokens = common_checks(req.n, req.max_completion_tokens.or(req.max_tokens))?;
    let tools = match req.tool_choice.as_ref().and_then(Value::as_str) {
        Some("none") => None,
        _ => req.tools.filter(|t| !t.is_empty()).map(Value::from),
    };
    let gen = Generate {
        prompt: PromptInput::Chat {
            messages: template_messages(req.messages)?,
            tools,
            kwargs: req.chat_template_kwargs.unwrap_or_default(),
        },
        params: req.sampling.params()?,
        max_tokens,
        stop: Stop::list(req.stop),
    };
    Ok(parsed(gen, req.stream, req.stream_options))
}

/// A request as the engine takes it, with whether the reply streams and,
/// if so, ends with a usage chunk (`stream_options.include_usage`).
fn parsed(gen: Generate, stream: Option<bool>, options: Option<StreamOptions>) -> Parsed {
    Parsed {
        gen,
        stream: stream.unwrap_or(false),
        include_usage: options.and_then(|o| o.include_usage).unwrap_or(false),
    }
}

pub(crate) async fn chat_completions(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let Parsed {
            gen,
            stream: streaming,
            include_usage,
        } = chat_request(&body_bytes(body, Dialect::OpenAi)?)?;
        let started = app.start(gen, Dialect::OpenAi).await?;
        let reply = ChatReply {
            id: new_id("chatcmpl-"),
            created: unix_time(),
            model: app.config.model_name.clone(),
            parser: ReplyParser::new(started.in_reasoning),
            calls: 0,
        };
        Ok::<_, ApiError>(if streaming {
            sse(reply.stream(started.events, include_usage))
        } else {
            reply.whole(started.events).await?.into_response()
        })
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// A stream of JSON events as SSE; a comment every few seconds keeps idle
/// proxies from closing it while a request waits in the queue.
pub(crate) fn sse(events: impl Stream<Item = Sse> + Send + 'static) -> Response {
    axum::response::Sse::new(events.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The engine's events, one at a time, each mapped to any number of SSE
/// events by `f`, which returns false after the last. Dropping the stream
/// (the client went away) drops the receiver, which tells the engine.
pub(crate) fn mapped<S: Send + 'static>(
    events: mpsc::UnboundedReceiver<Event>,
    state: S,
    f: fn(&mut S, Event) -> (Vec<Sse>, bool),
) -> impl Stream<Item = Sse> + Send {
    stream::unfold(Some((events, state)), move |st| async move {
        let (mut rx, mut state) = st?;
        let event = rx.recv().await?;
        let (out, more) = f(&mut state, event);
        Some((stream::iter(out), more.then_some((rx, state))))
    })
    .flatten()
}

pub(crate) fn json_event(v: &Value) -> Sse {
    Sse::default().data(v.to_string())
}

struct ChatReply {
    id: String,
    created: u64,
    model: String,
    parser: ReplyParser,
    calls: usize,
}

impl ChatReply {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    fn delta(&mut self, part: Part) -> Value {
        match part {
            Part::Content(t) => json!({"content": t}),
            Part::Reasoning(t) => json!({"reasoning_content": t}),
            Part::ToolCall(call) => {
                let index = self.calls;
                self.calls += 1;
                json!({"tool_calls": [{
                    "index": index,
                    "id": call_id(&self.id, index),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments.to_string()},
                }]})
            }
        }
    }

    fn finish_reason(&self, o: &Outcome) -> &'static str {
        match o.finish {
            _ if self.calls > 0 => "tool_calls",
            Finish::Eos | Finish::Stop(_) => "stop",
            Finish::Length => "length",
        }
    }

    fn stream(
        self,
        events: mpsc::UnboundedReceiver<Event>,
        include_usage: bool,
    ) -> impl Stream<Item = Sse> + Send {
        let first = json_event(&self.chunk(json!({"role": "assistant", "content": ""}), None));
        let rest = mapped(
            events,
            (self, include_usage),
            |(reply, include_usage), ev| {
                let parts = match &ev {
                    Event::Text(t) => reply.parser.push(t),
                    Event::Done(_) => reply.parser.finish(),
                    Event::Failed(_) => Vec::new(),
                };
                let mut out: Vec<Sse> = parts
                    .into_iter()
                    .map(|p| {
                        let d = reply.delta(p);
                        json_event(&reply.chunk(d, None))
                    })
                    .collect();
                match ev {
                    Event::Text(_) => return (out, true),
                    Event::Done(o) => {
                        let reason = reply.finish_reason(&o);
                        out.push(json_event(&reply.chunk(json!({}), Some(reason))));
                        if *include_usage {
                            let mut last = reply.chunk(json!({}), None);
                            last["choices"] = json!([]);
                            last["usage"] = usage(&o);
                            last["timings"] = timings(&o);
                            out.push(json_event(&last));
                        }
                    }
                    Event::Failed(msg) => out.push(json_event(
                        &ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, msg).body(),
                    )),
                }
                out.push(Sse::default().data("[DONE]"));
                (out, false)
            },
        );
        stream::once(async { first }).chain(rest)
    }

    async fn whole(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<Json<Value>, ApiError> {
        let (text, outcome) = collect(&mut events).await?;
        let mut parts = self.parser.push(&text);
        parts.extend(self.parser.finish());
        let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
        for p in parts {
            match p {
                Part::Content(t) => content += &t,
                Part::Reasoning(t) => reasoning += &t,
                p @ Part::ToolCall(_) => calls.push(self.delta(p)["tool_calls"][0].take()),
            }
        }
        let mut message = json!({"role": "assistant", "content": content});
        if !reasoning.is_empty() {
            message["reasoning_content"] = Value::from(reasoning);
        }
        if !calls.is_empty() {
            for c in &mut calls {
                c.as_object_mut().map(|o| o.remove("index"));
            }
            message["tool_calls"] = Value::from(calls);
            if content.is_empty() {
                message["content"] = Value::Null;
            }
        }
        Ok(Json(json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": null,
                "finish_reason": self.finish_reason(&outcome),
            }],
            "usage": usage(&outcome),
            "timings": timings(&outcome),
        })))
    }
}

pub(crate) fn call_id(reply_id: &str, index: usize) -> String {
    format!(
        "call_{}_{index}",
        reply_id.rsplit('-').next().unwrap_or(reply_id)
    )
}

/// All of a job's text, once it is done.
pub(crate) async fn collect(
    events: &mut mpsc::UnboundedReceiver<Event>,
) -> Result<(String, Outcome), ApiError> {
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Text(t) => text += &t,
            Event::Done(o) => return Ok((text, o)),
            Event::Failed(msg) => {
                return Err(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    msg,
                ))
            }
        }
    }
    Err(ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "the engine dropped the request",
    ))
}

fn usage(o: &Outcome) -> Value {
    json!({
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
    })
}

/// llama.cpp's extra `timings` object, which the web page reads.
fn timings(o: &Outcome) -> Value {
    let t = &o.timings;
    json!({
        "prompt_n": t.prefill_tokens,
        "prompt_ms": 1e3 * t.prefill_s,
        "prompt_per_second": t.prefill_tok_s(),
        "predicted_n": t.decode_tokens,
        "predicted_ms": 1e3 * t.decode_s,
        "predicted_per_second": t.decode_tok_s(),
        "cache_n": o.cached_tokens,
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    stop: Option<Stop>,
    n: Option<u64>,
    echo: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

struct TextReply {
    id: String,
    created: u64,
    model: String,
}

impl TextReply {
    fn chunk(&self, text: &str, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
        })
    }
}

fn text_finish(o: &Outcome) -> &'static str {
    match o.finish {
        Finish::Eos | Finish::Stop(_) => "stop",
        Finish::Length => "length",
    }
}

/// A completions body checked and mapped as the engine takes it.
pub(crate) fn completion_request(body: &[u8]) -> Result<Parsed, ApiError> {
    let req: CompletionRequest = parse_json(body, Dialect::OpenAi)?;
    // OpenAI's default for this route.
    let max_tokens = common_checks(req.n, req.max_tokens)?.or(Some(16));
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo is not supported").param("echo"));
    }
    let prompt = match req.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(
                ApiError::invalid("only one prompt per request is supported").param("prompt"),
            )
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt must not be empty").param("prompt"));
    }
    let gen = Generate {
        prompt: PromptInput::Raw(prompt),
        params: req.sampling.params()?,
        max_tokens,
        stop: Stop::list(req.stop),
    };
    Ok(parsed(gen, req.stream, req.stream_options))
}

pub(crate) async fn completions(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let Parsed {
            gen,
            stream: streaming,
            include_usage,
        } = completion_request(&body_bytes(body, Dialect::OpenAi)?)?;
        let started = app.start(gen, Dialect::OpenAi).await?;
        let reply = TextReply {
            id: new_id("cmpl-"),
            created: unix_time(),
            model: app.config.model_name.clone(),
        };
        if streaming {
            return Ok::<_, ApiError>(sse(mapped(
                started.events,
                (reply, include_usage),
                |(reply, include_usage), ev| match ev {
                    Event::Text(t) => (vec![json_event(&reply.chunk(&t, None))], true),
                    Event::Done(o) => {
                        let mut out = vec![json_event(&reply.chunk("", Some(text_finish(&o))))];
                        if *include_usage {
                            let mut last = reply.chunk("", None);
                            last["choices"] = json!([]);
                            last["usage"] = usage(&o);
                            out.push(json_event(&last));
                        }
                        out.push(Sse::default().data("[DONE]"));
                        (out, false)
                    }
                    Event::Failed(msg) => (
                        vec![
                            json_event(
                                &ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, msg)
                                    .body(),
                            ),
                            Sse::default().data("[DONE]"),
                        ],
                        false,
                    ),
                },
            )));
        }
        let mut events = started.events;
        let (text, o) = collect(&mut events).await?;
        let mut body = reply.chunk(&text, Some(text_finish(&o)));
        body["usage"] = usage(&o);
        Ok(Json(body).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_normalized_for_templates() {
        let got = template_messages(vec![
            json!({"role": "developer", "content": "Be brief."}),
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            ]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "2"}),
        ])
        .unwrap();
        assert_eq!(
            got,
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"},
            ])
        );
    }

    #[test]
    fn bad_messages_name_the_problem() {
        let cases = [
            (vec![], "must not be empty"),
            (vec![json!("hi")], "messages[0] is not an object"),
            (
                vec![json!({"role": "wizard", "content": "x"})],
                "messages[0].role",
            ),
            (
                vec![json!({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})],
                "image_url parts are not supported",
            ),
            (
                vec![json!({"role": "user", "content": 5})],
                "must be a string or a list",
            ),
        ];
        for (messages, want) in cases {
            let e = template_messages(messages).unwrap_err();
            assert!(e.message.contains(want), "{}: want {want}", e.message);
            assert_eq!(e.param, Some("messages"));
        }
    }
}
