//! The analytics store under the stats API's load: insert rate, and query latency over a large
//! server-postback log, in the embedded store or in ClickHouse.
//!
//! `stats_query STORE ROWS`, where STORE is a directory (the embedded SQLite store,
//! `STORE/store.sqlite`) or `clickhouse://HOST:PORT/DATABASE`:
//! 1. fills the store to ROWS postbacks spread over 30 days (kept between runs);
//! 2. times inserting 400,000 more rows, in the processor's batches, into an empty scratch
//!    store beside it (`STORE-insert`, or the database `DATABASE_insert`), then empties it;
//! 3. times each query kind (up to 100 queries or 30 s a kind) and prints p50/p95 in ms.

use postback_clickhouse::{ClickHouseConfig, ClickHouseStore};
use postback_core::params::parse_form;
use postback_core::processor::ServerPostbackRow;
use postback_core::seams::{
    AnalyticsRows, AnalyticsStore, ServerPostbackQuery, SummaryKey, SummaryQuery,
};
use postbackd::sqlite_store::SqliteStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

const T0: i64 = 1_790_000_000_000_000;
const DAY: i64 = 86_400_000_000;
/// Rows are spread over 30 days.
const SPAN_US: i64 = 30 * DAY;
/// The processor's default batch (`processor_batch`).
const ENGINE_BATCH: u64 = 2048;
const INSERT_ROWS: u64 = 400_000;

type Error = Box<dyn std::error::Error>;

fn row(n: u64, rows: u64) -> ServerPostbackRow {
    let q = format!(
        "clickid={n:024x}&action_id=ORD-{n}&goal={}&sum=49.90&sub=aff{}&promo_code=P{}",
        if n.is_multiple_of(3) { "sale" } else { "1" },
        n % 997,
        n % 1000
    );
    let get = parse_form(q.as_bytes());
    ServerPostbackRow {
        id: format!("{n:024x}"),
        at_us: T0 + (n as i64) * (SPAN_US / rows.max(1) as i64),
        server: "198.51.100.7".into(),
        method: "GET".into(),
        clickid: format!("{n:024x}"),
        action_id: format!("ORD-{n}"),
        goal: "sale".into(),
        get,
        post: Default::default(),
        pixel: false,
        response_status: if n.is_multiple_of(10) { 2 } else { 1 },
        error: if n.is_multiple_of(10) {
            "Click not found".into()
        } else {
            String::new()
        },
        status: 0,
        offer_id: n % 200,
        pid: n % 500,
        advertiser_id: format!("{:024x}", n % 40),
        conversion_id: String::new(),
        delta: Some(30),
        ip: String::new(),
        created: false,
        payouts: 0.0,
        revenue: 0.0,
    }
}

/// The store at `spec`, an empty scratch store of the same kind beside it, and what it is.
type Stores = (Arc<dyn AnalyticsStore>, Arc<dyn AnalyticsStore>, String);

async fn open(spec: &str) -> Result<Stores, Error> {
    if spec.starts_with("clickhouse://") {
        let connect = |config: ClickHouseConfig| async move {
            let store = ClickHouseStore::connect(&config).await?;
            store.migrate().await?;
            Ok::<_, Error>(store)
        };
        let mut config = ClickHouseConfig::from_url(spec)?;
        // Fixed dates in the past: nothing may be retired while the bench runs.
        config.retention_days = 36_500;
        config.query_timeout = Duration::from_secs(60);
        let mut scratch = config.clone();
        scratch.database = format!("{}_insert", config.database);
        let store = connect(config).await?;
        let version = store.version();
        return Ok((
            Arc::new(store),
            Arc::new(connect(scratch).await?),
            format!("ClickHouse {}.{}", version.0, version.1),
        ));
    }
    let dir = std::path::PathBuf::from(spec);
    let scratch = dir.with_file_name(format!(
        "{}-insert",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("stats")
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    for d in [&dir, &scratch] {
        std::fs::create_dir_all(d)?;
    }
    Ok((
        Arc::new(SqliteStore::open(&dir.join("store.sqlite"))?),
        Arc::new(SqliteStore::open(&scratch.join("store.sqlite"))?),
        "SQLite (embedded)".into(),
    ))
}

async fn insert(
    store: &dyn AnalyticsStore,
    range: std::ops::Range<u64>,
    rows: u64,
) -> Result<(), Error> {
    let batch = AnalyticsRows {
        postbacks: range.map(|n| row(n, rows)).collect(),
        ..Default::default()
    };
    Ok(store.insert(batch).await?)
}

fn everything() -> ServerPostbackQuery {
    ServerPostbackQuery {
        from_us: T0,
        to_us: T0 + SPAN_US,
        ..Default::default()
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A query: a listing (first page of 100) or a summary.
enum Query {
    Listing(ServerPostbackQuery),
    Summary(SummaryQuery),
}

/// The i-th query of one kind.
type QueryFor = Box<dyn Fn(u64) -> Query>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let spec = args.next().unwrap_or_else(|| "target/stats-bench".into());
    let rows: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let (store, scratch, what) = open(&spec).await?;

    // 1. Fill (resumes where an earlier run stopped: rows are numbered in order).
    let mut have = store
        .server_postbacks(ServerPostbackQuery {
            limit: 0,
            ..everything()
        })
        .await?
        .total;
    let started = Instant::now();
    let from = have;
    while have < rows {
        let end = (have + 20_000).min(rows);
        insert(&*store, have..end, rows).await?;
        have = end;
        if have.is_multiple_of(1_000_000) {
            eprintln!(
                "filled {have} rows ({:.0} rows/s)",
                (have - from) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }

    // 2. Insert rate in the processor's batch shape, into an empty store.
    scratch.clear().await?;
    let started = Instant::now();
    let mut n = 0;
    while n < INSERT_ROWS {
        let end = (n + ENGINE_BATCH).min(INSERT_ROWS);
        insert(&*scratch, n..end, INSERT_ROWS).await?;
        n = end;
    }
    let insert_rate = INSERT_ROWS as f64 / started.elapsed().as_secs_f64();
    scratch.clear().await?;

    // 3. Queries.
    let day = |i: u64| {
        let d = (i % 29) as i64;
        (T0 + d * DAY, T0 + (d + 1) * DAY)
    };
    // One row matches: `ORD-n` with as many digits as the largest n (rows = a power of ten).
    let rare = move |i: u64| format!("ORD-{}", rows / 10 + (i * 7919) % (rows - rows / 10));
    let kinds: Vec<(&str, QueryFor)> = vec![
        (
            "offer + one day",
            Box::new(move |i| {
                let (from_us, to_us) = day(i);
                Query::Listing(ServerPostbackQuery {
                    from_us,
                    to_us,
                    offers: vec![i % 200],
                    limit: 100,
                    ..Default::default()
                })
            }),
        ),
        (
            "offer + 30 days",
            Box::new(|i| {
                Query::Listing(ServerPostbackQuery {
                    offers: vec![i % 200],
                    limit: 100,
                    ..everything()
                })
            }),
        ),
        (
            "search rare + one day",
            Box::new(move |i| {
                let (from_us, to_us) = day(i);
                Query::Listing(ServerPostbackQuery {
                    from_us,
                    to_us,
                    search: Some(rare(i)),
                    limit: 100,
                    ..Default::default()
                })
            }),
        ),
        (
            "search rare + 30 days",
            Box::new(move |i| {
                Query::Listing(ServerPostbackQuery {
                    search: Some(rare(i)),
                    limit: 100,
                    ..everything()
                })
            }),
        ),
        (
            // The exact filter of one order id, as an advertiser's support asks for it.
            "action id + 30 days",
            Box::new(move |i| {
                Query::Listing(ServerPostbackQuery {
                    action_id: Some(rare(i)),
                    limit: 100,
                    ..everything()
                })
            }),
        ),
        (
            // A third of the rows match.
            "search common + one day",
            Box::new(move |i| {
                let (from_us, to_us) = day(i);
                Query::Listing(ServerPostbackQuery {
                    from_us,
                    to_us,
                    search: Some(["goal=sale", "=sale", "SALE"][i as usize % 3].into()),
                    limit: 100,
                    ..Default::default()
                })
            }),
        ),
        (
            // A third of the rows match.
            "search common + 30 days",
            Box::new(|i| {
                Query::Listing(ServerPostbackQuery {
                    search: Some(["goal=sale", "=sale", "SALE"][i as usize % 3].into()),
                    limit: 100,
                    ..everything()
                })
            }),
        ),
        (
            // Order ids that start with one digit: a ninth of the rows, in the lines of a key
            // with as many values as rows (in the SQLite store, the trigram index's part).
            "search order-id prefix + 30 days",
            Box::new(|i| {
                Query::Listing(ServerPostbackQuery {
                    search: Some(["ORD-1", "ord-2", "D-3"][i as usize % 3].into()),
                    limit: 100,
                    ..everything()
                })
            }),
        ),
        (
            "summary day × advertiser, 30 days",
            Box::new(|_| {
                Query::Summary(SummaryQuery {
                    filters: everything(),
                    group_by: vec![SummaryKey::Day, SummaryKey::Advertiser],
                })
            }),
        ),
        (
            "summary of an offer by error, 30 days",
            Box::new(|i| {
                Query::Summary(SummaryQuery {
                    filters: ServerPostbackQuery {
                        offers: vec![i % 200],
                        ..everything()
                    },
                    group_by: vec![SummaryKey::ResponseStatus, SummaryKey::Error],
                })
            }),
        ),
    ];
    println!("{what}: rows {rows}; insert {insert_rate:.0} rows/s (batches of {ENGINE_BATCH})");
    for (name, query) in kinds {
        let mut ms = Vec::new();
        let mut failed = None;
        let started = Instant::now();
        for i in 0..100 {
            if i >= 10 && started.elapsed() > Duration::from_secs(30) {
                break;
            }
            let t = Instant::now();
            let done = match query(i) {
                Query::Listing(q) => store.server_postbacks(q).await.map(drop),
                Query::Summary(q) => store.summary(q).await.map(drop),
            };
            // A query over the store's time budget is a result too: say so, go on.
            if let Err(e) = done {
                failed = Some(e);
                break;
            }
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        match failed {
            Some(e) => println!("{name:<38} failed after {} queries: {e}", ms.len()),
            None => println!(
                "{name:<38} p50 {:>8.2} ms  p95 {:>8.2} ms  (n={})",
                percentile(&mut ms, 0.5),
                percentile(&mut ms, 0.95),
                ms.len()
            ),
        }
    }
    Ok(())
}
