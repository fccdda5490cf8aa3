//! The analytics store on ClickHouse: the server-postback log, conversions, clicks and the
//! affiliate-postback attempt log in `MergeTree` tables partitioned by month, written in one
//! `INSERT` per table per batch and read by the stats API. It implements
//! `postback_core::seams::AnalyticsStore`; the processor's state and the delivery queue stay in
//! the engine's SQLite.
//!
//! - Schema: `schemas/clickhouse/*.sql`, applied in order by [`ClickHouseStore::migrate`] and
//!   recorded in `schema_versions`. The server's version is read at connect: from 20.3 on
//!   the tables carry the retention as `TTL`, and rows are checked against the tables' types
//!   (the crate's validation); on older servers (Debian's 18.16) [`AnalyticsStore::expire`]
//!   drops whole months past the retention, and validation is off (18.16 lacks the format it
//!   needs).
//! - Duplicates: every row has a deterministic id; a batch that may be in already (redone after
//!   a failure, a restart or a hand-over, see `AnalyticsRows::maybe_inserted`) is checked
//!   against the table before it is inserted, so queries count plain rows, correct before any
//!   merge; the `ReplacingMergeTree` engines are the backstop.
//! - Summaries: the whole hours of a range are read from the hourly counts (`sp_hourly`, kept
//!   by a materialized view as rows are inserted), the range's ends from the rows.
//! - Ids: a filter on a click id or action id first looks up where the id lies in time
//!   (`sp_ids`, kept by another view) and reads the log only there.
//! - Snapshots: each insert carries the writer's `written_us` (strictly increasing in this
//!   process); a listing's snapshot is a `written_us` no insert still in flight is below.

#[cfg(test)]
mod chdb_check;
mod rows;
pub mod sql;

use clickhouse::{Client, Compression};
use postback_core::delivery::AttemptRow;
use postback_core::processor::ServerPostbackRow;
use postback_core::rules::{Click, Conversion};
use postback_core::seams::{
    AnalyticsRows, AnalyticsStore, AttemptQuery, BoxFuture, ConversionQuery, GroupKey, Page,
    SeamError, ServerPostbackQuery, SummaryKey, SummaryQuery, SummaryRow, HOUR_US,
};
use rows::*;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The analytics tables.
const TABLES: [&str; 6] = [
    "server_postbacks",
    "conversions",
    "clicks",
    "delivery_attempts",
    "sp_hourly",
    "sp_ids",
];

/// The migrations, in order: (version, name, DDL template).
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "tables",
        include_str!("../../../schemas/clickhouse/001_tables.sql"),
    ),
    (
        2,
        "hourly counts",
        include_str!("../../../schemas/clickhouse/002_hourly.sql"),
    ),
    (
        3,
        "click and action ids",
        include_str!("../../../schemas/clickhouse/003_ids.sql"),
    ),
];

/// Where the store is: `clickhouse://[USER[:PASSWORD]@]HOST:PORT/DATABASE` (the HTTP port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseConfig {
    /// `http://HOST:PORT`.
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Rows older than this many days are retired (`TTL`, or dropped by month).
    pub retention_days: u32,
    /// The time budget of a stats query (ClickHouse's `max_execution_time`, whole seconds).
    pub query_timeout: Duration,
}

impl ClickHouseConfig {
    pub fn from_url(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("store: {s:?}: {why} (clickhouse://[USER[:PASSWORD]@]HOST:PORT/DATABASE)")
        };
        let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "clickhouse" {
            return Err(bad("not a clickhouse:// URL"));
        }
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        let port = url
            .port()
            .ok_or_else(|| bad("no port (the HTTP port, often 8123)"))?;
        let database = url.path().trim_start_matches('/').to_string();
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if database.is_empty() || !database.chars().all(valid) {
            return Err(bad("the database must be a name of letters, digits and _"));
        }
        let decode = |v: &str| {
            percent_decode(v).map_err(|_| bad("the user or password is not valid percent-encoding"))
        };
        let user = match url.username() {
            "" => None,
            u => Some(decode(u)?),
        };
        let password = url.password().map(decode).transpose()?;
        Ok(Self {
            url: format!("http://{host}:{port}"),
            database,
            user,
            password,
            retention_days: 92,
            query_timeout: Duration::from_secs(10),
        })
    }
}

fn percent_decode(s: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|v| v.into_owned())
}

/// ClickHouse's error codes that say "later" rather than "never" (from its ErrorCodes.cpp).
const TRANSIENT_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE (a connection cut mid-reply)
    159, // TIMEOUT_EXCEEDED
    164, // READONLY
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
];

/// The code in a ClickHouse error text ("Code: 241. DB::Exception: ...").
fn error_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
}

/// An error of a write, by what the processor should do: wait and redo, or stop.
fn write_err(e: clickhouse::error::Error) -> SeamError {
    use clickhouse::error::Error as E;
    match &e {
        E::Network(_) | E::TimedOut => SeamError::Unavailable(format!("clickhouse: {e}")),
        E::BadResponse(text) if error_code(text).is_none_or(|c| TRANSIENT_CODES.contains(&c)) => {
            SeamError::Unavailable(format!("clickhouse: {e}"))
        }
        _ => SeamError::Fatal(format!("clickhouse: {e}")),
    }
}

/// An error of a stats query: over its budget or too big is the client's to narrow.
fn read_err(e: clickhouse::error::Error) -> SeamError {
    use clickhouse::error::Error as E;
    if let E::BadResponse(text) = &e {
        match error_code(text) {
            Some(159 | 241 | 158 | 396) => {
                return SeamError::Rejected(
                    "the query took longer or needed more memory than its budget; \
                     narrow the date range or add filters"
                        .into(),
                )
            }
            Some(c) if !TRANSIENT_CODES.contains(&c) => {
                return SeamError::Fatal(format!("clickhouse: {e}"))
            }
            _ => {}
        }
    }
    SeamError::Unavailable(format!("clickhouse: {e}"))
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A server version, major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32, pub u32);

impl ServerVersion {
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('.');
        Some(Self(
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        ))
    }

    /// `TTL` with `ttl_only_drop_parts`, and `RowBinaryWithNamesAndTypes` (the crate's
    /// validation).
    pub fn is_modern(self) -> bool {
        self >= Self(20, 3)
    }
}

/// The DDL of a migration for a server: placeholders filled (see the SQL files' headers), split
/// into statements.
pub fn render_migration(
    template: &str,
    db: &str,
    modern: bool,
    retention_days: u32,
) -> Vec<String> {
    let mut text = String::new();
    for line in template.lines() {
        let line = line.split("--").next().unwrap_or("");
        text.push_str(line);
        text.push('\n');
    }
    let mut out = text.replace("{db}", db).replace(
        "{settings}",
        if modern {
            ", ttl_only_drop_parts = 1"
        } else {
            ""
        },
    );
    while let Some(start) = out.find("{ttl ") {
        let Some(len) = out[start..].find('}') else {
            break;
        };
        let column = out[start + 5..start + len].trim().to_string();
        let ttl = if modern {
            format!(
                "TTL toDateTime(intDiv({column}, 1000000), 'UTC') + INTERVAL {retention_days} DAY"
            )
        } else {
            String::new()
        };
        out.replace_range(start..start + len + 1, &ttl);
    }
    out.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

pub struct ClickHouseStore {
    client: Client,
    /// Without a database: creates it.
    admin: Client,
    db: String,
    version: ServerVersion,
    retention_days: u32,
    query_timeout: Duration,
    /// The last `written_us` handed out.
    written: AtomicI64,
    /// `written_us` of the inserts under way, and how many have each.
    in_flight: Mutex<BTreeMap<i64, usize>>,
    /// Rows before this are past the retention: queries leave them out.
    floor_us: AtomicI64,
    /// Why the last write failed, until one succeeds.
    trouble: Mutex<Option<String>>,
}

/// Releases an insert's `written_us` when it ends, however it ends.
struct InFlight<'a>(&'a ClickHouseStore, i64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.0.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

impl ClickHouseStore {
    /// Connects and reads the server's version. The schema is [`Self::migrate`]'s.
    pub async fn connect(config: &ClickHouseConfig) -> Result<Self, SeamError> {
        let mut admin = Client::default()
            .with_url(&config.url)
            .with_compression(Compression::Lz4)
            .with_validation(false);
        if let Some(u) = &config.user {
            admin = admin.with_user(u);
        }
        if let Some(p) = &config.password {
            admin = admin.with_password(p);
        }
        let version: String = admin
            .query_raw("SELECT version()")
            .fetch_one()
            .await
            .map_err(write_err)?;
        let version = ServerVersion::parse(&version).ok_or_else(|| {
            SeamError::Fatal(format!("clickhouse: cannot read the version {version:?}"))
        })?;
        let client = admin
            .clone()
            .with_database(&config.database)
            .with_validation(version.is_modern());
        let store = Self {
            client,
            admin,
            db: config.database.clone(),
            version,
            retention_days: config.retention_days,
            query_timeout: config.query_timeout,
            written: AtomicI64::new(0),
            in_flight: Mutex::new(BTreeMap::new()),
            floor_us: AtomicI64::new(i64::MIN),
            trouble: Mutex::new(None),
        };
        tracing::info!(
            version = ?store.version,
            database = %store.db,
            ttl = store.version.is_modern(),
            "ClickHouse analytics store ready"
        );
        Ok(store)
    }

    pub fn version(&self) -> ServerVersion {
        self.version
    }

    /// Applies the migrations not recorded as applied, in order; returns how many. Each
    /// statement is idempotent, so a migration cut short is simply applied again, and
    /// processes that migrate one database at once (replicas started together) all succeed: a
    /// pass that loses a race of DDL on the server is run again.
    pub async fn migrate(&self) -> Result<usize, SeamError> {
        const PASSES: u32 = 5;
        let mut pass = 1;
        loop {
            match self.migrate_once().await {
                Ok(n) => return Ok(n),
                Err(e) if pass < PASSES => {
                    tracing::warn!(error = %e, pass, "a ClickHouse migration pass failed; again");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(pass)))
                        .await;
                    pass += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn migrate_once(&self) -> Result<usize, SeamError> {
        let db = &self.db;
        let run = |sql: String| async move {
            self.admin
                .query_raw(&sql)
                .execute()
                .await
                .map_err(write_err)
        };
        run(sql::create_database(db)).await?;
        run(sql::create_migrations_table(db)).await?;
        let applied = self.applied_migrations().await.map_err(write_err)?;
        let mut count = 0;
        for (version, name, template) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            for statement in
                render_migration(template, db, self.version.is_modern(), self.retention_days)
            {
                run(statement).await?;
            }
            run(sql::record_migration(db, *version, name, now_us())).await?;
            tracing::info!(version, name, "applied a ClickHouse migration");
            count += 1;
        }
        Ok(count)
    }

    /// The versions recorded as applied, in `schema_versions` and in the legacy table (none
    /// while the database or both tables are missing).
    async fn applied_migrations(&self) -> Result<HashSet<u32>, clickhouse::error::Error> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Applied {
            version: u32,
        }
        let tables: Vec<String> = self
            .admin
            .query_raw(&sql::migrations_tables(&self.db))
            .fetch_all()
            .await?;
        if tables.is_empty() {
            return Ok(HashSet::new());
        }
        Ok(self
            .admin
            .query_raw(&sql::applied_migrations(&self.db, &tables))
            .fetch_all::<Applied>()
            .await?
            .into_iter()
            .map(|a| a.version)
            .collect())
    }

    /// The migrations applied, none while the database or its tables are missing (60, 81).
    async fn applied_so_far(&self) -> Result<HashSet<u32>, SeamError> {
        match self.applied_migrations().await {
            Ok(applied) => Ok(applied),
            Err(e) if matches!(error_code(&e.to_string()), Some(60 | 81)) => Ok(HashSet::new()),
            Err(e) => Err(write_err(e)),
        }
    }

    /// `migrate` for a server starting with `--migrate`, where replicas may start together:
    /// refused when a pending migration counts the rows already logged (its `INSERT`) and
    /// there are rows, since two processes running it at once would count them twice. An
    /// empty database (a new deployment) is migrated as by `migrate`.
    pub async fn migrate_at_start(&self) -> Result<usize, SeamError> {
        let applied = self.applied_so_far().await?;
        let counting: Vec<u32> = MIGRATIONS
            .iter()
            .filter(|(v, _, template)| !applied.contains(v) && template.contains("INSERT INTO"))
            .map(|(v, _, _)| *v)
            .collect();
        if !counting.is_empty() {
            let rows = match self
                .count(sql::row_count(&self.db, "server_postbacks"))
                .await
            {
                Ok(n) => n,
                Err(e) if matches!(error_code(&e.to_string()), Some(60 | 81)) => 0,
                Err(e) => return Err(e),
            };
            if rows > 0 {
                return Err(SeamError::Fatal(format!(
                    "migrations {counting:?} count the {rows} rows already logged in {}, once: \
                     run `postbackd migrate --store ...` while no engine writes (at start, \
                     replicas migrating together would count them twice)",
                    self.db
                )));
            }
        }
        self.migrate().await
    }

    /// Counts the hourly counts again from the rows (after a server was killed between an
    /// insert's rows and its counts): empties `sp_hourly`, then runs migration 2's count. Like
    /// that migration, it must run while no engine writes.
    pub async fn recount_hours(&self) -> Result<(), SeamError> {
        let (_, _, template) = MIGRATIONS
            .iter()
            .find(|(v, _, _)| *v == 2)
            .ok_or_else(|| SeamError::Fatal("no hourly counts in this build".into()))?;
        let rendered = render_migration(
            template,
            &self.db,
            self.version.is_modern(),
            self.retention_days,
        );
        let count = rendered
            .into_iter()
            .find(|s| s.starts_with("INSERT INTO"))
            .ok_or_else(|| SeamError::Fatal("migration 2 has no count".into()))?;
        for sql in [sql::truncate(&self.db, "sp_hourly"), count] {
            self.admin
                .query_raw(&sql)
                .execute()
                .await
                .map_err(write_err)?;
        }
        Ok(())
    }

    /// Fails unless every migration of this build is applied: a schema that is behind is
    /// upgraded by `postbackd migrate` (or `--migrate`), never silently.
    pub async fn check_schema(&self) -> Result<(), SeamError> {
        let db = &self.db;
        let applied = self.applied_so_far().await?;
        let missing: Vec<u32> = MIGRATIONS
            .iter()
            .map(|(v, _, _)| *v)
            .filter(|v| !applied.contains(v))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(SeamError::Fatal(format!(
                "the ClickHouse database {db} lacks migrations {missing:?} of this build: run \
                 `postbackd migrate --store ...` (or start with --migrate)"
            )))
        }
    }

    /// The next `written_us`: the clock, but strictly after the last one.
    fn next_written(&self) -> i64 {
        let now = now_us();
        let mut last = self.written.load(Ordering::Acquire);
        loop {
            let next = now.max(last + 1);
            match self
                .written
                .compare_exchange(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// A snapshot for a new listing: every insert at or below it has ended.
    fn snapshot_now(&self) -> i64 {
        let oldest = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .next()
            .copied();
        let written = self.written.load(Ordering::Acquire).max(now_us());
        oldest.map_or(written, |w| (w - 1).min(written))
    }

    fn floor(&self) -> i64 {
        self.floor_us.load(Ordering::Acquire)
    }

    fn read(&self, sql: &str) -> clickhouse::query::Query {
        let secs = self.query_timeout.as_secs().max(1);
        self.client
            .query_raw(sql)
            .with_setting("max_execution_time", secs.to_string())
    }

    async fn count(&self, sql: String) -> Result<u64, SeamError> {
        Ok(self
            .read(&sql)
            .fetch_one::<Count>()
            .await
            .map_err(read_err)?
            .n)
    }

    /// Keys of `keys` that `table` holds already (for a batch that may be in).
    async fn existing(
        &self,
        table: &str,
        key: &str,
        time: &str,
        keys: Vec<(String, i64)>,
    ) -> Result<HashSet<String>, SeamError> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        let span = keys.iter().fold((i64::MAX, i64::MIN), |(lo, hi), (_, t)| {
            (lo.min(*t), hi.max(*t))
        });
        let keys: Vec<String> = keys.into_iter().map(|(k, _)| k).collect();
        let mut found = HashSet::new();
        for chunk in keys.chunks(2000) {
            let sql = sql::existing(&self.db, table, key, time, chunk, span);
            for k in self
                .client
                .query_raw(&sql)
                .fetch_all::<Key>()
                .await
                .map_err(write_err)?
            {
                found.insert(k.k);
            }
        }
        Ok(found)
    }

    async fn insert_all<T>(&self, table: &str, rows: Vec<T>) -> Result<(), SeamError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self
            .client
            .insert::<T>(table)
            .await
            .map_err(write_err)?
            .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
        for row in &rows {
            insert.write(row).await.map_err(write_err)?;
        }
        insert.end().await.map_err(write_err)
    }

    async fn insert_rows(&self, rows: AnalyticsRows) -> Result<(), SeamError> {
        let written_us = self.next_written();
        *self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(written_us)
            .or_default() += 1;
        let _in_flight = InFlight(self, written_us);
        let AnalyticsRows {
            mut clicks,
            mut postbacks,
            mut conversions,
            mut attempts,
            maybe_inserted,
        } = rows;
        if maybe_inserted {
            let have = self
                .existing(
                    "clicks",
                    "click_id",
                    "at_us",
                    clicks
                        .iter()
                        .map(|c| (c.click_id.clone(), c.at_us))
                        .collect(),
                )
                .await?;
            clicks.retain(|c| !have.contains(&c.click_id));
            let have = self
                .existing(
                    "server_postbacks",
                    "id",
                    "at_us",
                    postbacks.iter().map(|r| (r.id.clone(), r.at_us)).collect(),
                )
                .await?;
            postbacks.retain(|r| !have.contains(&r.id));
            let state_key = |c: &Conversion| format!("{}:{}", c.id, c.version());
            let have = self
                .existing(
                    "conversions",
                    "concat(id, ':', toString(version))",
                    "created_us",
                    conversions
                        .iter()
                        .map(|c| (state_key(c), c.created_us))
                        .collect(),
                )
                .await?;
            conversions.retain(|c| !have.contains(&state_key(c)));
            let attempt_key =
                |a: &AttemptRow| format!("{}:{}", a.attempt.job_id, a.attempt.attempt);
            let have = self
                .existing(
                    "delivery_attempts",
                    "concat(job_id, ':', toString(attempt))",
                    "at_us",
                    attempts
                        .iter()
                        .map(|a| (attempt_key(a), a.attempt.at_us))
                        .collect(),
                )
                .await?;
            attempts.retain(|a| !have.contains(&attempt_key(a)));
        }
        // Within a batch, a row seen twice is kept once.
        let mut seen = HashSet::new();
        clicks.retain(|c| seen.insert(c.click_id.clone()));
        self.insert_all(
            "clicks",
            clicks
                .iter()
                .map(|c| ClickInsert::new(c, written_us))
                .collect(),
        )
        .await?;
        self.insert_all(
            "server_postbacks",
            postbacks
                .iter()
                .map(|r| PostbackInsert::new(r, written_us))
                .collect(),
        )
        .await?;
        self.insert_all(
            "conversions",
            conversions
                .iter()
                .map(|c| ConversionInsert::new(c, written_us))
                .collect(),
        )
        .await?;
        self.insert_all(
            "delivery_attempts",
            attempts
                .iter()
                .map(|a| AttemptInsert::new(a, written_us))
                .collect(),
        )
        .await
    }

    /// Drops whole months before `before_us`: for servers without `TTL`.
    async fn drop_months(&self, before_us: i64) -> Result<u64, SeamError> {
        let parts = self
            .client
            .query_raw(&sql::partitions(&self.db))
            .fetch_all::<PartitionRows>()
            .await
            .map_err(write_err)?;
        let mut dropped = 0;
        for p in parts {
            let Some((month, end)) = month_end_us(&p.partition) else {
                continue;
            };
            if end <= before_us {
                let sql = sql::drop_partition(&self.db, &p.table, month);
                self.client
                    .query_raw(&sql)
                    .execute()
                    .await
                    .map_err(write_err)?;
                // Counts and ids are not rows of the log.
                if !matches!(p.table.as_str(), "sp_hourly" | "sp_ids") {
                    dropped += p.rows;
                }
            }
        }
        Ok(dropped)
    }

    /// The query with its range narrowed to where its click id and action id lie (looked up in
    /// `sp_ids`), or `None` when one of them is not in the range at all: the rows it matches
    /// all lie within, so counts and pages are unchanged, read from fewer days.
    async fn narrowed(
        &self,
        mut q: ServerPostbackQuery,
    ) -> Result<Option<ServerPostbackQuery>, SeamError> {
        let ids = [
            (sql::CLICK_ID, q.click_id.clone()),
            (sql::ACTION_ID, q.action_id.clone()),
        ];
        for (kind, value) in ids {
            let Some(value) = value.filter(|v| !v.is_empty()) else {
                continue;
            };
            let span: DayCount = self
                .read(&sql::id_span(&self.db, kind, &value, q.from_us, q.to_us))
                .fetch_one()
                .await
                .map_err(read_err)?;
            if span.n == 0 {
                return Ok(None);
            }
            q.from_us = q.from_us.max(span.first_us);
            q.to_us = q.to_us.min(span.last_us.saturating_add(1));
        }
        Ok(Some(q))
    }

    fn note(&self, result: &Result<(), SeamError>) {
        let mut trouble = self.trouble.lock().unwrap_or_else(|e| e.into_inner());
        *trouble = match result {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
    }
}

/// A `toYYYYMM` partition id, and the first microsecond after its month (UTC).
fn month_end_us(partition: &str) -> Option<(u32, i64)> {
    let n: u32 = partition.trim_matches('\'').parse().ok()?;
    let (year, month) = (i64::from(n / 100), i64::from(n % 100));
    if !(1..=12).contains(&month) {
        return None;
    }
    let (y, m) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    Some((n, days_from_civil(y, m) * 86_400_000_000))
}

/// Days since 1970-01-01 of the first of a month (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl AnalyticsStore for ClickHouseStore {
    fn insert(&self, rows: AnalyticsRows) -> BoxFuture<'_, Result<(), SeamError>> {
        Box::pin(async move {
            let result = self.insert_rows(rows).await;
            self.note(&result);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "ClickHouse insert failed");
            }
            result
        })
    }

    fn server_postbacks(
        &self,
        q: ServerPostbackQuery,
    ) -> BoxFuture<'_, Result<Page<ServerPostbackRow>, SeamError>> {
        Box::pin(async move {
            let snapshot = q.snapshot.map_or_else(|| self.snapshot_now(), |s| s as i64);
            let Some(q) = self.narrowed(q).await? else {
                return Ok(Page {
                    rows: Vec::new(),
                    total: 0,
                    snapshot: snapshot as u64,
                });
            };
            let (db, floor) = (&self.db, self.floor());
            let days: Vec<DayCount> = self
                .read(&sql::postbacks_by_day(db, &q, floor, snapshot))
                .fetch_all()
                .await
                .map_err(read_err)?;
            let days: Vec<_> = days.iter().map(|d| (d.first_us, d.last_us, d.n)).collect();
            let total = days.iter().map(|d| d.2).sum();
            let page = match sql::page_window(&days, q.offset, q.limit) {
                None => Vec::new(),
                Some((from_us, to_us, offset)) => {
                    let window = ServerPostbackQuery {
                        from_us,
                        to_us,
                        offset,
                        ..q
                    };
                    let sql = sql::postbacks_page(db, &window, floor, snapshot);
                    self.read(&sql)
                        .fetch_all::<PostbackOut>()
                        .await
                        .map_err(read_err)?
                }
            };
            Ok(Page {
                rows: page.into_iter().map(Into::into).collect(),
                total,
                snapshot: snapshot as u64,
            })
        })
    }

    /// The whole UTC hours of the range from the hourly counts (when the filters allow), the
    /// range's ends off the hour from the rows; the parts merged, groups in key order.
    fn summary(&self, q: SummaryQuery) -> BoxFuture<'_, Result<Vec<SummaryRow>, SeamError>> {
        Box::pin(async move {
            let (floor, snapshot) = (self.floor(), self.snapshot_now());
            let Some(filters) = self.narrowed(q.filters.clone()).await? else {
                return Ok(Vec::new());
            };
            let q = SummaryQuery { filters, ..q };
            let f = &q.filters;
            let from = f.from_us.max(floor);
            let hours = (
                from.saturating_add(HOUR_US - 1).div_euclid(HOUR_US) * HOUR_US,
                f.to_us.div_euclid(HOUR_US) * HOUR_US,
            );
            let in_range = |from_us, to_us| SummaryQuery {
                filters: ServerPostbackQuery {
                    from_us,
                    to_us,
                    ..f.clone()
                },
                group_by: q.group_by.clone(),
            };
            let mut parts = Vec::new();
            if sql::summary_fits_hours(f) && hours.0 < hours.1 {
                parts.push(sql::summary_hourly(&self.db, &q, hours.0, hours.1));
                for (from_us, to_us) in [(from, hours.0), (hours.1, f.to_us)] {
                    if from_us < to_us {
                        let edge = in_range(from_us, to_us);
                        parts.push(sql::summary(&self.db, &edge, floor, snapshot));
                    }
                }
            } else {
                parts.push(sql::summary(&self.db, &q, floor, snapshot));
            }
            let has = |k| q.group_by.contains(&k);
            let time = has(SummaryKey::Hour) || has(SummaryKey::Day);
            // The parts at once: each end off the hour reads the granules of its whole day.
            let results = postback_core::log::join_all(
                parts
                    .iter()
                    .map(|sql| self.read(sql).fetch_all::<SummaryOut>()),
            )
            .await;
            let mut groups: BTreeMap<GroupKey, SummaryRow> = BTreeMap::new();
            for rows in results {
                let rows = rows.map_err(read_err)?;
                // Ungrouped, an empty range still gives SQL one row (of zeros): no rows, like
                // groups (and like the other stores).
                for r in rows.into_iter().filter(|r| r.n_postbacks > 0) {
                    let part = SummaryRow {
                        hour_us: time.then_some(r.k_hour),
                        offer_id: has(SummaryKey::Offer).then_some(r.k_offer),
                        advertiser_id: has(SummaryKey::Advertiser).then_some(r.k_advertiser),
                        pid: has(SummaryKey::Partner).then_some(r.k_partner),
                        goal: has(SummaryKey::Goal).then_some(r.k_goal),
                        response_status: has(SummaryKey::ResponseStatus).then_some(r.k_response),
                        error: has(SummaryKey::Error).then_some(r.k_error),
                        postbacks: r.n_postbacks,
                        accepted: r.n_accepted,
                        rejected: r.n_rejected,
                        conversions: r.n_conversions,
                        payouts: r.n_payouts,
                        revenue: r.n_revenue,
                    };
                    groups
                        .entry(part.key())
                        .and_modify(|g| g.merge(&part))
                        .or_insert(part);
                }
            }
            Ok(groups.into_values().collect())
        })
    }

    fn conversions(
        &self,
        q: ConversionQuery,
    ) -> BoxFuture<'_, Result<Page<Conversion>, SeamError>> {
        Box::pin(async move {
            let snapshot = q.snapshot.map_or_else(|| self.snapshot_now(), |s| s as i64);
            let (db, floor) = (&self.db, self.floor());
            let total = self.count(sql::conversions_count(db, &q, floor, snapshot));
            let page = async {
                let sql = sql::conversions_page(db, &q, floor, snapshot);
                self.read(&sql)
                    .fetch_all::<ConversionOut>()
                    .await
                    .map_err(read_err)
            };
            let (total, page) = tokio::join!(total, page);
            Ok(Page {
                rows: page?.into_iter().map(Into::into).collect(),
                total: total?,
                snapshot: snapshot as u64,
            })
        })
    }

    fn clicks(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<Click>, SeamError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for chunk in ids.chunks(2000) {
                let sql = sql::clicks_by_id(&self.db, chunk, self.floor());
                let rows = self
                    .read(&sql)
                    .fetch_all::<ClickOut>()
                    .await
                    .map_err(read_err)?;
                out.extend(rows.into_iter().map(Click::from));
            }
            // In the order asked for.
            let mut by_id: BTreeMap<String, Click> =
                out.into_iter().map(|c| (c.click_id.clone(), c)).collect();
            Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
        })
    }

    fn conversion_states(
        &self,
        keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Conversion>, SeamError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for chunk in keys.chunks(2000) {
                let sql = sql::conversions_by_key(&self.db, chunk, self.floor());
                let rows = self
                    .read(&sql)
                    .fetch_all::<ConversionOut>()
                    .await
                    .map_err(read_err)?;
                out.extend(rows.into_iter().map(Conversion::from));
            }
            Ok(out)
        })
    }

    fn attempts(&self, q: AttemptQuery) -> BoxFuture<'_, Result<Page<AttemptRow>, SeamError>> {
        Box::pin(async move {
            let snapshot = q.snapshot.map_or_else(|| self.snapshot_now(), |s| s as i64);
            let (db, floor) = (&self.db, self.floor());
            let total = self.count(sql::attempts_count(db, &q, floor, snapshot));
            let page = async {
                let sql = sql::attempts_page(db, &q, floor, snapshot);
                self.read(&sql)
                    .fetch_all::<AttemptOut>()
                    .await
                    .map_err(read_err)
            };
            let (total, page) = tokio::join!(total, page);
            let rows = page?
                .into_iter()
                .map(|a| {
                    a.into_row()
                        .map_err(|e| SeamError::Fatal(format!("clickhouse: a stored job: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Page {
                rows,
                total: total?,
                snapshot: snapshot as u64,
            })
        })
    }

    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>> {
        Box::pin(async move {
            self.floor_us.fetch_max(before_us, Ordering::AcqRel);
            self.drop_months(before_us).await
        })
    }

    fn clear(&self) -> BoxFuture<'_, Result<(), SeamError>> {
        Box::pin(async move {
            for table in TABLES {
                self.client
                    .query_raw(&sql::truncate(&self.db, table))
                    .execute()
                    .await
                    .map_err(write_err)?;
            }
            Ok(())
        })
    }

    fn health(&self) -> Option<String> {
        self.trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// For tests: a store on a database of its own.
pub async fn fresh_for_tests(url: &str, database: &str) -> Result<Arc<ClickHouseStore>, SeamError> {
    let mut config =
        ClickHouseConfig::from_url(&format!("{url}/{database}")).map_err(SeamError::Fatal)?;
    config.retention_days = 92;
    let store = ClickHouseStore::connect(&config).await?;
    store.migrate().await?;
    store.clear().await?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c =
            ClickHouseConfig::from_url("clickhouse://bob:p%40ss@127.0.0.1:8123/pb").expect("url");
        assert_eq!(c.url, "http://127.0.0.1:8123");
        assert_eq!(c.database, "pb");
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        let c = ClickHouseConfig::from_url("clickhouse://ch:8123/analytics").expect("url");
        assert_eq!((c.user, c.password), (None, None));
        for bad in [
            "http://ch:8123/pb",
            "clickhouse://ch/pb",
            "clickhouse://ch:8123/",
            "clickhouse://ch:8123/p-b",
        ] {
            assert!(ClickHouseConfig::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions() {
        assert_eq!(ServerVersion::parse("18.16.1"), Some(ServerVersion(18, 16)));
        assert!(!ServerVersion(18, 16).is_modern());
        assert!(ServerVersion(26, 9).is_modern());
        assert!(ServerVersion(20, 3).is_modern());
        assert_eq!(ServerVersion::parse("x"), None);
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            error_code("Code: 241. DB::Exception: Memory limit"),
            Some(241)
        );
        assert_eq!(error_code("connection refused"), None);
    }

    #[test]
    fn month_ends() {
        assert_eq!(month_end_us("197001"), Some((197001, 31 * 86_400_000_000)));
        assert_eq!(month_end_us("197012"), Some((197012, 365 * 86_400_000_000)));
        assert_eq!(
            month_end_us("202402"),
            Some((202402, days_from_civil(2024, 3) * 86_400_000_000))
        );
        assert_eq!(days_from_civil(2024, 3) - days_from_civil(2024, 2), 29);
        assert_eq!(month_end_us("tuple()"), None);
    }

    #[test]
    fn migrations_render_for_both_kinds_of_server() {
        let (_, _, template) = MIGRATIONS[0];
        let old = render_migration(template, "pb", false, 92);
        let new = render_migration(template, "pb", true, 92);
        assert_eq!(old.len(), 4);
        assert_eq!(new.len(), 4);
        assert!(old.iter().all(|s| !s.contains("TTL") && !s.contains('{')));
        assert!(new.iter().all(|s| s.contains("INTERVAL 92 DAY")
            && s.contains("ttl_only_drop_parts = 1")
            && s.starts_with("CREATE TABLE IF NOT EXISTS pb.")));
    }
}
