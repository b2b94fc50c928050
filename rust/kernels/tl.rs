//! The 1.6-bit lookup packing (`Packing::Tl`): five ternary weights per byte,
//! the bytes of 64 rows side by side, multiplied by looking up tables of
//! activation sums instead of decoding digits.
//!
//! Layout. A matrix is cut into tiles of `TL_ROWS` rows (the last padded with
//! zero weights). Group `g` of a row is its weights `5g..5g + 5` (past `n_in`,
//! zeros). A tile is `groups` lines of 64 bytes: line `g`, byte `r` holds
//! group `g` of the tile's row `r`. So a tile's bytes for one group are one
//! 64-byte vector, one lane per row, and every lane looks up the same table.
//!
//! A byte. The weights `w_i` of a group (i = 0..5) make `e = Σ_i (w_i + 1) ·
//! 3^i` (0..243). Negating every weight maps `e` to `242 - e`, so a group and
//! its negation share one table entry: the byte is `e` when `e <= 121`, else
//! `0x80 | (242 - e)`, the top bit saying "negated". The low seven bits are
//! then at most 121 (121 itself is the group of zeros) and index a table of
//! 128 entries, which two 64-byte registers hold (`vpermi2b`).
//!
//! A table. For one token and group `g`, entry `m` (0..122) is the dot of the
//! group whose byte is `m` with the activations `x[5g..5g + 5]`: an i16 of at
//! most 5 · 128 in magnitude, stored as its low bytes (128) and then its high
//! bytes (128). A byte with its top bit set contributes minus its entry.
//! Tables depend on the token only; every matrix that takes it shares them.

use crate::kernels::cpu::Kernel;

/// Rows side by side in a tile: one lane of a 64-byte vector each.
pub const TL_ROWS: usize = 64;
/// Weights per byte.
pub const TL_GROUP: usize = 5;
/// The byte of five zero weights (and of padding).
pub const TL_ZERO: u8 = 121;
/// The top bit of a byte: its group is the negation of entry `byte & 0x7f`.
pub const TL_NEGATED: u8 = 0x80;
/// Entries of a table that bytes can index (0..=121).
pub const TL_ENTRIES: usize = 122;
/// Entries a table holds (the rest zero): what two 64-byte registers take.
pub const TL_TABLE_ENTRIES: usize = 128;

/// The bytes of one group of 64 rows of a tile.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C, align(64))]
pub struct TlLine(pub [u8; TL_ROWS]);

const _: () = assert!(std::mem::size_of::<TlLine>() == 64);

/// One token's table for one group: `lo[m]`, `hi[m]` are the low and high
/// bytes of the i16 entry `m`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C, align(64))]
pub struct TlTable {
    pub lo: [u8; TL_TABLE_ENTRIES],
    pub hi: [u8; TL_TABLE_ENTRIES],
}

const _: () = assert!(std::mem::size_of::<TlTable>() == 256);

/// A table of zeros (a buffer's initial value).
pub const ZERO_TABLE: TlTable = TlTable {
    lo: [0; TL_TABLE_ENTRIES],
    hi: [0; TL_TABLE_ENTRIES],
};

/// Inputs of a plane chunk: 64 groups, one 64-byte vector per digit.
pub const TL_CHUNK: usize = TL_GROUP * 64;

/// The order in which a GEMM reads a tl matrix's inputs ("digit planes").
/// The first `tl_plane_chunks` chunks of 320 inputs each hold input `5g + i`
/// (digit `i` of the chunk's group `g`) at position `64i + g`; the inputs
/// after them keep their places. Unpacked in this order, a group byte's
/// digit `i` lands in lane `g` of vector `i`: one table lookup per 64
/// codes, where the inputs' own order needs a shuffle and five lookups. The
/// activations are put in the same order (`to_plane_order`), which leaves
/// every dot unchanged.
pub fn tl_plane_chunks(n_in: usize, k_padded: usize) -> usize {
    (tl_groups(n_in) / 64).min(k_padded / TL_CHUNK)
}

/// The input at position `p` of the plane order of `chunks` chunks.
pub fn tl_plane_input(p: usize, chunks: usize) -> usize {
    if p >= chunks * TL_CHUNK {
        return p;
    }
    let (chunk, q) = (p / TL_CHUNK, p % TL_CHUNK);
    chunk * TL_CHUNK + TL_GROUP * (q % 64) + q / 64
}

/// The chunks of a plane order of `chunks` that lie wholly inside the
/// positions `k0..end` (empty when none does).
pub fn tl_whole_chunks(k0: usize, end: usize, chunks: usize) -> std::ops::Range<usize> {
    let first = k0.div_ceil(TL_CHUNK).min(chunks);
    first..(end / TL_CHUNK).min(chunks).max(first)
}

/// `out[p] = xq[tl_plane_input(p, chunks)]`: a token's codes in the plane
/// order (`xq` and `out` of one length, at least `chunks · TL_CHUNK`).
pub fn to_plane_order(xq: &[i8], chunks: usize, out: &mut [i8]) {
    assert!(xq.len() == out.len() && chunks * TL_CHUNK <= xq.len());
    let whole = chunks * TL_CHUNK;
    for (src, dst) in xq[..whole]
        .chunks_exact(TL_CHUNK)
        .zip(out[..whole].chunks_exact_mut(TL_CHUNK))
    {
        for (g, group) in src.chunks_exact(TL_GROUP).enumerate() {
            for (i, &x) in group.iter().enumerate() {
                dst[64 * i + g] = x;
            }
        }
    }
    out[whole..].copy_from_slice(&xq[whole..]);
}

/// Groups of a row of `n_in` weights.
pub fn tl_groups(n_in: usize) -> usize {
    n_in.div_ceil(TL_GROUP)
}

/// Tiles of `n_out` rows.
pub fn tl_tiles(n_out: usize) -> usize {
    n_out.div_ceil(TL_ROWS)
}

/// The byte of a group whose weights have the codes `codes` (`w + 1`: 0, 1
/// or 2), weight `i` as digit `i`.
pub fn tl_byte(codes: [u8; TL_GROUP]) -> u8 {
    let e = codes.iter().rev().fold(0u8, |e, &c| e * 3 + c);
    // A table, not a branch: which half a group falls in is as random as
    // the weights, and a load converts whole models (a mispredicted branch
    // per five weights).
    TL_BYTE_OF[usize::from(e)]
}

/// `tl_byte` by base-3 value `e`: e itself below TL_ENTRIES, else the
/// negation of entry 242 - e.
const TL_BYTE_OF: [u8; 243] = {
    let mut table = [0u8; 243];
    let mut e = 0;
    while e < 243 {
        table[e] = if e >= TL_ENTRIES {
            TL_NEGATED | (242 - e) as u8
        } else {
            e as u8
        };
        e += 1;
    }
    table
};

/// The weights (-1, 0, 1) of the group a byte holds.
pub fn tl_weights(byte: u8) -> [i8; TL_GROUP] {
    let sign = if byte & TL_NEGATED != 0 { -1 } else { 1 };
    let mut m = byte & !TL_NEGATED;
    std::array::from_fn(|_| {
        let digit = (m % 3) as i8;
        m /= 3;
        sign * (digit - 1)
    })
}

/// The codes (`w + 1`) of the group a byte holds, as the GEMM tiles read them.
pub fn tl_codes(byte: u8) -> [u8; TL_GROUP] {
    tl_weights(byte).map(|w| (w + 1) as u8)
}

/// Entry `m` of the table of activations `x` (a group's five, zero past the
/// end of the token): the dot of the group with byte `m`.
fn entry(m: u8, x: [i8; TL_GROUP]) -> i16 {
    tl_weights(m)
        .iter()
        .zip(x)
        .map(|(&w, x)| i16::from(w) * i16::from(x))
        .sum()
}

/// The activations of group `g` of a token `xq` (zero past its end).
pub fn group_activations(xq: &[i8], g: usize) -> [i8; TL_GROUP] {
    std::array::from_fn(|i| xq.get(g * TL_GROUP + i).copied().unwrap_or(0))
}

/// The tables of `tables.len()` groups of the token `xq`, by the definition
/// (every entry its own dot): what the SIMD builders must give.
pub fn build_tables_scalar(xq: &[i8], tables: &mut [TlTable]) {
    for (g, table) in tables.iter_mut().enumerate() {
        let x = group_activations(xq, g);
        *table = ZERO_TABLE;
        for m in 0..TL_ENTRIES as u8 {
            let [lo, hi] = entry(m, x).to_le_bytes();
            table.lo[m as usize] = lo;
            table.hi[m as usize] = hi;
        }
    }
}

/// `tables` (one per group) built for the token `xq` on `kernel`'s path.
pub(crate) fn build_tables(kernel: Kernel, xq: &[i8], tables: &mut [TlTable]) {
    #[cfg(target_arch = "x86_64")]
    if kernel.has_vbmi() {
        // SAFETY: the path runs on this CPU, with AVX-512 VBMI (has_vbmi).
        unsafe { crate::kernels::x86_avx512::tl::build_tables(xq, tables) };
        return;
    }
    let _ = kernel;
    build_tables_scalar(xq, tables);
}

/// A thread's tables and the token they were built for.
#[derive(Default)]
struct ThreadTables {
    token: Vec<i8>,
    /// The tables of the token's groups first; it only grows.
    tables: Vec<TlTable>,
    /// Groups built for `token`; 0 while none are (every path builds the
    /// same tables, so which one built them does not matter).
    groups: usize,
}

thread_local! {
    static TABLES: std::cell::RefCell<ThreadTables> = std::cell::RefCell::default();
}

/// Runs `f` with the tables of `groups` groups of the token `xq`, built on
/// `kernel`'s path by this thread: each thread that multiplies the token
/// builds its own copy, which stays in its own cache (tables one thread built
/// and another read cost more in transfers between the cores than the
/// building they saved). They are kept with a copy of the token, compared in
/// full, so the matrices that take the same input (q, k and v; gate and up)
/// and a thread's later tasks find them built, and never another token's.
/// None if there is no memory for them (or the thread's are in use).
pub(crate) fn with_thread_tables<R>(
    kernel: Kernel,
    xq: &[i8],
    groups: usize,
    f: impl FnOnce(&[TlTable]) -> R,
) -> Option<R> {
    TABLES.with(|cell| {
        let mut cache = cell.try_borrow_mut().ok()?;
        let cache = &mut *cache;
        let token = &xq[..xq.len().min(groups * TL_GROUP)];
        let fresh = cache.groups == groups && cache.token.as_slice() == token;
        if !fresh {
            cache.groups = 0;
            if cache.tables.len() < groups {
                crate::memory::try_reserve_total(&mut cache.tables, groups, "tl tables").ok()?;
                cache.tables.resize(groups, ZERO_TABLE);
            }
            cache.token.clear();
            crate::memory::try_reserve_total(&mut cache.token, token.len(), "a token").ok()?;
            cache.token.extend_from_slice(token);
            build_tables(kernel, token, &mut cache.tables[..groups]);
            cache.groups = groups;
        }
        Some(f(&cache.tables[..groups]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_hold_every_group_and_its_negation_shares_the_entry() {
        for e in 0..243u32 {
            let codes: [u8; 5] = std::array::from_fn(|i| (e / 3u32.pow(i as u32) % 3) as u8);
            let byte = tl_byte(codes);
            assert_eq!(tl_codes(byte), codes, "e = {e}");
            assert!(((byte & !TL_NEGATED) as usize) < TL_ENTRIES);
            let negated = codes.map(|c| 2 - c);
            assert_eq!(tl_byte(negated) & !TL_NEGATED, byte & !TL_NEGATED);
        }
        assert_eq!(tl_byte([1; 5]), TL_ZERO);
        assert_eq!(tl_weights(TL_ZERO), [0; 5]);
    }

    #[test]
    fn every_path_builds_the_definitions_tables() {
        let xq: Vec<i8> = (0..1003).map(|i| (i * 37 % 256) as u8 as i8).collect();
        let mut want = vec![ZERO_TABLE; tl_groups(xq.len())];
        build_tables_scalar(&xq, &mut want);
        for kernel in Kernel::supported() {
            let mut got = vec![ZERO_TABLE; want.len()];
            build_tables(kernel, &xq, &mut got);
            assert!(got == want, "{kernel}");
        }
    }

    #[test]
    fn plane_order_moves_each_input_once() {
        for (n_in, k_padded) in [
            (2560, 2560),
            (6912, 6912),
            (1003, 1024),
            (318, 384),
            (300, 384),
        ] {
            let chunks = tl_plane_chunks(n_in, k_padded);
            assert!(chunks * TL_CHUNK <= k_padded.min(TL_GROUP * tl_groups(n_in)));
            let mut seen = vec![false; k_padded];
            for p in 0..k_padded {
                let k = tl_plane_input(p, chunks);
                assert!(
                    k < k_padded && !std::mem::replace(&mut seen[k], true),
                    "{n_in}: {p}"
                );
            }
            let xq: Vec<i8> = (0..k_padded).map(|k| (k * 31 % 251) as u8 as i8).collect();
            let mut out = vec![0i8; k_padded];
            to_plane_order(&xq, chunks, &mut out);
            for (p, &x) in out.iter().enumerate() {
                assert_eq!(x, xq[tl_plane_input(p, chunks)], "{n_in}: {p}");
            }
        }
        assert_eq!(tl_plane_chunks(2560, 2560), 8);
        assert_eq!(tl_plane_chunks(6912, 6912), 21);
        assert_eq!(tl_plane_input(64 * 3 + 7, 1), 5 * 7 + 3);
    }

    #[test]
    fn table_entries_are_the_groups_dots() {
        let xq: Vec<i8> = (0..12).map(|i| (i * 53 % 255 - 127) as i8).collect();
        let mut tables = vec![ZERO_TABLE; tl_groups(xq.len())];
        build_tables_scalar(&xq, &mut tables);
        for (g, table) in tables.iter().enumerate() {
            for m in 0..TL_ENTRIES {
                let want: i32 = tl_weights(m as u8)
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| i32::from(w) * i32::from(*xq.get(5 * g + i).unwrap_or(&0)))
                    .sum();
                let got = i16::from_le_bytes([table.lo[m], table.hi[m]]);
                assert_eq!(i32::from(got), want, "group {g} entry {m}");
            }
        }
    }
}
