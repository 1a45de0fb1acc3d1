//! Browser tokens, made by Wavelog's PHP as
//! `bin2hex(json_encode(claims)) . "." . hash_hmac('sha256', hexpart, secret)`.
//!
//! Verification order is fixed: signature first (in constant time, before we spend any effort on
//! attacker-controlled JSON), then decoding, then expiry, then the topic binding.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// 0 means anonymous.
    pub user_id: i64,
    pub topic: String,
    /// Unix seconds.
    pub expires: i64,
}

/// Why a token was refused. All of them are `unauthorized` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not `<claims>.<signature>` with hex or base64url parts.
    Malformed,
    BadSignature,
    /// The signature is right but the claims are not the JSON we expect.
    BadClaims,
    Expired,
    WrongTopic,
}

impl TokenError {
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed token",
            TokenError::BadSignature => "bad signature",
            TokenError::BadClaims => "bad claims",
            TokenError::Expired => "token expired",
            TokenError::WrongTopic => "token is for another topic",
        }
    }
}

#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    user_id: Option<UserId>,
    topic: String,
    expires: i64,
}

/// PHP sessions sometimes hold the user id as a string; accept `3` and `"3"` alike.
#[derive(Deserialize)]
#[serde(untagged)]
enum UserId {
    Int(i64),
    Text(String),
}

/// The HMAC keyed once with the worker secret. Keying hashes the secret's two padded blocks;
/// a clone of the keyed state lets each token skip that, which is a third of the hashing a
/// typical token costs.
#[derive(Clone)]
pub struct Key(HmacSha256);

impl Key {
    pub fn new(secret: &[u8]) -> Key {
        Key(HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length"))
    }

    /// Checks `token` for `topic` at unix time `now`.
    pub fn verify(&self, token: &str, topic: &str, now: i64) -> Result<Claims, TokenError> {
        let (claims_part, sig_part) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let signature = decode_part(sig_part).ok_or(TokenError::Malformed)?;
        let mut mac = self.0.clone();
        mac.update(claims_part.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;

        let json = decode_part(claims_part).ok_or(TokenError::BadClaims)?;
        let raw: RawClaims = serde_json::from_slice(&json).map_err(|_| TokenError::BadClaims)?;
        let user_id = match raw.user_id {
            None => 0,
            Some(UserId::Int(n)) => n,
            Some(UserId::Text(s)) => s.trim().parse().map_err(|_| TokenError::BadClaims)?,
        };
        if raw.expires <= now {
            return Err(TokenError::Expired);
        }
        if raw.topic != topic {
            return Err(TokenError::WrongTopic);
        }
        Ok(Claims {
            user_id,
            topic: raw.topic,
            expires: raw.expires,
        })
    }
}

/// Checks `token` for `topic` at unix time `now` (keys the HMAC anew; the worker keeps a
/// [`Key`]).
pub fn verify(secret: &[u8], token: &str, topic: &str, now: i64) -> Result<Claims, TokenError> {
    Key::new(secret).verify(token, topic, now)
}

/// Makes a token exactly as Wavelog's PHP does (same JSON escaping, lowercase hex), so tokens
/// from `wavelog-worker token` and from Wavelog are interchangeable.
pub fn sign(secret: &[u8], claims: &Claims) -> String {
    let json = format!(
        "{{\"user_id\":{},\"topic\":{},\"expires\":{}}}",
        claims.user_id,
        php_json_string(&claims.topic),
        claims.expires
    );
    let claims_hex = hex_encode(json.as_bytes());
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(claims_hex.as_bytes());
    let signature = hex_encode(&mac.finalize().into_bytes());
    format!("{claims_hex}.{signature}")
}

/// PHP `json_encode` of a string without flags: `/` as `\/`, non-ASCII as `\uXXXX` (UTF-16).
fn php_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// A token part is lowercase (or uppercase) hex, or base64url without padding.
fn decode_part(part: &str) -> Option<Vec<u8>> {
    hex_decode(part).or_else(|| URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok())
}

/// `bytes` random bytes as lowercase hex (secrets, epochs, node ids). Falls back to the clock
/// only if the OS has no randomness to give, which no supported platform lacks.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::getrandom(&mut buf).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 8) * 8)) as u8;
        }
    }
    hex_encode(&buf)
}

pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    // Branch-free over the whole part (it is checked once, at the end): this runs for every
    // token a browser presents.
    let mut out = vec![0u8; s.len() / 2];
    let mut invalid = 0u8;
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        let (hi, lo) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        invalid |= hi | lo;
        *o = hi << 4 | lo;
    }
    (invalid & INVALID == 0).then_some(out)
}

/// Marks a byte that is not a hex digit in [`HEX`].
const INVALID: u8 = 0x80;

/// Every byte's value as a hex digit, either case, or [`INVALID`].
const HEX: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"sample-secret-0123456789abcdef0123456789abcdef0123456789abcdef";
    /// From `shared/vectors/php-tokens.json` ("plain"), made by PHP 8.2.
    const PHP_PLAIN: &str = "7b22757365725f6964223a332c22746f706963223a22636f6e746573745f73657373696f6e2e3432222c2265787069726573223a343130323434343830307d.3e5c0b6d580d1cbf3ac212e50b8b9c012c0bd997c4982e4890f43eb6b80d74b7";

    #[test]
    fn accepts_a_php_token() {
        let c = verify(SECRET, PHP_PLAIN, "contest_session.42", 1_750_000_000).unwrap();
        assert_eq!((c.user_id, c.expires), (3, 4_102_444_800));
    }

    #[test]
    fn signature_matches_an_independent_computation() {
        // printf '%s' 7b2274...7d | openssl dgst -sha256 -hmac 'sample-secret-0123...'
        // (the same vector as above, signed outside this project)
        let c = Claims {
            user_id: 3,
            topic: "contest_session.42".into(),
            expires: 4_102_444_800,
        };
        assert_eq!(sign(SECRET, &c), PHP_PLAIN);
    }

    #[test]
    fn refusals_in_order() {
        let now = 1_750_000_000;
        let c = |topic: &str, expires| Claims {
            user_id: 1,
            topic: topic.into(),
            expires,
        };
        assert_eq!(
            verify(SECRET, "nodot", "t", now),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify(SECRET, "7b7d.zz", "t", now),
            Err(TokenError::Malformed)
        );
        let other = sign(
            b"another-secret-0123456789abcdef0123456789",
            &c("t", now + 60),
        );
        assert_eq!(
            verify(SECRET, &other, "t", now),
            Err(TokenError::BadSignature)
        );
        let expired = sign(SECRET, &c("t", now));
        assert_eq!(verify(SECRET, &expired, "t", now), Err(TokenError::Expired));
        let wrong = sign(SECRET, &c("a", now + 60));
        assert_eq!(
            verify(SECRET, &wrong, "b", now),
            Err(TokenError::WrongTopic)
        );
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        mac.update(b"6e6f");
        let not_claims = format!("6e6f.{}", hex_encode(&mac.finalize().into_bytes()));
        assert_eq!(
            verify(SECRET, &not_claims, "t", now),
            Err(TokenError::BadClaims)
        );
    }

    #[test]
    fn accepts_base64url_parts_and_string_user_ids() {
        let json = br#"{"user_id":"7","topic":"radio.5","expires":4102444800}"#;
        let claims_part = URL_SAFE_NO_PAD.encode(json);
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        mac.update(claims_part.as_bytes());
        let token = format!(
            "{claims_part}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        let c = verify(SECRET, &token, "radio.5", 0).unwrap();
        assert_eq!(c.user_id, 7);
    }

    #[test]
    fn hex_parts_decode_in_either_case_and_nothing_else() {
        assert_eq!(hex_decode("00aFff09"), Some(vec![0x00, 0xaf, 0xff, 0x09]));
        for bad in ["", "a", "0g", "+1", " 1", "é1"] {
            assert_eq!(hex_decode(bad), None, "{bad:?}");
        }
        // Every ASCII character on either side of a digit, against the standard parser.
        for c in (0u8..128).map(char::from) {
            for pair in [format!("{c}7"), format!("7{c}")] {
                let expected = u8::from_str_radix(&pair, 16)
                    .ok()
                    .filter(|_| c.is_ascii_hexdigit());
                assert_eq!(hex_decode(&pair), expected.map(|b| vec![b]), "{pair:?}");
            }
        }
    }

    #[test]
    fn a_kept_key_verifies_like_a_fresh_one_token_after_token() {
        let key = Key::new(SECRET);
        for _ in 0..2 {
            let c = key
                .verify(PHP_PLAIN, "contest_session.42", 1_750_000_000)
                .unwrap();
            assert_eq!(c.user_id, 3);
        }
        let other = sign(
            b"another-secret-0123456789abcdef0123456789",
            &Claims {
                user_id: 1,
                topic: "t".into(),
                expires: 4_102_444_800,
            },
        );
        assert_eq!(key.verify(&other, "t", 0), Err(TokenError::BadSignature));
        assert!(key
            .verify(PHP_PLAIN, "contest_session.42", 1_750_000_000)
            .is_ok());
    }

    #[test]
    fn php_escaping() {
        assert_eq!(php_json_string("club/dl0abc"), r#""club\/dl0abc""#);
        assert_eq!(php_json_string("qso.Öster-Ü"), r#""qso.\u00d6ster-\u00dc""#);
        assert_eq!(php_json_string("📻"), r#""\ud83d\udcfb""#);
    }
}
