//! Partition keys: which partition of a log a record goes to. Clicks and postbacks are keyed by
//! click id, so a click and its postbacks share a partition and one processor sees them in
//! order ("Click not found" is never a race). The front end and the processors compute keys
//! with these functions, so they agree.
//!
//! The partition of a key is Kafka's default: murmur2 of the key's bytes, made positive, modulo
//! the partition count. Any producer that keys by click id with Kafka's default partitioner
//! (the Java client, kcat with `-K`) lands in the same partition as the engine.

use crate::event::{Event, PostbackEvent};
use crate::params::parse_json;

/// A log's partition number.
pub type Partition = u32;

/// The partition of `key` among `partitions` (Kafka's `murmur2(key) & 0x7fffffff % n`).
pub fn partition_of(key: &str, partitions: Partition) -> Partition {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

impl Event {
    /// The partition key: the click id (lowercased), wherever the request carried it.
    pub fn key(&self) -> String {
        match self {
            Event::Click(c) => c.click_id.to_ascii_lowercase(),
            Event::Postback(p) => p.click_key(),
        }
    }
}

impl PostbackEvent {
    /// The click id exactly as the rules read it (`ParsedPostback::clickid`: `clickid`, then
    /// `click_id`, the query before the body, the first value of each, then a pixel's cookie),
    /// lowercased; empty when there is none. Reads no more of the request than it needs.
    pub fn click_key(&self) -> String {
        let query = |name: &str| {
            form_urlencoded::parse(self.query.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let body = self.body_bytes();
        let body_params = || -> Option<crate::params::Params> {
            if body.is_empty() {
                return None;
            }
            let json =
                self.content_type.starts_with("application/json") || body.first() == Some(&b'{');
            Some(if json {
                parse_json(&body).unwrap_or_default()
            } else {
                crate::params::parse_form(&body)
            })
        };
        let mut parsed_body = None;
        let mut param = |name: &str| -> Option<String> {
            query(name).or_else(|| {
                parsed_body
                    .get_or_insert_with(body_params)
                    .as_ref()
                    .and_then(|p| p.get(name).map(str::to_string))
            })
        };
        param("clickid")
            .filter(|v| !v.is_empty())
            .or_else(|| param("click_id").filter(|v| !v.is_empty()))
            .or_else(|| {
                self.pixel
                    .as_ref()
                    .and_then(|p| p.cookie_click_id.clone())
                    .filter(|c| !c.is_empty())
            })
            .map(|id| id.to_ascii_lowercase())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::PixelContext;
    use crate::rules::ParsedPostback;
    use proptest::prelude::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values of org.apache.kafka.common.utils.Utils.murmur2.
        assert_eq!(murmur2(b"21") as i32, -973_932_308);
        assert_eq!(murmur2(b"foobar") as i32, -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985_981_536);
        assert_eq!(
            murmur2(b"a-little-bit-longer-string") as i32,
            -1_486_304_829
        );
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58_897_971
        );
        assert_eq!(murmur2(b"abc") as i32, 479_470_107);
    }

    #[test]
    fn partitions_spread_and_stay_in_range() {
        let mut seen = [0usize; 12];
        for i in 0..12_000 {
            let p = partition_of(&format!("{i:024x}"), 12);
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 700), "{seen:?}");
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0);
    }

    fn postback(
        query: &str,
        body: &[u8],
        content_type: &str,
        cookie: Option<&str>,
    ) -> PostbackEvent {
        let mut e = PostbackEvent {
            at_us: 1,
            ip: String::new(),
            method: "POST".into(),
            query: query.into(),
            body: None,
            body_hex: None,
            content_type: content_type.into(),
            pixel: cookie.map(|c| PixelContext {
                kind: "success.jpg".into(),
                source: String::new(),
                cookie_click_id: Some(c.into()),
            }),
        };
        e.set_body(body);
        e
    }

    #[test]
    fn the_key_is_the_click_id_wherever_it_is() {
        let id = "59359DCB7E28FEE0558B4567";
        let want = id.to_ascii_lowercase();
        for e in [
            postback(&format!("clickid={id}"), b"", "", None),
            postback(&format!("click_id={id}"), b"", "", None),
            postback("", format!("clickid={id}").as_bytes(), "", None),
            postback(
                "",
                format!(r#"{{"click_id":"{id}"}}"#).as_bytes(),
                "application/json",
                None,
            ),
            postback("offer_id=1", b"", "", Some(id)),
            postback(
                &format!("clickid=&click_id={id}"),
                b"clickid=other",
                "",
                None,
            ),
        ] {
            assert_eq!(e.click_key(), want, "{e:?}");
        }
        assert_eq!(postback("x=1", b"", "", None).click_key(), "");
    }

    proptest! {
        /// The key is what the rules read, for any query, body and cookie.
        #[test]
        fn the_key_agrees_with_the_rules(
            query in "((clickid|click_id|x)=[a-fA-F0-9%&=]{0,6}&?){0,4}",
            body in "((clickid|click_id|y)=[a-f0-9&=]{0,6}&?){0,4}",
            json in any::<bool>(),
            cookie in proptest::option::of("[a-f0-9]{0,4}"),
        ) {
            let (body, ct) = if json {
                (format!(r#"{{"clickid":"{body}"}}"#), "application/json")
            } else {
                (body, "application/x-www-form-urlencoded")
            };
            let e = postback(&query, body.as_bytes(), ct, cookie.as_deref());
            let rules = ParsedPostback::parse(&e)
                .clickid()
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            prop_assert_eq!(e.click_key(), rules);
        }
    }
}
