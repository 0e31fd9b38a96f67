//! The production backend: a `vmspace::VmSpace` whose RAM is a memfd
//! reservoir and whose table pages live in a KVM memory slot.
//!
//! Frame numbers are KVM guest-physical pages: the reservoir's frame base
//! is [`RAM_KVM_BASE`] / 4 KiB and its file is mapped a second time (the
//! *KVM view*) and registered as a memory slot there; table pages come from
//! [`SlotPages`] at [`TABLES_KVM_BASE`].
//!
//! Every vCPU thread has its own `VmClient` with a kick hook (signal plus
//! `immediate_exit`); `table_enter`/`table_exit` bracket each `KVM_RUN`.
//! The backend keeps one more client of its own that never enters guest
//! context: its invalidation callback makes changes effective on a
//! shadow-paging host, whether or not vCPU threads exist at the time:
//!
//! - unmap: the KVM view of every frame of the range is dropped
//!   (`MADV_DONTNEED`), which makes KVM zap its shadow entries for them; if
//!   table pages were freed (a non-leaf change, `Invalidation::tables_freed`)
//!   all shadow pages are zapped;
//! - dirty-bit changes made by someone else than [`SpaceBackend::harvest`]
//!   (which drops exactly the frames it cleared, as `track_dirty_frames`
//!   reports them): all shadow pages are zapped;
//! - swap-out (`Cause::Swap`): the frames the swapper evicts or whose
//!   accessed bit it cleared are dropped (it frees the evicted ones only
//!   after every client was told);
//! - on a hardware-nested host nothing is needed here: the generation bump
//!   makes each vCPU reload CR3 before it resumes.

use crate::backend::{FaultError, InvalStats, MemBackend, RAM_KVM_BASE, TABLES_KVM_BASE, VcpuMem, npt_format};
use crate::mem::{PAGE, SharedRegion};
use crate::slot_pages::SlotPages;
use crate::vcpu::Exit;
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use nested_pt::{Access, Pfn, Prot};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm::hv::Kick;
use vmspace::{Arena, Cause, Gpa, HostView, Invalidation, MemfdReservoir, SpaceConfig, VmClient, VmObject, VmSpace};

/// Default dirty-page count above which a harvest may zap every shadow page
/// rather than drop frames one by one (it also needs a quarter of the
/// resident pages dirty). Measured on our shadow host: a frame drop costs
/// ~6-8 µs plus a host and a shadow fault when the frame is next touched;
/// a zap 70 µs to over 1 ms (it grows with the shadow pages) plus a shadow
/// fault (~9 µs) for every page touched afterwards. `0` always zaps,
/// `u64::MAX` never does.
pub const DEFAULT_ZAP_THRESHOLD: u64 = vmm::host::DEFAULT_ZAP_THRESHOLD;

/// Size of the vmspace: 1 TiB (RAM in the first 512 GiB, runtime above).
pub const SPACE_SIZE: u64 = 1 << 40;

/// Host pointer to byte `off % 4096` of frame `pfn` in the reservoir's
/// arena (the host view of every frame).
fn arena_ptr(arena: &Arena, pfn: Pfn, off: u64) -> Option<*mut u8> {
    // SAFETY: `off % PAGE` stays inside the frame's page, which lies inside
    // the arena (`host_ptr` checked the frame).
    arena.host_ptr(pfn).map(|p| unsafe { p.as_ptr().add((off % PAGE) as usize) })
}

/// State the invalidation callback needs (shared with the backend).
struct Inval {
    vm: Arc<KvmVm>,
    mode: PagingMode,
    /// The KVM view of the reservoir file: registered with KVM, and only
    /// used through its address; unmapped on drop, after the VM (which
    /// holds no Rust reference into it) no longer runs vCPUs.
    view: HostView,
    frame_base: u64,
    handled_gen: Mutex<u64>,
    own_harvest: AtomicBool,
    stats: InvalStats,
}

impl Inval {
    /// Drops the KVM view of `pfns` (coalescing runs of consecutive frames).
    fn drop_frames(&self, pfns: impl Iterator<Item = Pfn>) -> Result<u64> {
        let t = Instant::now();
        let mut n = 0;
        let mut run: Option<(u64, u64)> = None;
        let base = self.view.as_ptr() as u64;
        let flush = |(first, count): (u64, u64)| -> Result<()> {
            let off = (first - self.frame_base) * PAGE;
            // SAFETY: the range lies inside our KVM view of the reservoir
            // file (frames come from the reservoir); MADV_DONTNEED on a
            // shared file mapping drops page-table entries, never data.
            let r = unsafe {
                libc::madvise((base + off) as *mut libc::c_void, (count * PAGE) as usize, libc::MADV_DONTNEED)
            };
            if r != 0 {
                return Err(KvmError::Os("madvise(MADV_DONTNEED)", std::io::Error::last_os_error()));
            }
            Ok(())
        };
        let mut outside = false;
        for p in pfns {
            if p.0 < self.frame_base || (p.0 - self.frame_base) * PAGE >= self.view.len() as u64 {
                // Device memory lives in slots of its own, outside the
                // reservoir's view: no per-frame drop reaches it.
                outside = true;
                continue;
            }
            n += 1;
            run = match run {
                Some((f, c)) if f + c == p.0 => Some((f, c + 1)),
                Some(r) => {
                    flush(r)?;
                    Some((p.0, 1))
                }
                None => Some((p.0, 1)),
            };
        }
        if let Some(r) = run {
            flush(r)?;
        }
        if outside {
            self.zap();
        }
        self.stats.frames_dropped.fetch_add(n, Ordering::Relaxed);
        self.stats.drop_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn zap(&self) {
        if self.vm.zap_all().is_ok() {
            self.stats.zaps.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_invalidate(&self, inv: &Invalidation<'_>) {
        if self.mode != PagingMode::Shadow {
            return;
        }
        {
            let mut h = self.handled_gen.lock().expect("inval lock");
            if inv.generation <= *h {
                return;
            }
            *h = inv.generation;
        }
        match &inv.cause {
            Cause::Unmap { object, offset } => {
                let pages = inv.len / PAGE;
                let frames = (0..pages).filter_map(|i| object.frame_at(offset + i * PAGE));
                if self.drop_frames(frames).is_err() || inv.tables_freed {
                    self.zap();
                }
            }
            Cause::Dirty => {
                // Our own harvest drops frames or zaps after it returns;
                // someone else's drops the frames it cleared if it
                // collected them, else everything goes.
                if !self.own_harvest.load(Ordering::SeqCst) {
                    match inv.cleared {
                        Some(frames) if self.drop_frames(frames.iter().copied()).is_ok() => {}
                        _ => self.zap(),
                    }
                }
            }
            Cause::Tracking | Cause::Remap => self.zap(),
            // The swapper cleared leaves of pages it evicts (their frames
            // are freed once this returns) and accessed bits of pages it
            // spared: KVM must drop its translations of exactly those
            // frames (so that an evicted frame is no longer reached and a
            // spared page's next access walks the table, setting the bit).
            Cause::Swap => match inv.cleared {
                Some(frames) if self.drop_frames(frames.iter().copied()).is_ok() => {}
                _ => self.zap(),
            },
        }
    }
}

/// How nested faults map pages ([`SpaceBackend::create_with`]).
#[derive(Debug, Clone, Copy)]
pub struct FaultOptions {
    /// Pages a nested fault maps around the faulting one.
    pub fault_around: u32,
    /// Preset the accessed bit on those neighbours
    /// (`vmspace::SpaceConfig::fault_around_accessed`): on a shadow-paging
    /// host KVM then prefetches them on its next shadow fault instead of
    /// faulting on each (it skips entries whose accessed bit is clear), at
    /// the price of accessed-bit precision for the neighbours.
    pub preset_accessed: bool,
    /// With `preset_accessed`, preset the dirty bit too on a write fault's
    /// neighbours while dirty tracking is off
    /// (`vmspace::SpaceConfig::fault_around_dirty_untracked`): KVM maps a
    /// clean entry read-only, so without it every written page faults
    /// once more in KVM to set the bit.
    pub preset_dirty_untracked: bool,
}

/// A vmspace run by KVM vCPUs.
pub struct SpaceBackend {
    vm: Arc<KvmVm>,
    reservoir: Arc<MemfdReservoir>,
    arena: Arena,
    inval: Arc<Inval>,
    admin: Mutex<VmClient<SlotPages>>,
    mode: PagingMode,
    /// The VM layer: segments over the vmspace.
    segments: Arc<vmm::Vm<SlotPages>>,
    /// Harvests with more dirty pages than this zap all shadow pages
    /// instead of dropping each frame (shadow hosts).
    pub zap_threshold: AtomicU64,
}

impl std::fmt::Debug for SpaceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaceBackend").field("mode", &self.mode).finish_non_exhaustive()
    }
}

fn vs(what: &str) -> impl Fn(vmspace::Error) -> KvmError + '_ {
    move |e| KvmError::Setup(format!("{what}: {e}"))
}

fn vm_err(what: &str) -> impl Fn(vmm::Error) -> KvmError + '_ {
    move |e| KvmError::Setup(format!("{what}: {e}"))
}

/// A system-memory segment made by [`SpaceBackend::ram_segment`]: its id
/// and its object (for host access through the reservoir's view).
#[derive(Debug, Clone)]
pub struct Segment {
    /// The segment id in the VM.
    pub id: u32,
    /// The memory object behind it.
    pub object: Arc<VmObject>,
}

/// KVM guest-physical base of device memory (each device-memory segment is
/// a memory slot of its own there).
pub const DEVMEM_KVM_BASE: u64 = 0x80_0000_0000;
/// Bytes of KVM guest-physical space reserved for device memory.
pub const DEVMEM_KVM_BYTES: u64 = 64 << 30;

/// Device memory of the VM layer as KVM memory slots.
struct KvmExposure {
    vm: Arc<KvmVm>,
    /// (first frame, slot) of each exposed segment.
    slots: Mutex<Vec<(u64, u32)>>,
}

impl vmm::devmem::MemoryExposure for KvmExposure {
    fn expose(&self, frame_base: Pfn, host: std::ptr::NonNull<u8>, len: u64) -> vmm::Result<()> {
        // SAFETY: the node's mapping stays valid until `withdraw`, which
        // deletes the slot before the mapping goes (DevMemReservoir's drop).
        let slot = unsafe { self.vm.add_raw_region(host.as_ptr() as u64, len, frame_base.0 * PAGE) }
            .map_err(|e| vmm::Error::Backend(e.to_string()))?;
        self.slots.lock().expect("slots").push((frame_base.0, slot));
        Ok(())
    }

    fn withdraw(&self, frame_base: Pfn, _len: u64) {
        let mut slots = self.slots.lock().expect("slots");
        if let Some(i) = slots.iter().position(|&(f, _)| f == frame_base.0) {
            let (_, slot) = slots.swap_remove(i);
            let _ = self.vm.remove_raw_region(slot, frame_base.0 * PAGE);
        }
    }
}

impl SpaceBackend {
    /// A vmspace with `ram_limit` bytes of reservoir and `table_bytes` of
    /// table pages, dirty tracking on, registered with `vm`.
    pub fn new(vm: Arc<KvmVm>, ram_limit: u64, table_bytes: u64, mode: PagingMode) -> Result<Self> {
        Self::with_fault_around(vm, ram_limit, table_bytes, mode, 16)
    }

    /// As [`new`](Self::new), with a fault-around window of `fault_around`
    /// pages per nested fault.
    pub fn with_fault_around(
        vm: Arc<KvmVm>,
        ram_limit: u64,
        table_bytes: u64,
        mode: PagingMode,
        fault_around: u32,
    ) -> Result<Self> {
        Self::create(vm, ram_limit, table_bytes, mode, fault_around, None)
    }

    /// A VM (`vmm::Vm`: memory segments over a vmspace) whose table pages,
    /// RAM (`ram_limit` bytes of reservoir) and device memory live in KVM
    /// memory slots of `vm`. `name` names its device-memory nodes (a name
    /// unique to this process is made up when `None`).
    pub fn create(
        vm: Arc<KvmVm>,
        ram_limit: u64,
        table_bytes: u64,
        mode: PagingMode,
        fault_around: u32,
        name: Option<&str>,
    ) -> Result<Self> {
        Self::create_with(
            vm,
            ram_limit,
            table_bytes,
            mode,
            FaultOptions { fault_around, preset_accessed: false, preset_dirty_untracked: false },
            name,
        )
    }

    /// As [`create`](Self::create), with the nested-fault policy `opts`.
    pub fn create_with(
        vm: Arc<KvmVm>,
        ram_limit: u64,
        table_bytes: u64,
        mode: PagingMode,
        opts: FaultOptions,
        name: Option<&str>,
    ) -> Result<Self> {
        let FaultOptions { fault_around, preset_accessed, preset_dirty_untracked } = opts;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let treg = Arc::new(SharedRegion::new("vmm-tables", table_bytes).map_err(|e| KvmError::Os("memfd", e))?);
        vm.add_region(treg.clone(), TABLES_KVM_BASE)?;
        let pages = SlotPages::new(treg, TABLES_KVM_BASE, Some(vm.clone()))?;
        let frame_base = RAM_KVM_BASE / PAGE;
        let reservoir = Arc::new(MemfdReservoir::new(ram_limit, Pfn(frame_base)).map_err(vs("reservoir"))?);
        let arena = vmspace::Reservoir::arena(&*reservoir);
        let view = reservoir.map_view(Pfn(frame_base), arena.pages(), true).map_err(vs("KVM view"))?;
        // SAFETY: the view lives in `inval`, owned by the backend, which
        // owns the VM's last use: vCPUs only run while a Machine holds the
        // backend.
        unsafe { vm.add_raw_region(view.as_ptr() as u64, view.len() as u64, RAM_KVM_BASE)? };
        let mut cfg = SpaceConfig::new(SPACE_SIZE, npt_format(&vm));
        cfg.track_dirty = true;
        cfg.fault_around = fault_around.max(1);
        cfg.fault_around_accessed = preset_accessed;
        cfg.fault_around_dirty_untracked = preset_dirty_untracked;
        let name = match name {
            Some(n) => n.to_string(),
            None => format!("kvm-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
        };
        let vcfg = vmm::VmConfig {
            name,
            space: cfg,
            devmem_frame_base: Pfn(DEVMEM_KVM_BASE / PAGE),
            devmem_frames: DEVMEM_KVM_BYTES / PAGE,
        };
        let exposure = Arc::new(KvmExposure { vm: vm.clone(), slots: Mutex::new(Vec::new()) });
        let segments = Arc::new(
            vmm::Vm::new(vcfg, pages, reservoir.clone(), exposure).map_err(|e| KvmError::Setup(format!("VM: {e}")))?,
        );
        let inval = Arc::new(Inval {
            vm: vm.clone(),
            mode,
            view,
            frame_base,
            handled_gen: Mutex::new(0),
            own_harvest: AtomicBool::new(false),
            stats: InvalStats::default(),
        });
        let admin = segments.space().client();
        let i2 = inval.clone();
        admin.set_invalidation(Some(move |inv: &Invalidation<'_>| i2.on_invalidate(inv)));
        Ok(SpaceBackend {
            vm,
            reservoir,
            arena,
            inval,
            admin: Mutex::new(admin),
            mode,
            segments,
            zap_threshold: AtomicU64::new(DEFAULT_ZAP_THRESHOLD),
        })
    }

    /// The VM layer: memory segments over the vmspace.
    pub fn segments(&self) -> &Arc<vmm::Vm<SlotPages>> {
        &self.segments
    }

    /// The vmspace.
    pub fn space(&self) -> &VmSpace<SlotPages> {
        self.segments.space()
    }

    /// The reservoir objects are allocated from.
    pub fn reservoir(&self) -> Arc<MemfdReservoir> {
        self.reservoir.clone()
    }

    /// A new system-memory segment of `size` bytes (the next free id).
    pub fn ram_segment(&self, size: u64) -> Result<Segment> {
        let id = self.segments.free_segment_id().ok_or_else(|| KvmError::Setup("no free segment id".into()))?;
        self.segments.alloc_segment(id, size, vmm::SegmentKind::SysMem).map_err(vm_err("segment"))?;
        let object = self.segments.segment_object(id).map_err(vm_err("segment"))?;
        Ok(Segment { id, object })
    }

    /// Host pointer to byte `off` of `object` (through the host view).
    pub fn object_ptr(&self, object: &VmObject, off: u64) -> Option<*mut u8> {
        arena_ptr(&self.arena, object.frame_at(off)?, off)
    }

    /// Calls `f(host pointer, buffer offset, bytes)` for each piece of
    /// `[off, off+len)` of `object` split at page boundaries (an object's
    /// frames need not be contiguous in the host view): the pointer
    /// addresses `bytes` bytes inside one host page of the object.
    fn object_pieces(
        &self,
        object: &VmObject,
        off: u64,
        len: usize,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let at = off.checked_add(done as u64).ok_or_else(|| KvmError::Setup("object access overflows".into()))?;
            let n = ((PAGE - at % PAGE) as usize).min(len - done);
            let p = self.object_ptr(object, at).ok_or_else(|| KvmError::Setup("object access out of range".into()))?;
            f(p, done, n);
            done += n;
        }
        Ok(())
    }

    /// Writes `bytes` into `object` at `off` through the host view.
    pub fn write_object(&self, object: &VmObject, off: u64, bytes: &[u8]) -> Result<()> {
        self.object_pieces(object, off, bytes.len(), |p, at, n| {
            // SAFETY: `p` addresses `n` bytes inside one resident host page
            // of the object (`object_pieces`); a raw copy.
            unsafe { std::ptr::copy_nonoverlapping(bytes[at..].as_ptr(), p, n) };
        })
    }

    /// Copies `out.len()` bytes of `object` at `off` out through the host
    /// view (raw copies: the guest may write the same memory).
    pub fn read_object(&self, object: &VmObject, off: u64, out: &mut [u8]) -> Result<()> {
        let len = out.len();
        self.object_pieces(object, off, len, |p, at, n| {
            // SAFETY: as in `write_object`, copying out.
            unsafe { std::ptr::copy_nonoverlapping(p, out[at..].as_mut_ptr(), n) };
        })
    }

    /// Makes the host allocate the pages of `[off, off+len)` of `object`
    /// in the KVM view and map them there writable
    /// (`MADV_POPULATE_WRITE`), so that KVM finds them without a host page
    /// fault: KVM prefetches neighbouring translations only for pages
    /// already mapped in the view it reads. Data is not changed.
    pub fn populate_kvm_view(&self, object: &VmObject, off: u64, len: u64) -> Result<()> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let base = self.inval.view.as_ptr() as u64;
        let end = off.checked_add(len).ok_or_else(|| KvmError::Setup("populate overflows".into()))?;
        let mut run: Option<(u64, u64)> = None;
        let flush = |(first, count): (u64, u64)| -> Result<()> {
            let at = (first - self.inval.frame_base) * PAGE;
            if at.checked_add(count * PAGE).is_none_or(|e| e > self.inval.view.len() as u64) {
                return Err(KvmError::Setup("frame outside the KVM view".into()));
            }
            // SAFETY: the range lies inside our KVM view of the reservoir
            // file (checked above); populating a shared file mapping
            // allocates and maps pages, it never changes their contents.
            let r = unsafe {
                libc::madvise((base + at) as *mut libc::c_void, (count * PAGE) as usize, MADV_POPULATE_WRITE)
            };
            if r != 0 {
                return Err(KvmError::Os("madvise(MADV_POPULATE_WRITE)", std::io::Error::last_os_error()));
            }
            Ok(())
        };
        let mut o = off;
        while o < end {
            let f = object.frame_at(o).ok_or_else(|| KvmError::Setup("populate outside the object".into()))?.0;
            if f < self.inval.frame_base {
                return Err(KvmError::Setup("frame outside the KVM view".into()));
            }
            run = match run {
                Some((first, c)) if first + c == f => Some((first, c + 1)),
                Some(r) => {
                    flush(r)?;
                    Some((f, 1))
                }
                None => Some((f, 1)),
            };
            o += PAGE;
        }
        if let Some(r) = run {
            flush(r)?;
        }
        Ok(())
    }

    /// Maps a new system-memory segment holding `bytes` (padded to pages)
    /// at `gpa` with `prot`, resident.
    pub fn map_bytes(&self, gpa: u64, bytes: &[u8], len: u64, prot: Prot) -> Result<Segment> {
        let seg = self.ram_segment(len)?;
        self.write_object(&seg.object, 0, bytes)?;
        self.map(&seg, gpa, len, prot)?;
        self.space().populate(Gpa(gpa), len).map_err(vs("populate"))?;
        Ok(seg)
    }

    /// Maps the runtime for `nvcpus` vCPUs whose regions have `npages`
    /// pages each: the boot ROM as a device-memory segment named "bootrom",
    /// read-only and executable just below 4 GiB (`runtime::BOOTROM_BASE`), as
    /// bhyve maps its boot ROM; per-vCPU data and ledgers as system memory
    /// (read + write).
    pub fn map_runtime(&self, nvcpus: usize, npages: u64) -> Result<()> {
        use crate::runtime::*;
        let rom = rom_image_at(&vmm::guest::code(), nvcpus, BOOTROM_BASE);
        let len = rom.len() as u64;
        let id = self.segments.free_segment_id().ok_or_else(|| KvmError::Setup("no free segment id".into()))?;
        let vm = &self.segments;
        vm.alloc_segment(id, len, vmm::SegmentKind::DevMem { name: "bootrom".into() }).map_err(vm_err("bootrom"))?;
        vm.write_segment(id, 0, &rom).map_err(vm_err("bootrom"))?;
        vm.map_segment(BOOTROM_BASE, id, 0, len, Some(Prot::READ | Prot::EXEC)).map_err(vm_err("bootrom"))?;
        // Resident before any vCPU runs: a fault while delivering a fault
        // would be a triple fault.
        self.space().populate(Gpa(BOOTROM_BASE), len).map_err(vs("populate bootrom"))?;
        for i in 0..nvcpus {
            self.map_bytes(params(i), &[], DATA_PAGES * PAGE, Prot::READ | Prot::WRITE)?;
        }
        self.map_bytes(LEDGER_BASE, &[], nvcpus as u64 * ledger_bytes(npages), Prot::READ | Prot::WRITE)?;
        Ok(())
    }

    /// Invalidation counters.
    pub fn inval_stats(&self) -> &InvalStats {
        &self.inval.stats
    }

    /// Paging mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Pages the reservoir has handed out.
    pub fn reservoir_pages(&self) -> u64 {
        vmspace::Reservoir::stats(&*self.reservoir).allocated / PAGE
    }

    /// Unmaps `[gpa, gpa+len)` (one whole mapping): `vmm::Vm::unmap`.
    pub fn unmap(&self, gpa: u64, len: u64) -> Result<()> {
        self.segments.unmap(gpa, len).map_err(vm_err("unmap"))
    }

    /// Maps the first `len` bytes of segment `seg` at `gpa`.
    pub fn map(&self, seg: &Segment, gpa: u64, len: u64, prot: Prot) -> Result<()> {
        self.segments.map_segment(gpa, seg.id, 0, len, Some(prot)).map_err(vm_err("map"))
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<KvmVm> {
        &self.vm
    }

    /// Keeps the admin client alive (it carries the invalidation callback).
    pub fn admin_client_orphaned(&self) -> bool {
        self.admin.lock().expect("admin client").is_orphaned()
    }
}

struct SpaceVcpu {
    client: VmClient<SlotPages>,
    cpu: u32,
}

impl VcpuMem for SpaceVcpu {
    fn entered(&mut self, run: &mut dyn FnMut(u64) -> vmm::hv::Result<Exit>) -> vmm::hv::Result<Exit> {
        let on = self.client.table_enter(self.cpu).map_err(vs("table_enter"))?;
        let r = run(on.generation());
        on.exit();
        r
    }

    fn fault(&mut self, gpa: u64, access: Access) -> std::result::Result<(), FaultError> {
        let prot = match access {
            Access::Read => Prot::READ,
            Access::Write => Prot::WRITE,
            Access::Execute => Prot::EXEC,
        };
        self.client.fault(Gpa(gpa), prot).map_err(|e| match e {
            vmspace::Error::NoMapping => FaultError::NoMapping,
            vmspace::Error::Protection => FaultError::Protection,
            _ => FaultError::Host,
        })
    }

    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Option<()> {
        // One page piece (the emulator splits at page boundaries), through
        // a read hold: safe against a concurrent unmap.
        let h = self.client.hold(Gpa(gpa & !(PAGE - 1)), Prot::READ).ok()?;
        let r = h.read((gpa % PAGE) as usize, buf).ok();
        h.release();
        r
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Option<()> {
        // A writable hold: its release marks the page dirty.
        let h = self.client.hold(Gpa(gpa & !(PAGE - 1)), Prot::READ | Prot::WRITE).ok()?;
        let r = h.write((gpa % PAGE) as usize, data).ok();
        h.release();
        r
    }
}

impl MemBackend for SpaceBackend {
    fn describe(&self) -> String {
        "vmspace".into()
    }
    fn cr3(&self) -> u64 {
        self.space().table_root()
    }
    fn format(&self) -> nested_pt::PteFormat {
        *self.space().format()
    }
    fn vcpu_mem(&self, vcpu: usize, kick: Arc<dyn Kick>) -> vmm::hv::Result<Box<dyn VcpuMem + '_>> {
        let client = self.space().client();
        client.set_kick(Some(move |_cpu: u32| kick.kick()));
        Ok(Box::new(SpaceVcpu { client, cpu: vcpu as u32 }))
    }
    fn host_ptr(&self, gpa: u64) -> Option<*mut u8> {
        let (pfn, _) = self.space().lookup(Gpa(gpa))?;
        arena_ptr(&self.arena, pfn, gpa)
    }
    fn harvest(&self, gpa: u64, len: u64, bitmap: &mut [u64]) -> vmm::hv::Result<u64> {
        Ok(self.harvest_kvm(gpa, len, bitmap)?)
    }
    fn resident(&self) -> u64 {
        self.space().resident_count()
    }
    fn generation(&self) -> u64 {
        self.space().table_gen()
    }
    fn table_pages(&self) -> u64 {
        self.space().with_table(|t| t.table_pages() as u64)
    }
    fn rom_base(&self) -> u64 {
        crate::runtime::BOOTROM_BASE
    }
}

impl SpaceBackend {
    /// Harvest, then make the cleared bits effective on a shadow host.
    fn harvest_kvm(&self, gpa: u64, len: u64, bitmap: &mut [u64]) -> Result<u64> {
        let mut frames = Vec::new();
        self.inval.own_harvest.store(true, Ordering::SeqCst);
        let r = self.space().track_dirty_frames(Gpa(gpa), len, bitmap, &mut frames);
        self.inval.own_harvest.store(false, Ordering::SeqCst);
        let n = r.map_err(vs("track_dirty"))?;
        // Zap when many pages were dirty: more than the threshold and more
        // than a quarter of the resident pages (a zap makes every resident
        // page re-fault in KVM when next touched, a frame drop only the
        // dropped frame, at about three times the cost).
        let threshold = self.zap_threshold.load(Ordering::Relaxed);
        // Threshold 0 (a migration's harvests): zap whenever anything was
        // dirty; a harvest that cleared nothing has nothing to make
        // effective.
        let zap = match threshold {
            0 => n > 0,
            u64::MAX => false,
            t => n > t && n > self.space().resident_count() / 4,
        };
        if self.mode == PagingMode::Shadow && zap {
            // Many frames: one zap of every shadow page is far cheaper than
            // dropping each frame (a dropped frame costs a host page fault
            // as well as a shadow fault when it is next touched).
            self.inval.zap();
        } else if self.mode == PagingMode::Shadow && n > 0 {
            // The cleared bits only take effect once KVM drops the shadow
            // entries that still allow writes without setting D: those of
            // exactly the frames the harvest cleared.
            self.inval.drop_frames(frames.into_iter())?;
        }
        Ok(n)
    }
}
