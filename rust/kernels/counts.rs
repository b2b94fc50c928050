//! Calls into each instruction set's routines, counted at every SIMD entry
//! point when the `simd-call-counts` feature is on (off by default: then
//! `enter` is empty and the hot loops pay nothing). A test uses the counts to
//! prove that `Kernel::Scalar` runs no SIMD routine anywhere, and that every
//! other path runs its own.

/// The instruction sets that have routines of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// x86-64 AVX2 (with FMA and F16C where a routine needs them).
    Avx2,
    /// x86-64 AVX-512 F and BW, without VNNI.
    Avx512Bw,
    /// x86-64 AVX-512 F, BW and VNNI.
    Avx512Vnni,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx2, Isa::Avx512Bw, Isa::Avx512Vnni, Isa::Neon];

    /// The instruction set an AVX-512 routine counts under on `kernel`'s path:
    /// VNNI on `Kernel::Avx512Vnni`, BW on the other AVX-512 path.
    pub fn avx512_of(kernel: super::Kernel) -> Isa {
        if kernel == super::Kernel::Avx512Vnni {
            Isa::Avx512Vnni
        } else {
            Isa::Avx512Bw
        }
    }
}

#[cfg(feature = "simd-call-counts")]
static CALLS: [std::sync::atomic::AtomicU64; 4] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4];

/// Records one call of a routine of `isa` (nothing without the feature).
#[inline(always)]
pub(crate) fn enter(isa: Isa) {
    #[cfg(feature = "simd-call-counts")]
    CALLS[isa as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "simd-call-counts"))]
    let _ = isa;
}

/// Calls of `isa`'s routines so far in this process.
#[cfg(feature = "simd-call-counts")]
pub fn calls(isa: Isa) -> u64 {
    CALLS[isa as usize].load(std::sync::atomic::Ordering::Relaxed)
}
