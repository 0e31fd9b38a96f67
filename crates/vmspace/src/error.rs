//! Typed errors. Every fallible operation of the crate reports one of these;
//! none of them panics on a value that came from a caller or a guest.

use core::fmt;

/// Why an argument was refused (the `EINVAL` family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Invalid {
    /// A length of zero.
    ZeroLength,
    /// An address, offset or length that is not a multiple of 4 KiB.
    Unaligned,
    /// `address + length` (or `offset + length`) does not fit in 64 bits.
    Overflow,
    /// The range extends beyond the end of the object.
    OutsideObject,
    /// A protection the operation or the table format cannot express
    /// (empty, execute-only hold, write without read on EPT, ...).
    BadProt,
    /// A bitmap too short for the range it describes.
    BitmapTooSmall,
    /// An offset/length inside a held page (or chain) that runs past its end.
    OutsideHold,
    /// A size of zero, unaligned, or too large for the provider.
    BadSize,
    /// `table_enter` on a client that is already in guest context.
    OnCpu,
    /// The object range has a frame the table format cannot express (at or
    /// above [`PteFormat::frame_limit`](nested_pt::PteFormat::frame_limit):
    /// beyond the format's physical-address width).
    FrameOutOfRange,
}

/// Why a range could not be placed in the space (the `ENOMEM` of seed 004).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoSpace {
    /// The range ends at or beyond the size of the space.
    BeyondEnd,
    /// The range overlaps an existing mapping.
    Overlap,
}

/// Errors of this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// An argument was refused; nothing changed.
    Invalid(Invalid),
    /// `address + length` overflows (dirty-bitmap operations; `EOVERFLOW`).
    Overflow,
    /// The range does not fit in the space.
    NoSpace(NoSpace),
    /// No mapping matches the range exactly (unmap) or contains it (populate).
    NotFound,
    /// Fault/hold: no mapping covers the address (`FC_NOMAP`).
    NoMapping,
    /// Fault/hold: a mapping exists but does not allow the access (`FC_PROT`).
    Protection,
    /// Dirty tracking is off for this space (`EPERM`).
    NotPermitted,
    /// The table format cannot do what was asked (e.g. track dirty bits).
    Unsupported,
    /// The client's space has been destroyed (`ENXIO`).
    Orphaned,
    /// The host-memory provider has no room left under its limit (`ENOSPC`).
    ReservoirFull,
    /// The page has no host view (an MMIO object created without one).
    NoHostView,
    /// An operating-system call failed; the `errno` value.
    Os(i32),
    /// The nested table refused an operation this crate did not expect to
    /// fail (out of table pages, most likely).
    Table(nested_pt::Error),
    /// An administrative change that waits for vCPUs to leave guest
    /// context (unmap, dirty operations, tracking switch) was asked by a
    /// thread that is itself in guest context on a client of the same
    /// space (it holds an [`OnCpu`](crate::OnCpu) guard): it would wait
    /// for itself forever. Nothing changed. Detected with the `std`
    /// feature only.
    SelfDeadlock,
    /// A protection change that removes a right was refused: a page hold
    /// is outstanding on the range (the holder accesses the page through
    /// the host, which no table entry can stop). Nothing changed.
    Held,
    /// Promotion was refused: dirty tracking is on (a harvest reports
    /// 4 KiB pages; large leaves are split while it is on). Nothing
    /// changed.
    TrackingOn,
}

impl From<Invalid> for Error {
    fn from(i: Invalid) -> Self {
        Error::Invalid(i)
    }
}

impl From<NoSpace> for Error {
    fn from(n: NoSpace) -> Self {
        Error::NoSpace(n)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid(i) => write!(f, "invalid argument: {i:?}"),
            Error::Overflow => f.write_str("address range overflows"),
            Error::NoSpace(n) => write!(f, "no space: {n:?}"),
            Error::NotFound => f.write_str("no matching mapping"),
            Error::NoMapping => f.write_str("no mapping at address"),
            Error::Protection => f.write_str("access not permitted by mapping"),
            Error::NotPermitted => f.write_str("dirty tracking is off"),
            Error::Unsupported => f.write_str("not supported by the table format"),
            Error::Orphaned => f.write_str("client orphaned: its space is gone"),
            Error::ReservoirFull => f.write_str("reservoir limit reached"),
            Error::NoHostView => f.write_str("object has no host view"),
            Error::Os(e) => write!(f, "os error {e}"),
            Error::Table(e) => write!(f, "nested table: {e:?}"),
            Error::Held => f.write_str("a page hold is outstanding on the range"),
            Error::TrackingOn => f.write_str("dirty tracking is on"),
            Error::SelfDeadlock => {
                f.write_str("change asked from guest context on the same space: would wait for itself")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// Result alias of this crate.
pub type Result<T> = core::result::Result<T, Error>;
