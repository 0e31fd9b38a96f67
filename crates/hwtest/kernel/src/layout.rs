//! Fixed host-physical layout above the image (identity-mapped by the boot
//! page tables). The emulators are given 128 MiB.

/// Table arena: pages handed to `nested-pt` through `TablePages`.
pub const ARENA_BASE: u64 = 0x0020_0000;
/// Size of the table arena (512 pages).
pub const ARENA_SIZE: u64 = 0x0020_0000;
/// Heap for `alloc`.
pub const HEAP_BASE: u64 = 0x0040_0000;
/// Size of the heap.
pub const HEAP_SIZE: u64 = 0x0040_0000;
/// Four snapshot buffers of one sub-arena each (before, hardware, model,
/// quirk hypothesis): 1 MiB of the 8 MiB reserved here.
pub const SNAP_BASE: u64 = 0x0080_0000;
/// Host frames the guest's test accesses land in: 16 MiB..32 MiB. Nothing
/// else lives here, so guest writes cannot corrupt the kernel.
pub const TEST_BASE: u64 = 0x0100_0000;
/// Size of the test-frame region.
pub const TEST_SIZE: u64 = 0x0100_0000;
