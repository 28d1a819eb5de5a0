//! `smoe serve` over loopback HTTP: replies equal to `smoe run` on the same
//! prompt (greedy), streamed or whole; prefix reuse; stop strings; bad
//! requests answered with 4xx error objects; the API key; a full queue; and
//! a bounded load of concurrent, disconnecting and malformed requests,
//! decoded four at a time as one batch, after which every good reply is
//! what `smoe run` gives alone and no generation is left running.

mod common;

use std::collections::HashMap;
use std::sync::Barrier;

use common::server::{post_and_hang_up, post_open, request, Reply, Server, SERVE_MODEL};
use common::*;
use serde_json::{json, Value};

/// Prompts whose greedy replies on the fixture have no `<think>` or
/// `<tool_call>` tags, so a chat reply's content is the whole text.
const PROMPTS: [&str; 4] = ["Hi", "Tell me a story", "What is 2+2?", "Count to ten"];
/// Prompts whose greedy chat replies run past 300 tokens.
const LONG_PROMPTS: [&str; 2] = ["The quick brown fox", "Explain MoE"];
/// What the first token of a streamed chat reply looks like.
const FIRST_TOKEN: [&str; 3] = [
    "\"delta\":{\"content\"",
    "\"delta\":{\"reasoning_content\"",
    "\"delta\":{\"tool_calls\"",
];

/// `smoe run`'s greedy text for a prompt: the reference every reply is
/// checked against.
fn run_text(prompt: &str, raw: bool, max_tokens: usize) -> (String, String) {
    let model = fixture(SERVE_MODEL);
    let max = max_tokens.to_string();
    let mut args = vec!["run", "--model", path_str(&model), "--prompt", prompt];
    args.extend(["--max-tokens", &max, "--json"]);
    if raw {
        args.push("--raw");
    }
    let out: Value = serde_json::from_str(&smoe_ok(&args)).unwrap();
    let text = out["text"].as_str().unwrap().to_string();
    assert!(
        raw || !text.contains('<'),
        "{prompt:?}: the reference reply has tags: {text:?}"
    );
    (text, out["stop_reason"].as_str().unwrap().to_string())
}

fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "eos" => "stop",
        "length" => "length",
        other => panic!("unexpected stop reason {other}"),
    }
}

fn chat_body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": SERVE_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// The text and finish reason of a reply from any route, streamed or not.
fn reply_text(r: &Reply, route: &str, stream: bool) -> (String, String) {
    assert_eq!(r.status, 200, "{}", r.text());
    let field = |v: &Value| match route {
        "/v1/completions" => v["text"].as_str().map(str::to_string),
        _ if stream => v["delta"]["content"].as_str().map(str::to_string),
        _ => v["message"]["content"].as_str().map(str::to_string),
    };
    if !stream {
        let v = r.json();
        let choice = &v["choices"][0];
        return (
            field(choice).unwrap_or_default(),
            choice["finish_reason"].as_str().unwrap().to_string(),
        );
    }
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let (mut text, mut finish) = (String::new(), String::new());
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(choice) = v["choices"].get(0) {
            text += &field(choice).unwrap_or_default();
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

#[test]
fn replies_match_smoe_run_streamed_or_whole() {
    let server = Server::start(&[]);
    let models = server.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], SERVE_MODEL);

    for prompt in PROMPTS {
        let (want, stop) = run_text(prompt, false, 24);
        for stream in [false, true] {
            let r = server.post("/v1/chat/completions", &chat_body(prompt, 24, stream));
            let (text, finish) = reply_text(&r, "/v1/chat/completions", stream);
            assert_eq!(text, want.trim_start(), "{prompt:?} stream={stream}");
            assert_eq!(finish, finish_reason(&stop), "{prompt:?}");
        }
        let (want, stop) = run_text(prompt, true, 24);
        for stream in [false, true] {
            let body =
                json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": stream});
            let r = server.post("/v1/completions", &body);
            let (text, finish) = reply_text(&r, "/v1/completions", stream);
            assert_eq!(text, want, "raw {prompt:?} stream={stream}");
            assert_eq!(finish, finish_reason(&stop));
        }
    }

    // Usage, in the last streamed chunk and in a whole reply.
    let r = server.post("/v1/chat/completions", &chat_body("Hi", 24, true));
    let data = r.sse_data();
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    let u = &usage["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let h = server.idle_health();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["generations"]["failed"], 0);
    assert_eq!(h["generations"]["cancelled"], 0);
}

#[test]
fn a_conversation_that_goes_on_prefills_only_its_new_tokens() {
    let server = Server::start(&[]);
    let mut messages = vec![json!({"role": "user", "content": "Tell me a story"})];
    let first = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 16, "temperature": 0}),
        )
        .json();
    let prompt1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    messages.push(first["choices"][0]["message"].clone());
    messages.push(json!({"role": "user", "content": "And then?"}));
    let second = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 16, "temperature": 0}),
        )
        .json();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt2 = second["usage"]["prompt_tokens"].as_u64().unwrap();
    // Everything up to the first reply was kept; only the new turn (and
    // what the template re-renders of the reply) is prefilled.
    assert!(
        cached >= prompt1,
        "cached {cached} of {prompt2}, first prompt {prompt1}"
    );
    assert!(cached < prompt2);
    assert_eq!(
        second["timings"]["prompt_n"].as_u64().unwrap(),
        prompt2 - cached
    );
}

#[test]
fn chat_template_kwargs_reach_the_template() {
    let server = Server::start(&[]);
    let model = fixture(SERVE_MODEL);
    let dir = tempfile::tempdir().unwrap();
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let file = dir.path().join("m.json");
    std::fs::write(&file, messages.to_string()).unwrap();
    for thinking in [true, false] {
        let var = format!("enable_thinking={thinking}");
        let ids: Value = serde_json::from_str(&smoe_ok(&[
            "template",
            "--model",
            path_str(&model),
            "--messages",
            path_str(&file),
            "--var",
            &var,
            "--ids",
        ]))
        .unwrap();
        let body = json!({"messages": messages, "max_tokens": 1,
                          "chat_template_kwargs": {"enable_thinking": thinking}});
        let r = server.post("/v1/chat/completions", &body).json();
        assert_eq!(
            r["usage"]["prompt_tokens"],
            ids.as_array().unwrap().len(),
            "enable_thinking={thinking}"
        );
    }
}

/// A checkpoint whose tokenizer_config.json holds transformers' list of
/// named templates: a request with tools renders the `tool_use` one, as
/// transformers' `apply_chat_template` picks it, and one without renders
/// the default; `smoe template` agrees token for token.
#[test]
fn a_request_with_tools_renders_the_tool_use_template() {
    let model = copy_fixture(SERVE_MODEL);
    let config_path = model.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let default = config["chat_template"].as_str().unwrap().to_string();
    let tool_use =
        format!("{{% for t in tools %}}Tool {{{{ t.function.name }}}}.\n{{% endfor %}}{default}");
    config["chat_template"] = json!([
        {"name": "default", "template": default},
        {"name": "tool_use", "template": tool_use},
    ]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let messages = json!([{"role": "user", "content": "What is the weather?"}]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {}}}}]);
    let write = |name: &str, text: &str| {
        let path = scratch.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (m, t, d) = (
        write("m.json", &messages.to_string()),
        write("t.json", &tools.to_string()),
        write("default.jinja", &default),
    );
    let ids = |extra: &[&str]| -> usize {
        let mut args = vec!["template", "--messages", path_str(&m), "--ids"];
        args.extend_from_slice(extra);
        let out: Value = serde_json::from_str(&smoe_ok(&args)).unwrap();
        out.as_array().unwrap().len()
    };
    let dir = path_str(model.path());
    let with_tools = ids(&["--model", dir, "--tools", path_str(&t)]);
    let without = ids(&["--model", dir]);
    let default_with_tools = ids(&[
        "--model",
        dir,
        "--tools",
        path_str(&t),
        "--chat-template",
        path_str(&d),
    ]);
    assert_ne!(with_tools, default_with_tools);

    let server = Server::start_with(model.path(), &[]);
    for (body, want) in [
        (
            json!({"messages": messages, "tools": tools, "max_tokens": 1}),
            with_tools,
        ),
        (json!({"messages": messages, "max_tokens": 1}), without),
        // tool_choice "none" sends no tools to the template.
        (
            json!({"messages": messages, "tools": tools, "tool_choice": "none", "max_tokens": 1}),
            without,
        ),
    ] {
        let r = server.post("/v1/chat/completions", &body).json();
        assert_eq!(r["usage"]["prompt_tokens"], want, "{body}");
    }
}

#[test]
fn stop_strings_end_the_reply_before_them() {
    let server = Server::start(&[]);
    let (want, _) = run_text("Tell me a story", true, 40);
    // A stop string from the middle of the greedy reply.
    let chars: Vec<char> = want.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = want.find(&stop).unwrap();
    for stream in [false, true] {
        let body = json!({"prompt": "Tell me a story", "max_tokens": 40, "temperature": 0,
                          "stop": [stop], "stream": stream});
        let r = server.post("/v1/completions", &body);
        let (text, finish) = reply_text(&r, "/v1/completions", stream);
        assert_eq!(text, want[..cut], "stream={stream}");
        assert_eq!(finish, "stop");
    }
}

/// Requests that must each get a 4xx with an error object, and which.
fn bad_requests() -> Vec<(&'static str, &'static str, Vec<u8>, u16)> {
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "x"}]);
    let with = |extra: Value| {
        let mut body = json!({"messages": user});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body.to_string().into_bytes()
    };
    let long_prompt = "word ".repeat(3000);
    vec![
        ("POST", chat, b"{\"messages\": [".to_vec(), 400),
        ("POST", chat, b"[]".to_vec(), 400),
        ("POST", chat, b"\xff\xfe not utf-8".to_vec(), 400),
        ("POST", chat, b"{\"messages\": \"hi\"}".to_vec(), 400),
        ("POST", chat, b"{\"messages\": []}".to_vec(), 400),
        ("POST", chat, with(json!({"temperature": "hot"})), 400),
        ("POST", chat, with(json!({"max_tokens": -5})), 400),
        ("POST", chat, with(json!({"max_tokens": 100000})), 400),
        ("POST", chat, with(json!({"n": 3})), 400),
        ("POST", chat, with(json!({"top_p": 0})), 400),
        ("POST", chat, with(json!({"stop": 5})), 400),
        (
            "POST",
            chat,
            with(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
        ),
        (
            "POST",
            chat,
            with(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            400,
        ),
        (
            "POST",
            chat,
            with(json!({"messages": [{"role": "user", "content": long_prompt}]})),
            400,
        ),
        ("POST", chat, vec![b' '; 5 << 20], 413),
        ("POST", "/v1/completions", b"{\"prompt\": 5}".to_vec(), 400),
        ("POST", "/v1/completions", b"{}".to_vec(), 400),
        ("POST", "/v1/messages", with(json!({})), 400),
        ("GET", chat, Vec::new(), 405),
        ("GET", "/v1/messages", Vec::new(), 405),
        ("POST", "/v1/nothing", b"{}".to_vec(), 404),
    ]
}

fn assert_error_object(r: &Reply, path: &str, want: u16) {
    assert_eq!(r.status, want, "{path}: {}", r.text());
    let v = r.json();
    if path == "/v1/messages" {
        assert_eq!(v["type"], "error", "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    } else {
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
    }
}

#[test]
fn bad_requests_get_4xx_error_objects() {
    let server = Server::start(&[]);
    for (method, path, body, want) in bad_requests() {
        let r = request(&server.addr, method, path, &[], &body);
        assert_error_object(&r, path, want);
    }
    let r = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
    );
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // Still serving.
    let r = server.post("/v1/chat/completions", &chat_body("Hi", 4, false));
    assert_eq!(r.status, 200);
    assert_eq!(server.idle_health()["generations"]["failed"], 0);
}

#[test]
fn the_api_key_guards_every_api_route() {
    let server = Server::start(&["--api-key", "sesame"]);
    let body = chat_body("Hi", 2, false).to_string();
    let json = ("Content-Type", "application/json");
    let routes = [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/messages"),
    ];
    for (method, path) in routes {
        for headers in [vec![json], vec![json, ("Authorization", "Bearer wrong")]] {
            let r = request(&server.addr, method, path, &headers, body.as_bytes());
            assert_error_object(&r, path, 401);
        }
    }
    let ok = |headers: &[(&str, &str)], path: &str, body: &Value| {
        let r = request(
            &server.addr,
            "POST",
            path,
            headers,
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    };
    ok(
        &[json, ("Authorization", "Bearer sesame")],
        "/v1/chat/completions",
        &chat_body("Hi", 2, false),
    );
    let msg = json!({"model": SERVE_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]});
    ok(&[json, ("x-api-key", "sesame")], "/v1/messages", &msg);
    // The page and the health check stay open.
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    // One request may wait while one runs; replies crawl at 50 ms a token,
    // so the running one (300 tokens) outlasts the checks below however
    // slow the machine, and is hung up on only once they are done.
    let server = Server::start(&["--queue", "1", "--parallel", "1", "--token-delay-ms", "50"]);
    let running = post_open(
        &server.addr,
        "/v1/chat/completions",
        &chat_body(LONG_PROMPTS[0], 300, true),
    );
    wait_for(&server, |h| h["queue"]["in_flight"] == 1);
    std::thread::scope(|s| {
        let waiting = s.spawn(|| server.post("/v1/chat/completions", &chat_body("Hi", 2, false)));
        wait_for(&server, |h| h["queue"]["waiting"] == 1);
        let r = server.post("/v1/chat/completions", &chat_body("Hi", 2, false));
        assert_error_object(&r, "/v1/chat/completions", 429);
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
        // The running one hangs up (unread data: a reset); the waiting one
        // is served.
        drop(running);
        assert_eq!(waiting.join().unwrap().status, 200);
    });
    let h = server.idle_health();
    assert_eq!(h["generations"]["rejected"], 1);
    assert_eq!(h["generations"]["cancelled"], 1);
    assert_eq!(h["generations"]["completed"], 1);
}

#[test]
fn a_client_that_hangs_up_on_a_whole_reply_cancels_it() {
    let server = Server::start(&["--token-delay-ms", "50"]);
    let conn = post_open(
        &server.addr,
        "/v1/chat/completions",
        &chat_body(LONG_PROMPTS[1], 300, false),
    );
    // Hang up once the reply is under way.
    wait_for(&server, |h| h["tokens"]["generated"].as_u64() > Some(0));
    drop(conn);
    let h = server.idle_health();
    assert_eq!(h["generations"]["cancelled"], 1, "{h}");
    assert_eq!(h["generations"]["completed"], 0, "{h}");
    assert!(h["tokens"]["generated"].as_u64() < Some(300), "{h}");
}

fn wait_for(server: &Server, ok: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let h = server.health();
        if ok(&h) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "gave up waiting: {h}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn load_with_disconnects_and_garbage() {
    const GOOD: usize = 35;
    const HANG_UPS: usize = 15;
    const MAX: usize = 24;
    let mut want = HashMap::new();
    for prompt in PROMPTS {
        for raw in [false, true] {
            let (text, stop) = run_text(prompt, raw, MAX);
            let text = if raw {
                text
            } else {
                text.trim_start().to_string()
            };
            want.insert((prompt, raw), (text, finish_reason(&stop).to_string()));
        }
    }
    // The hung-up replies must not end on their own first.
    let model = fixture(SERVE_MODEL);
    for prompt in LONG_PROMPTS {
        let args = ["run", "--model", path_str(&model), "--prompt", prompt];
        let out: Value = serde_json::from_str(&smoe_ok(
            &[&args[..], &["--max-tokens", "300", "--json"]].concat(),
        ))
        .unwrap();
        assert_eq!(
            out["stop_reason"], "length",
            "pick another long prompt than {prompt:?}"
        );
    }
    // A few milliseconds a step keeps the hung-up replies streaming long
    // enough to be cut off, on any machine. Four at a time decode as one
    // batch, joining and leaving (some cut off) between steps; each good
    // reply must still be what it is alone.
    let server = Server::start(&["--token-delay-ms", "2", "--parallel", "4"]);
    let bad = bad_requests();
    let start = Barrier::new(GOOD + HANG_UPS + bad.len());
    std::thread::scope(|s| {
        let good: Vec<_> = (0..GOOD)
            .map(|i| {
                let (server, start, want) = (&server, &start, &want);
                s.spawn(move || {
                    let prompt = PROMPTS[i % PROMPTS.len()];
                    let raw = i % 3 == 0;
                    let stream = i % 2 == 0;
                    let (route, body) = if raw {
                        let b = json!({"prompt": prompt, "max_tokens": MAX, "temperature": 0, "stream": stream});
                        ("/v1/completions", b)
                    } else {
                        ("/v1/chat/completions", chat_body(prompt, MAX, stream))
                    };
                    start.wait();
                    let r = server.post(route, &body);
                    let got = reply_text(&r, route, stream);
                    assert_eq!(&got, &want[&(prompt, raw)], "request {i}: {prompt:?} via {route}");
                })
            })
            .collect();
        let hang_ups: Vec<_> = (0..HANG_UPS)
            .map(|i| {
                let (server, start) = (&server, &start);
                s.spawn(move || {
                    let body = chat_body(LONG_PROMPTS[i % LONG_PROMPTS.len()], 300, true);
                    start.wait();
                    post_and_hang_up(&server.addr, "/v1/chat/completions", &body, &FIRST_TOKEN)
                })
            })
            .collect();
        let bad: Vec<_> = bad
            .into_iter()
            .map(|(method, path, body, status)| {
                let (server, start) = (&server, &start);
                s.spawn(move || {
                    start.wait();
                    let r = request(&server.addr, method, path, &[], &body);
                    assert_error_object(&r, path, status);
                })
            })
            .collect();
        for h in good.into_iter().chain(bad) {
            h.join().unwrap();
        }
        for h in hang_ups {
            assert!(h.join().unwrap(), "a stream ended before its first token");
        }
    });
    // Every hung-up generation was cut short, and nothing runs on.
    let h = server.idle_health();
    assert_eq!(h["generations"]["cancelled"], HANG_UPS as u64, "{h}");
    assert_eq!(h["generations"]["completed"], GOOD as u64, "{h}");
    assert_eq!(h["generations"]["failed"], 0, "{h}");
    assert_eq!(h["generations"]["rejected"], 0, "{h}");
    let generated = h["tokens"]["generated"].as_u64().unwrap();
    assert!(
        generated < (GOOD * MAX + HANG_UPS * 300) as u64,
        "the hung-up replies ran to the end: {h}"
    );
}
