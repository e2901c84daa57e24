//! A seeded bijection on `[0, n)` in O(1) memory: a balanced Feistel network on the smallest
//! even number of bits that covers `n`, with cycle walking to stay inside `[0, n)`.
//!
//! Because the bit width is even and at most two more than `log2(n)`, the network's domain is
//! under `4n`, so cycle walking takes fewer than 4 rounds of the network on average.

const ROUNDS: u64 = 6;

#[derive(Debug, Clone, Copy)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    mask: u64,
    key: u64,
}

impl Permutation {
    /// The permutation of `[0, n)` chosen by `key`.
    pub fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        Permutation {
            n,
            half_bits,
            mask: (1u64 << half_bits) - 1,
            key,
        }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The image of `i`; `i` must be below `len()`.
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n, "index {i} outside [0, {})", self.n);
        let mut x = i;
        loop {
            x = self.network(x);
            if x < self.n {
                return x;
            }
        }
    }

    fn network(&self, x: u64) -> u64 {
        let mut left = x >> self.half_bits;
        let mut right = x & self.mask;
        for round in 0..ROUNDS {
            let f = mix(self.key ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ right) & self.mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }
}

/// SplitMix64's finalizer: a fast, well-mixing 64-bit hash.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn is_a_bijection(n in 1u64..5000, key in any::<u64>()) {
            let p = Permutation::new(n, key);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i);
                prop_assert!(j < n);
                prop_assert!(!seen[j as usize], "{} hit twice", j);
                seen[j as usize] = true;
            }
        }
    }

    #[test]
    fn keys_give_different_orders_and_large_domains_work() {
        let a: Vec<u64> = (0..100)
            .map(|i| Permutation::new(100, 1).apply(i))
            .collect();
        let b: Vec<u64> = (0..100)
            .map(|i| Permutation::new(100, 2).apply(i))
            .collect();
        assert_ne!(a, b);
        let big = Permutation::new(3_000_000_000_000, 7);
        let x = big.apply(2_999_999_999_999);
        assert!(x < 3_000_000_000_000);
        let one = Permutation::new(1, 9);
        assert_eq!(one.apply(0), 0);
    }
}
