//! The engine process killed with SIGKILL under load, and `postbackd replay`: every postback
//! that got a 200 is in the stats after a restart exactly once, and a replayed store gives the
//! same stats as the original.

mod common;

use common::affiliate::Affiliate;
use common::{today, Api, KEY};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Engine = common::binary::Process;

async fn spawn(dir: &Path) -> Engine {
    spawn_with(dir, &[]).await
}

async fn spawn_with(dir: &Path, extra: &[&str]) -> Engine {
    let env = [
        ("POSTBACKD_DELIVERY_BASE_DELAY_MS", "100".to_string()),
        ("POSTBACKD_DELIVERY_TIMEOUT_MS", "2000".to_string()),
    ];
    common::binary::spawn(dir, extra, &env).await
}

/// Every row of a stats endpoint, page by page, in the snapshot of the first page: the
/// processor may still be adding rows (newest first) while the pages are read.
async fn all_rows(api: &Api, endpoint: &str, key: &str) -> Vec<Value> {
    let d = today();
    let mut out = Vec::new();
    let mut snapshot = String::new();
    for page in 1.. {
        let (code, body) = api
            .get_json(&format!(
                "/3.0/stats/{endpoint}?date_from={d}&date_to={d}&limit=500&page={page}{snapshot}"
            ))
            .await;
        assert_eq!(code, 200, "{body}");
        let rows = body[key].as_array().expect("rows").clone();
        let done = rows.len() < 500;
        out.extend(rows);
        if done {
            break;
        }
        let pinned = body["pagination"]["snapshot"].as_str().expect("snapshot");
        snapshot = format!("&snapshot={pinned}");
    }
    out
}

async fn setup(api: &Api) -> String {
    common::offer_and_click(api).await
}

const FLAGS: [&str; 1] = ["--allow-private-postback-targets"];

/// An engine (allowed to reach loopback) whose partner 1 has a postback to a local affiliate
/// server, and a click to convert.
async fn with_affiliate(dir: &Path) -> (Affiliate, Engine, String) {
    let aff = Affiliate::start().await;
    let engine = spawn_with(dir, &FLAGS).await;
    let click = setup(&engine.api).await;
    let url = aff.url("/ok?t={transactionid}&s={status}");
    engine
        .api
        .admin_post(
            "/3.0/partner/postback",
            &[("partner_id", "1"), ("url", &url)],
        )
        .await;
    (aff, engine, click)
}

/// Sends postbacks from `workers` tasks until the server stops answering; returns the action
/// ids that got a 200.
fn load(
    api: &Api,
    click: &str,
    workers: usize,
) -> (Arc<Mutex<Vec<String>>>, Vec<tokio::task::JoinHandle<()>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let handles = (0..workers)
        .map(|w| {
            let (acked, http, base, click) = (
                acked.clone(),
                http.clone(),
                api.base.clone(),
                click.to_string(),
            );
            tokio::spawn(async move {
                for i in 0..100_000 {
                    let action = format!("w{w}-{i}");
                    let url = format!("{base}/postback?clickid={click}&action_id={action}");
                    match http.get(url).send().await {
                        Ok(r) if r.status() == 200 => acked.lock().expect("lock").push(action),
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => return, // the server is gone
                    }
                }
            })
        })
        .collect();
    (acked, handles)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut engine = spawn(dir.path()).await;
    let click = setup(&engine.api).await;
    let (acked, handles) = load(&engine.api, &click, 8);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().expect("lock").len() < 600 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.child.kill().expect("SIGKILL");
    engine.child.wait().expect("reaped");
    for h in handles {
        h.await.expect("worker");
    }
    let acked: Vec<String> = acked.lock().expect("lock").clone();
    drop(engine);

    let engine = spawn(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let conversions = loop {
        let rows = all_rows(&engine.api, "conversions", "conversions").await;
        if rows.len() >= acked.len() {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} conversions after restart",
            rows.len(),
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in &conversions {
        *seen
            .entry(c["action_id"].as_str().expect("action id").to_string())
            .or_default() += 1;
    }
    for a in &acked {
        assert_eq!(
            seen.get(a),
            Some(&1),
            "acknowledged postback {a} must be counted exactly once"
        );
    }
    assert!(seen.values().all(|n| *n == 1), "no conversion twice");
    // The log has one row per postback the log holds: acknowledged ones and perhaps a few that
    // were durable when the process died before it could answer.
    let log = all_rows(&engine.api, "serverpostbacks", "postbacks").await;
    let mut logged: HashMap<String, usize> = HashMap::new();
    for r in &log {
        *logged
            .entry(r["action_id"].as_str().expect("action id").to_string())
            .or_default() += 1;
    }
    assert!(logged.values().all(|n| *n == 1), "no postback logged twice");
    assert!(acked.iter().all(|a| logged.contains_key(a)));
    assert!(
        log.iter().all(|r| r["response_status"] == 1),
        "all distinct action ids register"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reproduces_the_same_stats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (aff, engine, click) = with_affiliate(dir.path()).await;
    let api = engine.api.clone();
    for q in [
        format!("clickid={click}&action_id=1"),
        format!("clickid={click}&action_id=1"),
        format!("clickid={click}&action_id=2&status=2"),
        format!("clickid={click}&action_id=2&status=1"),
        format!("clickid={click}&goal=nope"),
        "clickid=zzz".to_string(),
    ] {
        api.postback(&q).await;
    }
    api.wait_for_postbacks(6).await;
    // Three conversion states (1 created, 2 created, 2 confirmed), one delivery each.
    let deadline = Instant::now() + Duration::from_secs(30);
    while all_rows(&api, "affiliatepostbacks", "postbacks")
        .await
        .len()
        < 3
    {
        assert!(Instant::now() < deadline, "deliveries were not made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_log = all_rows(&api, "serverpostbacks", "postbacks").await;
    let before_conv = all_rows(&api, "conversions", "conversions").await;
    let before_attempts = all_rows(&api, "affiliatepostbacks", "postbacks").await;
    // The binary installs the Prometheus exporter; its counters saw this traffic. On the main
    // address it needs the key, which Prometheus sends as a bearer token.
    let metrics_url = format!("{}/metrics", api.base);
    let anonymous = api.http.get(&metrics_url).send().await.expect("metrics");
    assert_eq!(anonymous.status(), 401);
    let metrics = api
        .http
        .get(&metrics_url)
        .bearer_auth(KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("postbackd_postbacks_total{kind=\"s2s\"} 6"),
        "{metrics}"
    );
    assert!(metrics.contains("postbackd_clicks_total 1"), "{metrics}");
    assert!(
        metrics.contains("postbackd_processed_postbacks_total 6"),
        "{metrics}"
    );
    drop(engine);
    assert_eq!(aff.received().len(), 3);

    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(dir.path(), copy.path());
    let out = Command::new(env!("CARGO_BIN_EXE_postbackd"))
        .args(["replay", "--data-dir"])
        .arg(copy.path())
        .output()
        .expect("replay runs");
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replayed 7 events"),
        "{out:?}"
    );

    let replayed = spawn_with(copy.path(), &FLAGS).await;
    let after_log = all_rows(&replayed.api, "serverpostbacks", "postbacks").await;
    let after_conv = all_rows(&replayed.api, "conversions", "conversions").await;
    let after_attempts = all_rows(&replayed.api, "affiliatepostbacks", "postbacks").await;
    assert_eq!(before_log.len(), 6);
    assert_eq!(after_log, before_log);
    assert_eq!(after_conv, before_conv);
    assert_eq!(
        after_attempts, before_attempts,
        "the attempt log is replayed, not redone"
    );
    // Give a wrongly re-sending dispatcher the chance to show itself.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(aff.received().len(), 3, "a replay sends nothing again");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Killed in the middle of deliveries, the engine delivers each (setting, conversion state)
/// exactly once after a restart to a server that answers 200. The server drops its
/// connections unread for a moment before the kill, so that no answer it gave can be lost
/// with the process (that window is the one place where delivery is at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_deliveries_sends_each_state_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (aff, engine, click) = with_affiliate(dir.path()).await;
    let api = engine.api.clone();
    let total = 300;
    for i in 0..total {
        api.postback(&format!("clickid={click}&action_id=P{i}"))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while aff.received().len() < 60 {
        assert!(Instant::now() < deadline, "deliveries did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    aff.pause(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(engine); // SIGKILL
    let before = aff.received().len();
    assert!(
        before < total,
        "the kill came too late to test anything ({before} delivered)"
    );
    aff.pause(false);

    let engine = spawn_with(dir.path(), &FLAGS).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = today();
        let (_, body) = engine
            .api
            .get_json(&format!(
                "/3.0/stats/affiliatepostbacks?date_from={d}&date_to={d}&http_code=200&limit=1"
            ))
            .await;
        if body["pagination"]["total_count"].as_u64() == Some(total as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {body} delivered after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in aff.received() {
        *counts.entry(r.query).or_default() += 1;
    }
    for i in 0..total {
        let q = format!("t=P{i}&s=1");
        assert_eq!(
            counts.get(&q),
            Some(&1),
            "{q} delivered {:?} times",
            counts.get(&q)
        );
    }
    assert_eq!(counts.len(), total);
}
