//! The stream processor's runtime and the housekeeping tasks. The decisions are
//! `postback_core::processor`'s; this module moves data between the logs and the stores.
//!
//! The processor is a member of the consumer group `processor` of the events log: it processes
//! the partitions the group gives it. On an assignment it starts each partition at the position
//! the store holds for it; on a revocation it forgets what it held in memory (the batch before
//! was already stored and committed: it commits before it polls again).
//!
//! With the dedupe as a stage of its own (`separate_dedupe`, on with Kafka), the processor is
//! stage 1: it writes the clicks and the rejections of their rules, and appends each postback
//! that passed them to the `conversions` log, keyed by its conversion key; stage 2, the group
//! `deduper` of that log, decides each against the conversion of its key and writes the rows,
//! the conversions and the affiliate-postback jobs. One process owns a key's partition, so no
//! two processes ever create one conversion.
//!
//! Effectively once: every row id comes from a position in the events log, the analytics store
//! keeps a row inserted twice once, and the state store commits a batch's state with the next
//! positions of its partitions in one transaction, after the batch's rows are in. After a crash
//! a stage resumes at the committed positions, from the state committed with them; a batch that
//! is redone inserts the same rows, and the records stage 1 appends again are marked, so that
//! stage 2 writes their rows as possibly written already.
//!
//! A process's state store is its own. When it takes over a partition that another process
//! processed (or its data directory is new), what lies before is in the shared analytics store
//! only: for those partitions a stage asks that store for what it does not hold (clicks) or for
//! the latest state beside its own (conversions).

use crate::engine::Engine;
use postback_core::delivery::DeliveryRecord;
use postback_core::event::Event;
use postback_core::keys::Partition;
use postback_core::log::{EventLog, Keyed, Polled, Position, Record, Subscription};
use postback_core::processor::{
    self, Accepted, ConversionChange, Deduper, Lookups, Output, Parsed, Processor,
};
use postback_core::rules::Conversion;
use postback_core::seams::{AnalyticsRows, SeamError, StateChanges};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The consumer group of the processors (of the events log), and the name their positions
/// are stored under.
pub const CONSUMER: &str = "processor";
/// The consumer group of the dedupe stage (of the conversions log).
pub const DEDUPER: &str = "deduper";

/// What a consumer of the pipeline does with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Both halves in one pass: every partition in one process (the embedded log).
    OnePass,
    /// The rules of the click; accepted postbacks go on to the conversions log.
    Clicks,
    /// The dedupe by conversion key.
    Dedupe,
}

impl Stage {
    fn consumer(self) -> &'static str {
        match self {
            Stage::OnePass | Stage::Clicks => CONSUMER,
            Stage::Dedupe => DEDUPER,
        }
    }
    fn log(self, engine: &Engine) -> Arc<dyn EventLog> {
        match self {
            Stage::OnePass | Stage::Clicks => engine.events.clone(),
            Stage::Dedupe => engine.conversions.clone(),
        }
    }
}

/// Runs the processing stages until `stop` turns true, each finishing the batch at hand
/// first. A backend that is unavailable is retried with backoff, from the stored positions; a
/// fatal error (a damaged log or store, or a bug) stops that stage: ingestion goes on, and
/// nothing is lost, but the stats stay behind until an operator restarts the engine
/// (`postbackd_processor_running` 0).
pub async fn run_processor(engine: Arc<Engine>, stop: watch::Receiver<bool>) {
    let running = metrics::gauge!("postbackd_processor_running");
    running.set(1.0);
    if engine.config.dedupe_separately() {
        tokio::join!(
            supervise(engine.clone(), stop.clone(), Stage::Clicks),
            supervise(engine, stop, Stage::Dedupe)
        );
    } else {
        supervise(engine, stop, Stage::OnePass).await;
    }
}

async fn supervise(engine: Arc<Engine>, mut stop: watch::Receiver<bool>, stage: Stage) {
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        match consume(&engine, &mut stop, stage).await {
            Ok(()) => return,
            Err(e @ SeamError::Fatal(_)) => {
                tracing::error!(error = %e, ?stage, "processor stopped; restart the engine once fixed");
                metrics::gauge!("postbackd_processor_running").set(0.0);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, ?stage, "processor failed; retrying from the stored positions");
                metrics::counter!("postbackd_processor_errors_total").increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Processes the partitions the group gives this member, until `stop`. A batch is written
/// while the next one is judged (see [`Writing`]); every way out waits for that write.
async fn consume(
    engine: &Arc<Engine>,
    stop: &mut watch::Receiver<bool>,
    stage: Stage,
) -> Result<(), SeamError> {
    let mut writing = Writing::default();
    let result = consume_with(engine, stop, stage, &mut writing).await;
    // Ending with a write in flight would let a restart read positions it is still changing.
    let _ = writing.finish().await;
    result
}

async fn consume_with(
    engine: &Arc<Engine>,
    stop: &mut watch::Receiver<bool>,
    stage: Stage,
    writing: &mut Writing,
) -> Result<(), SeamError> {
    let consumer = stage.consumer();
    let mut sub = stage.log(engine).subscribe(consumer).await?;
    let mut batch = Batcher::new(engine, stage, true);
    let rebalances = metrics::counter!("postbackd_processor_rebalances_total");
    loop {
        if *stop.borrow() {
            return commit_written(&mut sub, writing).await;
        }
        // A poll is cancel-safe: stopping here loses nothing.
        let polled = tokio::select! {
            polled = sub.poll(
                engine.config.processor_batch,
                engine.config.processor_batch_bytes,
                Duration::from_millis(500),
            ) => polled?,
            _ = stop.changed() => continue,
        };
        let Polled::Records(records) = polled else {
            // Partitions change only once what was polled of them is stored and committed (a
            // revocation is let go at the next poll).
            commit_written(&mut sub, writing).await?;
            match polled {
                Polled::Assigned(partitions) => {
                    rebalances.increment(1);
                    for p in partitions {
                        let at = engine.state.position(consumer, p).await?;
                        let local_from =
                            engine.state.position(&local_from_name(consumer), p).await?;
                        tracing::info!(
                            partition = p,
                            at,
                            local_from,
                            consumer,
                            "processing a partition"
                        );
                        sub.start_at(p, at);
                        batch.resumed_at(p, at, local_from);
                    }
                }
                Polled::Revoked(partitions) => {
                    rebalances.increment(1);
                    tracing::info!(
                        ?partitions,
                        consumer,
                        "partitions moved to another processor"
                    );
                    batch.forget();
                }
                Polled::Idle | Polled::Records(_) => {}
            }
            continue;
        };
        let short = records.len() < engine.config.processor_batch;
        if let Some(next) = writing.judge_next(engine, &mut batch, records).await? {
            sub.commit(next).await?;
        }
        let linger = engine.config.processor_linger();
        if short && !linger.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Waits for the batch being written, and commits its positions to the group once it is
/// stored. (A failed write ends `consume`, and its cache with it.)
async fn commit_written(
    sub: &mut Box<dyn Subscription>,
    writing: &mut Writing,
) -> Result<(), SeamError> {
    match writing.finish().await? {
        Some(next) => sub.commit(next).await,
        None => Ok(()),
    }
}

/// The one batch being written while the next is judged: judging takes the processor's
/// thread and writing mostly the store's, so the two overlap on two cores. One at a time keeps
/// the writes in log order; the next batch finds what this one added in memory (`Recent`), so
/// it need not wait for the store.
#[derive(Default)]
struct Writing(Option<tokio::task::JoinHandle<Result<Vec<Position>, SeamError>>>);

impl Writing {
    /// Judges `records` while the batch before is written, then starts their write. Returns
    /// the batch before's next positions, once it is stored.
    async fn judge_next(
        &mut self,
        engine: &Arc<Engine>,
        batch: &mut Batcher<'_>,
        records: Vec<Record>,
    ) -> Result<Option<Vec<Position>>, SeamError> {
        let mut written = None;
        if !batch.held_last_batch() {
            // This batch may need what the last one wrote and memory could not hold.
            written = self.finish().await?;
        }
        let prepared = batch.prepare(records).await?;
        if let Some(next) = self.finish().await? {
            written = Some(next);
        }
        let (engine, stage) = (engine.clone(), batch.stage);
        self.0 = Some(tokio::spawn(async move {
            write(&engine, stage, prepared).await
        }));
        Ok(written)
    }

    /// Waits for the batch being written; its next positions once it is stored.
    async fn finish(&mut self) -> Result<Option<Vec<Position>>, SeamError> {
        let Some(handle) = self.0.take() else {
            return Ok(None);
        };
        match handle.await {
            Ok(result) => result.map(Some),
            Err(e) => Err(SeamError::Fatal(format!("writing a batch panicked: {e}"))),
        }
    }
}

/// Where a consumer keeps, per partition, the offset from which its own state is complete.
fn local_from_name(consumer: &str) -> String {
    format!("{consumer}.local_from")
}

/// Processes every partition of the events log from the stored positions to its end as it
/// is now, in one pass, creating no delivery jobs (a replay reads them back from the
/// deliveries log). The dedupe stage then starts at the end of the conversions log: what is
/// there was decided here.
pub async fn process_to_end(engine: &Arc<Engine>) -> Result<u64, SeamError> {
    let mut batch = Batcher::new(engine, Stage::OnePass, false);
    let mut writing = Writing::default();
    let processed = replay_partitions(engine, &mut batch, &mut writing).await;
    writing.finish().await?;
    let processed = processed?;
    let mut ends = Vec::new();
    for p in 0..engine.conversions.partitions() {
        let end = engine.conversions.bounds(p).await?.1;
        ends.push(Position {
            partition: p,
            offset: end,
        });
    }
    engine
        .state
        .commit(DEDUPER, StateChanges::default(), ends)
        .await?;
    Ok(processed)
}

/// The replay's loop: each batch is judged while the one before is written.
async fn replay_partitions(
    engine: &Arc<Engine>,
    batch: &mut Batcher<'_>,
    writing: &mut Writing,
) -> Result<u64, SeamError> {
    let mut processed = 0;
    for p in 0..engine.events.partitions() {
        let (start, end) = engine.events.bounds(p).await?;
        let mut next = engine.state.position(CONSUMER, p).await?.max(start);
        batch.resumed_at(p, next, 0);
        while next < end {
            let records = engine
                .events
                .read(
                    p,
                    next,
                    engine.config.processor_batch,
                    engine.config.processor_batch_bytes,
                )
                .await?;
            let Some(last) = records.last() else { break };
            next = last.offset + 1;
            processed += records.len() as u64;
            writing.judge_next(engine, batch, records).await?;
        }
    }
    Ok(processed)
}

/// Turns batches of log records into stored rows.
struct Batcher<'e> {
    engine: &'e Engine,
    stage: Stage,
    processor: Processor,
    deduper: Deduper,
    buffers: simd_json::Buffers,
    /// Append the affiliate postbacks a batch triggers to the deliveries log.
    emit_jobs: bool,
    /// Per partition, the offset below which rows may have been inserted already: the batches
    /// before it failed or were cut short by a crash or a hand-over after their insert, and
    /// started at the committed position with at most `processor_batch` records each (the
    /// one being written and the one judged meanwhile). The committed position is this
    /// process's own, or where the records start when another process had the partition
    /// (the group's position, see `note_gaps`).
    redo_below: BTreeMap<Partition, u64>,
    /// Per partition: the next offset this process's state expects, and the offset from which
    /// that state is complete (0: from the start of the log).
    expected: BTreeMap<Partition, u64>,
    local_from: BTreeMap<Partition, u64>,
}

impl<'e> Batcher<'e> {
    fn new(engine: &'e Engine, stage: Stage, emit_jobs: bool) -> Self {
        let secure = engine.config.platform_secure.clone();
        let cache = engine.config.processor_cache_bytes;
        Self {
            engine,
            stage,
            processor: Processor::new(secure.clone(), cache),
            deduper: Deduper::new(secure, cache / 2),
            buffers: simd_json::Buffers::new(4096),
            emit_jobs,
            redo_below: BTreeMap::new(),
            expected: BTreeMap::new(),
            local_from: BTreeMap::new(),
        }
    }

    /// Processing of `partition` starts (again) at `at`, its committed position; this
    /// process's state of it is complete from `local_from`.
    fn resumed_at(&mut self, partition: Partition, at: u64, local_from: u64) {
        // The batch that was being written and the one judged meanwhile (`Writing`).
        let batch = self.engine.config.processor_batch as u64;
        self.redo_below
            .insert(partition, at.saturating_add(2 * batch));
        self.expected.insert(partition, at);
        self.local_from.insert(partition, local_from);
    }

    /// Drops what is held in memory: the partitions changed, or the store may be behind it.
    fn forget(&mut self) {
        self.processor.forget();
        self.deduper.forget();
    }

    /// Notes the partitions whose records start past what this process processed itself
    /// (another process did, or this one lost its state): its state of them is complete only
    /// from there. Kept in the state store, so that a restart remembers.
    async fn note_gaps(&mut self, records: &[Record]) -> Result<(), SeamError> {
        let mut gaps = Vec::new();
        for r in records {
            let expected = self.expected.entry(r.partition).or_insert(r.offset);
            if r.offset > *expected {
                tracing::info!(
                    partition = r.partition,
                    from = *expected,
                    to = r.offset,
                    consumer = self.stage.consumer(),
                    "another process processed this partition up to here; asking the shared store for what came before"
                );
                gaps.push(r.position());
                self.local_from.insert(r.partition, r.offset);
                // The other process may have written rows of the batches from here on.
                let batch = self.engine.config.processor_batch as u64;
                let below = self.redo_below.entry(r.partition).or_default();
                *below = (*below).max(r.offset.saturating_add(2 * batch));
            }
            *expected = r.offset + 1;
        }
        if !gaps.is_empty() {
            let name = local_from_name(self.stage.consumer());
            self.engine
                .state
                .commit(&name, StateChanges::default(), gaps)
                .await?;
        }
        Ok(())
    }

    /// Whether this process's state of `partition` of its log misses what another process
    /// did, within what the log still holds.
    async fn incomplete(&self, partition: Partition) -> Result<bool, SeamError> {
        if self.engine.analytics_is_state {
            return Ok(false); // one process, one store: nothing is elsewhere
        }
        let from = self.local_from.get(&partition).copied().unwrap_or(0);
        if from == 0 {
            return Ok(false);
        }
        let start = self.stage.log(self.engine).bounds(partition).await?.0;
        Ok(from > start)
    }

    /// Judges records (in order within each partition) for [`write`]. Stage 1 appends what it
    /// accepted to the conversions log here, before the batch is written, so that none is lost
    /// in a crash; a redone batch appends them again, marked (`redo_below`).
    async fn prepare(&mut self, records: Vec<Record>) -> Result<Prepared, SeamError> {
        let engine = self.engine;
        engine.catalog_current().await?;
        let mut next: BTreeMap<Partition, u64> = BTreeMap::new();
        let count = records.len() as u64;
        self.note_gaps(&records).await?;
        let mut maybe_inserted = records.iter().any(|r| {
            self.redo_below
                .get(&r.partition)
                .is_some_and(|below| r.offset < *below)
        });
        for r in &records {
            next.insert(r.partition, r.offset + 1);
        }
        let positions: Vec<Position> = next
            .iter()
            .map(|(&partition, &offset)| Position { partition, offset })
            .collect();
        let output = match self.stage {
            Stage::OnePass | Stage::Clicks => {
                let batch = self.decode_events(records);
                let mut lookups = self.clicks(&batch).await?;
                if self.stage == Stage::OnePass {
                    let keys = {
                        let catalog = engine.catalog_read();
                        self.processor
                            .missing_conversions(&catalog, &batch, &lookups)
                    };
                    if !keys.is_empty() {
                        lookups.conversions =
                            engine.state.lookup(Vec::new(), keys).await?.conversions;
                    }
                    let catalog = engine.catalog_read();
                    self.processor.apply(&catalog, batch, lookups)
                } else {
                    let judged = {
                        let catalog = engine.catalog_read();
                        self.processor
                            .judge_clicks(&catalog, batch, lookups, maybe_inserted)
                    };
                    self.hand_on(&judged.accepted).await?;
                    Output {
                        clicks: judged.clicks,
                        postbacks: judged.rejected,
                        ..Output::default()
                    }
                }
            }
            Stage::Dedupe => {
                let batch: Vec<Accepted> = records
                    .into_iter()
                    .filter_map(|r| match serde_json::from_slice::<Accepted>(&r.payload) {
                        Ok(a) => Some(a),
                        Err(e) => {
                            undecodable(r.position(), &e);
                            None
                        }
                    })
                    .collect();
                let staged = {
                    let catalog = engine.catalog_read();
                    self.deduper.stage(&catalog, batch)
                };
                maybe_inserted |= staged.iter().any(|s| s.maybe_copy());
                let keys = self.deduper.missing(&staged);
                let mut lookups = Lookups::default();
                if !keys.is_empty() {
                    lookups.conversions = engine
                        .state
                        .lookup(Vec::new(), keys.clone())
                        .await?
                        .conversions;
                    // Only where this process's state of a partition may be stale.
                    let mut incomplete = false;
                    for p in next.keys() {
                        incomplete |= self.incomplete(*p).await?;
                    }
                    if incomplete {
                        for shared in engine.analytics.conversion_states(keys).await? {
                            let newer = lookups
                                .conversions
                                .get(&shared.key)
                                .is_none_or(|mine| shared.version() > mine.version());
                            if newer {
                                lookups.conversions.insert(shared.key.clone(), shared);
                            }
                        }
                    }
                }
                let catalog = engine.catalog_read();
                self.deduper.apply(&catalog, staged, lookups)
            }
        };
        let jobs = if self.emit_jobs {
            output
                .jobs
                .iter()
                .map(|j| {
                    let bytes = serde_json::to_vec(&DeliveryRecord::Job(j.clone()))
                        .map_err(|e| SeamError::Fatal(format!("encoding a job: {e}")))?;
                    Ok(Keyed::new(j.job_id.clone(), bytes))
                })
                .collect::<Result<Vec<_>, SeamError>>()?
        } else {
            Vec::new()
        };
        Ok(Prepared {
            output,
            jobs,
            positions,
            count,
            maybe_inserted,
        })
    }

    /// Whether memory holds everything the last batch added (see [`Writing`]).
    fn held_last_batch(&self) -> bool {
        self.processor.held_last_batch() && self.deduper.held_last_batch()
    }

    /// Decodes events and reads them for processing; a record that cannot be decoded is
    /// skipped (and counted).
    fn decode_events(&mut self, records: Vec<Record>) -> Vec<(Position, Parsed)> {
        // simd-json decodes our envelopes about 12% faster than serde_json (benches/core.rs);
        // it works in place, on the records the batch owns anyway.
        let buffers = &mut self.buffers;
        records
            .into_iter()
            .filter_map(|mut r| {
                let position = r.position();
                match simd_json::serde::from_slice_with_buffers::<Event>(&mut r.payload, buffers) {
                    Ok(event) => Some((position, processor::parse(event))),
                    Err(e) => {
                        undecodable(position, &e);
                        None
                    }
                }
            })
            .collect()
    }

    /// The clicks the batch needs that memory does not hold: from this process's state, and
    /// from the shared store for the partitions whose state is incomplete here.
    async fn clicks(&self, batch: &[(Position, Parsed)]) -> Result<Lookups, SeamError> {
        let missing = self.processor.missing_clicks_by_partition(batch);
        if missing.is_empty() {
            return Ok(Lookups::default());
        }
        let mut ids: Vec<String> = missing.iter().map(|(_, id)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        let mut lookups = self.engine.state.lookup(ids, Vec::new()).await?;
        // Whether a partition's state is incomplete here, asked once per partition.
        let mut incomplete: BTreeMap<Partition, bool> = BTreeMap::new();
        let mut elsewhere = Vec::new();
        for (p, id) in missing {
            if lookups.clicks.contains_key(&id) {
                continue;
            }
            let here_incomplete = match incomplete.get(&p) {
                Some(known) => *known,
                None => {
                    let asked = self.incomplete(p).await?;
                    incomplete.insert(p, asked);
                    asked
                }
            };
            if here_incomplete {
                elsewhere.push(id);
            }
        }
        if !elsewhere.is_empty() {
            for c in self.engine.analytics.clicks(elsewhere).await? {
                lookups.clicks.insert(c.click_id.clone(), c);
            }
        }
        Ok(lookups)
    }

    /// Appends what stage 1 accepted to the conversions log, keyed by conversion key.
    async fn hand_on(&self, accepted: &[(String, Accepted)]) -> Result<(), SeamError> {
        if accepted.is_empty() {
            return Ok(());
        }
        let records = accepted
            .iter()
            .map(|(key, a)| {
                let bytes = serde_json::to_vec(a)
                    .map_err(|e| SeamError::Fatal(format!("encoding a postback: {e}")))?;
                Ok(Keyed::new(key.clone(), bytes))
            })
            .collect::<Result<Vec<_>, SeamError>>()?;
        self.engine.conversions.append(records).await?;
        Ok(())
    }
}

/// Only this engine writes its logs: a record it cannot read is a bug, kept in the log for a
/// fixed version to replay.
fn undecodable(position: Position, e: &dyn std::fmt::Display) {
    tracing::error!(?position, error = %e, "skipping an undecodable log record");
    metrics::counter!("postbackd_processor_undecodable_total").increment(1);
}

/// A judged batch, ready to be written.
struct Prepared {
    output: Output,
    /// The affiliate postbacks it triggers, for the deliveries log.
    jobs: Vec<Keyed>,
    /// The next position of each partition it read.
    positions: Vec<Position>,
    /// Records it read.
    count: u64,
    /// Its rows may have been inserted already (a batch redone).
    maybe_inserted: bool,
}

/// Writes a judged batch: its affiliate postbacks to the deliveries log first, so that none
/// is lost in a crash (a redone batch appends the same job ids again and the dispatcher keeps
/// each once), then its rows and state with the positions it reached. Returns those.
async fn write(
    engine: &Engine,
    stage: Stage,
    prepared: Prepared,
) -> Result<Vec<Position>, SeamError> {
    let Prepared {
        output,
        jobs,
        positions,
        count,
        maybe_inserted,
    } = prepared;
    let postbacks = output.postbacks.len() as u64;
    if !jobs.is_empty() {
        engine.deliveries.append(jobs).await?;
    }
    let consumer = stage.consumer();
    store(engine, consumer, output, positions.clone(), maybe_inserted).await?;
    if stage != Stage::Dedupe {
        metrics::counter!("postbackd_processed_events_total").increment(count);
    }
    // Rows written: stage 1 writes the rejections of the click's rules, stage 2 the rest.
    metrics::counter!("postbackd_processed_postbacks_total").increment(postbacks);
    let log = stage.log(engine);
    for p in &positions {
        if let Ok((_, end)) = log.bounds(p.partition).await {
            metrics::gauge!(
                "postbackd_processor_lag",
                "partition" => p.partition.to_string(),
                "stage" => consumer
            )
            .set(end.saturating_sub(p.offset) as f64);
        }
    }
    Ok(positions)
}

/// Stores a batch's output: its analytics rows first (idempotent), then its state and the next
/// positions. A crash between the two redoes the batch from the state before it, which gives
/// the same rows. Where the analytics store is the state store, the clicks and conversions go
/// in with the state only: written earlier, a redone batch would find its own conversions.
async fn store(
    engine: &Engine,
    consumer: &str,
    output: Output,
    next: Vec<Position>,
    maybe_inserted: bool,
) -> Result<(), SeamError> {
    let conversions = latest_states(&output.changes);
    let state = StateChanges {
        clicks: output.clicks,
        conversions: output.changes.into_iter().map(|c| c.conversion).collect(),
    };
    let rows = if engine.analytics_is_state {
        AnalyticsRows {
            postbacks: output.postbacks,
            maybe_inserted,
            ..Default::default()
        }
    } else {
        AnalyticsRows {
            clicks: state.clicks.clone(),
            postbacks: output.postbacks,
            conversions,
            attempts: Vec::new(),
            maybe_inserted,
        }
    };
    if !rows.is_empty() {
        engine.analytics.insert(rows).await?;
    }
    engine.state.commit(consumer, state, next).await
}

/// The last state of each conversion a batch changed.
fn latest_states(changes: &[ConversionChange]) -> Vec<Conversion> {
    let mut latest: BTreeMap<&str, &Conversion> = BTreeMap::new();
    for c in changes {
        latest.insert(&c.conversion.id, &c.conversion);
    }
    latest.into_values().cloned().collect()
}

/// Deletes store rows past the retention once an hour (and at start). The logs expire their
/// own records (the embedded log by segment age, Kafka by `retention.ms`).
pub async fn run_retention(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    loop {
        let cutoff = now_us() - i64::from(engine.config.retention_days) * 86_400 * 1_000_000;
        let expired = async {
            let mut n = engine.analytics.expire(cutoff).await?;
            if !engine.analytics_is_state {
                n += engine.state.expire(cutoff).await?;
            }
            Ok::<_, SeamError>(n + engine.queue.expire(cutoff).await?)
        };
        match expired.await {
            Ok(n) if n > 0 => tracing::info!(rows = n, "expired rows past the retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = stop.changed() => return,
        }
    }
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
