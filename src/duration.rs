//! Go-style durations (`"24h"`, `"1h30m"`, `"500ms"`), because the Go worker's config and
//! status answers use them and operators migrate by copying their config.

use std::time::Duration;

/// Parses a Go `time.ParseDuration` string such as `"24h"`, `"1h30m"`, `"1.5s"` or `"250ms"`.
/// A bare `"0"` is zero; negative durations are refused because no setting of ours wants one.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(format!("negative duration {s:?}"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {s:?} (use e.g. 24h, 90m, 30s)"))?;
        if num_len == 0 {
            return Err(format!("invalid duration {s:?}"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("invalid number in duration {s:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("unknown unit {other:?} in duration {s:?}")),
        };
        total += value * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("duration {s:?} is out of range"))
}

/// Formats whole seconds the way Go's `time.Duration.String()` does: `45s`, `1m0s`, `3h22m5s`.
pub fn format_go(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Formats any duration so that `parse` gives it back exactly: whole seconds as `format_go`,
/// anything finer in milliseconds or nanoseconds.
pub fn format_precise(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format_go(d)
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        for bad in ["", "h", "10", "5x", "-1s", "1..5s"] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go(Duration::from_secs(45)), "45s");
        assert_eq!(format_go(Duration::from_secs(60)), "1m0s");
        assert_eq!(
            format_go(Duration::from_secs(3 * 3600 + 22 * 60 + 5)),
            "3h22m5s"
        );
        assert_eq!(format_go(Duration::from_millis(999)), "0s");
    }
}
