//! The whole flow over real HTTP, against the server on port 0: entities, clicks, every rule
//! of CONTRACT section 3, and the JSON types of the stats records.

mod common;

use common::{today, Api, KEY};
use postbackd::{Config, Server};
use serde_json::Value;

async fn start(dir: &std::path::Path, platform_secure: &str) -> Server {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        log: common::test_log(dir),
        partitions: common::test_partitions(),
        store: common::test_store(dir),
        migrate: true,
        api_key: KEY.into(),
        platform_secure: platform_secure.into(),
        ..Config::default()
    };
    Server::start(config, None).await.expect("starts")
}

/// The row of the server-postback log whose `_get` or `_post` has `key=value`.
fn row<'a>(rows: &'a [Value], key: &str, value: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["_get"][key] == value || r["_post"][key] == value)
        .unwrap_or_else(|| panic!("no postback with {key}={value}"))
}

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), "").await;
    let api = Api::new(server.addr());

    // Entities.
    let adv = api
        .admin_post(
            "/3.0/admin/advertiser",
            &[
                ("title", "Acme"),
                ("secure", "advsec"),
                ("allowed_ip", "127.0.0.0/8, ::1"),
            ],
        )
        .await;
    let adv_id = adv["advertiser"]["id"].as_str().expect("id").to_string();
    assert_eq!(adv_id.len(), 24);
    let offer = |title: &'static str, extra: Vec<(&'static str, &'static str)>| {
        let api = api.clone();
        async move {
            let mut form = vec![
                ("title", title),
                (
                    "url",
                    "https://shop.example/land?clickid={clickid}&s1={sub1}&o={offer_id}&p={pid}",
                ),
                ("payments[0][total]", "2"),
                ("payments[0][revenue]", "3"),
                ("payments[1][goal]", "Install"),
                ("payments[1][total]", "10"),
                ("payments[1][revenue]", "20"),
                ("payments[1][type]", "percent"),
                ("payments[1][status]", "2"),
                ("payments[1][currency]", "eur"),
            ];
            form.extend(extra);
            let body = api.admin_post("/3.0/admin/offer", &form).await;
            body["offer"]["id"].as_u64().expect("int id")
        }
    };
    let secured = api
        .admin_post(
            "/3.0/admin/offer",
            &[
                ("title", "Secured"),
                ("advertiser", &adv_id),
                ("url", "https://x.example/?clickid={clickid}"),
            ],
        )
        .await["offer"]["id"]
        .as_u64()
        .expect("id");
    let open = offer("Open", vec![]).await;
    let paused = offer("Paused", vec![]).await;
    let walled = offer("Walled", vec![("allowed_ip", "10.0.0.0/8")]).await;
    let stopped = offer("Stopped", vec![("status", "stopped")]).await;
    let partner = api
        .admin_post(
            "/3.0/admin/partner",
            &[("email", "aff@example.com"), ("login", "aff")],
        )
        .await;
    assert!(is_int(&partner["partner"]["id"]));
    let (_, offers) = api.get_json("/3.0/offers").await;
    assert_eq!(offers["pagination"]["total_count"], 5);
    assert_eq!(offers["offers"][1]["payments"][1]["currency"], "EUR");

    // Clicks: redirect with macros filled, cookies set; stopped and unknown offers are 404.
    let r = api
        .http
        .get(format!(
            "{}/click?offer_id={open}&pid=1&sub1=a%20b",
            api.base
        ))
        .send()
        .await
        .expect("click");
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().expect("ascii").to_string();
    assert!(
        location.contains(&format!("&s1=a%20b&o={open}&p=1")),
        "{location}"
    );
    let cookies: Vec<&str> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect();
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with(&format!("pbk_{open}="))),
        "{cookies:?}"
    );
    for bad in [
        format!("offer_id={stopped}&pid=1"),
        "offer_id=999&pid=1".to_string(),
        "pid=1".to_string(),
    ] {
        let r = api
            .http
            .get(format!("{}/click?{bad}", api.base))
            .send()
            .await
            .expect("click");
        assert_eq!(r.status(), 404, "{bad}");
    }
    let c_open = api.click(open, 1, "&sub1=s-one").await;
    let c_secured = api.click(secured, 1, "").await;
    let c_paused = api.click(paused, 1, "").await;
    let c_walled = api.click(walled, 1, "").await;
    api.admin_post(
        &format!("/3.0/admin/offer/{paused}"),
        &[("status", "paused")],
    )
    .await;

    // One postback per rule, in the contract's order.
    let sent = [
        format!("clickid={c_secured}&n=no-secure"),
        format!("clickid={c_secured}&secure=wrong&n=wrong-secure"),
        format!("clickid={c_secured}&secure=advsec&n=secure-ok&goal=1"),
        format!("clickid={c_walled}&n=walled"),
        "n=no-clickid".to_string(),
        "clickid=abc123&n=broken".to_string(),
        "click_id=5f0000007e28fee0558b4567&n=unknown".to_string(),
        format!("clickid={c_paused}&n=paused"),
        format!("clickid={c_open}&goal=purchase&n=goal"),
        format!("clickid={c_open}&n=default"),
        format!("clickid={c_open}&n=dup"),
        format!("clickid={c_open}&goal=INSTALL&sum=50&action_id=A1&n=pending"),
        format!("clickid={c_open}&goal=install&action_id=A1&status=1&n=update&comment=ok"),
        format!("clickid={c_open}&goal=install&action_id=A1&status=3&n=settled"),
        format!("clickid={c_open}&goal=install&action_id=A1&status=1&n=same"),
        format!("clickid={c_open}&status=4&action_id=A9&n=bad-status"),
    ];
    for q in &sent {
        assert_eq!(
            api.postback(q).await,
            serde_json::json!({"status": 1}),
            "{q}"
        );
    }
    // A POST with a form body, one with a JSON body, and a pixel that finds its click by cookie.
    let r = api
        .http
        .post(format!("{}/postback", api.base))
        .form(&[
            ("clickid", c_open.as_str()),
            ("action_id", "F1"),
            ("n", "form"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let r = api
        .http
        .post(format!("{}/postback?n=json", api.base))
        .json(&serde_json::json!({"click_id": c_open, "action_id": "J1", "sum": 7}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let r = api
        .http
        .get(format!(
            "{}/success.jpg?offer_id={open}&afgoal=install&afid=PX1&afprice=30&n=pixel",
            api.base
        ))
        .header("cookie", format!("pbk_{open}={c_open}"))
        .header("referer", "https://shop.example/thanks")
        .send()
        .await
        .expect("pixel");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/gif");

    let total = sent.len() as u64 + 3;
    let body = api.wait_for_postbacks(total).await;
    let rows = body["postbacks"].as_array().expect("array");
    let outcome = |n: &str| {
        let r = row(rows, "n", n);
        (
            r["response_status"].as_u64().expect("int"),
            r["error"].as_str().expect("str").to_string(),
        )
    };
    let expect = [
        ("no-secure", 2, "Access denied"),
        ("wrong-secure", 2, "Access denied"),
        ("secure-ok", 1, ""),
        ("walled", 2, "Current IP-address is denied"),
        (
            "no-clickid",
            2,
            "Missing mandatory parameter clickid/click_id",
        ),
        ("broken", 2, "Broken clickid"),
        ("unknown", 2, "Click not found"),
        ("paused", 2, "Offer disabled"),
        ("goal", 2, "Goal not found"),
        ("default", 1, ""),
        ("dup", 2, "Conversion exists"),
        ("pending", 1, ""),
        ("update", 1, ""),
        ("settled", 2, "Conversion status is not pending"),
        ("same", 2, "Conversion exists"),
        ("bad-status", 2, "Invalid status"),
        ("form", 1, ""),
        ("json", 1, ""),
    ];
    for (n, status, error) in expect {
        assert_eq!(outcome(n), (status, error.to_string()), "postback n={n}");
    }
    // Why: each postback's explanation, rule by rule up to the one that decided.
    let explain = |n: &str| {
        let id = row(rows, "n", n)["_id"]["$id"]
            .as_str()
            .expect("id")
            .to_string();
        let api = api.clone();
        async move {
            let (code, body) = api
                .get_json(&format!("/3.0/stats/serverpostbacks/{id}/explanation"))
                .await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["matches_log"], true, "{body}");
            body
        }
    };
    let default_conversion = row(rows, "n", "default")["conversion_id"].clone();
    let why = [
        (
            "no-secure",
            "secure_code",
            false,
            "the advertiser has a secure code, and no secure code was passed",
        ),
        (
            "wrong-secure",
            "secure_code",
            false,
            "the secure code passed (5 characters) is not it",
        ),
        ("secure-ok", "dedupe", true, "this postback created"),
        (
            "walled",
            "ip_allow_list",
            false,
            "is not in the offer's allow-list: 10.0.0.0/8",
        ),
        (
            "no-clickid",
            "click_id",
            false,
            "neither clickid nor click_id was passed",
        ),
        ("broken", "click_id", false, "\"abc123\" is not a click id"),
        (
            "unknown",
            "click",
            false,
            "no click 5f0000007e28fee0558b4567 is stored",
        ),
        (
            "paused",
            "offer",
            false,
            "was paused at the postback's time",
        ),
        (
            "goal",
            "goal",
            false,
            "goal \"purchase\" is not one the offer pays for; it pays for \"1\", \"Install\"",
        ),
        (
            "dup",
            "dedupe",
            false,
            "existed, and the postback passed no other status",
        ),
        (
            "update",
            "dedupe",
            true,
            "was pending: this postback changed its status",
        ),
        ("settled", "dedupe", false, "had left pending"),
        (
            "bad-status",
            "status",
            false,
            "status \"4\" is none of 1 (confirmed)",
        ),
    ];
    for (n, rule, passed, detail) in why {
        let body = explain(n).await;
        let checks = body["checks"].as_array().expect("checks");
        let last = checks.last().expect("a check");
        assert_eq!(
            (last["rule"].as_str(), last["passed"].as_bool()),
            (Some(rule), Some(passed)),
            "n={n}: {body}"
        );
        assert!(
            last["detail"].as_str().is_some_and(|d| d.contains(detail)),
            "n={n}: {body}"
        );
        assert!(
            checks[..checks.len() - 1]
                .iter()
                .all(|c| c["passed"] == true),
            "n={n}: {body}"
        );
        assert!(
            !body["checks"].to_string().contains("advsec"),
            "a secure code is never shown: {body}"
        );
    }
    let dup = explain("dup").await;
    let dedupe = dup["checks"]
        .as_array()
        .and_then(|c| c.last())
        .expect("dedupe");
    assert_eq!(dedupe["conversion_id"], default_conversion, "{dup}");
    for missing in ["000000000000000000000000", "not-an-id"] {
        let (code, _) = api
            .get_json(&format!("/3.0/stats/serverpostbacks/{missing}/explanation"))
            .await;
        assert_eq!(code, 404, "{missing}");
    }

    let r = row(rows, "n", "broken");
    assert_eq!(r["response"], r#"{"status":2,"message":"Broken clickid"}"#);
    assert_eq!(row(rows, "n", "default")["response"], r#"{"status":1}"#);

    // JSON types of a matched record, as the Go SDK decodes them.
    let r = row(rows, "n", "pending");
    assert!(r["_id"]["$id"].as_str().is_some_and(|s| s.len() == 24));
    assert_eq!(r["_get"]["goal"], "INSTALL");
    assert_eq!(r["_post"], serde_json::json!([]));
    assert!(r["get"]
        .as_str()
        .expect("get is a string")
        .contains("\"action_id\":\"A1\""));
    assert_eq!(r["post"], "[]");
    assert!(is_int(&r["date"]["sec"]) && is_int(&r["date"]["usec"]));
    assert_eq!(r["server"], "127.0.0.1");
    assert_eq!(r["clickid"], c_open.as_str());
    assert_eq!(r["action_id"], "A1");
    assert_eq!(r["goal"], "INSTALL");
    assert_eq!(r["status"], 0, "no status passed");
    assert_eq!(r["offer_id"], open);
    assert_eq!(r["pid"], 1);
    assert!(
        r["delta"].as_i64().is_some_and(|d| d >= 0),
        "delta: {}",
        r["delta"]
    );
    assert_eq!(r["response_status"], 1);
    assert!(r["conversion_id"].as_str().is_some_and(|s| s.len() == 24));
    let track = &r["track"];
    assert_eq!(track["click_id"], c_open.as_str());
    assert_eq!(track["offer_id"], open.to_string());
    assert_eq!(track["offer"]["id"], open);
    assert_eq!(track["offer"]["title"], "Open");
    assert_eq!(track["partner"]["id"], "1");
    assert_eq!(track["partner"]["login"], "aff");
    assert_eq!(track["sub1"], "s-one");
    assert!(track["created_at"].as_str().is_some_and(|s| s.len() == 19));
    let no_click = row(rows, "n", "unknown");
    assert!(no_click["track"].is_null());
    assert!(no_click["delta"].is_null());
    assert_eq!(no_click["offer_id"], 0);
    assert_eq!(row(rows, "n", "update")["status"], 1);
    let form = row(rows, "n", "form");
    assert_eq!(form["_post"]["action_id"], "F1");
    assert!(form["post"].as_str().expect("string").contains("F1"));
    let json_pb = row(rows, "n", "json");
    assert_eq!(json_pb["_post"]["sum"], "7");
    let pixel = row(rows, "n", "pixel");
    assert_eq!(pixel["_get"]["pixel"], "1");
    assert_eq!(pixel["_get"]["source"], "https://shop.example/thanks");
    assert_eq!(pixel["response_status"], 1);
    assert_eq!(pixel["clickid"], c_open.as_str(), "the cookie's click id");

    // Filters of the log.
    let d = today();
    let log = |filter: String| {
        let api = api.clone();
        let d = d.clone();
        async move {
            let (code, body) = api
                .get_json(&format!(
                    "/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&{filter}"
                ))
                .await;
            assert_eq!(code, 200, "{filter}: {body}");
            body["pagination"]["total_count"].as_u64().expect("count")
        }
    };
    assert_eq!(log("response_status=2".into()).await, 12);
    assert_eq!(log("response_status=1".into()).await, total - 12);
    assert_eq!(
        log("goal=install".into()).await,
        5,
        "as passed (afgoal for the pixel), without case"
    );
    assert_eq!(log("status=1".into()).await, 2, "only passed statuses");
    assert_eq!(log("action_id=A1".into()).await, 4);
    assert_eq!(log(format!("click_id={c_secured}")).await, 3);
    assert_eq!(log(format!("offer[]={walled}&offer[]={paused}")).await, 2);
    assert_eq!(log(format!("supplier={adv_id}")).await, 3);
    assert_eq!(log("partner=1".into()).await, total - 3);
    assert_eq!(log("search=wrong-sec".into()).await, 1);
    assert_eq!(
        log("search=ACTION_ID%3DA".into()).await,
        5,
        "keys and values, without case"
    );
    assert_eq!(
        log("limit=2&page=2".into()).await,
        total,
        "paging keeps the total"
    );
    let (_, page) = api
        .get_json(&format!(
            "/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&limit=2&page=2"
        ))
        .await;
    assert_eq!(page["postbacks"].as_array().expect("rows").len(), 2);
    assert_eq!(page["pagination"]["per_page"], 2);
    assert_eq!(page["pagination"]["page"], 2);
    let dmy = format!("{}-{}-{}", &d[8..10], &d[5..7], &d[0..4]);
    let (code, body) = api
        .get_json(&format!(
            "/3.0/stats/serverpostbacks?date_from={dmy}&date_to={dmy}&limit=1"
        ))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        body["pagination"]["total_count"], total,
        "DD-MM-YYYY dates too"
    );

    // Conversions.
    let (code, body) = api.get_json("/3.0/stats/conversions?limit=500").await;
    assert_eq!(code, 200, "{body}");
    let convs = body["conversions"].as_array().expect("conversions");
    assert_eq!(
        convs.len(),
        6,
        "secure-ok, default, A1, F1, J1, PX1: {body}"
    );
    let by_action = |a: &str| {
        convs
            .iter()
            .find(|c| c["action_id"] == a)
            .unwrap_or_else(|| panic!("conversion {a}"))
            .clone()
    };
    let default = by_action(&c_open);
    assert_eq!(default["status"], "confirmed");
    assert_eq!(default["goal"], "1");
    assert_eq!(default["payouts"], 2.0);
    assert_eq!(default["revenue"], 3.0);
    assert_eq!(default["earnings"], 1.0);
    assert_eq!(default["currency"], "USD");
    assert_eq!(default["sub1"], "s-one");
    assert_eq!(default["offer_id"], open);
    assert_eq!(default["partner_id"], 1);
    assert_eq!(default["partner"]["id"], 1);
    assert_eq!(default["offer"]["title"], "Open");
    assert_eq!(default["custom_field_1"], "");
    assert!(default["created_at"]
        .as_str()
        .is_some_and(|s| s.len() == 19));
    assert!(default["click_time"]
        .as_str()
        .is_some_and(|s| s.len() == 19));
    assert!(default["updatedAt"].as_str().is_some_and(|s| s.len() == 19));
    let a1 = by_action("A1");
    assert_eq!(
        a1["status"], "confirmed",
        "the pending conversion took status 1"
    );
    assert_eq!(a1["goal"], "Install");
    assert_eq!(a1["sum"], 50.0);
    assert_eq!(a1["payouts"], 5.0, "10% of 50");
    assert_eq!(a1["revenue"], 10.0);
    assert_eq!(a1["currency"], "EUR");
    assert_eq!(a1["comment"], "ok");
    let px = by_action("PX1");
    assert_eq!(
        px["status"], "pending",
        "the Install payment's default status"
    );
    assert_eq!(px["payouts"], 3.0);
    let secured_conv = by_action(&c_secured);
    assert_eq!(secured_conv["advertiser"]["title"], "Acme");
    assert_eq!(secured_conv["supplier_id"], adv_id.as_str());
    assert!(body["pagination"]["next_page"].is_null());
    let count = |filter: &'static str| {
        let api = api.clone();
        async move {
            let (code, body) = api
                .get_json(&format!("/3.0/stats/conversions?{filter}"))
                .await;
            assert_eq!(code, 200, "{filter}: {body}");
            body["pagination"]["total_count"].as_u64().expect("count")
        }
    };
    assert_eq!(count("status=2").await, 1);
    assert_eq!(count("status[]=1&status[]=2").await, 6);
    assert_eq!(count("goal=INSTALL").await, 2);
    assert_eq!(count("subid1=s-one").await, 5);
    assert_eq!(count("action_id=J1").await, 1);
    let (_, paged) = api.get_json("/3.0/stats/conversions?limit=2").await;
    assert_eq!(paged["pagination"]["next_page"], 2);

    // Errors of the API.
    let r = api
        .http
        .get(format!("{}/3.0/offers", api.base))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        body,
        serde_json::json!({"status": 2, "message": "Token is necessary", "error": "Token is necessary"})
    );
    let r = api
        .http
        .get(format!("{}/3.0/offers", api.base))
        .header("API-Key", "nope")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403);
    let r = api
        .http
        .get(format!("{}/3.0/offers?api-key={KEY}", api.base))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200, "the key as a query parameter");
    let (code, body) = api.get_json("/3.0/offer/999").await;
    assert_eq!(
        (code, body["message"].as_str()),
        (404, Some("Resource Not Found"))
    );
    let (code, body) = api
        .get_json("/3.0/stats/serverpostbacks?date_to=2026-01-01")
        .await;
    assert_eq!(code, 400);
    assert!(body["message"]
        .as_str()
        .expect("message")
        .contains("date_from"));
    let (code, body) = api
        .get_json(&format!(
            "/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&offer=x"
        ))
        .await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().expect("error").contains("offer"));
    let r = api
        .http
        .post(format!("{}/3.0/admin/offer", api.base))
        .header("API-Key", KEY)
        .form(&[("url", "https://x")])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("text").contains("title"));
    let r = api
        .http
        .post(format!("{}/3.0/admin/offer", api.base))
        .header("API-Key", KEY)
        .json(&serde_json::json!({"title": "J", "url": "https://j.example/", "payments": [{"goal": "a", "total": 1.5}]}))
        .send()
        .await
        .expect("post");
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        body["offer"]["payments"][0]["total"], 1.5,
        "JSON bodies: {body}"
    );
    let big = "x".repeat(70 * 1024);
    let r = api
        .http
        .post(format!("{}/postback", api.base))
        .body(big)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_secure_code_guards_every_postback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), "plat").await;
    let api = Api::new(server.addr());
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "O"),
            ("url", "https://x.example/?clickid={clickid}"),
            ("payments[0][total]", "1"),
        ],
    )
    .await;
    let click = api.click(1, 7, "").await;
    api.postback(&format!("clickid={click}&n=none")).await;
    api.postback("n=no-click").await;
    api.postback(&format!("clickid={click}&secure=plat&n=ok"))
        .await;
    let body = api.wait_for_postbacks(3).await;
    let rows = body["postbacks"].as_array().expect("rows");
    assert_eq!(row(rows, "n", "none")["error"], "Access denied");
    assert_eq!(
        row(rows, "n", "no-click")["error"],
        "Access denied",
        "checked before the click id"
    );
    assert_eq!(row(rows, "n", "ok")["response_status"], 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), "").await;
    let api = Api::new(server.addr());
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "O"),
            ("url", "https://x.example/?clickid={clickid}"),
            ("payments[0][total]", "1"),
        ],
    )
    .await;
    let click = api.click(1, 7, "").await;
    api.postback(&format!("clickid={click}")).await;
    api.wait_for_postbacks(1).await;
    server.shutdown().await;

    let server = start(dir.path(), "").await;
    let api = Api::new(server.addr());
    let (_, offers) = api.get_json("/3.0/offers").await;
    assert_eq!(
        offers["offers"][0]["title"], "O",
        "the catalog is rebuilt from its log"
    );
    // The click is found from the store (the processor's memory is new) and dedupe holds.
    api.postback(&format!("clickid={click}")).await;
    let body = api.wait_for_postbacks(2).await;
    assert_eq!(body["postbacks"][0]["error"], "Conversion exists");
    server.shutdown().await;
}

/// With the events log in several partitions, clicks and their postbacks meet in theirs: every
/// rule gives the same answers, and a restart picks every partition up where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_partitions_give_the_same_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |dir: &std::path::Path| Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        log: common::test_log(dir),
        store: common::test_store(dir),
        migrate: true,
        api_key: KEY.into(),
        partitions: Some(4),
        ..Config::default()
    };
    let server = Server::start(config(dir.path()), None)
        .await
        .expect("starts");
    let api = Api::new(server.addr());
    let click0 = common::offer_and_click(&api).await;
    let mut clicks = vec![click0];
    for _ in 0..11 {
        clicks.push(api.click(1, 1, "").await);
    }
    for (i, click) in clicks.iter().enumerate() {
        api.postback(&format!("clickid={click}&action_id=a{i}"))
            .await;
        api.postback(&format!("clickid={click}&action_id=a{i}"))
            .await;
    }
    let body = api.wait_for_postbacks(24).await;
    let errors: Vec<&str> = body["postbacks"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["error"].as_str().expect("error"))
        .collect();
    assert_eq!(errors.iter().filter(|e| e.is_empty()).count(), 12);
    assert_eq!(
        errors.iter().filter(|e| **e == "Conversion exists").count(),
        12
    );
    server.shutdown().await;
    if common::test_log(dir.path()).is_empty() {
        let parts = std::fs::read_to_string(dir.path().join("events").join("partitions"))
            .expect("partition count");
        assert_eq!(parts.trim(), "4");
    }

    let server = Server::start(config(dir.path()), None)
        .await
        .expect("restarts");
    let api = Api::new(server.addr());
    for (i, click) in clicks.iter().enumerate() {
        api.postback(&format!("clickid={click}&action_id=a{i}&status=1"))
            .await;
    }
    let body = api.wait_for_postbacks(36).await;
    let exists = body["postbacks"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["error"] == "Conversion exists")
        .count();
    assert_eq!(exists, 24, "the conversions were found after the restart");
    let (_, conversions) = api.get_json("/3.0/stats/conversions").await;
    assert_eq!(conversions["pagination"]["total_count"], 12);
    server.shutdown().await;
}

/// The summary shows which integration broke: counts by advertiser, response status and
/// error, by day, with the conversions' payouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_counts_the_log_by_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), "").await;
    let api = Api::new(server.addr());
    let adv = api
        .admin_post(
            "/3.0/admin/advertiser",
            &[("title", "Acme"), ("secure", "s")],
        )
        .await;
    let adv_id = adv["advertiser"]["id"].as_str().expect("id").to_string();
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "O"),
            ("advertiser", &adv_id),
            ("url", "https://x.example/?clickid={clickid}"),
            ("payments[0][total]", "2"),
            ("payments[0][revenue]", "3"),
        ],
    )
    .await;
    let click = api.click(1, 9, "").await;
    for (i, extra) in ["secure=s", "secure=s", "secure=no", "secure=s&goal=nope"]
        .iter()
        .enumerate()
    {
        api.postback(&format!("clickid={click}&action_id=a{i}&{extra}"))
            .await;
    }
    api.postback("clickid=broken").await;
    api.wait_for_postbacks(5).await;
    let d = today();
    let (code, body) = api
        .get_json(&format!(
            "/3.0/stats/serverpostbacks/summary?date_from={d}&date_to={d}&group_by=advertiser,response_status&group_by=error"
        ))
        .await;
    assert_eq!(code, 200, "{body}");
    let rows = body["summary"].as_array().expect("rows");
    let find = |adv: &str, error: &str| {
        rows.iter()
            .find(|r| r["advertiser"] == adv && r["error"] == error)
            .unwrap_or_else(|| panic!("no group {adv:?} {error:?}: {body}"))
    };
    let ok = find(&adv_id, "");
    assert_eq!(ok["postbacks"], 2);
    assert_eq!(ok["accepted"], 2);
    assert_eq!(ok["response_status"], 1);
    assert_eq!(ok["conversions"], 2);
    assert_eq!(ok["payouts"], 4.0);
    assert_eq!(ok["revenue"], 6.0);
    assert_eq!(find(&adv_id, "Access denied")["rejected"], 1);
    assert_eq!(find(&adv_id, "Goal not found")["rejected"], 1);
    assert_eq!(
        find("", "Broken clickid")["rejected"],
        1,
        "no click, no advertiser"
    );
    assert!(rows
        .iter()
        .all(|r| r.get("day").is_none() && r.get("offer").is_none()));

    // In another zone, over a range wide enough to hold today's UTC rows whatever the hour.
    let (_, by_day) = api
        .get_json(
            "/3.0/stats/serverpostbacks/summary?date_from=2000-01-01&date_to=2999-12-31&group_by=day&timezone=Asia/Kolkata",
        )
        .await;
    let days = by_day["summary"].as_array().expect("rows");
    let total: u64 = days
        .iter()
        .map(|r| r["postbacks"].as_u64().expect("int"))
        .sum();
    assert_eq!(total, 5);
    assert!(days
        .iter()
        .all(|r| r["day"].as_str().is_some_and(|d| d.len() == 10)));
    for bad in ["group_by=week", "group_by=hour,day"] {
        let (code, body) = api
            .get_json(&format!(
                "/3.0/stats/serverpostbacks/summary?date_from={d}&date_to={d}&{bad}"
            ))
            .await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    server.shutdown().await;
}
