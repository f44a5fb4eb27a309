//! IPv4 networks (`172.16.0.0/16`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 network: an address whose host bits are zero, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// The network `addr/prefix`; `None` when the prefix is over 32 or host bits are set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Net> {
        (prefix <= 32 && u32::from(addr) & !mask(prefix) == 0).then_some(Ipv4Net { addr, prefix })
    }

    pub fn addr(self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// The last address of the network.
    pub fn last(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !mask(self.prefix))
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// True when the two networks share an address.
    pub fn overlaps(self, other: Ipv4Net) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// How many subnets of `prefix` it holds (0 when `prefix` is shorter than its own).
    pub fn subnets(self, prefix: u8) -> u64 {
        if prefix < self.prefix || prefix > 32 {
            0
        } else {
            1u64 << (prefix - self.prefix)
        }
    }

    /// The `n`-th subnet of `prefix`.
    pub fn subnet(self, prefix: u8, n: u64) -> Option<Ipv4Net> {
        if n >= self.subnets(prefix) {
            return None;
        }
        let size = 1u64 << (32 - prefix);
        let base = u64::from(u32::from(self.addr)) + n * size;
        Ipv4Net::new(Ipv4Addr::from(base as u32), prefix)
    }

    /// The `n`-th address in the network (`.1` is `host(1)`).
    pub fn host(self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Ipv4Net, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or("expected an IPv4 network like 172.16.0.0/16")?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("'{p}' is not a prefix length (0 to 32)"))?;
        Ipv4Net::new(addr, prefix).ok_or_else(|| {
            format!(
                "host bits are set (the network is {}/{prefix})",
                Ipv4Addr::from(u32::from(addr) & mask(prefix))
            )
        })
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_subnets_and_overlap() {
        let pool: Ipv4Net = "172.16.0.0/16".parse().unwrap();
        assert_eq!(pool.subnets(30), 16384);
        assert_eq!(pool.subnet(30, 1).unwrap().to_string(), "172.16.0.4/30");
        assert_eq!(
            pool.subnet(30, 16383).unwrap().to_string(),
            "172.16.255.252/30"
        );
        assert!(pool.subnet(30, 16384).is_none());
        assert_eq!(pool.last(), Ipv4Addr::new(172, 16, 255, 255));
        let other: Ipv4Net = "172.16.8.0/24".parse().unwrap();
        assert!(pool.overlaps(other) && other.overlaps(pool));
        assert!(!pool.overlaps("172.17.0.0/16".parse().unwrap()));
        assert!("172.16.0.1/16"
            .parse::<Ipv4Net>()
            .unwrap_err()
            .contains("172.16.0.0/16"));
        assert!("172.16.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("172.16.0.0".parse::<Ipv4Net>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().subnets(30), 1 << 30);
    }
}
