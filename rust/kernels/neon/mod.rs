//! aarch64 Advanced SIMD routines: the ternary matmuls. Head dots,
//! attention and half conversions have no Neon version yet; the Neon path
//! runs the scalar ones.

pub mod ternary;
