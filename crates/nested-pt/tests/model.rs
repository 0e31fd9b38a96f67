//! Model-based property test: random operation sequences (see
//! `common/mod.rs` for the operations and the reference model) on all
//! three formats, comparing every observable after every step. The regions
//! cross 2 MiB leaf-table, 1 GiB and 512 GiB root-slot boundaries, and the
//! generated sub-ranges (map_range, harvest, unmap) start and end anywhere
//! in them.

mod common;

use common::{Op, REGIONS};
use nested_pt::{Caps, PteFormat};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    let r = 0..REGIONS.len() as u8;
    let p = 0..520u16;
    prop_oneof![
        2 => r.clone().prop_map(Op::Toggle),
        1 => (r.clone(), 0..8u8).prop_map(|(r, n)| Op::PopulateLimited(r, n)),
        6 => (r.clone(), p.clone(), 0..4u8).prop_map(|(r, p, k)| Op::Map(r, p, k)),
        3 => (r.clone(), p.clone(), 0..4u8).prop_map(|(r, p, k)| Op::MapExclusive(r, p, k)),
        2 => (r.clone(), p.clone()).prop_map(|(r, p)| Op::Unmap(r, p)),
        1 => r.clone().prop_map(Op::UnmapRegion),
        1 => r.clone().prop_map(Op::UnmapVacate),
        3 => (r.clone(), p.clone(), 0..3u8).prop_map(|(r, p, a)| Op::Record(r, p, a)),
        2 => (r.clone(), p.clone(), any::<bool>()).prop_map(|(r, p, o)| Op::ResetA(r, p, o)),
        2 => (r.clone(), p.clone(), any::<bool>()).prop_map(|(r, p, o)| Op::ResetD(r, p, o)),
        2 => (r.clone(), any::<bool>()).prop_map(|(r, c)| Op::Harvest(r, c)),
        4 => (r.clone(), p.clone(), 0..3u8, any::<bool>()).prop_map(|(r, p, a, ad)| Op::Translate(r, p, a, ad)),
        3 => (r.clone(), p.clone(), p.clone(), 0..4u8, proptest::option::weighted(0.3, p.clone()), 0..4u8, any::<bool>())
            .prop_map(|(r, first, n, skip, bad, k, exclusive)| Op::MapRange { r, first, n, skip, bad, k, exclusive }),
        2 => (r.clone(), p.clone(), p.clone(), any::<bool>(), any::<bool>())
            .prop_map(|(r, first, n, clear, exclusive)| Op::HarvestSub { r, first, n, clear, exclusive }),
        1 => (r, p.clone(), p).prop_map(|(r, first, n)| Op::UnmapSub { r, first, n }),
    ]
}

fn check(fmt: PteFormat, ops: Vec<Op>) -> Result<(), TestCaseError> {
    common::run(fmt, &ops).map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn ept_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        check(PteFormat::ept(Caps::default()), ops)?;
    }

    #[test]
    fn ept_emulated_ad_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        check(PteFormat::ept_emulated_ad(Caps::default()), ops)?;
    }

    #[test]
    fn npt_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        check(PteFormat::npt(Caps::default()), ops)?;
    }

    #[test]
    fn vtd_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        check(PteFormat::vtd(Caps::default()), ops)?;
    }

    #[test]
    fn amd_vi_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        check(PteFormat::amd_vi(Caps::default()), ops)?;
    }

    /// The narrowest physical width: frames run past the limit part way,
    /// and single maps and ranges must refuse them and change nothing.
    #[test]
    fn narrow_formats_match_model(kind in 0..3u8, ops in proptest::collection::vec(op(), 1..80)) {
        let caps = Caps { phys_bits: 36, ..Caps::default() };
        let fmt = [PteFormat::ept(caps), PteFormat::ept_emulated_ad(caps), PteFormat::npt(caps)][kind as usize];
        check(fmt, ops)?;
    }
}

/// The regions the model uses cross the boundaries it claims to.
#[test]
fn regions_cross_boundaries() {
    let crosses = |span: u64| REGIONS.iter().filter(|(s, l, _)| s / span != (s + l - 1) / span).count();
    assert!(crosses(1 << 21) >= 2, "2 MiB leaf tables");
    assert!(crosses(1 << 30) >= 1, "1 GiB");
    let root = |size| REGIONS.iter().any(|(s, l, z)| *z == size && s >> 39 != (s + l - 1) >> 39);
    for size in [nested_pt::PageSize::Size4K, nested_pt::PageSize::Size2M, nested_pt::PageSize::Size1G] {
        assert!(root(size), "512 GiB root slots with {size:?} leaves");
    }
}
