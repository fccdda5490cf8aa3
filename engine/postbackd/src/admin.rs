//! The admin API (CONTRACT section 1): advertisers, offers, partners and their postback
//! settings. Every change is appended to the catalog log before it is answered.

use crate::engine::Engine;
use crate::http::{json, ApiError, Body, Req};
use crate::paging::Paging;
use crate::pipeline::now_us;
use hyper::{Method, Response, StatusCode};
use postback_core::catalog::*;
use postback_core::delivery::JobStatus;
use postback_core::params::Params;
use postback_core::rules::status_name;
use postback_core::seams::AttemptQuery;
use serde_json::{json, Value};
use std::sync::Arc;

pub async fn route(engine: &Arc<Engine>, req: Req) -> Result<Response<Body>, ApiError> {
    let p = req.params()?;
    let path = req.path.trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(2).collect(); // after "/3.0"
    let m = &req.method;
    match (m, segments.as_slice()) {
        (&Method::POST, ["admin", "advertiser"]) => {
            publish(engine, || advertiser_change(engine, None, &p)).await
        }
        (&Method::POST, ["admin", "advertiser", id]) => {
            publish(engine, || advertiser_change(engine, Some(id), &p)).await
        }
        (&Method::GET, ["admin", "advertiser", id]) => {
            let c = engine.catalog_read();
            let a = c.advertiser(id).ok_or(ApiError::NotFound)?;
            ok("advertiser", advertiser_json(a))
        }
        (&Method::GET, ["admin", "advertisers"]) => {
            let c = engine.catalog_read();
            list(
                &p,
                &c,
                "advertisers",
                |t| c.advertisers_at(t),
                advertiser_json,
            )
        }
        (&Method::POST, ["admin", "offer"]) => {
            publish(engine, || offer_change(engine, None, &p)).await
        }
        (&Method::POST, ["admin", "offer", id]) => {
            let id = parse_id(id)?;
            publish(engine, || offer_change(engine, Some(id), &p)).await
        }
        (&Method::GET, ["offer", id]) => {
            let c = engine.catalog_read();
            let o = c.offer(parse_id(id)?).ok_or(ApiError::NotFound)?;
            ok("offer", offer_json(o))
        }
        (&Method::GET, ["offers"]) => {
            let c = engine.catalog_read();
            list(&p, &c, "offers", |t| c.offers_at(t), offer_json)
        }
        (&Method::POST, ["admin", "partner"]) => {
            publish(engine, || partner_change(engine, None, &p)).await
        }
        (&Method::POST, ["admin", "partner", id]) => {
            let id = parse_id(id)?;
            publish(engine, || partner_change(engine, Some(id), &p)).await
        }
        (&Method::GET, ["admin", "partner", id]) => {
            let c = engine.catalog_read();
            let a = c.partner(parse_id(id)?).ok_or(ApiError::NotFound)?;
            ok("partner", partner_json(a))
        }
        (&Method::GET, ["admin", "partners"]) => {
            let c = engine.catalog_read();
            list(&p, &c, "partners", |t| c.partners_at(t), partner_json)
        }
        (&Method::POST, ["partner", "postback"]) => {
            publish(engine, || postback_change(engine, None, &p)).await
        }
        (&Method::POST, ["partner", "postback", id]) => {
            let id = parse_id(id)?;
            publish(engine, || postback_change(engine, Some(id), &p)).await
        }
        (&Method::DELETE | &Method::POST, ["partner", "postback", id, "remove"]) => {
            let id = parse_id(id)?;
            publish(engine, || postback_removal(engine, id)).await
        }
        (&Method::POST, ["admin", "affiliatepostbacks", "resend"]) => resend(engine, &p).await,
        (&Method::GET, ["partner", "postback", id, "test"]) => {
            test_postback(engine, parse_id(id)?, &p).await
        }
        (&Method::GET, ["admin", "postbacks"]) => {
            let partner = match p.get_nonempty("partner_id") {
                Some(v) => Some(
                    v.parse::<u64>()
                        .map_err(|_| bad("partner_id must be an integer"))?,
                ),
                None => None,
            };
            let c = engine.catalog_read();
            list(
                &p,
                &c,
                "postbacks",
                |t| {
                    c.postbacks_at(t)
                        .filter(move |s| partner.is_none_or(|id| s.partner_id == id))
                },
                postback_json,
            )
        }
        _ => Err(ApiError::NoRoute),
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// The entity an update names (404 if there is none), or `None` for a creation.
fn existing<T>(
    id: Option<u64>,
    find: impl FnOnce(u64) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    id.map(|id| find(id).ok_or(ApiError::NotFound)).transpose()
}

/// A catalog change built by a handler, and the entity as the API shows it.
struct Change {
    record: CatalogRecord,
    key: &'static str,
    value: Value,
}

impl Change {
    fn new(create: bool, event: CatalogEvent, key: &'static str, value: Value) -> Self {
        Self {
            record: CatalogRecord { create, event },
            key,
            value,
        }
    }
}

/// Appends a catalog change and answers with the entity. `build` runs on a catalog that has
/// every change of the log, and again if another process took the new entity's id first.
async fn publish(
    engine: &Engine,
    build: impl Fn() -> Result<Change, ApiError>,
) -> Result<Response<Body>, ApiError> {
    let (key, value) = engine
        .change_catalog(|| build().map(|c| (c.record, (c.key, c.value))))
        .await?;
    ok(key, value)
}

fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| ApiError::NotFound)
}

fn ok(key: &str, value: Value) -> Result<Response<Body>, ApiError> {
    Ok(json(StatusCode::OK, &json!({"status": 1, key: value})))
}

/// A catalog listing, in id order, as of its snapshot: the catalog keeps every version of its
/// entities by time, so a snapshot is a time (microseconds) and later pages show the catalog as
/// the first page saw it.
fn list<'c, T: 'c, I: Iterator<Item = &'c T>>(
    p: &Params,
    catalog: &Catalog,
    key: &str,
    rows_at: impl FnOnce(i64) -> I,
    to_json: impl Fn(&T) -> Value,
) -> Result<Response<Body>, ApiError> {
    let paging = Paging::parse(p)?;
    let snapshot = paging.snapshot.unwrap_or_else(|| {
        // Every change so far, even if the clock stepped back since the last one.
        u64::try_from(now_us().max(catalog.last_change_us())).unwrap_or(0)
    });
    let rows: Vec<&T> = rows_at(i64::try_from(snapshot).unwrap_or(i64::MAX)).collect();
    let total = rows.len() as u64;
    let rows: Vec<Value> = rows
        .into_iter()
        .skip(usize::try_from(paging.offset()).unwrap_or(usize::MAX))
        .take(paging.limit as usize)
        .map(to_json)
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({"status": 1, key: rows, "pagination": paging.reply(total, snapshot)}),
    ))
}

fn new_object_id(engine: &Engine) -> String {
    engine.ids.next((now_us() / 1_000_000) as u32).to_hex()
}

fn allowed_ip(p: &Params, current: &[String]) -> Result<Vec<String>, ApiError> {
    match p.get("allowed_ip") {
        Some(v) => {
            let list = parse_allowed_ip(v)
                .map_err(|e| bad(format!("allowed_ip: not an IP or CIDR: {e}")))?;
            if list.len() > MAX_ALLOWED_IP {
                return Err(bad(format!("allowed_ip: at most {MAX_ALLOWED_IP} entries")));
            }
            Ok(list)
        }
        None => Ok(current.to_vec()),
    }
}

fn advertiser_change(engine: &Engine, id: Option<&str>, p: &Params) -> Result<Change, ApiError> {
    let current = match id {
        Some(id) => Some(
            engine
                .catalog_read()
                .advertiser(id)
                .cloned()
                .ok_or(ApiError::NotFound)?,
        ),
        None => None,
    };
    let title = match (p.get("title").map(str::trim), &current) {
        (Some(t), _) if !t.is_empty() => t.to_string(),
        (None, Some(c)) => c.title.clone(),
        _ => return Err(bad("title is required")),
    };
    let advertiser = Advertiser {
        id: current
            .as_ref()
            .map_or_else(|| new_object_id(engine), |c| c.id.clone()),
        title,
        secure: p.get("secure").map(str::to_string).unwrap_or_else(|| {
            current
                .as_ref()
                .map(|c| c.secure.clone())
                .unwrap_or_default()
        }),
        allowed_ip: allowed_ip(p, current.as_ref().map_or(&[], |c| &c.allowed_ip))?,
    };
    let value = advertiser_json(&advertiser);
    Ok(Change::new(
        current.is_none(),
        CatalogEvent::Advertiser {
            at_us: now_us(),
            advertiser,
        },
        "advertiser",
        value,
    ))
}

fn advertiser_json(a: &Advertiser) -> Value {
    json!({"id": a.id, "title": a.title, "secure": a.secure, "allowed_ip": a.allowed_ip.join(",")})
}

fn parse_status(field: &str, v: &str) -> Result<u8, ApiError> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u8>() {
        if status_name(n).is_some() {
            return Ok(n);
        }
    }
    (1..=5)
        .find(|n| status_name(*n) == Some(v) || (v == "approved" && *n == 1))
        .ok_or_else(|| {
            bad(format!(
                "{field} must be 1, 2, 3 or 5 (confirmed, pending, declined, hold)"
            ))
        })
}

fn parse_number(field: &str, v: Option<&str>) -> Result<f64, ApiError> {
    match v.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(0.0),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && (0.0..=postback_core::rules::MAX_SUM).contains(n))
            .ok_or_else(|| bad(format!("{field} must be a number from 0 to 1e12"))),
    }
}

/// The most payments (goals) an offer has: goals are looked up on every postback.
const MAX_PAYMENTS: usize = 200;
/// The most entries of an IP allow-list: it is checked on every postback.
const MAX_ALLOWED_IP: usize = 1000;
/// The most deliveries one re-send names.
const MAX_RESEND: usize = 1000;

fn parse_payments(p: &Params) -> Result<Vec<Payment>, ApiError> {
    let groups = p.groups("payments");
    if groups.len() > MAX_PAYMENTS {
        return Err(bad(format!("payments: at most {MAX_PAYMENTS} goals")));
    }
    let mut out: Vec<Payment> = Vec::new();
    let mut goals = std::collections::HashSet::new();
    for (i, g) in groups.iter().enumerate() {
        let field = |name: &str| format!("payments[{i}][{name}]");
        let goal = g.get_nonempty("goal").unwrap_or("1").trim().to_string();
        if !goals.insert(goal.to_lowercase()) {
            return Err(bad(format!(
                "{}: goal {goal} is given twice",
                field("goal")
            )));
        }
        let kind = match g.get_nonempty("type").unwrap_or("fixed") {
            "fixed" => PaymentType::Fixed,
            "percent" => PaymentType::Percent,
            _ => return Err(bad(format!("{} must be fixed or percent", field("type")))),
        };
        out.push(Payment {
            goal,
            total: parse_number(&field("total"), g.get("total"))?,
            revenue: parse_number(&field("revenue"), g.get("revenue"))?,
            currency: g
                .get_nonempty("currency")
                .unwrap_or("USD")
                .trim()
                .to_uppercase(),
            kind,
            status: g
                .get_nonempty("status")
                .map(|s| parse_status(&field("status"), s))
                .transpose()?,
        });
    }
    Ok(out)
}

fn offer_change(engine: &Engine, id: Option<u64>, p: &Params) -> Result<Change, ApiError> {
    let (current, next_id) = {
        let c = engine.catalog_read();
        (existing(id, |id| c.offer(id).cloned())?, c.next_offer_id())
    };
    let text = |name: &str, current: Option<&String>| -> Option<String> {
        p.get(name)
            .map(|v| v.trim().to_string())
            .or_else(|| current.cloned())
    };
    let title = text("title", current.as_ref().map(|c| &c.title))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("title is required"))?;
    let url = text("url", current.as_ref().map(|c| &c.url))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("url is required"))?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("url must start with http:// or https://"));
    }
    let advertiser =
        text("advertiser", current.as_ref().map(|c| &c.advertiser)).unwrap_or_default();
    if !advertiser.is_empty() && engine.catalog_read().advertiser(&advertiser).is_none() {
        return Err(bad("advertiser: no such advertiser"));
    }
    let status = match p.get_nonempty("status") {
        Some(s) => OfferStatus::parse(s.trim())
            .ok_or_else(|| bad("status must be active, paused or stopped"))?,
        None => current.as_ref().map_or(OfferStatus::Active, |c| c.status),
    };
    let default_status = match p.get_nonempty("default_status") {
        Some(s) => parse_status("default_status", s)?,
        None => current.as_ref().map_or(1, |c| c.default_status),
    };
    let mut payments = if p.groups("payments").is_empty() {
        current
            .as_ref()
            .map(|c| c.payments.clone())
            .unwrap_or_default()
    } else {
        parse_payments(p)?
    };
    // Every conversion needs a payment for its goal: an offer without any gets goal 1 at zero,
    // shown in the API, rather than rejecting every postback with "Goal not found".
    if payments.is_empty() {
        payments.push(Payment {
            goal: "1".into(),
            total: 0.0,
            revenue: 0.0,
            currency: "USD".into(),
            kind: PaymentType::Fixed,
            status: None,
        });
    }
    let hold_period = match p.get_nonempty("hold_period") {
        Some(v) => v
            .trim()
            .parse::<u32>()
            .map_err(|_| bad("hold_period must be a whole number of days"))?,
        None => current.as_ref().map_or(0, |c| c.hold_period),
    };
    let offer = Offer {
        id: current.as_ref().map_or(next_id, |c| c.id),
        offer_id: current
            .as_ref()
            .map_or_else(|| new_object_id(engine), |c| c.offer_id.clone()),
        title,
        advertiser,
        url,
        status,
        payments,
        default_status,
        secure: text("secure", current.as_ref().map(|c| &c.secure)).unwrap_or_default(),
        allowed_ip: allowed_ip(p, current.as_ref().map_or(&[], |c| &c.allowed_ip))?,
        hold_period,
    };
    let value = offer_json(&offer);
    Ok(Change::new(
        current.is_none(),
        CatalogEvent::Offer {
            at_us: now_us(),
            offer,
        },
        "offer",
        value,
    ))
}

pub fn offer_json(o: &Offer) -> Value {
    json!({
        "id": o.id,
        "offer_id": o.offer_id,
        "title": o.title,
        "advertiser": o.advertiser,
        "url": o.url,
        "status": o.status.as_str(),
        "default_status": o.default_status,
        "secure": o.secure,
        "allowed_ip": o.allowed_ip.join(","),
        "hold_period": o.hold_period,
        "payments": o.payments.iter().map(|p| json!({
            "goal": p.goal,
            "total": p.total,
            "revenue": p.revenue,
            "currency": p.currency,
            "type": match p.kind { PaymentType::Fixed => "fixed", PaymentType::Percent => "percent" },
            "status": p.status,
        })).collect::<Vec<_>>(),
    })
}

fn partner_change(engine: &Engine, id: Option<u64>, p: &Params) -> Result<Change, ApiError> {
    let (current, next_id) = {
        let c = engine.catalog_read();
        (
            existing(id, |id| c.partner(id).cloned())?,
            c.next_partner_id(),
        )
    };
    let email = p
        .get("email")
        .map(|v| v.trim().to_string())
        .or_else(|| current.as_ref().map(|c| c.email.clone()))
        .filter(|e| !e.is_empty())
        .ok_or_else(|| bad("email is required"))?;
    if !email.contains('@') {
        return Err(bad("email is not an email address"));
    }
    let partner = Partner {
        id: current.as_ref().map_or(next_id, |c| c.id),
        login: p
            .get_nonempty("login")
            .map(str::to_string)
            .or_else(|| current.as_ref().map(|c| c.login.clone()))
            .unwrap_or_else(|| email.clone()),
        title: p
            .get("title")
            .map(str::to_string)
            .or_else(|| current.as_ref().map(|c| c.title.clone()))
            .unwrap_or_default(),
        email,
    };
    let value = partner_json(&partner);
    Ok(Change::new(
        current.is_none(),
        CatalogEvent::Partner {
            at_us: now_us(),
            partner,
        },
        "partner",
        value,
    ))
}

pub fn partner_json(a: &Partner) -> Value {
    json!({"id": a.id, "email": a.email, "login": a.login, "title": a.title})
}

const POSTBACK_STATUSES: [&str; 6] = [
    "",
    "by_creating",
    "confirmed",
    "pending",
    "declined",
    "hold",
];

fn postback_change(engine: &Engine, id: Option<u64>, p: &Params) -> Result<Change, ApiError> {
    let c = engine.catalog_read().clone();
    let current = existing(id, |id| c.postback(id).cloned())?;
    let partner_id = match p.get_nonempty("partner_id") {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|_| bad("partner_id must be an integer"))?,
        None => current
            .as_ref()
            .map(|c| c.partner_id)
            .ok_or_else(|| bad("partner_id is required"))?,
    };
    if c.partner(partner_id).is_none() {
        return Err(bad("partner_id: no such partner"));
    }
    let url = p
        .get("url")
        .map(|v| v.trim().to_string())
        .or_else(|| current.as_ref().map(|c| c.url.clone()))
        .filter(|u| !u.is_empty())
        .ok_or_else(|| bad("url is required"))?;
    engine.targets.check_url(&url).map_err(bad)?;
    let offer_id = match p.get("offer_id").map(str::trim) {
        Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| bad("offer_id must be an integer"))?,
        ),
        None => current.as_ref().and_then(|c| c.offer_id),
    };
    if let Some(o) = offer_id {
        if c.offer(o).is_none() {
            return Err(bad("offer_id: no such offer"));
        }
    }
    let status = p
        .get("status")
        .map(|v| v.trim().to_string())
        .or_else(|| current.as_ref().map(|c| c.status.clone()))
        .unwrap_or_default();
    let status = if status == "any" {
        String::new()
    } else {
        status
    };
    if !POSTBACK_STATUSES.contains(&status.as_str()) {
        return Err(bad(
            "status must be empty, by_creating, confirmed, pending, declined or hold",
        ));
    }
    let goal = p
        .get("goal")
        .map(|v| v.trim().to_string())
        .or_else(|| current.as_ref().map(|c| c.goal.clone()))
        .unwrap_or_default();
    if !goal.is_empty() && offer_id.is_none() {
        return Err(bad("goal can only be set with an offer_id"));
    }
    let method = p
        .get_nonempty("method")
        .map(|m| m.trim().to_uppercase())
        .or_else(|| current.as_ref().map(|c| c.method.clone()))
        .unwrap_or_else(|| "GET".into());
    if method != "GET" && method != "POST" {
        return Err(bad("method must be GET or POST"));
    }
    let postback = PostbackSetting {
        id: current.as_ref().map_or(c.next_postback_id(), |c| c.id),
        partner_id,
        url,
        offer_id,
        status,
        goal,
        method,
    };
    let value = postback_json(&postback);
    Ok(Change::new(
        current.is_none(),
        CatalogEvent::PostbackSetting {
            at_us: now_us(),
            postback,
        },
        "postback",
        value,
    ))
}

fn postback_removal(engine: &Engine, id: u64) -> Result<Change, ApiError> {
    let value = postback_json(
        engine
            .catalog_read()
            .postback(id)
            .ok_or(ApiError::NotFound)?,
    );
    Ok(Change::new(
        false,
        CatalogEvent::PostbackSettingRemoved {
            at_us: now_us(),
            id,
        },
        "postback",
        value,
    ))
}

fn postback_json(s: &PostbackSetting) -> Value {
    json!({
        "id": s.id,
        "partner_id": s.partner_id,
        "url": s.url,
        "offer_id": s.offer_id,
        "status": s.status,
        "goal": s.goal,
        "method": s.method,
    })
}

/// Re-sends deliveries: the jobs named by `job_id`, or every failed one of `partner_id`
/// created between `date_from` and `date_to`. Each gets a new round of attempts.
async fn resend(engine: &Engine, p: &Params) -> Result<Response<Body>, ApiError> {
    let named: Vec<String> = p
        .get_all("job_id")
        .into_iter()
        .map(str::to_string)
        .collect();
    if named.len() > MAX_RESEND {
        return Err(bad(format!("job_id: at most {MAX_RESEND} per request")));
    }
    let ids = if !named.is_empty() {
        let known = engine.queue.jobs(named.clone()).await?;
        for id in &named {
            if !known.iter().any(|j| &j.job.job_id == id) && !attempted(engine, id).await? {
                return Err(bad(format!("job_id: no delivery {id}")));
            }
        }
        named
    } else {
        let partner = p
            .get_nonempty("partner_id")
            .ok_or_else(|| bad("job_id, or partner_id with date_from and date_to, is required"))?
            .trim()
            .parse::<u64>()
            .map_err(|_| bad("partner_id must be an integer"))?;
        let tz = crate::stats::timezone(p)?;
        let (from_us, to_us) = crate::stats::date_range(p, &tz, None)?;
        failed_jobs(engine, partner, from_us, to_us).await?
    };
    let at_us = now_us();
    let records = ids
        .iter()
        .map(|id| {
            let r = postback_core::delivery::DeliveryRecord::Resend {
                job_id: id.clone(),
                at_us,
            };
            postback_core::log::Keyed::new(id.clone(), serde_json::to_vec(&r).unwrap_or_default())
        })
        .collect();
    engine.deliveries.append(records).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"status": 1, "count": ids.len(), "resent": ids}),
    ))
}

/// Whether the attempt log has an attempt of the job. In a cluster this process's queue holds
/// only the jobs of the partitions it dispatches; the attempt log holds every job's attempts.
async fn attempted(engine: &Engine, job_id: &str) -> Result<bool, ApiError> {
    let page = engine
        .analytics
        .attempts(AttemptQuery {
            from_us: i64::MIN,
            to_us: i64::MAX,
            job_id: Some(job_id.to_string()),
            limit: 1,
            ..Default::default()
        })
        .await?;
    Ok(page.total > 0)
}

/// The partner's jobs created in `[from_us, to_us)` whose latest attempt failed or gave up,
/// from the attempt log (complete in every process, unlike a dispatcher's queue).
async fn failed_jobs(
    engine: &Engine,
    partner: u64,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<String>, ApiError> {
    let mut latest: std::collections::BTreeMap<String, (u32, JobStatus)> = Default::default();
    let mut query = AttemptQuery {
        from_us,
        to_us: i64::MAX,
        partners: vec![partner],
        limit: 1000,
        ..Default::default()
    };
    loop {
        let page = engine.analytics.attempts(query.clone()).await?;
        let n = page.rows.len() as u64;
        for row in page.rows {
            if !(from_us..to_us).contains(&row.job.at_us) {
                continue;
            }
            let entry = latest
                .entry(row.job.job_id)
                .or_insert((0, row.attempt.state));
            if row.attempt.attempt >= entry.0 {
                *entry = (row.attempt.attempt, row.attempt.state);
            }
        }
        query.offset += n;
        query.snapshot = Some(page.snapshot);
        if n == 0 || query.offset >= page.total {
            break;
        }
    }
    Ok(latest
        .into_iter()
        .filter(|(_, (_, state))| matches!(state, JobStatus::Failed | JobStatus::GaveUp))
        .map(|(id, _)| id)
        .collect())
}

/// Shows the URL a postback setting would call for a conversion, without calling it.
async fn test_postback(engine: &Engine, id: u64, p: &Params) -> Result<Response<Body>, ApiError> {
    let setting = engine
        .catalog_read()
        .postback(id)
        .cloned()
        .ok_or(ApiError::NotFound)?;
    let conversion_id = p
        .get_nonempty("conversion_id")
        .ok_or_else(|| bad("conversion_id is required"))?;
    let query = postback_core::seams::ConversionQuery {
        from_us: i64::MIN,
        to_us: i64::MAX,
        conversion_id: Some(conversion_id.to_string()),
        limit: 1,
        ..Default::default()
    };
    let conversion = engine
        .analytics
        .conversions(query)
        .await?
        .rows
        .pop()
        .ok_or_else(|| bad("conversion_id: no such conversion"))?;
    let change = postback_core::processor::ConversionChange {
        created: true,
        conversion,
    };
    let offer_name = engine
        .catalog_read()
        .offer(change.conversion.offer_id)
        .map(|o| o.title.clone())
        .unwrap_or_default();
    let url = postback_core::delivery::preview_url(&setting, &change, &offer_name);
    let fires = postback_core::delivery::triggers(&setting, &change);
    Ok(json(
        StatusCode::OK,
        &json!({"status": 1, "postback": {"id": setting.id, "method": setting.method, "url": url, "matches_conversion": fires}}),
    ))
}
