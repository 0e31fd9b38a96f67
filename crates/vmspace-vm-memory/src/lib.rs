//! rust-vmm `vm-memory` over a `vmspace` guest address space: every access
//! goes through page holds (full documentation in a later commit).
#![deny(missing_docs)]

pub mod blk;
mod memory;

pub use memory::{AccessDenied, HoldBitmap, HoldSlice, NoRegion, Slices, VmMemory};
