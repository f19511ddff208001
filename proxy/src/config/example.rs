//! [`EXAMPLE_TOML`]: the complete, commented example configuration.

/// A complete, commented example configuration showing every key with its
/// default (it parses and validates as is).
pub const EXAMPLE_TOML: &str = r#"# lagrouter-proxy configuration

[proxy]
listen = "127.0.0.1:6432"          # PostgreSQL protocol listener
admin_listen = "127.0.0.1:9930"    # HTTP: /metrics /health /status
max_client_connections = 10000     # client sockets, logged in or not
client_login_timeout = "60s"       # startup and authentication must finish within this
shutdown_timeout = "30s"           # graceful shutdown grace period
client_idle_timeout = "0s"         # 0 = never close idle clients
idle_transaction_timeout = "0s"    # 0 = never close clients idle inside a transaction
client_write_timeout = "30s"       # close a client that reads nothing for this long; 0 = never
admin_users = []                   # users who may run every command of the admin console (psql ... dbname=lagrouter)
stats_users = []                   # users who may run its SHOW commands only
workers = 0                        # threads running client sessions; 0 = half the CPUs, at least 1 (restart to change)

[routing]
policy = "read-your-writes"        # read-your-writes | bounded-staleness | eventual | primary | primary-after-write
max_wait = "100ms"                 # how long a token-gated read waits for a replica
then = "primary"                   # after max_wait: primary | error
max_lag = "1s"                     # bounded-staleness only
primary_window = "2s"              # primary-after-write only
monitor_interval = "100ms"         # replica lag polling period
probe_timeout = "2s"               # a node that does not answer a probe this long is ejected
retry_on_replica_error = true      # retry reads on the primary after SQLSTATE 25006
transactions = "optimistic"        # BEGIN (not READ ONLY): optimistic (on a replica until it writes) | primary

# Optional: lets clients use TLS (sslmode=require).
# [tls]
# cert = "server.crt"              # relative paths: relative to this file
# key = "server.key"

[[nodes]]                          # exactly one primary
name = "primary"
host = "127.0.0.1"
port = 5432
role = "primary"

[[nodes]]                          # any number of replicas
name = "replica1"
host = "127.0.0.1"
port = 5433
role = "replica"
# pool_size = 40                   # overrides pool.size for this node

[pool]
size = 20                          # per node per (user, database)
min_idle = 0                       # idle connections kept open per pool, opened ahead of demand
checkout_timeout = "5s"
connect_timeout = "5s"
server_idle_timeout = "10m"        # close connections idle this long (down to min_idle); 0 = never

[[users]]
name = "app"
password = "secret"                # plain text, SCRAM-SHA-256$... verifier or md5... hash
auth = "scram-sha-256"             # scram-sha-256 | md5 | trust
# server_user = "app"              # backend credentials; default: name / password
# server_password = "secret"
# consistency = "bounded-staleness 1s"  # this user's default read policy (as SET lagrouter.consistency)
"#;
