//! How the operating system backs the engine's large buffers.

/// Asks Linux to back the whole 2 MiB stretches inside `buf` with transparent
/// huge pages (where the system allows them: `madvise` or `always` in
/// /sys/kernel/mm/transparent_hugepage/enabled). Only pages not yet touched
/// are affected; only stretches wholly inside `buf`, so no memory is added.
pub fn advise_huge_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (buf.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_ptr() as usize + std::mem::size_of_val(buf)) / HUGE * HUGE;
        if end > start {
            // A refused advice leaves 4 KiB pages: nothing to handle.
            // SAFETY: [start, end) lies inside `buf`; MADV_HUGEPAGE changes
            // how its pages are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Asks Linux to keep `buf` in 4 KiB pages even where transparent huge pages
/// are on for every mapping (`always`): `ZeroedPages` says why.
fn advise_small_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    if !buf.is_empty() {
        // A refused advice leaves the system's choice: nothing to handle.
        // SAFETY: `buf` is a whole mapping (page-aligned, its length);
        // MADV_NOHUGEPAGE changes how its pages are backed, never their
        // contents.
        unsafe {
            libc::madvise(
                buf.as_ptr() as *mut libc::c_void,
                std::mem::size_of_val(buf),
                libc::MADV_NOHUGEPAGE,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

// ---------------------------------------------------------------- fallible allocation
//
// Every buffer whose size comes from input (a config, a tensor's shape, an
// argument) is allocated here, so that one too large for the machine is an
// error naming it (`TritError::OutOfMemory`, a Python `MemoryError`) rather
// than the abort of `vec!`, and one too large to address is an
// `InvalidInput` error rather than a panic.

use std::alloc::Layout;

use crate::error::{Result, TritError};

/// The error for `len` elements of `T` that cannot be had.
fn refused<T>(what: &str, len: usize) -> TritError {
    match len.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) if isize::try_from(bytes).is_ok() => TritError::out_of_memory(what, bytes),
        _ => TritError::invalid(format!(
            "{what}: {len} elements of {} bytes are more than this machine can address",
            std::mem::size_of::<T>()
        )),
    }
}

/// Makes room in `v` for `len` elements in all (nothing if it has it).
pub fn try_reserve_total<T>(v: &mut Vec<T>, len: usize, what: &str) -> Result<()> {
    let extra = len.saturating_sub(v.len());
    v.try_reserve_exact(extra)
        .map_err(|_| refused::<T>(what, len))
}

/// `len` copies of `value`, as `vec![value; len]`, for buffers that are
/// written in full anyway (it touches every page).
pub fn try_filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_reserve_total(&mut v, len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// Types for which every byte zero is a valid value (0, 0.0).
///
/// # Safety
/// The all-zero bit pattern must be a value of the type, and the type must
/// not be zero-sized.
pub unsafe trait ZeroBits: Copy {}

// SAFETY: all-zero bits are the integer 0 / the float +0.0; none is zero-sized.
unsafe impl ZeroBits for u8 {}
// SAFETY: as above.
unsafe impl ZeroBits for i8 {}
// SAFETY: as above.
unsafe impl ZeroBits for u16 {}
// SAFETY: as above.
unsafe impl ZeroBits for f32 {}
// SAFETY: F16 is a transparent u16 (zero bits: +0.0 in half precision).
unsafe impl ZeroBits for crate::kernels::half::F16 {}

/// `len` zero values from zeroed memory of the allocator: large ones of
/// types aligned to at most 16 bytes come as untouched pages (`calloc`), so
/// memory is only used as the buffer fills; see `ZeroedPages` for a buffer
/// that fills slowly.
pub fn try_zeroed<T: ZeroBits>(len: usize, what: &str) -> Result<Vec<T>> {
    const { assert!(std::mem::size_of::<T>() > 0) };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = Layout::array::<T>(len).map_err(|_| refused::<T>(what, len))?;
    // SAFETY: the layout is not zero-sized: len >= 1 and T is not zero-sized
    // (asserted above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(TritError::out_of_memory(what, layout.size()));
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of
    // [T; len], which is what a Vec of capacity `len` holds; all `len`
    // elements are zero bytes, which `ZeroBits` makes valid values of T.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// A buffer of zero values in a mapping of its own, for the large buffers
/// that fill slowly (the KV cache, whose positions fill as a sequence grows):
/// the system hands out its 4 KiB pages only when they are first written.
/// Never in 2 MiB pages (advised so before any page is touched, even where
/// huge pages are on for everything): a KV cache holds each head's
/// positions one after another, heads a MiB or less apart, so a 2 MiB page
/// spans several heads and a sequence's first token would take the whole
/// cache at once (docs/performance.md, "Generation at depth"). `try_zeroed`
/// gives untouched pages only to types of at most 16 bytes' alignment (the
/// allocator's `calloc`); past that the allocator writes the zeros itself,
/// every page at once. The mapping starts on a page, so any alignment up to
/// 4 KiB holds.
pub struct ZeroedPages<T: ZeroBits> {
    map: memmap2::MmapMut, // [len * size_of::<T>()] bytes (1 when len is 0)
    len: usize,
    _elements: std::marker::PhantomData<T>,
}

impl<T: ZeroBits> ZeroedPages<T> {
    /// `len` zeros; an error naming `what` if they do not fit this machine's
    /// memory or address space.
    pub fn new(len: usize, what: &str) -> Result<Self> {
        const { assert!(std::mem::align_of::<T>() <= 4096) };
        let bytes = Layout::array::<T>(len)
            .map_err(|_| refused::<T>(what, len))?
            .size();
        let map = memmap2::MmapOptions::new()
            .len(bytes.max(1))
            .map_anon()
            .map_err(|_| TritError::out_of_memory(what, bytes))?;
        advise_small_pages(&map[..]);
        Ok(ZeroedPages {
            map,
            len,
            _elements: std::marker::PhantomData,
        })
    }
}

impl<T: ZeroBits> std::ops::Deref for ZeroedPages<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the mapping holds len * size_of::<T>() bytes (checked in
        // `new`), starts on a page (aligned for T, asserted in `new`), and
        // every byte of it is a zero or a value written through `deref_mut`
        // as a T: all valid values of T (`ZeroBits`).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T: ZeroBits> std::ops::DerefMut for ZeroedPages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().cast::<T>(), self.len) }
    }
}

impl<T: ZeroBits> Clone for ZeroedPages<T> {
    /// A copy in pages of its own. Panics as `Vec::clone` does if memory is
    /// out (a clone is for tests and small buffers, never sized by input).
    fn clone(&self) -> Self {
        let mut copy = ZeroedPages::new(self.len, "a copied buffer").expect("memory for a copy");
        copy.copy_from_slice(self);
        copy
    }
}

impl<T: ZeroBits> std::fmt::Debug for ZeroedPages<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ZeroedPages({} × {} bytes)",
            self.len,
            std::mem::size_of::<T>()
        )
    }
}

/// This process's resident memory in bytes (/proc/self/statm), for tests.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_too_large_are_errors_not_aborts() {
        // More than any machine has, but addressable: out of memory.
        let err = try_zeroed::<f32>(1 << 60, "the test buffer").unwrap_err();
        assert!(matches!(err, TritError::OutOfMemory(_)), "{err:?}");
        assert!(err.to_string().contains("for the test buffer"), "{err}");
        let err = try_filled(1usize << 61, 0u8, "the test buffer").unwrap_err();
        assert!(matches!(err, TritError::OutOfMemory(_)), "{err:?}");
        // Not addressable at all: invalid input.
        let err = try_zeroed::<f32>(usize::MAX / 2, "the test buffer").unwrap_err();
        assert!(matches!(err, TritError::InvalidInput(_)), "{err:?}");
        let mut v = vec![1u16; 3];
        assert!(try_reserve_total(&mut v, usize::MAX, "v").is_err());
        try_reserve_total(&mut v, 10, "v").unwrap();
        assert!(v.capacity() >= 10);
    }

    #[test]
    fn zeroed_and_filled_buffers_hold_their_values() {
        assert_eq!(try_zeroed::<f32>(5, "z").unwrap(), [0.0; 5]);
        assert!(try_zeroed::<u8>(0, "z").unwrap().is_empty());
        assert_eq!(try_filled(3, 7i8, "f").unwrap(), [7, 7, 7]);
        let mut pages = ZeroedPages::<f32>::new(5, "z").unwrap();
        assert_eq!(&pages[..], [0.0; 5]);
        pages[4] = 2.0;
        assert_eq!(&pages.clone()[..], [0.0, 0.0, 0.0, 0.0, 2.0]);
        assert!(ZeroedPages::<u8>::new(0, "z").unwrap().is_empty());
    }

    /// The point of `ZeroedPages`: a large buffer of an over-aligned type
    /// costs no memory until written (a Vec from the allocator would be
    /// written whole at once), and then only the stretches written.
    #[cfg(target_os = "linux")]
    #[test]
    fn zeroed_pages_take_memory_only_where_written() {
        #[derive(Clone, Copy)]
        #[repr(C, align(32))]
        struct Block([u8; 544]);
        // SAFETY: a byte array: zero bits are a value; not zero-sized.
        unsafe impl ZeroBits for Block {}
        const MB: usize = 1 << 20;
        let before = resident_bytes();
        let mut blocks = ZeroedPages::<Block>::new(512 * MB / 544, "z").unwrap();
        let untouched = resident_bytes();
        blocks[..16 * MB / 544].fill(Block([1; 544]));
        let written = resident_bytes();
        // Other tests run alongside: allow them some growth.
        assert!(untouched < before + 64 * MB, "{before} -> {untouched}");
        assert!(written < before + 128 * MB, "{before} -> {written}");
        assert!(blocks[..16 * MB / 544].iter().all(|b| b.0 == [1; 544]));
        assert!(blocks[16 * MB / 544..]
            .iter()
            .step_by(997)
            .all(|b| b.0 == [0; 544]));
    }

    #[test]
    fn zeroed_pages_are_aligned_for_their_type_and_refuse_too_much() {
        #[derive(Clone, Copy)]
        #[repr(C, align(64))]
        struct Line([u8; 64]);
        // SAFETY: a byte array: zero bits are a value; not zero-sized.
        unsafe impl ZeroBits for Line {}
        let lines = ZeroedPages::<Line>::new(100, "z").unwrap();
        assert_eq!(lines.as_ptr() as usize % 64, 0);
        assert!(lines.iter().all(|l| l.0 == [0; 64]));
        let err = ZeroedPages::<f32>::new(1 << 60, "the test buffer").unwrap_err();
        assert!(matches!(err, TritError::OutOfMemory(_)), "{err:?}");
        assert!(err.to_string().contains("for the test buffer"), "{err}");
        let err = ZeroedPages::<f32>::new(usize::MAX / 2, "the test buffer").unwrap_err();
        assert!(matches!(err, TritError::InvalidInput(_)), "{err:?}");
    }
}
