//! Request bodies of the server's generating routes (OpenAI chat
//! completions and completions, Anthropic messages): each input is tried
//! as the body of all three, through the routes' own parsing and checks,
//! and the messages that come out are rendered with a real chat template
//! (Qwen3's, with tools and reasoning), as a request would be.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use smoe::template::{ChatTemplate, SpecialTokens};

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let source = std::fs::read_to_string("fixtures/templates/qwen3.jinja").unwrap();
        ChatTemplate::new(&source, SpecialTokens::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/messages"] {
        let Ok(req) = smoe_server::parse_request(path, data) else {
            continue;
        };
        if let Some(messages) = req.get("messages") {
            let tools = req.get("tools").filter(|t| !t.is_null());
            let kwargs = req
                .get("kwargs")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let _ = template().render(messages, tools, true, &kwargs);
        }
    }
});
