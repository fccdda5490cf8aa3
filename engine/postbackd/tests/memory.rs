//! Memory is bounded in bytes, not entries: a flood of clicks with huge subs and headers (the
//! kind anyone can send, no key needed) keeps the engine's resident memory within its budgets.

mod common;

use common::today;
use std::time::{Duration, Instant};

type Engine = common::binary::Process;

const MIB: u64 = 1 << 20;

async fn spawn(dir: &std::path::Path, budgets: &[(&str, u64)]) -> Engine {
    let env: Vec<(&str, String)> = budgets.iter().map(|(k, v)| (*k, v.to_string())).collect();
    common::binary::spawn(dir, &[], &env).await
}

/// The process's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// Sends `n` clicks of about 46 KiB each (eight 3.8 KiB subs, and an 8 KiB user agent and
/// referrer), 16 at a time, then a postback, and waits until that postback is processed (so
/// every click before it was). Returns the peak resident memory growth over the flood.
async fn flood(engine: &Engine, n: usize) -> u64 {
    let api = &engine.api;
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "O"),
            ("url", "https://x.example/?c={clickid}&s={sub1}"),
        ],
    )
    .await;
    let before = peak_rss(engine.child.id());
    let sub = "s".repeat(3800);
    let subs: String = (1..=8).map(|i| format!("&sub{i}={sub}")).collect();
    let big_header = "h".repeat(8192);
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (http, base, subs, header) = (
                api.http.clone(),
                api.base.clone(),
                subs.clone(),
                big_header.clone(),
            );
            tokio::spawn(async move {
                for i in (w..n).step_by(16) {
                    let r = http
                        .get(format!("{base}/click?offer_id=1&pid={i}{subs}"))
                        .header("user-agent", &header)
                        .header("referer", &header)
                        .send()
                        .await
                        .expect("click");
                    assert_eq!(r.status(), 302);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    api.postback("clickid=000000000000000000000000&n=last")
        .await;
    let d = today();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) = api
            .get_json(&format!(
                "/3.0/stats/serverpostbacks?date_from={d}&date_to={d}"
            ))
            .await;
        if body["pagination"]["total_count"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the flood was not processed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak_rss(engine.child.id()).saturating_sub(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_huge_clicks_stays_within_the_memory_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let budgets = [
        ("POSTBACKD_PROCESSOR_CACHE_BYTES", 16 * MIB),
        ("POSTBACKD_PROCESSOR_BATCH_BYTES", 4 * MIB),
        ("POSTBACKD_REQUEST_MEMORY_BYTES", 8 * MIB),
    ];
    let engine = spawn(dir.path(), &budgets).await;
    // 4,000 clicks carry about 180 MiB: far more than the budgets, which the growth of the
    // peak must stay near (the budgets, SQLite's page caches, buffers and allocator slack).
    let grown = flood(&engine, 4_000).await;
    eprintln!("peak resident memory grew by {} MiB", grown / MIB);
    assert!(
        grown < 96 * MIB,
        "peak resident memory grew by {} MiB over a flood of 180 MiB",
        grown / MIB
    );
}
