//! The two seams between the engine and its backends, each a small trait with its contract
//! written on it, and the in-memory event log every backend is compared with.
//!
//! The traits return boxed futures so that a backend is chosen at run time (`Arc<dyn ...>`)
//! without this crate depending on an async runtime.

use crate::delivery::{AttemptRow, DeliveryRecord, DueJobs, DueQuery, JobState};
use crate::processor::{Lookups, Output, ServerPostbackRow};
use crate::rules::{Click, Conversion};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A record of the log with its offset.
pub type Record = (u64, Vec<u8>);

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

/// An append-only, durable sequence of records with dense offsets from 0 (one partition).
///
/// Contract:
/// - `append` returns the offset of each record only once all of them are durable (fsync'd,
///   or acknowledged by all in-sync replicas). On error none of them will ever be read.
/// - `read` returns durable records only, in offset order, starting at `from`.
/// - Offsets never change and never repeat; `truncate_before` only drops a prefix.
/// - An `append` that fails (or whose future is dropped before it completes) may or may not
///   land in backends that cannot take records back; the embedded log guarantees that a failed
///   append never lands, and abandons a dropped one unless it was already durable.
/// - Errors keep their kind: `Unavailable` (retry later), `Rejected` (this record can never be
///   stored, for example it is too large), `Fatal` (stop).
pub trait EventLog: Send + Sync + 'static {
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<Vec<u64>, SeamError>>;
    /// Up to `max_records` records from `from`, stopping before the one that would take the
    /// payloads past `max_bytes` (but always at least one, if there is one).
    fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, SeamError>>;
    /// Resolves once a durable record exists at `from` or beyond (or the log closes).
    fn wait_for(&self, from: u64) -> BoxFuture<'_, ()>;
    /// One past the last durable offset.
    fn end(&self) -> u64;
    /// The first offset still kept.
    fn start(&self) -> u64;
    /// Drops records before `offset` where the backend can (whole segments); returns the new
    /// start.
    fn truncate_before(&self, offset: u64) -> BoxFuture<'_, Result<u64, SeamError>>;
    /// Why the log cannot take appends now (`None` when it can); reported by `/ready`.
    fn health(&self) -> Option<String> {
        None
    }
    /// Makes everything appended so far durable and refuses later appends. Blocks until done.
    fn close(&self) {}
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
/// - `write` stores a batch's output and the consumer's next log position atomically, and is
///   idempotent: writing the same output again (after a crash before the position moved)
///   leaves the same rows. Conversion states are upserts by id; the last one wins.
/// - `position` is the next log offset the consumer must process (0 when it never wrote).
/// - Reads see only whole batches.
/// - Listings are ordered newest first, ties by id (for the server-postback log: by position,
///   which orders ids the same way), and are read in a snapshot: a store-defined number that
///   grows with every write. A query that names an earlier [`Page::snapshot`] sees exactly the
///   rows it saw then (with their current values), so pages never repeat or skip a row while
///   the processor adds rows, and `total` stays the same.
/// - `expire` deletes rows older than the given time from every table.
/// - `apply_deliveries` applies records of the deliveries log and the dispatcher's next
///   position atomically; a job seen twice is kept once, an attempt seen twice is counted once.
pub trait Store: Send + Sync + 'static {
    fn position(&self, consumer: &str) -> BoxFuture<'_, Result<u64, SeamError>>;
    fn lookup(
        &self,
        click_ids: Vec<String>,
        conversion_keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Lookups, SeamError>>;
    fn write(
        &self,
        consumer: &str,
        output: Output,
        next: u64,
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
        next: u64,
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

    fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, SeamError>> {
        let inner = self.lock();
        let from = from.max(inner.start);
        let skip = usize::try_from(from - inner.start).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (i, r) in inner
            .records
            .iter()
            .skip(skip)
            .take(max_records)
            .enumerate()
        {
            bytes = bytes.saturating_add(r.len());
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push((from + i as u64, r.clone()));
        }
        Box::pin(std::future::ready(Ok(out)))
    }

    fn wait_for(&self, from: u64) -> BoxFuture<'_, ()> {
        Box::pin(WaitFor {
            log: self.clone(),
            from,
        })
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

/// The conformance suite every [`EventLog`] must pass. Each check starts from an empty log.
pub mod conformance {
    use super::EventLog;

    fn records(prefix: &str, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("{prefix}-{i}").into_bytes())
            .collect()
    }

    /// Offsets are dense from the log's end, reads return durable records in order.
    pub async fn append_then_read(log: &dyn EventLog) {
        assert_eq!(log.end(), 0, "a new log is empty");
        let a = log.append(records("a", 3)).await.expect("append");
        assert_eq!(a, vec![0, 1, 2]);
        let b = log.append(records("b", 2)).await.expect("append");
        assert_eq!(b, vec![3, 4]);
        assert_eq!(log.end(), 5);
        let all = log.read(0, 100, usize::MAX).await.expect("read");
        let offsets: Vec<u64> = all.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
        assert_eq!(all[3].1, b"b-0".to_vec());
        let mid = log.read(2, 2, usize::MAX).await.expect("read");
        assert_eq!(mid.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(mid[0].1, b"a-2".to_vec());
        assert!(log
            .read(5, 10, usize::MAX)
            .await
            .expect("read at end")
            .is_empty());
        assert!(log
            .read(99, 10, usize::MAX)
            .await
            .expect("read past end")
            .is_empty());
        assert!(log.append(vec![]).await.expect("empty append").is_empty());
        assert_eq!(log.end(), 5);
    }

    /// A byte limit ends a read early, but never before its first record.
    pub async fn reads_stop_at_the_byte_limit(log: &dyn EventLog) {
        log.append(vec![vec![1; 100], vec![2; 100], vec![3; 100], vec![4; 500]])
            .await
            .expect("append");
        let two = log.read(0, 10, 250).await.expect("read");
        assert_eq!(two.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0, 1]);
        let one = log.read(3, 10, 10).await.expect("read");
        assert_eq!(one.len(), 1, "at least one record, however large");
        assert_eq!(one[0].1.len(), 500);
        assert_eq!(log.read(0, 10, 300).await.expect("read").len(), 3);
    }

    /// Empty and binary records survive as they are.
    pub async fn records_are_kept_exactly(log: &dyn EventLog) {
        let binary: Vec<u8> = (0..=255u8).collect();
        log.append(vec![Vec::new(), binary.clone(), vec![0; 100_000]])
            .await
            .expect("append");
        let got = log.read(0, 10, usize::MAX).await.expect("read");
        assert_eq!(got[0].1, Vec::<u8>::new());
        assert_eq!(got[1].1, binary);
        assert_eq!(got[2].1.len(), 100_000);
    }

    /// `wait_for` resolves once a record exists at the offset, not before.
    pub async fn wait_for_wakes_on_append(log: &dyn EventLog) {
        log.append(records("x", 1)).await.expect("append");
        log.wait_for(0).await; // already there
        let mut wait = log.wait_for(1);
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(wait.as_mut().poll(cx).is_ready()))
                .await;
        assert!(!polled, "nothing at offset 1 yet");
        log.append(records("y", 1)).await.expect("append");
        wait.await;
    }

    /// Truncation only drops a prefix; later records keep their offsets.
    pub async fn truncate_keeps_the_rest(log: &dyn EventLog) {
        for i in 0..10 {
            log.append(records(&format!("t{i}"), 10))
                .await
                .expect("append");
        }
        let start = log.truncate_before(50).await.expect("truncate");
        assert!(start <= 50, "never drops past the offset asked");
        assert_eq!(log.start(), start);
        let rest = log.read(50, 1000, usize::MAX).await.expect("read");
        assert_eq!(rest.len(), 50);
        assert_eq!(rest[0].0, 50);
        assert_eq!(rest[0].1, b"t5-0".to_vec());
        let from_start = log.read(0, 1, usize::MAX).await.expect("read before start");
        assert_eq!(
            from_start[0].0, start,
            "reads before the start begin at the start"
        );
        assert_eq!(
            log.append(records("z", 1)).await.expect("append"),
            vec![100]
        );
    }

    /// Many concurrent appends each get their own offsets, and all are readable.
    pub async fn concurrent_appends_are_all_kept(log: &dyn EventLog) {
        let appends = (0..50).map(|i| log.append(records(&format!("c{i}"), 4)));
        let results = futures_join_all(appends).await;
        let mut offsets: Vec<u64> = results
            .into_iter()
            .flat_map(|r| r.expect("append"))
            .collect();
        offsets.sort();
        assert_eq!(offsets, (0..200).collect::<Vec<_>>());
        assert_eq!(
            log.read(0, 1000, usize::MAX).await.expect("read").len(),
            200
        );
    }

    /// A minimal join_all so that this crate needs no futures dependency.
    async fn futures_join_all<F: std::future::Future>(
        futures: impl IntoIterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut pending: Vec<_> = futures.into_iter().map(Box::pin).collect();
        let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut done = true;
            for (fut, slot) in pending.iter_mut().zip(out.iter_mut()) {
                if slot.is_none() {
                    match fut.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => *slot = Some(v),
                        std::task::Poll::Pending => done = false,
                    }
                }
            }
            if done {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        out.into_iter().flatten().collect()
    }
}

/// Runs a future of the in-memory backends to completion: they never park, so a busy poll
/// with a no-op waker is enough.
#[cfg(test)]
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = Box::pin(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_log_conforms() {
        block_on(conformance::append_then_read(&MemoryEventLog::new()));
        block_on(conformance::records_are_kept_exactly(&MemoryEventLog::new()));
        block_on(conformance::reads_stop_at_the_byte_limit(
            &MemoryEventLog::new(),
        ));
        block_on(conformance::wait_for_wakes_on_append(&MemoryEventLog::new()));
        block_on(conformance::truncate_keeps_the_rest(&MemoryEventLog::new()));
        block_on(conformance::concurrent_appends_are_all_kept(
            &MemoryEventLog::new(),
        ));
    }
}
