# Command of a lagrouter-testing node container, run by bash as the
# `postgres` OS user; the same on lagrouter/postgres:15 and on the official
# postgres image (whose entrypoint is not used). On the first start a
# primary runs initdb and writes its configuration, and a standby takes a
# base backup from its upstream; every start then runs the server as the
# container's main process, so stopping the server stops the container.
set -eu
for bin in /usr/lib/postgresql/*/bin; do PATH="$bin:$PATH"; done
export PATH
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  case "${LAGROUTER_ROLE:-}" in
  primary)
    pwfile=$(mktemp)
    printf '%s\n' "$LAGROUTER_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$LAGROUTER_USER" --pwfile="$pwfile" -A trust \
      -E UTF8 --locale=C -N --no-instructions
    rm -f "$pwfile"
    printf '%s\n' "$LAGROUTER_CONF" >> "$PGDATA/postgresql.conf"
    printf '%s\n' "$LAGROUTER_HBA" > "$PGDATA/pg_hba.conf"
    ;;
  standby)
    # The container joins the replication network just after it starts.
    export PGPASSWORD="$LAGROUTER_PASSWORD"
    tries=0
    until pg_isready -q -h "$LAGROUTER_UPSTREAM" -p 5432 -U "$LAGROUTER_USER" -d postgres; do
      tries=$((tries + 1))
      if [ "$tries" -ge 600 ]; then
        echo "lagrouter-node: upstream $LAGROUTER_UPSTREAM is not reachable" >&2
        exit 1
      fi
      sleep 0.1
    done
    pg_basebackup -D "$PGDATA" -R -X stream -c fast -N -w \
      -h "$LAGROUTER_UPSTREAM" -p 5432 -U "$LAGROUTER_USER"
    unset PGPASSWORD
    printf '%s\n' "$LAGROUTER_CONNINFO_LINE" >> "$PGDATA/postgresql.auto.conf"
    ;;
  *)
    echo "lagrouter-node: LAGROUTER_ROLE must be primary or standby" >&2
    exit 2
    ;;
  esac
fi
chmod 0700 "$PGDATA"
exec postgres -D "$PGDATA"
