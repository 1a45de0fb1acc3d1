//! The WebSocket inbound frame parser (auth, subscribe, unsubscribe, status frames): any text
//! parses or is refused without a panic, and only JSON objects are frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wavelog_worker::protocol::Inbound;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if Inbound::parse(text).is_some() {
            assert!(text.trim_start().starts_with('{'));
        }
    }
});
