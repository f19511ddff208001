//! `SET` / `RESET`: classifying the statements that change session settings
//! (as [`StatementKind::Set`] / [`StatementKind::Reset`]) and building the
//! statements that replay them on another backend connection.

use sqlparser::ast::{
    Expr, ObjectName, Set, TransactionAccessMode, TransactionIsolationLevel, TransactionMode,
    UnaryOperator, Value,
};

use super::parser::read_only_mode;
use super::types::{PinReason, StatementKind};

/// GUCs whose list values PostgreSQL quotes element by element
/// (`GUC_LIST_QUOTE`): their values are replayed as identifier lists.
const LIST_QUOTE_GUCS: &[&str] = &[
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "local_preload_libraries",
    "shared_preload_libraries",
];

/// Builds the `SET` statement that re-applies a session setting recorded as
/// [`StatementKind::Set`] on another backend connection.
///
/// The name is quoted as an identifier (each dotted part separately) and the
/// value as a string literal (an `E''` literal when it contains a
/// backslash, so the result does not depend on
/// `standard_conforming_strings`). For list GUCs such as `search_path`, a
/// value that is a list of identifiers (`"$user", public`) is emitted as a
/// list of quoted identifiers, which PostgreSQL stores identically.
///
/// ```
/// use lagrouter_proxy::classify::set_statement_sql;
/// assert_eq!(
///     set_statement_sql("application_name", "it's"),
///     r#"SET "application_name" TO 'it''s'"#
/// );
/// assert_eq!(
///     set_statement_sql("search_path", r#""$user", public"#),
///     r#"SET "search_path" TO "$user", "public""#
/// );
/// ```
pub fn set_statement_sql(name: &str, value: &str) -> String {
    let mut out = String::with_capacity(16 + name.len() + value.len());
    out.push_str("SET ");
    push_guc_name(&mut out, name);
    out.push_str(" TO ");
    let lowered = name.to_ascii_lowercase();
    if LIST_QUOTE_GUCS.contains(&lowered.as_str())
        && let Some(elems) = split_ident_list(value)
    {
        for (i, e) in elems.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            push_quoted_ident(&mut out, e);
        }
        return out;
    }
    push_string_literal(&mut out, value);
    out
}

/// Builds the `RESET` statement for a parameter, or `RESET ALL` for `None`.
///
/// ```
/// use lagrouter_proxy::classify::reset_statement_sql;
/// assert_eq!(reset_statement_sql(None), "RESET ALL");
/// assert_eq!(reset_statement_sql(Some("lagrouter.min_token")), r#"RESET "lagrouter"."min_token""#);
/// ```
pub fn reset_statement_sql(name: Option<&str>) -> String {
    match name {
        None => "RESET ALL".to_owned(),
        Some(n) => {
            let mut out = String::from("RESET ");
            push_guc_name(&mut out, n);
            out
        }
    }
}

fn push_guc_name(out: &mut String, name: &str) {
    for (i, part) in name.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_quoted_ident(out, part);
    }
}

fn push_quoted_ident(out: &mut String, ident: &str) {
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        if c != '\0' {
            out.push(c);
        }
    }
    out.push('"');
}

fn push_string_literal(out: &mut String, value: &str) {
    let escape = value.contains('\\');
    if escape {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// Splits `a, "B c", d` into its identifiers; `None` when it is not such a
/// list (or is empty).
fn split_ident_list(value: &str) -> Option<Vec<String>> {
    let b = value.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return None; // empty list or trailing comma
        }
        if b[i] == b'"' {
            let mut s = String::new();
            i += 1;
            loop {
                let rest = value.get(i..)?;
                let q = rest.find('"')?;
                s.push_str(&rest[..q]);
                i += q + 1;
                if b.get(i) == Some(&b'"') {
                    s.push('"');
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(s);
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' && !b[i].is_ascii_whitespace() {
                if b[i] == b'"' || b[i] == b'\'' {
                    return None;
                }
                i += 1;
            }
            out.push(value[start..i].to_owned());
        }
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return Some(out);
        }
        if b[i] != b',' {
            return None;
        }
        i += 1;
    }
}

/// PostgreSQL's `quote_identifier`, without its keyword check.
fn pg_quote_ident(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if safe {
        s.to_owned()
    } else {
        let mut out = String::with_capacity(s.len() + 2);
        push_quoted_ident(&mut out, s);
        out
    }
}

pub(super) fn guc_name(name: &ObjectName) -> String {
    let mut out = String::new();
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part.as_ident() {
            Some(id) => out.push_str(&id.value.to_lowercase()),
            None => out.push_str(&part.to_string().to_lowercase()),
        }
    }
    out
}

enum FlatValue {
    Default,
    /// A string literal or quoted identifier: list GUCs quote it.
    Text(String),
    /// A number or keyword: never quoted.
    Bare(String),
}

fn flat_value(e: &Expr) -> Option<FlatValue> {
    Some(match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::NationalStringLiteral(s)
            | Value::UnicodeStringLiteral(s) => FlatValue::Text(s.clone()),
            Value::DollarQuotedString(d) => FlatValue::Text(d.value.clone()),
            Value::Number(n, _) => FlatValue::Bare(n.clone()),
            Value::Boolean(b) => FlatValue::Bare(b.to_string()),
            _ => return None,
        },
        Expr::Identifier(id) => match id.quote_style {
            None if id.value.eq_ignore_ascii_case("default") => FlatValue::Default,
            None => FlatValue::Text(id.value.to_lowercase()),
            Some('"') => FlatValue::Text(id.value.clone()),
            Some(_) => return None,
        },
        Expr::UnaryOp { op, expr } => match (op, flat_value(expr)?) {
            (UnaryOperator::Minus, FlatValue::Bare(n)) => FlatValue::Bare(format!("-{n}")),
            (UnaryOperator::Plus, FlatValue::Bare(n)) => FlatValue::Bare(n),
            _ => return None,
        },
        _ => return None,
    })
}

/// A `SET name = values` statement as a [`StatementKind`].
fn set_kind(name: String, values: &[Expr], local: bool) -> StatementKind {
    let flats: Option<Vec<FlatValue>> = values.iter().map(flat_value).collect();
    let Some(flats) = flats.filter(|f| !f.is_empty()) else {
        return unsupported_set(local);
    };
    if flats.iter().any(|f| matches!(f, FlatValue::Default)) {
        if flats.len() != 1 {
            return unsupported_set(local);
        }
        return if local {
            StatementKind::Set {
                name,
                value: "DEFAULT".to_owned(),
                local,
            }
        } else {
            StatementKind::Reset { name: Some(name) }
        };
    }
    let quote = LIST_QUOTE_GUCS.contains(&name.as_str());
    let mut value = String::new();
    for (i, f) in flats.iter().enumerate() {
        if i > 0 {
            value.push_str(", ");
        }
        match f {
            FlatValue::Text(t) if quote => value.push_str(&pg_quote_ident(t)),
            FlatValue::Text(t) | FlatValue::Bare(t) => value.push_str(t),
            FlatValue::Default => {}
        }
    }
    StatementKind::Set { name, value, local }
}

fn unsupported_set(local: bool) -> StatementKind {
    if local {
        // Transaction-local: nothing to replay, runs wherever the
        // transaction runs.
        StatementKind::Other
    } else {
        StatementKind::SessionPinning(PinReason::UnsupportedSet)
    }
}

pub(super) fn classify_set(set: &Set) -> StatementKind {
    use sqlparser::ast::{ContextModifier, SetSessionAuthorizationParamKind};
    match set {
        Set::SingleAssignment {
            scope,
            hivevar: false,
            variable,
            values,
        } => set_kind(
            guc_name(variable),
            values,
            matches!(scope, Some(ContextModifier::Local)),
        ),
        Set::SetTimeZone { local, value } => {
            let name = "timezone".to_owned();
            if let Expr::Identifier(id) = value
                && id.quote_style.is_none()
                && id.value.eq_ignore_ascii_case("local")
            {
                // `SET TIME ZONE LOCAL` means DEFAULT.
                return set_kind(name, &[Expr::Identifier("DEFAULT".into())], *local);
            }
            set_kind(name, std::slice::from_ref(value), *local)
        }
        Set::SetRole {
            context_modifier,
            role_name,
        } => {
            let local = matches!(context_modifier, Some(ContextModifier::Local));
            let value = match role_name {
                Some(r) if r.quote_style.is_some() => r.value.clone(),
                Some(r) => r.value.to_lowercase(),
                None => "none".to_owned(),
            };
            StatementKind::Set {
                name: "role".to_owned(),
                value,
                local,
            }
        }
        Set::SetSessionAuthorization(p) => {
            let local = matches!(p.scope, ContextModifier::Local);
            let name = "session_authorization".to_owned();
            match &p.kind {
                SetSessionAuthorizationParamKind::Default => {
                    set_kind(name, &[Expr::Identifier("DEFAULT".into())], local)
                }
                SetSessionAuthorizationParamKind::User(u) => {
                    set_kind(name, &[Expr::Identifier(u.clone())], local)
                }
            }
        }
        Set::SetNames {
            charset_name,
            collation_name: None,
        } => StatementKind::Set {
            name: "client_encoding".to_owned(),
            value: charset_name.value.clone(),
            local: false,
        },
        Set::SetNamesDefault {} => StatementKind::Reset {
            name: Some("client_encoding".to_owned()),
        },
        Set::SetTransaction {
            modes,
            snapshot: _,
            session: false,
        } => {
            if read_only_mode(modes) == Some(true) {
                StatementKind::SetTransactionReadOnly
            } else {
                StatementKind::Other
            }
        }
        Set::SetTransaction {
            modes,
            snapshot: None,
            session: true,
        } => match modes.as_slice() {
            [TransactionMode::AccessMode(m)] => StatementKind::Set {
                name: "default_transaction_read_only".to_owned(),
                value: match m {
                    TransactionAccessMode::ReadOnly => "on",
                    TransactionAccessMode::ReadWrite => "off",
                }
                .to_owned(),
                local: false,
            },
            [TransactionMode::IsolationLevel(level)] => StatementKind::Set {
                name: "default_transaction_isolation".to_owned(),
                value: match level {
                    TransactionIsolationLevel::ReadUncommitted => "read uncommitted",
                    TransactionIsolationLevel::ReadCommitted => "read committed",
                    TransactionIsolationLevel::RepeatableRead => "repeatable read",
                    TransactionIsolationLevel::Serializable => "serializable",
                    _ => return StatementKind::SessionPinning(PinReason::UnsupportedSet),
                }
                .to_owned(),
                local: false,
            },
            _ => StatementKind::SessionPinning(PinReason::UnsupportedSet),
        },
        _ => StatementKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ident_list_split() {
        assert_eq!(
            split_ident_list(r#""$user", public ,"a""b""#),
            Some(vec!["$user".into(), "public".into(), "a\"b".into()])
        );
        assert_eq!(split_ident_list(""), None);
        assert_eq!(split_ident_list("a,"), None);
        assert_eq!(split_ident_list("a b"), None);
        assert_eq!(split_ident_list("'a'"), None);
        assert_eq!(split_ident_list("\"open"), None);
    }
}
