//! The hypervisor interface: what the VM layer needs from a backend that
//! runs vCPUs (KVM in `vmm-kvm`; a bare-metal hypervisor or another host
//! API could implement the same), and from the memory system the vCPUs'
//! translations come from.
//!
//! The VM layer drives vCPUs through [`Vcpu`]: run until the next exit,
//! read and write the general registers, read CR2, inject a vector, kick
//! from another thread. Everything above — the exit loop, nested faults,
//! MMIO emulation, harvest points, workloads and their checks, device
//! models — is written once, in this crate, against these traits.

use std::sync::Arc;

use nested_pt::{Access, PteFormat};

/// An error of a backend, boxed so that each backend keeps its own type.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the machine layer.
#[derive(Debug)]
pub enum MachineError {
    /// The backend failed (an ioctl, a host call).
    Backend(BackendError),
    /// The guest did something fatal (unexpected exception, triple fault,
    /// an access outside every mapping...).
    Guest(String),
    /// Setting the machine up failed.
    Setup(String),
}

impl std::fmt::Display for MachineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MachineError::Backend(e) => write!(f, "backend: {e}"),
            MachineError::Guest(s) => write!(f, "guest error: {s}"),
            MachineError::Setup(s) => write!(f, "setup failed: {s}"),
        }
    }
}

impl std::error::Error for MachineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MachineError::Backend(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Result alias of the machine layer.
pub type Result<T> = std::result::Result<T, MachineError>;

/// What a vCPU's run returned with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `out` to this port (registers are in [`Vcpu::regs`]).
    Out(u16),
    /// Interrupted by a kick or a signal.
    Interrupted,
    /// Triple fault / shutdown.
    Shutdown,
    /// `hlt` executed.
    Halt,
    /// Anything else, fatal.
    Other(&'static str, u64),
}

/// General registers in the hardware encoding order (RAX, RCX, RDX, RBX,
/// RSP, RBP, RSI, RDI, R8-R15), RIP, RFLAGS and the FS/GS bases: the same
/// register file the instruction emulator works on (indices in
/// [`crate::emul::gpr`]).
pub use crate::emul::Regs;

/// Where the runtime lives, as the vCPU sees it (guest-linear addresses,
/// which equal vmspace guest-physical addresses: CR3 is the vmspace root).
#[derive(Debug, Clone, Copy)]
pub struct LongModeSetup {
    /// CR3: the physical address (KVM guest-physical) of the table root.
    pub cr3: u64,
    /// GDT base and limit.
    pub gdt: (u64, u16),
    /// IDT base and limit.
    pub idt: (u64, u16),
    /// This vCPU's TSS base (its descriptor is at `sel::TSS0 + 16 * index`).
    pub tss: u64,
    /// vCPU index (selects the TSS descriptor).
    pub index: u16,
    /// CPL 3 entry point.
    pub rip: u64,
    /// CPL 3 stack pointer.
    pub rsp: u64,
    /// First argument (the parameter block).
    pub rdi: u64,
}

/// Forces one vCPU out of guest context from any thread.
pub trait Kick: Send + Sync {
    /// Makes the vCPU leave guest context soon (or its next entry return at
    /// once). Does not wait.
    fn kick(&self);
    /// Kicks sent so far.
    fn kicks(&self) -> u64;
}

/// One vCPU, owned by the thread that runs it.
pub trait Vcpu: Send {
    /// The vCPU's index.
    fn index(&self) -> u32;
    /// A handle other threads kick it with.
    fn kick_handle(&self) -> Arc<dyn Kick>;
    /// Records the calling thread as the vCPU's (the kick's target).
    fn bind_thread(&self);
    /// Forgets the vCPU's thread (before the thread ends).
    fn unbind_thread(&self);
    /// Enters the guest until the next exit.
    fn run(&mut self) -> std::result::Result<Exit, BackendError>;
    /// The general registers as of the last exit.
    fn regs(&mut self) -> Regs;
    /// Sets the general registers (written back at the next entry).
    fn set_regs(&mut self, regs: &Regs);
    /// CR2 as of the last exit (the faulting address of a #PF).
    fn cr2(&mut self) -> u64;
    /// Queues external interrupt `vector` for the next entry. `Ok(false)`
    /// when the vCPU cannot take it now (interrupts disabled).
    fn inject_interrupt(&mut self, vector: u8) -> std::result::Result<bool, BackendError>;
    /// Whether an external interrupt injected now is taken at the next
    /// entry, as of the last exit (RFLAGS.IF set, no interrupt shadow, no
    /// event already being injected). The default says yes, for backends
    /// that queue interrupts themselves.
    fn interrupt_ready(&mut self) -> bool {
        true
    }
    /// Asks (`on`) or stops asking for an exit, reported as
    /// [`Exit::Interrupted`], as soon as the guest can take an external
    /// interrupt (the interrupt window). The default does nothing.
    fn request_interrupt_window(&mut self, _on: bool) {}
}

/// Why a nested fault was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultError {
    /// No mapping covers the address: a guest error, or an MMIO access.
    NoMapping,
    /// The mapping does not allow the access: a guest error.
    Protection,
    /// The host could not serve it (out of memory, table pages...).
    Host,
}

/// The memory system as the vCPU loop sees it.
pub trait MemBackend: Send + Sync {
    /// Short description for reports.
    fn describe(&self) -> String;
    /// The CR3 / nCR3 / EPTP value of the table root.
    fn cr3(&self) -> u64;
    /// The table format.
    fn format(&self) -> PteFormat;
    /// The memory port of vCPU `vcpu`, owned by its thread; `kick` must
    /// be called when a change needs the vCPU out of the guest.
    fn vcpu_mem(&self, vcpu: usize, kick: Arc<dyn Kick>) -> Result<Box<dyn VcpuMem + '_>>;
    /// Host pointer to the byte at guest address `gpa` if it is resident.
    fn host_ptr(&self, gpa: u64) -> Option<*mut u8>;
    /// Reads and clears the dirty bits of `[gpa, gpa+len)` into `bitmap`
    /// (bit per 4 KiB page), with every vCPU out of the guest, and makes
    /// the cleared bits effective. Returns the count.
    fn harvest(&self, gpa: u64, len: u64, bitmap: &mut [u64]) -> Result<u64>;
    /// Pages resident in the tables.
    fn resident(&self) -> u64;
    /// Current table generation.
    fn generation(&self) -> u64;
    /// Number of table pages in use.
    fn table_pages(&self) -> u64;
    /// Where the runtime's boot ROM is mapped ([`crate::runtime::RT_BASE`]
    /// unless the backend put it elsewhere).
    fn rom_base(&self) -> u64 {
        crate::runtime::RT_BASE
    }
}

/// One vCPU's access to the memory system (its vmspace client).
pub trait VcpuMem {
    /// Marks the vCPU as in guest context (`table_enter`), calls `run`
    /// with the table generation read at entry, and marks the exit
    /// (`table_exit`) when `run` returns.
    fn entered(&mut self, run: &mut dyn FnMut(u64) -> Result<Exit>) -> Result<Exit>;
    /// Serves a nested fault at `gpa` (maps the page and, where useful,
    /// its neighbours).
    fn fault(&mut self, gpa: u64, access: Access) -> std::result::Result<(), FaultError>;
    /// Reads guest memory at `gpa` for instruction emulation (through a
    /// page hold: safe against concurrent unmaps). `None` when nothing is
    /// mapped there.
    fn read(&mut self, _gpa: u64, _buf: &mut [u8]) -> Option<()> {
        None
    }
    /// Writes guest memory at `gpa` for instruction emulation (through a
    /// writable page hold, which marks the page dirty). `None` when nothing
    /// writable is mapped there.
    fn write(&mut self, _gpa: u64, _data: &[u8]) -> Option<()> {
        None
    }
}
