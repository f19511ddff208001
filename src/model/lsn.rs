//! PostgreSQL write-ahead-log positions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Size of a WAL page (`XLOG_BLCKSZ`).
pub const WAL_PAGE_SIZE: u64 = 8192;
/// Size of the short page header (`SizeOfXLogShortPHD`).
pub const WAL_SHORT_PAGE_HEADER: u64 = 24;
/// Size of the long page header at the start of a segment (`SizeOfXLogLongPHD`).
pub const WAL_LONG_PAGE_HEADER: u64 = 40;
/// Default WAL segment size (`wal_segment_size`), 16 MiB.
pub const DEFAULT_WAL_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// A WAL log sequence number, as PostgreSQL's `pg_lsn` (`X/Y` in hex).
///
/// ```
/// use lagrouter::Lsn;
/// let lsn: Lsn = "16/B374D848".parse().unwrap();
/// assert_eq!(lsn.as_u64(), 0x16_B374_D848);
/// assert_eq!(lsn.to_string(), "16/B374D848");
/// assert!(lsn > "16/B374D847".parse().unwrap());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid / zero LSN `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// The LSN as a 64-bit byte position.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Bytes from `other` up to `self` (0 when `other` is ahead).
    pub const fn bytes_after(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }

    /// Turns a position returned by `pg_current_wal_insert_lsn()` into one a
    /// replica's `pg_last_wal_replay_lsn()` is guaranteed to reach.
    ///
    /// When the insert position sits at the start of a WAL page it points just
    /// past the page header (24 bytes, or 40 at the start of a segment), where
    /// no record can end. The last record before it ended at the page start, so
    /// that is the position to wait for; waiting for the raw value would never
    /// finish on an idle replica. Other positions are returned unchanged.
    ///
    /// `segment_size` is the cluster's `wal_segment_size` in bytes.
    ///
    /// ```
    /// use lagrouter::Lsn;
    /// let seg = lagrouter::model::lsn::DEFAULT_WAL_SEGMENT_SIZE;
    /// assert_eq!(Lsn(0x1_0000_2018).round_to_record_boundary(seg), Lsn(0x1_0000_2000));
    /// assert_eq!(Lsn(0x1_0100_0028).round_to_record_boundary(seg), Lsn(0x1_0100_0000));
    /// assert_eq!(Lsn(0x1_0000_2020).round_to_record_boundary(seg), Lsn(0x1_0000_2020));
    /// ```
    pub const fn round_to_record_boundary(self, segment_size: u64) -> Lsn {
        let pos = self.0;
        let seg_off = if segment_size == 0 {
            u64::MAX
        } else {
            pos % segment_size
        };
        if seg_off == WAL_LONG_PAGE_HEADER {
            return Lsn(pos - WAL_LONG_PAGE_HEADER);
        }
        // A short header exists on every page except a segment's first.
        if pos % WAL_PAGE_SIZE == WAL_SHORT_PAGE_HEADER && seg_off != WAL_SHORT_PAGE_HEADER {
            return Lsn(pos - WAL_SHORT_PAGE_HEADER);
        }
        Lsn(pos)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// The text was not an LSN of the form `X/Y` with hex halves of 32 bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected hexadecimal X/Y")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.chars().take(64).collect());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let valid =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<postgres_types::PgLsn> for Lsn {
    fn from(v: postgres_types::PgLsn) -> Self {
        Lsn(u64::from(v))
    }
}

impl From<Lsn> for postgres_types::PgLsn {
    fn from(v: Lsn) -> Self {
        postgres_types::PgLsn::from(v.0)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        for s in ["0/0", "0/1", "16/B374D848", "FFFFFFFF/FFFFFFFF", "1/0"] {
            let lsn: Lsn = s.parse().unwrap();
            assert_eq!(lsn.to_string(), s);
        }
        assert_eq!("a/b".parse::<Lsn>().unwrap(), Lsn(0xA_0000_000B));
        assert_eq!(" 0/10 ".parse::<Lsn>().unwrap(), Lsn(0x10));
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in [
            "",
            "/",
            "1/",
            "/1",
            "1/2/3",
            "G/0",
            "0/-1",
            "+1/0",
            "123456789/0",
            "0/123456789",
            "12345",
            "é/0",
        ] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn ordering_is_numeric_not_textual() {
        let a: Lsn = "9/FFFFFFFF".parse().unwrap();
        let b: Lsn = "A/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.bytes_after(a), 1);
        assert_eq!(a.bytes_after(b), 0);
        let mut v = vec![b, Lsn::ZERO, a];
        v.sort();
        assert_eq!(v, vec![Lsn::ZERO, a, b]);
    }

    #[test]
    fn serde_uses_text_form() {
        let lsn = Lsn(0x2_0000_00A0);
        let json = serde_json::to_string(&lsn).unwrap();
        assert_eq!(json, "\"2/A0\"");
        assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
        assert!(serde_json::from_str::<Lsn>("\"zz\"").is_err());
    }

    #[test]
    fn rounding_after_short_page_header() {
        let seg = DEFAULT_WAL_SEGMENT_SIZE;
        // Page 1 of segment 0 of log 3.
        let page = 3u64 << 32 | WAL_PAGE_SIZE;
        assert_eq!(Lsn(page + 24).round_to_record_boundary(seg), Lsn(page));
        // Any other offset in the page is a real record end and kept.
        for off in [0, 8, 32, 40, 48, 8184] {
            assert_eq!(
                Lsn(page + off).round_to_record_boundary(seg),
                Lsn(page + off),
                "offset {off}"
            );
        }
    }

    #[test]
    fn rounding_after_long_segment_header() {
        let seg = DEFAULT_WAL_SEGMENT_SIZE;
        let start = 5 * seg;
        assert_eq!(Lsn(start + 40).round_to_record_boundary(seg), Lsn(start));
        // Offset 24 of a segment's first page lies inside the long header and
        // is never an insert position, but must not be rounded as if short.
        assert_eq!(
            Lsn(start + 24).round_to_record_boundary(seg),
            Lsn(start + 24)
        );
        // Offset 40 of an ordinary page can be the end of a continued record.
        let page = start + 3 * WAL_PAGE_SIZE;
        assert_eq!(Lsn(page + 40).round_to_record_boundary(seg), Lsn(page + 40));
    }

    #[test]
    fn rounding_respects_segment_size() {
        // 1 MiB segments: a segment start at 1 MiB has the long header.
        let seg = 1024 * 1024;
        assert_eq!(Lsn(seg + 40).round_to_record_boundary(seg), Lsn(seg));
        // With 16 MiB segments the same position is an ordinary page.
        assert_eq!(
            Lsn(seg + 40).round_to_record_boundary(DEFAULT_WAL_SEGMENT_SIZE),
            Lsn(seg + 40)
        );
        assert_eq!(
            Lsn(seg + 24).round_to_record_boundary(DEFAULT_WAL_SEGMENT_SIZE),
            Lsn(seg)
        );
        // A zero segment size (unknown) still rounds short headers.
        assert_eq!(
            Lsn(WAL_PAGE_SIZE + 24).round_to_record_boundary(0),
            Lsn(WAL_PAGE_SIZE)
        );
    }
}
