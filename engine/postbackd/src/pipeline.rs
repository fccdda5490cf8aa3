//! The stream processor's runtime and the housekeeping tasks. The decisions are
//! `postback_core::processor`'s; this module moves data between the log and the store.
//!
//! Effectively once: the store writes a batch's rows and the next log position in one
//! transaction, and every row id comes from a log position. After a crash the processor
//! resumes at the stored position; a batch that was written but whose position did not move
//! cannot happen, and one that was half-done was not written at all.

use crate::engine::Engine;
use postback_core::delivery::DeliveryRecord;
use postback_core::event::Event;
use postback_core::processor::{self, Lookups, Parsed, Processor};
use postback_core::seams::{EventLog, SeamError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The consumer name under which the processor keeps its log position.
pub const CONSUMER: &str = "processor";

/// Runs until `stop` turns true, finishing the batch at hand first. A backend that is
/// unavailable is retried with backoff, from the stored position; a fatal error (a damaged log
/// or store, or a bug) stops the processor: ingestion goes on, and nothing is lost, but the
/// stats stay behind until an operator restarts the engine (`postbackd_processor_running` 0).
pub async fn run_processor(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    let running = metrics::gauge!("postbackd_processor_running");
    running.set(1.0);
    while !*stop.borrow() {
        match process_until(&engine, &mut stop, None, true).await {
            Ok(()) => return,
            Err(e @ SeamError::Fatal(_)) => {
                tracing::error!(error = %e, "processor stopped; restart the engine once fixed");
                running.set(0.0);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "processor failed; retrying from the stored position");
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

/// Processes the log from the stored position: until `stop`, or, with `until`, until that
/// offset has been processed. With `emit_jobs`, the affiliate postbacks the batch triggers are
/// appended to the deliveries log before the batch is stored, so none is lost in a crash; a
/// redone batch appends the same job ids again and the dispatcher keeps each once.
pub async fn process_until(
    engine: &Engine,
    stop: &mut watch::Receiver<bool>,
    until: Option<u64>,
    emit_jobs: bool,
) -> Result<(), SeamError> {
    let mut processor = Processor::new(
        engine.config.platform_secure.clone(),
        0,
        engine.config.processor_cache_bytes,
    );
    let mut buffers = simd_json::Buffers::new(4096);
    let mut next = engine
        .store
        .position(CONSUMER)
        .await?
        .max(engine.events.start());
    loop {
        if until.is_some_and(|u| next >= u) {
            return Ok(());
        }
        if until.is_none() && *stop.borrow() {
            return Ok(());
        }
        let records = engine
            .events
            .read(
                next,
                engine.config.processor_batch,
                engine.config.processor_batch_bytes,
            )
            .await?;
        let Some(&(last, _)) = records.last() else {
            tokio::select! {
                _ = engine.events.wait_for(next) => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        let count = records.len() as u64;
        // simd-json decodes our envelopes about 12% faster than serde_json (benches/core.rs);
        // it works in place, on the records the batch owns anyway.
        let batch: Vec<(u64, Parsed)> = records
            .into_iter()
            .filter_map(|(offset, mut bytes)| {
                match simd_json::serde::from_slice_with_buffers::<Event>(&mut bytes, &mut buffers) {
                    Ok(event) => Some((offset, processor::parse(&event))),
                    Err(e) => {
                        // Only this engine writes the log; a record it cannot read is a bug, kept
                        // in the log for a fixed version to replay.
                        tracing::error!(offset, error = %e, "skipping an undecodable log record");
                        metrics::counter!("postbackd_processor_undecodable_total").increment(1);
                        None
                    }
                }
            })
            .collect();
        let output = {
            let missing = processor.missing_clicks(&batch);
            let mut lookups = if missing.is_empty() {
                Lookups::default()
            } else {
                engine.store.lookup(missing, Vec::new()).await?
            };
            let keys = {
                let catalog = engine.catalog_read();
                processor.missing_conversions(&catalog, &batch, &lookups)
            };
            if !keys.is_empty() {
                lookups.conversions = engine.store.lookup(Vec::new(), keys).await?.conversions;
            }
            let catalog = engine.catalog_read();
            processor.apply(&catalog, &batch, lookups)
        };
        let postbacks = output.postbacks.len() as u64;
        if emit_jobs && !output.jobs.is_empty() {
            let records = output
                .jobs
                .iter()
                .map(|j| serde_json::to_vec(&DeliveryRecord::Job(j.clone())).unwrap_or_default())
                .collect();
            engine.deliveries.append(records).await?;
        }
        if let Err(e) = engine.store.write(CONSUMER, output, last + 1).await {
            // The cache may hold conversions the store does not: start afresh.
            processor.forget();
            return Err(e);
        }
        metrics::counter!("postbackd_processed_events_total").increment(count);
        metrics::counter!("postbackd_processed_postbacks_total").increment(postbacks);
        metrics::gauge!("postbackd_processor_lag").set((engine.events.end() - (last + 1)) as f64);
        next = last + 1;
    }
}

/// Deletes rows and log records past the retention once an hour (and at start).
pub async fn run_retention(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    loop {
        let cutoff = now_us() - i64::from(engine.config.retention_days) * 86_400 * 1_000_000;
        match engine.store.expire(cutoff).await {
            Ok(n) if n > 0 => tracing::info!(rows = n, "expired rows past the retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed; will retry"),
        }
        if let Err(e) = expire_log(&engine, cutoff).await {
            tracing::warn!(error = %e, "log retention pass failed; will retry");
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

/// Drops log records older than `cutoff_us` that the processor has consumed.
/// Reads the time of a log record.
type TimeOf = fn(&[u8]) -> i64;

async fn expire_log(engine: &Engine, cutoff_us: i64) -> Result<(), SeamError> {
    let event_time = |bytes: &[u8]| Event::from_json(bytes).map_or(i64::MAX, |e| e.at_us());
    let delivery_time = |bytes: &[u8]| {
        serde_json::from_slice::<DeliveryRecord>(bytes).map_or(i64::MAX, |r| r.at_us())
    };
    let logs: [(&dyn EventLog, &str, TimeOf); 2] = [
        (engine.events.as_ref(), CONSUMER, event_time),
        (
            engine.deliveries.as_ref(),
            crate::dispatcher::CONSUMER,
            delivery_time,
        ),
    ];
    for (log, consumer, time_of) in logs {
        let consumed = engine.store.position(consumer).await?.min(log.end());
        let first_kept = first_at_or_after(log, consumed, cutoff_us, time_of).await?;
        if first_kept > log.start() {
            let start = log.truncate_before(first_kept).await?;
            tracing::info!(consumer, start, "expired log records past the retention");
        }
    }
    Ok(())
}

/// The first offset before `end` whose record is at or after `cutoff_us` (or `end`), by binary
/// search: records are appended in time order. Records without a time count as kept.
pub async fn first_at_or_after(
    log: &dyn EventLog,
    end: u64,
    cutoff_us: i64,
    time_of: TimeOf,
) -> Result<u64, SeamError> {
    let (mut lo, mut hi) = (log.start(), end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = match log.read(mid, 1, usize::MAX).await?.first() {
            Some((_, bytes)) => time_of(bytes),
            None => i64::MAX,
        };
        if at < cutoff_us {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postback_core::event::PostbackEvent;
    use postback_core::seams::MemoryEventLog;

    fn event(at_us: i64) -> Vec<u8> {
        Event::Postback(PostbackEvent {
            at_us,
            ip: String::new(),
            method: "GET".into(),
            query: String::new(),
            body: None,
            body_hex: None,
            content_type: String::new(),
            pixel: None,
        })
        .to_json()
    }

    #[tokio::test]
    async fn finds_the_first_event_inside_the_retention() {
        let log = MemoryEventLog::new();
        log.append((0..100).map(|i| event(i * 10)).collect())
            .await
            .expect("append");
        let time = |b: &[u8]| Event::from_json(b).map_or(i64::MAX, |e| e.at_us());
        let find = |end, cutoff| first_at_or_after(&log, end, cutoff, time);
        assert_eq!(find(100, 0).await.expect("search"), 0);
        assert_eq!(find(100, 455).await.expect("search"), 46);
        assert_eq!(find(100, 460).await.expect("search"), 46);
        assert_eq!(find(100, 5_000).await.expect("search"), 100);
        // Never past what was consumed.
        assert_eq!(find(30, 5_000).await.expect("search"), 30);
        log.truncate_before(20).await.expect("truncate");
        assert_eq!(find(100, 0).await.expect("search"), 20);
    }
}
