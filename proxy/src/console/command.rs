//! The admin console's command language: what a client may type, parsed
//! without I/O.

use crate::wire::PgError;

/// What `SHOW` can list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Nodes: role, health, LSN, lag, timeline.
    Nodes,
    /// Backend pools.
    Pools,
    /// Client connections.
    Clients,
    /// Server connections.
    Servers,
    /// Counters per node and policy.
    Stats,
    /// The configuration in force.
    Config,
    /// The proxy's version.
    Version,
    /// The commands.
    Help,
}

/// One console command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `SHOW …`.
    Show(Listing),
    /// `RELOAD`: re-read the configuration file.
    Reload,
    /// `PAUSE [db]`: hold new transactions back, wait for running ones.
    Pause(Option<String>),
    /// `RESUME [db]`.
    Resume(Option<String>),
    /// `SHUTDOWN`: graceful shutdown of the proxy.
    Shutdown,
    /// An empty statement.
    Empty,
}

impl Command {
    /// Whether a `stats_users` member may run it (only `SHOW`).
    pub fn read_only(&self) -> bool {
        matches!(self, Command::Show(_) | Command::Empty)
    }

    /// The `CommandComplete` tag.
    pub fn tag(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Reload => "RELOAD",
            Command::Pause(_) => "PAUSE",
            Command::Resume(_) => "RESUME",
            Command::Shutdown => "SHUTDOWN",
            Command::Empty => "",
        }
    }
}

/// The commands and what they do, for `SHOW HELP`.
pub const HELP: &[(&str, &str)] = &[
    (
        "SHOW NODES",
        "role, health, LSN, lag and timeline of every node",
    ),
    (
        "SHOW POOLS",
        "server connection pools per node, user, database",
    ),
    ("SHOW CLIENTS", "client connections"),
    ("SHOW SERVERS", "server connections"),
    (
        "SHOW STATS",
        "statements, reads, fallbacks and token waits per node and policy",
    ),
    ("SHOW CONFIG", "the configuration in force"),
    ("SHOW VERSION", "the proxy's version"),
    ("SHOW HELP", "this list"),
    ("RELOAD", "re-read the configuration file"),
    (
        "PAUSE [db]",
        "hold new transactions back and wait for running ones",
    ),
    ("RESUME [db]", "let held-back transactions run"),
    ("SHUTDOWN", "shut the proxy down gracefully"),
];

/// Parses what a client sent in one `Query`: commands separated by `;`.
pub fn parse(sql: &str) -> Result<Vec<Command>, PgError> {
    let mut out = Vec::new();
    for stmt in sql.split(';') {
        let words: Vec<&str> = stmt.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        out.push(parse_one(&words, stmt.trim())?);
    }
    if out.is_empty() {
        out.push(Command::Empty);
    }
    Ok(out)
}

fn parse_one(words: &[&str], text: &str) -> Result<Command, PgError> {
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    let unknown = || {
        PgError::error("42601", format!("unknown admin console command: {text:?}"))
            .with_hint("SHOW HELP lists the commands.")
    };
    let database = |rest: &[&str]| -> Result<Option<String>, PgError> {
        match rest {
            [] => Ok(None),
            [db] => Ok(Some(unquote(db))),
            _ => Err(unknown()),
        }
    };
    Ok(match upper.as_slice() {
        ["SHOW", what] => Command::Show(match *what {
            "NODES" => Listing::Nodes,
            "POOLS" => Listing::Pools,
            "CLIENTS" => Listing::Clients,
            "SERVERS" => Listing::Servers,
            "STATS" => Listing::Stats,
            "CONFIG" => Listing::Config,
            "VERSION" => Listing::Version,
            "HELP" => Listing::Help,
            _ => return Err(unknown()),
        }),
        ["RELOAD"] => Command::Reload,
        ["SHUTDOWN"] => Command::Shutdown,
        ["PAUSE", ..] => Command::Pause(database(&words[1..])?),
        ["RESUME", ..] => Command::Resume(database(&words[1..])?),
        _ => return Err(unknown()),
    })
}

/// A database name as typed: `app` or `"app"`.
fn unquote(word: &str) -> String {
    word.strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .map(|w| w.replace("\"\"", "\""))
        .unwrap_or_else(|| word.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        let cases: &[(&str, Vec<Command>)] = &[
            ("SHOW NODES", vec![Command::Show(Listing::Nodes)]),
            ("show pools;", vec![Command::Show(Listing::Pools)]),
            ("  Show   Clients ; ", vec![Command::Show(Listing::Clients)]),
            ("SHOW SERVERS", vec![Command::Show(Listing::Servers)]),
            ("SHOW STATS", vec![Command::Show(Listing::Stats)]),
            ("SHOW CONFIG", vec![Command::Show(Listing::Config)]),
            ("SHOW VERSION", vec![Command::Show(Listing::Version)]),
            ("SHOW HELP", vec![Command::Show(Listing::Help)]),
            ("reload", vec![Command::Reload]),
            ("PAUSE", vec![Command::Pause(None)]),
            ("PAUSE app", vec![Command::Pause(Some("app".into()))]),
            ("RESUME app", vec![Command::Resume(Some("app".into()))]),
            ("RESUME", vec![Command::Resume(None)]),
            ("SHUTDOWN", vec![Command::Shutdown]),
            ("", vec![Command::Empty]),
            (";;", vec![Command::Empty]),
            (
                "SHOW VERSION; SHOW NODES",
                vec![
                    Command::Show(Listing::Version),
                    Command::Show(Listing::Nodes),
                ],
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(&parse(sql).unwrap(), want, "{sql}");
        }
        assert_eq!(
            parse("PAUSE \"app\"").unwrap(),
            vec![Command::Pause(Some("app".into()))]
        );
    }

    #[test]
    fn unknown_commands_are_syntax_errors() {
        for sql in [
            "SELECT 1",
            "SHOW",
            "SHOW FOO",
            "SHOW NODES NOW",
            "PAUSE a b",
            "RELOAD now",
            "DROP TABLE x",
        ] {
            let e = parse(sql).unwrap_err();
            assert_eq!(e.code, "42601", "{sql}");
            assert!(e.message.contains("unknown admin console command"), "{sql}");
        }
    }

    #[test]
    fn only_show_is_read_only() {
        assert!(Command::Show(Listing::Stats).read_only());
        for c in [
            Command::Reload,
            Command::Pause(None),
            Command::Resume(None),
            Command::Shutdown,
        ] {
            assert!(!c.read_only(), "{c:?}");
        }
    }
}
