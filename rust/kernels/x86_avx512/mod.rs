//! x86-64 AVX-512 routines: the ternary matmuls, in a VNNI and a non-VNNI
//! build of each, the VNNI output-head dots of several tokens, and the VNNI
//! attention over a q8_0 cache. The other head dots, the other attention
//! and the half conversions have no AVX-512 version; the AVX-512 paths run
//! the AVX2 ones.

pub mod attention;
pub mod head;
pub mod ternary;
pub mod tl;
pub mod tq1;
