//! Admission: who a request comes from, and what it may hold while it is
//! served (contract, guarantee 6: no single client can hold more than a
//! small share of any pool).
//!
//! A client is a verified user, else an address: an IPv4 address, or an
//! IPv6 address's /64 (one subscriber's network, which hands out its
//! addresses freely). The address is the peer's, or, when the peer is one
//! of `--trusted-proxies`, the right-most `X-Forwarded-For` entry that is
//! not itself a trusted proxy (the left part of the header is whatever the
//! client wrote, so it is never believed).
//!
//! Every pool a request can hold (body reads, requests in flight, event
//! streams, and in the accept loop connections) is a [`Pool`]: a global
//! bound, and a per-client [`Shares`] count of at most a fraction of it.
//! Taking a place takes both or neither; dropping the [`Permit`] gives both
//! back. Admins are bound by the global pool only: they are the operator
//! and the payment provider, whose callbacks arrive many at once.
//!
//! Memory: a share's entry lives while the client holds a place and is
//! removed with the last one, so the map never holds more entries than the
//! pool has places.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::UserId;
use crate::engine::Caller;
use crate::limits::{FORWARDED_HOPS_MAX, TRUSTED_PROXIES_MAX};

/// Who a request comes from, for shares and rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A verified token's `sub`.
    User(UserId),
    /// The client address of a request without a valid token: IPv4 whole,
    /// IPv6 cut to its /64 ([`network_of`]).
    Addr(IpAddr),
}

impl ClientKey {
    /// The key of a request from `addr` without a valid token.
    pub fn addr(addr: IpAddr) -> ClientKey {
        ClientKey::Addr(network_of(addr))
    }
}

/// The client a request counts as: its verified caller (`None` for an
/// admin, who is bound by no share), else its address: the peer's, or the
/// one a trusted proxy forwarded ([`TrustedProxies::client_addr`]).
pub fn client_of(
    verified: Option<Caller>,
    request: &Request,
    trusted: &TrustedProxies,
) -> Option<ClientKey> {
    match verified {
        Some(caller) if caller.admin => None,
        Some(caller) => Some(ClientKey::User(caller.user)),
        None => {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::from([0, 0, 0, 0]), |info| info.0.ip());
            Some(ClientKey::addr(
                trusted.client_addr(peer, request.headers()),
            ))
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps; any other as
/// it is.
fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The network an address counts as: an IPv4 address itself (an
/// IPv4-mapped IPv6 address as its IPv4 address), an IPv6 address's /64.
pub fn network_of(addr: IpAddr) -> IpAddr {
    match unmapped(addr) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// One `--trusted-proxies` entry: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    /// Invariant: at most 32 for IPv4, 128 for IPv6.
    prefix_bits: u8,
}

impl Cidr {
    fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, unmapped(addr)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_bits))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The proxies whose `X-Forwarded-For` is believed (`--trusted-proxies`,
/// default none: then the header is ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses `CIDR,CIDR,...` (an address alone is a /32 or /128); empty or
    /// `none` is no proxy.
    ///
    /// # Errors
    /// A message naming the entry that is not an address or CIDR, or too
    /// many entries.
    pub fn parse(text: &str) -> Result<TrustedProxies, String> {
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("none") {
            return Ok(TrustedProxies::default());
        }
        let mut entries = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if entries.len() == TRUSTED_PROXIES_MAX {
                return Err(format!(
                    "at most {TRUSTED_PROXIES_MAX} trusted proxies (CIDRs) may be named"
                ));
            }
            let bad = || format!("{part:?} is not an IP address or CIDR (such as 10.0.0.0/8)");
            let (addr, bits) = match part.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (part, None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let max_bits: u8 = if addr.is_ipv4() { 32 } else { 128 };
            let prefix_bits = match bits {
                Some(bits) => bits.parse::<u8>().map_err(|_| bad())?,
                None => max_bits,
            };
            if prefix_bits > max_bits {
                return Err(bad());
            }
            // An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is the
            // IPv4 network it maps: peers are compared unmapped.
            let (addr, prefix_bits) = match addr {
                IpAddr::V6(v6) if prefix_bits >= 96 => match v6.to_ipv4_mapped() {
                    Some(v4) => (IpAddr::V4(v4), prefix_bits - 96),
                    None => (addr, prefix_bits),
                },
                _ => (addr, prefix_bits),
            };
            entries.push(Cidr { addr, prefix_bits });
        }
        Ok(TrustedProxies(entries))
    }

    /// Whether `addr` is a trusted proxy.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|cidr| cidr.contains(addr))
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client address of a request that came from `peer`: `peer`
    /// itself, unless it is a trusted proxy; then the right-most
    /// `X-Forwarded-For` entry that is not a trusted proxy (each trusted
    /// hop appends the address it saw). A header that names only trusted
    /// proxies, or none that parses, leaves the last trusted hop.
    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let mut looked = 0;
        // Right to left: each trusted hop appended what it saw. Anything
        // that is not an address (a header line that is not text
        // included) ends the walk: what lies left of it cannot be trusted.
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for hop in value.rsplit(',') {
                looked += 1;
                if looked > FORWARDED_HOPS_MAX {
                    return client;
                }
                let Some(addr) = parse_hop(hop) else {
                    return client;
                };
                client = addr;
                if !self.contains(addr) {
                    return client;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry as an address: bare (`203.0.113.9`,
/// `2001:db8::1`), with a port (`203.0.113.9:5678`, `[2001:db8::1]:443`)
/// or in brackets (`[2001:db8::1]`), as proxies write them.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(addr) = hop.parse::<IpAddr>() {
        return Some(addr);
    }
    if let Ok(with_port) = hop.parse::<std::net::SocketAddr>() {
        return Some(with_port.ip());
    }
    hop.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<IpAddr>().ok())
}

/// Each client's count of places held in one pool, bounded per client.
#[derive(Debug)]
pub struct Shares {
    held: DashMap<ClientKey, u32>,
    /// Invariant: at least 1.
    per_client: u32,
}

impl Shares {
    /// Shares of at most `per_client` places each (at least 1).
    pub fn new(per_client: usize) -> Shares {
        Shares {
            held: DashMap::new(),
            per_client: u32::try_from(per_client.max(1)).unwrap_or(u32::MAX),
        }
    }

    /// Takes a place for `key`, or `None` when it holds its whole share.
    pub fn try_take(self: &Arc<Shares>, key: ClientKey) -> Option<Share> {
        let mut held = self.held.entry(key).or_insert(0);
        if *held >= self.per_client {
            return None;
        }
        *held += 1;
        drop(held);
        Some(Share {
            shares: Arc::clone(self),
            key,
        })
    }

    /// Places `key` holds now.
    pub fn held_by(&self, key: &ClientKey) -> u32 {
        self.held.get(key).map_or(0, |held| *held)
    }

    /// Clients holding at least one place.
    pub fn clients(&self) -> usize {
        self.held.len()
    }

    fn give_back(&self, key: &ClientKey) {
        match self.held.entry(*key) {
            Entry::Occupied(mut held) => {
                assert!(*held.get() > 0, "a share given back that was not held");
                *held.get_mut() -= 1;
                if *held.get() == 0 {
                    held.remove();
                }
            }
            Entry::Vacant(_) => panic!("a share given back for a client that holds none"),
        }
    }
}

/// One place in a client's share; given back on drop.
#[derive(Debug)]
pub struct Share {
    shares: Arc<Shares>,
    key: ClientKey,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.shares.give_back(&self.key);
    }
}

/// Why a pool refused a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every place of the pool is taken.
    Full,
    /// The client holds its whole share.
    ShareUsed,
}

/// A bounded pool with per-client shares.
#[derive(Debug)]
pub struct Pool {
    global: Arc<Semaphore>,
    shares: Arc<Shares>,
}

/// A place in a [`Pool`]: its global place and, unless exempt, the
/// client's share.
#[derive(Debug)]
pub struct Permit {
    _share: Option<Share>,
    _place: OwnedSemaphorePermit,
}

impl Pool {
    /// A pool of `size` places (at least 1), each client holding at most
    /// `size / share_divisor` of them (at least 1).
    pub fn new(size: usize, share_divisor: usize) -> Pool {
        let size = size.max(1);
        Pool::with_share(size, size / share_divisor.max(1))
    }

    /// A pool of `size` places (at least 1), each client holding at most
    /// `per_client` (at least 1).
    pub fn with_share(size: usize, per_client: usize) -> Pool {
        Pool {
            global: Arc::new(Semaphore::new(size.max(1))),
            shares: Arc::new(Shares::new(per_client)),
        }
    }

    /// Takes a place for `client`; `None` is exempt from shares (an admin).
    ///
    /// # Errors
    /// [`Refused`] when the pool or the client's share is full; nothing is
    /// held then.
    pub fn try_acquire(&self, client: Option<ClientKey>) -> Result<Permit, Refused> {
        // The share first: a client over its share must not take a global
        // place even for an instant.
        let share = match client {
            Some(key) => Some(self.shares.try_take(key).ok_or(Refused::ShareUsed)?),
            None => None,
        };
        let place = Arc::clone(&self.global)
            .try_acquire_owned()
            .map_err(|_| Refused::Full)?;
        Ok(Permit {
            _share: share,
            _place: place,
        })
    }

    /// The per-client shares.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    /// Places free now.
    pub fn available(&self) -> usize {
        self.global.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn ipv6_counts_by_its_64_and_ipv4_whole() {
        assert_eq!(
            ClientKey::addr(ip("2001:db8:1:2:aaaa::1")),
            ClientKey::addr(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_ne!(
            ClientKey::addr(ip("2001:db8:1:2::1")),
            ClientKey::addr(ip("2001:db8:1:3::1"))
        );
        assert_ne!(
            ClientKey::addr(ip("10.0.0.1")),
            ClientKey::addr(ip("10.0.0.2"))
        );
        assert_eq!(
            ClientKey::addr(ip("::ffff:10.0.0.1")),
            ClientKey::addr(ip("10.0.0.1"))
        );
    }

    #[test]
    fn trusted_proxies_parse_and_match() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.7,fd00::/8").expect("valid");
        assert!(trusted.contains(ip("10.200.3.4")));
        assert!(trusted.contains(ip("192.168.1.7")));
        assert!(!trusted.contains(ip("192.168.1.8")));
        assert!(trusted.contains(ip("fd12::1")));
        assert!(trusted.contains(ip("::ffff:10.1.1.1")));
        assert!(!trusted.contains(ip("11.0.0.1")));
        assert!(
            TrustedProxies::parse("0.0.0.0/0")
                .expect("all")
                .contains(ip("8.8.8.8"))
        );
        for bad in ["10.0.0.0/33", "fd00::/129", "x", "10.0.0.0/", "10.0.0/8"] {
            assert!(TrustedProxies::parse(bad).is_err(), "{bad}");
        }
        assert!(TrustedProxies::parse("").expect("none").is_empty());
        assert!(TrustedProxies::parse("none").expect("none").is_empty());
        let many = vec!["10.0.0.1"; TRUSTED_PROXIES_MAX + 1].join(",");
        assert!(TrustedProxies::parse(&many).is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").expect("valid");
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.1.1.1"),
        );
        // From an untrusted peer the header is the client's own words.
        assert_eq!(
            trusted.client_addr(ip("198.51.100.1"), &headers),
            ip("198.51.100.1")
        );
        // From a trusted proxy: the right-most untrusted hop, never the
        // spoofable left part.
        assert_eq!(
            trusted.client_addr(ip("10.0.0.5"), &headers),
            ip("203.0.113.9")
        );
        // No header: the proxy itself.
        assert_eq!(
            trusted.client_addr(ip("10.0.0.5"), &HeaderMap::new()),
            ip("10.0.0.5")
        );
        // Garbage stops the walk at the last trusted hop.
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("junk, 10.2.2.2"),
        );
        assert_eq!(
            trusted.client_addr(ip("10.0.0.5"), &headers),
            ip("10.2.2.2")
        );
        // Ports and brackets, as proxies write them.
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("[2001:db8::7]:443, 203.0.113.9:5678"),
        );
        assert_eq!(
            trusted.client_addr(ip("10.0.0.5"), &headers),
            ip("203.0.113.9")
        );
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("[2001:db8::7], 10.3.3.3"),
        );
        assert_eq!(
            trusted.client_addr(ip("10.0.0.5"), &headers),
            ip("2001:db8::7")
        );
        // A header line that is not text ends the walk too: an earlier
        // line, the client's own, is not believed.
        let mut lines = HeaderMap::new();
        lines.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        lines.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff\xfe").expect("opaque bytes"),
        );
        assert_eq!(trusted.client_addr(ip("10.0.0.5"), &lines), ip("10.0.0.5"));
        // No proxy trusted: never believed.
        assert_eq!(
            TrustedProxies::default().client_addr(ip("10.0.0.5"), &headers),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn a_pool_bounds_each_client_and_everyone() {
        let pool = Pool::with_share(5, 2);
        let a = ClientKey::addr(ip("10.0.0.1"));
        let b = ClientKey::addr(ip("10.0.0.2"));
        let a1 = pool.try_acquire(Some(a)).expect("a's first");
        let a2 = pool.try_acquire(Some(a)).expect("a's second");
        assert_eq!(pool.try_acquire(Some(a)).err(), Some(Refused::ShareUsed));
        assert_eq!(pool.shares().held_by(&a), 2, "a refusal holds nothing");
        let b1 = pool.try_acquire(Some(b)).expect("b is apart");
        let admin1 = pool.try_acquire(None).expect("exempt from shares");
        let admin2 = pool.try_acquire(None).expect("exempt from shares");
        assert_eq!(pool.try_acquire(None).err(), Some(Refused::Full));
        assert_eq!(pool.try_acquire(Some(b)).err(), Some(Refused::Full));
        assert_eq!(pool.shares().held_by(&b), 1, "a full pool holds no share");
        drop((a1, admin1));
        let _a3 = pool.try_acquire(Some(a)).expect("a place given back");
        drop((a2, b1, admin2));
        assert_eq!(
            pool.shares().clients(),
            1,
            "entries leave with their last place"
        );
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn racing_clients_never_pass_their_share() {
        let pool = Arc::new(Pool::with_share(1_000, 3));
        let key = ClientKey::addr(ip("10.0.0.9"));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let pool = Arc::clone(&pool);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut most = 0;
                    for _ in 0..2_000 {
                        if let Ok(permit) = pool.try_acquire(Some(key)) {
                            most = most.max(pool.shares().held_by(&key));
                            drop(permit);
                        }
                    }
                    most
                })
            })
            .collect();
        for thread in threads {
            assert!(thread.join().expect("thread") <= 3);
        }
        assert_eq!(pool.shares().clients(), 0);
        assert_eq!(pool.available(), 1_000);
    }
}
