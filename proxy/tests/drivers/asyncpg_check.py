"""asyncpg through lagrouter-proxy: prepare() (Parse/Describe/Flush without
Sync) followed by writes, a transaction, copy_records_to_table, a cached
statement across ALTER TABLE, and a pool whose release resets each
connection. Each check asserts the results and where statements ran.

Run by the proxy's e2e test `drivers::asyncpg`, with LAGROUTER_URL set to a
postgresql:// URL of the proxy. Exits non-zero on the first failed check.
"""

import asyncio
import os

import asyncpg

URL = os.environ["LAGROUTER_URL"]


def check(cond, what):
    if not cond:
        raise SystemExit(f"asyncpg check failed: {what}")


async def main():
    conn = await asyncpg.connect(URL)
    await conn.execute("DROP TABLE IF EXISTS apg_t; CREATE TABLE apg_t(id int PRIMARY KEY, v text)")
    stmt = await conn.prepare("SELECT pg_is_in_recovery()")
    async with conn.transaction():
        await conn.execute("INSERT INTO apg_t VALUES (1, 'a')")
    check(await stmt.fetchval() is True, "prepared read on a replica")
    await conn.copy_records_to_table("apg_t", records=[(i, "x") for i in range(2, 102)])
    check(await conn.fetchval("SELECT count(*) FROM apg_t") == 101, "copy_records_to_table")
    on_replica = 0
    for i in range(200, 220):
        await conn.execute("INSERT INTO apg_t VALUES ($1, $2)", i, "y")
        v, replica = await conn.fetchrow(
            "SELECT v, pg_is_in_recovery() FROM apg_t WHERE id = $1", i
        )
        check(v == "y", "read-your-writes")
        on_replica += replica
    check(on_replica >= 18, f"writer's read-backs on replicas: {on_replica}/20")
    read_backs = on_replica
    row = await conn.fetchrow("SELECT * FROM apg_t WHERE id = $1", 1)
    check(len(row) == 2, "before ALTER")
    await conn.execute("ALTER TABLE apg_t ADD COLUMN extra int DEFAULT 5")
    row = await conn.fetchrow("SELECT * FROM apg_t WHERE id = $1", 1)
    check(tuple(row) == (1, "a", 5), f"after ALTER: {row!r}")
    await conn.close()

    pool = await asyncpg.create_pool(URL, min_size=2, max_size=2)
    for i in range(6):
        async with pool.acquire() as c:
            check(await c.fetchval("SELECT pg_is_in_recovery()") is True, f"pooled read {i} on a replica")
            await c.execute("INSERT INTO apg_t VALUES ($1, 'pool')", 1000 + i)
            check(await c.fetchval("SELECT count(*) FROM apg_t WHERE v = 'pool'") == i + 1, "pool read-your-writes")
    await pool.close()
    print(f"asyncpg: ok ({read_backs}/20 of a writer's read-backs on replicas)")


asyncio.run(main())
