//! Errors of the VM layer. Every refused operation changes nothing.

use std::fmt;

/// Why a name was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BadName {
    /// The empty string.
    Empty,
    /// Longer than [`MAX_NAME`](crate::devmem::MAX_NAME) bytes.
    TooLong,
    /// A byte other than ASCII letters, digits, `.`, `_`, `-`, or the
    /// names `.` and `..`.
    Characters,
}

/// Errors of this crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// No segment has this id (`ENOENT`/`EINVAL` in bhyve).
    UnknownSegment(u32),
    /// A segment with this id exists already (`EEXIST`).
    DuplicateSegment(u32),
    /// The id is beyond [`MAX_SEGMENTS`](crate::MAX_SEGMENTS).
    BadSegmentId(u32),
    /// A length of zero, not a multiple of 4 KiB, or too large.
    BadLength,
    /// An address or offset that is not a multiple of 4 KiB.
    Unaligned,
    /// Address or offset plus length overflows.
    Overflow,
    /// The range runs past the end of the segment.
    OutsideSegment,
    /// The range overlaps a mapping, or lies beyond the guest-physical
    /// space.
    NoSpace,
    /// No mapping starts at this address with this length.
    NotMapped,
    /// The segment is still mapped, so it cannot be freed.
    SegmentMapped(u32),
    /// A protection the segment kind does not allow (device memory is
    /// read-only or read-write, never executable; none at all is refused).
    BadProt,
    /// A device-memory name that is empty, too long or has bad characters.
    BadName(BadName),
    /// Another segment of this VM already has the name.
    NameInUse,
    /// A VM name that is empty, too long or has bad characters.
    BadVmName(BadName),
    /// A live VM already uses this name.
    VmNameInUse,
    /// No node of that VM and segment name exists.
    NoSuchNode,
    /// A write through a view opened read-only.
    ReadOnlyView,
    /// The address space refused (reservoir full, table pages...).
    Space(vmspace::Error),
    /// A host call failed: what, its kind and errno.
    Io(&'static str, std::io::ErrorKind, Option<i32>),
    /// The backend could not expose device memory to the hypervisor.
    Backend(String),
}

impl From<vmspace::Error> for Error {
    fn from(e: vmspace::Error) -> Self {
        Error::Space(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownSegment(id) => write!(f, "no memory segment {id}"),
            Error::DuplicateSegment(id) => write!(f, "memory segment {id} exists already"),
            Error::BadSegmentId(id) => write!(f, "segment id {id} out of range (0..{})", crate::MAX_SEGMENTS),
            Error::BadLength => f.write_str("length must be a non-zero multiple of 4 KiB"),
            Error::Unaligned => f.write_str("address or offset not a multiple of 4 KiB"),
            Error::Overflow => f.write_str("address or offset plus length overflows"),
            Error::OutsideSegment => f.write_str("range runs past the end of the segment"),
            Error::NoSpace => f.write_str("range overlaps a mapping or lies beyond the guest-physical space"),
            Error::NotMapped => f.write_str("no mapping with this address and length"),
            Error::SegmentMapped(id) => write!(f, "memory segment {id} is still mapped"),
            Error::BadProt => f.write_str("protection not allowed for this segment kind"),
            Error::BadName(b) => write!(f, "bad device-memory name: {b:?}"),
            Error::NameInUse => f.write_str("device-memory name already used"),
            Error::BadVmName(b) => write!(f, "bad VM name: {b:?}"),
            Error::VmNameInUse => f.write_str("a running VM already has this name"),
            Error::NoSuchNode => f.write_str("no such VM or device-memory segment"),
            Error::ReadOnlyView => f.write_str("the view is read-only"),
            Error::Space(e) => write!(f, "address space: {e}"),
            Error::Io(what, kind, errno) => match errno {
                Some(n) => write!(f, "{what}: {kind} (errno {n})"),
                None => write!(f, "{what}: {kind}"),
            },
            Error::Backend(s) => write!(f, "backend: {s}"),
        }
    }
}

impl std::error::Error for Error {}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
