//! PCI: a host bridge with ECAM configuration space, and the functions
//! behind it.
//!
//! The guest reaches configuration space through ECAM (PCI Express base
//! specification, "Enhanced Configuration Access Mechanism"): a memory
//! range in which function `bus:dev.fn`'s 4 KiB of configuration space is
//! at `bus << 20 | dev << 15 | fn << 12`. The range is MMIO: every access
//! traps and is emulated ([`crate::emul`] decodes the instruction, the VMM
//! calls [`PciBus::config_read`] / [`PciBus::config_write`]). One bus (bus
//! 0) is modelled; function 00.0 is the host bridge (class 06 00 00).
//!
//! The type-0 header is emulated here for every function: IDs and class
//! read-only, the command register's I/O, memory, bus-master and
//! INTx-disable bits writable, BARs with the sizing protocol (a write of
//! all ones reads back the size mask), interrupt line writable. A function
//! supplies its IDs, its BARs' kinds and sizes, and any device-specific
//! registers ([`PciFunction`]).
//!
//! # BAR decoding follows bhyve
//!
//! A memory BAR *decodes* (claims its address range) while the command
//! register's memory-space bit is set; bhyve re-registers a BAR at every
//! write of its address while decoding is on (`pci_emul.c`
//! `update_bar_address`), and so does this bus: each such write, and each
//! change of the memory-space bit, yields a [`BarChange`] that the VMM
//! applies (for a BAR backed by a device-memory segment: unmap the segment
//! at the old address, map it at the new one). For a 64-bit BAR the
//! address changes once per dword written, as on real hardware a guest
//! that moves a BAR with decoding on briefly decodes the intermediate
//! address; a BAR whose address does not fit the guest-physical space or
//! overlaps something is left undecoded by the VMM. Writes of the sizing
//! pattern (all ones) are not addresses: the BAR stops decoding until a
//! real address is written.

use std::collections::BTreeMap;

/// Bytes of configuration space per function.
pub const CONFIG_SPACE: u64 = 4096;
/// Bytes of ECAM space for bus 0 (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_BYTES: u64 = 32 * 8 * CONFIG_SPACE;

/// Type-0 header offsets.
mod reg {
    pub const VENDOR: u64 = 0x00;
    pub const COMMAND: u64 = 0x04;
    pub const STATUS: u64 = 0x06;
    pub const REVISION: u64 = 0x08;
    pub const BAR0: u64 = 0x10;
    pub const SUBSYSTEM: u64 = 0x2c;
    pub const INTERRUPT_LINE: u64 = 0x3c;
    pub const INTERRUPT_PIN: u64 = 0x3d;
}

/// Command-register bits the guest may set: I/O space, memory space, bus
/// master, INTx disable.
pub const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;
/// Command register: memory-space decoding on.
pub const COMMAND_MEMORY: u16 = 0x0002;

/// The kind and size of one BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR of `size` bytes (a power of two, at least 16).
    Mem32 {
        /// Size in bytes.
        size: u64,
    },
    /// A 64-bit memory BAR of `size` bytes: uses this BAR register and the
    /// next one (the upper half).
    Mem64 {
        /// Size in bytes (a power of two, at least 16).
        size: u64,
        /// Prefetchable (bit 3).
        prefetchable: bool,
    },
}

impl BarKind {
    fn size(self) -> u64 {
        match self {
            BarKind::Mem32 { size } | BarKind::Mem64 { size, .. } => size,
        }
    }
    /// The read-only low bits of the BAR register.
    fn flags(self) -> u32 {
        match self {
            BarKind::Mem32 { .. } => 0,
            BarKind::Mem64 { prefetchable, .. } => 0b100 | if prefetchable { 0b1000 } else { 0 },
        }
    }
}

/// What a PCI function tells the bus about itself.
pub trait PciFunction: Send {
    /// Vendor and device id.
    fn ids(&self) -> (u16, u16);
    /// Class code (base, sub, programming interface) as `0xBBSSPP`, and the
    /// revision.
    fn class(&self) -> (u32, u8);
    /// Subsystem vendor and id.
    fn subsystem(&self) -> (u16, u16) {
        (0, 0)
    }
    /// The six BAR slots (a 64-bit BAR's upper slot is `None`).
    fn bars(&self) -> [Option<BarKind>; 6];
    /// The interrupt pin (0: none, 1: INTA ...).
    fn interrupt_pin(&self) -> u8 {
        0
    }
    /// Reads of device-specific configuration space (offset 0x40 and up):
    /// all zeros unless overridden.
    fn config_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Writes of device-specific configuration space; ignored unless
    /// overridden.
    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}
    /// Downcasting for the VMM (to reach a device model behind the bus).
    fn as_any(&mut self) -> &mut dyn std::any::Any;
}

/// A change of where a BAR decodes, for the VMM to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarChange {
    /// Device number on bus 0.
    pub device: u8,
    /// Function number.
    pub function: u8,
    /// BAR index (the lower slot of a 64-bit BAR).
    pub bar: u8,
    /// Size of the BAR.
    pub size: u64,
    /// Where it decoded before, if it did.
    pub old: Option<u64>,
    /// Where it decodes now, if it does.
    pub new: Option<u64>,
}

/// Where an ECAM offset points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0-31).
    pub device: u8,
    /// Function (0-7).
    pub function: u8,
}

impl Bdf {
    /// Splits an ECAM offset into function and register offset.
    pub fn from_ecam(offset: u64) -> (Bdf, u64) {
        let bdf = Bdf {
            bus: ((offset >> 20) & 0xff) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        (bdf, offset & (CONFIG_SPACE - 1))
    }
}

struct Slot {
    func: Box<dyn PciFunction>,
    command: u16,
    /// BAR register values as the guest wrote them (address bits only).
    bars: [u32; 6],
    interrupt_line: u8,
}

impl Slot {
    fn kinds(&self) -> [Option<BarKind>; 6] {
        self.func.bars()
    }

    /// The address BAR `i` decodes at, if it does.
    fn decoded(&self, i: usize) -> Option<u64> {
        if self.command & COMMAND_MEMORY == 0 {
            return None;
        }
        let kind = self.kinds()[i]?;
        let mask = !(kind.size() - 1);
        let addr = match kind {
            BarKind::Mem32 { .. } => u64::from(self.bars[i] & !0xf),
            BarKind::Mem64 { .. } => u64::from(self.bars[i] & !0xf) | u64::from(*self.bars.get(i + 1)?) << 32,
        } & mask;
        // The sizing pattern (all address bits set) is not an address.
        let all_ones = match kind {
            BarKind::Mem32 { .. } => u64::from(u32::MAX) & mask,
            BarKind::Mem64 { .. } => mask,
        };
        (addr != 0 && addr != all_ones).then_some(addr)
    }

    /// The 32-bit register of BAR slot `i` as the guest reads it.
    fn bar_reg(&self, i: usize) -> u32 {
        let kinds = self.kinds();
        match kinds[i] {
            Some(kind @ BarKind::Mem32 { size }) => (self.bars[i] & !(size as u32 - 1) & !0xf) | kind.flags(),
            Some(kind @ BarKind::Mem64 { size, .. }) => {
                (self.bars[i] & !((size as u32).wrapping_sub(1)) & !0xf) | kind.flags()
            }
            None if i > 0 && matches!(kinds[i - 1], Some(BarKind::Mem64 { .. })) => {
                let size = kinds[i - 1].map_or(0, BarKind::size);
                // Upper half: bits of the size above 4 GiB are read-only 0.
                self.bars[i] & !(((size - 1) >> 32) as u32)
            }
            None => 0,
        }
    }
}

/// Bus 0 behind an ECAM window.
pub struct PciBus {
    slots: BTreeMap<(u8, u8), Slot>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus").field("functions", &self.slots.keys().collect::<Vec<_>>()).finish()
    }
}

/// The host bridge at 00.0.
struct HostBridge;

impl PciFunction for HostBridge {
    fn ids(&self) -> (u16, u16) {
        // Intel's 82G33/Q35 DRAM controller ids, which every OS knows as a
        // plain host bridge.
        (0x8086, 0x29c0)
    }
    fn class(&self) -> (u32, u8) {
        (0x06_00_00, 0)
    }
    fn bars(&self) -> [Option<BarKind>; 6] {
        [None; 6]
    }
    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Why a function could not be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// Device above 31 or function above 7.
    BadSlot,
    /// The slot is taken.
    InUse,
    /// A BAR size that is not a power of two of at least 16 bytes (4 KiB
    /// for a BAR that can be mapped), or a 64-bit BAR in slot 5, or a
    /// 64-bit BAR's upper slot not left empty.
    BadBar,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge at 00.0.
    pub fn new() -> Self {
        let mut b = PciBus { slots: BTreeMap::new() };
        b.attach(0, 0, Box::new(HostBridge)).expect("slot 00.0 is free on a new bus");
        b
    }

    /// Attaches `func` at `device.function` of bus 0.
    pub fn attach(&mut self, device: u8, function: u8, func: Box<dyn PciFunction>) -> Result<(), AttachError> {
        if device > 31 || function > 7 {
            return Err(AttachError::BadSlot);
        }
        if self.slots.contains_key(&(device, function)) {
            return Err(AttachError::InUse);
        }
        let bars = func.bars();
        for (i, b) in bars.iter().enumerate() {
            match b {
                Some(k) if !k.size().is_power_of_two() || k.size() < 4096 => return Err(AttachError::BadBar),
                Some(BarKind::Mem64 { .. }) if i == 5 || bars[i + 1].is_some() => return Err(AttachError::BadBar),
                Some(BarKind::Mem32 { size }) if *size > 1 << 31 => return Err(AttachError::BadBar),
                _ => {}
            }
        }
        self.slots.insert((device, function), Slot { func, command: 0, bars: [0; 6], interrupt_line: 0xff });
        Ok(())
    }

    /// The function at `device.function`, for the VMM to reach its model.
    pub fn function_mut(&mut self, device: u8, function: u8) -> Option<&mut (dyn PciFunction + 'static)> {
        self.slots.get_mut(&(device, function)).map(|s| &mut *s.func)
    }

    /// The size of BAR `bar` of `device.function`, if it is implemented
    /// (the lower slot of a 64-bit BAR).
    pub fn bar_size(&self, device: u8, function: u8, bar: u8) -> Option<u64> {
        let kinds = self.slots.get(&(device, function))?.kinds();
        kinds.get(usize::from(bar))?.map(BarKind::size)
    }

    /// Where BAR `bar` of `device.function` decodes now.
    pub fn bar_address(&self, device: u8, function: u8, bar: u8) -> Option<u64> {
        self.slots.get(&(device, function))?.decoded(usize::from(bar).min(5))
    }

    /// Reads `data.len()` bytes (1, 2 or 4, naturally aligned; anything
    /// else reads all ones, as an unsupported request) at ECAM `offset`.
    /// Functions that do not exist read all ones.
    pub fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let (bdf, off) = Bdf::from_ecam(offset);
        let n = data.len() as u64;
        let ok = bdf.bus == 0 && matches!(n, 1 | 2 | 4) && off.is_multiple_of(n);
        let Some(slot) = self.slots.get_mut(&(bdf.device, bdf.function)).filter(|_| ok) else {
            data.fill(0xff);
            return;
        };
        if off >= 0x40 {
            slot.func.config_read(off, data);
            return;
        }
        let dword = Self::header_dword(slot, off & !3);
        let bytes = dword.to_le_bytes();
        let at = (off & 3) as usize;
        data.copy_from_slice(&bytes[at..at + data.len()]);
    }

    fn header_dword(slot: &Slot, off: u64) -> u32 {
        let (vendor, device) = slot.func.ids();
        let (class, rev) = slot.func.class();
        let (sv, sd) = slot.func.subsystem();
        match off {
            reg::VENDOR => u32::from(vendor) | u32::from(device) << 16,
            reg::COMMAND => u32::from(slot.command),
            reg::REVISION => u32::from(rev) | class << 8,
            // Header type 0, single-function unless functions above 0 exist
            // (not modelled: always 0).
            0x0c => 0,
            o if (reg::BAR0..reg::BAR0 + 24).contains(&o) => slot.bar_reg(((o - reg::BAR0) / 4) as usize),
            reg::SUBSYSTEM => u32::from(sv) | u32::from(sd) << 16,
            reg::INTERRUPT_LINE => u32::from(slot.interrupt_line) | u32::from(slot.func.interrupt_pin()) << 8,
            _ => 0,
        }
    }

    /// Writes `data` (1, 2 or 4 bytes, naturally aligned; others are
    /// dropped) at ECAM `offset`. Returns the BAR decoding changes the write
    /// caused, for the VMM to apply.
    pub fn config_write(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange> {
        let (bdf, off) = Bdf::from_ecam(offset);
        let n = data.len() as u64;
        let Some(slot) = self.slots.get_mut(&(bdf.device, bdf.function)) else { return Vec::new() };
        if bdf.bus != 0 || !matches!(n, 1 | 2 | 4) || !off.is_multiple_of(n) {
            return Vec::new();
        }
        if off >= 0x40 {
            slot.func.config_write(off, data);
            return Vec::new();
        }
        let kinds = slot.kinds();
        let before: Vec<Option<u64>> = (0..6).map(|i| slot.decoded(i)).collect();
        // Merge the bytes into the dword they belong to.
        let base = off & !3;
        let mut dword = match base {
            reg::COMMAND => u32::from(slot.command),
            o if (reg::BAR0..reg::BAR0 + 24).contains(&o) => slot.bars[((o - reg::BAR0) / 4) as usize],
            reg::INTERRUPT_LINE => u32::from(slot.interrupt_line),
            _ => return Vec::new(), // read-only registers
        }
        .to_le_bytes();
        let at = (off - base) as usize;
        dword[at..at + data.len()].copy_from_slice(data);
        let v = u32::from_le_bytes(dword);
        match base {
            reg::COMMAND => {
                // Status (upper half) is read-only here: no error bits.
                if off < reg::STATUS {
                    slot.command = (v as u16) & COMMAND_WRITABLE;
                }
            }
            reg::INTERRUPT_LINE => {
                if off < reg::INTERRUPT_PIN {
                    slot.interrupt_line = v as u8;
                }
            }
            o => {
                let i = ((o - reg::BAR0) / 4) as usize;
                let implemented = kinds[i].is_some() || (i > 0 && matches!(kinds[i - 1], Some(BarKind::Mem64 { .. })));
                if implemented {
                    slot.bars[i] = v;
                }
            }
        }
        let mut changes = Vec::new();
        for (i, old) in before.into_iter().enumerate() {
            let Some(kind) = kinds[i] else { continue };
            let new = slot.decoded(i);
            if new != old {
                changes.push(BarChange {
                    device: bdf.device,
                    function: bdf.function,
                    bar: i as u8,
                    size: kind.size(),
                    old,
                    new,
                });
            }
        }
        changes
    }
}
