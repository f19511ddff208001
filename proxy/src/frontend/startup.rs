//! The startup phase of a client connection: SSL/GSS negotiation, the
//! startup packet, cancel requests and authentication (the exchange; the
//! SCRAM and md5 primitives are in [`super::auth`]). After a successful
//! startup the connection is handed to a session (by
//! [`crate::server::listen`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pgwire::messages::PgWireFrontendMessage;
use pgwire::messages::startup::Authentication;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth::{self, AuthError, ScramServer, ScramVerifier};
use super::conn::{ClientConn, ClientError, ClientStream};
use crate::config::AuthMethod;
use crate::server::settings::UserEntry;
use crate::server::shared::Shared;
use crate::wire::{self, PgError, ProtocolError, StartupPacket};

/// What a client asked for in its startup packet, after authentication.
#[derive(Clone, Debug)]
pub struct StartupInfo {
    /// The client user.
    pub user: String,
    /// The database.
    pub database: String,
    /// Other parameters (`application_name`, `client_encoding`, GUCs, …),
    /// lower-cased names, `options` expanded.
    pub params: BTreeMap<String, String>,
    /// The user's configuration.
    pub entry: Arc<UserEntry>,
    /// Set when the client asked for the admin console (database
    /// `lagrouter` or `pgbouncer`) and may use it.
    pub console: Option<ConsoleRole>,
}

/// The databases that name the admin console instead of a server database.
pub const CONSOLE_DATABASES: [&str; 2] = ["lagrouter", "pgbouncer"];

/// What a console user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleRole {
    /// Every command (`proxy.admin_users`).
    Admin,
    /// `SHOW` commands only (`proxy.stats_users`).
    Stats,
}

/// Runs the startup phase of one client connection: negotiation, startup
/// packet, cancel requests and authentication, within
/// `client_login_timeout`. Returns the connection and what the client asked
/// for, ready for a session; `None` when the connection is done (cancel
/// request, refused or failed startup: the client was told).
pub async fn accept(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(ClientConn, StartupInfo)> {
    let _ = tcp.set_nodelay(true);
    let mut conn = ClientConn::new(ClientStream::Plain(tcp), peer);
    let login_timeout = shared.settings().config.proxy.client_login_timeout;
    let startup = tokio::time::timeout(login_timeout, startup(shared, &mut conn)).await;
    let info = match startup {
        Ok(Ok(Some(info))) => info,
        Ok(Ok(None)) => return None, // cancel request or clean close
        Ok(Err(ClientError::Fatal(e))) => {
            debug!(%peer, error = %e, "startup refused");
            conn.fatal(&e).await;
            return None;
        }
        Ok(Err(ClientError::Protocol(e))) => {
            debug!(%peer, error = %e, "startup protocol violation");
            metrics::counter!(crate::metrics::PROTOCOL_ERRORS_TOTAL).increment(1);
            conn.fatal(&PgError::fatal(
                wire::SQLSTATE_PROTOCOL_VIOLATION,
                e.to_string(),
            ))
            .await;
            return None;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "client left during startup");
            return None;
        }
        Err(_) => {
            conn.fatal(&PgError::fatal(
                "08006",
                "canceling authentication due to timeout",
            ))
            .await;
            return None;
        }
    };
    Some((conn, info))
}

async fn read_startup_packet(conn: &mut ClientConn) -> Result<Bytes, ClientError> {
    loop {
        if let Some(p) = wire::split_startup(&mut conn.rbuf)? {
            return Ok(p);
        }
        conn.fill().await?;
    }
}

/// Negotiation, startup packet and authentication. `Ok(None)` when the
/// connection was a cancel request.
async fn startup(
    shared: &Arc<Shared>,
    conn: &mut ClientConn,
) -> Result<Option<StartupInfo>, ClientError> {
    let mut tls_done = false;
    let mut gss_done = false;
    let startup = loop {
        let packet = read_startup_packet(conn).await?;
        match wire::decode_startup(&packet)? {
            StartupPacket::Ssl => {
                if tls_done {
                    return Err(ProtocolError::Malformed {
                        what: "SSLRequest",
                        detail: "duplicate SSLRequest".into(),
                    }
                    .into());
                }
                tls_done = true;
                // Bytes sent after the SSLRequest before our answer would be
                // processed unencrypted (CVE-2021-23222): refuse them.
                if !conn.rbuf.is_empty() {
                    return Err(ProtocolError::Malformed {
                        what: "SSLRequest",
                        detail: "unencrypted data after SSLRequest".into(),
                    }
                    .into());
                }
                let acceptor = shared.settings().tls.clone();
                match acceptor {
                    Some(acceptor) => {
                        conn.stream.write_all(b"S").await?;
                        let ClientStream::Plain(tcp) =
                            std::mem::replace(&mut conn.stream, ClientStream::Detached)
                        else {
                            return Err(ClientError::Closed);
                        };
                        let tls = acceptor.accept(tcp).await?;
                        conn.stream = ClientStream::Tls(Box::new(tls));
                    }
                    None => conn.stream.write_all(b"N").await?,
                }
            }
            StartupPacket::Gss => {
                if gss_done {
                    return Err(ProtocolError::Malformed {
                        what: "GSSENCRequest",
                        detail: "duplicate GSSENCRequest".into(),
                    }
                    .into());
                }
                gss_done = true;
                conn.stream.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                shared.cancel(pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup(s) => break s,
        }
    };

    let mut params: BTreeMap<String, String> = BTreeMap::new();
    let mut unsupported_options = Vec::new();
    let mut user = None;
    let mut database = None;
    let mut replication = false;
    for (k, v) in startup.parameters {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            "replication" => replication = !matches!(v.as_str(), "false" | "off" | "no" | "0"),
            "options" => {
                for (name, value) in
                    parse_options(&v).map_err(|m| ClientError::Fatal(PgError::fatal("22023", m)))?
                {
                    params.insert(name.to_ascii_lowercase(), value);
                }
            }
            k if k.starts_with("_pq_.") => unsupported_options.push(k.to_string()),
            _ => {
                params.insert(k.to_ascii_lowercase(), v);
            }
        }
    }
    if startup.protocol_number_minor != 0 || !unsupported_options.is_empty() {
        wire::encode(
            &pgwire::messages::startup::NegotiateProtocolVersion::new(0, unsupported_options),
            &mut conn.wbuf,
        );
    }
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Err(ClientError::Fatal(PgError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )));
    };
    if replication {
        return Err(ClientError::Fatal(PgError::fatal(
            "0A000",
            "replication connections are not supported by lagrouter-proxy",
        )));
    }
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    let settings = shared.settings();
    let entry = settings.users.get(&user).cloned();
    authenticate(conn, &user, entry.as_deref()).await?;
    let Some(entry) = entry else {
        unreachable!("authentication fails for unknown users")
    };
    let console = if CONSOLE_DATABASES.contains(&database.as_str()) {
        let proxy = &settings.config.proxy;
        if proxy.admin_users.contains(&user) {
            Some(ConsoleRole::Admin)
        } else if proxy.stats_users.contains(&user) {
            Some(ConsoleRole::Stats)
        } else {
            warn!(peer = %conn.peer, %user, "admin console refused");
            return Err(ClientError::Fatal(PgError::fatal(
                "28000",
                format!(
                    "user \"{user}\" may not use the admin console (database \"{database}\"): it is in neither proxy.admin_users nor proxy.stats_users"
                ),
            )));
        }
    } else {
        None
    };
    info!(peer = %conn.peer, %user, %database, console = console.is_some(), "client authenticated");
    Ok(Some(StartupInfo {
        user,
        database,
        params,
        entry,
        console,
    }))
}

/// Splits the `options` startup parameter (`-c name=value --name=value`,
/// backslash escapes spaces) into settings.
fn parse_options(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or("missing setting after -c in options")?
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else {
            return Err(format!("unsupported command-line option {w:?} in options"));
        };
        let (n, v) = setting.split_once('=').ok_or_else(|| {
            format!("invalid setting {setting:?} in options: expected name=value")
        })?;
        out.push((n.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

fn auth_failed(user: &str) -> ClientError {
    metrics::counter!(crate::metrics::AUTH_FAILURES_TOTAL).increment(1);
    ClientError::Fatal(PgError::fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    ))
}

async fn read_password_message(
    conn: &mut ClientConn,
) -> Result<pgwire::messages::startup::PasswordMessageFamily, ClientError> {
    conn.flush().await?;
    let frame = conn.read_frame().await?;
    if frame.tag != b'p' {
        return Err(ClientError::Fatal(PgError::fatal(
            wire::SQLSTATE_PROTOCOL_VIOLATION,
            format!(
                "expected password response, got message type {:?}",
                char::from(frame.tag)
            ),
        )));
    }
    match wire::decode_frontend(&frame)? {
        PgWireFrontendMessage::PasswordMessageFamily(p) => Ok(p),
        _ => Err(ProtocolError::UnknownType(frame.tag).into()),
    }
}

fn bad_message(e: impl std::fmt::Display) -> ClientError {
    ClientError::Fatal(PgError::fatal(
        wire::SQLSTATE_PROTOCOL_VIOLATION,
        format!("malformed authentication message: {e}"),
    ))
}

/// Authenticates the client against its configured user. Unknown users go
/// through the same exchange and fail at the end, as PostgreSQL does.
async fn authenticate(
    conn: &mut ClientConn,
    user: &str,
    entry: Option<&UserEntry>,
) -> Result<(), ClientError> {
    let method = entry.map_or(AuthMethod::ScramSha256, |e| e.auth);
    match method {
        AuthMethod::Trust => {}
        AuthMethod::Md5 => {
            let salt = auth::random_salt();
            wire::encode(&Authentication::MD5Password(salt.to_vec()), &mut conn.wbuf);
            let p = read_password_message(conn)
                .await?
                .into_password()
                .map_err(bad_message)?;
            let ok = entry.is_some_and(|e| auth::md5_check(user, &e.password, salt, &p.password));
            if !ok {
                warn!(peer = %conn.peer, %user, "md5 authentication failed");
                return Err(auth_failed(user));
            }
        }
        AuthMethod::ScramSha256 => {
            let verifier = match entry.and_then(|e| e.scram.clone()) {
                Some(v) => v,
                // Unknown user: a throwaway verifier so the exchange looks
                // the same and fails.
                None => ScramVerifier::from_password(&format!("{:x}", rand::random::<u128>())),
            };
            let mut server = ScramServer::new(user, verifier);
            wire::encode(
                &Authentication::SASL(vec![auth::SCRAM_SHA_256.to_string()]),
                &mut conn.wbuf,
            );
            let init = read_password_message(conn)
                .await?
                .into_sasl_initial_response()
                .map_err(bad_message)?;
            if init.auth_method != auth::SCRAM_SHA_256 {
                return Err(ClientError::Fatal(PgError::fatal(
                    wire::SQLSTATE_PROTOCOL_VIOLATION,
                    "client selected an invalid SASL authentication mechanism",
                )));
            }
            let data = init.data.unwrap_or_default();
            let first = server
                .client_first(&data)
                .map_err(|e| scram_error(conn, user, e))?;
            wire::encode(
                &Authentication::SASLContinue(Bytes::from(first)),
                &mut conn.wbuf,
            );
            let resp = read_password_message(conn)
                .await?
                .into_sasl_response()
                .map_err(bad_message)?;
            let fin = server
                .client_final(&resp.data)
                .map_err(|e| scram_error(conn, user, e))?;
            if entry.is_none() {
                return Err(auth_failed(user));
            }
            wire::encode(&Authentication::SASLFinal(Bytes::from(fin)), &mut conn.wbuf);
        }
    }
    if entry.is_none() {
        return Err(auth_failed(user));
    }
    wire::encode(&Authentication::Ok, &mut conn.wbuf);
    Ok(())
}

fn scram_error(conn: &ClientConn, user: &str, e: AuthError) -> ClientError {
    warn!(peer = %conn.peer, %user, error = %e, "SCRAM authentication failed");
    match e {
        AuthError::Protocol(m) => ClientError::Fatal(PgError::fatal(
            wire::SQLSTATE_PROTOCOL_VIOLATION,
            format!("malformed SCRAM message: {m}"),
        )),
        _ => auth_failed(user),
    }
}

/// Appends `BackendKeyData`.
pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    use pgwire::messages::startup::{BackendKeyData, SecretKey};
    wire::encode(&BackendKeyData::new(pid, SecretKey::I32(secret)), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "4MB".into())
            ]
        );
        assert_eq!(
            parse_options(r"-c application_name=a\ b").unwrap(),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
    }
}
