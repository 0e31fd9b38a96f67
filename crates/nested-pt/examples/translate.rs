//! Builds a small nested table in each format, maps 4 KiB, 2 MiB and 1 GiB
//! pages, and prints what the software MMU does with a few accesses, plus
//! what the tables cost.
//!
//! `cargo run -p nested-pt --example translate`

use nested_pt::mmu::translate;
use nested_pt::{Access, Caps, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat};

fn main() -> Result<(), nested_pt::Error> {
    let caps = Caps::default();
    for fmt in [PteFormat::ept(caps), PteFormat::ept_emulated_ad(caps), PteFormat::npt(caps)] {
        println!("== {:?} ==", fmt.kind());
        let mut t = NestedTable::new(fmt, HeapPages::new())?;
        t.populate_region(Gpa(0), 2 << 20, PageSize::Size4K)?;
        t.populate_region(Gpa(2 << 20), 2 << 20, PageSize::Size2M)?;
        t.populate_region(Gpa(1 << 30), 1 << 30, PageSize::Size1G)?;
        t.map(Gpa(0x1000), Pfn(0x8_0001), PageSize::Size4K, Prot::READ, MemType::WriteBack)?;
        t.map(Gpa(0x2000), Pfn(0x8_0002), PageSize::Size4K, Prot::RW, MemType::Uncacheable)?;
        t.map(Gpa(2 << 20), Pfn(0x8_0200), PageSize::Size2M, Prot::RWX, MemType::WriteBack)?;
        t.map(Gpa(1 << 30), Pfn(0x4_0000), PageSize::Size1G, Prot::RW, MemType::WriteBack)?;
        println!("root pointer {:#x}, {} table pages", t.root_pointer(true), t.table_pages());
        for (gpa, access) in [
            (0x1234, Access::Read),
            (0x1234, Access::Write),
            (0x2008, Access::Write),
            ((2 << 20) + 0x4321, Access::Execute),
            ((1 << 30) + 0x12_3456, Access::Write),
            (0x3000, Access::Read),
            (1 << 40, Access::Read),
        ] {
            // The emulated format faults first; software records the access.
            let mut r = translate(t.pages(), &fmt, t.root(), Gpa(gpa), access, true);
            if r.is_err() && t.record_access(Gpa(gpa), access) == Ok(true) {
                print!("(recorded by software) ");
                r = translate(t.pages(), &fmt, t.root(), Gpa(gpa), access, true);
            }
            match r {
                Ok(tr) => println!("{access:?} {gpa:#x} -> {:#x} ({:?}, {:?})", tr.hpa, tr.size, tr.prot),
                Err(v) => println!(
                    "{access:?} {gpa:#x} -> {:?} at level {} (NPT error code {:#x}, EPT qualification {:#x})",
                    v.kind,
                    v.level,
                    v.npt_error_code(),
                    v.ept_qualification()
                ),
            }
        }
        for s in t.walk(Gpa(0x2008)).steps() {
            println!("  walk L{} [{:3}] = {:#018x}", s.level, s.index, s.entry);
        }
        let mut bitmap = [0u64; 8];
        let dirty = t.harvest_dirty(Gpa(0), 2 << 20, &mut bitmap)?;
        println!("dirty pages in the first 2 MiB: {dirty} (bitmap word 0 = {:#b})", bitmap[0]);
    }
    Ok(())
}
