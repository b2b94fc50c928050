//! Every supported kernel path's ternary matmul against the scalar
//! definition (exact), and the scalar definition against a plain i64
//! reference over unpacked weights, in every packing (every check runs on
//! a matrix and on its `Packing::Tq1` and `Packing::Tl` copies); the same
//! for the q6 head dots.
//! (The other routines' paths are compared beside them: `half`,
//! `model::dense`, `model::attention`, `model::tests`.)

use super::*;
use crate::threads;
use proptest::prelude::*;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn random_matrix(n_out: usize, n_in: usize, seed: u64) -> TernaryMatrix {
    let mut s = seed | 1;
    let w: Vec<i8> = (0..n_out * n_in)
        .map(|_| (xorshift(&mut s) % 3) as i8 - 1)
        .collect();
    TernaryMatrix::pack(&w, n_out, n_in, 0.75).unwrap()
}

/// `w` in every packing (it is packed as i2).
fn packings(w: &TernaryMatrix) -> [TernaryMatrix; 3] {
    assert_eq!(w.packing(), Packing::I2);
    [
        w.clone(),
        w.repacked(Packing::Tq1).unwrap(),
        w.repacked(Packing::Tl).unwrap(),
    ]
}

fn random_activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..m * k)
        .map(|_| (xorshift(&mut s) % 20001) as f32 / 1000.0 - 10.0)
        .collect()
}

/// Codes at the extremes -128 and 127 (alternating), the worst case for overflow.
fn extreme_activations(m: usize, k: usize) -> QuantizedActivations {
    let codes: Vec<i8> = (0..m * k)
        .map(|i| if i % 2 == 0 { -128 } else { 127 })
        .collect();
    QuantizedActivations::from_codes(&codes, m, k, &vec![1.0; m]).unwrap()
}

fn reference_dots(w: &TernaryMatrix, x: &QuantizedActivations) -> Vec<i32> {
    let wu = w.unpack();
    let mut dots = vec![0i32; x.m() * w.n_out()]; // [m, n_out]
    for t in 0..x.m() {
        for n in 0..w.n_out() {
            let d: i64 = (0..w.n_in())
                .map(|k| i64::from(wu[n * w.n_in() + k]) * i64::from(x.token(t)[k]))
                .sum();
            dots[t * w.n_out() + n] = d as i32;
        }
    }
    dots
}

/// Every path's matmul of `w` (packed as i2) and of its tq1 copy equals the reference.
fn check_all_kernels(w: &TernaryMatrix, x: &QuantizedActivations) {
    let pool = threads::pool(Some(2)).unwrap();
    let reference = reference_dots(w, x);
    let expected: Vec<f32> = (0..x.m() * w.n_out())
        .map(|i| dequantize(reference[i], x.scales()[i / w.n_out()], w.scale()))
        .collect();
    for w in &packings(w) {
        for kernel in Kernel::supported() {
            let y = matmul(w, x, kernel, &pool).unwrap();
            let same = y
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "kernel {kernel} ({}) differs from the reference at [{}, {}]",
                w.packing().name(),
                x.m(),
                w.n_out()
            );
        }
    }
}

#[test]
fn model_shapes_agree() {
    for (n_out, n_in) in [(640, 2560), (160, 2560), (64, 6912)] {
        let w = random_matrix(n_out, n_in, n_out as u64);
        for m in [1, 5, 8, 17] {
            let x = QuantizedActivations::quantize(&random_activations(m, n_in, m as u64), m, n_in)
                .unwrap();
            check_all_kernels(&w, &x);
        }
    }
}

/// A prompt batch whose activations exceed the L2 budget runs in token
/// blocks (of 36 tokens at 7000 inputs, a ragged last one here): the same bits.
#[test]
fn token_blocked_gemm_agrees() {
    let (n_out, n_in, m) = (37, 7000, 80);
    let w = random_matrix(n_out, n_in, 3);
    let x = QuantizedActivations::quantize(&random_activations(m, n_in, 4), m, n_in).unwrap();
    assert!(m * x.k_padded() > super::GEMM_L2_ACTIVATIONS);
    check_all_kernels(&w, &x);
    let sub = x.tokens(36..72);
    assert_eq!((sub.m(), sub.token(0)), (36, x.token(36)));
    assert_eq!(sub.sums(), &x.sums()[36..72]);
}

/// Matrices fused into one pass give each its own product, whatever the
/// split of their joint rows into tasks (one token and a batch).
#[test]
fn fused_matrices_equal_separate_calls() {
    let pool = threads::pool(Some(2)).unwrap();
    let [a, b, c] = [
        random_matrix(100, 300, 1),
        random_matrix(13, 300, 2),
        random_matrix(250, 300, 3),
    ];
    // Mixed packings too: each matrix is read in its own.
    let tq1 = |w: &TernaryMatrix| w.repacked(Packing::Tq1).unwrap();
    let tl = |w: &TernaryMatrix| w.repacked(Packing::Tl).unwrap();
    for ws in [
        [a.clone(), b.clone(), c.clone()],
        [tq1(&a), b.clone(), tq1(&c)],
        [tl(&a), b, tl(&c)],
    ] {
        fused_matrices_agree(&ws, &pool);
    }
    let ws = [a.clone(), a];
    let x = QuantizedActivations::quantize(&random_activations(1, 300, 9), 1, 300).unwrap();
    let mut y = vec![0.0; 100];
    let err = matmul_many_into(&[&ws[0], &ws[1]], &x, &mut [&mut y], Kernel::Scalar, &pool);
    assert!(err.is_err());
}

fn fused_matrices_agree(ws: &[TernaryMatrix; 3], pool: &ThreadPool) {
    for m in [1, 7] {
        let x = QuantizedActivations::quantize(&random_activations(m, 300, 9), m, 300).unwrap();
        for kernel in Kernel::supported() {
            let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; m * w.n_out()]).collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| &mut y[..]).collect();
            matmul_many_into(&[&ws[0], &ws[1], &ws[2]], &x, &mut outs, kernel, pool).unwrap();
            for (w, y) in ws.iter().zip(&ys) {
                assert_eq!(y, &matmul(w, &x, kernel, pool).unwrap(), "{kernel} m {m}");
            }
        }
    }
}

/// The fused MLP input equals the two products followed by `relu(g)² · u`,
/// to the bit, for one token, a batch, and a batch in several token blocks
/// (a long row), on 1 and 3 threads.
#[test]
fn fused_glu_equals_gate_and_up_then_relu2() {
    for (n_out, n_in, m) in [(130, 300, 1), (130, 300, 7), (61, 30_000, 29)] {
        let (gate, up) = (random_matrix(n_out, n_in, 4), random_matrix(n_out, n_in, 5));
        let x = QuantizedActivations::quantize(&random_activations(m, n_in, 6), m, n_in).unwrap();
        let [gate_i2, gate_tq1, gate_tl] = packings(&gate);
        let [up_i2, up_tq1, up_tl] = packings(&up);
        for (gate, up, threads) in [
            (&gate_i2, &up_i2, 1),
            (&gate_i2, &up_i2, 3),
            (&gate_tq1, &up_tq1, 3),
            (&gate_tl, &up_tl, 3),
        ] {
            let pool = threads::pool(Some(threads)).unwrap();
            for kernel in Kernel::supported() {
                let g = matmul(gate, &x, kernel, &pool).unwrap();
                let u = matmul(up, &x, kernel, &pool).unwrap();
                let want: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| {
                        let r = g.max(0.0);
                        (r * r) * u
                    })
                    .collect();
                let mut h = vec![f32::NAN; m * n_out];
                matmul_glu_into(gate, up, &x, &mut h, kernel, &pool).unwrap();
                let same = h.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                let packing = gate.packing().name();
                assert!(
                    same,
                    "{kernel} ({packing}) [{n_out}, {n_in}] m {m} threads {threads}"
                );
            }
        }
    }
    let pool = threads::pool(Some(2)).unwrap();
    let x = QuantizedActivations::quantize(&random_activations(2, 300, 9), 2, 300).unwrap();
    let (gate, up) = (random_matrix(10, 300, 1), random_matrix(11, 300, 2));
    let mut h = vec![0.0; 20];
    let err = matmul_glu_into(&gate, &up, &x, &mut h, Kernel::Scalar, &pool).unwrap_err();
    assert!(err.to_string().contains("differ in shape"), "{err}");
    let mut h = vec![0.0; 21];
    assert!(matmul_glu_into(&gate, &gate, &x, &mut h, Kernel::Scalar, &pool).is_err());
}

#[test]
fn extreme_codes_do_not_overflow() {
    // All weights +1 or all -1 against ±128/127 codes over a long row: the worst case for i16 sums.
    for value in [1i8, -1] {
        let (n_out, n_in) = (13, 4096 + 256 * 3 + 7);
        let w = TernaryMatrix::pack(&vec![value; n_out * n_in], n_out, n_in, 1.0).unwrap();
        for m in [1, 7] {
            let x = extreme_activations(m, n_in);
            check_all_kernels(&w, &x);
        }
    }
    // Weights that follow the sign of the activations: every product is +128 or +127.
    let (n_out, n_in) = (5, 3000);
    for sign in [1i8, -1] {
        let w = TernaryMatrix::from_fn(
            n_out,
            n_in,
            1.0,
            |_, k| if k % 2 == 0 { -sign } else { sign },
        )
        .unwrap();
        check_all_kernels(&w, &extreme_activations(4, n_in));
    }
}

/// Rows longer than 64 blocks: the AVX-512 VNNI tq1 GEMV sums its base-3
/// bytes (up to 255) times the activations over runs of 64 blocks before it
/// reduces them, the sums wrapping in i32 by design, and takes blocks two at
/// a time (their mid bytes in one vector): 67 blocks here, a run of 64 and a
/// last one of a pair and a lone block. Random values, then the largest
/// products: all weights +1 or -1 against activations of -128 and 127.
#[test]
fn tq1_rows_longer_than_a_carry_run_agree() {
    let n_in = 66 * packing::BLOCK + 10;
    let n_out = 7;
    let x = QuantizedActivations::quantize(&random_activations(1, n_in, 3), 1, n_in).unwrap();
    check_all_kernels(&random_matrix(n_out, n_in, 9), &x);
    for value in [1i8, -1] {
        let w = TernaryMatrix::pack(&vec![value; n_out * n_in], n_out, n_in, 1.0).unwrap();
        check_all_kernels(&w, &extreme_activations(1, n_in));
        let lowest = QuantizedActivations::from_codes(&vec![-128; n_in], 1, n_in, &[1.0]).unwrap();
        check_all_kernels(&w, &lowest);
    }
}

/// The VBMI unpacking of tl rows against `tl_plane_codes`, over ranges that
/// start and end inside plane chunks, span several, and run past the planes
/// (the GEMM's k-blocks and the inputs after the last whole chunk).
#[cfg(target_arch = "x86_64")]
#[test]
fn tl_unpacking_gives_the_plane_codes() {
    let Some(kernel) = Kernel::supported().into_iter().find(|k| k.has_vbmi()) else {
        return; // no VBMI path on this CPU
    };
    let (n_out, n_in) = (2 * tl::TL_ROWS, 6912 + 37);
    let w = random_matrix(n_out, n_in, 5).repacked(Packing::Tl).unwrap();
    let kp = w.k_padded();
    let stride = kp + 64;
    let isa = counts::Isa::avx512_of(kernel);
    for (k0, len) in [
        (0, kp),
        (0, 320),
        (320, 640),
        (7, 1000),
        (300, 2000),
        (6700, kp - 6700),
        (6720, 5),
    ] {
        for r0 in [0, 4, 60, 64, 124] {
            let mut got = vec![0u8; 3 * stride + len];
            // SAFETY: the CPU has VBMI (has_vbmi), rows r0..r0 + 4 exist and
            // `got` takes 3·stride + len bytes.
            unsafe { x86_avx512::tl::unpack_rows4(isa, &w, r0, k0, len, got.as_mut_ptr(), stride) };
            for j in 0..4 {
                let mut want = vec![0u8; len];
                w.tl_plane_codes(r0 + j, k0, &mut want);
                assert!(
                    got[j * stride..][..len] == want[..],
                    "rows {r0}+{j}, {k0}..+{len}"
                );
            }
        }
    }
}

/// `Packing::Tl` GEMVs over several tiles (the VBMI kernel takes four at a
/// time, then the rest) and row ranges that start and end inside tiles,
/// with rows of several 40-group runs and the largest entries (all weights
/// +1, whose groups are negated bytes, or -1, against -128 and 127).
#[test]
fn tl_tiles_and_row_ranges_agree() {
    let (n_out, n_in) = (5 * tl::TL_ROWS + 9, 1003);
    let random = random_matrix(n_out, n_in, 21)
        .repacked(Packing::Tl)
        .unwrap();
    let ones = TernaryMatrix::pack(&vec![1; n_out * n_in], n_out, n_in, 1.0).unwrap();
    let minus = TernaryMatrix::pack(&vec![-1; n_out * n_in], n_out, n_in, 1.0).unwrap();
    let xs = [
        QuantizedActivations::quantize(&random_activations(1, n_in, 4), 1, n_in).unwrap(),
        extreme_activations(1, n_in),
        QuantizedActivations::from_codes(&vec![-128; n_in], 1, n_in, &[1.0]).unwrap(),
    ];
    for w in [
        random,
        ones.repacked(Packing::Tl).unwrap(),
        minus.repacked(Packing::Tl).unwrap(),
    ] {
        for x in &xs {
            for rows in [0..n_out, 64..128, 70..250, 300..n_out, 5..6] {
                let mut want = vec![0i32; rows.len()];
                gemv_dots(
                    Kernel::Scalar,
                    &w,
                    x.token(0),
                    x.sums()[0],
                    rows.clone(),
                    &mut want,
                );
                for kernel in Kernel::supported() {
                    let mut got = vec![0i32; rows.len()];
                    gemv_dots(kernel, &w, x.token(0), x.sums()[0], rows.clone(), &mut got);
                    assert_eq!(got, want, "{kernel} rows {rows:?}");
                }
            }
        }
    }
}

/// The small-batch tiles of every path against scalar: every token count
/// up to SMALL_BATCH (every token remainder of the tile) and one past it,
/// row ranges leaving every row remainder, rows long enough to widen the
/// i16 sums more than once; random activations, and the i16 sums' worst
/// case (codes of 2 or 0 against -128 throughout). The same for tq1
/// matrices, which take the unpacking GEMM at every batch size. Rows of 9
/// blocks run whole; rows of 26 are split in K chunks (two of 13 blocks from
/// 5 tokens on) whose sums add up.
#[test]
fn small_batch_tiles_agree() {
    for n_in in [8 * packing::BLOCK + 100, 25 * packing::BLOCK + 100] {
        small_batch_tiles_agree_at(n_in);
    }
}

fn small_batch_tiles_agree_at(n_in: usize) {
    let n_out = 7;
    let mut scratch = Vec::new();
    let random = random_matrix(n_out, n_in, 11);
    let plus = TernaryMatrix::pack(&vec![1; n_out * n_in], n_out, n_in, 1.0).unwrap();
    let minus = TernaryMatrix::pack(&vec![-1; n_out * n_in], n_out, n_in, 1.0).unwrap();
    for m in 1..=SMALL_BATCH + 1 {
        let x = QuantizedActivations::quantize(&random_activations(m, n_in, m as u64), m, n_in)
            .unwrap();
        let lowest =
            QuantizedActivations::from_codes(&vec![-128; m * n_in], m, n_in, &vec![1.0; m])
                .unwrap();
        let cases = [(&random, &x), (&plus, &lowest), (&minus, &lowest)];
        for (w, x) in cases.iter().flat_map(|&(w, x)| packings(w).map(|w| (w, x))) {
            let w = &w;
            for rows in [0..n_out, 1..n_out, 2..n_out, 3..4] {
                let mut expected = vec![0i32; rows.len() * m]; // [rows, m]
                gemm_dots(
                    Kernel::Scalar,
                    w,
                    x,
                    rows.clone(),
                    &mut expected,
                    &mut scratch,
                );
                for kernel in Kernel::supported() {
                    let mut dots = vec![0i32; rows.len() * m];
                    gemm_dots(kernel, w, x, rows.clone(), &mut dots, &mut scratch);
                    let packing = w.packing().name();
                    assert_eq!(
                        dots, expected,
                        "{kernel} ({packing}), m = {m}, rows {rows:?}, {n_in} inputs"
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    let pool = threads::pool(Some(1)).unwrap();
    let w = random_matrix(4, 10, 1);
    let x = QuantizedActivations::quantize(&[1.0; 9], 1, 9).unwrap();
    assert!(matmul(&w, &x, Kernel::Scalar, &pool).is_err());
    let x = QuantizedActivations::quantize(&[1.0; 10], 1, 10).unwrap();
    let mut y = vec![0.0; 3];
    assert!(matmul_into(&w, &x, &mut y, Kernel::Scalar, &pool).is_err());
}

#[test]
fn kernel_names_round_trip() {
    for kernel in Kernel::ALL {
        assert_eq!(Kernel::from_name(kernel.name()), Some(kernel));
    }
    assert!(Kernel::parse("sse9").is_err());
    // `avx512` names the best AVX-512 path: with VNNI where the CPU has it.
    let avx512 = Kernel::parse("AVX512").unwrap();
    assert!(matches!(avx512, Kernel::Avx512Bw | Kernel::Avx512Vnni));
    if Kernel::Avx512Vnni.is_supported() {
        assert_eq!(avx512, Kernel::Avx512Vnni);
    }
    assert!(Kernel::supported().contains(&Kernel::Scalar));
    assert!(Kernel::best().is_supported());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_shapes_agree(n_out in 1usize..80, n_in in 1usize..1100, m in 1usize..71, seed in any::<u64>()) {
        let w = random_matrix(n_out, n_in, seed);
        let x = QuantizedActivations::quantize(&random_activations(m, n_in, seed), m, n_in).unwrap();
        check_all_kernels(&w, &x);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The per-path entry points on arbitrary row ranges (matmul only hands them
    /// ranges starting at multiples of its task size) and GEMM with one token.
    #[test]
    fn row_ranges_agree(
        n_out in 1usize..40,
        n_in in 1usize..800,
        m in 1usize..9,
        start in 0usize..40,
        len in 1usize..40,
        seed in any::<u64>(),
    ) {
        let start = start % n_out;
        let rows = start..(start + len).min(n_out);
        let x = QuantizedActivations::quantize(&random_activations(m, n_in, seed), m, n_in).unwrap();
        let mut scratch = Vec::new();
        let mut expected = vec![0i32; rows.len() * m];
        let [i2, tq1, tl] = packings(&random_matrix(n_out, n_in, seed));
        gemm_dots(Kernel::Scalar, &i2, &x, rows.clone(), &mut expected, &mut scratch);
        for w in [&i2, &tq1, &tl] {
            let packing = w.packing().name();
            for kernel in Kernel::supported() {
                let mut dots = vec![0i32; rows.len() * m];
                gemm_dots(kernel, w, &x, rows.clone(), &mut dots, &mut scratch);
                prop_assert_eq!(&dots, &expected, "gemm {} ({})", kernel, packing);
                let mut dots = vec![0i32; rows.len()];
                gemv_dots(kernel, w, x.token(m - 1), x.sums()[m - 1], rows.clone(), &mut dots);
                let column: Vec<i32> = expected.chunks_exact(m).map(|row| row[m - 1]).collect();
                prop_assert_eq!(&dots, &column, "gemv {} ({})", kernel, packing);
            }
        }
    }
}

#[test]
fn every_supported_path_passes_its_self_check() {
    for kernel in Kernel::supported() {
        assert!(kernel.self_check(), "{kernel}");
    }
}

/// A q6 matrix of values in [-1, 1] with a column eight times wider every
/// 97, and two rows at the extremes: row 1 all 1.0 (every code 63, every
/// sub-scale 255), row 2 all -1.0 (every code 0).
fn random_q6(rows: usize, cols: usize, seed: u64) -> q6::Q6Matrix {
    let mut s = seed | 1;
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let v = (xorshift(&mut s) % 20001) as f32 / 10000.0 - 1.0;
            if i % 97 == 5 {
                8.0 * v
            } else {
                v
            }
        })
        .collect();
    q6::Q6Matrix::from_rows(rows, cols, |r, out| match r {
        1 => out.fill(1.0),
        2 => out.fill(-1.0),
        _ => out.copy_from_slice(&values[r * cols..(r + 1) * cols]),
    })
    .unwrap()
}

/// Activation codes of `tokens` tokens for q6 rows of `cols` columns: random
/// ones, then a token of all -128 and one of all 127 (with the extreme rows,
/// the largest sums the lanes can meet).
fn q6_activations(tokens: usize, m: &q6::Q6Matrix, seed: u64) -> q6::Q6Activations {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut acts = q6::Q6Activations::new(tokens, m.groups());
    for (i, codes) in acts.code_rows_mut().enumerate() {
        for code in &mut codes[..m.cols()] {
            *code = match i {
                1 => -128,
                2 => 127,
                _ => (xorshift(&mut s) % 256) as u8 as i8,
            };
        }
    }
    acts
}

/// Σ_c (s · (u − 32))_c · x_c over the columns, each weight's integer
/// recovered from its dequantized value: a reference independent of the
/// kernels' own decoding.
fn q6_reference(m: &q6::Q6Matrix, r: usize, x: &[i8]) -> i64 {
    let mut row = vec![0.0f32; m.cols()];
    m.row_into(r, &mut row);
    row.iter()
        .zip(x)
        .map(|(&v, &x)| (v / m.step(r)).round() as i64 * i64::from(x))
        .sum()
}

#[test]
fn q6_dots_of_every_path_equal_the_definition() {
    // Lengths around a group, one long row past a span, rows around the
    // three streams and the 4-row tiles, tokens around the tiles.
    let span = q6::SPAN_GROUPS * q6::GROUP;
    let shapes = [1usize, 63, 64, 65, 200, 2579]
        .into_iter()
        .flat_map(|cols| [1usize, 3, 5, 7, 10].map(|rows| (cols, rows)))
        .chain([(2 * span + 70, 4)]);
    for (cols, rows) in shapes {
        let m = random_q6(rows.max(3), cols, (cols * 31 + rows) as u64);
        let view = m.rows_view(0, rows);
        for tokens in [1usize, 3, 6, 8, 11] {
            let mut acts = q6_activations(tokens.max(3), &m, cols as u64);
            let all = acts.finish();
            let mut want = vec![0i64; tokens * rows]; // [tokens, rows]
            for (i, want) in want.chunks_exact_mut(rows).enumerate() {
                for (r, w) in want.iter_mut().enumerate() {
                    *w = scalar::head::q6_dot(view, r, all.codes(i));
                    if cols < span {
                        assert_eq!(*w, q6_reference(&m, r, all.codes(i)), "{cols} × {r}");
                    }
                }
            }
            // The first `tokens` tokens: a contiguous prefix of `all`.
            let mut first = q6_activations(tokens, &m, cols as u64);
            let xs = first.finish();
            for kernel in Kernel::supported() {
                let mut got = vec![0i64; tokens * rows];
                head::q6_dots_tokens(kernel, view, xs, &mut got);
                assert_eq!(got, want, "{kernel} tokens, {cols} × {rows} × {tokens}");
                for (i, want) in want.chunks_exact(rows).enumerate() {
                    let mut got = vec![0i64; rows];
                    head::q6_dots(kernel, view, xs.token(i), &mut got);
                    assert_eq!(got, want, "{kernel}, {cols} × {rows}, token {i}");
                }
            }
        }
    }
}
