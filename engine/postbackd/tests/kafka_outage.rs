//! The Kafka broker stopped for 20 s under load and started again: every request gets a 503 or
//! a 200 (never a hang, never a 200 and a loss), `/ready` says the broker is gone while it is,
//! the engine recovers by itself, and every postback that got a 200 is in the stats exactly
//! once. Needs the broker the test command starts (`POSTBACKD_TEST_KAFKA`, and its data
//! directory in `POSTBACKD_TEST_KAFKA_DIR`, to stop and start it); plain `cargo test` reports
//! it as ignored.

mod common;

use common::{offer_and_click, today, Api, KEY};
use postbackd::{Config, Server};
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn broker_script(action: &str, dir: &str, port: Option<&str>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/kafka.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg(action).arg(dir);
    if let Some(p) = port {
        cmd.arg(p);
    }
    let status = cmd.status().expect("runs deploy/kafka.sh");
    assert!(status.success(), "deploy/kafka.sh {action} failed");
}

#[derive(Default)]
struct Outcomes {
    acked: Vec<String>,
    refused: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Kafka broker of deploy/test.sh (POSTBACKD_TEST_KAFKA, _DIR)"]
async fn a_broker_outage_gives_503s_and_loses_nothing() {
    let broker = std::env::var("POSTBACKD_TEST_KAFKA").expect("POSTBACKD_TEST_KAFKA");
    let broker_dir = std::env::var("POSTBACKD_TEST_KAFKA_DIR").expect("POSTBACKD_TEST_KAFKA_DIR");
    let port = broker.rsplit(':').next().expect("a port").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        log: common::test_log(dir.path()),
        partitions: common::test_partitions(),
        api_key: KEY.into(),
        append_timeout_ms: 3000,
        ..Config::default()
    };
    assert!(config.log.starts_with("kafka://"));
    let server = Server::start(config, None).await.expect("starts");
    let api = Api::new(server.addr());
    let click = offer_and_click(&api).await;

    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (outcomes, stop, http) = (outcomes.clone(), stop.clone(), http.clone());
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
                    {
                        let mut o = outcomes.lock().expect("lock");
                        match status.as_u16() {
                            200 => o.acked.push(action),
                            503 => o.refused += 1,
                            other => panic!("answered {other}"),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let acked = || outcomes.lock().expect("lock").acked.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked() < 100 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    broker_script("stop", &broker_dir, None);
    let stopped = Instant::now();
    let mut saw_unready = false;
    while stopped.elapsed() < Duration::from_secs(20) {
        let r = api
            .http
            .get(format!("{}/ready", api.base))
            .send()
            .await
            .expect("ready answers");
        if r.status() == 503 {
            let why = r.text().await.expect("text");
            assert!(why.contains("log"), "{why}");
            saw_unready = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused_during = outcomes.lock().expect("lock").refused;
    broker_script("start", &broker_dir, Some(&port));

    // The engine recovers by itself: ready again, and 200s again.
    let acked_before = acked();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = api
            .http
            .get(format!("{}/ready", api.base))
            .send()
            .await
            .expect("ready answers")
            .status();
        if ready == 200 && acked() > acked_before + 50 {
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
    assert!(saw_unready, "/ready reported the broker gone");
    assert!(
        refused_during > 0,
        "requests during the outage were refused"
    );

    // Every 200 is in the stats exactly once (a 503 may be there too: at least once).
    let acked: Vec<String> = outcomes.lock().expect("lock").acked.clone();
    let d = today();
    let deadline = Instant::now() + Duration::from_secs(120);
    let logged = loop {
        let mut logged: HashMap<String, usize> = HashMap::new();
        let mut snapshot = String::new();
        for page in 1.. {
            let (code, body) = api
                .get_json(&format!(
                    "/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&limit=500&page={page}{snapshot}"
                ))
                .await;
            assert_eq!(code, 200, "{body}");
            let rows = body["postbacks"].as_array().expect("rows").clone();
            for r in &rows {
                *logged
                    .entry(r["action_id"].as_str().expect("action id").to_string())
                    .or_default() += 1;
            }
            if rows.len() < 500 {
                break;
            }
            let s = body["pagination"]["snapshot"].as_str().expect("snapshot");
            snapshot = format!("&snapshot={s}");
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
    for a in &acked {
        assert_eq!(logged.get(a), Some(&1), "{a} logged once");
    }
    assert!(logged.values().all(|n| *n == 1), "no postback logged twice");
    server.shutdown().await;
}
