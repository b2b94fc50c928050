//! Kernel benchmarks at the shapes of BitNet b1.58 2B4T.
//!
//! Units: `gemv*` groups report GB/s of packed weights streamed (criterion's
//! "GB/s", decimal); `gemm_m128` reports ternary multiply-accumulates per second
//! (criterion's "elem/s": one element = one MAC), and so does `gemm_streamed`
//! (a few tokens, weights from memory: batched decoding); `read_bandwidth` is the
//! machine's streaming read speed (a plain sum over a buffer far larger than the
//! L3 cache), the ceiling a memory-bound GEMV can reach.
//!
//! Run: `cargo bench --bench kernels` (all), or a filter such as
//! `cargo bench --bench kernels -- gemv/avx2`. `TRIT_BENCH_KERNELS=avx2,scalar`
//! limits the paths; the groups that run one path only (the model-sized ones,
//! such as `attention_depth4096`) run `TRIT_KERNEL`'s, else the best.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use trit::bandwidth::sum_words;
use trit::kernels::{matmul_into, Kernel, Packing, QuantizedActivations, TernaryMatrix};
use trit::threads;

/// (n_in, n_out) of the 2B4T projections: q/o, k/v, gate/up, down.
const SHAPES: [(usize, usize); 4] = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)];
const THREADS: [usize; 2] = [1, 2];
const GEMM_TOKENS: usize = 128;
/// Buffer for the read-bandwidth test and the streamed GEMV: well past any L3.
const STREAM_BYTES: usize = 256 << 20;

fn kernels() -> Vec<Kernel> {
    let wanted = std::env::var("TRIT_BENCH_KERNELS").ok();
    Kernel::supported()
        .into_iter()
        .filter(|k| {
            wanted
                .as_deref()
                .is_none_or(|w| w.split(',').any(|name| Kernel::from_name(name) == Some(*k)))
        })
        .collect()
}

fn random_matrix(n_out: usize, n_in: usize, seed: u64) -> TernaryMatrix {
    let mut state = seed | 1;
    TernaryMatrix::from_fn(n_out, n_in, 1.0, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 3) as i8 - 1
    })
    .unwrap()
}

fn activations(m: usize, k: usize) -> QuantizedActivations {
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    QuantizedActivations::quantize(&x, m, k).unwrap()
}

fn read_bandwidth(c: &mut Criterion) {
    let kernel = Kernel::active().unwrap();
    let buffer: Vec<u64> = (0..STREAM_BYTES / 8).map(|i| i as u64).collect();
    let mut group = c.benchmark_group("read_bandwidth");
    group.throughput(Throughput::BytesDecimal(STREAM_BYTES as u64));
    group.sample_size(20);
    for threads in THREADS {
        let pool = threads::pool(Some(threads)).unwrap();
        group.bench_function(BenchmarkId::from_parameter(format!("t{threads}")), |b| {
            b.iter(|| {
                pool.install(|| {
                    buffer
                        .par_chunks(buffer.len() / threads)
                        .map(|chunk| sum_words(kernel, chunk))
                        .reduce(|| 0, u64::wrapping_add)
                })
            })
        });
    }
    group.finish();
}

fn gemv(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemv");
    for (n_in, n_out) in SHAPES {
        let w = random_matrix(n_out, n_in, 7);
        let x = activations(1, n_in);
        let mut y = vec![0.0f32; n_out];
        group.throughput(Throughput::BytesDecimal(w.packed_bytes() as u64));
        for kernel in kernels() {
            for threads in THREADS {
                let pool = threads::pool(Some(threads)).unwrap();
                let id =
                    BenchmarkId::new(format!("{kernel}/t{threads}"), format!("{n_in}x{n_out}"));
                // The loop runs on a pool thread, as the model's forward pass does: a
                // call from outside would also time waking the caller from its sleep.
                group.bench_function(id, |b| {
                    pool.install(|| {
                        b.iter(|| matmul_into(&w, black_box(&x), &mut y, kernel, &pool).unwrap())
                    })
                });
            }
        }
    }
    group.finish();
}

/// GEMV over many 2560→6912 matrices in turn, so every weight comes from memory.
fn gemv_streamed(c: &mut Criterion) {
    let (n_in, n_out) = (2560, 6912);
    let count = STREAM_BYTES / (n_out * n_in / 4);
    let matrices: Vec<TernaryMatrix> = (0..count)
        .map(|i| random_matrix(n_out, n_in, i as u64 + 1))
        .collect();
    let bytes: usize = matrices.iter().map(TernaryMatrix::packed_bytes).sum();
    let x = activations(1, n_in);
    let mut y = vec![0.0f32; n_out];
    let mut group = c.benchmark_group("gemv_streamed");
    group.throughput(Throughput::BytesDecimal(bytes as u64));
    group.sample_size(20);
    for kernel in kernels().into_iter().filter(|&k| k != Kernel::Scalar) {
        for threads in THREADS {
            let pool = threads::pool(Some(threads)).unwrap();
            let id = BenchmarkId::new(
                format!("{kernel}/t{threads}"),
                format!("{count}x{n_in}x{n_out}"),
            );
            group.bench_function(id, |b| {
                pool.install(|| {
                    b.iter(|| {
                        for w in &matrices {
                            matmul_into(w, black_box(&x), &mut y, kernel, &pool).unwrap();
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

/// Tokens of the batched-decode GEMMs: a step of 4, 8 or 16 sequences.
const BATCH_TOKENS: [usize; 3] = [4, 8, 16];

/// GEMM of a few tokens (one batched decode step) over many matrices of the
/// FFN's shapes in turn (2560→6912, and the down projection's 6912→2560,
/// whose rows of 8 tokens' activations overflow L1), so every weight comes
/// from memory as in decoding: MACs per second, to set beside `gemm_m128`
/// (the same work with weights reused by 128 tokens) and `gemv_streamed`
/// (the memory bound of one token).
fn gemm_streamed(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm_streamed");
    group.sample_size(10);
    for (n_in, n_out) in [(2560, 6912), (6912, 2560)] {
        let count = STREAM_BYTES / (n_out * n_in / 4);
        let matrices: Vec<TernaryMatrix> = (0..count)
            .map(|i| random_matrix(n_out, n_in, i as u64 + 1))
            .collect();
        for m in BATCH_TOKENS {
            let x = activations(m, n_in);
            let mut y = vec![0.0f32; m * n_out];
            group.throughput(Throughput::Elements((count * m * n_in * n_out) as u64));
            for kernel in kernels().into_iter().filter(|&k| k != Kernel::Scalar) {
                for threads in THREADS {
                    let pool = threads::pool(Some(threads)).unwrap();
                    let id = BenchmarkId::new(
                        format!("{kernel}/t{threads}"),
                        format!("{n_in}x{n_out}/m{m}"),
                    );
                    group.bench_function(id, |b| {
                        pool.install(|| {
                            b.iter(|| {
                                for w in &matrices {
                                    matmul_into(w, black_box(&x), &mut y, kernel, &pool).unwrap();
                                }
                            })
                        })
                    });
                }
            }
        }
    }
    group.finish();
}

fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm_m128");
    group.sample_size(10);
    for (n_in, n_out) in SHAPES {
        let w = random_matrix(n_out, n_in, 11);
        let x = activations(GEMM_TOKENS, n_in);
        let mut y = vec![0.0f32; GEMM_TOKENS * n_out];
        group.throughput(Throughput::Elements((GEMM_TOKENS * n_in * n_out) as u64));
        // The scalar path is the definition, not a contender: seconds per call here.
        for kernel in kernels().into_iter().filter(|&k| k != Kernel::Scalar) {
            for threads in THREADS {
                let pool = threads::pool(Some(threads)).unwrap();
                let id =
                    BenchmarkId::new(format!("{kernel}/t{threads}"), format!("{n_in}x{n_out}"));
                // The loop runs on a pool thread, as the model's forward pass does: a
                // call from outside would also time waking the caller from its sleep.
                group.bench_function(id, |b| {
                    pool.install(|| {
                        b.iter(|| matmul_into(&w, black_box(&x), &mut y, kernel, &pool).unwrap())
                    })
                });
            }
        }
    }
    group.finish();
}

/// One GQA group of 2B4T (4 query heads on one KV head, head_dim 128) over
/// a cache of 1024 positions, in f16, f32 and q8_0: GB/s of keys and values read
/// (a 2B4T token at depth 1024 makes 150 such calls, 30 layers × 5 groups).
/// q8_0 also on the AVX2 path where the best path is another.
fn attention(c: &mut Criterion) {
    use trit::model::attention::{attend_group, ChunkScratch};
    use trit::model::cache::{KvCache, KvRows, KvType, F16};
    const N: usize = 1024;
    let mut group = c.benchmark_group("attention_d1024");
    let x = bench_value;
    let q = group_query();
    let k32: Vec<f32> = (0..N * HD).map(|i| x(i + 5)).collect();
    let v32: Vec<f32> = (0..N * HD).map(|i| x(i + 11)).collect();
    let k16: Vec<F16> = k32.iter().map(|&v| F16::from_f32(v)).collect();
    let v16: Vec<F16> = v32.iter().map(|&v| F16::from_f32(v)).collect();
    // The q8_0 keys in the cache's tiles, as attention reads them.
    let mut cache8 = KvCache::new(1, 1, N, HD, KvType::Q8_0, Kernel::Scalar).unwrap();
    for (p, (k, v)) in k32.chunks_exact(HD).zip(v32.chunks_exact(HD)).enumerate() {
        cache8.write(0, 0, p, k, v);
    }
    let (k8, v8) = (cache8.keys(0, 0, N), cache8.values(0, 0, N));
    let mut scores = vec![0.0f32; GROUP * N];
    let mut out = vec![0.0f32; GROUP * HD];
    let mut scratch = ChunkScratch::default();
    let best = Kernel::active().unwrap();
    let mut cases = vec![
        // Bytes per 32 values.
        (best, "f16", KvRows::F16(&k16), KvRows::F16(&v16), 64),
        (best, "f32", KvRows::F32(&k32), KvRows::F32(&v32), 128),
        (best, "q8_0", k8, v8, 34),
    ];
    if best != Kernel::Avx2 && Kernel::Avx2.is_supported() {
        cases.push((Kernel::Avx2, "q8_0", k8, v8, 34));
    }
    for (kernel, name, keys, values, size) in cases {
        group.throughput(Throughput::BytesDecimal((2 * N * HD / 32 * size) as u64));
        group.bench_function(BenchmarkId::new(kernel.name(), name), |b| {
            b.iter(|| {
                attend_group(
                    kernel,
                    black_box(&q),
                    HD,
                    keys,
                    values,
                    N,
                    0.088,
                    &mut scores,
                    &mut out,
                    HD,
                    &mut scratch,
                    None,
                )
            })
        });
    }
    group.finish();
}

/// 2B4T's attention: head_dim, query heads per KV head, layers, KV heads.
const HD: usize = 128;
const GROUP: usize = 4;
const LAYERS: usize = 30;
const KV_HEADS: usize = 5;

/// The pseudo-random value in [-1, 1] the attention benches fill with.
fn bench_value(i: usize) -> f32 {
    ((i * 7919) % 2001) as f32 / 1000.0 - 1.0
}

/// One GQA group's queries, [GROUP, HD].
fn group_query() -> Vec<f32> {
    (0..GROUP * HD).map(bench_value).collect()
}

/// A KV cache of `kind` with all `n` positions of every layer and head
/// written, each its own pseudo-random values in [-1, 1].
fn filled_cache(
    layers: usize,
    kv_heads: usize,
    n: usize,
    hd: usize,
    kind: trit::model::cache::KvType,
    kernel: Kernel,
) -> trit::model::cache::KvCache {
    let x = bench_value;
    let mut cache =
        trit::model::cache::KvCache::new(layers, kv_heads, n, hd, kind, kernel).unwrap();
    let (mut k, mut v) = (vec![0.0f32; hd], vec![0.0f32; hd]);
    for l in 0..layers {
        for g in 0..kv_heads {
            for p in 0..n {
                let seed = (l * kv_heads + g) * n + p;
                for d in 0..hd {
                    k[d] = x(seed * 3 + d);
                    v[d] = x(seed * 5 + d + 1);
                }
                cache.write(l, g, p, &k, &v);
            }
        }
    }
    cache
}

/// Buffers of one task's `attend_group` calls in the attention benches.
struct GroupBuffers {
    scores: Vec<f32>, // [GROUP, KEY_CHUNK]
    out: Vec<f32>,    // [GROUP, HD]
    chunks: trit::model::attention::ChunkScratch,
}

impl GroupBuffers {
    fn new() -> GroupBuffers {
        GroupBuffers {
            scores: vec![0.0; GROUP * trit::model::attention::KEY_CHUNK],
            out: vec![0.0; GROUP * HD],
            chunks: Default::default(),
        }
    }
}

/// `attend_group` of the benches' query over positions 0..n of `cache`'s
/// (layer, KV head) `head`, passing `next`'s rows as what it reads next, as
/// the engine's decode passes the next KV head's.
fn attend_cached(
    kernel: Kernel,
    q: &[f32],
    cache: &trit::model::cache::KvCache,
    n: usize,
    (l, g): (usize, usize),
    next: Option<(usize, usize)>,
    buffers: &mut GroupBuffers,
) {
    use trit::model::attention::{attend_group, ThenReads};
    let then = next.map(|(l, g)| ThenReads {
        keys: cache.keys(l, g, n),
        values: cache.values(l, g, n),
    });
    attend_group(
        kernel,
        black_box(q),
        HD,
        cache.keys(l, g, n),
        cache.values(l, g, n),
        n,
        0.088,
        &mut buffers.scores,
        &mut buffers.out,
        HD,
        &mut buffers.chunks,
        then,
    );
}

/// One 2B4T token's attention at depth 4096: 30 layers × 5 KV groups (4
/// query heads of 128 each) over 4096 cached positions, every group's keys
/// and values its own (315 MB in f16, 167 MB in q8_0: read from memory, as
/// a token at that depth reads them). The groups are tasks over 1 or 2
/// threads; bytes per second of keys and values read.
fn attention_depth(c: &mut Criterion) {
    use trit::model::cache::KvType;
    const N: usize = 4096;
    let q = group_query();
    let mut group = c.benchmark_group("attention_depth4096");
    group.sample_size(10);
    for kind in [KvType::F16, KvType::Q8_0] {
        let kernel = Kernel::active().unwrap();
        let cache = filled_cache(LAYERS, KV_HEADS, N, HD, kind, kernel);
        group.throughput(Throughput::BytesDecimal(cache.nbytes() as u64));
        for threads in THREADS {
            let pool = threads::pool(Some(threads)).unwrap();
            let id = BenchmarkId::new(kernel.name(), format!("{}/t{threads}", kind.name()));
            group.bench_function(id, |b| {
                b.iter(|| {
                    pool.install(|| {
                        (0..LAYERS * KV_HEADS).into_par_iter().for_each_init(
                            GroupBuffers::new,
                            |buffers, task| {
                                // The next task's group, as the model's decode
                                // passes the next KV head's.
                                let next = (task + 1 < LAYERS * KV_HEADS)
                                    .then(|| ((task + 1) / KV_HEADS, (task + 1) % KV_HEADS));
                                let head = (task / KV_HEADS, task % KV_HEADS);
                                attend_cached(kernel, &q, &cache, N, head, next, buffers);
                            },
                        )
                    })
                })
            });
        }
    }
    group.finish();
}

/// The attention of one batched decode step of 2B4T: 8 sequences at depth
/// 160 (a llama-batched-bench step after 128-token prompts), each with its
/// own keys and values (98 MB in f16, 52 MB in q8_0: read from memory, as a
/// step reads them). Layer by layer, one task per sequence taking its 5 KV
/// groups in turn, each group passing the next (and a sequence's last, the
/// next sequence's first) as what it reads next, as the engine's batched
/// decode does; bytes per second of keys and values read.
fn attention_batch(c: &mut Criterion) {
    use trit::model::cache::KvType;
    const SEQUENCES: usize = 8;
    const N: usize = 160;
    let q = group_query();
    let mut group = c.benchmark_group("attention_batch8_d160");
    group.sample_size(10);
    for kind in [KvType::F16, KvType::Q8_0] {
        let kernel = Kernel::active().unwrap();
        // Sequence s's layer l is the cache's layer l·SEQUENCES + s.
        let cache = filled_cache(LAYERS * SEQUENCES, KV_HEADS, N, HD, kind, kernel);
        group.throughput(Throughput::BytesDecimal(cache.nbytes() as u64));
        for threads in THREADS {
            let pool = threads::pool(Some(threads)).unwrap();
            let id = BenchmarkId::new(kernel.name(), format!("{}/t{threads}", kind.name()));
            group.bench_function(id, |b| {
                b.iter(|| {
                    pool.install(|| {
                        for layer in 0..LAYERS {
                            (0..SEQUENCES).into_par_iter().for_each(|s| {
                                let mut buffers = GroupBuffers::new();
                                let l = layer * SEQUENCES + s;
                                for g in 0..KV_HEADS {
                                    let next = if g + 1 < KV_HEADS {
                                        Some((l, g + 1))
                                    } else {
                                        (s + 1 < SEQUENCES).then_some((l + 1, 0))
                                    };
                                    attend_cached(
                                        kernel,
                                        &q,
                                        &cache,
                                        N,
                                        (l, g),
                                        next,
                                        &mut buffers,
                                    );
                                }
                            })
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

/// The output head of 2B4T (the tied embedding, 128256 × 2560) as int8
/// rows (328 MB of codes) and as q6 rows (257 MB) times one token and times
/// a few: read once per generated token (or decode step), like the weights.
fn head_int8(c: &mut Criterion) {
    use trit::model::dense::DenseMatrix;
    use trit::model::{DType, RawTensor};
    let (rows, cols) = (128_256, 2560);
    let shape = [rows, cols];
    let bf16: Vec<u8> = (0..rows * cols)
        .flat_map(|i| {
            let v = ((i * 7919) % 2001) as f32 / 1000.0 - 1.0;
            ((v.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect();
    let raw = RawTensor::new("head", DType::BF16, &shape, &bf16).unwrap();
    let heads = [
        ("int8", DenseMatrix::int8_from_raw(&raw).unwrap()),
        ("q6", DenseMatrix::q6_from_raw(&raw).unwrap()),
    ];
    drop(bf16);
    for (name, head) in &heads {
        head_dense(c, name, head, rows, cols);
    }
}

/// The head's dot kernels with their rows in L2 (128 rows of 2560, a head
/// task's worth; one thread), in multiply-adds per second: what a head tile
/// reaches when memory is out of the way, beside `isa_peak` and
/// `gemm_cached`.
fn head_cached(c: &mut Criterion) {
    use trit::kernels::head::{int8_dots_tokens, q6_dots_tokens};
    use trit::kernels::q6::{Q6Activations, Q6Matrix};
    let (rows, cols) = (128, 2560);
    let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7919) % 255) as i8).collect(); // [rows, cols]
    let q6 = Q6Matrix::from_rows(rows, cols, |r, out| {
        for (c, v) in out.iter_mut().enumerate() {
            *v = ((r * cols + c) * 7919 % 2001) as f32 / 1000.0 - 1.0;
        }
    })
    .unwrap();
    let kernel = Kernel::active().unwrap();
    let mut group = c.benchmark_group("head_cached");
    for n in [1usize, 4, 8, 16] {
        let xs: Vec<i8> = (0..n * cols).map(|i| ((i * 31) % 255) as i8).collect(); // [n, cols]
        let mut acts = Q6Activations::new(n, q6.groups());
        for (codes, x) in acts.code_rows_mut().zip(xs.chunks_exact(cols)) {
            codes[..cols].copy_from_slice(x);
        }
        let q6_xs = acts.finish();
        let mut dots = vec![0i32; n * rows]; // [n, rows]
        let mut wide_dots = vec![0i64; n * rows]; // [n, rows]
        group.throughput(Throughput::Elements((n * rows * cols) as u64));
        group.bench_function(BenchmarkId::new("int8", format!("m{n}")), |b| {
            b.iter(|| int8_dots_tokens(kernel, black_box(&codes), &xs, n, &mut dots))
        });
        group.bench_function(BenchmarkId::new("q6", format!("m{n}")), |b| {
            b.iter(|| {
                q6_dots_tokens(
                    kernel,
                    black_box(q6.rows_view(0, rows)),
                    q6_xs,
                    &mut wide_dots,
                )
            })
        });
    }
    group.finish();
}

/// `head_int8`'s groups for one head: `head_{name}` (one token) and
/// `head_{name}_tokens` (n tokens at once).
fn head_dense(
    c: &mut Criterion,
    name: &str,
    head: &trit::model::dense::DenseMatrix,
    rows: usize,
    cols: usize,
) {
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut logits = vec![0.0f32; rows];
    let kernel = Kernel::active().unwrap();
    let mut group = c.benchmark_group(format!("head_{name}"));
    group.throughput(Throughput::BytesDecimal(head.nbytes() as u64));
    group.sample_size(20);
    for threads in THREADS {
        let pool = threads::pool(Some(threads)).unwrap();
        group.bench_function(BenchmarkId::from_parameter(format!("t{threads}")), |b| {
            pool.install(|| b.iter(|| head.matvec(kernel, black_box(&x), &mut logits)))
        });
    }
    group.finish();

    // The logits of a batched decode step: the head read once for n tokens.
    let mut group = c.benchmark_group(format!("head_{name}_tokens"));
    group.throughput(Throughput::BytesDecimal(head.nbytes() as u64));
    group.sample_size(10);
    for n in [4usize, 8, 16] {
        let xs: Vec<f32> = (0..n * cols).map(|i| (i % 19) as f32 - 9.0).collect(); // [n, cols]
        let mut outs: Vec<Vec<f32>> = vec![vec![0.0; rows]; n]; // [n][rows]
        for threads in THREADS {
            let pool = threads::pool(Some(threads)).unwrap();
            let id = BenchmarkId::new(format!("m{n}"), format!("t{threads}"));
            group.bench_function(id, |b| {
                pool.install(|| {
                    b.iter(|| {
                        let mut views: Vec<&mut [f32]> =
                            outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                        head.matvecs(kernel, black_box(&xs), &mut views)
                    })
                })
            });
        }
    }
    group.finish();
}

/// The GEMM with its weights and activations in cache (one thread): L1
/// (64 × 512 weights, 8 KB packed) and L2 (384 × 2560, 240 KB packed),
/// at 8 tokens (the small-batch tile) and 128 (the prompt tile). With
/// `isa_peak`, what the tiles reach of the core's multiply-add rate when
/// memory is out of the way.
fn gemm_cached(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm_cached");
    group.sample_size(20);
    let pool = threads::pool(Some(1)).unwrap();
    for (level, n_out, n_in) in [("l1", 64usize, 512usize), ("l2", 384, 2560)] {
        let w = random_matrix(n_out, n_in, 11);
        for m in [8usize, 128] {
            let x = activations(m, n_in);
            let mut y = vec![0.0f32; m * n_out]; // [m, n_out]
            group.throughput(Throughput::Elements((m * n_out * n_in) as u64));
            for kernel in kernels() {
                let id = BenchmarkId::new(kernel.name(), format!("{level}/m{m}"));
                group.bench_function(id, |b| {
                    b.iter(|| matmul_into(&w, black_box(&x), &mut y, kernel, &pool).unwrap())
                });
            }
        }
    }
    group.finish();
}

/// One token against a matrix that stays in L2 (384 × 2560), in every
/// packing, one thread: the GEMV's decoding and multiplying speed without
/// memory (elem/s = weights, i.e. MACs, per second).
fn gemv_cached(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemv_cached");
    group.sample_size(20);
    let pool = threads::pool(Some(1)).unwrap();
    let (n_out, n_in) = (384usize, 2560usize);
    let x = activations(1, n_in);
    let mut y = vec![0.0f32; n_out];
    group.throughput(Throughput::Elements((n_out * n_in) as u64));
    for packing in Packing::ALL {
        let w = random_matrix(n_out, n_in, 5).repacked(packing).unwrap();
        for kernel in kernels().into_iter().filter(|&k| k != Kernel::Scalar) {
            let id = BenchmarkId::new(kernel.name(), packing.name());
            group.bench_function(id, |b| {
                pool.install(|| {
                    b.iter(|| matmul_into(&w, black_box(&x), &mut y, kernel, &pool).unwrap())
                })
            });
        }
    }
    group.finish();
}

/// The core's multiply-add peak for the instructions the tiles use, from
/// registers only (16 independent accumulators, no loads): AVX-512 VNNI
/// `vpdpbusd` (64 u8·i8 MACs), AVX2 `vpmaddubsw` + `vpmaddwd` + `vpaddd`
/// (32 MACs widened to i32 at once) and `vpmaddubsw` + `vpaddw` (32 MACs
/// summed in i16, as the AVX2 tiles do between widenings). One thread;
/// elem/s = MAC/s.
fn isa_peak(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        const STEPS: usize = 1 << 12;
        const ACCS: usize = 16;
        let mut group = c.benchmark_group("isa_peak");
        group.sample_size(20);
        if Kernel::supported().contains(&Kernel::Avx512Vnni) {
            group.throughput(Throughput::Elements((STEPS * ACCS * 64) as u64));
            #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
            unsafe fn vnni(a: __m512i, b: __m512i) -> i32 {
                let mut acc = [_mm512_setzero_si512(); ACCS];
                for _ in 0..STEPS {
                    for acc in acc.iter_mut() {
                        *acc = _mm512_dpbusd_epi32(*acc, a, b);
                    }
                }
                acc.iter().map(|&v| _mm512_reduce_add_epi32(v)).sum()
            }
            group.bench_function("avx512vnni/vpdpbusd", |bch| {
                bch.iter(|| {
                    // SAFETY: the CPU has AVX-512 F, BW and VNNI (checked above).
                    unsafe {
                        vnni(
                            black_box(_mm512_set1_epi8(1)),
                            black_box(_mm512_set1_epi8(1)),
                        )
                    }
                })
            });
        }
        if Kernel::supported().contains(&Kernel::Avx2) {
            // Eight chains (the adds are all that depends on an accumulator),
            // written in asm: in intrinsics the products of loop invariants
            // would be hoisted out of the loop.
            group.throughput(Throughput::Elements((STEPS * 8 * 32) as u64));
            macro_rules! avx2_peak {
                ($name:literal, $fn:ident, $($step:literal),+) => {
                    #[target_feature(enable = "avx2")]
                    unsafe fn $fn(a: __m256i, b: __m256i) -> i32 {
                        let ones = _mm256_set1_epi16(1);
                        let mut acc = [_mm256_setzero_si256(); 8];
                        for _ in 0..STEPS {
                            // SAFETY: register-only AVX2 instructions (the
                            // caller checked AVX2); no memory is touched.
                            unsafe {
                                std::arch::asm!(
                                    $($step),+,
                                    a = in(ymm_reg) a, b = in(ymm_reg) b, ones = in(ymm_reg) ones,
                                    t = out(ymm_reg) _,
                                    c0 = inout(ymm_reg) acc[0], c1 = inout(ymm_reg) acc[1],
                                    c2 = inout(ymm_reg) acc[2], c3 = inout(ymm_reg) acc[3],
                                    c4 = inout(ymm_reg) acc[4], c5 = inout(ymm_reg) acc[5],
                                    c6 = inout(ymm_reg) acc[6], c7 = inout(ymm_reg) acc[7],
                                    options(pure, nomem, nostack),
                                );
                            }
                        }
                        let sum = acc.iter().fold(_mm256_setzero_si256(), |s, &v| _mm256_add_epi32(s, v));
                        _mm256_extract_epi32::<0>(sum)
                    }
                    group.bench_function($name, |bch| {
                        bch.iter(|| {
                            // SAFETY: the CPU has AVX2 (checked above).
                            unsafe {
                                $fn(
                                    black_box(_mm256_set1_epi8(1)),
                                    black_box(_mm256_set1_epi8(1)),
                                )
                            }
                        })
                    });
                };
            }
            avx2_peak!(
                "avx2/vpmaddubsw+vpmaddwd",
                widen,
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c0}, {c0}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c1}, {c1}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c2}, {c2}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c3}, {c3}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c4}, {c4}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c5}, {c5}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c6}, {c6}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpmaddwd {t}, {t}, {ones}",
                "vpaddd {c7}, {c7}, {t}"
            );
            avx2_peak!(
                "avx2/vpmaddubsw+vpaddw",
                in_i16,
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c0}, {c0}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c1}, {c1}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c2}, {c2}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c3}, {c3}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c4}, {c4}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c5}, {c5}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c6}, {c6}, {t}",
                "vpmaddubsw {t}, {a}, {b}",
                "vpaddw {c7}, {c7}, {t}",
                "/* {ones} unused */"
            );
        }
        group.finish();
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

criterion_group!(
    benches,
    read_bandwidth,
    gemv,
    gemv_streamed,
    head_int8,
    head_cached,
    gemm,
    gemm_streamed,
    gemm_cached,
    gemv_cached,
    isa_peak,
    attention,
    attention_depth,
    attention_batch
);
criterion_main!(benches);
