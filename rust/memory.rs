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
