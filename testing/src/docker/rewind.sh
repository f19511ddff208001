# Command of the helper container that rejoins a former primary as a
# standby: it shares the stopped node's data volume (volumes_from), runs
# pg_rewind against the current primary over the replication network, and
# points the node at it.
set -eu
for bin in /usr/lib/postgresql/*/bin; do PATH="$bin:$PATH"; done
export PATH
pg_rewind -D "$PGDATA" --source-server="$LAGROUTER_SOURCE" -R -N
touch "$PGDATA/standby.signal"
printf '%s\n' "$LAGROUTER_CONNINFO_LINE" >> "$PGDATA/postgresql.auto.conf"
