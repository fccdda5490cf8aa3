//! Property tests over the parsers that read attacker-controlled input: whatever bytes arrive,
//! they give a decision and never panic.

use postback_core::catalog::Catalog;
use postback_core::event::{Event, PixelContext, PostbackEvent};
use postback_core::params::{parse_form, parse_json};
use postback_core::rules::{judge, Context, Outcome, ParsedPostback};
use proptest::prelude::*;

fn event(query: String, body: Vec<u8>, content_type: &str, pixel: bool) -> PostbackEvent {
    let mut e = PostbackEvent {
        at_us: 1_700_000_000_000_000,
        ip: "203.0.113.7".into(),
        method: "POST".into(),
        query,
        body: None,
        body_hex: None,
        content_type: content_type.into(),
        pixel: pixel.then(|| PixelContext {
            kind: "success.jpg".into(),
            source: String::new(),
            cookie_click_id: Some("5f0000007e28fee0558b4567".into()),
        }),
    };
    e.set_body(&body);
    e
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn form_and_json_parsers_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let p = parse_form(&bytes);
        let _ = p.get_all("offer");
        let _ = p.groups("payments");
        let _ = parse_json(&bytes);
    }

    #[test]
    fn any_postback_gets_a_verdict(
        query in "[a-z_%&=0-9A-F\\[\\]{}.+-]{0,200}",
        body in proptest::collection::vec(any::<u8>(), 0..256),
        json in any::<bool>(),
        pixel in any::<bool>(),
    ) {
        let ct = if json { "application/json" } else { "application/x-www-form-urlencoded" };
        let e = event(query, body, ct, pixel);
        // The event survives its own wire format, whatever its body.
        let round = Event::from_json(&Event::Postback(e.clone()).to_json()).expect("decodes");
        prop_assert_eq!(round, Event::Postback(e.clone()));
        let parsed = ParsedPostback::parse(&e);
        let catalog = Catalog::default();
        // No click is known, so every postback is rejected, with a reason.
        let v = judge(&parsed, None, &Context { catalog: &catalog, platform_secure: "" }, |_| None);
        prop_assert!(matches!(v.outcome, Outcome::Rejected(_)));
    }
}
