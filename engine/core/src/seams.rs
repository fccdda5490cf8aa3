//! The seams between the engine and its backends: the error kinds they share, the analytics
//! store and its query types, the processor's state, and the delivery queue. The event log is
//! `crate::log`'s.
//!
//! The traits return boxed futures so that a backend is chosen at run time (`Arc<dyn ...>`)
//! without this crate depending on an async runtime.

use crate::delivery::{AttemptRow, DeliveryRecord, DueJobs, DueQuery, JobState};
use crate::keys::Partition;
use crate::log::Position;
use crate::processor::{Lookups, ServerPostbackRow};
use crate::rules::{Click, Conversion};
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What went wrong in a backend, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SeamError {
    /// The backend cannot take or give data now (disk full, broker down): reject the request
    /// (503) or retry later. Nothing was half-written.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// This input can never succeed (a record too large, a query the backend cannot run):
    /// refuse it (400), do not retry. The text is fit to show the client.
    #[error("{0}")]
    Rejected(String),
    /// The data is damaged or the backend is poisoned (a failed fsync): stop, do not retry.
    #[error("backend failed: {0}")]
    Fatal(String),
}

/// A page of query results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    /// Rows matching the filters within the snapshot.
    pub total: u64,
    /// The snapshot the page was read in: pass it back (`snapshot` of the query) to read further
    /// pages of the same listing while rows are being added.
    pub snapshot: u64,
}

/// Filters of `/3.0/stats/serverpostbacks`. Times are Unix microseconds, `to_us` exclusive.
#[derive(Debug, Clone, Default)]
pub struct ServerPostbackQuery {
    pub from_us: i64,
    pub to_us: i64,
    /// One postback, by its id.
    pub id: Option<String>,
    pub offers: Vec<u64>,
    pub partners: Vec<u64>,
    pub suppliers: Vec<String>,
    pub click_id: Option<String>,
    pub action_id: Option<String>,
    pub goal: Option<String>,
    pub status: Option<i64>,
    pub response_status: Option<u8>,
    pub search: Option<String>,
    pub offset: u64,
    pub limit: u64,
    /// Only rows that existed at this snapshot (from an earlier [`Page`]); `None`: now.
    pub snapshot: Option<u64>,
}

/// What a summary of the server-postback log is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SummaryKey {
    Hour,
    Day,
    Offer,
    Advertiser,
    Partner,
    Goal,
    ResponseStatus,
    Error,
}

impl SummaryKey {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "hour" => Self::Hour,
            "day" => Self::Day,
            "offer" => Self::Offer,
            "advertiser" => Self::Advertiser,
            "partner" => Self::Partner,
            "goal" => Self::Goal,
            "response_status" => Self::ResponseStatus,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// `/3.0/stats/serverpostbacks/summary`: the slice's filters (paging aside), grouped.
#[derive(Debug, Clone, Default)]
pub struct SummaryQuery {
    pub filters: ServerPostbackQuery,
    pub group_by: Vec<SummaryKey>,
}

/// One group of a summary. A key is `Some` only when grouped by it; time is grouped by the
/// UTC hour (`hour_us`, its start) when `Hour` or `Day` is asked for, and the caller turns
/// hours into the client's hours or days.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SummaryRow {
    pub hour_us: Option<i64>,
    pub offer_id: Option<u64>,
    pub advertiser_id: Option<String>,
    pub pid: Option<u64>,
    /// Lowercased: goals are compared without case.
    pub goal: Option<String>,
    pub response_status: Option<u8>,
    pub error: Option<String>,
    pub postbacks: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub conversions: u64,
    pub payouts: f64,
    pub revenue: f64,
}

pub const HOUR_US: i64 = 3_600_000_000;

/// A summary group's keys, in [`SummaryRow`]'s order.
pub type GroupKey = (
    Option<i64>,
    Option<u64>,
    Option<String>,
    Option<u64>,
    Option<String>,
    Option<u8>,
    Option<String>,
);

impl SummaryRow {
    /// The row's group of `row` under `keys` (counts zero).
    pub fn group_of(row: &ServerPostbackRow, keys: &[SummaryKey]) -> Self {
        let has = |k| keys.contains(&k);
        Self {
            hour_us: (has(SummaryKey::Hour) || has(SummaryKey::Day))
                .then(|| row.at_us.div_euclid(HOUR_US) * HOUR_US),
            offer_id: has(SummaryKey::Offer).then_some(row.offer_id),
            advertiser_id: has(SummaryKey::Advertiser).then(|| row.advertiser_id.clone()),
            pid: has(SummaryKey::Partner).then_some(row.pid),
            goal: has(SummaryKey::Goal).then(|| row.goal.to_lowercase()),
            response_status: has(SummaryKey::ResponseStatus).then_some(row.response_status),
            error: has(SummaryKey::Error).then(|| row.error.clone()),
            ..Self::default()
        }
    }

    /// Adds `row`'s counts.
    pub fn count(&mut self, row: &ServerPostbackRow) {
        self.postbacks += 1;
        if row.response_status == 1 {
            self.accepted += 1;
        } else {
            self.rejected += 1;
        }
        if row.created {
            self.conversions += 1;
            self.payouts += row.payouts;
            self.revenue += row.revenue;
        }
    }

    /// Adds another group's counts.
    pub fn merge(&mut self, other: &SummaryRow) {
        self.postbacks += other.postbacks;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.conversions += other.conversions;
        self.payouts += other.payouts;
        self.revenue += other.revenue;
    }

    /// The group's keys, to sort and merge by.
    pub fn key(&self) -> GroupKey {
        (
            self.hour_us,
            self.offer_id,
            self.advertiser_id.clone(),
            self.pid,
            self.goal.clone(),
            self.response_status,
            self.error.clone(),
        )
    }
}

/// Filters of `/3.0/stats/conversions`.
#[derive(Debug, Clone, Default)]
pub struct ConversionQuery {
    pub from_us: i64,
    pub to_us: i64,
    pub statuses: Vec<u8>,
    pub offers: Vec<u64>,
    pub advertisers: Vec<String>,
    pub partners: Vec<u64>,
    pub goal: Option<String>,
    pub action_id: Option<String>,
    pub clickid: Option<String>,
    /// `subid1`..`subid5` filters, by position.
    pub subs: [Option<String>; 5],
    pub conversion_id: Option<String>,
    pub offset: u64,
    pub limit: u64,
    /// Only rows that existed at this snapshot (from an earlier [`Page`]); `None`: now.
    pub snapshot: Option<u64>,
}

/// Filters of `/3.0/stats/affiliatepostbacks` (one row per attempt).
#[derive(Debug, Clone, Default)]
pub struct AttemptQuery {
    pub from_us: i64,
    pub to_us: i64,
    pub offers: Vec<u64>,
    pub partners: Vec<u64>,
    pub goal: Option<String>,
    pub status: Option<u8>,
    pub http_code: Option<u16>,
    pub job_id: Option<String>,
    pub offset: u64,
    pub limit: u64,
    /// Only rows that existed at this snapshot (from an earlier [`Page`]); `None`: now.
    pub snapshot: Option<u64>,
}

/// Rows for the analytics store. Every row has a deterministic id (from a log position), so
/// inserting a batch again, after a crash before the positions moved, changes nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnalyticsRows {
    pub clicks: Vec<Click>,
    pub postbacks: Vec<ServerPostbackRow>,
    /// Conversion states; of the states of one id, the latest ([`Conversion::version`]) wins.
    pub conversions: Vec<Conversion>,
    /// Delivery attempts, each with its job; keyed by (job id, attempt number).
    pub attempts: Vec<AttemptRow>,
    /// Some of these rows may be in the store already: the batch is redone after a failure, a
    /// restart or a hand-over. A store that does not keep a row once by itself
    /// (ClickHouse merges duplicates only eventually) looks before it inserts.
    pub maybe_inserted: bool,
}

impl AnalyticsRows {
    pub fn is_empty(&self) -> bool {
        self.clicks.is_empty()
            && self.postbacks.is_empty()
            && self.conversions.is_empty()
            && self.attempts.is_empty()
    }
}

/// What the stats API reads: the logs of both directions, conversions and clicks.
///
/// Contract:
/// - `insert` is idempotent: rows are keyed by their ids (clicks by click id, attempts by job
///   id and attempt number), a row inserted again (in a batch marked
///   [`AnalyticsRows::maybe_inserted`]) is read once, and of a conversion's states the latest
///   by [`Conversion::version`] is the one read, whatever order they came in.
/// - Listings are ordered newest first, ties by id, and are read in a snapshot: a
///   store-defined number that grows with every insert. A query that names an earlier
///   [`Page::snapshot`] sees exactly the rows it saw then (with their current values), so pages
///   never repeat or skip a row while rows are added, and `total` stays the same.
/// - Search (`ServerPostbackQuery::search`) is a case-insensitive substring of any of the
///   postback's `key=value` parameters (query and body), of any length.
/// - `expire` retires rows older than the given time (by their own time: a postback's, a
///   click's, a conversion's creation, an attempt's): queries no longer return them, and the
///   store deletes them, at once or (ClickHouse 18) by whole months; it says how many it
///   deleted.
pub trait AnalyticsStore: Send + Sync + 'static {
    fn insert(&self, rows: AnalyticsRows) -> BoxFuture<'_, Result<(), SeamError>>;
    fn server_postbacks(
        &self,
        query: ServerPostbackQuery,
    ) -> BoxFuture<'_, Result<Page<ServerPostbackRow>, SeamError>>;
    /// The server-postback log within the filters, counted by group (`SummaryRow`), groups in
    /// key order; paging and snapshots do not apply.
    fn summary(&self, query: SummaryQuery) -> BoxFuture<'_, Result<Vec<SummaryRow>, SeamError>>;
    fn conversions(
        &self,
        query: ConversionQuery,
    ) -> BoxFuture<'_, Result<Page<Conversion>, SeamError>>;
    /// Clicks by id (unknown ids are left out).
    fn clicks(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<Click>, SeamError>>;
    /// The latest state of the conversions of these keys ([`Conversion::key`]; unknown keys
    /// are left out): what a processor taking a partition over from another process asks.
    fn conversion_states(
        &self,
        keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Conversion>, SeamError>>;
    fn attempts(&self, query: AttemptQuery) -> BoxFuture<'_, Result<Page<AttemptRow>, SeamError>>;
    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>>;
    /// Deletes every row: a replay rebuilds them from the logs.
    fn clear(&self) -> BoxFuture<'_, Result<(), SeamError>>;
    /// Why the store cannot take rows now, if its last insert failed (for `/ready`).
    fn health(&self) -> Option<String> {
        None
    }
}

/// What the processor remembers between batches and must look up: clicks, conversion states,
/// and its positions in the events log.
///
/// Contract:
/// - `commit` stores the clicks, the conversion states (upserts by id; a later state replaces
///   an earlier one) and the consumer's next positions atomically, and is idempotent.
/// - `position` is the next offset of a partition the consumer must process (0 when it never
///   committed).
/// - `lookup` finds clicks by id and conversions by key (`Conversion::key`) as committed.
/// - `expire` forgets clicks and conversions older than the given time.
///
/// Crash safety: a batch's analytics rows are inserted first (idempotent), then its state and
/// positions committed. A crash between the two redoes the batch from the same state, which
/// gives the same rows again.
pub trait StateStore: Send + Sync + 'static {
    fn position(
        &self,
        consumer: &str,
        partition: Partition,
    ) -> BoxFuture<'_, Result<u64, SeamError>>;
    fn lookup(
        &self,
        click_ids: Vec<String>,
        conversion_keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Lookups, SeamError>>;
    fn commit(
        &self,
        consumer: &str,
        state: StateChanges,
        next: Vec<Position>,
    ) -> BoxFuture<'_, Result<(), SeamError>>;
    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>>;
}

/// What a batch changed in the processor's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateChanges {
    pub clicks: Vec<Click>,
    /// Conversion states in the order they happened.
    pub conversions: Vec<Conversion>,
}

/// The affiliate-postback jobs the dispatcher works through, derived from the deliveries log.
///
/// Contract:
/// - `apply_deliveries` applies records of one partition of the deliveries log and the
///   dispatcher's next position there (`next`) atomically; a job seen twice is kept once, an
///   attempt seen twice (by job id and attempt number) is applied once. A job belongs to the
///   partition it came from: `due_jobs` can be asked for some partitions only (those a
///   dispatcher owns in a cluster).
/// - `position` is the consumer's next offset in a partition of the deliveries log.
/// - `expire` forgets jobs created before the given time.
pub trait DeliveryQueue: Send + Sync + 'static {
    fn position(
        &self,
        consumer: &str,
        partition: Partition,
    ) -> BoxFuture<'_, Result<u64, SeamError>>;
    fn apply_deliveries(
        &self,
        consumer: &str,
        records: Vec<DeliveryRecord>,
        next: Position,
    ) -> BoxFuture<'_, Result<(), SeamError>>;
    /// Pending jobs due at `query.now_us`, fairly across hosts (see [`DueQuery`]): hosts in
    /// order after `after_host`, wrapping around, each host's soonest due first.
    fn due_jobs(&self, query: DueQuery) -> BoxFuture<'_, Result<DueJobs, SeamError>>;
    /// Jobs by id (unknown ids are left out).
    fn jobs(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<JobState>, SeamError>>;
    /// Ids of the failed or given-up jobs of a partner created in `[from_us, to_us)`.
    fn failed_jobs(
        &self,
        pid: u64,
        from_us: i64,
        to_us: i64,
    ) -> BoxFuture<'_, Result<Vec<String>, SeamError>>;
    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>>;
}

/// Runs a future of the in-memory backends to completion: they never park, so a busy poll
/// with a no-op waker is enough.
#[cfg(test)]
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = Box::pin(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}
