//! Several engine processes on one Kafka and one ClickHouse: one catalog that every process
//! sees, ids that no two processes hand out twice, deliveries shared by the dispatchers.

mod common;

use common::affiliate::Affiliate;
use common::{Api, KEY};
use postbackd::engine::InjectedFaults;
use postbackd::{Config, Server};
use std::time::{Duration, Instant};

async fn start(dir: &std::path::Path, shared: &Shared, roles: &str) -> (Server, Api) {
    start_with(dir, shared, roles, InjectedFaults::default()).await
}

async fn start_with(
    dir: &std::path::Path,
    shared: &Shared,
    roles: &str,
    faults: InjectedFaults,
) -> (Server, Api) {
    start_config(config(dir, shared, roles), faults).await
}

fn config(dir: &std::path::Path, shared: &Shared, roles: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        log: shared.log.clone(),
        store: shared.store.clone(),
        migrate: true,
        api_key: KEY.into(),
        roles: roles.parse().expect("roles"),
        allow_private_postback_targets: true,
        ..Config::default()
    }
}

async fn start_config(config: Config, faults: InjectedFaults) -> (Server, Api) {
    let server = Server::start_with(config, None, faults)
        .await
        .expect("starts");
    let api = Api::new(server.addr());
    (server, api)
}

/// Polls `path` on `api` until `check` holds for its JSON (bounded wait).
async fn eventually(api: &Api, path: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = api.get_json(path).await;
        if code == 200 && check(&body) {
            return;
        }
        assert!(Instant::now() < deadline, "{path}: {code} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the engines of one test share: Kafka topics and a ClickHouse database of their own
/// (named after a fresh directory).
struct Shared {
    log: String,
    store: String,
}

fn shared(dir: &std::path::Path) -> Shared {
    let broker = std::env::var("POSTBACKD_TEST_KAFKA").expect("POSTBACKD_TEST_KAFKA");
    let clickhouse = std::env::var("POSTBACKD_TEST_CLICKHOUSE").expect("POSTBACKD_TEST_CLICKHOUSE");
    let run = common::name_of(dir);
    Shared {
        log: format!("kafka://{broker}/cluster{run}"),
        store: format!("{clickhouse}/cluster{run}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka and ClickHouse: POSTBACKD_TEST_KAFKA, POSTBACKD_TEST_CLICKHOUSE"]
async fn processes_share_one_catalog_and_never_hand_out_an_id_twice() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let shared = shared(dir_a.path());
    let (server_a, a) = start(dir_a.path(), &shared, "api").await;
    let (server_b, b) = start(dir_b.path(), &shared, "api").await;

    // Twenty partners created at once, half through each process: twenty different ids.
    let mut creating = tokio::task::JoinSet::new();
    for i in 0..20 {
        let api = if i % 2 == 0 { a.clone() } else { b.clone() };
        creating.spawn(async move {
            let email = format!("p{i}@example.com");
            let body = api
                .admin_post("/3.0/admin/partner", &[("email", email.as_str())])
                .await;
            assert_eq!(body["partner"]["email"], email.as_str());
            (body["partner"]["id"].as_u64().expect("id"), email)
        });
    }
    let mut created = Vec::new();
    while let Some(r) = creating.join_next().await {
        created.push(r.expect("created"));
    }
    let mut ids: Vec<u64> = created.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=20).collect::<Vec<_>>(), "{created:?}");

    // Each process sees every partner, whichever process created it.
    for api in [&a, &b] {
        for (id, email) in &created {
            eventually(api, &format!("/3.0/admin/partner/{id}"), |body| {
                body["partner"]["email"] == email.as_str()
            })
            .await;
        }
    }

    // A write on one process may name what the other just created: a writer reads the log
    // up to its end before it checks and writes.
    let advertiser = a
        .admin_post("/3.0/admin/advertiser", &[("title", "Adv")])
        .await["advertiser"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let offer = b
        .admin_post(
            "/3.0/admin/offer",
            &[
                ("title", "O"),
                ("url", "https://x.example/?clickid={clickid}"),
                ("advertiser", advertiser.as_str()),
            ],
        )
        .await;
    assert_eq!(offer["offer"]["advertiser"], advertiser.as_str());
    let offer_id = offer["offer"]["id"].as_u64().expect("id");

    // An update through one process reaches the other.
    b.admin_post("/3.0/admin/partner/3", &[("title", "renamed")])
        .await;
    eventually(&a, "/3.0/admin/partner/3", |body| {
        body["partner"]["title"] == "renamed"
    })
    .await;
    eventually(&a, &format!("/3.0/offer/{offer_id}"), |body| {
        body["offer"]["advertiser"] == advertiser.as_str()
    })
    .await;

    // A process started later loads the whole catalog from the log.
    let dir_c = tempfile::tempdir().expect("c");
    let (server_c, c) = start(dir_c.path(), &shared, "api").await;
    let (code, body) = c.get_json("/3.0/admin/partner/3").await;
    assert_eq!((code, &body["partner"]["title"]), (200, &"renamed".into()));
    for server in [server_a, server_b, server_c] {
        server.shutdown().await;
    }
}

/// Jobs a stopped or running engine's own queue has delivered (its SQLite, read-only).
fn delivered_by(dir: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open_with_flags(
        dir.join("store.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("opens");
    db.query_row(
        "SELECT count(*) FROM delivery_jobs WHERE state = 'delivered'",
        [],
        |r| r.get(0),
    )
    .expect("counts")
}

/// Offer 1 and partner 1, whose postback setting calls `affiliate`'s `/ok` with the action id.
async fn offer_with_postback(api: &Api, affiliate: &Affiliate) {
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "O"),
            ("url", "https://x.example/?clickid={clickid}"),
        ],
    )
    .await;
    api.admin_post("/3.0/admin/partner", &[("email", "p@example.com")])
        .await;
    let url = affiliate.url("/ok?t={transactionid}&");
    api.admin_post(
        "/3.0/partner/postback",
        &[("partner_id", "1"), ("url", &url)],
    )
    .await;
}

/// Sends a conversion for each of `ids` through `api` (a click each, offer 1, partner 1).
async fn convert(api: &Api, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        let click = api.click(1, 1, "").await;
        let body = api
            .postback(&format!("clickid={click}&action_id={id}"))
            .await;
        assert_eq!(body["status"], 1, "{body}");
    }
}

/// Waits until each of `ids` reached the affiliate once, and checks none came twice.
async fn each_received_once(affiliate: &Affiliate, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<usize> = ids
            .iter()
            .map(|id| affiliate.count("/ok", &format!("t={id}&")))
            .collect();
        if let Some((id, n)) = ids.iter().zip(&counts).find(|(_, n)| **n > 1) {
            panic!("{id} reached the affiliate {n} times");
        }
        if counts.iter().all(|n| *n == 1) {
            return;
        }
        let missing = counts.iter().filter(|n| **n == 0).count();
        assert!(
            Instant::now() < deadline,
            "{missing} of {} not delivered",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka and ClickHouse: POSTBACKD_TEST_KAFKA, POSTBACKD_TEST_CLICKHOUSE"]
async fn dispatchers_share_the_deliveries_and_send_each_once() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let shared = shared(dir_a.path());
    let affiliate = Affiliate::start().await;
    let (server_a, a) = start(dir_a.path(), &shared, "all").await;
    let (server_b, _) = start(dir_b.path(), &shared, "dispatch").await;
    offer_with_postback(&a, &affiliate).await;

    // Conversions until the dispatch-only engine has delivered some of them: the two
    // dispatchers share the partitions.
    let mut sent: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered_by(dir_b.path()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the second dispatcher got no share"
        );
        let wave: Vec<String> = (sent.len()..sent.len() + 10)
            .map(|i| format!("T{i}"))
            .collect();
        convert(&a, wave.clone()).await;
        sent.extend(wave);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    each_received_once(&affiliate, &sent).await;

    // One dispatcher leaves under load; the other takes its partitions over.
    let more: Vec<String> = (sent.len()..sent.len() + 40)
        .map(|i| format!("T{i}"))
        .collect();
    let (_, stopped) = tokio::join!(convert(&a, more.clone()), server_b.shutdown());
    let () = stopped;
    sent.extend(more);
    each_received_once(&affiliate, &sent).await;
    let by_a = delivered_by(dir_a.path());
    let by_b = delivered_by(dir_b.path());
    assert!(by_a > 0 && by_b > 0, "a {by_a}, b {by_b}");

    // Failed deliveries re-sent through a process that dispatches nothing (its queue is
    // empty): found in the attempt log, sent once more each.
    a.admin_post("/3.0/admin/partner", &[("email", "q@example.com")])
        .await;
    let bad = affiliate.url("/bad?t={transactionid}&");
    a.admin_post(
        "/3.0/partner/postback",
        &[("partner_id", "2"), ("url", &bad)],
    )
    .await;
    for i in 0..3 {
        let click = a.click(1, 2, "").await;
        a.postback(&format!("clickid={click}&action_id=F{i}")).await;
    }
    let today = common::today();
    let failed = format!(
        "/3.0/stats/affiliatepostbacks?date_from={today}&date_to={today}&partner=2&limit=100"
    );
    eventually(&a, &failed, |body| {
        let rows = body["postbacks"].as_array().map_or(&[][..], Vec::as_slice);
        rows.len() == 3 && rows.iter().all(|r| r["state"] == "failed")
    })
    .await;
    let dir_c = tempfile::tempdir().expect("c");
    let (server_c, c) = start(dir_c.path(), &shared, "api").await;
    let r = c
        .admin_post(
            "/3.0/admin/affiliatepostbacks/resend",
            &[
                ("partner_id", "2"),
                ("date_from", &today),
                ("date_to", &today),
            ],
        )
        .await;
    assert_eq!(r["count"], 3, "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|i| affiliate.count("/bad", &format!("t=F{i}&")) < 2) {
        assert!(Instant::now() < deadline, "the re-sends were not attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..3 {
        assert_eq!(affiliate.count("/bad", &format!("t=F{i}&")), 2, "F{i}");
    }
    server_c.shutdown().await;
    server_a.shutdown().await;
}

/// A partition that comes back to a dispatcher after another delivered its jobs: the first
/// dispatcher's queue still holds those jobs as due for a retry, and the group starts it at
/// the other's committed offset, past the records of the deliveries. It must apply them from
/// the log before it attempts anything (`Dispatcher::catch_up`), or each goes out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka and ClickHouse: POSTBACKD_TEST_KAFKA, POSTBACKD_TEST_CLICKHOUSE"]
async fn a_partition_handed_back_is_not_delivered_again() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let shared = shared(dir_a.path());
    let affiliate = Affiliate::start().await;
    // Retries wait long enough for the second dispatcher to join and take its share first.
    let slow_retries = |dir: &std::path::Path, roles: &str| Config {
        delivery_base_delay_ms: 12_000,
        ..config(dir, &shared, roles)
    };
    let (server_a, a) = start_config(slow_retries(dir_a.path(), "all"), Default::default()).await;
    offer_with_postback(&a, &affiliate).await;
    let url = affiliate.url("/flaky?t={transactionid}&");
    a.admin_post(
        "/3.0/partner/postback",
        &[("partner_id", "1"), ("url", &url)],
    )
    .await;
    // Every first attempt fails (500) at the first dispatcher: each job waits for its retry.
    let ids: Vec<String> = (0..24).map(|i| format!("H{i}")).collect();
    convert(&a, ids.clone()).await;
    let attempts = |n: usize| {
        ids.iter()
            .all(|id| affiliate.count("/flaky", &format!("t={id}&")) >= n)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !attempts(1) {
        assert!(Instant::now() < deadline, "first attempts not made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The second dispatcher takes its share and makes those retries (200).
    let (server_b, _) =
        start_config(slow_retries(dir_b.path(), "dispatch"), Default::default()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !attempts(2) {
        assert!(Instant::now() < deadline, "retries not made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let by_b = delivered_by(dir_b.path());
    assert!(
        by_b > 0,
        "the second dispatcher got no share before the retries"
    );
    // It leaves: its partitions come back to the first, which must know they are delivered.
    server_b.shutdown().await;
    let settle = Instant::now() + Duration::from_secs(8);
    while Instant::now() < settle {
        for id in &ids {
            let n = affiliate.count("/flaky", &format!("t={id}&"));
            assert!(
                n <= 2,
                "{id} was sent {n} times (the second dispatcher held {by_b} delivered jobs)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server_a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka and ClickHouse: POSTBACKD_TEST_KAFKA, POSTBACKD_TEST_CLICKHOUSE"]
async fn a_processor_judges_with_every_catalog_change_made_before_the_postback() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let shared = shared(dir_a.path());
    let affiliate = Affiliate::start().await;
    // The processing engine starts with an empty catalog and does not follow it: the offer,
    // the partner and its postback setting made on the other engine reach it only if it
    // reads the catalog log before judging.
    let lagging = InjectedFaults {
        catalog_unfollowed: true,
        ..InjectedFaults::default()
    };
    let (server_b, _) = start_with(dir_b.path(), &shared, "process,dispatch", lagging).await;
    let (server_a, a) = start(dir_a.path(), &shared, "ingest,api").await;
    offer_with_postback(&a, &affiliate).await;
    convert(&a, ["L1".to_string()]).await;
    let today = common::today();
    eventually(
        &a,
        &format!("/3.0/stats/serverpostbacks?date_from={today}&date_to={today}"),
        |body| {
            let rows = body["postbacks"].as_array().map_or(&[][..], Vec::as_slice);
            rows.len() == 1 && rows[0]["error"] == "" && rows[0]["conversion_id"] != ""
        },
    )
    .await;
    each_received_once(&affiliate, &["L1".to_string()]).await;
    server_a.shutdown().await;
    server_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka and ClickHouse: POSTBACKD_TEST_KAFKA, POSTBACKD_TEST_CLICKHOUSE"]
async fn the_load_tester_drives_a_cluster_and_verifies_it() {
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
        tempfile::tempdir().expect("c"),
    );
    let shared = shared(dir_a.path());
    let (server_a, a) = start(dir_a.path(), &shared, "all").await;
    let (server_b, b) = start(dir_b.path(), &shared, "all").await;
    let (server_c, c) = start(dir_c.path(), &shared, "ingest,api").await;
    // Clicks, postbacks, duplicates (on the same click and on others, so on partitions of the
    // other processor), status updates and affiliate postbacks, a third of the requests to
    // each engine; two processes process, dedupe and dispatch.
    let report = pbload::run(pbload::Options {
        targets: vec![a.base.clone(), b.base.clone(), c.base.clone()],
        api_key: KEY.into(),
        scenario: pbload::Scenario::Full,
        rate: 200.0,
        duration: Duration::from_secs(4),
        max_in_flight: 256,
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
    let v = report.verify.expect("verified");
    assert!(v.expected > 100 && v.cross_duplicates > 0, "{v:?}");
    assert!(v.passed(), "{v:?}");
    assert!(
        v.deliveries.as_ref().is_some_and(|d| d.expected > 20),
        "{v:?}"
    );
    server_c.shutdown().await;
    server_b.shutdown().await;
    server_a.shutdown().await;
}

/// A process that takes a partition over starts where the group's committed position is, and
/// the last owner may have written rows past it (it died between its write and its commit).
/// Those batches are redone: their rows must be checked against the store and the postbacks
/// stage 1 hands on again marked as copies, however far that position lies past where the
/// new owner's own state of the partition stops (here it has none: every offset is past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka and ClickHouse: POSTBACKD_TEST_KAFKA, POSTBACKD_TEST_CLICKHOUSE"]
async fn a_partition_taken_over_behind_what_was_written_writes_no_row_twice() {
    use postback_core::log::{Polled, Position};
    use postback_core::processor::Accepted;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let shared = shared(dirs[0].path());
    let affiliate = Affiliate::start().await;
    // Batches of two: the records redone lie far past two batches from the new owner's start.
    let small_batches = |dir: &std::path::Path| Config {
        processor_batch: 2,
        ..config(dir, &shared, "all")
    };
    let (server_a, a) = start_config(small_batches(dirs[0].path()), Default::default()).await;
    offer_with_postback(&a, &affiliate).await;
    // One click and its postbacks: one partition of the events log.
    let click = a.click(1, 1, "").await;
    let ids: Vec<String> = (0..48).map(|i| format!("W{i}")).collect();
    for id in &ids {
        let body = a.postback(&format!("clickid={click}&action_id={id}")).await;
        assert_eq!(body["status"], 1, "{body}");
    }
    let today = common::today();
    let rows = format!("/3.0/stats/serverpostbacks?date_from={today}&date_to={today}&limit=100");
    eventually(&a, &rows, |body| body["pagination"]["total_count"] == 48).await;
    each_received_once(&affiliate, &ids).await;
    server_a.shutdown().await;

    // The group's position of that partition goes back four records, as if the last owner
    // had died before committing its last two batches.
    let (server_r, _) = start(dirs[1].path(), &shared, "api").await;
    let events = server_r.engine.events.clone();
    let mut partition = None;
    for p in 0..events.partitions() {
        if events.bounds(p).await.expect("bounds").1 > 0 {
            partition = Some(p);
        }
    }
    let partition = partition.expect("the click's partition");
    let end = events.bounds(partition).await.expect("bounds").1;
    assert_eq!(end, 49, "the click and its postbacks");
    let conversions = server_r.engine.conversions.clone();
    let mut ends_before = Vec::new();
    for p in 0..conversions.partitions() {
        ends_before.push(conversions.bounds(p).await.expect("bounds").1);
    }
    let mut group = events
        .subscribe(postbackd::pipeline::CONSUMER)
        .await
        .expect("joins");
    loop {
        let polled = group.poll(100, 1 << 20, Duration::from_secs(5)).await;
        if let Polled::Assigned(ps) = polled.expect("polls") {
            assert!(ps.contains(&partition), "{ps:?}");
            break;
        }
    }
    let rewound = end - 4;
    group
        .commit(vec![Position {
            partition,
            offset: rewound,
        }])
        .await
        .expect("commits");
    drop(group);
    server_r.shutdown().await;

    // A process with no state of its own takes every partition over and redoes the four.
    let (server_b, b) = start_config(small_batches(dirs[2].path()), Default::default()).await;
    let state = server_b.engine.state.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let processed_to = |consumer: &'static str, p: u32, end: u64, what: &'static str| {
        let state = state.clone();
        async move {
            while state.position(consumer, p).await.expect("position") < end {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let redone = "the partition was not redone";
    processed_to(postbackd::pipeline::CONSUMER, partition, end, redone).await;
    // Stage 1 handed them on again; the dedupe stage decides each copy.
    let mut copies = 0;
    for p in 0..conversions.partitions() {
        let now = conversions.bounds(p).await.expect("bounds").1;
        let before = ends_before[p as usize];
        if now == before {
            continue;
        }
        for r in conversions
            .read(p, before, 100, 1 << 20)
            .await
            .expect("reads")
        {
            let copy: Accepted = serde_json::from_slice(&r.payload).expect("a postback");
            assert!(copy.maybe_copy, "{copy:?} is not marked as a copy");
            copies += 1;
        }
        let decided = "the copies were not decided";
        processed_to(postbackd::pipeline::DEDUPER, p, now, decided).await;
    }
    assert_eq!(
        copies,
        end - rewound,
        "each postback redone is handed on once more"
    );
    let (code, body) = b.get_json(&rows).await;
    assert_eq!(code, 200);
    assert_eq!(body["pagination"]["total_count"], 48, "{body}");
    for row in body["postbacks"].as_array().expect("rows") {
        assert_eq!(row["error"], "", "{row}");
    }
    server_b.shutdown().await;
}
