//! Clock helpers shared by the sessions and the token check.

use std::time::Duration;

use tokio::time::Instant;

/// Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The monotonic instant at which unix time `t` (seconds) is reached.
pub fn instant_of_unix(t: i64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let wait_ms = (t.saturating_mul(1000) - now_ms).clamp(0, 86400 * 365 * 1000);
    Instant::now() + Duration::from_millis(wait_ms as u64)
}

/// A connection's offset inside a window of `width`, the same for the same `conn_id`: closes
/// spread over the drain window so browsers don't all reconnect in the same instant.
pub fn spread(conn_id: u64, width: Duration) -> Duration {
    let fraction = (conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    width.mul_f64(fraction)
}
