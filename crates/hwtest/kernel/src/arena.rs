//! Table pages for `nested-pt`: fixed sub-arenas of identity-mapped physical
//! memory, so that a frame number is the page's physical address >> 12 and
//! the emulator walks exactly the pages the library wrote.

use alloc::vec::Vec;
use nested_pt::{Pfn, TablePages};

use crate::layout::{ARENA_BASE, ARENA_SIZE};

/// Pages in one sub-arena (one `NestedTable`).
pub const SLOT_PAGES: u64 = 64;
const SLOTS: u64 = ARENA_SIZE / (SLOT_PAGES * 4096);

static mut NEXT_SLOT: u64 = 0;

/// A provider over one sub-arena of `SLOT_PAGES` pages.
pub struct ArenaPages {
    base: u64,
    next: u64,
    free: Vec<u64>,
}

impl ArenaPages {
    /// Take the next unused sub-arena (panics when all are taken: the suite
    /// creates a fixed, small number of tables).
    pub fn new() -> ArenaPages {
        // SAFETY: single CPU, no interrupts: nothing else touches NEXT_SLOT.
        let slot = unsafe {
            let s = NEXT_SLOT;
            NEXT_SLOT += 1;
            s
        };
        assert!(slot < SLOTS, "table arena exhausted");
        ArenaPages { base: ARENA_BASE + slot * SLOT_PAGES * 4096, next: 0, free: Vec::new() }
    }

    /// Physical range holding every page handed out so far: what the
    /// snapshots copy.
    pub fn used(&self) -> (u64, u64) {
        (self.base, self.next * 4096)
    }
}

// SAFETY: pages come from this sub-arena only, which nothing else uses
// (layout.rs reserves the arena; each sub-arena is handed out once). A page
// is zeroed before it is returned, is 4 KiB-aligned, identity-mapped and
// therefore valid for reads and writes through `ptr` until freed; `ptr`
// returns null for frames outside the pages handed out.
unsafe impl TablePages for ArenaPages {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        let addr = if let Some(a) = self.free.pop() {
            a
        } else if self.next < SLOT_PAGES {
            self.next += 1;
            self.base + (self.next - 1) * 4096
        } else {
            return None;
        };
        // SAFETY: addr is a page of this sub-arena, not in use.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, 4096) };
        Some(Pfn(addr >> 12))
    }

    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        let a = pfn.addr();
        if a < self.base || a >= self.base + self.next * 4096 {
            return core::ptr::null_mut();
        }
        a as *mut u64
    }

    unsafe fn free(&mut self, pfn: Pfn) {
        self.free.push(pfn.addr());
    }
}
