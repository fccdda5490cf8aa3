//! Which addresses an outbound (affiliate) postback may reach: only globally reachable ones.
//!
//! Every range of the IANA IPv4 and IPv6 Special-Purpose Address Registries that is not
//! globally reachable is refused, with multicast, the reserved class E, the deprecated
//! site-local and 6to4-relay ranges, the deprecated IPv4-compatible and IPv4-translated forms,
//! and the forms that reach an IPv4 address (mapped, NAT64, 6to4) when that address is refused. Addresses of the host itself
//! are refused by the caller, which knows them (see `postbackd::dispatcher`).
//!
//! This module decides on an address; turning hosts into addresses (URL parsing in any
//! notation, DNS) is the caller's job, which must check the address it then connects to.

use ipnet::{IpNet, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A special-purpose range, with the name a refusal shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialRange {
    pub net: &'static str,
    pub name: &'static str,
}

const fn range(net: &'static str, name: &'static str) -> SpecialRange {
    SpecialRange { net, name }
}

/// IPv4 ranges that are not globally reachable.
const V4: &[SpecialRange] = &[
    range("0.0.0.0/8", "this network"),
    range("10.0.0.0/8", "private"),
    range("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
    range("127.0.0.0/8", "loopback"),
    range("169.254.0.0/16", "link-local (cloud metadata)"),
    range("172.16.0.0/12", "private"),
    range("192.0.0.0/24", "IETF protocol assignments"),
    range("192.0.2.0/24", "documentation (TEST-NET-1)"),
    range("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    range("192.168.0.0/16", "private"),
    range("198.18.0.0/15", "benchmarking"),
    range("198.51.100.0/24", "documentation (TEST-NET-2)"),
    range("203.0.113.0/24", "documentation (TEST-NET-3)"),
    range("224.0.0.0/4", "multicast"),
    range("240.0.0.0/4", "reserved (and broadcast)"),
];

/// Globally reachable exceptions inside the ranges above.
const V4_GLOBAL: &[&str] = &["192.0.0.9/32", "192.0.0.10/32"];

/// IPv6 ranges that are not globally reachable. IPv4-mapped (::ffff:0:0/96), NAT64
/// (64:ff9b::/96) and 6to4 (2002::/16) addresses are judged by the IPv4 address they embed.
const V6: &[SpecialRange] = &[
    range("::1/128", "loopback"),
    range("::/128", "unspecified"),
    range("::/8", "reserved (IPv4-compatible and -translated forms)"),
    range("64:ff9b:1::/48", "local-use NAT64"),
    range("100::/64", "discard-only"),
    range("100:0:0:1::/64", "dummy prefix"),
    range(
        "2001::/23",
        "IETF protocol assignments (Teredo, benchmarking, ...)",
    ),
    range("2001:db8::/32", "documentation"),
    range("3fff::/20", "documentation"),
    range("5f00::/16", "segment routing (SRv6) SIDs"),
    range("fc00::/7", "unique local"),
    range("fe80::/10", "link-local"),
    range("fec0::/10", "site-local (deprecated)"),
    range("ff00::/8", "multicast"),
];

/// Globally reachable exceptions inside 2001::/23.
const V6_GLOBAL: &[&str] = &[
    "2001:1::1/128",
    "2001:1::2/128",
    "2001:1::3/128",
    "2001:3::/32",
    "2001:4:112::/48",
    "2001:20::/28",
    "2001:30::/28",
];

fn contains(net: &str, ip: IpAddr) -> bool {
    net.parse::<IpNet>().is_ok_and(|n| n.contains(&ip))
}

/// The special-purpose range `ip` is in, if it is not globally reachable; `None` if an
/// outbound postback may go there.
pub fn special_range(ip: IpAddr) -> Option<SpecialRange> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

/// Whether an outbound postback must not reach `ip`.
pub fn is_internal(ip: IpAddr) -> bool {
    special_range(ip).is_some()
}

fn special_v4(ip: Ipv4Addr) -> Option<SpecialRange> {
    let ip = IpAddr::V4(ip);
    if V4_GLOBAL.iter().any(|n| contains(n, ip)) {
        return None;
    }
    V4.iter().copied().find(|r| contains(r.net, ip))
}

fn special_v6(ip: Ipv6Addr) -> Option<SpecialRange> {
    let embedded = |net: &str, offset: usize| -> Option<Ipv4Addr> {
        let n: Ipv6Net = net.parse().ok()?;
        if !n.contains(&ip) {
            return None;
        }
        let o = ip.octets();
        Some(Ipv4Addr::new(
            o[offset],
            o[offset + 1],
            o[offset + 2],
            o[offset + 3],
        ))
    };
    // IPv4-mapped addresses, NAT64 and 6to4 reach the IPv4 address inside them.
    if let Some(v4) = embedded("::ffff:0:0/96", 12) {
        return special_v4(v4).map(|_| range("::ffff:0:0/96", "IPv4-mapped internal address"));
    }
    if let Some(v4) = embedded("64:ff9b::/96", 12) {
        return special_v4(v4).map(|_| range("64:ff9b::/96", "NAT64 of an internal address"));
    }
    if let Some(v4) = embedded("2002::/16", 2) {
        return special_v4(v4).map(|_| range("2002::/16", "6to4 of an internal address"));
    }
    let addr = IpAddr::V6(ip);
    if V6_GLOBAL.iter().any(|n| contains(n, addr)) {
        return None;
    }
    V6.iter().copied().find(|r| contains(r.net, addr))
}

/// Every range in the tables parses: checked by the tests, relied on by `contains`.
#[cfg(test)]
fn all_nets() -> impl Iterator<Item = &'static str> {
    V4.iter()
        .chain(V6)
        .map(|r| r.net)
        .chain(V4_GLOBAL.iter().copied())
        .chain(V6_GLOBAL.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> bool {
        is_internal(ip.parse().expect("an address"))
    }

    #[test]
    fn the_tables_parse() {
        for n in all_nets() {
            assert!(n.parse::<IpNet>().is_ok(), "{n}");
        }
    }

    #[test]
    fn every_special_purpose_ipv4_range_is_refused() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.1",
            "192.0.0.8",
            "192.0.0.170",
            "192.0.2.10",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
    }

    #[test]
    fn public_ipv4_is_allowed() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.0.9",
            "192.0.0.10",
            "192.0.3.1",
            "192.31.196.1",
            "192.52.193.1",
            "192.175.48.1",
            "198.17.255.255",
            "198.20.0.0",
            "203.0.114.1",
            "223.255.255.255",
        ] {
            assert!(!refused(ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn every_special_purpose_ipv6_range_is_refused() {
        for ip in [
            "::",
            "::1",
            "::127.0.0.1",
            "::8.8.8.8",
            "::ffff:127.0.0.1",
            "::ffff:192.168.0.1",
            "::ffff:0:10.0.0.1",
            "::ffff:0:8.8.8.8",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "100::1",
            "100:0:0:1::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:10::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:c0a8:101::1",
            "3fff::1",
            "5f00::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
    }

    #[test]
    fn public_ipv6_is_allowed() {
        for ip in [
            "2606:4700::1111",
            "2a00:1450:4001::200e",
            "64:ff9b::808:808",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "2001:1::1",
            "2001:3::1",
            "2001:4:112::1",
            "2001:20::1",
            "2001:200::1",
        ] {
            assert!(!refused(ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn refusals_name_their_range() {
        let r = special_range("203.0.113.9".parse().expect("ip")).expect("refused");
        assert_eq!(r.net, "203.0.113.0/24");
        assert!(r.name.contains("documentation"));
        let r = special_range("64:ff9b::a00:1".parse().expect("ip")).expect("refused");
        assert!(r.name.contains("NAT64"), "{r:?}");
    }
}
