//! Unit tests of `vmm::emul` against mock memories.
#![cfg(target_arch = "x86_64")]

use std::collections::BTreeMap;

use iced_x86::code_asm::*;
use vmm::emul::{
    Emulated, Error, FLAG_CF, FLAG_DF, FLAG_ZF, Fault, MAX_REP_ITERATIONS, MemError, MemErrorKind, Memory, PAGE_SIZE,
    Regs, decode, emulate, gpr,
};

/// Sparse byte memory: pages present or not; records every access.
#[derive(Default)]
struct Mock {
    pages: BTreeMap<u64, Vec<u8>>,
    fetches: Vec<(u64, usize)>,
    reads: Vec<(u64, usize)>,
    writes: Vec<(u64, Vec<u8>)>,
    /// Changes the byte at this address once, right before the first
    /// compare_exchange (a racing writer).
    race: Option<(u64, u8)>,
    /// Race on every compare_exchange.
    always_race: bool,
    /// Return at most this many bytes per fetch (0: no limit).
    fetch_max: usize,
    cmpxchg_calls: u32,
}

impl Mock {
    fn map(&mut self, page: u64) {
        self.pages.entry(page & !(PAGE_SIZE - 1)).or_insert_with(|| vec![0; PAGE_SIZE as usize]);
    }
    fn byte(&mut self, a: u64) -> Result<&mut u8, MemError> {
        let p =
            self.pages.get_mut(&(a & !(PAGE_SIZE - 1))).ok_or(MemError { addr: a, kind: MemErrorKind::Unmapped })?;
        Ok(&mut p[(a % PAGE_SIZE) as usize])
    }
    fn put(&mut self, a: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let x = a.wrapping_add(i as u64);
            self.map(x);
            *self.byte(x).unwrap() = *b;
        }
    }
    fn get(&mut self, a: u64, n: usize) -> Vec<u8> {
        (0..n).map(|i| *self.byte(a + i as u64).unwrap()).collect()
    }
}

impl Memory for Mock {
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, MemError> {
        assert!(buf.len() as u64 <= PAGE_SIZE - addr % PAGE_SIZE, "fetch crosses a page");
        self.fetches.push((addr, buf.len()));
        let n = if self.fetch_max == 0 { buf.len() } else { buf.len().min(self.fetch_max) };
        let buf = &mut buf[..n];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = *self.byte(addr + i as u64)?;
        }
        Ok(buf.len())
    }
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.reads.push((addr, buf.len()));
        for (i, b) in buf.iter_mut().enumerate() {
            *b = *self.byte(addr.wrapping_add(i as u64))?;
        }
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.writes.push((addr, data.to_vec()));
        for (i, b) in data.iter().enumerate() {
            *self.byte(addr.wrapping_add(i as u64))? = *b;
        }
        Ok(())
    }
    fn compare_exchange(&mut self, addr: u64, expected: &[u8], new: &[u8]) -> Result<bool, MemError> {
        self.cmpxchg_calls += 1;
        if let Some((a, v)) = self.race.take() {
            *self.byte(a)? = v;
        }
        if self.always_race {
            let b = self.byte(addr)?;
            *b = b.wrapping_add(1);
        }
        let cur: Vec<u8> = (0..expected.len()).map(|i| *self.byte(addr + i as u64).unwrap()).collect();
        if cur != expected {
            return Ok(false);
        }
        for (i, b) in new.iter().enumerate() {
            *self.byte(addr + i as u64)? = *b;
        }
        Ok(true)
    }
}

fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>, ip: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

fn setup(ip: u64, code: &[u8]) -> (Mock, Regs) {
    let mut m = Mock::default();
    m.put(ip, code);
    (m, Regs { rip: ip, rflags: 2, ..Regs::default() })
}

#[test]
fn mov_store_straddling_a_page_boundary() {
    let code = asm(|a| a.mov(qword_ptr(rax), rbx), 0x1000);
    let (mut m, mut r) = setup(0x1000, &code);
    m.map(0x5000);
    m.map(0x6000);
    r.gpr[gpr::RAX] = 0x5ffd;
    r.gpr[gpr::RBX] = 0x1122_3344_5566_7788;
    let e = emulate(&mut r, &mut m).unwrap();
    assert_eq!(e.len as usize, code.len());
    assert_eq!(r.rip, 0x1000 + code.len() as u64);
    assert_eq!(m.get(0x5ffd, 8), 0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(m.writes, vec![(0x5ffd, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec())]);
}

#[test]
fn fetch_stops_at_the_page_end_and_needs_the_next_page_only_when_short() {
    // A 2-byte instruction 2 bytes before the page end; next page unmapped.
    let code = asm(|a| a.mov(dword_ptr(rax), ebx), 0);
    assert_eq!(code.len(), 2);
    let ip = 0x1ffe;
    let (mut m, mut r) = setup(ip, &code);
    m.map(0x5000);
    r.gpr[gpr::RAX] = 0x5000;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.fetches, vec![(0x1ffe, 2)]);

    // A long instruction straddling into the next page: two fetches.
    let code = asm(|a| a.mov(qword_ptr(rax + 0x1234_5678), 0x7abc_def0), 0);
    let ip = 0x3000 - 3;
    let (mut m, mut r) = setup(ip, &code);
    m.map(0x1234_5000);
    r.gpr[gpr::RAX] = 0x100;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.fetches, vec![(ip, 3), (0x3000, 12)]);
    assert_eq!(r.rip, ip + code.len() as u64);
    assert_eq!(m.get(0x1234_5778, 8), 0x7abc_def0u64.to_le_bytes());

    // The same with the second page unmapped: a fetch error at 0x3000.
    let (mut m2, mut r2) = setup(ip, &code[..3]);
    let before = r2;
    assert_eq!(emulate(&mut r2, &mut m2), Err(Error::Memory(MemError { addr: 0x3000, kind: MemErrorKind::Unmapped })));
    assert_eq!(r2, before);
}

#[test]
fn unsupported_instruction_reports_bytes_and_rip() {
    // popcnt eax, [rax] is a memory form the emulator does not implement.
    let code = asm(|a| a.popcnt(eax, dword_ptr(rax)), 0);
    let (mut m, mut r) = setup(0x4000, &code);
    let before = r;
    match emulate(&mut r, &mut m) {
        Err(Error::Unsupported { rip, bytes, len }) => {
            assert_eq!(rip, 0x4000);
            assert_eq!(&bytes[..len as usize], &code[..]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r, before);
    // Undecodable bytes.
    let (mut m, mut r) = setup(0x4000, &[0x0f, 0x0b]); // ud2 decodes; no memory operand
    assert!(matches!(emulate(&mut r, &mut m), Err(Error::Unsupported { .. })));
    let (mut m, mut r) = setup(0x4000, &[0xd6]); // invalid in 64-bit mode
    assert!(matches!(emulate(&mut r, &mut m), Err(Error::Decode { rip: 0x4000, .. })));
}

#[test]
fn lock_on_a_register_form_is_ud() {
    let (mut m, mut r) = setup(0x1000, &[0xf0, 0x01, 0xd8]); // lock add eax, ebx
    assert_eq!(emulate(&mut r, &mut m), Err(Error::Fault { rip: 0x1000, fault: Fault::InvalidOpcode }));
    let (mut m, mut r) = setup(0x1000, &[0xf0, 0x89, 0x18]); // lock mov [rax], ebx
    m.map(0);
    assert_eq!(emulate(&mut r, &mut m), Err(Error::Fault { rip: 0x1000, fault: Fault::InvalidOpcode }));
}

#[test]
fn rep_with_rcx_zero_touches_nothing() {
    let code = asm(|a| a.rep().stosd(), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    r.gpr[gpr::RDI] = 0x9000;
    let e = emulate(&mut r, &mut m).unwrap();
    assert_eq!(
        e,
        Emulated { len: code.len() as u8, mnemonic: iced_x86::Mnemonic::Stosd, complete: true, iterations: 0 }
    );
    assert!(m.writes.is_empty() && m.reads.is_empty());
    assert_eq!(r.gpr[gpr::RDI], 0x9000);
    assert_eq!(r.rip, 0x1000 + code.len() as u64);
}

#[test]
fn rep_movs_backwards_with_df() {
    let code = asm(|a| a.rep().movsw(), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x8000, &[1, 2, 3, 4, 5, 6]);
    m.map(0x9000);
    r.rflags |= FLAG_DF;
    r.gpr[gpr::RSI] = 0x8004;
    r.gpr[gpr::RDI] = 0x9ffe; // last element straddles nothing, first at 0x9ffe
    r.gpr[gpr::RCX] = 3;
    let e = emulate(&mut r, &mut m).unwrap();
    assert_eq!(e.iterations, 3);
    assert_eq!(m.get(0x9ffa, 6), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!((r.gpr[gpr::RSI], r.gpr[gpr::RDI], r.gpr[gpr::RCX]), (0x7ffe, 0x9ff8, 0));
}

#[test]
fn rep_stops_after_the_cap_without_advancing_rip() {
    let code = asm(|a| a.rep().stosb(), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    for p in 0..2 {
        m.map(0x10_0000 + p * PAGE_SIZE);
    }
    r.gpr[gpr::RDI] = 0x10_0000;
    r.gpr[gpr::RCX] = MAX_REP_ITERATIONS + 5;
    let e = emulate(&mut r, &mut m).unwrap();
    assert!(!e.complete);
    assert_eq!(r.rip, 0x1000);
    assert_eq!(r.gpr[gpr::RCX], 5);
    let e = emulate(&mut r, &mut m).unwrap();
    assert!(e.complete && e.iterations == 5);
    assert_eq!(r.rip, 0x1000 + code.len() as u64);
}

#[test]
fn repe_cmps_stops_on_mismatch() {
    let code = asm(|a| a.repe().cmpsb(), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x8000, b"abcX");
    m.put(0x9000, b"abcY");
    r.gpr[gpr::RSI] = 0x8000;
    r.gpr[gpr::RDI] = 0x9000;
    r.gpr[gpr::RCX] = 10;
    let e = emulate(&mut r, &mut m).unwrap();
    assert_eq!(e.iterations, 4);
    assert_eq!(r.gpr[gpr::RCX], 6);
    assert_eq!(r.rflags & FLAG_ZF, 0);
    assert_eq!(r.rflags & FLAG_CF, FLAG_CF); // 'X' < 'Y'
}

#[test]
fn locked_add_retries_when_memory_changed() {
    let code = asm(|a| a.lock().add(dword_ptr(rax), ebx), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x7000, &10u32.to_le_bytes());
    m.race = Some((0x7000, 20)); // another CPU stores 20 between read and commit
    r.gpr[gpr::RAX] = 0x7000;
    r.gpr[gpr::RBX] = 5;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.cmpxchg_calls, 2);
    assert_eq!(m.get(0x7000, 4), 25u32.to_le_bytes());
}

#[test]
fn memory_error_is_propagated_with_its_address_and_regs_untouched() {
    let code = asm(|a| a.pop(qword_ptr(rax)), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x2000, &7u64.to_le_bytes());
    r.gpr[gpr::RSP] = 0x2000;
    r.gpr[gpr::RAX] = 0xdead_0000;
    let before = r;
    assert_eq!(
        emulate(&mut r, &mut m),
        Err(Error::Memory(MemError { addr: 0xdead_0000, kind: MemErrorKind::Unmapped }))
    );
    assert_eq!(r, before);
}

#[test]
fn pop_into_rsp_based_address_uses_incremented_rsp() {
    let code = asm(|a| a.pop(qword_ptr(rsp + 8)), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x2000, &0x55u64.to_le_bytes());
    r.gpr[gpr::RSP] = 0x2000;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(r.gpr[gpr::RSP], 0x2008);
    assert_eq!(m.get(0x2010, 8), 0x55u64.to_le_bytes());
}

#[test]
fn bt_register_offset_addresses_the_bit_string() {
    let code = asm(|a| a.bts(dword_ptr(rax), ecx), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.map(0x8000);
    r.gpr[gpr::RAX] = 0x8010;
    r.gpr[gpr::RCX] = (-33i32) as u32 as u64; // dword -2, bit 31
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.get(0x8008, 4), 0x8000_0000u32.to_le_bytes());
}

#[test]
fn decode_reports_the_instruction_bytes() {
    let code = asm(|a| a.mov(eax, dword_ptr(rax)), 0);
    let (mut m, _) = setup(0x1000, &code);
    let (insn, bytes) = decode(0x1000, &mut m).unwrap();
    assert_eq!(&bytes[..insn.len()], &code[..]);
}

#[test]
fn short_fetches_never_cross_a_page() {
    // The implementation returns 2 bytes per fetch; the emulator asks again,
    // never across the page end at 0x2000.
    let code = asm(|a| a.mov(qword_ptr(rax + 0x10), 0x1234), 0);
    let ip = 0x2000 - 5;
    let (mut m, mut r) = setup(ip, &code);
    m.fetch_max = 2;
    m.map(0x8000);
    r.gpr[gpr::RAX] = 0x8000;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.get(0x8010, 8), 0x1234u64.to_le_bytes());
    assert_eq!(m.fetches[..3], [(ip, 5), (ip + 2, 3), (ip + 4, 1)]);
    assert_eq!(m.fetches[3].0, 0x2000);
}

#[test]
fn lock_contention_is_reported() {
    let code = asm(|a| a.lock().inc(dword_ptr(rax)), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.map(0x7000);
    m.always_race = true;
    r.gpr[gpr::RAX] = 0x7000;
    let before = r;
    assert_eq!(emulate(&mut r, &mut m), Err(Error::LockContention { addr: 0x7000 }));
    assert_eq!(r, before);
}

#[test]
fn xchg_is_locked_and_unlocked_add_is_not() {
    let code = asm(|a| a.xchg(dword_ptr(rax), ecx), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x7000, &9u32.to_le_bytes());
    r.gpr[gpr::RAX] = 0x7000;
    r.gpr[gpr::RCX] = 0xffff_ffff_0000_0004;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.cmpxchg_calls, 1);
    assert_eq!(r.gpr[gpr::RCX], 9);
    assert_eq!(m.get(0x7000, 4), 4u32.to_le_bytes());

    let code = asm(|a| a.add(dword_ptr(rax), ecx), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.map(0x7000);
    r.gpr[gpr::RAX] = 0x7000;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.cmpxchg_calls, 0);
    assert_eq!((m.reads.len(), m.writes.len()), (1, 1));
}

#[test]
fn address_arithmetic_wraps_modulo_2_64() {
    let code = asm(|a| a.mov(byte_ptr(rax + rbx * 8 + 0x10), cl), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.map(0x3000);
    r.gpr[gpr::RAX] = 0x3000u64.wrapping_sub(0x10).wrapping_sub(8 * 0x1000);
    r.gpr[gpr::RBX] = 0x1000;
    r.gpr[gpr::RCX] = 0xab;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.get(0x3000, 1), [0xab]);
    // Wrapping the top of the address space: a 4-byte store at 2^64 - 2.
    let code = asm(|a| a.mov(dword_ptr(rax), ecx), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.map(u64::MAX);
    m.map(0);
    r.gpr[gpr::RAX] = u64::MAX - 1;
    r.gpr[gpr::RCX] = 0x4433_2211;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(m.get(u64::MAX - 1, 2), [0x11, 0x22]);
    assert_eq!(m.get(0, 2), [0x33, 0x44]);
}

#[test]
fn divide_errors_are_de_not_host_faults() {
    for (f, hi, lo, d) in [
        (0u8, 0u64, 5u64, 0u64), // div by zero
        (0, 7, 0, 7),            // unsigned quotient overflow
        (1, !0, 1 << 63, !0),    // idiv MIN / -1
    ] {
        let code = if f == 0 { asm(|a| a.div(qword_ptr(rbx)), 0) } else { asm(|a| a.idiv(qword_ptr(rbx)), 0) };
        let (mut m, mut r) = setup(0x1000, &code);
        m.put(0x7000, &d.to_le_bytes());
        r.gpr[gpr::RBX] = 0x7000;
        r.gpr[gpr::RDX] = hi;
        r.gpr[gpr::RAX] = lo;
        assert_eq!(emulate(&mut r, &mut m), Err(Error::Fault { rip: 0x1000, fault: Fault::DivideError }));
    }
    let code = asm(|a| a.div(dword_ptr(rbx)), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x7000, &10u32.to_le_bytes());
    r.gpr[gpr::RBX] = 0x7000;
    r.gpr[gpr::RAX] = 0xffff_ffff_0000_0067;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!((r.gpr[gpr::RAX], r.gpr[gpr::RDX]), (10, 3));
}

#[test]
fn cmpxchg16b_needs_alignment_and_swaps_when_equal() {
    let code = asm(|a| a.lock().cmpxchg16b(xmmword_ptr(rdi)), 0);
    let (mut m, mut r) = setup(0x1000, &code);
    m.put(0x7000, &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    r.gpr[gpr::RDI] = 0x7008;
    assert_eq!(emulate(&mut r, &mut m), Err(Error::Fault { rip: 0x1000, fault: Fault::GeneralProtection }));
    r.gpr[gpr::RDI] = 0x7000;
    r.gpr[gpr::RAX] = 1;
    r.gpr[gpr::RDX] = 2;
    r.gpr[gpr::RBX] = 3;
    r.gpr[gpr::RCX] = 4;
    emulate(&mut r, &mut m).unwrap();
    assert_eq!(r.rflags & FLAG_ZF, FLAG_ZF);
    assert_eq!(m.get(0x7000, 16), [3, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(m.cmpxchg_calls, 1);
}

#[test]
fn device_sees_exactly_the_accesses_the_instruction_makes() {
    type Build = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(Build, usize, usize); 8] = [
        (|a| a.mov(dword_ptr(rax), ebx), 0, 1),
        (|a| a.mov(ebx, dword_ptr(rax)), 1, 0),
        (|a| a.add(dword_ptr(rax), ebx), 1, 1),
        (|a| a.cmp(dword_ptr(rax), ebx), 1, 0),
        (|a| a.test(dword_ptr(rax), ebx), 1, 0),
        (|a| a.bt(dword_ptr(rax), 3), 1, 0),
        (|a| a.cmovne(ebx, dword_ptr(rax)), 1, 0), // read even when false
        (|a| a.sete(byte_ptr(rax)), 0, 1),
    ];
    for (build, reads, writes) in cases {
        let code = asm(build, 0);
        let (mut m, mut r) = setup(0x1000, &code);
        m.map(0x7000);
        r.gpr[gpr::RAX] = 0x7000;
        r.rflags |= FLAG_ZF;
        emulate(&mut r, &mut m).unwrap();
        assert_eq!((m.reads.len(), m.writes.len()), (reads, writes), "{code:02x?}");
    }
}
