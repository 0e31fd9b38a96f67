//! A PCI framebuffer, after bhyve's `pci_fbuf`: BAR 0 is a small register
//! page (emulated: every access traps), BAR 1 (with BAR 2 as its upper half)
//! is a 64-bit prefetchable memory BAR backed by a device-memory segment,
//! the pixels, which the guest reaches through the nested table at full
//! speed and which any process can map by name (the segment's node).
//!
//! Pixels are 32-bit XRGB, little-endian (bytes B, G, R, X), `stride`
//! bytes per row. [`render_png`] turns a frame into a PNG, for
//! `vmm screenshot`.
//!
//! Register page (BAR 0), 32-bit registers:
//!
//! | offset | register | access |
//! | --- | --- | --- |
//! | 0x00 | framebuffer size in bytes | read-only |
//! | 0x04 | width in pixels | read-write |
//! | 0x08 | height in pixels | read-write |
//! | 0x0c | bits per pixel (32) | read-only |
//! | 0x10 | stride in bytes (width × 4) | read-only |
//!
//! A width or height whose frame would not fit the framebuffer is refused
//! (the register keeps its value).

use crate::pci::{BarKind, PciFunction};

/// bhyve's framebuffer vendor and device ids.
pub const VENDOR: u16 = 0xfb5d;
/// bhyve's framebuffer device id.
pub const DEVICE: u16 = 0x40fb;
/// The register BAR.
pub const REG_BAR: u8 = 0;
/// The framebuffer BAR (64-bit: slots 1 and 2).
pub const FB_BAR: u8 = 1;
/// Bytes of the register BAR.
pub const REG_BYTES: u64 = 4096;

/// The device model.
#[derive(Debug, Clone)]
pub struct Fbuf {
    fb_size: u64,
    width: u32,
    height: u32,
}

impl Fbuf {
    /// A framebuffer of `fb_size` bytes (a power of two, at least 4 KiB)
    /// showing `width` × `height` pixels (which must fit).
    pub fn new(fb_size: u64, width: u32, height: u32) -> Option<Self> {
        let f = Fbuf { fb_size, width, height };
        (fb_size.is_power_of_two() && fb_size >= 4096 && f.fits(width, height)).then_some(f)
    }

    fn fits(&self, w: u32, h: u32) -> bool {
        u64::from(w) * u64::from(h) * 4 <= self.fb_size
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Bytes per row.
    pub fn stride(&self) -> u32 {
        self.width * 4
    }

    /// Size of the framebuffer memory.
    pub fn fb_size(&self) -> u64 {
        self.fb_size
    }

    /// A read of the register page (any width; bytes outside the registers
    /// read zero).
    pub fn reg_read(&self, offset: u64, data: &mut [u8]) {
        let regs = [self.fb_size.min(u64::from(u32::MAX)) as u32, self.width, self.height, 32, self.stride()];
        for (k, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(k as u64);
            *b = match regs.get((at / 4) as usize) {
                Some(r) => r.to_le_bytes()[(at % 4) as usize],
                None => 0,
            };
        }
    }

    /// A write of the register page: 32-bit writes of width and height take
    /// effect when the frame fits; everything else is ignored.
    pub fn reg_write(&mut self, offset: u64, data: &[u8]) {
        let Ok(v) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else { return };
        match offset {
            4 if v > 0 && self.fits(v, self.height) => self.width = v,
            8 if v > 0 && self.fits(self.width, v) => self.height = v,
            _ => {}
        }
    }
}

impl PciFunction for Fbuf {
    fn ids(&self) -> (u16, u16) {
        (VENDOR, DEVICE)
    }
    fn class(&self) -> (u32, u8) {
        // Display controller, VGA-compatible.
        (0x03_00_00, 0)
    }
    fn bars(&self) -> [Option<BarKind>; 6] {
        [
            Some(BarKind::Mem32 { size: REG_BYTES }),
            Some(BarKind::Mem64 { size: self.fb_size, prefetchable: true }),
            None,
            None,
            None,
            None,
        ]
    }
    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Why a frame could not be rendered.
#[derive(Debug)]
pub enum RenderError {
    /// The pixels given are fewer than `height * stride` bytes, or the
    /// geometry is empty.
    Geometry,
    /// The PNG encoder failed.
    Png(png::EncodingError),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::Geometry => f.write_str("frame geometry does not fit the pixels"),
            RenderError::Png(e) => write!(f, "PNG encoding: {e}"),
        }
    }
}

impl std::error::Error for RenderError {}

/// Encodes `height` rows of `width` XRGB pixels, `stride` bytes apart, from
/// `pixels` as an 8-bit RGB PNG.
pub fn render_png(pixels: &[u8], width: u32, height: u32, stride: u32) -> Result<Vec<u8>, RenderError> {
    let (w, h, s) = (width as usize, height as usize, stride as usize);
    let need = h.checked_mul(s).ok_or(RenderError::Geometry)?;
    if w == 0 || h == 0 || s < w.checked_mul(4).ok_or(RenderError::Geometry)? || pixels.len() < need {
        return Err(RenderError::Geometry);
    }
    let mut rgb = Vec::with_capacity(w * h * 3);
    for row in pixels[..need].chunks(s) {
        for px in row[..w * 4].chunks_exact(4) {
            rgb.extend_from_slice(&[px[2], px[1], px[0]]);
        }
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().map_err(RenderError::Png)?;
    wr.write_image_data(&rgb).map_err(RenderError::Png)?;
    wr.finish().map_err(RenderError::Png)?;
    Ok(out)
}

/// Takes a screenshot of the framebuffer of VM `vm`, as another process
/// does: asks the VM's control endpoint for the geometry, maps the
/// "framebuffer" device-memory node by name (read-only) and encodes the
/// frame as PNG. Returns the PNG and the geometry (width, height).
pub fn screenshot(vm: &str) -> Result<(Vec<u8>, u32, u32), crate::Error> {
    let answer = crate::control::request(vm, "framebuffer")?;
    let bad = || crate::Error::Backend(format!("framebuffer: unexpected answer {:?}", answer.trim()));
    let nums: Vec<u64> = answer.split_whitespace().map(|w| w.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    let [w, h, stride, _size] = nums[..] else { return Err(bad()) };
    let (w, h, stride) = (u32::try_from(w).map_err(|_| bad())?, u32::try_from(h).map_err(|_| bad())?, stride);
    screenshot_node(vm, w, h, u32::try_from(stride).map_err(|_| bad())?).map(|png| (png, w, h))
}

/// Encodes the frame in VM `vm`'s "framebuffer" node (mapped read-only by
/// name) with the given geometry as PNG.
pub fn screenshot_node(vm: &str, width: u32, height: u32, stride: u32) -> Result<Vec<u8>, crate::Error> {
    let view = crate::devmem::open(vm, "framebuffer", false)?;
    let need = u64::from(height) * u64::from(stride);
    if need > view.len() {
        return Err(crate::Error::OutsideSegment);
    }
    let mut pixels = vec![0u8; need as usize];
    view.read(0, &mut pixels)?;
    render_png(&pixels, width, height, stride).map_err(|e| crate::Error::Backend(e.to_string()))
}
