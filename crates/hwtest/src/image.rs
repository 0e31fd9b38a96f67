//! Turning the kernel ELF into a bootable disk image.
//!
//! The kernel is linked at its physical addresses starting with the boot
//! sector at 0x7C00 (see `kernel/link.ld`). The image is the bytes of every
//! loadable segment below 1 MiB placed at `paddr - 0x7C00`, padded to the
//! disk geometry both emulators are given. Doing this here, rather than with
//! `objcopy`, lets us check the layout the boot sector relies on.

use std::fmt;

/// Where the BIOS loads the boot sector.
pub const LOAD_BASE: u64 = 0x7C00;
/// The boot sector loads the image below this address (conventional memory).
pub const LOAD_LIMIT: u64 = 0x8_0000;
/// Disk geometry given to Bochs (QEMU takes the raw image as is).
pub const CYLINDERS: u64 = 2;
/// Heads.
pub const HEADS: u64 = 16;
/// Sectors per track.
pub const SPT: u64 = 63;
/// Disk image size in bytes.
pub const DISK_BYTES: u64 = CYLINDERS * HEADS * SPT * 512;

/// Why an ELF file could not be turned into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageError(pub String);

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel image: {}", self.0)
    }
}

impl std::error::Error for ImageError {}

fn rd<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], ImageError> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| ImageError(format!("truncated ELF at {off:#x}")))
}

/// Build the raw disk image from the kernel ELF bytes.
pub fn disk_image(elf: &[u8]) -> Result<Vec<u8>, ImageError> {
    if elf.get(0..4) != Some(b"\x7FELF") || elf.get(4) != Some(&2) {
        return Err(ImageError("not a 64-bit ELF file".into()));
    }
    let phoff = u64::from_le_bytes(rd(elf, 0x20)?) as usize;
    let phentsize = u16::from_le_bytes(rd(elf, 0x36)?) as usize;
    let phnum = u16::from_le_bytes(rd(elf, 0x38)?) as usize;
    let mut img = vec![0u8; DISK_BYTES as usize];
    let mut end = LOAD_BASE;
    let mut saw_boot = false;
    for i in 0..phnum {
        let ph = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| ImageError("program header table beyond the address space".into()))?;
        let ptype = u32::from_le_bytes(rd(elf, ph)?);
        let offset = u64::from_le_bytes(rd(elf, ph + 8)?) as usize;
        let paddr = u64::from_le_bytes(rd(elf, ph + 24)?);
        let filesz = u64::from_le_bytes(rd(elf, ph + 32)?);
        if ptype != 1 || filesz == 0 {
            continue; // not PT_LOAD, or .bss only
        }
        if paddr < LOAD_BASE || filesz > LOAD_LIMIT - paddr.min(LOAD_LIMIT) {
            return Err(ImageError(format!(
                "segment at {paddr:#x}+{filesz:#x} outside {LOAD_BASE:#x}..{LOAD_LIMIT:#x}"
            )));
        }
        saw_boot |= paddr == LOAD_BASE;
        let data = offset
            .checked_add(filesz as usize)
            .and_then(|e| elf.get(offset..e))
            .ok_or_else(|| ImageError("segment past end of file".into()))?;
        let at = (paddr - LOAD_BASE) as usize;
        img[at..at + data.len()].copy_from_slice(data);
        end = end.max(paddr + filesz);
    }
    if !saw_boot || img[510..512] != [0x55, 0xAA] {
        return Err(ImageError("no boot sector with signature at 0x7C00".into()));
    }
    let _ = end;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with(segs: &[(u64, &[u8])]) -> Vec<u8> {
        let mut f = vec![0u8; 0x40 + 56 * segs.len()];
        f[0..4].copy_from_slice(b"\x7FELF");
        f[4] = 2;
        f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3A].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, (pa, data)) in segs.iter().enumerate() {
            let off = f.len() as u64;
            f.extend_from_slice(data);
            let ph = 0x40 + 56 * i;
            f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            f[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
            f[ph + 24..ph + 32].copy_from_slice(&pa.to_le_bytes());
            f[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        }
        f
    }

    #[test]
    fn places_segments_by_physical_address() {
        let mut boot = vec![0u8; 512];
        boot[510] = 0x55;
        boot[511] = 0xAA;
        let img = disk_image(&elf_with(&[(0x7C00, &boot), (0x7E00, b"kernel")])).unwrap();
        assert_eq!(img.len() as u64, DISK_BYTES);
        assert_eq!(&img[512..518], b"kernel");
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(disk_image(b"nope").is_err());
        // No boot signature.
        assert!(disk_image(&elf_with(&[(0x7C00, &[0u8; 512])])).is_err());
        // Segment beyond conventional memory.
        let mut boot = vec![0u8; 512];
        boot[510..].copy_from_slice(&[0x55, 0xAA]);
        assert!(disk_image(&elf_with(&[(0x7C00, &boot), (0x7FFF0, &[1u8; 32])])).is_err());
    }

    /// Header fields chosen so that every sum the parser forms would wrap:
    /// each is refused with an error, none panics.
    #[test]
    fn hostile_headers_do_not_wrap() {
        let mut boot = vec![0u8; 512];
        boot[510..].copy_from_slice(&[0x55, 0xAA]);
        let base = elf_with(&[(0x7C00, &boot)]);
        let patch = |at: usize, v: u64| {
            let mut f = base.clone();
            f[at..at + 8].copy_from_slice(&v.to_le_bytes());
            f
        };
        for f in [
            patch(0x20, u64::MAX - 3),      // phoff + field offset wraps
            patch(0x40 + 24, u64::MAX - 8), // paddr + filesz wraps
            patch(0x40 + 32, u64::MAX),     // filesz huge
            patch(0x40 + 8, u64::MAX - 4),  // offset + filesz wraps
        ] {
            assert!(disk_image(&f).is_err());
        }
        let mut f = base.clone();
        f[0x36..0x38].copy_from_slice(&u16::MAX.to_le_bytes());
        f[0x38..0x3A].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(disk_image(&f).is_err(), "program headers beyond the file");
    }
}
