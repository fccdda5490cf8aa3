//! Stats query latency over a large server-postback log, in the embedded store.
//! `stats_query DIR ROWS`: fills `DIR/store.sqlite` to ROWS rows (kept between runs), then
//! times 200 queries of each kind and prints p50/p95 in milliseconds.

use postback_core::log::Position;
use postback_core::params::parse_form;
use postback_core::processor::ServerPostbackRow;
use postback_core::seams::{
    AnalyticsRows, AnalyticsStore, ServerPostbackQuery, StateChanges, StateStore,
};
use postbackd::sqlite_store::SqliteStore;
use std::time::Instant;

const T0: i64 = 1_790_000_000_000_000;
/// Rows are spread over 30 days.
const SPAN_US: i64 = 30 * 86_400_000_000;

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

/// The i-th query of one kind.
type QueryFor = Box<dyn Fn(u64) -> ServerPostbackQuery>;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow_free::Result {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "target/stats-bench".into()));
    let rows: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    std::fs::create_dir_all(&dir)?;
    let store = SqliteStore::open(&dir.join("store.sqlite")).map_err(|e| e.to_string())?;
    let mut have = store.position("fill", 0).await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    while have < rows {
        let end = (have + 20_000).min(rows);
        let rows_in = AnalyticsRows {
            postbacks: (have..end).map(|n| row(n, rows)).collect(),
            ..Default::default()
        };
        store.insert(rows_in).await.map_err(|e| e.to_string())?;
        let next = vec![Position {
            partition: 0,
            offset: end,
        }];
        store
            .commit("fill", StateChanges::default(), next)
            .await
            .map_err(|e| e.to_string())?;
        have = end;
        if have.is_multiple_of(1_000_000) {
            eprintln!(
                "filled {have} rows ({:.0} rows/s)",
                have as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let day = 86_400_000_000;
    let mut kinds: Vec<(&str, QueryFor)> = vec![
        (
            "offer + one day",
            Box::new(move |i| ServerPostbackQuery {
                from_us: T0 + (i as i64 % 29) * day,
                to_us: T0 + (i as i64 % 29 + 1) * day,
                offers: vec![i % 200],
                limit: 100,
                ..Default::default()
            }),
        ),
        (
            "offer + 30 days",
            Box::new(move |i| ServerPostbackQuery {
                from_us: T0,
                to_us: T0 + SPAN_US,
                offers: vec![i % 200],
                limit: 100,
                ..Default::default()
            }),
        ),
        (
            "search + one day",
            Box::new(move |i| ServerPostbackQuery {
                from_us: T0 + (i as i64 % 29) * day,
                to_us: T0 + (i as i64 % 29 + 1) * day,
                search: Some(format!("ORD-{}", 12_345 + i * 7919)),
                limit: 100,
                ..Default::default()
            }),
        ),
        (
            "search + 30 days",
            Box::new(move |i| ServerPostbackQuery {
                from_us: T0,
                to_us: T0 + SPAN_US,
                search: Some(format!("aff{}", i % 997)),
                limit: 100,
                ..Default::default()
            }),
        ),
    ];
    println!("rows {rows}");
    for (name, query) in kinds.drain(..) {
        let mut ms = Vec::new();
        for i in 0..200 {
            let t = Instant::now();
            store
                .server_postbacks(query(i))
                .await
                .map_err(|e| e.to_string())?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "{name:<18} p50 {:>8.2} ms  p95 {:>8.2} ms",
            percentile(&mut ms, 0.5),
            percentile(&mut ms, 0.95)
        );
    }
    Ok(())
}

/// Errors as text: this tool only reports them.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
