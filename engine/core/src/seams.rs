//! The seams between the engine and its backends: the error kinds they share, the analytics
//! store (`Store`), and its query types. The event log is `crate::log`'s.
//!
//! The traits return boxed futures so that a backend is chosen at run time (`Arc<dyn ...>`)
//! without this crate depending on an async runtime.

use crate::delivery::{AttemptRow, DeliveryRecord, DueJobs, DueQuery, JobState};
use crate::keys::Partition;
use crate::log::Position;
use crate::processor::{Lookups, Output, ServerPostbackRow};
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

/// The analytics store: what the processor writes and the stats API reads.
///
/// Contract:
/// - `write` stores a batch's output and the consumer's next log positions (per partition)
///   atomically, and is idempotent: writing the same output again (after a crash before the
///   positions moved) leaves the same rows. Conversion states are upserts by id; the last one
///   wins.
/// - `position` is the next offset of a partition the consumer must process (0 when it never
///   wrote).
/// - Reads see only whole batches.
/// - Listings are ordered newest first, ties by id (for the server-postback log: by position,
///   which orders ids the same way), and are read in a snapshot: a store-defined number that
///   grows with every write. A query that names an earlier [`Page::snapshot`] sees exactly the
///   rows it saw then (with their current values), so pages never repeat or skip a row while
///   the processor adds rows, and `total` stays the same.
/// - `expire` deletes rows older than the given time from every table.
/// - `apply_deliveries` applies records of the deliveries log and the dispatcher's next
///   positions atomically; a job seen twice is kept once, an attempt seen twice is counted
///   once.
pub trait Store: Send + Sync + 'static {
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
    fn write(
        &self,
        consumer: &str,
        output: Output,
        next: Vec<Position>,
    ) -> BoxFuture<'_, Result<(), SeamError>>;
    fn server_postbacks(
        &self,
        query: ServerPostbackQuery,
    ) -> BoxFuture<'_, Result<Page<ServerPostbackRow>, SeamError>>;
    fn conversions(
        &self,
        query: ConversionQuery,
    ) -> BoxFuture<'_, Result<Page<Conversion>, SeamError>>;
    fn clicks(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<Click>, SeamError>>;
    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>>;
    fn apply_deliveries(
        &self,
        consumer: &str,
        records: Vec<DeliveryRecord>,
        next: Vec<Position>,
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
    fn attempts(&self, query: AttemptQuery) -> BoxFuture<'_, Result<Page<AttemptRow>, SeamError>>;
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
