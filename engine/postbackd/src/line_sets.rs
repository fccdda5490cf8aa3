//! Line sets: the part of a postback's parameters that takes few values.
//!
//! A search is a substring of the `key=value` lines of a postback's parameters. Most lines of
//! a network's postbacks repeat: `goal=sale`, `status=1`, `currency=usd` come back in millions
//! of rows, and a trigram index holds each of them once per row. A term found in such a line
//! matches a third of the log, and counting those rows through the index reads millions of
//! positions. So the lines of a key that has shown few values go into the row's *line set*:
//! the combination of such lines, kept once in a dictionary, with each row pointing at its set
//! and each set counted by hour. The other lines (click ids, order ids, amounts) go into the
//! trigram index as before.
//!
//! A row matches a term (three characters or more, no line break) when its set's text does or
//! the rest of its lines do, and every line is wholly in one of the two: which line goes where
//! decides only how fast a search is, never what it finds. A key turns *wide* once it has shown
//! [`MAX_VALUES`] values, and from then its lines go to the index; how many keys are tracked,
//! how long a line may be and how many sets there are is bounded, so hostile parameters cost
//! memory up to a cap and then nothing.

use std::collections::{HashMap, HashSet};

/// The distinct values a key may show before its lines leave the sets for good.
pub const MAX_VALUES: usize = 32;
/// Keys whose values are tracked; a key beyond these is treated as wide.
const MAX_KEYS: usize = 1_000;
/// Lines longer than this (key, `=` and value, in bytes) are never in a set.
const MAX_LINE: usize = 64;
/// A set's text at most (bytes); a row's narrow lines beyond it go with the rest.
pub const MAX_SET_BYTES: usize = 512;
/// Sets in the dictionary; a row whose set would be a new one beyond these has none. With
/// the bounds above, the dictionary and the keys' values take at most about 15 MB.
pub const MAX_SETS: usize = 20_000;

/// Where a row's lines went.
#[derive(Debug, PartialEq, Eq)]
pub struct Split {
    /// The row's set (0: none).
    pub set: i64,
    /// The set's text when this row is its first (to be stored under `set`).
    pub new_set: Option<String>,
    /// The lines outside the set, each ending in a line break, for the trigram index.
    pub rest: String,
}

/// The dictionary of sets and what is known of each key's values.
#[derive(Debug)]
pub struct LineSets {
    ids: HashMap<String, i64>,
    next_id: i64,
    /// The values each narrow key has shown.
    values: HashMap<String, HashSet<String>>,
    wide: HashSet<String>,
    /// Keys that turned wide since the last [`LineSets::take_new_wide`].
    new_wide: Vec<String>,
}

impl LineSets {
    /// The dictionary as stored: its sets (id, text) and the keys known to be wide.
    pub fn new(
        sets: impl IntoIterator<Item = (i64, String)>,
        wide: impl IntoIterator<Item = String>,
    ) -> Self {
        let ids: HashMap<String, i64> = sets.into_iter().map(|(id, text)| (text, id)).collect();
        let next_id = ids.values().copied().max().unwrap_or(0) + 1;
        Self {
            ids,
            next_id,
            values: HashMap::new(),
            wide: wide.into_iter().collect(),
            new_wide: Vec::new(),
        }
    }

    /// Splits a row's parameters (in order) between its set and the rest.
    pub fn split<'a>(&mut self, pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Split {
        let (mut set_text, mut rest) = (String::new(), String::new());
        for (key, value) in pairs {
            let fits = set_text.len() + key.len() + value.len() + 2 <= MAX_SET_BYTES;
            let to = if fits && self.narrow(key, value) {
                &mut set_text
            } else {
                &mut rest
            };
            to.push_str(key);
            to.push('=');
            to.push_str(value);
            to.push('\n');
        }
        if set_text.is_empty() {
            return Split {
                set: 0,
                new_set: None,
                rest,
            };
        }
        if let Some(&set) = self.ids.get(&set_text) {
            return Split {
                set,
                new_set: None,
                rest,
            };
        }
        if self.ids.len() >= MAX_SETS {
            set_text.push_str(&rest);
            return Split {
                set: 0,
                new_set: None,
                rest: set_text,
            };
        }
        let set = self.next_id;
        self.next_id += 1;
        self.ids.insert(set_text.clone(), set);
        Split {
            set,
            new_set: Some(set_text),
            rest,
        }
    }

    /// Whether `key=value` goes into the set, learning the key's values on the way.
    fn narrow(&mut self, key: &str, value: &str) -> bool {
        if key.len() + 1 + value.len() > MAX_LINE
            || key.contains('\n')
            || value.contains('\n')
            || self.wide.contains(key)
        {
            return false;
        }
        if let Some(seen) = self.values.get_mut(key) {
            if seen.contains(value) {
                return true;
            }
            if seen.len() < MAX_VALUES {
                seen.insert(value.to_string());
                return true;
            }
            self.values.remove(key);
            self.wide.insert(key.to_string());
            self.new_wide.push(key.to_string());
            return false;
        }
        if self.values.len() >= MAX_KEYS {
            return false;
        }
        self.values
            .insert(key.to_string(), HashSet::from([value.to_string()]));
        true
    }

    /// The keys that turned wide since the last call, to be stored.
    pub fn take_new_wide(&mut self) -> Vec<String> {
        std::mem::take(&mut self.new_wide)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(sets: &mut LineSets, pairs: &[(&str, &str)]) -> Split {
        sets.split(pairs.iter().copied())
    }

    #[test]
    fn repeated_lines_share_a_set_and_the_rest_is_indexed() {
        let mut sets = LineSets::new([], []);
        let a = split(&mut sets, &[("goal", "sale"), ("clickid", "x1")]);
        assert_eq!(a.set, 1);
        assert_eq!(a.new_set.as_deref(), Some("goal=sale\nclickid=x1\n"));
        assert_eq!(a.rest, "");
        // Each click id is a new value until the key has shown too many.
        for i in 2..=MAX_VALUES {
            let s = split(
                &mut sets,
                &[("goal", "sale"), ("clickid", &format!("x{i}"))],
            );
            assert!(s.new_set.is_some(), "{i}");
        }
        let wide = split(&mut sets, &[("goal", "sale"), ("clickid", "x-new")]);
        assert_eq!(wide.new_set.as_deref(), Some("goal=sale\n"));
        assert_eq!(wide.rest, "clickid=x-new\n");
        assert_eq!(sets.take_new_wide(), vec!["clickid".to_string()]);
        assert!(sets.take_new_wide().is_empty());
        // Once wide, always wide, even for a value seen before.
        let again = split(&mut sets, &[("clickid", "x1"), ("goal", "sale")]);
        assert_eq!((again.set, again.new_set), (wide.set, None));
        assert_eq!(again.rest, "clickid=x1\n");
    }

    #[test]
    fn long_lines_and_line_breaks_stay_out_of_sets() {
        let mut sets = LineSets::new([], []);
        let long = "v".repeat(MAX_LINE);
        let s = split(&mut sets, &[("k", &long), ("n", "a\nb"), ("goal", "1")]);
        assert_eq!(s.new_set.as_deref(), Some("goal=1\n"));
        assert_eq!(s.rest, format!("k={long}\nn=a\nb\n"));
        let none = split(&mut sets, &[("k", &long)]);
        assert_eq!((none.set, none.new_set), (0, None));
    }

    #[test]
    fn a_set_holds_so_many_lines_and_the_rest_are_indexed() {
        let mut sets = LineSets::new([], []);
        let pairs: Vec<(String, String)> = (0..3000)
            .map(|i| (format!("key{i}"), "v".to_string()))
            .collect();
        let s = sets.split(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let text = s.new_set.expect("a set");
        assert!(text.len() <= MAX_SET_BYTES, "{}", text.len());
        assert_eq!(text.lines().count() + s.rest.lines().count(), 3000);
        assert!(s
            .rest
            .starts_with(&format!("key{}=v\n", text.lines().count())));
        // Keys beyond those tracked are left out of sets.
        let tracked = sets.values.len();
        for i in 0..2 * MAX_KEYS {
            let key = format!("new{i}");
            let s = split(&mut sets, &[(key.as_str(), "v")]);
            let narrow = tracked + i < MAX_KEYS;
            assert_eq!(s.set != 0, narrow, "{key}");
            assert_eq!(s.rest.is_empty(), narrow, "{key}");
        }
        assert_eq!(sets.values.len(), MAX_KEYS);
    }

    #[test]
    fn beyond_the_cap_a_new_combination_has_no_set_and_loses_no_line() {
        let mut sets = LineSets::new(
            (1..=MAX_SETS as i64).map(|i| (i, format!("k{i}=v\n"))),
            ["wide".to_string()],
        );
        let s = split(&mut sets, &[("goal", "sale"), ("wide", "w"), ("k", "v")]);
        assert_eq!((s.set, s.new_set), (0, None));
        assert_eq!(s.rest, "goal=sale\nk=v\nwide=w\n");
        // A stored set is still found, and stored keys stay wide.
        let known = split(&mut sets, &[("k7", "v"), ("wide", "w")]);
        assert_eq!((known.set, known.new_set), (7, None));
        assert_eq!(known.rest, "wide=w\n");
    }
}
