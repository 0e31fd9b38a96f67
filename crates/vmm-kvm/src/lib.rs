//! vmm-kvm (design text to come).
pub mod backend;
pub mod detect;
pub mod guest;
pub mod machine;
pub mod mem;
pub mod oracle;
pub mod run;
pub mod runtime;
pub mod slot_pages;
pub mod space;
pub mod vcpu;
pub mod vm;
pub mod watch;
pub mod workload;

pub use vm::{KvmError, KvmVm, PagingMode, Result, kvm_available};
