//! `GET /3.0/stats/serverpostbacks/live`: new server postbacks as they are logged, as
//! server-sent events (`event: postback`, the row as `serverpostbacks` gives it), with the
//! slice's filters (the date range aside: from now on). The console's live mode reads it with
//! `fetch`, so the key stays a header.
//!
//! The log is read, not tapped: every half second the newest rows of the last few minutes are
//! read and those not sent yet go out, oldest first. A row processed more than `WINDOW` after
//! it arrived is in the listing but not pushed; under heavy traffic at most `BATCH` rows a
//! round are pushed (narrow the filters to follow one integration).

use crate::engine::Engine;
use crate::http::{ApiError, Streamed};
use crate::pipeline::now_us;
use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use postback_core::params::Params;
use postback_core::seams::ServerPostbackQuery;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const WINDOW_US: i64 = 5 * 60 * 1_000_000;
const BATCH: u64 = 200;
const ROUND: Duration = Duration::from_millis(500);
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A stream ends after this long; the client connects again (`retry`).
const LIFETIME: Duration = Duration::from_secs(3600);

pub fn start(engine: &Arc<Engine>, p: &Params) -> Result<Response<Streamed>, ApiError> {
    let tz = crate::stats::timezone(p)?;
    let filters = crate::stats::live_filters(p, &tz)?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(follow(engine.clone(), filters, tz, tx));
    let mut r = Response::new(Streamed::new(rx));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

async fn follow(
    engine: Arc<Engine>,
    mut query: ServerPostbackQuery,
    tz: chrono_tz::Tz,
    tx: mpsc::Sender<Bytes>,
) {
    let started = Instant::now();
    let mut last_sent = Instant::now();
    // Rows already sent (or there before the stream began), by id, with their time.
    let mut seen: HashMap<String, i64> = HashMap::new();
    let mut first = true;
    while started.elapsed() < LIFETIME && engine.ready.load(Ordering::Acquire) {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                _ = tx.closed() => return,
            }
        }
        let now = now_us();
        query.from_us = now - WINDOW_US;
        query.to_us = now + WINDOW_US;
        query.offset = 0;
        query.limit = BATCH;
        query.snapshot = None;
        let mut out = Vec::new();
        match engine.analytics.server_postbacks(query.clone()).await {
            Ok(page) => {
                let mut fresh: Vec<_> = page
                    .rows
                    .into_iter()
                    .filter(|r| !seen.contains_key(&r.id))
                    .collect();
                fresh.sort_by(|a, b| (a.at_us, &a.id).cmp(&(b.at_us, &b.id)));
                let catalog = engine.catalog_read();
                for r in fresh {
                    seen.insert(r.id.clone(), r.at_us);
                    // What was there when the stream began is the listing's, not news.
                    if !first {
                        let row = crate::stats::server_postback_json(&r, None, &catalog, &tz);
                        out.push(format!("event: postback\ndata: {row}\n\n"));
                    }
                }
            }
            Err(e) => out.push(format!(
                "event: problem\ndata: {}\n\n",
                e.to_string().replace('\n', " ")
            )),
        }
        if first {
            // The rows there now are marked: from here on, every new one is pushed.
            out.insert(0, "retry: 2000\n: live\n\n".into());
        }
        first = false;
        seen.retain(|_, at| *at >= now - 2 * WINDOW_US);
        if out.is_empty() && last_sent.elapsed() >= KEEP_ALIVE {
            out.push(": keep-alive\n\n".into());
        }
        for event in out {
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
            last_sent = Instant::now();
        }
    }
}
