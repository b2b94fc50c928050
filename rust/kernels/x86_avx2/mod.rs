//! x86-64 AVX2 routines (with FMA and F16C where they need them). They run
//! under `Kernel::Avx2` and, where AVX-512 has no version of its own, under
//! the AVX-512 paths.

pub mod attention;
pub mod bandwidth;
pub mod half;
pub mod head;
pub mod q8_0;
pub mod ternary;
pub mod tq1;
