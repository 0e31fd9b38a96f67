//! The hwtest conformance kernel: see `crates/hwtest/src/lib.rs` for the
//! design. Boot (`boot.rs`), the two virtualization back ends (`svm.rs`,
//! `vmx.rs`), the table-page provider for nested-pt (`arena.rs`), the
//! comparison engine (`suite.rs`), the scenarios (`scenarios.rs`, and
//! `promote.rs` for promotion and demotion of 2 MiB leaves) and the
//! emulator quirks (`quirks.rs`).
#![no_std]
#![no_main]

extern crate alloc;

mod arena;
mod boot;
mod cpu;
mod guest;
mod hv;
mod io;
mod iommu;
mod layout;
mod promote;
mod quirks;
mod rt;
mod scenarios;
mod suite;
mod svm;
mod vmx;

use nested_pt::Caps;
use suite::{Arch, Suite};

#[unsafe(no_mangle)]
extern "C" fn kmain() -> ! {
    io::serial_init();
    let vendor = cpu::vendor();
    kprintln!("HELLO hwtest kernel on {}", core::str::from_utf8(&vendor).unwrap_or("?"));
    let phys_bits = cpu::phys_bits();
    for q in quirks::ALL {
        kprintln!("INFO known-quirk {} ({}): {}", q.name, q.emulator, q.what);
    }
    // Under QEMU q35 with an IOMMU and the `edu` device: the DMA suite.
    if let Some(failed) = iommu::run() {
        kprintln!("END {}", if failed == 0 { "PASS" } else { "FAIL" });
        io::exit(if failed == 0 { 0 } else { 1 });
    }
    let failed = if svm::supported() {
        let page_1g = cpu::cpuid(0x8000_0001, 0).3 & (1 << 26) != 0;
        let caps = Caps { page_2m: true, page_1g, execute_only: false, phys_bits };
        kprintln!("INFO arch=svm+npt phys_bits={phys_bits} page_1g={page_1g}");
        match svm::Svm::new() {
            Ok(mut hv) => {
                let mut suite = Suite::new(&mut hv, Arch::Svm);
                scenarios::run(&mut suite, caps, true);
                suite.failed
            }
            Err(e) => {
                kprintln!("PANIC cannot enable SVM: {e}");
                1
            }
        }
    } else if vmx::supported() {
        match vmx::Vmx::new() {
            Ok(mut hv) => {
                let c = hv.caps;
                kprintln!(
                    "INFO arch=vmx+ept phys_bits={phys_bits} page_2m={} page_1g={} execute_only={} ept_ad={} invept_single={}",
                    c.page_2m,
                    c.page_1g,
                    c.execute_only,
                    c.ad,
                    c.invept_single
                );
                let caps = Caps { page_2m: c.page_2m, page_1g: c.page_1g, execute_only: c.execute_only, phys_bits };
                let mut suite = Suite::new(&mut hv, Arch::Vmx);
                scenarios::run(&mut suite, caps, c.ad);
                suite.failed
            }
            Err(e) => {
                kprintln!("PANIC cannot enter VMX: {e}");
                1
            }
        }
    } else {
        kprintln!("PANIC CPU model offers neither SVM with NPT nor VMX");
        1
    };
    kprintln!("END {}", if failed == 0 { "PASS" } else { "FAIL" });
    io::exit(if failed == 0 { 0 } else { 1 })
}
