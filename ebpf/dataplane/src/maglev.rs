//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), computed in userspace; the kernel
//! only indexes the table with a hash of the client's address and port.
//!
//! Each backend walks its own permutation of the M table positions (from an offset and a skip
//! derived from its address) and the backends take turns claiming the next free position on
//! their walk. Every backend ends up with M/N positions, give or take one, and removing a
//! backend mostly reassigns only the positions it held.

use std::net::SocketAddrV4;

/// Table sizes must be prime (so every skip generates a full permutation) and at most this
/// large; entries are u16 backend indices.
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// Builds the table: entry `i` is the position in `backends` of the backend serving hash
/// `i % m`. Positions are assigned from the backends' addresses alone, so the same backend set
/// yields the same table whatever order it is listed in (only the indices differ).
///
/// `m` must be a prime larger than the number of backends (checked by the caller) and
/// `backends` non-empty. A backend listed k times claims k times as many positions.
pub fn table(backends: &[SocketAddrV4], m: u32) -> Vec<u16> {
    assert!(!backends.is_empty() && backends.len() < m as usize);
    // Claim in a canonical order so the table depends on the set, not on the slot order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    let walks: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let key = addr_key(backends[i]);
            let offset = mix(key ^ 0x6d61_676c_6576_3031) % u64::from(m);
            let skip = mix(key ^ 0x736b_6970_7365_6564) % (u64::from(m) - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut entries = vec![u16::MAX; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (turn, &(offset, skip)) in walks.iter().enumerate() {
            let mut pos = (offset + next[turn] * skip) % u64::from(m);
            while entries[pos as usize] != u16::MAX {
                next[turn] += 1;
                pos = (offset + next[turn] * skip) % u64::from(m);
            }
            entries[pos as usize] = order[turn] as u16;
            next[turn] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entries
}

/// Whether `n` is prime (table sizes are validated with it).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn addr_key(addr: SocketAddrV4) -> u64 {
    (u64::from(addr.ip().to_bits()) << 16) | u64::from(addr.port())
}

/// splitmix64's finaliser: a stable, well-mixed 64-bit hash (tables must not change when the
/// process restarts or is rebuilt, so no randomly keyed hasher).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use super::*;

    fn backends(n: u8) -> Vec<SocketAddrV4> {
        (1..=n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, i), 8080))
            .collect()
    }

    fn shares(table: &[u16], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &e in table {
            counts[e as usize] += 1;
        }
        counts
    }

    #[test]
    fn spread_is_even() {
        for (n, m) in [(3u8, 251u32), (10, 1021), (10, 16_381), (100, 16_381)] {
            let table = table(&backends(n), m);
            let counts = shares(&table, n as usize);
            let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
            // Maglev's guarantee: every backend gets floor(M/N) or ceil(M/N) positions... up to
            // the last round, so the spread is at most one position apart.
            assert!(
                max - min <= 1,
                "{n} backends over {m} entries: shares {min}..{max}, expected within one"
            );
        }
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        let m = 16_381;
        let all = backends(10);
        let before = table(&all, m);
        let removed = all[3];
        let rest: Vec<_> = all.iter().copied().filter(|&b| b != removed).collect();
        let after = table(&rest, m);
        let owner_before = |i: usize| all[before[i] as usize];
        let owner_after = |i: usize| rest[after[i] as usize];
        let mut moved_elsewhere = 0;
        for i in 0..m as usize {
            let old = owner_before(i);
            if old == removed {
                continue;
            }
            if owner_after(i) != old {
                moved_elsewhere += 1;
            }
        }
        let kept = m as usize - shares(&before, 10)[3];
        let fraction = moved_elsewhere as f64 / kept as f64;
        // The paper measures a few percent at most; a modulo hash would move ~90%.
        assert!(
            fraction < 0.05,
            "{moved_elsewhere} of {kept} entries not owned by the removed backend moved ({:.1}%)",
            fraction * 100.0
        );
    }

    #[test]
    fn table_depends_on_the_set_not_the_order() {
        let m = 1021;
        let all = backends(7);
        let mut shuffled = all.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        let a = table(&all, m);
        let b = table(&shuffled, m);
        for i in 0..m as usize {
            assert_eq!(all[a[i] as usize], shuffled[b[i] as usize], "entry {i}");
        }
    }

    #[test]
    fn adding_a_backend_takes_its_share_mostly_from_others_evenly() {
        let m = 16_381;
        let all = backends(10);
        let fewer = &all[..9];
        let before = table(fewer, m);
        let after = table(&all, m);
        let mut taken_from: HashMap<SocketAddrV4, usize> = HashMap::new();
        for i in 0..m as usize {
            let (old, new) = (fewer[before[i] as usize], all[after[i] as usize]);
            if old != new {
                *taken_from.entry(old).or_default() += 1;
            }
        }
        let newcomer = shares(&after, 10)[9];
        let moved: usize = taken_from.values().sum();
        assert!(
            moved <= newcomer + newcomer / 10,
            "adding one backend moved {moved} entries; it took {newcomer}"
        );
    }

    #[test]
    fn primes() {
        assert!(is_prime(16_381) && is_prime(1021) && is_prime(2) && is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(1) && !is_prime(16_383) && !is_prime(1024));
    }
}
