//! The swapper thread (`vmm::swapper::Swapper`): it keeps a swappable
//! VM's reservoir above its low-water mark while a "guest" (holds on
//! another thread) fills memory, nothing is lost, and it stops with the
//! error that stopped it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nested_pt::HeapPages;
use vmm::swapper::{Swapper, SwapperConfig};
use vmm::{Error, Vm};
use vmspace::{Gpa, HeapReservoir, Prot, Reservoir, swap_file_in};

mod common;

/// A VM from `common::new_vm`, in an `Arc` to share with the swapper thread.
fn new_vm(test: &str, ram_pages: u64) -> (Arc<Vm<HeapPages>>, Arc<HeapReservoir>) {
    let (vm, ram) = common::new_vm(test, ram_pages);
    (Arc::new(vm), ram)
}

use common::PG;

fn cfg() -> SwapperConfig {
    SwapperConfig { interval: Duration::from_millis(1), low_water_divisor: 4, min_low_water: 4 }
}

fn pattern(p: u64) -> Vec<u8> {
    (0..PG).map(|i| ((i * 13 + p * 7) % 251) as u8).collect()
}

/// Waits (at most 20 s: a functional deadline, not a timing) for `f`.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn low_water_mark() {
    let c = SwapperConfig::default();
    assert_eq!(c.low_water(1 << 20), 1 << 16);
    assert_eq!(c.low_water(100), 64);
    let c = SwapperConfig { low_water_divisor: 0, min_low_water: 1, ..c };
    assert_eq!(c.low_water(10), 10);
}

#[test]
fn keeps_the_reservoir_above_low_water_and_loses_nothing() {
    let (vm, ram) = new_vm("swapper", 32);
    vm.alloc_swappable_segment(0, 128 * PG, swap_file_in(&std::env::temp_dir()).unwrap()).unwrap();
    vm.map_segment(0, 0, 0, 128 * PG, Some(Prot::RW)).unwrap();
    let sw = Swapper::spawn(vm.clone(), cfg()).unwrap();
    let low = cfg().low_water(32);
    assert_eq!(low, 8);
    // The "guest": writes every page through a hold, twice over.
    let c = vm.space().client();
    for round in 0..2u64 {
        for p in 0..128 {
            let h = c.hold(Gpa(p * PG), Prot::RW).unwrap();
            let mut img = pattern(p);
            img[0] = round as u8;
            h.write(0, &img).unwrap();
        }
    }
    drop(c);
    sw.kick();
    // With the guest quiet, the swapper brings the free frames back to
    // the mark (and swaps no more than twice the mark's worth at a step).
    assert!(eventually(|| ram.stats().free / PG >= low), "free frames stay below the mark: {:?}", ram.stats());
    let st = sw.stats();
    assert!(st.swap_calls >= 1 && st.pages_out >= 1, "{st:?}");
    assert!(st.steps >= st.swap_calls);
    let space = vm.space().swap_stats();
    assert!(space.swapped_out >= st.pages_out, "{space:?} vs {st:?}");
    let end = sw.stop().unwrap();
    assert!(end.pages_out >= st.pages_out);
    // Nothing lost: every page reads back, resident or from the swap file.
    for p in 0..128 {
        let mut back = vec![0u8; PG as usize];
        vm.read_segment(0, p * PG, &mut back).unwrap();
        let mut img = pattern(p);
        img[0] = 1;
        assert_eq!(back, img, "page {p}");
    }
    // Every page was written since tracking went on: all dirty, swapped
    // out or not.
    let mut bm = [0u64; 2];
    assert_eq!(vm.space().track_dirty(Gpa(0), 128 * PG, &mut bm).unwrap(), 128);
}

#[test]
fn without_pressure_it_swaps_nothing() {
    let (vm, ram) = new_vm("swapper-idle", 64);
    vm.alloc_swappable_segment(0, 16 * PG, swap_file_in(&std::env::temp_dir()).unwrap()).unwrap();
    vm.map_segment(0, 0, 0, 16 * PG, Some(Prot::RW)).unwrap();
    let sw = Swapper::spawn(vm.clone(), cfg()).unwrap();
    vm.write_segment(0, 0, &pattern(3)).unwrap();
    assert!(eventually(|| sw.stats().steps >= 5));
    let st = sw.stop().unwrap();
    assert_eq!((st.swap_calls, st.pages_out), (0, 0));
    assert_eq!(vm.space().swap_stats().swapped_out, 0);
    assert!(ram.stats().free >= 48 * PG);
}

#[test]
fn a_failing_swap_out_stops_it_with_the_error() {
    let (vm, _ram) = new_vm("swapper-gone", 16);
    vm.alloc_swappable_segment(0, 64 * PG, swap_file_in(&std::env::temp_dir()).unwrap()).unwrap();
    vm.map_segment(0, 0, 0, 64 * PG, Some(Prot::RW)).unwrap();
    let c = vm.space().client();
    for p in 0..16 {
        c.hold(Gpa(p * PG), Prot::RW).unwrap().write(0, &pattern(p)).unwrap();
    }
    drop(c);
    // The space goes away under the swapper (as when its VM is torn down
    // while the thread still runs): the next swap-out fails.
    vm.space().destroy();
    let sw = Swapper::spawn(vm.clone(), cfg()).unwrap();
    assert!(eventually(|| sw.error().is_some()), "{:?}", sw.stats());
    assert!(matches!(sw.stop(), Err(Error::Space(_))));
}
