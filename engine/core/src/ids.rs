//! 24-hex identifiers in the MongoDB ObjectId layout: 4 bytes of Unix time (big-endian), then
//! 8 bytes that make the id unique.
//!
//! Click ids are minted by the front end (`IdGenerator`: 5 random bytes per process and a
//! counter, as MongoDB does). Ids of derived rows (postback log rows, conversions) are
//! deterministic: a tag byte, the log partition and the log offset, so that a replay of the log
//! produces the same ids and the stores can be idempotent on them.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId([u8; 12]);

/// Why a string is not an ObjectId.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a 24-hex id")]
pub struct BrokenId;

/// The kind of row a derived id names; keeps a postback row and the conversion it created
/// (same log position) apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IdTag {
    ServerPostback = 0xa1,
    Conversion = 0xc1,
    Catalog = 0xe1,
    Delivery = 0xd1,
}

impl ObjectId {
    pub const fn from_bytes(bytes: [u8; 12]) -> Self {
        Self(bytes)
    }

    pub fn bytes(&self) -> [u8; 12] {
        self.0
    }

    /// The Unix time (seconds) in the first four bytes.
    pub fn timestamp(&self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// A deterministic id for a row derived from the event at `offset` of `partition`.
    pub fn derived(tag: IdTag, unix_secs: u32, partition: u8, offset: u64) -> Self {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&unix_secs.to_be_bytes());
        b[4] = tag as u8;
        b[5] = partition;
        b[6..].copy_from_slice(&offset.to_be_bytes()[2..]);
        Self(b)
    }

    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl FromStr for ObjectId {
    type Err = BrokenId;

    fn from_str(s: &str) -> Result<Self, BrokenId> {
        let s = s.as_bytes();
        if s.len() != 24 {
            return Err(BrokenId);
        }
        let mut out = [0u8; 12];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Ok(Self(out))
    }
}

fn hex_val(c: u8) -> Result<u8, BrokenId> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(BrokenId),
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = [0u8; 24];
        for (i, b) in self.0.iter().enumerate() {
            s[2 * i] = HEX[(b >> 4) as usize];
            s[2 * i + 1] = HEX[(b & 0xf) as usize];
        }
        // Only ASCII hex digits were written.
        f.write_str(std::str::from_utf8(&s).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

/// Mints click ids: time, 5 bytes fixed per process (random, given by the caller so that this
/// crate stays free of IO), and a 3-byte counter.
#[derive(Debug)]
pub struct IdGenerator {
    process: [u8; 5],
    counter: std::sync::atomic::AtomicU32,
}

impl IdGenerator {
    pub fn new(process: [u8; 5], counter_start: u32) -> Self {
        Self {
            process,
            counter: std::sync::atomic::AtomicU32::new(counter_start),
        }
    }

    pub fn next(&self, unix_secs: u32) -> ObjectId {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&unix_secs.to_be_bytes());
        b[4..9].copy_from_slice(&self.process);
        b[9..].copy_from_slice(&n.to_be_bytes()[1..]);
        ObjectId(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_timestamp() {
        let id: ObjectId = "59359dcb7e28fee0558b4567".parse().expect("valid");
        assert_eq!(id.to_string(), "59359dcb7e28fee0558b4567");
        assert_eq!(id.timestamp(), 1_496_686_027);
        let upper: ObjectId = "59359DCB7E28FEE0558B4567".parse().expect("valid");
        assert_eq!(upper, id);
    }

    #[test]
    fn rejects_wrong_length_and_non_hex() {
        assert!("59359dcb7e28fee0558b456".parse::<ObjectId>().is_err());
        assert!("59359dcb7e28fee0558b45678".parse::<ObjectId>().is_err());
        assert!("59359dcb7e28fee0558b456g".parse::<ObjectId>().is_err());
        assert!("".parse::<ObjectId>().is_err());
        assert!("é9359dcb7e28fee0558b456".parse::<ObjectId>().is_err());
    }

    #[test]
    fn generator_is_unique_and_time_prefixed() {
        let g = IdGenerator::new([1, 2, 3, 4, 5], 0xff_fffe);
        let a = g.next(100);
        let b = g.next(100);
        let c = g.next(100);
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_eq!(a.timestamp(), 100);
        assert_eq!(&a.bytes()[4..9], &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn derived_ids_differ_by_tag_and_offset() {
        let p = ObjectId::derived(IdTag::ServerPostback, 7, 0, 42);
        let c = ObjectId::derived(IdTag::Conversion, 7, 0, 42);
        let p2 = ObjectId::derived(IdTag::ServerPostback, 7, 0, 43);
        assert_ne!(p, c);
        assert_ne!(p, p2);
        assert_eq!(p.timestamp(), 7);
        assert_eq!(p, ObjectId::derived(IdTag::ServerPostback, 7, 0, 42));
    }
}
