//! `{name}` macros in URLs: the offer's landing URL on a click, affiliates' postback URLs.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Characters left as they are in a macro's value: RFC 3986's unreserved set.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Replaces every `{name}` for which `value` has an answer with that answer, URL-encoded.
/// Unknown macros are left as they are.
pub fn fill(template: &str, value: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(['}', '{']) {
            Some(close) if after.as_bytes()[close] == b'}' => {
                let name = &after[..close];
                match value(name) {
                    Some(v) => out.extend(utf8_percent_encode(&v, VALUE)),
                    None => {
                        out.push('{');
                        out.push_str(name);
                        out.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::fill;

    #[test]
    fn fills_known_and_keeps_unknown_macros() {
        let f = |name: &str| match name {
            "clickid" => Some("abc".to_string()),
            "sub1" => Some("a b&c=d/é".to_string()),
            "empty" => Some(String::new()),
            _ => None,
        };
        assert_eq!(
            fill("http://x/?c={clickid}&s={sub1}&u={unknown}&e={empty}", f),
            "http://x/?c=abc&s=a%20b%26c%3Dd%2F%C3%A9&u={unknown}&e="
        );
        assert_eq!(fill("{clickid", f), "{clickid");
        assert_eq!(fill("{{clickid}}", f), "{abc}");
        assert_eq!(fill("no macros", f), "no macros");
        assert_eq!(fill("", f), "");
    }
}
