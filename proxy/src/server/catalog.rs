//! What the proxy knows about the databases' schemas, shared by every
//! session: the **schema epoch**, which every DDL a client runs through
//! the proxy advances (prepared statements are named by the epoch they
//! were prepared in, so a statement prepared after a DDL never reuses a
//! plan a backend cached before it).

use std::sync::atomic::{AtomicU64, Ordering};

/// Schema knowledge shared by all sessions.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Advanced by every DDL seen.
    epoch: AtomicU64,
}

impl Catalog {
    /// The current schema epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A client's DDL completed: plans and relation lists made before may
    /// be stale.
    pub fn schema_changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether a `CommandComplete` tag reports a schema change (`CREATE …`,
/// `ALTER …`, `DROP …`).
pub fn is_ddl_tag(tag: &[u8]) -> bool {
    [&b"CREATE "[..], b"ALTER ", b"DROP "]
        .iter()
        .any(|p| tag.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_tags() {
        assert!(is_ddl_tag(b"ALTER TABLE"));
        assert!(is_ddl_tag(b"CREATE TYPE"));
        assert!(is_ddl_tag(b"DROP TABLE"));
        assert!(!is_ddl_tag(b"INSERT 0 1"));
        assert!(!is_ddl_tag(b"SELECT 1"));
        let c = Catalog::default();
        let e = c.epoch();
        c.schema_changed();
        assert_eq!(c.epoch(), e + 1);
    }
}
