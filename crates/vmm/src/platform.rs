//! The emulated platform around a [`Vm`]: the PCI bus behind its ECAM
//! window, BARs backed by memory segments or emulated, and the MMIO
//! dispatch that trapped accesses reach.
//!
//! An access the nested table cannot serve (no mapping: the range is a
//! device's) comes here after instruction emulation has worked out its
//! address, size and value: [`Platform::mmio_read`] /
//! [`Platform::mmio_write`] find the claimant (the ECAM window, or an
//! emulated BAR of a PCI function where it decodes now) and call its model.
//! A configuration write that moves a BAR backed by a device-memory segment
//! is applied at once: the segment is unmapped at the old address and
//! mapped at the new one (vmspace's unmap invalidates every client and
//! kicks running vCPUs, so no stale translation of the old address
//! survives). Accesses nobody claims read all ones and drop writes, as a
//! PCI master abort does.

use std::collections::BTreeMap;

use vmspace::{Prot, TablePages};

use crate::fbuf::Fbuf;
use crate::pci::{BarChange, PciBus, PciFunction};
use crate::vm::Vm;

/// Default base of the ECAM window (below the 4 GiB boot ROM hole).
pub const ECAM_BASE: u64 = 0xe000_0000;

/// What backs a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarBacking {
    /// A memory segment, mapped wherever the BAR decodes, with `prot`.
    Segment {
        /// The segment id.
        id: u32,
        /// The mapping's protection.
        prot: Prot,
    },
    /// Trapped and emulated by the function's model (register pages).
    Emulated,
}

/// Counters of the platform.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlatformStats {
    /// MMIO reads and writes served by a model.
    pub mmio: u64,
    /// Accesses nobody claimed (master aborts).
    pub unclaimed: u64,
    /// BAR moves applied (segment unmapped at one address and mapped at
    /// another, or mapped for the first time).
    pub bar_moves: u64,
    /// BAR placements the VMM could not map (overlap, beyond the space):
    /// the BAR then decodes nothing.
    pub bar_refused: u64,
}

/// The PCI bus, its ECAM window and BAR backings.
pub struct Platform {
    /// The bus.
    pub pci: PciBus,
    ecam_base: u64,
    ecam_len: u64,
    backings: BTreeMap<(u8, u8, u8), BarBacking>,
    /// Where each segment-backed BAR is mapped now.
    mapped: BTreeMap<(u8, u8, u8), u64>,
    /// Counters.
    pub stats: PlatformStats,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform").field("pci", &self.pci).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Platform {
    /// A platform with an empty bus 0 (host bridge only) whose ECAM window
    /// is at `ecam_base`.
    pub fn new(ecam_base: u64) -> Self {
        Platform {
            pci: PciBus::new(),
            ecam_base,
            ecam_len: crate::pci::ECAM_BUS_BYTES,
            backings: BTreeMap::new(),
            mapped: BTreeMap::new(),
            stats: PlatformStats::default(),
        }
    }

    /// The ECAM window: (base, length).
    pub fn ecam(&self) -> (u64, u64) {
        (self.ecam_base, self.ecam_len)
    }

    /// Attaches `func` at `device.0` with the given BAR backings.
    pub fn attach(
        &mut self,
        device: u8,
        func: Box<dyn PciFunction>,
        backings: &[(u8, BarBacking)],
    ) -> Result<(), crate::pci::AttachError> {
        self.pci.attach(device, 0, func)?;
        for (bar, b) in backings {
            self.backings.insert((device, 0, *bar), *b);
        }
        Ok(())
    }

    /// Where a segment-backed BAR is mapped now.
    pub fn mapped_at(&self, device: u8, bar: u8) -> Option<u64> {
        self.mapped.get(&(device, 0, bar)).copied()
    }

    /// The framebuffer model at `device.0`, if that is what is there.
    pub fn fbuf(&mut self, device: u8) -> Option<&mut Fbuf> {
        self.pci.function_mut(device, 0)?.as_any().downcast_mut::<Fbuf>()
    }

    /// Whether `gpa` is claimed by the ECAM window or an emulated BAR.
    pub fn claims(&self, gpa: u64) -> bool {
        self.target(gpa).is_some()
    }

    fn target(&self, gpa: u64) -> Option<Target> {
        if gpa.wrapping_sub(self.ecam_base) < self.ecam_len {
            return Some(Target::Ecam(gpa - self.ecam_base));
        }
        self.backings.iter().find_map(|(&(device, function, bar), backing)| {
            if *backing != BarBacking::Emulated {
                return None;
            }
            let base = self.pci.bar_address(device, function, bar)?;
            let size = self.pci.bar_size(device, function, bar)?;
            (gpa.wrapping_sub(base) < size).then_some(Target::Bar { device, function, bar, offset: gpa - base })
        })
    }

    /// A trapped read of `data.len()` bytes at `gpa`. Returns false (and
    /// all ones) when nobody claims the address.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        match self.target(gpa) {
            Some(Target::Ecam(off)) => self.pci.config_read(off, data),
            Some(Target::Bar { device, function, bar, offset }) => {
                match self.pci.function_mut(device, function).map(|f| f.as_any()) {
                    Some(any) => match any.downcast_mut::<Fbuf>() {
                        Some(fb) if bar == crate::fbuf::REG_BAR => fb.reg_read(offset, data),
                        _ => data.fill(0xff),
                    },
                    None => data.fill(0xff),
                }
            }
            None => {
                data.fill(0xff);
                self.stats.unclaimed += 1;
                return false;
            }
        }
        self.stats.mmio += 1;
        true
    }

    /// A trapped write of `data` at `gpa`: configuration writes may move
    /// BARs, which are applied to `vm` before this returns. Returns false
    /// (the write is dropped) when nobody claims the address.
    pub fn mmio_write<P: TablePages + Send + Sync>(&mut self, vm: &Vm<P>, gpa: u64, data: &[u8]) -> bool {
        match self.target(gpa) {
            Some(Target::Ecam(off)) => {
                let changes = self.pci.config_write(off, data);
                self.apply(vm, &changes);
            }
            Some(Target::Bar { device, function, bar, offset }) => {
                if let Some(fb) =
                    self.pci.function_mut(device, function).and_then(|f| f.as_any().downcast_mut::<Fbuf>())
                    && bar == crate::fbuf::REG_BAR
                {
                    fb.reg_write(offset, data);
                }
            }
            None => {
                self.stats.unclaimed += 1;
                return false;
            }
        }
        self.stats.mmio += 1;
        true
    }

    /// Applies BAR decoding changes: segment-backed BARs are unmapped at
    /// their old address and mapped at their new one. A placement the VM
    /// refuses (overlap, beyond the space) leaves the BAR unmapped.
    pub fn apply<P: TablePages + Send + Sync>(&mut self, vm: &Vm<P>, changes: &[BarChange]) {
        for c in changes {
            let key = (c.device, c.function, c.bar);
            let Some(BarBacking::Segment { id, prot }) = self.backings.get(&key).copied() else { continue };
            if let Some(old) = self.mapped.remove(&key) {
                // It was mapped by us with this length: the unmap matches.
                let _ = vm.unmap(old, c.size);
            }
            if let Some(new) = c.new {
                match vm.map_segment(new, id, 0, c.size, Some(prot)) {
                    Ok(()) => {
                        self.mapped.insert(key, new);
                        self.stats.bar_moves += 1;
                    }
                    Err(_) => self.stats.bar_refused += 1,
                }
            }
        }
    }
}

enum Target {
    Ecam(u64),
    Bar { device: u8, function: u8, bar: u8, offset: u64 },
}

/// Where the platform's device windows are: guest-physical ranges in which
/// every access that no mapping serves is the platform's (a device's
/// registers, or a master abort where nothing decodes).
pub const PCI_WINDOW_32: (u64, u64) = (0xc000_0000, 0x2000_0000);
/// The 64-bit window (above guest RAM, below the runtime).
pub const PCI_WINDOW_64: (u64, u64) = (0x50_0000_0000, 0x10_0000_0000);

/// A [`Platform`] and its VM as the vCPU loop's MMIO devices
/// ([`crate::machine::MmioDevices`]): claims the ECAM window and the PCI
/// windows; accesses are served under one lock (device models are not
/// reentrant), and BAR moves are applied to the VM before the access
/// returns.
pub struct PlatformDevices<P: TablePages> {
    /// The platform.
    pub platform: std::sync::Mutex<Platform>,
    vm: std::sync::Arc<Vm<P>>,
    windows: Vec<(u64, u64)>,
}

impl<P: TablePages> std::fmt::Debug for PlatformDevices<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformDevices").field("windows", &self.windows).finish_non_exhaustive()
    }
}

impl<P: TablePages + Send + Sync> PlatformDevices<P> {
    /// `platform` serving `vm`, claiming its ECAM window and the PCI
    /// windows [`PCI_WINDOW_32`] and [`PCI_WINDOW_64`].
    pub fn new(platform: Platform, vm: std::sync::Arc<Vm<P>>) -> Self {
        let windows = vec![platform.ecam(), PCI_WINDOW_32, PCI_WINDOW_64];
        PlatformDevices { platform: std::sync::Mutex::new(platform), vm, windows }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Platform> {
        self.platform.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The platform's counters.
    pub fn stats(&self) -> PlatformStats {
        self.lock().stats
    }
}

impl<P: TablePages + Send + Sync> crate::machine::MmioDevices for PlatformDevices<P> {
    fn claims(&self, gpa: u64) -> bool {
        self.windows.iter().any(|&(base, len)| gpa.wrapping_sub(base) < len)
    }
    fn read(&self, _vcpu: usize, gpa: u64, data: &mut [u8]) {
        self.lock().mmio_read(gpa, data);
    }
    fn write(&self, _vcpu: usize, gpa: u64, data: &[u8]) {
        let mut p = self.lock();
        p.mmio_write(&self.vm, gpa, data);
    }
}
