//! Behaviour of SQL classification (`lagrouter_proxy::classify`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lagrouter_proxy::classify::{
    Classification, Classifier, PinReason, RouteHint, StatementKind, classify, reset_statement_sql,
    set_statement_sql,
};

use StatementKind as K;

fn kinds(sql: &str) -> Vec<StatementKind> {
    classify(sql).statements
}

fn one(sql: &str) -> StatementKind {
    let mut k = kinds(sql);
    assert_eq!(k.len(), 1, "expected one statement for {sql:?}, got {k:?}");
    k.remove(0)
}

fn set(name: &str, value: &str, local: bool) -> StatementKind {
    K::Set {
        name: name.into(),
        value: value.into(),
        local,
    }
}

fn pin(r: PinReason) -> StatementKind {
    K::SessionPinning(r)
}

#[test]
fn plain_reads() {
    for sql in [
        "SELECT 1",
        "select 1;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "SELECT a::text, b->>'x' FROM t WHERE c @> '{}'::jsonb AND d = ANY($1::int[])",
        "SELECT DISTINCT ON (a) a FROM t ORDER BY a, b DESC NULLS LAST",
        "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.id = t.id LIMIT 1) x",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "VALUES (1), (2)",
        "SELECT 1 UNION SELECT 2",
        "(SELECT 1)",
        "SELECT my_function(1), now(), pg_sleep(0)",
        "SELECT * FROM generate_series(1, 3)",
        "SELECT 'nextval(''s'')', \"nextval\" FROM t",
        "SELECT set_config('request.jwt', 'x', true)",
        "SELECT count(*) FILTER (WHERE a) OVER (PARTITION BY b) FROM t",
        "FETCH 10 FROM c",
        "CLOSE c",
        "MOVE FORWARD 5 IN c",
        "DECLARE c CURSOR FOR SELECT 1",
        "TABLE t",
        "TABLE public.t",
    ] {
        assert_eq!(one(sql), K::Read, "{sql}");
        assert!(classify(sql).is_read_only(), "{sql}");
    }
}

#[test]
fn show_and_explain() {
    assert_eq!(one("SHOW search_path"), K::Show);
    assert_eq!(one("SHOW ALL"), K::Show);
    assert_eq!(one("SHOW TRANSACTION ISOLATION LEVEL"), K::Show);
    assert_eq!(one("EXPLAIN SELECT 1"), K::Read);
    assert_eq!(one("EXPLAIN INSERT INTO t VALUES (1)"), K::Read);
    assert_eq!(one("EXPLAIN ANALYZE SELECT * FROM t"), K::Read);
    assert_eq!(one("EXPLAIN ANALYZE INSERT INTO t VALUES (1)"), K::Write);
    assert_eq!(one("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t"), K::Write);
    assert_eq!(one("EXPLAIN (ANALYZE false) DELETE FROM t"), K::Read);
    assert_eq!(one("EXPLAIN (ANALYZE off) DELETE FROM t"), K::Read);
    assert_eq!(one("EXPLAIN ANALYZE SELECT nextval('s')"), K::Write);
    assert_eq!(
        one("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)"),
        pin(PinReason::AdvisoryLock)
    );
    assert!(classify("SHOW ALL").is_read_only());
}

#[test]
fn dml_and_ddl_are_writes() {
    for sql in [
        "INSERT INTO t VALUES (1)",
        "insert into t select * from u",
        "UPDATE t SET a = 1 WHERE b = $1",
        "DELETE FROM t",
        "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE",
        "TRUNCATE t",
        "CREATE TABLE t (a int)",
        "CREATE UNLOGGED TABLE t (a int)",
        "CREATE INDEX i ON t (a)",
        "CREATE VIEW v AS SELECT 1",
        "CREATE SEQUENCE s",
        "CREATE SCHEMA s",
        "CREATE EXTENSION pgcrypto",
        "ALTER TABLE t ADD COLUMN b int",
        "DROP TABLE t",
        "DROP INDEX i",
        "GRANT SELECT ON t TO bob",
        "REVOKE SELECT ON t FROM bob",
        "COMMENT ON TABLE t IS 'x'",
        "VACUUM t",
        "VACUUM",
        "ANALYZE t",
        "REFRESH MATERIALIZED VIEW m",
        "CALL proc(1)",
        "DO $$ BEGIN PERFORM 1; END $$",
        "CHECKPOINT",
        "REINDEX TABLE t",
        "CLUSTER t USING i",
        "NOTIFY chan, 'payload'",
        "COMMIT PREPARED 'x'",
        "ROLLBACK PREPARED 'x'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
    ] {
        assert_eq!(one(sql), K::Write, "{sql}");
        let c = classify(sql);
        assert!(!c.is_read_only() && c.has_write(), "{sql}");
    }
}

#[test]
fn locking_clauses_are_writes() {
    for sql in [
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR SHARE NOWAIT",
        "SELECT * FROM t WHERE a = 1 FOR UPDATE OF t SKIP LOCKED",
        "SELECT * FROM t FOR NO KEY UPDATE",
        "SELECT * FROM t FOR KEY SHARE",
        "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
        "SELECT (SELECT a FROM t FOR UPDATE)",
        "WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x",
        "TABLE t FOR UPDATE",
    ] {
        assert_eq!(one(sql), K::Write, "{sql}");
    }
    // FOR in other positions is not a lock.
    assert_eq!(one("SELECT substring(a from 1 for 2) FROM t"), K::Read);
}

#[test]
fn data_modifying_ctes_are_writes() {
    assert_eq!(
        one("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x"),
        K::Write
    );
    assert_eq!(
        one("WITH d AS (DELETE FROM t WHERE a < 0 RETURNING a) SELECT count(*) FROM d"),
        K::Write
    );
    assert_eq!(
        one("WITH u AS (UPDATE t SET a = 1 RETURNING a), r AS (SELECT 1) SELECT * FROM r"),
        K::Write
    );
    assert_eq!(
        one(
            "WITH a AS (SELECT 1), b AS (WITH c AS (DELETE FROM t RETURNING 1) SELECT * FROM c) SELECT * FROM b"
        ),
        K::Write
    );
}

#[test]
fn writes_hidden_in_expressions() {
    for sql in [
        "WITH x AS MATERIALIZED (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x",
        "EXPLAIN ANALYZE WITH x AS (DELETE FROM t RETURNING 1) SELECT * FROM x",
        "SELECT * FROM t WHERE id = (SELECT setval('s', 1))",
        "SELECT f.* FROM nextval('s') AS f",
        "SELECT (nextval('s'))::text",
        "SELECT CAST(nextval('s') AS text)",
        "SELECT ARRAY(SELECT nextval('s'))",
        "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u FOR UPDATE)",
        "SELECT * FROM t ORDER BY nextval('s')",
        "SELECT CASE WHEN a THEN nextval('s') END FROM t",
        "SELECT * FROM t JOIN LATERAL (SELECT nextval('s')) x ON true",
        "SELECT 1 UNION ALL SELECT nextval('s')",
        "SELECT \"nextval\"('s')",
    ] {
        assert_eq!(one(sql), K::Write, "{sql}");
    }
    assert_eq!(
        one("CREATE TEMP TABLE x ON COMMIT DROP AS SELECT 1"),
        pin(PinReason::TempTable)
    );
}

#[test]
fn select_into() {
    assert_eq!(one("SELECT * INTO newt FROM t"), K::Write);
    assert_eq!(
        one("SELECT * INTO TEMP newt FROM t"),
        pin(PinReason::TempTable)
    );
    assert_eq!(
        one("SELECT * INTO TEMPORARY TABLE newt FROM t"),
        pin(PinReason::TempTable)
    );
}

#[test]
fn known_functions() {
    assert_eq!(one("SELECT nextval('s')"), K::Write);
    assert_eq!(one("SELECT pg_catalog.nextval('s')"), K::Write);
    assert_eq!(one("SELECT NEXTVAL('s')"), K::Write);
    assert_eq!(one("SELECT setval('s', 10)"), K::Write);
    assert_eq!(one("SELECT currval('s')"), K::Write);
    assert_eq!(
        one("SELECT * FROM t WHERE a IN (SELECT nextval('x'))"),
        K::Write
    );
    assert_eq!(one("SELECT * FROM nextval('s')"), K::Write);
    assert_eq!(one("SELECT pg_notify('c', 'p')"), K::Write);
    assert_eq!(one("SELECT lo_import('/tmp/x')"), K::Write);
    assert_eq!(one("SELECT lo_unlink(1)"), K::Write);
    assert_eq!(one("SELECT txid_current()"), K::Write);
    assert_eq!(one("SELECT pg_current_xact_id()"), K::Write);
    assert_eq!(one("SELECT pg_current_wal_lsn()"), K::Write);
    assert_eq!(one("SELECT pg_advisory_xact_lock(1)"), K::Write);
    assert_eq!(one("SELECT pg_try_advisory_xact_lock(1)"), K::Write);
    assert_eq!(one("VALUES (nextval('s'))"), K::Write);
    assert_eq!(
        one("SELECT coalesce(max(a), nextval('s')) FROM t"),
        K::Write
    );
    for sql in [
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_advisory_lock_shared(1, 2)",
        "SELECT pg_try_advisory_lock(42)",
        "SELECT pg_try_advisory_lock_shared(42)",
        "SELECT * FROM pg_try_advisory_lock(1) AS l",
        "SELECT pg_advisory_lock(1), nextval('s')",
        "SELECT nextval('s'), pg_advisory_lock(1)",
    ] {
        assert_eq!(one(sql), pin(PinReason::AdvisoryLock), "{sql}");
    }
    assert_eq!(
        one("SELECT set_config('search_path', 'x', false)"),
        pin(PinReason::SetConfig)
    );
    assert_eq!(
        one("SELECT set_config('search_path', 'x', $1)"),
        pin(PinReason::SetConfig)
    );
    assert_eq!(one("SELECT set_config('a.b', 'x', true)"), K::Read);
    // Unknown functions stay reads: a replica reports 25006 if they write.
    assert_eq!(one("SELECT do_something_that_writes()"), K::Read);
    // Function names inside strings do not count.
    assert_eq!(one("SELECT 'pg_advisory_lock(1)'"), K::Read);
}

#[test]
fn transactions() {
    assert_eq!(one("BEGIN"), K::TransactionBegin { read_only: false });
    assert_eq!(one("begin;"), K::TransactionBegin { read_only: false });
    assert_eq!(
        one("BEGIN READ ONLY"),
        K::TransactionBegin { read_only: true }
    );
    assert_eq!(
        one("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
        K::TransactionBegin { read_only: true }
    );
    assert_eq!(
        one("START TRANSACTION READ ONLY"),
        K::TransactionBegin { read_only: true }
    );
    assert_eq!(
        one("START TRANSACTION READ ONLY, DEFERRABLE"),
        K::TransactionBegin { read_only: true }
    );
    assert_eq!(
        one("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"),
        K::TransactionBegin { read_only: true }
    );
    assert_eq!(
        one("BEGIN READ WRITE"),
        K::TransactionBegin { read_only: false }
    );
    assert_eq!(
        one("START TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        K::TransactionBegin { read_only: false }
    );
    for sql in [
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "COMMIT AND CHAIN",
        "ROLLBACK WORK",
        "PREPARE TRANSACTION 'x'",
    ] {
        assert_eq!(one(sql), K::TransactionEnd, "{sql}");
    }
    for sql in [
        "SAVEPOINT a",
        "RELEASE SAVEPOINT a",
        "RELEASE a",
        "ROLLBACK TO SAVEPOINT a",
        "ROLLBACK TO a",
    ] {
        assert_eq!(one(sql), K::Savepoint, "{sql}");
    }
    assert_eq!(one("SET TRANSACTION READ ONLY"), K::SetTransactionReadOnly);
    assert_eq!(
        one("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"),
        K::SetTransactionReadOnly
    );
    assert_eq!(
        one("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        K::Other
    );
    assert!(classify("BEGIN READ ONLY; SELECT 1; COMMIT").is_read_only());
    assert!(!classify("BEGIN; SELECT 1; COMMIT").is_read_only());
}

#[test]
fn set_statements() {
    assert_eq!(
        one("SET lagrouter.min_token = 'v1.AAAA-bb_c'"),
        set("lagrouter.min_token", "v1.AAAA-bb_c", false)
    );
    assert_eq!(
        one("SET lagrouter.min_token TO 'v1.x'"),
        set("lagrouter.min_token", "v1.x", false)
    );
    assert_eq!(
        one("SET LOCAL statement_timeout = '5s'"),
        set("statement_timeout", "5s", true)
    );
    assert_eq!(
        one("SET SESSION statement_timeout TO 1000"),
        set("statement_timeout", "1000", false)
    );
    assert_eq!(
        one("SET extra_float_digits = -1"),
        set("extra_float_digits", "-1", false)
    );
    assert_eq!(one("SET x.y = 1.5"), set("x.y", "1.5", false));
    assert_eq!(
        one("SET application_name = MyApp"),
        set("application_name", "myapp", false)
    );
    assert_eq!(
        one("SET application_name = \"MyApp\""),
        set("application_name", "MyApp", false)
    );
    assert_eq!(
        one("SET Application_Name = 'it''s'"),
        set("application_name", "it's", false)
    );
    assert_eq!(
        one("SET enable_seqscan = off"),
        set("enable_seqscan", "off", false)
    );
    assert_eq!(
        one("SET enable_seqscan = true"),
        set("enable_seqscan", "true", false)
    );
    assert_eq!(
        one("SET datestyle = iso, mdy"),
        set("datestyle", "iso, mdy", false)
    );
    assert_eq!(
        one("SET search_path TO \"$user\", public"),
        set("search_path", "\"$user\", public", false)
    );
    assert_eq!(
        one("SET search_path = 'MySchema', other"),
        set("search_path", "\"MySchema\", other", false)
    );
    assert_eq!(one("SET TIME ZONE 'UTC'"), set("timezone", "UTC", false));
    assert_eq!(
        one("SET LOCAL TIME ZONE 'UTC'"),
        set("timezone", "UTC", true)
    );
    assert_eq!(
        one("SET TIME ZONE LOCAL"),
        K::Reset {
            name: Some("timezone".into())
        }
    );
    assert_eq!(one("SET ROLE admin"), set("role", "admin", false));
    assert_eq!(one("SET ROLE NONE"), set("role", "none", false));
    assert_eq!(
        one("SET SESSION AUTHORIZATION bob"),
        set("session_authorization", "bob", false)
    );
    assert_eq!(
        one("SET NAMES 'UTF8'"),
        set("client_encoding", "UTF8", false)
    );
    assert_eq!(
        one("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
        set("default_transaction_read_only", "on", false)
    );
    assert_eq!(
        one("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        set("default_transaction_isolation", "serializable", false)
    );
    assert_eq!(
        one("SET x TO DEFAULT"),
        K::Reset {
            name: Some("x".into())
        }
    );
    assert_eq!(one("SET LOCAL x TO DEFAULT"), set("x", "DEFAULT", true));
    assert_eq!(
        one("SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE"),
        pin(PinReason::UnsupportedSet)
    );
    assert_eq!(one("SET LOCAL x = now()"), K::Other);
    assert_eq!(one("SET CONSTRAINTS ALL DEFERRED"), K::Other);
    // Settings may run anywhere.
    assert!(classify("SET x = 1; SELECT 1").is_read_only());
}

#[test]
fn reset_and_discard() {
    assert_eq!(one("RESET ALL"), K::Reset { name: None });
    assert_eq!(
        one("RESET search_path"),
        K::Reset {
            name: Some("search_path".into())
        }
    );
    assert_eq!(
        one("RESET lagrouter.min_token"),
        K::Reset {
            name: Some("lagrouter.min_token".into())
        }
    );
    assert_eq!(
        one("RESET ROLE"),
        K::Reset {
            name: Some("role".into())
        }
    );
    assert_eq!(
        one("RESET SESSION AUTHORIZATION"),
        K::Reset {
            name: Some("session_authorization".into())
        }
    );
    assert_eq!(
        one("RESET TIME ZONE"),
        K::Reset {
            name: Some("timezone".into())
        }
    );
    assert_eq!(one("DISCARD ALL"), K::Discard);
    assert_eq!(one("DISCARD TEMP"), K::Other);
}

/// What drivers and pools send to clean a connection up never pins it:
/// asyncpg's pool runs the first one on every release.
#[test]
fn releasing_session_state_never_pins() {
    for sql in [
        "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
        "SELECT pg_advisory_unlock(1)",
        "SELECT pg_advisory_unlock_shared(1)",
        "SELECT pg_advisory_unlock_all()",
        "UNLISTEN *",
        "UNLISTEN chan",
        "CLOSE ALL",
        "RESET ALL",
        "DISCARD ALL",
    ] {
        let c = classify(sql);
        assert_eq!(c.pin_reason(), None, "{sql}: {c:?}");
    }
    // Releases go to the primary, where locks would have been taken.
    assert!(!classify("SELECT pg_advisory_unlock_all()").is_read_only());
}

#[test]
fn session_pinning() {
    for (sql, reason) in [
        ("CREATE TEMP TABLE t (a int)", PinReason::TempTable),
        ("CREATE TEMPORARY TABLE t AS SELECT 1", PinReason::TempTable),
        ("CREATE TEMP VIEW v AS SELECT 1", PinReason::TempTable),
        ("CREATE TEMP SEQUENCE s", PinReason::TempTable),
        ("CREATE LOCAL TEMP TABLE t (a int)", PinReason::TempTable),
        ("LISTEN chan", PinReason::Listen),
        ("PREPARE p (int) AS SELECT $1", PinReason::SqlPrepare),
        (
            "PREPARE p AS INSERT INTO t VALUES (1)",
            PinReason::SqlPrepare,
        ),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            PinReason::HoldCursor,
        ),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", PinReason::Lock),
        ("LOCK t", PinReason::Lock),
        ("COPY t FROM STDIN", PinReason::Copy),
        (
            "COPY t (a, b) FROM STDIN WITH (FORMAT csv)",
            PinReason::Copy,
        ),
    ] {
        assert_eq!(one(sql), pin(reason), "{sql}");
        let c = classify(sql);
        assert!(!c.is_read_only());
        assert_eq!(c.pin_reason(), Some(reason));
    }
    assert!(PinReason::TempTable.is_session_scoped());
    assert!(!PinReason::Copy.is_session_scoped());
    assert!(!PinReason::Lock.is_session_scoped());
    assert_eq!(PinReason::AdvisoryLock.as_str(), "advisory_lock");
}

#[test]
fn copy() {
    assert_eq!(one("COPY t TO STDOUT"), K::Read);
    assert_eq!(one("COPY t (a) TO STDOUT WITH (FORMAT binary)"), K::Read);
    assert_eq!(one("COPY (SELECT * FROM t) TO STDOUT"), K::Read);
    assert_eq!(one("COPY (SELECT nextval('s')) TO STDOUT"), K::Write);
    assert_eq!(
        one("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT"),
        K::Write
    );
    assert_eq!(
        one("COPY t FROM '/tmp/data.csv' WITH (FORMAT csv)"),
        K::Write
    );
    assert_eq!(one("COPY t TO '/tmp/out.csv'"), K::Write);
    assert_eq!(one("COPY t TO PROGRAM 'gzip > /tmp/x.gz'"), K::Write);
}

#[test]
fn multi_statement_strings() {
    assert_eq!(kinds("SELECT 1; SELECT 2"), vec![K::Read, K::Read]);
    assert_eq!(
        kinds("BEGIN; INSERT INTO t VALUES (1); COMMIT;"),
        vec![
            K::TransactionBegin { read_only: false },
            K::Write,
            K::TransactionEnd
        ]
    );
    assert_eq!(
        kinds("SET search_path = a; SELECT * FROM t"),
        vec![set("search_path", "a", false), K::Read]
    );
    // One statement the parser rejects does not spoil the others.
    assert_eq!(
        kinds("SELECT 1; SELEKT 2; INSERT INTO t VALUES (1); TABLE t"),
        vec![K::Read, K::Other, K::Write, K::Read]
    );
    assert_eq!(
        kinds("BEGIN READ ONLY, DEFERRABLE; SELECT 1; COMMIT"),
        vec![
            K::TransactionBegin { read_only: true },
            K::Read,
            K::TransactionEnd
        ]
    );
    // Semicolons inside literals, identifiers, dollar quotes and comments
    // do not split.
    assert_eq!(
        kinds("SELECT ';', \"a;b\", $$;$$ /* ; */ -- ;\n FROM t; SELEKT"),
        vec![K::Read, K::Other]
    );
    assert!(!classify("SELECT 1; DELETE FROM t").is_read_only());
    assert!(classify("SELECT 1; SHOW x; SELECT 2").is_read_only());
}

#[test]
fn empty_queries() {
    for sql in ["", "   ", ";", ";;", "/* only a comment */", "-- c\n;"] {
        let c = classify(sql);
        assert!(c.statements.is_empty(), "{sql:?}: {c:?}");
        assert!(c.is_read_only());
    }
}

#[test]
fn parse_errors_and_garbage_are_other() {
    for sql in [
        "SELEKT 1",
        "SELECT FROM WHERE (",
        "x!@#%^&",
        "\u{0}\u{1}\u{2}",
        "'unterminated",
        "/* unterminated",
        "$$ unterminated",
        "SELECT * FROM t WHERE a = 'unterminated",
        "🙂🙂🙂",
        "SELECT 'a' 'b'",
    ] {
        assert_eq!(kinds(sql), vec![K::Other], "{sql:?}");
    }
    // A parse error in something that starts like a write stays a write.
    assert_eq!(one("INSERT INTO t VALUES ((("), K::Write);
    assert_eq!(one("UPDATE t SET a = = 1 WHERE"), K::Write);
}

#[test]
fn hints_in_comments() {
    let c = classify("/* lagrouter:primary */ SELECT 1");
    assert_eq!(c.hint, Some(RouteHint::Primary));
    assert_eq!(c.statements, vec![K::Read]);
    assert_eq!(
        classify("SELECT 1 /* lagrouter:replica */").hint,
        Some(RouteHint::Replica)
    );
    assert_eq!(
        classify("SELECT 1 -- lagrouter:primary").hint,
        Some(RouteHint::Primary)
    );
    assert_eq!(
        classify("-- lagrouter:replica\nSELECT * FROM t").hint,
        Some(RouteHint::Replica)
    );
    let c = classify("SELECT * FROM t /* lagrouter:token=v1.AAAAAAAB_-xyz */");
    assert_eq!(c.token.as_deref(), Some("v1.AAAAAAAB_-xyz"));
    assert_eq!(c.hint, None);
    let c = classify("/*lagrouter:token=v1.abc*/ INSERT INTO t VALUES (1)");
    assert_eq!(c.token.as_deref(), Some("v1.abc"));
    assert_eq!(c.statements, vec![K::Write]);
    let c = classify("/* app=x, lagrouter:replica lagrouter:token=v1.q */ SELECT 1");
    assert_eq!(c.hint, Some(RouteHint::Replica));
    assert_eq!(c.token.as_deref(), Some("v1.q"));
    // Primary wins over replica.
    assert_eq!(
        classify("/* lagrouter:replica */ SELECT 1 /* lagrouter:primary */").hint,
        Some(RouteHint::Primary)
    );
    // Nested comments.
    assert_eq!(
        classify("/* outer /* lagrouter:primary */ still comment */ SELECT 1").statements,
        vec![K::Read]
    );
    // Never from literals or identifiers.
    for sql in [
        "SELECT '/* lagrouter:primary */'",
        "SELECT '-- lagrouter:primary'",
        "SELECT \"/* lagrouter:primary */\" FROM t",
        "SELECT $$ /* lagrouter:primary */ $$",
        "SELECT E'\\' /* lagrouter:primary */'",
        "SELECT $x$ -- lagrouter:token=v1.x $x$",
    ] {
        let c = classify(sql);
        assert_eq!(c.hint, None, "{sql}");
        assert_eq!(c.token, None, "{sql}");
        assert_eq!(c.statements, vec![K::Read], "{sql}");
    }
}

#[test]
fn set_statement_sql_quotes() {
    assert_eq!(
        set_statement_sql("statement_timeout", "5s"),
        "SET \"statement_timeout\" TO '5s'"
    );
    assert_eq!(
        set_statement_sql("lagrouter.min_token", "v1.abc"),
        "SET \"lagrouter\".\"min_token\" TO 'v1.abc'"
    );
    assert_eq!(
        set_statement_sql("application_name", "a'; DROP TABLE t; --"),
        "SET \"application_name\" TO 'a''; DROP TABLE t; --'"
    );
    assert_eq!(
        set_statement_sql("application_name", "back\\slash'"),
        "SET \"application_name\" TO E'back\\\\slash'''"
    );
    assert_eq!(
        set_statement_sql("weird\"name", "x"),
        "SET \"weird\"\"name\" TO 'x'"
    );
    assert_eq!(
        set_statement_sql("search_path", "\"$user\", public"),
        "SET \"search_path\" TO \"$user\", \"public\""
    );
    assert_eq!(
        set_statement_sql("search_path", "\"My\"\"Schema\""),
        "SET \"search_path\" TO \"My\"\"Schema\""
    );
    // Not an identifier list: falls back to a literal.
    assert_eq!(
        set_statement_sql("search_path", "a b; DROP"),
        "SET \"search_path\" TO 'a b; DROP'"
    );
    assert_eq!(
        set_statement_sql("search_path", ""),
        "SET \"search_path\" TO ''"
    );
    assert_eq!(
        set_statement_sql("datestyle", "iso, mdy"),
        "SET \"datestyle\" TO 'iso, mdy'"
    );
    assert_eq!(reset_statement_sql(None), "RESET ALL");
    assert_eq!(reset_statement_sql(Some("role")), "RESET \"role\"");
}

#[test]
fn set_round_trips_through_classification() {
    // What `set_statement_sql` produces classifies back to the same Set.
    for sql in [
        "SET search_path TO \"$user\", public",
        "SET search_path = 'Odd Schema', x",
        "SET application_name = 'it''s \\ fine'",
        "SET lagrouter.min_token = 'v1.abc'",
        "SET datestyle = iso, mdy",
        "SET statement_timeout = 1000",
    ] {
        let K::Set { name, value, local } = one(sql) else {
            panic!("{sql} is not a Set");
        };
        let replay = set_statement_sql(&name, &value);
        assert_eq!(one(&replay), set(&name, &value, local), "{sql} -> {replay}");
    }
}

#[test]
fn labels() {
    assert_eq!(K::Read.label(), "read");
    assert_eq!(pin(PinReason::Listen).label(), "pin");
    assert_eq!(K::TransactionBegin { read_only: true }.label(), "begin");
}

#[test]
fn classifier_caches_and_is_bounded() {
    let c = Classifier::new(4);
    assert_eq!(c.capacity(), 4);
    let a = c.classify("SELECT * FROM t WHERE a = 'x'");
    let b = c.classify("SELECT * FROM t WHERE a = 'x'");
    assert!(
        Arc::ptr_eq(&a, &b),
        "second lookup is served from the cache"
    );
    assert_eq!(c.len(), 1);
    for i in 0..20 {
        let r = c.classify(&format!("SELECT nextval('s{i}')"));
        assert_eq!(r.statements, vec![K::Write]);
    }
    assert_eq!(c.len(), 4);
    // Fast-path statements share preallocated results and are not cached.
    let x = c.classify("SELECT 1");
    let y = c.classify("SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    assert!(Arc::ptr_eq(&x, &y));
    assert_eq!(
        *x,
        Classification {
            statements: vec![K::Read],
            hint: None,
            token: None,
            consistency: None,
        }
    );
    // Cached and uncached results agree with `classify`.
    let sql = "/* lagrouter:token=v1.z */ WITH x AS (DELETE FROM t RETURNING 1) SELECT * FROM x";
    assert_eq!(*c.classify(sql), classify(sql));
    assert_eq!(*c.classify(sql), classify(sql));
    let no_cache = Classifier::new(0);
    assert_eq!(*no_cache.classify(sql), classify(sql));
    assert!(no_cache.is_empty());
    // Huge statements are not cached.
    let big = format!("SELECT '{}'", "x".repeat(Classifier::MAX_CACHED_SQL_LEN));
    let before = c.len();
    c.classify(&big);
    assert!(c.len() <= before.max(4));
    assert_eq!(
        Classifier::default().capacity(),
        Classifier::DEFAULT_CAPACITY
    );
}

#[test]
fn classifier_is_thread_safe() {
    let c = Arc::new(Classifier::new(64));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let sql = format!("SELECT * FROM t{} WHERE a = 'v'", (i + t) % 100);
                    assert_eq!(c.classify(&sql).statements, vec![K::Read]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(c.len() <= 64);
}

/// Deterministic pseudo-random SQL-ish strings: no panics, the cache agrees
/// with `classify`, and the no-parse fast path never disagrees with the
/// parser (a leading comment forces the slow path).
#[test]
fn random_fragments_are_consistent() {
    const FRAGMENTS: &[&str] = &[
        "SELECT",
        "select",
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "DELETE FROM t",
        "'",
        "\"",
        "$$",
        "$a$",
        "$1",
        "--",
        "/*",
        "*/",
        ";",
        "(",
        ")",
        "FOR",
        "UPDATE",
        "SHARE",
        "nextval('s')",
        "E'",
        "\\",
        "\n",
        "é",
        "🙂",
        "BEGIN",
        "ATOMIC",
        "END",
        "COMMIT",
        "SET",
        "x",
        "=",
        "1",
        ",",
        "TABLE",
        "COPY",
        "FROM",
        "STDIN",
        "INTO",
        "TEMP",
        "WITH",
        "AS",
        "lagrouter:primary",
        "lagrouter:token=v1.x",
        " ",
        "  ",
        "a.b",
        "*",
        "LISTEN",
        "READ ONLY",
        "::int",
        "\0",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let cache = Classifier::new(64);
    for _ in 0..4000 {
        let len = (next() % 12) as usize;
        let mut sql = String::new();
        for _ in 0..len {
            sql.push_str(FRAGMENTS[(next() % FRAGMENTS.len() as u64) as usize]);
            if next() % 2 == 0 {
                sql.push(' ');
            }
        }
        let direct = classify(&sql);
        assert_eq!(*cache.classify(&sql), direct, "{sql:?}");
        let slow = classify(&format!("/* x */ {sql}"));
        assert_eq!(slow.hint, direct.hint, "{sql:?}");
        assert_eq!(slow.token, direct.token, "{sql:?}");
        if slow.statements != direct.statements {
            // Only the fast path may differ, and only on invalid SQL that
            // the parser rejects (the server reports the error either way).
            assert_eq!(
                direct.statements.len(),
                1,
                "{sql:?}: {direct:?} vs {slow:?}"
            );
            assert_eq!(slow.statements, vec![K::Other], "{sql:?}: {direct:?}");
        }
    }
}

fn bounded(name: &str, sql: &str, limit: Duration) -> Classification {
    let start = Instant::now();
    let c = classify(sql);
    let took = start.elapsed();
    assert!(took < limit, "{name}: took {took:?}");
    c
}

#[test]
fn huge_inputs_do_not_panic_and_finish() {
    const MB: usize = 1 << 20;
    let limit = Duration::from_secs(30);
    let mut insert = String::from("INSERT INTO t VALUES ");
    while insert.len() < MB {
        insert.push_str("(1, 'abc', 2.5),");
    }
    insert.pop();
    assert_eq!(bounded("insert", &insert, limit).statements, vec![K::Write]);

    let mut select = String::from("SELECT * FROM t WHERE id IN (");
    while select.len() < MB {
        select.push_str("123456,");
    }
    select.push_str("1)");
    // Too big to parse: conservatively not a read.
    assert_eq!(
        bounded("in-list", &select, limit).statements,
        vec![K::Other]
    );

    let c = bounded("many", &"SELECT 1;".repeat(MB / 9), limit);
    assert_eq!(c.statements.len(), MB / 9);
    assert!(!c.is_read_only());

    for (name, sql) in [
        ("parens", "(".repeat(MB)),
        ("garbage", "x!@#%^&".repeat(MB / 7)),
        ("quote", format!("SELECT '{}", "a".repeat(MB))),
        ("comment", format!("SELECT 1 /* {}", "a".repeat(MB))),
        (
            "and-chain",
            format!("SELECT 1 WHERE {}1", "a AND ".repeat(MB / 6)),
        ),
        ("not-chain", format!("SELECT {}1", "NOT ".repeat(MB / 4))),
        ("nul", "\0".repeat(MB)),
        ("semicolons", ";".repeat(MB)),
        ("utf8", "é🙂".repeat(MB / 6)),
    ] {
        bounded(name, &sql, limit);
    }
}

#[test]
fn large_but_parseable_inputs_are_parsed() {
    // Just under the parse limit, deeply nested expressions must neither
    // overflow the stack nor be misclassified.
    let n = lagrouter_proxy::classify::MAX_PARSE_BYTES / 8;
    let chain = format!("SELECT 1 FROM t WHERE {}a = 1", "a = 1 OR ".repeat(n / 9));
    assert!(chain.len() < lagrouter_proxy::classify::MAX_PARSE_BYTES);
    assert_eq!(one(&chain), K::Read);
    let chain = format!(
        "SELECT 1 FROM t WHERE {}nextval('s') = 1",
        "a = 1 OR ".repeat(n / 9)
    );
    assert_eq!(one(&chain), K::Write);
    let sum = format!("SELECT {}1", "1 + ".repeat(30_000));
    assert_eq!(one(&sum), K::Read);
    // And in a thread with a small stack, like a tokio worker's.
    let handle = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || classify(&sum).statements)
        .unwrap();
    assert_eq!(handle.join().unwrap(), vec![K::Read]);
}

#[test]
fn standby_state_is_read_on_the_primary() {
    for sql in [
        "SHOW transaction_read_only",
        "show TRANSACTION_READ_ONLY;",
        "SELECT current_setting('transaction_read_only')",
        "SHOW in_hot_standby",
    ] {
        let c = classify(sql);
        assert_eq!(c.hint, Some(RouteHint::Primary), "{sql}");
        assert!(!c.has_write(), "{sql}");
    }
    assert_eq!(classify("SHOW search_path").hint, None);
}
