//! The first bytes of a public connection (`http1::parse_first`, ahead of hyper): any input is
//! classified without a panic, and a stream request's head lies within the input and the
//! 16 KiB limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wavelog_worker::transport::http1::{parse_first, Parsed, MAX_HEAD_BYTES};

fuzz_target!(|data: &[u8]| {
    match parse_first(data) {
        Parsed::Stream(head, len) => {
            assert!(len <= data.len() && len <= MAX_HEAD_BYTES);
            assert!(data.starts_with(b"GET /ws") || data.starts_with(b"GET /sse"));
            assert!(head.headers.len() <= wavelog_worker::transport::http1::MAX_HEADERS);
        }
        Parsed::NeedMore => assert!(data.len() < MAX_HEAD_BYTES),
        Parsed::Other => {}
    }
});
