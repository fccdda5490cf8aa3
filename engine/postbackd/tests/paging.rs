//! Stable paging over HTTP: a listing read page by page while the processor adds rows sees
//! each row once (CONTRACT section 4, `snapshot`); and a store of an older schema is rebuilt
//! from the logs at start.

mod common;

use common::{offer_and_click, today, Api, KEY};
use postbackd::{Config, Server};
use serde_json::Value;
use std::collections::HashSet;

async fn start(dir: &std::path::Path) -> Server {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        log: common::test_log(dir),
        partitions: common::test_partitions(),
        store: common::test_store(dir),
        migrate: true,
        api_key: KEY.into(),
        ..Config::default()
    };
    Server::start(config, None).await.expect("starts")
}

async fn convert(api: &Api, click: &str, actions: std::ops::Range<usize>) {
    for i in actions {
        api.postback(&format!("clickid={click}&action_id=a{i:03}"))
            .await;
    }
}

/// Reads `endpoint` in pages of 10; after the first page, `between` runs (adding rows).
async fn pages_while_growing(
    api: &Api,
    endpoint: &str,
    key: &str,
    between: impl std::future::Future<Output = ()>,
) -> (Vec<String>, Vec<u64>) {
    let d = today();
    let base = format!("/3.0/stats/{endpoint}?date_from={d}&date_to={d}&limit=10");
    let (code, first) = api.get_json(&format!("{base}&page=1")).await;
    assert_eq!(code, 200, "{first}");
    let snapshot = first["pagination"]["snapshot"]
        .as_str()
        .expect("a snapshot string")
        .to_string();
    between.await;
    let mut ids = Vec::new();
    let mut totals = Vec::new();
    let mut page = first;
    for n in 2.. {
        ids.extend(
            page[key]
                .as_array()
                .expect("rows")
                .iter()
                .map(|r| r["action_id"].as_str().expect("action id").to_string()),
        );
        totals.push(page["pagination"]["total_count"].as_u64().expect("total"));
        if page[key].as_array().expect("rows").len() < 10 {
            break;
        }
        let (code, next) = api
            .get_json(&format!("{base}&page={n}&snapshot={snapshot}"))
            .await;
        assert_eq!(code, 200, "{next}");
        assert_eq!(
            next["pagination"]["snapshot"],
            Value::String(snapshot.clone())
        );
        page = next;
    }
    (ids, totals)
}

fn expected(range: std::ops::Range<usize>) -> Vec<String> {
    range.rev().map(|i| format!("a{i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_a_growing_listing_show_each_row_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let api = Api::new(server.addr());
    let click = offer_and_click(&api).await;
    convert(&api, &click, 0..35).await;
    api.wait_for_postbacks(35).await;

    // New rows are newer, so they sort first: without the snapshot they would push rows of
    // page 1 onto page 2.
    let (ids, totals) = pages_while_growing(&api, "serverpostbacks", "postbacks", async {
        convert(&api, &click, 35..52).await;
        api.wait_for_postbacks(52).await;
    })
    .await;
    assert_eq!(ids, expected(0..35), "each postback once, newest first");
    assert!(totals.iter().all(|t| *t == 35), "{totals:?}");

    let (ids, totals) = pages_while_growing(&api, "conversions", "conversions", async {
        convert(&api, &click, 52..60).await;
        api.wait_for_postbacks(60).await;
    })
    .await;
    assert_eq!(ids, expected(0..52), "each conversion once, newest first");
    assert!(totals.iter().all(|t| *t == 52), "{totals:?}");

    // Catalog listings are pinned the same way.
    let (_, first) = api.get_json("/3.0/offers?limit=1").await;
    let snapshot = first["pagination"]["snapshot"].as_str().expect("snapshot");
    api.admin_post(
        "/3.0/admin/offer",
        &[("title", "Later"), ("url", "https://x.example/")],
    )
    .await;
    let (_, pinned) = api
        .get_json(&format!("/3.0/offers?limit=1&page=2&snapshot={snapshot}"))
        .await;
    assert_eq!(pinned["pagination"]["total_count"], 1);
    assert_eq!(pinned["offers"], serde_json::json!([]));
    let (_, now) = api.get_json("/3.0/offers?limit=1&page=2").await;
    assert_eq!(now["offers"][0]["title"], "Later");

    let (code, body) = api
        .get_json(&format!(
            "/3.0/stats/conversions?snapshot=yesterday&date_from={0}&date_to={0}",
            today()
        ))
        .await;
    assert_eq!(code, 400, "{body}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_an_older_schema_is_rebuilt_from_the_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let api = Api::new(server.addr());
    let click = offer_and_click(&api).await;
    convert(&api, &click, 0..3).await;
    api.postback(&format!("clickid={click}&action_id=a000"))
        .await;
    api.wait_for_postbacks(4).await;
    server.shutdown().await;

    // As an older build left it: another schema version, and rows the logs do not explain.
    let store = dir.path().join("store.sqlite");
    {
        let db = rusqlite::Connection::open(&store).expect("open");
        db.pragma_update(None, "user_version", 1).expect("version");
        db.execute("DELETE FROM conversions", []).expect("delete");
    }
    let server = start(dir.path()).await;
    let api = Api::new(server.addr());
    let body = api.wait_for_postbacks(4).await;
    let errors: HashSet<&str> = body["postbacks"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["error"].as_str().expect("error"))
        .collect();
    assert_eq!(errors, HashSet::from(["", "Conversion exists"]));
    let (_, conversions) = api.get_json("/3.0/stats/conversions").await;
    assert_eq!(
        conversions["pagination"]["total_count"], 3,
        "rebuilt: {conversions}"
    );
    server.shutdown().await;
    let db = rusqlite::Connection::open(&store).expect("open");
    let version: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, postbackd::sqlite_store::SCHEMA_VERSION);
}

/// The CSV export: every row of the listing, in its order, once, however many pages it takes
/// the exporter (a thousand rows each), with the listing's filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csv_export_holds_every_row_of_the_listing_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let api = Api::new(server.addr());
    let click = offer_and_click(&api).await;
    let n = 2300;
    let mut senders = tokio::task::JoinSet::new();
    for t in 0..23 {
        let (api, click) = (api.clone(), click.clone());
        senders.spawn(async move {
            let from = t * 100;
            // Every third one is refused (a broken click id), for the filter below.
            for i in from..from + 100 {
                let q = if i % 3 == 0 {
                    format!("clickid=broken{i}&action_id=a{i:04}")
                } else {
                    format!("clickid={click}&action_id=a{i:04}")
                };
                api.postback(&q).await;
            }
        });
    }
    while let Some(r) = senders.join_next().await {
        r.expect("sender");
    }
    api.wait_for_postbacks(n).await;
    let d = today();
    let mut listed = Vec::new();
    for page in 1.. {
        let (_, body) = api
            .get_json(&format!(
                "/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&limit=500&page={page}"
            ))
            .await;
        let rows = body["postbacks"].as_array().expect("rows").clone();
        listed.extend(
            rows.iter()
                .map(|r| r["_id"]["$id"].as_str().expect("id").to_string()),
        );
        if rows.len() < 500 {
            break;
        }
    }
    let csv = |filters: &str| {
        let api = api.clone();
        let url = format!(
            "{}/3.0/stats/serverpostbacks/csv?date_from={d}&date_to={d}{filters}",
            api.base
        );
        async move {
            let r = api
                .http
                .get(url)
                .header("API-Key", KEY)
                .send()
                .await
                .expect("export");
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
            r.text().await.expect("body")
        }
    };
    let all = csv("").await;
    let lines: Vec<&str> = all.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert!(lines[0].starts_with("id,date,offer_id"), "{}", lines[0]);
    let exported: Vec<String> = lines[1..]
        .iter()
        .map(|l| {
            l.split(',')
                .next()
                .expect("id")
                .trim_matches('"')
                .to_string()
        })
        .collect();
    assert_eq!(exported.len(), n as usize);
    assert_eq!(exported, listed, "the listing's rows, in its order");
    let refused = csv("&response_status=2").await;
    let refused: Vec<&str> = refused
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .skip(1)
        .collect();
    assert_eq!(refused.len(), 767, "every third of 2300");
    assert!(refused.iter().all(|l| l.contains("\"Broken clickid\"")));
    server.shutdown().await;
}
