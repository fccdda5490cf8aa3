//! One test per rule of CONTRACT section 3, plus the defaults, payouts and delta.

use crate::catalog::*;
use crate::event::{PixelContext, PostbackEvent};
use crate::rules::*;

const CLICK: &str = "5f0000007e28fee0558b4567";
const T0: i64 = 1_600_000_000_000_000;

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.apply(CatalogEvent::Advertiser {
        at_us: 0,
        advertiser: Advertiser {
            id: "a".repeat(24),
            title: "Adv".into(),
            secure: String::new(),
            allowed_ip: vec![],
        },
    });
    c.apply(CatalogEvent::Offer {
        at_us: 0,
        offer: offer(),
    });
    c
}

fn offer() -> Offer {
    Offer {
        id: 7,
        offer_id: "b".repeat(24),
        title: "Offer".into(),
        advertiser: "a".repeat(24),
        url: "http://land".into(),
        status: OfferStatus::Active,
        payments: vec![
            Payment {
                goal: "1".into(),
                total: 2.0,
                revenue: 3.0,
                currency: "USD".into(),
                kind: PaymentType::Fixed,
                status: None,
            },
            Payment {
                goal: "Install".into(),
                total: 10.0,
                revenue: 20.0,
                currency: "EUR".into(),
                kind: PaymentType::Percent,
                status: Some(STATUS_PENDING),
            },
        ],
        default_status: STATUS_CONFIRMED,
        secure: String::new(),
        allowed_ip: vec![],
        hold_period: 0,
    }
}

fn click() -> Click {
    Click {
        at_us: T0,
        click_id: CLICK.into(),
        offer_id: 7,
        pid: 3,
        ip: "203.0.113.1".into(),
        ua: "UA".into(),
        referrer: String::new(),
        country: String::new(),
        subs: vec!["s1".into()],
    }
}

fn pb(query: &str) -> ParsedPostback {
    ParsedPostback::parse(&PostbackEvent {
        at_us: T0 + 42_500_000,
        ip: "198.51.100.2".into(),
        method: "GET".into(),
        query: query.into(),
        body: None,
        body_hex: None,
        content_type: String::new(),
        pixel: None,
    })
}

fn run(
    catalog: &Catalog,
    secure: &str,
    p: &ParsedPostback,
    existing: Option<&Conversion>,
) -> Verdict {
    let c = click();
    judge(
        p,
        Some(&c),
        &Context {
            catalog,
            platform_secure: secure,
        },
        |_| existing,
    )
}

fn rejected(v: &Verdict) -> &'static str {
    match &v.outcome {
        Outcome::Rejected(r) => r.message(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn created(v: &Verdict) -> &Conversion {
    match &v.outcome {
        Outcome::Created(c) => c,
        other => panic!("expected a conversion, got {other:?}"),
    }
}

#[test]
fn platform_secure_code_is_required() {
    let c = catalog();
    let p = pb(&format!("clickid={CLICK}"));
    assert_eq!(rejected(&run(&c, "plat", &p, None)), "Access denied");
    let p = pb(&format!("clickid={CLICK}&secure=wrong"));
    assert_eq!(rejected(&run(&c, "plat", &p, None)), "Access denied");
    let p = pb(&format!("clickid={CLICK}&secure=plat"));
    created(&run(&c, "plat", &p, None));
}

#[test]
fn platform_secure_code_applies_without_a_click() {
    let c = catalog();
    let v = judge(
        &pb(""),
        None,
        &Context {
            catalog: &c,
            platform_secure: "p",
        },
        |_| None,
    );
    assert_eq!(rejected(&v), "Access denied");
}

#[test]
fn advertiser_and_offer_secure_codes_all_apply() {
    let mut c = catalog();
    let mut o = offer();
    o.secure = "off".into();
    c.apply(CatalogEvent::Offer { at_us: 1, offer: o });
    assert_eq!(
        rejected(&run(&c, "", &pb(&format!("clickid={CLICK}")), None)),
        "Access denied"
    );
    created(&run(
        &c,
        "",
        &pb(&format!("clickid={CLICK}&secure=off")),
        None,
    ));
    c.apply(CatalogEvent::Advertiser {
        at_us: 2,
        advertiser: Advertiser {
            id: "a".repeat(24),
            title: "Adv".into(),
            secure: "adv".into(),
            allowed_ip: vec![],
        },
    });
    // Both levels are set and differ: no single code satisfies both.
    assert_eq!(
        rejected(&run(
            &c,
            "",
            &pb(&format!("clickid={CLICK}&secure=off")),
            None
        )),
        "Access denied"
    );
}

#[test]
fn ip_allow_lists_of_advertiser_and_offer() {
    let mut c = catalog();
    let mut o = offer();
    o.allowed_ip = vec!["10.0.0.0/8".into()];
    c.apply(CatalogEvent::Offer { at_us: 1, offer: o });
    let p = pb(&format!("clickid={CLICK}"));
    assert_eq!(
        rejected(&run(&c, "", &p, None)),
        "Current IP-address is denied"
    );
    let mut p2 = p.clone();
    p2.server = "10.1.2.3".into();
    created(&run(&c, "", &p2, None));
    // Secure comes first.
    let p3 = pb(&format!("clickid={CLICK}"));
    assert_eq!(rejected(&run(&c, "x", &p3, None)), "Access denied");
}

#[test]
fn pixels_are_not_held_to_server_allow_lists() {
    let mut c = catalog();
    let mut o = offer();
    o.allowed_ip = vec!["10.0.0.0/8".into()];
    c.apply(CatalogEvent::Offer { at_us: 1, offer: o });
    let p = ParsedPostback::parse(&PostbackEvent {
        at_us: T0 + 1,
        ip: "198.51.100.2".into(),
        method: "GET".into(),
        query: "offer_id=7&afgoal=install&afprice=50&afid=ord-1&afstatus=3".into(),
        body: None,
        body_hex: None,
        content_type: String::new(),
        pixel: Some(PixelContext {
            kind: "success.jpg".into(),
            source: "https://shop/thanks".into(),
            cookie_click_id: Some(CLICK.into()),
        }),
    });
    let v = run(&c, "", &p, None);
    let conv = created(&v);
    assert_eq!(conv.goal, "Install");
    assert_eq!(conv.action_id, "ord-1");
    assert_eq!(conv.status, STATUS_DECLINED);
    assert_eq!(conv.payouts, 5.0);
    assert_eq!(p.get.get("pixel"), Some("1"));
    assert_eq!(p.get.get("source"), Some("https://shop/thanks"));
}

#[test]
fn missing_broken_and_unknown_click_ids() {
    let c = catalog();
    let ctx = Context {
        catalog: &c,
        platform_secure: "",
    };
    let v = judge(&pb("goal=1"), None, &ctx, |_| None);
    assert_eq!(rejected(&v), "Missing mandatory parameter clickid/click_id");
    let v = judge(&pb("clickid=&click_id="), None, &ctx, |_| None);
    assert_eq!(rejected(&v), "Missing mandatory parameter clickid/click_id");
    let v = judge(&pb("clickid=abc"), None, &ctx, |_| None);
    assert_eq!(rejected(&v), "Broken clickid");
    let v = judge(&pb(&format!("click_id={CLICK}")), None, &ctx, |_| None);
    assert_eq!(rejected(&v), "Click not found");
    assert_eq!(v.delta, None);
    assert_eq!(v.offer_id, 0);
}

#[test]
fn inactive_offers_are_disabled() {
    for status in [OfferStatus::Paused, OfferStatus::Stopped] {
        let mut c = catalog();
        let mut o = offer();
        o.status = status;
        c.apply(CatalogEvent::Offer { at_us: 1, offer: o });
        let v = run(&c, "", &pb(&format!("clickid={CLICK}")), None);
        assert_eq!(rejected(&v), "Offer disabled");
        assert_eq!(v.offer_id, 7, "the log row still names the offer");
    }
}

#[test]
fn offer_state_is_taken_as_of_the_postback() {
    let mut c = catalog();
    let mut o = offer();
    o.status = OfferStatus::Paused;
    // Paused after the postback arrived: the postback still counts (and a replay agrees).
    c.apply(CatalogEvent::Offer {
        at_us: T0 + 100_000_000,
        offer: o,
    });
    created(&run(&c, "", &pb(&format!("clickid={CLICK}")), None));
}

#[test]
fn goals_match_without_case_and_unknown_goals_fail() {
    let c = catalog();
    let v = run(
        &c,
        "",
        &pb(&format!("clickid={CLICK}&goal=INSTALL&sum=80")),
        None,
    );
    let conv = created(&v);
    assert_eq!(conv.goal, "Install");
    assert_eq!((conv.payouts, conv.revenue), (8.0, 16.0), "percent of sum");
    assert_eq!(conv.currency, "EUR");
    let v = run(&c, "", &pb(&format!("clickid={CLICK}&goal=purchase")), None);
    assert_eq!(rejected(&v), "Goal not found");
}

#[test]
fn defaults_goal_status_action_id() {
    let c = catalog();
    let v = run(&c, "", &pb(&format!("clickid={CLICK}")), None);
    let conv = created(&v);
    assert_eq!(conv.goal, "1");
    assert_eq!(conv.status, STATUS_CONFIRMED, "the offer's default status");
    assert_eq!(conv.action_id, CLICK, "action id defaults to the click id");
    assert_eq!((conv.payouts, conv.revenue), (2.0, 3.0), "fixed payment");
    assert_eq!(conv.subs[0], "s1");
    assert_eq!(conv.ip, "203.0.113.1", "the click's IP when none is passed");
    // The payment's own default status wins over the offer's.
    let v = run(&c, "", &pb(&format!("clickid={CLICK}&goal=install")), None);
    assert_eq!(created(&v).status, STATUS_PENDING);
    // A passed status wins over both.
    let v = run(
        &c,
        "",
        &pb(&format!("clickid={CLICK}&goal=install&status=5")),
        None,
    );
    assert_eq!(created(&v).status, STATUS_HOLD);
}

#[test]
fn delta_is_seconds_from_click_to_postback() {
    let c = catalog();
    let v = run(&c, "", &pb(&format!("clickid={CLICK}")), None);
    assert_eq!(v.delta, Some(42));
    assert_eq!((v.offer_id, v.pid), (7, 3));
    assert_eq!(v.advertiser_id, "a".repeat(24));
}

#[test]
fn invalid_status_values_are_rejected() {
    let c = catalog();
    for s in ["4", "0", "abc", "-1"] {
        let v = run(&c, "", &pb(&format!("clickid={CLICK}&status={s}")), None);
        assert_eq!(rejected(&v), "Invalid status", "status={s}");
    }
}

#[test]
fn sums_out_of_range_are_rejected() {
    let c = catalog();
    for s in [
        "-1", "-0.01", "NaN", "inf", "-inf", "1e13", "1e309", "abc", "12,50",
    ] {
        let v = run(&c, "", &pb(&format!("clickid={CLICK}&sum={s}")), None);
        assert_eq!(rejected(&v), "Invalid sum", "sum={s}");
    }
    for (s, want) in [("", 0.0), ("0", 0.0), (" 12.5 ", 12.5), ("1e12", 1e12)] {
        let v = run(&c, "", &pb(&format!("clickid={CLICK}&sum={s}")), None);
        assert_eq!(created(&v).sum, want, "sum={s:?}");
    }
    let v = run(&c, "", &pb(&format!("clickid={CLICK}")), None);
    assert_eq!(created(&v).sum, 0.0, "no sum is a sum of 0");
}

/// A repeated parameter: the first value is the one processed.
#[test]
fn the_first_of_repeated_parameters_is_processed() {
    let c = catalog();
    let v = run(
        &c,
        "",
        &pb(&format!("clickid={CLICK}&action_id=first&action_id=second")),
        None,
    );
    assert_eq!(created(&v).action_id, "first");
}

fn existing(status: u8) -> Conversion {
    let c = catalog();
    let v = run(
        &c,
        "",
        &pb(&format!("clickid={CLICK}&status={status}")),
        None,
    );
    let mut conv = created(&v).clone();
    conv.id = "c".repeat(24);
    conv
}

#[test]
fn duplicates_with_the_same_status_exist() {
    let c = catalog();
    let e = existing(STATUS_PENDING);
    let v = run(&c, "", &pb(&format!("clickid={CLICK}&status=2")), Some(&e));
    assert_eq!(rejected(&v), "Conversion exists");
    // No status passed: nothing to change, so it is a duplicate.
    let v = run(&c, "", &pb(&format!("clickid={CLICK}")), Some(&e));
    assert_eq!(rejected(&v), "Conversion exists");
}

#[test]
fn pending_conversions_take_a_new_status() {
    let c = catalog();
    let e = existing(STATUS_PENDING);
    let v = run(
        &c,
        "",
        &pb(&format!("clickid={CLICK}&status=1&comment=ok")),
        Some(&e),
    );
    let Outcome::Updated(u) = &v.outcome else {
        panic!("update expected: {v:?}")
    };
    assert_eq!(u.id, e.id);
    assert_eq!(u.status, STATUS_CONFIRMED);
    assert_eq!(u.comment, "ok");
    assert_eq!(u.created_us, e.created_us);
    assert!(u.updated_us > e.updated_us || u.updated_us == T0 + 42_500_000);
}

#[test]
fn settled_conversions_do_not_change() {
    let c = catalog();
    let e = existing(STATUS_CONFIRMED);
    let v = run(&c, "", &pb(&format!("clickid={CLICK}&status=3")), Some(&e));
    assert_eq!(rejected(&v), "Conversion status is not pending");
}

#[test]
fn dedupe_key_uses_action_id_then_click_id() {
    assert_eq!(conversion_key(7, "Install", "A1"), "7|install|A1");
    let c = catalog();
    let mut seen = None;
    let p = pb(&format!("clickid={CLICK}&action_id=A1&goal=Install"));
    judge(
        &p,
        Some(&click()),
        &Context {
            catalog: &c,
            platform_secure: "",
        },
        |k| {
            seen = Some(k.to_string());
            None
        },
    );
    assert_eq!(seen.as_deref(), Some("7|install|A1"));
}

#[test]
fn post_bodies_are_read_as_form_or_json() {
    let mut e = PostbackEvent {
        at_us: T0,
        ip: "1.1.1.1".into(),
        method: "POST".into(),
        query: String::new(),
        body: None,
        body_hex: None,
        content_type: "application/x-www-form-urlencoded".into(),
        pixel: None,
    };
    e.set_body(format!("clickid={CLICK}&goal=install").as_bytes());
    let p = ParsedPostback::parse(&e);
    assert_eq!(p.clickid(), Some(CLICK));
    assert_eq!(p.goal(), Some("install"));
    e.body = None;
    e.content_type = "application/json".into();
    e.set_body(format!(r#"{{"click_id":"{CLICK}","sum":12.5}}"#).as_bytes());
    let p = ParsedPostback::parse(&e);
    assert_eq!(p.clickid(), Some(CLICK));
    assert_eq!(p.sum(), Some(12.5));
    // A query parameter wins over the body.
    e.query = "sum=1".into();
    assert_eq!(ParsedPostback::parse(&e).sum(), Some(1.0));
}

#[test]
fn the_click_half_and_the_dedupe_half_make_the_whole_judgement() {
    let c = catalog();
    let ctx = Context {
        catalog: &c,
        platform_secure: "",
    };
    let first = pb(&format!("clickid={CLICK}&action_id=A1&status=2"));
    let candidate = judge_click(&first, Some(&click()), &ctx).expect("a candidate");
    assert_eq!(
        candidate.conversion.key,
        conversion_key(candidate.verdict.offer_id, &candidate.conversion.goal, "A1")
    );
    let made = judge_conversion(candidate.clone(), None);
    assert_eq!(made, run(&c, "", &first, None), "as judge decides");
    let made = created(&made).clone();
    // The same postback against the conversion it made: a duplicate, in both halves and whole.
    let again = judge_conversion(candidate, Some(&made));
    assert_eq!(rejected(&again), "Conversion exists");
    assert_eq!(again, run(&c, "", &first, Some(&made)));
    // A status change of the pending conversion keeps its id and takes the later time.
    let approve = pb(&format!("clickid={CLICK}&action_id=A1&status=1&comment=ok"));
    let approve = judge_click(&approve, Some(&click()), &ctx).expect("a candidate");
    match judge_conversion(approve, Some(&made)).outcome {
        Outcome::Updated(next) => {
            assert_eq!((next.status, next.comment.as_str()), (1, "ok"));
            assert_eq!(next.key, made.key);
        }
        other => panic!("expected an update, got {other:?}"),
    }
    // Rules of the click end the judgement before the dedupe.
    let broken = judge_click(&pb("clickid=abc"), None, &ctx).expect_err("rejected");
    assert_eq!(rejected(&broken), "Broken clickid");
}
