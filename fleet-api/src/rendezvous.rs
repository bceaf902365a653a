//! Rendezvous (highest random weight) hashing: which of a set of hubs a key
//! (a partition) belongs to. Every party that sees the same set picks the
//! same hub; adding a hub moves only the keys it now wins (about 1/N), and
//! removing one moves only its own keys. Hubs use it to divide a region's
//! partitions and the concierge to send a device to its partition's hub.
//! (A dozen lines: a crate for it would cost more than it saves.)

use crate::hub::fnv1a64;

/// The weight of `candidate` for `key`: a well-mixed hash of both.
fn weight(key: &str, candidate: &str) -> u64 {
    let mut bytes = Vec::with_capacity(key.len() + candidate.len() + 1);
    bytes.extend_from_slice(candidate.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key.as_bytes());
    // FNV alone mixes the last bytes poorly; a splitmix64 finaliser fixes that.
    let mut z = fnv1a64(&bytes);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The candidate `key` belongs to, `None` when there is none. Ties (never
/// seen in practice) go to the greater name, so the choice is total.
pub fn pick<'a, I>(key: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    candidates.into_iter().max_by_key(|c| (weight(key, c), *c))
}

/// The key a partition is placed by.
pub fn partition_key(p: crate::PartitionId) -> String {
    format!("p{}", p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("hub-{i}")).collect()
    }

    #[test]
    fn the_choice_ignores_order_and_is_spread() {
        let h = hubs(4);
        let mut reversed = h.clone();
        reversed.reverse();
        let mut counts = std::collections::HashMap::new();
        for k in 0..4000 {
            let key = format!("p{k}");
            let a = pick(&key, h.iter().map(String::as_str)).unwrap();
            let b = pick(&key, reversed.iter().map(String::as_str)).unwrap();
            assert_eq!(a, b);
            *counts.entry(a).or_insert(0) += 1;
        }
        for (hub, n) in counts {
            assert!((800..1200).contains(&n), "{hub}: {n} of 4000");
        }
        assert_eq!(pick("p1", std::iter::empty()), None);
    }

    #[test]
    fn adding_a_hub_moves_only_what_it_wins() {
        let three = hubs(3);
        let four = hubs(4);
        let mut moved = 0;
        for k in 0..4000 {
            let key = format!("p{k}");
            let before = pick(&key, three.iter().map(String::as_str)).unwrap();
            let after = pick(&key, four.iter().map(String::as_str)).unwrap();
            if before != after {
                assert_eq!(after, "hub-3", "a key moved between old hubs");
                moved += 1;
            }
        }
        // About a quarter.
        assert!((800..1200).contains(&moved), "{moved} of 4000 moved");
    }
}
