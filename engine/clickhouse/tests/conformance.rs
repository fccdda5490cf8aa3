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

/// Replicas of a Deployment start together, and each may run `--migrate`: every one of them
/// must succeed, and the schema they leave must be whole, with each migration recorded.
#[tokio::test]
#[ignore = "needs a ClickHouse server: POSTBACKD_TEST_CLICKHOUSE=clickhouse://127.0.0.1:PORT"]
async fn concurrent_migrations_all_succeed() {
    use postback_clickhouse::{ClickHouseConfig, ClickHouseStore};
    for round in 0..3 {
        let db = format!("migrate_{}_{round}", std::process::id());
        let config = ClickHouseConfig::from_url(&format!("{}/{db}", server())).expect("url");
        let mut stores = Vec::new();
        for _ in 0..6 {
            stores.push(ClickHouseStore::connect(&config).await.expect("connect"));
        }
        let results =
            postback_core::log::join_all(stores.iter().map(|s| s.migrate_at_start())).await;
        for r in &results {
            assert!(
                r.is_ok(),
                "round {round}: a concurrent migration failed: {r:?}"
            );
        }
        let applied: usize = results.iter().map(|r| *r.as_ref().expect("ok")).sum();
        assert!(
            applied >= postback_clickhouse::MIGRATIONS.len(),
            "{applied}"
        );
        stores[0].check_schema().await.expect("the schema is whole");
        assert_eq!(
            stores[0].migrate().await.expect("once more"),
            0,
            "nothing left to apply"
        );
    }
}

/// A database migrated before `schema_versions` recorded its migrations in `schema_migrations`
/// (a TinyLog): it counts as migrated, and nothing is applied again.
#[tokio::test]
#[ignore = "needs a ClickHouse server: POSTBACKD_TEST_CLICKHOUSE=clickhouse://127.0.0.1:PORT"]
async fn migrations_recorded_in_the_legacy_table_count() {
    use postback_clickhouse::{ClickHouseConfig, ClickHouseStore};
    let db = format!("legacy_{}", std::process::id());
    let config = ClickHouseConfig::from_url(&format!("{}/{db}", server())).expect("url");
    let store = ClickHouseStore::connect(&config).await.expect("connect");
    assert!(store.migrate().await.expect("migrate") >= 1);
    // Make it look like a database the older build migrated.
    let admin = clickhouse::Client::default().with_url(&config.url);
    for sql in [
        format!("DROP TABLE {db}.schema_versions"),
        format!(
            "CREATE TABLE {db}.schema_migrations (version UInt32, name String, applied_us Int64) \
             ENGINE = TinyLog"
        ),
        format!("INSERT INTO {db}.schema_migrations VALUES (1, 'tables', 0)"),
    ] {
        admin.query(&sql).execute().await.expect(&sql);
    }
    let store = ClickHouseStore::connect(&config).await.expect("connect");
    assert!(
        store.check_schema().await.is_err(),
        "the older build had only the first migration"
    );
    assert_eq!(
        store.migrate().await.expect("migrate"),
        postback_clickhouse::MIGRATIONS.len() - 1,
        "all but the first"
    );
    store.check_schema().await.expect("migrated");
    assert_eq!(store.migrate().await.expect("migrate"), 0, "nothing again");
    // Without the legacy record, the same database would be behind.
    admin
        .query(&format!("DROP TABLE {db}.schema_migrations"))
        .execute()
        .await
        .expect("drop");
    assert!(
        store.check_schema().await.is_err(),
        "no record, not migrated"
    );
}

/// An upgrade to the hourly counts and the ids' times (migrations 2 and 3) counts the rows
/// logged before it once, and the rows inserted after it as they come; cut short and run
/// again, it counts nothing twice.
#[tokio::test]
#[ignore = "needs a ClickHouse server: POSTBACKD_TEST_CLICKHOUSE=clickhouse://127.0.0.1:PORT"]
async fn an_upgrade_counts_the_rows_logged_before_it() {
    use postback_clickhouse::{sql, ClickHouseConfig, ClickHouseStore};
    use postback_core::seams::{AnalyticsRows, ServerPostbackQuery, SummaryKey, SummaryQuery};
    const HOUR: i64 = postback_core::seams::HOUR_US;
    let db = format!("upgrade_{}", std::process::id());
    let config = ClickHouseConfig::from_url(&format!("{}/{db}", server())).expect("url");
    let store = ClickHouseStore::connect(&config).await.expect("connect");
    store.migrate().await.expect("migrate");
    let admin = clickhouse::Client::default().with_url(&config.url);
    let run = |sql: String| {
        let admin = admin.clone();
        async move { admin.query(&sql).execute().await.expect(&sql) }
    };
    // The schema of the build before: migration 1 only, no counts.
    for table in ["sp_hourly_counter", "sp_hourly", "sp_ids_keeper", "sp_ids"] {
        run(format!("DROP TABLE {db}.{table}")).await;
    }
    let only_the_first = || async {
        run(format!("DROP TABLE {db}.schema_versions")).await;
        run(sql::create_migrations_table(&db)).await;
        run(sql::record_migration(&db, 1, "tables", 0)).await;
    };
    only_the_first().await;
    let insert = |rows: Vec<_>| {
        store.insert(AnalyticsRows {
            postbacks: rows,
            ..Default::default()
        })
    };
    let pb = suite::postback;
    insert(vec![
        pb("u1", 10 * HOUR, "goal=1&clickid=c1&action_id=a1", 1, true),
        pb("u2", 10 * HOUR + 9, "goal=1&clickid=c2", 1, false),
        pb(
            "u3",
            11 * HOUR + 1,
            "goal=1&clickid=c1&action_id=a3",
            2,
            true,
        ),
    ])
    .await
    .expect("rows of the older build");
    let by_hour = || async {
        let q = SummaryQuery {
            filters: ServerPostbackQuery {
                from_us: 0,
                to_us: 24 * HOUR,
                ..Default::default()
            },
            group_by: vec![SummaryKey::Hour],
        };
        store
            .summary(q)
            .await
            .expect("summary")
            .into_iter()
            .map(|g| (g.hour_us.expect("by hour") / HOUR, g.postbacks, g.accepted))
            .collect::<Vec<_>>()
    };
    // Listings by click id or action id: the ids' times (looked up first) must hold them all.
    let ids_of = |click: &str, action: &str| {
        let q = ServerPostbackQuery {
            from_us: 0,
            to_us: 24 * HOUR,
            click_id: (!click.is_empty()).then(|| click.to_string()),
            action_id: (!action.is_empty()).then(|| action.to_string()),
            limit: 10,
            ..Default::default()
        };
        let store = &store;
        async move {
            let page = store.server_postbacks(q).await.expect("listing");
            let ids: Vec<String> = page.rows.into_iter().map(|r| r.id).collect();
            (page.total, ids)
        }
    };
    // At start (`serve --migrate`, replicas maybe together) the count is refused: two at
    // once would count the rows twice.
    let refused = store.migrate_at_start().await.expect_err("rows to count");
    assert!(
        refused.to_string().contains("postbackd migrate"),
        "{refused}"
    );
    assert!(store.check_schema().await.is_err(), "nothing applied");
    assert_eq!(store.migrate().await.expect("migrate"), 2);
    assert_eq!(
        by_hour().await,
        [(10, 2, 1), (11, 1, 1)],
        "counted at the upgrade"
    );
    assert_eq!(ids_of("c1", "").await, (2, vec!["u3".into(), "u1".into()]));
    assert_eq!(ids_of("c1", "a1").await, (1, vec!["u1".into()]));
    assert_eq!(ids_of("c2", "a1").await, (0, vec![]));
    insert(vec![pb(
        "u4",
        12 * HOUR,
        "goal=1&clickid=c2&action_id=a1",
        1,
        true,
    )])
    .await
    .expect("a row after it");
    let after = [(10, 2, 1), (11, 1, 1), (12, 1, 1)];
    assert_eq!(by_hour().await, after, "and the rows after it as they come");
    assert_eq!(ids_of("c2", "a1").await, (1, vec!["u4".into()]));
    assert_eq!(ids_of("c2", "").await, (2, vec!["u4".into(), "u2".into()]));
    // Cut short before it was recorded: run again, it counts nothing twice.
    only_the_first().await;
    assert_eq!(store.migrate().await.expect("migrate"), 2);
    assert_eq!(by_hour().await, after, "nothing twice");
    // Counts lost (a server killed between an insert's rows and its counts): rebuilt from
    // the rows.
    run(format!("TRUNCATE TABLE {db}.sp_hourly")).await;
    assert!(
        by_hour().await.is_empty(),
        "whole hours come from the counts"
    );
    store.recount_hours().await.expect("recount");
    assert_eq!(by_hour().await, after, "counted again, once");
    assert_eq!(ids_of("c1", "").await.0, 2);
}
