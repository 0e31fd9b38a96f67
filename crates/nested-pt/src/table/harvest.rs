//! The vector kernels of the dirty harvest and the run-reporting harvest.
//!
//! A leaf table's entries are scanned eight at a time (one cache line, one
//! AVX-512 load) where the processor has AVX-512F, sixteen at a time with
//! SSE2 (the x86-64 baseline) otherwise, and one at a time elsewhere; the
//! choice is made once, from `cpuid` (no `std`), and every path produces
//! the same bitmap and the same entries. Each scan ANDs the entries with
//! the format's dirty mask (broadcast into a vector register once per
//! table) and gathers one bit per entry; the exclusive harvest's AVX-512
//! path also clears the entries found dirty in the same pass, with a
//! masked store that writes only those (an all-clean line is not
//! written). The concurrent forms do the same inside one RTM transaction
//! per leaf table where the processor has RTM (the transaction makes each
//! entry's read and store one atomic step: another writer aborts it), and
//! otherwise, or when a table's transaction aborts, clear with one locked
//! AND per entry found dirty, after the scan.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::{NestedTable, dirty_words};
use crate::format::Kind;
use crate::pages::TablePages;
use crate::{ENTRIES, Error, Gpa, PageSize};

/// The vector unit a dirty scan uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    /// One entry at a time (the reference; the only path off x86-64).
    Scalar,
    /// SSE2 loads, 64 entries to a word (single-bit dirty masks below bit
    /// 32; other formats fall back to `Scalar`).
    Sse2,
    /// AVX-512F loads, tests and masked stores, eight entries to a step
    /// (chosen only where POPCNT is there too).
    Avx512,
}

/// The detected unit: 0 not yet detected, else `Simd as u8 + 1`.
static DETECTED: AtomicU8 = AtomicU8::new(0);

/// The best vector unit this processor offers, detected once.
#[inline]
pub(crate) fn simd() -> Simd {
    match DETECTED.load(Ordering::Relaxed) {
        1 => Simd::Scalar,
        2 => Simd::Sse2,
        3 => Simd::Avx512,
        _ => {
            let s = detect();
            DETECTED.store(s as u8 + 1, Ordering::Relaxed);
            s
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Simd {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    let basic = __cpuid(0);
    if basic.eax < 7 {
        return Simd::Sse2;
    }
    // OSXSAVE (CPUID.1:ECX bit 27): the OS manages XCR0, so XGETBV may run.
    if __cpuid(1).ecx & (1 << 27) == 0 {
        return Simd::Sse2;
    }
    let xcr0: u32;
    // SAFETY: XGETBV with ECX = 0 reads XCR0; it is available when
    // CPUID.1:ECX.OSXSAVE is set (checked above), touches no memory and
    // changes nothing but EAX and EDX.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") xcr0, out("edx") _, options(nomem, nostack, preserves_flags));
    }
    // SSE, AVX, opmask, ZMM_Hi256 and Hi16_ZMM state enabled by the OS
    // (XCR0 bits 1, 2, 5, 6, 7), and AVX-512F (CPUID.(7,0):EBX bit 16).
    // POPCNT (CPUID.1:ECX bit 23), which the AVX-512 path counts with.
    let os = xcr0 & 0xe6 == 0xe6;
    let popcnt = __cpuid(1).ecx & (1 << 23) != 0;
    if os && popcnt && __cpuid_count(7, 0).ebx & (1 << 16) != 0 { Simd::Avx512 } else { Simd::Sse2 }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Simd {
    Simd::Scalar
}

/// The vector units this processor can run, for tests comparing them.
#[cfg(test)]
pub(crate) fn available() -> alloc::vec::Vec<Simd> {
    let mut v = alloc::vec![Simd::Scalar];
    if cfg!(target_arch = "x86_64") {
        v.push(Simd::Sse2);
    }
    if simd() == Simd::Avx512 {
        v.push(Simd::Avx512);
    }
    v
}

/// Puts the dirty state of `entries[k]` (`entries` at most one table of
/// 512) for the format kind `K` in bit `k % 64` of `words[k / 64]`, read
/// as relaxed loads would read it, for the leading entries the vector
/// path `simd` handles; returns how many it handled, and whether it also
/// cleared the dirty ones among them (only when `clear_plain` asks for it,
/// which the caller may do only with exclusive access, as for
/// [`NestedTable::harvest_dirty_exclusive`]). The caller reads the rest
/// one by one. `words` must be zero.
#[inline(always)]
pub(crate) fn scan_words<K: Kind>(
    simd: Simd,
    entries: &[AtomicU64],
    words: &mut [u64; ENTRIES / 64],
    clear_plain: bool,
) -> (usize, bool) {
    match simd {
        Simd::Scalar => (0, false),
        Simd::Sse2 => (dirty_words::<K>(entries, words), false),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => {
            // SAFETY: `Simd::Avx512` comes from `detect` (or from a test
            // that got it from `available`), which found AVX-512F in the
            // processor and its state enabled by the OS. The clears it
            // may do are the caller's to allow (`clear_plain`).
            let n = unsafe { scan_avx512(entries, K::DIRTY, words, clear_plain) };
            (n, clear_plain)
        }
        #[cfg(not(target_arch = "x86_64"))]
        Simd::Avx512 => (0, false),
    }
}

/// Scans a whole leaf table for the format kind `K` with the vector unit
/// `simd`, writing the dirty state of entry `k` to bit `k % 64` of
/// `out[k / 64]` (each word stored whole, once: `out` may be the caller's
/// bitmap itself); returns the number of dirty entries and whether it also
/// cleared them (only when `clear_plain` asks for it, which the caller may
/// do only with exclusive access, as for
/// [`NestedTable::harvest_dirty_exclusive`]). `None` when the unit has no
/// whole-table path for the format (`Scalar`, or SSE2 with a dirty mask
/// `dirty_words` does not take); `out` is then untouched.
#[inline(always)]
pub(crate) fn scan_table<K: Kind>(
    simd: Simd,
    entries: &[AtomicU64; ENTRIES],
    out: &mut [u64; ENTRIES / 64],
    clear_plain: bool,
) -> Option<(u64, bool)> {
    match simd {
        Simd::Scalar => None,
        Simd::Sse2 => {
            // `dirty_words` writes every word it handles whole: all or
            // nothing for a whole table.
            if dirty_words::<K>(entries, out) != ENTRIES {
                return None;
            }
            Some((count_ones(simd, out), false))
        }
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => {
            // SAFETY: `Simd::Avx512` comes from `detect` (or from a test
            // that got it from `available`), which found AVX-512F and POPCNT
            // in the processor and the AVX-512 state enabled by the OS. The
            // clears it may do are the caller's to allow (`clear_plain`).
            Some((unsafe { scan_table_avx512(entries, K::DIRTY, out, clear_plain) }, clear_plain))
        }
        #[cfg(not(target_arch = "x86_64"))]
        Simd::Avx512 => None,
    }
}

/// Whether the processor runs restricted transactional memory (RTM,
/// CPUID.(7,0):EBX bit 11): 0 not yet detected, 1 no, 2 yes.
static RTM: AtomicU8 = AtomicU8::new(0);

/// Whether this processor has RTM (`xbegin`/`xend`), detected once.
#[inline]
pub(crate) fn rtm() -> bool {
    match RTM.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = detect_rtm();
            RTM.store(1 + on as u8, Ordering::Relaxed);
            on
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_rtm() -> bool {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    __cpuid(0).eax >= 7 && __cpuid_count(7, 0).ebx & (1 << 11) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_rtm() -> bool {
    false
}

/// How many times a whole-table transaction is tried before the table
/// falls back to the locked clears (an abort for a conflict, an interrupt
/// or a page fault on `out` may well not recur).
const TXN_TRIES: usize = 3;

/// The concurrent harvest of a whole leaf table in one hardware
/// transaction: the AVX-512 scan-and-clear of [`scan_table_avx512`]
/// (plain masked stores of the dirty entries without `K::DIRTY`), made
/// atomic against every other writer by RTM. Where `present`, only the
/// entries that are also present count (the run harvest's rule). Returns
/// the number of dirty entries found and cleared, with their bits in
/// `out`, or `None` when the processor has no AVX-512 with RTM, the format
/// has no dirty bit, or every try aborted: then neither `out` nor any
/// entry was changed, and the caller clears with locked operations.
///
/// Why this is as safe as one locked AND per dirty entry: a committed
/// transaction reads and writes its lines as one atomic step, ordered as
/// a locked instruction is. Any other write to one of them while it runs
/// (a vCPU thread's `fetch_or` of a dirty bit, an unmap's compare and
/// swap, the hardware's own locked A/D update) is a conflict that aborts
/// it, with all its stores discarded; so no entry is written from a value
/// that another writer changed meanwhile, and nothing is lost.
#[inline(always)]
pub(crate) fn scan_table_txn<K: Kind>(
    simd: Simd,
    entries: &[AtomicU64; ENTRIES],
    out: &mut [u64; ENTRIES / 64],
    present: bool,
) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 && K::DIRTY != 0 && rtm() {
        let pmask = if present { K::PRESENT } else { u64::MAX };
        for _ in 0..TXN_TRIES {
            // SAFETY: `Simd::Avx512` comes from `detect` (or from a test
            // that got it from `available`), which found AVX-512F and
            // POPCNT in the processor and the AVX-512 state enabled by the
            // OS; `rtm()` found RTM.
            if let Some(n) = unsafe { scan_table_avx512_txn(entries, K::DIRTY, pmask, out) } {
                return Some(n);
            }
        }
    }
    let _ = (simd, entries, out, present);
    None
}

/// One try of [`scan_table_txn`]: `None` if the transaction aborted.
///
/// The loop repeats [`scan_table_avx512`]'s clearing loop (with the
/// presence test added) as an asm block of its own rather than sharing a
/// template with it: which stores run inside `xbegin`/`xend` stays
/// visible here, and the exclusive path stays free of RTM.
///
/// # Safety
///
/// The processor must support AVX-512F, POPCNT and RTM, with the AVX-512
/// state enabled by the OS.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn scan_table_avx512_txn(
    entries: &[AtomicU64; ENTRIES],
    dmask: u64,
    pmask: u64,
    out: &mut [u64; ENTRIES / 64],
) -> Option<u64> {
    let count: u64;
    let ok: u64;
    // SAFETY: the block reads and may write the 512 entries of `entries`
    // (a live table page, 8-byte aligned, valid while the borrow lasts)
    // with 64-byte loads and masked stores, and writes the 8 words of
    // `out`, all inside one RTM transaction (`xbegin` .. `xend`). Each
    // naturally aligned quadword of a vector access is read and written
    // atomically on x86, so the loads are equivalent to relaxed atomic
    // loads; a line with entries that AND non-zero with both `dmask` and
    // `pmask` has exactly those entries stored back without `dmask`, each
    // from the value the transaction read, and a line without any is not
    // written. The transaction makes the read and the store of every
    // entry one atomic step: another agent's write to a line it read
    // aborts it before commit (see `scan_table_txn`). On an abort the
    // processor discards every store of the transaction, restores the
    // registers to their values at `xbegin` (so `ok` reads 0 and the
    // counters and pointers are as they were) and resumes at the label
    // after `xend` with the abort status in EAX (declared clobbered); the
    // caller then sees `None` and nothing was changed. A committed `xend`
    // orders the transaction as a locked instruction would (the AcqRel of
    // the locked ANDs it replaces). AVX-512F, POPCNT and RTM are there, as
    // the caller checked.
    unsafe {
        core::arch::asm!(
            ".macro npt_line_t j",
            "vmovdqu64 {v:z}, zmmword ptr [{p} + 64 * \\j]",
            "vptestmq {k}, {d:z}, {v:z}",
            "vptestmq {k}{{{k}}}, {q:z}, {v:z}",
            "kmovw {t:e}, {k}",
            "test {t:e}, {t:e}",
            "jz 3f",
            "vpandnq {v:z}, {d:z}, {v:z}",
            "vmovdqu64 zmmword ptr [{p} + 64 * \\j] {{{k}}}, {v:z}",
            "shl {t}, 8 * \\j",
            "or {w}, {t}",
            "3:",
            ".endm",
            "vpbroadcastq {d:z}, {m}",
            "vpbroadcastq {q:z}, {pm}",
            "xor {c:e}, {c:e}",
            "xor {ok:e}, {ok:e}",
            "xbegin 9f",
            "2:",
            "xor {w:e}, {w:e}",
            "npt_line_t 0",
            "npt_line_t 1",
            "npt_line_t 2",
            "npt_line_t 3",
            "npt_line_t 4",
            "npt_line_t 5",
            "npt_line_t 6",
            "npt_line_t 7",
            "mov qword ptr [{o}], {w}",
            "popcnt {w}, {w}",
            "add {c}, {w}",
            "add {p}, 512",
            "add {o}, 8",
            "dec {n}",
            "jnz 2b",
            "xend",
            "mov {ok:e}, 1",
            "9:",
            ".purgem npt_line_t",
            p = inout(reg) entries.as_ptr() => _,
            o = inout(reg) out.as_mut_ptr() => _,
            n = inout(reg) ENTRIES / 64 => _,
            m = in(reg) dmask,
            pm = in(reg) pmask,
            c = out(reg) count,
            ok = out(reg) ok,
            d = out(ymm_reg) _,
            q = out(ymm_reg) _,
            v = out(ymm_reg) _,
            k = out(kreg) _,
            t = out(reg) _,
            w = out(reg) _,
            out("eax") _,
            options(nostack),
        );
    }
    // As in `scan_table_avx512`: the upper halves cleared for the caller's
    // SSE code.
    core::arch::x86_64::_mm256_zeroupper();
    (ok == 1).then_some(count)
}

/// AVX-512F scan of a whole table for [`scan_table`]: 64 entries (eight
/// 64-byte lines) per word, each line's test mask moved to a general
/// register and shifted into the word, so that the word is built in a
/// register and stored once (no byte stores for the caller's word loads
/// to wait on), and counted with POPCNT on the way; with `clear`, a line
/// with dirty entries is stored back without `dmask` by a masked store of
/// those entries alone, as in [`scan_avx512`]. Returns the number of
/// dirty entries.
///
/// # Safety
///
/// The processor must support AVX-512F and POPCNT with the AVX-512 state
/// enabled by the OS. With `clear`, no other software may write `entries`
/// meanwhile (hardware may still set accessed/dirty bits, which an entry
/// that reads dirty already has).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn scan_table_avx512(
    entries: &[AtomicU64; ENTRIES],
    dmask: u64,
    out: &mut [u64; ENTRIES / 64],
    clear: bool,
) -> u64 {
    let count: u64;
    if clear {
        // SAFETY: the loop reads and may write the 512 entries of
        // `entries` (a live table page, 8-byte aligned, valid while the
        // borrow lasts) with 64-byte loads and masked stores, and writes
        // the 8 words of `out`. Each naturally aligned quadword of a vector
        // access is read and written atomically on x86, so the loads are
        // equivalent to relaxed atomic loads; a line with dirty entries is
        // read again and only its entries of the mask are written, each
        // the value just read without `dmask` (the scalar exclusive clear,
        // sound under the caller's exclusive access, see `# Safety`; only
        // the hardware may have set accessed/dirty bits since, which those
        // entries already have), and a clean line is not written.
        // AVX-512F and POPCNT are enabled for this function, which the
        // caller checked.
        unsafe {
            core::arch::asm!(
                ".macro npt_line_c j",
                "vptestmq {k}, {d:z}, zmmword ptr [{p} + 64 * \\j]",
                "kmovw {t:e}, {k}",
                "test {t:e}, {t:e}",
                "jz 3f",
                "vmovdqu64 {v:z}, zmmword ptr [{p} + 64 * \\j]",
                "vpandnq {v:z}, {d:z}, {v:z}",
                "vmovdqu64 zmmword ptr [{p} + 64 * \\j] {{{k}}}, {v:z}",
                "shl {t}, 8 * \\j",
                "or {w}, {t}",
                "3:",
                ".endm",
                "vpbroadcastq {d:z}, {m}",
                "xor {c:e}, {c:e}",
                "2:",
                "xor {w:e}, {w:e}",
                "npt_line_c 0",
                "npt_line_c 1",
                "npt_line_c 2",
                "npt_line_c 3",
                "npt_line_c 4",
                "npt_line_c 5",
                "npt_line_c 6",
                "npt_line_c 7",
                "mov qword ptr [{o}], {w}",
                "popcnt {w}, {w}",
                "add {c}, {w}",
                "add {p}, 512",
                "add {o}, 8",
                "dec {n}",
                "jnz 2b",
                ".purgem npt_line_c",
                p = inout(reg) entries.as_ptr() => _,
                o = inout(reg) out.as_mut_ptr() => _,
                n = inout(reg) ENTRIES / 64 => _,
                m = in(reg) dmask,
                c = out(reg) count,
                d = out(ymm_reg) _,
                v = out(ymm_reg) _,
                k = out(kreg) _,
                t = out(reg) _,
                w = out(reg) _,
                options(nostack),
            );
        }
    } else {
        // SAFETY: as above, without the stores to `entries`: the loop reads
        // the 512 entries (equivalent to relaxed atomic loads, which may
        // race with other threads' and the hardware's atomic writes) and
        // writes the 8 words of `out`.
        unsafe {
            core::arch::asm!(
                ".macro npt_line j",
                "vptestmq {k}, {d:z}, zmmword ptr [{p} + 64 * \\j]",
                "kmovw {t:e}, {k}",
                "shl {t}, 8 * \\j",
                "or {w}, {t}",
                ".endm",
                "vpbroadcastq {d:z}, {m}",
                "xor {c:e}, {c:e}",
                "2:",
                "xor {w:e}, {w:e}",
                "npt_line 0",
                "npt_line 1",
                "npt_line 2",
                "npt_line 3",
                "npt_line 4",
                "npt_line 5",
                "npt_line 6",
                "npt_line 7",
                "mov qword ptr [{o}], {w}",
                "popcnt {w}, {w}",
                "add {c}, {w}",
                "add {p}, 512",
                "add {o}, 8",
                "dec {n}",
                "jnz 2b",
                ".purgem npt_line",
                p = inout(reg) entries.as_ptr() => _,
                o = inout(reg) out.as_mut_ptr() => _,
                n = inout(reg) ENTRIES / 64 => _,
                m = in(reg) dmask,
                c = out(reg) count,
                d = out(ymm_reg) _,
                k = out(kreg) _,
                t = out(reg) _,
                w = out(reg) _,
                options(nostack),
            );
        }
    }
    // The asm leaves the upper halves of the vector registers it used
    // (from the 16 that `ymm_reg` names) dirty: cleared here, so that the
    // caller's SSE code pays no transition or merge penalty (the compiler
    // does not see the asm's 512-bit use and emits no VZEROUPPER itself).
    core::arch::x86_64::_mm256_zeroupper();
    count
}

/// The number of bits set in `words` (bits past a slice's entries are
/// zero), with the POPCNT instruction on the AVX-512 path (every processor
/// with AVX-512 has it; the x86-64 baseline does not, where `count_ones`
/// is a dozen instructions a word).
#[inline(always)]
pub(crate) fn count_ones(simd: Simd, words: &[u64; ENTRIES / 64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // SAFETY: `Simd::Avx512` is detected only with POPCNT present.
        return unsafe { count_ones_popcnt(words) };
    }
    let _ = simd;
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// [`count_ones`] with POPCNT.
///
/// # Safety
///
/// The processor must support POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn count_ones_popcnt(words: &[u64; ENTRIES / 64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// AVX-512F scan of [`scan_words`]: eight entries (64 bytes) per step, the
/// mask of those that AND with `dmask` non-zero stored as one byte of
/// `words` (entry `k` is bit `k % 8` of byte `k / 8`, which is bit `k % 64`
/// of word `k / 64` on little-endian x86); with `clear`, the entries of
/// the mask are then stored back without `dmask` by a masked store that
/// writes them alone. Returns how many entries it handled (a multiple of
/// 8).
///
/// # Safety
///
/// The processor must support AVX-512F with its state enabled by the OS.
/// With `clear`, no other software may write `entries` meanwhile (the
/// caller has exclusive access; hardware may still set accessed/dirty
/// bits, which an entry that reads dirty already has).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_avx512(entries: &[AtomicU64], dmask: u64, words: &mut [u64; ENTRIES / 64], clear: bool) -> usize {
    let groups = entries.len().min(ENTRIES) / 8;
    if groups == 0 {
        return 0;
    }
    let p = entries.as_ptr();
    let o = words.as_mut_ptr().cast::<u8>();
    if clear {
        // SAFETY: the loop reads and may write the first `groups * 8`
        // entries of `entries` (at most 512, of a live table page, 8-byte
        // aligned, valid while the borrow lasts) with unaligned 64-byte
        // loads and masked stores, and writes `groups` bytes of `words`
        // (at most its 64). x86 reads and writes every naturally aligned
        // quadword of a vector access atomically, so the loads are
        // equivalent to relaxed atomic loads. A line with dirty entries is
        // read again (only the hardware may have set accessed/dirty bits
        // since, which the entries of the mask already have, and the
        // entries outside the mask are not written) and the masked store
        // writes only the quadwords whose mask bit is set,
        // each the value just read without `dmask` (and a clean line is
        // skipped: an all-zero masked store writes nothing, but was
        // measured slower than a full one on Zen 4), which is the scalar
        // exclusive clear (a relaxed load and store) and is sound under
        // the caller's exclusive access (see `# Safety`). AVX-512F is
        // enabled for this function, which the caller checked.
        unsafe {
            core::arch::asm!(
                "vpbroadcastq {d:z}, {m}",
                "2:",
                "vptestmq {k}, {d:z}, zmmword ptr [{p}]",
                "kmovw {t:e}, {k}",
                "mov byte ptr [{o}], {t:l}",
                "test {t:e}, {t:e}",
                "jz 3f",
                "vmovdqu64 {v:z}, zmmword ptr [{p}]",
                "vpandnq {v:z}, {d:z}, {v:z}",
                "vmovdqu64 zmmword ptr [{p}] {{{k}}}, {v:z}",
                "3:",
                "add {p}, 64",
                "inc {o}",
                "dec {n}",
                "jnz 2b",
                p = inout(reg) p => _,
                o = inout(reg) o => _,
                n = inout(reg) groups => _,
                m = in(reg) dmask,
                d = out(ymm_reg) _,
                v = out(ymm_reg) _,
                k = out(kreg) _,
                t = out(reg) _,
                options(nostack),
            );
        }
    } else {
        // SAFETY: as above, without the stores to `entries`: the loop
        // reads the first `groups * 8` entries (equivalent to relaxed
        // atomic loads, which may race with other threads' and the
        // hardware's atomic writes) and writes `groups` bytes of `words`.
        unsafe {
            core::arch::asm!(
                "vpbroadcastq {d:z}, {m}",
                "2:",
                "vptestmq {k}, {d:z}, zmmword ptr [{p}]",
                "kmovw {t:e}, {k}",
                "mov byte ptr [{o}], {t:l}",
                "add {p}, 64",
                "inc {o}",
                "dec {n}",
                "jnz 2b",
                p = inout(reg) p => _,
                o = inout(reg) o => _,
                n = inout(reg) groups => _,
                m = in(reg) dmask,
                d = out(ymm_reg) _,
                k = out(kreg) _,
                t = out(reg) _,
                options(nostack),
            );
        }
    }
    // The asm leaves the upper halves of the vector registers it used
    // (from the 16 that `ymm_reg` names) dirty: cleared here, so that the
    // caller's SSE code pays no transition or merge penalty (the compiler
    // does not see the asm's 512-bit use and emits no VZEROUPPER itself).
    core::arch::x86_64::_mm256_zeroupper();
    groups * 8
}

/// The OR of every entry of `entries`, read as relaxed loads would read
/// them, with the vector unit `simd`: 32 entries (four 64-byte loads) a
/// step with AVX-512F, 16 with SSE2, the rest one at a time. Every unit
/// gives the same value; what a vacate needs to refuse a range that still
/// maps a page (the OR has a present bit exactly when some entry has).
#[inline(always)]
pub(crate) fn or_entries(simd: Simd, entries: &[AtomicU64]) -> u64 {
    let (mut all, done) = match simd {
        Simd::Scalar => (0, 0),
        Simd::Sse2 => super::or_all_sse2(entries),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::Avx512` comes from `detect` (or from a test that
        // got it from `available`), which found AVX-512F in the processor
        // and its state enabled by the OS.
        Simd::Avx512 => unsafe { or_avx512(entries) },
        #[cfg(not(target_arch = "x86_64"))]
        Simd::Avx512 => (0, 0),
    };
    for e in entries.iter().skip(done) {
        all |= e.load(Ordering::Relaxed);
    }
    all
}

/// AVX-512F part of [`or_entries`]: the OR of the leading entries it
/// handles (a multiple of 32) and how many.
///
/// # Safety
///
/// The processor must support AVX-512F with its state enabled by the OS.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn or_avx512(entries: &[AtomicU64]) -> (u64, usize) {
    let blocks = entries.len() / 32;
    if blocks == 0 {
        return (0, 0);
    }
    let all: u64;
    // SAFETY: the loop reads the first `blocks * 32` entries of `entries`
    // (of a live table page, 8-byte aligned, valid for reads while the
    // borrow lasts) with unaligned 64-byte loads and writes no memory. x86
    // reads each naturally aligned quadword of a vector load atomically, so
    // the reads are equivalent to relaxed atomic loads (which may race with
    // other threads' and the hardware's atomic writes). AVX-512F is enabled
    // for this function, which the caller checked. Four accumulators,
    // folded at the end to one quadword.
    unsafe {
        core::arch::asm!(
            "vpxorq {a:z}, {a:z}, {a:z}",
            "vpxorq {b:z}, {b:z}, {b:z}",
            "vpxorq {c:z}, {c:z}, {c:z}",
            "vpxorq {d:z}, {d:z}, {d:z}",
            "2:",
            "vporq {a:z}, {a:z}, zmmword ptr [{p}]",
            "vporq {b:z}, {b:z}, zmmword ptr [{p} + 64]",
            "vporq {c:z}, {c:z}, zmmword ptr [{p} + 128]",
            "vporq {d:z}, {d:z}, zmmword ptr [{p} + 192]",
            "add {p}, 256",
            "dec {k}",
            "jnz 2b",
            "vporq {a:z}, {a:z}, {b:z}",
            "vporq {c:z}, {c:z}, {d:z}",
            "vporq {a:z}, {a:z}, {c:z}",
            "vextracti64x4 {b:y}, {a:z}, 1",
            "vporq {a:y}, {a:y}, {b:y}",
            "vextracti32x4 {b:x}, {a:y}, 1",
            "vporq {a:x}, {a:x}, {b:x}",
            "vpshufd {b:x}, {a:x}, 0x4e",
            "vporq {a:x}, {a:x}, {b:x}",
            "vmovq {r}, {a:x}",
            p = inout(reg) entries.as_ptr() => _,
            k = inout(reg) blocks => _,
            a = out(ymm_reg) _,
            b = out(ymm_reg) _,
            c = out(ymm_reg) _,
            d = out(ymm_reg) _,
            r = out(reg) all,
            options(readonly, nostack),
        );
    }
    // The asm leaves the upper halves of the vector registers it used
    // (from the 16 that `ymm_reg` names) dirty: cleared here, so that the
    // caller's SSE code pays no transition or merge penalty (the compiler
    // does not see the asm's 512-bit use and emits no VZEROUPPER itself).
    core::arch::x86_64::_mm256_zeroupper();
    (all, blocks * 32)
}

/// The low `n` bits set (all 64 from `n >= 64`).
#[inline(always)]
pub(crate) fn low_bits(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// Merges the dirty runs a harvest finds into maximal runs and reports
/// each to `f` when it ends.
struct Runs<'f, F: FnMut(Gpa, u64)> {
    run: Option<(u64, u64)>,
    pages: u64,
    f: &'f mut F,
}

impl<F: FnMut(Gpa, u64)> Runs<'_, F> {
    #[inline(always)]
    fn push(&mut self, lo: u64, hi: u64) {
        self.pages += (hi - lo) >> 12;
        self.run = match self.run {
            Some((s, e)) if e == lo => Some((s, hi)),
            Some((s, e)) => {
                (self.f)(Gpa(s), e - s);
                Some((lo, hi))
            }
            None => Some((lo, hi)),
        };
    }

    fn finish(self) -> u64 {
        if let Some((s, e)) = self.run {
            (self.f)(Gpa(s), e - s);
        }
        self.pages
    }
}

impl<P: TablePages> NestedTable<P> {
    /// [`harvest_dirty_runs`](Self::harvest_dirty_runs) with the vector
    /// unit `simd`. Each leaf table is scanned for entries with a dirty
    /// bit (vector loads, as the bitmap harvest); each such candidate is
    /// then read once more and reported if that value is present and
    /// dirty and, when `clear`, if the locked AND that clears it finds it
    /// still dirty (so a page cleaned meanwhile by another harvest is not
    /// reported twice, and no dirty bit set after the clear is lost). A
    /// clean entry is never written.
    pub(crate) fn dirty_runs(
        &self,
        gpa: Gpa,
        len: u64,
        clear: bool,
        f: &mut impl FnMut(Gpa, u64),
        simd: Simd,
    ) -> Result<u64, Error> {
        crate::format::with_kind!(self.fmt, K => self.dirty_runs_k::<K>(gpa, len, clear, f, simd))
    }

    #[inline(always)]
    fn dirty_runs_k<K: Kind>(
        &self,
        gpa: Gpa,
        len: u64,
        clear: bool,
        f: &mut impl FnMut(Gpa, u64),
        simd: Simd,
    ) -> Result<u64, Error> {
        let end = self.check(gpa, len, PageSize::Size4K)?;
        self.check_no_split(gpa.0, end)?;
        if simd == Simd::Scalar {
            return Ok(self.dirty_runs_scalar(gpa, end, clear, f));
        }
        let mut runs = Runs { run: None, pages: 0, f };
        // Reported iff the value `v` read for a candidate is present and
        // dirty, and a clear finds it still dirty.
        let report = |e: &AtomicU64| {
            let v = e.load(Ordering::Acquire);
            v & K::PRESENT != 0
                && v & K::DIRTY != 0
                && (!clear || e.fetch_and(!K::DIRTY, Ordering::AcqRel) & K::DIRTY != 0)
        };
        // Whole-table transactions failed in a row (see `dirty_pass_k`).
        let mut txn_fails = 0usize;
        self.for_each_leaf_table(gpa, len, |base, entries, size| {
            if size == PageSize::Size4K {
                let mut words = [0u64; ENTRIES / 64];
                // A clearing pass over a whole table: first in one
                // transaction, whose bits are exactly the present entries
                // it found dirty and cleared (nobody else's).
                if clear
                    && txn_fails < super::TXN_GIVE_UP
                    && let Ok(t) = <&[AtomicU64; ENTRIES]>::try_from(entries)
                {
                    if scan_table_txn::<K>(simd, t, &mut words, true).is_some() {
                        txn_fails = 0;
                        for (c, &word) in words.iter().enumerate() {
                            // Each run of set bits as one range.
                            let mut w = word;
                            while w != 0 {
                                let from = w.trailing_zeros();
                                let to = from + (!(w >> from)).trailing_zeros();
                                let lo = base.0 + (((c * 64) as u64 + from as u64) << 12);
                                runs.push(lo, lo + (((to - from) as u64) << 12));
                                w = if to >= 64 { 0 } else { w & (u64::MAX << to) };
                            }
                        }
                        return;
                    }
                    txn_fails += 1;
                }
                // A whole table in one pass that stores each word once;
                // else the slice's vector part and the rest one by one.
                let whole = <&[AtomicU64; ENTRIES]>::try_from(entries)
                    .ok()
                    .and_then(|t| scan_table::<K>(simd, t, &mut words, false));
                let done = match whole {
                    Some(_) => entries.len(),
                    None => scan_words::<K>(simd, entries, &mut words, false).0,
                };
                for (i, e) in entries.iter().enumerate().skip(done) {
                    if let Some(w) = words.get_mut(i / 64) {
                        *w |= K::dirty_bit(e.load(Ordering::Relaxed)) << (i % 64);
                    }
                }
                for (c, &word) in words.iter().enumerate().take(entries.len().div_ceil(64)) {
                    let mut cand = word;
                    while cand != 0 {
                        let i = c * 64 + cand.trailing_zeros() as usize;
                        if entries.get(i).is_some_and(report) {
                            let lo = base.0 + ((i as u64) << 12);
                            runs.push(lo, lo + 4096);
                        }
                        cand &= cand - 1;
                    }
                }
            } else {
                let v = entries[0].load(Ordering::Acquire);
                if v & K::PRESENT == 0 || v & K::DIRTY == 0 {
                    return;
                }
                // A large leaf mapped concurrently that sticks out of the
                // range: its pages inside reported, its dirty state kept.
                let (lo, hi) = (base.0.max(gpa.0), (base.0 + size.bytes()).min(end));
                if clear && hi - lo == size.bytes() && entries[0].fetch_and(!K::DIRTY, Ordering::AcqRel) & K::DIRTY == 0
                {
                    // Cleaned meanwhile by another harvest: not ours.
                    return;
                }
                runs.push(lo, hi);
            }
        });
        Ok(runs.finish())
    }

    /// The scalar run harvest: the [`Leaves`](super::Leaves) iterator, one
    /// entry at a time (the reference the vector path is tested against).
    fn dirty_runs_scalar(&self, gpa: Gpa, end: u64, clear: bool, f: &mut impl FnMut(Gpa, u64)) -> u64 {
        let mut runs = Runs { run: None, pages: 0, f };
        for leaf in self.leaves(gpa, end - gpa.0) {
            if !leaf.dirty() {
                continue;
            }
            let (lo, hi) = (leaf.gpa.0.max(gpa.0), (leaf.gpa.0 + leaf.size.bytes()).min(end));
            if clear && hi - lo == leaf.size.bytes() && !leaf.reset_dirty(false) {
                // Cleaned meanwhile by another harvest: not ours to report.
                continue;
            }
            runs.push(lo, hi);
        }
        runs.finish()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::table::Clear;
    use crate::{Caps, HeapPages, MemType, Pfn, Prot, PteFormat};
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    const K4: u64 = 4096;
    const M2: u64 = 2 << 20;
    /// Four leaf tables of 4 KiB pages: `[0, SMALL)`.
    const SMALL: u64 = 4 * M2;
    /// A 2 MiB leaf at `[SMALL, LARGE_END)`; nothing populated above.
    const LARGE_END: u64 = SMALL + M2;
    /// Ranges reach up to here (past the populated space).
    const SPACE: u64 = LARGE_END + M2;

    fn formats() -> [PteFormat; 5] {
        let c = Caps::default();
        [PteFormat::ept(c), PteFormat::ept_emulated_ad(c), PteFormat::npt(c), PteFormat::vtd(c), PteFormat::amd_vi(c)]
    }

    fn next(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// A table whose 4 KiB entries are random: empty, a mapped leaf, or
    /// random bits (present or not), each with the format's dirty bits set
    /// with probability `density`%; and a 2 MiB leaf, dirty when
    /// `large_dirty`.
    fn random_table(f: PteFormat, seed: u64, density: u64, large_dirty: bool) -> NestedTable<HeapPages> {
        let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
        t.populate_region(Gpa(0), SMALL, PageSize::Size4K).unwrap();
        t.populate_region(Gpa(SMALL), M2, PageSize::Size2M).unwrap();
        t.map(Gpa(SMALL), Pfn(0x4_0000), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
        if large_dirty {
            t.reset_dirty(Gpa(SMALL), true).unwrap();
        }
        let (d, mut s) = (f.dirty_mask(), seed | 1);
        t.for_each_leaf_table(Gpa(0), SMALL, |_, entries, _| {
            for e in entries {
                let r = next(&mut s);
                let mut v = match r % 4 {
                    0 => 0,
                    1 => f.leaf_entry(Pfn(r >> 40), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap(),
                    _ => next(&mut s),
                };
                if (r >> 8) % 100 < density {
                    v |= d;
                } else {
                    v &= !d;
                }
                e.store(v, Ordering::Relaxed);
            }
        });
        t
    }

    /// Every leaf entry of the table, in address order.
    fn snapshot(t: &NestedTable<HeapPages>) -> Vec<u64> {
        let mut v = Vec::new();
        t.for_each_leaf_table(Gpa(0), SPACE, |_, entries, _| {
            v.extend(entries.iter().map(|e| e.load(Ordering::Relaxed)))
        });
        v
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Scan,
        Harvest,
        Txn,
        Exclusive,
        Runs(bool),
    }
    const OPS: [Op; 6] = [Op::Scan, Op::Harvest, Op::Txn, Op::Exclusive, Op::Runs(false), Op::Runs(true)];

    /// What an operation returned: its result, then the bitmap (with a
    /// word past the range, which must keep its pattern) or the runs.
    type Outcome = (Result<u64, Error>, Vec<u64>);

    fn apply(t: &mut NestedTable<HeapPages>, op: Op, gpa: u64, len: u64, simd: Simd) -> Outcome {
        let mut bitmap = vec![0xa5a5_5a5a_f00f_0ff0u64; (len / K4).div_ceil(64) as usize + 1];
        let r = match op {
            Op::Scan => t.dirty_pass(Gpa(gpa), len, &mut bitmap, Clear::No, simd),
            Op::Harvest => t.dirty_pass(Gpa(gpa), len, &mut bitmap, Clear::Locked, simd),
            Op::Txn => t.dirty_pass(Gpa(gpa), len, &mut bitmap, Clear::Txn, simd),
            Op::Exclusive => t.dirty_pass(Gpa(gpa), len, &mut bitmap, Clear::Plain, simd),
            Op::Runs(clear) => {
                let mut runs = Vec::new();
                let r = t.dirty_runs(Gpa(gpa), len, clear, &mut |g, n| runs.extend([g.0, n]), simd);
                return (r, if r.is_err() { Vec::new() } else { runs });
            }
        };
        if r.is_err() {
            bitmap.clear();
        }
        (r, bitmap)
    }

    /// What `op` must return and leave, from the entries before
    /// (`before`, as `snapshot` lists them): the model of the harvest.
    fn model(f: &PteFormat, before: &[u64], op: Op, gpa: u64, len: u64) -> (Outcome, Vec<u64>) {
        let (d, present) = (f.dirty_mask(), f.present_mask());
        let end = gpa + len;
        let mut after = before.to_vec();
        if gpa < LARGE_END && end > SMALL && (gpa > SMALL || end < LARGE_END) {
            return ((Err(Error::WouldSplit), Vec::new()), after);
        }
        let mut bitmap = vec![0xa5a5_5a5a_f00f_0ff0u64; (len / K4).div_ceil(64) as usize + 1];
        let (mut count, mut runs): (u64, Vec<u64>) = (0, Vec::new());
        let mut report = |page: u64, pages: u64, bitmap: &mut Vec<u64>| {
            count += pages;
            for p in page..page + pages {
                let i = ((p * K4 - gpa) / K4) as usize;
                bitmap[i / 64] |= 1 << (i % 64);
            }
            match runs.len() {
                n if n >= 2 && runs[n - 2] + runs[n - 1] == page * K4 => runs[n - 1] += pages * K4,
                _ => runs.extend([page * K4, pages * K4]),
            }
        };
        for i in 0..(len / K4) as usize {
            bitmap[i / 64] &= !(1 << (i % 64));
        }
        let clear = matches!(op, Op::Harvest | Op::Txn | Op::Exclusive | Op::Runs(true));
        let runs_op = matches!(op, Op::Runs(_));
        for p in gpa / K4..end.min(SMALL) / K4 {
            let v = &mut after[p as usize];
            if *v & d != 0 && (!runs_op || *v & present != 0) {
                report(p, 1, &mut bitmap);
                if clear {
                    *v &= !d;
                }
            }
        }
        let large = &mut after[(SMALL / K4) as usize];
        if gpa <= SMALL && end >= LARGE_END && *large & d != 0 {
            report(SMALL / K4, M2 / K4, &mut bitmap);
            if clear {
                *large &= !d;
            }
        }
        (if runs_op { (Ok(count), runs) } else { (Ok(count), bitmap) }, after)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Every vector path returns what the scalar path returns and
        /// leaves the same entries, and both are what the model says:
        /// each form reports exactly the dirty entries of the range and
        /// clears exactly their dirty bits (no other bit, no other entry),
        /// over random entries of every format, at every density, on
        /// ranges that start and end anywhere (not aligned to 512 or 8
        /// entries), across a 2 MiB leaf and past the populated space.
        #[test]
        fn vector_paths_match_scalar_and_model(
            fi in 0usize..5,
            seed in any::<u64>(),
            density in prop_oneof![Just(0u64), Just(1), Just(10), Just(50), Just(100), 0u64..=100],
            large_dirty in any::<bool>(),
            // Half the ranges start at a bitmap word (whole leaf tables
            // then go straight into the bitmap's words).
            first in prop_oneof![0u64..SPACE / K4, (0u64..SPACE / K4 / 64).prop_map(|w| w * 64)],
            pages in 1u64..SPACE / K4,
        ) {
            let f = formats()[fi];
            let pages = pages.min(SPACE / K4 - first);
            let (gpa, len) = (first * K4, pages * K4);
            let base = random_table(f, seed, density, large_dirty);
            let before = snapshot(&base);
            for op in OPS {
                let (want, want_after) = model(&f, &before, op, gpa, len);
                let mut scalar = None;
                for simd in available() {
                    let mut t = base.copy_into(HeapPages::new()).unwrap();
                    let got = apply(&mut t, op, gpa, len, simd);
                    let after = snapshot(&t);
                    prop_assert_eq!(&got, &want, "{:?} {:?} {:?} [{:#x}, +{:#x})", f.kind(), op, simd, gpa, len);
                    prop_assert!(after == want_after, "{:?} {:?} {:?}: entries after", f.kind(), op, simd);
                    match &scalar {
                        None => scalar = Some((got, after)),
                        Some(s) => prop_assert!(s.0 == got && s.1 == after, "{:?} {:?} {:?} vs scalar", f.kind(), op, simd),
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every unit's OR of a slice of a table (any start, any length,
        /// entries random, sparse or all zero) is the OR of its entries
        /// one at a time.
        #[test]
        fn or_entries_matches_scalar(
            seed in any::<u64>(),
            sparse in prop_oneof![Just(0u64), Just(1), Just(64), Just(512)],
            start in 0usize..ENTRIES,
            len in 0usize..=ENTRIES,
        ) {
            let mut s = seed | 1;
            // `sparse` 0: all zero; else about one entry in `sparse` set.
            let table: [AtomicU64; ENTRIES] = core::array::from_fn(|_| {
                let r = next(&mut s);
                AtomicU64::new(if sparse != 0 && r.is_multiple_of(sparse) { next(&mut s) } else { 0 })
            });
            let entries = &table[start..(start + len).min(ENTRIES)];
            let want = entries.iter().fold(0, |a, e| a | e.load(Ordering::Relaxed));
            for simd in available() {
                prop_assert_eq!(or_entries(simd, entries), want, "{:?} [{}, +{})", simd, start, entries.len());
            }
        }
    }

    /// The unit in use is the best one the processor has (AVX-512 where
    /// `std`'s detection reports it), and each unit's scan of a whole table finds
    /// exactly the entries set up dirty, at each alignment of the slice.
    #[test]
    fn detected_unit_and_scan_per_alignment() {
        #[cfg(target_arch = "x86_64")]
        {
            let want = if std_detect_avx512() { Simd::Avx512 } else { Simd::Sse2 };
            assert_eq!(simd(), want);
        }
        let table: [AtomicU64; ENTRIES] =
            core::array::from_fn(|i| AtomicU64::new(if i % 7 == 3 { 1 << 9 } else { 0x7 }));
        for simd in available() {
            for start in [0usize, 1, 7, 8, 63, 64, 65, 500, 511] {
                let entries = &table[start..];
                let mut words = [0u64; 8];
                let (done, _) = scan_words::<crate::format::EptK>(simd, entries, &mut words, false);
                for (i, e) in entries.iter().enumerate().skip(done) {
                    words[i / 64] |= ((e.load(Ordering::Relaxed) >> 9) & 1) << (i % 64);
                }
                for (i, _) in entries.iter().enumerate() {
                    assert_eq!((words[i / 64] >> (i % 64)) & 1 == 1, (start + i) % 7 == 3, "{simd:?} {start} {i}");
                }
                for i in entries.len()..ENTRIES {
                    assert_eq!((words[i / 64] >> (i % 64)) & 1, 0, "{simd:?} {start}: nothing past the slice");
                }
            }
        }
    }

    /// AVX-512F (with POPCNT) as `std` detects it (the tests have `std`).
    #[cfg(target_arch = "x86_64")]
    fn std_detect_avx512() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("popcnt")
    }
}
