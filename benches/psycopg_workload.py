"""ORM-style and read-your-writes workload through lagrouter-proxy with
psycopg 3 in its default mode (no autocommit: psycopg sends BEGIN before
the first statement of every transaction, as SQLAlchemy sessions do).

Sessions, each one connection, for --seconds:

* ORM sessions: transactions of two reads, committed; a share
  (--write-share) of them then update a row before committing (read, then
  write: an optimistic transaction moves to the primary). 40001 is retried.
* writers: insert (writer, seq) and commit, read it back in the next
  transaction at once, then after a random 0-40 ms. A read-back without the
  row is a read-your-writes violation.
* readers: max(seq) of a random writer, in a transaction; a value below one
  seen before is a monotonic-read violation.

Every read returns pg_is_in_recovery() (ORM reads in transactions that
write do not: their replay would see it change), so where reads ran is
measured at the server. With --metrics (the proxy's /metrics URL), the
proxy's transaction counters are reported too.

    python3 benches/psycopg_workload.py --dsn "host=127.0.0.1 port=6432 user=postgres password=postgres dbname=postgres" \
        --metrics http://127.0.0.1:9930/metrics
"""

import argparse
import random
import threading
import time
import urllib.request

import psycopg
from psycopg import errors

COUNTERS = [
    "lagrouter_proxy_transactions_offloaded_total",
    "lagrouter_proxy_transactions_replayed_total",
    "lagrouter_proxy_transactions_checksum_failed_total",
]


def metrics(url):
    if not url:
        return {}
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        for name in COUNTERS:
            if line.startswith(name):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, key, n=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n


def orm(dsn, stop, st, write_share):
    with psycopg.connect(dsn) as c:
        while not stop.is_set():
            writes = random.random() < write_share
            acct = random.randint(1, 100)
            for _attempt in range(5):
                try:
                    if writes:
                        (b,) = c.execute(
                            "SELECT balance FROM wl_accounts WHERE id = %s", (acct,)
                        ).fetchone()
                        c.execute(
                            "SELECT count(*) FROM wl_rows WHERE writer = %s", (acct % 4,)
                        ).fetchone()
                        c.execute(
                            "UPDATE wl_accounts SET balance = %s WHERE id = %s",
                            (b + 1, acct),
                        )
                        c.commit()
                        st.add("orm_rw")
                    else:
                        (_, r1) = c.execute(
                            "SELECT balance, pg_is_in_recovery() FROM wl_accounts WHERE id = %s",
                            (acct,),
                        ).fetchone()
                        (_, r2) = c.execute(
                            "SELECT count(*), pg_is_in_recovery() FROM wl_rows WHERE writer = %s",
                            (acct % 4,),
                        ).fetchone()
                        c.commit()
                        st.add("orm_ro")
                        st.add("orm_ro_replica", int(r1 and r2))
                    break
                except errors.SerializationFailure:
                    c.rollback()
                    st.add("retries_40001")


def writer(dsn, stop, st, w):
    seq = 0
    with psycopg.connect(dsn) as c:
        while not stop.is_set():
            seq += 1
            c.execute("INSERT INTO wl_rows VALUES (%s, %s)", (w, seq))
            c.commit()
            for kind in ("immediate", "delayed"):
                if kind == "delayed":
                    time.sleep(random.random() * 0.04)
                row = c.execute(
                    "SELECT 1, pg_is_in_recovery() FROM wl_rows WHERE writer = %s AND seq = %s",
                    (w, seq),
                ).fetchone()
                c.commit()
                st.add("writer_reads")
                if row is None:
                    st.add("ryw_violations")
                else:
                    st.add("writer_reads_replica", int(row[1]))


def reader(dsn, stop, st, writers):
    seen = {}
    with psycopg.connect(dsn) as c:
        while not stop.is_set():
            w = random.randrange(writers)
            m, replica = c.execute(
                "SELECT coalesce(max(seq), 0), pg_is_in_recovery() FROM wl_rows WHERE writer = %s",
                (w,),
            ).fetchone()
            c.commit()
            st.add("reader_reads")
            st.add("reader_reads_replica", int(replica))
            if m < seen.get(w, 0):
                st.add("monotonic_violations")
            seen[w] = max(m, seen.get(w, 0))
            time.sleep(0.002)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--metrics")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--orm", type=int, default=4)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--write-share", type=float, default=0.1)
    a = p.parse_args()
    with psycopg.connect(a.dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS wl_rows, wl_accounts")
        c.execute("CREATE TABLE wl_rows(writer int, seq int, PRIMARY KEY (writer, seq))")
        c.execute("CREATE TABLE wl_accounts(id int PRIMARY KEY, balance int NOT NULL)")
        c.execute("INSERT INTO wl_accounts SELECT i, 0 FROM generate_series(1, 100) i")
    time.sleep(0.5)  # the replicas replay the DDL
    before = metrics(a.metrics)
    st, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=orm, args=(a.dsn, stop, st, a.write_share)) for _ in range(a.orm)]
    threads += [threading.Thread(target=writer, args=(a.dsn, stop, st, w)) for w in range(a.writers)]
    threads += [threading.Thread(target=reader, args=(a.dsn, stop, st, max(a.writers, 1))) for _ in range(a.readers)]
    for t in threads:
        t.start()
    time.sleep(a.seconds)
    stop.set()
    for t in threads:
        t.join()
    after = metrics(a.metrics)
    c = st.c

    def pct(k, n):
        return f"{100.0 * c.get(k, 0) / max(c.get(n, 0), 1):.1f}%"

    print(f"ORM read-only transactions: {c.get('orm_ro', 0)}, on replicas {pct('orm_ro_replica', 'orm_ro')}")
    print(f"ORM read-then-write transactions: {c.get('orm_rw', 0)}, 40001 retries {c.get('retries_40001', 0)}")
    print(
        f"writers' read-backs: {c.get('writer_reads', 0)}, on replicas {pct('writer_reads_replica', 'writer_reads')}, "
        f"RYW violations {c.get('ryw_violations', 0)}"
    )
    print(
        f"readers' reads: {c.get('reader_reads', 0)}, on replicas {pct('reader_reads_replica', 'reader_reads')}, "
        f"monotonic violations {c.get('monotonic_violations', 0)}"
    )
    for name in COUNTERS:
        if name in after:
            print(f"{name}: +{after[name] - before.get(name, 0):.0f}")


if __name__ == "__main__":
    main()
