//! The processing rules of a server postback (CONTRACT section 3), as one pure function:
//! given the parsed postback, its click, the catalog and the existing conversion, decide.

use crate::catalog::{ip_allowed, Catalog, Offer, OfferStatus};
use crate::event::{ClickEvent, PostbackEvent};
use crate::ids::ObjectId;
use crate::params::{parse_form, parse_json, Params};

/// A click as the processor knows it: the click event itself.
pub type Click = ClickEvent;

/// Conversion statuses, as Affise numbers them (there is no 4).
pub const STATUS_CONFIRMED: u8 = 1;
pub const STATUS_PENDING: u8 = 2;
pub const STATUS_DECLINED: u8 = 3;
pub const STATUS_HOLD: u8 = 5;

/// The name of a status in the conversions API, or `None` for a number that is no status.
pub fn status_name(status: u8) -> Option<&'static str> {
    match status {
        STATUS_CONFIRMED => Some("confirmed"),
        STATUS_PENDING => Some("pending"),
        STATUS_DECLINED => Some("declined"),
        STATUS_HOLD => Some("hold"),
        _ => None,
    }
}

/// Why a postback did not register a conversion; `message` is the contract's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    AccessDenied,
    IpDenied,
    MissingClickId,
    BrokenClickId,
    ClickNotFound,
    OfferDisabled,
    GoalNotFound,
    InvalidStatus,
    InvalidSum,
    ConversionExists,
    StatusNotPending,
}

impl Reject {
    pub fn message(self) -> &'static str {
        match self {
            Reject::AccessDenied => "Access denied",
            Reject::IpDenied => "Current IP-address is denied",
            Reject::MissingClickId => "Missing mandatory parameter clickid/click_id",
            Reject::BrokenClickId => "Broken clickid",
            Reject::ClickNotFound => "Click not found",
            Reject::OfferDisabled => "Offer disabled",
            Reject::GoalNotFound => "Goal not found",
            Reject::InvalidStatus => "Invalid status",
            Reject::InvalidSum => "Invalid sum",
            Reject::ConversionExists => "Conversion exists",
            Reject::StatusNotPending => "Conversion status is not pending",
        }
    }
}

/// A postback's parameters, read once from its raw query and body.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPostback {
    pub at_us: i64,
    /// The sender's address.
    pub server: String,
    pub method: String,
    /// Query parameters as received (for a pixel, plus `pixel=1` and `source`).
    pub get: Params,
    /// Body parameters as received.
    pub post: Params,
    pub pixel: bool,
    /// The click id from a pixel's cookie, used when no `clickid` is passed.
    pub cookie_click_id: Option<String>,
}

impl ParsedPostback {
    pub fn parse(event: &PostbackEvent) -> Self {
        let mut get = parse_form(event.query.as_bytes());
        let body = event.body_bytes();
        let post = if body.is_empty() {
            Params::default()
        } else if event.content_type.starts_with("application/json") || body.first() == Some(&b'{')
        {
            // A JSON body that is not an object is kept whole under one key, not dropped.
            parse_json(&body).unwrap_or_else(|_| {
                Params(vec![(
                    String::new(),
                    String::from_utf8_lossy(&body).into_owned(),
                )])
            })
        } else {
            parse_form(&body)
        };
        let mut cookie_click_id = None;
        if let Some(px) = &event.pixel {
            get.0.push(("pixel".into(), "1".into()));
            get.0.push(("source".into(), px.source.clone()));
            cookie_click_id = px.cookie_click_id.clone();
        }
        Self {
            at_us: event.at_us,
            server: event.ip.clone(),
            method: event.method.clone(),
            get,
            post,
            pixel: event.pixel.is_some(),
            cookie_click_id,
        }
    }

    /// A parameter by name: the query wins over the body.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.get.get(name).or_else(|| self.post.get(name))
    }

    fn param_nonempty(&self, name: &str) -> Option<&str> {
        self.param(name).filter(|v| !v.is_empty())
    }

    /// A parameter under its S2S name, or its pixel name (`afstatus`, ...) for pixels.
    fn field(&self, s2s: &str, pixel: &str) -> Option<&str> {
        if self.pixel {
            self.param_nonempty(pixel)
                .or_else(|| self.param_nonempty(s2s))
        } else {
            self.param_nonempty(s2s)
        }
    }

    /// The click id as passed (`clickid`, `click_id`, or a pixel's cookie).
    pub fn clickid(&self) -> Option<&str> {
        self.param_nonempty("clickid")
            .or_else(|| self.param_nonempty("click_id"))
            .or(self.cookie_click_id.as_deref().filter(|c| !c.is_empty()))
    }
    pub fn action_id(&self) -> Option<&str> {
        self.field("action_id", "afid")
    }
    pub fn goal(&self) -> Option<&str> {
        self.field("goal", "afgoal")
    }
    pub fn status_raw(&self) -> Option<&str> {
        self.field("status", "afstatus")
    }
    /// The passed status as a number, 0 when absent or not a number.
    pub fn status_passed(&self) -> i64 {
        self.status_raw()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
    pub fn secure(&self) -> Option<&str> {
        self.field("secure", "afsecure")
    }
    /// The order sum: 0 when not passed; `None` when passed but not a number from 0 to
    /// [`MAX_SUM`] (a negative, infinite or absurd sum would make negative or absurd payouts).
    pub fn sum(&self) -> Option<f64> {
        match self.field("sum", "afprice") {
            None => Some(0.0),
            Some(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && (0.0..=MAX_SUM).contains(v)),
        }
    }
    pub fn text(&self, name: &str) -> String {
        self.param(name).unwrap_or("").to_string()
    }
    pub fn custom_fields(&self) -> Vec<String> {
        (1..=7)
            .map(|i| {
                self.param(&format!("custom_field{i}"))
                    .or_else(|| self.param(&format!("custom_field_{i}")))
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }
}

/// The largest order sum taken (in any currency: a trillion dong is about 40 million dollars).
pub const MAX_SUM: f64 = 1e12;

/// What makes two postbacks the same conversion: (offer, goal, action id), where the action
/// id defaults to the click id.
pub fn conversion_key(offer_id: u64, goal: &str, action_id: &str) -> String {
    format!("{offer_id}|{}|{action_id}", goal.to_lowercase())
}

/// A registered conversion, in its current state.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversion {
    pub id: String,
    pub key: String,
    pub offer_id: u64,
    pub pid: u64,
    pub advertiser_id: String,
    pub goal: String,
    pub action_id: String,
    pub clickid: String,
    pub status: u8,
    pub sum: f64,
    pub payouts: f64,
    pub revenue: f64,
    pub currency: String,
    pub ip: String,
    pub ua: String,
    pub comment: String,
    pub subs: Vec<String>,
    pub custom_fields: Vec<String>,
    pub promo_code: String,
    pub user_id: String,
    pub created_us: i64,
    pub updated_us: i64,
    pub click_us: i64,
}

impl Conversion {
    /// Orders the states of one conversion: a later update wins, and of two at the same
    /// microsecond the one that left `pending` (only a pending conversion changes status).
    pub fn version(&self) -> i64 {
        self.updated_us.saturating_mul(2) + i64::from(self.status != STATUS_PENDING)
    }
}

/// The decision about one postback.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Rejected(Reject),
    Created(Conversion),
    /// A pending conversion moved to a new status.
    Updated(Conversion),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// The offer, partner and advertiser, known once the click is (0 / empty otherwise).
    pub offer_id: u64,
    pub pid: u64,
    pub advertiser_id: String,
    /// Seconds from the click to this postback, when the click is known.
    pub delta: Option<i64>,
}

/// Everything the rules read besides the postback itself.
pub struct Context<'a> {
    pub catalog: &'a Catalog,
    /// The platform-level secure code; empty when not set.
    pub platform_secure: &'a str,
}

/// Applies the rules in the contract's order. `click` is the click the postback names, if the
/// store has it; `existing` finds a conversion by its key.
pub fn judge<'c>(
    pb: &ParsedPostback,
    click: Option<&Click>,
    ctx: &Context<'_>,
    existing: impl FnOnce(&str) -> Option<&'c Conversion>,
) -> Verdict {
    match judge_click(pb, click, ctx) {
        Err(rejected) => rejected,
        Ok(candidate) => {
            let current = existing(&candidate.conversion.key);
            judge_conversion(candidate, current)
        }
    }
}

/// A postback that passed every rule of its click, offer and catalog: what is left is to
/// deduplicate it against the conversion of its key. The two halves are apart so that they can
/// run where their state lives: the click's rules by click id, the dedupe by conversion key.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The verdict so far (offer, partner, advertiser, delta); its outcome is decided next.
    pub verdict: Verdict,
    /// The conversion this postback creates if its key has none yet (id assigned later).
    pub conversion: Conversion,
    /// The status the postback passed, if it passed a valid one.
    pub passed_status: Option<u8>,
    /// The postback's time.
    pub at_us: i64,
    /// Its `comment`, if not empty.
    pub comment: Option<String>,
}

/// One rule as the engine applied it to a postback, for an explanation ([`explain_click`]):
/// whether the postback passed it, and why, in words. Secrets (secure codes) are never shown.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Check {
    pub rule: &'static str,
    pub passed: bool,
    pub detail: String,
    /// The conversion the dedupe found or made, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversion_id: Option<String>,
}

/// Where the rules report what they checked. The engine's own path passes `()`, which
/// builds no text at all.
pub trait Trace {
    fn check(&mut self, rule: &'static str, passed: bool, detail: impl FnOnce() -> String);
}

impl Trace for () {
    #[inline(always)]
    fn check(&mut self, _: &'static str, _: bool, _: impl FnOnce() -> String) {}
}

impl Trace for Vec<Check> {
    fn check(&mut self, rule: &'static str, passed: bool, detail: impl FnOnce() -> String) {
        self.push(Check {
            rule,
            passed,
            detail: detail(),
            conversion_id: None,
        });
    }
}

/// The rules up to the dedupe: a rejection, or a [`Candidate`].
// The rejection is a whole verdict, returned one frame up: boxing it would only add an
// allocation per rejected postback.
#[allow(clippy::result_large_err)]
pub fn judge_click(
    pb: &ParsedPostback,
    click: Option<&Click>,
    ctx: &Context<'_>,
) -> Result<Candidate, Verdict> {
    judge_click_traced(pb, click, ctx, &mut ())
}

/// [`judge_click`], with every rule it applied, in order, up to the one that rejected.
#[allow(clippy::result_large_err)]
pub fn explain_click(
    pb: &ParsedPostback,
    click: Option<&Click>,
    ctx: &Context<'_>,
) -> (Vec<Check>, Result<Candidate, Verdict>) {
    let mut checks = Vec::new();
    let judged = judge_click_traced(pb, click, ctx, &mut checks);
    (checks, judged)
}

fn utc(at_us: i64) -> String {
    let (date, time) = crate::delivery::civil(at_us);
    format!("{date} {time} UTC")
}

#[allow(clippy::result_large_err)]
fn judge_click_traced(
    pb: &ParsedPostback,
    click: Option<&Click>,
    ctx: &Context<'_>,
    trace: &mut impl Trace,
) -> Result<Candidate, Verdict> {
    let offer: Option<&Offer> = click.and_then(|c| ctx.catalog.offer_at(c.offer_id, pb.at_us));
    let advertiser = offer
        .filter(|o| !o.advertiser.is_empty())
        .and_then(|o| ctx.catalog.advertiser_at(&o.advertiser, pb.at_us));
    let verdict = Verdict {
        outcome: Outcome::Rejected(Reject::AccessDenied),
        offer_id: click.map_or(0, |c| c.offer_id),
        pid: click.map_or(0, |c| c.pid),
        advertiser_id: offer.map(|o| o.advertiser.clone()).unwrap_or_default(),
        delta: click.map(|c| (pb.at_us - c.at_us).div_euclid(1_000_000)),
    };
    let reject = |mut v: Verdict, r: Reject| {
        v.outcome = Outcome::Rejected(r);
        Err(v)
    };

    // Every secure code that is set (platform, advertiser, offer) must be passed.
    let passed = pb.secure().unwrap_or("");
    let codes = [
        ("platform", ctx.platform_secure),
        ("advertiser", advertiser.map_or("", |a| a.secure.as_str())),
        ("offer", offer.map_or("", |o| o.secure.as_str())),
    ];
    if let Some((who, _)) = codes.iter().find(|(_, c)| !c.is_empty() && *c != passed) {
        trace.check("secure_code", false, || {
            let got = if passed.is_empty() {
                "no secure code was passed".to_string()
            } else {
                format!(
                    "the secure code passed ({} characters) is not it",
                    passed.chars().count()
                )
            };
            format!("the {who} has a secure code, and {got}")
        });
        return reject(verdict, Reject::AccessDenied);
    }
    trace.check("secure_code", true, || {
        let set: Vec<&str> = codes
            .iter()
            .filter(|(_, c)| !c.is_empty())
            .map(|(who, _)| *who)
            .collect();
        if set.is_empty() {
            "no secure code is set".to_string()
        } else {
            format!("the code passed is the {}'s", set.join("'s and the "))
        }
    });
    // Allow-lists name advertisers' servers; a pixel comes from the user's browser instead.
    if pb.pixel {
        trace.check("ip_allow_list", true, || {
            "a pixel comes from the user's browser: allow-lists do not apply".to_string()
        });
    } else {
        let lists = [
            ("advertiser", advertiser.map(|a| a.allowed_ip.as_slice())),
            ("offer", offer.map(|o| o.allowed_ip.as_slice())),
        ];
        let refused = lists
            .iter()
            .filter_map(|(who, l)| l.map(|l| (who, l)))
            .find(|(_, l)| !ip_allowed(l, &pb.server));
        if let Some((who, list)) = refused {
            trace.check("ip_allow_list", false, || {
                format!(
                    "the sender {} is not in the {who}'s allow-list: {}",
                    pb.server,
                    list.join(", ")
                )
            });
            return reject(verdict, Reject::IpDenied);
        }
        trace.check("ip_allow_list", true, || {
            let set: Vec<&str> = lists
                .iter()
                .filter(|(_, l)| l.is_some_and(|l| !l.is_empty()))
                .map(|(who, _)| *who)
                .collect();
            if set.is_empty() {
                "no allow-list is set".to_string()
            } else {
                format!(
                    "the sender {} is in the {}'s allow-list",
                    pb.server,
                    set.join(" and the ")
                )
            }
        });
    }
    let Some(clickid) = pb.clickid() else {
        trace.check("click_id", false, || {
            "neither clickid nor click_id was passed (nor a click cookie, for a pixel)".to_string()
        });
        return reject(verdict, Reject::MissingClickId);
    };
    if clickid.parse::<ObjectId>().is_err() {
        trace.check("click_id", false, || {
            format!("{clickid:?} is not a click id: those are 24 hexadecimal characters")
        });
        return reject(verdict, Reject::BrokenClickId);
    }
    trace.check("click_id", true, || format!("click id {clickid}"));
    let Some(click) = click else {
        trace.check("click", false, || {
            format!(
                "no click {clickid} is stored: a click of another system, a mistyped id, or \
                 one older than the retention"
            )
        });
        return reject(verdict, Reject::ClickNotFound);
    };
    trace.check("click", true, || {
        format!(
            "clicked at {} on offer {}, by partner {}; {} s before this postback",
            utc(click.at_us),
            click.offer_id,
            click.pid,
            (pb.at_us - click.at_us).div_euclid(1_000_000)
        )
    });
    let Some(offer) = offer.filter(|o| o.status == OfferStatus::Active) else {
        trace.check("offer", false, || match offer {
            None => format!(
                "offer {} did not exist at the postback's time",
                click.offer_id
            ),
            Some(o) => format!(
                "offer {} ({:?}) was {} at the postback's time, not active",
                o.id,
                o.title,
                o.status.as_str()
            ),
        });
        return reject(verdict, Reject::OfferDisabled);
    };
    trace.check("offer", true, || {
        format!("offer {} ({:?}) was active", offer.id, offer.title)
    });
    let goal = pb.goal().unwrap_or("1");
    let Some(payment) = offer.payment(goal) else {
        trace.check("goal", false, || {
            let paid: Vec<String> = offer
                .payments
                .iter()
                .map(|p| format!("{:?}", p.goal))
                .collect();
            format!(
                "goal {goal:?}{} is not one the offer pays for; it pays for {}",
                if pb.goal().is_none() {
                    " (none passed: the default)"
                } else {
                    ""
                },
                if paid.is_empty() {
                    "none".to_string()
                } else {
                    paid.join(", ")
                }
            )
        });
        return reject(verdict, Reject::GoalNotFound);
    };
    trace.check("goal", true, || {
        format!("the offer pays for goal {:?}", payment.goal)
    });
    let passed_status = match pb.status_raw() {
        None => None,
        Some(s) => match s
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|n| status_name(*n).is_some())
        {
            Some(n) => Some(n),
            None => {
                trace.check("status", false, || {
                    format!(
                        "status {s:?} is none of 1 (confirmed), 2 (pending), 3 (declined), 5 (hold)"
                    )
                });
                return reject(verdict, Reject::InvalidStatus);
            }
        },
    };
    let Some(sum) = pb.sum() else {
        trace.check("sum", false, || {
            format!(
                "sum {:?} is not a number from 0 to {MAX_SUM}",
                pb.field("sum", "afprice").unwrap_or("")
            )
        });
        return reject(verdict, Reject::InvalidSum);
    };
    let status = passed_status
        .or(payment.status)
        .unwrap_or(offer.default_status);
    trace.check("status", true, || {
        let name = status_name(status).unwrap_or("?");
        match passed_status {
            Some(_) => format!("status {status} ({name}) passed"),
            None => {
                format!("no status passed: the goal's or the offer's default, {status} ({name})")
            }
        }
    });
    trace.check("sum", true, || format!("sum {sum}"));
    let action_id = pb.action_id().unwrap_or(&click.click_id);
    let key = conversion_key(offer.id, &payment.goal, action_id);
    let (payouts, revenue) = payment.amounts(sum);
    let conversion = Conversion {
        id: String::new(), // assigned by the processor from the log position
        key,
        offer_id: offer.id,
        pid: click.pid,
        advertiser_id: offer.advertiser.clone(),
        goal: payment.goal.clone(),
        action_id: action_id.to_string(),
        clickid: click.click_id.clone(),
        status,
        sum,
        payouts,
        revenue,
        currency: payment.currency.clone(),
        ip: pb
            .param_nonempty("ip")
            .unwrap_or(click.ip.as_str())
            .to_string(),
        ua: click.ua.clone(),
        comment: pb.text("comment"),
        subs: (1..=8).map(|i| click.sub(i).to_string()).collect(),
        custom_fields: pb.custom_fields(),
        promo_code: pb.text("promo_code"),
        user_id: pb.text("user_id"),
        created_us: pb.at_us,
        updated_us: pb.at_us,
        click_us: click.at_us,
    };
    Ok(Candidate {
        verdict,
        conversion,
        passed_status,
        at_us: pb.at_us,
        comment: pb.param_nonempty("comment").map(str::to_string),
    })
}

/// The dedupe of a logged postback, explained: `error`, `created` and `conversion_id` are what
/// the log says of it, `current` the conversion of its key now (a status other than pending
/// never changes, so what decided then is still there).
pub fn explain_dedupe(
    key: &str,
    error: &str,
    created: bool,
    conversion_id: &str,
    current: Option<&Conversion>,
) -> Check {
    let mut parts = key.splitn(3, '|');
    let (offer, goal, action) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let what = format!("offer {offer}, goal {goal:?}, action id {action:?}");
    let described = |c: &Conversion| {
        format!(
            "conversion {} ({what}, created {}, now {})",
            c.id,
            utc(c.created_us),
            status_name(c.status).unwrap_or("?")
        )
    };
    let (passed, detail, id) = match (error, current) {
        ("", _) if created => (
            true,
            format!("no conversion of {what} existed: this postback created {conversion_id}"),
            conversion_id.to_string(),
        ),
        ("", Some(c)) => (
            true,
            format!(
                "{} was pending: this postback changed its status",
                described(c)
            ),
            c.id.clone(),
        ),
        ("", None) => (
            true,
            format!("this postback changed conversion {conversion_id}"),
            conversion_id.to_string(),
        ),
        (e, Some(c)) if e == Reject::StatusNotPending.message() => (
            false,
            format!(
                "{} had left pending: only a pending conversion changes status",
                described(c)
            ),
            c.id.clone(),
        ),
        (_, Some(c)) => (
            false,
            format!(
                "{} existed, and the postback passed no other status for it",
                described(c)
            ),
            c.id.clone(),
        ),
        (_, None) => (
            false,
            format!("a conversion of {what} existed then; it is past the retention now"),
            String::new(),
        ),
    };
    Check {
        rule: "dedupe",
        passed,
        detail,
        conversion_id: (!id.is_empty()).then_some(id),
    }
}

/// The dedupe: a new conversion when its key has none, a status change of a pending one, or
/// `Conversion exists` / `Status not pending`.
pub fn judge_conversion(candidate: Candidate, existing: Option<&Conversion>) -> Verdict {
    let Candidate {
        mut verdict,
        conversion,
        passed_status,
        at_us,
        comment,
    } = candidate;
    let Some(current) = existing else {
        verdict.outcome = Outcome::Created(conversion);
        return verdict;
    };
    let changed = passed_status.is_some_and(|s| s != current.status);
    if !changed {
        verdict.outcome = Outcome::Rejected(Reject::ConversionExists);
        return verdict;
    }
    if current.status != STATUS_PENDING {
        verdict.outcome = Outcome::Rejected(Reject::StatusNotPending);
        return verdict;
    }
    let mut next = current.clone();
    next.status = conversion.status;
    // Never before the state it replaces (clocks of two front ends may differ a little): the
    // stores keep the state of the highest version.
    next.updated_us = at_us.max(current.updated_us);
    if let Some(comment) = comment {
        next.comment = comment;
    }
    verdict.outcome = Outcome::Updated(next);
    verdict
}
