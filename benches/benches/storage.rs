//! Criterion benchmarks of the embedded backends: the event log's durable append (group
//! commit, fsync on) and the SQLite store's batch write and main queries.
//! `cargo bench -p postback-benches --bench storage`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use postback_core::log::{EventLog, Keyed};
use postback_core::params::parse_form;
use postback_core::processor::ServerPostbackRow;
use postback_core::seams::{AnalyticsRows, AnalyticsStore, ServerPostbackQuery};
use postbackd::embedded_log::{EmbeddedEventLog, LogOptions};
use postbackd::sqlite_store::SqliteStore;
use std::sync::atomic::{AtomicU64, Ordering};

fn row(n: u64) -> ServerPostbackRow {
    let q = format!(
        "clickid=6b04c5027d4edcd087b1{n:04x}&action_id=ORD-{n}&goal=sale&sum=49.90&promo_code=P{}",
        n % 1000
    );
    let get = parse_form(q.as_bytes());
    ServerPostbackRow {
        id: format!("{n:024x}"),
        at_us: 1_700_000_000_000_000 + n as i64 * 1000,
        server: "198.51.100.7".into(),
        method: "GET".into(),
        clickid: get.get("clickid").unwrap_or("").into(),
        action_id: format!("ORD-{n}"),
        goal: "sale".into(),
        get,
        post: Default::default(),
        pixel: false,
        response_status: 1,
        error: String::new(),
        status: 0,
        offer_id: n % 50,
        pid: n % 20,
        advertiser_id: "a".repeat(24),
        conversion_id: String::new(),
        delta: Some(30),
        ip: String::new(),
        created: false,
        payouts: 0.0,
        revenue: 0.0,
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");

    let mut g = c.benchmark_group("event log");
    g.sample_size(20);
    let log = std::sync::Arc::new(
        EmbeddedEventLog::open(&dir.path().join("log"), 1, LogOptions::default()).expect("log"),
    );
    let record = vec![b'x'; 400];
    g.throughput(Throughput::Elements(1));
    g.bench_function("one append of 400 B, fsync'd", |b| {
        b.iter(|| {
            rt.block_on(log.append(vec![Keyed::new("k", record.clone())]))
                .expect("append")
        })
    });
    g.throughput(Throughput::Elements(256));
    g.bench_function(
        "256 concurrent appends of 400 B, fsync'd (group commit)",
        |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..256 {
                        let (log, record) = (log.clone(), record.clone());
                        tasks.spawn(async move {
                            log.append(vec![Keyed::new("k", record)])
                                .await
                                .expect("append")
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                })
            })
        },
    );
    g.finish();

    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    let store = SqliteStore::open(&dir.path().join("store.sqlite")).expect("store");
    let next = AtomicU64::new(0);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("insert a batch of 1000 postback rows", |b| {
        b.iter(|| {
            let start = next.fetch_add(1000, Ordering::Relaxed);
            let rows = AnalyticsRows {
                postbacks: (start..start + 1000).map(row).collect(),
                ..Default::default()
            };
            rt.block_on(store.insert(rows)).expect("insert");
        })
    });
    // Fill to 200k rows for the queries.
    while next.load(Ordering::Relaxed) < 200_000 {
        let start = next.fetch_add(1000, Ordering::Relaxed);
        let rows = AnalyticsRows {
            postbacks: (start..start + 1000).map(row).collect(),
            ..Default::default()
        };
        rt.block_on(store.insert(rows)).expect("insert");
    }
    let day = ServerPostbackQuery {
        from_us: 1_700_000_000_000_000,
        to_us: 1_700_000_000_000_000 + 86_400_000_000,
        limit: 100,
        ..Default::default()
    };
    g.throughput(Throughput::Elements(1));
    g.bench_function("query: offer + date, first page (200k rows)", |b| {
        b.iter(|| {
            rt.block_on(store.server_postbacks(ServerPostbackQuery {
                offers: vec![7],
                ..day.clone()
            }))
            .expect("query")
        })
    });
    g.bench_function("query: search 'ORD-1234', first page (200k rows)", |b| {
        b.iter(|| {
            rt.block_on(store.server_postbacks(ServerPostbackQuery {
                search: Some("ORD-1234".into()),
                ..day.clone()
            }))
            .expect("query")
        })
    });
    g.finish();
}

criterion_group!(storage, benches);
criterion_main!(storage);
