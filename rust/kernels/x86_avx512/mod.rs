//! x86-64 AVX-512 routines: the ternary matmuls, in a VNNI and a non-VNNI
//! build of each, and the VNNI output-head dots of several tokens. The
//! other head dots, attention and half conversions have no AVX-512 version;
//! the AVX-512 paths run the AVX2 ones.

pub mod head;
pub mod ternary;
pub mod tq1;
