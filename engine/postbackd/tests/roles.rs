//! Roles split one engine's work between processes: a process takes only the requests of its
//! roles, and processes the log only with `process`.

mod common;

use common::{Api, KEY};
use postbackd::{Config, Server};

async fn start(dir: &std::path::Path, roles: &str) -> (Server, Api) {
    let config = Config {
        roles: roles.parse().expect("roles"),
        ..common::test_config(dir)
    };
    let server = Server::start(config, None).await.expect("starts");
    let api = Api::new(server.addr());
    (server, api)
}

async fn status_and_text(api: &Api, path: &str) -> (u16, String) {
    let r = api
        .http
        .get(format!("{}{path}", api.base))
        .header("API-Key", KEY)
        .send()
        .await
        .expect("send");
    (r.status().as_u16(), r.text().await.expect("text"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_process_does_what_its_roles_say() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = format!(
        "/3.0/stats/serverpostbacks?date_from={0}&date_to={0}",
        common::today()
    );

    // Ingest only: tracking is taken, the API is someone else's; probes answer.
    let (server, api) = start(dir.path(), "ingest").await;
    api.postback("clickid=nope&action_id=A1").await;
    let (code, text) = status_and_text(&api, &stats).await;
    assert_eq!(code, 404, "{text}");
    assert!(
        text.contains("does not serve the API (its roles: ingest)"),
        "{text}"
    );
    for probe in ["/health", "/ready"] {
        assert_eq!(status_and_text(&api, probe).await.0, 200, "{probe}");
    }
    server.shutdown().await;

    // API only: nothing processes the log, so the postback is not in the stats yet.
    let (server, api) = start(dir.path(), "api").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (code, body) = api.get_json(&stats).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["pagination"]["total_count"], 0, "{body}");
    let (code, text) = status_and_text(&api, "/postback?clickid=x").await;
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("does not serve tracking requests"), "{text}");
    server.shutdown().await;

    // Processing and API: the postback taken by the first process is processed now.
    let (server, api) = start(dir.path(), "process,api").await;
    let body = api.wait_for_postbacks(1).await;
    assert_eq!(body["postbacks"][0]["error"], "Broken clickid", "{body}");
    server.shutdown().await;
}
