//! Helpers shared by the integration tests: a client for the engine's HTTP API.
#![allow(dead_code)]

use serde_json::Value;
use std::time::{Duration, Instant};

pub mod affiliate;
pub mod binary;

pub const KEY: &str = "test-key";

#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
        }
    }

    pub async fn admin_post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("API-Key", KEY)
            .form(form)
            .send()
            .await
            .expect("send");
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["status"], 1, "{path}: {body}");
        body
    }

    pub async fn get_json(&self, path_and_query: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .header("API-Key", KEY)
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        (status, r.json().await.expect("json"))
    }

    /// Clicks and returns the click id from the redirect (the offer URL carries `{clickid}`).
    pub async fn click(&self, offer: u64, pid: u64, extra: &str) -> String {
        let r = self
            .http
            .get(format!(
                "{}/click?offer_id={offer}&pid={pid}{extra}",
                self.base
            ))
            .send()
            .await
            .expect("click");
        assert_eq!(r.status(), 302, "click on offer {offer}");
        let location = r.headers()["location"].to_str().expect("ascii").to_string();
        let id = location
            .split("clickid=")
            .nth(1)
            .expect("offer URLs in tests carry clickid={clickid}")
            .chars()
            .take(24)
            .collect::<String>();
        assert_eq!(id.len(), 24);
        id
    }

    pub async fn postback(&self, query: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/postback?{query}", self.base))
            .send()
            .await
            .expect("postback");
        assert_eq!(r.status(), 200, "postback {query}");
        r.json().await.expect("json")
    }

    /// Polls the server-postback log until it holds `n` rows for today (bounded wait).
    pub async fn wait_for_postbacks(&self, n: u64) -> Value {
        let today = today();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, body) = self
                .get_json(&format!(
                    "/3.0/stats/serverpostbacks?date_from={today}&date_to={today}&limit=500"
                ))
                .await;
            let total = body["pagination"]["total_count"].as_u64().unwrap_or(0);
            if total >= n {
                assert_eq!(total, n, "more rows than postbacks sent");
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "only {total} of {n} postbacks processed in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An offer (id 1, paying 1 for goal 1), a partner (id 1), and a click on both.
pub async fn offer_and_click(api: &Api) -> String {
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "O"),
            ("url", "https://x.example/?clickid={clickid}"),
            ("payments[0][total]", "1"),
        ],
    )
    .await;
    api.admin_post("/3.0/admin/partner", &[("email", "a@example.com")])
        .await;
    api.click(1, 1, "").await
}

/// The `log` of a test engine in `dir`: the embedded log, or, when the test command started a
/// Kafka broker (`POSTBACKD_TEST_KAFKA=host:port`), topics of their own on it (named after
/// the data directory, so a restarted engine finds its topics again).
pub fn test_log(dir: &std::path::Path) -> String {
    test_broker().map_or_else(String::new, |broker| {
        format!("kafka://{broker}/t{}", name_of(dir))
    })
}

fn test_broker() -> Option<String> {
    std::env::var("POSTBACKD_TEST_KAFKA")
        .ok()
        .filter(|broker| !broker.is_empty())
}

/// Partitions of a test engine's logs: two on Kafka, where the default (12) for each of the
/// engine's topics would leave the suite's one broker holding thousands of partitions, each of
/// which a restart of the broker (the outage test) must recover before it serves again.
pub fn test_partitions() -> Option<u32> {
    test_broker().map(|_| 2)
}

/// A directory's name in letters and digits: a name for its topics or database.
pub fn name_of(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect()
}

/// A test engine's configuration in `dir`: any port on loopback, the test key, and the logs
/// and store the test command started (see `test_log`, `test_store`).
pub fn test_config(dir: &std::path::Path) -> postbackd::Config {
    postbackd::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        log: test_log(dir),
        partitions: test_partitions(),
        store: test_store(dir),
        migrate: true,
        api_key: KEY.into(),
        ..postbackd::Config::default()
    }
}

pub fn today() -> String {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64;
    postback_core::delivery::civil(now_us).0
}

/// The analytics store of a test engine in `dir`: the embedded one, or, when the test command
/// started a ClickHouse server (`POSTBACKD_TEST_CLICKHOUSE=clickhouse://host:port`), a database
/// of its own there (named after the data directory, so a restarted engine finds it again).
pub fn test_store(dir: &std::path::Path) -> String {
    match std::env::var("POSTBACKD_TEST_CLICKHOUSE") {
        Ok(server) if !server.is_empty() => format!("{server}/t{}", name_of(dir)),
        _ => String::new(),
    }
}
