//! The internal API's JSON bodies: register, unregister, publish. A publish payload that parses
//! is exactly a slice of the body (raw text, never re-serialized).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wavelog_worker::routes::internal::{parse_publish, parse_register, parse_unregister};

fuzz_target!(|data: &[u8]| {
    let _ = parse_register(data);
    let _ = parse_unregister(data);
    if let Ok((topic, payload)) = parse_publish(data) {
        assert!(!topic.is_empty());
        let text = std::str::from_utf8(data).expect("JSON that parsed is UTF-8");
        assert!(text.contains(payload.get()), "the payload is forwarded as it arrived");
    }
});
