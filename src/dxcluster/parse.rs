//! DX cluster lines: which ones are spots, and what a spot says. Pure and fuzzed
//! (`fuzz/fuzz_targets/dx_line.rs`): the text comes from strangers on the internet, and
//! Wavelog puts callsigns into links and the comment into HTML.

/// Longest line considered; longer ones are dropped whole.
pub const MAX_LINE: usize = 512;

/// A spot as the cluster node announced it, checked and cleaned.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSpot {
    pub spotter: String,
    pub spotted: String,
    /// kHz.
    pub frequency: f64,
    /// The comment without `<>"'&` and control characters, spaces collapsed.
    pub comment: String,
    /// `HHMM` from the node (UTC), when present.
    pub time: Option<(u8, u8)>,
    /// The spotter's grid locator, when the node appends one.
    pub locator: Option<String>,
}

/// `DX de SPOTTER: FREQ CALL COMMENT HHMMZ [LOC]`; `None` for anything else (announcements,
/// WWV/WCY, talk, prompts, malformed or over-long lines, callsigns that are not callsigns).
pub fn parse_line(line: &[u8]) -> Option<RawSpot> {
    if line.len() > MAX_LINE {
        return None;
    }
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let rest = strip_prefix_ignore_case(text, "DX de ")?;
    let (spotter, rest) = rest.split_once(':')?;
    let spotter = callsign(spotter.trim())?;
    let mut words = rest.split_whitespace();
    let frequency: f64 = words.next()?.parse().ok()?;
    if !(frequency.is_finite() && (1.0..1e9).contains(&frequency)) {
        return None;
    }
    let spotted = callsign(words.next()?)?;
    let mut tail: Vec<&str> = words.collect();
    let locator = match tail.last() {
        Some(w) if is_locator(w) && tail.len() >= 2 && is_time(tail[tail.len() - 2]) => {
            tail.pop().map(|w| w.to_ascii_uppercase())
        }
        _ => None,
    };
    let time = match tail.last() {
        Some(w) if is_time(w) => {
            let w = tail.pop().unwrap_or_default();
            let h = w[..2].parse().ok()?;
            let m = w[2..4].parse().ok()?;
            (h < 24 && m < 60).then_some((h, m))
        }
        _ => None,
    };
    Some(RawSpot {
        spotter,
        spotted,
        frequency,
        comment: clean(&tail.join(" ")),
        time,
        locator,
    })
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// An upper-cased callsign of `[A-Z0-9/]`, with an optional skimmer suffix `-#` or `-N`.
pub fn callsign(word: &str) -> Option<String> {
    let word = word.to_ascii_uppercase();
    let (base, suffix) = match word.split_once('-') {
        Some((base, suffix)) => (base, Some(suffix)),
        None => (word.as_str(), None),
    };
    let base_ok = !base.is_empty()
        && base.len() <= 20
        && base.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'/')
        && base.bytes().any(|b| b.is_ascii_alphabetic())
        && base.bytes().any(|b| b.is_ascii_digit());
    let suffix_ok = match suffix {
        None => true,
        Some("#") => true,
        Some(n) => !n.is_empty() && n.len() <= 2 && n.bytes().all(|b| b.is_ascii_digit()),
    };
    (base_ok && suffix_ok).then_some(word)
}

fn is_time(w: &str) -> bool {
    let b = w.as_bytes();
    b.len() == 5 && b[..4].iter().all(u8::is_ascii_digit) && (b[4] == b'Z' || b[4] == b'z')
}

fn is_locator(w: &str) -> bool {
    let b = w.to_ascii_uppercase().into_bytes();
    let pair = |x: u8, y: u8, lo: u8, hi: u8| (lo..=hi).contains(&x) && (lo..=hi).contains(&y);
    match b.len() {
        4 => pair(b[0], b[1], b'A', b'R') && pair(b[2], b[3], b'0', b'9'),
        6 => {
            pair(b[0], b[1], b'A', b'R')
                && pair(b[2], b[3], b'0', b'9')
                && pair(b[4], b[5], b'A', b'X')
        }
        _ => false,
    }
}

/// What may go into Wavelog's HTML: no markup characters, no control characters, single spaces.
pub fn clean(text: &str) -> String {
    let kept: String = text
        .chars()
        .filter(|c| !matches!(c, '<' | '>' | '"' | '\'' | '&') && !c.is_control())
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_lines_are_read() {
        let s = parse_line(b"DX de SP9ABC:     14025.0  DL1XYZ       CW 599            1234Z\r\n")
            .unwrap();
        assert_eq!(s.spotter, "SP9ABC");
        assert_eq!(s.spotted, "DL1XYZ");
        assert_eq!(s.frequency, 14025.0);
        assert_eq!(s.comment, "CW 599");
        assert_eq!(s.time, Some((12, 34)));
        let s =
            parse_line(b"DX de DK9IP-#:    7074.0  ea8/on4abc   FT8 -12 dB  0915Z JN48").unwrap();
        assert_eq!(s.spotter, "DK9IP-#");
        assert_eq!(s.spotted, "EA8/ON4ABC");
        assert_eq!(s.locator.as_deref(), Some("JN48"));
        assert_eq!(s.comment, "FT8 -12 dB");
    }

    #[test]
    fn everything_else_is_ignored() {
        for line in [
            &b"WWV de W0MU <18>:   SFI=70, A=5, K=1, No Storms -> No Storms"[..],
            b"To ALL de SP9ABC: hello",
            b"login: ",
            b"DX de SP9ABC: abc DL1XYZ x 1234Z",
            b"DX de <script>: 14025.0 DL1XYZ x 1234Z",
            b"DX de SP9ABC: 14025.0 <b>DL1XYZ</b> x 1234Z",
            b"DX de SP9ABC: 14025.0 DL1XYZ-ABC x 1234Z",
            b"DX de SP9ABC: NaN DL1XYZ x 1234Z",
            b"DX de SP9ABC 14025.0 DL1XYZ x 1234Z",
        ] {
            assert_eq!(parse_line(line), None, "{}", String::from_utf8_lossy(line));
        }
        let mut long = b"DX de SP9ABC: 14025.0 DL1XYZ ".to_vec();
        long.resize(MAX_LINE + 1, b'x');
        assert_eq!(parse_line(&long), None);
    }

    #[test]
    fn comments_lose_markup_and_control_characters() {
        let s = parse_line(b"DX de SP9ABC: 14025.0 DL1XYZ <img src=x onerror='a'> &amp;\x07 1234Z")
            .unwrap();
        assert_eq!(s.comment, "img src=x onerror=a amp;");
    }
}
