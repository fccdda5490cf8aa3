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
use crate::params::Params;
use crate::rules::{conversion_key, judge, Click, Context, Conversion, Outcome, ParsedPostback};
use std::collections::HashMap;

/// An event with its log position, parsed for processing.
#[derive(Debug, Clone)]
pub enum Parsed {
    Click(Click),
    Postback(Box<ParsedPostback>),
}

pub fn parse(event: &Event) -> Parsed {
    match event {
        Event::Click(c) => Parsed::Click(c.clone()),
        Event::Postback(p) => Parsed::Postback(Box::new(ParsedPostback::parse(p))),
    }
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

/// A map that forgets its oldest half when full: recent clicks and conversions stay in memory,
/// older ones come from the store.
#[derive(Debug)]
struct Recent<V> {
    current: HashMap<String, V>,
    previous: HashMap<String, V>,
    capacity: usize,
}

impl<V> Recent<V> {
    fn new(capacity: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity: capacity.max(1),
        }
    }
    fn get(&self, k: &str) -> Option<&V> {
        self.current.get(k).or_else(|| self.previous.get(k))
    }
    fn insert(&mut self, k: String, v: V) {
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(k, v);
    }
    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }
}

pub struct Processor {
    platform_secure: String,
    partition: u8,
    clicks: Recent<Click>,
    conversions: Recent<Conversion>,
}

impl Processor {
    /// `cache_capacity` bounds the clicks and conversions held in memory (each, per generation).
    pub fn new(platform_secure: String, partition: u8, cache_capacity: usize) -> Self {
        Self {
            platform_secure,
            partition,
            clicks: Recent::new(cache_capacity),
            conversions: Recent::new(cache_capacity),
        }
    }

    /// Drops what is held in memory: after a failed write the cache may be ahead of the store.
    pub fn forget(&mut self) {
        self.clicks.clear();
        self.conversions.clear();
    }

    /// Click ids the batch's postbacks name that are neither held nor clicked in the batch.
    pub fn missing_clicks(&self, batch: &[(u64, Parsed)]) -> Vec<String> {
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
        batch: &[(u64, Parsed)],
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
        batch: &[(u64, Parsed)],
        lookups: Lookups,
    ) -> Output {
        let ctx = Context {
            catalog,
            platform_secure: &self.platform_secure,
        };
        let mut out = Output::default();
        for (offset, p) in batch {
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
                        id: ObjectId::derived(IdTag::ServerPostback, secs, self.partition, *offset)
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
                    };
                    let change = match verdict.outcome {
                        Outcome::Rejected(r) => {
                            row.response_status = 2;
                            row.error = r.message().to_string();
                            None
                        }
                        Outcome::Created(mut c) => {
                            c.id =
                                ObjectId::derived(IdTag::Conversion, secs, self.partition, *offset)
                                    .to_hex();
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
                            &change,
                            catalog,
                            offer_name,
                            pb.pixel,
                            self.partition,
                            *offset,
                        ));
                        self.conversions
                            .insert(change.conversion.key.clone(), change.conversion.clone());
                        out.changes.push(change);
                    }
                    out.postbacks.push(row);
                }
            }
        }
        out
    }
}
