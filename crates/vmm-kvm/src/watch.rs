//! Unmap and remap while vCPUs run ([`vmm::watch`]) on KVM: the guest
//! itself checks that no stale translation survives the call.

use crate::host::KvmHost;
use crate::vm::{PagingMode, Result};
use std::time::Duration;

pub use vmm::watch::{WATCHED, WatchReport};

/// Runs `nvcpus` watchers on a KVM VM while the host makes `changes`
/// remaps (or one unmap when `unmap_only`), `gap` apart.
pub fn run_watch(
    nvcpus: usize,
    changes: u64,
    unmap_only: bool,
    gap: Duration,
    mode: PagingMode,
) -> Result<WatchReport> {
    Ok(vmm::watch::run_watch(&mut KvmHost::new(), nvcpus, changes, unmap_only, gap, mode)?)
}
