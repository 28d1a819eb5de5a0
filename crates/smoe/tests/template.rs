//! Chat templates must render byte for byte like HF transformers'
//! `apply_chat_template(tokenize=False)`. The expected renders in
//! fixtures/templates/cases.json come from transformers itself, through
//! tools/template_refs.py. The real-world templates in
//! fixtures/templates/corpus/ (llama.cpp's models/templates/ and the supported
//! MoE families' published templates) are checked against
//! fixtures/templates/corpus.json, made by tools/template_corpus.py; a case
//! where transformers raised passes when smoe refuses too.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};
use smoe::template::{ChatTemplate, SpecialTokens};
use smoe::Error;

/// fixtures/templates of the repository. The crate normally sits two levels
/// below the root; a build from elsewhere names the fixtures directory in
/// SMOE_FIXTURES.
fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/templates");
    if dir.is_dir() {
        return dir;
    }
    match std::env::var_os("SMOE_FIXTURES") {
        Some(root) => PathBuf::from(root).join("templates"),
        None => panic!(
            "{} does not exist; set SMOE_FIXTURES to the fixtures directory",
            dir.display()
        ),
    }
}

#[derive(Deserialize)]
struct Case {
    name: String,
    template_file: String,
    messages: Value,
    tools: Option<Value>,
    add_generation_prompt: bool,
    extra: Map<String, Value>,
    special_tokens: Map<String, Value>,
    expected: Option<String>,
    error: Option<String>,
    strftime: Option<Strftime>,
}

/// A date that the template printed through `strftime_now` when the
/// reference was made, and which today's date replaces.
#[derive(Deserialize)]
struct Strftime {
    format: String,
    rendered: String,
}

fn special_tokens(map: &Map<String, Value>) -> SpecialTokens {
    let token = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
    SpecialTokens {
        bos: token("bos_token"),
        eos: token("eos_token"),
        unk: token("unk_token"),
        pad: token("pad_token"),
    }
}

/// Points at the first differing line, with some context, escaping
/// whitespace so that a missing newline is visible.
fn diff(expected: &str, actual: &str) -> String {
    let want: Vec<&str> = expected.split_inclusive('\n').collect();
    let got: Vec<&str> = actual.split_inclusive('\n').collect();
    let first = want
        .iter()
        .zip(&got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let column = match (want.get(first), got.get(first)) {
        (Some(a), Some(b)) => a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count(),
        _ => 0,
    };
    let mut out = format!(
        "expected {} bytes, got {}; first difference at line {}, column {}\n",
        expected.len(),
        actual.len(),
        first + 1,
        column + 1
    );
    for line in &want[first.saturating_sub(3)..first] {
        out += &format!("    {line:?}\n");
    }
    for line in want.iter().skip(first).take(3) {
        out += &format!("  - {line:?}\n");
    }
    for line in got.iter().skip(first).take(3) {
        out += &format!("  + {line:?}\n");
    }
    out
}

#[test]
fn renders_match_transformers() {
    let dir = fixtures();
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("read cases.json");
    let cases: Vec<Case> = serde_json::from_str(&text).expect("parse cases.json");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in &cases {
        let source = std::fs::read_to_string(dir.join(&case.template_file))
            .unwrap_or_else(|e| panic!("{}: {e}", case.template_file));
        // The clock is the one the expected date is computed from below, even
        // where SOURCE_DATE_EPOCH is set (as in reproducible-build setups).
        let template = ChatTemplate::new(&source, special_tokens(&case.special_tokens))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name))
            .with_now(chrono::Local::now().naive_local());
        let result = template.render(
            &case.messages,
            case.tools.as_ref(),
            case.add_generation_prompt,
            &case.extra,
        );
        match (&case.expected, &case.error, result) {
            (Some(expected), None, Ok(actual)) => {
                let expected = match &case.strftime {
                    Some(date) => {
                        let today = chrono::Local::now().format(&date.format).to_string();
                        expected.replace(&date.rendered, &today)
                    }
                    None => expected.clone(),
                };
                if actual != expected {
                    failures.push(format!("{}: {}", case.name, diff(&expected, &actual)));
                }
            }
            (None, Some(message), Err(Error::Template(actual))) if actual.contains(message) => {}
            (_, _, result) => failures.push(format!(
                "{}: expected {:?}, got {result:?}",
                case.name,
                case.expected.as_ref().ok_or(&case.error)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A scratch checkpoint directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("smoe-template-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> &Self {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(path, text).expect("write file");
        self
    }

    fn write_json(&self, name: &str, value: &Value) -> &Self {
        self.write(name, &value.to_string())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hello() -> Value {
    json!([{"role": "user", "content": "Hi"}])
}

fn render(template: &ChatTemplate, messages: &Value, tools: Option<&Value>) -> String {
    template
        .render(messages, tools, true, &Map::new())
        .expect("render")
}

#[test]
fn from_dir_reads_string_template_and_added_tokens() {
    let dir = TempDir::new("string");
    dir.write_json(
        "tokenizer_config.json",
        &json!({
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{{ unk_token is defined }}",
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
            "eos_token": "</s>",
            "unk_token": null,
        }),
    );
    let template = ChatTemplate::from_dir(&dir.0).expect("from_dir");
    assert_eq!(render(&template, &hello(), None), "<s>[user]Hi</s>False");
    let special = template.special_tokens();
    assert_eq!(special.bos.as_deref(), Some("<s>"));
    assert_eq!(special.eos.as_deref(), Some("</s>"));
    assert_eq!(special.unk, None);
    assert_eq!(special.pad, None);
    assert!(template.source().starts_with("{{ bos_token }}"));
}

#[test]
fn from_dir_picks_named_templates_like_transformers() {
    let dir = TempDir::new("named");
    dir.write_json(
        "tokenizer_config.json",
        &json!({
            "chat_template": [
                {"name": "rag", "template": "rag"},
                {"name": "default", "template": "default {{ messages | length }}"},
                {"name": "tool_use", "template": "tool_use {{ tools | length }}"},
            ],
        }),
    );
    let template = ChatTemplate::from_dir(&dir.0).expect("from_dir");
    assert_eq!(template.source(), "default {{ messages | length }}");
    assert_eq!(render(&template, &hello(), None), "default 1");
    // transformers switches to the tool_use template when tools are passed.
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    assert_eq!(render(&template, &hello(), Some(&tools)), "tool_use 1");
}

#[test]
fn from_dir_without_default_among_named_templates_fails() {
    let dir = TempDir::new("nodefault");
    dir.write_json(
        "tokenizer_config.json",
        &json!({"chat_template": [{"name": "rag", "template": "x"}]}),
    );
    let err = ChatTemplate::from_dir(&dir.0).expect_err("no default");
    assert!(err.to_string().contains("\"default\""), "{err}");
}

#[test]
fn from_dir_falls_back_to_chat_template_jinja() {
    let dir = TempDir::new("jinja");
    dir.write_json("tokenizer_config.json", &json!({"eos_token": "<end>"}));
    dir.write(
        "chat_template.jinja",
        "{{ messages[0].content }}{{ eos_token }}\n",
    );
    let template = ChatTemplate::from_dir(&dir.0).expect("from_dir");
    assert_eq!(render(&template, &hello(), None), "Hi<end>");

    // Without any tokenizer_config.json the template still loads.
    let bare = TempDir::new("jinja-bare");
    bare.write("chat_template.jinja", "{{ messages[0].role }}");
    let template = ChatTemplate::from_dir(&bare.0).expect("from_dir");
    assert_eq!(render(&template, &hello(), None), "user");
    assert!(template.special_tokens().eos.is_none());
}

#[test]
fn chat_template_jinja_wins_over_config_like_transformers() {
    let dir = TempDir::new("both");
    dir.write_json("tokenizer_config.json", &json!({"chat_template": "config"}));
    dir.write("chat_template.jinja", "file");
    dir.write("additional_chat_templates/tool_use.jinja", "file tool_use");
    let template = ChatTemplate::from_dir(&dir.0).expect("from_dir");
    assert_eq!(render(&template, &hello(), None), "file");
    assert_eq!(
        render(&template, &hello(), Some(&json!([]))),
        "file tool_use"
    );
}

#[test]
fn from_dir_without_template_names_the_dir() {
    let dir = TempDir::new("missing");
    dir.write_json("tokenizer_config.json", &json!({"eos_token": "</s>"}));
    let err = ChatTemplate::from_dir(&dir.0).expect_err("no template");
    let msg = err.to_string();
    assert!(msg.contains(&dir.0.display().to_string()), "{msg}");
    assert!(msg.contains("no chat template"), "{msg}");

    let empty = TempDir::new("empty");
    let err = ChatTemplate::from_dir(&empty.0).expect_err("no template");
    assert!(
        err.to_string().contains(&empty.0.display().to_string()),
        "{err}"
    );
}

#[test]
fn special_tokens_from_dir() {
    let dir = TempDir::new("special");
    dir.write_json(
        "tokenizer_config.json",
        &json!({
            "bos_token": {"content": "<|begin|>", "__type": "AddedToken"},
            "eos_token": "<|end|>",
            "pad_token": {"content": "<|pad|>", "special": true},
        }),
    );
    let special = SpecialTokens::from_dir(&dir.0).expect("special tokens");
    assert_eq!(special.bos.as_deref(), Some("<|begin|>"));
    assert_eq!(special.eos.as_deref(), Some("<|end|>"));
    assert_eq!(special.unk, None);
    assert_eq!(special.pad.as_deref(), Some("<|pad|>"));

    let missing = TempDir::new("special-missing");
    let special = SpecialTokens::from_dir(&missing.0).expect("no config");
    assert!(special.bos.is_none() && special.eos.is_none());

    // transformers lets a legacy special_tokens_map.json override the config,
    // unless the config lists its added tokens.
    let legacy = TempDir::new("special-legacy");
    legacy
        .write_json(
            "tokenizer_config.json",
            &json!({"bos_token": "<s>", "eos_token": "</s>"}),
        )
        .write_json(
            "special_tokens_map.json",
            &json!({"eos_token": {"content": "<|eot|>"}, "unk_token": "<unk>"}),
        );
    let special = SpecialTokens::from_dir(&legacy.0).expect("legacy map");
    assert_eq!(special.bos.as_deref(), Some("<s>"));
    assert_eq!(special.eos.as_deref(), Some("<|eot|>"));
    assert_eq!(special.unk.as_deref(), Some("<unk>"));
    legacy.write_json(
        "tokenizer_config.json",
        &json!({"bos_token": "<s>", "eos_token": "</s>", "added_tokens_decoder": {}}),
    );
    let special = SpecialTokens::from_dir(&legacy.0).expect("modern config");
    assert_eq!(special.eos.as_deref(), Some("</s>"));
    assert_eq!(special.unk, None);

    let bad = TempDir::new("special-bad");
    bad.write_json("tokenizer_config.json", &json!({"eos_token": 7}));
    let err = SpecialTokens::from_dir(&bad.0).expect_err("bad token");
    assert!(err.to_string().contains("eos_token"), "{err}");
}

#[test]
fn malformed_messages_are_invalid() {
    let template = ChatTemplate::new("{{ messages }}", SpecialTokens::default()).expect("compile");
    let cases = [
        (json!({"role": "user"}), "expected an array"),
        (json!([]), "empty"),
        (
            json!([{"role": "user", "content": "a"}, "text"]),
            "messages[1]: expected an object",
        ),
        (
            json!([{"role": "user"}, {"role": "assistant"}, {"content": "x"}]),
            "messages[2]: missing \"role\"",
        ),
        (json!([{"role": null}]), "messages[0]: missing \"role\""),
        (
            json!([{"role": 3}]),
            "messages[0]: \"role\" must be a string",
        ),
    ];
    for (messages, want) in cases {
        match template.render(&messages, None, false, &Map::new()) {
            Err(Error::Invalid(msg)) => assert!(msg.contains(want), "{msg:?} lacks {want:?}"),
            other => panic!("{messages}: expected Error::Invalid, got {other:?}"),
        }
    }
}

#[test]
fn malformed_tools_and_extras_are_invalid() {
    let template = ChatTemplate::new("x", SpecialTokens::default()).expect("compile");
    let invalid = |tools: Option<&Value>, extra: &Map<String, Value>| {
        matches!(
            template.render(&hello(), tools, false, extra),
            Err(Error::Invalid(_))
        )
    };
    assert!(invalid(Some(&json!({"name": "f"})), &Map::new()));
    assert!(invalid(Some(&json!([{"name": "f"}, "g"])), &Map::new()));
    let mut extra = Map::new();
    extra.insert("messages".into(), json!([]));
    assert!(invalid(None, &extra));
}

#[test]
fn template_errors_are_reported() {
    match ChatTemplate::new("{% for m in messages %}", SpecialTokens::default()) {
        Err(Error::Template(msg)) => assert!(!msg.is_empty()),
        other => panic!("expected a compile error, got {other:?}"),
    }
    let template = ChatTemplate::new(
        "{% if messages | length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}ok",
        SpecialTokens::default(),
    )
    .expect("compile");
    assert_eq!(render(&template, &hello(), None), "ok");
    let two = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    match template.render(&two, None, false, &Map::new()) {
        Err(Error::Template(msg)) => assert_eq!(msg, "only one message, please"),
        other => panic!("expected the raised message, got {other:?}"),
    }
    let template = ChatTemplate::new("{{ messages[0].nope.deeper }}", SpecialTokens::default())
        .expect("compile");
    assert!(matches!(
        template.render(&hello(), None, false, &Map::new()),
        Err(Error::Template(_))
    ));
}

/// Cases that still differ from transformers, with the reason; the README's
/// chat-template section lists the same. A listed case that starts to match
/// fails the test, so the list cannot go stale.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[
    ("GigaChat3-10B-A1.8B/hello+tools+gen", FLOAT_CONCAT),
    ("GigaChat3-10B-A1.8B/tool_calls+tools+gen", FLOAT_CONCAT),
    ("GigaChat3-10B-A1.8B/tool_calls_content+tools", FLOAT_CONCAT),
    ("GigaChat3-10B-A1.8B/tool_single+tools+gen", FLOAT_CONCAT),
    ("GigaChat3.1-10B-A1.8B/hello+tools+gen", FLOAT_CONCAT),
    ("GigaChat3.1-10B-A1.8B/tool_calls+tools+gen", FLOAT_CONCAT),
    (
        "GigaChat3.1-10B-A1.8B/tool_calls_content+tools",
        FLOAT_CONCAT,
    ),
    ("GigaChat3.1-10B-A1.8B/tool_single+tools+gen", FLOAT_CONCAT),
    (
        "meetkai-functionary-medium-v3.2/hello+tools+gen",
        FLOAT_CONCAT,
    ),
];

/// minijinja's `~` operator formats floats itself, positionally, where
/// Python's `str()` switches to exponent form below 1e-4 (the tools' schema
/// default 1e-05 prints as 0.00001); the operator cannot be overridden.
const FLOAT_CONCAT: &str = "`~` prints a float below 1e-4 positionally, Python as 1e-05";

#[derive(Deserialize)]
struct Corpus {
    source_date_epoch: i64,
    special_tokens: Map<String, Value>,
    tools: Value,
    conversations: Map<String, Value>,
    cases: Vec<CorpusCase>,
}

#[derive(Deserialize)]
struct CorpusCase {
    name: String,
    template_file: String,
    conversation: String,
    tools: bool,
    add_generation_prompt: bool,
    extra: Map<String, Value>,
    expected: Option<String>,
    error: Option<String>,
}

/// How smoe's outcome for one case differs from transformers', if it does.
fn compare(corpus: &Corpus, dir: &Path, case: &CorpusCase) -> Option<String> {
    let token = |key: &str| {
        corpus
            .special_tokens
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let special = SpecialTokens {
        bos: token("bos_token"),
        eos: token("eos_token"),
        unk: token("unk_token"),
        pad: token("pad_token"),
    };
    let source = std::fs::read_to_string(dir.join("corpus").join(&case.template_file))
        .unwrap_or_else(|e| panic!("{}: {e}", case.template_file));
    let now = chrono::DateTime::from_timestamp(corpus.source_date_epoch, 0)
        .expect("source_date_epoch")
        .naive_utc();
    let result = ChatTemplate::new(&source, special).and_then(|template| {
        template.with_now(now).render(
            &corpus.conversations[&case.conversation],
            case.tools.then_some(&corpus.tools),
            case.add_generation_prompt,
            &case.extra,
        )
    });
    match (&case.expected, result) {
        (Some(expected), Ok(actual)) if *expected == actual => None,
        (Some(expected), Ok(actual)) => Some(first_difference(expected, &actual)),
        (Some(_), Err(err)) => Some(format!("smoe refused: {err}")),
        (None, Err(_)) => None,
        (None, Ok(_)) => Some(format!(
            "smoe rendered where transformers raised {:?}",
            case.error.as_deref().unwrap_or_default()
        )),
    }
}

fn first_difference(expected: &str, actual: &str) -> String {
    let at = expected
        .char_indices()
        .zip(actual.chars())
        .find(|((_, a), b)| a != b)
        .map_or(expected.len().min(actual.len()), |((i, _), _)| i);
    let at = (0..=at)
        .rev()
        .find(|i| expected.is_char_boundary(*i) && actual.is_char_boundary(*i))
        .unwrap_or(0);
    let context = |s: &str| s[at..].chars().take(60).collect::<String>();
    format!(
        "{} vs {} bytes, first difference at byte {at}: expected {:?}, got {:?}",
        expected.len(),
        actual.len(),
        context(expected),
        context(actual)
    )
}

#[test]
fn real_templates_render_like_transformers() {
    let dir = fixtures();
    let text = std::fs::read_to_string(dir.join("corpus.json")).expect("read corpus.json");
    let corpus: Corpus = serde_json::from_str(&text).expect("parse corpus.json");
    assert!(corpus.cases.len() > 500, "the corpus is incomplete");
    // The templates new users tripped over (issue 18) must stay covered.
    for file in [
        "Qwen3-Coder.jinja",
        "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja",
        "meetkai-functionary-medium-v3.1.jinja",
    ] {
        assert!(
            corpus.cases.iter().any(|c| c.template_file == file),
            "{file} is missing from the corpus"
        );
    }
    let mut unexpected = Vec::new();
    let mut fixed = Vec::new();
    let mut identical = 0;
    for case in &corpus.cases {
        let known = KNOWN_DIFFERENCES
            .iter()
            .find(|(name, _)| *name == case.name);
        match (compare(&corpus, &dir, case), known) {
            (None, None) => identical += 1,
            (None, Some(_)) => fixed.push(case.name.as_str()),
            (Some(_), Some(_)) => {}
            (Some(diff), None) => unexpected.push(format!("{}: {diff}", case.name)),
        }
    }
    let total = corpus.cases.len();
    eprintln!("{identical}/{total} corpus cases identical to transformers");
    assert!(
        unexpected.is_empty() && fixed.is_empty(),
        "{} of {total} cases differ from transformers:\n{}\nlisted in KNOWN_DIFFERENCES but now identical: {fixed:?}",
        unexpected.len(),
        unexpected.join("\n")
    );
    assert!(
        identical * 100 >= total * 99,
        "{identical}/{total} is under 99%"
    );
}

/// Renders `source` on a thread and gives up after a minute, so that a
/// template the bounds fail to stop fails the test instead of hanging it.
fn render_bounded(source: &str) -> Result<String, Error> {
    let template = ChatTemplate::new(source, SpecialTokens::default())
        .expect("compile")
        .named("endless.jinja");
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(template.render(&hello(), None, true, &Map::new()));
    });
    receive
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("rendering {source:?} did not stop within a minute"))
}

#[test]
fn runaway_templates_stop_with_an_error_naming_the_bound() {
    // (template, what the error must say)
    let cases = [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "steps",
        ),
        ("{{ 'x' * 10000000000 }}", "steps"),
        ("{{ [1, 2] * 10000000000 }}", "too large"),
        ("{{ 'x' | indent(10000000000) }}", "steps"),
        (
            "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
            "bytes",
        ),
        ("{{ '{:>10000000000}'.format('x') }}", "field width"),
        ("{{ range(10000000000) | length }}", "too many"),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion limit",
        ),
    ];
    for (source, bound) in cases {
        match render_bounded(source) {
            Err(Error::Template(msg)) => {
                assert!(msg.contains(bound), "{source}: {msg:?} lacks {bound:?}");
                if bound == "steps" || bound == "bytes" {
                    assert!(msg.contains("endless.jinja"), "{source}: {msg:?}");
                }
            }
            other => panic!("{source}: expected a template error, got {other:?}"),
        }
    }
    // Ordinary work well past any real conversation stays within the bounds.
    let busy = "{% for i in range(1000) %}{% for m in messages %}{{ m.content | upper }}{% endfor %}{% endfor %}";
    assert_eq!(render_bounded(busy).expect("render").len(), 2000);
}

#[test]
fn with_now_pins_strftime_now() {
    let now = chrono::NaiveDate::from_ymd_opt(2024, 7, 26)
        .and_then(|d| d.and_hms_opt(13, 5, 0))
        .expect("valid date");
    let template = ChatTemplate::new(
        "{{ strftime_now('%d %B %Y %H:%M') }}",
        SpecialTokens::default(),
    )
    .expect("compile")
    .with_now(now);
    assert_eq!(render(&template, &hello(), None), "26 July 2024 13:05");
}

#[test]
fn none_tools_behave_like_python() {
    // (template, render without tools); each would fail or differ with
    // minijinja's own none.
    let cases = [
        ("{{ tools is none }} {{ tools is not none }} {{ tools is iterable }}", "True False False"),
        ("{{ tools }} {{ tools | tojson }} {{ tools | string }} {{ documents }}", "None null None None"),
        ("{% if tools is iterable and tools | length > 0 %}tools{% else %}none{% endif %}", "none"),
        ("{{ tools | selectattr('type', 'equalto', 'f') | list | length }}", "0"),
        ("{{ 'x' if tools else 'y' }} {{ (tools or []) | length }}", "y 0"),
        ("{{ none is iterable }} {{ undefined_name is iterable }} {{ 'ab' is sequence }} {{ {} is sequence }}", "False True True True"),
    ];
    for (source, want) in cases {
        let template = ChatTemplate::new(source, SpecialTokens::default()).expect("compile");
        assert_eq!(render(&template, &hello(), None), want, "{source}");
    }
    // Python cannot iterate None; minijinja would render nothing.
    let template = ChatTemplate::new(
        "{% for t in tools %}{{ t }}{% endfor %}",
        SpecialTokens::default(),
    )
    .expect("compile");
    assert!(matches!(
        template.render(&hello(), None, true, &Map::new()),
        Err(Error::Template(_))
    ));
}

#[test]
fn safe_string_plus_escapes_the_other_side_like_markup() {
    let template = ChatTemplate::new(
        "{{ '<a>'|safe + messages[0].content + '</a>'|safe }}|{{ '<b>' ~ messages[0].content }}",
        SpecialTokens::default(),
    )
    .expect("compile");
    let messages = json!([{"role": "user", "content": "\"x\" & <y>"}]);
    assert_eq!(
        template
            .render(&messages, None, false, &Map::new())
            .expect("render"),
        "<a>&#34;x&#34; &amp; &lt;y&gt;</a>|<b>\"x\" & <y>"
    );
}
