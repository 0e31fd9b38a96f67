#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod io;
mod layout;
mod rt;

#[unsafe(no_mangle)]
extern "C" fn kmain() -> ! {
    io::serial_init();
    kprintln!("HELLO hwtest kernel");
    let v = alloc::vec![1u32, 2, 3];
    kprintln!("alloc ok {:?}", v);
    kprintln!("END PASS");
    io::exit(1)
}
