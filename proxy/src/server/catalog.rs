//! What the proxy knows about the databases' schemas, shared by every
//! session: the **schema epoch**, which every DDL a client runs through
//! the proxy advances (prepared statements are named by the epoch they
//! were prepared in, so a statement prepared after a DDL never reuses a
//! plan a backend cached before it), and each database's **unlogged
//! relations** (hot standbys cannot read them, so reads naming one go to
//! the primary), loaded from the primary's catalog and loaded again after
//! a DDL or [`UNLOGGED_MAX_AGE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lists the unlogged relations of the current database.
pub const UNLOGGED_SQL: &str = "SELECT relname FROM pg_catalog.pg_class      WHERE relpersistence = 'u' AND relkind IN ('r', 'p', 'm')";

/// How long a database's list of unlogged relations is used without a DDL
/// seen (DDL made past the proxy shows after this at most; until then the
/// read engine moves such a read to the primary when the replica refuses
/// it).
pub const UNLOGGED_MAX_AGE: Duration = Duration::from_secs(60);

/// The unlogged relations of one database, as loaded at one epoch.
#[derive(Debug)]
pub struct Unlogged {
    /// The schema epoch when loaded.
    epoch: u64,
    /// When loaded.
    loaded: Instant,
    /// Their names, lower-cased.
    pub names: Vec<String>,
}

/// Schema knowledge shared by all sessions.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Advanced by every DDL seen.
    epoch: AtomicU64,
    /// Unlogged relations by database.
    unlogged: Mutex<HashMap<String, Arc<Unlogged>>>,
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

    /// The unlogged relations of `database`, unless they must be loaded
    /// (never loaded, a DDL since, or older than [`UNLOGGED_MAX_AGE`]).
    pub fn unlogged(&self, database: &str) -> Option<Arc<Unlogged>> {
        let map = self.unlogged.lock().unwrap_or_else(|p| p.into_inner());
        map.get(database)
            .filter(|u| u.epoch == self.epoch() && u.loaded.elapsed() < UNLOGGED_MAX_AGE)
            .cloned()
    }

    /// Records the unlogged relations of `database` as loaded at `epoch`
    /// (the epoch read before the query ran).
    pub fn set_unlogged(&self, database: &str, epoch: u64, names: Vec<String>) -> Arc<Unlogged> {
        let u = Arc::new(Unlogged {
            epoch,
            loaded: Instant::now(),
            names,
        });
        let mut map = self.unlogged.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(database.to_owned(), u.clone());
        u
    }
}

impl Unlogged {
    /// Whether `sql` names one of the relations (as a word, ignoring
    /// case; a false positive only sends a read to the primary).
    pub fn named_in(&self, sql: &str) -> bool {
        !self.names.is_empty()
            && sql
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
                .any(|w| self.names.iter().any(|n| w.eq_ignore_ascii_case(n)))
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

    #[test]
    fn unlogged_lists_follow_the_epoch() {
        let c = Catalog::default();
        assert!(c.unlogged("db").is_none());
        let u = c.set_unlogged("db", c.epoch(), vec!["events_ul".into()]);
        assert!(u.named_in("SELECT * FROM public.Events_UL WHERE x = 1"));
        assert!(!u.named_in("SELECT * FROM events_ul2"));
        assert!(c.unlogged("db").is_some());
        c.schema_changed();
        assert!(c.unlogged("db").is_none());
    }
}
