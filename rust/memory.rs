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

/// `len` zero values from zeroed memory of the allocator: large ones come as
/// untouched pages, so memory is only used as the buffer fills (the KV cache,
/// whose positions fill as a sequence grows).
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
    }
}
