//! The KVM virtual machine: memory slots, the shadow-page zap, host facts.

use crate::mem::{PAGE, SharedRegion};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of the KVM layer.
#[derive(Debug)]
pub enum KvmError {
    /// `/dev/kvm` is missing or cannot be opened.
    NoKvm(String),
    /// A KVM ioctl failed.
    Ioctl(&'static str, kvm_ioctls::Error),
    /// A host system call failed.
    Os(&'static str, std::io::Error),
    /// The host lacks something we need.
    Unsupported(String),
    /// The guest did something fatal (unexpected exception, triple fault...).
    Guest(String),
    /// Guest-visible setup failed in the table or vmspace layer.
    Setup(String),
    /// A host access to a shared region was out of range or misaligned.
    Region(crate::mem::RegionError),
}

impl From<vmm::hv::MachineError> for KvmError {
    fn from(e: vmm::hv::MachineError) -> Self {
        match e {
            vmm::hv::MachineError::Backend(b) => match b.downcast::<KvmError>() {
                Ok(k) => *k,
                Err(other) => KvmError::Setup(other.to_string()),
            },
            vmm::hv::MachineError::Guest(s) => KvmError::Guest(s),
            vmm::hv::MachineError::Setup(s) => KvmError::Setup(s),
        }
    }
}

impl From<KvmError> for vmm::hv::MachineError {
    fn from(e: KvmError) -> Self {
        match e {
            KvmError::Guest(s) => vmm::hv::MachineError::Guest(s),
            e => vmm::hv::MachineError::Backend(Box::new(e)),
        }
    }
}

impl From<crate::mem::RegionError> for KvmError {
    fn from(e: crate::mem::RegionError) -> Self {
        KvmError::Region(e)
    }
}

impl fmt::Display for KvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmError::NoKvm(s) => write!(f, "KVM is not available: {s}"),
            KvmError::Ioctl(what, e) => write!(f, "KVM ioctl {what} failed: {e}"),
            KvmError::Os(what, e) => write!(f, "{what} failed: {e}"),
            KvmError::Unsupported(s) => write!(f, "host does not support {s}"),
            KvmError::Guest(s) => write!(f, "guest error: {s}"),
            KvmError::Setup(s) => write!(f, "setup failed: {s}"),
            KvmError::Region(e) => write!(f, "shared region: {e}"),
        }
    }
}

impl std::error::Error for KvmError {}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, KvmError>;

/// Whether `/dev/kvm` can be opened here (tests skip when it cannot).
pub fn kvm_available() -> std::result::Result<(), String> {
    match Kvm::new() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("/dev/kvm: {e}")),
    }
}

/// How KVM translates guest addresses on this host (the VM layer's
/// [`vmm::host::PagingMode`]), which decides how changes to our tables are
/// made visible to running vCPUs: with hardware nested paging a CR3 reload
/// inside the guest; with shadow paging a frame's KVM view is dropped
/// (`MADV_DONTNEED`) per leaf change and a memory-slot change zaps every
/// shadow page when table pages were freed.
pub use vmm::host::PagingMode;

/// What the host's KVM module says about itself (sysfs), before probing.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// The vendor module found (`kvm_intel`, `kvm_amd`, `kvm_pvm`, ...).
    pub module: String,
    /// Whether that module reports EPT/NPT enabled.
    pub tdp_param: Option<bool>,
    /// Whether KVM offers 1 GiB pages to guests (CPUID 0x80000001 EDX 26).
    pub page_1g: bool,
    /// Guest MAXPHYADDR from the supported CPUID.
    pub phys_bits: u8,
    /// `KVM_CAP_SYNC_REGS` mask.
    pub sync_regs: u32,
}

fn read_param(path: &str) -> Option<bool> {
    let s = std::fs::read_to_string(path).ok()?;
    let t = s.trim();
    Some(t == "Y" || t == "1" || t == "y")
}

impl HostFacts {
    /// Collects the host facts from sysfs and KVM.
    pub fn gather(kvm: &Kvm) -> Result<Self> {
        let (module, tdp_param) = if std::path::Path::new("/sys/module/kvm_intel").exists() {
            ("kvm_intel".to_string(), read_param("/sys/module/kvm_intel/parameters/ept"))
        } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
            ("kvm_amd".to_string(), read_param("/sys/module/kvm_amd/parameters/npt"))
        } else if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            ("kvm_pvm".to_string(), Some(false))
        } else {
            ("unknown".to_string(), None)
        };
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut page_1g = false;
        let mut phys_bits = 36;
        for e in cpuid.as_slice() {
            if e.function == 0x8000_0001 {
                page_1g = e.edx & (1 << 26) != 0;
            }
            if e.function == 0x8000_0008 {
                phys_bits = (e.eax & 0xff) as u8;
            }
        }
        let sync_regs = kvm.check_extension_int(Cap::SyncRegs).max(0) as u32;
        Ok(HostFacts { module, tdp_param, page_1g, phys_bits, sync_regs })
    }
}

/// KVM guest-physical address of the dummy slot used to zap shadow pages.
const ZAP_SLOT_GPA: u64 = 0xff_0000_0000;

/// A KVM VM with the memory slots of one vmspace.
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
    regions: Mutex<Vec<(u32, Arc<SharedRegion>)>>,
    zap_region: SharedRegion,
    zap_slot: u32,
    zap_lock: Mutex<()>,
    zaps: AtomicU64,
    zap_ns: AtomicU64,
    raw_slots: AtomicU64,
    facts: HostFacts,
}

impl fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmVm").field("facts", &self.facts).finish_non_exhaustive()
    }
}

impl KvmVm {
    /// Opens `/dev/kvm` and creates an empty VM.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| KvmError::NoKvm(format!("/dev/kvm: {e}")))?;
        let vm = kvm.create_vm().map_err(|e| KvmError::Ioctl("KVM_CREATE_VM", e))?;
        let facts = HostFacts::gather(&kvm)?;
        if facts.sync_regs & (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS)
            != (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS)
        {
            return Err(KvmError::Unsupported("KVM_CAP_SYNC_REGS (regs + sregs)".into()));
        }
        let zap_region = SharedRegion::new("vmm-kvm-zap", PAGE).map_err(|e| KvmError::Os("memfd", e))?;
        let nslots = kvm.get_nr_memslots() as u32;
        Ok(KvmVm {
            kvm,
            vm,
            regions: Mutex::new(Vec::new()),
            zap_region,
            zap_slot: nslots.saturating_sub(1).min(500),
            zap_lock: Mutex::new(()),
            zaps: AtomicU64::new(0),
            zap_ns: AtomicU64::new(0),
            raw_slots: AtomicU64::new(0),
            facts,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.vm
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Host facts gathered at creation.
    pub fn facts(&self) -> &HostFacts {
        &self.facts
    }

    /// Registers `region` as KVM guest-physical memory at `kvm_gpa`; the
    /// region stays alive as long as the VM.
    pub fn add_region(&self, region: Arc<SharedRegion>, kvm_gpa: u64) -> Result<u32> {
        let mut regions = self.regions.lock().expect("regions lock");
        let slot = regions.len() as u32;
        let mr = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: kvm_gpa,
            memory_size: region.len(),
            userspace_addr: region.kvm_addr(),
        };
        // SAFETY: the KVM view stays mapped as long as the region, and the
        // region is kept alive by `regions` for the lifetime of the VM.
        unsafe { self.vm.set_user_memory_region(mr) }.map_err(|e| KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        regions.push((slot, region));
        Ok(slot)
    }

    /// Turns KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`) on or off for the
    /// slot of `region` (registered at `kvm_gpa` by
    /// [`add_region`](Self::add_region)); returns the slot. KVM's own
    /// dirty tracking, for benchmarks that compare with it.
    pub fn set_dirty_log(&self, region: &Arc<SharedRegion>, kvm_gpa: u64, on: bool) -> Result<u32> {
        let regions = self.regions.lock().expect("regions lock");
        let slot = regions
            .iter()
            .find(|(_, r)| Arc::ptr_eq(r, region))
            .map(|(s, _)| *s)
            .ok_or_else(|| KvmError::Setup("dirty log: region not registered".into()))?;
        let mr = kvm_userspace_memory_region {
            slot,
            flags: if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: kvm_gpa,
            memory_size: region.len(),
            userspace_addr: region.kvm_addr(),
        };
        // SAFETY: the same slot, address and size as its registration (the
        // region is alive in `regions`); only the flags change.
        unsafe { self.vm.set_user_memory_region(mr) }
            .map_err(|e| KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION (dirty log)", e))?;
        Ok(slot)
    }

    /// Reads and clears KVM's dirty log of `slot` (`len` bytes, with the
    /// log on: [`set_dirty_log`](Self::set_dirty_log)); returns the number
    /// of pages it reported dirty.
    pub fn dirty_log_pages(&self, slot: u32, len: u64) -> Result<u64> {
        let log = self.vm.get_dirty_log(slot, len as usize).map_err(|e| KvmError::Ioctl("KVM_GET_DIRTY_LOG", e))?;
        Ok(log.iter().map(|w| w.count_ones() as u64).sum())
    }

    /// Registers `len` bytes of host memory at `host` (a shared mapping
    /// owned by the caller) as KVM guest-physical memory at `kvm_gpa`.
    ///
    /// # Safety
    ///
    /// The mapping must stay valid until the VM is dropped (KVM would
    /// otherwise reach whatever is mapped there later).
    pub unsafe fn add_raw_region(&self, host: u64, len: u64, kvm_gpa: u64) -> Result<u32> {
        let mut regions = self.regions.lock().expect("regions lock");
        let slot = regions.len() as u32 + self.raw_slots.fetch_add(1, Ordering::SeqCst) as u32 + 100;
        let mr = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: kvm_gpa,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: the caller keeps the mapping alive for the VM's lifetime.
        unsafe { self.vm.set_user_memory_region(mr) }.map_err(|e| KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        regions.retain(|_| true);
        Ok(slot)
    }

    /// Deletes raw slot `slot` (from [`add_raw_region`](Self::add_raw_region))
    /// at `kvm_gpa`: KVM no longer reaches the mapping (and, on a shadow
    /// host, drops every shadow page). The caller may unmap the memory
    /// afterwards.
    pub fn remove_raw_region(&self, slot: u32, kvm_gpa: u64) -> Result<()> {
        let mr =
            kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: kvm_gpa, memory_size: 0, userspace_addr: 0 };
        // SAFETY: deleting a slot makes KVM drop its references to the
        // memory; nothing is mapped.
        unsafe { self.vm.set_user_memory_region(mr) }
            .map_err(|e| KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION (delete)", e))?;
        self.zaps.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Drops every shadow page KVM holds for this VM by creating and deleting
    /// a one-page memory slot (x86 KVM zaps all shadow pages when a slot is
    /// deleted). Needed on shadow-paging hosts after a change to a non-leaf
    /// entry and before a freed table page is reused. Returns the time taken.
    pub fn zap_all(&self) -> Result<Duration> {
        let _g = self.zap_lock.lock().expect("zap lock");
        let t = Instant::now();
        let mut mr = kvm_userspace_memory_region {
            slot: self.zap_slot,
            flags: 0,
            guest_phys_addr: ZAP_SLOT_GPA,
            memory_size: PAGE,
            userspace_addr: self.zap_region.kvm_addr(),
        };
        // SAFETY: the one-page zap region lives as long as the VM; the slot
        // is deleted again right below and never used by the guest.
        unsafe { self.vm.set_user_memory_region(mr) }
            .map_err(|e| KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION (zap add)", e))?;
        mr.memory_size = 0;
        // SAFETY: deleting the slot we just created.
        unsafe { self.vm.set_user_memory_region(mr) }
            .map_err(|e| KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION (zap delete)", e))?;
        let d = t.elapsed();
        self.zaps.fetch_add(1, Ordering::SeqCst);
        self.zap_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        Ok(d)
    }

    /// Number of full shadow zaps done so far (an epoch: table pages freed
    /// before epoch `n` may be reused once `zap_count() > n`).
    pub fn zap_count(&self) -> u64 {
        self.zaps.load(Ordering::SeqCst)
    }

    /// Total time spent in [`zap_all`](Self::zap_all).
    pub fn zap_time(&self) -> Duration {
        Duration::from_nanos(self.zap_ns.load(Ordering::Relaxed))
    }
}
