//! `IntrSystem`: the models on running vCPUs — MMIO claims and dispatch,
//! the pending/injected protocol of the vCPU loop, kicks (once per
//! pending check), the host timer thread, and the external-controller
//! mode that drives another irqchip's lines from our HPET.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::hv::Kick;
use vmm::intr::hpet::{CONF_ENABLE, TCONF_INT_ENABLE, TCONF_LEVEL, TCONF_ROUTE_SHIFT, reg as hreg};
use vmm::intr::ioapic::{IOREGSEL, IOWIN, RTE_LEVEL, RTE_REMOTE_IRR};
use vmm::intr::lapic::reg;
use vmm::intr::msi::MsiError;
use vmm::intr::system::{IntrSystem, IrqLines};
use vmm::intr::{HPET_BASE, IOAPIC_BASE, LAPIC_BASE};
use vmm::machine::{InterruptSource, MmioDevices};

#[derive(Default)]
struct CountKick(AtomicU64);

impl Kick for CountKick {
    fn kick(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn kicks(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn kicks(n: usize) -> (Vec<Arc<CountKick>>, Vec<Arc<dyn Kick>>) {
    let k: Vec<Arc<CountKick>> = (0..n).map(|_| Arc::new(CountKick::default())).collect();
    let d = k.iter().map(|k| k.clone() as Arc<dyn Kick>).collect();
    (k, d)
}

fn w32(s: &IntrSystem, vcpu: usize, gpa: u64, v: u32) {
    s.write(vcpu, gpa, &v.to_le_bytes());
}

fn r32(s: &IntrSystem, vcpu: usize, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    s.read(vcpu, gpa, &mut b);
    u32::from_le_bytes(b)
}

/// `n` vCPUs, LAPICs software-enabled, flat logical IDs `1 << i`.
fn system(n: usize) -> (Arc<IntrSystem>, Vec<Arc<CountKick>>) {
    let s = IntrSystem::new(n).expect("system");
    let (k, d) = kicks(n);
    s.set_kicks(&d);
    for i in 0..n {
        w32(&s, i, LAPIC_BASE + reg::SVR, 0x1ff);
        w32(&s, i, LAPIC_BASE + reg::LDR, 1 << (24 + i));
    }
    (s, k)
}

/// Takes `vcpu`'s pending vector as the vCPU loop does.
fn take(s: &IntrSystem, vcpu: usize) -> Option<u8> {
    let v = s.pending(vcpu)?;
    s.injected(vcpu, v);
    Some(v)
}

fn rte(s: &IntrSystem, pin: u32, lo: u32, dest: u8) {
    w32(s, 0, IOAPIC_BASE + IOREGSEL, 0x11 + 2 * pin);
    w32(s, 0, IOAPIC_BASE + IOWIN, u32::from(dest) << 24);
    w32(s, 0, IOAPIC_BASE + IOREGSEL, 0x10 + 2 * pin);
    w32(s, 0, IOAPIC_BASE + IOWIN, lo);
}

#[test]
fn claims_the_three_device_ranges_and_nothing_else() {
    let (s, _) = system(1);
    for gpa in [LAPIC_BASE, LAPIC_BASE + 0xfff, IOAPIC_BASE, IOAPIC_BASE + 0xfff, HPET_BASE, HPET_BASE + 0x3ff] {
        assert!(s.claims(gpa), "{gpa:#x}");
    }
    for gpa in [LAPIC_BASE - 1, LAPIC_BASE + 0x1000, IOAPIC_BASE - 1, IOAPIC_BASE + 0x1000, HPET_BASE + 0x400, 0] {
        assert!(!s.claims(gpa), "{gpa:#x}");
    }
    assert!(s.models_are_ours());
    // Reads reach the models: the LAPIC ID of each vCPU, the HPET's
    // capabilities (vendor 0x8086 in bits 31:16 of the low dword).
    let (s2, _) = system(3);
    assert_eq!(r32(&s2, 2, LAPIC_BASE + reg::ID), 2 << 24);
    assert_eq!(r32(&s2, 0, HPET_BASE + hreg::CAPABILITIES) >> 16, 0x8086);
    // A 16-byte access is two 8-byte ones: ID at 0x20 and its padding.
    let mut b = [0xaau8; 16];
    s2.read(1, LAPIC_BASE + 0x20, &mut b);
    assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 1 << 24);
    assert_eq!(&b[4..], &[0; 12]);
    assert_eq!(s2.stats().mmio_reads, 4);
}

#[test]
fn pending_is_reported_until_injected_then_in_service_until_eoi() {
    let (s, k) = system(2);
    s.send_msi(0xfee0_1000, 0x41).expect("MSI to vCPU 1");
    assert_eq!(s.pending(0), None);
    assert_eq!(s.pending(1), Some(0x41));
    // `pending` changes nothing: asked twice, the same answer.
    assert_eq!(s.pending(1), Some(0x41));
    s.injected(1, 0x41);
    assert_eq!(s.pending(1), None, "in service: PPR 0x40 blocks class 4");
    assert_eq!(r32(&s, 1, LAPIC_BASE + reg::ISR + 0x20), 1 << 1);
    assert_eq!(r32(&s, 1, LAPIC_BASE + reg::PPR), 0x40);
    w32(&s, 1, LAPIC_BASE + reg::EOI, 0);
    assert_eq!(r32(&s, 1, LAPIC_BASE + reg::ISR + 0x20), 0);
    assert_eq!(s.stats().injected, 1);
    // Injecting a vector that is not requested is not counted.
    s.injected(1, 0x99);
    assert_eq!(s.stats().injected, 1);
    assert_eq!(k[1].kicks(), 1);
    assert_eq!(k[0].kicks(), 0);
}

#[test]
fn a_vcpu_is_kicked_once_until_its_next_pending_check() {
    let (s, k) = system(2);
    s.send_msi(0xfee0_1000, 0x41).unwrap();
    s.send_msi(0xfee0_1000, 0x51).unwrap();
    s.send_msi(0xfee0_1000, 0x61).unwrap();
    assert_eq!(k[1].kicks(), 1, "three deliveries, one kick: the vCPU has not looked yet");
    assert_eq!(take(&s, 1), Some(0x61));
    // After its check, a new delivery kicks again.
    s.send_msi(0xfee0_1000, 0x71).unwrap();
    assert_eq!(k[1].kicks(), 2);
    assert_eq!(s.stats().kicks, 2);
    // A blocked vector (class at or below the PPR) is not pending: no kick.
    let _ = s.pending(1);
    assert_eq!(take(&s, 1), Some(0x71));
    s.send_msi(0xfee0_1000, 0x72).unwrap();
    assert_eq!(k[1].kicks(), 2, "0x72 waits behind 0x71 in service");
    assert_eq!(s.pending(1), None);
}

#[test]
fn an_ipi_kicks_the_target_but_never_the_sender() {
    let (s, k) = system(3);
    // vCPU 0: fixed IPI 0x50 to all including self.
    w32(&s, 0, LAPIC_BASE + reg::ICR_LO, 0x50 | (2 << 18));
    assert_eq!(k.iter().map(|k| k.kicks()).collect::<Vec<_>>(), [0, 1, 1]);
    for i in 0..3 {
        assert_eq!(take(&s, i), Some(0x50), "vCPU {i}");
    }
    // Physical destination 2 from vCPU 1.
    w32(&s, 1, LAPIC_BASE + reg::ICR_HI, 2 << 24);
    w32(&s, 1, LAPIC_BASE + reg::ICR_LO, 0x60);
    assert_eq!(k.iter().map(|k| k.kicks()).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(take(&s, 2), Some(0x60));
    assert_eq!(take(&s, 0), None);
}

#[test]
fn eoi_of_an_asserted_level_vector_makes_it_pending_again() {
    let (s, k) = system(2);
    rte(&s, 5, 0x55 | RTE_LEVEL as u32, 1);
    s.set_irq(5, true);
    assert_eq!(k[1].kicks(), 1);
    assert_eq!(take(&s, 1), Some(0x55));
    assert_eq!(r32(&s, 1, LAPIC_BASE + reg::TMR + 0x20), 1 << 21);
    // EOI while asserted: the I/O APIC re-sends at once; the EOI came from
    // vCPU 1 itself, so it is not kicked (its loop checks before entry).
    w32(&s, 1, LAPIC_BASE + reg::EOI, 0);
    assert_eq!(s.pending(1), Some(0x55));
    assert_eq!(k[1].kicks(), 1);
    assert_eq!(take(&s, 1), Some(0x55));
    s.set_irq(5, false);
    w32(&s, 1, LAPIC_BASE + reg::EOI, 0);
    assert_eq!(s.pending(1), None);
    assert_eq!(s.with_interrupts(|i| i.ioapic().entry(5) & RTE_REMOTE_IRR), Some(0));
}

#[test]
fn refused_msis_are_counted_and_deliver_nothing() {
    let (s, k) = system(2);
    assert!(matches!(s.send_msi(0xfed0_0000, 0x41), Err(MsiError::NotInterruptAddress(_))));
    assert_eq!(s.stats().msis_refused, 1);
    assert_eq!(s.stats().msis, 0);
    assert!(k.iter().all(|k| k.kicks() == 0));
    assert_eq!(s.pending(0), None);
}

/// Waits up to `limit` for `f`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

fn hpet_level_timer(s: &IntrSystem, vcpu: usize, pin: u64, ticks: u32) {
    w32(s, vcpu, HPET_BASE + hreg::timer_comparator(0), ticks);
    w32(
        s,
        vcpu,
        HPET_BASE + hreg::timer_config(0),
        (TCONF_LEVEL | TCONF_INT_ENABLE | (pin << TCONF_ROUTE_SHIFT)) as u32,
    );
    w32(s, vcpu, HPET_BASE + hreg::CONFIG, CONF_ENABLE as u32);
}

#[test]
fn the_host_timer_fires_the_hpet_and_kicks_the_target() {
    let (s, k) = system(2);
    rte(&s, 21, 0x66 | RTE_LEVEL as u32, 1);
    // 2 ms at 10 MHz, programmed by vCPU 0, routed to vCPU 1.
    hpet_level_timer(&s, 0, 21, 20_000);
    assert_eq!(s.pending(1), None, "not before the deadline");
    let t = Instant::now();
    assert!(eventually(Duration::from_secs(5), || k[1].kicks() == 1), "the timer thread kicked vCPU 1");
    assert!(t.elapsed() >= Duration::from_micros(1500), "fired early: {:?}", t.elapsed());
    assert_eq!(s.stats().timer_ticks, 1);
    assert_eq!(take(&s, 1), Some(0x66));
    assert_eq!(r32(&s, 0, HPET_BASE + hreg::INT_STATUS), 1);
    // Clear the status (deasserts pin 21), EOI: nothing more.
    w32(&s, 0, HPET_BASE + hreg::INT_STATUS, 1);
    w32(&s, 1, LAPIC_BASE + reg::EOI, 0);
    assert_eq!(s.pending(1), None);
    assert_eq!(k[0].kicks(), 0);
}

#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl IrqLines for Lines {
    fn set_irq(&self, pin: usize, high: bool) {
        self.0.lock().unwrap().push(format!("pin {pin} {}", u8::from(high)));
    }
    fn send_msi(&self, addr: u64, data: u32) {
        self.0.lock().unwrap().push(format!("msi {addr:#x} {data:#x}"));
    }
}

#[test]
fn external_mode_claims_only_the_hpet_and_drives_the_lines() {
    let lines = Arc::new(Lines::default());
    let s = IntrSystem::with_external(2, lines.clone());
    let (k, d) = kicks(2);
    s.set_kicks(&d);
    assert!(!s.models_are_ours());
    assert!(s.claims(HPET_BASE) && !s.claims(LAPIC_BASE) && !s.claims(IOAPIC_BASE));
    assert_eq!(s.with_interrupts(|_| ()), None);
    hpet_level_timer(&s, 0, 22, 10_000);
    assert!(eventually(Duration::from_secs(5), || !lines.0.lock().unwrap().is_empty()), "the HPET fired");
    w32(&s, 0, HPET_BASE + hreg::INT_STATUS, 1);
    s.send_msi(0xfee0_1000, 0x41).unwrap();
    assert!(s.send_msi(0x1234, 0x41).is_err());
    s.set_irq(3, true);
    assert_eq!(*lines.0.lock().unwrap(), ["pin 22 1", "pin 22 0", "msi 0xfee01000 0x41", "pin 3 1"]);
    let st = s.stats();
    assert_eq!((st.line_changes, st.msis, st.msis_refused, st.kicks), (3, 1, 1, 0));
    // Nothing is ever pending here: the other controller injects.
    assert_eq!(s.pending(0), None);
    assert_eq!(s.pending(1), None);
    assert!(k.iter().all(|k| k.kicks() == 0));
}

#[test]
fn dropping_the_system_stops_its_timer_thread() {
    let (s, _) = system(1);
    hpet_level_timer(&s, 0, 20, u32::MAX);
    let t = Instant::now();
    drop(s);
    assert!(t.elapsed() < Duration::from_secs(2), "the drop waited for a far deadline");
}

/// A page of plain memory at `base`.
struct Ram {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl MmioDevices for Ram {
    fn claims(&self, gpa: u64) -> bool {
        gpa.checked_sub(self.base).is_some_and(|o| o < 4096)
    }
    fn read(&self, _vcpu: usize, gpa: u64, data: &mut [u8]) {
        let o = (gpa - self.base) as usize;
        data.copy_from_slice(&self.bytes.lock().unwrap()[o..o + data.len()]);
    }
    fn write(&self, _vcpu: usize, gpa: u64, data: &[u8]) {
        let o = (gpa - self.base) as usize;
        self.bytes.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
    }
}

#[test]
fn a_chain_sends_each_access_to_its_claimant() {
    use vmm::intr::system::MmioChain;
    let (s, _) = system(1);
    let ram = Arc::new(Ram { base: 0xe000_0000, bytes: Mutex::new(vec![0; 4096]) });
    let chain = MmioChain(vec![ram.clone(), s.clone()]);
    assert!(chain.claims(0xe000_0ffc) && chain.claims(LAPIC_BASE) && chain.claims(HPET_BASE));
    assert!(!chain.claims(0xe000_1000) && !chain.claims(0));
    chain.write(0, 0xe000_0010, &[1, 2, 3, 4]);
    assert_eq!(&ram.bytes.lock().unwrap()[0x10..0x14], &[1, 2, 3, 4]);
    chain.write(0, LAPIC_BASE + reg::TPR, &0x20u32.to_le_bytes());
    let mut b = [0u8; 4];
    chain.read(0, LAPIC_BASE + reg::TPR, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x20);
    chain.read(0, 0xe000_0010, &mut b);
    assert_eq!(b, [1, 2, 3, 4]);
    // Unclaimed: reads all ones, writes go nowhere.
    chain.read(0, 0x1000, &mut b);
    assert_eq!(b, [0xff; 4]);
    chain.write(0, 0x1000, &[9; 4]);
    assert_eq!(s.stats().mmio_writes, 3, "SVR and LDR in system(), then the TPR: nothing else reached the models");
}
