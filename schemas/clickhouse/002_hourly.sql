-- postbackd's analytics tables on ClickHouse, migration 2: the server-postback log counted by
-- UTC hour (placeholders as in 001_tables.sql).
--
-- A summary reads the whole hours of its range from `sp_hourly` and only the range's ends off
-- the hour (or filters on ids and the search) from the rows: a month by day and advertiser is
-- a few hundred thousand counts instead of every row. The counts are kept by ClickHouse itself:
-- a materialized view adds each insert's rows, so they count exactly the rows the writer
-- inserts (it looks before it inserts a batch that may be in already).
--
-- Upgrading a database that holds rows: the rows already there are counted once, here, before
-- the view starts counting new ones; run `postbackd migrate` while no engine writes (rows
-- written between the two statements would not be counted; `serve --migrate` refuses it when
-- there are rows, as replicas starting together would each count them). Run again after being
-- cut short, the count is skipped once the table holds any counts.

-- Two grains, told apart by `by_partner`: per partner (1), and with the partners summed into
-- partner 0 (0), which serves every summary that neither groups nor filters by partner with
-- several times fewer groups. Both come from one pass over the rows (`arrayJoin` doubles each).
-- Keyed by every column a summary groups or filters by: SummingMergeTree adds up the counts of
-- a key as parts merge (a query still sums them: parts not merged yet hold a key more than
-- once). Names differ from the rows' columns where the view computes them (`partner`,
-- `payout_total`): ClickHouse's aliases are seen throughout a query, and `... AS pid` would
-- name itself.
CREATE TABLE IF NOT EXISTS {db}.sp_hourly (
    by_partner UInt8,
    hour_us Int64,
    advertiser_id String,
    offer_id UInt64,
    partner UInt64,
    goal_lc String,
    status Int64,
    response_status UInt8,
    error String,
    postbacks UInt64,
    accepted UInt64,
    rejected UInt64,
    conversions UInt64,
    payout_total Float64,
    revenue_total Float64
) ENGINE = SummingMergeTree((postbacks, accepted, rejected, conversions, payout_total, revenue_total))
PARTITION BY toYYYYMM(toDateTime(intDiv(hour_us, 1000000), 'UTC'))
ORDER BY (by_partner, hour_us, advertiser_id, offer_id, partner, goal_lc, status, response_status,
          error)
{ttl hour_us}
SETTINGS index_granularity = 8192{settings};

-- The rows logged before this migration (each once: FINAL), unless counted already.
INSERT INTO {db}.sp_hourly
SELECT arrayJoin([toUInt8(0), toUInt8(1)]) AS by_partner,
    intDiv(at_us, 3600000000) * 3600000000 AS hour_us, advertiser_id, offer_id,
    if(by_partner = 1, pid, toUInt64(0)) AS partner, goal_lc, status, response_status, error,
    count() AS postbacks, countIf(response_status = 1) AS accepted,
    countIf(response_status != 1) AS rejected, countIf(created = 1) AS conversions,
    sumIf(payouts, created = 1) AS payout_total, sumIf(revenue, created = 1) AS revenue_total
FROM {db}.server_postbacks FINAL
WHERE (SELECT count() FROM {db}.sp_hourly) = 0
GROUP BY by_partner, hour_us, advertiser_id, offer_id, partner, goal_lc, status, response_status,
    error;

-- From now on, each insert's rows.
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.sp_hourly_counter TO {db}.sp_hourly AS
SELECT arrayJoin([toUInt8(0), toUInt8(1)]) AS by_partner,
    intDiv(at_us, 3600000000) * 3600000000 AS hour_us, advertiser_id, offer_id,
    if(by_partner = 1, pid, toUInt64(0)) AS partner, goal_lc, status, response_status, error,
    count() AS postbacks, countIf(response_status = 1) AS accepted,
    countIf(response_status != 1) AS rejected, countIf(created = 1) AS conversions,
    sumIf(payouts, created = 1) AS payout_total, sumIf(revenue, created = 1) AS revenue_total
FROM {db}.server_postbacks
GROUP BY by_partner, hour_us, advertiser_id, offer_id, partner, goal_lc, status, response_status,
    error;
