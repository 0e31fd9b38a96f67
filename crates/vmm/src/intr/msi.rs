//! MSI decoding: the one place that turns an MSI address/data pair into a
//! [`MsiMessage`] (SDM vol. 3, "Message Signalled Interrupts").
//!
//! Address: bits 31:20 must be `0xFEE`, bits 19:12 the destination ID,
//! bit 3 the redirection hint (RH), bit 2 the destination mode (DM).
//! Data: bits 7:0 the vector, bits 10:8 the delivery mode, bit 14 the level
//! (assert), bit 15 the trigger mode.
//!
//! # The redirection hint
//!
//! FreeBSD's bhyve reads the destination as logical only when RH *and* DM
//! are both set ([`RhPolicy::RhAndDm`]); illumos' bhyve reads the
//! destination mode from DM alone and takes RH as a request for
//! lowest-priority arbitration ([`RhPolicy::DmOnly`]). The default is
//! [`RhPolicy::DmOnly`]: guests in logical flat mode (Linux' default for
//! up to 8 CPUs) program fixed-delivery MSIs with DM = 1 and RH = 0, which
//! the FreeBSD rule would misroute as physical destinations; KVM and QEMU
//! also take DM alone.
//!
//! Bits 63:32 of the address are ignored (no x2APIC extended destination
//! ID). The trigger-mode and level bits are decoded but, as in both
//! bhyves, MSIs are always delivered as edge-triggered interrupts.

use serde::{Deserialize, Serialize};

use super::dest::{DeliveryMode, Destination};

/// How the redirection hint combines with the destination mode bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RhPolicy {
    /// illumos (and KVM): DM alone selects logical mode; RH = 1 asks for
    /// lowest-priority arbitration among the destinations.
    #[default]
    DmOnly,
    /// FreeBSD: the destination is logical only if RH and DM are both set;
    /// RH has no other effect.
    RhAndDm,
}

/// A decoded MSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Where the message goes, after the [`RhPolicy`] is applied.
    pub dest: Destination,
    /// Address bit 3.
    pub redirection_hint: bool,
    /// Data bits 10:8.
    pub delivery: DeliveryMode,
    /// Whether delivery should arbitrate for the lowest-priority
    /// destination: the delivery mode is lowest priority, or (under
    /// [`RhPolicy::DmOnly`]) RH is set.
    pub lowest_priority: bool,
    /// Data bit 15 (decoded; delivery is edge regardless).
    pub level_triggered: bool,
    /// Data bit 14.
    pub assert: bool,
    /// Data bits 7:0.
    pub vector: u8,
}

/// Why an MSI address/data pair was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsiError {
    /// Address bits 31:20 are not `0xFEE`.
    NotInterruptAddress(u64),
    /// The delivery mode is reserved for MSIs (`011` or `110`).
    ReservedDeliveryMode(u8),
}

impl core::fmt::Display for MsiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MsiError::NotInterruptAddress(a) => write!(f, "MSI address {a:#x} is not 0xFEExxxxx"),
            MsiError::ReservedDeliveryMode(m) => write!(f, "MSI delivery mode {m:#05b} is reserved"),
        }
    }
}

impl std::error::Error for MsiError {}

/// Address bit 3: redirection hint.
pub const ADDR_RH: u64 = 1 << 3;
/// Address bit 2: destination mode (1 = logical).
pub const ADDR_DM: u64 = 1 << 2;

/// Decodes under the default policy ([`RhPolicy::DmOnly`]).
///
/// # Errors
///
/// As [`decode_with`].
pub fn decode(addr: u64, data: u32) -> Result<MsiMessage, MsiError> {
    decode_with(addr, data, RhPolicy::default())
}

/// Decodes under an explicit redirection-hint policy.
///
/// # Errors
///
/// [`MsiError::NotInterruptAddress`] if address bits 31:20 are not
/// `0xFEE`; [`MsiError::ReservedDeliveryMode`] for delivery mode `011` or
/// `110`.
pub fn decode_with(addr: u64, data: u32, policy: RhPolicy) -> Result<MsiMessage, MsiError> {
    if (addr & 0xfff0_0000) != 0xfee0_0000 {
        return Err(MsiError::NotInterruptAddress(addr));
    }
    let mode_bits = (data >> 8) & 7;
    let delivery = match DeliveryMode::from_bits(mode_bits) {
        Some(DeliveryMode::StartUp) | None => {
            return Err(MsiError::ReservedDeliveryMode(mode_bits as u8));
        }
        Some(m) => m,
    };
    let id = ((addr >> 12) & 0xff) as u8;
    let rh = addr & ADDR_RH != 0;
    let dm = addr & ADDR_DM != 0;
    let logical = match policy {
        RhPolicy::DmOnly => dm,
        RhPolicy::RhAndDm => rh && dm,
    };
    let lowest_priority = delivery == DeliveryMode::LowestPriority || (policy == RhPolicy::DmOnly && rh);
    Ok(MsiMessage {
        dest: if logical { Destination::Logical(id) } else { Destination::Physical(id) },
        redirection_hint: rh,
        delivery,
        lowest_priority,
        level_triggered: data & (1 << 15) != 0,
        assert: data & (1 << 14) != 0,
        vector: data as u8,
    })
}

/// Encodes an MSI address for a destination (the inverse of
/// [`decode_with`] under [`RhPolicy::DmOnly`] with RH clear): handy for
/// device models and tests.
pub fn address(dest: Destination) -> u64 {
    match dest {
        Destination::Physical(id) => 0xfee0_0000 | (u64::from(id) << 12),
        Destination::Logical(id) => 0xfee0_0000 | (u64::from(id) << 12) | ADDR_DM,
    }
}
