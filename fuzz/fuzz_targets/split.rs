//! Shared by the fuzz targets: how the input is cut into reads.

/// The first byte sets how the rest (the wire) is split into reads.
pub fn split(data: &[u8]) -> (Vec<u8>, &[u8]) {
    match data.split_first() {
        Some((&seed, wire)) => {
            let mut state = u32::from(seed) | 1;
            let splits = (0..wire.len())
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state >> 24) as u8
                })
                .collect();
            (splits, wire)
        }
        None => (Vec::new(), data),
    }
}
