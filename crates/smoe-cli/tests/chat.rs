//! `smoe chat`: piped (clean text, exact prefix reuse, commands, the
//! context limit) and through a pseudo-terminal (status line, Ctrl-C,
//! /stats, /reset, Ctrl-D), on the built-in model, whose replies are text:
//! the tests check the replies it was trained to give, and compute what
//! the counters must be from `smoe template` and `smoe run`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::{json, Value};

const SYSTEM: &str = "You are terse.";
const MAX_TOKENS: usize = 12;

fn chat_command(model: &Path, state: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smoe"));
    cmd.args(["chat", "--model", path_str(model), "--system", SYSTEM])
        .args(["--max-tokens", &MAX_TOKENS.to_string()])
        .args(extra)
        .env("XDG_STATE_HOME", state);
    cmd
}

fn chat_piped(model: &Path, extra: &[&str], input: &str) -> Output {
    let state = tempfile::tempdir().unwrap();
    run_piped(&mut chat_command(model, state.path(), extra), input)
}

/// (prefilled, reused) of every end-of-turn line in `text`.
fn turns(text: &str) -> Vec<(usize, usize)> {
    text.match_indices("[prefill ")
        .map(|(i, _)| {
            let rest = &text[i + "[prefill ".len()..];
            let num = |s: &str| -> usize {
                s.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap()
            };
            let reused = rest.find("(reused ").unwrap() + "(reused ".len();
            (num(rest), num(&rest[reused..]))
        })
        .collect()
}

/// Greedy continuation of `ids`, as a fresh `smoe run` gives it.
fn run(model: &Path, ids: &[u32]) -> Value {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let out = smoe_ok(&[
        "run",
        "--model",
        path_str(model),
        "--ids",
        &ids.join(","),
        "--max-tokens",
        &MAX_TOKENS.to_string(),
        "--json",
    ]);
    serde_json::from_str(out.trim()).unwrap()
}

/// What turn 2 must prefill, given the conversation chat saved: the KV
/// cache after turn 1 holds its prompt and all but the last generated
/// token (that one was sampled, never fed back); turn 2 reuses the
/// longest prefix its own prompt shares with that. Returns (prefill,
/// reused, length of turn 1's prompt).
fn expected_turn2(model: &Path, saved: &[Value]) -> (usize, usize, usize) {
    let prompt1 = template_ids(model, &saved[..2]);
    let generated: Vec<u32> =
        serde_json::from_value(run(model, &prompt1)["tokens"].clone()).unwrap();
    let mut cached = prompt1.clone();
    cached.extend_from_slice(&generated[..generated.len() - 1]);
    let prompt2 = template_ids(model, &saved[..4]);
    let reused = cached
        .iter()
        .zip(&prompt2)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt2.len() - 1);
    (prompt2.len() - reused, reused, prompt1.len())
}

/// rexpect hands out the terminal's bytes one char each: `▸` comes as
/// three. These convert a needle to that form and a capture back.
fn raw(text: &str) -> String {
    text.bytes().map(char::from).collect()
}

fn utf8(captured: &str) -> String {
    let bytes: Vec<u8> = captured.chars().map(|c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What the terminal shows of `captured` in the scrolling region: the
/// status line, drawn between tokens inside a cursor save (`ESC 7`) and
/// restore (`ESC 8`), taken out.
fn visible(captured: &str) -> String {
    let mut text = utf8(captured);
    while let Some(start) = text.find("\x1b7") {
        let end = text[start..]
            .find("\x1b8")
            .map_or(text.len(), |e| start + e + 2);
        text.replace_range(start..end, "");
    }
    text
}

fn read_messages(path: &Path) -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn roles(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect()
}

#[test]
fn piped_chat_reuses_the_conversation_and_prints_clean_text() {
    let model = builtin_model();
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("c.json");
    let input = format!(
        "Say hello.\nAnd\\\nagain?\n/stats\n/save {}\n",
        saved.display()
    );
    let out = chat_piped(&model, &[], &input);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "{stdout:?}"
    );
    assert!(!stdout.contains("tok/s │"), "no status line off a terminal");
    assert!(
        stderr.contains("smoe chat · ") && stderr.contains("memory"),
        "{stderr}"
    );

    let messages = read_messages(&saved);
    assert_eq!(
        roles(&messages),
        ["system", "user", "assistant", "user", "assistant"]
    );
    assert_eq!(messages[2]["content"], "Hello, world!");
    assert!(stdout.starts_with("Hello, world!\n"), "{stdout}");
    // The trailing backslash joined two lines into one message.
    assert_eq!(messages[3]["content"], "And\nagain?");

    let t = turns(&stderr);
    assert_eq!(t.len(), 2, "{stderr}");
    assert_eq!(t[0].1, 0, "nothing to reuse on the first turn");
    let (prefill, reused, prompt1) = expected_turn2(&model, &messages);
    assert_eq!(t[1], (prefill, reused), "{stderr}");
    assert!(
        reused >= prompt1,
        "turn 2 reused {reused} tokens, less than turn 1's whole prompt ({prompt1})"
    );
    // Prefilling only the rest gives the reply a fresh prefill of the whole
    // conversation gives.
    let fresh = run(&model, &template_ids(&model, &messages[..4]));
    assert_eq!(messages[4]["content"], fresh["text"]);

    assert!(stdout.contains("the KV cache holds"), "{stdout}");
    assert!(stdout.contains(&format!("prefill {} tok (reused {})", t[1].0, t[1].1)));
    assert!(stdout.contains("saved 5 messages"), "{stdout}");
}

#[test]
fn commands_load_and_the_context_limit() {
    let model = builtin_model();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"role": "user"}]"#).unwrap();
    let good = dir.path().join("good.json");
    let conversation = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."}
    ]);
    std::fs::write(&good, conversation.to_string()).unwrap();
    let saved = dir.path().join("saved.json");
    let input = format!(
        "/load {}\n/load /nonexistent/c.json\n/frobnicate\n/load {}\nGo on.\n/save {}\n/help\n/quit\nnever sent\n",
        bad.display(),
        good.display(),
        saved.display()
    );
    let out = chat_piped(&model, &[], &input);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    for expected in [
        "error: ",
        "bad.json: message 0 has no string \"content\"",
        "/nonexistent/c.json",
        "unknown command /frobnicate",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    assert!(stdout.contains("loaded 3 messages"), "{stdout}");
    assert!(stdout.contains("/reset"), "help: {stdout}");
    let messages = read_messages(&saved);
    assert_eq!(messages[..3], conversation.as_array().unwrap()[..]);
    assert_eq!(
        roles(&messages),
        ["system", "user", "assistant", "user", "assistant"]
    );
    assert_eq!(turns(&stderr).len(), 1, "/quit left before the last line");

    // A context that cannot take the next message says so and keeps the
    // conversation as it was.
    let input = format!(
        "Say hello.\nAnd again, at length?\n/save {}\n",
        saved.display()
    );
    let out = chat_piped(&model, &["--ctx", "48"], &input);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(turns(&stderr).len(), 1, "{stderr}");
    assert!(
        stderr.contains("would pass the context of 48 tokens (--ctx)") && stderr.contains("/reset"),
        "{stderr}"
    );
    assert_eq!(
        roles(&read_messages(&saved)),
        ["system", "user", "assistant"]
    );
}

/// The acceptance session, through a pseudo-terminal as a person has it.
#[test]
fn terminal_session() {
    let model = builtin_model();
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("c.json");
    // stty gives the pseudo-terminal a size, as a terminal window has; the
    // token delay keeps a reply streaming until the Ctrl-C lands.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("stty rows 30 cols 200 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_smoe"))
        .args(chat_command(&model, dir.path(), &["--token-delay-ms", "250"]).get_args())
        .env("XDG_STATE_HOME", dir.path());
    let mut p = rexpect::session::spawn_command(cmd, Some(30_000)).unwrap();
    // Sends `line` and returns what the reply showed and its (prefilled,
    // reused).
    let turn = |p: &mut rexpect::session::PtySession, line: &str| -> (String, (usize, usize)) {
        p.send_line(line).unwrap();
        let (shown, counts) = p.exp_regex(r"\[prefill \d+ tok \(reused \d+\)").unwrap();
        p.exp_string("> ").unwrap();
        (visible(&shown), turns(&counts)[0])
    };

    p.exp_string("Ctrl-D leaves").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("Say hello.").unwrap();
    let (shown, _) = p.exp_regex(r"\[prefill").unwrap();
    let status = utf8(&shown);
    // The status line was drawn, at the bottom row of the terminal, and
    // the reply streamed above it.
    assert!(
        status.contains("smoe ▸ ") && status.contains("tok/s │ RAM "),
        "{status:?}"
    );
    assert!(status.contains("\x1b[30;1H"), "{status:?}");
    assert!(visible(&shown).contains("Hello, world!"), "{status:?}");
    let (_, line) = p.exp_regex(r" tok \(reused \d+\)").unwrap();
    p.exp_string("> ").unwrap();
    assert_eq!(line, " tok (reused 0)");

    let (shown, second) = turn(&mut p, "What is 2 + 3?");
    assert!(shown.contains("2 + 3 = 5."), "{shown:?}");

    p.send_line("/stats").unwrap();
    p.exp_string("the KV cache holds").unwrap();
    p.exp_string("all turns").unwrap();
    p.exp_string("> ").unwrap();

    // Ctrl-C while the reply streams: it stops, and the chat goes on.
    p.send_line("Count from 1 to 9.").unwrap();
    p.exp_string(&raw("smoe ▸ ")).unwrap();
    p.send_control('c').unwrap();
    p.exp_string("stop: cancelled]").unwrap();
    p.exp_string("> ").unwrap();
    // Ctrl-C at the prompt does not leave.
    p.send_control('c').unwrap();
    p.exp_string("Ctrl-D or /quit leaves").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line(&format!("/save {}", saved.display())).unwrap();
    p.exp_string("saved 7 messages").unwrap();
    p.exp_string("> ").unwrap();

    p.send_line("/reset").unwrap();
    p.exp_string("conversation cleared").unwrap();
    p.exp_string("> ").unwrap();
    let (shown, after_reset) = turn(&mut p, "Hi.");
    assert_eq!(after_reset.1, 0, "/reset emptied the cache");
    assert!(
        shown.contains("Hello! How can I help you today?"),
        "{shown:?}"
    );

    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    match p.process().wait().unwrap() {
        rexpect::process::WaitStatus::Exited(_, 0) => {}
        other => panic!("chat ended with {other:?}"),
    }

    let messages = read_messages(&saved);
    assert_eq!(
        roles(&messages),
        [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant"
        ]
    );
    assert_eq!(messages[2]["content"], "Hello, world!");
    assert_eq!(messages[4]["content"], "2 + 3 = 5.");
    // The stopped reply stayed in the conversation, as far as it got: the
    // start of the count the whole reply gives.
    let whole = run(&model, &template_ids(&model, &messages[..6]))["text"]
        .as_str()
        .unwrap()
        .to_string();
    let stopped = messages[6]["content"].as_str().unwrap();
    assert!(
        whole.starts_with("1, 2, 3") && whole.starts_with(stopped) && stopped.len() < whole.len(),
        "stopped at {stopped:?}, the whole reply is {whole:?}"
    );
    // Turn 2 prefilled only its new tokens.
    let (prefill, reused, prompt1) = expected_turn2(&model, &messages);
    assert_eq!(second, (prefill, reused));
    assert!(reused >= prompt1, "turn 2 prefilled turn 1's prompt again");
    let history = std::fs::read_to_string(dir.path().join("smoe/history")).unwrap();
    assert!(
        history.contains("What is 2 + 3?") && history.contains("/stats"),
        "{history}"
    );
}
