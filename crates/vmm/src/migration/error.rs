//! Typed errors of the migration engine and its stream.

use std::fmt;
use std::io;

/// A failure of a source or target implementation (a VM operation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError {
    /// The operation that failed (`"read_page"`, `"prepare"`, ...).
    pub op: &'static str,
    /// What went wrong.
    pub message: String,
}

impl HostError {
    /// A failure of `op` with `message`.
    pub fn new(op: &'static str, message: impl Into<String>) -> HostError {
        HostError { op, message: message.into() }
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.message)
    }
}

impl std::error::Error for HostError {}

/// How a record was found corrupt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorruptKind {
    /// The CRC of a record or of the header did not match.
    BadChecksum {
        /// The record tag (0 for the stream header).
        tag: u8,
        /// The CRC the record carried.
        carried: u32,
        /// The CRC of what arrived.
        computed: u32,
    },
    /// A record tag this version does not know.
    UnknownType(u8),
    /// A length out of bounds for the record type.
    BadLength {
        /// The record tag (0 for the stream header).
        tag: u8,
        /// The length the record carried.
        len: u64,
    },
    /// Reserved header bytes were not zero.
    Reserved,
    /// A page address that is unaligned or outside the layout, or a run of
    /// zero pages that leaves its range.
    BadAddress {
        /// The address the record carried.
        gpa: u64,
        /// The page count (1 for a page record).
        count: u64,
    },
    /// The stream did not open with the magic bytes.
    BadMagic,
    /// A header body that does not parse (or a layout that is not sorted,
    /// aligned and disjoint).
    BadHeader(String),
    /// A state blob of a kind this version does not know.
    UnknownStateKind(u32),
    /// A record where the protocol does not allow it (a page after the
    /// end, an ack from the source).
    Unexpected(&'static str),
    /// The end record's page count did not match the pages received.
    CountMismatch {
        /// The count the end record carried.
        carried: u64,
        /// The pages received.
        received: u64,
    },
}

impl fmt::Display for CorruptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorruptKind::BadChecksum { tag, carried, computed } => {
                write!(f, "bad checksum on record type {tag}: carried {carried:#010x}, computed {computed:#010x}")
            }
            CorruptKind::UnknownType(t) => write!(f, "unknown record type {t}"),
            CorruptKind::BadLength { tag, len } => write!(f, "bad length {len} for record type {tag}"),
            CorruptKind::Reserved => write!(f, "reserved bytes not zero"),
            CorruptKind::BadAddress { gpa, count } => write!(f, "bad page address {gpa:#x} (count {count})"),
            CorruptKind::BadMagic => write!(f, "not a migration stream (bad magic)"),
            CorruptKind::BadHeader(m) => write!(f, "bad stream header: {m}"),
            CorruptKind::UnknownStateKind(k) => write!(f, "unknown state kind {k:#x}"),
            CorruptKind::Unexpected(m) => write!(f, "unexpected record: {m}"),
            CorruptKind::CountMismatch { carried, received } => {
                write!(f, "end record says {carried} pages, received {received}")
            }
        }
    }
}

/// Why a migration attempt failed. On the source, every error comes after
/// the clean-up: vCPUs resumed, throttle lifted, dirty bits put back.
#[derive(Debug)]
pub enum MigrationError {
    /// The peer speaks another stream version.
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The peer uses another page size.
    PageSizeMismatch {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The target refused the layout (the reason is the target's).
    LayoutMismatch(String),
    /// The target refused the attempt for another reason (it failed to
    /// write a page, apply the state, resume).
    Refused(String),
    /// The source sent an abort record (the reason is the source's).
    Aborted(String),
    /// The stream ended in the middle of a record or header.
    Truncated {
        /// What was being read.
        during: &'static str,
        /// Bytes expected.
        expected: usize,
        /// Bytes that came before the end.
        got: usize,
    },
    /// The peer closed the connection at a record boundary where more was
    /// expected (the peer went away).
    PeerClosed {
        /// What was being waited for.
        during: &'static str,
    },
    /// A corrupt record or header.
    Corrupt(CorruptKind),
    /// An I/O error on the connection (reset, broken pipe, timeout).
    Io {
        /// What was being done.
        during: &'static str,
        /// The error.
        error: io::Error,
    },
    /// The source VM failed an operation.
    Source(HostError),
    /// The target VM failed an operation.
    Target(HostError),
    /// A bad argument (an invalid layout from the source, a bad config).
    Invalid(String),
}

impl MigrationError {
    /// Whether the error means the peer went away (closed, reset, broken
    /// pipe, truncated stream).
    pub fn is_peer_gone(&self) -> bool {
        match self {
            MigrationError::Truncated { .. } | MigrationError::PeerClosed { .. } => true,
            MigrationError::Io { error, .. } => matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::NotConnected
            ),
            _ => false,
        }
    }
}

impl fmt::Display for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationError::VersionMismatch { ours, theirs } => {
                write!(f, "stream version mismatch: ours {ours}, peer's {theirs}")
            }
            MigrationError::PageSizeMismatch { ours, theirs } => {
                write!(f, "page size mismatch: ours {ours}, peer's {theirs}")
            }
            MigrationError::LayoutMismatch(m) => write!(f, "target refused the layout: {m}"),
            MigrationError::Refused(m) => write!(f, "target refused: {m}"),
            MigrationError::Aborted(m) => write!(f, "source aborted: {m}"),
            MigrationError::Truncated { during, expected, got } => {
                write!(f, "stream truncated during {during}: {got} of {expected} bytes")
            }
            MigrationError::PeerClosed { during } => write!(f, "peer closed the connection during {during}"),
            MigrationError::Corrupt(k) => write!(f, "corrupt stream: {k}"),
            MigrationError::Io { during, error } => write!(f, "I/O error during {during}: {error}"),
            MigrationError::Source(e) => write!(f, "source VM: {e}"),
            MigrationError::Target(e) => write!(f, "target VM: {e}"),
            MigrationError::Invalid(m) => write!(f, "invalid: {m}"),
        }
    }
}

impl std::error::Error for MigrationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrationError::Io { error, .. } => Some(error),
            MigrationError::Source(e) | MigrationError::Target(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for MigrationError {
    fn from(error: io::Error) -> MigrationError {
        MigrationError::Io { during: "send", error }
    }
}
