//! Destination resolution: the one place that turns an APIC destination
//! (physical ID or logical message destination address) into the set of
//! vCPUs it names.
//!
//! Used by inter-processor interrupts, the I/O APIC and MSIs alike.
//! The set is a `u64` bitmask indexed by vCPU number, so at most
//! [`MAX_VCPUS`] vCPUs are addressable.

use serde::{Deserialize, Serialize};

/// The largest number of vCPUs (and local APICs) the model supports.
pub const MAX_VCPUS: usize = 64;

/// The destination broadcast value (physical ID or logical MDA).
pub const BROADCAST: u8 = 0xff;

/// A destination as written by the guest in an ICR, a redirection entry or
/// an MSI address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// Physical mode: an 8-bit local APIC ID; `0xff` is broadcast.
    Physical(u8),
    /// Logical mode: an 8-bit message destination address, matched against
    /// each local APIC's LDR under that APIC's DFR model.
    Logical(u8),
}

/// The logical destination model of one local APIC (DFR bits 31:28).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DfrModel {
    /// `0b1111`: the LDR's 8 bits are a flat bitmask.
    Flat,
    /// `0b0000`: LDR bits 7:4 are the cluster, bits 3:0 the member mask.
    Cluster,
    /// Any other value: the APIC matches no logical destination (as bhyve
    /// skips a vCPU whose guest programmed a bad model).
    Invalid,
}

impl DfrModel {
    /// The model named by a DFR register value.
    pub fn from_dfr(dfr: u32) -> DfrModel {
        match dfr >> 28 {
            0xf => DfrModel::Flat,
            0x0 => DfrModel::Cluster,
            _ => DfrModel::Invalid,
        }
    }
}

/// What destination resolution needs to know about one local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicView {
    /// The APIC ID (xAPIC: 8 bits).
    pub id: u8,
    /// The logical APIC ID (LDR bits 31:24).
    pub logical_id: u8,
    /// The logical destination model.
    pub model: DfrModel,
    /// The processor priority (for lowest-priority arbitration).
    pub ppr: u8,
}

/// Does a logical MDA match one APIC's logical ID under its model?
fn logical_match(mda: u8, view: &ApicView) -> bool {
    match view.model {
        DfrModel::Flat => view.logical_id & mda != 0,
        DfrModel::Cluster => (view.logical_id >> 4) == (mda >> 4) && (view.logical_id & mda & 0x0f) != 0,
        DfrModel::Invalid => false,
    }
}

/// The set of vCPUs (bit `i` = vCPU `i`) a destination names.
///
/// `0xff` is broadcast in both modes: every APIC (as bhyve, whatever the
/// APIC's DFR model). Physical: every APIC whose ID equals the
/// destination. Logical: every APIC whose LDR matches the MDA under its
/// own DFR model (flat: bitwise AND non-zero; cluster: same cluster nibble
/// and member masks intersect; an invalid model matches nothing). Entries
/// past [`MAX_VCPUS`] are ignored.
pub fn resolve(dest: Destination, apics: &[ApicView]) -> u64 {
    let mut mask = 0u64;
    for (i, view) in apics.iter().enumerate().take(MAX_VCPUS) {
        let hit = match dest {
            Destination::Physical(id) => id == BROADCAST || id == view.id,
            Destination::Logical(mda) => mda == BROADCAST || logical_match(mda, view),
        };
        if hit {
            mask |= 1 << i;
        }
    }
    mask
}

/// Lowest-priority arbitration: of the vCPUs in `mask`, the one with the
/// lowest PPR; ties go to the lowest vCPU number. Returns a mask with at
/// most one bit set (empty when `mask` is empty).
///
/// FreeBSD's bhyve picks the first (lowest-numbered) matching vCPU of a
/// logical destination without looking at priorities; arbitrating on PPR
/// is closer to the SDM, still deterministic, and reduces to bhyve's
/// choice when all PPRs are equal.
pub fn lowest_priority(mask: u64, apics: &[ApicView]) -> u64 {
    let mut best: Option<(u8, usize)> = None;
    for (i, view) in apics.iter().enumerate().take(MAX_VCPUS) {
        if mask & (1 << i) == 0 {
            continue;
        }
        if best.is_none_or(|(ppr, _)| view.ppr < ppr) {
            best = Some((view.ppr, i));
        }
    }
    best.map_or(0, |(_, i)| 1 << i)
}

/// The delivery mode field (bits 10:8 of an ICR low word, a redirection
/// entry and an MSI data word).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// `000`: the vector is delivered to every destination.
    Fixed,
    /// `001`: the vector is delivered to one destination, the one with the
    /// lowest processor priority.
    LowestPriority,
    /// `010`: system management interrupt.
    Smi,
    /// `100`: non-maskable interrupt.
    Nmi,
    /// `101`: INIT.
    Init,
    /// `110`: start-up IPI (ICR only; reserved in MSI and redirection
    /// entries).
    StartUp,
    /// `111`: external (8259-style) interrupt.
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit field; `011` is reserved everywhere and yields
    /// `None`. `110` decodes as [`DeliveryMode::StartUp`]; callers for
    /// which it is reserved reject it themselves.
    pub fn from_bits(bits: u32) -> Option<DeliveryMode> {
        Some(match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        })
    }
}
