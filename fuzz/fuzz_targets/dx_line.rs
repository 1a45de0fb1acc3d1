//! A DX cluster line (text from strangers on the internet): parsed without a panic, and what
//! comes out of it is safe for Wavelog's HTML and links, and enriches without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wavelog_worker::dxcluster::enrich;
use wavelog_worker::dxcluster::parse::{parse_line, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let Some(spot) = parse_line(data) else {
        return;
    };
    assert!(data.len() <= MAX_LINE);
    for call in [&spot.spotter, &spot.spotted] {
        assert!(call
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"/-#".contains(&b)));
    }
    assert!(!spot
        .comment
        .chars()
        .any(|c| matches!(c, '<' | '>' | '"' | '\'' | '&') || c.is_control()));
    assert!(spot.frequency.is_finite() && spot.frequency > 0.0);
    let _ = enrich::band(spot.frequency);
    let _ = enrich::mode(&spot.comment, spot.frequency);
    let _ = enrich::activity(&spot.comment);
});
