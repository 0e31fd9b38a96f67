//! Model-based property test: random sequences of map / unmap / partial
//! unmap / protection change / populate /
//! fault / hold / release / dirty operations from several clients against
//! the reference model of `tests/common/model.rs`, over the three table
//! formats and windows of guest addresses that cross leaf-table and
//! 512 GiB boundaries.

mod common;
#[path = "common/model.rs"]
mod harness;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]
    #[test]
    fn space_matches_model(cfg in 0..9usize, bytes in proptest::collection::vec(any::<u8>(), 8..800)) {
        let cfg = harness::configs()[cfg];
        let ops = harness::ops_from(&bytes);
        if let Err(e) = harness::run(&cfg, &ops) {
            prop_assert!(false, "{:?}: {}", cfg, e);
        }
    }
}
