//! One pass of the lexer over the input: routing hints from comments
//! (`/* lagrouter:primary */`, `/* lagrouter:replica */`,
//! `/* lagrouter:token=… */`, `/* lagrouter:consistency=… */`) and the byte
//! ranges of the statements.

use std::ops::Range;

use super::lexer::{Lexer, Tok};
use super::types::RouteHint;

/// Longest token text accepted from a `lagrouter:token=` hint.
const MAX_HINT_TOKEN_LEN: usize = 256;
/// Longest policy text accepted from a `lagrouter:consistency=` hint.
const MAX_HINT_POLICY_LEN: usize = 64;

/// Hints, and the byte ranges of the non-empty statements.
pub(super) struct Scan {
    pub(super) hint: Option<RouteHint>,
    pub(super) token: Option<String>,
    pub(super) consistency: Option<String>,
    pub(super) pieces: Vec<Range<usize>>,
}

pub(super) fn scan(sql: &str) -> Scan {
    let mut out = Scan {
        hint: None,
        token: None,
        consistency: None,
        pieces: Vec::new(),
    };
    let mut start = 0;
    let mut has_tokens = false;
    let mut prev_begin = false;
    let mut atomic = false;
    let mut lexer = Lexer::new(sql);
    for tok in lexer.by_ref() {
        match tok {
            Tok::Comment(text) => parse_hints(text, &mut out),
            Tok::Semicolon(pos) if !atomic => {
                if has_tokens {
                    out.pieces.push(start..pos);
                }
                start = pos + 1;
                has_tokens = false;
                prev_begin = false;
            }
            Tok::Word(w) => {
                has_tokens = true;
                // `BEGIN ATOMIC … END` bodies contain `;`: stop splitting.
                if prev_begin && w.eq_ignore_ascii_case("atomic") {
                    atomic = true;
                }
                prev_begin = w.eq_ignore_ascii_case("begin");
            }
            _ => {
                has_tokens = true;
                prev_begin = false;
            }
        }
    }
    // An unterminated comment is a syntax error, not an empty query.
    if has_tokens || lexer.unterminated {
        out.pieces.push(start..sql.len());
    }
    out
}

fn parse_hints(comment: &str, out: &mut Scan) {
    const TAG: &str = "lagrouter:";
    let mut rest = comment;
    while let Some(p) = rest.find(TAG) {
        rest = &rest[p + TAG.len()..];
        let word_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..word_end];
        if word.eq_ignore_ascii_case("primary") {
            out.hint = Some(RouteHint::Primary);
        } else if word.eq_ignore_ascii_case("replica") {
            if out.hint.is_none() {
                out.hint = Some(RouteHint::Replica);
            }
        } else if word.eq_ignore_ascii_case("token") && rest[word_end..].starts_with('=') {
            let value = &rest[word_end + 1..];
            let end = value
                .find(|c: char| {
                    !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '~' | '+' | '='))
                })
                .unwrap_or(value.len());
            let token = &value[..end];
            if out.token.is_none() && !token.is_empty() && token.len() <= MAX_HINT_TOKEN_LEN {
                out.token = Some(token.to_owned());
            }
        } else if word.eq_ignore_ascii_case("consistency") && rest[word_end..].starts_with('=') {
            // The policy may hold a space (`bounded-staleness 5s`): it runs
            // to the next hint or the end of the comment.
            let value = &rest[word_end + 1..];
            let policy = value[..value.find(TAG).unwrap_or(value.len())].trim();
            if out.consistency.is_none()
                && !policy.is_empty()
                && policy.len() <= MAX_HINT_POLICY_LEN
            {
                out.consistency = Some(policy.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_splits_statements() {
        let s = scan("SELECT 1; ; /* c */ ; SELECT ';' ;");
        assert_eq!(s.pieces, vec![0..8, 21..33]);
        let s = scan("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END; SELECT 2");
        assert_eq!(s.pieces.len(), 1);
    }

    #[test]
    fn hints_parse() {
        let mut s = Scan {
            hint: None,
            token: None,
            consistency: None,
            pieces: vec![],
        };
        parse_hints(" lagrouter:replica lagrouter:token=v1.AbC-_9 ", &mut s);
        assert_eq!(s.hint, Some(RouteHint::Replica));
        assert_eq!(s.token.as_deref(), Some("v1.AbC-_9"));
        parse_hints("lagrouter:primary", &mut s);
        parse_hints("lagrouter:replica", &mut s);
        assert_eq!(s.hint, Some(RouteHint::Primary));
        parse_hints("lagrouter:token=", &mut s);
        parse_hints("lagrouter:primaryx lagrouter:", &mut s);
        assert_eq!(s.token.as_deref(), Some("v1.AbC-_9"));
        parse_hints(
            " lagrouter:consistency=bounded-staleness 5s lagrouter:replica ",
            &mut s,
        );
        assert_eq!(s.consistency.as_deref(), Some("bounded-staleness 5s"));
        parse_hints("lagrouter:consistency=primary", &mut s);
        assert_eq!(s.consistency.as_deref(), Some("bounded-staleness 5s"));
    }
}
