//! The outbound address guard: affiliate postbacks reach only globally reachable addresses
//! (`postback_core::address`) that are not this host's own, unless the operator allows
//! internal targets (`allow_private_postback_targets`).
//!
//! It is applied three times, so that no parser or resolver can slip past it: when a postback
//! URL is saved (its host, if it is an address in any notation the WHATWG URL parser knows:
//! `127.1`, `0x7f.0.0.1`, `2130706433`, `[::ffff:7f00:1]`), when a delivery resolves its host
//! (every address DNS gives is checked, and only checked ones are connected to), and on the
//! connected socket's peer address, before a byte of the request is sent.

use postback_core::address::special_range;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the list of this host's addresses is trusted before it is read again (interfaces
/// come and go: DHCP, containers).
const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(30);

pub struct TargetGuard {
    allow_internal: bool,
    own: Mutex<Option<(Instant, HashSet<IpAddr>)>>,
}

impl TargetGuard {
    pub fn new(allow_internal: bool) -> Self {
        Self {
            allow_internal,
            own: Mutex::new(None),
        }
    }

    /// Why a postback must not reach `ip`, or `None` if it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        if self.allow_internal {
            return None;
        }
        let ip = ip.to_canonical();
        if let Some(r) = special_range(ip) {
            return Some(format!("{ip} is in {} ({}); not allowed", r.net, r.name));
        }
        if self.is_own(ip) {
            return Some(format!("{ip} is an address of this host; not allowed"));
        }
        None
    }

    fn is_own(&self, ip: IpAddr) -> bool {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = own
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < OWN_ADDRESSES_TTL);
        if !fresh {
            let addresses = match if_addrs::get_if_addrs() {
                Ok(list) => list.into_iter().map(|i| i.ip().to_canonical()).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not list this host's addresses");
                    own.as_ref().map(|(_, a)| a.clone()).unwrap_or_default()
                }
            };
            *own = Some((Instant::now(), addresses));
        }
        own.as_ref().is_some_and(|(_, a)| a.contains(&ip))
    }

    /// Checks a postback URL as it is saved: http or https, no control characters, a host, and
    /// a host that is an address must be one a postback may reach. Macros (`{sub1}`) may stand
    /// anywhere; a host made of macros is checked when it is resolved at delivery.
    pub fn check_url(&self, template: &str) -> Result<(), String> {
        if template.chars().any(char::is_control) {
            return Err("url must not contain control characters".into());
        }
        let sample = postback_core::macros::fill(template, |_| Some("m".into()));
        let url = url::Url::parse(&sample).map_err(|e| format!("url is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("url must start with http:// or https://".into());
        }
        let ip = match url.host() {
            None => return Err("url has no host".into()),
            Some(url::Host::Domain(_)) => return Ok(()),
            Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
            Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        };
        match self.refusal(ip) {
            None => Ok(()),
            Some(why) => Err(format!(
                "url: {why} (postbacks go to public addresses only)"
            )),
        }
    }

    /// The address a delivery URL names literally, in any notation, if it names one.
    pub fn literal_host(url: &str) -> Option<IpAddr> {
        match url::Url::parse(url).ok()?.host()? {
            url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
            url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
            url::Host::Domain(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_naming_internal_addresses_are_refused_in_any_notation() {
        let guard = TargetGuard::new(false);
        for url in [
            "http://127.0.0.1/pb",
            "http://127.1/pb",
            "http://0x7f.0.0.1/pb",
            "http://2130706433/pb",
            "http://0177.0.0.1/pb",
            "http://[::1]/pb",
            "http://[::ffff:7f00:1]/pb",
            "http://[::ffff:10.0.0.1]:8080/pb",
            "http://169.254.169.254/latest/meta-data",
            "http://user:pw@10.1.2.3/pb?x={sub1}",
            "https://192.0.2.1/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:c0a8:101::]/",
        ] {
            let err = guard.check_url(url).expect_err(url);
            assert!(err.contains("not allowed"), "{url}: {err}");
        }
        for (url, why) in [
            ("ftp://aff.example/pb", "http"),
            ("http://aff.example/p\nb", "control"),
            ("http://:80/pb", "host"),
            ("not a url", "URL"),
        ] {
            let err = guard.check_url(url).expect_err(url);
            assert!(err.contains(why), "{url}: {err}");
        }
        for url in [
            "https://aff.example/pb?t={transactionid}&s={status}",
            "http://{sub1}.aff.example/pb",
            "http://10.0.0.{sub2}/pb",
            "http://8.8.8.8/pb",
            "http://[2606:4700::1111]/pb",
        ] {
            assert_eq!(guard.check_url(url), Ok(()), "{url}");
        }
        assert_eq!(
            TargetGuard::new(true).check_url("http://127.0.0.1/pb"),
            Ok(())
        );
    }

    #[test]
    fn this_hosts_own_addresses_are_refused() {
        let guard = TargetGuard::new(false);
        let own: Vec<IpAddr> = if_addrs::get_if_addrs()
            .expect("interfaces")
            .into_iter()
            .map(|i| i.ip())
            .collect();
        assert!(!own.is_empty());
        for ip in own {
            assert!(guard.is_own(ip), "{ip} is this host's");
            assert!(guard.refusal(ip).is_some(), "{ip} is refused");
        }
        assert!(!guard.is_own("8.8.8.8".parse().expect("ip")));
        assert_eq!(guard.refusal("8.8.8.8".parse().expect("ip")), None);
    }

    #[test]
    fn literal_hosts_are_found_in_any_notation() {
        assert_eq!(
            TargetGuard::literal_host("http://0x7f.1/x"),
            Some("127.0.0.1".parse().expect("ip"))
        );
        assert_eq!(TargetGuard::literal_host("http://aff.example/x"), None);
    }
}
