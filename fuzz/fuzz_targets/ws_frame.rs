//! The WebSocket inbound frame parser (auth, subscribe, unsubscribe, status frames).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wavelog_worker::routes::ws::Inbound;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(frame) = Inbound::parse(text) {
            let _ = (frame.kind.len(), frame.token, frame.topic, frame.last_event_id);
        }
    }
});
