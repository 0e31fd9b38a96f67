//! Live migration: a pre-copy engine and its wire format, independent of
//! KVM, against two small traits ([`MigrationSource`], [`MigrationTarget`])
//! that the VM layer implements for a running VM (DESIGN.md §7 and §8).
//!
//! # Design
//!
//! The source side ([`migrate`]) runs pre-copy driven by dirty harvest:
//!
//! 1. **Handshake.** It sends the stream header (magic, version, page size,
//!    layout) and waits for the target's header ack; a target that refuses
//!    the version or the layout answers with a typed refusal.
//! 2. **First pass.** It reads which pages are resident
//!    ([`MigrationSource::resident`]), then harvests (read-and-clear) the
//!    dirty bits, and sends every page in the union: a page of zeros costs
//!    one small record (runs of them one record), a page never touched costs
//!    nothing.
//! 3. **Rounds.** Each round harvests and sends what was dirtied since the
//!    previous harvest. After each harvest the engine compares the remaining
//!    bytes with what the link carries in the downtime limit
//!    (`remaining_bytes <= throughput * downtime_limit`, QEMU's and
//!    cloud-hypervisor's rule, 300 ms by default) and switches over when it
//!    fits or when [`SourceConfig::max_rounds`] is reached.
//! 4. **Switch-over.** It pauses the vCPUs, harvests once more, sends the
//!    pending and the last dirty pages, the state blobs
//!    ([`MigrationSource::state`]) and the end record, and waits for the
//!    final ack, which the target sends after it resumed the guest.
//!
//! The target side ([`receive`]) checks the header, prepares its layout
//! ([`MigrationTarget::prepare`]), applies records as they come, and at the
//! end marks every page it received ([`MigrationTarget::mark_received`]),
//! applies the state, resumes and acks.
//!
//! # A real VM
//!
//! [`vm::VmMemory`] is the memory half of both traits for a
//! [`crate::Vm`]: one stream range per **segment** (not per guest-physical
//! mapping, so a BAR move or an alias during the attempt changes nothing),
//! residency from the vmspace's leaves, system-memory dirty bits through
//! each writable mapping, device memory by content comparison, the bits
//! of failed attempts accumulated, and the pages a migration in delivered
//! kept as "received" until a migration out succeeds. `vmm-kvm`'s
//! `migrate` module completes it for KVM: harvest points (the vCPUs parked
//! at an operation boundary, so the guests' ledgers are checked against
//! every migration harvest), the vCPU state (`vmm-kvm`'s `vcpu_state`:
//! registers, segments and control registers, XSAVE, XCRs, MSRs, pending
//! events), and `vmm run --incoming` / `--migrate-to` on top.
//!
//! # Convergence policy
//!
//! A guest that dirties memory faster than the link carries it never
//! converges. Two behaviours, chosen by [`SourceConfig::auto_converge`]:
//!
//! - **Default (off, as in QEMU):** pre-copy stops at
//!   [`SourceConfig::max_rounds`] (30) and switches over anyway; the
//!   downtime is then bounded by the dirty set (at most the guest's resident
//!   memory) over the measured throughput, and the summary says
//!   `converged: false`.
//! - **Auto-converge (QEMU's):** when the bytes dirtied in a round exceed
//!   50% of the bytes sent in it twice in a row, the engine throttles the
//!   vCPUs ([`MigrationSource::throttle`]) to 20%, then 10% more each time
//!   the condition holds again, at most 99%. The throttle is lifted (0%)
//!   when the attempt fails. The summary's `max_throttle_pct` says how far
//!   it went. The KVM source (`vmm-kvm`'s `migrate`) implements the
//!   throttle in the machine's vCPU loop
//!   ([`crate::machine::Control::set_throttle`]): after each 10 ms slice a
//!   vCPU ran, its thread sleeps `slice * pct / (100 - pct)`, and a ticker
//!   kicks the vCPUs every slice so that a guest that rarely exits notices
//!   (`vmm run --migrate-to ... --auto-converge`).
//!
//! # Stream format (version 2)
//!
//! All integers little-endian; every checksum is CRC-32 (IEEE, the
//! `crc32fast` crate, hardware-accelerated; it catches every single-bit
//! and burst error up to 32 bits). The stream opens with the header:
//!
//! | field | size | meaning |
//! |---|---|---|
//! | magic | 8 | `b"VMMIGRAT"` |
//! | version | 4 | [`wire::VERSION`]; checked before anything else is parsed |
//! | body length | 4 | at most [`wire::MAX_HEADER_BODY`] |
//! | body | n | page size (4), range count (4), per range: gpa (8), length (8), kind (4) |
//! | crc | 4 | CRC-32 of version, body length and body |
//!
//! Every record after it, in both directions, is a 20-byte header — tag
//! (1), three zero bytes, payload length (4), argument (8), CRC-32 (4) of
//! the first 16 header bytes and the payload — then the payload:
//!
//! | tag | record | argument | payload |
//! |---|---|---|---|
//! | 1 | pages | gpa of the first | a run of consecutive pages: 1 to [`wire::MAX_RUN_PAGES`] whole pages (version 1: exactly one) |
//! | 2 | zero pages | gpa of the first | page count (8), at least 1 |
//! | 3 | state blob | kind << 32 \| instance | the blob, at most [`wire::MAX_STATE_BLOB`] (all blobs at most [`wire::MAX_STATE_TOTAL`]) |
//! | 4 | round marker | round number | none |
//! | 5 | end | pages delivered (records counted page by page) | none |
//! | 6 | abort | 0 | reason, UTF-8 |
//! | 16 | header ack (target→source) | 0 accept, or [`wire::Refusal`] code \| peer's value << 32 (its version, its page size) | reason, UTF-8 |
//! | 17 | final ack (target→source) | target's resume time, ns since the Unix epoch | none |
//! | 18 | refusal (target→source) | [`wire::Refusal`] code | reason, UTF-8 |
//!
//! The decoder never trusts a length: it checks it against the record
//! type's bound before reading the payload, then checks the CRC; a page
//! run must lie inside one range. For each run of consecutive dirty pages
//! (up to [`wire::MAX_RUN_PAGES`]) the source first asks which are zero in
//! place ([`MigrationSource::zero_mask`]: a check of guest memory that
//! stops at a page's first non-zero word, no copy); the zero ones join a
//! zero-page record, and each run of the others is read with one
//! [`MigrationSource::read_pages`] call straight into one batch buffer
//! (256 KiB by default, allocated and zeroed once: no clearing, no second
//! copy), checked for zero again (a source that cannot check in place
//! relies on this one), and framed as one record (a run after zero pages
//! is moved down once to make room for its header); the buffer is flushed
//! by one `write`. Over TCP ([`receive_tcp`]) the target receives each page
//! run in place where it can ([`MigrationTarget::receive_pages`]): the
//! reader reads little past each header (4 KiB, so small records come
//! together), copies what it holds of the payload, `readv`s the rest from
//! the socket straight into guest memory, and verifies the checksum there.
//! A run that fails it fails the attempt, whose target discards what
//! landed: the target's guest does not run before the end record, so
//! unverified bytes in its memory are never seen. Otherwise (any other
//! reader, a swappable segment) the reader is buffered the same way as the
//! writer, and the target writes each run with one
//! [`MigrationTarget::write_pages`] call.
//!
//! # Invariants (nothing lost)
//!
//! - **Harvest before read:** a page's dirty bit is cleared before its
//!   contents are read, so a guest write racing the harvest either lands
//!   before the read (sent now) or sets the bit again (sent next round).
//! - **Put back on failure:** the engine keeps the union of every dirty
//!   bitmap the attempt harvested. If anything fails before the final ack,
//!   it resumes the vCPUs (if it paused them), lifts the throttle and puts
//!   those bits back ([`MigrationSource::set_dirty`]), so the VM's dirty log
//!   is as if the attempt had not happened and the next attempt sends those
//!   pages (propolis 387/616/682).
//! - **Received pages count as written:** the target marks every page it
//!   received, so a VM that arrived by migration and leaves again sends the
//!   pages it never touched (propolis 232).
//! - **The target discards on failure:** any error before the final ack
//!   makes the target call [`MigrationTarget::discard`]; it never resumes on
//!   a partial stream (the end record carries the page count, checked).
//!
//! # Known gaps
//!
//! - Two generals: if the target resumed but its final ack is lost (the
//!   connection drops in that instant), the source resumes too and both
//!   run. Fencing belongs to the orchestrator.
//! - One TCP connection; no compression, no multifd, no post-copy.
//! - The downtime is measured pause (source) to resume (target) only when
//!   [`SourceConfig::shared_clock`] says both sides read one clock (one
//!   host); otherwise the summary reports pause → final ack on the source.
//! - Throughput is the cumulative send rate into the socket, which a large
//!   socket buffer can flatter on small rounds; it counts from the first
//!   harvest (the handshake and residency are in `total_ms` and the
//!   timings, not in it).
//! - The source reads the target's answers only at the header and at the
//!   end: a target that fails mid-stream is noticed by the failed write
//!   (reset, broken pipe) or at the final ack, not sooner.
//! - No timeouts or cancellation of its own: the caller sets socket
//!   timeouts, and cancels by shutting the socket down from another thread
//!   (the attempt then fails and cleans up as any other).
//! - The target takes any valid layout its `prepare` accepts; comparing
//!   it with the VM's configuration (segments, sizes) is `prepare`'s job.
//! - Writes that bypass the dirty log (another process's view of a
//!   device-memory node) must be folded into `harvest` by the VM layer
//!   (`Vm::harvest_dirty` compares device memory with its copy); the
//!   engine trusts `harvest`.
//! - Swappable guest memory migrates ([`vm`] module doc: the first pass
//!   lists resident and swapped-out pages, the harvest reports pages
//!   swapped out dirty), but the engine does not pace itself to the swap
//!   file: a first pass over mostly swapped-out memory reads it at the
//!   swap file's speed.
//! - The progress callback runs on the engine's thread between rounds; a
//!   slow callback lengthens the round (and, after pause, the downtime).
//! - Every non-zero page is copied once into the batch buffer before its
//!   checksum (the guest may write it meanwhile, so the checksum cannot be
//!   taken over guest memory and the kernel's copy). The target receives
//!   in place only through [`receive_tcp`] (it needs the descriptor) and
//!   not into a swappable segment (a page may be in the swap file); there
//!   it copies each page once more from its read buffer. A zero page still
//!   costs a read of it in place (a page the guest never wrote cannot be
//!   told from one it zeroed without reading it).
//! - Throughput: on the project's 2-core host, with both ends on it, the
//!   stream competes for the cores with the guest's busy vCPU threads; the
//!   optional stream policy ([`priority`]: the sender and the receiver
//!   raise their priority while they stream, and a benchmark may pin them
//!   to cores of their own) lets it take what it needs. `vmm bench
//!   migrate --mem 1G --write-pct 0,10,80 --runs 5 --batch 1M` (the policy
//!   on, its copies under the same policy) measured 2,311-2,422 MiB/s,
//!   0.95-1.19 of a memory-to-memory copy of the guest's bytes over the
//!   same socket (0.83-0.98 at 4 GiB), but 0.43-0.48 of a copy that sends
//!   one cache-hot buffer over and over; without the policy 0.53-0.66 of
//!   the memory copy. The stream costs 0.63-0.68 ns of CPU per byte
//!   against the memory copy's 0.52-0.56: what it adds is the source's
//!   copy of each page out of guest memory before its checksum (the guest
//!   may write it meanwhile) and the CRC on each side (the target's in
//!   place, 128 KiB at a time as each lands). Earlier versions' fixes (see
//!   the README's history): zero pages checked in place
//!   ([`MigrationSource::zero_mask`]), pages received in place
//!   ([`MigrationTarget::receive_pages`]), one record and one read and
//!   write call per run of up to [`wire::MAX_RUN_PAGES`] pages, no clock
//!   read per page, the first pass's residency without the space lock per
//!   page. Not done: knowing a page is zero without reading it, copying
//!   and checksumming a page while it is in L1 rather than a run at a time,
//!   a sender thread of its own (harvests and sends do not overlap), and
//!   socket buffer tuning.
//! - The real-VM layer ([`vm`]) cannot see a host write into a
//!   system-memory page no mapping covers (there is no dirty bit to set).
//! - Device models: the PCI platform's state (every function's command
//!   register, BARs, interrupt line, the framebuffer's mode) is a
//!   [`devices`] blob, restored through configuration writes so that the
//!   target maps each BAR's segment where the source had it; a BAR moved
//!   during an attempt lands at its new place (tested on a `Vm` with a
//!   platform, without KVM). The KVM migration still runs guests without a
//!   platform (so `vmm run --migrate-to` has no framebuffer). The
//!   interrupt models (vLAPICs, vIOAPIC, vHPET and their clock) are
//!   another [`devices`] blob ([`devices::save_interrupts`]), restored
//!   with the target's clock set to the source's; the KVM migration's
//!   guests attach no interrupt system either.
//! - Harvests compose with migration by running in one place: on KVM the
//!   run's harvest rounds and the engine's harvests are the same harvest
//!   points on the coordinator thread (a round due during an attempt waits
//!   for it; every migration harvest is checked against the guests'
//!   ledgers like any round). A harvest by someone else on the same VM
//!   during an attempt ([`vm::VmMemory::harvest_fresh`], `Vm::harvest_dirty`)
//!   would take bits the attempt needs: nothing prevents it.

pub mod devices;
mod error;
pub mod fake;
pub mod priority;
mod source;
mod target;
pub mod vm;
pub mod wire;

pub use error::{CorruptKind, HostError, MigrationError};
pub use source::{MigrationSummary, Progress, SourceConfig, SourceTimings, migrate, migrate_tcp};
pub use target::{TargetConfig, TargetSummary, TargetTimings, receive, receive_tcp};

use serde::{Deserialize, Serialize};

/// The page size of the stream: every range, page record and bitmap bit is
/// in units of 4 KiB.
pub const PAGE_SIZE: u64 = 4096;

/// What a range of guest-physical memory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RangeKind {
    /// System memory (guest RAM).
    Ram,
    /// Device memory (a boot ROM, a framebuffer).
    Device,
}

/// A range of guest-physical memory to migrate: page-aligned, non-empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemRange {
    /// Guest-physical address of the first byte (page-aligned).
    pub gpa: u64,
    /// Length in bytes (a non-zero multiple of the page size).
    pub len: u64,
    /// What the range holds.
    pub kind: RangeKind,
}

impl MemRange {
    /// The number of pages in the range.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// The number of `u64` words of a bitmap with one bit per page.
    pub fn bitmap_words(&self) -> usize {
        usize::try_from(self.pages().div_ceil(64)).unwrap_or(usize::MAX)
    }

    /// Whether `gpa` lies in the range.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
    }
}

/// The memory layout of a VM: its ranges, sorted by address, disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    /// The ranges, in increasing address order, not overlapping.
    pub ranges: Vec<MemRange>,
}

impl Layout {
    /// The total number of bytes in the layout.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().fold(0u64, |a, r| a.saturating_add(r.len))
    }

    /// Check that the ranges are page-aligned, non-empty, sorted, disjoint
    /// and do not wrap; `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let mut end = 0u64;
        for (i, r) in self.ranges.iter().enumerate() {
            if r.len == 0 || r.gpa % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
                return Err(format!("range {i} ({:#x}+{:#x}) is empty or not page-aligned", r.gpa, r.len));
            }
            let Some(e) = r.gpa.checked_add(r.len) else {
                return Err(format!("range {i} ({:#x}+{:#x}) wraps", r.gpa, r.len));
            };
            if i > 0 && r.gpa < end {
                return Err(format!("range {i} ({:#x}) overlaps or is out of order", r.gpa));
            }
            end = e;
        }
        Ok(())
    }

    /// The index of the range holding `gpa`, and the page index in it.
    pub fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        let i = self.ranges.partition_point(|r| r.gpa.saturating_add(r.len) <= gpa);
        let r = self.ranges.get(i)?;
        r.contains(gpa).then(|| (i, (gpa - r.gpa) / PAGE_SIZE))
    }
}

/// What a state blob holds. The engine carries blobs opaquely; the kind
/// and instance let the target route each to its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StateKind {
    /// One vCPU's state (registers, MSRs, LAPIC); the instance is its index.
    Vcpu,
    /// One device's state; the instance identifies the device.
    Device,
    /// The VM's layout beyond memory ranges (segments, aliases, names).
    VmLayout,
    /// Anything else, by a code the two sides agree on.
    Other(u16),
}

impl StateKind {
    /// The wire code of the kind.
    pub fn code(self) -> u32 {
        match self {
            StateKind::Vcpu => 1,
            StateKind::Device => 2,
            StateKind::VmLayout => 3,
            StateKind::Other(c) => 0x1_0000 | u32::from(c),
        }
    }

    /// The kind of a wire code, `None` for an unknown one.
    pub fn from_code(code: u32) -> Option<StateKind> {
        match code {
            1 => Some(StateKind::Vcpu),
            2 => Some(StateKind::Device),
            3 => Some(StateKind::VmLayout),
            c if c >> 16 == 1 => Some(StateKind::Other((c & 0xffff) as u16)),
            _ => None,
        }
    }
}

/// One opaque state blob collected at pause and applied on the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBlob {
    /// What the blob holds.
    pub kind: StateKind,
    /// Which one of its kind (a vCPU index, a device id).
    pub instance: u32,
    /// The bytes, at most [`wire::MAX_STATE_BLOB`].
    pub data: Vec<u8>,
}

/// The running VM on the source host, as the engine sees it.
///
/// Bitmaps have one bit per page of a range: bit `i % 64` of word `i / 64`
/// is the page at `range.gpa + i * PAGE_SIZE`; a bitmap passed in has
/// exactly [`MemRange::bitmap_words`] words and bits past the range's end
/// are zero (the engine never sets them; an implementation must not either).
/// Errors are [`HostError`]s; the engine turns them into
/// [`MigrationError::Source`] after its own clean-up.
pub trait MigrationSource {
    /// The ranges of guest-physical memory to migrate. Called once per
    /// attempt, before anything else; must not change during the attempt.
    fn layout(&self) -> Layout;

    /// Set in `bitmap` (overwriting it) every page of `range` that must be
    /// sent to a fresh target: every page whose contents may differ from
    /// zero and every page received by a migration in and not sent since.
    /// A page never touched may be left out (it is not sent at all). A
    /// source may answer with its dirty log read without clearing it
    /// (bhyve's `GET_DIRTY` on a VM that never reset it); the engine
    /// harvests after this call and sends the union, so such a source loses
    /// nothing as long as failed attempts put their bits back.
    fn resident(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError>;

    /// Copy the page at `gpa` (page-aligned, inside the layout) into `buf`
    /// (exactly one page). The read must see every write whose dirty bit
    /// an earlier [`harvest`](Self::harvest) cleared.
    fn read_page(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError>;

    /// Copy the pages from `gpa` (page-aligned; `buf` is a whole number of
    /// pages, all in one range of the layout) into `buf`, under the same
    /// rule as [`read_page`](Self::read_page). The engine reads each run of
    /// consecutive dirty pages with one call (at most
    /// [`wire::MAX_RUN_PAGES`]); the default calls `read_page` for each
    /// page, a source that can copy a run at once (one lock, one copy)
    /// should.
    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE as usize).enumerate() {
            self.read_page(gpa + i as u64 * PAGE_SIZE, page)?;
        }
        Ok(())
    }

    /// Which of the `n` pages from `gpa` (`n` from 1 to 64, all in one
    /// range of the layout) read as zero now, found in place, without
    /// copying them out: bit `i` of the mask is the page at
    /// `gpa + i * PAGE_SIZE`. `None` (the default) when the source cannot
    /// tell without a copy: the engine then copies every page and checks
    /// the copies.
    ///
    /// The engine asks after the harvest that reported the pages and sends
    /// the pages found zero as a zero record without reading them, so the
    /// check must see every write whose dirty bit an earlier
    /// [`harvest`](Self::harvest) cleared (as
    /// [`read_page`](Self::read_page) must). A guest write that lands
    /// after the check sets the page's dirty bit again (the harvest cleared
    /// it before the check), so the page goes again in a later round, as a
    /// write after a copy does.
    fn zero_mask(&mut self, gpa: u64, n: usize) -> Result<Option<u64>, HostError> {
        let _ = (gpa, n);
        Ok(None)
    }

    /// Read and clear the dirty bits of `range` into `bitmap` (overwriting
    /// it), atomically per page: a write that races the harvest either is
    /// reported now (and visible to a following `read_page`) or leaves its
    /// bit set for the next harvest. Writes by the VMM and devices count.
    fn harvest(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError>;

    /// Set the dirty bit of every page set in `bitmap` (bhyve's
    /// `SET_DIRTY`): used when an attempt fails, so that the bits it
    /// harvested are seen again by the next harvest. Must not fail for a
    /// page that a harvest of this range reported.
    fn set_dirty(&mut self, range: &MemRange, bitmap: &[u64]) -> Result<(), HostError>;

    /// Stop every vCPU and wait until none runs; after it returns, memory
    /// changes only through the engine's own calls. Device emulation that
    /// writes memory must be quiesced too.
    fn pause(&mut self) -> Result<(), HostError>;

    /// Let the vCPUs run again after [`pause`](Self::pause) (on failure).
    fn resume(&mut self) -> Result<(), HostError>;

    /// Slow the vCPUs down to run at most `100 - pct` percent of the time
    /// (`pct` in 0..=99; 0 lifts the throttle). Used by auto-converge only;
    /// the default refuses, which makes auto-converge a no-op that is
    /// reported in the summary.
    fn throttle(&mut self, pct: u8) -> Result<(), HostError> {
        let _ = pct;
        Err(HostError::new("throttle", "not supported"))
    }

    /// Collect the state blobs (vCPUs, devices, VM layout) of the paused
    /// VM. Called once, after [`pause`](Self::pause).
    fn state(&mut self) -> Result<Vec<StateBlob>, HostError>;
}

/// The VM being built on the target host, as the engine sees it.
///
/// Every call but [`prepare`](Self::prepare) comes after a successful
/// `prepare`; after [`discard`](Self::discard) or [`resume`](Self::resume)
/// the attempt is over.
pub trait MigrationTarget {
    /// Set up memory for `layout` (already validated: page-aligned, sorted,
    /// disjoint); afterwards every page of it reads as zero. Refuse (`Err`,
    /// with the reason) a layout this VM cannot take — the engine sends the
    /// refusal to the source as a layout mismatch.
    fn prepare(&mut self, layout: &Layout) -> Result<(), HostError>;

    /// Write one page (`data` is exactly one page) at `gpa`, page-aligned
    /// and inside the prepared layout (the engine checks both). A page may
    /// be written several times; the last write wins.
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), HostError>;

    /// Write the pages of `data` (a whole number of pages, all in one range
    /// of the prepared layout, checked by the engine) from `gpa`, as a page
    /// record carries them; the default calls
    /// [`write_page`](Self::write_page) for each.
    fn write_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), HostError> {
        for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
            self.write_page(gpa + i as u64 * PAGE_SIZE, page)?;
        }
        Ok(())
    }

    /// Receive the page run of `len` bytes at `gpa` (a whole number of
    /// pages, all in one range of the prepared layout, checked by the
    /// engine) in place: call `recv` once with the host memory the pages
    /// occupy ([`RawDest`]s covering the run in address order, `len` bytes
    /// in all), into which the engine reads the record's payload straight
    /// from the connection and then verifies its checksum there; return
    /// `Ok(true)`. Return `Ok(false)` without calling `recv` where the run
    /// cannot be received in place (the default: the engine then reads the
    /// payload into its buffer and calls
    /// [`write_pages`](Self::write_pages)).
    ///
    /// Once `recv` was called the pages count as written by the attempt
    /// even if it failed (their bytes may be partial or fail the checksum):
    /// the attempt then fails, and [`discard`](Self::discard) must throw
    /// them away. Only [`receive_tcp`] receives in place (it has the
    /// socket's descriptor); [`receive`] over any reader never calls this.
    fn receive_pages(&mut self, gpa: u64, len: usize, recv: &mut dyn FnMut(&[RawDest])) -> Result<bool, HostError> {
        let _ = (gpa, len, recv);
        Ok(false)
    }

    /// Make the page at `gpa` read as zero (it may have been written by an
    /// earlier round).
    fn zero_page(&mut self, gpa: u64) -> Result<(), HostError>;

    /// Make `count` pages from `gpa` read as zero; the default calls
    /// [`zero_page`](Self::zero_page) for each.
    fn zero_pages(&mut self, gpa: u64, count: u64) -> Result<(), HostError> {
        for i in 0..count {
            self.zero_page(gpa + i * PAGE_SIZE)?;
        }
        Ok(())
    }

    /// Record that the pages set in `bitmap` of `range` were received, so
    /// that this VM, migrated on, sends them even if its guest never
    /// touches them: they must appear in its
    /// [`MigrationSource::resident`] (or dirty log) until it is migrated out
    /// successfully (propolis 232). Called once per range before
    /// [`resume`](Self::resume).
    fn mark_received(&mut self, range: &MemRange, bitmap: &[u64]) -> Result<(), HostError>;

    /// Apply the state blobs from the source, in the order they came.
    fn apply_state(&mut self, blobs: Vec<StateBlob>) -> Result<(), HostError>;

    /// Start the vCPUs; the VM now runs here.
    fn resume(&mut self) -> Result<(), HostError>;

    /// Throw away everything this attempt set up (memory, state); called on
    /// any failure after `prepare`. Must not fail.
    fn discard(&mut self);
}

/// A piece of host memory that a page run is received into in place
/// ([`MigrationTarget::receive_pages`]): `len` bytes at a raw address.
/// The engine only ever copies into it with raw pointer writes and the
/// kernel (`readv`), and reads it back to verify the checksum; it never
/// forms a mutable reference over it.
#[derive(Clone, Copy, Debug)]
pub struct RawDest {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl RawDest {
    /// A destination of `len` bytes at `ptr` (`None` for a null `ptr`).
    ///
    /// # Safety
    ///
    /// For as long as the `recv` call it is handed to runs, the `len`
    /// bytes at `ptr` must be valid for reads and writes, lie inside one
    /// live allocation or mapping, not overlap another destination of the
    /// same call, and be neither referenced by a Rust reference nor written
    /// by anyone else (no vCPU runs on a target being received into;
    /// the engine reads the bytes back as a shared slice to check them).
    #[allow(unsafe_code)]
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Option<RawDest> {
        std::ptr::NonNull::new(ptr).map(|ptr| RawDest { ptr, len })
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// CPU time the calling thread has used so far
/// (`CLOCK_THREAD_CPUTIME_ID`; zero where it cannot be read). The timings
/// report it so that a run on a loaded host can be judged by the work done
/// rather than by the wall time it was given.
#[allow(unsafe_code)]
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `clock_gettime` writes one `timespec` through a pointer to a
    // live local.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 || ts.tv_sec < 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// One bitmap per range, all zero.
pub(crate) fn empty_bitmaps(layout: &Layout) -> Vec<Vec<u64>> {
    layout.ranges.iter().map(|r| vec![0u64; r.bitmap_words()]).collect()
}

/// Clear the bits of `bitmap` past `pages`.
pub(crate) fn trim_bitmap(bitmap: &mut [u64], pages: u64) {
    let full = usize::try_from(pages / 64).unwrap_or(usize::MAX);
    let rem = pages % 64;
    if let Some(w) = bitmap.get_mut(full) {
        *w &= if rem == 0 { 0 } else { (1u64 << rem) - 1 };
        for w in bitmap.iter_mut().skip(full + 1) {
            *w = 0;
        }
    }
}
