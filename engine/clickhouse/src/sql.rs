//! The SQL postbackd sends to ClickHouse, built as text: pure functions of the query and the
//! database name, so that tests can run every template in a current engine (chdb) too. Values
//! are always literals quoted here, never spliced raw.

use postback_core::seams::{
    AttemptQuery, ConversionQuery, ServerPostbackQuery, SummaryKey, SummaryQuery, HOUR_US,
};
use std::fmt::Write as _;

/// A string literal: ClickHouse reads backslash escapes inside single quotes.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn list<T>(values: &[T], f: impl Fn(&T) -> String) -> String {
    values.iter().map(f).collect::<Vec<_>>().join(", ")
}

/// A WHERE clause under construction.
#[derive(Default)]
struct Where(Vec<String>);

impl Where {
    fn add(&mut self, clause: String) {
        self.0.push(clause);
    }
    fn any_of<T>(&mut self, column: &str, values: &[T], f: impl Fn(&T) -> String) {
        if !values.is_empty() {
            self.add(format!("{column} IN ({})", list(values, f)));
        }
    }
    fn sql(&self) -> String {
        if self.0.is_empty() {
            "1".into()
        } else {
            self.0.join(" AND ")
        }
    }
}

/// Lowercases as the search text is lowercased (Rust's Unicode lowercase, per `key=value`
/// line), so that a search is a byte substring match.
pub fn search_needle(term: &str) -> String {
    term.to_lowercase()
}

/// The search text of a postback's parameters: `key=value` lines, lowercased.
pub fn search_text<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = String::new();
    for (k, v) in pairs {
        s.push_str(&format!("{k}={v}").to_lowercase());
        s.push('\n');
    }
    s
}

/// The server-postback filters (`WHERE ...`); `floor_us` hides rows past the retention,
/// `snapshot` rows written after it.
fn postback_filter(q: &ServerPostbackQuery, floor_us: i64, snapshot: i64) -> String {
    let mut w = Where::default();
    let from_us = q.from_us.max(floor_us);
    w.add(format!("at_us >= {from_us} AND at_us < {}", q.to_us));
    // The same range on the sorting key's first column: ClickHouse (18.16 at least) does not
    // derive it from the `at_us` range through the functions of the key. Clamped to the years
    // both old and new servers convert to dates (to 2099).
    let second = |us: i64| us.div_euclid(1_000_000).clamp(0, LAST_DATE_SECOND);
    w.add(format!(
        "{DAY_KEY} >= toDate(toDateTime({}, 'UTC')) AND {DAY_KEY} <= toDate(toDateTime({}, 'UTC'))",
        second(from_us),
        second(q.to_us.saturating_sub(1))
    ));
    key_filters(&mut w, q, "pid");
    if let Some(v) = &q.id {
        w.add(format!("id = {}", quote(v)));
    }
    if let Some(v) = &q.click_id {
        w.add(format!("clickid = {}", quote(v)));
    }
    if let Some(v) = &q.action_id {
        w.add(format!("action_id = {}", quote(v)));
    }
    if let Some(s) = q.search.as_ref().filter(|s| !s.is_empty()) {
        // Left to WHERE (not PREWHERE): measured on 18.16, PREWHERE on the search text makes
        // rare terms 20% faster and common ones 40% slower.
        w.add(format!(
            "position(search, {}) > 0",
            quote(&search_needle(s))
        ));
    }
    w.add(format!("written_us <= {snapshot}"));
    format!("WHERE {}", w.sql())
}

pub const POSTBACK_COLUMNS: &str = "id, at_us, server, method, get_pairs, post_pairs, pixel, \
    response_status, error, clickid, action_id, goal, status, offer_id, pid, advertiser_id, \
    conversion_id, delta, ip, created, payouts, revenue";

/// 2099-12-31 23:59:59 UTC: 18.16 turns later times into the date 0.
const LAST_DATE_SECOND: i64 = 4_102_444_799;

/// The server-postback table's first sorting key column: the row's UTC day.
const DAY_KEY: &str = "toDate(toDateTime(intDiv(at_us, 1000000), 'UTC'))";

/// The kinds of value `sp_ids` holds.
pub const CLICK_ID: u8 = 1;
pub const ACTION_ID: u8 = 2;

/// Where a click id or action id (`kind`) lies in `[from_us, to_us)`: how many times it was
/// logged there, first and last (`DayCount`'s columns).
pub fn id_span(db: &str, kind: u8, value: &str, from_us: i64, to_us: i64) -> String {
    format!(
        "SELECT min(at_us) AS first_us, max(at_us) AS last_us, count() AS n FROM {db}.sp_ids \
         WHERE kind = {kind} AND value = {} AND at_us >= {from_us} AND at_us < {to_us}",
        quote(value)
    )
}

/// How many rows match, per UTC day (newest first), with each day's first and last time: the
/// total, and where a page's rows lie, so the page reads those days only.
pub fn postbacks_by_day(db: &str, q: &ServerPostbackQuery, floor_us: i64, snapshot: i64) -> String {
    format!(
        "SELECT min(at_us) AS first_us, max(at_us) AS last_us, count() AS n \
         FROM {db}.server_postbacks {} GROUP BY {DAY_KEY} AS day ORDER BY day DESC",
        postback_filter(q, floor_us, snapshot)
    )
}

/// Where rows `offset..offset + limit` of a listing lie, given its rows per day newest first
/// (`(first_us, last_us, n)`): the time range holding them and the offset within it. `None`
/// when the page is empty.
pub fn page_window(days: &[(i64, i64, u64)], offset: u64, limit: u64) -> Option<(i64, i64, u64)> {
    let end = offset.saturating_add(limit);
    let (mut before, mut seen) = (0, 0);
    let mut window: Option<(i64, i64)> = None;
    for &(first, last, n) in days {
        if seen + n > offset && seen < end {
            if window.is_none() {
                before = seen;
            }
            window = Some((first, window.map_or(last, |w| w.1)));
        }
        seen += n;
    }
    window
        .filter(|_| limit > 0)
        .map(|(first, last)| (first, last + 1, offset - before))
}

/// One page, newest first, ties by id. The page's keys are found first, reading the filters'
/// columns; then only its rows are read whole (first the keys, PREWHERE; the filters that
/// narrow the granules again, the search text not).
pub fn postbacks_page(db: &str, q: &ServerPostbackQuery, floor_us: i64, snapshot: i64) -> String {
    let keys = ServerPostbackQuery {
        search: None,
        ..q.clone()
    };
    format!(
        "SELECT {POSTBACK_COLUMNS} FROM {db}.server_postbacks \
         PREWHERE (at_us, id) IN (SELECT at_us, id FROM {db}.server_postbacks {} \
           ORDER BY at_us DESC, id DESC LIMIT {}, {}) \
         {} ORDER BY at_us DESC, id DESC LIMIT 1 BY id",
        postback_filter(q, floor_us, snapshot),
        q.offset,
        q.limit,
        postback_filter(&keys, floor_us, snapshot),
    )
}

/// The summary from the rows: one GROUP BY; keys not grouped by are constants (the caller
/// leaves them out).
/// Output names differ from the columns' (`k_`, `n_`): an alias that shadows a column would
/// change what the aggregates read.
pub fn summary(db: &str, q: &SummaryQuery, floor_us: i64, snapshot: i64) -> String {
    summary_select(
        q,
        (&format!("intDiv(at_us, {HOUR_US}) * {HOUR_US}"), "pid"),
        "count() AS n_postbacks, countIf(response_status = 1) AS n_accepted, \
         countIf(response_status != 1) AS n_rejected, countIf(created = 1) AS n_conversions, \
         sumIf(payouts, created = 1) AS n_payouts, sumIf(revenue, created = 1) AS n_revenue",
        &format!(
            "{db}.server_postbacks {}",
            postback_filter(&q.filters, floor_us, snapshot)
        ),
    )
}

/// The filters on columns both the log and its hourly counts have (`partner` names the
/// partner's column).
fn key_filters(w: &mut Where, q: &ServerPostbackQuery, partner: &str) {
    w.any_of("offer_id", &q.offers, u64::to_string);
    w.any_of(partner, &q.partners, u64::to_string);
    w.any_of("advertiser_id", &q.suppliers, |s| quote(s));
    if let Some(v) = &q.goal {
        w.add(format!("goal_lc = {}", quote(&v.to_lowercase())));
    }
    if let Some(v) = q.status {
        w.add(format!("status = {v}"));
    }
    if let Some(v) = q.response_status {
        w.add(format!("response_status = {v}"));
    }
}

/// Whether a summary can count the whole hours of its range from `sp_hourly`: every filter
/// is on a column the counts are keyed by (not ids, not the search).
pub fn summary_fits_hours(q: &ServerPostbackQuery) -> bool {
    q.id.is_none()
        && q.click_id.is_none()
        && q.action_id.is_none()
        && q.search.as_ref().is_none_or(|s| s.is_empty())
}

/// The summary of the whole UTC hours `[from_hour_us, to_hour_us)` from the hourly counts
/// (only for filters that [`summary_fits_hours`]); the same columns as [`summary`].
pub fn summary_hourly(db: &str, q: &SummaryQuery, from_hour_us: i64, to_hour_us: i64) -> String {
    let f = &q.filters;
    // Per partner only when the summary groups or filters by partner: an hour has a group per
    // offer and partner there, several times more.
    let by_partner = q.group_by.contains(&SummaryKey::Partner) || !f.partners.is_empty();
    let mut w = Where::default();
    w.add(format!(
        "by_partner = {} AND hour_us >= {from_hour_us} AND hour_us < {to_hour_us}",
        u8::from(by_partner)
    ));
    key_filters(&mut w, f, "partner");
    summary_select(
        q,
        ("hour_us", "partner"),
        "sum(postbacks) AS n_postbacks, sum(accepted) AS n_accepted, \
         sum(rejected) AS n_rejected, sum(conversions) AS n_conversions, \
         sum(payout_total) AS n_payouts, sum(revenue_total) AS n_revenue",
        &format!("{db}.sp_hourly WHERE {}", w.sql()),
    )
}

/// A summary's SELECT: its group keys (`hour` and `partner` the source's columns for them),
/// `counts`, `FROM source`. Groups come in no order: the store merges the parts and sorts
/// (an `ORDER BY` of a month's 29k hour × advertiser groups took ClickHouse 15 ms).
fn summary_select(
    q: &SummaryQuery,
    (hour, partner): (&str, &str),
    counts: &str,
    source: &str,
) -> String {
    let has = |k| q.group_by.contains(&k);
    let key = |on: bool, expr: &str, none: &str, alias: &str| {
        format!("{} AS {alias}", if on { expr } else { none })
    };
    let keys = [
        key(
            has(SummaryKey::Hour) || has(SummaryKey::Day),
            hour,
            "toInt64(0)",
            "k_hour",
        ),
        key(has(SummaryKey::Offer), "offer_id", "toUInt64(0)", "k_offer"),
        key(
            has(SummaryKey::Advertiser),
            "advertiser_id",
            "''",
            "k_advertiser",
        ),
        key(
            has(SummaryKey::Partner),
            partner,
            "toUInt64(0)",
            "k_partner",
        ),
        key(has(SummaryKey::Goal), "goal_lc", "''", "k_goal"),
        key(
            has(SummaryKey::ResponseStatus),
            "response_status",
            "toUInt8(0)",
            "k_response",
        ),
        key(has(SummaryKey::Error), "error", "''", "k_error"),
    ];
    let aliases = "k_hour, k_offer, k_advertiser, k_partner, k_goal, k_response, k_error";
    format!(
        "SELECT {keys}, {counts} FROM {source} GROUP BY {aliases}",
        keys = keys.join(", "),
    )
}

/// Columns a conversion's states share (set at creation).
const CONVERSION_FIXED: [&str; 20] = [
    "conv_key",
    "offer_id",
    "pid",
    "advertiser_id",
    "goal",
    "goal_lc",
    "action_id",
    "clickid",
    "sum",
    "payouts",
    "revenue",
    "currency",
    "ip",
    "ua",
    "subs",
    "custom_fields",
    "promo_code",
    "user_id",
    "created_us",
    "click_us",
];
/// Columns a later state changes.
const CONVERSION_CHANGING: [&str; 3] = ["status", "comment", "updated_us"];

pub const CONVERSION_COLUMNS: &str = "id, conv_key, offer_id, pid, advertiser_id, goal, \
    action_id, clickid, status, sum, payouts, revenue, currency, ip, ua, comment, subs, \
    custom_fields, promo_code, user_id, created_us, updated_us, click_us";

/// Each conversion once, in its latest state, among those first written by `snapshot`; the
/// filters on what never changes narrow the states read, the status is filtered once they are
/// resolved.
fn conversions_resolved(db: &str, q: &ConversionQuery, floor_us: i64, snapshot: i64) -> String {
    let mut w = Where::default();
    w.add(format!(
        "created_us >= {} AND created_us < {}",
        q.from_us.max(floor_us),
        q.to_us
    ));
    w.any_of("offer_id", &q.offers, u64::to_string);
    w.any_of("advertiser_id", &q.advertisers, |s| quote(s));
    w.any_of("pid", &q.partners, u64::to_string);
    if let Some(v) = &q.goal {
        w.add(format!("goal_lc = {}", quote(&v.to_lowercase())));
    }
    if let Some(v) = &q.action_id {
        w.add(format!("action_id = {}", quote(v)));
    }
    if let Some(v) = &q.clickid {
        w.add(format!("clickid = {}", quote(v)));
    }
    if let Some(v) = &q.conversion_id {
        w.add(format!("id = {}", quote(v)));
    }
    for (i, sub) in q.subs.iter().enumerate() {
        if let Some(v) = sub {
            w.add(format!("subs[{}] = {}", i + 1, quote(v)));
        }
    }
    let mut having = vec![format!("min(written_us) <= {snapshot}")];
    if !q.statuses.is_empty() {
        having.push(format!(
            "c_status IN ({})",
            list(&q.statuses, u8::to_string)
        ));
    }
    resolved(db, &w, &having)
}

/// The latest state of the conversions of these keys.
pub fn conversions_by_key(db: &str, keys: &[String], floor_us: i64) -> String {
    let mut w = Where::default();
    w.add(format!("conv_key IN ({})", list(keys, |s| quote(s))));
    w.add(format!("created_us >= {floor_us}"));
    resolved(db, &w, &[])
}

/// Each conversion among the states `w` selects once, in its latest state, if `having`.
fn resolved(db: &str, w: &Where, having: &[String]) -> String {
    let mut columns = vec!["id".to_string()];
    columns.extend(
        CONVERSION_FIXED
            .iter()
            .map(|c| format!("any({c}) AS c_{c}")),
    );
    columns.extend(
        CONVERSION_CHANGING
            .iter()
            .map(|c| format!("argMax({c}, version) AS c_{c}")),
    );
    let outer = CONVERSION_COLUMNS
        .split(", ")
        .map(|c| {
            if c == "id" {
                "id".to_string()
            } else {
                format!("c_{c} AS {c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let having = if having.is_empty() {
        String::new()
    } else {
        format!(" HAVING {}", having.join(" AND "))
    };
    format!(
        "SELECT {outer} FROM (SELECT {columns} FROM {db}.conversions WHERE {w} GROUP BY id\
         {having})",
        columns = columns.join(", "),
        w = w.sql(),
    )
}

pub fn conversions_count(db: &str, q: &ConversionQuery, floor_us: i64, snapshot: i64) -> String {
    format!(
        "SELECT count() AS n FROM ({})",
        conversions_resolved(db, q, floor_us, snapshot)
    )
}

pub fn conversions_page(db: &str, q: &ConversionQuery, floor_us: i64, snapshot: i64) -> String {
    format!(
        "{} ORDER BY created_us DESC, id DESC LIMIT {}, {}",
        conversions_resolved(db, q, floor_us, snapshot),
        q.offset,
        q.limit
    )
}

fn attempt_where(q: &AttemptQuery, floor_us: i64, snapshot: i64) -> String {
    let mut w = Where::default();
    let from_us = q.from_us.max(floor_us);
    w.add(format!("at_us >= {from_us} AND at_us < {}", q.to_us));
    // The same range on the sorting key's first column: ClickHouse (18.16 at least) does not
    // derive it from the `at_us` range through the functions of the key. Clamped to the years
    // both old and new servers convert to dates (to 2099).
    let second = |us: i64| us.div_euclid(1_000_000).clamp(0, LAST_DATE_SECOND);
    w.add(format!(
        "{DAY_KEY} >= toDate(toDateTime({}, 'UTC')) AND {DAY_KEY} <= toDate(toDateTime({}, 'UTC'))",
        second(from_us),
        second(q.to_us.saturating_sub(1))
    ));
    w.any_of("offer_id", &q.offers, u64::to_string);
    w.any_of("pid", &q.partners, u64::to_string);
    if let Some(v) = &q.goal {
        w.add(format!("goal_lc = {}", quote(&v.to_lowercase())));
    }
    if let Some(v) = q.status {
        w.add(format!("conv_status = {v}"));
    }
    if let Some(v) = q.http_code {
        w.add(format!("http_code = {v}"));
    }
    if let Some(v) = &q.job_id {
        w.add(format!("job_id = {}", quote(v)));
    }
    w.add(format!("written_us <= {snapshot}"));
    w.sql()
}

pub const ATTEMPT_COLUMNS: &str =
    "job, attempt, at_us, http_code, error, state, next_at_us, job_id";

pub fn attempts_count(db: &str, q: &AttemptQuery, floor_us: i64, snapshot: i64) -> String {
    format!(
        "SELECT count() AS n FROM {db}.delivery_attempts WHERE {}",
        attempt_where(q, floor_us, snapshot)
    )
}

pub fn attempts_page(db: &str, q: &AttemptQuery, floor_us: i64, snapshot: i64) -> String {
    format!(
        "SELECT {ATTEMPT_COLUMNS} FROM {db}.delivery_attempts WHERE {} \
         ORDER BY at_us DESC, job_id DESC, attempt DESC LIMIT 1 BY job_id, attempt LIMIT {}, {}",
        attempt_where(q, floor_us, snapshot),
        q.offset,
        q.limit
    )
}

pub const CLICK_COLUMNS: &str = "click_id, at_us, offer_id, pid, ip, ua, referrer, country, subs";

pub fn clicks_by_id(db: &str, ids: &[String], floor_us: i64) -> String {
    format!(
        "SELECT {CLICK_COLUMNS} FROM {db}.clicks WHERE click_id IN ({}) AND at_us >= {floor_us} \
         LIMIT 1 BY click_id",
        list(ids, |s| quote(s))
    )
}

/// Which of a redone batch's rows are in already: ids within the batch's time range.
pub fn existing(
    db: &str,
    table: &str,
    key: &str,
    time: &str,
    keys: &[String],
    span: (i64, i64),
) -> String {
    format!(
        "SELECT DISTINCT {key} AS k FROM {db}.{table} WHERE {time} >= {} AND {time} <= {} \
         AND {key} IN ({})",
        span.0,
        span.1,
        list(keys, |s| quote(s))
    )
}

pub fn create_database(db: &str) -> String {
    format!("CREATE DATABASE IF NOT EXISTS {db}")
}

/// The applied migrations, one row per recording: migrations run at once may record a version
/// twice, which is harmless. A MergeTree, because concurrent inserts into a Log-family table
/// fail or corrupt it (18.16: `File not found: .../tmp_sizes.json`).
pub fn create_migrations_table(db: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.schema_versions \
         (version UInt32, name String, applied_us Int64) ENGINE = MergeTree ORDER BY version"
    )
}

/// Where databases migrated before `schema_versions` recorded their migrations (a TinyLog):
/// read, never written.
pub const LEGACY_MIGRATIONS: &str = "schema_migrations";

/// Which of the tables that record migrations the database has.
pub fn migrations_tables(db: &str) -> String {
    format!(
        "SELECT name FROM system.tables WHERE database = {} AND name IN ('schema_versions', {})",
        quote(db),
        quote(LEGACY_MIGRATIONS)
    )
}

/// The versions recorded in `tables` (some of [`migrations_tables`]; not empty).
pub fn applied_migrations(db: &str, tables: &[String]) -> String {
    tables
        .iter()
        .map(|t| format!("SELECT version FROM {db}.{t}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

pub fn record_migration(db: &str, version: u32, name: &str, at_us: i64) -> String {
    format!(
        "INSERT INTO {db}.schema_versions VALUES ({version}, {}, {at_us})",
        quote(name)
    )
}

pub fn row_count(db: &str, table: &str) -> String {
    format!("SELECT count() AS n FROM {db}.{table}")
}

pub fn truncate(db: &str, table: &str) -> String {
    format!("TRUNCATE TABLE {db}.{table}")
}

/// Drops a month of a table; `partition` is a `toYYYYMM` partition id from [`partitions`].
pub fn drop_partition(db: &str, table: &str, partition: u32) -> String {
    format!("ALTER TABLE {db}.{table} DROP PARTITION {partition}")
}

/// The active partitions of the analytics tables, with their rows (for retention on servers
/// without TTL).
pub fn partitions(db: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "SELECT table, partition, toUInt64(sum(rows)) AS rows FROM system.parts \
         WHERE database = {} AND active AND table IN ('server_postbacks', 'conversions', \
         'clicks', 'delivery_attempts', 'sp_hourly', 'sp_ids') GROUP BY table, partition ORDER BY table, partition",
        quote(db)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote("a'b\\c\nd"), "'a\\'b\\\\c\\nd'");
        assert_eq!(quote("é"), "'é'");
    }

    #[test]
    fn a_page_reads_only_the_days_holding_its_rows() {
        // Newest day first: 3 rows on day 30, none on 29, 5 on 28, 2 on 27.
        let days = [(300, 309, 3), (280, 289, 5), (270, 279, 2)];
        assert_eq!(page_window(&days, 0, 2), Some((300, 310, 0)));
        assert_eq!(page_window(&days, 0, 3), Some((300, 310, 0)));
        assert_eq!(page_window(&days, 2, 2), Some((280, 310, 2)));
        assert_eq!(page_window(&days, 3, 5), Some((280, 290, 0)));
        assert_eq!(page_window(&days, 4, 100), Some((270, 290, 1)));
        assert_eq!(page_window(&days, 9, 100), Some((270, 280, 1)));
        assert_eq!(page_window(&days, 10, 100), None);
        assert_eq!(page_window(&days, 0, 0), None);
        assert_eq!(page_window(&[], 0, 100), None);
    }

    #[test]
    fn search_text_is_lowercased_lines() {
        let text = search_text([("Key", "VÄLUE"), ("b", "2")].into_iter());
        assert_eq!(text, "key=välue\nb=2\n");
    }
}
