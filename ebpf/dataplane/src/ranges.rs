//! The prefixes that cover every service address (`RANGES`): packets to anything outside
//! them are no service's, and `from_pod` lets them go without a conntrack or service lookup.
//!
//! Cluster IPs come from one or two service CIDRs, so a handful of prefixes covers them
//! tightly. The cover is computed top down: the sorted addresses start as one range (the
//! common prefix of the lowest and highest), and the range spanning the most addresses is
//! split at its first differing bit until [`MAX_RANGES`] are in use or none can be split.

use std::net::Ipv4Addr;

use ebpf_common::{MAX_RANGES, Ranges};

/// A prefix: network address (host order) and length.
pub type Prefix = (u32, u8);

/// At most `max` prefixes covering every address of `addrs` (none for none).
pub fn cover(addrs: impl IntoIterator<Item = Ipv4Addr>, max: usize) -> Vec<Prefix> {
    let mut sorted: Vec<u32> = addrs.into_iter().map(u32::from).collect();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.is_empty() || max == 0 {
        return Vec::new();
    }
    let prefix_of = |lo: usize, hi: usize| -> Prefix {
        let len = (sorted[lo] ^ sorted[hi - 1]).leading_zeros() as u8;
        (network(sorted[lo], len), len)
    };
    // Ranges of the sorted list, [lo, hi), in order.
    let mut parts: Vec<(usize, usize)> = vec![(0, sorted.len())];
    while parts.len() < max {
        let widest = parts
            .iter()
            .enumerate()
            .filter(|(_, (lo, hi))| hi - lo >= 2)
            .max_by_key(|(_, (lo, hi))| 32 - u32::from(prefix_of(*lo, *hi).1));
        let Some((i, &(lo, hi))) = widest else {
            break;
        };
        // The lowest and highest address differ at the bit after the common prefix: the
        // addresses with it clear come first.
        let bit = 1u32 << (31 - prefix_of(lo, hi).1);
        let mid = lo + sorted[lo..hi].partition_point(|a| a & bit == 0);
        parts[i] = (lo, mid);
        parts.insert(i + 1, (mid, hi));
    }
    parts.iter().map(|&(lo, hi)| prefix_of(lo, hi)).collect()
}

/// Whether `addr` is inside one of `prefixes`.
pub fn covers(prefixes: &[Prefix], addr: Ipv4Addr) -> bool {
    let addr = u32::from(addr);
    prefixes.iter().any(|&(net, len)| network(addr, len) == net)
}

/// The map value for `prefixes` (at most [`MAX_RANGES`]).
pub fn value(prefixes: &[Prefix]) -> Ranges {
    let mut ranges = Ranges::default();
    for (i, &(net, len)) in prefixes.iter().take(MAX_RANGES).enumerate() {
        ranges.net[i] = net.to_be();
        ranges.mask[i] = mask(len).to_be();
        ranges.count += 1;
    }
    ranges
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn network(addr: u32, len: u8) -> u32 {
    addr & mask(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn one_service_cidr_is_one_tight_prefix_and_two_are_two() {
        let one: Vec<Ipv4Addr> = (0..1000u32)
            .map(|i| Ipv4Addr::from(u32::from(ip("10.96.0.0")) + i * 37))
            .collect();
        let prefixes = cover(one.iter().copied(), 1);
        assert_eq!(prefixes, vec![(u32::from(ip("10.96.0.0")), 16)]);

        let mut two = one.clone();
        two.extend((1..=50).map(|i| Ipv4Addr::new(172, 30, 0, i)));
        let prefixes = cover(two.iter().copied(), MAX_RANGES);
        assert!(prefixes.len() <= MAX_RANGES);
        for a in &two {
            assert!(covers(&prefixes, *a), "{a} is covered by {prefixes:?}");
        }
        for outside in ["10.244.1.2", "192.168.1.1", "172.31.0.1", "10.97.0.1"] {
            assert!(
                !covers(&prefixes, ip(outside)),
                "{outside} is outside {prefixes:?}"
            );
        }
    }

    #[test]
    fn every_address_is_covered_whatever_the_spread() {
        let mut state = 0x1234_5678u32;
        let addrs: Vec<Ipv4Addr> = (0..5000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                Ipv4Addr::from(state)
            })
            .collect();
        for max in [1, 2, 8] {
            let prefixes = cover(addrs.iter().copied(), max);
            assert!(prefixes.len() <= max);
            assert!(addrs.iter().all(|a| covers(&prefixes, *a)));
        }
        assert_eq!(
            cover([ip("10.96.0.10")], 8),
            vec![(u32::from(ip("10.96.0.10")), 32)]
        );
        assert!(cover([], 8).is_empty());
    }

    #[test]
    fn the_map_value_holds_network_order_prefixes() {
        let value = value(&[(u32::from(ip("10.96.0.0")), 12)]);
        assert_eq!(value.count, 1);
        assert_eq!(value.net[0], u32::from_ne_bytes([10, 96, 0, 0]));
        assert_eq!(value.mask[0], u32::from_ne_bytes([255, 240, 0, 0]));
    }
}
