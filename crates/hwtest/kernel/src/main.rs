#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod cpu;
mod guest;
mod hv;
mod io;
mod layout;
mod rt;
mod svm;
mod vmx;

use hv::{GuestRegs, Hv, Invalidate};

#[repr(C, align(4096))]
struct T([u64; 512]);
static mut BR: [T; 3] = [const { T([0; 512]) }; 3];

fn bringup(h: &mut dyn Hv, ept: bool) {
    // SAFETY: temporary bring-up tables in .bss.
    unsafe {
        let t = &raw mut BR as *mut T;
        let (nl, leaf) = if ept { (7u64, 0xB7u64) } else { (7u64, 0x87u64) };
        (*t.add(0)).0[0] = t.add(1) as u64 | nl;
        (*t.add(1)).0[0] = t.add(2) as u64 | nl;
        for i in 0..512 {
            (*t.add(2)).0[i] = (i as u64) << 21 | leaf;
        }
        h.set_root(if ept { t as u64 | 0x1E } else { t as u64 });
    }
    let target = layout::TEST_BASE;
    // SAFETY: test frame.
    unsafe { (target as *mut u32).write_volatile(0xC0FFEE) };
    let e = h.run(guest::entry(guest::Op::Read), GuestRegs { rbx: target, ..Default::default() }, Invalidate::All);
    kprintln!("exit {:?} regs {:x?}", e, h.regs());
}

#[unsafe(no_mangle)]
extern "C" fn kmain() -> ! {
    io::serial_init();
    kprintln!("HELLO hwtest kernel vendor={}", core::str::from_utf8(&cpu::vendor()).unwrap_or("?"));
    if svm::supported() {
        let mut s = svm::Svm::new();
        bringup(&mut s, false);
    } else if vmx::supported() {
        match vmx::Vmx::new() {
            Ok(mut v) => {
                kprintln!("caps {:?}", v.caps);
                bringup(&mut v, true)
            }
            Err(e) => kprintln!("vmx error {e}"),
        }
    } else {
        kprintln!("no svm/vmx");
    }
    kprintln!("END PASS");
    io::exit(1)
}
