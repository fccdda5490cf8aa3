-- postbackd's analytics tables on ClickHouse, migration 3: where each click id and action id
-- of the server-postback log lies in time (placeholders as in 001_tables.sql).
--
-- The log is sorted by day and offer, so a filter on a click id or an action id alone read
-- those columns over the whole range (140 ms for 30 days of 10M rows). A listing or summary
-- with such a filter first looks the value up here (sorted by it: a few granules) and reads
-- the log only between its first and last time; none there, the answer is empty at once.
-- Kept like the hourly counts (migration 2): a materialized view adds each insert's rows, the
-- rows logged before the migration are added once, here, unless the table holds any already.
-- A value listed twice (a batch redone) only repeats a time: the range is the same.

-- `kind` 1: click id; 2: action id.
CREATE TABLE IF NOT EXISTS {db}.sp_ids (
    kind UInt8,
    value String,
    at_us Int64
) ENGINE = MergeTree
PARTITION BY toYYYYMM(toDateTime(intDiv(at_us, 1000000), 'UTC'))
ORDER BY (kind, value, at_us)
{ttl at_us}
SETTINGS index_granularity = 8192{settings};

INSERT INTO {db}.sp_ids
SELECT tupleElement(pair, 1) AS kind, tupleElement(pair, 2) AS value, at_us
FROM {db}.server_postbacks FINAL
ARRAY JOIN [(toUInt8(1), clickid), (toUInt8(2), action_id)] AS pair
WHERE value != '' AND (SELECT count() FROM {db}.sp_ids) = 0;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.sp_ids_keeper TO {db}.sp_ids AS
SELECT tupleElement(pair, 1) AS kind, tupleElement(pair, 2) AS value, at_us
FROM {db}.server_postbacks
ARRAY JOIN [(toUInt8(1), clickid), (toUInt8(2), action_id)] AS pair
WHERE value != '';
