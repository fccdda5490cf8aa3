//! The stream processor's logic, sans IO: it turns a batch of log events into rows for the
//! analytics store. The caller (the runtime in `postbackd`) reads the log, asks which clicks and
//! conversions the batch needs from the store, hands them over, and writes the output together
//! with the next log position in one idempotent step.
//!
//! Every output row's id is derived from the log position of the event that produced it, so
//! reprocessing a batch after a crash writes the same rows again, not new ones.
//!
//! It runs in one stage or two. A conversion is deduplicated on its key (offer, goal, action
//! id) while postbacks are partitioned by click id, so where partitions are spread over
//! processes (Kafka) a postback that passes its click's rules ([`Processor::judge_clicks`],
//! stage 1) is handed on as an [`Accepted`] record keyed by its conversion key, and the
//! [`Deduper`] that owns that key decides it (stage 2). Where one process owns every partition
//! (the embedded log), [`Processor::apply`] runs both halves in one pass, with the same rules
//! and the same ids.

use crate::catalog::Catalog;
use crate::delivery::{jobs_for, DeliveryJob};
use crate::event::{Event, PostbackEvent};
use crate::ids::{IdTag, ObjectId};
use crate::keys::Partition;
use crate::log::Position;
use crate::params::Params;
use crate::rules::{
    conversion_key, judge_click, judge_conversion, Candidate, Click, Context, Conversion, Outcome,
    ParsedPostback, Verdict,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// An event with its log position, parsed for processing.
#[derive(Debug, Clone)]
pub enum Parsed {
    Click(Click),
    Postback(Box<Postback>),
}

/// A postback as the processor holds it: the event as logged (stage 2 gets it again) and its
/// parameters, read once.
#[derive(Debug, Clone)]
pub struct Postback {
    pub event: PostbackEvent,
    pub parsed: ParsedPostback,
}

/// The longest a click's free-text fields (user agent, referrer, each sub, ...) are kept past
/// the log, in bytes: the log keeps them whole, but the processor holds clicks in memory and
/// copies them into the store and into conversions, so an attacker's 60 KiB subs must not
/// multiply there. Applied when a click is parsed, so a replay gives the same result.
pub const MAX_CLICK_FIELD_BYTES: usize = 2048;

pub fn parse(event: Event) -> Parsed {
    match event {
        Event::Click(c) => Parsed::Click(capped_click(&c)),
        Event::Postback(event) => Parsed::Postback(Box::new(Postback {
            parsed: ParsedPostback::parse(&event),
            event,
        })),
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
/// did not find in memory, so what it found must stay until the batch is done. What a batch
/// adds stays at least until the next batch is done too (it can only have moved to the
/// previous generation), so the next batch can be judged while this one is still being
/// written, unless this one wrote something too big to hold (`held_last_batch`).
#[derive(Debug)]
struct Recent<V> {
    current: HashMap<String, V>,
    previous: HashMap<String, V>,
    current_bytes: usize,
    budget: usize,
    /// An entry was refused (too big) since the last `settle`.
    refused: bool,
    /// The batch before the last `settle` had every entry it added held.
    held_last_batch: bool,
}

impl<V: Weight> Recent<V> {
    fn new(budget_bytes: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            current_bytes: 0,
            budget: budget_bytes.max(1),
            refused: false,
            held_last_batch: true,
        }
    }
    fn get(&self, k: &str) -> Option<&V> {
        self.current.get(k).or_else(|| self.previous.get(k))
    }
    fn insert(&mut self, k: String, v: V) {
        let bytes = k.len() + v.weight() + ENTRY_OVERHEAD;
        if bytes > self.budget / 2 {
            // Too big to keep at all: the store has it (once this batch is written).
            self.current.remove(&k);
            self.previous.remove(&k);
            self.refused = true;
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
        self.held_last_batch = !std::mem::take(&mut self.refused);
        if self.current_bytes > self.budget / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.current_bytes = 0;
        }
    }
    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
        self.current_bytes = 0;
        self.refused = false;
        self.held_last_batch = true;
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

/// A postback that passed every rule of its click (stage 1), on its way to the dedupe of its
/// conversion key (stage 2): a record of the `conversions` log, keyed by that key. It carries
/// what stage 2 needs to judge it again and write its row: the postback as logged, its click,
/// and its place in the events log, which every id stage 2 derives comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub partition: Partition,
    pub offset: u64,
    pub postback: PostbackEvent,
    pub click: Click,
    /// Stage 1 may have appended this record before: it redid a batch whose records may have
    /// been appended (after a failure, a crash or a hand-over). Stage 2 then writes rows that
    /// may be in the store already.
    #[serde(default)]
    pub maybe_copy: bool,
}

impl Accepted {
    fn position(&self) -> Position {
        Position {
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// What stage 1 made of a batch: the clicks, the rows of the postbacks it rejected, and the
/// postbacks it accepted, each with its conversion key.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Judged {
    pub clicks: Vec<Click>,
    pub rejected: Vec<ServerPostbackRow>,
    pub accepted: Vec<(String, Accepted)>,
}

/// The server-postback row of a postback so far: registered (`response_status` 1), ids from
/// its position.
fn postback_row(
    pb: &ParsedPostback,
    click: Option<&Click>,
    verdict: &Verdict,
    position: Position,
) -> ServerPostbackRow {
    let secs = u32::try_from(pb.at_us.div_euclid(1_000_000)).unwrap_or(0);
    ServerPostbackRow {
        id: ObjectId::derived(
            IdTag::ServerPostback,
            secs,
            position_byte(&position),
            position.offset,
        )
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
        advertiser_id: verdict.advertiser_id.clone(),
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
    }
}

/// The row of a postback rejected with `verdict`.
fn rejected_row(
    pb: &ParsedPostback,
    click: Option<&Click>,
    verdict: &Verdict,
    position: Position,
) -> ServerPostbackRow {
    let mut row = postback_row(pb, click, verdict, position);
    if let Outcome::Rejected(r) = verdict.outcome {
        row.response_status = 2;
        row.error = r.message().to_string();
    }
    row
}

/// Stage 1: the rules of a postback's click, and the clicks it needs, held per process.
pub struct Processor {
    platform_secure: String,
    clicks: Recent<Click>,
    /// The second half, for [`Processor::apply`] (one stage).
    deduper: Deduper,
}

impl Processor {
    /// `cache_bytes` bounds the memory of the clicks and conversions held (together).
    pub fn new(platform_secure: String, cache_bytes: usize) -> Self {
        Self {
            deduper: Deduper::new(platform_secure.clone(), cache_bytes / 2),
            platform_secure,
            clicks: Recent::new(cache_bytes / 2),
        }
    }

    /// Drops what is held in memory: after a failed write the cache may be ahead of the store.
    pub fn forget(&mut self) {
        self.clicks.clear();
        self.deduper.forget();
    }

    /// Whether memory holds everything the last batch added: then the next batch finds all of
    /// it here and can be judged before the last one is in the store.
    pub fn held_last_batch(&self) -> bool {
        self.clicks.held_last_batch && self.deduper.held_last_batch()
    }

    /// Click ids the batch's postbacks name that are neither held nor clicked in the batch.
    pub fn missing_clicks(&self, batch: &[(Position, Parsed)]) -> Vec<String> {
        self.missing_clicks_by_partition(batch)
            .into_iter()
            .map(|(_, id)| id)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// As [`Processor::missing_clicks`], with the partition of the postback that names each.
    pub fn missing_clicks_by_partition(
        &self,
        batch: &[(Position, Parsed)],
    ) -> Vec<(Partition, String)> {
        let in_batch: HashSet<&str> = batch
            .iter()
            .filter_map(|(_, p)| match p {
                Parsed::Click(c) => Some(c.click_id.as_str()),
                Parsed::Postback(_) => None,
            })
            .collect();
        let mut out: Vec<(Partition, String)> = batch
            .iter()
            .filter_map(|(at, p)| match p {
                Parsed::Postback(pb) => pb.parsed.clickid().map(|id| (at.partition, id)),
                Parsed::Click(_) => None,
            })
            .filter(|(_, id)| id.parse::<ObjectId>().is_ok())
            .map(|(p, id)| (p, id.to_lowercase()))
            .filter(|(_, id)| !in_batch.contains(id.as_str()) && self.clicks.get(id).is_none())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Conversion keys the batch's postbacks may hit that are not held in memory (one stage).
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
                    let pb = &pb.parsed;
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
                    if self.deduper.conversions.get(&key).is_none() {
                        out.push(key);
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Both stages in one pass, in log order: for a process that owns every partition.
    /// `lookups` holds what the store had of `missing_clicks` and `missing_conversions`.
    pub fn apply(
        &mut self,
        catalog: &Catalog,
        batch: Vec<(Position, Parsed)>,
        lookups: Lookups,
    ) -> Output {
        let ctx = Context {
            catalog,
            platform_secure: &self.platform_secure,
        };
        let mut out = Output::default();
        for (position, p) in batch {
            match p {
                Parsed::Click(c) => {
                    self.clicks.insert(c.click_id.clone(), c.clone());
                    out.clicks.push(c);
                }
                Parsed::Postback(pb) => {
                    let pb = &pb.parsed;
                    let click = click_of(&self.clicks, pb, &lookups);
                    match judge_click(pb, click, &ctx) {
                        Err(verdict) => out
                            .postbacks
                            .push(rejected_row(pb, click, &verdict, position)),
                        Ok(candidate) => self
                            .deduper
                            .decide(catalog, pb, click, candidate, position, &lookups, &mut out),
                    }
                }
            }
        }
        self.clicks.settle();
        self.deduper.conversions.settle();
        out
    }

    /// Stage 1 of two: the clicks, the rejections of the rules of each postback's click, and
    /// the postbacks that passed them, for the dedupe of their conversion key. `lookups` holds
    /// what the store had of `missing_clicks`; `maybe_copy` marks the accepted records as
    /// possibly appended before.
    pub fn judge_clicks(
        &mut self,
        catalog: &Catalog,
        batch: Vec<(Position, Parsed)>,
        lookups: Lookups,
        maybe_copy: bool,
    ) -> Judged {
        let ctx = Context {
            catalog,
            platform_secure: &self.platform_secure,
        };
        let mut out = Judged::default();
        for (position, p) in batch {
            match p {
                Parsed::Click(c) => {
                    self.clicks.insert(c.click_id.clone(), c.clone());
                    out.clicks.push(c);
                }
                Parsed::Postback(pb) => {
                    let Postback { event, parsed } = *pb;
                    let click = click_of(&self.clicks, &parsed, &lookups);
                    match judge_click(&parsed, click, &ctx) {
                        Err(verdict) => out
                            .rejected
                            .push(rejected_row(&parsed, click, &verdict, position)),
                        Ok(candidate) => {
                            let Some(click) = click.cloned() else {
                                continue; // judge_click accepts only with a click
                            };
                            out.accepted.push((
                                candidate.conversion.key,
                                Accepted {
                                    partition: position.partition,
                                    offset: position.offset,
                                    postback: event,
                                    click,
                                    maybe_copy,
                                },
                            ));
                        }
                    }
                }
            }
        }
        self.clicks.settle();
        out
    }
}

/// The click a postback names, held or looked up (a function of the clicks alone, so that the
/// dedupe can borrow the rest of the processor meanwhile).
fn click_of<'a>(
    clicks: &'a Recent<Click>,
    pb: &ParsedPostback,
    lookups: &'a Lookups,
) -> Option<&'a Click> {
    let id = pb.clickid()?.to_lowercase();
    clicks.get(&id).or_else(|| lookups.clicks.get(&id))
}

/// An accepted postback as stage 2 holds it: read again, and judged again on the catalog as
/// this process has it (the same as stage 1's, unless the catalog changed in between).
pub struct Staged {
    accepted: Accepted,
    parsed: ParsedPostback,
    judged: Result<Candidate, Verdict>,
}

impl Staged {
    /// The conversion key it needs, if it still passes its click's rules.
    pub fn key(&self) -> Option<&str> {
        self.judged.as_ref().ok().map(|c| c.conversion.key.as_str())
    }
    pub fn maybe_copy(&self) -> bool {
        self.accepted.maybe_copy
    }
}

/// Stage 2: decides each accepted postback against the conversion of its key, and holds the
/// conversions it needs.
pub struct Deduper {
    platform_secure: String,
    conversions: Recent<Conversion>,
}

impl Deduper {
    /// `cache_bytes` bounds the memory of the conversions held.
    pub fn new(platform_secure: String, cache_bytes: usize) -> Self {
        Self {
            platform_secure,
            conversions: Recent::new(cache_bytes),
        }
    }

    /// Drops what is held in memory (after a failed write, or partitions moved).
    pub fn forget(&mut self) {
        self.conversions.clear();
    }

    /// As [`Processor::held_last_batch`], for the conversions.
    pub fn held_last_batch(&self) -> bool {
        self.conversions.held_last_batch
    }

    /// Reads a batch of accepted postbacks, in log order. A record seen twice in the batch
    /// (stage 1 appended it again) is kept once.
    pub fn stage(&self, catalog: &Catalog, batch: Vec<Accepted>) -> Vec<Staged> {
        let ctx = Context {
            catalog,
            platform_secure: &self.platform_secure,
        };
        let mut seen = HashSet::new();
        batch
            .into_iter()
            .filter(|a| seen.insert(a.position()))
            .map(|accepted| {
                let parsed = ParsedPostback::parse(&accepted.postback);
                let judged = judge_click(&parsed, Some(&accepted.click), &ctx);
                Staged {
                    accepted,
                    parsed,
                    judged,
                }
            })
            .collect()
    }

    /// Conversion keys of the batch not held in memory.
    pub fn missing(&self, batch: &[Staged]) -> Vec<String> {
        let mut out: Vec<String> = batch
            .iter()
            .filter_map(Staged::key)
            .filter(|k| self.conversions.get(k).is_none())
            .map(str::to_string)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Decides the batch in log order; `lookups` holds the stored conversions of `missing`.
    pub fn apply(&mut self, catalog: &Catalog, batch: Vec<Staged>, lookups: Lookups) -> Output {
        let mut out = Output::default();
        for s in batch {
            let position = s.accepted.position();
            let click = Some(&s.accepted.click);
            match s.judged {
                Err(verdict) => {
                    out.postbacks
                        .push(rejected_row(&s.parsed, click, &verdict, position));
                }
                Ok(candidate) => self.decide(
                    catalog, &s.parsed, click, candidate, position, &lookups, &mut out,
                ),
            }
        }
        self.conversions.settle();
        out
    }

    /// The dedupe of one candidate: its row, and the conversion change and jobs it makes.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        catalog: &Catalog,
        pb: &ParsedPostback,
        click: Option<&Click>,
        candidate: Candidate,
        position: Position,
        lookups: &Lookups,
        out: &mut Output,
    ) {
        let key = &candidate.conversion.key;
        let current = self
            .conversions
            .get(key)
            .or_else(|| lookups.conversions.get(key));
        let verdict = judge_conversion(candidate, current);
        let mut row = rejected_row(pb, click, &verdict, position);
        let (partition, offset) = (position_byte(&position), position.offset);
        let secs = u32::try_from(pb.at_us.div_euclid(1_000_000)).unwrap_or(0);
        let change = match verdict.outcome {
            Outcome::Rejected(_) => None,
            Outcome::Created(mut c) => {
                c.id = ObjectId::derived(IdTag::Conversion, secs, partition, offset).to_hex();
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
        let Parsed::Click(c) = parse(Event::Click(big)) else {
            panic!("a click")
        };
        assert!(c.ua.len() <= MAX_CLICK_FIELD_BYTES && c.ua.len() > MAX_CLICK_FIELD_BYTES - 2);
        assert!(c.ua.chars().all(|ch| ch == 'é'));
        assert!(c.subs.iter().all(|s| s.len() == MAX_CLICK_FIELD_BYTES));
        assert_eq!(c.click_id, format!("{:024x}", 1));
        assert_eq!(truncate_at_char("abc", 10), "abc");
        assert_eq!(truncate_at_char("aé", 2), "a");
    }

    /// One offer (id 1) paying goal 1, default status `default_status`.
    fn catalog(default_status: u8) -> Catalog {
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
                default_status,
                secure: String::new(),
                allowed_ip: Vec::new(),
                hold_period: 0,
            },
        });
        catalog
    }

    fn at(partition: Partition, offset: u64) -> Position {
        Position { partition, offset }
    }

    /// A postback naming `click`, with more query parameters (`&action_id=A`, ...).
    fn postback(click: &Click, more: &str) -> Parsed {
        parse(Event::Postback(crate::event::PostbackEvent {
            at_us: 10,
            ip: String::new(),
            method: "GET".into(),
            query: format!("clickid={}{more}", click.click_id),
            body: None,
            body_hex: None,
            content_type: String::new(),
            pixel: None,
        }))
    }

    fn errors(out: &Output) -> Vec<(String, String)> {
        out.postbacks
            .iter()
            .map(|r| (r.id.clone(), r.error.clone()))
            .collect()
    }

    /// What a batch found in memory when it asked the store for the rest stays there until
    /// the batch is done, however many new entries the batch adds: an eviction in between
    /// would make a known click "not found" and a known conversion a second one.
    #[test]
    fn a_batch_keeps_what_it_found_in_memory() {
        let catalog = catalog(1);
        let at = |offset| at(0, offset);
        let postback =
            |click: &Click, action: &str| postback(click, &format!("&action_id={action}"));
        let mut p = Processor::new(String::new(), 16 * 1024);
        let first = click(1, 10);
        let out = p.apply(
            &catalog,
            vec![
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
        let out = p.apply(&catalog, batch, lookups);
        let errors: Vec<&str> = out.postbacks.iter().map(|r| r.error.as_str()).collect();
        assert_eq!(errors, vec!["", "Conversion exists"]);
    }

    /// The next batch may be judged while this one is written only if what this one added is
    /// still here after both batches settle: it is, unless it was too big to hold.
    #[test]
    fn what_a_batch_adds_outlives_the_next_batch_unless_it_was_refused() {
        let budget = 64 * 1024;
        let mut recent: Recent<Click> = Recent::new(budget);
        for i in 0..200 {
            // Batch i adds its clicks and settles; batch i + 1 (judged while i is written)
            // must still find them after it settles in turn.
            let batch: Vec<String> = (0..20).map(|j| format!("{i:012x}{j:012x}")).collect();
            for id in &batch {
                recent.insert(id.clone(), click(0, 100));
            }
            recent.settle();
            assert!(recent.held_last_batch);
            recent.insert(format!("next{i}"), click(0, 100));
            recent.settle();
            assert!(
                batch.iter().all(|id| recent.get(id).is_some()),
                "batch {i} was dropped one batch too early"
            );
        }
        recent.insert("huge".into(), click(0, budget));
        recent.settle();
        assert!(!recent.held_last_batch, "the huge one is only in the store");
        recent.insert("small".into(), click(0, 1));
        recent.settle();
        assert!(recent.held_last_batch);
        recent.insert("huge".into(), click(0, budget));
        recent.clear();
        recent.settle();
        assert!(
            recent.held_last_batch,
            "forgotten: the store has everything"
        );
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

    /// Two postbacks with one action id on two clicks in two partitions, each partition judged
    /// by its own stage-1 processor (as two processes would): the deduper that owns the key
    /// makes one conversion and one `Conversion exists`, with the rows, ids and jobs the
    /// one-stage pass gives; a record appended twice by stage 1 changes nothing.
    #[test]
    fn two_stages_dedupe_across_partitions_as_one_pass_does() {
        let catalog = catalog(2);
        let (c1, c2) = (click(1, 5), click(2, 5));
        let p0 = vec![
            (at(0, 0), Parsed::Click(c1.clone())),
            (at(0, 1), postback(&c1, "&secure=x&action_id=A")),
            (at(0, 2), postback(&c1, "&secure=x&action_id=A&status=1")),
        ];
        let p1 = vec![
            (at(1, 0), Parsed::Click(c2.clone())),
            (at(1, 1), postback(&c2, "&secure=x&action_id=A")),
            (at(1, 2), postback(&c2, "&secure=wrong&action_id=B")),
            (at(1, 3), postback(&c2, "&secure=x&action_id=A&status=3")),
        ];
        // One pass, partition 0's events first.
        let mut one = Processor::new("x".into(), 1 << 20);
        let all: Vec<_> = p0.iter().chain(&p1).cloned().collect();
        let single = one.apply(&catalog, all, Lookups::default());

        let mut first = Processor::new("x".into(), 1 << 20);
        let mut second = Processor::new("x".into(), 1 << 20);
        let judged0 = first.judge_clicks(&catalog, p0, Lookups::default(), false);
        let judged1 = second.judge_clicks(&catalog, p1, Lookups::default(), true);
        assert_eq!(judged0.accepted.len(), 2);
        assert_eq!(judged1.rejected.len(), 1, "B's secure code is wrong");
        assert_eq!(judged1.rejected[0].error, "Access denied");
        let keys: HashSet<&str> = judged0
            .accepted
            .iter()
            .chain(&judged1.accepted)
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, HashSet::from(["1|1|A"]), "one key: one deduper");
        // The conversions log of that key: partition 0's records, then partition 1's.
        let records: Vec<Accepted> = judged0
            .accepted
            .iter()
            .chain(&judged1.accepted)
            .map(|(_, a)| a.clone())
            .collect();
        let mut deduper = Deduper::new("x".into(), 1 << 20);
        let staged = deduper.stage(&catalog, records.clone());
        assert_eq!(deduper.missing(&staged), vec!["1|1|A".to_string()]);
        let two = deduper.apply(&catalog, staged, Lookups::default());

        let mut rows = errors(&two);
        rows.extend(
            judged0
                .rejected
                .iter()
                .chain(&judged1.rejected)
                .map(|r| (r.id.clone(), r.error.clone())),
        );
        let mut expected = errors(&single);
        rows.sort();
        expected.sort();
        assert_eq!(rows, expected, "the same rows as one pass");
        let outcomes: Vec<&str> = two.postbacks.iter().map(|r| r.error.as_str()).collect();
        assert_eq!(
            outcomes,
            vec![
                "",
                "",
                "Conversion exists",
                "Conversion status is not pending"
            ],
            "created pending, confirmed, the other click's duplicate, a late decline"
        );
        assert_eq!(two.changes, single.changes);
        assert_eq!(two.jobs, single.jobs);

        // Stage 1 redid partition 1's batch and appended its record again: in one batch or
        // the next, the copy makes nothing new and its row has the first one's id.
        let copy = records[2].clone();
        let again = deduper.stage(&catalog, vec![copy.clone(), copy.clone()]);
        assert_eq!(again.len(), 1, "a record twice in a batch is read once");
        assert!(again[0].maybe_copy());
        let out = deduper.apply(&catalog, again, Lookups::default());
        assert!(out.changes.is_empty() && out.jobs.is_empty());
        assert_eq!(out.postbacks[0].id, two.postbacks[2].id);

        // The record survives its wire form.
        let bytes = serde_json::to_vec(&copy).expect("encode");
        assert_eq!(
            serde_json::from_slice::<Accepted>(&bytes).expect("decode"),
            copy
        );
    }
}
