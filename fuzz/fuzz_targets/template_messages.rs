//! Request messages against a real chat template (Qwen3's, with tools and
//! reasoning): the input is the JSON a client sends as `messages`, or an
//! object with `messages`, `tools` and extra variables. Templates
//! themselves are not fuzzed here (their bounds are a separate change).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use smoe::template::{ChatTemplate, SpecialTokens};

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let source = std::fs::read_to_string("fixtures/templates/qwen3.jinja").unwrap();
        ChatTemplate::new(&source, SpecialTokens::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let (messages, tools, extra) = match &v {
        Value::Object(o) => (
            o.get("messages").cloned().unwrap_or(Value::Null),
            o.get("tools").cloned(),
            o.get("extra")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        ),
        _ => (v.clone(), None, Map::new()),
    };
    let _ = template().render(&messages, tools.as_ref(), true, &extra);
});
