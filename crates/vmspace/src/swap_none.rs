//! Without `std` there is no swap file, so no object is swappable: the
//! hooks the data path and the harvest call find nothing to do.

use nested_pt::TablePages;

use crate::error::Result;
use crate::space::{Data, DirtyOp, Inner};
use crate::sync::RawLock;

/// The swap state of a swappable object: uninhabited without `std`.
pub(crate) enum Swap {}

impl Swap {
    /// Never called: no value exists.
    pub(crate) fn ensure_resident(&self, _page: u64) -> Result<()> {
        match *self {}
    }

    /// Never called: no value exists.
    pub(crate) fn read(&self, _size: u64, _offset: u64, _dst: &mut [u8]) -> Result<()> {
        match *self {}
    }

    /// Never called: no value exists.
    pub(crate) fn write(&self, _size: u64, _offset: u64, _src: &[u8]) -> Result<()> {
        match *self {}
    }
}

impl<P: TablePages, L: RawLock> Inner<P, L> {
    /// Nothing can be reclaimed: a data-path operation that found the
    /// reservoir full fails with it.
    pub(crate) fn reclaim_after_full(&self, _tries: &mut u32) -> bool {
        false
    }
}

/// No swapped-dirty state exists: nothing is merged.
pub(crate) fn merge_dirty<P: TablePages>(
    _d: &Data<P>,
    _op: DirtyOp,
    _gpa: u64,
    _len: u64,
    _sel: Option<&[u64]>,
    _out: &mut [u64],
) -> u64 {
    0
}
