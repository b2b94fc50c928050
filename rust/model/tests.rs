//! End-to-end checks of the model on a tiny random checkpoint built in
//! memory. The numbers themselves are checked against transformers by the
//! Python tests (tests/fixtures); these check the engine's own invariants.

use std::collections::HashMap;
use std::sync::Arc;

use super::attention::KEY_CHUNK;
use super::config::tiny;
use super::dense::DenseMatrix;
use super::*;
use crate::checkpoint::MemoryCheckpoint;
use crate::kernels::{Kernel, Packing};
use crate::threads;

/// Owned tensors: name → (dtype, shape, bytes).
type Owned = HashMap<String, (DType, Vec<usize>, Vec<u8>)>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Roughly uniform in [-1, 1).
    fn float(&mut self) -> f32 {
        (self.next() % 2000) as f32 / 1000.0 - 1.0
    }
}

fn bf16_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

fn checkpoint(c: &Config, seed: u64) -> Owned {
    let mut rng = Rng(seed | 1);
    let mut t = Owned::new();
    let mut float = |t: &mut Owned, name: String, shape: Vec<usize>, base: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let bytes = bf16_bytes((0..n).map(|_| base + spread * rng.float()));
        t.insert(name, (DType::BF16, shape, bytes));
    };
    float(
        &mut t,
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, c.hidden_size],
        0.0,
        1.0,
    );
    float(
        &mut t,
        "model.norm.weight".into(),
        vec![c.hidden_size],
        1.0,
        0.5,
    );
    if !c.tie_word_embeddings {
        float(
            &mut t,
            "lm_head.weight".into(),
            vec![c.vocab_size, c.hidden_size],
            0.0,
            1.0,
        );
    }
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let mut norms = vec![
            ("input_layernorm", c.hidden_size),
            ("post_attention_layernorm", c.hidden_size),
        ];
        if let Some((attn, ffn)) = c.family.sub_norms() {
            norms.extend([(attn, c.hidden_size), (ffn, c.intermediate_size)]);
        }
        if c.bitlinear_norm_eps.is_some() {
            for proj in Proj::ALL {
                norms.push((proj.path(), proj.dims(c).1));
            }
        }
        for (name, len) in norms {
            let name = if name.ends_with("_proj") {
                format!("{p}.{name}.rms_norm.weight")
            } else {
                format!("{p}.{name}.weight")
            };
            float(&mut t, name, vec![len], 1.0, 0.5);
        }
        for proj in Proj::ALL {
            let (n_out, n_in) = proj.dims(c);
            // Master weights; online models use them directly, offline ones
            // get them packed the Hugging Face way below.
            float(
                &mut t,
                format!("{p}.{}.weight", proj.path()),
                vec![n_out, n_in],
                0.0,
                1.0,
            );
        }
    }
    if c.quantization_mode == QuantizationMode::Offline {
        pack_all(c, &mut t);
    }
    t
}

/// Replaces float projection masters with HF-packed U8 + weight_scale.
fn pack_all(c: &Config, t: &mut Owned) {
    for l in 0..c.num_layers {
        for proj in Proj::ALL {
            let name = format!("model.layers.{l}.{}.weight", proj.path());
            let (n_out, n_in) = proj.dims(c);
            let (_, shape, bytes) = t.remove(&name).unwrap();
            let raw = RawTensor::new(&name, DType::BF16, &shape, &bytes).unwrap();
            let m = weights::ternarize_absmean(&name, &raw, n_out, n_in).unwrap();
            let w = m.unpack();
            let rows = n_out / 4;
            let mut packed = vec![0u8; rows * n_in];
            for n in 0..n_out {
                for k in 0..n_in {
                    let code = (w[n * n_in + k] + 1) as u8;
                    packed[(n % rows) * n_in + k] |= code << (2 * (n / rows));
                }
            }
            t.insert(name.clone(), (DType::U8, vec![rows, n_in], packed));
            let scale = bf16_bytes(std::iter::once(m.scale()));
            t.insert(format!("{name}_scale"), (DType::BF16, vec![1], scale));
        }
    }
}

fn build(c: &Config, owned: &Owned) -> crate::Result<(Model, Vec<String>)> {
    build_with(c, owned, HeadPrecision::AsStored)
}

fn build_with(
    c: &Config,
    owned: &Owned,
    head: HeadPrecision,
) -> crate::Result<(Model, Vec<String>)> {
    build_packed(c, owned, head, Packing::I2)
}

fn build_packed(
    c: &Config,
    owned: &Owned,
    head: HeadPrecision,
    packing: Packing,
) -> crate::Result<(Model, Vec<String>)> {
    let mut checkpoint = MemoryCheckpoint::new();
    for (name, (dtype, shape, bytes)) in owned {
        checkpoint
            .insert(name.clone(), *dtype, shape.clone(), bytes.clone())
            .unwrap();
    }
    load(
        c.clone(),
        &checkpoint,
        &threads::pool(Some(2)).unwrap(),
        head,
        packing,
    )
}

fn model(c: &Config) -> Arc<Model> {
    let (m, warnings) = build(c, &checkpoint(c, 5)).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    Arc::new(m)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn decoding_with_the_cache_equals_the_full_pass() {
    let cases = [
        (QuantizationMode::Offline, KvType::F32),
        (QuantizationMode::Online, KvType::F32),
        (QuantizationMode::Offline, KvType::F16),
    ];
    for (mode, kv) in cases {
        let c = Config {
            quantization_mode: mode,
            ..tiny()
        };
        let m = model(&c);
        let ids = [3u32, 17, 0, 39, 8, 8, 21];
        let vocab = c.vocab_size;
        let mut full = Session::new(m.clone(), None, Some(2), kv).unwrap();
        let all = full.logits(&ids).unwrap();
        assert_eq!(all.len(), ids.len() * vocab);
        assert!(all.iter().all(|v| v.is_finite()));
        // The batch splits its work by thread count; the result does not change.
        for threads in [1, 3] {
            let mut other = Session::new(m.clone(), None, Some(threads), kv).unwrap();
            assert_eq!(other.logits(&ids).unwrap(), all, "{threads} threads");
        }
        // Prompt of 3, then one token at a time (with more than one thread,
        // decoding keeps helper threads spinning: a path of its own).
        for threads in [1, 2, 3] {
            let mut s = Session::new(m.clone(), Some(16), Some(threads), kv).unwrap();
            assert_eq!(s.prefill(&ids[..3]).unwrap(), 3);
            assert_eq!(s.last_logits().unwrap(), &all[2 * vocab..3 * vocab]);
            for (i, &id) in ids.iter().enumerate().skip(3) {
                s.push(id).unwrap();
                // Integer dots are exact and every token's float work is the
                // same code, so batch and step agree to the bit.
                assert_eq!(
                    s.last_logits().unwrap(),
                    &all[i * vocab..(i + 1) * vocab],
                    "token {i}, {threads} threads"
                );
            }
            assert_eq!(s.tokens(), &ids);
        }
    }
}

/// A Llama-family model (Falcon3-1.58bit's shape of block): BitLinear
/// scales, SiLU, no sub-norms, an untied head, head_dim not hidden / heads,
/// and Llama 3 RoPE scaling.
fn llama_tiny() -> Config {
    Config {
        family: Family::Llama,
        head_dim: 6,
        tie_word_embeddings: false,
        linear_class: LinearClass::BitLinear,
        rope_scaling: Some(config::Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        }),
        ..tiny()
    }
}

#[test]
fn other_families_decode_as_they_run_a_batch() {
    let one_bit = Config {
        family: Family::OneBitLlm,
        quantization_mode: QuantizationMode::Online,
        tie_word_embeddings: false,
        ..tiny()
    };
    let with_norms = Config {
        bitlinear_norm_eps: Some(1e-6),
        ..llama_tiny()
    };
    for c in [llama_tiny(), one_bit, with_norms] {
        let m = model(&c);
        assert_eq!(
            m.layers[0].attn_sub_norm.is_some(),
            c.family.sub_norms().is_some()
        );
        assert!(m.lm_head.is_some());
        assert_eq!(
            m.layers[1].bitlinear_norm(Proj::Down).map(<[f32]>::len),
            c.bitlinear_norm_eps.map(|_| c.intermediate_size)
        );
        let ids = [3u32, 17, 0, 39, 8, 8, 21];
        let vocab = c.vocab_size;
        let all = Session::new(m.clone(), None, Some(2), KvType::F32)
            .unwrap()
            .logits(&ids)
            .unwrap();
        assert!(all.iter().all(|v| v.is_finite()));
        let mut s = Session::new(m.clone(), Some(16), Some(2), KvType::F32).unwrap();
        s.prefill(&ids[..2]).unwrap();
        for (i, &id) in ids.iter().enumerate().skip(2) {
            s.push(id).unwrap();
            assert_eq!(s.last_logits().unwrap(), &all[i * vocab..(i + 1) * vocab]);
        }
    }
}

#[test]
fn llama_checkpoints_need_their_head_and_no_sub_norms() {
    let c = llama_tiny();
    let mut t = checkpoint(&c, 9);
    t.remove("lm_head.weight");
    let err = build(&c, &t).unwrap_err().to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
    // A BitNet checkpoint read as Llama: its sub-norms are reported unused.
    let bitnet = checkpoint(
        &Config {
            linear_class: LinearClass::BitLinear,
            ..tiny()
        },
        9,
    );
    let c = Config {
        head_dim: 4,
        rope_scaling: None,
        tie_word_embeddings: true,
        ..c
    };
    let (_, warnings) = build(&c, &bitnet).unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("attn_sub_norm")),
        "{warnings:?}"
    );
    // use_rms_norm without the norms' weights: ones, and a warning.
    let c = Config {
        bitlinear_norm_eps: Some(1e-6),
        ..c
    };
    let (m, warnings) = build(&c, &bitnet).unwrap();
    assert_eq!(m.layers[0].bitlinear_norm(Proj::Q), Some(&[1.0f32; 16][..]));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("q_proj.rms_norm.weight\" is absent")),
        "{warnings:?}"
    );
}

#[test]
fn prefix_reuse_processes_only_new_tokens() {
    let c = tiny();
    let m = model(&c);
    let mut s = Session::new(m.clone(), None, Some(2), KvType::F32).unwrap();
    assert_eq!(s.prefill(&[1, 2, 3, 4]).unwrap(), 4);
    assert_eq!(s.prefill(&[1, 2, 3, 4, 5, 6]).unwrap(), 2);
    let reused = s.last_logits().unwrap().to_vec();
    // Same input again: only the last token is recomputed.
    assert_eq!(s.prefill(&[1, 2, 3, 4, 5, 6]).unwrap(), 1);
    assert_eq!(s.last_logits().unwrap(), &reused[..]);
    // Diverging at position 2: positions 2.. are recomputed.
    assert_eq!(s.prefill(&[1, 2, 9, 4]).unwrap(), 2);
    let mut fresh = Session::new(m, None, Some(2), KvType::F32).unwrap();
    fresh.prefill(&[1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(max_diff(fresh.last_logits().unwrap(), &reused), 0.0);
}

#[test]
fn long_prompts_run_in_batches() {
    let c = Config {
        max_position_embeddings: 2 * session::MAX_BATCH + 40,
        ..tiny()
    };
    let m = model(&c);
    let ids: Vec<u32> = (0..session::MAX_BATCH as u32 + 30)
        .map(|i| (i * 7) % 40)
        .collect();
    let mut a = Session::new(m.clone(), None, Some(2), KvType::F32).unwrap();
    let all = a.logits(&ids).unwrap();
    let mut b = Session::new(m, None, Some(2), KvType::F32).unwrap();
    b.prefill(&ids).unwrap();
    let last = &all[(ids.len() - 1) * c.vocab_size..];
    assert_eq!(b.last_logits().unwrap(), last);
}

#[test]
fn refuses_bad_input_before_any_work() {
    let c = tiny();
    let m = model(&c);
    let mut s = Session::new(m.clone(), Some(4), Some(1), KvType::F32).unwrap();
    let err = s.prefill(&[1, 2, 3, 4, 5]).unwrap_err();
    assert!(err.to_string().contains("n_ctx = 4"), "{err}");
    assert!(s.tokens().is_empty());
    assert!(s.prefill(&[]).is_err());
    assert!(s
        .prefill(&[40])
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    s.prefill(&[1, 2, 3, 4]).unwrap();
    assert!(s.push(5).unwrap_err().to_string().contains("full"));
    assert!(Session::new(m.clone(), Some(0), None, KvType::F32).is_err());
    assert!(Session::new(m, Some(c.max_position_embeddings + 1), None, KvType::F32).is_err());
}

#[test]
fn loading_names_the_faulty_tensor() {
    let c = tiny();
    let good = checkpoint(&c, 9);
    let mut t = good.clone();
    t.remove("model.layers.1.mlp.up_proj.weight_scale");
    let err = build(&c, &t).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor \"model.layers.1.mlp.up_proj.weight_scale\""),
        "{err}"
    );

    let mut t = good.clone();
    t.get_mut("model.norm.weight").unwrap().1 = vec![c.hidden_size / 2, 2];
    let err = build(&c, &t).unwrap_err().to_string();
    assert!(
        err.contains("\"model.norm.weight\" has shape [8, 2]"),
        "{err}"
    );

    let mut t = good.clone();
    let e = t.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
    e.0 = DType::BF16;
    e.1 = vec![e.2.len() / 2];
    let err = build(&c, &t).unwrap_err().to_string();
    assert!(
        err.contains("k_proj.weight") && err.contains("must be U8"),
        "{err}"
    );

    // An all-zero tensor and an extra tensor load, with warnings.
    let mut t = good;
    let e = t.get_mut("model.layers.0.mlp.ffn_sub_norm.weight").unwrap();
    e.2.iter_mut().for_each(|b| *b = 0);
    t.insert("lm_head.weight".into(), (DType::BF16, vec![1], vec![0, 0]));
    let (_, warnings) = build(&c, &t).unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings
        .iter()
        .any(|w| w.contains("ffn_sub_norm.weight\" is all zeros")));
    assert!(warnings.iter().any(|w| w.contains("lm_head.weight")));
}

#[test]
fn bitlinear_divides_by_the_stored_scale() {
    // The same ternary weights stored with 1/mean|W| under "bitlinear" must
    // give the same model as mean|W| under "autobitlinear".
    let c = tiny();
    let auto = checkpoint(&c, 13);
    let mut inverse = auto.clone();
    for (name, (_, _, bytes)) in inverse.iter_mut() {
        if name.ends_with("weight_scale") {
            let v = f32::from_bits(u32::from(u16::from_le_bytes([bytes[0], bytes[1]])) << 16);
            *bytes = bf16_bytes(std::iter::once(1.0 / v));
        }
    }
    let bit = Config {
        linear_class: LinearClass::BitLinear,
        ..c.clone()
    };
    let (a, _) = build(&c, &auto).unwrap();
    let (b, _) = build(&bit, &inverse).unwrap();
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for p in Proj::ALL {
            let (sa, sb) = (la.proj(p).scale(), lb.proj(p).scale());
            // bf16 rounding of the stored inverse: within 2^-8 relative.
            assert!((sa - sb).abs() <= sa * 0.008, "{p:?}: {sa} vs {sb}");
            assert_eq!(la.proj(p).unpack(), lb.proj(p).unpack());
        }
    }
}

#[test]
fn an_int8_head_is_quantized_straight_from_the_checkpoint() {
    let c = tiny();
    let owned = checkpoint(&c, 7);
    let (exact, _) = build(&c, &owned).unwrap();
    let (int8, _) = build_with(&c, &owned, HeadPrecision::Int8).unwrap();
    // The same codes and scales as requantizing the loaded bf16 matrix.
    let (
        DenseMatrix::Int8 { codes, scales, .. },
        DenseMatrix::Int8 {
            codes: c2,
            scales: s2,
            ..
        },
    ) = (&int8.embed, &exact.embed.to_int8().unwrap())
    else {
        panic!("the tied head is not int8");
    };
    assert_eq!(codes, c2);
    assert_eq!(scales, s2);
    assert!(int8.weight_bytes() < exact.weight_bytes());
    assert_logits_near_the_exact_head(exact, int8);
}

/// The logits of a few tokens with a quantized head stay within a quarter of
/// the spread of the exact head's.
fn assert_logits_near_the_exact_head(exact: Model, quantized: Model) {
    let ids = [1u32, 5, 9];
    let mut a = Session::new(Arc::new(exact), None, Some(1), KvType::F32).unwrap();
    let mut b = Session::new(Arc::new(quantized), None, Some(1), KvType::F32).unwrap();
    let (la, lb) = (a.logits(&ids).unwrap(), b.logits(&ids).unwrap());
    let spread = la.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        max_diff(&la, &lb) < 0.25 * spread,
        "{} vs {spread}",
        max_diff(&la, &lb)
    );
}

#[test]
fn a_q6_head_is_quantized_straight_from_the_checkpoint() {
    // Hidden 128: whole groups of 64 (a narrower row is padded to one).
    let c = wide();
    let owned = checkpoint(&c, 7);
    let (exact, _) = build(&c, &owned).unwrap();
    let (int8, _) = build_with(&c, &owned, HeadPrecision::Int8).unwrap();
    let (q6, _) = build_with(&c, &owned, HeadPrecision::Q6).unwrap();
    // The same rows as requantizing the loaded bf16 matrix.
    let (DenseMatrix::Q6(got), DenseMatrix::Q6(want)) = (&q6.embed, &exact.embed.to_q6().unwrap())
    else {
        panic!("the tied head is not q6");
    };
    assert_eq!(got, want);
    // Fewer bytes than int8, in memory and read per token (the tied head
    // is read whole; its embedding rows are not counted apart).
    assert!(q6.weight_bytes() < int8.weight_bytes());
    assert_eq!(
        int8.bytes_per_token() - q6.bytes_per_token(),
        int8.head().nbytes() - q6.head().nbytes()
    );
    // Logits stay as close to the exact head's as the int8 head's test asks.
    assert_logits_near_the_exact_head(exact, q6);
}

#[test]
fn head_precisions_round_trip_their_names() {
    for head in HeadPrecision::ALL {
        assert_eq!(HeadPrecision::parse(head.name()).unwrap(), head);
    }
    let err = HeadPrecision::parse("int4").unwrap_err().to_string();
    assert!(err.contains("\"q6\""), "{err}");
}

#[test]
fn an_f16_cache_is_close_to_the_f32_one_and_half_its_size() {
    let c = tiny();
    let m = model(&c);
    let ids = [3u32, 17, 0, 39, 8, 8, 21, 5, 5, 30];
    let mut exact = Session::new(m.clone(), Some(32), Some(1), KvType::F32).unwrap();
    let mut half = Session::new(m, Some(32), Some(1), KvType::F16).unwrap();
    assert_eq!(half.kv_type(), KvType::F16);
    assert_eq!(2 * half.cache_bytes(), exact.cache_bytes());
    let (a, b) = (exact.logits(&ids).unwrap(), half.logits(&ids).unwrap());
    let spread = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        max_diff(&a, &b) < 0.05 * spread,
        "{} vs {spread}",
        max_diff(&a, &b)
    );
}

/// Every last-token logit row of `ids`: a prompt of one, then one at a time.
fn decode_all(m: &Arc<Model>, ids: &[u32], threads: usize) -> Vec<f32> {
    let mut s = Session::new(m.clone(), None, Some(threads), KvType::F16).unwrap();
    s.prefill(&ids[..1]).unwrap();
    let mut rows = s.last_logits().unwrap().to_vec();
    for &id in &ids[1..] {
        s.push(id).unwrap();
        rows.extend_from_slice(s.last_logits().unwrap());
    }
    rows
}

#[test]
fn concurrent_decodes_on_one_pool_finish_and_agree() {
    // Sessions with the same thread count share a pool, and decoding keeps
    // helper threads spinning on it: several sessions decoding at once once
    // deadlocked (a helper stacked on a task that its own token waited for).
    // Wide enough that every matmul is split into tasks (tiny() runs inline).
    let c = Config {
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 768,
        head_dim: 64,
        ..tiny()
    };
    let m = model(&c);
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 512).collect();
    let reference = decode_all(&m, &ids, 2);
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..4 {
        let (m, tx, ids) = (m.clone(), tx.clone(), ids.clone());
        std::thread::spawn(move || {
            for _ in 0..40 {
                if tx.send(decode_all(&m, &ids, 2)).is_err() {
                    return;
                }
            }
        });
    }
    for _ in 0..4 * 40 {
        let rows = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("concurrent decoding stalled");
        assert_eq!(rows, reference);
    }
}

#[test]
fn scoring_reduces_the_logits_rows_it_would_return() {
    let c = Config {
        max_position_embeddings: session::MAX_BATCH + 40,
        ..tiny()
    };
    let m = model(&c);
    let vocab = c.vocab_size;
    // Longer than a batch, so that a first position past the first batch
    // skips that batch's rows.
    let ids: Vec<u32> = (0..session::MAX_BATCH as u32 + 20)
        .map(|i| (i * 11 + 3) % 40)
        .collect();
    let mut s = Session::new(m.clone(), None, Some(2), KvType::F32).unwrap();
    let all = s.logits(&ids).unwrap(); // [len, vocab]
    let nll_of = |p: usize| {
        let row: Vec<f64> = all[(p - 1) * vocab..p * vocab]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[ids[p] as usize]
    };
    for first in [1, 5, session::MAX_BATCH + 3, ids.len() - 1] {
        let want: f64 = (first..ids.len()).map(nll_of).sum();
        for threads in [1, 3] {
            let mut t = Session::new(m.clone(), None, Some(threads), KvType::F32).unwrap();
            let got = t.nll(&ids, first).unwrap();
            assert!(
                (got - want).abs() <= 1e-9 * want,
                "first {first}: {got} vs {want}"
            );
            // The session holds the input and the logits after it, as after `logits`.
            assert_eq!(t.tokens(), &ids[..]);
            assert_eq!(t.last_logits().unwrap(), &all[(ids.len() - 1) * vocab..]);
        }
    }
    for bad in [0, ids.len()] {
        let err = s.nll(&ids, bad).unwrap_err().to_string();
        assert!(err.contains("first scored position"), "{err}");
    }
    assert!(s.nll(&[7], 1).is_err());
}

/// A model just big enough for every SIMD routine to run whole vectors:
/// head_dim 32, rows of 128 and 160 inputs, a context past one key chunk.
fn wide() -> Config {
    Config {
        vocab_size: 70,
        hidden_size: 128,
        intermediate_size: 160,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        max_position_embeddings: 320,
        ..tiny()
    }
}

/// Logits of a 7-token prompt in one batch, then of a 270-token prompt (two
/// key chunks) and 3 decoded tokens, on `kernel`: (batch logits, decoded logits).
fn forward_on(m: &Arc<Model>, kernel: Kernel, kv: KvType) -> (Vec<f32>, Vec<f32>) {
    let vocab = m.config.vocab_size as u32;
    let ids: Vec<u32> = (0..273u32).map(|i| (i * 37 + 11) % vocab).collect();
    let mut s = Session::with_kernel(m.clone(), None, Some(2), kv, kernel).unwrap();
    let batch = s.logits(&ids[..7]).unwrap();
    let mut d = Session::with_kernel(m.clone(), None, Some(2), kv, kernel).unwrap();
    d.prefill(&ids[..270]).unwrap();
    let mut decoded = d.last_logits().unwrap().to_vec();
    for &id in &ids[270..] {
        d.push(id).unwrap();
        decoded.extend_from_slice(d.last_logits().unwrap());
    }
    (batch, decoded)
}

/// A whole forward pass on every path equals the scalar path's: bit for bit
/// with the int8 and the q6 head (integer dots, attention and half
/// conversions are exact on every path), and within `BF16_HEAD_REL_TOL` of
/// the logits' spread with the bf16 head (its dots add the same products in
/// another order).
#[test]
fn every_kernel_path_runs_the_model_as_scalar_does() {
    const BF16_HEAD_REL_TOL: f32 = 1e-5;
    let c = wide();
    let owned = checkpoint(&c, 11);
    let int8 = Arc::new(build_with(&c, &owned, HeadPrecision::Int8).unwrap().0);
    let q6 = Arc::new(build_with(&c, &owned, HeadPrecision::Q6).unwrap().0);
    let bf16 = Arc::new(build(&c, &owned).unwrap().0);
    for kv in KvType::ALL {
        let want_int8 = forward_on(&int8, Kernel::Scalar, kv);
        let want_q6 = forward_on(&q6, Kernel::Scalar, kv);
        let want_bf16 = forward_on(&bf16, Kernel::Scalar, kv);
        let spread = want_bf16.0.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for kernel in Kernel::supported() {
            assert!(
                forward_on(&int8, kernel, kv) == want_int8,
                "{kernel} {kv:?}"
            );
            assert!(forward_on(&q6, kernel, kv) == want_q6, "{kernel} {kv:?} q6");
            let (batch, decoded) = forward_on(&bf16, kernel, kv);
            let diff = max_diff(&batch, &want_bf16.0).max(max_diff(&decoded, &want_bf16.1));
            assert!(
                diff <= BF16_HEAD_REL_TOL * spread,
                "{kernel} {kv:?}: {diff} vs {spread}"
            );
        }
    }
    let unsupported = Kernel::ALL.into_iter().find(|k| !k.is_supported());
    if let Some(kernel) = unsupported {
        assert!(Session::with_kernel(int8, None, Some(1), KvType::F16, kernel).is_err());
    }
}

/// Greedy next token: the first largest logit.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `n` greedy tokens after `prompt` in a session of its own, with the
/// logits each was picked from.
fn alone(m: &Arc<Model>, prompt: &[u32], n: usize, threads: usize) -> Vec<(u32, Vec<f32>)> {
    let mut s = Session::new(m.clone(), None, Some(threads), KvType::F16).unwrap();
    s.prefill(prompt).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = s.last_logits().unwrap().to_vec();
        let next = argmax(&logits);
        out.push((next, logits));
        s.push(next).unwrap();
    }
    out
}

#[test]
fn a_sequence_in_a_batch_gets_the_logits_it_gets_alone() {
    // Room for a prompt longer than a chunk of keys, so that a decoding
    // token's attention merges several chunks.
    let c = Config {
        max_position_embeddings: KEY_CHUNK + 64,
        ..tiny()
    };
    let m = model(&c);
    let long: Vec<u32> = (0..KEY_CHUNK as u32 + 20).map(|i| (i * 7) % 40).collect();
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5], &[7, 8, 9], &long];
    for threads in [1, 2] {
        let want: Vec<_> = prompts.iter().map(|p| alone(&m, p, 6, threads)).collect();
        let mut e = Engine::new(
            m.clone(),
            3,
            None,
            Some(threads),
            KvType::F16,
            Kernel::active().unwrap(),
        )
        .unwrap();
        let slots: Vec<usize> = prompts.iter().map(|p| e.acquire(p).unwrap()).collect();
        let mut got: Vec<Vec<(u32, Vec<f32>)>> = vec![Vec::new(); 3];
        // Step 0: the first two prompts (one in two chunks, over steps 0
        // and 1); the third joins at step 2 while the others decode.
        let mut next: Vec<Option<u32>> = vec![None; 3];
        for step in 0..9 {
            let mut owned: Vec<(usize, Vec<u32>, bool)> = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let start = [0, 0, 2][i];
                if step < start || got[i].len() == 6 {
                    continue;
                }
                let ids = match (i, step - start, next[i]) {
                    (0, 0, _) => (p[..2].to_vec(), false),
                    (0, 1, _) => (p[2..].to_vec(), true),
                    (_, 0, _) => (p.to_vec(), true),
                    (_, _, Some(t)) => (vec![t], true),
                    _ => unreachable!(),
                };
                owned.push((slots[i], ids.0, ids.1));
            }
            let work: Vec<Work<'_>> = owned
                .iter()
                .map(|(slot, ids, logits)| Work {
                    slot: *slot,
                    ids,
                    logits: *logits,
                })
                .collect();
            e.step(&work).unwrap();
            for (i, &slot) in slots.iter().enumerate() {
                if owned.iter().any(|(s, _, l)| *s == slot && *l) {
                    let logits = e.last_logits(slot).unwrap().unwrap().to_vec();
                    let t = argmax(&logits);
                    got[i].push((t, logits));
                    next[i] = Some(t);
                }
            }
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "sequence {i}");
            for (k, (a, b)) in g.iter().zip(w).enumerate() {
                assert_eq!(a.0, b.0, "sequence {i}, token {k}, {threads} threads");
                assert_eq!(max_diff(&a.1, &b.1), 0.0, "sequence {i}, token {k}");
            }
        }
    }
}

#[test]
fn a_new_sequence_reuses_a_prefix_another_slot_computed() {
    let c = tiny();
    let m = model(&c);
    let kernel = Kernel::active().unwrap();
    let mut e = Engine::new(m.clone(), 2, None, Some(2), KvType::F32, kernel).unwrap();
    let system: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let a = e.acquire(&system).unwrap();
    assert_eq!(e.tokens(a).unwrap(), &[] as &[u32]);
    e.step(&[Work {
        slot: a,
        ids: &system,
        logits: true,
    }])
    .unwrap();
    // A second sequence with the same start, while the first still runs:
    // its slot gets the shared positions copied, short of its last token.
    let prompt: Vec<u32> = [&system[..], &[7, 7]].concat();
    let b = e.acquire(&prompt).unwrap();
    assert_ne!(a, b);
    assert_eq!(e.tokens(b).unwrap(), &system[..]);
    e.step(&[Work {
        slot: b,
        ids: &prompt[system.len()..],
        logits: true,
    }])
    .unwrap();
    let mut fresh = Session::new(m, None, Some(2), KvType::F32).unwrap();
    fresh.prefill(&prompt).unwrap();
    assert_eq!(
        e.last_logits(b).unwrap().unwrap(),
        fresh.last_logits().unwrap()
    );
    // Every slot is held: a third sequence is refused, by name.
    let err = e.acquire(&[1]).unwrap_err();
    assert!(
        err.to_string().contains("all 2 sequence slots are in use"),
        "{err}"
    );
    // A released slot keeps its tokens for the next sequence that starts with them.
    e.release(a).unwrap();
    assert_eq!(e.acquire(&[3, 1, 4, 8]).unwrap(), a);
    assert_eq!(e.tokens(a).unwrap(), &[3, 1, 4]);
}

#[test]
fn a_step_is_checked_whole_before_any_work() {
    let c = tiny();
    let m = model(&c);
    let kernel = Kernel::active().unwrap();
    let mut e = Engine::new(m, 2, Some(8), Some(1), KvType::F32, kernel).unwrap();
    let a = e.acquire(&[1, 2]).unwrap();
    let twice = [
        Work {
            slot: a,
            ids: &[1],
            logits: true,
        },
        Work {
            slot: a,
            ids: &[2],
            logits: true,
        },
    ];
    assert!(e.step(&twice).unwrap_err().to_string().contains("twice"));
    let free = 1 - a;
    let not_held = [Work {
        slot: free,
        ids: &[1],
        logits: true,
    }];
    assert!(e
        .step(&not_held)
        .unwrap_err()
        .to_string()
        .contains("not held"));
    let too_long = [Work {
        slot: a,
        ids: &[1; 9],
        logits: true,
    }];
    assert!(e.step(&too_long).is_err());
    let missing = [Work {
        slot: 5,
        ids: &[1],
        logits: true,
    }];
    assert!(e
        .step(&missing)
        .unwrap_err()
        .to_string()
        .contains("does not exist"));
    assert!(e.tokens(a).unwrap().is_empty());
    assert!(Engine::new(e.model().clone(), 0, None, None, KvType::F32, kernel).is_err());
}

/// A model whose projections are packed as tq1 or tl computes the same
/// integer dots as the 2-bit one, so its logits are the same bits: a prompt
/// (the GEMM, in small- and large-batch sizes) and decoding (the GEMV; for
/// tl the table lookups). tq1 reads 52 bytes per 256 weights instead of 64,
/// tl 64 per 5 weights of 64 rows.
#[test]
fn smaller_packings_give_the_same_logits() {
    for packing in [Packing::Tq1, Packing::Tl] {
        same_logits_when_packed(packing);
    }
}

fn same_logits_when_packed(packing: Packing) {
    let c = tiny();
    let i2 = model(&c);
    // Loaded straight into the packing, layer by layer.
    let (small, warnings) =
        build_packed(&c, &checkpoint(&c, 5), HeadPrecision::AsStored, packing).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(small.packing(), packing);
    for (a, b) in i2.layers.iter().zip(&small.layers) {
        for p in Proj::ALL {
            let (a, b) = (a.proj(p), b.proj(p));
            assert_eq!(b.packing(), packing, "{p:?}");
            assert_eq!(a.unpack(), b.unpack(), "{p:?}");
            let bytes = match packing {
                Packing::Tq1 => a.n_out() * a.n_in().div_ceil(256) * 52,
                _ => a.n_out().div_ceil(64) * a.n_in().div_ceil(5) * 64,
            };
            assert_eq!(b.packed_bytes(), bytes, "{p:?}");
            assert_eq!(packing.matrix_bytes(a.n_out(), a.n_in()), Some(bytes));
            assert_eq!(
                Packing::I2.matrix_bytes(a.n_out(), a.n_in()),
                Some(a.packed_bytes())
            );
        }
    }
    let small = Arc::new(small);
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % c.vocab_size as u32).collect();
    for len in [5, ids.len()] {
        let ids = &ids[..len];
        let mut a = Session::new(i2.clone(), None, Some(2), KvType::F32).unwrap();
        let mut b = Session::new(small.clone(), None, Some(2), KvType::F32).unwrap();
        assert_eq!(
            a.logits(ids).unwrap(),
            b.logits(ids).unwrap(),
            "{len} tokens ({packing:?})"
        );
    }
    let mut a = Session::new(i2, Some(16), Some(2), KvType::F32).unwrap();
    let mut b = Session::new(small, Some(16), Some(2), KvType::F32).unwrap();
    a.prefill(&ids[..3]).unwrap();
    b.prefill(&ids[..3]).unwrap();
    for &id in &ids[3..10] {
        a.push(id).unwrap();
        b.push(id).unwrap();
        assert_eq!(
            a.last_logits().unwrap(),
            b.last_logits().unwrap(),
            "{packing:?}"
        );
    }
}

/// The memory probe counts the projections at their packed size from the
/// config: a layer count far beyond the file's is refused at once (the
/// probe multiplies, it never walks the layers). Which tensors it counts
/// that way: the projections' weights of the config's layers only.
#[test]
fn the_memory_probe_refuses_a_layer_count_beyond_memory_at_once() {
    let c = tiny();
    let owned = checkpoint(&c, 5);
    let mut huge = c.clone();
    huge.num_layers = 1 << 40;
    let start = std::time::Instant::now();
    let err = build_packed(&huge, &owned, HeadPrecision::AsStored, Packing::Tl).unwrap_err();
    assert!(matches!(err, crate::TritError::OutOfMemory(_)), "{err}");
    assert!(start.elapsed().as_secs() < 5);
    assert!(super::weights::is_projection(
        &c,
        "model.layers.1.mlp.down_proj.weight"
    ));
    assert!(!super::weights::is_projection(
        &c,
        "model.layers.1.mlp.down_proj.weight_scale"
    ));
    assert!(!super::weights::is_projection(
        &c,
        "model.layers.99.self_attn.q_proj.weight"
    ));
    assert!(!super::weights::is_projection(
        &c,
        "model.embed_tokens.weight"
    ));
}

/// Random weights amplify every rounding (an f16 cache moves these logits by
/// about 5 % of their spread); q8_0's codes are coarser than f16's mantissa
/// (a step of max|x| / 127 over a block of 32, against 2^-10 of each value)
/// and move them further, by no more than 8 times as far (measured: 5.9).
#[test]
fn a_q8_0_cache_moves_logits_at_most_8_times_as_far_as_f16_at_34_bytes_per_32_values() {
    let m = model(&wide());
    let ids = [3u32, 17, 0, 39, 8, 8, 21, 5, 5, 30, 64, 1];
    let session = |kv| Session::new(m.clone(), Some(32), Some(1), kv).unwrap();
    let (mut exact, mut half, mut q8) = (
        session(KvType::F32),
        session(KvType::F16),
        session(KvType::Q8_0),
    );
    assert_eq!(q8.kv_type(), KvType::Q8_0);
    // f32: 128 bytes per 32 values.
    assert_eq!(128 * q8.cache_bytes(), 34 * exact.cache_bytes());
    let a = exact.logits(&ids).unwrap();
    let f16_moved = max_diff(&a, &half.logits(&ids).unwrap());
    let q8_moved = max_diff(&a, &q8.logits(&ids).unwrap());
    assert!(
        f16_moved > 0.0 && q8_moved > f16_moved,
        "{q8_moved} vs {f16_moved}"
    );
    assert!(q8_moved <= 8.0 * f16_moved, "{q8_moved} vs {f16_moved}");
}

#[test]
fn a_q8_0_cache_needs_a_head_size_of_whole_blocks() {
    let m = model(&tiny()); // head_dim 4
    let err = Session::new(m, Some(8), Some(1), KvType::Q8_0)
        .err()
        .expect("head_dim 4 is refused");
    let text = err.to_string();
    assert!(
        text.contains("\"q8_0\"") && text.contains("head_dim (4)"),
        "{text}"
    );
}

#[test]
fn a_q8_0_prefix_another_slot_computed_gives_a_fresh_sequence_s_logits() {
    let m = model(&wide());
    let kernel = Kernel::active().unwrap();
    let mut e = Engine::new(m.clone(), 2, Some(64), Some(2), KvType::Q8_0, kernel).unwrap();
    let system: Vec<u32> = (0..40u32).map(|i| (i * 13 + 5) % 70).collect();
    let a = e.acquire(&system).unwrap();
    e.step(&[Work {
        slot: a,
        ids: &system,
        logits: true,
    }])
    .unwrap();
    let prompt: Vec<u32> = [&system[..], &[7, 9]].concat();
    let b = e.acquire(&prompt).unwrap();
    assert_eq!(e.tokens(b).unwrap(), &system[..]);
    e.step(&[Work {
        slot: b,
        ids: &prompt[system.len()..],
        logits: true,
    }])
    .unwrap();
    let mut fresh = Session::with_kernel(m, Some(64), Some(2), KvType::Q8_0, kernel).unwrap();
    fresh.prefill(&prompt).unwrap();
    assert_eq!(
        e.last_logits(b).unwrap().unwrap(),
        fresh.last_logits().unwrap()
    );
}

#[test]
fn sampling_many_slots_at_once_draws_what_one_after_another_draws() {
    use crate::sampling::{Sampler, SamplingParams};
    let m = model(&tiny());
    let kernel = Kernel::active().unwrap();
    let mut e = Engine::new(m, 3, None, Some(2), KvType::F32, kernel).unwrap();
    let slots: Vec<usize> = (0..3).map(|_| e.acquire(&[]).unwrap()).collect();
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5, 6, 7], &[8, 9]];
    let work: Vec<Work<'_>> = slots
        .iter()
        .zip(prompts)
        .map(|(&slot, ids)| Work {
            slot,
            ids,
            logits: true,
        })
        .collect();
    e.step(&work).unwrap();
    let params = [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.9,
            top_p: 0.8,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_k: 5,
            repetition_penalty: 1.2,
            ..SamplingParams::default()
        },
    ];
    // Slot 1 twice, with two samplers: each draws from its own state.
    let requests = [(slots[0], 0), (slots[1], 1), (slots[2], 2), (slots[1], 2)];
    let samplers = |seed: u64| -> Vec<Sampler> {
        requests
            .iter()
            .enumerate()
            .map(|(i, &(_, p))| Sampler::new(params[p], seed + i as u64).unwrap())
            .collect()
    };
    for seed in 0..20 {
        let (mut together, mut apart) = (samplers(seed), samplers(seed));
        for _ in 0..3 {
            let mut pairs: Vec<(usize, &mut Sampler)> = requests
                .iter()
                .zip(together.iter_mut())
                .map(|(&(slot, _), s)| (slot, s))
                .collect();
            let got = e.sample_many(&mut pairs).unwrap();
            let want: Vec<u32> = requests
                .iter()
                .zip(apart.iter_mut())
                .map(|(&(slot, _), s)| {
                    let logits = e.last_logits(slot).unwrap().unwrap();
                    s.sample(kernel, logits, e.tokens(slot).unwrap()).unwrap()
                })
                .collect();
            assert_eq!(got, want, "seed {seed}");
        }
    }
    // One pair alone, sampled on the calling thread.
    let (mut one, mut other) = (samplers(5), samplers(5));
    for _ in 0..5 {
        let got = e.sample_many(&mut [(slots[2], &mut one[2])]).unwrap();
        let logits = e.last_logits(slots[2]).unwrap().unwrap();
        let want = other[2].sample(kernel, logits, e.tokens(slots[2]).unwrap());
        assert_eq!(got, vec![want.unwrap()]);
    }
    // A slot with nothing to sample from, or none at all, is named.
    let idle = Engine::new(e.model().clone(), 2, None, Some(1), KvType::F32, kernel).unwrap();
    let mut s = Sampler::new(SamplingParams::default(), 0).unwrap();
    let err = idle
        .sample_many(&mut [(1, &mut s)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("slot 1 has no logits"), "{err}");
    let err = idle
        .sample_many(&mut [(5, &mut s)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("slot 5 does not exist"), "{err}");
    assert!(idle.sample_many(&mut []).unwrap().is_empty());
}
