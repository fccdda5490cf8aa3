//! The modern DDL (with `TTL`) and every query template, run in a current ClickHouse engine:
//! chdb, in a Python the test command prepares (`POSTBACKD_TEST_CHDB_PYTHON`). The real 18.16
//! server runs the same queries under the conformance suite; this checks that what production
//! servers of today would run parses, plans and answers the same.

use crate::rows::{AttemptInsert, ClickInsert, ConversionInsert, PostbackInsert};
use crate::{render_migration, sql, MIGRATIONS};
use postback_core::delivery::{Attempt, AttemptRow, DeliveryJob, JobStatus};
use postback_core::params::parse_form;
use postback_core::processor::ServerPostbackRow;
use postback_core::rules::{Click, Conversion};
use postback_core::seams::{
    AttemptQuery, ConversionQuery, ServerPostbackQuery, SummaryKey, SummaryQuery,
};
use serde_json::{json, Value};

const DB: &str = "pb";
const T0: i64 = 1_790_000_000_000_000;
const HOUR: i64 = 3_600_000_000;

fn postback(id: &str, at_us: i64, query: &str, offer_id: u64, ok: bool) -> ServerPostbackRow {
    let get = parse_form(query.as_bytes());
    ServerPostbackRow {
        id: id.into(),
        at_us,
        server: "9.9.9.9".into(),
        method: "GET".into(),
        clickid: get.get("clickid").unwrap_or("").into(),
        goal: "Sale".into(),
        get,
        post: Default::default(),
        pixel: false,
        response_status: if ok { 1 } else { 2 },
        error: if ok { "" } else { "Click not found" }.into(),
        action_id: String::new(),
        status: 0,
        offer_id,
        pid: 2,
        advertiser_id: "adv".into(),
        conversion_id: String::new(),
        delta: ok.then_some(5),
        ip: String::new(),
        created: ok,
        payouts: if ok { 2.5 } else { 0.0 },
        revenue: if ok { 4.0 } else { 0.0 },
    }
}

fn conversion(id: &str, status: u8, updated_us: i64) -> Conversion {
    Conversion {
        id: id.into(),
        key: format!("k-{id}"),
        offer_id: 1,
        pid: 2,
        advertiser_id: "adv".into(),
        goal: "Sale".into(),
        action_id: "A".into(),
        clickid: "c1".into(),
        status,
        sum: 1.0,
        payouts: 2.5,
        revenue: 4.0,
        currency: "USD".into(),
        ip: String::new(),
        ua: String::new(),
        comment: String::new(),
        subs: vec!["s1".into(), "s2".into()],
        custom_fields: vec![String::new(); 7],
        promo_code: String::new(),
        user_id: String::new(),
        created_us: T0,
        updated_us,
        click_us: T0,
    }
}

fn click(id: &str) -> Click {
    Click {
        at_us: T0,
        click_id: id.into(),
        offer_id: 1,
        pid: 2,
        ip: "1.2.3.4".into(),
        ua: "UA".into(),
        referrer: String::new(),
        country: "DE".into(),
        subs: vec!["a".into()],
    }
}

fn attempt(n: u32, at_us: i64, code: u16) -> AttemptRow {
    AttemptRow {
        job: DeliveryJob {
            job_id: "j1".into(),
            at_us: T0,
            setting_id: 1,
            pid: 2,
            offer_id: 1,
            lead_id: "v1".into(),
            goal: "Sale".into(),
            status: 1,
            payouts: 2.5,
            revenue: 4.0,
            currency: "USD".into(),
            notice: String::new(),
            integration_type: "s2s".into(),
            method: "GET".into(),
            url: "https://aff.example/pb".into(),
        },
        attempt: Attempt {
            job_id: "j1".into(),
            attempt: n,
            at_us,
            http_code: code,
            error: String::new(),
            state: JobStatus::Pending,
            next_at_us: Some(at_us + 1),
        },
    }
}

fn insert<T: serde::Serialize>(table: &str, rows: &[T]) -> String {
    let lines: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(r).expect("a row as JSON"))
        .collect();
    format!(
        "INSERT INTO {DB}.{table} FORMAT JSONEachRow {}",
        lines.join("\n")
    )
}

/// Runs the statements in chdb; each one's rows, or its error.
fn run(statements: &[String]) -> Vec<Result<Vec<Value>, String>> {
    let python = std::env::var("POSTBACKD_TEST_CHDB_PYTHON")
        .expect("POSTBACKD_TEST_CHDB_PYTHON names a Python with chdb");
    let dir = std::env::temp_dir().join(format!("chdb-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("statements.json");
    std::fs::write(&file, serde_json::to_vec(statements).expect("json")).expect("write");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schemas/clickhouse/chdb_run.py"
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&file)
        .current_dir(&dir)
        .output()
        .expect("runs python");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "chdb_run.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).expect("results as JSON");
    results
        .into_iter()
        .map(|r| match r.get("error") {
            Some(e) => Err(e.as_str().unwrap_or_default().to_string()),
            None => Ok(r["data"].as_array().cloned().unwrap_or_default()),
        })
        .collect()
}

#[test]
#[ignore = "needs chdb: POSTBACKD_TEST_CHDB_PYTHON=path/to/python (the test command sets it)"]
fn the_modern_ddl_and_every_query_run_in_a_current_engine() {
    let w = T0 + 10; // written_us of every row below
    let mut statements = vec![sql::create_database(DB)];
    for (_, _, template) in MIGRATIONS {
        statements.extend(render_migration(template, DB, true, 92));
    }
    statements.push(sql::create_migrations_table(DB));
    statements.push(sql::record_migration(DB, 1, "tables", T0));
    let postbacks = [
        postback("p1", T0, "clickid=c1&promo=SUMMER", 1, true),
        postback("p2", T0 + HOUR, "clickid=c2&x=1", 2, false),
        postback("p3", T0 + 2 * HOUR, "clickid=c1&K=Vé", 1, true),
    ];
    statements.push(insert(
        "server_postbacks",
        &postbacks
            .iter()
            .map(|r| PostbackInsert::new(r, w))
            .collect::<Vec<_>>(),
    ));
    let pending = conversion("v1", 2, T0);
    let approved = conversion("v1", 1, T0 + HOUR);
    statements.push(insert(
        "conversions",
        &[&approved, &pending, &conversion("v2", 3, T0)]
            .iter()
            .map(|c| ConversionInsert::new(c, w))
            .collect::<Vec<_>>(),
    ));
    statements.push(insert(
        "clicks",
        &[click("c1"), click("c1"), click("c2")]
            .iter()
            .map(|c| ClickInsert::new(c, w))
            .collect::<Vec<_>>(),
    ));
    statements.push(insert(
        "delivery_attempts",
        &[attempt(1, T0 + 5, 500), attempt(2, T0 + 9, 200)]
            .iter()
            .map(|a| AttemptInsert::new(a, w))
            .collect::<Vec<_>>(),
    ));
    let setup = statements.len();

    let all = ServerPostbackQuery {
        from_us: T0,
        to_us: T0 + 24 * HOUR,
        limit: 2,
        ..Default::default()
    };
    let every_filter = ServerPostbackQuery {
        id: Some("p1".into()),
        offers: vec![1, 2],
        partners: vec![2],
        suppliers: vec!["adv".into()],
        click_id: Some("c1".into()),
        action_id: Some(String::new()),
        goal: Some("SALE".into()),
        status: Some(0),
        response_status: Some(1),
        search: Some("promo=sum".into()),
        ..all.clone()
    };
    let conversions = ConversionQuery {
        from_us: T0,
        to_us: T0 + HOUR,
        limit: 10,
        ..Default::default()
    };
    let mut subs: [Option<String>; 5] = Default::default();
    subs[1] = Some("s2".into());
    let every_conversion_filter = ConversionQuery {
        statuses: vec![1],
        offers: vec![1],
        advertisers: vec!["adv".into()],
        partners: vec![2],
        goal: Some("sale".into()),
        action_id: Some("A".into()),
        clickid: Some("c1".into()),
        subs,
        conversion_id: Some("v1".into()),
        ..conversions.clone()
    };
    let attempts = AttemptQuery {
        from_us: T0,
        to_us: T0 + HOUR,
        limit: 10,
        ..Default::default()
    };
    let every_attempt_filter = AttemptQuery {
        offers: vec![1],
        partners: vec![2],
        goal: Some("SALE".into()),
        status: Some(1),
        http_code: Some(200),
        job_id: Some("j1".into()),
        ..attempts.clone()
    };
    let every_key = SummaryQuery {
        filters: all.clone(),
        group_by: vec![
            SummaryKey::Day,
            SummaryKey::Offer,
            SummaryKey::Advertiser,
            SummaryKey::Partner,
            SummaryKey::Goal,
            SummaryKey::ResponseStatus,
            SummaryKey::Error,
        ],
    };
    let s = i64::MAX;
    let checks: Vec<(String, Value)> = vec![
        (sql::migrations_tables(DB), json!([["schema_versions"]])),
        (
            sql::applied_migrations(DB, &["schema_versions".into()]),
            json!([[1]]),
        ),
        (
            sql::postbacks_by_day(DB, &all, i64::MIN, s),
            json!([[T0, T0 + 2 * HOUR, 3]]),
        ),
        (
            sql::postbacks_by_day(DB, &every_filter, i64::MIN, s),
            json!([[T0, T0, 1]]),
        ),
        (
            sql::postbacks_by_day(
                DB,
                &ServerPostbackQuery {
                    search: Some("k=vÉ".into()),
                    ..all.clone()
                },
                i64::MIN,
                s,
            ),
            json!([[T0 + 2 * HOUR, T0 + 2 * HOUR, 1]]),
        ),
        (sql::postbacks_by_day(DB, &all, i64::MIN, w - 1), json!(0)),
        (
            sql::postbacks_by_day(DB, &all, T0 + 1, s),
            json!([[T0 + HOUR, T0 + 2 * HOUR, 2]]),
        ),
        (
            sql::postbacks_page(DB, &all, i64::MIN, s),
            json!(["p3", "p2"]),
        ),
        (
            sql::postbacks_page(
                DB,
                &ServerPostbackQuery {
                    offset: 2,
                    ..all.clone()
                },
                i64::MIN,
                s,
            ),
            json!(["p1"]),
        ),
        (
            sql::postbacks_page(DB, &every_filter, i64::MIN, s),
            json!(["p1"]),
        ),
        (
            sql::summary(
                DB,
                &SummaryQuery {
                    filters: all.clone(),
                    group_by: vec![],
                },
                i64::MIN,
                s,
            ),
            json!([[0, 0, "", 0, "", 0, "", 3, 2, 1, 2, 5, 8]]),
        ),
        (sql::summary(DB, &every_key, i64::MIN, s), json!(3)),
        // Where a click id lies, from the ids the materialized view kept as the rows came.
        (
            sql::id_span(DB, sql::CLICK_ID, "c1", T0, T0 + 24 * HOUR),
            json!([[T0, T0 + 2 * HOUR, 2]]),
        ),
        (
            sql::id_span(DB, sql::ACTION_ID, "c1", T0, T0 + 24 * HOUR),
            json!([[0, 0, 0]]),
        ),
        // The same from the hourly counts the materialized view kept as the rows came.
        (
            sql::summary_hourly(
                DB,
                &SummaryQuery {
                    filters: all.clone(),
                    group_by: vec![],
                },
                T0.div_euclid(HOUR) * HOUR,
                T0 + 24 * HOUR,
            ),
            json!([[0, 0, "", 0, "", 0, "", 3, 2, 1, 2, 5, 8]]),
        ),
        (
            sql::summary_hourly(
                DB,
                &SummaryQuery {
                    filters: ServerPostbackQuery {
                        offers: vec![1],
                        partners: vec![2],
                        suppliers: vec!["adv".into()],
                        goal: Some("SALE".into()),
                        status: Some(0),
                        response_status: Some(1),
                        ..all.clone()
                    },
                    group_by: every_key.group_by.clone(),
                },
                T0.div_euclid(HOUR) * HOUR,
                T0 + 24 * HOUR,
            ),
            json!(2),
        ),
        (
            sql::conversions_count(DB, &conversions, i64::MIN, s),
            json!([[2]]),
        ),
        (
            sql::conversions_count(DB, &every_conversion_filter, i64::MIN, s),
            json!([[1]]),
        ),
        (
            sql::conversions_page(DB, &conversions, i64::MIN, s),
            json!(["v2", "v1"]),
        ),
        (
            sql::conversions_page(DB, &every_conversion_filter, i64::MIN, s),
            json!(["v1"]),
        ),
        (
            sql::attempts_count(DB, &attempts, i64::MIN, s),
            json!([[2]]),
        ),
        (
            sql::attempts_count(DB, &every_attempt_filter, i64::MIN, s),
            json!([[1]]),
        ),
        (sql::attempts_page(DB, &attempts, i64::MIN, s), json!(2)),
        (
            sql::clicks_by_id(DB, &["c1".into(), "c2".into(), "zz".into()], i64::MIN),
            json!(2),
        ),
        (
            sql::conversions_by_key(DB, &["k-v1".into(), "k-zz".into()], i64::MIN),
            json!(["v1"]),
        ),
        (
            sql::existing(
                DB,
                "server_postbacks",
                "id",
                "at_us",
                &["p1".into(), "p9".into()],
                (T0, T0),
            ),
            json!([["p1"]]),
        ),
        (
            sql::existing(
                DB,
                "conversions",
                "concat(id, ':', toString(version))",
                "created_us",
                &[format!("v1:{}", approved.version()), "v1:0".into()],
                (T0, T0),
            ),
            json!([[format!("v1:{}", approved.version())]]),
        ),
        (
            sql::existing(
                DB,
                "delivery_attempts",
                "concat(job_id, ':', toString(attempt))",
                "at_us",
                &["j1:2".into(), "j1:3".into()],
                (T0, T0 + 9),
            ),
            json!([["j1:2"]]),
        ),
        (
            sql::existing(DB, "clicks", "click_id", "at_us", &["c2".into()], (T0, T0)),
            json!([["c2"]]),
        ),
        (sql::partitions(DB), json!(6)),
        (sql::drop_partition(DB, "clicks", 202609), json!([])),
        (sql::truncate(DB, "delivery_attempts"), json!([])),
        (
            sql::attempts_count(DB, &attempts, i64::MIN, s),
            json!([[0]]),
        ),
        (
            sql::clicks_by_id(DB, &["c1".into(), "c2".into()], i64::MIN),
            json!(0),
        ),
    ];
    statements.extend(checks.iter().map(|(sql, _)| sql.clone()));
    let results = run(&statements);
    assert_eq!(results.len(), statements.len());
    for (sql, result) in statements.iter().zip(&results).take(setup) {
        assert!(result.is_ok(), "{sql}\n-> {result:?}");
    }
    for ((sql, want), got) in checks.iter().zip(&results[setup..]) {
        let rows = got
            .as_ref()
            .unwrap_or_else(|e| panic!("{sql}\n-> failed: {e}"));
        match want {
            // A number: how many rows.
            Value::Number(n) => assert_eq!(rows.len() as u64, n.as_u64().unwrap_or(0), "{sql}"),
            // Strings: the first column of each row, in order.
            Value::Array(w) if w.iter().all(Value::is_string) && !w.is_empty() => {
                let first: Vec<&Value> = rows.iter().map(|r| &r[0]).collect();
                assert_eq!(first, w.iter().collect::<Vec<_>>(), "{sql}");
            }
            // Rows: exactly these (64-bit integers may come quoted).
            _ => {
                let norm = |v: &Value| -> Value {
                    match v {
                        Value::Array(a) => Value::Array(
                            a.iter()
                                .map(|c| match c {
                                    Value::String(s) => s
                                        .parse::<i64>()
                                        .map(Value::from)
                                        .unwrap_or_else(|_| c.clone()),
                                    Value::Array(_) => c.clone(),
                                    _ => c.clone(),
                                })
                                .collect(),
                        ),
                        _ => v.clone(),
                    }
                };
                let got: Vec<Value> = rows.iter().map(norm).collect();
                let want: Vec<Value> = want
                    .as_array()
                    .map(|w| w.iter().map(norm).collect())
                    .unwrap_or_default();
                assert_eq!(got, want, "{sql}");
            }
        }
    }
}
