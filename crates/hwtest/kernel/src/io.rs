//! Port I/O, the result channel and the way out of the emulator.
//!
//! Output goes to the debug port 0xE9 (QEMU `isa-debugcon`, Bochs
//! `port_e9_hack`) and to COM1, so either can be captured. The host side
//! parses lines; see `crates/hwtest/src/protocol.rs` for the line format.

use core::arch::asm;
use core::fmt;

/// Write one byte to an I/O port.
pub fn outb(port: u16, val: u8) {
    // SAFETY: the kernel owns the machine; the ports written (0xE9, COM1,
    // the emulators' exit ports) have no memory side effects.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags)) }
}

/// Read one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: reading COM1's status register has no side effects on memory.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

/// Write a 32-bit value to an I/O port (PCI configuration space).
pub fn outl(port: u16, val: u32) {
    // SAFETY: used for the PCI configuration address and data ports only,
    // which have no memory side effects beyond the devices' registers.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags)) }
}

/// Read a 32-bit value from an I/O port (PCI configuration space).
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outl`.
    unsafe { asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

const COM1: u16 = 0x3F8;

/// Program COM1 for 115200 8N1 without interrupts.
pub fn serial_init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xC7);
    outb(COM1 + 4, 0x03);
}

fn put_byte(b: u8) {
    outb(0xE9, b);
    // Bounded wait for the transmit holding register; an absent UART reads
    // 0xFF, which also ends the wait.
    for _ in 0..10_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1, b);
}

/// The kernel's console: every byte goes to port 0xE9 and COM1.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            put_byte(b);
        }
        Ok(())
    }
}

/// `print!` to the console.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::io::Console, format_args!($($arg)*));
    }};
}

/// `println!` to the console.
#[macro_export]
macro_rules! kprintln {
    ($($arg:tt)*) => {{
        $crate::kprint!($($arg)*);
        $crate::kprint!("\n");
    }};
}

/// Leave the emulator: QEMU's `isa-debug-exit` at 0xF4 and Bochs' shutdown
/// port 0x8900. The host also stops the emulator when it sees the final
/// `END` line, so this is a convenience, not the only way out.
pub fn exit(code: u8) -> ! {
    outb(0xF4, code);
    for b in b"Shutdown" {
        outb(0x8900, *b);
    }
    loop {
        // SAFETY: halting with interrupts disabled just stops this CPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}
