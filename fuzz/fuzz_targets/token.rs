//! Token parsing and verification: never panics; whatever it accepts really is signed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wavelog_worker::token;

const SECRET: &[u8] = b"sample-secret-0123456789abcdef0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The topic is the last line, so the fuzzer controls both.
    let (tok, topic) = text.rsplit_once('\n').unwrap_or((text, "contest_session.42"));
    if let Ok(claims) = token::verify(SECRET, tok, topic, 1_750_000_000) {
        assert_eq!(claims.topic, topic);
        assert!(claims.expires > 1_750_000_000);
        // Re-signing the same claims verifies too.
        let again = token::sign(SECRET, &claims);
        assert!(token::verify(SECRET, &again, topic, 1_750_000_000).is_ok());
    }
});
