//! Sampling benchmarks over 2B4T's vocabulary (128,256 logits): one draw of
//! the next token with each kind of sampler, on the active kernel path
//! (`TRIT_KERNEL` forces one). A batched step draws once per sequence, so
//! these times add up across a step's sequences (`Engine::sample_many`
//! spreads them over the threads).
//!
//! Run: `cargo bench --bench sampling`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use trit::kernels::Kernel;
use trit::sampling::{Sampler, SamplingParams};

const VOCAB: usize = 128_256;

/// Logits shaped like a model's: most near -5, a long tail upwards, a few
/// tokens well ahead (a sum of uniforms for the bulk, cubed for the tail).
fn model_like_logits() -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..VOCAB)
        .map(|_| {
            let bulk: f32 = (0..4).map(|_| uniform()).sum::<f32>() - 2.0;
            -5.0 + 3.0 * bulk + 12.0 * uniform().powi(12)
        })
        .collect()
}

fn sample(c: &mut Criterion) {
    let logits = model_like_logits();
    let history: Vec<u32> = (0..256).map(|i| (i * 977 % VOCAB) as u32).collect();
    let kernel = Kernel::active().unwrap();
    let base = SamplingParams::default();
    let samplers = [
        ("greedy", base),
        (
            "temperature",
            SamplingParams {
                temperature: 0.8,
                ..base
            },
        ),
        (
            "top_k40",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                ..base
            },
        ),
        (
            "top_p0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                ..base
            },
        ),
        (
            "min_p0.05",
            SamplingParams {
                temperature: 0.8,
                min_p: 0.05,
                ..base
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                temperature: 0.8,
                repetition_penalty: 1.1,
                ..base
            },
        ),
    ];
    let mut group = c.benchmark_group(format!("sample/{}", kernel.name()));
    for (name, params) in samplers {
        let mut sampler = Sampler::new(params, 7).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                sampler
                    .sample(kernel, black_box(&logits), &history)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sample);
criterion_main!(benches);
