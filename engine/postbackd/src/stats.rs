//! The stats API (CONTRACT section 4): the server-postback log, conversions and the
//! affiliate-postback log, with Affise's filters, paging and JSON types.

use crate::engine::Engine;
use crate::http::{json, ApiError, Body, Req};
use crate::paging::Paging;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use hyper::{Method, Response, StatusCode};
use postback_core::catalog::Catalog;
use postback_core::delivery::AttemptRow;
use postback_core::ids::ObjectId;
use postback_core::params::Params;
use postback_core::processor::ServerPostbackRow;
use postback_core::rules::{
    explain_click, explain_dedupe, status_name, Click, Context, Conversion, Outcome, ParsedPostback,
};
use postback_core::seams::{
    AttemptQuery, ConversionQuery, GroupKey, ServerPostbackQuery, SummaryKey, SummaryQuery,
    SummaryRow,
};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub async fn route(engine: &Arc<Engine>, req: Req) -> Result<Response<Body>, ApiError> {
    if req.method != Method::GET && req.method != Method::POST {
        return Err(ApiError::Method);
    }
    let p = req.params()?;
    match req.path.trim_end_matches('/') {
        "/3.0/stats/serverpostbacks" => server_postbacks(engine, &p).await,
        "/3.0/stats/serverpostbacks/summary" => summary(engine, &p).await,
        "/3.0/stats/conversions" => conversions(engine, &p).await,
        "/3.0/stats/affiliatepostbacks" => affiliate_postbacks(engine, &p).await,
        path => match path
            .strip_prefix("/3.0/stats/serverpostbacks/")
            .and_then(|rest| rest.strip_suffix("/explanation"))
        {
            Some(id) => explanation(engine, id, &p).await,
            None => Err(ApiError::NoRoute),
        },
    }
}

/// `GET /3.0/stats/serverpostbacks/{id}/explanation`: the rules as the engine applied them to
/// one logged postback, rule by rule, recomputed from its parameters, its click and the
/// catalog as of its time, with the conversion the dedupe found; secure codes are never shown.
async fn explanation(
    engine: &Arc<Engine>,
    id: &str,
    p: &Params,
) -> Result<Response<Body>, ApiError> {
    let tz = timezone(p)?;
    let id = id.to_ascii_lowercase();
    let oid: ObjectId = id.parse().map_err(|_| ApiError::NotFound)?;
    // A postback's id begins with its second.
    let from_us = i64::from(oid.timestamp()) * 1_000_000;
    let page = engine
        .analytics
        .server_postbacks(ServerPostbackQuery {
            from_us,
            to_us: from_us + 1_000_000,
            id: Some(id),
            limit: 1,
            ..ServerPostbackQuery::default()
        })
        .await?;
    let row = page.rows.into_iter().next().ok_or(ApiError::NotFound)?;
    let pb = ParsedPostback {
        at_us: row.at_us,
        server: row.server.clone(),
        method: row.method.clone(),
        get: row.get.clone(),
        post: row.post.clone(),
        pixel: row.pixel,
        // A pixel's click id may have come from its cookie, which the log keeps as `clickid`.
        cookie_click_id: (row.pixel && !row.clickid.is_empty()).then(|| row.clickid.clone()),
    };
    let click = match pb.clickid().filter(|c| c.parse::<ObjectId>().is_ok()) {
        Some(c) => engine
            .analytics
            .clicks(vec![c.to_lowercase()])
            .await?
            .into_iter()
            .next(),
        None => None,
    };
    let (mut checks, judged) = {
        let catalog = engine.catalog_read();
        let ctx = Context {
            catalog: &catalog,
            platform_secure: &engine.config.platform_secure,
        };
        explain_click(&pb, click.as_ref(), &ctx)
    };
    let recomputed = match judged {
        Err(verdict) => match verdict.outcome {
            Outcome::Rejected(r) => r.message().to_string(),
            _ => String::new(),
        },
        Ok(candidate) => {
            let key = candidate.conversion.key;
            let current = engine
                .analytics
                .conversion_states(vec![key.clone()])
                .await?
                .into_iter()
                .next();
            let dedupe = explain_dedupe(
                &key,
                &row.error,
                row.created,
                &row.conversion_id,
                current.as_ref(),
            );
            let error = if dedupe.passed {
                ""
            } else {
                row.error.as_str()
            };
            checks.push(dedupe);
            error.to_string()
        }
    };
    let matches_log = recomputed == row.error;
    let note =
        (!matches_log).then(|| {
            format!(
            "Applied now, the rules give {:?}, but the log says {:?}: the platform secure code \
             changed since, or the click reached the engine after the postback.",
            if recomputed.is_empty() { "registered" } else { &recomputed },
            if row.error.is_empty() { "registered" } else { &row.error }
        )
        });
    let catalog = engine.catalog_read();
    let postback = server_postback_json(&row, click.as_ref(), &catalog, &tz);
    Ok(json(
        StatusCode::OK,
        &json!({
            "status": 1,
            "postback": postback,
            "checks": checks,
            "matches_log": matches_log,
            "note": note,
        }),
    ))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

pub(crate) fn timezone(p: &Params) -> Result<Tz, ApiError> {
    match p.get_nonempty("timezone") {
        Some(name) => name
            .trim()
            .parse::<Tz>()
            .map_err(|_| bad("timezone is not a known time zone")),
        None => Ok(Tz::UTC),
    }
}

/// `YYYY-MM-DD` or `DD-MM-YYYY`, from 1970 to 9999 (no row is older than the Unix epoch, and
/// later years only overflow date arithmetic).
fn parse_date(name: &str, v: &str) -> Result<NaiveDate, ApiError> {
    let v = v.trim();
    let date = NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(v, "%d-%m-%Y"))
        .map_err(|_| bad(format!("{name} must be a date, YYYY-MM-DD or DD-MM-YYYY")))?;
    if !(1970..=9999).contains(&date.year()) {
        return Err(bad(format!(
            "{name} must be between 1970-01-01 and 9999-12-31"
        )));
    }
    Ok(date)
}

fn day_start_us(tz: &Tz, date: NaiveDate) -> i64 {
    let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    tz.from_local_datetime(&midnight).earliest().map_or_else(
        || midnight.and_utc().timestamp_micros(),
        |d| d.timestamp_micros(),
    )
}

/// The inclusive date range as Unix microseconds `[from, to)`. Without dates: `default_days`
/// ending today, or an error when `None`.
pub(crate) fn date_range(
    p: &Params,
    tz: &Tz,
    default_days: Option<i64>,
) -> Result<(i64, i64), ApiError> {
    let today = Utc::now().with_timezone(tz).date_naive();
    let (from, to) = match (
        p.get_nonempty("date_from"),
        p.get_nonempty("date_to"),
        default_days,
    ) {
        (Some(f), Some(t), _) => (parse_date("date_from", f)?, parse_date("date_to", t)?),
        (f, t, Some(days)) => {
            let to = t
                .map(|t| parse_date("date_to", t))
                .transpose()?
                .unwrap_or(today);
            let from = match f {
                Some(f) => parse_date("date_from", f)?,
                None => to - chrono::Duration::days(days - 1),
            };
            (from, to)
        }
        (None, _, None) => return Err(bad("date_from is required")),
        (_, None, None) => return Err(bad("date_to is required")),
    };
    if to < from {
        return Err(bad("date_to is before date_from"));
    }
    Ok((
        day_start_us(tz, from),
        day_start_us(tz, to + chrono::Duration::days(1)),
    ))
}

/// The most values one list filter takes (`offer=1&offer=2...`): far more than a person
/// selects, and few enough for every store to bind.
pub const MAX_FILTER_VALUES: usize = 500;

/// The longest `search` text, in characters.
pub const MAX_SEARCH_CHARS: usize = 256;

/// Every value of a list filter, at most [`MAX_FILTER_VALUES`].
pub(crate) fn all_values<'p>(p: &'p Params, name: &str) -> Result<Vec<&'p str>, ApiError> {
    let values = p.get_all(name);
    if values.len() > MAX_FILTER_VALUES {
        return Err(bad(format!("{name}: at most {MAX_FILTER_VALUES} values")));
    }
    Ok(values)
}

fn ints(p: &Params, name: &str) -> Result<Vec<u64>, ApiError> {
    all_values(p, name)?
        .into_iter()
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| bad(format!("{name} must be integers")))
        })
        .collect()
}

fn strings(p: &Params, name: &str) -> Result<Vec<String>, ApiError> {
    Ok(all_values(p, name)?
        .into_iter()
        .map(str::to_string)
        .collect())
}

/// The search text: up to [`MAX_SEARCH_CHARS`], without control characters (parameters are
/// searched as `key=value` lines, so a line break or a NUL can never match).
fn search(p: &Params) -> Result<Option<String>, ApiError> {
    let Some(s) = p.get_nonempty("search") else {
        return Ok(None);
    };
    if s.chars().count() > MAX_SEARCH_CHARS {
        return Err(bad(format!(
            "search: at most {MAX_SEARCH_CHARS} characters"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("search must not contain control characters"));
    }
    Ok(Some(s.to_string()))
}

fn text(p: &Params, name: &str) -> Option<String> {
    p.get_nonempty(name).map(str::to_string)
}

pub(crate) fn format_time(tz: &Tz, at_us: i64) -> String {
    DateTime::from_timestamp_micros(at_us)
        .map(|d| d.with_timezone(tz).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// The slice's filters and date range (paging aside), as `serverpostbacks` and its summary
/// take them.
pub(crate) fn postback_filters(p: &Params, tz: &Tz) -> Result<ServerPostbackQuery, ApiError> {
    let (from_us, to_us) = date_range(p, tz, None)?;
    let response_status = match p.get_nonempty("response_status") {
        Some(v) => Some(match v.trim() {
            "1" => 1,
            "2" => 2,
            _ => return Err(bad("response_status must be 1 or 2")),
        }),
        None => None,
    };
    let status = match p.get_nonempty("status") {
        Some(v) => Some(
            v.trim()
                .parse::<i64>()
                .map_err(|_| bad("status must be an integer"))?,
        ),
        None => None,
    };
    Ok(ServerPostbackQuery {
        from_us,
        to_us,
        offers: ints(p, "offer")?,
        partners: ints(p, "partner")?,
        suppliers: strings(p, "supplier")?,
        click_id: text(p, "click_id").or_else(|| text(p, "clickid")),
        action_id: text(p, "action_id"),
        goal: text(p, "goal"),
        status,
        response_status,
        search: search(p)?,
        ..ServerPostbackQuery::default()
    })
}

/// The slice's filters for the live stream: those of `serverpostbacks` but the date range,
/// which the stream sets itself (from now on).
pub(crate) fn live_filters(p: &Params, tz: &Tz) -> Result<ServerPostbackQuery, ApiError> {
    let mut p = p.clone();
    let today = Utc::now().with_timezone(tz).date_naive().to_string();
    p.0.retain(|(k, _)| k != "date_from" && k != "date_to");
    p.0.push(("date_from".into(), today.clone()));
    p.0.push(("date_to".into(), today));
    postback_filters(&p, tz)
}

async fn server_postbacks(engine: &Arc<Engine>, p: &Params) -> Result<Response<Body>, ApiError> {
    let tz = timezone(p)?;
    let paging = Paging::parse(p)?;
    let query = ServerPostbackQuery {
        offset: paging.offset(),
        limit: paging.limit,
        snapshot: paging.snapshot,
        ..postback_filters(p, &tz)?
    };
    let result = engine.analytics.server_postbacks(query).await?;
    let click_ids: Vec<String> = result
        .rows
        .iter()
        .filter(|r| r.delta.is_some())
        .map(|r| r.clickid.to_lowercase())
        .collect();
    let clicks: HashMap<String, Click> = if click_ids.is_empty() {
        HashMap::new()
    } else {
        engine
            .analytics
            .clicks(click_ids)
            .await?
            .into_iter()
            .map(|c| (c.click_id.clone(), c))
            .collect()
    };
    let catalog = engine.catalog_read();
    let rows: Vec<Value> = result
        .rows
        .iter()
        .map(|r| server_postback_json(r, clicks.get(&r.clickid.to_lowercase()), &catalog, &tz))
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({"status": 1, "postbacks": rows, "pagination": paging.reply(result.total, result.snapshot)}),
    ))
}

/// `GET /3.0/stats/serverpostbacks/summary`: the slice's filters, counted by `group_by` (one
/// or more of hour, day, offer, advertiser, partner, goal, response_status, error; repeated or
/// comma-separated). Hours and days are the client's (`timezone`).
async fn summary(engine: &Arc<Engine>, p: &Params) -> Result<Response<Body>, ApiError> {
    let tz = timezone(p)?;
    let mut group_by = Vec::new();
    for value in all_values(p, "group_by")? {
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let key = SummaryKey::parse(name).ok_or_else(|| {
                bad(
                    "group_by must be hour, day, offer, advertiser, partner, goal, \
                     response_status or error",
                )
            })?;
            if !group_by.contains(&key) {
                group_by.push(key);
            }
        }
    }
    let (hour, day) = (
        group_by.contains(&SummaryKey::Hour),
        group_by.contains(&SummaryKey::Day),
    );
    if hour && day {
        return Err(bad("group_by: hour or day, not both"));
    }
    let query = SummaryQuery {
        filters: postback_filters(p, &tz)?,
        group_by,
    };
    // The store counts by UTC hour; the client's hours and days are made of those.
    let mut groups: BTreeMap<(String, GroupKey), SummaryRow> = BTreeMap::new();
    for mut row in engine.analytics.summary(query).await? {
        let label = match row.hour_us.take() {
            Some(at) if hour => local_hour(&tz, at),
            Some(at) => format_time(&tz, at)[..10].to_string(),
            None => String::new(),
        };
        match groups.entry((label, row.key())) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(&row),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(row);
            }
        }
    }
    let rows: Vec<Value> = groups
        .into_iter()
        .map(|((label, _), r)| {
            let mut m = Map::new();
            if hour {
                m.insert("hour".into(), json!(label));
            } else if day {
                m.insert("day".into(), json!(label));
            }
            let keys: [(&str, Option<Value>); 6] = [
                ("offer", r.offer_id.map(|v| json!(v))),
                ("advertiser", r.advertiser_id.map(|v| json!(v))),
                ("partner", r.pid.map(|v| json!(v))),
                ("goal", r.goal.map(|v| json!(v))),
                ("response_status", r.response_status.map(|v| json!(v))),
                ("error", r.error.map(|v| json!(v))),
            ];
            for (name, value) in keys {
                if let Some(v) = value {
                    m.insert(name.into(), v);
                }
            }
            m.insert("postbacks".into(), json!(r.postbacks));
            m.insert("accepted".into(), json!(r.accepted));
            m.insert("rejected".into(), json!(r.rejected));
            m.insert("conversions".into(), json!(r.conversions));
            m.insert("payouts".into(), json!(r.payouts));
            m.insert("revenue".into(), json!(r.revenue));
            Value::Object(m)
        })
        .collect();
    Ok(json(StatusCode::OK, &json!({"status": 1, "summary": rows})))
}

/// The client's hour (`YYYY-MM-DD HH:00:00`) that a UTC hour starts in.
fn local_hour(tz: &Tz, at_us: i64) -> String {
    let mut t = format_time(tz, at_us);
    t.replace_range(14.., "00:00");
    t
}

/// Parameters as an object, or `[]` if none (as PHP shows an empty one). Of a repeated key
/// the first value is shown: it is the one the rules processed (`Params::get`). Every value is
/// kept in the log and found by `search`.
fn params_value(p: &Params) -> Value {
    if p.is_empty() {
        return json!([]);
    }
    let mut m = Map::new();
    for (k, v) in p.iter() {
        m.entry(k.to_string())
            .or_insert_with(|| Value::String(v.to_string()));
    }
    Value::Object(m)
}

fn date_value(at_us: i64) -> Value {
    json!({"sec": at_us.div_euclid(1_000_000), "usec": at_us.rem_euclid(1_000_000)})
}

pub fn server_postback_json(
    r: &ServerPostbackRow,
    click: Option<&Click>,
    catalog: &Catalog,
    tz: &Tz,
) -> Value {
    let get = params_value(&r.get);
    let post = params_value(&r.post);
    json!({
        "_id": {"$id": r.id},
        "_get": get,
        "_post": post,
        "get": get.to_string(),
        "post": post.to_string(),
        "date": date_value(r.at_us),
        "server": r.server,
        "response": r.response(),
        "track": click.map(|c| track_json(c, catalog, tz)),
        "clickid": r.clickid,
        "action_id": r.action_id,
        "goal": r.goal,
        "status": r.status,
        "offer_id": r.offer_id,
        "pid": r.pid,
        "advertiser_id": r.advertiser_id,
        "conversion_id": r.conversion_id,
        "delta": r.delta,
        "response_status": r.response_status,
        "error": r.error,
        "ip": r.ip,
        "method": r.method,
    })
}

fn offer_ref(catalog: &Catalog, id: u64) -> Value {
    let o = catalog.offer(id);
    json!({
        "id": id,
        "offer_id": o.map_or("", |o| o.offer_id.as_str()),
        "title": o.map_or("", |o| o.title.as_str()),
    })
}

fn track_json(c: &Click, catalog: &Catalog, tz: &Tz) -> Value {
    let partner = catalog.partner(c.pid);
    json!({
        "id": c.click_id,
        "click_id": c.click_id,
        "ip": c.ip,
        "ua": c.ua,
        "referrer": c.referrer,
        "country": c.country,
        "offer_id": c.offer_id.to_string(),
        "offer": offer_ref(catalog, c.offer_id),
        "partner": {
            "id": c.pid.to_string(),
            "login": partner.map_or("", |p| p.login.as_str()),
            "email": partner.map_or("", |p| p.email.as_str()),
        },
        "sub1": c.sub(1), "sub2": c.sub(2), "sub3": c.sub(3), "sub4": c.sub(4), "sub5": c.sub(5),
        "created_at": format_time(tz, c.at_us),
    })
}

async fn conversions(engine: &Arc<Engine>, p: &Params) -> Result<Response<Body>, ApiError> {
    let tz = timezone(p)?;
    let (from_us, to_us) = date_range(p, &tz, Some(7))?;
    let paging = Paging::parse(p)?;
    let statuses = all_values(p, "status")?
        .into_iter()
        .map(|v| {
            let v = v.trim();
            v.parse::<u8>()
                .ok()
                .or_else(|| (1..=5).find(|n| status_name(*n) == Some(v)))
                .filter(|n| status_name(*n).is_some())
                .ok_or_else(|| bad("status must be 1, 2, 3 or 5"))
        })
        .collect::<Result<Vec<u8>, ApiError>>()?;
    let query = ConversionQuery {
        from_us,
        to_us,
        statuses,
        offers: ints(p, "offer")?,
        advertisers: strings(p, "advertiser")?,
        partners: ints(p, "partner")?,
        goal: text(p, "goal"),
        action_id: text(p, "action_id"),
        clickid: text(p, "clickid").or_else(|| text(p, "click_id")),
        subs: [1, 2, 3, 4, 5].map(|i| text(p, &format!("subid{i}"))),
        conversion_id: text(p, "conversion_id"),
        offset: paging.offset(),
        limit: paging.limit,
        snapshot: paging.snapshot,
    };
    let result = engine.analytics.conversions(query).await?;
    let catalog = engine.catalog_read();
    let rows: Vec<Value> = result
        .rows
        .iter()
        .map(|c| conversion_json(c, &catalog, &tz))
        .collect();
    let mut pages = paging.reply(result.total, result.snapshot);
    pages.insert(
        "next_page".into(),
        if paging.has_more(result.total) {
            json!(paging.page + 1)
        } else {
            Value::Null
        },
    );
    Ok(json(
        StatusCode::OK,
        &json!({"status": 1, "conversions": rows, "pagination": pages}),
    ))
}

pub fn conversion_json(c: &Conversion, catalog: &Catalog, tz: &Tz) -> Value {
    let partner = catalog.partner(c.pid);
    let advertiser = catalog.advertiser(&c.advertiser_id);
    let mut v = json!({
        "id": c.id,
        "conversion_id": c.id,
        "action_id": c.action_id,
        "clickid": c.clickid,
        "status": status_name(c.status).unwrap_or(""),
        "goal": c.goal,
        "goal_value": c.goal,
        "currency": c.currency,
        "ip": c.ip,
        "ua": c.ua,
        "comment": c.comment,
        "sum": c.sum,
        "payouts": c.payouts,
        "revenue": c.revenue,
        "earnings": c.revenue - c.payouts,
        "offer_id": c.offer_id,
        "partner_id": c.pid,
        "supplier_id": c.advertiser_id,
        "offer": offer_ref(catalog, c.offer_id),
        "partner": {
            "id": c.pid,
            "login": partner.map_or("", |p| p.login.as_str()),
            "email": partner.map_or("", |p| p.email.as_str()),
        },
        "advertiser": {
            "id": c.advertiser_id,
            "title": advertiser.map_or("", |a| a.title.as_str()),
        },
        "promo_code": c.promo_code,
        "user_id": c.user_id,
        "created_at": format_time(tz, c.created_us),
        "click_time": format_time(tz, c.click_us),
        "updatedAt": format_time(tz, c.updated_us),
        "updated_at": format_time(tz, c.updated_us),
    });
    if let Value::Object(m) = &mut v {
        for i in 1..=8 {
            m.insert(
                format!("sub{i}"),
                json!(c.subs.get(i - 1).map_or("", String::as_str)),
            );
        }
        for i in 1..=7 {
            m.insert(
                format!("custom_field_{i}"),
                json!(c.custom_fields.get(i - 1).map_or("", String::as_str)),
            );
        }
    }
    v
}

/// The affiliate-postback attempt log: one record per delivery attempt.
async fn affiliate_postbacks(engine: &Arc<Engine>, p: &Params) -> Result<Response<Body>, ApiError> {
    let tz = timezone(p)?;
    let (from_us, to_us) = date_range(p, &tz, None)?;
    let paging = Paging::parse(p)?;
    let status = match p.get_nonempty("status") {
        Some(v) => Some(
            v.trim()
                .parse::<u8>()
                .ok()
                .filter(|n| status_name(*n).is_some())
                .ok_or_else(|| bad("status must be 1, 2, 3 or 5"))?,
        ),
        None => None,
    };
    let http_code = match p.get_nonempty("http_code") {
        Some(v) => Some(
            v.trim()
                .parse::<u16>()
                .map_err(|_| bad("http_code must be an integer"))?,
        ),
        None => None,
    };
    let query = AttemptQuery {
        from_us,
        to_us,
        offers: ints(p, "offer")?,
        partners: ints(p, "partner")?,
        goal: text(p, "goal"),
        status,
        http_code,
        job_id: text(p, "job_id"),
        offset: paging.offset(),
        limit: paging.limit,
        snapshot: paging.snapshot,
    };
    let result = engine.analytics.attempts(query).await?;
    let rows: Vec<Value> = result.rows.iter().map(attempt_json).collect();
    Ok(json(
        StatusCode::OK,
        &json!({"status": 1, "postbacks": rows, "pagination": paging.reply(result.total, result.snapshot)}),
    ))
}

/// A 24-hex id for one attempt: the job's id with the attempt's time and number mixed in.
fn attempt_id(job_id: &str, attempt: u32, at_us: i64) -> String {
    let mut bytes = job_id
        .parse::<ObjectId>()
        .map(|id| id.bytes())
        .unwrap_or_default();
    let secs = u32::try_from(at_us.div_euclid(1_000_000)).unwrap_or(0);
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    bytes[4] ^= attempt as u8;
    ObjectId::from_bytes(bytes).to_hex()
}

pub fn attempt_json(r: &AttemptRow) -> Value {
    let (j, a) = (&r.job, &r.attempt);
    json!({
        "_id": {"$id": attempt_id(&j.job_id, a.attempt, a.at_us)},
        "_get": null,
        "_post": null,
        "date": date_value(a.at_us),
        "pid": j.pid,
        "lead_id": j.lead_id,
        "http_code": a.http_code,
        "postback_url": j.url,
        "offer_id": j.offer_id,
        "job_id": j.job_id,
        "goal": j.goal,
        "status": j.status,
        "payouts": j.payouts,
        "revenue": j.revenue,
        "currency": j.currency,
        "notice": j.notice,
        "error": a.error,
        "integration_type": j.integration_type,
        "attempt": a.attempt,
        "method": j.method,
        "state": a.state.as_str(),
        "next_attempt_at": a.next_at_us.map(date_value),
    })
}
