//! The embedded store: SQLite (through `rusqlite`) in the data directory, in WAL mode, with one
//! writer connection (the processor and the dispatcher) and a few reader connections (the stats
//! API). It is the analytics store, the processor's state store and the delivery queue at once;
//! the schema is `schemas/sqlite.sql`.
//!
//! Every write runs on the writer connection's own thread, in order, at background priority
//! (`crate::priority`): the store's writes cost more CPU per postback than the whole HTTP path,
//! and under a burst the front end must have the cores first, while processing catches up on
//! what is idle.

use crate::line_sets::LineSets;
use postback_core::delivery::{
    Attempt, AttemptRow, DeliveryJob, DeliveryRecord, DueJobs, DueQuery, JobState, JobStatus,
};
use postback_core::keys::Partition;
use postback_core::log::Position;
use postback_core::params::Params;
use postback_core::processor::{Lookups, ServerPostbackRow};
use postback_core::rules::{Click, Conversion};
use postback_core::seams::{
    AnalyticsRows, AnalyticsStore, AttemptQuery, BoxFuture, ConversionQuery, DeliveryQueue, Page,
    SeamError, ServerPostbackQuery, StateChanges, StateStore, SummaryQuery, SummaryRow,
};
use postback_core::seams::{GroupKey, HOUR_US};
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, Transaction};
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

const SCHEMA: &str = include_str!("../../../schemas/sqlite.sql");
/// Kept in `PRAGMA user_version`. Raise it with every change to the tables of
/// `schemas/sqlite.sql` (a setting applied at every open needs none): a store of another
/// version is not migrated but rebuilt from the logs, which hold everything it derives.
pub const SCHEMA_VERSION: i64 = 10;
const READERS: usize = 3;

/// What an existing store file's schema is, compared with this build's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// No store yet, or one of this version.
    Current,
    /// Written by an older version: rebuild it from the logs.
    Stale(i64),
    /// Written by a newer version: this build must not touch it.
    Newer(i64),
}

pub struct SqliteStore {
    writer: Writer,
    /// The line sets' dictionary (`crate::line_sets`), used on the writer's thread only.
    line_sets: Arc<Mutex<LineSets>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    /// The time budget of a stats query.
    query_budget: std::time::Duration,
}

/// A write, run on the writer's thread.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The writer connection's thread: jobs in, run in order. Dropping it closes the connection.
struct Writer {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    fn start(mut conn: Connection) -> Result<Self, SeamError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                crate::priority::lower_this_thread();
                while let Ok(job) = rx.recv() {
                    // A job that panics drops its answer (the caller gets an error); the
                    // connection's open transaction rolls back as it unwinds.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                }
            })
            .map_err(|e| SeamError::Fatal(format!("starting the store's writer: {e}")))?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, job: Job) -> Result<(), SeamError> {
        let jobs = self.jobs.lock().map_err(lock_err)?;
        jobs.as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| SeamError::Fatal("the store's writer has stopped".into()))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which closes the connection: wait for it, so
        // that the database is closed when the store is.
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// How many SQLite VM steps run between checks of a query's budget and cancellation.
const PROGRESS_STEPS: i32 = 1000;

/// Why a query was interrupted.
const RUNNING: u8 = 0;
const OVER_BUDGET: u8 = 1;
const CANCELLED: u8 = 2;

/// Cancels the query of a dropped future (the client went away, or shutdown).
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// SQLite's errors by what the caller should do: retry (busy, disk full, I/O), refuse the
/// request (too large for the store), or stop (corruption, and anything else, which would be a
/// bug in this file: retrying it forever would hide it). Rejections carry a text fit for a
/// client; the others carry SQLite's, for the logs.
fn db_err(e: rusqlite::Error) -> SeamError {
    use rusqlite::ErrorCode as C;
    let code = match &e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        _ => None,
    };
    match code {
        Some(
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::DiskFull
            | C::SystemIoFailure
            | C::CannotOpen
            | C::ReadOnly
            | C::OutOfMemory
            | C::FileLockingProtocolFailed
            | C::OperationInterrupted,
        ) => SeamError::Unavailable(format!("sqlite: {e}")),
        Some(C::TooBig | C::ParameterOutOfRange) => {
            SeamError::Rejected("the request is too large for the store".into())
        }
        _ => SeamError::Fatal(format!("sqlite: {e}")),
    }
}

fn lock_err<T>(_: T) -> SeamError {
    SeamError::Fatal("sqlite connection lock poisoned".into())
}

impl SqliteStore {
    /// Reads the schema version of the store at `path` without changing anything.
    pub fn schema_state(path: &Path) -> Result<SchemaState, SeamError> {
        if !path.exists() {
            return Ok(SchemaState::Current);
        }
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(db_err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db_err)?;
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        Ok(match version {
            v if v == SCHEMA_VERSION => SchemaState::Current,
            0 if tables == 0 => SchemaState::Current,
            v if v > SCHEMA_VERSION => SchemaState::Newer(v),
            v => SchemaState::Stale(v),
        })
    }

    /// Opens (or creates) the store. The caller checks [`Self::schema_state`] first.
    pub fn open(path: &Path) -> Result<Self, SeamError> {
        let writer = Connection::open(path).map_err(db_err)?;
        writer
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        writer.execute_batch(SCHEMA).map_err(db_err)?;
        writer
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db_err)?;
        let line_sets = Arc::new(Mutex::new(load_line_sets(&writer).map_err(db_err)?));
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let r = Connection::open(path).map_err(db_err)?;
            r.busy_timeout(std::time::Duration::from_secs(10))
                .map_err(db_err)?;
            readers.push(Mutex::new(r));
        }
        Ok(Self {
            writer: Writer::start(writer)?,
            line_sets,
            readers: Arc::new(readers),
            query_budget: std::time::Duration::from_secs(10),
        })
    }

    /// Sets the time budget of stats queries: a query that takes longer is stopped and
    /// refused (`Rejected`, with advice to narrow it).
    pub fn with_query_budget(mut self, budget: std::time::Duration) -> Self {
        self.query_budget = budget;
        self
    }

    /// Runs `f` on the writer connection, on its thread.
    fn with_writer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, SeamError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, SeamError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.writer.send(Box::new(move |c: &mut Connection| {
            let _ = tx.send(f(c));
        }));
        Box::pin(async move {
            sent?;
            rx.await
                .map_err(|_| SeamError::Fatal("store task panicked".into()))?
        })
    }

    /// Runs `f` on a free reader connection (or waits for the first), within the query budget;
    /// dropping the returned future (the client went away) stops the query.
    fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, SeamError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, SeamError>> {
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.run_reader(f, cancelled)
    }

    fn run_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, SeamError> + Send + 'static,
        cancelled: Arc<std::sync::atomic::AtomicBool>,
    ) -> BoxFuture<'_, Result<T, SeamError>> {
        use std::sync::atomic::{AtomicU8, Ordering};
        let readers = self.readers.clone();
        let budget = self.query_budget;
        let guard = CancelOnDrop(cancelled.clone());
        Box::pin(async move {
            let _guard = guard;
            tokio::task::spawn_blocking(move || {
                let conn = readers
                    .iter()
                    .find_map(|r| r.try_lock().ok())
                    .map_or_else(|| readers[0].lock().map_err(lock_err), Ok)?;
                let deadline = std::time::Instant::now() + budget;
                let why = Arc::new(AtomicU8::new(RUNNING));
                let stop = why.clone();
                conn.progress_handler(
                    PROGRESS_STEPS,
                    Some(move || {
                        if cancelled.load(Ordering::Acquire) {
                            stop.store(CANCELLED, Ordering::Release);
                        } else if std::time::Instant::now() >= deadline {
                            stop.store(OVER_BUDGET, Ordering::Release);
                        }
                        stop.load(Ordering::Acquire) != RUNNING
                    }),
                );
                let result = f(&conn);
                conn.progress_handler(PROGRESS_STEPS, None::<fn() -> bool>);
                match why.load(Ordering::Acquire) {
                    OVER_BUDGET if result.is_err() => Err(SeamError::Rejected(format!(
                        "the query took longer than its time budget of {budget:?}; \
                         narrow the date range or add filters"
                    ))),
                    CANCELLED if result.is_err() => {
                        Err(SeamError::Unavailable("query cancelled".into()))
                    }
                    _ => result,
                }
            })
            .await
            .map_err(|e| SeamError::Fatal(format!("store task panicked: {e}")))?
        })
    }
}

fn pairs_json(p: &Params) -> String {
    serde_json::to_string(&p.0).unwrap_or_else(|_| "[]".into())
}

fn pairs_from_json(s: &str) -> Params {
    Params(serde_json::from_str(s).unwrap_or_default())
}

/// The term of an exact value in a `*_keys` index: a letter naming the column and a 64-bit
/// FNV-1a hash of the value. A collision only adds a candidate; the column decides.
fn key_term(column: char, value: &str) -> String {
    let hash = value.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{column}{hash:016x}")
}

/// A row's terms for its `*_keys` index (empty values have none).
fn key_terms(values: &[(char, &str)]) -> String {
    values
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(c, v)| key_term(*c, v))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The line sets' dictionary as stored.
fn load_line_sets(c: &Connection) -> rusqlite::Result<LineSets> {
    let sets = c
        .prepare("SELECT rowid, lines FROM sp_line_sets")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(i64, String)>>>()?;
    let wide = c
        .prepare("SELECT key FROM sp_wide_keys")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(LineSets::new(sets, wide))
}

/// Whether the search of `term` goes through the line sets and the trigram index: three
/// characters at least, and no line break (a term matches within a line; the index's texts
/// are cut into lines differently than the rows' are).
fn indexed_term(term: &str) -> bool {
    term.chars().count() >= 3 && !term.contains('\n')
}

/// A consumer's next positions, in the transaction that stores what came before them.
fn save_positions(tx: &Transaction<'_>, consumer: &str, next: &[Position]) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO positions (consumer, partition, next_offset) VALUES (?, ?, ?)
         ON CONFLICT (consumer, partition) DO UPDATE SET next_offset = excluded.next_offset",
    )?;
    for p in next {
        stmt.execute(params![consumer, p.partition, p.offset as i64])?;
    }
    Ok(())
}

fn upsert_clicks(tx: &Transaction<'_>, clicks: &[Click]) -> rusqlite::Result<()> {
    let mut click = tx.prepare_cached(
        "INSERT OR IGNORE INTO clicks (click_id, at_us, offer_id, pid, ip, ua, referrer, country, subs)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    for c in clicks {
        click.execute(params![
            c.click_id,
            c.at_us,
            c.offer_id as i64,
            c.pid as i64,
            c.ip,
            c.ua,
            c.referrer,
            c.country,
            serde_json::to_string(&c.subs).unwrap_or_else(|_| "[]".into()),
        ])?;
    }
    Ok(())
}

/// Conversion states by id; a state replaces the stored one unless that one is of a higher
/// version. The row keeps its `seq`, so it keeps its place in listings and snapshots.
fn upsert_conversions(tx: &Transaction<'_>, conversions: &[Conversion]) -> rusqlite::Result<()> {
    let mut conv = tx.prepare_cached(
        "INSERT INTO conversions (id, conv_key, offer_id, pid, advertiser_id, goal, goal_lc,
           action_id, clickid, status, sum, payouts, revenue, currency, ip, ua, comment,
           sub1, sub2, sub3, sub4, sub5, sub6, sub7, sub8, custom_fields, promo_code, user_id,
           created_us, updated_us, click_us, version)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
           ?, ?, ?, ?, ?, ?)
         ON CONFLICT (id) DO NOTHING",
    )?;
    let mut update = tx.prepare_cached(
        "UPDATE conversions SET status = ?, updated_us = ?, comment = ?, version = ?
         WHERE id = ? AND version <= ?",
    )?;
    let mut keys = tx.prepare_cached("INSERT INTO conversions_keys (rowid, keys) VALUES (?, ?)")?;
    for c in conversions {
        let sub = |i: usize| c.subs.get(i).cloned().unwrap_or_default();
        let inserted = conv.execute(params![
            c.id,
            c.key,
            c.offer_id as i64,
            c.pid as i64,
            c.advertiser_id,
            c.goal,
            c.goal.to_lowercase(),
            c.action_id,
            c.clickid,
            c.status,
            c.sum,
            c.payouts,
            c.revenue,
            c.currency,
            c.ip,
            c.ua,
            c.comment,
            sub(0),
            sub(1),
            sub(2),
            sub(3),
            sub(4),
            sub(5),
            sub(6),
            sub(7),
            serde_json::to_string(&c.custom_fields).unwrap_or_else(|_| "[]".into()),
            c.promo_code,
            c.user_id,
            c.created_us,
            c.updated_us,
            c.click_us,
            c.version(),
        ])?;
        if inserted == 1 {
            let sub1 = sub(0);
            let terms = key_terms(&[('c', &c.clickid), ('a', &c.action_id), ('s', &sub1)]);
            if !terms.is_empty() {
                keys.execute(params![tx.last_insert_rowid(), terms])?;
            }
        } else {
            update.execute(params![
                c.status,
                c.updated_us,
                c.comment,
                c.version(),
                c.id,
                c.version(),
            ])?;
        }
    }
    Ok(())
}

/// Inserts a batch; when it fails, the line sets are read back from the store, since the
/// batch's new sets were not kept.
fn insert_batch(
    conn: &mut Connection,
    rows: &AnalyticsRows,
    line_sets: &Mutex<LineSets>,
) -> Result<(), SeamError> {
    // A batch that panicked (a bug, caught by the writer's thread) left them unknown too.
    let mut sets = match line_sets.lock() {
        Ok(sets) => sets,
        Err(poisoned) => {
            let mut sets = poisoned.into_inner();
            *sets = load_line_sets(conn).map_err(db_err)?;
            line_sets.clear_poison();
            sets
        }
    };
    let inserted = insert_rows(conn, rows, &mut sets);
    if inserted.is_err() {
        *sets = load_line_sets(conn).map_err(db_err)?;
    }
    inserted.map_err(db_err)
}

fn insert_rows(
    conn: &mut Connection,
    rows: &AnalyticsRows,
    line_sets: &mut LineSets,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    upsert_clicks(&tx, &rows.clicks)?;
    {
        let mut pb = tx.prepare_cached(
            "INSERT OR IGNORE INTO server_postbacks (id, at_us, server, method, get_pairs, post_pairs,
               pixel, response_status, error, clickid, action_id, goal, goal_lc, status, offer_id,
               pid, advertiser_id, conversion_id, delta, ip, created, payouts, revenue, line_set)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        let mut new_set =
            tx.prepare_cached("INSERT INTO sp_line_sets (rowid, lines) VALUES (?, ?)")?;
        let mut search =
            tx.prepare_cached("INSERT INTO server_postbacks_search (rowid, params) VALUES (?, ?)")?;
        let mut keys =
            tx.prepare_cached("INSERT INTO server_postbacks_keys (rowid, keys) VALUES (?, ?)")?;
        let mut counts = HourlyAdds::default();
        for r in &rows.postbacks {
            let split = line_sets.split(r.get.iter().chain(r.post.iter()));
            let goal_lc = r.goal.to_lowercase();
            if let Some(text) = &split.new_set {
                new_set.execute(params![split.set, text])?;
            }
            let inserted = pb.execute(params![
                r.id,
                r.at_us,
                r.server,
                r.method,
                pairs_json(&r.get),
                pairs_json(&r.post),
                r.pixel,
                r.response_status,
                r.error,
                r.clickid,
                r.action_id,
                r.goal,
                goal_lc,
                r.status,
                r.offer_id as i64,
                r.pid as i64,
                r.advertiser_id,
                r.conversion_id,
                r.delta,
                r.ip,
                r.created,
                r.payouts,
                r.revenue,
                split.set,
            ])?;
            // Only a new row gets terms: a replayed batch must not add them twice.
            if inserted == 1 {
                let seq = tx.last_insert_rowid();
                counts.add(r, goal_lc, seq, split.set);
                if !split.rest.is_empty() {
                    search.execute(params![seq, split.rest])?;
                }
                let terms = key_terms(&[('c', &r.clickid), ('a', &r.action_id)]);
                if !terms.is_empty() {
                    keys.execute(params![seq, terms])?;
                }
            }
        }
        for key in line_sets.take_new_wide() {
            tx.prepare_cached("INSERT OR IGNORE INTO sp_wide_keys (key) VALUES (?)")?
                .execute([key])?;
        }
        counts.write(&tx)?;
        let mut attempt = tx.prepare_cached(
            "INSERT OR IGNORE INTO delivery_attempts (job_id, attempt, at_us, http_code, error,
               state, next_at_us, pid, offer_id, goal_lc, conv_status, job)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        for AttemptRow { job, attempt: a } in &rows.attempts {
            attempt.execute(params![
                a.job_id,
                a.attempt,
                a.at_us,
                a.http_code,
                a.error,
                a.state.as_str(),
                a.next_at_us,
                job.pid as i64,
                job.offer_id as i64,
                job.goal.to_lowercase(),
                job.status,
                serde_json::to_string(job).unwrap_or_default(),
            ])?;
        }
    }
    upsert_conversions(&tx, &rows.conversions)?;
    tx.commit()
}

/// A batch's additions to the hourly counts, the line sets' hours and the hours' seqs, summed
/// in memory from the rows it inserted and written as one upsert per group: reading the batch
/// back with a `GROUP BY` per table cost a fifth of the processor's and store's CPU.
#[derive(Default)]
struct HourlyAdds {
    /// By the primary key of `sp_hourly` (written in its order).
    groups: BTreeMap<HourlyGroup, HourlySums>,
    line_sets: BTreeMap<(i64, i64), i64>,
    seqs: BTreeMap<i64, (i64, i64)>,
}

/// `(by_partner, hour_us, advertiser_id, offer_id, pid, goal_lc, status, response_status,
/// error)`, as `sp_hourly`'s primary key.
type HourlyGroup = (i64, i64, String, i64, i64, String, i64, i64, String);

#[derive(Default)]
struct HourlySums {
    postbacks: i64,
    accepted: i64,
    rejected: i64,
    created: i64,
    payouts: f64,
    revenue: f64,
}

impl HourlyAdds {
    /// Counts `r`, inserted as `seq` with the line set `set`, at both grains.
    fn add(&mut self, r: &ServerPostbackRow, goal_lc: String, seq: i64, set: i64) {
        let hour = hour_of(r.at_us);
        for (by_partner, pid) in [(0, 0), (1, r.pid as i64)] {
            let key = (
                by_partner,
                hour,
                r.advertiser_id.clone(),
                r.offer_id as i64,
                pid,
                goal_lc.clone(),
                r.status,
                i64::from(r.response_status),
                r.error.clone(),
            );
            let sums = self.groups.entry(key).or_default();
            sums.postbacks += 1;
            sums.accepted += i64::from(r.response_status == 1);
            sums.rejected += i64::from(r.response_status != 1);
            sums.created += i64::from(r.created);
            sums.payouts += r.payouts;
            sums.revenue += r.revenue;
        }
        if set > 0 {
            *self.line_sets.entry((set, hour)).or_default() += 1;
        }
        let seqs = self.seqs.entry(hour).or_insert((seq, seq));
        *seqs = (seqs.0.min(seq), seqs.1.max(seq));
    }

    fn write(self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut group = tx.prepare_cached(
            "INSERT INTO sp_hourly (by_partner, hour_us, advertiser_id, offer_id, pid, goal_lc,
               status, response_status, error, postbacks, accepted, rejected, created, payouts,
               revenue)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT DO UPDATE SET postbacks = postbacks + excluded.postbacks,
               accepted = accepted + excluded.accepted, rejected = rejected + excluded.rejected,
               created = created + excluded.created, payouts = payouts + excluded.payouts,
               revenue = revenue + excluded.revenue",
        )?;
        for ((by_partner, hour, adv, offer, pid, goal, status, response, error), n) in self.groups {
            group.execute(params![
                by_partner,
                hour,
                adv,
                offer,
                pid,
                goal,
                status,
                response,
                error,
                n.postbacks,
                n.accepted,
                n.rejected,
                n.created,
                n.payouts,
                n.revenue
            ])?;
        }
        let mut set_hour = tx.prepare_cached(
            "INSERT INTO sp_line_set_hours (line_set, hour_us, postbacks) VALUES (?, ?, ?)
             ON CONFLICT DO UPDATE SET postbacks = postbacks + excluded.postbacks",
        )?;
        for ((set, hour), n) in self.line_sets {
            set_hour.execute(params![set, hour, n])?;
        }
        let mut seqs = tx.prepare_cached(
            "INSERT INTO sp_seqs_by_hour (hour_us, first_seq, last_seq) VALUES (?, ?, ?)
             ON CONFLICT DO UPDATE SET first_seq = min(first_seq, excluded.first_seq),
               last_seq = max(last_seq, excluded.last_seq)",
        )?;
        for (hour, (first, last)) in self.seqs {
            seqs.execute(params![hour, first, last])?;
        }
        Ok(())
    }
}

/// Adds the rows `filter` selects (SQL on `server_postbacks`, with `values`) to the hourly
/// counts, at both grains (`by_partner` 0: partners summed as pid 0; 1: per partner), and to
/// the hours' seqs.
fn add_hourly_counts(tx: &Transaction<'_>, filter: &str, values: &[i64]) -> rusqlite::Result<()> {
    for (by_partner, pid) in [(0, "0"), (1, "pid")] {
        tx.prepare_cached(&format!(
            "INSERT INTO sp_hourly SELECT {by_partner}, (at_us / {HOUR_US}) * {HOUR_US},
               offer_id, advertiser_id, {pid}, goal_lc, status, response_status, error,
               COUNT(*), SUM(response_status = 1), SUM(response_status <> 1), SUM(created),
               SUM(payouts), SUM(revenue)
             FROM server_postbacks WHERE {filter} GROUP BY 2, 3, 4, 5, 6, 7, 8, 9
             ON CONFLICT DO UPDATE SET postbacks = postbacks + excluded.postbacks,
               accepted = accepted + excluded.accepted, rejected = rejected + excluded.rejected,
               created = created + excluded.created, payouts = payouts + excluded.payouts,
               revenue = revenue + excluded.revenue"
        ))?
        .execute(params_from_iter(values))?;
    }
    tx.prepare_cached(&format!(
        "INSERT INTO sp_line_set_hours SELECT line_set, (at_us / {HOUR_US}) * {HOUR_US}, COUNT(*)
         FROM server_postbacks WHERE ({filter}) AND line_set > 0 GROUP BY 1, 2
         ON CONFLICT DO UPDATE SET postbacks = postbacks + excluded.postbacks"
    ))?
    .execute(params_from_iter(values))?;
    tx.prepare_cached(&format!(
        "INSERT INTO sp_seqs_by_hour SELECT (at_us / {HOUR_US}) * {HOUR_US}, min(seq), max(seq)
         FROM server_postbacks WHERE {filter} GROUP BY 1
         ON CONFLICT DO UPDATE SET first_seq = min(first_seq, excluded.first_seq),
           last_seq = max(last_seq, excluded.last_seq)"
    ))?
    .execute(params_from_iter(values))?;
    Ok(())
}

/// The start of `at_us`'s UTC hour, as the SQL of the summaries computes it.
fn hour_of(at_us: i64) -> i64 {
    (at_us / HOUR_US) * HOUR_US
}

/// Counts again, from the rows, the hours from `from_us`'s to `to_us`'s.
fn recount_hours(tx: &Transaction<'_>, from_us: i64, to_us: i64) -> rusqlite::Result<()> {
    let (first, end) = (hour_of(from_us), hour_of(to_us) + HOUR_US);
    tx.execute(
        "DELETE FROM sp_hourly WHERE by_partner IN (0, 1) AND hour_us >= ? AND hour_us < ?",
        [first, end],
    )?;
    tx.execute(
        "DELETE FROM sp_seqs_by_hour WHERE hour_us >= ? AND hour_us < ?",
        [first, end],
    )?;
    tx.execute(
        "DELETE FROM sp_line_set_hours WHERE hour_us >= ? AND hour_us < ?",
        [first, end],
    )?;
    add_hourly_counts(tx, "at_us >= ?1 AND at_us < ?2", &[first, end])
}

fn commit_state(
    conn: &mut Connection,
    consumer: &str,
    state: &StateChanges,
    next: &[Position],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    upsert_clicks(&tx, &state.clicks)?;
    upsert_conversions(&tx, &state.conversions)?;
    save_positions(&tx, consumer, next)?;
    tx.commit()
}

fn position(c: &Connection, consumer: &str, partition: Partition) -> Result<u64, SeamError> {
    c.query_row(
        "SELECT next_offset FROM positions WHERE consumer = ? AND partition = ?",
        params![consumer, partition],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|o| o.unwrap_or(0) as u64)
    .map_err(db_err)
}

/// Deletes the rows of `table` whose `column` is before `before_us`, in small transactions so
/// that the processor is never held up for long; runs `also` on each chunk's keys first (to
/// delete what hangs off them). Returns how many rows went.
/// Called after a chunk of rows was deleted, with the span of their times.
type AfterChunk = fn(&Transaction<'_>, i64, i64) -> rusqlite::Result<()>;

fn delete_before(
    c: &mut Connection,
    table: &str,
    key: &str,
    column: &str,
    before_us: i64,
    also: &[&str],
    after: Option<AfterChunk>,
) -> Result<u64, SeamError> {
    let mut removed = 0u64;
    let chunk = format!("SELECT {key} FROM {table} WHERE {column} < ?1 LIMIT 5000");
    loop {
        let tx = c.transaction().map_err(db_err)?;
        for also in also {
            tx.execute(&also.replace("{chunk}", &chunk), [before_us])
                .map_err(db_err)?;
        }
        let span: Option<(i64, i64)> = match after {
            Some(_) => tx
                .query_row(
                    &format!(
                        "SELECT min({column}), max({column}) FROM {table} WHERE {key} IN ({chunk})"
                    ),
                    [before_us],
                    |r| Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?)),
                )
                .map_err(db_err)?,
            None => None,
        };
        let n = tx
            .execute(
                &format!("DELETE FROM {table} WHERE {key} IN ({chunk})"),
                [before_us],
            )
            .map_err(db_err)?;
        if let (Some(after), Some((first, last))) = (after, span) {
            after(&tx, first, last).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        removed += n as u64;
        if n == 0 {
            return Ok(removed);
        }
    }
}

const CLICK_COLUMNS: &str = "click_id, at_us, offer_id, pid, ip, ua, referrer, country, subs";

fn click_from_row(r: &Row<'_>) -> rusqlite::Result<Click> {
    let subs: String = r.get(8)?;
    Ok(Click {
        click_id: r.get(0)?,
        at_us: r.get(1)?,
        offer_id: r.get::<_, i64>(2)? as u64,
        pid: r.get::<_, i64>(3)? as u64,
        ip: r.get(4)?,
        ua: r.get(5)?,
        referrer: r.get(6)?,
        country: r.get(7)?,
        subs: serde_json::from_str(&subs).unwrap_or_default(),
    })
}

const CONVERSION_COLUMNS: &str = "id, conv_key, offer_id, pid, advertiser_id, goal, action_id,
    clickid, status, sum, payouts, revenue, currency, ip, ua, comment, sub1, sub2, sub3, sub4,
    sub5, sub6, sub7, sub8, custom_fields, promo_code, user_id, created_us, updated_us, click_us";

fn conversion_from_row(r: &Row<'_>) -> rusqlite::Result<Conversion> {
    let custom: String = r.get(24)?;
    Ok(Conversion {
        id: r.get(0)?,
        key: r.get(1)?,
        offer_id: r.get::<_, i64>(2)? as u64,
        pid: r.get::<_, i64>(3)? as u64,
        advertiser_id: r.get(4)?,
        goal: r.get(5)?,
        action_id: r.get(6)?,
        clickid: r.get(7)?,
        status: r.get(8)?,
        sum: r.get(9)?,
        payouts: r.get(10)?,
        revenue: r.get(11)?,
        currency: r.get(12)?,
        ip: r.get(13)?,
        ua: r.get(14)?,
        comment: r.get(15)?,
        subs: (16..24)
            .map(|i| r.get(i))
            .collect::<rusqlite::Result<_>>()?,
        custom_fields: serde_json::from_str(&custom).unwrap_or_default(),
        promo_code: r.get(25)?,
        user_id: r.get(26)?,
        created_us: r.get(27)?,
        updated_us: r.get(28)?,
        click_us: r.get(29)?,
    })
}

const POSTBACK_COLUMNS: &str = "id, at_us, server, method, get_pairs, post_pairs, pixel,
    response_status, error, clickid, action_id, goal, status, offer_id, pid, advertiser_id,
    conversion_id, delta, ip, created, payouts, revenue";

fn postback_from_row(r: &Row<'_>) -> rusqlite::Result<ServerPostbackRow> {
    Ok(ServerPostbackRow {
        id: r.get(0)?,
        at_us: r.get(1)?,
        server: r.get(2)?,
        method: r.get(3)?,
        get: pairs_from_json(&r.get::<_, String>(4)?),
        post: pairs_from_json(&r.get::<_, String>(5)?),
        pixel: r.get(6)?,
        response_status: r.get(7)?,
        error: r.get(8)?,
        clickid: r.get(9)?,
        action_id: r.get(10)?,
        goal: r.get(11)?,
        status: r.get(12)?,
        offer_id: r.get::<_, i64>(13)? as u64,
        pid: r.get::<_, i64>(14)? as u64,
        advertiser_id: r.get(15)?,
        conversion_id: r.get(16)?,
        delta: r.get(17)?,
        ip: r.get(18)?,
        created: r.get(19)?,
        payouts: r.get(20)?,
        revenue: r.get(21)?,
    })
}

/// A WHERE clause under construction; values are always bound, never spliced.
#[derive(Default)]
struct Filter {
    sql: Vec<String>,
    values: Vec<Value>,
}

impl Filter {
    fn add(&mut self, clause: &str, values: impl IntoIterator<Item = Value>) {
        self.sql.push(clause.to_string());
        self.values.extend(values);
    }
    fn any_of(&mut self, column: &str, values: Vec<Value>) {
        if values.is_empty() {
            return;
        }
        let marks = vec!["?"; values.len()].join(", ");
        self.add(&format!("{column} IN ({marks})"), values);
    }
    /// `column = value`, the candidates found through the term index `keys` (see
    /// `key_term`) when the value has a term.
    fn exact(&mut self, keys: &str, column: &str, letter: char, value: &str) {
        if value.is_empty() {
            self.add(&format!("{column} = ?"), [Value::Text(value.into())]);
        } else {
            self.add(
                &format!("seq IN (SELECT rowid FROM {keys} WHERE {keys} MATCH ?) AND {column} = ?"),
                [
                    Value::Text(key_term(letter, value)),
                    Value::Text(value.into()),
                ],
            );
        }
    }
    fn clause(&self) -> String {
        if self.sql.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.sql.join(" AND "))
        }
    }
}

fn ints(v: &[u64]) -> Vec<Value> {
    v.iter().map(|n| Value::Integer(*n as i64)).collect()
}
fn texts(v: &[String]) -> Vec<Value> {
    v.iter().map(|s| Value::Text(s.clone())).collect()
}

/// The WHERE clause of the server-postback filters (paging aside).
fn postback_filter(q: &ServerPostbackQuery) -> Filter {
    let mut f = Filter::default();
    f.add(
        "at_us >= ? AND at_us < ?",
        [Value::Integer(q.from_us), Value::Integer(q.to_us)],
    );
    key_filters(&mut f, q);
    if let Some(v) = &q.id {
        f.add("id = ?", [Value::Text(v.clone())]);
    }
    if let Some(v) = &q.click_id {
        f.exact("server_postbacks_keys", "clickid", 'c', v);
    }
    if let Some(v) = &q.action_id {
        f.exact("server_postbacks_keys", "action_id", 'a', v);
    }
    if let Some(s) = q.search.as_ref().filter(|s| !s.is_empty()) {
        if indexed_term(s) {
            // The row's line set, or its other lines; the range's seqs bound the index's
            // lists (see `sp_seqs_by_hour`).
            let phrase = Value::Text(fts_phrase(s));
            let hours = [hour_of(q.from_us), hour_of(q.to_us)].map(Value::Integer);
            f.add(
                "(line_set IN (SELECT rowid FROM sp_line_sets WHERE lines MATCH ?)
                  OR seq IN (SELECT rowid FROM server_postbacks_search WHERE params MATCH ?
                   AND rowid >= (SELECT coalesce(min(first_seq), 0) FROM sp_seqs_by_hour
                                 WHERE hour_us >= ? AND hour_us <= ?)
                   AND rowid <= (SELECT coalesce(max(last_seq), -1) FROM sp_seqs_by_hour
                                 WHERE hour_us >= ? AND hour_us <= ?)))",
                [phrase.clone(), phrase]
                    .into_iter()
                    .chain(hours.clone())
                    .chain(hours),
            );
        } else {
            // Too short for trigrams, or across lines: scan the rows the other filters leave,
            // line by line.
            f.add(
                "EXISTS (SELECT 1 FROM (SELECT value FROM json_each(get_pairs)
                   UNION ALL SELECT value FROM json_each(post_pairs)) p
                   WHERE instr(lower((p.value ->> 0) || '=' || (p.value ->> 1)), lower(?)) > 0)",
                [Value::Text(s.clone())],
            );
        }
    }
    f
}

/// The filters on columns that the hourly counts keep as well.
fn key_filters(f: &mut Filter, q: &ServerPostbackQuery) {
    f.any_of("offer_id", ints(&q.offers));
    f.any_of("pid", ints(&q.partners));
    f.any_of("advertiser_id", texts(&q.suppliers));
    if let Some(v) = &q.goal {
        f.add("goal_lc = ?", [Value::Text(v.to_lowercase())]);
    }
    if let Some(v) = q.status {
        f.add("status = ?", [Value::Integer(v)]);
    }
    if let Some(v) = q.response_status {
        f.add("response_status = ?", [Value::Integer(v.into())]);
    }
}

/// The summary. The whole hours of the range are read from the hourly counts when every filter
/// is on their keys, the rest (a range's ends off the hour, or filters on ids or the search) from the
/// rows; the parts are merged, groups in key order.
fn summary(c: &Connection, q: &SummaryQuery) -> rusqlite::Result<Vec<SummaryRow>> {
    let f = &q.filters;
    let (from, to) = (f.from_us, f.to_us);
    let whole = (hour_of(from.saturating_add(HOUR_US - 1)), hour_of(to));
    let by_keys = f.id.is_none()
        && f.click_id.is_none()
        && f.action_id.is_none()
        && f.search.as_ref().is_none_or(|s| s.is_empty());
    let parts = if by_keys && whole.0 < whole.1 {
        let mut parts = summary_of(c, q, Counted::Hourly, whole)?;
        for edge in [(from, whole.0), (whole.1, to)] {
            if edge.0 < edge.1 {
                parts.extend(summary_of(c, q, Counted::Rows, edge)?);
            }
        }
        parts
    } else {
        summary_of(c, q, Counted::Rows, (from, to))?
    };
    let mut groups: BTreeMap<GroupKey, SummaryRow> = BTreeMap::new();
    for part in parts {
        match groups.entry(part.key()) {
            Entry::Occupied(mut g) => g.get_mut().merge(&part),
            Entry::Vacant(g) => {
                g.insert(part);
            }
        }
    }
    // Ungrouped, an empty log still gives SQL one row (of zeros): no rows, like groups.
    Ok(groups.into_values().filter(|g| g.postbacks > 0).collect())
}

/// Where a summary counts: the rows, or the hourly counts of whole hours.
#[derive(Clone, Copy, PartialEq)]
enum Counted {
    Rows,
    Hourly,
}

/// One GROUP BY over `counted`, within `range` and the query's filters.
fn summary_of(
    c: &Connection,
    q: &SummaryQuery,
    counted: Counted,
    range: (i64, i64),
) -> rusqlite::Result<Vec<SummaryRow>> {
    use postback_core::seams::SummaryKey as K;
    let has = |k| q.group_by.contains(&k);
    let (table, hour, counts, filter) = match counted {
        Counted::Rows => (
            "server_postbacks",
            format!("(at_us / {HOUR_US}) * {HOUR_US}"),
            "COUNT(*), SUM(response_status = 1), SUM(response_status <> 1), SUM(created),
             SUM(payouts), SUM(revenue)",
            postback_filter(&ServerPostbackQuery {
                from_us: range.0,
                to_us: range.1,
                ..q.filters.clone()
            }),
        ),
        Counted::Hourly => {
            // Per partner only when the summary groups or filters by partner: an hour has a
            // group per offer and partner there, several times more.
            let by_partner = q.group_by.contains(&K::Partner) || !q.filters.partners.is_empty();
            let mut f = Filter::default();
            f.add(
                "by_partner = ? AND hour_us >= ? AND hour_us < ?",
                [by_partner.into(), range.0, range.1].map(Value::Integer),
            );
            key_filters(&mut f, &q.filters);
            (
                "sp_hourly",
                "hour_us".to_string(),
                "SUM(postbacks), SUM(accepted), SUM(rejected), SUM(created), SUM(payouts),
                 SUM(revenue)",
                f,
            )
        }
    };
    // The columns of SummaryRow's keys, in its order: time, offer, advertiser, partner, goal,
    // response status, error.
    let columns: [(bool, &str); 7] = [
        (has(K::Hour) || has(K::Day), &hour),
        (has(K::Offer), "offer_id"),
        (has(K::Advertiser), "advertiser_id"),
        (has(K::Partner), "pid"),
        (has(K::Goal), "goal_lc"),
        (has(K::ResponseStatus), "response_status"),
        (has(K::Error), "error"),
    ];
    let grouped: Vec<&str> = columns
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, c)| *c)
        .collect();
    let (select, group) = if grouped.is_empty() {
        (String::new(), String::new())
    } else {
        let list = grouped.join(", ");
        (format!("{list}, "), format!("GROUP BY {list}"))
    };
    let sql = format!(
        "SELECT {select} {counts} FROM {table} {} {group}",
        filter.clause()
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(filter.values.iter()), |r| {
        let mut i = 0;
        let mut next = || {
            i += 1;
            i - 1
        };
        let mut row = SummaryRow::default();
        if columns[0].0 {
            row.hour_us = Some(r.get(next())?);
        }
        if columns[1].0 {
            row.offer_id = Some(r.get::<_, i64>(next())? as u64);
        }
        if columns[2].0 {
            row.advertiser_id = Some(r.get(next())?);
        }
        if columns[3].0 {
            row.pid = Some(r.get::<_, i64>(next())? as u64);
        }
        if columns[4].0 {
            row.goal = Some(r.get(next())?);
        }
        if columns[5].0 {
            row.response_status = Some(r.get(next())?);
        }
        if columns[6].0 {
            row.error = Some(r.get(next())?);
        }
        let mut count = || {
            r.get::<_, Option<i64>>(next())
                .map(|n| n.unwrap_or(0) as u64)
        };
        row.postbacks = count()?;
        row.accepted = count()?;
        row.rejected = count()?;
        row.conversions = count()?;
        row.payouts = r.get::<_, Option<f64>>(next())?.unwrap_or(0.0);
        row.revenue = r.get::<_, Option<f64>>(next())?.unwrap_or(0.0);
        Ok(row)
    })?;
    rows.collect()
}

/// A search string as an FTS5 phrase (substring match with the trigram tokenizer).
fn fts_phrase(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A paged listing: which table, which columns, in which order, and the column and
/// AUTOINCREMENT sequence that snapshots are taken on.
struct Listing {
    table: &'static str,
    columns: &'static str,
    order: &'static str,
    seq: &'static str,
    sequence: &'static str,
}

const POSTBACK_LISTING: Listing = Listing {
    table: "server_postbacks",
    columns: POSTBACK_COLUMNS,
    order: "at_us DESC, id DESC",
    seq: "seq",
    sequence: "server_postbacks",
};

const CONVERSION_LISTING: Listing = Listing {
    table: "conversions",
    columns: CONVERSION_COLUMNS,
    order: "created_us DESC, id DESC",
    seq: "seq",
    sequence: "conversions",
};

/// One page of a listing, and its total, read in one transaction so that both see the same
/// rows; limited to the snapshot, or to the rows that exist now.
fn query_page<T>(
    conn: &Connection,
    listing: &Listing,
    mut filter: Filter,
    (offset, limit, snapshot): (u64, u64, Option<u64>),
    map: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Page<T>> {
    let Listing {
        table,
        columns,
        order,
        seq,
        sequence,
    } = listing;
    let tx = conn.unchecked_transaction()?;
    let snapshot = match snapshot {
        Some(s) => s,
        None => last_seq(&tx, sequence)?,
    };
    filter.add(
        &format!("{seq} <= ?"),
        [Value::Integer(i64::try_from(snapshot).unwrap_or(i64::MAX))],
    );
    let where_ = filter.clause();
    let total: i64 = tx
        .prepare_cached(&format!("SELECT COUNT(*) FROM {table} {where_}"))?
        .query_row(params_from_iter(filter.values.iter()), |r| r.get(0))?;
    let mut values = filter.values.clone();
    values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    values.push(Value::Integer(i64::try_from(offset).unwrap_or(i64::MAX)));
    let rows = tx
        .prepare_cached(&format!(
            "SELECT {columns} FROM {table} {where_} ORDER BY {order} LIMIT ? OFFSET ?"
        ))?
        .query_map(params_from_iter(values.iter()), map)?
        .collect::<rusqlite::Result<Vec<T>>>()?;
    Ok(Page {
        rows,
        total: total as u64,
        snapshot,
    })
}

/// The highest seq `table` has handed out: a new listing's snapshot.
fn last_seq(tx: &Connection, table: &str) -> rusqlite::Result<u64> {
    Ok(tx
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = ?")?
        .query_row([table], |r| r.get::<_, i64>(0))
        .optional()?
        .map_or(0, |s| s as u64))
}

/// The server-postback listing with a search the trigram index serves: what `query_page`
/// does, through fewer of a common term's matches. Its count is the index's alone when it can
/// be (`index_count`). Its page is read from the newest stretch of the range likely to hold it
/// (sized by the count), widened until it does: every row before a stretch is older than all
/// within it, so the stretch's first rows are the range's.
fn search_page(
    c: &Connection,
    q: &ServerPostbackQuery,
) -> rusqlite::Result<Page<ServerPostbackRow>> {
    let tx = c.unchecked_transaction()?;
    let snapshot = match q.snapshot {
        Some(s) => s,
        None => last_seq(&tx, "server_postbacks")?,
    };
    let until_snapshot = |mut f: Filter| {
        f.add(
            "seq <= ?",
            [Value::Integer(i64::try_from(snapshot).unwrap_or(i64::MAX))],
        );
        f
    };
    let total = match index_count(&tx, q, snapshot)? {
        Some(n) => n,
        None => {
            let f = until_snapshot(postback_filter(q));
            let sql = format!("SELECT COUNT(*) FROM server_postbacks {}", f.clause());
            let n: i64 = tx
                .prepare_cached(&sql)?
                .query_row(params_from_iter(f.values.iter()), |r| r.get(0))?;
            n as u64
        }
    };
    let mut rows = Vec::new();
    if q.limit > 0 && q.offset < total {
        let range = i128::from(q.to_us) - i128::from(q.from_us);
        let want = i128::from(q.offset) + i128::from(q.limit);
        // Twice the stretch that holds `want` rows if matches are spread evenly, an hour at
        // least; a page near the end of the listing reads it all.
        let mut span = (range.saturating_mul(want).saturating_mul(2) / i128::from(total.max(1)))
            .max(i128::from(HOUR_US));
        loop {
            let from_us = i128::from(q.to_us) - span;
            let whole = from_us <= i128::from(q.from_us);
            let stretch = ServerPostbackQuery {
                from_us: if whole { q.from_us } else { from_us as i64 },
                ..q.clone()
            };
            let f = until_snapshot(postback_filter(&stretch));
            let mut values = f.values.clone();
            values.push(Value::Integer(i64::try_from(q.limit).unwrap_or(i64::MAX)));
            values.push(Value::Integer(i64::try_from(q.offset).unwrap_or(i64::MAX)));
            let sql = format!(
                "SELECT {POSTBACK_COLUMNS} FROM server_postbacks {}
                 ORDER BY at_us DESC, id DESC LIMIT ? OFFSET ?",
                f.clause()
            );
            rows = tx
                .prepare_cached(&sql)?
                .query_map(params_from_iter(values.iter()), postback_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if whole || rows.len() as u64 == q.limit {
                break;
            }
            span = span.saturating_mul(4);
        }
    }
    Ok(Page {
        rows,
        total,
        snapshot,
    })
}

/// What looking one row up in the trigram index costs, in matches read in order: 58 µs a
/// seek against 0.35–1.3 µs a match, measured over 10M rows.
const SEEK_COST: u64 = 100;

/// The count of a listing whose only filter is a search: the rows whose line set matches,
/// mostly from the sets' hourly counts, and those whose other lines match (`rest_count`), less
/// the rows in both. `None` when there are other filters.
fn index_count(
    tx: &Connection,
    q: &ServerPostbackQuery,
    snapshot: u64,
) -> rusqlite::Result<Option<u64>> {
    let Some(rest) = rest_count(tx, q, snapshot)? else {
        return Ok(None);
    };
    let phrase = fts_phrase(q.search.as_deref().unwrap_or_default());
    let any_set: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM sp_line_sets WHERE lines MATCH ?)")?
        .query_row([&phrase], |r| r.get(0))?;
    if !any_set {
        return Ok(Some(rest));
    }
    let snapshot = i64::try_from(snapshot).unwrap_or(i64::MAX);
    // The sets whose text matches the term (`?1`); `+line_set` keeps SQLite from reading a
    // common set's rows through its index where the rowid or the index's matches are fewer.
    const MATCHING: &str = "(SELECT rowid FROM sp_line_sets WHERE lines MATCH ?1)";
    let from_rows = |from_us: i64, to_us: i64| -> rusqlite::Result<i64> {
        tx.prepare_cached(&format!(
            "SELECT COUNT(*) FROM server_postbacks
             WHERE line_set IN {MATCHING} AND at_us >= ?2 AND at_us < ?3 AND seq <= ?4"
        ))?
        .query_row(params![phrase, from_us, to_us, snapshot], |r| r.get(0))
    };
    // The range's whole hours from the counts, less their rows written after the snapshot;
    // its ends off the hour from the rows.
    let whole_from = hour_of(q.from_us + HOUR_US - 1);
    let whole_to = hour_of(q.to_us);
    let in_sets = if q.from_us >= 0 && whole_from < whole_to {
        let counted: i64 = tx
            .prepare_cached(&format!(
                "SELECT coalesce(sum(postbacks), 0) FROM sp_line_set_hours
                 WHERE line_set IN {MATCHING} AND hour_us >= ?2 AND hour_us < ?3"
            ))?
            .query_row(params![phrase, whole_from, whole_to], |r| r.get(0))?;
        let newer: i64 = tx
            .prepare_cached(&format!(
                "SELECT COUNT(*) FROM server_postbacks
                 WHERE seq > ?4 AND +line_set IN {MATCHING} AND +at_us >= ?2 AND +at_us < ?3"
            ))?
            .query_row(params![phrase, whole_from, whole_to, snapshot], |r| {
                r.get(0)
            })?;
        counted - newer + from_rows(q.from_us, whole_from)? + from_rows(whole_to, q.to_us)?
    } else {
        from_rows(q.from_us, q.to_us)?
    };
    // Rows whose set and other lines both match were counted twice: checked from the cheaper
    // side, the sets' rows one by one in the index, or the index's matches in the sets.
    let both: i64 = if rest == 0 || in_sets == 0 {
        0
    } else if (in_sets as u64).saturating_mul(SEEK_COST) < rest {
        tx.prepare_cached(&format!(
            "SELECT COUNT(*) FROM server_postbacks AS p
             WHERE line_set IN {MATCHING} AND at_us >= ?2 AND at_us < ?3 AND seq <= ?4
               AND EXISTS (SELECT 1 FROM server_postbacks_search
                           WHERE params MATCH ?1 AND rowid = p.seq)"
        ))?
        .query_row(params![phrase, q.from_us, q.to_us, snapshot], |r| r.get(0))?
    } else {
        let hours = [hour_of(q.from_us), hour_of(q.to_us)];
        tx.prepare_cached(&format!(
            "SELECT COUNT(*) FROM server_postbacks
             WHERE seq IN (SELECT rowid FROM server_postbacks_search WHERE params MATCH ?1
                   AND rowid >= (SELECT coalesce(min(first_seq), 0) FROM sp_seqs_by_hour
                                 WHERE hour_us >= ?2 AND hour_us <= ?3)
                   AND rowid <= (SELECT coalesce(max(last_seq), -1) FROM sp_seqs_by_hour
                                 WHERE hour_us >= ?2 AND hour_us <= ?3))
               AND +line_set IN {MATCHING} AND +at_us >= ?4 AND +at_us < ?5 AND seq <= ?6"
        ))?
        .query_row(
            params![phrase, hours[0], hours[1], q.from_us, q.to_us, snapshot],
            |r| r.get(0),
        )?
    };
    Ok(Some(rest + in_sets as u64 - both as u64))
}

/// The count of the rows in a search-only listing whose lines outside their line set match,
/// mostly from the trigram index alone: the matches between the first and the last seq of
/// the range's hours, less those among them outside the range. Those can only lie where the seqs of an hour outside the range, or of a
/// range's hour that is only partly in it, fall between: rows written out of time order (a
/// batch spanning an hour's end, a partition behind the others). Only those stretches are
/// checked row by row. `None` when there are other filters.
fn rest_count(
    tx: &Connection,
    q: &ServerPostbackQuery,
    snapshot: u64,
) -> rusqlite::Result<Option<u64>> {
    let only_search = q.offers.is_empty()
        && q.partners.is_empty()
        && q.suppliers.is_empty()
        && q.id.is_none()
        && q.click_id.is_none()
        && q.action_id.is_none()
        && q.goal.is_none()
        && q.status.is_none()
        && q.response_status.is_none();
    let Some(term) = q
        .search
        .as_ref()
        .filter(|_| only_search && q.from_us < q.to_us)
    else {
        return Ok(None);
    };
    let phrase = fts_phrase(term);
    let snapshot = i64::try_from(snapshot).unwrap_or(i64::MAX);
    // The hours the range touches: [first_hour, last_hour].
    let (first_hour, last_hour) = (hour_of(q.from_us), hour_of(q.to_us - 1));
    let (first, last): (Option<i64>, Option<i64>) = tx
        .prepare_cached(
            "SELECT min(first_seq), max(last_seq) FROM sp_seqs_by_hour
             WHERE hour_us >= ? AND hour_us <= ?",
        )?
        .query_row([first_hour, last_hour], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(Some(0)); // no row in the range's hours
    };
    let last = last.min(snapshot);
    if last < first {
        return Ok(Some(0));
    }
    // Where rows outside the range may be: the seqs of the hours outside it that overlap, and
    // of the range's first and last hours when the range cuts them.
    let mut mixed: Vec<(i64, i64)> = tx
        .prepare_cached(
            "SELECT max(first_seq, ?3), min(last_seq, ?4) FROM sp_seqs_by_hour
             WHERE ((hour_us < ?1 OR hour_us > ?2) AND first_seq <= ?4 AND last_seq >= ?3)
                OR (hour_us = ?1 AND ?5) OR (hour_us = ?2 AND ?6)",
        )?
        .query_map(
            params![
                first_hour,
                last_hour,
                first,
                last,
                q.from_us != first_hour,
                i128::from(q.to_us) != i128::from(last_hour) + i128::from(HOUR_US)
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    mixed.sort_unstable();
    let mut stretches: Vec<(i64, i64)> = Vec::new();
    for (lo, hi) in mixed.into_iter().filter(|(lo, hi)| lo <= hi) {
        match stretches.last_mut() {
            Some(prev) if lo <= prev.1 + 1 => prev.1 = prev.1.max(hi),
            _ => stretches.push((lo, hi)),
        }
    }
    let matches: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM server_postbacks_search WHERE params MATCH ?
               AND rowid >= ? AND rowid <= ?",
        )?
        .query_row(params![phrase, first, last], |r| r.get(0))?;
    let mut outside = 0i64;
    for (lo, hi) in stretches {
        outside += tx
            .prepare_cached(
                "SELECT COUNT(*) FROM server_postbacks WHERE seq >= ?2 AND seq <= ?3
                   AND NOT (at_us >= ?4 AND at_us < ?5)
                   AND seq IN (SELECT rowid FROM server_postbacks_search WHERE params MATCH ?1
                               AND rowid >= ?2 AND rowid <= ?3)",
            )?
            .query_row(params![phrase, lo, hi, q.from_us, q.to_us], |r| {
                r.get::<_, i64>(0)
            })?;
    }
    Ok(Some((matches - outside) as u64))
}

fn select_in<T>(
    conn: &Connection,
    sql_prefix: &str,
    keys: &[String],
    map: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let mut stmt = conn.prepare_cached(&format!("{sql_prefix} ({marks})"))?;
        let rows = stmt.query_map(params_from_iter(chunk.iter()), &map)?;
        for r in rows {
            out.push(r?);
        }
    }
    Ok(out)
}

impl AnalyticsStore for SqliteStore {
    fn insert(&self, rows: AnalyticsRows) -> BoxFuture<'_, Result<(), SeamError>> {
        let line_sets = self.line_sets.clone();
        self.with_writer(move |c| insert_batch(c, &rows, &line_sets))
    }

    fn server_postbacks(
        &self,
        q: ServerPostbackQuery,
    ) -> BoxFuture<'_, Result<Page<ServerPostbackRow>, SeamError>> {
        self.with_reader(move |c| {
            if q.search.as_deref().is_some_and(indexed_term) {
                return search_page(c, &q).map_err(db_err);
            }
            let f = postback_filter(&q);
            query_page(
                c,
                &POSTBACK_LISTING,
                f,
                (q.offset, q.limit, q.snapshot),
                postback_from_row,
            )
            .map_err(db_err)
        })
    }

    fn summary(&self, q: SummaryQuery) -> BoxFuture<'_, Result<Vec<SummaryRow>, SeamError>> {
        self.with_reader(move |c| summary(c, &q).map_err(db_err))
    }

    fn conversions(
        &self,
        q: ConversionQuery,
    ) -> BoxFuture<'_, Result<Page<Conversion>, SeamError>> {
        self.with_reader(move |c| {
            let mut f = Filter::default();
            f.add(
                "created_us >= ? AND created_us < ?",
                [Value::Integer(q.from_us), Value::Integer(q.to_us)],
            );
            f.any_of(
                "status",
                q.statuses
                    .iter()
                    .map(|s| Value::Integer((*s).into()))
                    .collect(),
            );
            f.any_of("offer_id", ints(&q.offers));
            f.any_of("advertiser_id", texts(&q.advertisers));
            f.any_of("pid", ints(&q.partners));
            if let Some(v) = q.goal {
                f.add("goal_lc = ?", [Value::Text(v.to_lowercase())]);
            }
            if let Some(v) = q.action_id {
                f.exact("conversions_keys", "action_id", 'a', &v);
            }
            if let Some(v) = q.clickid {
                f.exact("conversions_keys", "clickid", 'c', &v);
            }
            if let Some(v) = q.conversion_id {
                f.add("id = ?", [Value::Text(v)]);
            }
            for (i, sub) in q.subs.iter().enumerate() {
                match sub {
                    Some(v) if i == 0 => f.exact("conversions_keys", "sub1", 's', v),
                    Some(v) => f.add(&format!("sub{} = ?", i + 1), [Value::Text(v.clone())]),
                    None => {}
                }
            }
            query_page(
                c,
                &CONVERSION_LISTING,
                f,
                (q.offset, q.limit, q.snapshot),
                conversion_from_row,
            )
            .map_err(db_err)
        })
    }

    fn clicks(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<Click>, SeamError>> {
        self.with_reader(move |c| {
            select_in(
                c,
                &format!("SELECT {CLICK_COLUMNS} FROM clicks WHERE click_id IN"),
                &ids,
                click_from_row,
            )
            .map_err(db_err)
        })
    }

    fn conversion_states(
        &self,
        keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Conversion>, SeamError>> {
        self.with_reader(move |c| {
            select_in(
                c,
                &format!("SELECT {CONVERSION_COLUMNS} FROM conversions WHERE conv_key IN"),
                &keys,
                conversion_from_row,
            )
            .map_err(db_err)
        })
    }

    fn attempts(&self, q: AttemptQuery) -> BoxFuture<'_, Result<Page<AttemptRow>, SeamError>> {
        self.with_reader(move |c| {
            let mut f = Filter::default();
            f.add(
                "at_us >= ? AND at_us < ?",
                [Value::Integer(q.from_us), Value::Integer(q.to_us)],
            );
            f.any_of("offer_id", ints(&q.offers));
            f.any_of("pid", ints(&q.partners));
            if let Some(v) = q.goal {
                f.add("goal_lc = ?", [Value::Text(v.to_lowercase())]);
            }
            if let Some(v) = q.status {
                f.add("conv_status = ?", [Value::Integer(v.into())]);
            }
            if let Some(v) = q.http_code {
                f.add("http_code = ?", [Value::Integer(v.into())]);
            }
            if let Some(v) = q.job_id {
                f.add("job_id = ?", [Value::Text(v)]);
            }
            query_page(
                c,
                &ATTEMPT_LISTING,
                f,
                (q.offset, q.limit, q.snapshot),
                attempt_from_row,
            )
            .map_err(db_err)
        })
    }

    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>> {
        self.with_writer(move |c| {
            let postbacks = delete_before(
                c,
                "server_postbacks",
                "seq",
                "at_us",
                before_us,
                &[
                    "DELETE FROM server_postbacks_search WHERE rowid IN ({chunk})",
                    "DELETE FROM server_postbacks_keys WHERE rowid IN ({chunk})",
                ],
                Some(recount_hours),
            )?;
            let attempts =
                delete_before(c, "delivery_attempts", "seq", "at_us", before_us, &[], None)?;
            Ok(postbacks + attempts + expire_state(c, before_us)?)
        })
    }

    /// Clicks and conversions go too: here they are the state's as well.
    fn clear(&self) -> BoxFuture<'_, Result<(), SeamError>> {
        self.with_writer(|c| {
            c.execute_batch(
                "BEGIN; DELETE FROM server_postbacks_search; DELETE FROM server_postbacks_keys;
                 DELETE FROM server_postbacks; DELETE FROM sp_hourly;
                 DELETE FROM sp_seqs_by_hour; DELETE FROM sp_line_set_hours;
                 DELETE FROM delivery_attempts; DELETE FROM conversions_keys;
                 DELETE FROM conversions; DELETE FROM clicks;
                 COMMIT;",
            )
            .map_err(db_err)
        })
    }
}

/// Clicks and conversions are the state's and the analytics' at once.
fn expire_state(c: &mut Connection, before_us: i64) -> Result<u64, SeamError> {
    Ok(delete_before(
        c,
        "conversions",
        "seq",
        "created_us",
        before_us,
        &["DELETE FROM conversions_keys WHERE rowid IN ({chunk})"],
        None,
    )? + delete_before(c, "clicks", "click_id", "at_us", before_us, &[], None)?)
}

impl StateStore for SqliteStore {
    fn position(
        &self,
        consumer: &str,
        partition: Partition,
    ) -> BoxFuture<'_, Result<u64, SeamError>> {
        let consumer = consumer.to_string();
        self.with_writer(move |c| position(c, &consumer, partition))
    }

    fn lookup(
        &self,
        click_ids: Vec<String>,
        conversion_keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Lookups, SeamError>> {
        // The writer connection: the processor must see its own last write.
        self.with_writer(move |c| {
            let mut out = Lookups::default();
            let clicks = select_in(
                c,
                &format!("SELECT {CLICK_COLUMNS} FROM clicks WHERE click_id IN"),
                &click_ids,
                click_from_row,
            )
            .map_err(db_err)?;
            for click in clicks {
                out.clicks.insert(click.click_id.clone(), click);
            }
            let convs = select_in(
                c,
                &format!("SELECT {CONVERSION_COLUMNS} FROM conversions WHERE conv_key IN"),
                &conversion_keys,
                conversion_from_row,
            )
            .map_err(db_err)?;
            for conv in convs {
                out.conversions.insert(conv.key.clone(), conv);
            }
            Ok(out)
        })
    }

    fn commit(
        &self,
        consumer: &str,
        state: StateChanges,
        next: Vec<Position>,
    ) -> BoxFuture<'_, Result<(), SeamError>> {
        let consumer = consumer.to_string();
        self.with_writer(move |c| commit_state(c, &consumer, &state, &next).map_err(db_err))
    }

    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>> {
        self.with_writer(move |c| expire_state(c, before_us))
    }
}

impl DeliveryQueue for SqliteStore {
    fn position(
        &self,
        consumer: &str,
        partition: Partition,
    ) -> BoxFuture<'_, Result<u64, SeamError>> {
        let consumer = consumer.to_string();
        self.with_writer(move |c| position(c, &consumer, partition))
    }

    fn apply_deliveries(
        &self,
        consumer: &str,
        records: Vec<DeliveryRecord>,
        next: Position,
    ) -> BoxFuture<'_, Result<(), SeamError>> {
        let consumer = consumer.to_string();
        self.with_writer(move |c| apply_deliveries(c, &consumer, &records, next).map_err(db_err))
    }

    fn due_jobs(&self, q: DueQuery) -> BoxFuture<'_, Result<DueJobs, SeamError>> {
        self.with_writer(move |c| due_jobs(c, &q).map_err(db_err))
    }

    fn jobs(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<JobState>, SeamError>> {
        self.with_writer(move |c| {
            select_in(
                c,
                &format!("SELECT {JOB_COLUMNS} FROM delivery_jobs WHERE job_id IN"),
                &ids,
                job_from_row,
            )
            .map_err(db_err)
        })
    }

    fn failed_jobs(
        &self,
        pid: u64,
        from_us: i64,
        to_us: i64,
    ) -> BoxFuture<'_, Result<Vec<String>, SeamError>> {
        self.with_reader(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT job_id FROM delivery_jobs WHERE pid = ? AND at_us >= ? AND at_us < ?
                     AND state IN ('failed', 'gave_up') ORDER BY job_id",
                )
                .map_err(db_err)?;
            let ids = stmt
                .query_map(params![pid as i64, from_us, to_us], |r| r.get(0))
                .map_err(db_err)?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(db_err)?;
            Ok(ids)
        })
    }

    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>> {
        self.with_writer(move |c| {
            delete_before(c, "delivery_jobs", "job_id", "at_us", before_us, &[], None)
        })
    }
}

/// Hosts in turn after `after_host`, wrapping around, each found by one index seek (a loose
/// index scan over `dj_host_due`), then each host's soonest due jobs: the cost is per host
/// visited, however many jobs a host has waiting.
fn due_jobs(c: &Connection, q: &DueQuery) -> rusqlite::Result<DueJobs> {
    // Partition numbers are integers: written into the statement (one cached per set).
    let parts = match &q.partitions {
        None => String::new(),
        Some(ps) => format!(
            " AND part IN ({})",
            ps.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    let mut next_host = c.prepare_cached(&format!(
        "SELECT MIN(host) FROM delivery_jobs WHERE state = 'pending' AND host > ?{parts}"
    ))?;
    let mut soonest = c.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM delivery_jobs
         WHERE state = 'pending' AND host = ? AND next_at_us <= ?{parts}
         ORDER BY next_at_us, job_id LIMIT ?"
    ))?;
    let mut out = DueJobs {
        jobs: Vec::new(),
        last_host: q.after_host.clone(),
    };
    let mut cursor = q.after_host.clone();
    let mut wrapped = false;
    let mut visited = 0;
    while out.jobs.len() < q.limit && visited < q.max_hosts {
        let host: Option<String> = next_host.query_row([&cursor], |r| r.get(0))?;
        let host = match host {
            Some(h) if !(wrapped && h > q.after_host) => h,
            Some(_) => break, // back where this call began
            None if wrapped || cursor.is_empty() => break,
            None => {
                wrapped = true;
                cursor.clear();
                continue;
            }
        };
        let jobs = soonest
            .query_map(params![host, q.now_us, q.per_host as i64], job_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        out.jobs.extend(jobs);
        out.last_host = host.clone();
        cursor = host;
        visited += 1;
    }
    Ok(out)
}

const JOB_COLUMNS: &str = "job, state, attempts, round_base, next_at_us";

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<JobState> {
    let job: String = r.get(0)?;
    let state: String = r.get(1)?;
    Ok(JobState {
        job: serde_json::from_str(&job).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        status: JobStatus::parse(&state).unwrap_or(JobStatus::Pending),
        attempts: r.get(2)?,
        round_base: r.get(3)?,
        next_at_us: r.get(4)?,
    })
}

const ATTEMPT_LISTING: Listing = Listing {
    table: "delivery_attempts",
    columns: "job, attempt, at_us, http_code, error, state, next_at_us",
    order: "at_us DESC, job_id DESC, attempt DESC",
    seq: "seq",
    sequence: "delivery_attempts",
};

fn attempt_from_row(r: &Row<'_>) -> rusqlite::Result<AttemptRow> {
    let job: String = r.get(0)?;
    let job: DeliveryJob = serde_json::from_str(&job).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let state: String = r.get(5)?;
    Ok(AttemptRow {
        attempt: Attempt {
            job_id: job.job_id.clone(),
            attempt: r.get(1)?,
            at_us: r.get(2)?,
            http_code: r.get(3)?,
            error: r.get(4)?,
            state: JobStatus::parse(&state).unwrap_or(JobStatus::Pending),
            next_at_us: r.get(6)?,
        },
        job,
    })
}

fn apply_deliveries(
    conn: &mut Connection,
    consumer: &str,
    records: &[DeliveryRecord],
    next: Position,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert_job = tx.prepare_cached(
            "INSERT OR IGNORE INTO delivery_jobs (job_id, part, at_us, host, pid, offer_id,
               goal_lc, conv_status, job, state, attempts, round_base, next_at_us)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, 0, ?)",
        )?;
        // Attempts of a job are numbered in order: one at or below the count was applied.
        let mut update_job = tx.prepare_cached(
            "UPDATE delivery_jobs SET attempts = ?2, state = ?3, next_at_us = COALESCE(?4, next_at_us)
             WHERE job_id = ?1 AND attempts < ?2",
        )?;
        let mut resend = tx.prepare_cached(
            "UPDATE delivery_jobs SET state = 'pending', next_at_us = ?2, round_base = attempts WHERE job_id = ?1",
        )?;
        for record in records {
            match record {
                DeliveryRecord::Job(j) => {
                    insert_job.execute(params![
                        j.job_id,
                        next.partition,
                        j.at_us,
                        j.host(),
                        j.pid as i64,
                        j.offer_id as i64,
                        j.goal.to_lowercase(),
                        j.status,
                        serde_json::to_string(j).unwrap_or_default(),
                        j.at_us,
                    ])?;
                }
                DeliveryRecord::Attempt(a) => {
                    update_job.execute(params![
                        a.job_id,
                        a.attempt,
                        a.state.as_str(),
                        a.next_at_us
                    ])?;
                }
                DeliveryRecord::Resend { job_id, at_us } => {
                    resend.execute(params![job_id, at_us])?;
                }
            }
        }
        save_positions(&tx, consumer, &[next])?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postback_core::store_conformance as suite;

    /// A fresh store in a directory of its own under `dir`, each time it is called.
    fn fresh(dir: &Path) -> impl Fn() -> Arc<SqliteStore> + Sync + '_ {
        let n = std::sync::atomic::AtomicUsize::new(0);
        move || {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Arc::new(SqliteStore::open(&dir.join(format!("s{i}.sqlite"))).expect("opens"))
        }
    }

    #[tokio::test]
    async fn conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let new = fresh(dir.path());
        suite::analytics_suite(&|| {
            let s: Arc<dyn AnalyticsStore> = new();
            Box::pin(async move { s })
        })
        .await;
        suite::state_suite(&|| {
            let s: Arc<dyn StateStore> = new();
            Box::pin(async move { s })
        })
        .await;
        suite::queue_suite(&|| {
            let s: Arc<dyn DeliveryQueue> = new();
            Box::pin(async move { s })
        })
        .await;
    }

    /// The row-per-row FTS5 indexes merge 16 segments at a time, also in a store made before
    /// the setting (it is applied at every open, not only at creation).
    #[test]
    fn the_row_indexes_merge_sixteen_segments_at_a_time_in_every_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let tables = [
            "server_postbacks_keys",
            "server_postbacks_search",
            "conversions_keys",
        ];
        let automerge = |c: &Connection, t: &str| -> i64 {
            c.query_row(
                &format!("SELECT v FROM {t}_config WHERE k = 'automerge'"),
                [],
                |r| r.get(0),
            )
            .unwrap_or(4)
        };
        drop(SqliteStore::open(&path).expect("opens"));
        let c = Connection::open(&path).expect("opens");
        for t in tables {
            assert_eq!(automerge(&c, t), 16, "{t} when created");
            c.execute_batch(&format!(
                "INSERT INTO {t} ({t}, rank) VALUES ('automerge', 4)"
            ))
            .expect("resets");
            assert_eq!(automerge(&c, t), 4);
        }
        drop(c);
        drop(SqliteStore::open(&path).expect("opens again"));
        let c = Connection::open(&path).expect("opens");
        for t in tables {
            assert_eq!(automerge(&c, t), 16, "{t} when opened again");
        }
    }

    /// Retention that cuts an hour in two leaves that hour's counts to the rows it kept, and
    /// a later batch adds to them; the summary agrees with the rows, read both ways.
    #[tokio::test]
    async fn hourly_counts_follow_retention_within_an_hour() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).expect("opens");
        let at = |i: i64, at_us: i64| ServerPostbackRow {
            at_us,
            ..postback_row(i)
        };
        let hour = HOUR_US;
        store
            .insert(postbacks(vec![
                at(1, hour + 1),
                at(2, hour + 5),
                at(3, hour + 9),
            ]))
            .await
            .expect("insert");
        AnalyticsStore::expire(&store, hour + 6)
            .await
            .expect("expire");
        store
            .insert(postbacks(vec![at(4, hour + 20), at(5, 2 * hour)]))
            .await
            .expect("insert");
        let by_hour = |from_us, to_us| SummaryQuery {
            filters: ServerPostbackQuery {
                from_us,
                to_us,
                ..Default::default()
            },
            group_by: vec![postback_core::seams::SummaryKey::Hour],
        };
        let counted = |summary: Vec<SummaryRow>| -> Vec<(Option<i64>, u64)> {
            summary.iter().map(|r| (r.hour_us, r.postbacks)).collect()
        };
        let expected = vec![(Some(hour), 2), (Some(2 * hour), 1)];
        // Whole hours (from sp_hourly), and a range off the hour (rows at its ends).
        let hourly = store.summary(by_hour(0, 3 * hour)).await.expect("summary");
        assert_eq!(counted(hourly), expected);
        let edges = store
            .summary(by_hour(1, 3 * hour - 1))
            .await
            .expect("summary");
        assert_eq!(counted(edges), expected);
    }

    /// A batch adds its rows' counts from memory; they equal the counts read again from the
    /// rows (as retention recounts an hour), across hours, groups and a batch partly redone.
    #[tokio::test]
    async fn batch_counts_equal_a_recount_from_the_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).expect("opens");
        let row = |i: i64| {
            let mut r = postback_row(i);
            r.at_us = (i % 5) * HOUR_US + i * 997;
            r.offer_id = (i % 3) as u64;
            r.pid = (i % 4) as u64;
            r.advertiser_id = format!("adv{}", i % 2);
            r.goal = ["Sale", "lead"][(i % 2) as usize].into();
            r.status = i % 3;
            (r.response_status, r.error) = if i % 7 == 0 {
                (2, "Wrong secure".into())
            } else {
                (1, String::new())
            };
            r.created = i % 2 == 0;
            // Quarters: sums in any order are exact, so the two ways must agree to the bit.
            (r.payouts, r.revenue) = ((i % 5) as f64 * 0.25, (i % 3) as f64 * 0.75);
            r.get = postback_core::params::parse_form(format!("g=g{}&o=o{i}", i % 3).as_bytes());
            r
        };
        store
            .insert(postbacks((0..40).map(row).collect()))
            .await
            .expect("insert");
        // Rows 30..40 again (a redone batch): only the new ones count.
        store
            .insert(postbacks((30..70).map(row).collect()))
            .await
            .expect("insert");
        let mut c = Connection::open(&path).expect("open");
        let counts = |c: &Connection| -> Vec<String> {
            ["sp_hourly", "sp_line_set_hours", "sp_seqs_by_hour"]
                .iter()
                .flat_map(|table| {
                    let mut q = c
                        .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5, 6"))
                        .or_else(|_| c.prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2")))
                        .expect("prepare");
                    let n = q.column_count();
                    q.query_map([], |r| {
                        (0..n)
                            .map(|i| r.get::<_, Value>(i))
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .expect("query")
                    .map(|r| format!("{table} {:?}", r.expect("row")))
                    .collect::<Vec<_>>()
                })
                .collect()
        };
        let written = counts(&c);
        let tx = c.transaction().expect("tx");
        recount_hours(&tx, 0, 6 * HOUR_US).expect("recount");
        assert_eq!(written, counts(&tx));
        let total: i64 = tx
            .query_row(
                "SELECT sum(postbacks) FROM sp_hourly WHERE by_partner = 1",
                [],
                |r| r.get(0),
            )
            .expect("sum");
        assert_eq!(total, 70);
    }

    /// A search reads its count from the index alone and its page from the newest stretch
    /// of the range: both agree with the rows read one by one, whether the hours' seqs overlap
    /// (a batch of an earlier hour written late) or not, for every page and range.
    #[tokio::test]
    async fn searches_agree_with_the_rows_however_their_hours_were_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).expect("opens");
        let hour = HOUR_US;
        // `kind` takes two values (its lines go into line sets); `n` and `note` take too many
        // (after their first values, the trigram index): "sale" is in the sets of most rows,
        // in the other lines of a few, and in both of some.
        let row = |i: i64, at_us: i64, common: bool| {
            let mut r = postback_row(i);
            r.at_us = at_us;
            // One row's set holds "zzz", and so do the indexed lines of most rows.
            let kind = match (i, common) {
                (100, _) => "zzz",
                (_, true) => "sale",
                (_, false) => "lead",
            };
            let note = if i % 5 == 0 { "Sale" } else { "x" };
            let code = if i <= 40 { "a" } else { "zzz" };
            let q = format!("n={i}&kind={kind}&note={note}{i}&code={code}{i}");
            r.get = postback_core::params::parse_form(q.as_bytes());
            r
        };
        // Hours 10..16, three rows in four with `kind=sale`; hour 12's last rows come in a
        // batch after hour 13's, so their seqs overlap.
        let mut i = 0;
        let mut late = Vec::new();
        for h in 10..16 {
            let mut rows = Vec::new();
            for k in 0..40 {
                i += 1;
                let r = row(i, h * hour + k * 60_000_000, k % 4 != 0);
                if h == 12 && k >= 30 {
                    late.push(r);
                } else {
                    rows.push(r);
                }
            }
            store.insert(postbacks(rows)).await.expect("insert");
            if h == 13 {
                store
                    .insert(postbacks(std::mem::take(&mut late)))
                    .await
                    .expect("insert");
            }
        }
        let listing = |from_us, to_us, search: &str, offset, limit, snapshot| {
            store.server_postbacks(ServerPostbackQuery {
                from_us,
                to_us,
                search: Some(search.into()),
                offset,
                limit,
                snapshot,
                ..Default::default()
            })
        };
        let all = listing(0, i64::MAX, "", 0, 1000, None)
            .await
            .expect("all")
            .rows;
        assert_eq!(all.len(), 240);
        // What a search finds, by its meaning: a substring of a `key=value` line.
        let matching = |all: &[ServerPostbackRow], from_us: i64, to_us: i64, term: &str| {
            let term = term.to_lowercase();
            all.iter()
                .filter(|r| r.at_us >= from_us && r.at_us < to_us)
                .filter(|r| {
                    r.get
                        .iter()
                        .any(|(k, v)| format!("{k}={v}").to_lowercase().contains(&term))
                })
                .map(|r| r.id.clone())
                .collect::<Vec<_>>()
        };
        let half = hour / 2;
        let ranges = [
            (10 * hour, 16 * hour),
            (10 * hour, 12 * hour),
            (12 * hour, 13 * hour),
            (13 * hour, 14 * hour),
            (11 * hour, 15 * hour),
            (12 * hour, 20 * hour),
            (12 * hour + half, 14 * hour - half),
            (10 * hour + 1, 13 * hour + half),
            (13 * hour + half, 13 * hour + half + 60_000_000),
            (0, i64::MAX),
        ];
        let terms = ["kind=SALE", "sale", "=sale1", "n=1", "LEAD", "e=s", "ZZZ"];
        let check = |all: Vec<ServerPostbackRow>| async move {
            for (from_us, to_us) in ranges {
                for term in terms {
                    let expected = matching(&all, from_us, to_us, term);
                    for (offset, limit) in [(0, 5), (0, 100), (7, 5), (25, 10), (100, 50)] {
                        let page = listing(from_us, to_us, term, offset, limit, None)
                            .await
                            .expect("search");
                        let at = format!("{term:?} in {from_us}..{to_us}");
                        assert_eq!(page.total, expected.len() as u64, "{at}");
                        let ids: Vec<&str> = page.rows.iter().map(|r| r.id.as_str()).collect();
                        let want: Vec<&str> = expected
                            .iter()
                            .skip(offset as usize)
                            .take(limit as usize)
                            .map(String::as_str)
                            .collect();
                        assert_eq!(ids, want, "{at}, offset {offset}, limit {limit}");
                    }
                }
            }
        };
        check(all.clone()).await;
        // A listing pinned to a snapshot counts none of the rows written after it.
        let pinned = listing(10 * hour, 16 * hour, "sale", 0, 10, None)
            .await
            .expect("pinned");
        let more: Vec<_> = (0..20)
            .map(|k| row(1000 + k, 14 * hour + k * 1_000_000, true))
            .collect();
        store.insert(postbacks(more)).await.expect("insert");
        let again = listing(10 * hour, 16 * hour, "sale", 0, 10, Some(pinned.snapshot))
            .await
            .expect("pinned again");
        assert_eq!((again.total, again.rows), (pinned.total, pinned.rows));
        // Retention cuts an hour in two: its counts follow.
        AnalyticsStore::expire(&store, 11 * hour + half)
            .await
            .expect("expire");
        let left = listing(0, i64::MAX, "", 0, 1000, None)
            .await
            .expect("all")
            .rows;
        assert_eq!(left.len(), 240 + 20 - 70);
        check(left).await;
    }

    #[tokio::test]
    async fn line_sets_left_unknown_by_a_panic_are_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).expect("opens");
        let rows = |from: i64| {
            postbacks(
                (from..from + 3)
                    .map(|i| {
                        let mut row = postback_row(i);
                        row.get = postback_core::params::parse_form(b"goal=sale");
                        row
                    })
                    .collect(),
            )
        };
        store.insert(rows(0)).await.expect("insert");
        // A batch that panicked half way: a set given an id it never stored.
        let sets = store.line_sets.clone();
        let _ = std::thread::spawn(move || {
            let mut sets = sets.lock().expect("lock");
            sets.split([("goal", "lost")].into_iter());
            panic!("a bug in a batch");
        })
        .join();
        assert!(store.line_sets.is_poisoned());
        store
            .insert(rows(10))
            .await
            .expect("insert after the panic");
        assert!(!store.line_sets.is_poisoned());
        let mut lost = postback_row(20);
        lost.get = postback_core::params::parse_form(b"goal=lost");
        store.insert(postbacks(vec![lost])).await.expect("insert");
        for (term, want) in [("goal=sale", 6), ("goal=lost", 1)] {
            let page = store
                .server_postbacks(ServerPostbackQuery {
                    search: Some(term.into()),
                    ..broad()
                })
                .await
                .expect("search");
            assert_eq!(page.total, want, "{term}");
        }
    }

    /// Enough rows that counting them takes many SQLite VM steps.
    async fn filled(store: &SqliteStore) {
        let rows = (0..3000)
            .map(|i| {
                let mut row = postback_row(i);
                row.get = postback_core::params::parse_form(format!("n={i}").as_bytes());
                row
            })
            .collect();
        store.insert(postbacks(rows)).await.expect("insert");
    }

    fn postbacks(rows: Vec<ServerPostbackRow>) -> AnalyticsRows {
        AnalyticsRows {
            postbacks: rows,
            ..Default::default()
        }
    }

    fn postback_row(i: i64) -> ServerPostbackRow {
        ServerPostbackRow {
            id: format!("{i:024x}"),
            at_us: 1_000 + i,
            server: String::new(),
            method: "GET".into(),
            get: Params::default(),
            post: Params::default(),
            pixel: false,
            response_status: 1,
            error: String::new(),
            clickid: String::new(),
            action_id: String::new(),
            goal: String::new(),
            status: 0,
            offer_id: 1,
            pid: 1,
            advertiser_id: String::new(),
            conversion_id: String::new(),
            delta: None,
            ip: String::new(),
            created: false,
            payouts: 0.0,
            revenue: 0.0,
        }
    }

    fn broad() -> ServerPostbackQuery {
        ServerPostbackQuery {
            from_us: 0,
            to_us: i64::MAX,
            search: Some("=1".into()),
            limit: 10,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_query_over_its_time_budget_is_stopped_and_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).expect("opens");
        filled(&store).await;
        assert!(store.server_postbacks(broad()).await.is_ok());
        let hurried = SqliteStore::open(&path)
            .expect("opens")
            .with_query_budget(std::time::Duration::ZERO);
        match hurried.server_postbacks(broad()).await {
            Err(SeamError::Rejected(why)) => assert!(why.contains("time budget"), "{why}"),
            other => panic!("not stopped: {other:?}"),
        }
        // The connection is fine afterwards.
        assert_eq!(
            store.server_postbacks(broad()).await.expect("query").total,
            1111
        );
    }

    #[tokio::test]
    async fn a_cancelled_query_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).expect("opens");
        filled(&store).await;
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let q = broad();
        let result = store
            .run_reader(
                move |c| {
                    query_page(
                        c,
                        &POSTBACK_LISTING,
                        Filter::default(),
                        (0, q.limit, None),
                        postback_from_row,
                    )
                    .map_err(db_err)
                },
                cancelled,
            )
            .await;
        assert!(
            matches!(result, Err(SeamError::Unavailable(_))),
            "{result:?}"
        );
        // Dropping a query's future is what cancels it.
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        drop(CancelOnDrop(flag.clone()));
        assert!(flag.load(std::sync::atomic::Ordering::Acquire));
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).expect("opens");
        filled(&store).await;
        let next = vec![Position {
            partition: 2,
            offset: 8,
        }];
        StateStore::commit(&store, "p", StateChanges::default(), next)
            .await
            .expect("commit");
        drop(store);
        let again = SqliteStore::open(&path).expect("reopens");
        assert_eq!(
            StateStore::position(&again, "p", 2)
                .await
                .expect("position"),
            8
        );
        assert_eq!(
            again.server_postbacks(broad()).await.expect("query").total,
            1111
        );
        // The line sets made before are found again: a row of an early set (n=1 went into one)
        // and of a wide key's value (n=2999 was indexed) adds to the same searches.
        let rows = [1, 2999].map(|n| {
            let mut row = postback_row(5000 + n);
            row.get = postback_core::params::parse_form(format!("n={n}").as_bytes());
            row
        });
        again
            .insert(postbacks(rows.to_vec()))
            .await
            .expect("insert");
        let found = |term: &str| {
            again.server_postbacks(ServerPostbackQuery {
                search: Some(term.into()),
                ..broad()
            })
        };
        assert_eq!(found("n=1").await.expect("query").total, 1112);
        assert_eq!(found("n=2999").await.expect("query").total, 2);
        let sets: i64 = again
            .with_reader(|c| {
                c.query_row("SELECT COUNT(*) FROM sp_line_sets", [], |r| r.get(0))
                    .map_err(db_err)
            })
            .await
            .expect("sets");
        assert_eq!(sets, crate::line_sets::MAX_VALUES as i64);
    }
}
