//! The front end under hostile traffic: nothing is read before it is routed and authorised,
//! request memory and connections are bounded, and the key and metrics stay private.

mod common;

use common::{Api, KEY};
use postbackd::{Config, Server};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

async fn start(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        api_key: KEY.into(),
        request_timeout_secs: 3,
        ..Config::default()
    };
    tweak(&mut config);
    Server::start(config, None).await.expect("starts")
}

/// Sends `head` (and nothing more) on a new connection and returns it.
fn send_head(addr: SocketAddr, head: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(head.as_bytes()).expect("write");
    s
}

/// The status code of the first response on `s`, or `None` if none came before its timeout.
fn status_of(s: &mut TcpStream) -> Option<u16> {
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 12 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    std::str::from_utf8(got.get(9..12)?).ok()?.parse().ok()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("joins")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_not_read_before_the_route_and_the_key_are_known() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |_| {}).await;
    let addr = server.addr();
    // Each promises a large body and sends none of it: the answer must not wait for it (a
    // server that reads first would answer 408 after the request timeout instead).
    let cases = [
        ("POST /3.0/admin/offer HTTP/1.1", "", 401),
        ("POST /3.0/admin/offer HTTP/1.1", "API-Key: wrong\r\n", 403),
        ("POST /3.0/stats/conversions HTTP/1.1", "", 401),
        ("POST /health HTTP/1.1", "", 200),
        ("POST /nowhere HTTP/1.1", "", 404),
        ("POST /metrics HTTP/1.1", "", 401),
    ];
    for (line, extra, want) in cases {
        let head = format!("{line}\r\nHost: a\r\n{extra}Content-Length: 900000\r\n\r\npartial");
        let got = blocking(move || status_of(&mut send_head(addr, &head))).await;
        assert_eq!(got, Some(want), "{line} {extra}");
    }
    // A body over the limit for its route is refused from its declared length.
    let head = format!(
        "POST /3.0/admin/offer HTTP/1.1\r\nHost: a\r\nAPI-Key: {KEY}\r\nContent-Length: {}\r\n\r\n",
        (1 << 20) + 1
    );
    let got = blocking(move || status_of(&mut send_head(addr, &head))).await;
    assert_eq!(got, Some(413));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_share_a_memory_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |c| {
        c.request_memory_bytes = 64 * 1024;
    })
    .await;
    let addr = server.addr();
    // Two postbacks that promise 30 KB each and hold them: most of the budget is spent.
    let head = "POST /postback HTTP/1.1\r\nHost: a\r\nContent-Length: 30000\r\n\r\nclickid=x";
    let held: Vec<TcpStream> = (0..2).map(|_| send_head(addr, head)).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let api = Api::new(addr);
    let busy = api
        .http
        .post(format!("{}/postback", api.base))
        .body(vec![b'a'; 20_000])
        .send()
        .await
        .expect("post");
    assert_eq!(busy.status(), 503, "no memory left for its body");
    let body: serde_json::Value = busy.json().await.expect("json");
    assert_eq!(body["message"], "Server is busy, please retry");
    // Once the held requests time out, their share returns.
    for mut s in held {
        assert_eq!(blocking(move || status_of(&mut s)).await, Some(408));
    }
    assert_eq!(api.postback("clickid=after").await["status"], 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |c| {
        c.max_connections = 2;
        c.request_timeout_secs = 30;
    })
    .await;
    let addr = server.addr();
    let ping = "GET /health HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut first = send_head(addr, ping);
    let mut second = send_head(addr, ping);
    assert_eq!(status_of(&mut first), Some(200));
    assert_eq!(status_of(&mut second), Some(200));
    // Both stay open (keep-alive): a third is not served...
    let mut third = send_head(addr, ping);
    third
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let waiting = blocking(move || {
        let got = status_of(&mut third);
        (got, third)
    })
    .await;
    assert_eq!(waiting.0, None, "served beyond the connection cap");
    // ...until one of the others goes.
    drop(first);
    let mut third = waiting.1;
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    assert_eq!(blocking(move || status_of(&mut third)).await, Some(200));
    drop(second);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_and_the_metrics_stay_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let server = start(dir.path(), |c| {
        c.api_key_in_query = false;
        c.metrics_listen = Some(metrics_addr);
    })
    .await;
    let api = Api::new(server.addr());
    let get = |url: String, key: Option<&'static str>| {
        let http = api.http.clone();
        async move {
            let mut r = http.get(url);
            if let Some(k) = key {
                r = r.header("API-Key", k);
            }
            r.send().await.expect("get").status().as_u16()
        }
    };
    let base = &api.base;
    assert_eq!(
        get(format!("{base}/3.0/offers?api-key={KEY}"), None).await,
        401
    );
    assert_eq!(get(format!("{base}/3.0/offers"), Some(KEY)).await, 200);
    assert_eq!(get(format!("{base}/metrics"), None).await, 401);
    assert_eq!(get(format!("{base}/metrics"), Some(KEY)).await, 200);
    let private = format!("http://{metrics_addr}");
    assert_eq!(get(format!("{private}/metrics"), None).await, 200);
    assert_eq!(
        get(format!("{private}/3.0/offers"), Some(KEY)).await,
        404,
        "the metrics address serves nothing else"
    );
    server.shutdown().await;

    // By default the query key is accepted, as Affise clients expect.
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr());
    assert_eq!(
        get(format!("{base}/3.0/offers?api-key={KEY}"), None).await,
        200
    );
    server.shutdown().await;
}
