//! Property tests for the parsers that see untrusted input: consistency
//! tokens (cookies, headers) and LSNs. Bounded case counts: a few seconds.

use lagrouter::{ConsistencyToken, Lsn, TokenError};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Nothing written into the source tree; a failure prints its seed.
        failure_persistence: None,
        ..Config::default()
    }
}

fn token() -> impl Strategy<Value = ConsistencyToken> {
    (any::<u64>(), any::<u64>(), 1..=u32::MAX)
        .prop_map(|(lsn, sysid, tli)| ConsistencyToken::new(Lsn(lsn), sysid, tli))
}

/// Characters to substitute: every printable ASCII character (all of
/// base64url among them), controls, whitespace and some multi-byte ones.
fn replacements() -> Vec<char> {
    let mut v: Vec<char> = (0x20u8..0x7f).map(char::from).collect();
    v.extend([
        '\0',
        '\t',
        '\n',
        '\r',
        '\u{7f}',
        'é',
        '\u{a0}',
        '\u{2028}',
        '\u{1F600}',
        '\u{FFFD}',
    ]);
    v
}

/// Replaces the character at char index `i` of `s` with `c`.
fn substitute(s: &str, i: usize, c: char) -> String {
    s.chars()
        .enumerate()
        .map(|(k, x)| if k == i { c } else { x })
        .collect()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn decode_never_panics_on_strings(s in any::<String>()) {
        let _ = ConsistencyToken::decode(&s);
    }

    #[test]
    fn decode_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        let _ = ConsistencyToken::decode(&String::from_utf8_lossy(&bytes));
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = ConsistencyToken::decode(s);
        }
    }

    #[test]
    fn decode_never_panics_on_near_tokens(
        body in "[A-Za-z0-9_=+/.-]{0,70}",
        prefix in prop::sample::select(vec!["v1.", "v2.", "v1", "V1.", "v.", "v99999999.", ""]),
    ) {
        let s = format!("{prefix}{body}");
        let r = ConsistencyToken::decode(&s);
        // Anything accepted re-encodes to the same text.
        if let Ok(t) = r {
            prop_assert_eq!(t.encode(), s);
        }
    }

    #[test]
    fn every_valid_token_round_trips(t in token()) {
        let s = t.encode();
        prop_assert!(s.starts_with("v1."));
        prop_assert!(s.len() <= 64);
        prop_assert!(s[3..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        prop_assert_eq!(ConsistencyToken::decode(&s), Ok(t));
        prop_assert_eq!(s.parse::<ConsistencyToken>(), Ok(t));
        prop_assert_eq!(t.to_string(), s.clone());
        // Surrounding whitespace (a header value, a copy-paste) is ignored.
        prop_assert_eq!(ConsistencyToken::decode(&format!(" \t{s}\r\n")), Ok(t));
        let json = serde_json::to_string(&t).unwrap();
        prop_assert_eq!(serde_json::from_str::<ConsistencyToken>(&json).unwrap(), t);
    }
}

proptest! {
    // Each case tries every position with ~100 characters.
    #![proptest_config(config(96))]

    #[test]
    fn every_single_character_substitution_is_rejected(t in token()) {
        let good = t.encode();
        let n = good.chars().count();
        for i in 0..n {
            let original = good.chars().nth(i).unwrap();
            for c in replacements() {
                if c == original {
                    continue;
                }
                let bad = substitute(&good, i, c);
                let r = ConsistencyToken::decode(&bad);
                prop_assert!(r.is_err(), "{bad:?} (position {i} of {good:?}) decoded to {r:?}");
                // In the base64 body the checksum (or the encoding) catches it.
                if i >= 3 {
                    prop_assert!(matches!(r, Err(TokenError::Malformed(_))), "{bad:?}: {r:?}");
                }
            }
        }
    }

    #[test]
    fn every_single_character_deletion_or_insertion_is_rejected(t in token()) {
        let good = t.encode();
        let chars: Vec<char> = good.chars().collect();
        for i in 0..chars.len() {
            let mut v = chars.clone();
            v.remove(i);
            let bad: String = v.into_iter().collect();
            prop_assert!(ConsistencyToken::decode(&bad).is_err(), "deleting {i}: {bad:?}");
        }
        for i in 0..=chars.len() {
            for c in replacements() {
                // Leading or trailing whitespace is trimmed on purpose.
                if c.is_whitespace() && (i == 0 || i == chars.len()) {
                    continue;
                }
                let mut v = chars.clone();
                v.insert(i, c);
                let bad: String = v.into_iter().collect();
                prop_assert!(ConsistencyToken::decode(&bad).is_err(), "inserting {c:?} at {i}: {bad:?}");
            }
        }
    }

    #[test]
    fn a_flipped_payload_bit_is_rejected(t in token(), bit in 0usize..(20 * 8)) {
        // Flip one bit of the 20 payload bytes, keep the old checksum.
        use base64::Engine as _;
        let good = t.encode();
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&good[3..])
            .unwrap();
        raw[bit / 8] ^= 1 << (bit % 8);
        let bad = format!(
            "v1.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw)
        );
        prop_assert_eq!(
            ConsistencyToken::decode(&bad),
            Err(TokenError::Malformed("checksum mismatch"))
        );
    }
}

/// The reference grammar of an LSN: optional surrounding whitespace, 1 to 8
/// hex digits, `/`, 1 to 8 hex digits.
fn lsn_model(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.trim().split_once('/')?;
    let ok = |p: &str| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_hexdigit());
    if !ok(hi) || !ok(lo) {
        return None;
    }
    Some(Lsn(
        (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?
    ))
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn lsn_parse_never_panics_and_follows_the_grammar(s in any::<String>()) {
        prop_assert_eq!(s.parse::<Lsn>().ok(), lsn_model(&s));
    }

    #[test]
    fn lsn_parse_follows_the_grammar_on_near_lsns(s in "[ ]?[0-9a-fA-FgG+-]{0,10}/?[0-9a-fA-F/ ]{0,10}") {
        prop_assert_eq!(s.parse::<Lsn>().ok(), lsn_model(&s));
    }

    #[test]
    fn every_lsn_round_trips(v in any::<u64>()) {
        let lsn = Lsn(v);
        let text = lsn.to_string();
        prop_assert_eq!(text.parse::<Lsn>(), Ok(lsn));
        // Lower case and zero-padded forms parse to the same value.
        let lower = format!("{:x}/{:x}", v >> 32, v & 0xFFFF_FFFF);
        prop_assert_eq!(lower.parse::<Lsn>(), Ok(lsn));
        let padded = format!("{:08X}/{:08X}", v >> 32, v & 0xFFFF_FFFF);
        prop_assert_eq!(padded.parse::<Lsn>(), Ok(lsn));
        let json = serde_json::to_string(&lsn).unwrap();
        prop_assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
    }

    #[test]
    fn lsn_order_is_numeric(a in any::<u64>(), b in any::<u64>()) {
        let (x, y): (Lsn, Lsn) = (Lsn(a).to_string().parse().unwrap(), Lsn(b).to_string().parse().unwrap());
        prop_assert_eq!(x.cmp(&y), a.cmp(&b));
    }
}
