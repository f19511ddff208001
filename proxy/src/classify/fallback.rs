//! Keyword fallback for what the parser rejects (or what is too big to
//! parse).

use super::lexer::{Lexer, Tok};
use super::types::{PinReason, StatementKind};

/// Classifies one statement from its keywords. Used for statements the
/// parser rejects and for oversized input; conservative: anything not
/// clearly recognised is [`StatementKind::Other`].
pub(super) fn fallback_kind(piece: &str) -> StatementKind {
    use StatementKind as K;
    let mut toks = Lexer::new(piece).filter(|t| !matches!(t, Tok::Comment(_)));
    let first = match toks.next() {
        Some(Tok::Word(w)) => w.to_ascii_uppercase(),
        Some(Tok::Punct(b'(')) => "(".to_owned(),
        _ => return K::Other,
    };
    let second = match toks.next() {
        Some(Tok::Word(w)) => Some(w.to_ascii_uppercase()),
        _ => None,
    };
    let second = second.as_deref();
    let words: Vec<&str> = Lexer::new(piece)
        .filter_map(|t| match t {
            Tok::Word(w) => Some(w),
            _ => None,
        })
        .collect();
    let has_seq = |seq: &[&str]| -> bool {
        words
            .windows(seq.len())
            .any(|win| win.iter().zip(seq).all(|(a, b)| a.eq_ignore_ascii_case(b)))
    };
    let locking = || {
        has_seq(&["FOR", "UPDATE"])
            || has_seq(&["FOR", "SHARE"])
            || has_seq(&["FOR", "NO", "KEY"])
            || has_seq(&["FOR", "KEY", "SHARE"])
    };
    match first.as_str() {
        "SELECT" | "WITH" | "VALUES" | "(" => {
            if locking() {
                K::Write
            } else {
                K::Other
            }
        }
        "TABLE" => {
            // `TABLE name [*]` alone is a read.
            let simple = Lexer::new(piece)
                .filter(|t| !matches!(t, Tok::Comment(_)))
                .skip(1)
                .all(|t| matches!(t, Tok::Word(_) | Tok::Quoted | Tok::Punct(b'.' | b'*')));
            let reserved = words.iter().skip(1).any(|w| {
                ["FOR", "UNION", "INTERSECT", "EXCEPT", "ORDER", "LIMIT"]
                    .iter()
                    .any(|r| w.eq_ignore_ascii_case(r))
            });
            if simple && !reserved {
                K::Read
            } else if locking() {
                K::Write
            } else {
                K::Other
            }
        }
        "BEGIN" => match second {
            None | Some("WORK" | "TRANSACTION" | "ISOLATION" | "READ" | "NOT" | "DEFERRABLE") => {
                K::TransactionBegin {
                    read_only: has_seq(&["READ", "ONLY"]),
                }
            }
            _ => K::Other,
        },
        "START" if second == Some("TRANSACTION") => K::TransactionBegin {
            read_only: has_seq(&["READ", "ONLY"]),
        },
        "CREATE" => {
            if matches!(second, Some("TEMP" | "TEMPORARY"))
                || (matches!(second, Some("LOCAL" | "GLOBAL"))
                    && (has_seq(&["LOCAL", "TEMP"])
                        || has_seq(&["LOCAL", "TEMPORARY"])
                        || has_seq(&["GLOBAL", "TEMP"])
                        || has_seq(&["GLOBAL", "TEMPORARY"])))
            {
                K::SessionPinning(PinReason::TempTable)
            } else {
                K::Write
            }
        }
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "ALTER" | "DROP" | "TRUNCATE" | "GRANT"
        | "REVOKE" | "COMMENT" | "REINDEX" | "CLUSTER" | "VACUUM" | "ANALYZE" | "REFRESH"
        | "CALL" | "DO" | "CHECKPOINT" | "SECURITY" | "IMPORT" | "REASSIGN" | "NOTIFY" => K::Write,
        "COPY" => {
            if has_seq(&["FROM", "STDIN"]) {
                K::SessionPinning(PinReason::Copy)
            } else {
                K::Write
            }
        }
        "PREPARE" => {
            if second == Some("TRANSACTION") {
                K::TransactionEnd
            } else {
                K::SessionPinning(PinReason::SqlPrepare)
            }
        }
        "COMMIT" | "ROLLBACK" => match second {
            Some("PREPARED") => K::Write,
            Some("TO") => K::Savepoint,
            _ => K::TransactionEnd,
        },
        "END" | "ABORT" => K::TransactionEnd,
        "SAVEPOINT" | "RELEASE" => K::Savepoint,
        "MOVE" | "FETCH" | "CLOSE" => K::Read,
        "SHOW" => K::Show,
        "LISTEN" => K::SessionPinning(PinReason::Listen),
        "UNLISTEN" => K::Other,
        "LOCK" => K::SessionPinning(PinReason::Lock),
        "DECLARE" => {
            if has_seq(&["WITH", "HOLD"]) {
                K::SessionPinning(PinReason::HoldCursor)
            } else {
                K::Other
            }
        }
        "SET" => match second {
            Some("LOCAL" | "CONSTRAINTS" | "TRANSACTION") => K::Other,
            _ => K::SessionPinning(PinReason::UnsupportedSet),
        },
        "RESET" => match second {
            Some("ALL") => K::Reset { name: None },
            Some("TIME") if has_seq(&["TIME", "ZONE"]) => K::Reset {
                name: Some("timezone".to_owned()),
            },
            _ => K::SessionPinning(PinReason::UnsupportedSet),
        },
        "DISCARD" => {
            if second == Some("ALL") {
                K::Discard
            } else {
                K::Other
            }
        }
        "EXPLAIN" => {
            if words.iter().any(|w| w.eq_ignore_ascii_case("analyze")) {
                K::Other
            } else {
                K::Read
            }
        }
        _ => K::Other,
    }
}
