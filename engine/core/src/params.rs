//! Request parameters as Affise clients send them: query strings and form bodies with bracketed
//! keys (`payments[0][goal]=1`, `offer[]=3`), or JSON bodies, folded into one flat list of
//! string pairs so that the rest of the engine reads both the same way.

use serde_json::Value;
use std::collections::BTreeMap;

/// Ordered key/value pairs, as received. Keys may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(pub Vec<(String, String)>);

/// Decodes an `application/x-www-form-urlencoded` string (a query string or a form body).
/// Invalid percent-escapes are kept literally and invalid UTF-8 is replaced, never rejected:
/// the log must keep whatever an advertiser sent.
pub fn parse_form(input: &[u8]) -> Params {
    Params(
        form_urlencoded::parse(input)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    )
}

/// Why a JSON body could not be read as parameters.
#[derive(Debug, thiserror::Error)]
#[error("the JSON body is not an object: {0}")]
pub struct NotAnObject(String);

/// Flattens a JSON object into bracketed pairs: `{"a":{"b":[1]}}` gives `a[b][0]=1`.
/// Scalars become their text (`true`, `1.5`); `null` becomes an empty string.
pub fn parse_json(input: &[u8]) -> Result<Params, NotAnObject> {
    let value: Value = serde_json::from_slice(input).map_err(|e| NotAnObject(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(NotAnObject("expected an object".into()));
    };
    let mut out = Vec::new();
    for (k, v) in map {
        flatten(k, v, &mut out);
    }
    Ok(Params(out))
}

fn flatten(key: String, value: Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(format!("{key}[{k}]"), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.into_iter().enumerate() {
                flatten(format!("{key}[{i}]"), v, out);
            }
        }
        Value::String(s) => out.push((key, s)),
        Value::Null => out.push((key, String::new())),
        other => out.push((key, other.to_string())),
    }
}

impl Params {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first non-empty value of `name`.
    pub fn get_nonempty(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    /// Every value of an array parameter, however it is spelled: `name=1&name=2`,
    /// `name[]=1`, `name[0]=1`. Empty values are skipped.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, v)| !v.is_empty() && is_array_key(k, name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Groups `name[idx][field]=v` by `idx`, in index order (numeric where it is a number).
    pub fn groups(&self, name: &str) -> Vec<Params> {
        let mut groups: BTreeMap<(u64, String), Params> = BTreeMap::new();
        for (k, v) in &self.0 {
            let Some(rest) = k.strip_prefix(name).and_then(|r| r.strip_prefix('[')) else {
                continue;
            };
            let Some((idx, field)) = rest.split_once("][") else {
                continue;
            };
            let Some(field) = field.strip_suffix(']') else {
                continue;
            };
            let order = idx.parse::<u64>().unwrap_or(u64::MAX);
            groups
                .entry((order, idx.to_string()))
                .or_default()
                .0
                .push((field.to_string(), v.clone()));
        }
        groups.into_values().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

fn is_array_key(key: &str, name: &str) -> bool {
    let Some(rest) = key.strip_prefix(name) else {
        return false;
    };
    if rest.is_empty() || rest == "[]" {
        return true;
    }
    rest.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|idx| idx.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_keeps_everything() {
        let p = parse_form(b"clickid=abc&sum=1.5&x=%ZZ&y=a+b&z=%FF&clickid=dup");
        assert_eq!(p.get("clickid"), Some("abc"));
        assert_eq!(p.get("x"), Some("%ZZ"));
        assert_eq!(p.get("y"), Some("a b"));
        assert_eq!(p.get("z"), Some("\u{fffd}"));
        assert_eq!(p.len(), 6);
    }

    #[test]
    fn array_spellings_are_equivalent() {
        let p = parse_form(b"offer=1&offer=2&offer[]=3&offer[0]=4&offerx=9&offer[a]=8&offer=");
        assert_eq!(p.get_all("offer"), vec!["1", "2", "3", "4"]);
    }

    #[test]
    fn groups_of_bracketed_fields() {
        let p = parse_form(
            b"payments[1][goal]=2&payments[0][goal]=1&payments[0][total]=3&payments[10][goal]=x",
        );
        let g = p.groups("payments");
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].get("goal"), Some("1"));
        assert_eq!(g[0].get("total"), Some("3"));
        assert_eq!(g[1].get("goal"), Some("2"));
        assert_eq!(g[2].get("goal"), Some("x"));
    }

    #[test]
    fn json_is_flattened_like_forms() {
        let p = parse_json(br#"{"title":"T","payments":[{"goal":"1","total":2.5}],"n":null}"#)
            .expect("object");
        assert_eq!(p.get("title"), Some("T"));
        assert_eq!(p.get("n"), Some(""));
        let g = p.groups("payments");
        assert_eq!(g[0].get("total"), Some("2.5"));
        assert!(parse_json(b"[1]").is_err());
        assert!(parse_json(b"{").is_err());
    }
}
