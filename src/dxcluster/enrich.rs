//! What Wavelog's own DX cluster backend adds to a spot, computed exactly as it does
//! (`Frequency::GetBand`, `Dxcluster_model::get_mode`, `get_submode`, `enrich_spot_metadata`;
//! docs/dxcluster.md names the sources): the bandmap matches its worked/confirmed data on
//! `band` and `mode`, so they must be Wavelog's values to the letter.

/// Wavelog's band name for a frequency in kHz; `None` outside every band. Bounds are
/// exclusive except the lower edges of 60m and 70cm, as in `GetBand`.
pub fn band(khz: f64) -> Option<&'static str> {
    let hz = khz * 1000.0;
    BANDS
        .iter()
        .find(|b| (hz > b.lo || (b.lo_inclusive && hz >= b.lo)) && hz < b.hi)
        .map(|b| b.name)
}

struct Band {
    name: &'static str,
    lo: f64,
    lo_inclusive: bool,
    hi: f64,
}

const fn b(name: &'static str, lo: f64, hi: f64) -> Band {
    Band {
        name,
        lo,
        lo_inclusive: false,
        hi,
    }
}

const fn b_incl(name: &'static str, lo: f64, hi: f64) -> Band {
    Band {
        name,
        lo,
        lo_inclusive: true,
        hi,
    }
}

/// `GetBand`, in Hz, first match wins.
const BANDS: &[Band] = &[
    b("160m", 1e6, 2e6),
    b("80m", 3e6, 4e6),
    b_incl("60m", 5.33e6, 5.405e6),
    b("40m", 6e6, 8e6),
    b("30m", 9e6, 11e6),
    b("20m", 13e6, 15e6),
    b("17m", 17e6, 19e6),
    b("15m", 20e6, 22e6),
    b("12m", 23e6, 25e6),
    b("10m", 27e6, 30e6),
    b("6m", 49e6, 55e6),
    b("4m", 69e6, 71e6),
    b("2m", 140e6, 150e6),
    b("1.25m", 218e6, 226e6),
    b_incl("70cm", 420e6, 450e6),
    b("33cm", 900e6, 930e6),
    b("23cm", 1.2e9, 1.3e9),
    b("13cm", 2.2e9, 2.6e9),
    b("9cm", 3e9, 4e9),
    b("6cm", 5e9, 6e9),
    b("3cm", 9e9, 11e9),
    b("1.2cm", 23e9, 25e9),
    b("6mm", 46e9, 55e9),
    b("4mm", 75e9, 82e9),
    b("2.5mm", 120e9, 125e9),
    b("2mm", 133e9, 150e9),
    b("1mm", 240e9, 250e9),
    b_incl("<1mm", 250e9, f64::INFINITY),
];

/// Digital modes named in comments, in Wavelog's order (it matters: "FST4W" finds FST4).
const DIGITAL: &[&str] = &[
    "FT8",
    "FT4",
    "RTTY",
    "PSK31",
    "PSK63",
    "PSK",
    "SSTV",
    "MFSK",
    "OLIVIA",
    "CONTESTIA",
    "JT65",
    "JT9",
    "WSPR",
    "HELL",
    "THOR",
    "DOMINO",
    "MT63",
    "PACTOR",
    "MSK144",
    "Q65",
    "JS8",
    "FSK441",
    "ISCAT",
    "JT6M",
    "FST4",
    "FST4W",
    "FREEDV",
    "VARA",
];

/// The mode category (`cw`, `phone`, `digi`) and submode of a spot, as `get_mode` and
/// `get_submode` find them: "cw" anywhere in the comment, then a named digital mode anywhere
/// in it (plain substrings, as Wavelog matches them), then the default band-edge table, else
/// phone.
pub fn mode(comment: &str, khz: f64) -> (&'static str, String) {
    let upper = comment.to_ascii_uppercase();
    let category = if upper.contains("CW") {
        "cw"
    } else if DIGITAL.iter().any(|m| upper.contains(m)) {
        "digi"
    } else {
        band_edge(khz).unwrap_or("phone")
    };
    let submode = match category {
        "cw" => "CW".to_string(),
        "digi" => DIGITAL
            .iter()
            .find(|m| upper.contains(*m))
            .map_or("DIGI", |m| m)
            .to_string(),
        _ if khz < 10_000.0 => "LSB".to_string(),
        _ => "USB".to_string(),
    };
    (category, submode)
}

/// Wavelog's default band edges (migration 247, user -1), Hz, from <= f < to; first row wins.
const BAND_EDGES: &[(f64, f64, &str)] = &[
    (135_700.0, 135_800.0, "cw"),
    (472_000.0, 479_000.0, "cw"),
    (501_000.0, 504_000.0, "cw"),
    (1_800_000.0, 1_837_999.0, "cw"),
    (1_838_000.0, 1_839_999.0, "digi"),
    (1_840_000.0, 2_000_000.0, "phone"),
    (3_500_000.0, 3_569_999.0, "cw"),
    (3_570_000.0, 3_599_999.0, "digi"),
    (3_600_000.0, 4_000_000.0, "phone"),
    (5_260_000.0, 5_339_999.0, "cw"),
    (5_340_000.0, 5_360_000.0, "digi"),
    (5_370_000.0, 5_410_000.0, "phone"),
    (7_000_000.0, 7_039_999.0, "cw"),
    (7_040_000.0, 7_049_999.0, "digi"),
    (7_050_000.0, 7_300_000.0, "phone"),
    (10_100_000.0, 10_129_999.0, "cw"),
    (10_130_000.0, 10_150_000.0, "digi"),
    (14_000_000.0, 14_069_999.0, "cw"),
    (14_070_000.0, 14_124_999.0, "digi"),
    (14_125_000.0, 14_350_000.0, "phone"),
    (18_068_000.0, 18_094_999.0, "cw"),
    (18_095_000.0, 18_109_000.0, "digi"),
    (18_111_000.0, 18_168_000.0, "phone"),
    (21_000_000.0, 21_069_999.0, "cw"),
    (21_070_000.0, 21_110_000.0, "digi"),
    (21_125_000.0, 21_450_000.0, "phone"),
    (24_890_000.0, 24_914_999.0, "cw"),
    (24_915_000.0, 24_929_000.0, "digi"),
    (24_931_000.0, 24_990_000.0, "phone"),
    (28_000_000.0, 28_069_999.0, "cw"),
    (28_070_000.0, 28_120_000.0, "digi"),
    (28_225_000.0, 29_700_000.0, "phone"),
    (50_000_000.0, 50_109_000.0, "cw"),
    (50_110_000.0, 50_229_000.0, "phone"),
    (50_230_000.0, 50_320_000.0, "digi"),
    (69_900_000.0, 70_100_000.0, "cw"),
    (70_250_000.0, 70_500_000.0, "phone"),
    (70_154_000.0, 70_155_000.0, "digi"),
    (144_000_000.0, 144_164_999.0, "cw"),
    (144_174_000.0, 144_174_999.0, "digi"),
    (144_165_000.0, 144_173_999.0, "phone"),
    (144_175_000.0, 148_000_000.0, "phone"),
    (432_000_000.0, 432_099_999.0, "cw"),
    (432_100_000.0, 438_000_000.0, "phone"),
];

fn band_edge(khz: f64) -> Option<&'static str> {
    let hz = khz * 1000.0;
    BAND_EDGES
        .iter()
        .find(|(from, to, _)| hz >= *from && hz < *to)
        .map(|(_, _, mode)| *mode)
}

/// References and contest hints, as `enrich_spot_metadata` sets them under `dxcc_spotted`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Activity {
    pub pota_ref: String,
    pub sota_ref: String,
    pub wwff_ref: String,
    pub iota_ref: String,
    pub is_contest: bool,
    /// The keyword that named the contest; `Some("")` for an exchange without a name.
    pub contest_name: Option<String>,
}

/// Contest keywords, Wavelog's list and order (the first whole-word match names it).
const CONTESTS: &[&str] = &[
    "HAM SPIRIT",
    "HAMSPIRIT",
    "CQ WW",
    "CQ WPX",
    "ARRL",
    "IARU",
    "CQWW",
    "CQWPX",
    "SWEEPSTAKES",
    "FIELD DAY",
    "DX CONTEST",
    "SSB CONTEST",
    "CW CONTEST",
    "RTTY CONTEST",
    "VHF CONTEST",
    "SPRINT",
    "DXCC",
    "WAE",
    "IOTA CONTEST",
    "NAQP",
    "BARTG",
    "RSGB",
    "RUNDSPRUCH",
    "JARTS",
    "CW OPEN",
    "SSB OPEN",
    "EU CONTEST",
    "NA CONTEST",
    "KING OF SPAIN",
    "ALL ASIAN",
    "CONTEST",
];

/// Words that make "599 123" a conversation rather than a contest exchange.
const CHAT: &[&str] = &[
    "TU", "TNX", "THANKS", "73", "GL", "HI", "FB", "CUL", "HPE", "PSE", "DE",
];

/// POTA/SOTA/WWFF/IOTA references and contest hints in `comment` (upper-cased; each pattern
/// takes its first whole-word match, as Wavelog's regular expressions do).
pub fn activity(comment: &str) -> Activity {
    let mut a = Activity::default();
    let upper = comment.to_ascii_uppercase();
    if upper.trim().is_empty() {
        return a;
    }
    let t = upper.as_bytes();
    a.sota_ref = first(t, sota).unwrap_or_default();
    a.iota_ref = first(t, iota).unwrap_or_default();
    a.wwff_ref = first(t, wwff).unwrap_or_default();
    // Only the first candidate counts, and a WWFF reference is no park.
    a.pota_ref = first(t, pota)
        .filter(|r| !r.contains("FF-"))
        .unwrap_or_default();
    for keyword in CONTESTS {
        if *keyword == "DX CONTEST" && is_cq_dx_call(&upper) {
            continue;
        }
        if has_phrase(t, keyword.as_bytes()) {
            a.is_contest = true;
            a.contest_name = Some(keyword.to_string());
            return a;
        }
    }
    let chat = CHAT.iter().any(|w| has_phrase(t, w.as_bytes()));
    if !chat && first(t, exchange).is_some() && first(t, ur_599).is_none() {
        a.is_contest = true;
        a.contest_name = Some(String::new());
    }
    a
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// A regex `\b` between `t[i-1]` and `t[i]`.
fn boundary(t: &[u8], i: usize) -> bool {
    let before = i > 0 && is_word(t[i - 1]);
    let after = i < t.len() && is_word(t[i]);
    before != after
}

/// The first match of `pat` that starts and ends on a word boundary (`\b...\b`). `pat`
/// returns every end position a match starting at `i` can have.
fn first(t: &[u8], pat: fn(&[u8], usize) -> Vec<usize>) -> Option<String> {
    (0..t.len()).filter(|&i| boundary(t, i)).find_map(|i| {
        pat(t, i)
            .into_iter()
            .find(|&end| boundary(t, end))
            .map(|end| String::from_utf8_lossy(&t[i..end]).into_owned())
    })
}

/// Whether `phrase` stands in `t` as whole words (`\bphrase\b`).
fn has_phrase(t: &[u8], phrase: &[u8]) -> bool {
    (0..t.len())
        .any(|i| boundary(t, i) && t[i..].starts_with(phrase) && boundary(t, i + phrase.len()))
}

/// Ends of a run of `lo..=hi` bytes of `class` starting at `i`, longest first.
fn run(t: &[u8], i: usize, lo: usize, hi: usize, class: fn(u8) -> bool) -> Vec<usize> {
    let n = t[i.min(t.len())..]
        .iter()
        .take(hi)
        .take_while(|c| class(**c))
        .count();
    (lo..=n).rev().map(|k| i + k).collect()
}

fn alnum(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit()
}

fn alpha(c: u8) -> bool {
    c.is_ascii_uppercase()
}

fn digit(c: u8) -> bool {
    c.is_ascii_digit()
}

fn lit(t: &[u8], i: usize, s: &[u8]) -> Option<usize> {
    t.get(i..).filter(|r| r.starts_with(s)).map(|_| i + s.len())
}

/// Continues every end in `ends` with `next`.
fn then(t: &[u8], ends: Vec<usize>, next: impl Fn(&[u8], usize) -> Vec<usize>) -> Vec<usize> {
    ends.into_iter().flat_map(|e| next(t, e)).collect()
}

/// `[A-Z0-9]{1,3}/[A-Z]{2}-\d{3,4}`
fn sota(t: &[u8], i: usize) -> Vec<usize> {
    let ends = run(t, i, 1, 3, alnum);
    let ends = then(t, ends, |t, e| lit(t, e, b"/").into_iter().collect());
    let ends = then(t, ends, |t, e| run(t, e, 2, 2, alpha));
    let ends = then(t, ends, |t, e| lit(t, e, b"-").into_iter().collect());
    then(t, ends, |t, e| run(t, e, 3, 4, digit))
}

/// `(?:AF|AN|AS|EU|NA|OC|SA)-\d{3}`
fn iota(t: &[u8], i: usize) -> Vec<usize> {
    let ends: Vec<usize> = ["AF-", "AN-", "AS-", "EU-", "NA-", "OC-", "SA-"]
        .iter()
        .filter_map(|p| lit(t, i, p.as_bytes()))
        .collect();
    then(t, ends, |t, e| run(t, e, 3, 3, digit))
}

/// `(?:[A-Z0-9]{2,4}FF|KFF)-\d{4}`
fn wwff(t: &[u8], i: usize) -> Vec<usize> {
    let mut ends = then(t, run(t, i, 2, 4, alnum), |t, e| {
        lit(t, e, b"FF").into_iter().collect()
    });
    ends.extend(lit(t, i, b"KFF"));
    let ends = then(t, ends, |t, e| lit(t, e, b"-").into_iter().collect());
    then(t, ends, |t, e| run(t, e, 4, 4, digit))
}

/// `[A-Z0-9]{1,5}-\d{4,5}`
fn pota(t: &[u8], i: usize) -> Vec<usize> {
    let ends = run(t, i, 1, 5, alnum);
    let ends = then(t, ends, |t, e| lit(t, e, b"-").into_iter().collect());
    then(t, ends, |t, e| run(t, e, 4, 5, digit))
}

fn space(c: u8) -> bool {
    c.is_ascii_whitespace()
}

/// `(?:599|5NN)\s+(?:TU\s+)?[0-9]{2,4}`
fn exchange(t: &[u8], i: usize) -> Vec<usize> {
    let ends: Vec<usize> = [&b"599"[..], b"5NN"]
        .iter()
        .filter_map(|p| lit(t, i, p))
        .collect();
    let ends = then(t, ends, |t, e| run(t, e, 1, usize::MAX, space));
    let mut with_tu = then(t, ends.clone(), |t, e| {
        lit(t, e, b"TU").into_iter().collect()
    });
    with_tu = then(t, with_tu, |t, e| run(t, e, 1, usize::MAX, space));
    let mut starts = ends;
    starts.extend(with_tu);
    then(t, starts, |t, e| run(t, e, 2, 4, digit))
}

/// `UR\s+599`
fn ur_599(t: &[u8], i: usize) -> Vec<usize> {
    let ends: Vec<usize> = lit(t, i, b"UR").into_iter().collect();
    let ends = then(t, ends, |t, e| run(t, e, 1, usize::MAX, space));
    then(t, ends, |t, e| lit(t, e, b"599").into_iter().collect())
}

/// `^CQ\s+DX\s+[A-Z]+$` on the trimmed comment: a CQ call, not a contest.
fn is_cq_dx_call(upper: &str) -> bool {
    let words: Vec<&str> = upper.split_whitespace().collect();
    words.len() == 3
        && words[0] == "CQ"
        && words[1] == "DX"
        && words[2].bytes().all(|c| c.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_use_wavelogs_names_and_edges() {
        assert_eq!(band(14_025.0), Some("20m"));
        assert_eq!(band(5_330.0), Some("60m"), "60m's lower edge is inclusive");
        assert_eq!(band(144_300.0), Some("2m"));
        assert_eq!(band(420_000.0), Some("70cm"));
        assert_eq!(band(1_296_200.0), Some("23cm"));
        assert_eq!(band(2_000.0), None, "upper edges are exclusive");
        assert_eq!(band(12_000.0), None);
        assert_eq!(band(137.0), None);
    }

    #[test]
    fn modes_and_submodes_as_wavelog_finds_them() {
        assert_eq!(mode("CW 599", 14_025.0), ("cw", "CW".into()));
        assert_eq!(mode("ft8 -12dB", 14_074.0), ("digi", "FT8".into()));
        assert_eq!(
            mode("FST4W", 14_074.0),
            ("digi", "FST4".into()),
            "Wavelog's order"
        );
        assert_eq!(mode("", 14_030.0), ("cw", "CW".into()));
        assert_eq!(mode("", 14_080.0), ("digi", "DIGI".into()));
        assert_eq!(mode("up 5", 14_200.0), ("phone", "USB".into()));
        assert_eq!(mode("", 7_150.0), ("phone", "LSB".into()));
        assert_eq!(
            mode("hello", 14_200.0),
            ("digi", "HELL".into()),
            "substrings, as Wavelog"
        );
    }

    #[test]
    fn references_and_contests_as_wavelog_reads_them() {
        let a = activity("POTA K-1234 ssb");
        assert_eq!(a.pota_ref, "K-1234");
        assert!(!a.is_contest && a.contest_name.is_none());
        let a = activity("sota w7w/lc-001 and DLFF-0123, IOTA EU-005");
        assert_eq!(a.sota_ref, "W7W/LC-001");
        assert_eq!(a.wwff_ref, "DLFF-0123");
        assert_eq!(a.iota_ref, "EU-005");
        assert_eq!(
            a.pota_ref, "",
            "the first candidate is the FF reference: no park"
        );
        let a = activity("CQ WW DX CW");
        assert_eq!(a.contest_name.as_deref(), Some("CQ WW"));
        assert_eq!(activity("5NN 123").contest_name.as_deref(), Some(""));
        assert!(!activity("599 123 TNX").is_contest);
        assert!(!activity("UR 599 123").is_contest);
        assert_eq!(
            activity("CQ DX CONTEST").contest_name.as_deref(),
            Some("CONTEST"),
            "a CQ call is no DX CONTEST"
        );
        assert_eq!(activity("KFF-1234").wwff_ref, "KFF-1234");
    }
}
