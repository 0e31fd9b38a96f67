//! Decode + emulate of one MMIO store and one MMIO load against a trivial
//! mock memory (target: under 300 ns each).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use vmm::emul::{MemError, Memory, Regs, decode, emulate, execute, gpr};

/// Code bytes at `rip`; every data access hits a 4-byte "register".
struct Trivial {
    rip: u64,
    code: [u8; 16],
    reg: [u8; 8],
}

impl Memory for Trivial {
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, MemError> {
        let off = addr.wrapping_sub(self.rip) as usize;
        let n = buf.len().min(16usize.saturating_sub(off));
        buf[..n].copy_from_slice(&self.code[off..off + n]);
        Ok(n)
    }
    fn read(&mut self, _addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let n = buf.len().min(8);
        buf[..n].copy_from_slice(&self.reg[..n]);
        Ok(())
    }
    fn write(&mut self, _addr: u64, data: &[u8]) -> Result<(), MemError> {
        let n = data.len().min(8);
        self.reg[..n].copy_from_slice(&data[..n]);
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let rip = 0x10_0000;
    for (name, bytes) in [("mov [rax], ebx", &[0x89u8, 0x18][..]), ("mov eax, [rax]", &[0x8b, 0x00][..])] {
        let mut code = [0x90u8; 16];
        code[..bytes.len()].copy_from_slice(bytes);
        let mut mem = Trivial { rip, code, reg: [0; 8] };
        let mut base = Regs { rip, rflags: 2, ..Regs::default() };
        base.gpr[gpr::RAX] = 0xfee0_0000;
        base.gpr[gpr::RBX] = 0x1234_5678;
        c.bench_function(&format!("decode only: {name}"), |b| b.iter(|| black_box(decode(black_box(rip), &mut mem))));
        if let Ok((insn, bytes)) = decode(rip, &mut mem) {
            c.bench_function(&format!("execute only: {name}"), |b| {
                b.iter(|| {
                    let mut r = base;
                    black_box(execute(black_box(&insn), &bytes, &mut r, &mut mem))
                })
            });
        }
        c.bench_function(name, |b| {
            b.iter(|| {
                let mut r = base;
                let e = emulate(black_box(&mut r), black_box(&mut mem));
                black_box((e, r))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
