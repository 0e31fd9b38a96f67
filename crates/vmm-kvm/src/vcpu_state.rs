//! The complete state of a KVM vCPU, for live migration: saved on the
//! source while the vCPU's thread is parked at a harvest point, restored
//! on the target before its vCPU first runs.
//!
//! # What is carried
//!
//! | section | ioctl | holds |
//! |---|---|---|
//! | regs | `KVM_GET_REGS` | RAX..R15, RIP, RFLAGS (the workload keeps its operation count and generator state in registers) |
//! | sregs | `KVM_GET_SREGS` | segments, TR, LDT, GDT/IDT, CR0/2/3/4/8, EFER, APIC base, pending interrupt bitmap |
//! | xsave | `KVM_GET_XSAVE` | x87, SSE, AVX... (the 4 KiB legacy area: a superset of `KVM_GET_FPU`) |
//! | xcrs | `KVM_GET_XCRS` | XCR0 |
//! | events | `KVM_GET_VCPU_EVENTS` | pending or injected exception, interrupt, NMI, interrupt shadow, SMM |
//! | debugregs | `KVM_GET_DEBUGREGS` | DR0-3, DR6, DR7 |
//! | mp_state | `KVM_GET_MP_STATE` | runnable / halted |
//! | msrs | `KVM_GET_MSRS` | [`MIGRATED_MSRS`] that this host's KVM lists (TSC, PAT, STAR/LSTAR/CSTAR/SFMASK, KERNEL_GS_BASE, FS/GS base, SYSENTER, TSC_AUX, MISC_ENABLE...) |
//!
//! There is no LAPIC section: the VMs have no in-kernel interrupt
//! controller (interrupts are injected with `KVM_INTERRUPT`).
//!
//! # Taking state from a running machine
//!
//! A vCPU's thread owns its [`Vcpu`]; while the machine runs, other
//! threads cannot borrow it. [`VcpuTwin`] is a second `VcpuFd` on a
//! duplicate of the vCPU's file descriptor (KVM accepts vCPU ioctls from
//! any thread of the VM's process; they serialize on the vCPU's mutex).
//! The migration uses the twin only while the vCPU's thread is parked at a
//! harvest point (or before the vCPU first ran).
//!
//! A parked vCPU stopped on a port exit, which KVM completes (advancing
//! RIP past the `out`) only at the next `KVM_RUN`: saved as is, the state
//! would replay the exit on the target. [`VcpuTwin::save`] therefore first
//! enters once with `immediate_exit` set, which completes the pending I/O
//! and returns at once without running guest code (KVM's documented way to
//! reach a consistent state before saving), then reads every section.
//!
//! # Encoding
//!
//! `b"KVMVCPU1"`, then sections `tag (4) | length (4) | bytes`, each the
//! kvm-bindings structure as laid out by the kernel ABI (little-endian
//! x86-64), MSRs as `(index u32, reserved u32, value u64)` entries. The
//! decoder checks every length: a blob of another layout is refused with a
//! typed error, never misread.

use crate::vcpu::Vcpu;
use crate::vm::{KvmError, KvmVm, Result};
use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use zerocopy::{FromBytes, IntoBytes};

/// The MSRs the migration carries (those of them KVM lists on the host):
/// time stamp counter and its adjust, PAT, SYSENTER, MISC_ENABLE, EFER's
/// companions for `syscall` (STAR, LSTAR, CSTAR, SFMASK), the FS/GS bases,
/// KERNEL_GS_BASE and TSC_AUX.
pub const MIGRATED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// MSR index of the time stamp counter.
pub const MSR_TSC: u32 = 0x10;

const MAGIC: &[u8; 8] = b"KVMVCPU1";

mod section {
    pub const REGS: u32 = 1;
    pub const SREGS: u32 = 2;
    pub const XSAVE: u32 = 3;
    pub const XCRS: u32 = 4;
    pub const EVENTS: u32 = 5;
    pub const DEBUGREGS: u32 = 6;
    pub const MP_STATE: u32 = 7;
    pub const MSRS: u32 = 8;
}

/// Everything a vCPU needs to continue elsewhere (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuState {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87/SSE/AVX state).
    pub xsave: [u32; 1024],
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Pending and injected events.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Multiprocessing state (runnable, halted).
    pub mp_state: kvm_mp_state,
    /// `(index, value)` of every MSR carried.
    pub msrs: Vec<(u32, u64)>,
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Ioctl(what, e)
}

fn bad(what: &str) -> KvmError {
    KvmError::Setup(format!("vCPU state: {what}"))
}

fn put(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn read_exact<T: FromBytes>(bytes: &[u8], what: &str) -> Result<T> {
    T::read_from_bytes(bytes).map_err(|_| bad(&format!("{what} section of {} bytes", bytes.len())))
}

impl VcpuState {
    /// The state as a self-describing byte string (module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4096 + 1024);
        out.extend_from_slice(MAGIC);
        put(&mut out, section::REGS, self.regs.as_bytes());
        put(&mut out, section::SREGS, self.sregs.as_bytes());
        put(&mut out, section::XSAVE, self.xsave.as_bytes());
        put(&mut out, section::XCRS, self.xcrs.as_bytes());
        put(&mut out, section::EVENTS, self.events.as_bytes());
        put(&mut out, section::DEBUGREGS, self.debugregs.as_bytes());
        put(&mut out, section::MP_STATE, self.mp_state.as_bytes());
        let mut m = Vec::with_capacity(self.msrs.len() * 16);
        for &(index, data) in &self.msrs {
            m.extend_from_slice(kvm_msr_entry { index, reserved: 0, data }.as_bytes());
        }
        put(&mut out, section::MSRS, &m);
        out
    }

    /// Parses [`encode`](Self::encode)'s output; every section must be
    /// present once, with its exact size.
    pub fn decode(bytes: &[u8]) -> Result<VcpuState> {
        let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(|| bad("not a KVM vCPU state (magic)"))?;
        let mut seen = [false; 9];
        let mut st = VcpuState {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: [0; 1024],
            xcrs: kvm_xcrs::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            mp_state: kvm_mp_state::default(),
            msrs: Vec::new(),
        };
        let mut rest = body;
        while !rest.is_empty() {
            if rest.len() < 8 {
                return Err(bad("truncated section header"));
            }
            let tag = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
            if len > rest.len() - 8 {
                return Err(bad("truncated section"));
            }
            let data = &rest[8..8 + len];
            rest = &rest[8 + len..];
            let slot = seen.get_mut(tag as usize).filter(|_| tag >= 1).ok_or_else(|| bad("unknown section"))?;
            if std::mem::replace(slot, true) {
                return Err(bad("duplicate section"));
            }
            match tag {
                section::REGS => st.regs = read_exact(data, "regs")?,
                section::SREGS => st.sregs = read_exact(data, "sregs")?,
                section::XSAVE => st.xsave = read_exact(data, "xsave")?,
                section::XCRS => st.xcrs = read_exact(data, "xcrs")?,
                section::EVENTS => st.events = read_exact(data, "events")?,
                section::DEBUGREGS => st.debugregs = read_exact(data, "debugregs")?,
                section::MP_STATE => st.mp_state = read_exact(data, "mp_state")?,
                section::MSRS => {
                    if !data.len().is_multiple_of(16) {
                        return Err(bad("msrs section"));
                    }
                    for e in data.chunks_exact(16) {
                        let e: kvm_msr_entry = read_exact(e, "msr")?;
                        st.msrs.push((e.index, e.data));
                    }
                }
                _ => unreachable!("tag checked against `seen`"),
            }
        }
        if !seen[1..].iter().all(|&s| s) {
            return Err(bad("missing section"));
        }
        Ok(st)
    }

    /// The value of MSR `index`, if carried.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.0 == index).map(|m| m.1)
    }
}

/// A second handle on a vCPU (see the module doc): state ioctls from the
/// migration's thread while the vCPU's own thread is parked.
pub struct VcpuTwin {
    fd: VcpuFd,
    index: u32,
    msrs: Vec<u32>,
}

impl std::fmt::Debug for VcpuTwin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuTwin").field("index", &self.index).finish_non_exhaustive()
    }
}

impl Vcpu {
    /// A twin of this vCPU for saving and restoring its state from another
    /// thread (see the module doc). `vm` must be the VM it belongs to.
    pub fn twin(&self, vm: &KvmVm) -> Result<VcpuTwin> {
        // SAFETY: `fd` is this vCPU's open descriptor, borrowed for the
        // duration of the call only.
        let borrowed = unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) };
        let dup = borrowed.try_clone_to_owned().map_err(|e| KvmError::Os("dup vCPU fd", e))?;
        // SAFETY: `dup` is a fresh descriptor of a vCPU of `vm`, owned by
        // nobody else once converted; the new VcpuFd becomes its sole
        // owner. The kvm_run page it maps is the vCPU's (shared with the
        // vCPU's own mapping): the twin touches it only while the vCPU's
        // thread is parked or before the vCPU runs.
        let fd = unsafe { vm.fd().create_vcpu_from_rawfd(dup.into_raw_fd()) }
            .map_err(|e| KvmError::Ioctl("KVM_CREATE_VCPU (from fd)", e))?;
        let listed = vm.kvm().get_msr_index_list().map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let listed = listed.as_slice();
        let msrs = MIGRATED_MSRS.iter().copied().filter(|m| listed.contains(m)).collect();
        Ok(VcpuTwin { fd, index: self.index, msrs })
    }
}

impl VcpuTwin {
    /// The vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The MSRs this twin saves and restores.
    pub fn msr_list(&self) -> &[u32] {
        &self.msrs
    }

    /// Completes a pending port exit without running guest code: one
    /// `KVM_RUN` with `immediate_exit` set (module doc). Only while the
    /// vCPU's thread is parked.
    pub fn complete_pending_io(&mut self) -> Result<()> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => Ok(()),
            Ok(()) => Err(bad("KVM_RUN with immediate_exit ran the guest")),
            Err(e) => Err(KvmError::Os("KVM_RUN (immediate exit)", std::io::Error::from_raw_os_error(e))),
        }
    }

    /// Completes the pending exit, then reads every section.
    pub fn save(&mut self) -> Result<VcpuState> {
        self.complete_pending_io()?;
        let regs = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?.region;
        let xcrs = self.fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let events = self.fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = self.fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        let mp_state = self.fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let entries: Vec<kvm_msr_entry> =
            self.msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| bad(&format!("MSR list: {e:?}")))?;
        let n = self.fd.get_msrs(&mut m).map_err(ioctl("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(bad(&format!("KVM read {n} of {} MSRs", entries.len())));
        }
        let msrs = m.as_slice().iter().map(|e| (e.index, e.data)).collect();
        Ok(VcpuState { regs, sregs, xsave, xcrs, events, debugregs, mp_state, msrs })
    }

    /// Writes `state` into the vCPU (which must not be running), with CR3
    /// replaced by `cr3` when given (the target's table root: our tables
    /// are the host's, not guest memory). MSRs this host does not list
    /// are refused.
    pub fn restore(&mut self, state: &VcpuState, cr3: Option<u64>) -> Result<()> {
        let mut sregs = state.sregs;
        if let Some(c) = cr3 {
            sregs.cr3 = c;
        }
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.fd.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
        let mut xs = kvm_xsave { region: state.xsave, ..Default::default() };
        xs.region = state.xsave;
        // SAFETY: a legacy 4 KiB `kvm_xsave` (KVM_CAP_XSAVE2 is not
        // enabled on our VMs, so the kernel reads exactly this size).
        unsafe { self.fd.set_xsave(&xs) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        self.fd.set_debug_regs(&state.debugregs).map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        if let Some((i, _)) = state.msrs.iter().find(|(i, _)| !self.msrs.contains(i)) {
            return Err(bad(&format!("MSR {i:#x} is not supported here")));
        }
        let entries: Vec<kvm_msr_entry> =
            state.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, reserved: 0, data }).collect();
        let m = Msrs::from_entries(&entries).map_err(|e| bad(&format!("MSR list: {e:?}")))?;
        let n = self.fd.set_msrs(&m).map_err(ioctl("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(bad(&format!("KVM wrote {n} of {} MSRs (refused {:#x})", entries.len(), entries[n].index)));
        }
        self.fd.set_vcpu_events(&state.events).map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        self.fd.set_mp_state(state.mp_state).map_err(ioctl("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState {
            regs: kvm_regs { rax: 1, rip: 0x1000, rflags: 2, ..Default::default() },
            sregs: kvm_sregs { cr0: 0x8000_0011, efer: 0xd00, ..Default::default() },
            xsave: [0; 1024],
            xcrs: kvm_xcrs::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            mp_state: kvm_mp_state::default(),
            msrs: vec![(MSR_TSC, 12345), (0x277, 0x0007_0406_0007_0406)],
        };
        s.xsave[7] = 0xabcd;
        s
    }

    #[test]
    fn encoding_round_trips() {
        let s = sample();
        assert_eq!(VcpuState::decode(&s.encode()).expect("decode"), s);
        assert_eq!(s.msr(0x277), Some(0x0007_0406_0007_0406));
        assert_eq!(s.msr(0x10), Some(12345));
    }

    #[test]
    fn every_truncation_is_refused_and_no_input_panics() {
        let enc = sample().encode();
        for n in 0..enc.len() {
            assert!(VcpuState::decode(&enc[..n]).is_err(), "a blob cut at {n} of {} decoded", enc.len());
        }
        // Flip bytes all over (lengths, tags, payload): an error or a
        // state, never a panic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = enc.clone();
            let i = (x % b.len() as u64) as usize;
            b[i] ^= (x >> 32) as u8 | 1;
            let _ = VcpuState::decode(&b);
        }
        // A duplicated section is refused.
        let mut dup = enc.clone();
        dup.extend_from_slice(&enc[8..8 + 8 + std::mem::size_of::<kvm_regs>()]);
        assert!(VcpuState::decode(&dup).is_err());
    }
}
