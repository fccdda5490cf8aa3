//! The conformance suite every [`Store`] must pass: the in-memory reference, SQLite, and
//! later ClickHouse. Each check starts from an empty store.

use crate::delivery::{Attempt, DeliveryJob, DeliveryRecord, DueQuery, JobStatus};
use crate::log::Position;
use crate::params::{parse_form, Params};
use crate::processor::{ConversionChange, Output, ServerPostbackRow};
use crate::rules::{Click, Conversion};
use crate::seams::{
    AttemptQuery, ConversionQuery, ServerPostbackQuery, Store, SummaryKey, SummaryQuery,
};

const DAY: i64 = 86_400_000_000;

/// A consumer's next position in partition 0.
fn upto(offset: u64) -> Vec<Position> {
    vec![Position {
        partition: 0,
        offset,
    }]
}

fn click(id: &str, at_us: i64) -> Click {
    Click {
        at_us,
        click_id: id.into(),
        offer_id: 1,
        pid: 2,
        ip: "1.2.3.4".into(),
        ua: "UA".into(),
        referrer: String::new(),
        country: String::new(),
        subs: vec!["a".into(), "b".into()],
    }
}

fn postback(id: &str, at_us: i64, query: &str, offer_id: u64, ok: bool) -> ServerPostbackRow {
    let get = parse_form(query.as_bytes());
    ServerPostbackRow {
        id: id.into(),
        at_us,
        server: "9.9.9.9".into(),
        method: "GET".into(),
        clickid: get.get("clickid").unwrap_or("").into(),
        goal: get.get("goal").unwrap_or("").into(),
        get,
        post: Params::default(),
        pixel: false,
        response_status: if ok { 1 } else { 2 },
        error: if ok {
            String::new()
        } else {
            "Click not found".into()
        },
        action_id: String::new(),
        status: 0,
        offer_id,
        pid: 2,
        advertiser_id: "adv".into(),
        conversion_id: String::new(),
        delta: Some(5),
        ip: String::new(),
        created: false,
        payouts: 0.0,
        revenue: 0.0,
    }
}

fn conversion(id: &str, key: &str, status: u8, at_us: i64) -> Conversion {
    Conversion {
        id: id.into(),
        key: key.into(),
        offer_id: 1,
        pid: 2,
        advertiser_id: "adv".into(),
        goal: "Install".into(),
        action_id: "A".into(),
        clickid: "c1".into(),
        status,
        sum: 1.0,
        payouts: 2.0,
        revenue: 3.0,
        currency: "USD".into(),
        ip: String::new(),
        ua: String::new(),
        comment: String::new(),
        subs: vec!["s1".into(); 8],
        custom_fields: vec![String::new(); 7],
        promo_code: String::new(),
        user_id: String::new(),
        created_us: at_us,
        updated_us: at_us,
        click_us: at_us,
    }
}

fn query(from_us: i64, to_us: i64) -> ServerPostbackQuery {
    ServerPostbackQuery {
        from_us,
        to_us,
        limit: 100,
        ..Default::default()
    }
}

/// Rewriting a batch adds nothing; the position moves with the batch; later states win.
pub async fn writes_are_idempotent_and_move_the_position(store: &dyn Store) {
    assert_eq!(store.position("p", 0).await.expect("position"), 0);
    let out = Output {
        jobs: vec![],
        clicks: vec![click("c1", 10)],
        postbacks: vec![postback(
            "p1",
            20,
            "clickid=c1&goal=Install&promo=SUMMER",
            1,
            true,
        )],
        changes: vec![ConversionChange {
            created: true,
            conversion: conversion("v1", "k1", 2, 20),
        }],
    };
    store.write("p", out.clone(), upto(7)).await.expect("write");
    store.write("p", out, upto(7)).await.expect("rewrite");
    assert_eq!(store.position("p", 0).await.expect("position"), 7);
    // Positions are kept per partition.
    let spread = vec![
        Position {
            partition: 3,
            offset: 40,
        },
        Position {
            partition: 5,
            offset: 2,
        },
    ];
    store
        .write("p", Output::default(), spread)
        .await
        .expect("write");
    assert_eq!(store.position("p", 3).await.expect("position"), 40);
    assert_eq!(store.position("p", 5).await.expect("position"), 2);
    assert_eq!(store.position("p", 0).await.expect("position"), 7, "kept");
    assert_eq!(store.position("p", 1).await.expect("position"), 0);
    assert_eq!(
        store.position("q", 3).await.expect("position"),
        0,
        "per consumer"
    );
    let page = store.server_postbacks(query(0, 100)).await.expect("query");
    assert_eq!(page.total, 1, "a rewritten batch adds nothing");
    let found = store
        .server_postbacks(ServerPostbackQuery {
            search: Some("summer".into()),
            ..query(0, 100)
        })
        .await
        .expect("search");
    assert_eq!(found.total, 1, "one search row, not two");
    let lookups = store
        .lookup(vec!["c1".into(), "zz".into()], vec!["k1".into()])
        .await
        .expect("lookup");
    assert_eq!(lookups.clicks["c1"], click("c1", 10));
    assert_eq!(lookups.conversions["k1"].status, 2);
    // A later state of the same conversion replaces the earlier one.
    let update = Output {
        changes: vec![ConversionChange {
            created: false,
            conversion: conversion("v1", "k1", 1, 20),
        }],
        ..Default::default()
    };
    store.write("p", update, upto(8)).await.expect("write");
    let convs = store
        .conversions(ConversionQuery {
            from_us: 0,
            to_us: 100,
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("conversions");
    assert_eq!(convs.total, 1);
    assert_eq!(convs.rows[0].status, 1);
}

/// Every server-postback filter, the search, and paging.
pub async fn filters_search_and_paging(store: &dyn Store) {
    let rows = (0..30)
        .map(|i| {
            let q = format!(
                "clickid=c{i}&goal={}&tag=x{i}y",
                if i % 2 == 0 { "Install" } else { "sale" }
            );
            postback(&format!("p{i:02}"), 100 + i, &q, (i % 3) as u64, i % 5 != 0)
        })
        .collect();
    store
        .write(
            "p",
            Output {
                postbacks: rows,
                ..Default::default()
            },
            upto(30),
        )
        .await
        .expect("write");
    let count = |q: ServerPostbackQuery| async move {
        store.server_postbacks(q).await.expect("query").total
    };
    assert_eq!(count(query(0, 1000)).await, 30);
    assert_eq!(
        count(query(110, 120)).await,
        10,
        "from inclusive, to exclusive"
    );
    assert_eq!(
        count(ServerPostbackQuery {
            offers: vec![0],
            ..query(0, 1000)
        })
        .await,
        10
    );
    assert_eq!(
        count(ServerPostbackQuery {
            offers: vec![0, 1],
            ..query(0, 1000)
        })
        .await,
        20
    );
    assert_eq!(
        count(ServerPostbackQuery {
            goal: Some("INSTALL".into()),
            ..query(0, 1000)
        })
        .await,
        15
    );
    assert_eq!(
        count(ServerPostbackQuery {
            response_status: Some(2),
            ..query(0, 1000)
        })
        .await,
        6
    );
    assert_eq!(
        count(ServerPostbackQuery {
            click_id: Some("c7".into()),
            ..query(0, 1000)
        })
        .await,
        1
    );
    assert_eq!(
        count(ServerPostbackQuery {
            suppliers: vec!["nope".into()],
            ..query(0, 1000)
        })
        .await,
        0
    );
    // Substring search over keys and values, long and short, and quotes in the term.
    assert_eq!(
        count(ServerPostbackQuery {
            search: Some("x12y".into()),
            ..query(0, 1000)
        })
        .await,
        1
    );
    assert_eq!(
        count(ServerPostbackQuery {
            search: Some("tag=x1".into()),
            ..query(0, 1000)
        })
        .await,
        11
    );
    assert_eq!(
        count(ServerPostbackQuery {
            search: Some("c2".into()),
            ..query(0, 1000)
        })
        .await,
        11
    );
    assert_eq!(
        count(ServerPostbackQuery {
            search: Some("\"'%".into()),
            ..query(0, 1000)
        })
        .await,
        0
    );
    // Short terms mean the same: a substring of `key=value`, so `=c` and `g=` match the pairs.
    for (term, n) in [("=c", 30), ("g=x", 30), ("d=c", 30), ("=c1", 11), ("9y", 3)] {
        assert_eq!(
            count(ServerPostbackQuery {
                search: Some(term.into()),
                ..query(0, 1000)
            })
            .await,
            n,
            "search {term:?}"
        );
    }
    let page = store
        .server_postbacks(ServerPostbackQuery {
            offset: 25,
            limit: 10,
            ..query(0, 1000)
        })
        .await
        .expect("page");
    assert_eq!(page.total, 30);
    assert_eq!(page.rows.len(), 5);
    assert_eq!(page.rows[0].id, "p04", "newest first");
}

/// Expiry removes old rows from every table and from the search.
pub async fn expiry_removes_old_rows_everywhere(store: &dyn Store) {
    let out = Output {
        jobs: vec![],
        clicks: vec![click("old", 0), click("new", 100 * DAY)],
        postbacks: vec![
            postback("p-old", DAY, "clickid=old&k=findme", 1, true),
            postback("p-new", 100 * DAY, "clickid=new&k=findme", 1, true),
        ],
        changes: vec![
            ConversionChange {
                created: true,
                conversion: conversion("v-old", "k-old", 1, DAY),
            },
            ConversionChange {
                created: true,
                conversion: conversion("v-new", "k-new", 1, 100 * DAY),
            },
        ],
    };
    store.write("p", out, upto(4)).await.expect("write");
    let removed = store.expire(10 * DAY).await.expect("expire");
    assert_eq!(removed, 3);
    let all = query(0, 1000 * DAY);
    let left = store.server_postbacks(all.clone()).await.expect("query");
    assert_eq!(
        left.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["p-new"]
    );
    let found = store
        .server_postbacks(ServerPostbackQuery {
            search: Some("findme".into()),
            ..all
        })
        .await
        .expect("search");
    assert_eq!(found.total, 1);
    assert!(store
        .clicks(vec!["old".into()])
        .await
        .expect("clicks")
        .is_empty());
    let lookups = store
        .lookup(vec![], vec!["k-old".into(), "k-new".into()])
        .await
        .expect("lookup");
    assert_eq!(lookups.conversions.len(), 1);
}

/// Every conversion filter, and newest-first paging.
pub async fn conversion_filters(store: &dyn Store) {
    let changes = (0..12)
        .map(|i| {
            let mut c = conversion(
                &format!("v{i:02}"),
                &format!("k{i}"),
                [1, 2, 3, 5][i % 4],
                100 + i as i64,
            );
            c.offer_id = (i % 3) as u64;
            c.pid = (i % 2) as u64;
            c.advertiser_id = if i < 6 { "a1".into() } else { "a2".into() };
            c.goal = if i % 2 == 0 {
                "Install".into()
            } else {
                "sale".into()
            };
            c.action_id = format!("act{i}");
            c.clickid = format!("click{}", i / 2);
            c.subs[1] = format!("s2-{}", i % 4);
            ConversionChange {
                created: true,
                conversion: c,
            }
        })
        .collect();
    store
        .write(
            "p",
            Output {
                changes,
                ..Default::default()
            },
            upto(12),
        )
        .await
        .expect("write");
    let all = ConversionQuery {
        from_us: 0,
        to_us: 1000,
        limit: 100,
        ..Default::default()
    };
    let count =
        |q: ConversionQuery| async move { store.conversions(q).await.expect("query").total };
    assert_eq!(count(all.clone()).await, 12);
    assert_eq!(
        count(ConversionQuery {
            from_us: 105,
            to_us: 108,
            ..all.clone()
        })
        .await,
        3
    );
    assert_eq!(
        count(ConversionQuery {
            statuses: vec![1, 5],
            ..all.clone()
        })
        .await,
        6
    );
    assert_eq!(
        count(ConversionQuery {
            offers: vec![1],
            ..all.clone()
        })
        .await,
        4
    );
    assert_eq!(
        count(ConversionQuery {
            partners: vec![0],
            ..all.clone()
        })
        .await,
        6
    );
    assert_eq!(
        count(ConversionQuery {
            advertisers: vec!["a2".into()],
            ..all.clone()
        })
        .await,
        6
    );
    assert_eq!(
        count(ConversionQuery {
            goal: Some("install".into()),
            ..all.clone()
        })
        .await,
        6
    );
    assert_eq!(
        count(ConversionQuery {
            action_id: Some("act3".into()),
            ..all.clone()
        })
        .await,
        1
    );
    assert_eq!(
        count(ConversionQuery {
            clickid: Some("click1".into()),
            ..all.clone()
        })
        .await,
        2
    );
    let mut subs: [Option<String>; 5] = Default::default();
    subs[1] = Some("s2-1".into());
    assert_eq!(
        count(ConversionQuery {
            subs,
            ..all.clone()
        })
        .await,
        3
    );
    let page = store
        .conversions(ConversionQuery {
            offset: 10,
            limit: 5,
            ..all
        })
        .await
        .expect("page");
    assert_eq!(page.total, 12);
    assert_eq!(
        page.rows.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec!["v01", "v00"]
    );
}

fn job(id: &str, pid: u64, at_us: i64) -> DeliveryJob {
    DeliveryJob {
        job_id: id.into(),
        at_us,
        setting_id: 1,
        pid,
        offer_id: 7,
        lead_id: "lead".into(),
        goal: "Install".into(),
        status: 1,
        payouts: 2.5,
        revenue: 4.0,
        currency: "USD".into(),
        notice: "note".into(),
        integration_type: "s2s".into(),
        method: "GET".into(),
        url: format!("http://aff.example/{id}"),
    }
}

fn attempt(
    id: &str,
    n: u32,
    at_us: i64,
    code: u16,
    state: JobStatus,
    next: Option<i64>,
) -> DeliveryRecord {
    DeliveryRecord::Attempt(Attempt {
        job_id: id.into(),
        attempt: n,
        at_us,
        http_code: code,
        error: if code == 200 {
            String::new()
        } else {
            format!("HTTP {code}")
        },
        state,
        next_at_us: next,
    })
}

/// Due jobs of every host, as one call gives them.
async fn due_now(store: &dyn Store, now_us: i64) -> Vec<crate::delivery::JobState> {
    store
        .due_jobs(DueQuery {
            now_us,
            per_host: 10,
            after_host: String::new(),
            limit: 100,
            max_hosts: 100,
        })
        .await
        .expect("due")
        .jobs
}

/// Due jobs are taken fairly: at most `per_host` of each host's soonest, hosts in turn after
/// the last one visited, so a host with many due jobs cannot crowd out another.
pub async fn due_jobs_are_fair_across_hosts(store: &dyn Store) {
    let at = |id: &str, host: &str, at_us: i64| {
        let mut j = job(id, 1, at_us);
        j.url = format!("https://{host}/pb?id={id}");
        DeliveryRecord::Job(j)
    };
    let mut records: Vec<DeliveryRecord> = (0..50)
        .map(|i| at(&format!("a{i:02}"), "a.example", 100 + i))
        .collect();
    records.push(at("b0", "B.example", 500));
    records.push(at("c0", "c.example", 5_000)); // pending, not yet due
    records.push(at("d0", "user@d.example:8080", 10));
    store
        .apply_deliveries("d", records, upto(53))
        .await
        .expect("apply");
    let query = |after: &str, limit: usize, max_hosts: usize| DueQuery {
        now_us: 1_000,
        per_host: 3,
        after_host: after.into(),
        limit,
        max_hosts,
    };
    let ids = |d: &crate::delivery::DueJobs| -> Vec<String> {
        d.jobs.iter().map(|j| j.job.job_id.clone()).collect()
    };
    let all = store.due_jobs(query("", 100, 100)).await.expect("due");
    assert_eq!(
        ids(&all),
        vec!["a00", "a01", "a02", "b0", "d0"],
        "three of a's soonest, then every other host"
    );
    assert_eq!(all.last_host, "d.example:8080");
    // Taken a host or two at a time, the hosts come in turn, wrapping around.
    let first = store.due_jobs(query("", 3, 100)).await.expect("due");
    assert_eq!(ids(&first), vec!["a00", "a01", "a02"]);
    assert_eq!(first.last_host, "a.example");
    let second = store
        .due_jobs(query(&first.last_host, 100, 2))
        .await
        .expect("due");
    assert_eq!(ids(&second), vec!["b0"], "b, then c (nothing due)");
    assert_eq!(second.last_host, "c.example");
    let third = store
        .due_jobs(query(&second.last_host, 100, 2))
        .await
        .expect("due");
    assert_eq!(ids(&third), vec!["d0", "a00", "a01", "a02"], "wraps around");
    assert_eq!(third.last_host, "a.example");
}

/// Jobs, attempts and re-sends: state, due times, the attempt log, idempotence.
pub async fn deliveries(store: &dyn Store) {
    let records = vec![
        DeliveryRecord::Job(job("j1", 1, 100)),
        DeliveryRecord::Job(job("j2", 1, 110)),
        DeliveryRecord::Job(job("j3", 2, 120)),
        DeliveryRecord::Job(job("j1", 1, 100)), // a redone batch
        attempt("j1", 1, 130, 500, JobStatus::Pending, Some(200)),
        attempt("j2", 1, 131, 404, JobStatus::Failed, None),
    ];
    store
        .apply_deliveries("d", records.clone(), upto(6))
        .await
        .expect("apply");
    store
        .apply_deliveries("d", records, upto(6))
        .await
        .expect("apply again");
    assert_eq!(store.position("d", 0).await.expect("position"), 6);
    let due = due_now(store, 150).await;
    assert_eq!(
        due.iter()
            .map(|j| j.job.job_id.as_str())
            .collect::<Vec<_>>(),
        vec!["j3"]
    );
    let due = due_now(store, 200).await;
    assert_eq!(
        due.iter()
            .map(|j| j.job.job_id.as_str())
            .collect::<Vec<_>>(),
        vec!["j3", "j1"],
        "soonest first"
    );
    assert_eq!(due[1].attempts, 1);
    assert_eq!(due[1].status, JobStatus::Pending);
    let all = AttemptQuery {
        from_us: 0,
        to_us: 1000,
        limit: 100,
        ..Default::default()
    };
    let page = store.attempts(all.clone()).await.expect("attempts");
    assert_eq!(page.total, 2, "attempts seen twice count once");
    assert_eq!(page.rows[0].job.job_id, "j2", "newest first");
    assert_eq!(page.rows[0].attempt.http_code, 404);
    assert_eq!(page.rows[0].job.payouts, 2.5);
    let n = |q: AttemptQuery| async move { store.attempts(q).await.expect("attempts").total };
    assert_eq!(
        n(AttemptQuery {
            http_code: Some(500),
            ..all.clone()
        })
        .await,
        1
    );
    assert_eq!(
        n(AttemptQuery {
            partners: vec![2],
            ..all.clone()
        })
        .await,
        0
    );
    assert_eq!(
        n(AttemptQuery {
            offers: vec![7],
            ..all.clone()
        })
        .await,
        2
    );
    assert_eq!(
        n(AttemptQuery {
            goal: Some("install".into()),
            ..all.clone()
        })
        .await,
        2
    );
    assert_eq!(
        n(AttemptQuery {
            status: Some(1),
            ..all.clone()
        })
        .await,
        2
    );
    assert_eq!(
        n(AttemptQuery {
            job_id: Some("j1".into()),
            ..all.clone()
        })
        .await,
        1
    );
    assert_eq!(
        store.failed_jobs(1, 0, 1000).await.expect("failed"),
        vec!["j2".to_string()]
    );
    // A re-send makes a failed job due again, with a new retry budget.
    store
        .apply_deliveries(
            "d",
            vec![DeliveryRecord::Resend {
                job_id: "j2".into(),
                at_us: 140,
            }],
            upto(7),
        )
        .await
        .expect("resend");
    let j2 = store
        .jobs(vec!["j2".into(), "nope".into()])
        .await
        .expect("jobs");
    assert_eq!(j2.len(), 1);
    assert_eq!(
        (j2[0].status, j2[0].round_base, j2[0].next_at_us),
        (JobStatus::Pending, 1, 140)
    );
    store
        .apply_deliveries(
            "d",
            vec![attempt("j2", 2, 150, 200, JobStatus::Delivered, None)],
            upto(8),
        )
        .await
        .expect("apply");
    let j2 = store.jobs(vec!["j2".into()]).await.expect("jobs");
    assert_eq!((j2[0].status, j2[0].attempts), (JobStatus::Delivered, 2));
    assert!(store
        .failed_jobs(1, 0, 1000)
        .await
        .expect("failed")
        .is_empty());
    assert_eq!(due_now(store, 1000).await.len(), 2, "j1 and j3");
}

/// A snapshot from a first page pins the listing: rows written afterwards (newer ones, which
/// sort first) shift nothing, so paging on sees every row once and the same total; rows that
/// were there show their current values.
pub async fn snapshots_pin_a_growing_listing(store: &dyn Store) {
    let first = Output {
        postbacks: (0..10)
            .map(|i| postback(&format!("p{i:02}"), 100 + i, "a=1", 1, true))
            .collect(),
        changes: (0..10)
            .map(|i| ConversionChange {
                created: true,
                conversion: conversion(&format!("v{i:02}"), &format!("k{i}"), 2, 100 + i),
            })
            .collect(),
        ..Default::default()
    };
    store.write("p", first, upto(10)).await.expect("write");
    let jobs = |from: usize, to: usize| {
        (from..to)
            .flat_map(|i| {
                let id = format!("j{i:02}");
                [
                    DeliveryRecord::Job(job(&id, 1, 100)),
                    attempt(&id, 1, 100 + i as i64, 500, JobStatus::Pending, Some(999)),
                ]
            })
            .collect::<Vec<_>>()
    };
    store
        .apply_deliveries("d", jobs(0, 10), upto(20))
        .await
        .expect("apply");
    let pq = |offset, snapshot| ServerPostbackQuery {
        offset,
        limit: 4,
        snapshot,
        ..query(0, 1000)
    };
    let cq = |offset, snapshot| ConversionQuery {
        from_us: 0,
        to_us: 1000,
        offset,
        limit: 4,
        snapshot,
        ..Default::default()
    };
    let aq = |offset, snapshot| AttemptQuery {
        from_us: 0,
        to_us: 1000,
        offset,
        limit: 4,
        snapshot,
        ..Default::default()
    };
    let p1 = store.server_postbacks(pq(0, None)).await.expect("page 1");
    let c1 = store.conversions(cq(0, None)).await.expect("page 1");
    let a1 = store.attempts(aq(0, None)).await.expect("page 1");
    assert_eq!((p1.total, c1.total, a1.total), (10, 10, 10));

    // The processor and the dispatcher go on while the listing is read.
    let more = Output {
        postbacks: (10..15)
            .map(|i| postback(&format!("p{i:02}"), 200 + i, "a=1", 1, true))
            .collect(),
        changes: (10..15)
            .map(|i| ConversionChange {
                created: true,
                conversion: conversion(&format!("v{i:02}"), &format!("k{i}"), 2, 200 + i),
            })
            .chain([ConversionChange {
                created: false,
                conversion: conversion("v03", "k3", 1, 103),
            }])
            .collect(),
        ..Default::default()
    };
    store.write("p", more, upto(15)).await.expect("write");
    store
        .apply_deliveries("d", jobs(10, 15), upto(30))
        .await
        .expect("apply");

    let mut postbacks: Vec<String> = p1.rows.iter().map(|r| r.id.clone()).collect();
    let mut conversions: Vec<String> = c1.rows.iter().map(|c| c.id.clone()).collect();
    let mut attempts: Vec<String> = a1.rows.iter().map(|a| a.job.job_id.clone()).collect();
    for offset in [4, 8] {
        let p = store
            .server_postbacks(pq(offset, Some(p1.snapshot)))
            .await
            .expect("page");
        assert_eq!((p.total, p.snapshot), (10, p1.snapshot), "pinned");
        postbacks.extend(p.rows.iter().map(|r| r.id.clone()));
        let c = store
            .conversions(cq(offset, Some(c1.snapshot)))
            .await
            .expect("page");
        assert_eq!(c.total, 10, "pinned");
        if let Some(v03) = c.rows.iter().find(|c| c.id == "v03") {
            assert_eq!(v03.status, 1, "a pinned row shows its current state");
        }
        conversions.extend(c.rows.iter().map(|c| c.id.clone()));
        let a = store
            .attempts(aq(offset, Some(a1.snapshot)))
            .await
            .expect("page");
        assert_eq!(a.total, 10, "pinned");
        attempts.extend(a.rows.iter().map(|a| a.job.job_id.clone()));
    }
    let expect = |prefix: &str| -> Vec<String> {
        (0..10).rev().map(|i| format!("{prefix}{i:02}")).collect()
    };
    assert_eq!(postbacks, expect("p"), "each row once, newest first");
    assert_eq!(conversions, expect("v"));
    assert_eq!(attempts, expect("j"));
    // Without a snapshot, the listing is read as it is now.
    let now = store.server_postbacks(pq(0, None)).await.expect("now");
    assert_eq!(now.total, 15);
    assert!(now.snapshot > p1.snapshot);
    assert_eq!(store.conversions(cq(0, None)).await.expect("now").total, 15);
    assert_eq!(store.attempts(aq(0, None)).await.expect("now").total, 15);
}

/// The summary counts the filtered log by group: postbacks, accepted and rejected ones,
/// conversions with their payouts and revenue; time goes by the UTC hour.
pub async fn summaries(store: &dyn Store) {
    const HOUR: i64 = crate::seams::HOUR_US;
    let row = |i: i64, at_us: i64, offer: u64, ok: bool, created: bool| {
        let mut r = postback(&format!("s{i:03}"), at_us, "goal=Sale", offer, ok);
        r.advertiser_id = format!("adv{}", offer % 2);
        if !ok && i % 2 == 0 {
            r.error = "Goal not found".into();
        }
        if created {
            (r.created, r.payouts, r.revenue) = (true, 2.5, 4.0);
        }
        r
    };
    let rows = vec![
        row(0, 10 * HOUR, 1, true, true),
        row(1, 10 * HOUR + 5, 1, true, false),
        row(2, 10 * HOUR + 9, 1, false, false),
        row(3, 11 * HOUR, 1, false, false),
        row(4, 11 * HOUR + 1, 2, true, true),
        row(5, 11 * HOUR + 2, 3, true, true),
        row(6, 40 * HOUR, 3, true, true), // outside the range below
    ];
    store
        .write(
            "p",
            Output {
                postbacks: rows,
                ..Default::default()
            },
            upto(7),
        )
        .await
        .expect("write");
    let q = |group_by: Vec<SummaryKey>| SummaryQuery {
        filters: query(0, 24 * HOUR),
        group_by,
    };
    let total = store.summary(q(vec![])).await.expect("summary");
    assert_eq!(total.len(), 1);
    let t = &total[0];
    assert_eq!(
        (t.postbacks, t.accepted, t.rejected, t.conversions),
        (6, 4, 2, 3)
    );
    assert_eq!((t.payouts, t.revenue), (7.5, 12.0));
    assert_eq!(t.hour_us, None, "not grouped by time");

    let by = store
        .summary(q(vec![SummaryKey::Hour, SummaryKey::Offer]))
        .await
        .expect("summary");
    let got: Vec<(Option<i64>, Option<u64>, u64, u64)> = by
        .iter()
        .map(|r| (r.hour_us, r.offer_id, r.postbacks, r.conversions))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some(10 * HOUR), Some(1), 3, 1),
            (Some(11 * HOUR), Some(1), 1, 0),
            (Some(11 * HOUR), Some(2), 1, 1),
            (Some(11 * HOUR), Some(3), 1, 1),
        ]
    );
    let errors = store
        .summary(SummaryQuery {
            filters: ServerPostbackQuery {
                offers: vec![1],
                ..query(0, 24 * HOUR)
            },
            group_by: vec![SummaryKey::ResponseStatus, SummaryKey::Error],
        })
        .await
        .expect("summary");
    let got: Vec<(Option<u8>, Option<&str>, u64)> = errors
        .iter()
        .map(|r| (r.response_status, r.error.as_deref(), r.postbacks))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some(1), Some(""), 2),
            (Some(2), Some("Click not found"), 1),
            (Some(2), Some("Goal not found"), 1),
        ]
    );
    let by_goal = store
        .summary(q(vec![SummaryKey::Advertiser, SummaryKey::Goal]))
        .await
        .expect("summary");
    assert_eq!(
        by_goal
            .iter()
            .map(|r| (r.advertiser_id.as_deref(), r.goal.as_deref(), r.postbacks))
            .collect::<Vec<_>>(),
        vec![
            (Some("adv0"), Some("sale"), 1),
            (Some("adv1"), Some("sale"), 5)
        ],
        "goals without case"
    );
}
