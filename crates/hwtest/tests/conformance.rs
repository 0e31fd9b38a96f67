//! The conformance suite: the kernel under QEMU (SVM+NPT) and Bochs
//! (VMX+EPT). Each test skips, with a message, when its emulator is not
//! installed, and fails on any disagreement not explained by a listed quirk.

use hwtest::{Emulator, Error, run_conformance};

fn suite(emu: Emulator) {
    match run_conformance(emu) {
        Err(Error::Missing(why)) => {
            eprintln!("SKIP hwtest {emu}: {why} (install qemu-system-x86, bochs, bochsbios, vgabios)");
        }
        Err(e) => panic!("hwtest {emu}: {e}"),
        Ok(report) => {
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
