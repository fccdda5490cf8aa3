//! The stream processor's runtime and the housekeeping tasks. The decisions are
//! `postback_core::processor`'s; this module moves data between the log and the store.
//!
//! The processor is a member of the consumer group `processor` of the events log: it processes
//! the partitions the group gives it. On an assignment it starts each partition at the position
//! the store holds for it; on a revocation it forgets what it held in memory (the batch before
//! was already stored and committed: it commits before it polls again).
//!
//! Effectively once: every row id comes from a log position, the analytics store keeps a row
//! inserted twice once, and the state store commits a batch's state with the next positions of
//! its partitions in one transaction, after the batch's rows are in. After a crash the processor
//! resumes at the committed positions, from the state committed with them; a batch that is
//! redone inserts the same rows.

use crate::engine::Engine;
use postback_core::delivery::DeliveryRecord;
use postback_core::event::Event;
use postback_core::keys::Partition;
use postback_core::log::{Keyed, Polled, Position, Record};
use postback_core::processor::{self, ConversionChange, Lookups, Output, Parsed, Processor};
use postback_core::rules::Conversion;
use postback_core::seams::{AnalyticsRows, SeamError, StateChanges};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The consumer group of the processors, and the name their positions are stored under.
pub const CONSUMER: &str = "processor";

/// Runs until `stop` turns true, finishing the batch at hand first. A backend that is
/// unavailable is retried with backoff, from the stored positions; a fatal error (a damaged log
/// or store, or a bug) stops the processor: ingestion goes on, and nothing is lost, but the
/// stats stay behind until an operator restarts the engine (`postbackd_processor_running` 0).
pub async fn run_processor(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    let running = metrics::gauge!("postbackd_processor_running");
    running.set(1.0);
    while !*stop.borrow() {
        match consume(&engine, &mut stop).await {
            Ok(()) => return,
            Err(e @ SeamError::Fatal(_)) => {
                tracing::error!(error = %e, "processor stopped; restart the engine once fixed");
                running.set(0.0);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "processor failed; retrying from the stored positions");
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

/// Processes the partitions the group gives this member, until `stop`.
async fn consume(engine: &Arc<Engine>, stop: &mut watch::Receiver<bool>) -> Result<(), SeamError> {
    let mut sub = engine.events.clone().subscribe(CONSUMER).await?;
    let mut batch = Batcher::new(engine, true);
    let rebalances = metrics::counter!("postbackd_processor_rebalances_total");
    loop {
        if *stop.borrow() {
            return Ok(());
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
        match polled {
            Polled::Idle => {}
            Polled::Assigned(partitions) => {
                rebalances.increment(1);
                for p in partitions {
                    let at = engine.state.position(CONSUMER, p).await?;
                    tracing::info!(partition = p, at, "processing a partition");
                    sub.start_at(p, at);
                    batch.resumed_at(p, at);
                }
            }
            Polled::Revoked(partitions) => {
                rebalances.increment(1);
                tracing::info!(?partitions, "partitions moved to another processor");
                batch.processor.forget();
            }
            Polled::Records(records) => {
                let short = records.len() < engine.config.processor_batch;
                let next = batch.process(records).await?;
                sub.commit(next).await?;
                let linger = engine.config.processor_linger();
                if short && !linger.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(linger) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }
}

/// Processes every partition of the log from the stored positions to its end as it is now,
/// creating no delivery jobs (a replay reads them back from the deliveries log).
pub async fn process_to_end(engine: &Arc<Engine>) -> Result<u64, SeamError> {
    let mut batch = Batcher::new(engine, false);
    let mut processed = 0;
    for p in 0..engine.events.partitions() {
        let (start, end) = engine.events.bounds(p).await?;
        let mut next = engine.state.position(CONSUMER, p).await?.max(start);
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
            batch.process(records).await?;
        }
    }
    Ok(processed)
}

/// Turns batches of log records into stored rows.
struct Batcher<'e> {
    engine: &'e Engine,
    processor: Processor,
    buffers: simd_json::Buffers,
    /// Append the affiliate postbacks a batch triggers to the deliveries log.
    emit_jobs: bool,
    /// Per partition, the offset below which rows may have been inserted already: a batch
    /// before it failed or was cut short by a crash or a hand-over after its insert, and
    /// started at the committed position with at most `processor_batch` records.
    redo_below: BTreeMap<Partition, u64>,
}

impl<'e> Batcher<'e> {
    fn new(engine: &'e Engine, emit_jobs: bool) -> Self {
        Self {
            engine,
            processor: Processor::new(
                engine.config.platform_secure.clone(),
                engine.config.processor_cache_bytes,
            ),
            buffers: simd_json::Buffers::new(4096),
            emit_jobs,
            redo_below: BTreeMap::new(),
        }
    }

    /// Processing of `partition` starts (again) at `at`, its committed position.
    fn resumed_at(&mut self, partition: Partition, at: u64) {
        let batch = self.engine.config.processor_batch as u64;
        self.redo_below.insert(partition, at.saturating_add(batch));
    }

    /// Processes records (in order within each partition) and stores the result with the next
    /// position of each partition; returns those positions. With `emit_jobs`, the affiliate
    /// postbacks the batch triggers are appended to the deliveries log before the batch is
    /// stored, so none is lost in a crash; a redone batch appends the same job ids again and
    /// the dispatcher keeps each once.
    async fn process(&mut self, records: Vec<Record>) -> Result<Vec<Position>, SeamError> {
        let engine = self.engine;
        let mut next: BTreeMap<Partition, u64> = BTreeMap::new();
        let count = records.len() as u64;
        let maybe_inserted = records.iter().any(|r| {
            self.redo_below
                .get(&r.partition)
                .is_some_and(|below| r.offset < *below)
        });
        // simd-json decodes our envelopes about 12% faster than serde_json (benches/core.rs);
        // it works in place, on the records the batch owns anyway.
        let batch: Vec<(Position, Parsed)> = records
            .into_iter()
            .filter_map(|mut r| {
                next.insert(r.partition, r.offset + 1);
                let position = r.position();
                match simd_json::serde::from_slice_with_buffers::<Event>(
                    &mut r.payload,
                    &mut self.buffers,
                ) {
                    Ok(event) => Some((position, processor::parse(&event))),
                    Err(e) => {
                        // Only this engine writes the log; a record it cannot read is a bug, kept
                        // in the log for a fixed version to replay.
                        tracing::error!(?position, error = %e, "skipping an undecodable log record");
                        metrics::counter!("postbackd_processor_undecodable_total").increment(1);
                        None
                    }
                }
            })
            .collect();
        let processor = &mut self.processor;
        let output = {
            let missing = processor.missing_clicks(&batch);
            let mut lookups = if missing.is_empty() {
                Lookups::default()
            } else {
                engine.state.lookup(missing, Vec::new()).await?
            };
            let keys = {
                let catalog = engine.catalog_read();
                processor.missing_conversions(&catalog, &batch, &lookups)
            };
            if !keys.is_empty() {
                lookups.conversions = engine.state.lookup(Vec::new(), keys).await?.conversions;
            }
            let catalog = engine.catalog_read();
            processor.apply(&catalog, &batch, lookups)
        };
        let postbacks = output.postbacks.len() as u64;
        if self.emit_jobs && !output.jobs.is_empty() {
            let records = output
                .jobs
                .iter()
                .map(|j| {
                    let bytes = serde_json::to_vec(&DeliveryRecord::Job(j.clone()))
                        .map_err(|e| SeamError::Fatal(format!("encoding a job: {e}")))?;
                    Ok(Keyed::new(j.job_id.clone(), bytes))
                })
                .collect::<Result<Vec<_>, SeamError>>()?;
            engine.deliveries.append(records).await?;
        }
        let positions: Vec<Position> = next
            .into_iter()
            .map(|(partition, offset)| Position { partition, offset })
            .collect();
        if let Err(e) = store(engine, output, positions.clone(), maybe_inserted).await {
            // The cache may hold conversions the store does not: start afresh.
            processor.forget();
            return Err(e);
        }
        metrics::counter!("postbackd_processed_events_total").increment(count);
        metrics::counter!("postbackd_processed_postbacks_total").increment(postbacks);
        for p in &positions {
            if let Ok((_, end)) = engine.events.bounds(p.partition).await {
                metrics::gauge!("postbackd_processor_lag", "partition" => p.partition.to_string())
                    .set(end.saturating_sub(p.offset) as f64);
            }
        }
        Ok(positions)
    }
}

/// Stores a batch's output: its analytics rows first (idempotent), then its state and the next
/// positions. A crash between the two redoes the batch from the state before it, which gives
/// the same rows. Where the analytics store is the state store, the clicks and conversions go
/// in with the state only: written earlier, a redone batch would find its own conversions.
async fn store(
    engine: &Engine,
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
    engine.state.commit(CONSUMER, state, next).await
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
