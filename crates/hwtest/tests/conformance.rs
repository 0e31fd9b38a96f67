//! The conformance suite: the kernel under QEMU (SVM+NPT) and Bochs
//! (VMX+EPT with a Skylake-X model, and without EPT A/D with an Ivy Bridge
//! model), and the DMA suite under QEMU q35 with Intel VT-d or AMD-Vi and
//! the `edu` device (I/O page tables in nested-pt's VT-d and AMD-Vi
//! formats). Each test skips, with a message, when its emulator is not
//! installed, and fails on any disagreement not explained by a listed quirk.
//! `HWTEST_VERBOSE=1` prints the kernel's raw output (one CHECK line per
//! guest access: the exit the emulator gave and the one the model predicted).

use hwtest::{Emulator, Error, run_conformance};

fn suite(emu: Emulator) {
    match run_conformance(emu) {
        Err(Error::Missing(why)) => {
            eprintln!("SKIP hwtest {emu}: {why} (install qemu-system-x86, bochs, bochsbios, vgabios)");
        }
        Err(e) => panic!("hwtest {emu}: {e}"),
        Ok(report) => {
            if std::env::var_os("HWTEST_VERBOSE").is_some() {
                eprintln!("{}", report.output);
            }
            eprintln!("{}", report.table());
            assert!(report.passed(), "hwtest {emu} failed:\n{}\nraw output:\n{}", report.table(), report.output);
        }
    }
}

#[test]
fn qemu_svm_npt() {
    suite(Emulator::Qemu);
}

#[test]
fn bochs_vmx_ept() {
    suite(Emulator::Bochs);
}

#[test]
fn bochs_vmx_ept_without_ad() {
    suite(Emulator::BochsNoAd);
}

#[test]
fn qemu_vtd_dma() {
    suite(Emulator::QemuVtd);
}

#[test]
fn qemu_amdvi_dma() {
    suite(Emulator::QemuAmdVi);
}
