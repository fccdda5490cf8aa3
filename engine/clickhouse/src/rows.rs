//! Rows as the tables hold them (`schemas/clickhouse/`), and as the queries of `sql.rs` read
//! them: the same names, in the same order, of types both 18.16 and current servers have.

use crate::sql::search_text;
use clickhouse::Row;
use postback_core::delivery::{Attempt, AttemptRow, DeliveryJob, JobStatus};
use postback_core::params::Params;
use postback_core::processor::ServerPostbackRow;
use postback_core::rules::{Click, Conversion};
use serde::{Deserialize, Serialize};

/// Makes a merge keep the first copy of a row (ReplacingMergeTree keeps the highest version).
fn keep_first(written_us: i64) -> u64 {
    u64::MAX - written_us.max(0) as u64
}

fn pairs_json(p: &Params) -> String {
    serde_json::to_string(&p.0).unwrap_or_else(|_| "[]".into())
}

fn pairs_from_json(s: &str) -> Params {
    Params(serde_json::from_str(s).unwrap_or_default())
}

#[derive(Row, Serialize)]
pub struct PostbackInsert {
    pub id: String,
    pub at_us: i64,
    pub written_us: i64,
    pub keep_first: u64,
    pub server: String,
    pub method: String,
    pub get_pairs: String,
    pub post_pairs: String,
    pub search: String,
    pub pixel: u8,
    pub response_status: u8,
    pub error: String,
    pub clickid: String,
    pub action_id: String,
    pub goal: String,
    pub goal_lc: String,
    pub status: i64,
    pub offer_id: u64,
    pub pid: u64,
    pub advertiser_id: String,
    pub conversion_id: String,
    pub delta: Option<i64>,
    pub ip: String,
    pub created: u8,
    pub payouts: f64,
    pub revenue: f64,
}

impl PostbackInsert {
    pub fn new(r: &ServerPostbackRow, written_us: i64) -> Self {
        let pairs = r.get.iter().chain(r.post.iter());
        Self {
            id: r.id.clone(),
            at_us: r.at_us,
            written_us,
            keep_first: keep_first(written_us),
            server: r.server.clone(),
            method: r.method.clone(),
            get_pairs: pairs_json(&r.get),
            post_pairs: pairs_json(&r.post),
            search: search_text(pairs),
            pixel: r.pixel.into(),
            response_status: r.response_status,
            error: r.error.clone(),
            clickid: r.clickid.clone(),
            action_id: r.action_id.clone(),
            goal: r.goal.clone(),
            goal_lc: r.goal.to_lowercase(),
            status: r.status,
            offer_id: r.offer_id,
            pid: r.pid,
            advertiser_id: r.advertiser_id.clone(),
            conversion_id: r.conversion_id.clone(),
            delta: r.delta,
            ip: r.ip.clone(),
            created: r.created.into(),
            payouts: r.payouts,
            revenue: r.revenue,
        }
    }
}

/// `sql::POSTBACK_COLUMNS`.
#[derive(Row, Deserialize)]
pub struct PostbackOut {
    pub id: String,
    pub at_us: i64,
    pub server: String,
    pub method: String,
    pub get_pairs: String,
    pub post_pairs: String,
    pub pixel: u8,
    pub response_status: u8,
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
    pub created: u8,
    pub payouts: f64,
    pub revenue: f64,
}

impl From<PostbackOut> for ServerPostbackRow {
    fn from(r: PostbackOut) -> Self {
        Self {
            id: r.id,
            at_us: r.at_us,
            server: r.server,
            method: r.method,
            get: pairs_from_json(&r.get_pairs),
            post: pairs_from_json(&r.post_pairs),
            pixel: r.pixel != 0,
            response_status: r.response_status,
            error: r.error,
            clickid: r.clickid,
            action_id: r.action_id,
            goal: r.goal,
            status: r.status,
            offer_id: r.offer_id,
            pid: r.pid,
            advertiser_id: r.advertiser_id,
            conversion_id: r.conversion_id,
            delta: r.delta,
            ip: r.ip,
            created: r.created != 0,
            payouts: r.payouts,
            revenue: r.revenue,
        }
    }
}

#[derive(Row, Serialize)]
pub struct ConversionInsert {
    pub id: String,
    pub conv_key: String,
    pub version: i64,
    pub written_us: i64,
    pub keep_first: u64,
    pub offer_id: u64,
    pub pid: u64,
    pub advertiser_id: String,
    pub goal: String,
    pub goal_lc: String,
    pub action_id: String,
    pub clickid: String,
    pub status: u8,
    pub sum: f64,
    pub payouts: f64,
    pub revenue: f64,
    pub currency: String,
    pub ip: String,
    pub ua: String,
    pub comment: String,
    pub subs: Vec<String>,
    pub custom_fields: Vec<String>,
    pub promo_code: String,
    pub user_id: String,
    pub created_us: i64,
    pub updated_us: i64,
    pub click_us: i64,
}

impl ConversionInsert {
    pub fn new(c: &Conversion, written_us: i64) -> Self {
        Self {
            id: c.id.clone(),
            conv_key: c.key.clone(),
            version: c.version(),
            written_us,
            keep_first: keep_first(written_us),
            offer_id: c.offer_id,
            pid: c.pid,
            advertiser_id: c.advertiser_id.clone(),
            goal: c.goal.clone(),
            goal_lc: c.goal.to_lowercase(),
            action_id: c.action_id.clone(),
            clickid: c.clickid.clone(),
            status: c.status,
            sum: c.sum,
            payouts: c.payouts,
            revenue: c.revenue,
            currency: c.currency.clone(),
            ip: c.ip.clone(),
            ua: c.ua.clone(),
            comment: c.comment.clone(),
            subs: c.subs.clone(),
            custom_fields: c.custom_fields.clone(),
            promo_code: c.promo_code.clone(),
            user_id: c.user_id.clone(),
            created_us: c.created_us,
            updated_us: c.updated_us,
            click_us: c.click_us,
        }
    }
}

/// `sql::CONVERSION_COLUMNS`.
#[derive(Row, Deserialize)]
pub struct ConversionOut {
    pub id: String,
    pub conv_key: String,
    pub offer_id: u64,
    pub pid: u64,
    pub advertiser_id: String,
    pub goal: String,
    pub action_id: String,
    pub clickid: String,
    pub status: u8,
    pub sum: f64,
    pub payouts: f64,
    pub revenue: f64,
    pub currency: String,
    pub ip: String,
    pub ua: String,
    pub comment: String,
    pub subs: Vec<String>,
    pub custom_fields: Vec<String>,
    pub promo_code: String,
    pub user_id: String,
    pub created_us: i64,
    pub updated_us: i64,
    pub click_us: i64,
}

impl From<ConversionOut> for Conversion {
    fn from(c: ConversionOut) -> Self {
        Self {
            id: c.id,
            key: c.conv_key,
            offer_id: c.offer_id,
            pid: c.pid,
            advertiser_id: c.advertiser_id,
            goal: c.goal,
            action_id: c.action_id,
            clickid: c.clickid,
            status: c.status,
            sum: c.sum,
            payouts: c.payouts,
            revenue: c.revenue,
            currency: c.currency,
            ip: c.ip,
            ua: c.ua,
            comment: c.comment,
            subs: c.subs,
            custom_fields: c.custom_fields,
            promo_code: c.promo_code,
            user_id: c.user_id,
            created_us: c.created_us,
            updated_us: c.updated_us,
            click_us: c.click_us,
        }
    }
}

#[derive(Row, Serialize)]
pub struct ClickInsert {
    pub click_id: String,
    pub at_us: i64,
    pub written_us: i64,
    pub offer_id: u64,
    pub pid: u64,
    pub ip: String,
    pub ua: String,
    pub referrer: String,
    pub country: String,
    pub subs: Vec<String>,
}

impl ClickInsert {
    pub fn new(c: &Click, written_us: i64) -> Self {
        Self {
            click_id: c.click_id.clone(),
            at_us: c.at_us,
            written_us,
            offer_id: c.offer_id,
            pid: c.pid,
            ip: c.ip.clone(),
            ua: c.ua.clone(),
            referrer: c.referrer.clone(),
            country: c.country.clone(),
            subs: c.subs.clone(),
        }
    }
}

/// `sql::CLICK_COLUMNS`.
#[derive(Row, Deserialize)]
pub struct ClickOut {
    pub click_id: String,
    pub at_us: i64,
    pub offer_id: u64,
    pub pid: u64,
    pub ip: String,
    pub ua: String,
    pub referrer: String,
    pub country: String,
    pub subs: Vec<String>,
}

impl From<ClickOut> for Click {
    fn from(c: ClickOut) -> Self {
        Self {
            click_id: c.click_id,
            at_us: c.at_us,
            offer_id: c.offer_id,
            pid: c.pid,
            ip: c.ip,
            ua: c.ua,
            referrer: c.referrer,
            country: c.country,
            subs: c.subs,
        }
    }
}

#[derive(Row, Serialize)]
pub struct AttemptInsert {
    pub job_id: String,
    pub attempt: u32,
    pub at_us: i64,
    pub written_us: i64,
    pub keep_first: u64,
    pub http_code: u16,
    pub error: String,
    pub state: String,
    pub next_at_us: Option<i64>,
    pub pid: u64,
    pub offer_id: u64,
    pub goal_lc: String,
    pub conv_status: u8,
    pub job: String,
}

impl AttemptInsert {
    pub fn new(r: &AttemptRow, written_us: i64) -> Self {
        let (job, a) = (&r.job, &r.attempt);
        Self {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            at_us: a.at_us,
            written_us,
            keep_first: keep_first(written_us),
            http_code: a.http_code,
            error: a.error.clone(),
            state: a.state.as_str().into(),
            next_at_us: a.next_at_us,
            pid: job.pid,
            offer_id: job.offer_id,
            goal_lc: job.goal.to_lowercase(),
            conv_status: job.status,
            job: serde_json::to_string(job).unwrap_or_default(),
        }
    }
}

/// `sql::ATTEMPT_COLUMNS`.
#[derive(Row, Deserialize)]
pub struct AttemptOut {
    pub job: String,
    pub attempt: u32,
    pub at_us: i64,
    pub http_code: u16,
    pub error: String,
    pub state: String,
    pub next_at_us: Option<i64>,
    pub job_id: String,
}

impl AttemptOut {
    pub fn into_row(self) -> Result<AttemptRow, serde_json::Error> {
        let job: DeliveryJob = serde_json::from_str(&self.job)?;
        Ok(AttemptRow {
            attempt: Attempt {
                job_id: self.job_id,
                attempt: self.attempt,
                at_us: self.at_us,
                http_code: self.http_code,
                error: self.error,
                state: JobStatus::parse(&self.state).unwrap_or(JobStatus::Pending),
                next_at_us: self.next_at_us,
            },
            job,
        })
    }
}

/// `sql::summary`.
#[derive(Row, Deserialize)]
pub struct SummaryOut {
    pub k_hour: i64,
    pub k_offer: u64,
    pub k_advertiser: String,
    pub k_partner: u64,
    pub k_goal: String,
    pub k_response: u8,
    pub k_error: String,
    pub n_postbacks: u64,
    pub n_accepted: u64,
    pub n_rejected: u64,
    pub n_conversions: u64,
    pub n_payouts: f64,
    pub n_revenue: f64,
}

#[derive(Row, Deserialize)]
pub struct DayCount {
    pub first_us: i64,
    pub last_us: i64,
    pub n: u64,
}

#[derive(Row, Deserialize)]
pub struct Count {
    pub n: u64,
}

#[derive(Row, Deserialize)]
pub struct Key {
    pub k: String,
}

#[derive(Row, Deserialize)]
pub struct PartitionRows {
    pub table: String,
    pub partition: String,
    pub rows: u64,
}
