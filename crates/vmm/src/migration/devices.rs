//! Device-model state for migration: the PCI platform ([`Platform`]) as
//! one [`StateKind::Device`] blob (instance [`PLATFORM_INSTANCE`]).
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
//! # Known gaps
//!
//! - Interrupt models (vLAPIC, vIOAPIC, vHPET, MSI) are not serialized;
//!   the migrating KVM runs attach none.
//! - Only the framebuffer's registers are known; another device model's
//!   device-specific registers (configuration space from 0x40) are not
//!   carried.

use vmspace::TablePages;

use super::{HostError, StateBlob, StateKind};
use crate::fbuf::Fbuf;
use crate::platform::Platform;
use crate::vm::Vm;

/// The instance number of the platform's blob.
pub const PLATFORM_INSTANCE: u32 = 0;

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
