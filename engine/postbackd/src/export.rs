//! `GET /3.0/stats/serverpostbacks/csv`: the server-postback log within the listing's filters,
//! as CSV, streamed: any number of rows, in one snapshot (rows logged meanwhile are left out),
//! newest first, read a thousand at a time while the client takes them.
//!
//! Cells are attacker-controlled text: every cell is quoted, and one that a spreadsheet would
//! take for a formula (`=`, `+`, `-`, `@`, tab, carriage return first) gets a leading `'`.

use crate::engine::Engine;
use crate::http::ApiError;
use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use postback_core::params::Params;
use postback_core::processor::ServerPostbackRow;
use postback_core::seams::ServerPostbackQuery;
use std::sync::Arc;
use tokio::sync::mpsc;

const PAGE: u64 = 1000;

pub const HEADER: &str = "id,date,offer_id,advertiser_id,partner_id,clickid,status,goal,\
    action_id,ip,delta_seconds,response_status,error,conversion_id,method,get,post,server\r\n";

pub async fn start(
    engine: &Arc<Engine>,
    p: &Params,
) -> Result<Response<crate::http::Streamed>, ApiError> {
    let tz = crate::stats::timezone(p)?;
    let query = ServerPostbackQuery {
        limit: PAGE,
        ..crate::stats::postback_filters(p, &tz)?
    };
    // The first page is read before the answer, so that a bad filter or a store that is down
    // is an error status, not a cut file.
    let first = engine.analytics.server_postbacks(query.clone()).await?;
    let (tx, rx) = mpsc::channel(4);
    let name = format!(
        "attachment; filename=\"serverpostbacks-{}.csv\"",
        p.get("date_from")
            .unwrap_or("")
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "")
    );
    tokio::spawn(write(engine.clone(), query, first, tz, tx));
    let mut r = Response::new(crate::http::Streamed::new(rx));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// Writes the pages until the last, or until the client goes. Pages follow the time, not an
/// offset (a deep offset costs the store a scan of everything before it): each next page ends
/// where the last one ended, and the rows of its last microsecond are taken again with it.
async fn write(
    engine: Arc<Engine>,
    mut query: ServerPostbackQuery,
    first: postback_core::seams::Page<ServerPostbackRow>,
    tz: chrono_tz::Tz,
    tx: mpsc::Sender<Bytes>,
) {
    query.snapshot = Some(first.snapshot);
    let mut page = first;
    if tx
        .send(Bytes::from_static(HEADER.as_bytes()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let full = page.rows.len() as u64 >= PAGE;
        let last_at = page.rows.last().map(|r| r.at_us);
        // A full page's last microsecond may go on into the next page: hold it back, unless the
        // whole page is that microsecond (then step on by offset within it).
        let held = if full {
            page.rows
                .iter()
                .rev()
                .take_while(|r| Some(r.at_us) == last_at)
                .count()
        } else {
            0
        };
        let within_one = full && held == page.rows.len();
        let emit = if within_one {
            page.rows.len()
        } else {
            page.rows.len() - held
        };
        let mut out = String::new();
        for r in &page.rows[..emit] {
            line(&mut out, r, &tz);
        }
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
        let Some(last_at) = last_at.filter(|_| full) else {
            return;
        };
        if within_one {
            query.offset += PAGE;
        } else {
            query.offset = 0;
            query.to_us = last_at + 1;
        }
        page = match engine.analytics.server_postbacks(query.clone()).await {
            Ok(p) => p,
            Err(e) => {
                // The status is sent: say so in the file, where a reader will see it.
                tracing::warn!(error = %e, "CSV export cut short");
                let _ = tx
                    .send(Bytes::from(format!("# export cut short: {e}\r\n")))
                    .await;
                return;
            }
        };
    }
}

fn line(out: &mut String, r: &ServerPostbackRow, tz: &chrono_tz::Tz) {
    let pairs = |p: &Params| {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(p.iter())
            .finish()
    };
    let cells = [
        r.id.clone(),
        crate::stats::format_time(tz, r.at_us),
        r.offer_id.to_string(),
        r.advertiser_id.clone(),
        r.pid.to_string(),
        r.clickid.clone(),
        r.status.to_string(),
        r.goal.clone(),
        r.action_id.clone(),
        r.ip.clone(),
        r.delta.map(|d| d.to_string()).unwrap_or_default(),
        r.response_status.to_string(),
        r.error.clone(),
        r.conversion_id.clone(),
        r.method.clone(),
        pairs(&r.get),
        pairs(&r.post),
        r.server.clone(),
    ];
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        cell(out, c);
    }
    out.push_str("\r\n");
}

/// One quoted cell (RFC 4180), defused for spreadsheets (a number stays a number).
fn cell(out: &mut String, value: &str) {
    out.push('"');
    if value.starts_with(['=', '+', '-', '@', '\t', '\r']) && value.parse::<f64>().is_err() {
        out.push('\'');
    }
    out.push_str(&value.replace('"', "\"\""));
    out.push('"');
}

#[cfg(test)]
mod tests {
    #[test]
    fn cells_are_quoted_and_defused() {
        let mut out = String::new();
        for v in [
            "plain",
            "a \"quoted\", comma",
            "=HYPERLINK(\"x\")",
            "-1+1",
            "\nline",
            "-5",
        ] {
            super::cell(&mut out, v);
            out.push('|');
        }
        assert_eq!(
            out,
            "\"plain\"|\"a \"\"quoted\"\", comma\"|\"'=HYPERLINK(\"\"x\"\")\"|\"'-1+1\"|\"\nline\"|\"-5\"|"
        );
    }
}
