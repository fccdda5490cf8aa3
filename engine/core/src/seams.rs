//! The two seams between the engine and its backends, each a small trait with its contract
//! written on it, and the in-memory event log every backend is compared with.
//!
//! The traits return boxed futures so that a backend is chosen at run time (`Arc<dyn ...>`)
//! without this crate depending on an async runtime.

use crate::processor::{Lookups, Output, ServerPostbackRow};
use crate::rules::{Click, Conversion};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What went wrong in a backend, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SeamError {
    /// The backend cannot take or give data now (disk full, broker down): reject the request
    /// (503) or retry later. Nothing was half-written.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The data is damaged or the backend is poisoned (a failed fsync): stop, do not retry.
    #[error("backend failed: {0}")]
    Fatal(String),
}

/// An append-only, durable sequence of records with dense offsets from 0 (one partition).
///
/// Contract:
/// - `append` returns the offset of each record only once all of them are durable (fsync'd,
///   or acknowledged by all in-sync replicas). On error none of them will ever be read.
/// - `read` returns durable records only, in offset order, starting at `from`.
/// - Offsets never change and never repeat; `truncate_before` only drops a prefix.
/// - Dropping a pending `append` future does not un-append its records (it may still land):
///   callers that must know the outcome keep polling.
pub trait EventLog: Send + Sync + 'static {
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<Vec<u64>, SeamError>>;
    fn read(&self, from: u64, max: usize) -> BoxFuture<'_, Result<Vec<(u64, Vec<u8>)>, SeamError>>;
    /// Resolves once a durable record exists at `from` or beyond (or the log closes).
    fn wait_for(&self, from: u64) -> BoxFuture<'_, ()>;
    /// One past the last durable offset.
    fn end(&self) -> u64;
    /// The first offset still kept.
    fn start(&self) -> u64;
    /// Drops records before `offset` where the backend can (whole segments); returns the new
    /// start.
    fn truncate_before(&self, offset: u64) -> BoxFuture<'_, Result<u64, SeamError>>;
}

/// A page of query results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub total: u64,
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
    pub offset: u64,
    pub limit: u64,
}

/// The analytics store: what the processor writes and the stats API reads.
///
/// Contract:
/// - `write` stores a batch's output and the consumer's next log position atomically, and is
///   idempotent: writing the same output again (after a crash before the position moved)
///   leaves the same rows. Conversion states are upserts by id; the last one wins.
/// - `position` is the next log offset the consumer must process (0 when it never wrote).
/// - Reads see only whole batches.
/// - `expire` deletes rows older than the given time from every table.
pub trait Store: Send + Sync + 'static {
    fn position(&self, consumer: &str) -> BoxFuture<'_, Result<u64, SeamError>>;
    fn lookup(
        &self,
        click_ids: Vec<String>,
        conversion_keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Lookups, SeamError>>;
    fn write(&self, consumer: &str, output: Output, next: u64)
        -> BoxFuture<'_, Result<(), SeamError>>;
    fn server_postbacks(
        &self,
        query: ServerPostbackQuery,
    ) -> BoxFuture<'_, Result<Page<ServerPostbackRow>, SeamError>>;
    fn conversions(&self, query: ConversionQuery) -> BoxFuture<'_, Result<Page<Conversion>, SeamError>>;
    fn clicks(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<Click>, SeamError>>;
    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>>;
}

/// The reference event log: records in memory, durable for as long as the process lives.
#[derive(Clone, Default)]
pub struct MemoryEventLog {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Default)]
struct MemoryInner {
    start: u64,
    records: Vec<Vec<u8>>,
    waiters: Vec<Waker>,
}

impl MemoryEventLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        // A panic while holding this lock leaves the data consistent (plain pushes).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl EventLog for MemoryEventLog {
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<Vec<u64>, SeamError>> {
        let mut inner = self.lock();
        let first = inner.start + inner.records.len() as u64;
        let offsets = (first..first + records.len() as u64).collect();
        inner.records.extend(records);
        for w in inner.waiters.drain(..) {
            w.wake();
        }
        Box::pin(std::future::ready(Ok(offsets)))
    }

    fn read(&self, from: u64, max: usize) -> BoxFuture<'_, Result<Vec<(u64, Vec<u8>)>, SeamError>> {
        let inner = self.lock();
        let from = from.max(inner.start);
        let skip = (from - inner.start) as usize;
        let out = inner
            .records
            .iter()
            .skip(skip)
            .take(max)
            .enumerate()
            .map(|(i, r)| (from + i as u64, r.clone()))
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn wait_for(&self, from: u64) -> BoxFuture<'_, ()> {
        Box::pin(WaitFor { log: self.clone(), from })
    }

    fn end(&self) -> u64 {
        let inner = self.lock();
        inner.start + inner.records.len() as u64
    }

    fn start(&self) -> u64 {
        self.lock().start
    }

    fn truncate_before(&self, offset: u64) -> BoxFuture<'_, Result<u64, SeamError>> {
        let mut inner = self.lock();
        let end = inner.start + inner.records.len() as u64;
        let offset = offset.clamp(inner.start, end);
        let n = (offset - inner.start) as usize;
        inner.records.drain(..n);
        inner.start = offset;
        Box::pin(std::future::ready(Ok(offset)))
    }
}

struct WaitFor {
    log: MemoryEventLog,
    from: u64,
}

impl Future for WaitFor {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.log.lock();
        if inner.start + inner.records.len() as u64 > self.from {
            Poll::Ready(())
        } else {
            inner.waiters.push(cx.waker().clone());
            Poll::Pending
        }
    }
}
