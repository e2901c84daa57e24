//! The fused cross-entropy (`dapt_worker::fused::loss`) on the CPU backend against the
//! decomposed reference it replaced (the whole `[n, vocab]` logits, an f32 log-softmax, the
//! targets gathered): the loss, the gradients of the hidden states and of the head (also tied
//! to an embedding), on vocabularies in one chunk, in several, and in chunks that do not
//! divide them; and its gradient against a float64 finite difference computed on the host.

use burn::backend::Autodiff;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use dapt_worker::fused::loss::{
    cross_entropy_sum, default_chunk, reference_cross_entropy_sum, CHUNK_ALIGN,
};
use dapt_worker::Cpu;

mod support;
use support::Rng;

type Ad = Autodiff<Cpu>;

/// One problem: `n` rows of `d` features, a `vocab`-entry head, chunks of `chunk` columns.
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    d: usize,
    vocab: usize,
    chunk: usize,
    seed: u64,
}

const CASES: [Case; 6] = [
    // One chunk (the default for a small vocabulary).
    Case {
        n: 13,
        d: 32,
        vocab: 97,
        chunk: 97,
        seed: 1,
    },
    // A chunk larger than the vocabulary.
    Case {
        n: 5,
        d: 8,
        vocab: 33,
        chunk: 1000,
        seed: 2,
    },
    // Several chunks, the last one shorter (50 = 3 * 16 + 2).
    Case {
        n: 7,
        d: 16,
        vocab: 50,
        chunk: 16,
        seed: 3,
    },
    // Chunks that divide the vocabulary.
    Case {
        n: 9,
        d: 24,
        vocab: 64,
        chunk: 8,
        seed: 4,
    },
    // One column per chunk.
    Case {
        n: 4,
        d: 8,
        vocab: 7,
        chunk: 1,
        seed: 5,
    },
    // Odd sizes, many chunks.
    Case {
        n: 31,
        d: 40,
        vocab: 301,
        chunk: 64,
        seed: 6,
    },
];

/// The inputs of a case: `x` `[n, d]`, `w` `[vocab, d]` (logits of a few units: a peaked but
/// not one-hot softmax), targets `[n]`.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    targets: Vec<i64>,
}

impl Case {
    fn inputs(&self) -> Inputs {
        let mut rng = Rng(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let scale = 1.5 / (self.d as f32).sqrt();
        Inputs {
            x: rng.normals(self.n * self.d, 1.0),
            w: rng.normals(self.vocab * self.d, scale),
            targets: rng.targets(self.n, self.vocab),
        }
    }
}

fn tensor<B: burn::tensor::backend::Backend>(v: &[f32], shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
}

fn ids<B: burn::tensor::backend::Backend>(v: &[i64]) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 values")
}

/// The largest difference between `a` and `b` over `b`'s largest magnitude.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "an all-zero reference");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The loss and the gradients `(loss, dx, dw)` of `loss_fn(x, w, targets) * upstream` on the
/// autodiff backend.
fn loss_and_grads(
    inputs: &Inputs,
    case: &Case,
    upstream: f64,
    loss_fn: impl Fn(Tensor<Ad, 2>, Tensor<Ad, 2>, Tensor<Ad, 1, Int>) -> Tensor<Ad, 1>,
) -> (f32, Vec<f32>, Vec<f32>) {
    let x = tensor::<Ad>(&inputs.x, [case.n, case.d]).require_grad();
    let w = tensor::<Ad>(&inputs.w, [case.vocab, case.d]).require_grad();
    let loss = loss_fn(x.clone(), w.clone(), ids(&inputs.targets));
    let value = values(loss.clone())[0];
    let grads = loss.mul_scalar(upstream).backward();
    let dx = values(x.grad(&grads).expect("x has a gradient"));
    let dw = values(w.grad(&grads).expect("w has a gradient"));
    (value, dx, dw)
}

/// The loss on the plain CPU backend (the evaluator's path, no autodiff) equals the reference.
#[test]
fn loss_matches_the_reference() {
    for case in CASES {
        let inputs = case.inputs();
        let x = || tensor::<Cpu>(&inputs.x, [case.n, case.d]);
        let w = || tensor::<Cpu>(&inputs.w, [case.vocab, case.d]);
        let ours = values(cross_entropy_sum(
            x(),
            w(),
            ids::<Cpu>(&inputs.targets),
            Some(case.chunk),
        ))[0];
        let theirs = values(reference_cross_entropy_sum(
            x(),
            w(),
            ids::<Cpu>(&inputs.targets),
        ))[0];
        let rel = (ours - theirs).abs() / theirs.abs();
        println!("{case:?}: {ours} vs {theirs} ({rel:.1e})");
        assert!(theirs > 1.0, "{case:?}: a trivial loss {theirs}");
        assert!(rel < 2e-6, "{case:?}: loss {ours} vs reference {theirs}");
    }
}

/// The gradients of the hidden states and of the head (under an upstream gradient that is not
/// one) equal the reference's autodiff.
#[test]
fn gradients_match_the_reference() {
    for case in CASES {
        let inputs = case.inputs();
        let (l1, dx1, dw1) = loss_and_grads(&inputs, &case, 0.37, |x, w, t| {
            cross_entropy_sum(x, w, t, Some(case.chunk))
        });
        let (l2, dx2, dw2) = loss_and_grads(&inputs, &case, 0.37, |x, w, t| {
            reference_cross_entropy_sum(x, w, t)
        });
        let (ex, ew) = (rel_diff(&dx1, &dx2), rel_diff(&dw1, &dw2));
        println!("{case:?}: dx {ex:.1e}, dw {ew:.1e}");
        assert!(
            (l1 - l2).abs() / l2.abs() < 2e-6,
            "{case:?}: loss {l1} vs {l2}"
        );
        assert!(ex < 1e-5, "{case:?}: dx differs by {ex}");
        assert!(ew < 1e-5, "{case:?}: dw differs by {ew}");
    }
}

/// A tied head (the embedding as the output head): the head's gradient and the embedding
/// lookup's add up on the one tensor, as in the reference.
#[test]
fn tied_head_gradients_add_up() {
    let case = CASES[2];
    let inputs = case.inputs();
    let mut rng = Rng(77);
    let lookup = rng.targets(case.n, case.vocab);
    let run = |fused: bool| {
        let w = tensor::<Ad>(&inputs.w, [case.vocab, case.d]).require_grad();
        // The hidden states depend on the embedding too: a lookup, scaled.
        let x = burn::tensor::module::embedding(
            w.clone(),
            Tensor::<Ad, 2, Int>::from_data(
                TensorData::new(lookup.clone(), [1, case.n]),
                &Default::default(),
            ),
        )
        .reshape([case.n, case.d])
        .mul_scalar(3.0);
        let t = ids::<Ad>(&inputs.targets);
        let loss = if fused {
            cross_entropy_sum(x, w.clone(), t, Some(case.chunk))
        } else {
            reference_cross_entropy_sum(x, w.clone(), t)
        };
        values(w.grad(&loss.backward()).expect("w has a gradient"))
    };
    let (ours, theirs) = (run(true), run(false));
    let rel = rel_diff(&ours, &theirs);
    assert!(rel < 1e-5, "tied gradient differs by {rel}");
    // The lookup's share is in it: the head's gradient alone differs.
    let (_, _, head_only) = loss_and_grads(&inputs, &case, 1.0, |x, w, t| {
        reference_cross_entropy_sum(x, w, t)
    });
    assert!(
        rel_diff(&head_only, &theirs) > 1e-2,
        "the test does not tie anything"
    );
}

/// The summed NLL in float64 on the host, straight from the definition.
fn host_loss(x: &[f64], w: &[f64], targets: &[i64], d: usize) -> f64 {
    let vocab = w.len() / d;
    x.chunks(d)
        .zip(targets)
        .map(|(row, &t)| {
            let z: Vec<f64> = w
                .chunks(d)
                .map(|wv| row.iter().zip(wv).map(|(a, b)| a * b).sum())
                .collect();
            let max = z.iter().fold(f64::MIN, |m, v| m.max(*v));
            let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            debug_assert_eq!(z.len(), vocab);
            lse - z[t as usize]
        })
        .sum()
}

/// The fused gradient along random directions equals a float64 central finite difference of
/// the loss computed on the host (no Burn): independent of the reference's autodiff.
#[test]
fn gradients_match_a_float64_finite_difference() {
    for case in [CASES[2], CASES[5]] {
        let inputs = case.inputs();
        let (_, dx, dw) = loss_and_grads(&inputs, &case, 1.0, |x, w, t| {
            cross_entropy_sum(x, w, t, Some(case.chunk))
        });
        let x: Vec<f64> = inputs.x.iter().map(|&v| v as f64).collect();
        let w: Vec<f64> = inputs.w.iter().map(|&v| v as f64).collect();
        let mut rng = Rng(case.seed + 1000);
        for _ in 0..3 {
            let ux: Vec<f64> = rng
                .normals(x.len(), 1.0)
                .iter()
                .map(|&v| v as f64)
                .collect();
            let uw: Vec<f64> = rng
                .normals(w.len(), 1.0)
                .iter()
                .map(|&v| v as f64)
                .collect();
            let h = 1e-4;
            let at = |s: f64| {
                let xs: Vec<f64> = x.iter().zip(&ux).map(|(a, u)| a + s * u).collect();
                let ws: Vec<f64> = w.iter().zip(&uw).map(|(a, u)| a + s * u).collect();
                host_loss(&xs, &ws, &inputs.targets, case.d)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let ours: f64 = dx.iter().zip(&ux).map(|(g, u)| *g as f64 * u).sum::<f64>()
                + dw.iter().zip(&uw).map(|(g, u)| *g as f64 * u).sum::<f64>();
            let rel = (ours - fd).abs() / fd.abs();
            println!("{case:?}: <g, u> {ours:.6} vs finite difference {fd:.6} ({rel:.1e})");
            assert!(fd.abs() > 1e-2, "a flat direction");
            assert!(
                rel < 1e-4,
                "{case:?}: <g, u> {ours} vs finite difference {fd}"
            );
        }
    }
}

/// In bf16 (mixed precision's compute dtype) the loss is f32 and the gradients come in bf16,
/// close to the reference on the same bf16 inputs.
#[test]
fn bf16_inputs_give_an_f32_loss_and_bf16_gradients() {
    let case = CASES[5];
    let inputs = case.inputs();
    let run = |fused: bool| {
        let x = tensor::<Ad>(&inputs.x, [case.n, case.d])
            .cast(FloatDType::BF16)
            .require_grad();
        let w = tensor::<Ad>(&inputs.w, [case.vocab, case.d])
            .cast(FloatDType::BF16)
            .require_grad();
        let t = ids::<Ad>(&inputs.targets);
        let loss = if fused {
            cross_entropy_sum(x.clone(), w.clone(), t, Some(case.chunk))
        } else {
            reference_cross_entropy_sum(x.clone(), w.clone(), t)
        };
        assert_eq!(loss.dtype(), DType::F32);
        let value = values(loss.clone())[0];
        let grads = loss.backward();
        let (dx, dw) = (x.grad(&grads).expect("dx"), w.grad(&grads).expect("dw"));
        assert_eq!((dx.dtype(), dw.dtype()), (DType::BF16, DType::BF16));
        (value, values(dx), values(dw))
    };
    let (l1, dx1, dw1) = run(true);
    let (l2, dx2, dw2) = run(false);
    assert!((l1 - l2).abs() / l2.abs() < 1e-3, "loss {l1} vs {l2}");
    let (ex, ew) = (rel_diff(&dx1, &dx2), rel_diff(&dw1, &dw2));
    assert!(
        ex < 2e-2 && ew < 2e-2,
        "bf16 gradients differ: dx {ex}, dw {ew}"
    );
}

/// The default chunk: a small vocabulary is one chunk (no extra work on the CPU); the
/// Llama-3.2-1B vocabulary at 4 x 1024 tokens goes in 8,192-column chunks.
#[test]
fn default_chunk_fits_its_budget() {
    assert_eq!(default_chunk(512, 32_000), 32_000);
    assert_eq!(default_chunk(4096, 128_256), 8192);
    let c = default_chunk(3000, 1_000_000);
    assert_eq!(c % CHUNK_ALIGN, 0);
    assert!(c * 3000 * 4 <= dapt_worker::fused::loss::CHUNK_BYTES);
    assert_eq!(default_chunk(10_000_000, 50_000), CHUNK_ALIGN);
    assert_eq!(default_chunk(0, 7), 7);
}

/// The model's loss path (`Llama::nll_sum`, the fused op) equals the reference over the
/// model's own logits (`Llama::forward`, which keeps the head's matmul), tied and untied.
#[test]
fn model_loss_is_the_reference_over_its_logits() {
    use dapt_proto::job::Preset;
    use dapt_worker::model::{Llama, LlamaConfig, ParamLayout};
    for tied in [false, true] {
        let mut cfg = LlamaConfig::preset(Preset::Tiny, 300);
        cfg.tie_word_embeddings = tied;
        let layout = ParamLayout::llama(&cfg);
        let weights = layout.init(0.2, 7);
        let device = Default::default();
        let model = Llama::<Cpu>::from_flat(&cfg, &weights, &device, false);
        let (b, t) = (2, 9);
        let ids: Vec<i64> = Rng(11 + tied as u64).targets(b * (t + 1), cfg.vocab_size);
        let windows = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [b, t + 1]), &device);
        let ours = values(model.nll_sum(windows.clone()))[0];
        let logits = model
            .forward(windows.clone().narrow(1, 0, t))
            .reshape([b * t, cfg.vocab_size]);
        let targets = windows.narrow(1, 1, t).reshape([b * t, 1]);
        let theirs = values(
            burn::tensor::activation::log_softmax(logits, 1)
                .gather(1, targets)
                .sum()
                .neg(),
        )[0];
        let rel = (ours - theirs).abs() / theirs.abs();
        assert!(theirs > 1.0, "a trivial loss {theirs}");
        assert!(rel < 2e-6, "tied {tied}: {ours} vs {theirs}");
    }
}

/// The CPU step before and after the fused loss, in one run, alternating (by hand, when the
/// machine is quiet: `cargo test -p dapt-worker --test fused_loss -- --ignored --nocapture
/// cpu_step`). "before" is the decomposed path the model had (`Llama::forward`'s logits, an f32
/// log-softmax, the targets gathered), "after" is `Llama::nll_sum` (the fused op); both forward
/// and backward on `Autodiff<Flex>`, the bench's shapes (worker/benches/train.rs) plus one
/// whose vocabulary takes two default chunks. Prints milliseconds; asserts nothing.
#[test]
#[ignore = "a measurement, run by hand"]
fn cpu_step_before_and_after() {
    use dapt_proto::job::Preset;
    use dapt_worker::model::{Llama, LlamaConfig, ParamLayout};
    use std::time::Instant;
    dapt_worker::memory::retain_freed_memory();
    let mut tiny = LlamaConfig::preset(Preset::Tiny, 512);
    tiny.intermediate_size = 256;
    tiny.tie_word_embeddings = false;
    let mut d512 = LlamaConfig::preset(Preset::Tiny, 8192);
    (
        d512.hidden_size,
        d512.intermediate_size,
        d512.num_hidden_layers,
    ) = (512, 1376, 8);
    (
        d512.num_attention_heads,
        d512.num_key_value_heads,
        d512.head_dim,
    ) = (8, 4, 64);
    d512.tie_word_embeddings = false;
    let mut two_chunks = LlamaConfig::preset(Preset::Tiny, 49152);
    two_chunks.hidden_size = 576;
    two_chunks.head_dim = 576 / two_chunks.num_attention_heads;
    let smollm = LlamaConfig::preset(Preset::Smollm2_135m, 49152);
    let cases = [
        ("tiny", tiny, 8, 64, 12),
        ("d512", d512, 4, 256, 6),
        ("smollm2-135m", smollm, 1, 256, 4),
        (
            "vocab 49152 x 1024 tokens (2 chunks)",
            two_chunks,
            4,
            256,
            4,
        ),
    ];
    let device = Default::default();
    for (name, cfg, batch, seq, reps) in cases {
        let weights = ParamLayout::llama(&cfg).init(0.02, 3);
        let ids: Vec<i64> = Rng(5).targets(batch * (seq + 1), cfg.vocab_size);
        let windows = || {
            Tensor::<Ad, 2, Int>::from_data(TensorData::new(ids.clone(), [batch, seq + 1]), &device)
        };
        let step = |fused: bool| {
            let model = Llama::<Ad>::from_flat(&cfg, &weights, &device, true);
            let (start, cpu) = (Instant::now(), cpu_seconds());
            let loss = if fused {
                model.nll_sum(windows())
            } else {
                let w = windows();
                let logits = model
                    .forward(w.clone().narrow(1, 0, seq))
                    .reshape([batch * seq, cfg.vocab_size]);
                let targets = w.narrow(1, 1, seq).reshape([batch * seq, 1]);
                burn::tensor::activation::log_softmax(logits, 1)
                    .gather(1, targets)
                    .sum()
                    .neg()
            };
            let grads = loss.backward();
            drop(grads);
            (
                start.elapsed().as_secs_f64() * 1e3,
                (cpu_seconds() - cpu) * 1e3,
            )
        };
        step(true);
        step(false);
        let (mut after, mut before) = (vec![], vec![]);
        // ABBA order, so that neither variant always runs right after the other.
        for i in 0..reps {
            if i % 2 == 0 {
                after.push(step(true));
                before.push(step(false));
            } else {
                before.push(step(false));
                after.push(step(true));
            }
        }
        let median = |v: &[(f64, f64)], cpu: bool| {
            let mut v: Vec<f64> = v.iter().map(|s| if cpu { s.1 } else { s.0 }).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{name}: forward + backward, median of {reps}: before {:.0} ms wall ({:.0} ms CPU), \
             after {:.0} ms wall ({:.0} ms CPU)",
            median(&before, false),
            median(&before, true),
            median(&after, false),
            median(&after, true),
        );
    }
}

/// This process's `key` line of /proc/self/status (VmRSS:, VmHWM:) in MiB.
fn status(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = s.lines().find(|l| l.starts_with(key)).expect("key");
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("kB");
    kb / 1024.0
}

/// This process's CPU time (user and system, all threads) in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The peak resident memory of the head and loss, forward and backward, on the CPU at a
/// Llama-3-sized vocabulary (128,256) and 1,024 tokens: run once per variant, each in its own
/// process (VmHWM is a process's peak):
///
/// ```text
/// DAPT_LOSS_VARIANT=fused     cargo test -p dapt-worker --test fused_loss -- --ignored --nocapture --exact peak_memory_of_the_head_and_loss
/// DAPT_LOSS_VARIANT=reference cargo test -p dapt-worker --test fused_loss -- --ignored --nocapture --exact peak_memory_of_the_head_and_loss
/// ```
#[test]
#[ignore = "a measurement, run by hand"]
fn peak_memory_of_the_head_and_loss() {
    let variant = std::env::var("DAPT_LOSS_VARIANT").unwrap_or_else(|_| "fused".into());
    dapt_worker::memory::retain_freed_memory();
    let case = Case {
        n: 1024,
        d: 256,
        vocab: 128_256,
        chunk: 0,
        seed: 9,
    };
    let inputs = case.inputs();
    let x = tensor::<Ad>(&inputs.x, [case.n, case.d]).require_grad();
    let w = tensor::<Ad>(&inputs.w, [case.vocab, case.d]).require_grad();
    let t = ids::<Ad>(&inputs.targets);
    drop(inputs);
    let before = status("VmRSS:");
    let start = std::time::Instant::now();
    let loss = match variant.as_str() {
        "fused" => cross_entropy_sum(x.clone(), w.clone(), t, None),
        _ => reference_cross_entropy_sum(x.clone(), w.clone(), t),
    };
    let value = values(loss.clone())[0];
    let grads = loss.backward();
    let dw = values(w.grad(&grads).expect("dw"));
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{variant}: [{} x {}] @ [{} x {}]^T, loss {value:.1}, sum |dw| {:.3}: RSS before \
         {before:.0} MiB, peak {:.0} MiB (+{:.0} MiB), {elapsed:.2} s",
        case.n,
        case.d,
        case.vocab,
        case.d,
        dw.iter().map(|v| v.abs() as f64).sum::<f64>(),
        status("VmHWM:"),
        status("VmHWM:") - before,
    );
}

/// The peak resident memory of a whole training micro-step (forward and backward of the tiny
/// preset, hidden 128, 2 layers, tied) at a Llama-3-sized vocabulary (128,256) and 1 x 1,024
/// tokens: `Llama::nll_sum` (fused) against the decomposed path it replaced (`Llama::forward`'s
/// logits, an f32 log-softmax, the targets gathered), each in its own process:
///
/// ```text
/// DAPT_LOSS_VARIANT=fused     cargo test -p dapt-worker --test fused_loss -- --ignored --nocapture --exact peak_memory_of_a_model_step
/// DAPT_LOSS_VARIANT=reference cargo test -p dapt-worker --test fused_loss -- --ignored --nocapture --exact peak_memory_of_a_model_step
/// ```
#[test]
#[ignore = "a measurement, run by hand"]
fn peak_memory_of_a_model_step() {
    use dapt_proto::job::Preset;
    use dapt_worker::model::{Llama, LlamaConfig, ParamLayout};
    let variant = std::env::var("DAPT_LOSS_VARIANT").unwrap_or_else(|_| "fused".into());
    dapt_worker::memory::retain_freed_memory();
    let cfg = LlamaConfig::preset(Preset::Tiny, 128_256);
    let (batch, seq) = (1, 1024);
    let device = Default::default();
    let weights = ParamLayout::llama(&cfg).init(0.02, 3);
    let ids: Vec<i64> = Rng(5).targets(batch * (seq + 1), cfg.vocab_size);
    let windows = Tensor::<Ad, 2, Int>::from_data(TensorData::new(ids, [batch, seq + 1]), &device);
    let model = Llama::<Ad>::from_flat(&cfg, &weights, &device, true);
    let before = status("VmRSS:");
    let loss = match variant.as_str() {
        "fused" => model.nll_sum(windows),
        _ => {
            let logits = model
                .forward(windows.clone().narrow(1, 0, seq))
                .reshape([batch * seq, cfg.vocab_size]);
            let targets = windows.narrow(1, 1, seq).reshape([batch * seq, 1]);
            burn::tensor::activation::log_softmax(logits, 1)
                .gather(1, targets)
                .sum()
                .neg()
        }
    };
    let value = values(loss.clone())[0];
    let mut grads = vec![0f32; weights.len()];
    model.add_gradients(&loss.backward(), &mut grads);
    let norm = grads
        .iter()
        .map(|g| (*g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    println!(
        "{variant}: tiny model, vocab {}, {batch} x {seq} tokens: loss {value:.3}, |grad| \
         {norm:.4}: RSS before {before:.0} MiB, peak {:.0} MiB (+{:.0} MiB)",
        cfg.vocab_size,
        status("VmHWM:"),
        status("VmHWM:") - before,
    );
}

/// The fused head and loss (forward + backward on `Autodiff<Flex>`) at several chunk sizes over
/// one 49,152-entry vocabulary and 1,024 tokens (d 576), alternating, medians of process CPU
/// time: what chunking itself costs on the CPU (`cargo test -p dapt-worker --test fused_loss --
/// --ignored --nocapture --exact chunk_sizes_on_the_cpu`).
#[test]
#[ignore = "a measurement, run by hand"]
fn chunk_sizes_on_the_cpu() {
    dapt_worker::memory::retain_freed_memory();
    let case = Case {
        n: 1024,
        d: 576,
        vocab: 49_152,
        chunk: 0,
        seed: 9,
    };
    let inputs = case.inputs();
    let chunks = [case.vocab, default_chunk(case.n, case.vocab), 8192, 2048];
    let mut cpu_ms: Vec<Vec<f64>> = vec![vec![]; chunks.len()];
    for _ in 0..3 {
        for (i, &chunk) in chunks.iter().enumerate() {
            let cpu = cpu_seconds();
            loss_and_grads(&inputs, &case, 1.0, |x, w, t| {
                cross_entropy_sum(x, w, t, Some(chunk))
            });
            cpu_ms[i].push((cpu_seconds() - cpu) * 1e3);
        }
    }
    for (chunk, mut ms) in chunks.iter().zip(cpu_ms) {
        ms.sort_by(f64::total_cmp);
        println!("chunk {chunk}: {:.0} ms CPU (samples {ms:.0?})", ms[1]);
    }
}
