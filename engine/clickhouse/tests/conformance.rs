//! The analytics-store conformance suite against a real ClickHouse server: the one the test
//! command starts (`deploy/clickhouse.sh`), named by `POSTBACKD_TEST_CLICKHOUSE`
//! (`clickhouse://127.0.0.1:PORT`). Each check gets a database of its own.

use postback_clickhouse::fresh_for_tests;
use postback_core::seams::AnalyticsStore;
use postback_core::store_conformance as suite;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn server() -> String {
    std::env::var("POSTBACKD_TEST_CLICKHOUSE")
        .expect("POSTBACKD_TEST_CLICKHOUSE names the ClickHouse server (clickhouse://HOST:PORT)")
}

#[tokio::test]
#[ignore = "needs a ClickHouse server: POSTBACKD_TEST_CLICKHOUSE=clickhouse://127.0.0.1:PORT"]
async fn analytics_store_conforms() {
    let url = server();
    let n = AtomicUsize::new(0);
    let run = std::process::id();
    suite::analytics_suite(&|| {
        let url = url.clone();
        let db = format!("conf_{run}_{}", n.fetch_add(1, Ordering::Relaxed));
        Box::pin(async move {
            let store: Arc<dyn AnalyticsStore> =
                fresh_for_tests(&url, &db).await.expect("a fresh database");
            store
        })
    })
    .await;
}
