//! A vmspace the way a VMM uses one: two vCPU threads, each with its own
//! client, faulting guest RAM in and writing it; a device thread writing
//! guest memory through page holds (what a virtio device's DMA does); and
//! a migration's harvest loop that checks, every round, that the harvest
//! reports exactly the pages written in that round, no more, no fewer.
//!
//! A vCPU's guest store is played by the software MMU's nested walk
//! (`nested_pt::mmu::translate` on the space's table view, which sets the
//! accessed and dirty bits as the processor does; a page that is not
//! resident yet is a nested page fault, served by the vCPU's client with
//! fault-around, then the walk is retried) followed by the store through
//! the object's host view. `table_enter` brackets the time the vCPU would be
//! in guest context; its kick hook is what an unmap or a harvest uses to
//! get it out (a real VMM signals the thread; here it counts).
//!
//! `cargo run --release -p vmspace --example two_vcpus_device_harvest`

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use nested_pt::mmu::translate;
use nested_pt::{Access, Caps, Gpa, HeapPages};
use vmspace::{HeapReservoir, Pfn, Prot, PteFormat, SpaceConfig, VmObject, VmSpace};

const PG: u64 = 4096;
/// Guest RAM: 1024 pages at guest-physical 1 MiB.
const RAM_GPA: u64 = 0x10_0000;
const RAM_PAGES: u64 = 1024;
const ROUNDS: u64 = 8;

/// The pages (indices into RAM) writer `who` writes in `round`: vCPUs 0
/// and 1, the device 2. Sets overlap between writers and rounds.
fn pages_of(who: u64, round: u64) -> Vec<u64> {
    let n = if who == 2 { 4 } else { 6 };
    (0..n).map(|k| (round * 37 + k * 113 + who * 211) % RAM_PAGES).collect()
}

/// The bytes a writer stores at the start of a page.
fn stamp(who: u64, round: u64, page: u64) -> [u8; 8] {
    (who << 56 | round << 32 | page).to_le_bytes()
}

/// The processor's nested walk for a store to `gpa`: the host-physical
/// address, with the leaf's accessed and dirty bits set as the hardware
/// sets them; `None` for an EPT violation (not resident yet).
fn store_walk(space: &VmSpace<HeapPages>, gpa: u64) -> Option<u64> {
    space.with_table(|t| translate(t.pages(), t.format(), t.root(), Gpa(gpa), Access::Write, true).ok().map(|x| x.hpa))
}

fn main() -> Result<(), vmspace::Error> {
    let config = SpaceConfig::new(1 << 30, PteFormat::ept(Caps::default()));
    let space: VmSpace<HeapPages> = VmSpace::new(config, HeapPages::new())?;
    let reservoir = Arc::new(HeapReservoir::new(RAM_PAGES * PG, Pfn(0x4_0000))?);
    let ram = VmObject::ram(reservoir, RAM_PAGES * PG)?;
    space.map(&ram, 0, Gpa(RAM_GPA), RAM_PAGES * PG, Prot::RWX)?;
    space.set_dirty_tracking(true)?;

    // Writers and the harvester meet twice a round: after the writes, and
    // after the harvest.
    let barrier = Barrier::new(4);
    let kicks = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| -> Result<(), vmspace::Error> {
        let mut threads = Vec::new();
        for cpu in 0..2u32 {
            let (space, ram, barrier, kicks) = (&space, &ram, &barrier, kicks.clone());
            let vcpu = space.client();
            threads.push(s.spawn(move || -> Result<(), vmspace::Error> {
                vcpu.set_kick(Some(move |_cpu| {
                    kicks.fetch_add(1, Ordering::Relaxed);
                }));
                for round in 0..ROUNDS {
                    for page in pages_of(cpu as u64, round) {
                        let gpa = RAM_GPA + page * PG;
                        // In guest context until the store; a page that is
                        // not resident yet exits with a nested page fault,
                        // which the client serves, and the store retries.
                        let on = vcpu.table_enter(cpu)?;
                        drop(on);
                        let hpa = match store_walk(space, gpa) {
                            Some(hpa) => hpa,
                            None => {
                                vcpu.fault(Gpa(gpa), Prot::RW)?;
                                store_walk(space, gpa).expect("mapped by the fault")
                            }
                        };
                        assert_eq!(Some(Pfn(hpa >> 12)), ram.frame_at(page * PG));
                        ram.write(page * PG, &stamp(cpu as u64, round, page))?;
                    }
                    barrier.wait(); // writes done
                    barrier.wait(); // harvest done
                }
                Ok(())
            }));
        }
        let (space, barrier) = (&space, &barrier);
        let device = space.client();
        threads.push(s.spawn(move || -> Result<(), vmspace::Error> {
            for round in 0..ROUNDS {
                for page in pages_of(2, round) {
                    // A DMA write: hold the page writable, store, release
                    // (the release marks the page dirty).
                    let hold = device.hold(Gpa(RAM_GPA + page * PG), Prot::RW)?;
                    hold.write(0, &stamp(2, round, page))?;
                    hold.release();
                }
                barrier.wait();
                barrier.wait();
            }
            Ok(())
        }));

        // The migration's harvest loop.
        let mut bitmap = vec![0u64; (RAM_PAGES / 64) as usize];
        for round in 0..ROUNDS {
            barrier.wait();
            let n = space.track_dirty(Gpa(RAM_GPA), RAM_PAGES * PG, &mut bitmap)?;
            let dirty: BTreeSet<u64> =
                (0..RAM_PAGES).filter(|&p| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1).collect();
            let written: BTreeSet<u64> = (0..3).flat_map(|who| pages_of(who, round)).collect();
            println!("round {round}: {n} dirty pages, {} resident, {} written", space.resident_count(), written.len());
            assert_eq!(dirty, written, "round {round}: the harvest reports exactly the written pages");
            assert_eq!(n as usize, written.len());
            // The data is there: each written page holds one writer's stamp
            // of this round (two writers of one page: either may be last).
            for &page in &written {
                let mut got = [0u8; 8];
                ram.read(page * PG, &mut got)?;
                let ok = (0..3).any(|who| pages_of(who, round).contains(&page) && got == stamp(who, round, page));
                assert!(ok, "page {page} holds this round's data");
            }
            barrier.wait();
        }
        for t in threads {
            t.join().expect("writer thread panicked")?;
        }
        Ok(())
    })?;
    // Fault-around mapped neighbours of the faulted pages; none of them was
    // reported dirty (the per-round check), and nothing is dirty now.
    let mut bitmap = vec![0u64; (RAM_PAGES / 64) as usize];
    assert_eq!(space.track_dirty(Gpa(RAM_GPA), RAM_PAGES * PG, &mut bitmap)?, 0);
    println!(
        "{ROUNDS} rounds exact; {} pages resident, {} kicks",
        space.resident_count(),
        kicks.load(Ordering::Relaxed)
    );
    Ok(())
}
