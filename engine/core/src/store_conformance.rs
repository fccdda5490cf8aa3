//! The conformance suites every store must pass, one per seam: the in-memory reference,
//! SQLite, and (for the analytics store) ClickHouse. Each check starts from a fresh store,
//! which the caller's `fresh` makes.

use crate::delivery::{Attempt, AttemptRow, DeliveryJob, DeliveryRecord, DueQuery, JobStatus};
use crate::keys::Partition;
use crate::log::Position;
use crate::params::{parse_form, Params};
use crate::processor::ServerPostbackRow;
use crate::rules::{Click, Conversion};
use crate::seams::{
    AnalyticsRows, AnalyticsStore, AttemptQuery, BoxFuture, ConversionQuery, DeliveryQueue,
    ServerPostbackQuery, StateChanges, StateStore, SummaryKey, SummaryQuery,
};
use std::sync::Arc;

/// Makes an empty store for one check.
pub type Fresh<'a, T> = &'a (dyn Fn() -> BoxFuture<'static, Arc<T>> + Sync);

/// Every check of the analytics store, each on a fresh store.
pub async fn analytics_suite(fresh: Fresh<'_, dyn AnalyticsStore>) {
    inserts_are_idempotent(&*fresh().await).await;
    filters_search_and_paging(&*fresh().await).await;
    pages_across_days(&*fresh().await).await;
    search_has_one_meaning(&*fresh().await).await;
    expiry_removes_old_rows(&*fresh().await).await;
    conversion_filters(&*fresh().await).await;
    attempt_filters(&*fresh().await).await;
    snapshots_pin_a_growing_listing(&*fresh().await).await;
    summaries(&*fresh().await).await;
    summaries_of_ranges_off_the_hour(&*fresh().await).await;
    clear_forgets_every_row(&*fresh().await).await;
}

/// Every check of the processor's state store.
pub async fn state_suite(fresh: Fresh<'_, dyn StateStore>) {
    commits_are_idempotent_and_move_the_position(&*fresh().await).await;
    expiry_forgets_old_state(&*fresh().await).await;
}

/// Every check of the delivery queue.
pub async fn queue_suite(fresh: Fresh<'_, dyn DeliveryQueue>) {
    deliveries(&*fresh().await).await;
    due_jobs_are_fair_across_hosts(&*fresh().await).await;
    due_jobs_of_some_partitions(&*fresh().await).await;
}

const DAY: i64 = 86_400_000_000;

/// A consumer's next position in partition 0.
/// The deliveries' next position in partition 0.
fn next_at(offset: u64) -> Position {
    Position {
        partition: 0,
        offset,
    }
}

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

/// A server-postback row of the checks: accepted (`ok`) or not, with its query's parameters.
pub fn postback(id: &str, at_us: i64, query: &str, offer_id: u64, ok: bool) -> ServerPostbackRow {
    let get = parse_form(query.as_bytes());
    let action_id = get.get("action_id").unwrap_or("").into();
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
        action_id,
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

async fn insert_postbacks(store: &dyn AnalyticsStore, rows: Vec<ServerPostbackRow>) {
    store
        .insert(AnalyticsRows {
            postbacks: rows,
            ..Default::default()
        })
        .await
        .expect("insert");
}

fn query(from_us: i64, to_us: i64) -> ServerPostbackQuery {
    ServerPostbackQuery {
        from_us,
        to_us,
        limit: 100,
        ..Default::default()
    }
}

/// Inserting rows again adds nothing; of a conversion's states the latest is read, whatever
/// order they came in.
async fn inserts_are_idempotent(store: &dyn AnalyticsStore) {
    let rows = AnalyticsRows {
        clicks: vec![click("c1", 10)],
        postbacks: vec![postback(
            "p1",
            20,
            "clickid=c1&goal=Install&promo=SUMMER",
            1,
            true,
        )],
        conversions: vec![conversion("v1", "k1", 2, 20)],
        attempts: vec![attempt_row("j1", 1, 30, 500)],
        maybe_inserted: false,
    };
    store.insert(rows.clone()).await.expect("insert");
    let redone = AnalyticsRows {
        maybe_inserted: true,
        ..rows
    };
    store.insert(redone).await.expect("insert again");
    let page = store.server_postbacks(query(0, 100)).await.expect("query");
    assert_eq!(page.total, 1, "a row inserted twice is kept once");
    let found = store
        .server_postbacks(ServerPostbackQuery {
            search: Some("summer".into()),
            ..query(0, 100)
        })
        .await
        .expect("search");
    assert_eq!(found.total, 1, "found once, not twice");
    assert_eq!(
        store
            .clicks(vec!["c1".into(), "zz".into()])
            .await
            .expect("clicks"),
        vec![click("c1", 10)]
    );
    let attempts = store
        .attempts(AttemptQuery {
            from_us: 0,
            to_us: 100,
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("attempts");
    assert_eq!(attempts.total, 1);
    let convs = || async move {
        store
            .conversions(ConversionQuery {
                from_us: 0,
                to_us: 100,
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("conversions")
    };
    // A later state replaces the earlier one; the earlier one arriving again does not.
    let mut approved = conversion("v1", "k1", 1, 20);
    approved.updated_us = 40;
    approved.comment = "ok".into();
    for states in [vec![approved.clone()], vec![conversion("v1", "k1", 2, 20)]] {
        store
            .insert(AnalyticsRows {
                conversions: states,
                ..Default::default()
            })
            .await
            .expect("insert");
        let page = convs().await;
        assert_eq!(page.total, 1);
        assert_eq!(page.rows[0], approved);
    }
    // Two states of one microsecond: the one that left pending wins, in either order.
    let pending = conversion("v2", "k2", 2, 50);
    let declined = conversion("v2", "k2", 3, 50);
    store
        .insert(AnalyticsRows {
            conversions: vec![declined, pending],
            ..Default::default()
        })
        .await
        .expect("insert");
    let page = convs().await;
    assert_eq!(page.total, 2);
    assert_eq!((page.rows[0].id.as_str(), page.rows[0].status), ("v2", 3));
    // By key, as a processor taking a partition over asks: the latest states.
    let mut by_key = store
        .conversion_states(vec!["k1".into(), "k2".into(), "nope".into()])
        .await
        .expect("conversion states");
    by_key.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(by_key.len(), 2);
    assert_eq!(by_key[0], approved);
    assert_eq!((by_key[1].key.as_str(), by_key[1].status), ("k2", 3));
}

/// Every server-postback filter, the search, and paging.
async fn filters_search_and_paging(store: &dyn AnalyticsStore) {
    let rows = (0..30)
        .map(|i| {
            let q = format!(
                "clickid=c{i}&action_id=o{}&goal={}&tag=x{i}y",
                i % 4,
                if i % 2 == 0 { "Install" } else { "sale" }
            );
            postback(&format!("p{i:02}"), 100 + i, &q, (i % 3) as u64, i % 5 != 0)
        })
        .collect();
    insert_postbacks(store, rows).await;
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
            action_id: Some("o3".into()),
            ..query(0, 1000)
        })
        .await,
        7,
        "o3: rows 3, 7, .., 27"
    );
    assert_eq!(
        count(ServerPostbackQuery {
            action_id: Some("o3".into()),
            click_id: Some("c7".into()),
            ..query(0, 1000)
        })
        .await,
        1
    );
    assert_eq!(
        count(ServerPostbackQuery {
            action_id: Some("o".into()),
            ..query(0, 1000)
        })
        .await,
        0,
        "an exact filter, not a prefix"
    );
    let one = store
        .server_postbacks(ServerPostbackQuery {
            id: Some("p07".into()),
            ..query(0, 1000)
        })
        .await
        .expect("by id");
    assert_eq!(
        (one.total, one.rows.first().map(|r| r.clickid.as_str())),
        (1, Some("c7"))
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

/// Pages over rows spread across days (some empty, several rows of one time) walk every row
/// once, newest first and ties by id, however wide the range.
async fn pages_across_days(store: &dyn AnalyticsStore) {
    const DAY: i64 = 86_400_000_000;
    let t0 = 1_790_000_000_000_000;
    // Days 0, 1, 3 and 6; on day 3 three rows share one time.
    let times = [
        0,
        5,
        DAY,
        DAY + 9,
        3 * DAY,
        3 * DAY,
        3 * DAY,
        6 * DAY - 1,
        6 * DAY,
    ];
    let rows: Vec<_> = times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let q = format!(
                "clickid=c{i}&tag={}",
                if i % 2 == 0 { "even" } else { "odd" }
            );
            postback(&format!("p{i}"), t0 + t, &q, 1, true)
        })
        .collect();
    let mut want: Vec<_> = rows.iter().map(|r| (r.at_us, r.id.clone())).collect();
    want.sort_by(|a, b| b.cmp(a));
    insert_postbacks(store, rows).await;
    for (range, search) in [
        ((t0, t0 + 7 * DAY), None),
        ((0, i64::MAX), None),
        ((i64::MIN, i64::MAX), Some("even")),
    ] {
        let matching: Vec<_> = want
            .iter()
            .filter(|(_, id)| {
                let i: usize = id[1..].parse().expect("n");
                search.is_none() || i.is_multiple_of(2)
            })
            .cloned()
            .collect();
        for limit in [1, 2, 4, 100] {
            let mut seen = Vec::new();
            let mut offset = 0;
            loop {
                let page = store
                    .server_postbacks(ServerPostbackQuery {
                        offset,
                        limit,
                        search: search.map(Into::into),
                        ..query(range.0, range.1)
                    })
                    .await
                    .expect("page");
                assert_eq!(page.total, matching.len() as u64, "{range:?} {search:?}");
                if page.rows.is_empty() {
                    break;
                }
                seen.extend(page.rows.into_iter().map(|r| (r.at_us, r.id)));
                offset += limit;
            }
            assert_eq!(seen, matching, "{range:?} {search:?}, pages of {limit}");
        }
    }
}

/// Search means the same in every store: a case-insensitive substring of a `key=value`
/// parameter, of any length. Rows of one time are ordered by id, so pages neither repeat nor
/// skip a row.
async fn search_has_one_meaning(store: &dyn AnalyticsStore) {
    let mut rows = vec![
        postback(
            "a01",
            100,
            "clickid=AbC123&sum=1&city=M%C3%BCNCHEN",
            1,
            true,
        ),
        postback(
            "a02",
            100,
            "clickid=zz9&sum=10&note=%D0%9F%D1%80%D0%B8%D0%B2%D0%B5%D1%82",
            1,
            true,
        ),
        postback("a03", 100, "clickid=q&x=%25_%5C", 1, true),
        postback("a04", 100, "clickid=e", 1, true),
    ];
    // A body parameter is searched too.
    rows[3].post = parse_form(b"Secret=Value1");
    // Inserted out of id order, all at one microsecond.
    rows.swap(0, 2);
    insert_postbacks(store, rows).await;
    let ids = |term: &'static str| async move {
        let page = store
            .server_postbacks(ServerPostbackQuery {
                search: Some(term.into()),
                ..query(0, 1000)
            })
            .await
            .expect("search");
        assert_eq!(page.total as usize, page.rows.len());
        page.rows.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    for (term, want) in [
        ("=1", vec!["a02", "a01"]),
        ("sum=1", vec!["a02", "a01"]),
        ("sum=1&", vec![]),
        ("abc", vec!["a01"]),
        ("CLICKID=abc123", vec!["a01"]),
        ("a", vec!["a04", "a01"]),
        ("Q", vec!["a03"]),
        ("münchen", vec!["a01"]),
        ("ПРИВЕТ", vec!["a02"]),
        ("ивет", vec!["a02"]),
        ("%", vec!["a03"]),
        ("_", vec!["a03"]),
        ("\\", vec!["a03"]),
        ("secret=value", vec!["a04"]),
        ("t=v", vec!["a04"]),
        ("=e", vec!["a04"]),
        ("zz9", vec!["a02"]),
        ("nothing", vec![]),
    ] {
        assert_eq!(ids(term).await, want, "search {term:?}");
    }
    // Pages of one size step through rows of one time in id order.
    let mut seen = Vec::new();
    for offset in 0..4 {
        let page = store
            .server_postbacks(ServerPostbackQuery {
                offset,
                limit: 1,
                ..query(0, 1000)
            })
            .await
            .expect("page");
        seen.extend(page.rows.into_iter().map(|r| r.id));
    }
    assert_eq!(seen, vec!["a04", "a03", "a02", "a01"]);
}

/// Expiry removes old rows from every table and from the search.
async fn expiry_removes_old_rows(store: &dyn AnalyticsStore) {
    let rows = AnalyticsRows {
        clicks: vec![click("old", 0), click("new", 100 * DAY)],
        postbacks: vec![
            postback("p-old", DAY, "clickid=old&k=findme", 1, true),
            postback("p-new", 100 * DAY, "clickid=new&k=findme", 1, true),
        ],
        conversions: vec![
            conversion("v-old", "k-old", 1, DAY),
            conversion("v-new", "k-new", 1, 100 * DAY),
        ],
        attempts: vec![
            attempt_row("j-old", 1, DAY, 200),
            attempt_row("j-new", 1, 100 * DAY, 200),
        ],
        maybe_inserted: false,
    };
    store.insert(rows).await.expect("insert");
    let removed = store.expire(10 * DAY).await.expect("expire");
    assert!(removed <= 4, "{removed} deleted");
    let all = query(0, 1000 * DAY);
    let left = store.server_postbacks(all.clone()).await.expect("query");
    assert_eq!(
        left.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["p-new"]
    );
    let summary = store
        .summary(SummaryQuery {
            filters: all.clone(),
            group_by: vec![SummaryKey::Day],
        })
        .await
        .expect("summary");
    assert_eq!(
        summary
            .iter()
            .map(|r| (r.hour_us, r.postbacks))
            .collect::<Vec<_>>(),
        vec![(Some(100 * DAY), 1)],
        "the summary forgets expired rows too"
    );
    let found = store
        .server_postbacks(ServerPostbackQuery {
            search: Some("findme".into()),
            ..all
        })
        .await
        .expect("search");
    assert_eq!(found.total, 1);
    let clicks = store
        .clicks(vec!["old".into(), "new".into()])
        .await
        .expect("clicks");
    assert_eq!(clicks, vec![click("new", 100 * DAY)]);
    let convs = store
        .conversions(ConversionQuery {
            from_us: 0,
            to_us: 1000 * DAY,
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("conversions");
    assert_eq!(convs.rows.len(), 1);
    assert_eq!(convs.rows[0].id, "v-new");
    let attempts = store
        .attempts(AttemptQuery {
            from_us: 0,
            to_us: 1000 * DAY,
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("attempts");
    assert_eq!(attempts.rows.len(), 1);
    assert_eq!(attempts.rows[0].job.job_id, "j-new");
}

/// Every conversion filter, and newest-first paging.
async fn conversion_filters(store: &dyn AnalyticsStore) {
    let conversions = (0..12)
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
            c.subs[0] = format!("s1-{}", i % 3);
            c.subs[1] = format!("s2-{}", i % 4);
            c
        })
        .collect();
    store
        .insert(AnalyticsRows {
            conversions,
            ..Default::default()
        })
        .await
        .expect("insert");
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
    let mut subs: [Option<String>; 5] = Default::default();
    subs[0] = Some("s1-1".into());
    assert_eq!(
        count(ConversionQuery {
            subs,
            ..all.clone()
        })
        .await,
        4
    );
    let page = store
        .conversions(ConversionQuery {
            offset: 10,
            limit: 5,
            ..all.clone()
        })
        .await
        .expect("page");
    assert_eq!(page.total, 12);
    assert_eq!(
        page.rows.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec!["v01", "v00"]
    );
    // A later state of a conversion is found by the same filters, once, with that state.
    let mut declined = conversion("v03", "k3", 3, 103);
    (declined.action_id, declined.clickid, declined.updated_us) =
        ("act3".into(), "click1".into(), 500);
    declined.subs[0] = "s1-0".into();
    store
        .insert(AnalyticsRows {
            conversions: vec![declined],
            ..Default::default()
        })
        .await
        .expect("update");
    let found = store
        .conversions(ConversionQuery {
            action_id: Some("act3".into()),
            ..all.clone()
        })
        .await
        .expect("query");
    assert_eq!(found.total, 1);
    assert_eq!(
        (found.rows[0].id.as_str(), found.rows[0].status),
        ("v03", 3)
    );
    assert_eq!(
        count(ConversionQuery {
            clickid: Some("click1".into()),
            ..all
        })
        .await,
        2
    );
}

/// The attempt log: newest first, every filter.
async fn attempt_filters(store: &dyn AnalyticsStore) {
    let mut other = attempt_row("j3", 1, 120, 200);
    other.job.pid = 2;
    other.job.offer_id = 8;
    other.job.goal = "sale".into();
    other.job.status = 2;
    let rows = AnalyticsRows {
        attempts: vec![
            attempt_row("j1", 1, 130, 500),
            attempt_row("j2", 1, 131, 404),
            attempt_row("j1", 2, 140, 200),
            other,
        ],
        ..Default::default()
    };
    store.insert(rows).await.expect("insert");
    let all = AttemptQuery {
        from_us: 0,
        to_us: 1000,
        limit: 100,
        ..Default::default()
    };
    let page = store.attempts(all.clone()).await.expect("attempts");
    assert_eq!(page.total, 4);
    assert_eq!(
        page.rows
            .iter()
            .map(|r| (r.job.job_id.as_str(), r.attempt.attempt))
            .collect::<Vec<_>>(),
        vec![("j1", 2), ("j2", 1), ("j1", 1), ("j3", 1)],
        "newest first"
    );
    assert_eq!(page.rows[1].attempt.http_code, 404);
    assert_eq!(page.rows[1].attempt.error, "HTTP 404");
    assert_eq!(page.rows[1].job, job("j2", 1, 100));
    let n = |q: AttemptQuery| async move { store.attempts(q).await.expect("attempts").total };
    for (q, want) in [
        (
            AttemptQuery {
                http_code: Some(500),
                ..all.clone()
            },
            1,
        ),
        (
            AttemptQuery {
                partners: vec![2],
                ..all.clone()
            },
            1,
        ),
        (
            AttemptQuery {
                partners: vec![1, 2],
                ..all.clone()
            },
            4,
        ),
        (
            AttemptQuery {
                offers: vec![7],
                ..all.clone()
            },
            3,
        ),
        (
            AttemptQuery {
                goal: Some("INSTALL".into()),
                ..all.clone()
            },
            3,
        ),
        (
            AttemptQuery {
                status: Some(2),
                ..all.clone()
            },
            1,
        ),
        (
            AttemptQuery {
                job_id: Some("j1".into()),
                ..all.clone()
            },
            2,
        ),
        (
            AttemptQuery {
                from_us: 131,
                to_us: 140,
                ..all.clone()
            },
            1,
        ),
    ] {
        assert_eq!(n(q.clone()).await, want, "{q:?}");
    }
}

/// A snapshot from a first page pins the listing: rows written afterwards (newer ones, which
/// sort first) shift nothing, so paging on sees every row once and the same total; rows that
/// were there show their current values.
async fn snapshots_pin_a_growing_listing(store: &dyn AnalyticsStore) {
    let attempts = |from: usize, to: usize| {
        (from..to)
            .map(|i| {
                let id = format!("j{i:02}");
                attempt_row(&id, 1, 100 + i as i64, 500)
            })
            .collect::<Vec<_>>()
    };
    let first = AnalyticsRows {
        postbacks: (0..10)
            .map(|i| postback(&format!("p{i:02}"), 100 + i, "a=1", 1, true))
            .collect(),
        conversions: (0..10)
            .map(|i| conversion(&format!("v{i:02}"), &format!("k{i}"), 2, 100 + i))
            .collect(),
        attempts: attempts(0, 10),
        ..Default::default()
    };
    store.insert(first).await.expect("insert");
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
    let mut v03 = conversion("v03", "k3", 1, 103);
    v03.updated_us = 300;
    let more = AnalyticsRows {
        postbacks: (10..15)
            .map(|i| postback(&format!("p{i:02}"), 200 + i, "a=1", 1, true))
            .collect(),
        conversions: (10..15)
            .map(|i| conversion(&format!("v{i:02}"), &format!("k{i}"), 2, 200 + i))
            .chain([v03])
            .collect(),
        attempts: attempts(10, 15),
        ..Default::default()
    };
    store.insert(more).await.expect("insert");

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

/// `clear` leaves nothing to read.
async fn clear_forgets_every_row(store: &dyn AnalyticsStore) {
    let rows = AnalyticsRows {
        clicks: vec![click("c1", 10)],
        postbacks: vec![postback("p1", 20, "clickid=c1", 1, true)],
        conversions: vec![conversion("v1", "k1", 1, 20)],
        attempts: vec![attempt_row("j1", 1, 30, 200)],
        maybe_inserted: false,
    };
    store.insert(rows.clone()).await.expect("insert");
    store.clear().await.expect("clear");
    assert_eq!(
        store
            .server_postbacks(query(0, 100))
            .await
            .expect("query")
            .total,
        0
    );
    let summary = SummaryQuery {
        filters: query(0, 10 * crate::seams::HOUR_US),
        group_by: vec![],
    };
    assert!(store.summary(summary).await.expect("summary").is_empty());
    assert!(store
        .clicks(vec!["c1".into()])
        .await
        .expect("clicks")
        .is_empty());
    let convs = ConversionQuery {
        from_us: 0,
        to_us: 100,
        limit: 10,
        ..Default::default()
    };
    assert_eq!(
        store.conversions(convs).await.expect("conversions").total,
        0
    );
    let attempts = AttemptQuery {
        from_us: 0,
        to_us: 100,
        limit: 10,
        ..Default::default()
    };
    assert_eq!(
        store
            .attempts(attempts.clone())
            .await
            .expect("attempts")
            .total,
        0
    );
    // And it takes rows again.
    store.insert(rows).await.expect("insert");
    assert_eq!(store.attempts(attempts).await.expect("attempts").total, 1);
}

/// The summary counts the filtered log by group: postbacks, accepted and rejected ones,
/// conversions with their payouts and revenue; time goes by the UTC hour.
async fn summaries(store: &dyn AnalyticsStore) {
    const HOUR: i64 = crate::seams::HOUR_US;
    let row = |i: i64, at_us: i64, offer: u64, ok: bool, created: bool| {
        let mut r = postback(&format!("s{i:03}"), at_us, "goal=Sale", offer, ok);
        r.advertiser_id = format!("adv{}", offer % 2);
        r.pid = 2 + (i as u64 % 2);
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
        .insert(AnalyticsRows {
            postbacks: rows.clone(),
            ..Default::default()
        })
        .await
        .expect("insert");
    // The batch redone: nothing is counted twice.
    store
        .insert(AnalyticsRows {
            postbacks: rows,
            maybe_inserted: true,
            ..Default::default()
        })
        .await
        .expect("insert again");
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
    let by_partner = store
        .summary(q(vec![SummaryKey::Partner]))
        .await
        .expect("summary");
    assert_eq!(
        by_partner
            .iter()
            .map(|r| (r.pid, r.postbacks, r.conversions))
            .collect::<Vec<_>>(),
        vec![(Some(2), 3, 2), (Some(3), 3, 1)]
    );
    let one_partner = store
        .summary(SummaryQuery {
            filters: ServerPostbackQuery {
                partners: vec![3],
                ..query(0, 24 * HOUR)
            },
            group_by: vec![SummaryKey::Hour],
        })
        .await
        .expect("summary");
    assert_eq!(
        one_partner
            .iter()
            .map(|r| (r.hour_us, r.postbacks))
            .collect::<Vec<_>>(),
        vec![(Some(10 * HOUR), 1), (Some(11 * HOUR), 2)]
    );
}

/// A summary over a range whose ends are off the hour (a client's time zone of +05:30, say)
/// counts exactly the rows within it, whatever the filters.
async fn summaries_of_ranges_off_the_hour(store: &dyn AnalyticsStore) {
    const HOUR: i64 = crate::seams::HOUR_US;
    let at = [
        10 * HOUR,
        10 * HOUR + 5,
        11 * HOUR,
        12 * HOUR,
        12 * HOUR + 7,
        14 * HOUR + 1,
    ];
    let rows = at
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut r = postback(&format!("e{i:03}"), *t, "goal=Sale&promo=X", 1, i != 2);
            r.pid = 1 + i as u64 % 2;
            if i % 2 == 0 {
                (r.created, r.payouts, r.revenue) = (true, 1.5, 3.0);
            }
            r
        })
        .collect();
    insert_postbacks(store, rows).await;
    let summary = |from: i64, to: i64, search: Option<&str>, goal: Option<&str>| SummaryQuery {
        filters: ServerPostbackQuery {
            search: search.map(str::to_string),
            goal: goal.map(str::to_string),
            ..query(from, to)
        },
        group_by: vec![SummaryKey::Hour],
    };
    // [10:00 + 1 µs, 14:00 + 1 µs): whole hours 11 to 13, and the rows at both ends.
    let (from, to) = (10 * HOUR + 1, 14 * HOUR + 1);
    let expected = vec![
        (Some(10 * HOUR), 1, 1, 0),
        (Some(11 * HOUR), 1, 0, 1),
        (Some(12 * HOUR), 2, 2, 0),
    ];
    for (search, goal) in [(None, None), (None, Some("SALE")), (Some("promo=x"), None)] {
        let got: Vec<(Option<i64>, u64, u64, u64)> = store
            .summary(summary(from, to, search, goal))
            .await
            .expect("summary")
            .iter()
            .map(|r| (r.hour_us, r.postbacks, r.accepted, r.rejected))
            .collect();
        assert_eq!(got, expected, "search {search:?}, goal {goal:?}");
    }
    let total = store
        .summary(SummaryQuery {
            group_by: vec![],
            ..summary(from, to, None, None)
        })
        .await
        .expect("summary");
    assert_eq!(total.len(), 1);
    assert_eq!(
        (total[0].postbacks, total[0].conversions, total[0].payouts),
        (4, 2, 3.0),
        "of the created rows at 10:00, 11:00 and 12:07, the last two are within"
    );
    // By partner (1: the rows at 11:00 and 12:07; 2: 10:05 and 12:00), and one partner alone.
    let by_partner: Vec<(Option<u64>, u64)> = store
        .summary(SummaryQuery {
            group_by: vec![SummaryKey::Partner],
            ..summary(from, to, None, None)
        })
        .await
        .expect("summary")
        .iter()
        .map(|r| (r.pid, r.postbacks))
        .collect();
    assert_eq!(by_partner, vec![(Some(1), 2), (Some(2), 2)]);
    let partner_two: Vec<(Option<i64>, u64)> = store
        .summary(SummaryQuery {
            filters: ServerPostbackQuery {
                partners: vec![2],
                ..query(from, to)
            },
            group_by: vec![SummaryKey::Hour],
        })
        .await
        .expect("summary")
        .iter()
        .map(|r| (r.hour_us, r.postbacks))
        .collect();
    assert_eq!(
        partner_two,
        vec![(Some(10 * HOUR), 1), (Some(12 * HOUR), 1)]
    );
    let none = store
        .summary(summary(13 * HOUR, 14 * HOUR, None, None))
        .await
        .expect("summary");
    assert!(none.is_empty(), "{none:?}");
}

/// Committing again changes nothing; positions are kept per consumer and partition; a later
/// conversion state replaces the earlier one.
async fn commits_are_idempotent_and_move_the_position(store: &dyn StateStore) {
    assert_eq!(store.position("p", 0).await.expect("position"), 0);
    let state = StateChanges {
        clicks: vec![click("c1", 10)],
        conversions: vec![conversion("v1", "k1", 2, 20)],
    };
    store
        .commit("p", state.clone(), upto(7))
        .await
        .expect("commit");
    store.commit("p", state, upto(7)).await.expect("recommit");
    assert_eq!(store.position("p", 0).await.expect("position"), 7);
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
        .commit("p", StateChanges::default(), spread)
        .await
        .expect("commit");
    assert_eq!(store.position("p", 3).await.expect("position"), 40);
    assert_eq!(store.position("p", 5).await.expect("position"), 2);
    assert_eq!(store.position("p", 0).await.expect("position"), 7, "kept");
    assert_eq!(store.position("p", 1).await.expect("position"), 0);
    assert_eq!(
        store.position("q", 3).await.expect("position"),
        0,
        "per consumer"
    );
    let lookups = store
        .lookup(
            vec!["c1".into(), "zz".into()],
            vec!["k1".into(), "k9".into()],
        )
        .await
        .expect("lookup");
    assert_eq!(lookups.clicks.len(), 1);
    assert_eq!(lookups.clicks["c1"], click("c1", 10));
    assert_eq!(lookups.conversions.len(), 1);
    assert_eq!(lookups.conversions["k1"], conversion("v1", "k1", 2, 20));
    // States of one batch in order: the last one is kept.
    let mut approved = conversion("v1", "k1", 1, 20);
    approved.updated_us = 30;
    approved.comment = "ok".into();
    let mut other = conversion("v2", "k2", 2, 25);
    other.clickid = "c2".into();
    store
        .commit(
            "p",
            StateChanges {
                clicks: vec![],
                conversions: vec![other.clone(), approved.clone()],
            },
            upto(8),
        )
        .await
        .expect("commit");
    let lookups = store
        .lookup(vec![], vec!["k1".into(), "k2".into()])
        .await
        .expect("lookup");
    assert_eq!(lookups.conversions["k1"], approved);
    assert_eq!(lookups.conversions["k2"], other);
}

/// Expiry forgets clicks and conversions older than the cut.
async fn expiry_forgets_old_state(store: &dyn StateStore) {
    let state = StateChanges {
        clicks: vec![click("old", 0), click("new", 100 * DAY)],
        conversions: vec![
            conversion("v-old", "k-old", 1, DAY),
            conversion("v-new", "k-new", 1, 100 * DAY),
        ],
    };
    store.commit("p", state, upto(4)).await.expect("commit");
    assert_eq!(store.expire(10 * DAY).await.expect("expire"), 2);
    let lookups = store
        .lookup(
            vec!["old".into(), "new".into()],
            vec!["k-old".into(), "k-new".into()],
        )
        .await
        .expect("lookup");
    assert_eq!(lookups.clicks.keys().collect::<Vec<_>>(), vec!["new"]);
    assert_eq!(
        lookups.conversions.keys().collect::<Vec<_>>(),
        vec!["k-new"]
    );
    assert_eq!(store.position("p", 0).await.expect("position"), 4);
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

/// An attempt of job `id` (of partner 1) as the attempt log keeps it.
fn attempt_row(id: &str, n: u32, at_us: i64, code: u16) -> AttemptRow {
    let DeliveryRecord::Attempt(attempt) = attempt(
        id,
        n,
        at_us,
        code,
        if code == 200 {
            JobStatus::Delivered
        } else {
            JobStatus::Pending
        },
        None,
    ) else {
        unreachable!("attempt() makes attempts")
    };
    AttemptRow {
        job: job(id, 1, 100),
        attempt,
    }
}

/// Due jobs of every host, as one call gives them.
async fn due_now(store: &dyn DeliveryQueue, now_us: i64) -> Vec<crate::delivery::JobState> {
    due_in(store, now_us, None).await
}

/// Due jobs of every host in some partitions (`None`: all), as one call gives them.
async fn due_in(
    store: &dyn DeliveryQueue,
    now_us: i64,
    partitions: Option<Vec<Partition>>,
) -> Vec<crate::delivery::JobState> {
    store
        .due_jobs(DueQuery {
            now_us,
            per_host: 10,
            after_host: String::new(),
            limit: 100,
            max_hosts: 100,
            partitions,
        })
        .await
        .expect("due")
        .jobs
}

/// A job belongs to the partition it came from; due jobs can be asked for some partitions
/// (a dispatcher's, in a cluster), and positions are kept per partition.
async fn due_jobs_of_some_partitions(store: &dyn DeliveryQueue) {
    for (p, ids) in [(0, ["a", "b"]), (2, ["c", "d"])] {
        let records = ids
            .iter()
            .map(|id| DeliveryRecord::Job(job(id, 1, 100)))
            .collect();
        store
            .apply_deliveries(
                "d",
                records,
                Position {
                    partition: p,
                    offset: 2,
                },
            )
            .await
            .expect("apply");
    }
    // A job seen again from another partition stays where it came from first.
    store
        .apply_deliveries(
            "d",
            vec![DeliveryRecord::Job(job("a", 1, 100))],
            Position {
                partition: 1,
                offset: 1,
            },
        )
        .await
        .expect("apply");
    let ids = |jobs: Vec<crate::delivery::JobState>| {
        let mut ids: Vec<String> = jobs.into_iter().map(|j| j.job.job_id).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(due_in(store, 1_000, None).await), ["a", "b", "c", "d"]);
    assert_eq!(ids(due_in(store, 1_000, Some(vec![2])).await), ["c", "d"]);
    assert_eq!(
        ids(due_in(store, 1_000, Some(vec![0, 1])).await),
        ["a", "b"]
    );
    assert!(due_in(store, 1_000, Some(vec![])).await.is_empty());
    for (p, at) in [(0, 2), (1, 1), (2, 2), (3, 0)] {
        assert_eq!(store.position("d", p).await.expect("position"), at);
    }
}

/// Due jobs are taken fairly: at most `per_host` of each host's soonest, hosts in turn after
/// the last one visited, so a host with many due jobs cannot crowd out another.
async fn due_jobs_are_fair_across_hosts(store: &dyn DeliveryQueue) {
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
        .apply_deliveries("d", records, next_at(53))
        .await
        .expect("apply");
    let query = |after: &str, limit: usize, max_hosts: usize| DueQuery {
        now_us: 1_000,
        per_host: 3,
        after_host: after.into(),
        limit,
        max_hosts,
        partitions: None,
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

/// Jobs, attempts and re-sends: state, due times, idempotence, expiry.
async fn deliveries(store: &dyn DeliveryQueue) {
    let records = vec![
        DeliveryRecord::Job(job("j1", 1, 100)),
        DeliveryRecord::Job(job("j2", 1, 110)),
        DeliveryRecord::Job(job("j3", 2, 120)),
        DeliveryRecord::Job(job("j1", 1, 100)), // a redone batch
        attempt("j1", 1, 130, 500, JobStatus::Pending, Some(200)),
        attempt("j2", 1, 131, 404, JobStatus::Failed, None),
    ];
    store
        .apply_deliveries("d", records.clone(), next_at(6))
        .await
        .expect("apply");
    store
        .apply_deliveries("d", records, next_at(6))
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
            next_at(7),
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
            next_at(8),
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
    // An attempt seen again after a later one changes nothing.
    store
        .apply_deliveries(
            "d",
            vec![attempt("j2", 1, 131, 404, JobStatus::Failed, None)],
            next_at(9),
        )
        .await
        .expect("apply");
    let j2 = store.jobs(vec!["j2".into()]).await.expect("jobs");
    assert_eq!((j2[0].status, j2[0].attempts), (JobStatus::Delivered, 2));
    assert_eq!(store.expire(115).await.expect("expire"), 2, "j1 and j2");
    let left = store
        .jobs(vec!["j1".into(), "j2".into(), "j3".into()])
        .await
        .expect("jobs");
    assert_eq!(left.len(), 1);
}
