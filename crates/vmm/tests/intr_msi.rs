//! MSI decoding tables under both redirection-hint policies, and the
//! destination resolver.

use vmm::intr::dest::{ApicView, BROADCAST, DeliveryMode, Destination, DfrModel, lowest_priority, resolve};
use vmm::intr::msi::{self, MsiError, RhPolicy};

const BASE: u64 = 0xfee0_0000;

fn addr(dest: u8, rh: bool, dm: bool) -> u64 {
    BASE | (u64::from(dest) << 12) | (u64::from(rh) << 3) | (u64::from(dm) << 2)
}

#[test]
fn default_policy_is_dm_only() {
    assert_eq!(RhPolicy::default(), RhPolicy::DmOnly);
    let a = addr(3, false, true);
    assert_eq!(msi::decode(a, 0x41), msi::decode_with(a, 0x41, RhPolicy::DmOnly));
}

/// (rh, dm) -> (logical?, lowest-priority?) for each policy, fixed delivery.
#[test]
fn rh_dm_table_both_policies() {
    let table: [(bool, bool, bool, bool, bool, bool); 4] = [
        // rh, dm, DmOnly logical, DmOnly lowest, RhAndDm logical, RhAndDm lowest
        (false, false, false, false, false, false),
        (false, true, true, false, false, false),
        (true, false, false, true, false, false),
        (true, true, true, true, true, false),
    ];
    for (rh, dm, dl, dlp, fl, flp) in table {
        for dest_id in [0u8, 1, 0x12, 0xff] {
            let a = addr(dest_id, rh, dm);
            let m = msi::decode_with(a, 0x30, RhPolicy::DmOnly).unwrap();
            let want = if dl { Destination::Logical(dest_id) } else { Destination::Physical(dest_id) };
            assert_eq!(m.dest, want, "DmOnly rh={rh} dm={dm}");
            assert_eq!(m.lowest_priority, dlp);
            assert_eq!(m.redirection_hint, rh);
            let m = msi::decode_with(a, 0x30, RhPolicy::RhAndDm).unwrap();
            let want = if fl { Destination::Logical(dest_id) } else { Destination::Physical(dest_id) };
            assert_eq!(m.dest, want, "RhAndDm rh={rh} dm={dm}");
            assert_eq!(m.lowest_priority, flp);
        }
    }
}

#[test]
fn data_fields() {
    let a = addr(5, false, false);
    for (mode, want) in [
        (0, Some(DeliveryMode::Fixed)),
        (1, Some(DeliveryMode::LowestPriority)),
        (2, Some(DeliveryMode::Smi)),
        (3, None),
        (4, Some(DeliveryMode::Nmi)),
        (5, Some(DeliveryMode::Init)),
        (6, None),
        (7, Some(DeliveryMode::ExtInt)),
    ] {
        let r = msi::decode(a, (mode << 8) | 0x55);
        match want {
            Some(d) => {
                let m = r.unwrap();
                assert_eq!(m.delivery, d);
                assert_eq!(m.vector, 0x55);
                assert_eq!(m.lowest_priority, d == DeliveryMode::LowestPriority);
            }
            None => assert_eq!(r, Err(MsiError::ReservedDeliveryMode(mode as u8))),
        }
    }
    let m = msi::decode(a, 0x8000 | 0x4000 | 0xfe).unwrap();
    assert!(m.level_triggered && m.assert);
    assert_eq!(m.vector, 0xfe);
    let m = msi::decode(a, 0x4000).unwrap();
    assert!(!m.level_triggered && m.assert);
    // Bits outside the defined fields are ignored.
    let m = msi::decode(a, 0xffff_0000 | 0x3822).unwrap();
    assert_eq!(m.vector, 0x22);
    assert!(!m.level_triggered && !m.assert);
    assert_eq!(m.delivery, DeliveryMode::Fixed);
}

#[test]
fn address_checks() {
    for bad in [0u64, 0xfed0_0000, 0xfef0_0000, 0xfff0_0000, 0x1fee_0000_u64 & 0xffff_0000] {
        assert_eq!(msi::decode(bad, 0x30), Err(MsiError::NotInterruptAddress(bad)));
    }
    // Destination bits 19:12; the upper address dword and bits 11:4, 1:0
    // are ignored.
    let m = msi::decode(0x1_0000_0000 | BASE | 0xab000 | 0xff3, 0x30).unwrap();
    assert_eq!(m.dest, Destination::Physical(0xab));
    assert!(!m.redirection_hint);
    assert_eq!(msi::address(Destination::Physical(7)), 0xfee0_7000);
    assert_eq!(msi::address(Destination::Logical(7)), 0xfee0_7004);
}

fn views() -> Vec<ApicView> {
    // vCPU 0-3: flat, logical IDs 1,2,4,8. vCPU 4-7: cluster, 0x11,0x12,0x21,0x22.
    let mut v = Vec::new();
    for (i, ldr) in [1u8, 2, 4, 8].into_iter().enumerate() {
        v.push(ApicView { id: i as u8, logical_id: ldr, model: DfrModel::Flat, ppr: 0x40 - i as u8 * 0x10 });
    }
    for (i, ldr) in [0x11u8, 0x12, 0x21, 0x22].into_iter().enumerate() {
        v.push(ApicView { id: 4 + i as u8, logical_id: ldr, model: DfrModel::Cluster, ppr: 0x20 });
    }
    v.push(ApicView { id: 8, logical_id: 0xff, model: DfrModel::Invalid, ppr: 0 });
    v
}

#[test]
fn resolve_table() {
    let v = views();
    let cases = [
        (Destination::Physical(0), 0b1),
        (Destination::Physical(5), 0b10_0000),
        (Destination::Physical(8), 1 << 8),
        (Destination::Physical(9), 0),
        (Destination::Physical(BROADCAST), 0x1ff),
        // Flat: AND with the logical ID. Cluster APICs match 0x03 only if
        // their cluster nibble is 0: none here.
        (Destination::Logical(0x03), 0b0011),
        (Destination::Logical(0x0c), 0b1100),
        // 0x11 as flat matches logical ID 1; as cluster 1 member 1 matches 0x11.
        (Destination::Logical(0x11), 0b1_0001),
        (Destination::Logical(0x13), 0b11_0011),
        (Destination::Logical(0x23), 0b1100_0011),
        (Destination::Logical(0x20), 0),
        // Logical broadcast: every APIC, whatever its model (bhyve).
        (Destination::Logical(BROADCAST), 0x1ff),
        (Destination::Logical(0), 0),
    ];
    for (d, want) in cases {
        assert_eq!(resolve(d, &v), want, "{d:?}");
    }
}

#[test]
fn lowest_priority_picks_lowest_ppr_then_lowest_index() {
    let v = views();
    assert_eq!(lowest_priority(0b1111, &v), 0b1000);
    assert_eq!(lowest_priority(0b0011, &v), 0b0010);
    // vCPU 4-7 tie at 0x20: the lowest index wins.
    assert_eq!(lowest_priority(0xf0, &v), 0x10);
    assert_eq!(lowest_priority(0, &v), 0);
    assert_eq!(lowest_priority(1 << 63, &v), 0);
}

#[test]
fn dfr_model_decoding() {
    assert_eq!(DfrModel::from_dfr(0xffff_ffff), DfrModel::Flat);
    assert_eq!(DfrModel::from_dfr(0x0fff_ffff), DfrModel::Cluster);
    for m in 1..15u32 {
        assert_eq!(DfrModel::from_dfr((m << 28) | 0x0fff_ffff), DfrModel::Invalid);
    }
}

/// Every data word's low 16 bits under every RH/DM combination: the fields
/// come out where the SDM puts them, and only modes 011 and 110 fail.
#[test]
fn exhaustive_data_and_flags() {
    for policy in [RhPolicy::DmOnly, RhPolicy::RhAndDm] {
        for flags in 0..4u64 {
            let a = BASE | 0x5a000 | (flags << 2);
            for data in 0..=0xffffu32 {
                let mode = (data >> 8) & 7;
                match msi::decode_with(a, data, policy) {
                    Err(e) => {
                        assert!(mode == 3 || mode == 6);
                        assert_eq!(e, MsiError::ReservedDeliveryMode(mode as u8));
                    }
                    Ok(m) => {
                        assert_eq!(u32::from(m.vector), data & 0xff);
                        assert_eq!(m.level_triggered, data & 0x8000 != 0);
                        assert_eq!(m.assert, data & 0x4000 != 0);
                        let dm = flags & 1 != 0;
                        let rh = flags & 2 != 0;
                        let logical = match policy {
                            RhPolicy::DmOnly => dm,
                            RhPolicy::RhAndDm => dm && rh,
                        };
                        let id = 0x5a;
                        assert_eq!(m.dest, if logical { Destination::Logical(id) } else { Destination::Physical(id) });
                    }
                }
            }
        }
    }
}
