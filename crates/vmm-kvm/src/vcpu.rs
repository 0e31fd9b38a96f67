//! One KVM vCPU in 64-bit long mode, its exits, and the kick.
//!
//! Registers are exchanged through `KVM_CAP_SYNC_REGS` (general registers
//! and system registers are copied into `kvm_run` on every exit, and written
//! back on entry when marked dirty), so serving a nested fault costs no
//! register ioctls.
//!
//! The kick ([`KickHandle::kick`]) sets `kvm_run.immediate_exit` and sends a
//! signal to the vCPU thread: a thread inside `KVM_RUN` leaves it with
//! `EINTR`, a thread about to enter returns at once. The flag is cleared by
//! the vCPU thread after every return from `KVM_RUN`, which is before it
//! re-enters the vmspace table (`table_enter`), so a kick aimed at a vCPU
//! that entered with an old generation is never lost.

use crate::vm::{KvmError, KvmVm, Result};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, Once};
pub use vmm::hv::{Exit, LongModeSetup};

/// GDT selectors of the guest runtime.
pub mod sel {
    /// Kernel code (CPL 0, 64-bit).
    pub const KCODE: u16 = 0x08;
    /// Kernel data.
    pub const KDATA: u16 = 0x10;
    /// User data (RPL 3).
    pub const UDATA: u16 = 0x18 | 3;
    /// User code (RPL 3, 64-bit).
    pub const UCODE: u16 = 0x20 | 3;
    /// First TSS descriptor; vCPU `i` uses `TSS0 + 16 * i`.
    pub const TSS0: u16 = 0x28;
}

/// CR0 bits: PE, MP, ET, NE, WP, PG.
const CR0_LONG: u64 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4 bits: PAE, OSFXSR, OSXMMEXCPT. No PGE (no global pages), no SMEP/SMAP
/// (the runtime touches U=1 pages at CPL 0), no PCID.
const CR4_LONG: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: LME, LMA, NXE.
const EFER_LONG: u64 = (1 << 8) | (1 << 10) | (1 << 11);
/// RFLAGS: reserved bit 1 and IF (so the flush vector can be injected).
const RFLAGS_USER: u64 = 0x202;

fn seg(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs an empty handler (async-signal-safe) without
        // SA_RESTART, so a blocked KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Whether the vCPU still exists, and the thread running it (0: none).
#[derive(Debug)]
struct KickState {
    alive: bool,
    thread: u64,
}

/// Kicks one vCPU out of `KVM_RUN` from any thread. The handle may outlive
/// its vCPU: kicking a destroyed vCPU does nothing.
#[derive(Debug)]
pub struct KickHandle {
    immediate_exit: *const AtomicU8,
    state: Mutex<KickState>,
    kicks: AtomicU64,
}

// SAFETY: `immediate_exit` points into the vCPU's kvm_run mapping; it is
// dereferenced only under `state` while `alive` is true, and the `Vcpu`
// clears `alive` under the same lock before the mapping goes away. The
// thread id is used under the lock too, and cleared by the vCPU thread
// before it exits, so a signal never targets a thread that has ended.
unsafe impl Send for KickHandle {}
// SAFETY: as above.
unsafe impl Sync for KickHandle {}

impl KickHandle {
    /// Forces the vCPU out of `KVM_RUN` (or makes its next entry return at
    /// once). Does not wait: waiting is the vmspace client's business.
    pub fn kick(&self) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.alive {
            return;
        }
        self.kicks.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `alive` under the lock: the kvm_run page is mapped.
        unsafe { &*self.immediate_exit }.store(1, Ordering::SeqCst);
        if st.thread != 0 {
            // SAFETY: the vCPU thread recorded itself and clears the id
            // under this lock before it ends, so the thread exists.
            unsafe { libc::pthread_kill(st.thread as libc::pthread_t, kick_signal()) };
        }
    }

    /// Kicks sent so far.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }
}

/// A vCPU in long mode.
pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    pub(crate) index: u32,
    kick: std::sync::Arc<KickHandle>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Creates vCPU `index` with the host's supported CPUID.
    pub fn new(vm: &KvmVm, index: u32) -> Result<Self> {
        install_kick_handler();
        let mut fd = vm.fd().create_vcpu(u64::from(index)).map_err(|e| KvmError::Ioctl("KVM_CREATE_VCPU", e))?;
        let cpuid = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        fd.set_cpuid2(&cpuid).map_err(|e| KvmError::Ioctl("KVM_SET_CPUID2", e))?;
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        let run = fd.get_kvm_run();
        let ie = std::ptr::addr_of_mut!(run.immediate_exit) as *const AtomicU8;
        let kick = std::sync::Arc::new(KickHandle {
            immediate_exit: ie,
            state: Mutex::new(KickState { alive: true, thread: 0 }),
            kicks: AtomicU64::new(0),
        });
        Ok(Vcpu { fd, index, kick })
    }

    /// This vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The kick handle (for the vmspace client's kick hook).
    pub fn kick_handle(&self) -> std::sync::Arc<KickHandle> {
        self.kick.clone()
    }

    /// Puts the vCPU in 64-bit mode at CPL 3 with the given runtime.
    pub fn setup_long_mode(&mut self, s: &LongModeSetup) -> Result<()> {
        let mut sr: kvm_sregs = self.fd.get_sregs().map_err(|e| KvmError::Ioctl("KVM_GET_SREGS", e))?;
        sr.cs = seg(sel::UCODE, true, 3);
        let data = seg(sel::UDATA, false, 3);
        sr.ds = data;
        sr.es = data;
        sr.fs = data;
        sr.gs = data;
        sr.ss = data;
        sr.tr = kvm_segment {
            base: s.tss,
            limit: 0x67,
            selector: sel::TSS0 + 16 * s.index,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sr.ldt = kvm_segment { unusable: 1, ..Default::default() };
        sr.gdt.base = s.gdt.0;
        sr.gdt.limit = s.gdt.1;
        sr.idt.base = s.idt.0;
        sr.idt.limit = s.idt.1;
        sr.cr0 = CR0_LONG;
        sr.cr3 = s.cr3;
        sr.cr4 = CR4_LONG;
        sr.efer = EFER_LONG;
        self.fd.set_sregs(&sr).map_err(|e| KvmError::Ioctl("KVM_SET_SREGS", e))?;
        let regs = kvm_regs { rip: s.rip, rsp: s.rsp, rdi: s.rdi, rflags: RFLAGS_USER, ..Default::default() };
        self.fd.set_regs(&regs).map_err(|e| KvmError::Ioctl("KVM_SET_REGS", e))?;
        Ok(())
    }

    /// Records the calling thread as this vCPU's thread (kick target).
    pub fn bind_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let t = unsafe { libc::pthread_self() };
        self.kick.state.lock().unwrap_or_else(|e| e.into_inner()).thread = t as u64;
    }

    /// Forgets the vCPU thread (call before the thread exits).
    pub fn unbind_thread(&self) {
        self.kick.state.lock().unwrap_or_else(|e| e.into_inner()).thread = 0;
    }

    /// Enters the guest until the next exit.
    pub fn run(&mut self) -> Result<Exit> {
        let r = self.fd.run();
        let exit = match r {
            Ok(VcpuExit::IoOut(port, _)) => Ok(Exit::Out(port)),
            Ok(VcpuExit::IoIn(port, _)) => Ok(Exit::Other("io in", u64::from(port))),
            Ok(VcpuExit::Hlt) => Ok(Exit::Halt),
            Ok(VcpuExit::Shutdown) => Ok(Exit::Shutdown),
            Ok(VcpuExit::Intr) => Ok(Exit::Interrupted),
            // The interrupt window asked for by `request_interrupt_window`.
            Ok(VcpuExit::IrqWindowOpen) => Ok(Exit::Interrupted),
            Ok(VcpuExit::FailEntry(reason, _)) => Ok(Exit::Other("failed entry", reason)),
            Ok(VcpuExit::InternalError) => Ok(Exit::Other("KVM internal error", 0)),
            Ok(VcpuExit::MmioRead(a, _)) => Ok(Exit::Other("MMIO read", a)),
            Ok(VcpuExit::MmioWrite(a, _)) => Ok(Exit::Other("MMIO write", a)),
            Ok(VcpuExit::Unknown) => Ok(Exit::Other("unknown exit", 0)),
            Ok(_) => Ok(Exit::Other("unexpected exit", 0)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Exit::Interrupted),
            Err(e) => Err(KvmError::Ioctl("KVM_RUN", e)),
        };
        // SAFETY: the kvm_run page is mapped while `self` lives.
        unsafe { &*self.kick.immediate_exit }.store(0, Ordering::SeqCst);
        exit
    }

    /// General registers as of the last exit (synced by KVM).
    pub fn regs(&mut self) -> &kvm_regs {
        &self.fd.sync_regs_mut().regs
    }

    /// System registers as of the last exit (synced by KVM).
    pub fn sregs(&mut self) -> &kvm_sregs {
        &self.fd.sync_regs_mut().sregs
    }

    /// Mutable general registers; written back on the next entry.
    pub fn regs_mut(&mut self) -> &mut kvm_regs {
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        &mut self.fd.sync_regs_mut().regs
    }

    /// Queues external interrupt `vector` for delivery at the next entry
    /// (`KVM_INTERRUPT`; there is no in-kernel interrupt controller).
    pub fn inject_interrupt(&mut self, vector: u8) -> Result<()> {
        const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;
        let irq = kvm_bindings::kvm_interrupt { irq: u32::from(vector) };
        // SAFETY: KVM_INTERRUPT on our vCPU fd with a valid kvm_interrupt.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_INTERRUPT, &irq) };
        if r != 0 {
            return Err(KvmError::Os("KVM_INTERRUPT", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes the vCPU runnable (`KVM_SET_MP_STATE`): with KVM's in-kernel
    /// LAPIC an application processor otherwise waits for INIT and SIPI.
    pub fn set_runnable(&self) -> Result<()> {
        let st = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        self.fd.set_mp_state(st).map_err(|e| KvmError::Ioctl("KVM_SET_MP_STATE", e))
    }
}

impl vmm::hv::Kick for KickHandle {
    fn kick(&self) {
        KickHandle::kick(self)
    }
    fn kicks(&self) -> u64 {
        KickHandle::kicks(self)
    }
}

impl vmm::hv::Vcpu for Vcpu {
    fn index(&self) -> u32 {
        self.index
    }
    fn kick_handle(&self) -> std::sync::Arc<dyn vmm::hv::Kick> {
        self.kick.clone()
    }
    fn bind_thread(&self) {
        Vcpu::bind_thread(self)
    }
    fn unbind_thread(&self) {
        Vcpu::unbind_thread(self)
    }
    fn run(&mut self) -> std::result::Result<Exit, vmm::hv::BackendError> {
        Vcpu::run(self).map_err(|e| Box::new(e) as _)
    }
    fn regs(&mut self) -> vmm::hv::Regs {
        let (fs_base, gs_base) = {
            let s = self.sregs();
            (s.fs.base, s.gs.base)
        };
        let r = Vcpu::regs(self);
        vmm::hv::Regs {
            gpr: [
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
                r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
            fs_base,
            gs_base,
        }
    }
    fn set_regs(&mut self, regs: &vmm::hv::Regs) {
        let r = self.regs_mut();
        let g = &regs.gpr;
        (r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi) = (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) = (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = regs.rip;
        r.rflags = regs.rflags;
    }
    fn cr2(&mut self) -> u64 {
        self.sregs().cr2
    }
    fn inject_interrupt(&mut self, vector: u8) -> std::result::Result<bool, vmm::hv::BackendError> {
        match Vcpu::inject_interrupt(self, vector) {
            Ok(()) => Ok(true),
            // Not ready for an interrupt now (IF clear or an event pending).
            Err(KvmError::Os(_, e)) if e.raw_os_error() == Some(libc::ENXIO) => Ok(false),
            Err(e) => Err(Box::new(e)),
        }
    }
    fn interrupt_ready(&mut self) -> bool {
        // As of the last exit (KVM fills both on every return from
        // KVM_RUN): IF set, and no interrupt shadow or event being injected.
        // KVM_INTERRUPT without an in-kernel irqchip queues the vector as
        // injected whatever the state, so this check is what keeps it
        // from overwriting an event or ignoring IF.
        let run = self.fd.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }
    fn request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = u8::from(on);
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // Kicks after this point must not touch the kvm_run mapping.
        self.kick.state.lock().unwrap_or_else(|e| e.into_inner()).alive = false;
    }
}
