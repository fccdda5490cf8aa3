//! ClickHouse killed for 20 s under load and started again: the front end goes on answering
//! 200 (the log holds the events), `/ready` says the analytics store is gone while it is, the
//! processor waits and drains by itself afterwards, and every postback that got a 200 is in the
//! stats exactly once, with exactly one conversion. Needs the server the test command starts
//! (`POSTBACKD_TEST_CLICKHOUSE`, and its directory in `POSTBACKD_TEST_CLICKHOUSE_DIR`, to kill
//! and start it); plain `cargo test` reports it as ignored.

mod common;

use common::{offer_and_click, today, Api, KEY};
use postbackd::{Config, Server};
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn server_script(action: &str, dir: &str, port: Option<&str>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/clickhouse.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg(action).arg(dir);
    if let Some(p) = port {
        cmd.arg(p);
    }
    let status = cmd.status().expect("runs deploy/clickhouse.sh");
    assert!(status.success(), "deploy/clickhouse.sh {action} failed");
}

/// Every row of a listing, page by page in one snapshot.
async fn all_rows(api: &Api, endpoint: &str, key: &str) -> Vec<serde_json::Value> {
    let d = today();
    let mut out = Vec::new();
    let mut snapshot = String::new();
    for page in 1.. {
        let (code, body) = api
            .get_json(&format!(
                "{endpoint}?date_from={d}&date_to={d}&limit=500&page={page}{snapshot}"
            ))
            .await;
        assert_eq!(code, 200, "{body}");
        let rows = body[key].as_array().expect("rows").clone();
        let n = rows.len();
        out.extend(rows);
        if n < 500 {
            return out;
        }
        let s = body["pagination"]["snapshot"].as_str().expect("snapshot");
        snapshot = format!("&snapshot={s}");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the ClickHouse server of deploy/test.sh (POSTBACKD_TEST_CLICKHOUSE, _DIR)"]
async fn a_clickhouse_outage_pauses_processing_and_loses_nothing() {
    let server_url = std::env::var("POSTBACKD_TEST_CLICKHOUSE").expect("POSTBACKD_TEST_CLICKHOUSE");
    let server_dir =
        std::env::var("POSTBACKD_TEST_CLICKHOUSE_DIR").expect("POSTBACKD_TEST_CLICKHOUSE_DIR");
    let port = server_url.rsplit(':').next().expect("a port").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        store: common::test_store(dir.path()),
        migrate: true,
        api_key: KEY.into(),
        ..Config::default()
    };
    assert!(config.store.starts_with("clickhouse://"));
    let server = Server::start(config, None).await.expect("starts");
    let api = Api::new(server.addr());
    let click = offer_and_click(&api).await;

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (acked, stop, http) = (acked.clone(), stop.clone(), http.clone());
            let (base, click) = (api.base.clone(), click.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Acquire) {
                    let action = format!("w{w}-{i}");
                    i += 1;
                    let url = format!("{base}/postback?clickid={click}&action_id={action}");
                    let status = http
                        .get(url)
                        .send()
                        .await
                        .expect("always an answer")
                        .status();
                    assert_eq!(status, 200, "the front end does not need ClickHouse");
                    acked.lock().expect("lock").push(action);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let count = || acked.lock().expect("lock").len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count() < 100 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    server_script("kill", &server_dir, None);
    let killed = Instant::now();
    let mut saw_unready = false;
    while killed.elapsed() < Duration::from_secs(20) {
        let r = api
            .http
            .get(format!("{}/ready", api.base))
            .send()
            .await
            .expect("ready answers");
        if r.status() == 503 {
            let why = r.text().await.expect("text");
            assert!(why.contains("analytics store"), "{why}");
            saw_unready = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let acked_during = count();
    server_script("start", &server_dir, Some(&port));

    // The processor drains by itself: ready again, and the log catches up.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = api
            .http
            .get(format!("{}/ready", api.base))
            .send()
            .await
            .expect("ready answers")
            .status();
        if ready == 200 && count() > acked_during + 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not recover by itself"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await.expect("worker");
    }
    assert!(saw_unready, "/ready reported the analytics store gone");

    // Every 200 is in the stats exactly once, with one conversion each.
    let acked: Vec<String> = acked.lock().expect("lock").clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    let logged = loop {
        let mut logged: HashMap<String, usize> = HashMap::new();
        for r in all_rows(&api, "/3.0/stats/serverpostbacks", "postbacks").await {
            let action = r["action_id"].as_str().expect("action id").to_string();
            *logged.entry(action).or_default() += 1;
        }
        if acked.iter().all(|a| logged.contains_key(a)) {
            break logged;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged postbacks missing after the outage"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(logged.len(), acked.len());
    for a in &acked {
        assert_eq!(logged.get(a), Some(&1), "{a} logged once");
    }
    let mut conversions: HashMap<String, usize> = HashMap::new();
    for c in all_rows(&api, "/3.0/stats/conversions", "conversions").await {
        let action = c["action_id"].as_str().expect("action id").to_string();
        *conversions.entry(action).or_default() += 1;
    }
    assert_eq!(conversions.len(), acked.len(), "a conversion per postback");
    assert!(conversions.values().all(|n| *n == 1), "no conversion twice");
    server.shutdown().await;
}
