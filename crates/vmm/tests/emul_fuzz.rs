//! Random bytes and registers into `emulate`: it must return, never panic.
//! `EMUL_FUZZ=N` sets the iteration count (default 200000).
#![cfg(target_arch = "x86_64")]

use vmm::emul::{MemError, MemErrorKind, Memory, PAGE_SIZE, Regs, emulate};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Memory whose every page exists (content derived from the address)
/// except those whose hash says unmapped; the code bytes are fixed.
struct Fuzzy {
    rip: u64,
    code: [u8; 32],
    holes: u64,
}

impl Fuzzy {
    fn byte(&self, a: u64) -> Result<u8, MemError> {
        let off = a.wrapping_sub(self.rip);
        if off < 32 {
            return Ok(self.code[off as usize]);
        }
        let page = a / PAGE_SIZE;
        if self.holes != 0 && page.wrapping_mul(0x9e37_79b9_7f4a_7c15).is_multiple_of(self.holes) {
            return Err(MemError { addr: a, kind: MemErrorKind::Unmapped });
        }
        Ok((a.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8)
    }
}

impl Memory for Fuzzy {
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, MemError> {
        assert!(buf.len() as u64 <= PAGE_SIZE - addr % PAGE_SIZE);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(addr.wrapping_add(i as u64))?;
        }
        Ok(buf.len())
    }
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(addr.wrapping_add(i as u64))?;
        }
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        for i in 0..data.len() {
            self.byte(addr.wrapping_add(i as u64))?;
        }
        Ok(())
    }
}

const PREFIXES: &[u8] = &[0xf0, 0xf2, 0xf3, 0x66, 0x67, 0x64, 0x65, 0x2e, 0x40, 0x41, 0x44, 0x48, 0x4c, 0x4f];
const OPCODES: &[&[u8]] = &[
    &[0x88],
    &[0x89],
    &[0x8a],
    &[0x8b],
    &[0xa0],
    &[0xa1],
    &[0xa2],
    &[0xa3],
    &[0xa4],
    &[0xa5],
    &[0xa6],
    &[0xa7],
    &[0xaa],
    &[0xab],
    &[0xac],
    &[0xad],
    &[0xae],
    &[0xaf],
    &[0xc6],
    &[0xc7],
    &[0x80],
    &[0x81],
    &[0x83],
    &[0x84],
    &[0x85],
    &[0x86],
    &[0x87],
    &[0xf6],
    &[0xf7],
    &[0xfe],
    &[0xff],
    &[0x8f],
    &[0x63],
    &[0x01],
    &[0x11],
    &[0x19],
    &[0x21],
    &[0x29],
    &[0x31],
    &[0x39],
    &[0x03],
    &[0x0f, 0xb6],
    &[0x0f, 0xb7],
    &[0x0f, 0xbe],
    &[0x0f, 0xbf],
    &[0x0f, 0xb0],
    &[0x0f, 0xb1],
    &[0x0f, 0xc0],
    &[0x0f, 0xc1],
    &[0x0f, 0xa3],
    &[0x0f, 0xab],
    &[0x0f, 0xb3],
    &[0x0f, 0xbb],
    &[0x0f, 0xba],
    &[0x0f, 0x94],
    &[0x0f, 0x45],
    &[0xd0],
    &[0xd1],
    &[0xd2],
    &[0xd3],
    &[0xc0],
    &[0xc1],
    &[0x0f, 0xa4],
    &[0x0f, 0xa5],
    &[0x0f, 0xac],
    &[0x0f, 0xad],
    &[0x0f, 0xaf],
    &[0x69],
    &[0x6b],
];

#[test]
fn random_bytes_never_panic() {
    let n: u64 = std::env::var("EMUL_FUZZ").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let mut rng = Rng(0xf022);
    let (mut ok, mut err) = (0u64, 0u64);
    for _ in 0..n {
        let mut code = [0u8; 32];
        for b in code.iter_mut() {
            *b = rng.next() as u8;
        }
        if !rng.next().is_multiple_of(4) {
            // Bias towards supported opcodes behind random prefixes.
            let mut i = 0;
            for _ in 0..rng.next() % 4 {
                code[i] = PREFIXES[(rng.next() % PREFIXES.len() as u64) as usize];
                i += 1;
            }
            let op = OPCODES[(rng.next() % OPCODES.len() as u64) as usize];
            code[i..i + op.len()].copy_from_slice(op);
        }
        let rip = match rng.next() % 4 {
            0 => (rng.next() & !0xfff) | (0x1000 - 1 - rng.next() % 15),
            1 => u64::MAX - rng.next() % 20,
            _ => rng.next(),
        };
        let mut regs = Regs { rip, rflags: rng.next(), fs_base: rng.next(), gs_base: rng.next(), ..Regs::default() };
        for g in regs.gpr.iter_mut() {
            *g = if rng.next().is_multiple_of(2) { rng.next() } else { rng.next() % 0x20 };
        }
        let mut mem = Fuzzy { rip, code, holes: rng.next() % 4 };
        match emulate(&mut regs, &mut mem) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    eprintln!("emul fuzz: {n} runs, {ok} emulated, {err} errors");
}
