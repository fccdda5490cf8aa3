//! A short run of the load tester against the engine, with `--verify`: every postback that got
//! a 200 is in the stats exactly once with the outcome the load tester expected, and every
//! conversion state reached the load tester's own affiliate once.

use postbackd::{Config, Server};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_verified_load_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        api_key: "smoke".into(),
        allow_private_postback_targets: true,
        delivery_base_delay_ms: 100,
        ..Config::default()
    };
    let server = Server::start(config, None).await.expect("starts");
    let report = pbload::run(pbload::Options {
        targets: vec![format!("http://{}", server.addr())],
        api_key: "smoke".into(),
        scenario: pbload::Scenario::Full,
        rate: 300.0,
        duration: Duration::from_secs(3),
        max_in_flight: 512,
        open_connections: 256,
        verify: true,
        affiliate_url: None,
        receive_postbacks: true,
        server_pids: Vec::new(),
        quiet: true,
    })
    .await
    .expect("the run completes");
    println!("{}", pbload::table(&report));
    assert_eq!(report.errors, 0, "{report:?}");
    let verify = report.verify.as_ref().expect("verified");
    assert!(verify.passed(), "{verify:?}");
    assert!(verify.expected > 300, "a real mix was sent: {verify:?}");
    assert!(verify.cross_duplicates > 0, "{verify:?}");
    let deliveries = verify.deliveries.as_ref().expect("deliveries checked");
    assert!(deliveries.expected > 50, "{deliveries:?}");
    assert!(report.by_kind.contains_key("pixel") && report.by_kind.contains_key("click"));
    server.shutdown().await;
}
