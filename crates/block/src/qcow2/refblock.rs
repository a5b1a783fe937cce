//! The entries of qcow2 refcount blocks: how a refcount of 1 to 64 bits is laid out in a
//! block, and how many a block holds. Pure functions on bytes (no state, any thread), shared
//! by the refcount engine and by the offline check and repair, which read and rebuild
//! refcount blocks without it.

/// Entries per refcount block for a cluster size and refcount width.
pub(super) fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> refcount_order
}

/// Decodes entry `index` of a refcount block of `bits`-bit entries.
pub(super) fn decode(bits: u64, block: &[u8], index: u64) -> u64 {
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        block[at..at + width]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    } else {
        let bit = index * bits;
        (u64::from(block[(bit / 8) as usize]) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Encodes `value` into entry `index`; returns the byte range that changed.
pub(super) fn encode(
    bits: u64,
    block: &mut [u8],
    index: u64,
    value: u64,
) -> std::ops::Range<usize> {
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        let bytes = value.to_be_bytes();
        block[at..at + width].copy_from_slice(&bytes[8 - width..]);
        at..at + width
    } else {
        let bit = index * bits;
        let byte = (bit / 8) as usize;
        let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
        block[byte] = (block[byte] & !mask) | (((value << (bit % 8)) as u8) & mask);
        byte..byte + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits per entry, entry index, value; the bytes it sets and the range `encode` reports.
    type Layout = (
        u64,
        u64,
        u64,
        &'static [(usize, u8)],
        std::ops::Range<usize>,
    );

    #[test]
    fn entries_are_laid_out_as_qcow2_specifies() {
        // Narrow entries fill each byte from its least significant bit; wide ones are big-endian.
        let cases: [Layout; 7] = [
            (1, 3, 1, &[(0, 0b0000_1000)], 0..1),
            (2, 5, 3, &[(1, 0b0000_1100)], 1..2),
            (4, 1, 0xa, &[(0, 0xa0)], 0..1),
            (8, 2, 0xab, &[(2, 0xab)], 2..3),
            (16, 1, 0x1234, &[(2, 0x12), (3, 0x34)], 2..4),
            (32, 1, 0x0102_0304, &[(4, 1), (5, 2), (6, 3), (7, 4)], 4..8),
            (
                64,
                1,
                0x0102_0304_0506_0708,
                &[
                    (8, 1),
                    (9, 2),
                    (10, 3),
                    (11, 4),
                    (12, 5),
                    (13, 6),
                    (14, 7),
                    (15, 8),
                ],
                8..16,
            ),
        ];
        for (bits, index, value, bytes, range) in cases {
            let mut block = vec![0u8; 64];
            assert_eq!(encode(bits, &mut block, index, value), range, "{bits} bits");
            for &(at, byte) in bytes {
                assert_eq!(block[at], byte, "{bits} bits, byte {at}");
            }
            let set = block.iter().filter(|&&b| b != 0).count();
            assert!(set <= bytes.len(), "{bits} bits: stray bytes {block:?}");
            assert_eq!(decode(bits, &block, index), value, "{bits} bits");
            assert_eq!(decode(bits, &block, index + 1), 0, "{bits} bits");
        }
        assert_eq!(entries_per_block(16, 4), 32768);
        assert_eq!(entries_per_block(9, 0), 4096);
        assert_eq!(entries_per_block(9, 6), 64);
    }

    #[test]
    fn refcount_entries_of_every_width_keep_their_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / bits;
            for index in 0..entries {
                encode(bits, &mut block, index, index % 3 % (max.min(2) + 1));
            }
            for index in [0, 1, entries / 2, entries - 1] {
                encode(bits, &mut block, index, max);
                assert_eq!(decode(bits, &block, index), max, "order {order}");
                if index + 1 < entries {
                    let expected = (index + 1) % 3 % (max.min(2) + 1);
                    assert_eq!(decode(bits, &block, index + 1), expected, "order {order}");
                }
                encode(bits, &mut block, index, 0);
                assert_eq!(decode(bits, &block, index), 0, "order {order}");
            }
        }
    }
}
