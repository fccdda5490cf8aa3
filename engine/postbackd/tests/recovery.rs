//! Failures heal without a restart: a log whose disk fails answers 503 (never a 200 and a
//! loss), says so on `/ready`, recovers by itself once the disk does, and never stores what it
//! refused; a stalled disk answers within a deadline; a dispatcher that cannot record an
//! attempt waits instead of sending it again.

mod common;

use common::affiliate::Affiliate;
use common::{offer_and_click, today, Api, KEY};
use postbackd::embedded_log::Faults;
use postbackd::engine::InjectedFaults;
use postbackd::{Config, Server};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn start(
    dir: &std::path::Path,
    faults: InjectedFaults,
    tweak: impl FnOnce(&mut Config),
) -> Server {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        api_key: KEY.into(),
        ..Config::default()
    };
    tweak(&mut config);
    Server::start_with(config, None, faults)
        .await
        .expect("starts")
}

/// The status and body of a postback that may be refused.
async fn try_postback(api: &Api, query: &str) -> (u16, serde_json::Value) {
    let r = api
        .http
        .get(format!("{}/postback?{query}", api.base))
        .send()
        .await
        .expect("postback");
    (r.status().as_u16(), r.json().await.expect("json"))
}

async fn ready(api: &Api) -> (u16, String) {
    let r = api
        .http
        .get(format!("{}/ready", api.base))
        .send()
        .await
        .expect("ready");
    (r.status().as_u16(), r.text().await.expect("text"))
}

async fn until_ready(api: &Api) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready(api).await.0 != 200 {
        assert!(Instant::now() < deadline, "did not recover by itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The action ids of the server-postback log, once it holds `n` rows.
async fn logged_actions(api: &Api, n: u64) -> BTreeSet<String> {
    let body = api.wait_for_postbacks(n).await;
    body["postbacks"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["action_id"].as_str().expect("action id").to_string())
        .collect()
}

fn actions(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_answers_503_heals_by_itself_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(Faults::default());
    let server = start(
        dir.path(),
        InjectedFaults {
            events: Some(faults.clone()),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let api = Api::new(server.addr());
    let click = offer_and_click(&api).await;
    api.postback(&format!("clickid={click}&action_id=before"))
        .await;

    for (fault, name) in [
        (&faults.fail_syncs, "fsync"),
        (&faults.fail_writes, "write"),
    ] {
        fault.store(true, Ordering::Release);
        let (code, body) =
            try_postback(&api, &format!("clickid={click}&action_id=lost-{name}")).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["status"], 2);
        let message = body["message"].as_str().expect("message");
        assert!(
            !message.contains("os error"),
            "no OS detail for clients: {message}"
        );
        let (code, why) = ready(&api).await;
        assert_eq!(code, 503);
        assert!(why.contains("event log"), "{why}");
        fault.store(false, Ordering::Release);
        // No request is needed to heal: readiness comes back by itself.
        until_ready(&api).await;
        api.postback(&format!("clickid={click}&action_id=after-{name}"))
            .await;
    }
    assert_eq!(
        logged_actions(&api, 3).await,
        actions(&["before", "after-fsync", "after-write"]),
        "what was refused never appears"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_gets_a_deadline_and_stores_nothing_it_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(Faults::default());
    let server = start(
        dir.path(),
        InjectedFaults {
            events: Some(faults.clone()),
            ..Default::default()
        },
        |c| c.append_timeout_ms = 300,
    )
    .await;
    let api = Api::new(server.addr());
    let click = offer_and_click(&api).await;
    api.postback(&format!("clickid={click}&action_id=before"))
        .await;
    faults.stall_syncs_ms.store(3_000, Ordering::Release);
    let (code, body) = try_postback(&api, &format!("clickid={click}&action_id=stalled")).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        faults.stalling.load(Ordering::Acquire),
        "answered while the disk was still stalled"
    );
    faults.stall_syncs_ms.store(0, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _) = try_postback(&api, &format!("clickid={click}&action_id=after")).await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 503);
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        logged_actions(&api, 2).await,
        actions(&["before", "after"]),
        "the stalled postback was refused, so it is not stored"
    );
    server.shutdown().await;
}

/// An engine whose deliveries log's disk the test controls, with an offer, a partner, a click
/// and a postback setting of the partner to `path` on a test affiliate.
struct WithAffiliate {
    server: Server,
    faults: Arc<Faults>,
    api: Api,
    aff: Affiliate,
    click: String,
}

async fn with_affiliate(
    dir: &std::path::Path,
    path: &str,
    tweak: impl FnOnce(&mut Config),
) -> WithAffiliate {
    let faults = Arc::new(Faults::default());
    let server = start(
        dir,
        InjectedFaults {
            deliveries: Some(faults.clone()),
            ..Default::default()
        },
        |c| {
            c.allow_private_postback_targets = true;
            tweak(c);
        },
    )
    .await;
    let api = Api::new(server.addr());
    let aff = Affiliate::start().await;
    let click = offer_and_click(&api).await;
    api.admin_post(
        "/3.0/partner/postback",
        &[("partner_id", "1"), ("url", &aff.url(path))],
    )
    .await;
    WithAffiliate {
        server,
        faults,
        api,
        aff,
        click,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_that_cannot_record_an_attempt_does_not_send_it_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let WithAffiliate {
        server,
        faults,
        api,
        aff,
        click,
    } = with_affiliate(dir.path(), "/slow?t={transactionid}", |c| {
        c.delivery_base_delay_ms = 100;
    })
    .await;
    api.postback(&format!("clickid={click}&action_id=A")).await;
    // The affiliate takes a second to answer; meanwhile the deliveries log fails.
    let deadline = Instant::now() + Duration::from_secs(20);
    while aff.count("/slow", "t=A") == 0 {
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    faults.fail_syncs.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        aff.count("/slow", "t=A"),
        1,
        "not sent again while its outcome could not be recorded"
    );
    faults.fail_syncs.store(false, Ordering::Release);
    let d = today();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = api
            .get_json(&format!(
                "/3.0/stats/affiliatepostbacks?date_from={d}&date_to={d}"
            ))
            .await;
        if body["postbacks"][0]["state"] == "delivered" {
            assert_eq!(body["pagination"]["total_count"], 1, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the attempt was never recorded: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(aff.count("/slow", "t=A"), 1);
    server.shutdown().await;
}

/// The processor judges a batch while the one before is still being written. What the next
/// batch needs of it is normally in memory; with a cache too small to hold it, the next batch
/// must wait for the write, or a duplicate judged meanwhile would register a second conversion.
/// Here the write is held up for 1.5 s by a stalled deliveries log (the affiliate postback of
/// the conversion goes there first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_judged_while_the_last_is_written_finds_what_memory_could_not_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let WithAffiliate {
        server,
        faults,
        api,
        click,
        ..
    } = with_affiliate(dir.path(), "/p?t={transactionid}", |c| {
        // One record a batch, and no click or conversion small enough to be held.
        c.processor_batch = 1;
        c.processor_cache_bytes = 64;
    })
    .await;
    faults.stall_syncs_ms.store(1500, Ordering::Release);
    api.postback(&format!("clickid={click}&action_id=A")).await;
    api.postback(&format!("clickid={click}&action_id=A")).await;
    let body = api.wait_for_postbacks(2).await;
    faults.stall_syncs_ms.store(0, Ordering::Release);
    let mut errors: Vec<&str> = body["postbacks"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["error"].as_str().unwrap_or("?"))
        .collect();
    errors.sort();
    assert_eq!(errors, vec!["", "Conversion exists"], "{body}");
    let d = today();
    let (_, conversions) = api
        .get_json(&format!("/3.0/stats/conversions?date_from={d}&date_to={d}"))
        .await;
    assert_eq!(
        conversions["pagination"]["total_count"], 1,
        "one conversion: {conversions}"
    );
    server.shutdown().await;
}
