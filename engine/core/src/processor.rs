//! The stream processor's logic, sans IO: it turns a batch of log events into rows for the
//! analytics store. The caller (the runtime in `postbackd`) reads the log, asks which clicks and
//! conversions the batch needs from the store, hands them over, and writes the output together
//! with the next log position in one idempotent step.
//!
//! Every output row's id is derived from the log position of the event that produced it, so
//! reprocessing a batch after a crash writes the same rows again, not new ones.

use crate::catalog::Catalog;
use crate::delivery::{jobs_for, DeliveryJob};
use crate::event::Event;
use crate::ids::{IdTag, ObjectId};
use crate::log::Position;
use crate::params::Params;
use crate::rules::{conversion_key, judge, Click, Context, Conversion, Outcome, ParsedPostback};
use std::collections::HashMap;

/// An event with its log position, parsed for processing.
#[derive(Debug, Clone)]
pub enum Parsed {
    Click(Click),
    Postback(Box<ParsedPostback>),
}

/// The longest a click's free-text fields (user agent, referrer, each sub, ...) are kept past
/// the log, in bytes: the log keeps them whole, but the processor holds clicks in memory and
/// copies them into the store and into conversions, so an attacker's 60 KiB subs must not
/// multiply there. Applied when a click is parsed, so a replay gives the same result.
pub const MAX_CLICK_FIELD_BYTES: usize = 2048;

pub fn parse(event: &Event) -> Parsed {
    match event {
        Event::Click(c) => Parsed::Click(capped_click(c)),
        Event::Postback(p) => Parsed::Postback(Box::new(ParsedPostback::parse(p))),
    }
}

fn capped_click(c: &Click) -> Click {
    let cap = |s: &str| truncate_at_char(s, MAX_CLICK_FIELD_BYTES).to_string();
    Click {
        at_us: c.at_us,
        click_id: cap(&c.click_id),
        offer_id: c.offer_id,
        pid: c.pid,
        ip: cap(&c.ip),
        ua: cap(&c.ua),
        referrer: cap(&c.referrer),
        country: cap(&c.country),
        subs: c.subs.iter().map(|s| cap(s)).collect(),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Roughly how many bytes a value takes in memory, for byte budgets.
pub trait Weight {
    fn weight(&self) -> usize;
}

/// What a map entry and a `String` cost beyond their text.
const ENTRY_OVERHEAD: usize = 64;

impl Weight for Click {
    fn weight(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.click_id.len()
            + self.ip.len()
            + self.ua.len()
            + self.referrer.len()
            + self.country.len()
            + self.subs.iter().map(|s| s.len() + 24).sum::<usize>()
    }
}

impl Weight for Conversion {
    fn weight(&self) -> usize {
        let texts = [
            &self.id,
            &self.key,
            &self.advertiser_id,
            &self.goal,
            &self.action_id,
            &self.clickid,
            &self.currency,
            &self.ip,
            &self.ua,
            &self.comment,
            &self.promo_code,
            &self.user_id,
        ];
        std::mem::size_of::<Self>()
            + texts.iter().map(|t| t.len()).sum::<usize>()
            + self
                .subs
                .iter()
                .chain(&self.custom_fields)
                .map(|s| s.len() + 24)
                .sum::<usize>()
    }
}

/// The partition byte of the ids derived from a position (logs have at most 256 partitions).
fn position_byte(position: &Position) -> u8 {
    u8::try_from(position.partition).unwrap_or(u8::MAX)
}

/// One row of the server-postback log.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerPostbackRow {
    pub id: String,
    pub at_us: i64,
    pub server: String,
    pub method: String,
    pub get: Params,
    pub post: Params,
    pub pixel: bool,
    /// 1 registered, 2 rejected.
    pub response_status: u8,
    /// The rejection text; empty on success.
    pub error: String,
    pub clickid: String,
    pub action_id: String,
    pub goal: String,
    pub status: i64,
    pub offer_id: u64,
    pub pid: u64,
    pub advertiser_id: String,
    pub conversion_id: String,
    pub delta: Option<i64>,
    pub ip: String,
    /// This postback registered a new conversion (not a status change of one).
    pub created: bool,
    /// The payout and revenue of the conversion it registered (0 otherwise), so that sums
    /// over the log need no join.
    pub payouts: f64,
    pub revenue: f64,
}

impl ServerPostbackRow {
    /// The reply the engine gives for this outcome, as Affise logs it.
    pub fn response(&self) -> String {
        if self.response_status == 1 {
            r#"{"status":1}"#.to_string()
        } else {
            // Built by hand: the key order is part of what clients compare.
            format!(
                r#"{{"status":2,"message":{}}}"#,
                serde_json::Value::String(self.error.clone())
            )
        }
    }
}

/// A conversion creation or status change, in log order (for affiliate postbacks).
#[derive(Debug, Clone, PartialEq)]
pub struct ConversionChange {
    pub created: bool,
    pub conversion: Conversion,
}

/// What a batch produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    pub clicks: Vec<Click>,
    pub postbacks: Vec<ServerPostbackRow>,
    /// Conversion states in the order they happened; the last state of an id wins.
    pub changes: Vec<ConversionChange>,
    /// Affiliate postbacks the changes trigger.
    pub jobs: Vec<DeliveryJob>,
}

/// Rows the store supplied for a batch.
#[derive(Debug, Default)]
pub struct Lookups {
    pub clicks: HashMap<String, Click>,
    pub conversions: HashMap<String, Conversion>,
}

/// A map that forgets its older half when full, by bytes: recent clicks and conversions stay
/// in memory, older ones come from the store. Entries go into the current generation; once it
/// holds half the budget it becomes the previous one and the old previous one is dropped, so
/// the two together never hold much more than the budget (plus one batch).
///
/// Generations turn only between batches (`settle`): a batch asks the store only for what it
/// did not find in memory, so what it found must stay until the batch is done.
#[derive(Debug)]
struct Recent<V> {
    current: HashMap<String, V>,
    previous: HashMap<String, V>,
    current_bytes: usize,
    budget: usize,
}

impl<V: Weight> Recent<V> {
    fn new(budget_bytes: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            current_bytes: 0,
            budget: budget_bytes.max(1),
        }
    }
    fn get(&self, k: &str) -> Option<&V> {
        self.current.get(k).or_else(|| self.previous.get(k))
    }
    fn insert(&mut self, k: String, v: V) {
        let bytes = k.len() + v.weight() + ENTRY_OVERHEAD;
        if bytes > self.budget / 2 {
            // Too big to keep at all: the store has it.
            self.current.remove(&k);
            self.previous.remove(&k);
            return;
        }
        let key_bytes = k.len() + ENTRY_OVERHEAD;
        self.current_bytes += bytes;
        if let Some(old) = self.current.insert(k, v) {
            self.current_bytes = self.current_bytes.saturating_sub(key_bytes + old.weight());
        }
    }
    /// Turns the generations if the current one holds its half of the budget.
    fn settle(&mut self) {
        if self.current_bytes > self.budget / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.current_bytes = 0;
        }
    }
    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
        self.current_bytes = 0;
    }
    /// Bytes held, as weighed.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        let weigh = |m: &HashMap<String, V>| {
            m.iter()
                .map(|(k, v)| k.len() + v.weight() + ENTRY_OVERHEAD)
                .sum::<usize>()
        };
        weigh(&self.current) + weigh(&self.previous)
    }
}

pub struct Processor {
    platform_secure: String,
    clicks: Recent<Click>,
    conversions: Recent<Conversion>,
}

impl Processor {
    /// `cache_bytes` bounds the memory of the clicks and conversions held (together).
    pub fn new(platform_secure: String, cache_bytes: usize) -> Self {
        Self {
            platform_secure,
            clicks: Recent::new(cache_bytes / 2),
            conversions: Recent::new(cache_bytes / 2),
        }
    }

    /// Drops what is held in memory: after a failed write the cache may be ahead of the store.
    pub fn forget(&mut self) {
        self.clicks.clear();
        self.conversions.clear();
    }

    /// Click ids the batch's postbacks name that are neither held nor clicked in the batch.
    pub fn missing_clicks(&self, batch: &[(Position, Parsed)]) -> Vec<String> {
        let in_batch: std::collections::HashSet<&str> = batch
            .iter()
            .filter_map(|(_, p)| match p {
                Parsed::Click(c) => Some(c.click_id.as_str()),
                Parsed::Postback(_) => None,
            })
            .collect();
        let mut out: Vec<String> = batch
            .iter()
            .filter_map(|(_, p)| match p {
                Parsed::Postback(pb) => pb.clickid(),
                Parsed::Click(_) => None,
            })
            .filter(|id| id.parse::<ObjectId>().is_ok())
            .map(str::to_lowercase)
            .filter(|id| !in_batch.contains(id.as_str()) && self.clicks.get(id).is_none())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Conversion keys the batch's postbacks may hit that are not held in memory.
    pub fn missing_conversions(
        &self,
        catalog: &Catalog,
        batch: &[(Position, Parsed)],
        lookups: &Lookups,
    ) -> Vec<String> {
        let mut batch_clicks: HashMap<&str, &Click> = HashMap::new();
        let mut out = Vec::new();
        for (_, p) in batch {
            match p {
                Parsed::Click(c) => {
                    batch_clicks.insert(&c.click_id, c);
                }
                Parsed::Postback(pb) => {
                    let Some(id) = pb.clickid().map(str::to_lowercase) else {
                        continue;
                    };
                    let click = self
                        .clicks
                        .get(&id)
                        .or_else(|| lookups.clicks.get(&id))
                        .or_else(|| batch_clicks.get(id.as_str()).copied());
                    let Some(click) = click else { continue };
                    let Some(offer) = catalog.offer_at(click.offer_id, pb.at_us) else {
                        continue;
                    };
                    let goal = pb.goal().unwrap_or("1");
                    let Some(payment) = offer.payment(goal) else {
                        continue;
                    };
                    let action = pb.action_id().unwrap_or(&click.click_id);
                    let key = conversion_key(offer.id, &payment.goal, action);
                    if self.conversions.get(&key).is_none() {
                        out.push(key);
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Processes the batch in log order. `lookups` holds what the store had of
    /// `missing_clicks` and `missing_conversions`.
    pub fn apply(
        &mut self,
        catalog: &Catalog,
        batch: &[(Position, Parsed)],
        lookups: Lookups,
    ) -> Output {
        let ctx = Context {
            catalog,
            platform_secure: &self.platform_secure,
        };
        let mut out = Output::default();
        for (position, p) in batch {
            let (partition, offset) = (position_byte(position), position.offset);
            match p {
                Parsed::Click(c) => {
                    self.clicks.insert(c.click_id.clone(), c.clone());
                    out.clicks.push(c.clone());
                }
                Parsed::Postback(pb) => {
                    let click_id = pb.clickid().map(str::to_lowercase);
                    let click = click_id
                        .as_deref()
                        .and_then(|id| self.clicks.get(id).or_else(|| lookups.clicks.get(id)));
                    let conversions = &self.conversions;
                    let verdict = judge(pb, click, &ctx, |key| {
                        conversions
                            .get(key)
                            .or_else(|| lookups.conversions.get(key))
                    });
                    let secs = u32::try_from(pb.at_us.div_euclid(1_000_000)).unwrap_or(0);
                    let mut row = ServerPostbackRow {
                        id: ObjectId::derived(IdTag::ServerPostback, secs, partition, offset)
                            .to_hex(),
                        at_us: pb.at_us,
                        server: pb.server.clone(),
                        method: pb.method.clone(),
                        get: pb.get.clone(),
                        post: pb.post.clone(),
                        pixel: pb.pixel,
                        response_status: 1,
                        error: String::new(),
                        clickid: pb.clickid().unwrap_or("").to_string(),
                        action_id: pb.action_id().unwrap_or("").to_string(),
                        goal: pb.goal().unwrap_or("").to_string(),
                        status: pb.status_passed(),
                        offer_id: verdict.offer_id,
                        pid: verdict.pid,
                        advertiser_id: verdict.advertiser_id,
                        conversion_id: String::new(),
                        delta: verdict.delta,
                        ip: pb
                            .param("ip")
                            .filter(|v| !v.is_empty())
                            .or(click.map(|c| c.ip.as_str()))
                            .unwrap_or("")
                            .to_string(),
                        created: false,
                        payouts: 0.0,
                        revenue: 0.0,
                    };
                    let change = match verdict.outcome {
                        Outcome::Rejected(r) => {
                            row.response_status = 2;
                            row.error = r.message().to_string();
                            None
                        }
                        Outcome::Created(mut c) => {
                            c.id = ObjectId::derived(IdTag::Conversion, secs, partition, offset)
                                .to_hex();
                            (row.created, row.payouts, row.revenue) = (true, c.payouts, c.revenue);
                            Some(ConversionChange {
                                created: true,
                                conversion: c,
                            })
                        }
                        Outcome::Updated(c) => Some(ConversionChange {
                            created: false,
                            conversion: c,
                        }),
                    };
                    if let Some(change) = change {
                        row.conversion_id = change.conversion.id.clone();
                        let offer_name = catalog
                            .offer_at(change.conversion.offer_id, pb.at_us)
                            .map_or("", |o| o.title.as_str());
                        out.jobs.extend(jobs_for(
                            &change, catalog, offer_name, pb.pixel, partition, offset,
                        ));
                        self.conversions
                            .insert(change.conversion.key.clone(), change.conversion.clone());
                        out.changes.push(change);
                    }
                    out.postbacks.push(row);
                }
            }
        }
        self.clicks.settle();
        self.conversions.settle();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click(id: usize, sub_bytes: usize) -> Click {
        Click {
            at_us: 1,
            click_id: format!("{id:024x}"),
            offer_id: 1,
            pid: 1,
            ip: "1.2.3.4".into(),
            ua: "é".repeat(sub_bytes),
            referrer: String::new(),
            country: String::new(),
            subs: vec!["x".repeat(sub_bytes); 8],
        }
    }

    #[test]
    fn clicks_are_capped_on_char_boundaries() {
        let big = click(1, 10_000);
        let Parsed::Click(c) = parse(&Event::Click(big)) else {
            panic!("a click")
        };
        assert!(c.ua.len() <= MAX_CLICK_FIELD_BYTES && c.ua.len() > MAX_CLICK_FIELD_BYTES - 2);
        assert!(c.ua.chars().all(|ch| ch == 'é'));
        assert!(c.subs.iter().all(|s| s.len() == MAX_CLICK_FIELD_BYTES));
        assert_eq!(c.click_id, format!("{:024x}", 1));
        assert_eq!(truncate_at_char("abc", 10), "abc");
        assert_eq!(truncate_at_char("aé", 2), "a");
    }

    /// What a batch found in memory when it asked the store for the rest stays there until
    /// the batch is done, however many new entries the batch adds: an eviction in between
    /// would make a known click "not found" and a known conversion a second one.
    #[test]
    fn a_batch_keeps_what_it_found_in_memory() {
        use crate::catalog::{CatalogEvent, Offer, OfferStatus, Payment, PaymentType};
        let mut catalog = Catalog::default();
        catalog.apply(CatalogEvent::Offer {
            at_us: 0,
            offer: Offer {
                id: 1,
                offer_id: "o".repeat(24),
                title: "O".into(),
                advertiser: String::new(),
                url: "https://x.example/".into(),
                status: OfferStatus::Active,
                payments: vec![Payment {
                    goal: "1".into(),
                    total: 1.0,
                    revenue: 1.0,
                    currency: "USD".into(),
                    kind: PaymentType::Fixed,
                    status: None,
                }],
                default_status: 1,
                secure: String::new(),
                allowed_ip: Vec::new(),
                hold_period: 0,
            },
        });
        let at = |offset: u64| Position {
            partition: 0,
            offset,
        };
        let postback = |click: &Click, action: &str| {
            Parsed::Postback(Box::new(crate::rules::ParsedPostback::parse(
                &crate::event::PostbackEvent {
                    at_us: 10,
                    ip: String::new(),
                    method: "GET".into(),
                    query: format!("clickid={}&action_id={action}", click.click_id),
                    body: None,
                    body_hex: None,
                    content_type: String::new(),
                    pixel: None,
                },
            )))
        };
        let mut p = Processor::new(String::new(), 16 * 1024);
        let first = click(1, 10);
        let out = p.apply(
            &catalog,
            &[
                (at(0), Parsed::Click(first.clone())),
                (at(1), postback(&first, "A")),
            ],
            Lookups::default(),
        );
        assert!(out.postbacks[0].error.is_empty(), "{:?}", out.postbacks[0]);
        // A batch that adds far more than the cache holds, then names the first click and
        // conversion again.
        let mut batch: Vec<(Position, Parsed)> = (2..200)
            .map(|i| (at(i), Parsed::Click(click(i as usize, 100))))
            .collect();
        batch.push((at(200), postback(&first, "B")));
        batch.push((at(201), postback(&first, "A")));
        assert!(
            p.missing_clicks(&batch).is_empty(),
            "the first click is in memory"
        );
        let lookups = Lookups::default();
        let asked = p.missing_conversions(&catalog, &batch, &lookups);
        assert_eq!(asked, vec!["1|1|B".to_string()], "A is in memory");
        let out = p.apply(&catalog, &batch, lookups);
        let errors: Vec<&str> = out.postbacks.iter().map(|r| r.error.as_str()).collect();
        assert_eq!(errors, vec!["", "Conversion exists"]);
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget() {
        let budget = 1 << 20;
        let mut recent: Recent<Click> = Recent::new(budget);
        for i in 0..10_000 {
            recent.insert(format!("{i:024x}"), click(i, 1000));
            recent.settle();
            assert!(
                recent.bytes() <= budget + 20_000,
                "{} bytes",
                recent.bytes()
            );
        }
        // The newest are still there; the oldest went.
        assert!(recent.get(&format!("{:024x}", 9_999)).is_some());
        assert!(recent.get(&format!("{:024x}", 0)).is_none());
        // Small entries: many fit.
        let mut small: Recent<Click> = Recent::new(budget);
        for i in 0..1000 {
            small.insert(format!("{i:024x}"), click(i, 1));
        }
        assert!((0..1000).all(|i| small.get(&format!("{i:024x}")).is_some()));
        // One entry larger than half the budget is not kept.
        small.insert("huge".into(), click(0, budget));
        assert!(small.get("huge").is_none());
    }
}
