//! Affiliate postbacks over real HTTP: triggers, macros, retries with backoff, `Retry-After`,
//! timeouts, refused connections, the attempt log, operator actions, isolation of a hanging
//! host, and the guard against internal addresses.

mod common;

use common::affiliate::{closed_port, Affiliate};
use common::{today, Api, KEY};
use postbackd::{Config, Server};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

async fn start(dir: &std::path::Path, allow_internal: bool, timeout_ms: u64) -> Server {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        log: common::test_log(dir),
        partitions: common::test_partitions(),
        store: common::test_store(dir),
        migrate: true,
        api_key: KEY.into(),
        allow_private_postback_targets: allow_internal,
        delivery_max_attempts: 3,
        delivery_base_delay_ms: 200,
        delivery_timeout_ms: timeout_ms,
        delivery_connect_timeout_ms: 500,
        delivery_per_host: 2,
        ..Config::default()
    };
    Server::start(config, None).await.expect("starts")
}

async fn setup_offer(api: &Api) {
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "Shop"),
            ("url", "https://shop.example/?clickid={clickid}"),
            ("payments[0][goal]", "sale"),
            ("payments[0][type]", "percent"),
            ("payments[0][total]", "10"),
            ("payments[0][revenue]", "20"),
        ],
    )
    .await;
    api.admin_post("/3.0/admin/partner", &[("email", "one@example.com")])
        .await;
    api.admin_post("/3.0/admin/partner", &[("email", "two@example.com")])
        .await;
}

async fn setting(api: &Api, form: &[(&str, &str)]) -> u64 {
    api.admin_post("/3.0/partner/postback", form).await["postback"]["id"]
        .as_u64()
        .expect("id")
}

async fn attempts(api: &Api, filter: &str) -> Vec<Value> {
    let d = today();
    let (code, body) = api
        .get_json(&format!(
            "/3.0/stats/affiliatepostbacks?date_from={d}&date_to={d}&limit=500&{filter}"
        ))
        .await;
    assert_eq!(code, 200, "{body}");
    body["postbacks"].as_array().expect("rows").clone()
}

/// Attempts grouped by job, oldest first, once every job of `jobs` has reached an end state.
async fn settled(api: &Api, jobs: usize) -> HashMap<String, Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut by_job: HashMap<String, Vec<Value>> = HashMap::new();
        for row in attempts(api, "").await {
            by_job
                .entry(row["job_id"].as_str().expect("job id").to_string())
                .or_default()
                .push(row);
        }
        for rows in by_job.values_mut() {
            rows.sort_by_key(|r| r["attempt"].as_u64());
        }
        let done = by_job.len() == jobs
            && by_job
                .values()
                .all(|rows| rows.last().is_some_and(|r| r["state"] != "pending"));
        if done {
            return by_job;
        }
        assert!(
            Instant::now() < deadline,
            "deliveries did not settle: {by_job:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn micros(row: &Value) -> i64 {
    row["date"]["sec"].as_i64().expect("sec") * 1_000_000
        + row["date"]["usec"].as_i64().expect("usec")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_outcomes_and_the_attempt_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), true, 1000).await;
    let api = Api::new(server.addr());
    let aff = Affiliate::start().await;
    let closed = closed_port();
    setup_offer(&api).await;
    let ok_url = aff.url(
        "/ok?c={clickid}&t={transactionid}&s={status}&p={payouts}&g={goal}&o={offer_name}&x={nope}",
    );
    let urls = [
        ("ok", ok_url),
        ("flaky", aff.url("/flaky?t={transactionid}&s={status}")),
        ("limited", aff.url("/limited?t={transactionid}&s={status}")),
        ("hang", aff.url("/hang?t={transactionid}&s={status}")),
        ("closed", format!("http://{closed}/closed?s={{status}}")),
        ("bad", aff.url("/bad?t={transactionid}&s={status}")),
    ];
    let mut kinds: HashMap<u64, &str> = HashMap::new();
    for (kind, url) in &urls {
        kinds.insert(
            setting(&api, &[("partner_id", "1"), ("url", url)]).await,
            kind,
        );
    }
    let created = aff.url("/ok?kind=created&t={transactionid}");
    let confirmed = aff.url("/ok?kind=confirmed&t={transactionid}");
    let posted = aff.url("/ok?kind=posted&t={transactionid}");
    kinds.insert(
        setting(
            &api,
            &[
                ("partner_id", "1"),
                ("offer_id", "1"),
                ("goal", "SALE"),
                ("status", "by_creating"),
                ("url", &created),
            ],
        )
        .await,
        "created",
    );
    kinds.insert(
        setting(
            &api,
            &[
                ("partner_id", "1"),
                ("offer_id", "1"),
                ("status", "confirmed"),
                ("url", &confirmed),
            ],
        )
        .await,
        "confirmed",
    );
    kinds.insert(
        setting(
            &api,
            &[
                ("partner_id", "1"),
                ("status", "pending"),
                ("method", "POST"),
                ("url", &posted),
            ],
        )
        .await,
        "posted",
    );
    let other = aff.url("/ok?kind=other-partner");
    setting(&api, &[("partner_id", "2"), ("url", &other)]).await;
    let wrong_goal = aff.url("/ok?kind=wrong-goal");
    setting(
        &api,
        &[
            ("partner_id", "1"),
            ("offer_id", "1"),
            ("goal", "install"),
            ("url", &wrong_goal),
        ],
    )
    .await;

    let click = api.click(1, 1, "&sub1=aff-click").await;
    api.postback(&format!(
        "clickid={click}&goal=sale&sum=50&action_id=T1&status=2"
    ))
    .await;
    api.postback(&format!("clickid={click}&goal=sale&action_id=T1&status=1"))
        .await;

    // Creation: 6 "any" + by_creating + pending; the change to confirmed: 6 "any" + confirmed.
    let jobs = settled(&api, 15).await;
    let by_kind = |kind: &str, status: u64| -> Vec<Value> {
        jobs.values()
            .find(|rows| rows[0]["status"] == status && kind_of(&rows[0]) == kind)
            .unwrap_or_else(|| panic!("no job for {kind} with status {status}: {jobs:#?}"))
            .clone()
    };

    let ok = by_kind("ok", 2);
    assert_eq!(ok.len(), 1);
    let row = &ok[0];
    assert_eq!(row["http_code"], 200);
    assert_eq!(row["state"], "delivered");
    assert_eq!(row["error"], "");
    assert_eq!(row["attempt"], 1);
    assert_eq!(row["pid"], 1);
    assert_eq!(row["offer_id"], 1);
    assert_eq!(row["goal"], "sale");
    assert_eq!(row["payouts"], 5.0);
    assert_eq!(row["revenue"], 10.0);
    assert_eq!(row["currency"], "USD");
    assert_eq!(row["integration_type"], "s2s");
    assert!(row["lead_id"].as_str().is_some_and(|s| s.len() == 24));
    assert!(row["_id"]["$id"].as_str().is_some_and(|s| s.len() == 24));
    let url = row["postback_url"].as_str().expect("url");
    assert!(
        url.contains(&format!("c={click}&t=T1&s=2&p=5&g=sale&o=Shop&x={{nope}}")),
        "{url}"
    );
    assert_eq!(by_kind("ok", 1)[0]["state"], "delivered");

    let flaky = by_kind("flaky", 1);
    assert_eq!(
        flaky
            .iter()
            .map(|r| r["http_code"].as_u64())
            .collect::<Vec<_>>(),
        vec![Some(500), Some(200)]
    );
    assert_eq!(flaky[0]["state"], "pending");
    assert_eq!(flaky[0]["error"], "HTTP 500: oops");
    assert!(!flaky[0]["next_attempt_at"].is_null());
    assert_eq!(flaky[1]["state"], "delivered");
    assert!(
        micros(&flaky[1]) - micros(&flaky[0]) >= 100_000,
        "backoff of at least half the base delay"
    );

    let limited = by_kind("limited", 2);
    assert_eq!(
        limited
            .iter()
            .map(|r| r["http_code"].as_u64())
            .collect::<Vec<_>>(),
        vec![Some(429), Some(200)]
    );
    assert!(
        micros(&limited[1]) - micros(&limited[0]) >= 1_000_000,
        "Retry-After: 1 is honoured"
    );

    let hang = by_kind("hang", 2);
    assert_eq!(hang.len(), 3, "max attempts");
    assert!(
        hang.iter()
            .all(|r| r["http_code"] == 0
                && r["error"].as_str().is_some_and(|e| e.contains("timeout")))
    );
    assert_eq!(hang[2]["state"], "gave_up");
    assert!(
        micros(&hang[2]) - micros(&hang[1]) >= 1_000_000 + 200_000,
        "the second retry waits twice the first"
    );

    let closed_rows = by_kind("closed", 2);
    assert_eq!(closed_rows.len(), 3);
    assert!(
        closed_rows.iter().all(|r| r["http_code"] == 0),
        "{closed_rows:?}"
    );
    assert!(
        closed_rows[0]["error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("refused")),
        "{closed_rows:?}"
    );
    assert_eq!(closed_rows[2]["state"], "gave_up");

    let bad = by_kind("bad", 1);
    assert_eq!(bad.len(), 1, "a 404 is not retried");
    assert_eq!(bad[0]["state"], "failed");
    assert_eq!(bad[0]["error"], "HTTP 404: no such postback");

    // Triggers by status and goal, and the POST method.
    assert_eq!(aff.count("/ok", "kind=created"), 1);
    assert_eq!(aff.count("/ok", "kind=confirmed"), 1);
    assert_eq!(aff.count("/ok", "kind=other-partner"), 0);
    assert_eq!(aff.count("/ok", "kind=wrong-goal"), 0);
    let post = aff
        .received()
        .into_iter()
        .find(|r| r.query.contains("kind=posted"))
        .expect("posted");
    assert_eq!(post.method, "POST");
    assert_eq!(post.body, "kind=posted&t=T1");

    // Filters of the attempt log.
    assert_eq!(
        attempts(&api, "http_code=404").await.len(),
        2,
        "one per conversion state"
    );
    assert_eq!(attempts(&api, "http_code=0").await.len(), 12);
    assert_eq!(attempts(&api, "partner=2").await.len(), 0);
    assert_eq!(
        attempts(&api, "offer=1&goal=SALE").await.len(),
        attempts(&api, "").await.len()
    );
    let confirmed_rows = attempts(&api, "status=1").await;
    assert!(confirmed_rows.iter().all(|r| r["status"] == 1) && !confirmed_rows.is_empty());

    // The preview of a setting for a conversion, without sending it.
    let lead = row["lead_id"].as_str().expect("lead").to_string();
    let ok_setting = kinds
        .iter()
        .find(|(_, k)| **k == "ok")
        .map(|(id, _)| *id)
        .expect("ok setting");
    let received_before = aff.received().len();
    let (code, body) = api
        .get_json(&format!(
            "/3.0/partner/postback/{ok_setting}/test?conversion_id={lead}"
        ))
        .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body["postback"]["url"]
            .as_str()
            .is_some_and(|u| u.contains("t=T1&s=1")),
        "{body}"
    );
    assert_eq!(
        aff.received().len(),
        received_before,
        "a preview sends nothing"
    );

    // Re-send one failed delivery: a new round, a new attempt row.
    let bad_job = bad[0]["job_id"].as_str().expect("job").to_string();
    let r = api
        .admin_post(
            "/3.0/admin/affiliatepostbacks/resend",
            &[("job_id", &bad_job)],
        )
        .await;
    assert_eq!(r["count"], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while attempts(&api, &format!("job_id={bad_job}")).await.len() < 2 {
        assert!(Instant::now() < deadline, "the re-send was not attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // All failed deliveries of a partner in a time range.
    let d = today();
    let r = api
        .admin_post(
            "/3.0/admin/affiliatepostbacks/resend",
            &[("partner_id", "1"), ("date_from", &d), ("date_to", &d)],
        )
        .await;
    assert_eq!(r["count"], 6, "hang x2, closed x2, bad x2: {r}");
    server.shutdown().await;
}

/// What a delivery was for: its `kind=` parameter, or else the path it went to.
fn kind_of(row: &Value) -> String {
    let url = row["postback_url"].as_str().expect("url");
    if let Some(kind) = url.split("kind=").nth(1) {
        return kind.split('&').next().unwrap_or("").to_string();
    }
    let path = url.splitn(4, '/').nth(3).unwrap_or("");
    path.split('?').next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_host_does_not_hold_up_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), true, 20_000).await;
    let api = Api::new(server.addr());
    let hanging = Affiliate::start().await;
    let healthy = Affiliate::start().await;
    setup_offer(&api).await;
    setting(
        &api,
        &[
            ("partner_id", "1"),
            ("url", &hanging.url("/hang?t={transactionid}")),
        ],
    )
    .await;
    setting(
        &api,
        &[
            ("partner_id", "1"),
            ("url", &healthy.url("/ok?t={transactionid}")),
        ],
    )
    .await;
    let click = api.click(1, 1, "").await;
    for i in 0..20 {
        api.postback(&format!("clickid={click}&goal=sale&action_id=H{i}"))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while healthy.count("/ok", "") < 20 {
        assert!(
            Instant::now() < deadline,
            "healthy host got {} of 20",
            healthy.count("/ok", "")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while attempts(&api, "http_code=200").await.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "the healthy deliveries were not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        hanging.count("/hang", "") <= 2,
        "the hanging host holds only its own slots"
    );
    assert!(
        attempts(&api, "http_code=0").await.is_empty(),
        "no hanging attempt has finished yet"
    );
    drop(server); // in-flight hanging attempts would take the full timeout to drain
}

/// Due jobs are taken fairly across hosts: a dead affiliate with more due jobs than one read
/// of the due list holds (hundreds) does not keep another affiliate's first attempt waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_hundreds_of_due_jobs_does_not_delay_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), true, 60_000).await;
    let api = Api::new(server.addr());
    let hanging = Affiliate::start().await;
    let healthy = Affiliate::start().await;
    setup_offer(&api).await;
    let url = hanging.url("/hang?t={transactionid}");
    setting(&api, &[("partner_id", "1"), ("url", &url)]).await;
    let url = healthy.url("/ok?t={transactionid}");
    setting(&api, &[("partner_id", "2"), ("url", &url)]).await;
    let to_hanging = api.click(1, 1, "").await;
    for i in 0..700 {
        api.postback(&format!("clickid={to_hanging}&goal=sale&action_id=H{i}"))
            .await;
    }
    let to_healthy = api.click(1, 2, "").await;
    api.postback(&format!("clickid={to_healthy}&goal=sale&action_id=OK"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while healthy.count("/ok", "t=OK") == 0 {
        assert!(
            Instant::now() < deadline,
            "the healthy host's postback waited behind the dead host's ({} attempts there)",
            hanging.count("/hang", "")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        hanging.count("/hang", "") <= 2,
        "the dead host holds only its own slots"
    );
    drop(server); // hanging attempts would take their full timeout to drain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_targets_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), false, 1000).await;
    let api = Api::new(server.addr());
    let aff = Affiliate::start().await;
    setup_offer(&api).await;
    let port = aff.addr.port();
    // A literal internal address, in any notation, is refused when the setting is saved.
    for host in [
        "127.0.0.1",
        "127.1",
        "0x7f.0.0.1",
        "2130706433",
        "[::ffff:127.0.0.1]",
    ] {
        let r = api
            .http
            .post(format!("{}/3.0/partner/postback", api.base))
            .header("API-Key", common::KEY)
            .form(&[
                ("partner_id", "1"),
                ("url", &format!("http://{host}:{port}/ok")),
            ])
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 400, "{host}");
        let body: Value = r.json().await.expect("json");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("not allowed")),
            "{host}: {body}"
        );
    }
    // Hosts only known at delivery are checked then, before connecting: a name that resolves
    // to loopback, and macros that fill in an address (in two notations).
    let by_name = format!("http://localhost:{port}/ok?via=name");
    setting(&api, &[("partner_id", "1"), ("url", &by_name)]).await;
    let by_macro = format!("http://{{sub1}}:{port}/ok?via=macro");
    setting(&api, &[("partner_id", "1"), ("url", &by_macro)]).await;
    for sub1 in ["127.0.0.1", "0x7f.1"] {
        let click = api.click(1, 1, &format!("&sub1={sub1}")).await;
        api.postback(&format!("clickid={click}&goal=sale")).await;
    }
    let jobs = settled(&api, 4).await;
    for rows in jobs.values() {
        assert_eq!(rows.len(), 1, "never retried: {rows:?}");
        assert_eq!(rows[0]["state"], "failed");
        assert_eq!(rows[0]["http_code"], 0);
        assert!(
            rows[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("(loopback); not allowed")),
            "{rows:?}"
        );
    }
    assert!(
        aff.received().is_empty(),
        "nothing reached the internal server"
    );
    server.shutdown().await;
}
