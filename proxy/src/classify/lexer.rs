//! A small PostgreSQL-aware lexer, for comments, statement boundaries and
//! keyword fallbacks (the SQL parser drops comments).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tok<'a> {
    /// An unquoted identifier or keyword.
    Word(&'a str),
    Number,
    /// A string literal, quoted identifier or dollar-quoted string.
    Quoted,
    Param,
    /// The text of a comment, without its delimiters.
    Comment(&'a str),
    /// A `;`, with its byte offset.
    Semicolon(usize),
    Punct(u8),
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// A PostgreSQL-aware lexer that never fails: unterminated strings and
/// comments extend to the end of the input.
pub(super) struct Lexer<'a> {
    s: &'a str,
    i: usize,
    /// Set when a block comment ran to the end of the input.
    pub(super) unterminated: bool,
}

impl<'a> Lexer<'a> {
    pub(super) fn new(s: &'a str) -> Self {
        Lexer {
            s,
            i: 0,
            unterminated: false,
        }
    }

    /// Skips a quoted run starting at the opening quote `self.i`; `q` is the
    /// quote byte, doubled to escape; `backslash` enables `\` escapes.
    fn skip_quoted(&mut self, q: u8, backslash: bool) {
        let b = self.s.as_bytes();
        let mut j = self.i + 1;
        while j < b.len() {
            if backslash && b[j] == b'\\' {
                j += 2;
                continue;
            }
            if b[j] == q {
                if b.get(j + 1) == Some(&q) {
                    j += 2;
                    continue;
                }
                self.i = j + 1;
                return;
            }
            j += 1;
        }
        self.i = b.len();
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Tok<'a>;

    fn next(&mut self) -> Option<Tok<'a>> {
        let s = self.s;
        let b = s.as_bytes();
        while self.i < b.len() && (b[self.i].is_ascii_whitespace() || b[self.i] == 0x0b) {
            self.i += 1;
        }
        let i = self.i;
        let c = *b.get(i)?;
        let next = b.get(i + 1).copied();
        match c {
            b'-' if next == Some(b'-') => {
                let end = s[i..].find('\n').map_or(b.len(), |p| i + p);
                self.i = end;
                Some(Tok::Comment(&s[i + 2..end]))
            }
            b'/' if next == Some(b'*') => {
                let mut depth = 1usize;
                let mut j = i + 2;
                let mut content_end = b.len();
                while j < b.len() {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            content_end = j - 2;
                            break;
                        }
                    } else {
                        j += 1;
                    }
                }
                self.i = j.min(b.len());
                if depth > 0 {
                    self.unterminated = true;
                }
                Some(Tok::Comment(&s[i + 2..content_end]))
            }
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Some(Tok::Quoted)
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                Some(Tok::Quoted)
            }
            b';' => {
                self.i += 1;
                Some(Tok::Semicolon(i))
            }
            b'$' => {
                if next.is_some_and(|n| n.is_ascii_digit()) {
                    let mut j = i + 1;
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                    self.i = j;
                    return Some(Tok::Param);
                }
                let mut j = i + 1;
                while j < b.len() && (is_ident_start(b[j]) || b[j].is_ascii_digit()) {
                    j += 1;
                }
                if b.get(j) == Some(&b'$') {
                    let tag = &s[i..=j];
                    self.i = s[j + 1..]
                        .find(tag)
                        .map_or(b.len(), |p| j + 1 + p + tag.len());
                    Some(Tok::Quoted)
                } else {
                    self.i += 1;
                    Some(Tok::Punct(b'$'))
                }
            }
            c if is_ident_start(c) => {
                let mut j = i + 1;
                while j < b.len() && is_ident_char(b[j]) {
                    j += 1;
                }
                let w = &s[i..j];
                self.i = j;
                if b.get(j) == Some(&b'\'') {
                    if w.eq_ignore_ascii_case("e") {
                        self.skip_quoted(b'\'', true);
                        return Some(Tok::Quoted);
                    }
                    if matches!(w, "b" | "B" | "x" | "X" | "n" | "N") {
                        self.skip_quoted(b'\'', false);
                        return Some(Tok::Quoted);
                    }
                }
                if w.eq_ignore_ascii_case("u")
                    && b.get(j) == Some(&b'&')
                    && let Some(&q @ (b'\'' | b'"')) = b.get(j + 1)
                {
                    self.i = j + 1;
                    self.skip_quoted(q, false);
                    return Some(Tok::Quoted);
                }
                Some(Tok::Word(w))
            }
            c if c.is_ascii_digit() || (c == b'.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'.')
                {
                    j += 1;
                }
                self.i = j;
                Some(Tok::Number)
            }
            c => {
                self.i += 1;
                Some(Tok::Punct(c))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok<'_>> {
        Lexer::new(s).collect()
    }

    #[test]
    fn lexer_skips_strings_and_comments() {
        let s = "a 'b;c' \"d;\" $$e;$$ $t$f$$;$t$ E'\\';' -- x\n/* /* y */ */ ;";
        assert_eq!(
            toks(s),
            vec![
                Tok::Word("a"),
                Tok::Quoted,
                Tok::Quoted,
                Tok::Quoted,
                Tok::Quoted,
                Tok::Quoted,
                Tok::Comment(" x"),
                Tok::Comment(" /* y */ "),
                Tok::Semicolon(s.len() - 1),
            ]
        );
    }

    #[test]
    fn lexer_params_numbers_and_unterminated() {
        assert_eq!(
            toks("$1 1.5e3 a$b U&'x' 'open"),
            vec![
                Tok::Param,
                Tok::Number,
                Tok::Word("a$b"),
                Tok::Quoted,
                Tok::Quoted
            ]
        );
        assert_eq!(toks("/* open"), vec![Tok::Comment(" open")]);
        assert_eq!(toks("$tag$ open"), vec![Tok::Quoted]);
        assert_eq!(toks("-- x"), vec![Tok::Comment(" x")]);
        assert_eq!(toks("é;"), vec![Tok::Word("é"), Tok::Semicolon(2)]);
    }
}
