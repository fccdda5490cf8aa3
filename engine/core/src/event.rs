//! The events of the log: what the front end appends, exactly as it was received, and what
//! everything else is derived from. The JSON form is a wire contract (`schemas/events.md`):
//! fields may be added with defaults, never renamed or removed.

use serde::{Deserialize, Serialize};

/// An event of the `events` stream. Clicks and postbacks share one stream, keyed by click id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Click(ClickEvent),
    Postback(PostbackEvent),
}

impl Event {
    pub fn at_us(&self) -> i64 {
        match self {
            Event::Click(c) => c.at_us,
            Event::Postback(p) => p.at_us,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClickEvent {
    /// Registration time, Unix microseconds.
    pub at_us: i64,
    pub click_id: String,
    pub offer_id: u64,
    pub pid: u64,
    pub ip: String,
    #[serde(default)]
    pub ua: String,
    #[serde(default)]
    pub referrer: String,
    #[serde(default)]
    pub country: String,
    /// `sub1`..`sub8`; shorter when the trailing ones are empty.
    #[serde(default)]
    pub subs: Vec<String>,
}

impl ClickEvent {
    pub fn sub(&self, n: usize) -> &str {
        self.subs.get(n - 1).map_or("", String::as_str)
    }
}

/// A postback as received: raw query and body, untouched; parsing happens in the processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostbackEvent {
    pub at_us: i64,
    /// The sender's address (an advertiser's server, or the user's browser for a pixel).
    pub ip: String,
    pub method: String,
    /// The raw query string, without the `?`.
    #[serde(default)]
    pub query: String,
    /// The raw body, when it is UTF-8 (it nearly always is: forms and JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The raw body, hex-encoded, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_hex: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content_type: String,
    /// Set for the client-side pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel: Option<PixelContext>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PixelContext {
    /// `success.jpg`, `success.php` or `track.js`.
    pub kind: String,
    /// The page the pixel fired on (the request's referrer).
    #[serde(default)]
    pub source: String,
    /// The click id read from the click cookie, if there was one.
    #[serde(default)]
    pub cookie_click_id: Option<String>,
}

impl PostbackEvent {
    /// The body as bytes, whichever way it was kept.
    pub fn body_bytes(&self) -> Vec<u8> {
        if let Some(b) = &self.body {
            return b.as_bytes().to_vec();
        }
        let Some(hex) = &self.body_hex else {
            return Vec::new();
        };
        hex.as_bytes()
            .chunks_exact(2)
            .filter_map(|p| {
                std::str::from_utf8(p)
                    .ok()
                    .and_then(|s| u8::from_str_radix(s, 16).ok())
            })
            .collect()
    }

    /// Keeps a raw body in the field that can hold it.
    pub fn set_body(&mut self, raw: &[u8]) {
        if raw.is_empty() {
            return;
        }
        match std::str::from_utf8(raw) {
            Ok(s) => self.body = Some(s.to_string()),
            Err(_) => {
                self.body_hex = Some(raw.iter().map(|b| format!("{b:02x}")).collect());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_is_tagged() {
        let mut p = PostbackEvent {
            at_us: 5,
            ip: "1.2.3.4".into(),
            method: "POST".into(),
            query: "clickid=x".into(),
            body: None,
            body_hex: None,
            content_type: String::new(),
            pixel: None,
        };
        p.set_body(&[0xff, 0x00, b'a']);
        let e = Event::Postback(p);
        let json = e.to_json();
        assert!(std::str::from_utf8(&json)
            .expect("utf8")
            .starts_with(r#"{"type":"postback""#));
        let back = Event::from_json(&json).expect("decodes");
        assert_eq!(back, e);
        let Event::Postback(p) = back else {
            panic!("postback")
        };
        assert_eq!(p.body_bytes(), vec![0xff, 0x00, b'a']);
    }

    #[test]
    fn golden_click_event_decodes() {
        let json = include_str!("../../../schemas/golden/click.json");
        let Event::Click(c) = Event::from_json(json.as_bytes()).expect("golden decodes") else {
            panic!("click")
        };
        assert_eq!(c.click_id, "59359dcb7e28fee0558b4567");
        assert_eq!(c.sub(1), "s1");
        assert_eq!(c.sub(8), "");
    }

    #[test]
    fn golden_postback_event_decodes() {
        let json = include_str!("../../../schemas/golden/postback.json");
        let Event::Postback(p) = Event::from_json(json.as_bytes()).expect("golden decodes") else {
            panic!("postback")
        };
        assert_eq!(p.method, "GET");
        assert!(p.query.contains("clickid="));
    }
}
