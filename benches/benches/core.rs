//! Criterion benchmarks of the pure parts: parsing, the processing rules, click-id minting,
//! macro filling, and the event envelope (serde_json against simd-json with reused buffers).
//! `cargo bench -p postback-benches --bench core`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use postback_core::catalog::*;
use postback_core::event::{ClickEvent, Event, PostbackEvent};
use postback_core::ids::IdGenerator;
use postback_core::log::Position;
use postback_core::processor::{parse, Lookups, Parsed, Processor};
use std::hint::black_box;

const QUERY: &str = "clickid=6b04c5027d4edcd087b12a04&action_id=ORD-123456&goal=sale&sum=49.90&status=2&secure=s3cr3t&currency=USD&custom_field1=abc&promo_code=SUMMER&comment=first%20order";

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.apply(CatalogEvent::Advertiser {
        at_us: 0,
        advertiser: Advertiser {
            id: "a".repeat(24),
            title: "A".into(),
            secure: "s3cr3t".into(),
            allowed_ip: vec![],
        },
    });
    c.apply(CatalogEvent::Offer {
        at_us: 0,
        offer: Offer {
            id: 1,
            offer_id: "b".repeat(24),
            title: "O".into(),
            advertiser: "a".repeat(24),
            url: "https://x/?c={clickid}".into(),
            status: OfferStatus::Active,
            payments: vec![Payment {
                goal: "sale".into(),
                total: 10.0,
                revenue: 20.0,
                currency: "USD".into(),
                kind: PaymentType::Percent,
                status: None,
            }],
            default_status: 1,
            secure: String::new(),
            allowed_ip: vec![],
            hold_period: 0,
        },
    });
    c
}

/// A batch as the processor sees it: `n` clicks, then a postback for each (unique action ids).
fn position(i: usize) -> Position {
    Position {
        partition: 0,
        offset: i as u64,
    }
}

fn batch(n: usize) -> Vec<(Position, Parsed)> {
    let ids = IdGenerator::new([1, 2, 3, 4, 5], 0);
    let mut events = Vec::new();
    let clicks: Vec<String> = (0..n).map(|_| ids.next(1_700_000_000).to_hex()).collect();
    for id in &clicks {
        events.push(Event::Click(ClickEvent {
            at_us: 1_700_000_000_000_000,
            click_id: id.clone(),
            offer_id: 1,
            pid: 1,
            ip: "203.0.113.1".into(),
            ua: "Mozilla/5.0".into(),
            referrer: String::new(),
            country: String::new(),
            subs: vec!["s1".into()],
        }));
    }
    for (i, id) in clicks.iter().enumerate() {
        events.push(Event::Postback(PostbackEvent {
            at_us: 1_700_000_100_000_000,
            ip: "198.51.100.7".into(),
            method: "GET".into(),
            query: QUERY
                .replace("6b04c5027d4edcd087b12a04", id)
                .replace("ORD-123456", &format!("ORD-{i}")),
            body: None,
            body_hex: None,
            content_type: String::new(),
            pixel: None,
        }));
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| (position(i), parse(e)))
        .collect()
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("form query", |b| {
        b.iter(|| postback_core::params::parse_form(black_box(QUERY.as_bytes())))
    });
    let event = PostbackEvent {
        at_us: 1,
        ip: "1.2.3.4".into(),
        method: "GET".into(),
        query: QUERY.into(),
        body: None,
        body_hex: None,
        content_type: String::new(),
        pixel: None,
    };
    g.bench_function("postback", |b| {
        b.iter(|| postback_core::rules::ParsedPostback::parse(black_box(&event)))
    });
    g.finish();

    let mut g = c.benchmark_group("process");
    let n = 1000;
    g.throughput(Throughput::Elements(n as u64));
    let catalog = catalog();
    let parsed = batch(n);
    g.bench_function("batch of 1000 clicks + 1000 postbacks", |b| {
        b.iter_batched(
            || (Processor::new(String::new(), 64 << 20), parsed.clone()),
            |(mut p, batch)| p.apply(&catalog, black_box(batch), Lookups::default()),
            BatchSize::SmallInput,
        )
    });
    let raw: Vec<Event> = (0..n)
        .map(|i| {
            Event::Postback(PostbackEvent {
                at_us: 1,
                ip: "1.2.3.4".into(),
                method: "GET".into(),
                query: QUERY.replace("ORD-123456", &format!("ORD-{i}")),
                body: None,
                body_hex: None,
                content_type: String::new(),
                pixel: None,
            })
        })
        .collect();
    g.bench_function("parse + judge 1000 postbacks", |b| {
        b.iter_batched(
            || (Processor::new(String::new(), 64 << 20), raw.clone()),
            |(mut p, raw)| {
                let batch: Vec<(Position, Parsed)> = raw
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| (position(i), parse(e)))
                    .collect();
                p.apply(&catalog, batch, Lookups::default())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("ids and macros");
    g.throughput(Throughput::Elements(1));
    let ids = IdGenerator::new([1, 2, 3, 4, 5], 0);
    g.bench_function("click id", |b| {
        b.iter(|| ids.next(black_box(1_700_000_000)).to_hex())
    });
    let template = "https://aff.example/pb?click={sub1}&tx={transactionid}&payout={payouts}&status={status}&x={unknown}";
    g.bench_function("fill macros", |b| {
        b.iter(|| {
            postback_core::macros::fill(black_box(template), |name| match name {
                "sub1" => Some("abc 123".to_string()),
                "transactionid" => Some("ORD-1".to_string()),
                "payouts" => Some("4.99".to_string()),
                "status" => Some("1".to_string()),
                _ => None,
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("envelope");
    let json = Event::Postback(event.clone()).to_json();
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("encode serde_json", |b| {
        b.iter(|| Event::Postback(black_box(event.clone())).to_json())
    });
    g.bench_function("decode serde_json", |b| {
        b.iter(|| Event::from_json(black_box(&json)))
    });
    let mut buffers = simd_json::Buffers::new(json.len());
    let mut scratch = json.clone();
    g.bench_function("decode simd-json (buffers reused)", |b| {
        b.iter(|| {
            scratch.clear();
            scratch.extend_from_slice(&json);
            simd_json::serde::from_slice_with_buffers::<Event>(
                black_box(&mut scratch),
                &mut buffers,
            )
        })
    });
    g.finish();
}

criterion_group!(core, benches);
criterion_main!(core);
