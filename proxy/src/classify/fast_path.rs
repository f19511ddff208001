//! The fast path: trivial statements (`SELECT 1`, pgbench's point select,
//! plain `INSERT`/`UPDATE`/`DELETE`, `BEGIN`/`COMMIT`) recognised by a cheap
//! byte scan, without lexing or parsing.

use std::sync::{Arc, OnceLock};

use super::types::{Classification, StatementKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fast {
    Read,
    Write,
    Begin,
    End,
}

impl Fast {
    pub(super) fn kind(self) -> StatementKind {
        match self {
            Fast::Read => StatementKind::Read,
            Fast::Write => StatementKind::Write,
            Fast::Begin => StatementKind::TransactionBegin { read_only: false },
            Fast::End => StatementKind::TransactionEnd,
        }
    }

    pub(super) fn shared(self) -> Arc<Classification> {
        static SHARED: [OnceLock<Arc<Classification>>; 4] = [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ];
        SHARED[self as usize]
            .get_or_init(|| Arc::new(Classification::single(self.kind())))
            .clone()
    }
}

/// Recognises trivial statements without parsing. Returns `None` whenever
/// in doubt.
pub(super) fn fast_path(sql: &str) -> Option<Fast> {
    let mut s = sql.trim_ascii();
    if let Some(stripped) = s.strip_suffix(';') {
        s = stripped.trim_ascii_end();
    }
    let b = s.as_bytes();
    let first_len = b
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(b.len());
    let first = &s[..first_len];
    let rest = &b[first_len..];
    if !rest.is_empty() && !rest[0].is_ascii_whitespace() {
        return None;
    }
    if first.eq_ignore_ascii_case("select") {
        return fast_select(b).then_some(Fast::Read);
    }
    if rest.is_empty() {
        return match first.to_ascii_lowercase().as_str() {
            "begin" => Some(Fast::Begin),
            "commit" | "end" | "rollback" | "abort" => Some(Fast::End),
            _ => None,
        };
    }
    if first.eq_ignore_ascii_case("insert")
        || first.eq_ignore_ascii_case("update")
        || first.eq_ignore_ascii_case("delete")
    {
        // Any statement starting with these keywords is a write; only make
        // sure there is exactly one statement and no comment (hint).
        let clean = !b.contains(&b';') && !b.windows(2).any(|w| w == b"--" || w == b"/*");
        return clean.then_some(Fast::Write);
    }
    None
}

/// A `SELECT` made only of words, numbers, `$n` parameters and simple
/// operators: no parentheses (so no function calls, subqueries or CTEs), no
/// quotes, no comments, no `;`, and no `FOR` (locking) or `INTO`.
fn fast_select(b: &[u8]) -> bool {
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let w = &b[start..i];
            if w.eq_ignore_ascii_case(b"for") || w.eq_ignore_ascii_case(b"into") {
                return false;
            }
            // `$` inside an identifier (`a$b`) is fine; a word directly
            // followed by `$` could also be a dollar-quote tag.
            if b.get(i) == Some(&b'$') {
                return false;
            }
            continue;
        }
        match c {
            b'0'..=b'9'
            | b' '
            | b'\t'
            | b'\n'
            | b'\r'
            | b','
            | b'.'
            | b'='
            | b'<'
            | b'>'
            | b'*'
            | b'+'
            | b'%'
            | b'!' => {}
            b'-' if b.get(i + 1) != Some(&b'-') => {}
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_cases() {
        assert_eq!(fast_path("SELECT 1"), Some(Fast::Read));
        assert_eq!(
            fast_path("SELECT abalance FROM pgbench_accounts WHERE aid = $1;"),
            Some(Fast::Read)
        );
        assert_eq!(fast_path("select a from t for update"), None);
        assert_eq!(fast_path("SELECT a INTO b FROM t"), None);
        assert_eq!(fast_path("SELECT nextval('s')"), None);
        assert_eq!(fast_path("SELECT 1 -- lagrouter:primary"), None);
        assert_eq!(fast_path("SELECT 1; SELECT 2"), None);
        assert_eq!(fast_path("SELECT $a$x$a$"), None);
        assert_eq!(fast_path("SELECTX"), None);
        assert_eq!(fast_path(" begin ; "), Some(Fast::Begin));
        assert_eq!(fast_path("COMMIT"), Some(Fast::End));
        assert_eq!(
            fast_path("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
            Some(Fast::Write)
        );
        assert_eq!(fast_path("INSERT INTO t VALUES (1); SET x = 1"), None);
        assert_eq!(
            fast_path("INSERT INTO t VALUES (1) /* lagrouter:token=x */"),
            None
        );
        assert_eq!(fast_path(""), None);
    }
}
