//! Webhook subscriptions: their URLs and secrets as the contract accepts them, the Standard
//! Webhooks signature, and the retry schedule. No I/O.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};

/// Fewest and most bytes a secret's key may have (after `whsec_`, base64-decoded).
pub(crate) const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;
/// Longest accepted URL.
pub(crate) const MAX_URL: usize = 2048;
/// How long one delivery attempt may take, answer included (the contract's 10 s).
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before the first retry; each further failure doubles it…
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// …up to this, so that attempts start at most 5 minutes apart (the contract) even after one that
/// used its whole timeout and a sender that looks again only every half second. Retries never stop.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(285);

/// A signing secret: `whsec_` and the standard, padded base64 of 24–64 bytes. Only the key is
/// kept; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        const SHAPE: &str = "must be `whsec_` followed by the base64 of 24 to 64 random bytes";
        let encoded = raw.strip_prefix("whsec_").ok_or(SHAPE)?;
        // The standard alphabet, padded, with no stray bits: one spelling per key.
        let key = STANDARD.decode(encoded).map_err(|_| SHAPE)?;
        if !SECRET_BYTES.contains(&key.len()) {
            return Err(format!("{SHAPE} (this one has {} bytes)", key.len()));
        }
        Ok(Self(key))
    }

    /// `v1,` and the base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}"): the value of the
    /// `webhook-signature` header.
    pub(crate) fn sign(&self, id: impl std::fmt::Display, timestamp: i64, body: &[u8]) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// A receiver's URL: `http://` or `https://`, a host (a name, an IPv4 address or a bracketed
/// IPv6 one) with an optional port, then an optional path and query; no user name, no
/// fragment, no white space, at most [`MAX_URL`] characters. `http::schemas::webhook_url`
/// spells the same rule as a pattern.
pub(crate) fn url(raw: String) -> Result<String, String> {
    const SHAPE: &str = "must be an http:// or https:// URL with a host";
    if raw.len() > MAX_URL {
        return Err(format!("must be at most {MAX_URL} characters"));
    }
    let rest = raw.strip_prefix("http://").or_else(|| raw.strip_prefix("https://")).ok_or(SHAPE)?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (inside, after) = v6.split_once(']').ok_or(SHAPE)?;
            let ok = !inside.is_empty() && inside.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            (if ok { Some(inside) } else { None }, after)
        }
        None => {
            let (host, port) = authority.find(':').map_or((authority, ""), |i| authority.split_at(i));
            let ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            (if ok { Some(host) } else { None }, port)
        }
    };
    host.ok_or(SHAPE)?;
    if !port.is_empty() {
        let digits = port.strip_prefix(':').ok_or(SHAPE)?;
        let ok = (1..=5).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
        if !ok || digits.parse::<u16>().is_err() {
            return Err("the port must be a number from 0 to 65535".into());
        }
    }
    if !tail.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~:/?[]@!$&'()*+,;=%".contains(&b)) {
        return Err("the path and query may hold only URL characters (no white space, no fragment)".into());
    }
    Ok(raw)
}

/// How long to wait before trying again after `failures` failed attempts in a row (1 or more):
/// 1 s, 2 s, 4 s, … up to 285 s, for as long as it takes.
pub(crate) fn retry_pause(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_PAUSE * (1u32 << doublings)).min(MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_of(bytes: usize) -> String {
        format!("whsec_{}", STANDARD.encode(vec![7u8; bytes]))
    }

    #[test]
    fn secrets_of_24_to_64_bytes_are_accepted_and_nothing_else() {
        for n in [24, 25, 26, 32, 63, 64] {
            assert!(Secret::parse(&secret_of(n)).is_ok(), "{n} bytes");
        }
        for n in [0, 23, 65] {
            assert!(Secret::parse(&secret_of(n)).is_err(), "{n} bytes");
        }
        let good = secret_of(32);
        for bad in [&good[6..], &good.replace("whsec_", "whsec-"), good.trim_end_matches('='), &format!("{good} ")] {
            assert!(Secret::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{:?}", Secret::parse(&good).unwrap()).contains("Bwc"), "the key stays out of Debug");
    }

    /// The example of the Standard Webhooks specification (and of its reference libraries).
    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signed = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// RFC 4231 test case 2, through the same HMAC the signature uses.
    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn urls_need_a_scheme_and_a_host() {
        for ok in [
            "http://localhost",
            "https://hooks.example.com/inventory?token=abc&x=%20",
            "http://127.0.0.1:8080/",
            "http://[::1]:9000/hook",
            "https://a.b:0",
        ] {
            assert_eq!(url(ok.to_owned()).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "ftp://example.com",
            "http://",
            "http:///path",
            "https://user@example.com/",
            "http://example.com:65536",
            "http://example.com:",
            "http://exa mple.com",
            "http://example.com/a b",
            "http://example.com/#frag",
            "http://[::1/x",
            "HTTP://example.com",
        ] {
            assert!(url(bad.to_owned()).is_err(), "{bad:?}");
        }
        assert!(url(format!("http://a/{}", "x".repeat(MAX_URL))).is_err());
    }

    #[test]
    fn pauses_double_from_one_second_up_to_just_under_five_minutes() {
        let pauses: Vec<u64> = (1..=12).map(|n| retry_pause(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 128, 256, 285, 285, 285]);
        // Attempt starts at most 5 minutes apart: the longest pause, a whole attempt timeout and
        // the sender's half-second look-again interval.
        assert!(MAX_PAUSE + ATTEMPT_TIMEOUT + Duration::from_millis(500) <= Duration::from_secs(300));
        assert_eq!(retry_pause(u32::MAX), MAX_PAUSE);
        // Retried for at least 24 hours: the pauses never stop, so the sum grows without bound.
        let day: u64 = (1..=400).map(|n| retry_pause(n).as_secs()).sum();
        assert!(day > 24 * 3600);
    }
}
