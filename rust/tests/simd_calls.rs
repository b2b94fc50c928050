//! Proof that `Kernel::Scalar` runs no SIMD routine anywhere, and that every
//! other path runs its own: a forward pass (a prompt batch, decoded tokens,
//! bf16 and int8 heads, an f16 cache) and sampling on each supported path,
//! with the calls into each instruction set's routines counted
//! (`kernels::counts`, compiled in by the `simd-call-counts` feature). A
//! binary of its own, so no other test runs SIMD code while it counts:
//!
//!     cargo test --release --features simd-call-counts --test simd_calls

use std::collections::HashMap;
use std::sync::Arc;

use trit::checkpoint::MemoryCheckpoint;
use trit::kernels::counts::{calls, Isa};
use trit::kernels::{Kernel, Packing};
use trit::model::{
    load, Config, DType, Family, HeadPrecision, KvType, LinearClass, Proj, QuantizationMode,
    Session,
};
use trit::sampling::{Sampler, SamplingParams};
use trit::threads;

/// Owned tensors: name → (shape, bf16 bytes).
type Owned = HashMap<String, (Vec<usize>, Vec<u8>)>;

fn config() -> Config {
    Config {
        vocab_size: 70,
        hidden_size: 128,
        intermediate_size: 160,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 320,
        tie_word_embeddings: true,
        linear_class: LinearClass::AutoBitLinear,
        quantization_mode: QuantizationMode::Online,
        family: Family::BitNet,
        bitlinear_norm_eps: None,
        rope_scaling: None,
    }
}

/// A random checkpoint with bf16 master weights (ternarized at load).
fn checkpoint(c: &Config) -> Owned {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut tensor = |shape: Vec<usize>, base: f32| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = base + (state % 2000) as f32 / 1000.0 - 1.0;
                ((v.to_bits() >> 16) as u16).to_le_bytes()
            })
            .collect();
        (shape, bytes)
    };
    let mut t = Owned::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        tensor(vec![c.vocab_size, c.hidden_size], 0.0),
    );
    t.insert("model.norm.weight".into(), tensor(vec![c.hidden_size], 1.0));
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        for (name, len) in [
            ("input_layernorm", c.hidden_size),
            ("post_attention_layernorm", c.hidden_size),
            ("self_attn.attn_sub_norm", c.hidden_size),
            ("mlp.ffn_sub_norm", c.intermediate_size),
        ] {
            t.insert(format!("{p}.{name}.weight"), tensor(vec![len], 1.0));
        }
        for proj in Proj::ALL {
            let (n_out, n_in) = proj.dims(c);
            t.insert(
                format!("{p}.{}.weight", proj.path()),
                tensor(vec![n_out, n_in], 0.0),
            );
        }
    }
    t
}

/// Calls of every instruction set's routines so far.
fn snapshot() -> [u64; 4] {
    Isa::ALL.map(calls)
}

/// A prompt batch past one key chunk, decoded tokens and sampling, on
/// `kernel`, with every head precision and every cache type.
fn run_everything(owned: &Owned, kernel: Kernel) {
    let c = config();
    let mut views = MemoryCheckpoint::new();
    for (name, (shape, bytes)) in owned {
        views
            .insert(name.clone(), DType::BF16, shape.clone(), bytes.clone())
            .unwrap();
    }
    let pool = threads::pool(Some(2)).unwrap();
    let ids: Vec<u32> = (0..270u32).map(|i| (i * 37 + 11) % 70).collect();
    for head in HeadPrecision::ALL {
        let (model, _) = load(c.clone(), &views, &pool, head, Packing::I2).unwrap();
        let model = Arc::new(model);
        for kv in KvType::ALL {
            let mut s = Session::with_kernel(model.clone(), None, Some(2), kv, kernel).unwrap();
            s.prefill(&ids).unwrap();
            let params = SamplingParams {
                temperature: 0.8,
                top_k: 20,
                top_p: 0.9,
                ..Default::default()
            };
            let mut sampler = Sampler::new(params, 7).unwrap();
            for _ in 0..3 {
                let next = sampler
                    .sample(s.kernel(), s.last_logits().unwrap(), s.tokens())
                    .unwrap();
                s.push(next).unwrap();
            }
        }
    }
}

/// The instruction sets whose routines `kernel` runs.
fn isas_of(kernel: Kernel) -> &'static [Isa] {
    match kernel {
        Kernel::Scalar => &[],
        Kernel::Avx2 => &[Isa::Avx2],
        Kernel::Avx512Bw => &[Isa::Avx2, Isa::Avx512Bw],
        Kernel::Avx512Vnni => &[Isa::Avx2, Isa::Avx512Vnni],
        Kernel::Neon => &[Isa::Neon],
    }
}

#[test]
fn each_path_runs_its_own_simd_routines_and_scalar_none() {
    let owned = checkpoint(&config());
    // Scalar first, before anything else in this process has run a SIMD routine.
    assert_eq!(snapshot(), [0; 4], "SIMD routines ran before the test");
    run_everything(&owned, Kernel::Scalar);
    assert_eq!(snapshot(), [0; 4], "the scalar path ran SIMD routines");
    for kernel in Kernel::supported() {
        let before = snapshot();
        run_everything(&owned, kernel);
        let after = snapshot();
        for (i, isa) in Isa::ALL.into_iter().enumerate() {
            let ran = after[i] - before[i];
            if isas_of(kernel).contains(&isa) {
                assert!(ran > 0, "{kernel} ran no {isa:?} routine");
            } else {
                assert_eq!(ran, 0, "{kernel} ran {ran} {isa:?} routines");
            }
        }
    }
}
