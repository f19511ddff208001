"""psycopg 3 through lagrouter-proxy: autocommit and default (transaction)
mode, automatically prepared statements across DDL, pipeline mode,
server-side cursors, COPY and a non-UTF-8 client encoding. Each check
asserts the results and where statements ran (pg_is_in_recovery()).

Run by the proxy's e2e test `drivers::psycopg`, with LAGROUTER_DSN set to
a libpq connection string of the proxy. Exits non-zero on the first failed
check.
"""

import os

import psycopg

DSN = os.environ["LAGROUTER_DSN"]


def check(cond, what):
    if not cond:
        raise SystemExit(f"psycopg check failed: {what}")


def autocommit():
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS py_t")
        c.execute("CREATE TABLE py_t(id int PRIMARY KEY, v text)")
        on_replica = 0
        for i in range(20):
            c.execute("INSERT INTO py_t VALUES (%s, %s)", (i, f"v{i}"))
            v, replica = c.execute(
                "SELECT v, pg_is_in_recovery() FROM py_t WHERE id = %s", (i,)
            ).fetchone()
            check(v == f"v{i}", f"read-your-writes: {v!r}")
            on_replica += replica
        check(on_replica >= 18, f"writer's read-backs on replicas: {on_replica}/20")
        # psycopg prepares a query after 5 runs; DDL makes it deallocate
        # its statements and the result shape changes.
        for _ in range(8):
            row = c.execute("SELECT * FROM py_t WHERE id = %s", (1,)).fetchone()
            check(len(row) == 2, f"row {row!r}")
        c.execute("ALTER TABLE py_t ADD COLUMN extra int DEFAULT 7")
        for _ in range(8):
            row = c.execute("SELECT * FROM py_t WHERE id = %s", (1,)).fetchone()
            check(row == (1, "v1", 7), f"row after ALTER {row!r}")
        check(
            c.execute("SHOW transaction_read_only").fetchone()[0] == "off",
            "transaction_read_only leaked from a replica",
        )
    print(f"psycopg autocommit: ok ({on_replica}/20 of a writer's read-backs on replicas)")


def default_mode():
    with psycopg.connect(DSN) as c:  # every statement inside a transaction
        c.execute("INSERT INTO py_t VALUES (100, 'tx')")
        v, replica = c.execute(
            "SELECT v, pg_is_in_recovery() FROM py_t WHERE id = 100"
        ).fetchone()
        check(v == "tx" and not replica, "own transaction's write, on the primary")
        c.commit()
        c.read_only = True  # BEGIN READ ONLY: a replica
        for _ in range(5):
            v, replica = c.execute(
                "SELECT v, pg_is_in_recovery() FROM py_t WHERE id = 100"
            ).fetchone()
            check(v == "tx", "committed write visible")
            check(replica, "read-only transaction on a replica")
            c.commit()
        # Plain transactions that only read start on replicas too
        # (routing.transactions = "optimistic"). `None`: a plain BEGIN
        # (`False` sends BEGIN READ WRITE, which a replica refuses).
        c.read_only = None
        on_replica = 0
        for _ in range(10):
            v, replica = c.execute(
                "SELECT v, pg_is_in_recovery() FROM py_t WHERE id = 100"
            ).fetchone()
            check(v == "tx", "committed write visible")
            on_replica += replica
            c.commit()
        check(on_replica >= 9, f"default-mode read-only transactions on replicas: {on_replica}/10")
        # Read, then write: the transaction moves to the primary with its
        # read replayed there.
        (v,) = c.execute("SELECT v FROM py_t WHERE id = 100").fetchone()
        c.execute("UPDATE py_t SET v = %s WHERE id = 100", (v + "!",))
        v, replica = c.execute(
            "SELECT v, pg_is_in_recovery() FROM py_t WHERE id = 100"
        ).fetchone()
        check(v == "tx!" and not replica, f"read-then-write transaction: {v!r}, replica {replica}")
        c.commit()
    print(f"psycopg default mode: ok ({on_replica}/10 read-only transactions on replicas)")


def pipeline_cursors_copy():
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS py_copy")
        c.execute("CREATE TABLE py_copy(id int, v text)")
        with c.pipeline():
            cur = c.cursor()
            for i in range(10):
                cur.execute("INSERT INTO py_copy VALUES (%s, %s)", (i, "p"))
            cur.execute("SELECT count(*) FROM py_copy")
        check(cur.fetchone()[0] == 10, "pipeline mode")
        cur = c.cursor()
        with cur.copy("COPY py_copy (id, v) FROM STDIN") as cp:
            for i in range(10, 110):
                cp.write_row((i, "copied"))
        with cur.copy("COPY (SELECT id FROM py_copy ORDER BY id) TO STDOUT") as cp:
            ids = [int(r[0]) for r in cp.rows()]
        check(ids == list(range(110)), f"COPY round trip: {len(ids)} rows")
        # A WITH HOLD server-side cursor outlives its transaction.
        with c.cursor(name="py_hold", withhold=True) as sc:
            sc.execute("SELECT id FROM py_copy ORDER BY id")
            check(sum(1 for _ in sc) == 110, "WITH HOLD cursor")
    with psycopg.connect(DSN) as c:
        with c.cursor(name="py_ssc") as sc:
            sc.itersize = 7
            sc.execute("SELECT id FROM py_copy")
            check(sum(1 for _ in sc) == 110, "server-side cursor")
    print("psycopg pipeline, cursors, COPY: ok")


def encoding():
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute("SET client_encoding TO latin9")
        for _ in range(4):
            check(c.execute("SELECT %s::text", ("€",)).fetchone()[0] == "€", "LATIN9 parameter")
            check(c.execute("SELECT '€'").fetchone()[0] == "€", "LATIN9 literal")
    print("psycopg client_encoding: ok")


autocommit()
default_mode()
pipeline_cursors_copy()
encoding()
