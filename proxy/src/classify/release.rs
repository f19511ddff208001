//! Whether a statement may release session-bound state (the state that
//! pins a client to one server connection): `UNLISTEN`, `CLOSE`, `DROP`,
//! `DISCARD`, `DEALLOCATE`, `RESET` and the `pg_advisory_unlock*`
//! functions. A cheap word scan, deliberately generous: a false positive
//! only costs the proxy one question to the server.

/// Whether `sql` may release session-bound state.
pub fn may_release_session_state(sql: &str) -> bool {
    const WORDS: &[&str] = &[
        "unlisten",
        "close",
        "drop",
        "discard",
        "deallocate",
        "reset",
    ];
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| {
            WORDS.iter().any(|k| w.eq_ignore_ascii_case(k))
                || (w.len() >= 18 && w[..18].eq_ignore_ascii_case("pg_advisory_unlock"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releasing_statements() {
        for sql in [
            "UNLISTEN *",
            "close all",
            "DROP TABLE tmp",
            "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
            "select PG_ADVISORY_UNLOCK(1)",
            "DISCARD TEMP",
            "DEALLOCATE s1",
        ] {
            assert!(may_release_session_state(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "INSERT INTO t VALUES (1)",
            "LISTEN ch",
            "SELECT closed FROM t",
        ] {
            assert!(!may_release_session_state(sql), "{sql}");
        }
    }
}
