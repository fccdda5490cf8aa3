//! Paging, as every list endpoint takes it: `page` (from 1), `limit` (1 to 500, default 100)
//! and `snapshot`, which pins a growing listing to the rows that existed when its first page
//! was read (CONTRACT section 4). Replies carry `pagination` with `per_page`, `total_count`,
//! `page` and `snapshot`.

use crate::http::ApiError;
use postback_core::params::Params;
use serde_json::{json, Map, Value};

/// The largest `limit`; larger ones are capped, as Affise does.
pub const MAX_LIMIT: u64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub page: u64,
    pub limit: u64,
    /// From an earlier reply's `pagination.snapshot`; `None` on a first read.
    pub snapshot: Option<u64>,
}

impl Paging {
    pub fn parse(p: &Params) -> Result<Self, ApiError> {
        let positive = |name: &str, default: u64| match p.get_nonempty(name) {
            Some(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::BadRequest(format!("{name} must be a positive integer"))),
            None => Ok(default),
        };
        let snapshot = match p.get_nonempty("snapshot") {
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                ApiError::BadRequest(
                    "snapshot must be the value of pagination.snapshot from an earlier reply"
                        .into(),
                )
            })?),
            None => None,
        };
        Ok(Self {
            page: positive("page", 1)?,
            limit: positive("limit", 100)?.min(MAX_LIMIT),
            snapshot,
        })
    }

    /// The offset of the page; a page far past the end is simply empty, never an overflow.
    pub fn offset(&self) -> u64 {
        (self.page - 1).saturating_mul(self.limit)
    }

    /// Whether rows remain after this page.
    pub fn has_more(&self, total: u64) -> bool {
        self.page.saturating_mul(self.limit) < total
    }

    /// The reply's `pagination` object.
    pub fn reply(&self, total: u64, snapshot: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("per_page".into(), json!(self.limit));
        m.insert("total_count".into(), json!(total));
        m.insert("page".into(), json!(self.page));
        m.insert("snapshot".into(), json!(snapshot.to_string()));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postback_core::params::parse_form;

    #[test]
    fn parses_defaults_caps_and_refusals() {
        let p = Paging::parse(&parse_form(b"")).expect("defaults");
        assert_eq!((p.page, p.limit, p.snapshot), (1, 100, None));
        let p = Paging::parse(&parse_form(b"page=3&limit=9999&snapshot=42")).expect("parses");
        assert_eq!((p.page, p.limit, p.snapshot), (3, MAX_LIMIT, Some(42)));
        assert_eq!(p.offset(), 1000);
        for bad in [
            "page=0",
            "limit=-1",
            "page=x",
            "snapshot=abc",
            "snapshot=-5",
        ] {
            assert!(Paging::parse(&parse_form(bad.as_bytes())).is_err(), "{bad}");
        }
        let far = Paging::parse(&parse_form(b"page=18446744073709551615")).expect("parses");
        assert_eq!(far.offset(), u64::MAX, "saturates");
        assert!(!far.has_more(10));
    }
}
