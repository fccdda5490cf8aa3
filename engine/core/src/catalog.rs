//! The catalog: advertisers, offers with their payments, partners (affiliates) and their
//! postback settings. Every change is a `CatalogEvent` in the log; the catalog keeps each
//! entity's versions by time, so that a postback is judged against the offer as it was when the
//! postback arrived, and a replay of the log gives the same results whatever changed since.

use crate::ids::ObjectId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advertiser {
    pub id: ObjectIdString,
    pub title: String,
    #[serde(default)]
    pub secure: String,
    #[serde(default)]
    pub allowed_ip: Vec<String>,
}

/// A 24-hex id kept as text, as Affise shows it.
pub type ObjectIdString = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfferStatus {
    Active,
    Paused,
    Stopped,
}

impl OfferStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "paused" => Some(Self::Paused),
            "stopped" => Some(Self::Stopped),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentType {
    Fixed,
    Percent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    pub goal: String,
    /// The affiliate's payout (fixed amount, or percent of `sum`).
    pub total: f64,
    /// The network's revenue from the advertiser (fixed amount, or percent of `sum`).
    pub revenue: f64,
    pub currency: String,
    #[serde(rename = "type")]
    pub kind: PaymentType,
    /// Default conversion status for this goal, when the postback passes none.
    #[serde(default)]
    pub status: Option<u8>,
}

impl Payment {
    /// Payout and revenue of a conversion of this goal for an order of `sum`.
    pub fn amounts(&self, sum: f64) -> (f64, f64) {
        match self.kind {
            PaymentType::Fixed => (self.total, self.revenue),
            PaymentType::Percent => (sum * self.total / 100.0, sum * self.revenue / 100.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub id: u64,
    pub offer_id: ObjectIdString,
    pub title: String,
    #[serde(default)]
    pub advertiser: String,
    pub url: String,
    pub status: OfferStatus,
    #[serde(default)]
    pub payments: Vec<Payment>,
    pub default_status: u8,
    #[serde(default)]
    pub secure: String,
    #[serde(default)]
    pub allowed_ip: Vec<String>,
    #[serde(default)]
    pub hold_period: u32,
}

impl Offer {
    /// The payment of `goal`, compared without regard to case.
    pub fn payment(&self, goal: &str) -> Option<&Payment> {
        self.payments
            .iter()
            .find(|p| p.goal.to_lowercase() == goal.to_lowercase())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partner {
    pub id: u64,
    pub email: String,
    #[serde(default)]
    pub login: String,
    #[serde(default)]
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostbackSetting {
    pub id: u64,
    pub partner_id: u64,
    pub url: String,
    /// `None`: a global postback, for every offer.
    #[serde(default)]
    pub offer_id: Option<u64>,
    /// Empty = any change; `by_creating`, `confirmed`, `pending`, `declined`, `hold`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub goal: String,
    pub method: String,
}

/// One change to the catalog: the whole new state of an entity (or its removal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CatalogEvent {
    Advertiser {
        at_us: i64,
        advertiser: Advertiser,
    },
    Offer {
        at_us: i64,
        offer: Offer,
    },
    Partner {
        at_us: i64,
        partner: Partner,
    },
    PostbackSetting {
        at_us: i64,
        postback: PostbackSetting,
    },
    PostbackSettingRemoved {
        at_us: i64,
        id: u64,
    },
}

impl CatalogEvent {
    pub fn at_us(&self) -> i64 {
        match self {
            Self::Advertiser { at_us, .. }
            | Self::Offer { at_us, .. }
            | Self::Partner { at_us, .. }
            | Self::PostbackSetting { at_us, .. }
            | Self::PostbackSettingRemoved { at_us, .. } => *at_us,
        }
    }
}

/// A catalog change as the catalog log holds it. Every process applies the log in order, so
/// the log decides between writers: a creation whose id is already taken (another process
/// created an entity with that id first) is void everywhere, and its writer tries again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogRecord {
    /// The writer created the entity (records written before this flag existed are updates).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create: bool,
    #[serde(flatten)]
    pub event: CatalogEvent,
}

/// An entity's states by the time they took effect (ascending). `None` marks a removal.
#[derive(Debug, Clone)]
struct Versions<T>(Vec<(i64, Option<T>)>);

impl<T> Default for Versions<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> Versions<T> {
    fn push(&mut self, at_us: i64, value: Option<T>) {
        // Events arrive in log order; keep the list sorted even if clocks disagree.
        let pos = self.0.partition_point(|(t, _)| *t <= at_us);
        self.0.insert(pos, (at_us, value));
    }
    fn at(&self, at_us: i64) -> Option<&T> {
        let pos = self.0.partition_point(|(t, _)| *t <= at_us);
        pos.checked_sub(1).and_then(|i| self.0[i].1.as_ref())
    }
    fn latest(&self) -> Option<&T> {
        self.0.last().and_then(|(_, v)| v.as_ref())
    }
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    advertisers: BTreeMap<String, Versions<Advertiser>>,
    offers: BTreeMap<u64, Versions<Offer>>,
    partners: BTreeMap<u64, Versions<Partner>>,
    postbacks: BTreeMap<u64, Versions<PostbackSetting>>,
    /// The latest time of any change applied.
    last_change_us: i64,
}

impl Catalog {
    pub fn apply(&mut self, event: CatalogEvent) {
        self.last_change_us = self.last_change_us.max(event.at_us());
        match event {
            CatalogEvent::Advertiser { at_us, advertiser } => self
                .advertisers
                .entry(advertiser.id.clone())
                .or_default()
                .push(at_us, Some(advertiser)),
            CatalogEvent::Offer { at_us, offer } => self
                .offers
                .entry(offer.id)
                .or_default()
                .push(at_us, Some(offer)),
            CatalogEvent::Partner { at_us, partner } => self
                .partners
                .entry(partner.id)
                .or_default()
                .push(at_us, Some(partner)),
            CatalogEvent::PostbackSetting { at_us, postback } => self
                .postbacks
                .entry(postback.id)
                .or_default()
                .push(at_us, Some(postback)),
            CatalogEvent::PostbackSettingRemoved { at_us, id } => {
                self.postbacks.entry(id).or_default().push(at_us, None)
            }
        }
    }

    /// Applies a record of the catalog log; false when it is a creation whose id was taken
    /// first (the record is then void: nothing changes).
    pub fn apply_record(&mut self, record: CatalogRecord) -> bool {
        if record.create && self.has_id_of(&record.event) {
            return false;
        }
        self.apply(record.event);
        true
    }

    /// Whether the entity the event writes has (or had) a state already.
    fn has_id_of(&self, event: &CatalogEvent) -> bool {
        match event {
            CatalogEvent::Advertiser { advertiser, .. } => {
                self.advertisers.contains_key(&advertiser.id)
            }
            CatalogEvent::Offer { offer, .. } => self.offers.contains_key(&offer.id),
            CatalogEvent::Partner { partner, .. } => self.partners.contains_key(&partner.id),
            CatalogEvent::PostbackSetting { postback, .. } => {
                self.postbacks.contains_key(&postback.id)
            }
            CatalogEvent::PostbackSettingRemoved { id, .. } => self.postbacks.contains_key(id),
        }
    }

    /// The latest time of any change: a view `_at` this time (or later) shows every change.
    pub fn last_change_us(&self) -> i64 {
        self.last_change_us
    }

    pub fn offer(&self, id: u64) -> Option<&Offer> {
        self.offers.get(&id).and_then(Versions::latest)
    }
    pub fn offer_at(&self, id: u64, at_us: i64) -> Option<&Offer> {
        self.offers.get(&id).and_then(|v| v.at(at_us))
    }
    pub fn offers(&self) -> impl Iterator<Item = &Offer> {
        self.offers.values().filter_map(Versions::latest)
    }
    /// The offers as they were at `at_us`, by id.
    pub fn offers_at(&self, at_us: i64) -> impl Iterator<Item = &Offer> {
        self.offers.values().filter_map(move |v| v.at(at_us))
    }
    pub fn next_offer_id(&self) -> u64 {
        self.offers.keys().next_back().map_or(1, |k| k + 1)
    }

    pub fn advertiser(&self, id: &str) -> Option<&Advertiser> {
        self.advertisers.get(id).and_then(Versions::latest)
    }
    pub fn advertiser_at(&self, id: &str, at_us: i64) -> Option<&Advertiser> {
        self.advertisers.get(id).and_then(|v| v.at(at_us))
    }
    pub fn advertisers(&self) -> impl Iterator<Item = &Advertiser> {
        self.advertisers.values().filter_map(Versions::latest)
    }
    /// The advertisers as they were at `at_us`, by id (which begins with the creation time).
    pub fn advertisers_at(&self, at_us: i64) -> impl Iterator<Item = &Advertiser> {
        self.advertisers.values().filter_map(move |v| v.at(at_us))
    }

    pub fn partner(&self, id: u64) -> Option<&Partner> {
        self.partners.get(&id).and_then(Versions::latest)
    }
    pub fn partners(&self) -> impl Iterator<Item = &Partner> {
        self.partners.values().filter_map(Versions::latest)
    }
    /// The partners as they were at `at_us`, by id.
    pub fn partners_at(&self, at_us: i64) -> impl Iterator<Item = &Partner> {
        self.partners.values().filter_map(move |v| v.at(at_us))
    }
    pub fn next_partner_id(&self) -> u64 {
        self.partners.keys().next_back().map_or(1, |k| k + 1)
    }

    pub fn postback(&self, id: u64) -> Option<&PostbackSetting> {
        self.postbacks.get(&id).and_then(Versions::latest)
    }
    pub fn postbacks(&self) -> impl Iterator<Item = &PostbackSetting> {
        self.postbacks.values().filter_map(Versions::latest)
    }
    pub fn postbacks_at(&self, at_us: i64) -> impl Iterator<Item = &PostbackSetting> {
        self.postbacks.values().filter_map(move |v| v.at(at_us))
    }
    pub fn next_postback_id(&self) -> u64 {
        self.postbacks.keys().next_back().map_or(1, |k| k + 1)
    }
}

/// Parses an allow-list as operators type it: IPs and CIDRs, separated by commas, spaces or
/// newlines. Returns the entries and the first one that is neither an IP nor a CIDR.
pub fn parse_allowed_ip(input: &str) -> Result<Vec<String>, String> {
    let entries: Vec<String> = input
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    match entries.iter().find(|e| parse_net(e).is_none()) {
        Some(bad) => Err(bad.clone()),
        None => Ok(entries),
    }
}

/// Whether `ip` is in one of the allow-list entries. An empty list allows every address.
pub fn ip_allowed(allowed: &[String], ip: &str) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|e| parse_net(e))
        .any(|net| net.contains(&ip))
}

fn parse_net(entry: &str) -> Option<ipnet::IpNet> {
    entry
        .parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Whether a string looks like an id the catalog hands out for advertisers.
pub fn is_object_id(s: &str) -> bool {
    s.parse::<ObjectId>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(id: u64, status: OfferStatus) -> Offer {
        Offer {
            id,
            offer_id: "0".repeat(24),
            title: "T".into(),
            advertiser: String::new(),
            url: "http://x".into(),
            status,
            payments: vec![],
            default_status: 1,
            secure: String::new(),
            allowed_ip: vec![],
            hold_period: 0,
        }
    }

    #[test]
    fn versions_answer_as_of_a_time() {
        let mut c = Catalog::default();
        c.apply(CatalogEvent::Offer {
            at_us: 10,
            offer: offer(1, OfferStatus::Active),
        });
        c.apply(CatalogEvent::Offer {
            at_us: 20,
            offer: offer(1, OfferStatus::Paused),
        });
        assert!(c.offer_at(1, 5).is_none());
        assert_eq!(
            c.offer_at(1, 15).map(|o| o.status),
            Some(OfferStatus::Active)
        );
        assert_eq!(
            c.offer_at(1, 20).map(|o| o.status),
            Some(OfferStatus::Paused)
        );
        assert_eq!(c.offer(1).map(|o| o.status), Some(OfferStatus::Paused));
        assert_eq!(c.next_offer_id(), 2);
    }

    #[test]
    fn the_first_creation_of_an_id_wins() {
        let mut c = Catalog::default();
        let create = |at_us, title: &str| {
            let mut o = offer(1, OfferStatus::Active);
            o.title = title.into();
            CatalogRecord {
                create: true,
                event: CatalogEvent::Offer { at_us, offer: o },
            }
        };
        assert!(c.apply_record(create(10, "first")));
        assert!(!c.apply_record(create(5, "second")), "id 1 is taken");
        assert_eq!(c.offer(1).map(|o| o.title.as_str()), Some("first"));
        assert_eq!(c.next_offer_id(), 2);
        let update = CatalogRecord {
            create: false,
            ..create(20, "renamed")
        };
        assert!(c.apply_record(update));
        assert_eq!(c.offer(1).map(|o| o.title.as_str()), Some("renamed"));
    }

    #[test]
    fn records_keep_the_event_format() {
        let event = CatalogEvent::Offer {
            at_us: 7,
            offer: offer(2, OfferStatus::Active),
        };
        // A record written before `create` existed reads as an update.
        let old = serde_json::to_string(&event).expect("encode");
        let record: CatalogRecord = serde_json::from_str(&old).expect("decode");
        assert_eq!(
            record,
            CatalogRecord {
                create: false,
                event: event.clone()
            }
        );
        let new = CatalogRecord {
            create: true,
            event,
        };
        let text = serde_json::to_string(&new).expect("encode");
        assert!(
            text.starts_with(r#"{"create":true,"type":"offer","#),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<CatalogRecord>(&text).expect("decode"),
            new
        );
    }

    #[test]
    fn removed_postback_settings_disappear() {
        let mut c = Catalog::default();
        let pb = PostbackSetting {
            id: 3,
            partner_id: 1,
            url: "http://a".into(),
            offer_id: None,
            status: String::new(),
            goal: String::new(),
            method: "GET".into(),
        };
        c.apply(CatalogEvent::PostbackSetting {
            at_us: 1,
            postback: pb,
        });
        c.apply(CatalogEvent::PostbackSettingRemoved { at_us: 2, id: 3 });
        assert!(c.postback(3).is_none());
        assert_eq!(c.postbacks_at(1).count(), 1);
        assert_eq!(c.next_postback_id(), 4);
    }

    #[test]
    fn allow_lists() {
        let list = parse_allowed_ip("10.0.0.0/8, 192.168.1.7\n::1").expect("valid");
        assert_eq!(list.len(), 3);
        assert!(ip_allowed(&list, "10.2.3.4"));
        assert!(ip_allowed(&list, "192.168.1.7"));
        assert!(ip_allowed(&list, "::1"));
        assert!(!ip_allowed(&list, "192.168.1.8"));
        assert!(!ip_allowed(&list, "not-an-ip"));
        assert!(ip_allowed(&[], "1.2.3.4"));
        assert_eq!(parse_allowed_ip("1.2.3.4,bogus"), Err("bogus".to_string()));
    }

    #[test]
    fn payments_match_goals_without_case_and_compute_amounts() {
        let mut o = offer(1, OfferStatus::Active);
        o.payments.push(Payment {
            goal: "Install".into(),
            total: 10.0,
            revenue: 20.0,
            currency: "USD".into(),
            kind: PaymentType::Percent,
            status: None,
        });
        let p = o.payment("install").expect("case-insensitive");
        assert_eq!(p.amounts(50.0), (5.0, 10.0));
        assert!(o.payment("sale").is_none());
    }
}
