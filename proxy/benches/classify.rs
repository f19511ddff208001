//! Statement classification cost on the proxy's hot path.
//!
//! `cargo bench -p lagrouter-proxy --bench classify`
use criterion::{Criterion, criterion_group, criterion_main};
use lagrouter_proxy::classify::{Classifier, classify};
use std::hint::black_box;

const QUERIES: &[(&str, &str)] = &[
    ("select_1", "SELECT 1"),
    (
        "pgbench_select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    ),
    (
        "pgbench_update",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    ),
    (
        "join_subquery",
        "SELECT a::text, b FROM t JOIN u ON u.id = t.id WHERE c = $1 AND d IN (SELECT x FROM y) ORDER BY a LIMIT 10",
    ),
    (
        "token_comment",
        "/* lagrouter:token=v1.AAAA */ SELECT * FROM t WHERE id = $1",
    ),
];

fn bench(c: &mut Criterion) {
    let cache = Classifier::default();
    let mut g = c.benchmark_group("classify");
    for (name, sql) in QUERIES {
        g.bench_function(format!("uncached/{name}"), |b| {
            b.iter(|| classify(black_box(sql)))
        });
        g.bench_function(format!("cached/{name}"), |b| {
            b.iter(|| cache.classify(black_box(sql)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
