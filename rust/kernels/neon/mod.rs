//! aarch64 Advanced SIMD routines: the ternary matmuls and the int8 head
//! dots. bf16 head dots, attention and half conversions have no Neon
//! version yet; the Neon path runs the scalar ones.

pub mod head;
pub mod ternary;
pub mod tq1;
