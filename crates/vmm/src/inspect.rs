//! Human-readable dumps of a vmspace: its mappings and its table tree
//! (levels, entries, flags decoded), for `vmm inspect`.

use nested_pt::{Gpa, PageSize, TablePages};
use std::collections::BTreeSet;
use std::fmt::Write;

/// Decodes an NPT (x86-64 long-mode) entry: frame and flags.
pub fn decode_npt(e: u64, level: u8) -> String {
    if e & 1 == 0 {
        return if e == 0 { "not present".into() } else { format!("not present (raw {e:#x})") };
    }
    let mut f = String::from("P");
    for (bit, name) in [(1, "RW"), (2, "US"), (3, "PWT"), (4, "PCD"), (5, "A"), (6, "D")] {
        if e & (1 << bit) != 0 {
            f.push(' ');
            f.push_str(name);
        }
    }
    let large = level > 1 && e & (1 << 7) != 0;
    if large {
        f.push_str(" PS");
    }
    if e & (1 << 63) != 0 {
        f.push_str(" NX");
    }
    let pfn = (e & 0x000f_ffff_ffff_f000) >> 12;
    let what = if level == 1 || large { "frame" } else { "table" };
    format!("{what} {pfn:#x}  [{f}]")
}

fn level_name(level: u8) -> &'static str {
    match level {
        4 => "PML4E",
        3 => "PDPTE",
        2 => "PDE",
        _ => "PTE",
    }
}

/// Dumps the tables covering `ranges`: the upper entries on each path and
/// up to `max_leaves` present leaves per leaf table.
pub fn dump_tables<P: TablePages>(
    table: &vmspace::TableView<'_, P>,
    ranges: &[(u64, u64)],
    max_leaves: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "table: {:?}, root frame {:#x}, {} table pages ({} KiB)",
        table.format().kind(),
        table.root().0,
        table.table_pages(),
        table.table_bytes() / 1024
    );
    let mut shown: BTreeSet<(u8, u64)> = BTreeSet::new();
    for &(gpa, len) in ranges {
        table.for_each_leaf_table(Gpa(gpa), len, |base, entries, size| {
            let walk = table.walk(base);
            let leaf_level = match size {
                PageSize::Size4K => 1,
                PageSize::Size2M => 2,
                PageSize::Size1G => 3,
            };
            for s in walk.steps() {
                if s.level <= leaf_level {
                    break;
                }
                let span = 1u64 << (12 + 9 * u32::from(s.level - 1));
                let key = (s.level, base.0 & !(span - 1));
                if shown.insert(key) {
                    let indent = "  ".repeat(usize::from(4 - s.level));
                    let _ = writeln!(
                        out,
                        "{indent}{}[{:3}] gpa {:#014x}: {:#018x}  {}",
                        level_name(s.level),
                        s.index,
                        key.1,
                        s.entry,
                        decode_npt(s.entry, s.level)
                    );
                }
            }
            let indent = "  ".repeat(usize::from(4 - leaf_level));
            let present: Vec<(usize, u64)> =
                entries.iter().enumerate().map(|(k, e)| (k, *e)).filter(|&(_, e)| e & 1 != 0).collect();
            let _ = writeln!(
                out,
                "{indent}{} entries from gpa {:#x}: {} of {} present",
                level_name(leaf_level),
                base.0,
                present.len(),
                entries.len()
            );
            for &(k, e) in present.iter().take(max_leaves) {
                let _ = writeln!(
                    out,
                    "{indent}  gpa {:#014x}: {e:#018x}  {}",
                    base.0 + k as u64 * size.bytes(),
                    decode_npt(e, leaf_level)
                );
            }
            if present.len() > max_leaves {
                let _ = writeln!(out, "{indent}  ... {} more", present.len() - max_leaves);
            }
        });
    }
    out
}

/// Dumps a vmspace: mappings, then the tables under them.
pub fn dump_space<P: TablePages + Send + Sync>(space: &vmspace::VmSpace<P>, max_leaves: usize) -> String {
    let mut out = String::new();
    let maps = space.mappings();
    let _ = writeln!(
        out,
        "vmspace: {} bytes, generation {}, {} pages resident, dirty tracking {}",
        space.size(),
        space.table_gen(),
        space.resident_count(),
        if space.dirty_tracking() { "on" } else { "off" }
    );
    let _ = writeln!(out, "mappings:");
    for m in &maps {
        let p = m.prot;
        let _ = writeln!(
            out,
            "  [{:#014x}, {:#014x})  {:>9} KiB  {}{}{}  {} object of {} KiB, offset {:#x}",
            m.gpa.0,
            m.gpa.0 + m.len,
            m.len / 1024,
            if p.contains(nested_pt::Prot::READ) { 'r' } else { '-' },
            if p.contains(nested_pt::Prot::WRITE) { 'w' } else { '-' },
            if p.contains(nested_pt::Prot::EXEC) { 'x' } else { '-' },
            if m.object.is_ram() { "RAM" } else { "MMIO" },
            m.object.size() / 1024,
            m.offset
        );
    }
    let ranges: Vec<(u64, u64)> = maps.iter().map(|m| (m.gpa.0, m.len)).collect();
    space.with_table(|t| out.push_str(&dump_tables(t, &ranges, max_leaves)));
    out
}

/// Builds the small built-in layout (no KVM needed: heap table pages and a
/// heap reservoir) and dumps it: RAM with a few resident pages, a boot ROM
/// (read + execute), a read-only table and a non-executable device buffer.
pub fn builtin_layout_dump(max_leaves: usize) -> Result<String, vmspace::Error> {
    use nested_pt::{Caps, HeapPages, Pfn, Prot, PteFormat};
    use std::sync::Arc;
    use vmspace::{HeapReservoir, SpaceConfig, VmObject, VmSpace};
    let fmt = PteFormat::npt(Caps { page_2m: true, page_1g: true, execute_only: false, phys_bits: 48 });
    let mut cfg = SpaceConfig::new(1 << 33, fmt);
    cfg.track_dirty = true;
    let space: VmSpace<HeapPages> = VmSpace::new(cfg, HeapPages::new())?;
    let res: Arc<dyn vmspace::Reservoir> = Arc::new(HeapReservoir::new(32 << 20, Pfn(0x10_0000))?);
    let ram = VmObject::ram(res.clone(), 8 << 20)?;
    let rom = VmObject::ram(res.clone(), 64 << 10)?;
    let acpi = VmObject::ram(res.clone(), 16 << 10)?;
    let dev = VmObject::ram(res, 16 << 10)?;
    space.map(&ram, 0, Gpa(0), 8 << 20, Prot::READ | Prot::WRITE | Prot::EXEC)?;
    space.map(&rom, 0, Gpa(0xffff_0000), 64 << 10, Prot::READ | Prot::EXEC)?;
    space.map(&acpi, 0, Gpa(0x00e0_0000), 16 << 10, Prot::READ)?;
    space.map(&dev, 0, Gpa(0xc000_0000), 16 << 10, Prot::READ | Prot::WRITE)?;
    space.populate(Gpa(0), 64 << 10)?;
    space.populate(Gpa(0x40_0000), 8 << 10)?;
    space.populate(Gpa(0xffff_0000), 64 << 10)?;
    space.populate(Gpa(0x00e0_0000), 16 << 10)?;
    space.populate(Gpa(0xc000_0000), 4 << 10)?;
    Ok(dump_space(&space, max_leaves))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_flags() {
        let e = (0x1234u64 << 12) | 0x67 | (1 << 63);
        let s = decode_npt(e, 1);
        assert!(s.contains("frame 0x1234") && s.contains("RW") && s.contains("D") && s.contains("NX"), "{s}");
        assert!(decode_npt(0x1234_5000 | 0x83, 2).contains("PS"));
        assert!(decode_npt(0x1234_5000 | 0x07, 3).starts_with("table"));
        assert_eq!(decode_npt(0, 1), "not present");
    }
}
