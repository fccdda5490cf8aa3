//! Bad input never crashes or stalls the engine: each gets a clear error and, where it is a
//! postback, a log row that says why.

mod common;

use common::{Api, KEY};
use postbackd::{Config, Server};
use std::io::{Read, Write};
use std::time::Duration;

async fn start(dir: &std::path::Path) -> Server {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        api_key: KEY.into(),
        request_timeout_secs: 1,
        max_request_bytes: 32 * 1024,
        ..Config::default()
    };
    Server::start(config, None).await.expect("starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_postbacks_are_logged_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let api = Api::new(server.addr());
    // Invalid UTF-8 and broken escapes.
    api.postback("clickid=%FF%FE%00&x=%ZZ&y=%C3").await;
    // Many parameters, within the size limit.
    let many: String = (0..3000).map(|i| format!("k{i}=v&")).collect();
    api.postback(&many).await;
    // A body that claims to be JSON and is not.
    let r = api
        .http
        .post(format!("{}/postback?clickid=abc", api.base))
        .header("content-type", "application/json")
        .body(vec![0xff, b'{', b'"'])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let body = api.wait_for_postbacks(3).await;
    let rows = body["postbacks"].as_array().expect("rows");
    let errors: Vec<&str> = rows
        .iter()
        .map(|r| r["error"].as_str().expect("error"))
        .collect();
    assert!(errors.contains(&"Broken clickid"), "{errors:?}");
    assert!(
        errors.contains(&"Missing mandatory parameter clickid/click_id"),
        "{errors:?}"
    );
    let many_row = rows
        .iter()
        .find(|r| r["_get"]["k2999"] == "v")
        .expect("all parameters kept");
    assert_eq!(many_row["response_status"], 2);
    let json_row = rows
        .iter()
        .find(|r| r["clickid"] == "abc")
        .expect("the bad JSON postback");
    assert_eq!(
        json_row["_post"][""], "\u{fffd}{\"",
        "kept whole, not dropped"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let api = Api::new(server.addr());
    let r = api
        .http
        .get(format!("{}/nope", api.base))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let r = api
        .http
        .delete(format!("{}/postback", api.base))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 405);
    let r = api
        .http
        .post(format!("{}/3.0/admin/advertiser", api.base))
        .header("API-Key", KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["status"], 2);
    let huge_query = format!("{}/postback?x={}", api.base, "a".repeat(40_000));
    let r = api.http.get(huge_query).send().await.expect("get");
    assert_eq!(r.status(), 413);
    let r = api
        .http
        .post(format!("{}/postback", api.base))
        .body(vec![b'a'; 40_000])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);
    for bad in ["limit=0", "page=-1", "limit=x"] {
        let (code, body) = api.get_json(&format!("/3.0/offers?{bad}")).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    // A page far past the end is empty, not an overflow (found by schemathesis).
    let (code, body) = api
        .get_json("/3.0/offers?limit=106&page=174025887487825960")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["offers"], serde_json::json!([]));
    let d = common::today();
    let (code, body) = api
        .get_json(&format!(
            "/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&page=18446744073709551615"
        ))
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = api.get_json("/3.0/offers?limit=100000").await;
    assert_eq!(code, 200);
    assert_eq!(
        body["pagination"]["per_page"], 500,
        "limit is capped at 500"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_and_others_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let addr = server.addr();
    let slow = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET /postback?clickid=x HTTP/1.1\r\nHost: a\r\n")
            .expect("write");
        // ...and never finishes the headers.
        let mut buf = Vec::new();
        let started = std::time::Instant::now();
        let _ = s.read_to_end(&mut buf);
        (started.elapsed(), String::from_utf8_lossy(&buf).to_string())
    });
    let api = Api::new(addr);
    assert_eq!(
        api.postback("n=fast").await["status"],
        1,
        "served while the slow one waits"
    );
    let (waited, reply) = slow.join().expect("slow client");
    assert!(
        waited < Duration::from_secs(9),
        "the server hung up (after {waited:?}): {reply}"
    );
    assert!(!reply.contains("200 OK"), "{reply}");
    server.shutdown().await;
}

/// Every bad request gets a 4xx with a clean message: no panic, no 503, no SQL or OS text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_queries_and_bodies_are_refused_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let api = Api::new(server.addr());
    let d = common::today();
    let many =
        |name: &str, n: usize| -> String { (0..n).map(|i| format!("&{name}={i}")).collect() };
    let log = |q: String| format!("/3.0/stats/serverpostbacks?date_from={d}&date_to={d}{q}");
    let cases = vec![
        "/3.0/stats/serverpostbacks?date_from=0001-01-01&date_to=2020-01-01".to_string(),
        "/3.0/stats/serverpostbacks?date_from=2020-01-01&date_to=262143-12-31".to_string(),
        "/3.0/stats/serverpostbacks?date_from=2026-01-10&date_to=2026-01-01".to_string(),
        "/3.0/stats/conversions?date_to=99999-01-01".to_string(),
        log(many("offer", 501)),
        log(many("supplier", 600)),
        log("&search=%00".into()),
        log("&search=a%0Ab".into()),
        log(format!("&search={}", "x".repeat(300))),
        format!(
            "/3.0/stats/conversions?date_from={d}&date_to={d}{}",
            many("status", 600)
        ),
    ];
    for path in cases {
        let (code, body) = api.get_json(&path).await;
        let shown: String = path.chars().take(120).collect();
        assert_eq!(code, 400, "{shown}: {body}");
        assert_eq!(body["status"], 2);
        let text = body["message"].as_str().expect("message").to_lowercase();
        assert!(
            !text.contains("sql") && !text.contains("os error"),
            "{shown}: {text}"
        );
    }
    // More values than a store can bind, in a body (too long for a URL).
    let r = api
        .http
        .post(format!(
            "{}/3.0/stats/serverpostbacks?date_from={d}&date_to={d}",
            api.base
        ))
        .header("API-Key", KEY)
        .body(many("offer[]", 40_000))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    // Thousands of payments in one admin body: refused, not checked pairwise.
    let mut form: Vec<(String, String)> = vec![
        ("title".into(), "T".into()),
        ("url".into(), "https://x.example/".into()),
    ];
    for i in 0..5000 {
        form.push((format!("payments[{i}][goal]"), format!("g{i}")));
    }
    let r = api
        .http
        .post(format!("{}/3.0/admin/offer", api.base))
        .header("API-Key", KEY)
        .form(&form)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("at most"),
        "{body}"
    );
    // The engine still answers.
    let (code, _) = api.get_json(&log(String::new())).await;
    assert_eq!(code, 200);
    server.shutdown().await;
}
