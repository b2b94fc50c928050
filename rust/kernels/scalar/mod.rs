//! The scalar definitions every SIMD routine must match, and the path
//! `Kernel::Scalar` runs: no SIMD instruction beyond the target's baseline.

pub mod attention;
pub mod half;
pub mod head;
pub mod q8_0;
pub mod ternary;
pub mod tl;
pub mod tq1;
