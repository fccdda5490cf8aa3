//! Affiliate postbacks (CONTRACT section 5), sans IO: which postback settings a conversion
//! change triggers, the delivery jobs with their URLs filled, and the retry policy. Which
//! addresses a delivery may reach is `crate::address`'s.
//!
//! A job's id comes from the log position of the postback that changed the conversion and the
//! setting's id, so that reprocessing creates the same job, never a second one.

use crate::catalog::{Catalog, PostbackSetting};
use crate::ids::{IdTag, ObjectId};
use crate::keys::Partition;
use crate::processor::ConversionChange;
use crate::rules::status_name;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One delivery to make: a setting, for one state of one conversion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryJob {
    pub job_id: String,
    /// When the conversion reached this state (Unix microseconds).
    pub at_us: i64,
    pub setting_id: u64,
    pub pid: u64,
    pub offer_id: u64,
    /// The conversion id (Affise's `lead_id`).
    pub lead_id: String,
    pub goal: String,
    pub status: u8,
    pub payouts: f64,
    pub revenue: f64,
    pub currency: String,
    /// The conversion's comment.
    pub notice: String,
    /// `s2s` or `pixel`: how the advertiser reported the conversion.
    pub integration_type: String,
    pub method: String,
    /// The URL with its macros filled.
    pub url: String,
}

impl DeliveryJob {
    /// The host (and port) the job's URL names, lowercased: deliveries are limited and
    /// scheduled per host. A URL without one gives `-`.
    pub fn host(&self) -> String {
        host_of(&self.url)
    }
}

/// The authority of a URL without its user info, lowercased (`aff.example:8080`), or `-`.
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        "-".into()
    } else {
        host.to_ascii_lowercase()
    }
}

/// Which due jobs to take (`Store::due_jobs`): fairly across hosts, so that a host with
/// thousands of due jobs (a dead affiliate) does not hold up another host's first attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueQuery {
    pub now_us: i64,
    /// Each host's soonest due jobs, at most this many.
    pub per_host: usize,
    /// Hosts are visited in order after this one (the previous call's last), wrapping around.
    pub after_host: String,
    /// Stop once this many jobs are taken...
    pub limit: usize,
    /// ...or this many hosts were visited, or every host once.
    pub max_hosts: usize,
    /// Only jobs of these partitions of the deliveries log (`None`: every partition).
    pub partitions: Option<Vec<Partition>>,
}

/// Due jobs, and the last host visited (the next query's `after_host`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DueJobs {
    pub jobs: Vec<JobState>,
    pub last_host: String,
}

/// A record of the `deliveries` log: a job to do, an attempt made, or an operator's re-send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeliveryRecord {
    Job(DeliveryJob),
    Attempt(Attempt),
    /// Deliver again: a new round of attempts, whatever the job's state.
    Resend {
        job_id: String,
        at_us: i64,
    },
}

impl DeliveryRecord {
    /// When the record's fact happened (Unix microseconds).
    pub fn at_us(&self) -> i64 {
        match self {
            DeliveryRecord::Job(j) => j.at_us,
            DeliveryRecord::Attempt(a) => a.at_us,
            DeliveryRecord::Resend { at_us, .. } => *at_us,
        }
    }

    pub fn job_id(&self) -> &str {
        match self {
            DeliveryRecord::Job(j) => &j.job_id,
            DeliveryRecord::Attempt(a) => &a.job_id,
            DeliveryRecord::Resend { job_id, .. } => job_id,
        }
    }
}

/// One attempt to deliver a job, and what follows from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub job_id: String,
    /// Counts from 1 over the job's whole life (re-sends continue the count).
    pub attempt: u32,
    pub at_us: i64,
    /// The answer's status; 0 when the server could not be reached.
    pub http_code: u16,
    /// Why it failed (timeout, DNS, refused, TLS, or the start of a non-2xx body); empty on
    /// success.
    pub error: String,
    pub state: JobStatus,
    /// When to try again, for `Pending`.
    #[serde(default)]
    pub next_at_us: Option<i64>,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Delivered,
    Failed,
    GaveUp,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Delivered => "delivered",
            JobStatus::Failed => "failed",
            JobStatus::GaveUp => "gave_up",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            JobStatus::Pending,
            JobStatus::Delivered,
            JobStatus::Failed,
            JobStatus::GaveUp,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }
}

/// A job with its delivery state, as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobState {
    pub job: DeliveryJob,
    pub status: JobStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// Attempts made before the last re-send: the retry budget counts from here.
    pub round_base: u32,
    pub next_at_us: i64,
}

/// One attempt as the affiliate-postback log shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub job: DeliveryJob,
    pub attempt: Attempt,
}

/// Whether `setting` fires for this change of a conversion of `goal` on `offer_id`.
pub fn triggers(setting: &PostbackSetting, change: &ConversionChange) -> bool {
    let c = &change.conversion;
    if setting.partner_id != c.pid {
        return false;
    }
    if let Some(offer) = setting.offer_id {
        if offer != c.offer_id {
            return false;
        }
        if !setting.goal.is_empty() && setting.goal.to_lowercase() != c.goal.to_lowercase() {
            return false;
        }
    }
    match setting.status.as_str() {
        "" => true,
        "by_creating" => change.created,
        wanted => status_name(c.status) == Some(wanted),
    }
}

/// The jobs a conversion change creates, with macros filled as of `at_us`.
/// `offset` is the log position of the postback that made the change.
pub fn jobs_for(
    change: &ConversionChange,
    catalog: &Catalog,
    offer_name: &str,
    pixel: bool,
    partition: u8,
    offset: u64,
) -> Vec<DeliveryJob> {
    let c = &change.conversion;
    let at_us = c.updated_us;
    let mut settings: Vec<&PostbackSetting> = catalog
        .postbacks_at(at_us)
        .filter(|s| triggers(s, change))
        .collect();
    settings.sort_by_key(|s| s.id);
    settings
        .into_iter()
        .map(|s| {
            let job_id = job_id(at_us, partition, offset, s.id);
            let url = crate::macros::fill(&s.url, |name| {
                macro_value(name, change, offer_name, &job_id)
            });
            DeliveryJob {
                job_id,
                at_us,
                setting_id: s.id,
                pid: c.pid,
                offer_id: c.offer_id,
                lead_id: c.id.clone(),
                goal: c.goal.clone(),
                status: c.status,
                payouts: c.payouts,
                revenue: c.revenue,
                currency: c.currency.clone(),
                notice: c.comment.clone(),
                integration_type: if pixel { "pixel" } else { "s2s" }.into(),
                method: s.method.clone(),
                url,
            }
        })
        .collect()
}

/// The URL `setting` would call for `change`: its macros filled, nothing sent.
pub fn preview_url(
    setting: &PostbackSetting,
    change: &ConversionChange,
    offer_name: &str,
) -> String {
    crate::macros::fill(&setting.url, |name| {
        macro_value(name, change, offer_name, "preview")
    })
}

/// `ObjectId` time + tag + partition + a mix of the offset and the setting id.
fn job_id(at_us: i64, partition: u8, offset: u64, setting_id: u64) -> String {
    let secs = u32::try_from(at_us.div_euclid(1_000_000)).unwrap_or(0);
    // 32 bits of offset and 16 of setting (the id keeps 48 bits) keep jobs apart.
    let mixed = (offset << 16) | (setting_id & 0xffff);
    ObjectId::derived(IdTag::Delivery, secs, partition, mixed).to_hex()
}

fn number(v: f64) -> String {
    // 5.0 shows as "5", 2.5 as "2.5".
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn macro_value(
    name: &str,
    change: &ConversionChange,
    offer_name: &str,
    job_id: &str,
) -> Option<String> {
    let c = &change.conversion;
    let (date, time) = civil(c.updated_us);
    let value = match name {
        "clickid" => c.clickid.clone(),
        "transactionid" | "action_id" => c.action_id.clone(),
        "conversion_id" | "lead_id" => c.id.clone(),
        "offerid" | "offer_id" => c.offer_id.to_string(),
        "offer_name" => offer_name.to_string(),
        "goal" => c.goal.clone(),
        "status" => c.status.to_string(),
        "sum" => number(c.sum),
        "payouts" | "payout" => number(c.payouts),
        "currency" => c.currency.clone(),
        "ip" => c.ip.clone(),
        "comment" => c.comment.clone(),
        "promo_code" => c.promo_code.clone(),
        "user_id" => c.user_id.clone(),
        "uagent" => c.ua.clone(),
        "date" | "date_only" => date,
        "time" => time,
        "timestamp" => c.updated_us.div_euclid(1_000_000).to_string(),
        "click_date" => civil(c.click_us).0,
        "rand" => format!("{job_id}{:08x}", stable_hash(job_id)),
        _ => {
            if let Some(n) = name
                .strip_prefix("sub")
                .and_then(|n| n.parse::<usize>().ok())
            {
                return (1..=8)
                    .contains(&n)
                    .then(|| c.subs.get(n - 1).cloned().unwrap_or_default());
            }
            let n = name
                .strip_prefix("custom_field_")
                .or_else(|| name.strip_prefix("custom_field"))
                .and_then(|n| n.parse::<usize>().ok())?;
            return (1..=7)
                .contains(&n)
                .then(|| c.custom_fields.get(n - 1).cloned().unwrap_or_default());
        }
    };
    Some(value)
}

/// A stable pseudo-random number from a string (FNV-1a), so `{rand}` is the same on replay.
fn stable_hash(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `(YYYY-MM-DD, HH:MM:SS)` in UTC.
pub fn civil(at_us: i64) -> (String, String) {
    let secs = at_us.div_euclid(1_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
    )
}

/// What an attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// An HTTP answer with this status.
    Answered(u16),
    /// No answer: connection refused, DNS, TLS, timeout.
    Unreachable,
    /// The target is not allowed (an internal address): never retried.
    Forbidden,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Delivered,
    /// Retry after this long.
    RetryIn(Duration),
    /// A final failure (4xx other than 429, a forbidden target).
    Failed,
    /// Retries exhausted.
    GaveUp,
}

/// Retries with exponential backoff and jitter, up to `max_attempts` attempts in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base: Duration::from_secs(10),
            max_delay: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// `attempt` counts from 1; `jitter` is a random number in [0, 1) from the caller;
    /// `retry_after` is the server's `Retry-After`, honoured up to `max_delay`.
    pub fn next(
        &self,
        attempt: u32,
        result: AttemptResult,
        jitter: f64,
        retry_after: Option<Duration>,
    ) -> Next {
        let retryable = match result {
            AttemptResult::Answered(code) if (200..300).contains(&code) => return Next::Delivered,
            AttemptResult::Answered(code) => code == 429 || code >= 500,
            AttemptResult::Unreachable => true,
            AttemptResult::Forbidden => false,
        };
        if !retryable {
            return Next::Failed;
        }
        if attempt >= self.max_attempts {
            return Next::GaveUp;
        }
        // base * 2^(attempt-1), full jitter on the upper half: [d/2, d).
        let exp = self.base.saturating_mul(1u32 << (attempt - 1).min(20));
        let capped = exp.min(self.max_delay);
        let delay = capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        let delay = match retry_after {
            Some(ra) => delay.max(ra.min(self.max_delay)),
            None => delay,
        };
        Next::RetryIn(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogEvent;
    use crate::rules::Conversion;

    fn conversion(status: u8) -> Conversion {
        Conversion {
            id: "c".repeat(24),
            key: String::new(),
            offer_id: 7,
            pid: 3,
            advertiser_id: String::new(),
            goal: "Install".into(),
            action_id: "ord 1".into(),
            clickid: "k".repeat(24),
            status,
            sum: 50.0,
            payouts: 5.0,
            revenue: 10.0,
            currency: "USD".into(),
            ip: "1.2.3.4".into(),
            ua: "UA".into(),
            comment: "hi".into(),
            subs: vec!["aff-click".into(), String::new()],
            custom_fields: vec!["cf1".into()],
            promo_code: String::new(),
            user_id: String::new(),
            created_us: 1_700_000_000_000_000,
            updated_us: 1_700_000_061_000_000,
            click_us: 1_699_990_000_000_000,
        }
    }

    fn setting(id: u64, offer: Option<u64>, goal: &str, status: &str) -> PostbackSetting {
        PostbackSetting {
            id,
            partner_id: 3,
            url: "https://aff.example/pb?c={sub1}&t={transactionid}&s={status}&p={payouts}&d={date}+{time}&x={unknown}".into(),
            offer_id: offer,
            status: status.into(),
            goal: goal.into(),
            method: "GET".into(),
        }
    }

    #[test]
    fn status_triggers() {
        let created = ConversionChange {
            created: true,
            conversion: conversion(2),
        };
        let changed = ConversionChange {
            created: false,
            conversion: conversion(1),
        };
        assert!(triggers(&setting(1, None, "", ""), &created));
        assert!(triggers(&setting(1, None, "", ""), &changed));
        assert!(triggers(&setting(1, None, "", "by_creating"), &created));
        assert!(!triggers(&setting(1, None, "", "by_creating"), &changed));
        assert!(triggers(&setting(1, None, "", "pending"), &created));
        assert!(!triggers(&setting(1, None, "", "pending"), &changed));
        assert!(triggers(&setting(1, None, "", "confirmed"), &changed));
        assert!(!triggers(&setting(1, None, "", "declined"), &changed));
    }

    #[test]
    fn local_settings_match_offer_and_goal_without_case() {
        let change = ConversionChange {
            created: true,
            conversion: conversion(1),
        };
        assert!(triggers(&setting(1, Some(7), "", ""), &change));
        assert!(triggers(&setting(1, Some(7), "install", ""), &change));
        assert!(!triggers(&setting(1, Some(7), "sale", ""), &change));
        assert!(!triggers(&setting(1, Some(8), "", ""), &change));
        let mut other = setting(1, None, "", "");
        other.partner_id = 4;
        assert!(!triggers(&other, &change), "another partner's postback");
    }

    #[test]
    fn jobs_have_filled_urls_and_stable_ids() {
        let mut catalog = Catalog::default();
        for s in [
            setting(1, None, "", ""),
            setting(2, Some(7), "", "declined"),
            setting(3, Some(7), "install", ""),
        ] {
            catalog.apply(CatalogEvent::PostbackSetting {
                at_us: 0,
                postback: s,
            });
        }
        let change = ConversionChange {
            created: true,
            conversion: conversion(1),
        };
        let jobs = jobs_for(&change, &catalog, "Offer", false, 0, 42);
        assert_eq!(
            jobs.iter().map(|j| j.setting_id).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(
            jobs[0].url,
            "https://aff.example/pb?c=aff-click&t=ord%201&s=1&p=5&d=2023-11-14+22:14:21&x={unknown}"
                .replace("22:14:21", "22%3A14%3A21")
        );
        assert_eq!(jobs[0].integration_type, "s2s");
        assert_ne!(jobs[0].job_id, jobs[1].job_id);
        assert_eq!(
            jobs,
            jobs_for(&change, &catalog, "Offer", false, 0, 42),
            "deterministic"
        );
        assert_ne!(
            jobs[0].job_id,
            jobs_for(&change, &catalog, "Offer", false, 0, 43)[0].job_id
        );
    }

    #[test]
    fn retry_policy() {
        let p = RetryPolicy {
            max_attempts: 4,
            base: Duration::from_secs(10),
            max_delay: Duration::from_secs(25),
        };
        assert_eq!(
            p.next(1, AttemptResult::Answered(204), 0.5, None),
            Next::Delivered
        );
        assert_eq!(
            p.next(1, AttemptResult::Answered(404), 0.5, None),
            Next::Failed
        );
        assert_eq!(p.next(1, AttemptResult::Forbidden, 0.5, None), Next::Failed);
        assert_eq!(
            p.next(1, AttemptResult::Answered(500), 0.0, None),
            Next::RetryIn(Duration::from_secs(5))
        );
        assert_eq!(
            p.next(2, AttemptResult::Unreachable, 0.0, None),
            Next::RetryIn(Duration::from_secs(10))
        );
        assert_eq!(
            p.next(3, AttemptResult::Answered(503), 0.999_999, None),
            Next::RetryIn(Duration::from_secs(25).mul_f64(0.999_999_5))
        );
        assert_eq!(
            p.next(
                1,
                AttemptResult::Answered(429),
                0.0,
                Some(Duration::from_secs(20))
            ),
            Next::RetryIn(Duration::from_secs(20)),
            "Retry-After wins when longer"
        );
        assert_eq!(
            p.next(
                1,
                AttemptResult::Answered(429),
                0.0,
                Some(Duration::from_secs(9999))
            ),
            Next::RetryIn(Duration::from_secs(25)),
            "...up to the cap"
        );
        assert_eq!(
            p.next(4, AttemptResult::Answered(500), 0.5, None),
            Next::GaveUp
        );
    }

    #[test]
    fn hosts_of_urls() {
        assert_eq!(
            host_of("https://Aff.Example:8443/pb?x=1"),
            "aff.example:8443"
        );
        assert_eq!(host_of("http://user:pw@h.example/x"), "h.example");
        assert_eq!(host_of("http://h.example?x=@y"), "h.example");
        assert_eq!(host_of("http://[::1]:80/"), "[::1]:80");
        assert_eq!(host_of("nonsense"), "nonsense");
        assert_eq!(host_of("http:///x"), "-");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), ("1970-01-01".to_string(), "00:00:00".to_string()));
        assert_eq!(civil(951_782_400_000_000).0, "2000-02-29");
        assert_eq!(
            civil(-1_000_000),
            ("1969-12-31".to_string(), "23:59:59".to_string())
        );
    }
}
