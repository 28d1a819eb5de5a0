//! tokenizer.json: loaded, and when it loads, a text encoded and decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smoe::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("smoe-fuzz-tok-{}.json", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(tok) = Tokenizer::from_file(&path) {
        if let Ok(ids) = tok.encode("Hello, world! 2 + 2 = 4 <|im_end|>", true) {
            let _ = tok.decode(&ids, false);
        }
        let _ = tok.encode_at_most("a b c d e f g h", false, 3);
    }
});
