//! The live stream of new server postbacks: server-sent events with the listing's filters.

mod common;

use common::{Api, KEY};
use postbackd::Server;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_postbacks_matching_the_filters_are_pushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::test_config(dir.path()), None)
        .await
        .expect("starts");
    let api = Api::new(server.addr());
    let live = format!("{}/3.0/stats/serverpostbacks/live?search=wanted", api.base);

    // Before the stream: logged already, so not news.
    api.postback("clickid=x&action_id=wanted-before").await;
    api.wait_for_postbacks(1).await;

    let refused = api.http.get(&live).send().await.expect("send");
    assert_eq!(refused.status(), 401);
    let mut stream = api
        .http
        .get(&live)
        .header("API-Key", KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");

    let mut text = String::new();
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text.contains("wanted-after") {
        assert!(Instant::now() < deadline, "no event in 30 s: {text}");
        // Once the stream follows the log, send one postback that matches and one that does not.
        if !sent && text.contains(": live") {
            api.postback("clickid=x&action_id=other-after").await;
            api.postback("clickid=x&action_id=wanted-after").await;
            sent = true;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.chunk())
            .await
            .expect("a chunk in time")
            .expect("read");
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream stays open"),
        ));
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| e.starts_with("event: postback"))
        .collect();
    assert_eq!(events.len(), 1, "{text}");
    let data = events[0]
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data");
    let row: serde_json::Value = serde_json::from_str(data).expect("json");
    assert_eq!(row["action_id"], "wanted-after");
    assert_eq!(row["error"], "Broken clickid");
    assert!(!text.contains("wanted-before") && !text.contains("other-after"));
    drop(stream);
    server.shutdown().await;
}
