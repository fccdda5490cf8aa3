-- The embedded store (SQLite): the analytics store, the processor's state and the delivery
-- queue in one file. Every row is derived from the logs and can be rebuilt by `postbackd
-- replay`; ids come from log positions, so rewriting a batch is a no-op. `clicks` and
-- `conversions` serve both the state (lookups) and the analytics (listings).
--
-- Schema version: `PRAGMA user_version` (set by the engine, see SCHEMA_VERSION in
-- sqlite_store.rs). A store written by an older version is rebuilt from the logs at start.
--
-- Listed tables have `seq INTEGER PRIMARY KEY AUTOINCREMENT`: the order rows were written in,
-- never reused (even after retention empties a table). A listing's snapshot is the highest seq
-- it saw; later pages read `seq <= snapshot`, so rows added meanwhile shift nothing.
PRAGMA journal_mode = WAL;
-- NORMAL in WAL mode survives a process crash; after a power loss the newest transactions may
-- roll back, and with them the consumer position, so the processor simply redoes them.
PRAGMA synchronous = NORMAL;

-- Each consumer's next offset in each partition of the log it reads, written in the same
-- transaction as the rows derived from the records before it.
CREATE TABLE IF NOT EXISTS positions (
    consumer TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (consumer, partition)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS clicks (
    click_id TEXT PRIMARY KEY,
    at_us INTEGER NOT NULL,
    offer_id INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    ip TEXT NOT NULL,
    ua TEXT NOT NULL,
    referrer TEXT NOT NULL,
    country TEXT NOT NULL,
    subs TEXT NOT NULL -- JSON array of sub1..sub8
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS clicks_at ON clicks (at_us);

CREATE TABLE IF NOT EXISTS server_postbacks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    at_us INTEGER NOT NULL,
    server TEXT NOT NULL,
    method TEXT NOT NULL,
    get_pairs TEXT NOT NULL,  -- JSON array of [key, value], as received
    post_pairs TEXT NOT NULL,
    pixel INTEGER NOT NULL,
    response_status INTEGER NOT NULL,
    error TEXT NOT NULL,
    clickid TEXT NOT NULL,
    action_id TEXT NOT NULL,
    goal TEXT NOT NULL,
    goal_lc TEXT NOT NULL,
    status INTEGER NOT NULL,
    offer_id INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    advertiser_id TEXT NOT NULL,
    conversion_id TEXT NOT NULL,
    delta INTEGER,
    ip TEXT NOT NULL,
    created INTEGER NOT NULL,  -- this postback registered a conversion, of this payout/revenue
    payouts REAL NOT NULL,
    revenue REAL NOT NULL,
    line_set INTEGER NOT NULL  -- sp_line_sets.rowid of its narrow lines, 0 when none
);
-- Listings are ordered by (time, id), newest first.
CREATE INDEX IF NOT EXISTS sp_at ON server_postbacks (at_us, id);
CREATE INDEX IF NOT EXISTS sp_offer ON server_postbacks (offer_id, at_us);
CREATE INDEX IF NOT EXISTS sp_partner ON server_postbacks (pid, at_us);
CREATE INDEX IF NOT EXISTS sp_advertiser ON server_postbacks (advertiser_id, at_us);
CREATE INDEX IF NOT EXISTS sp_goal ON server_postbacks (goal_lc, at_us);
CREATE INDEX IF NOT EXISTS sp_status ON server_postbacks (status, at_us);
CREATE INDEX IF NOT EXISTS sp_response ON server_postbacks (response_status, at_us);
CREATE INDEX IF NOT EXISTS sp_line_set ON server_postbacks (line_set, at_us);

-- Exact filters on columns with about as many values as rows (click id, action id, sub1) go
-- through an inverted index of one term per value, rowid = seq: FTS5 keeps it as segments it
-- appends and merges, where a B-tree index on such a column writes a random page per row
-- (most of what the store wrote per postback). The term is a hash of the value (see
-- `key_term`); the column itself decides among the candidates.
CREATE VIRTUAL TABLE IF NOT EXISTS server_postbacks_keys USING fts5 (
    keys, content = '', contentless_delete = 1, detail = none, tokenize = 'ascii'
);

-- Substring search over the "key=value" lines of the parameters, in two parts (see
-- engine/postbackd/src/line_sets.rs): the lines of keys that show few values (goal=sale,
-- status=1) as the row's line set, kept once per combination and counted by hour; the other
-- lines (click ids, order ids) in a trigram index of the row, rowid = server_postbacks.seq. A
-- row matches a term when its set's text or its own lines do: a term that hits a third of the
-- log through a common line is counted from a few sets' hours instead of millions of rows.
CREATE VIRTUAL TABLE IF NOT EXISTS server_postbacks_search USING fts5 (
    params, content = '', contentless_delete = 1, tokenize = 'trigram'
);
CREATE VIRTUAL TABLE IF NOT EXISTS sp_line_sets USING fts5 (lines, tokenize = 'trigram');
-- Every commit adds a segment to each index of every row; FTS5 merges a level's segments into
-- one of the next once there are `automerge` of them (4 by default). At 16, the most it
-- takes, each row is rewritten about half as often: a replay of 250k events took 12% less
-- CPU, 10M rows were stored 15% faster, and a rare term, looked up in more segments, took
-- 10-11 instead of 8-9 ms (p95, 30 days of 10M rows; README). A setting, not a format:
-- applied at every open, no schema version of its own.
INSERT INTO server_postbacks_keys (server_postbacks_keys, rank) VALUES ('automerge', 16);
INSERT INTO server_postbacks_search (server_postbacks_search, rank) VALUES ('automerge', 16);
-- Keys that have shown too many values to be in sets: their lines are in the index for good.
CREATE TABLE IF NOT EXISTS sp_wide_keys (key TEXT PRIMARY KEY) WITHOUT ROWID;
-- Rows by line set and UTC hour, kept exact as the hourly counts are (below).
CREATE TABLE IF NOT EXISTS sp_line_set_hours (
    line_set INTEGER NOT NULL,
    hour_us INTEGER NOT NULL,
    postbacks INTEGER NOT NULL,
    PRIMARY KEY (line_set, hour_us)
) WITHOUT ROWID;

-- The server-postback log counted by UTC hour and by every key a summary groups or filters
-- by: a month's summary reads these instead of every row. Kept exact in the rows' own
-- transactions: a batch adds the counts of the rows it inserted (a redone batch inserts none),
-- and retention counts again the hours whose rows it removed. Two grains: `by_partner` 1 counts
-- per partner, where an hour has a group per offer and partner; 0 sums the partners (pid 0),
-- several times fewer groups, for every summary that neither groups nor filters by partner.
CREATE TABLE IF NOT EXISTS sp_hourly (
    by_partner INTEGER NOT NULL,
    hour_us INTEGER NOT NULL,
    offer_id INTEGER NOT NULL,
    advertiser_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    goal_lc TEXT NOT NULL,
    status INTEGER NOT NULL,
    response_status INTEGER NOT NULL,
    error TEXT NOT NULL,
    postbacks INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    created INTEGER NOT NULL,
    payouts REAL NOT NULL,
    revenue REAL NOT NULL,
    -- The advertiser before the offer: a summary by time and advertiser reads them in order.
    PRIMARY KEY (by_partner, hour_us, advertiser_id, offer_id, pid, goal_lc, status,
                 response_status, error)
) WITHOUT ROWID;

-- The seqs of each UTC hour's server postbacks, first and last, kept with the hourly counts:
-- a date range's seqs lie within those of its hours, and bounding the search index by them
-- lets FTS5 read only that stretch of its lists (a common term over a day: 10 s -> 0.1 s).
CREATE TABLE IF NOT EXISTS sp_seqs_by_hour (
    hour_us INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS conversions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    conv_key TEXT NOT NULL UNIQUE,
    offer_id INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    advertiser_id TEXT NOT NULL,
    goal TEXT NOT NULL,
    goal_lc TEXT NOT NULL,
    action_id TEXT NOT NULL,
    clickid TEXT NOT NULL,
    status INTEGER NOT NULL,
    sum REAL NOT NULL,
    payouts REAL NOT NULL,
    revenue REAL NOT NULL,
    currency TEXT NOT NULL,
    ip TEXT NOT NULL,
    ua TEXT NOT NULL,
    comment TEXT NOT NULL,
    sub1 TEXT NOT NULL, sub2 TEXT NOT NULL, sub3 TEXT NOT NULL, sub4 TEXT NOT NULL,
    sub5 TEXT NOT NULL, sub6 TEXT NOT NULL, sub7 TEXT NOT NULL, sub8 TEXT NOT NULL,
    custom_fields TEXT NOT NULL, -- JSON array of custom_field1..7
    promo_code TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    click_us INTEGER NOT NULL,
    version INTEGER NOT NULL -- Conversion::version: the state of the highest one is kept
);
CREATE INDEX IF NOT EXISTS conv_created ON conversions (created_us, id);
CREATE INDEX IF NOT EXISTS conv_offer ON conversions (offer_id, created_us);
CREATE INDEX IF NOT EXISTS conv_partner ON conversions (pid, created_us);
CREATE INDEX IF NOT EXISTS conv_advertiser ON conversions (advertiser_id, created_us);
CREATE INDEX IF NOT EXISTS conv_status ON conversions (status, created_us);
CREATE INDEX IF NOT EXISTS conv_goal ON conversions (goal_lc, created_us);
-- Click id, action id and sub1, as for server postbacks.
CREATE VIRTUAL TABLE IF NOT EXISTS conversions_keys USING fts5 (
    keys, content = '', contentless_delete = 1, detail = none, tokenize = 'ascii'
);
INSERT INTO conversions_keys (conversions_keys, rank) VALUES ('automerge', 16);

-- Affiliate postback deliveries, derived from the deliveries log.
CREATE TABLE IF NOT EXISTS delivery_jobs (
    job_id TEXT PRIMARY KEY,
    part INTEGER NOT NULL,       -- the deliveries-log partition the job came from
    at_us INTEGER NOT NULL,
    host TEXT NOT NULL,          -- the URL's host: due jobs are taken fairly across hosts
    pid INTEGER NOT NULL,
    offer_id INTEGER NOT NULL,
    goal_lc TEXT NOT NULL,
    conv_status INTEGER NOT NULL,
    job TEXT NOT NULL,           -- the DeliveryJob as JSON
    state TEXT NOT NULL,         -- pending, delivered, failed, gave_up
    attempts INTEGER NOT NULL,
    round_base INTEGER NOT NULL,
    next_at_us INTEGER NOT NULL
) WITHOUT ROWID;
-- Pending hosts in order, and each host's soonest due jobs (see due_jobs).
CREATE INDEX IF NOT EXISTS dj_host_due ON delivery_jobs (state, host, next_at_us);
CREATE INDEX IF NOT EXISTS dj_partner ON delivery_jobs (pid, at_us);
CREATE INDEX IF NOT EXISTS dj_at ON delivery_jobs (at_us);

-- The attempt log (analytics): each attempt with its job, so it stands without the queue.
CREATE TABLE IF NOT EXISTS delivery_attempts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at_us INTEGER NOT NULL,
    http_code INTEGER NOT NULL,
    error TEXT NOT NULL,
    state TEXT NOT NULL,
    next_at_us INTEGER,
    pid INTEGER NOT NULL,
    offer_id INTEGER NOT NULL,
    goal_lc TEXT NOT NULL,
    conv_status INTEGER NOT NULL,
    job TEXT NOT NULL,           -- the DeliveryJob as JSON
    UNIQUE (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS da_at ON delivery_attempts (at_us, job_id, attempt);
