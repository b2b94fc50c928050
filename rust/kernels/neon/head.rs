//! Neon output-head dots: int8 and q6 rows times quantized activations,
//! exact (as `scalar::head::int8_dots` and `q6_dots`), the rows read as three streams
//! (`driver::three_streams`) as on x86-64. bf16 rows use the scalar dots.

use std::arch::aarch64::*;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::q6::{
    band_start, blocks_for, row_bytes, Q6Rows, Q6Tokens, CODE_OFFSET, GROUP, GROUP_CODE_BYTES,
    SPAN_GROUPS,
};
use crate::kernels::scalar;

/// `dots[r] = Σ_i rows[r·n + i] · x[i]` for the `dots.len()` consecutive rows
/// of n = x.len() values in `rows`. Products by `smull`/`smlal2`: both sides
/// are symmetric int8 (|a|, |x| <= 127), so a lane holding two products is at
/// most 2 · 127 · 127 = 32258 and fits an i16; `sadalp` widens it at once.
///
/// # Safety
/// The CPU must support Neon.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn int8_dots(rows: &[i8], x: &[i8], dots: &mut [i32]) {
    counts::enter(Isa::Neon);
    assert!(rows.len() >= dots.len() * x.len());
    // SAFETY: this function runs with Neon; `rows` holds dots.len() rows (asserted).
    unsafe { driver::three_streams(&Int8Rows { rows, x }, dots) }
}

struct Int8Rows<'a> {
    rows: &'a [i8], // [>= dots, n]
    x: &'a [i8],    // [n]
}

impl RowDots for Int8Rows<'_> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let n = self.x.len();
        let mut row_slices: [&[i8]; R] = [&[]; R];
        for (s, &r) in row_slices.iter_mut().zip(&rows) {
            *s = &self.rows[r * n..(r + 1) * n];
        }
        let mut dots = [0i32; R];
        // SAFETY: the caller runs the Neon path.
        unsafe { int8_dots_of(&row_slices, self.x, &mut dots) };
        dots
    }
}

/// The dots of R rows of `x.len()` values with `x`, sharing its loads: 32
/// bytes a step, in two independent chains per row.
///
/// # Safety
/// The CPU must support Neon.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn int8_dots_of<const R: usize>(rows: &[&[i8]; R], x: &[i8], dots: &mut [i32; R]) {
    let n = x.len();
    assert!(rows.iter().all(|row| row.len() == n));
    let mut acc = [[vdupq_n_s32(0); 2]; R];
    let mut j = 0;
    while j + 32 <= n {
        for h in 0..2 {
            // SAFETY: j + 16·h + 16 <= n values of x.
            let xv = unsafe { vld1q_s8(x.as_ptr().add(j + 16 * h)) };
            for (acc, row) in acc.iter_mut().zip(rows) {
                // SAFETY: as above, each row holding n values (asserted).
                let av = unsafe { vld1q_s8(row.as_ptr().add(j + 16 * h)) };
                let pairs = vmlal_high_s8(vmull_s8(vget_low_s8(av), vget_low_s8(xv)), av, xv);
                acc[h] = vpadalq_s16(acc[h], pairs);
            }
        }
        j += 32;
    }
    for ((dot, acc), row) in dots.iter_mut().zip(acc).zip(rows) {
        *dot = vaddvq_s32(vaddq_s32(acc[0], acc[1])) + scalar::head::int8_dot(&row[j..], &x[j..]);
    }
}

/// `dots[r]` = the q6 dot of row r with the one token of `x`
/// (`scalar::head::q6_dot`, exactly), for the dots.len() first rows, read as
/// three streams.
///
/// # Safety
/// The CPU must support Neon.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn q6_dots(rows: Q6Rows<'_>, x: Q6Tokens<'_>, dots: &mut [i64]) {
    counts::enter(Isa::Neon);
    assert!(x.len() == 1 && x.groups() == rows.groups() && rows.len() >= dots.len());
    let q6 = Q6RowDots {
        rows,
        x: x.codes(0),
        sums: x.sums(0),
    };
    // SAFETY: this function runs with Neon; `rows` holds dots.len() rows (asserted).
    unsafe { driver::three_streams(&q6, dots) }
}

struct Q6RowDots<'a> {
    rows: Q6Rows<'a>,
    x: &'a [i8],     // [groups · GROUP]
    sums: &'a [i16], // [blocks_for(groups)]
}

impl RowDots for Q6RowDots<'_> {
    type Dot = i64;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i64; R] {
        let mut row_data: [&[u8]; R] = [&[]; R];
        for (d, &r) in row_data.iter_mut().zip(&rows) {
            *d = self.rows.row(r);
        }
        // SAFETY: the caller runs the Neon path.
        unsafe { q6_dots_of(&row_data, self.rows.groups(), self.x, self.sums) }
    }
}

/// The q6 dots of R rows (each `groups` groups) with one token, sharing its
/// loads. `smull`/`smlal` multiply codes (0..63, positive as i8) by
/// activations, the low and the high halves of quarters h and h + 2 apart: a
/// 16-bit lane j then holds columns 16h + j and 32 + 16h + j (or 16h + 8 +
/// j and 40 + 16h + j), two products of one block (`q6::lane_of`), at most
/// 2 · 63 · 128 = 16128; `smlal` by the band's sub-scales (`q6_sub_scales`)
/// widens them into two accumulators of 4 lanes (8 columns a group each).
/// Span by span (`q6::SPAN_GROUPS`), each span's lanes summed into i64.
///
/// # Safety
/// The CPU must support Neon.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q6_dots_of<const R: usize>(
    rows: &[&[u8]; R],
    groups: usize,
    x: &[i8],
    sums: &[i16],
) -> [i64; R] {
    let code_bytes = groups * GROUP_CODE_BYTES;
    assert!(x.len() == groups * GROUP && sums.len() == blocks_for(groups));
    assert!(rows.iter().all(|row| row.len() == row_bytes(groups)));
    let mut dots = [0i64; R];
    for g0 in (0..groups).step_by(SPAN_GROUPS) {
        let g1 = (g0 + SPAN_GROUPS).min(groups);
        let mut acc = [[vdupq_n_s32(0); 2]; R];
        for g in g0..g1 {
            // SAFETY: x holds the groups' 64 values each, and each row the
            // groups' codes, then their sub-scales (asserted lengths).
            unsafe {
                let xp = x.as_ptr().add(g * GROUP);
                let xv = [
                    vld1q_s8(xp),
                    vld1q_s8(xp.add(16)),
                    vld1q_s8(xp.add(32)),
                    vld1q_s8(xp.add(48)),
                ];
                for (acc, row) in acc.iter_mut().zip(rows) {
                    let u = q6_codes(row.as_ptr().add(g * GROUP_CODE_BYTES));
                    let s = q6_sub_scales(row.as_ptr().add(code_bytes + band_start(g)));
                    for (h, acc) in acc.iter_mut().enumerate() {
                        // Quarters h and h + 2: columns 16h.. and 32 + 16h..
                        let (a, b) = (u[h], u[h + 2]);
                        let (xa, xb) = (xv[h], xv[h + 2]);
                        let low = vmull_s8(vget_low_s8(a), vget_low_s8(xa));
                        let low = vmlal_s8(low, vget_low_s8(b), vget_low_s8(xb));
                        let high = vmull_high_s8(a, xa);
                        let high = vmlal_high_s8(high, b, xb);
                        for (p, s) in [(low, s[2 * h]), (high, s[2 * h + 1])] {
                            *acc = vmlal_high_s16(
                                vmlal_s16(*acc, vget_low_s16(p), vget_low_s16(s)),
                                p,
                                s,
                            );
                        }
                    }
                }
            }
        }
        let blocks = band_start(g0)..blocks_for(g1);
        for ((dot, acc), row) in dots.iter_mut().zip(acc).zip(rows) {
            let scales = &row[code_bytes..][blocks.clone()];
            let sum = vaddlvq_s32(acc[0]) + vaddlvq_s32(acc[1]);
            *dot += sum
                - i64::from(CODE_OFFSET) * i64::from(scaled_sums(scales, &sums[blocks.clone()]));
        }
    }
    dots
}

/// A q6 group's 64 codes (u in 0..63), a byte each, as four quarters of 16
/// columns: the low nibbles by an AND or a shift, the high bit pairs
/// shifted to bits 4-5 and masked.
///
/// # Safety
/// The CPU must support Neon; `group` begins the group's 48 code bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q6_codes(group: *const u8) -> [int8x16_t; 4] {
    // SAFETY: per the contract.
    let (n0, n1, high) = unsafe {
        (
            vld1q_u8(group),
            vld1q_u8(group.add(16)),
            vld1q_u8(group.add(32)),
        )
    };
    let (nibble, pair) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30));
    [
        vreinterpretq_s8_u8(vorrq_u8(
            vandq_u8(n0, nibble),
            vandq_u8(vshlq_n_u8::<4>(high), pair),
        )),
        vreinterpretq_s8_u8(vorrq_u8(
            vandq_u8(n1, nibble),
            vandq_u8(vshlq_n_u8::<2>(high), pair),
        )),
        vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(n0), vandq_u8(high, pair))),
        vreinterpretq_s8_u8(vorrq_u8(
            vshrq_n_u8::<4>(n1),
            vandq_u8(vshrq_n_u8::<2>(high), pair),
        )),
    ]
}

/// A band's eight sub-scales as the 16-bit lanes each product vector of
/// `q6_dots_of` meets: `[s0 ×4, s1 ×4]`, `[s2 ×4, s3 ×4]`, `[s4 ×4, s5 ×4]`,
/// `[s6 ×4, s7 ×4]` (the low then the high halves of quarters 0 and 2, then
/// of quarters 1 and 3: lane j of 16h + j is of block 4h + j / 4).
///
/// # Safety
/// The CPU must support Neon; `scales` begins 8 readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q6_sub_scales(scales: *const u8) -> [int16x8_t; 4] {
    // SAFETY: per the contract.
    let s = unsafe { std::slice::from_raw_parts(scales, 8) };
    let quads = |a: u8, b: u8| vcombine_s16(vdup_n_s16(i16::from(a)), vdup_n_s16(i16::from(b)));
    [
        quads(s[0], s[1]),
        quads(s[2], s[3]),
        quads(s[4], s[5]),
        quads(s[6], s[7]),
    ]
}

/// Σ_b s_b · X_b of a span's sub-scales and block sums (at most 256 terms
/// of at most 255 · 4096 in magnitude: an i32), 8 at a time.
#[inline]
#[target_feature(enable = "neon")]
fn scaled_sums(scales: &[u8], sums: &[i16]) -> i32 {
    assert!(scales.len() == sums.len());
    let mut acc = vdupq_n_s32(0);
    let mut k = 0;
    while k + 8 <= scales.len() {
        // SAFETY: k + 8 <= len of both.
        let (s, x) = unsafe {
            (
                vreinterpretq_s16_u16(vmovl_u8(vld1_u8(scales.as_ptr().add(k)))),
                vld1q_s16(sums.as_ptr().add(k)),
            )
        };
        acc = vmlal_high_s16(vmlal_s16(acc, vget_low_s16(s), vget_low_s16(x)), s, x);
        k += 8;
    }
    let tail: i32 = scales[k..]
        .iter()
        .zip(&sums[k..])
        .map(|(&s, &x)| i32::from(s) * i32::from(x))
        .sum();
    vaddvq_s32(acc) + tail
}
