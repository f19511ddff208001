//! The `SHOW` listings, built from the proxy's shared state. Column names
//! follow PgBouncer's where the concept is the same (`cl_active`,
//! `sv_idle`, `remote_pid`, `link`, …).

use std::time::{Duration, Instant, SystemTime};

use lagrouter::Role;

use super::command::{HELP, Listing};
use super::config_rows::config_rows;
use super::result::{Kind, ResultSet, flag, v};
use crate::server::Shared;
use crate::stats::{FALLBACK_COLUMNS, StatsRow};

/// The rows of one listing.
pub fn listing(shared: &Shared, what: Listing) -> ResultSet {
    match what {
        Listing::Nodes => nodes(shared),
        Listing::Pools => pools(shared),
        Listing::Clients => clients(shared),
        Listing::Servers => servers(shared),
        Listing::Stats => stats(shared),
        Listing::Config => config_rows(&shared.settings().config),
        Listing::Version => {
            let mut rs = ResultSet::new(&[("version", Kind::Text)]);
            rs.push(vec![v(version())]);
            rs
        }
        Listing::Help => {
            let mut rs = ResultSet::new(&[("command", Kind::Text), ("description", Kind::Text)]);
            for (c, d) in HELP {
                rs.push(vec![v(c), v(d)]);
            }
            rs
        }
    }
}

/// `lagrouter-proxy <version>`.
pub fn version() -> String {
    format!("lagrouter-proxy {}", env!("CARGO_PKG_VERSION"))
}

fn role(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::Unknown => "unknown",
    }
}

fn time(t: SystemTime) -> Option<String> {
    v(humantime::format_rfc3339_seconds(t))
}

/// Wall-clock time of an `Instant` in the past.
fn wall(at: Instant) -> Option<String> {
    let ago = Instant::now().saturating_duration_since(at);
    time(SystemTime::now() - ago)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn nodes(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("name", Kind::Text),
        ("host", Kind::Text),
        ("port", Kind::Int),
        ("role", Kind::Text),
        ("healthy", Kind::Bool),
        ("lsn", Kind::Text),
        ("lag_bytes", Kind::Int),
        ("lag_ms", Kind::Float),
        ("timeline", Kind::Int),
        ("last_error", Kind::Text),
    ]);
    let topo = shared.monitor.snapshot();
    for (i, n) in topo.nodes.iter().enumerate() {
        let (host, port) = shared.node_address(i).unwrap_or_default();
        rs.push(vec![
            v(&n.name),
            v(host),
            v(port),
            v(role(n.role)),
            flag(n.healthy),
            n.lsn.map(|l| l.to_string()),
            n.lag_bytes.map(|b| b.to_string()),
            n.lag.map(ms),
            n.timeline.map(|t| t.to_string()),
            n.last_error.clone(),
        ]);
    }
    rs
}

fn node_name(shared: &Shared, node: usize) -> Option<String> {
    shared.node_names().get(node).cloned()
}

fn pools(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Kind::Text),
        ("user", Kind::Text),
        ("node", Kind::Text),
        ("role", Kind::Text),
        ("cl_active", Kind::Int),
        ("cl_waiting", Kind::Int),
        ("sv_active", Kind::Int),
        ("sv_idle", Kind::Int),
        ("sv_open", Kind::Int),
        ("pool_size", Kind::Int),
        ("sv_opened_total", Kind::Int),
        ("pool_mode", Kind::Text),
        ("paused", Kind::Bool),
    ]);
    let topo = shared.monitor.snapshot();
    let clients = shared.registry.list();
    let paused = shared.pause.paused();
    for p in shared.pools.stats() {
        let active = clients
            .iter()
            .filter(|c| *c.database == *p.database && c.server_user() == p.user)
            .filter(|c| {
                c.server
                    .lock()
                    .expect("cancel slot")
                    .is_some_and(|t| t.node == p.node)
            })
            .count();
        rs.push(vec![
            v(&p.database),
            v(&p.user),
            node_name(shared, p.node),
            topo.nodes.get(p.node).map(|n| role(n.role).to_string()),
            v(active),
            v(p.waiting),
            v(p.in_use),
            v(p.idle),
            v(p.open),
            v(p.size),
            v(p.created_total),
            v("transaction"),
            flag(paused.covers(&p.database)),
        ]);
    }
    rs
}

fn clients(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("type", Kind::Text),
        ("id", Kind::Int),
        ("user", Kind::Text),
        ("database", Kind::Text),
        ("state", Kind::Text),
        ("addr", Kind::Text),
        ("port", Kind::Int),
        ("connect_time", Kind::Text),
        ("tls", Kind::Bool),
        ("application_name", Kind::Text),
        ("node", Kind::Text),
        ("remote_pid", Kind::Int),
    ]);
    for c in shared.registry.list() {
        let server = *c.server.lock().expect("cancel slot");
        let state = if server.is_some() {
            "active"
        } else if c.waiting.load(std::sync::atomic::Ordering::Relaxed) {
            "waiting"
        } else {
            "idle"
        };
        rs.push(vec![
            v("C"),
            v(c.id),
            v(c.user()),
            v(&c.database),
            v(state),
            v(c.peer.ip()),
            v(c.peer.port()),
            time(c.connected_at),
            flag(c.tls),
            v(&*c.application_name),
            server.and_then(|t| node_name(shared, t.node)),
            server.map(|t| t.pid.to_string()),
        ]);
    }
    rs
}

fn servers(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("type", Kind::Text),
        ("user", Kind::Text),
        ("database", Kind::Text),
        ("node", Kind::Text),
        ("state", Kind::Text),
        ("addr", Kind::Text),
        ("port", Kind::Int),
        ("connect_time", Kind::Text),
        ("idle_ms", Kind::Float),
        ("remote_pid", Kind::Int),
        ("link", Kind::Int),
    ]);
    for c in shared.registry.list() {
        let Some(t) = *c.server.lock().expect("cancel slot") else {
            continue;
        };
        rs.push(vec![
            v("S"),
            v(c.server_user()),
            v(&c.database),
            node_name(shared, t.node),
            v("active"),
            v(t.addr.ip()),
            v(t.addr.port()),
            wall(t.created_at),
            None,
            v(t.pid),
            v(c.id),
        ]);
    }
    for s in shared.pools.idle_servers() {
        rs.push(vec![
            v("S"),
            v(&s.user),
            v(&s.database),
            node_name(shared, s.node),
            v("idle"),
            v(s.addr.ip()),
            v(s.addr.port()),
            wall(s.created_at),
            v(ms(s.idle_since.elapsed())),
            v(s.pid),
            None,
        ]);
    }
    rs
}

fn stats(shared: &Shared) -> ResultSet {
    let mut columns = vec![
        ("node", Kind::Text),
        ("policy", Kind::Text),
        ("statements", Kind::Int),
        ("writes", Kind::Int),
        ("reads", Kind::Int),
        ("replica_reads", Kind::Int),
        ("fallbacks", Kind::Int),
    ];
    columns.extend(FALLBACK_COLUMNS.iter().map(|r| (*r, Kind::Int)));
    columns.extend([
        ("token_waits", Kind::Int),
        ("token_wait_us", Kind::Int),
        ("avg_token_wait_us", Kind::Int),
    ]);
    let mut rs = ResultSet::new(&columns);
    for r in shared.stats.rows() {
        let StatsRow {
            node,
            policy,
            statements,
            reads,
            replica_reads,
            writes,
            fallbacks,
            token_waits,
            token_wait_us,
        } = r;
        let mut row = vec![
            node_name(shared, node),
            v(policy),
            v(statements),
            v(writes),
            v(reads),
            v(replica_reads),
            v(fallbacks.iter().sum::<u64>()),
        ];
        row.extend(fallbacks.iter().map(v));
        row.extend([
            v(token_waits),
            v(token_wait_us),
            v(token_wait_us.checked_div(token_waits).unwrap_or(0)),
        ]);
        rs.push(row);
    }
    rs
}
