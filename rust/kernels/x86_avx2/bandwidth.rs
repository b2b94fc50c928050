//! The read-bandwidth probe's sum (see `crate::bandwidth::sum_words`).

use std::arch::x86_64::*;

use crate::kernels::counts::{self, Isa};

/// Σ words (wrapping) with four 32-byte accumulators: enough loads per cycle
/// that one core's figure is the memory's, not the loop's.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn sum_words(words: &[u64]) -> u64 {
    counts::enter(Isa::Avx2);
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut chunks = words.chunks_exact(16);
    for c in &mut chunks {
        for (l, a) in acc.iter_mut().enumerate() {
            // SAFETY: the chunk holds 16 words, 4 per lane group.
            let v = unsafe { _mm256_loadu_si256(c.as_ptr().add(4 * l).cast()) };
            *a = _mm256_add_epi64(*a, v);
        }
    }
    let total = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` holds 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(0u64, |acc, &w| acc.wrapping_add(w))
}
