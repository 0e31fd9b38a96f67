//! Device-model state for migration: the PCI platform ([`Platform`]) as
//! one [`StateKind::Device`] blob (instance [`PLATFORM_INSTANCE`]), and
//! the interrupt models of an [`IntrSystem`] (vLAPICs, vIOAPIC, vHPET and
//! their clock) as another (instance [`INTERRUPTS_INSTANCE`]).
//!
//! # What is carried
//!
//! For every function on bus 0: its vendor and device ids (checked on the
//! target, which runs the same configuration), the command register, the
//! six BAR registers as the guest reads them (addresses and the read-only
//! flag bits), the interrupt line, and for a framebuffer ([`Fbuf`]) its
//! guest-programmed width and height. Device memory (the framebuffer's
//! pixels) travels as memory, addressed by segment, so a BAR's placement
//! and its contents are independent: a BAR moved during an attempt is the
//! same segment at another address, and the placement at pause is what
//! the blob says.
//!
//! # Restoring
//!
//! [`restore_platform`] decodes and checks the whole blob first (format,
//! the same functions with the same ids, nothing missing or extra), then
//! replays it through the bus as configuration writes — decoding off, the
//! BARs, the interrupt line, the device registers, then the command
//! register — so that the BAR moves are applied to the VM by the same path
//! a guest's writes take ([`Platform::apply`]). Where each BAR ends up
//! mapped is checked by the VM-layout blob ([`super::vm::VmMemory::check_layout_blob`]),
//! which lists the mappings: apply this blob before checking that one. A failure after the
//! first write leaves the target's platform partly restored: the engine
//! then discards the target VM (it never resumes on a failed
//! `apply_state`).
//!
//! # Interrupt models
//!
//! [`save_interrupts`] takes an [`IntrSystem`]'s snapshot
//! ([`IntrSystem::snapshot`]: every LAPIC's registers, IRR/ISR/TMR and
//! timer, the I/O APIC's redirection table and pin levels, the HPET's
//! counter and timers, pending INIT/start-up events, the models' clock)
//! with the vCPUs paused; [`restore_interrupts`] checks the blob's magic,
//! version and vCPU count and the state itself ([`Interrupts::restore`]
//! refuses what no guest could have produced), then replaces the target's
//! models and sets its clock to the source's, so a LAPIC or HPET timer
//! expires on the target when it would have on the source (the time the
//! VM was paused is not counted, as for a suspended guest). MSI routing
//! has no state of its own (the policy travels with the models).
//!
//! # Known gaps
//!
//! - The migrating KVM runs attach no interrupt system (their workloads
//!   take no interrupts): the interrupt blob is proved on `vmm`'s own
//!   engine and models, not on a migrating KVM guest.
//! - Only the framebuffer's registers are known; another device model's
//!   device-specific registers (configuration space from 0x40) are not
//!   carried.

use vmspace::TablePages;

use super::{HostError, StateBlob, StateKind};
use crate::fbuf::Fbuf;
use crate::intr::Interrupts;
use crate::intr::system::{IntrSnapshot, IntrSystem};
use crate::platform::Platform;
use crate::vm::Vm;

/// The instance number of the platform's blob.
pub const PLATFORM_INSTANCE: u32 = 0;

/// The instance number of the interrupt models' blob.
pub const INTERRUPTS_INSTANCE: u32 = 1;

const INTR_MAGIC: u32 = 0x494e_5431; // "INT1"
const INTR_VERSION: u32 = 1;

/// The interrupt models' state of `intr` as a [`StateKind::Device`] blob
/// (see the module doc): magic, version, vCPU count, then the snapshot as
/// JSON. Take it with the vCPUs paused.
///
/// # Errors
///
/// A system driving an external controller has no models of ours to
/// save.
pub fn save_interrupts(intr: &IntrSystem) -> Result<StateBlob, HostError> {
    let snap = intr.snapshot().ok_or_else(|| intr_bad("the system drives an external controller"))?;
    let json = serde_json::to_vec(&snap).map_err(|e| intr_bad(format!("encoding: {e}")))?;
    let mut data = Vec::with_capacity(12 + json.len());
    data.extend_from_slice(&INTR_MAGIC.to_le_bytes());
    data.extend_from_slice(&INTR_VERSION.to_le_bytes());
    data.extend_from_slice(&(snap.state.lapics.len() as u32).to_le_bytes());
    data.extend_from_slice(&json);
    Ok(StateBlob { kind: StateKind::Device, instance: INTERRUPTS_INSTANCE, data })
}

fn intr_bad(m: impl Into<String>) -> HostError {
    HostError::new("interrupt state", m)
}

/// Decodes and checks an interrupt blob ([`save_interrupts`]) for a
/// system of `vcpus` vCPUs, without applying it.
///
/// # Errors
///
/// A short blob, another magic or version, another vCPU count, JSON that
/// does not decode, or state [`Interrupts::restore`] refuses.
pub fn decode_interrupts(blob: &[u8], vcpus: usize) -> Result<IntrSnapshot, HostError> {
    let word = |i: usize| blob.get(4 * i..4 * i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let (Some(magic), Some(version), Some(n)) = (word(0), word(1), word(2)) else {
        return Err(intr_bad(format!("blob of {} bytes is shorter than its header", blob.len())));
    };
    if magic != INTR_MAGIC {
        return Err(intr_bad(format!("not an interrupt blob (magic {magic:#010x})")));
    }
    if version != INTR_VERSION {
        return Err(intr_bad(format!("version {version}, this build reads version {INTR_VERSION}")));
    }
    if n as usize != vcpus {
        return Err(intr_bad(format!("the source had {n} vCPUs, this VM has {vcpus}")));
    }
    let snap: IntrSnapshot = serde_json::from_slice(&blob[12..]).map_err(|e| intr_bad(format!("decoding: {e}")))?;
    if snap.state.lapics.len() != vcpus {
        return Err(intr_bad(format!("header says {n} vCPUs, the state has {}", snap.state.lapics.len())));
    }
    Interrupts::restore(snap.state.clone()).map_err(|e| intr_bad(e.to_string()))?;
    Ok(snap)
}

/// Applies an interrupt blob to the target's `intr` (see the module doc).
/// Nothing changes on error.
///
/// # Errors
///
/// As [`decode_interrupts`], and a system driving an external
/// controller.
pub fn restore_interrupts(intr: &IntrSystem, blob: &[u8], vcpus: usize) -> Result<(), HostError> {
    let snap = decode_interrupts(blob, vcpus)?;
    intr.restore(snap).map_err(|e| intr_bad(e.to_string()))
}

const MAGIC: u32 = 0x5043_4931; // "PCI1"
const ENTRY: usize = 52;

/// One function's saved state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Func {
    device: u8,
    function: u8,
    ids: u32,
    command: u32,
    bars: [u32; 6],
    interrupt_line: u32,
    /// Width and height when the function is a framebuffer.
    fb: Option<(u32, u32)>,
}

fn ecam(device: u8, function: u8, reg: u64) -> u64 {
    (u64::from(device) << 15) | (u64::from(function) << 12) | reg
}

fn read32(p: &mut Platform, device: u8, function: u8, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    p.pci.config_read(ecam(device, function, reg), &mut b);
    u32::from_le_bytes(b)
}

fn functions(p: &mut Platform) -> Vec<Func> {
    let mut out = Vec::new();
    for device in 0..32u8 {
        for function in 0..8u8 {
            let ids = read32(p, device, function, 0);
            if ids == u32::MAX {
                continue;
            }
            let mut bars = [0u32; 6];
            for (i, b) in bars.iter_mut().enumerate() {
                *b = read32(p, device, function, 0x10 + 4 * i as u64);
            }
            let fb = p
                .pci
                .function_mut(device, function)
                .and_then(|f| f.as_any().downcast_mut::<Fbuf>())
                .map(|f| (f.width(), f.height()));
            out.push(Func {
                device,
                function,
                ids,
                command: read32(p, device, function, 0x04) & 0xffff,
                bars,
                interrupt_line: read32(p, device, function, 0x3c) & 0xff,
                fb,
            });
        }
    }
    out
}

/// The platform's state blob (module doc).
pub fn save_platform(p: &mut Platform) -> StateBlob {
    let fs = functions(p);
    let mut data = Vec::with_capacity(8 + ENTRY * fs.len());
    data.extend_from_slice(&MAGIC.to_le_bytes());
    data.extend_from_slice(&(fs.len() as u32).to_le_bytes());
    for f in &fs {
        data.extend_from_slice(&[f.device, f.function, 0, 0]);
        data.extend_from_slice(&f.ids.to_le_bytes());
        data.extend_from_slice(&f.command.to_le_bytes());
        for b in f.bars {
            data.extend_from_slice(&b.to_le_bytes());
        }
        data.extend_from_slice(&f.interrupt_line.to_le_bytes());
        let (has, w, h) = match f.fb {
            Some((w, h)) => (1u32, w, h),
            None => (0, 0, 0),
        };
        for v in [has, w, h] {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    StateBlob { kind: StateKind::Device, instance: PLATFORM_INSTANCE, data }
}

fn bad(m: impl Into<String>) -> HostError {
    HostError::new("platform state", m)
}

fn decode(blob: &[u8]) -> Result<Vec<Func>, HostError> {
    let word = |at: usize| -> Result<u32, HostError> {
        blob.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).ok_or_else(|| bad("truncated"))
    };
    if word(0)? != MAGIC {
        return Err(bad("not a platform state blob"));
    }
    let n = word(4)? as usize;
    if n.checked_mul(ENTRY).and_then(|x| x.checked_add(8)) != Some(blob.len()) {
        return Err(bad(format!("{n} functions in {} bytes", blob.len())));
    }
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let at = 8 + k * ENTRY;
        let (device, function) = (blob[at], blob[at + 1]);
        if device > 31 || function > 7 || blob[at + 2] != 0 || blob[at + 3] != 0 {
            return Err(bad(format!("bad slot {device}.{function}")));
        }
        let mut bars = [0u32; 6];
        for (i, b) in bars.iter_mut().enumerate() {
            *b = word(at + 12 + 4 * i)?;
        }
        let fb = match word(at + 40)? {
            0 => None,
            1 => Some((word(at + 44)?, word(at + 48)?)),
            x => return Err(bad(format!("bad framebuffer flag {x}"))),
        };
        out.push(Func {
            device,
            function,
            ids: word(at + 4)?,
            command: word(at + 8)?,
            bars,
            interrupt_line: word(at + 36)?,
            fb,
        });
    }
    Ok(out)
}

/// Restore the platform's state from a source's blob (module doc): the
/// target's functions must be the source's (same slots and ids).
pub fn restore_platform<P: TablePages + Send + Sync>(
    p: &mut Platform,
    vm: &Vm<P>,
    blob: &[u8],
) -> Result<(), HostError> {
    let theirs = decode(blob)?;
    let ours = functions(p);
    let slots = |v: &[Func]| v.iter().map(|f| (f.device, f.function, f.ids, f.fb.is_some())).collect::<Vec<_>>();
    if slots(&theirs) != slots(&ours) {
        return Err(bad(format!(
            "the source's functions (slot, ids) {:x?} are not this VM's {:x?}",
            slots(&theirs),
            slots(&ours)
        )));
    }
    let write = |p: &mut Platform, f: &Func, reg: u64, bytes: &[u8]| {
        let changes = p.pci.config_write(ecam(f.device, f.function, reg), bytes);
        p.apply(vm, &changes);
    };
    for f in &theirs {
        write(p, f, 0x04, &0u16.to_le_bytes());
        for (i, b) in f.bars.iter().enumerate() {
            write(p, f, 0x10 + 4 * i as u64, &b.to_le_bytes());
        }
        write(p, f, 0x3c, &[f.interrupt_line as u8]);
        if let Some((w, h)) = f.fb
            && let Some(fb) = p.fbuf(f.device)
        {
            // Width first or height first, whichever fits the frame on the
            // way (each write is refused while the frame would not fit).
            for _ in 0..2 {
                fb.reg_write(4, &w.to_le_bytes());
                fb.reg_write(8, &h.to_le_bytes());
            }
            if (fb.width(), fb.height()) != (w, h) {
                return Err(bad(format!("framebuffer {w}x{h} does not fit this VM's")));
            }
        }
        write(p, f, 0x04, &(f.command as u16).to_le_bytes());
    }
    // Every register reads back as on the source (where each BAR is
    // mapped is checked with the VM-layout blob, which lists mappings).
    let now = functions(p);
    for (a, b) in theirs.iter().zip(&now) {
        if (a.command, a.bars, a.interrupt_line) != (b.command, b.bars, b.interrupt_line) {
            return Err(bad(format!("function {}.{} restored as {b:x?}, not {a:x?}", a.device, a.function)));
        }
    }
    Ok(())
}
