-- postbackd's analytics tables on ClickHouse, migration 1. Applied by `postbackd migrate`
-- (and at start), recorded in {db}.schema_versions.
--
-- Placeholders, filled by postbackd:
--   {db}            the database
--   {ttl COLUMN}    `TTL <COLUMN as DateTime> + INTERVAL <retention_days> DAY` on servers that
--                   have TTL (19.6+); empty on older ones (Debian's 18.16), where postbackd
--                   drops partitions past the retention itself
--   {settings}      `, ttl_only_drop_parts = 1` where TTL is used: whole parts expire, no rewrites
--
-- Every table is partitioned by month and deduplicated by its rows' deterministic ids
-- (ReplacingMergeTree on the sorting key). Duplicates only arise when a batch is redone, and the
-- writer looks before it inserts then; merges remove any that slip through. `written_us` is the
-- writer's insert time: a listing's snapshot is "written_us <= S". `keep_first` makes a merge
-- keep the first copy of a row, so a snapshot taken before a duplicate stays whole.
-- Column types are those both 18.16 and current servers have (no DateTime64, no Map).

-- The server-postback log. Sorted by day, then offer: a day's or an offer's rows are read from
-- a few granules; the search text is `key=value` lines of the parameters, lowercased.
CREATE TABLE IF NOT EXISTS {db}.server_postbacks (
    id String,
    at_us Int64,
    written_us Int64,
    keep_first UInt64,
    server String,
    method String,
    get_pairs String,
    post_pairs String,
    search String,
    pixel UInt8,
    response_status UInt8,
    error String,
    clickid String,
    action_id String,
    goal String,
    goal_lc String,
    status Int64,
    offer_id UInt64,
    pid UInt64,
    advertiser_id String,
    conversion_id String,
    delta Nullable(Int64),
    ip String,
    created UInt8,
    payouts Float64,
    revenue Float64
) ENGINE = ReplacingMergeTree(keep_first)
PARTITION BY toYYYYMM(toDateTime(intDiv(at_us, 1000000), 'UTC'))
ORDER BY (toDate(toDateTime(intDiv(at_us, 1000000), 'UTC')), offer_id, at_us, id)
{ttl at_us}
SETTINGS index_granularity = 8192{settings};

-- Conversion states: one row per (id, version); a listing reads each id's highest version.
CREATE TABLE IF NOT EXISTS {db}.conversions (
    id String,
    conv_key String,
    version Int64,
    written_us Int64,
    keep_first UInt64,
    offer_id UInt64,
    pid UInt64,
    advertiser_id String,
    goal String,
    goal_lc String,
    action_id String,
    clickid String,
    status UInt8,
    sum Float64,
    payouts Float64,
    revenue Float64,
    currency String,
    ip String,
    ua String,
    comment String,
    subs Array(String),
    custom_fields Array(String),
    promo_code String,
    user_id String,
    created_us Int64,
    updated_us Int64,
    click_us Int64
) ENGINE = ReplacingMergeTree(keep_first)
PARTITION BY toYYYYMM(toDateTime(intDiv(created_us, 1000000), 'UTC'))
ORDER BY (toDate(toDateTime(intDiv(created_us, 1000000), 'UTC')), offer_id, created_us, id, version)
{ttl created_us}
SETTINGS index_granularity = 8192{settings};

-- Clicks, read by id (the stats join a postback's click for `track`).
CREATE TABLE IF NOT EXISTS {db}.clicks (
    click_id String,
    at_us Int64,
    written_us Int64,
    offer_id UInt64,
    pid UInt64,
    ip String,
    ua String,
    referrer String,
    country String,
    subs Array(String)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(toDateTime(intDiv(at_us, 1000000), 'UTC'))
ORDER BY click_id
{ttl at_us}
SETTINGS index_granularity = 8192{settings};

-- The affiliate-postback attempt log: each attempt with its job (JSON) and the job's filter
-- columns.
CREATE TABLE IF NOT EXISTS {db}.delivery_attempts (
    job_id String,
    attempt UInt32,
    at_us Int64,
    written_us Int64,
    keep_first UInt64,
    http_code UInt16,
    error String,
    state String,
    next_at_us Nullable(Int64),
    pid UInt64,
    offer_id UInt64,
    goal_lc String,
    conv_status UInt8,
    job String
) ENGINE = ReplacingMergeTree(keep_first)
PARTITION BY toYYYYMM(toDateTime(intDiv(at_us, 1000000), 'UTC'))
ORDER BY (toDate(toDateTime(intDiv(at_us, 1000000), 'UTC')), at_us, job_id, attempt)
{ttl at_us}
SETTINGS index_granularity = 8192{settings};
