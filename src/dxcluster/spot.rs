//! The push a spot becomes: `{"type":"spot","spot":{...}}`, the shape Wavelog's bandmap reads
//! (see docs/dxcluster.md).

use serde::Serialize;

use super::enrich::{self, Activity};
use super::lookup::Dxcc;
use super::parse::RawSpot;

#[derive(Serialize)]
struct Push<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    spot: Spot<'a>,
}

#[derive(Serialize)]
struct Spot<'a> {
    spotter: &'a str,
    spotted: &'a str,
    /// kHz, a JSON number.
    frequency: f64,
    band: &'static str,
    mode: &'static str,
    submode: String,
    /// When the relay received it, ISO-8601 UTC.
    when: String,
    message: &'a str,
    source: &'static str,
    dxcc_spotted: Spotted,
    #[serde(skip_serializing_if = "Option::is_none")]
    dxcc_spotter: Option<Dxcc>,
}

/// The spotted station: its DXCC data (when the lookup found it) and what the comment says
/// it is doing.
#[derive(Serialize)]
struct Spotted {
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    dxcc: Option<Dxcc>,
    pota_ref: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pota_mode: Option<String>,
    sota_ref: String,
    wwff_ref: String,
    iota_ref: String,
    #[serde(rename = "isContest")]
    is_contest: bool,
    /// The contest keyword, `""` for an exchange without a name, `null` for no contest.
    #[serde(rename = "contestName")]
    contest_name: Option<String>,
}

/// The JSON text of the push for one spot.
pub fn payload(
    raw: &RawSpot,
    band: &'static str,
    spotted: Option<Dxcc>,
    spotter: Option<Dxcc>,
    received_ms: u64,
) -> String {
    let (mode, submode) = enrich::mode(&raw.comment, raw.frequency);
    let Activity {
        pota_ref,
        sota_ref,
        wwff_ref,
        iota_ref,
        is_contest,
        contest_name,
    } = enrich::activity(&raw.comment);
    let pota_mode = (!pota_ref.is_empty()).then(|| submode.clone());
    let push = Push {
        kind: "spot",
        spot: Spot {
            spotter: &raw.spotter,
            spotted: &raw.spotted,
            frequency: raw.frequency,
            band,
            mode,
            submode,
            when: crate::time::iso8601(received_ms),
            message: &raw.comment,
            source: "cluster",
            dxcc_spotted: Spotted {
                dxcc: spotted,
                pota_ref,
                pota_mode,
                sota_ref,
                wwff_ref,
                iota_ref,
                is_contest,
                contest_name,
            },
            dxcc_spotter: spotter,
        },
    };
    // Plain strings and numbers: serializing cannot fail.
    serde_json::to_string(&push).unwrap_or_default()
}
