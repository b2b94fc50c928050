//! AVX-512 VBMI GEMV of `Packing::Tl` matrices (`kernels::tl`): the tables
//! of a token's activation sums, and the lookups.
//!
//! A tile's line for group g is 64 bytes, one row each, and all of them look
//! up group g's table: its 128 low bytes and 128 high bytes sit in four
//! registers, and two `vpermi2b` (which read the low seven bits of each
//! byte) give the 64 rows' entries, as low and high bytes. A negated group
//! (top bit set) must add minus its entry, `!entry + 1` in 16 bits: both
//! bytes are complemented (a masked subtraction from -1) and the 1s are
//! added at the end from the row's count of negated groups, which the matrix
//! keeps. Then no byte is widened per group: the high bytes (each -3..2) add
//! up as bytes, and the low bytes (0..255) in 16-bit lanes, the even rows'
//! masked and the odd rows' shifted down, both for `RUN_GROUPS` groups before
//! they are widened into 32-bit sums. Per 64 rows and 5 weights that is a
//! load, a mask, two permutes, two masked subtractions, an AND, a shift and
//! three adds. Tiles go `TILES` at a time, sharing each table's four loads.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::kernels::counts::{self, Isa};
use crate::kernels::packing::TernaryMatrix;
use crate::kernels::tl::{
    group_activations, tl_groups, tl_plane_chunks, tl_whole_chunks, TlLine, TlTable, TL_CHUNK,
    TL_ENTRIES, TL_GROUP, TL_ROWS, TL_TABLE_ENTRIES,
};

/// Groups summed in 8 and 16 bits before widening: the high bytes' sum stays
/// within -120..80 (an i8), the low bytes' within 40 · 255 (a u16).
const RUN_GROUPS: usize = 40;
/// Tiles multiplied together, each table loaded once for all of them.
const TILES: usize = 4;
/// Lines (64 bytes) ahead of the one read that each tile prefetches.
const PREFETCH_LINES: usize = 64;

/// Digit i of each table index m (0..128): `DIGITS[i][m]`.
static DIGITS: [[u8; TL_TABLE_ENTRIES]; TL_GROUP] = {
    let mut digits = [[0u8; TL_TABLE_ENTRIES]; TL_GROUP];
    let mut m = 0;
    while m < TL_TABLE_ENTRIES {
        let mut rest = m;
        let mut i = 0;
        while i < TL_GROUP {
            digits[i][m] = (rest % 3) as u8;
            rest /= 3;
            i += 1;
        }
        m += 1;
    }
    digits
};

/// Weight `i` of the group each table entry stands for ([5, 128], zero past
/// the last entry): the factors of the activations in a table.
static ENTRY_WEIGHTS: [[i16; TL_TABLE_ENTRIES]; TL_GROUP] = {
    let mut weights = [[0i16; TL_TABLE_ENTRIES]; TL_GROUP];
    let mut i = 0;
    while i < TL_GROUP {
        let mut m = 0;
        while m < TL_ENTRIES {
            weights[i][m] = DIGITS[i][m] as i16 - 1;
            m += 1;
        }
        i += 1;
    }
    weights
};

/// The byte indices of `vpermi2b` that pick the low (0) and high (1) bytes of
/// 64 i16 held in two vectors.
static BYTE_PICKS: [[u8; 64]; 2] = {
    let mut picks = [[0u8; 64]; 2];
    let mut j = 0;
    while j < 64 {
        picks[0][j] = 2 * j as u8;
        picks[1][j] = 2 * j as u8 + 1;
        j += 1;
    }
    picks
};

/// The tables of `tables.len()` groups of the token `xq`: entry m of group g
/// is `Σ_i weight_i(m) · x[5g + i]`, 32 entries a vector (`vpmullw` of the
/// weights by each broadcast activation); then a byte permute of two such
/// vectors picks their 64 low bytes, another their high bytes. (Narrowing
/// stores, `vpmovwb` to memory, took ~40 % of a token on Zen 4.)
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn build_tables(xq: &[i8], tables: &mut [TlTable]) {
    // SAFETY: AVX-512 F, BW and VBMI per the contract; every load reads 32
    // i16 of a 128-entry row of ENTRY_WEIGHTS, every store writes 64 bytes
    // of a 128-byte half of the table (h < 2).
    unsafe {
        // Bytes 2j (low) and 2j + 1 (high) of 64 i16 in two vectors.
        let low_bytes = _mm512_loadu_si512(BYTE_PICKS[0].as_ptr().cast());
        let high_bytes = _mm512_loadu_si512(BYTE_PICKS[1].as_ptr().cast());
        let weights: [[__m512i; 4]; TL_GROUP] = std::array::from_fn(|i| {
            std::array::from_fn(|v| _mm512_loadu_si512(ENTRY_WEIGHTS[i][32 * v..].as_ptr().cast()))
        });
        for (g, table) in tables.iter_mut().enumerate() {
            let xs = group_activations(xq, g).map(|v| _mm512_set1_epi16(i16::from(v)));
            let entries: [__m512i; 4] = std::array::from_fn(|v| {
                let mut sum = _mm512_setzero_si512();
                for (weights, &x) in weights.iter().zip(&xs) {
                    sum = _mm512_add_epi16(sum, _mm512_mullo_epi16(weights[v], x));
                }
                sum
            });
            for h in 0..2 {
                let (a, b) = (entries[2 * h], entries[2 * h + 1]);
                let lo = _mm512_permutex2var_epi8(a, low_bytes, b);
                let hi = _mm512_permutex2var_epi8(a, high_bytes, b);
                _mm512_store_si512(table.lo[64 * h..].as_mut_ptr().cast(), lo);
                _mm512_store_si512(table.hi[64 * h..].as_mut_ptr().cast(), hi);
            }
        }
    }
}

/// `dots[i] = Σ_k x[k] · W[rows.start + i, k]` of a `Packing::Tl` matrix,
/// `tables` being the token's (one per group). Whole tiles are multiplied;
/// the rows of `rows` are kept. `isa` is the path this runs for (counted).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn gemv(
    isa: Isa,
    w: &TernaryMatrix,
    tables: &[TlTable],
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(isa);
    let (lines, negated) = w.tl_parts();
    let groups = tl_groups(w.n_in());
    assert!(tables.len() == groups && dots.len() == rows.len() && rows.end <= w.n_out());
    assert!(lines.len() == w.n_out().div_ceil(TL_ROWS) * groups);
    let (first, end) = (rows.start / TL_ROWS, rows.end.div_ceil(TL_ROWS));
    let mut tile_dots = [0i32; TILES * TL_ROWS]; // [tiles, 64 rows]
    let mut t = first;
    while t < end {
        let n = TILES.min(end - t);
        let tile_lines = &lines[t * groups..(t + n) * groups];
        // SAFETY: AVX-512 F, BW and VBMI per the contract; tile_lines holds
        // n tiles of `groups` lines and tables one table per group.
        unsafe {
            match n {
                4 => tiles::<4>(tile_lines, tables, &mut tile_dots),
                3 => tiles::<3>(tile_lines, tables, &mut tile_dots),
                2 => tiles::<2>(tile_lines, tables, &mut tile_dots),
                _ => tiles::<1>(tile_lines, tables, &mut tile_dots),
            }
        }
        for (j, &dot) in tile_dots[..n * TL_ROWS].iter().enumerate() {
            let r = t * TL_ROWS + j;
            if rows.contains(&r) {
                // Each negated group was summed one short (see the module's documentation).
                dots[r - rows.start] = dot.wrapping_add(negated[r] as i32);
            }
        }
        t += n;
    }
}

/// The dots of TT tiles (`lines` is [TT, groups], `tables` [groups]) into
/// `out` ([TT, 64]), each negated group's entry one short.
///
/// # Safety
/// AVX-512 F, BW and VBMI.
#[inline(always)]
unsafe fn tiles<const TT: usize>(
    lines: &[TlLine],
    tables: &[TlTable],
    out: &mut [i32; TILES * TL_ROWS],
) {
    let groups = tables.len();
    debug_assert!(TT <= TILES && lines.len() == TT * groups);
    // SAFETY: AVX-512 F, BW and VBMI per the contract; line t · groups + g
    // and table g exist for every t < TT and g < groups (64-byte aligned
    // types, so the aligned loads are); a prefetch never faults.
    unsafe {
        let ones = _mm512_set1_epi8(-1);
        let low_bytes = _mm512_set1_epi16(0xff);
        // Per tile: the even rows' 32-bit sums (rows 0, 2, .., 30, then 32,
        // .., 62) and the odd rows'.
        let mut sums = [[_mm512_setzero_si512(); 4]; TT];
        let base = lines.as_ptr();
        let mut g0 = 0;
        while g0 < groups {
            let g1 = (g0 + RUN_GROUPS).min(groups);
            let mut lo_even = [_mm512_setzero_si512(); TT]; // u16: row 2i's low bytes
            let mut lo_odd = [_mm512_setzero_si512(); TT]; // u16: row 2i + 1's
            let mut hi = [_mm512_setzero_si512(); TT]; // i8: row r's high bytes
            for (g, table) in tables.iter().enumerate().take(g1).skip(g0) {
                let lo_table = [
                    _mm512_load_si512(table.lo.as_ptr().cast()),
                    _mm512_load_si512(table.lo[64..].as_ptr().cast()),
                ];
                let hi_table = [
                    _mm512_load_si512(table.hi.as_ptr().cast()),
                    _mm512_load_si512(table.hi[64..].as_ptr().cast()),
                ];
                for t in 0..TT {
                    let line = base.add(t * groups + g);
                    _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(PREFETCH_LINES).cast());
                    let bytes = _mm512_load_si512(line.cast());
                    let negated = _mm512_movepi8_mask(bytes);
                    let lo = _mm512_permutex2var_epi8(lo_table[0], bytes, lo_table[1]);
                    let hi_bytes = _mm512_permutex2var_epi8(hi_table[0], bytes, hi_table[1]);
                    let lo = _mm512_mask_sub_epi8(lo, negated, ones, lo);
                    let hi_bytes = _mm512_mask_sub_epi8(hi_bytes, negated, ones, hi_bytes);
                    hi[t] = _mm512_add_epi8(hi[t], hi_bytes);
                    lo_even[t] = _mm512_add_epi16(lo_even[t], _mm512_and_si512(lo, low_bytes));
                    lo_odd[t] = _mm512_add_epi16(lo_odd[t], _mm512_srli_epi16::<8>(lo));
                }
            }
            for t in 0..TT {
                // The high bytes of row 2i (the low byte of 16-bit lane i)
                // and of row 2i + 1 (its high byte), sign-extended.
                let hi_even = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(hi[t]));
                let hi_odd = _mm512_srai_epi16::<8>(hi[t]);
                for (j, (lo, hi)) in [(lo_even[t], hi_even), (lo_odd[t], hi_odd)]
                    .into_iter()
                    .enumerate()
                {
                    let lo_halves = [
                        _mm512_castsi512_si256(lo),
                        _mm512_extracti64x4_epi64::<1>(lo),
                    ];
                    let hi_halves = [
                        _mm512_castsi512_si256(hi),
                        _mm512_extracti64x4_epi64::<1>(hi),
                    ];
                    for h in 0..2 {
                        let value = _mm512_add_epi32(
                            _mm512_cvtepu16_epi32(lo_halves[h]),
                            _mm512_slli_epi32::<8>(_mm512_cvtepi16_epi32(hi_halves[h])),
                        );
                        sums[t][2 * j + h] = _mm512_add_epi32(sums[t][2 * j + h], value);
                    }
                }
            }
            g0 = g1;
        }
        for (t, sums) in sums.iter().enumerate() {
            let mut values = [[0i32; 16]; 4]; // even rows 0..32, 32..64; odd rows likewise
            for (v, &s) in values.iter_mut().zip(sums) {
                _mm512_storeu_si512(v.as_mut_ptr().cast(), s);
            }
            for i in 0..TL_ROWS / 2 {
                out[t * TL_ROWS + 2 * i] = values[i / 16][i % 16];
                out[t * TL_ROWS + 2 * i + 1] = values[2 + i / 16][i % 16];
            }
        }
    }
}

/// The byte picks that turn four gathered vectors (dword i of vector q: the
/// bytes of rows 0..4 of group 16q + i) into row j's 64 bytes of groups, from
/// (q0, q1) for groups 0..32 and from (q2, q3) for 32..64 (the same indices).
static ROW_PICKS: [[u8; 64]; 4] = {
    let mut picks = [[0u8; 64]; 4];
    let mut j = 0;
    while j < 4 {
        let mut p = 0;
        while p < 64 {
            let q = p % 32; // group within the pair of vectors
            picks[j][p] = ((q / 16) * 64 + 4 * (q % 16) + j) as u8;
            p += 1;
        }
        j += 1;
    }
    picks
};

/// The codes (`w + 1`) of four rows `r0..r0 + 4` (r0 a multiple of 4, so one
/// tile's lanes `r0 % 64..+4`) of a `Packing::Tl` matrix at positions `k0..k0
/// + len` of its plane order (`kernels::tl`), row j's at `out + j·stride`.
/// Per chunk of 64 groups: sixteen dword loads into each of four vectors
/// (each dword the four rows' bytes of one group), byte permutes into each
/// row's 64 group bytes, then per digit plane one table lookup of the digit
/// (`vpermi2b` over 128 entries: the low seven bits) and `2 - digit` where
/// the group is negated. The ends (parts of chunks, the inputs past the
/// planes) are the scalar `tl_plane_codes`'. `isa` is the path (counted).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI; rows r0..r0 + 4 exist; `out`
/// takes `3·stride + len` bytes, `len <= stride`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn unpack_rows4(
    isa: Isa,
    w: &TernaryMatrix,
    r0: usize,
    k0: usize,
    len: usize,
    out: *mut u8,
    stride: usize,
) {
    counts::enter(isa);
    debug_assert!(r0.is_multiple_of(4) && r0 + 4 <= w.n_out() && len <= stride);
    let (lines, _) = w.tl_parts();
    let groups = tl_groups(w.n_in());
    let tile = &lines[(r0 / TL_ROWS) * groups..][..groups];
    let lane = r0 % TL_ROWS;
    let end = k0 + len;
    // The whole chunks inside k0..end; the positions outside them, scalar.
    let whole = tl_whole_chunks(k0, end, tl_plane_chunks(w.n_in(), w.k_padded()));
    // SAFETY: row j's bytes for positions p in k0..end lie at out + j·stride
    // + (p - k0), inside `out` (the contract); the scalar ends take
    // disjoint ranges from the chunks.
    let row_codes = |j: usize, from: usize, to: usize| unsafe {
        std::slice::from_raw_parts_mut(out.add(j * stride + (from - k0)), to - from)
    };
    for j in 0..4 {
        if whole.is_empty() {
            w.tl_plane_codes(r0 + j, k0, row_codes(j, k0, end));
            continue;
        }
        let (from, to) = (TL_CHUNK * whole.start, TL_CHUNK * whole.end);
        w.tl_plane_codes(r0 + j, k0, row_codes(j, k0, from));
        w.tl_plane_codes(r0 + j, to, row_codes(j, to, end));
    }
    // SAFETY: AVX-512 F, BW and VBMI per the contract. The dword loads read
    // lane..lane + 4 (lane a multiple of 4) of lines 64c..64(c + 1) <= groups
    // of the tile; the loads of the static tables are inside them; the
    // stores write positions 320c - k0 .. 320(c + 1) - k0 <= len of each row.
    unsafe {
        let twos = _mm512_set1_epi8(2);
        let load = |p: *const u8| _mm512_loadu_si512(p.cast());
        let digit_tables: [[__m512i; 2]; TL_GROUP] =
            std::array::from_fn(|i| [load(DIGITS[i].as_ptr()), load(DIGITS[i][64..].as_ptr())]);
        let row_picks: [__m512i; 4] = std::array::from_fn(|j| load(ROW_PICKS[j].as_ptr()));
        for c in whole {
            let base = tile[64 * c..].as_ptr().cast::<u8>().add(lane);
            // Sixteen plain loads a vector: a gather (whose loads of far
            // apart lines did not overlap) took half the unpacking.
            let gathered: [__m512i; 4] = std::array::from_fn(|q| {
                let dword = |i: usize| base.add(1024 * q + 64 * i).cast::<i32>().read_unaligned();
                _mm512_setr_epi32(
                    dword(0),
                    dword(1),
                    dword(2),
                    dword(3),
                    dword(4),
                    dword(5),
                    dword(6),
                    dword(7),
                    dword(8),
                    dword(9),
                    dword(10),
                    dword(11),
                    dword(12),
                    dword(13),
                    dword(14),
                    dword(15),
                )
            });
            for (j, &picks) in row_picks.iter().enumerate() {
                let low = _mm512_permutex2var_epi8(gathered[0], picks, gathered[1]);
                let high = _mm512_permutex2var_epi8(gathered[2], picks, gathered[3]);
                let bytes = _mm512_mask_blend_epi8(0xffff_ffff_0000_0000, low, high);
                let negated = _mm512_movepi8_mask(bytes);
                let dst = out.add(j * stride + TL_CHUNK * c - k0);
                for (i, table) in digit_tables.iter().enumerate() {
                    let digits = _mm512_permutex2var_epi8(table[0], bytes, table[1]);
                    let codes = _mm512_mask_sub_epi8(digits, negated, twos, digits);
                    _mm512_storeu_si512(dst.add(64 * i).cast(), codes);
                }
            }
        }
    }
}
