//! Table pages inside a KVM memory slot.
//!
//! [`SlotPages`] is the `nested_pt::TablePages` provider of every table the
//! vCPUs walk: its pages live in a shared-memory region registered with KVM,
//! and a page's frame number is its KVM guest-physical page, so the entries
//! the tree writes (`table_entry(pfn)`) are exactly what the vCPU follows.
//!
//! On a shadow-paging host KVM may still hold a shadow page built from a
//! table page after the tree freed it; if the page came back as a different
//! table, the guest could keep using the stale structure. Freed pages are
//! therefore quarantined until the VM's zap count has moved past the count at
//! the time they were freed; when nothing else is left, the provider zaps
//! itself (see [`KvmVm::zap_all`]).

use crate::mem::{PAGE, SharedRegion};
use crate::vm::{KvmError, KvmVm};
use nested_pt::{Pfn, TablePages};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// `TablePages` over a KVM memory slot.
pub struct SlotPages {
    region: Arc<SharedRegion>,
    base_pfn: u64,
    npages: u64,
    next: u64,
    free: Vec<u64>,
    quarantine: Vec<(u64, u64)>,
    vm: Option<Arc<KvmVm>>,
    live: Arc<AtomicU64>,
}

impl std::fmt::Debug for SlotPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotPages")
            .field("base_pfn", &self.base_pfn)
            .field("npages", &self.npages)
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SlotPages {
    /// Pages of `region`, which KVM sees at guest-physical `kvm_gpa`.
    /// With `vm`, freed pages are quarantined until a shadow zap.
    ///
    /// Refused when `kvm_gpa` is not page-aligned or the region would end
    /// beyond the architectural 52-bit physical-address limit (its frame
    /// numbers could not be put in any table entry). A table built on the
    /// provider further refuses frames beyond its own format's width
    /// (`nested_pt::PteFormat::frame_limit`).
    pub fn new(region: Arc<SharedRegion>, kvm_gpa: u64, vm: Option<Arc<KvmVm>>) -> Result<Self, KvmError> {
        const PHYS_LIMIT: u64 = 1 << 52;
        if !kvm_gpa.is_multiple_of(PAGE) {
            return Err(KvmError::Setup(format!("table slot at {kvm_gpa:#x} is not page-aligned")));
        }
        if kvm_gpa.checked_add(region.len()).is_none_or(|end| end > PHYS_LIMIT) {
            return Err(KvmError::Setup(format!(
                "table slot at {kvm_gpa:#x} of {:#x} bytes ends beyond the 52-bit physical limit",
                region.len()
            )));
        }
        let npages = region.len() / PAGE;
        Ok(SlotPages {
            region,
            base_pfn: kvm_gpa / PAGE,
            npages,
            next: 0,
            free: Vec::new(),
            quarantine: Vec::new(),
            vm,
            live: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A counter of pages currently allocated (shared, for reports).
    pub fn live_counter(&self) -> Arc<AtomicU64> {
        self.live.clone()
    }

    /// The region holding the pages.
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    fn reclaim(&mut self) {
        let Some(vm) = &self.vm else {
            self.free.extend(self.quarantine.drain(..).map(|(_, p)| p));
            return;
        };
        if self.quarantine.is_empty() {
            return;
        }
        let mut zaps = vm.zap_count();
        if !self.quarantine.iter().any(|&(epoch, _)| epoch < zaps) && vm.zap_all().is_ok() {
            zaps = vm.zap_count();
        }
        let mut keep = Vec::new();
        for (epoch, p) in self.quarantine.drain(..) {
            if epoch < zaps { self.free.push(p) } else { keep.push((epoch, p)) }
        }
        self.quarantine = keep;
    }
}

// SAFETY: pages are distinct 4 KiB pieces of one live shared mapping; a page
// is handed out once until freed, zeroed before it is handed out, and the
// pointer of a pfn outside the region is null.
unsafe impl TablePages for SlotPages {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        let idx = if let Some(i) = self.free.pop() {
            i
        } else if self.next < self.npages {
            self.next += 1;
            self.next - 1
        } else {
            self.reclaim();
            self.free.pop()?
        };
        // The index is below `npages`, so the page lies inside the region.
        self.region.zero(idx * PAGE, PAGE).ok()?;
        self.live.fetch_add(1, Ordering::Relaxed);
        Some(Pfn(self.base_pfn + idx))
    }

    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        match pfn.0.checked_sub(self.base_pfn) {
            Some(i) if i < self.npages => self.region.ptr_at(i * PAGE).map_or(std::ptr::null_mut(), |p| p.cast()),
            _ => std::ptr::null_mut(),
        }
    }

    unsafe fn free(&mut self, pfn: Pfn) {
        let idx = pfn.0 - self.base_pfn;
        self.live.fetch_sub(1, Ordering::Relaxed);
        match &self.vm {
            Some(vm) => self.quarantine.push((vm.zap_count(), idx)),
            None => self.free.push(idx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_placement_is_checked() {
        let region = || Arc::new(SharedRegion::new("slot-test", 4 * PAGE).unwrap());
        assert!(SlotPages::new(region(), 0x1000_0001, None).is_err(), "unaligned");
        assert!(SlotPages::new(region(), u64::MAX - PAGE + 1, None).is_err(), "wraps");
        assert!(SlotPages::new(region(), (1 << 52) - 2 * PAGE, None).is_err(), "beyond 52 bits");
        let mut p = SlotPages::new(region(), (1 << 52) - 4 * PAGE, None).expect("ends exactly at the limit");
        let f = p.alloc_zeroed().unwrap();
        assert_eq!(f, Pfn(((1 << 52) - 4 * PAGE) / PAGE));
        assert!(!p.ptr(f).is_null());
        assert!(p.ptr(Pfn(f.0 + 4)).is_null());
        assert!(p.ptr(Pfn(u64::MAX)).is_null());
    }
}
