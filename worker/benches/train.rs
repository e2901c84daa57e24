//! Training throughput on the CPU: dapt's step against the same model, batch and thread count
//! in PyTorch (eager, `benches/pytorch_anchor.py`), in one run, alternating.
//!
//! ```text
//! cargo bench -p dapt-worker --bench train                 # tiny, d512 and smollm2-135m
//! cargo bench -p dapt-worker --bench train -- tiny         # one model
//! DAPT_TORCH_PYTHON=/path/to/venv/bin/python ...           # the PyTorch anchor's interpreter
//! ```
//!
//! Each model runs in its own process (so peak memory is its own), with 2 warm-up steps and a
//! phase-level profile of dapt's step: building the autodiff model from the flat weights,
//! forward + backward, copying gradients out to the flat buffer, clipping + AdamW.
//! It measures and prints; it asserts nothing about speed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use dapt_proto::job::{OptimizerSpec, Preset, ScheduleSpec, TrainingSpec};
use dapt_worker::model::{Llama, LlamaConfig, ParamLayout};
use dapt_worker::train::optimizer::{clip_global_norm, AdamW};
use dapt_worker::CpuAutodiff;

/// The fp32 matmul peak of this machine kind with 2 threads (FACTS.md), for the FLOP/s share.
const PEAK_GFLOPS: f64 = 377.0;

struct Case {
    name: &'static str,
    config: LlamaConfig,
    seq: usize,
    batch: usize,
    steps: usize,
}

fn cases() -> Vec<Case> {
    let mut d512 = LlamaConfig::preset(Preset::Tiny, 8192);
    d512.hidden_size = 512;
    d512.intermediate_size = 1376;
    d512.num_hidden_layers = 8;
    d512.num_attention_heads = 8;
    d512.num_key_value_heads = 4;
    d512.head_dim = 64;
    d512.tie_word_embeddings = false;
    let mut tiny = LlamaConfig::preset(Preset::Tiny, 512);
    tiny.intermediate_size = 256;
    tiny.tie_word_embeddings = false;
    vec![
        Case {
            name: "tiny",
            config: tiny,
            seq: 64,
            batch: 8,
            steps: 20,
        },
        Case {
            name: "d512",
            config: d512,
            seq: 256,
            batch: 4,
            steps: 5,
        },
        Case {
            name: "smollm2-135m",
            config: LlamaConfig::preset(Preset::Smollm2_135m, 49152),
            seq: 256,
            batch: 1,
            steps: 3,
        },
    ]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Some(one) = std::env::var_os("DAPT_BENCH_ONE") {
        if std::env::var_os("DAPT_BENCH_GLIBC_DEFAULTS").is_none() {
            dapt_worker::memory::retain_freed_memory();
        }
        let case = cases()
            .into_iter()
            .find(|c| c.name == one.to_string_lossy())
            .expect("known case");
        run_dapt(&case);
        return;
    }
    let python = std::env::var("DAPT_TORCH_PYTHON").ok().or_else(|| {
        Path::new("/work/venv-torch/bin/python")
            .is_file()
            .then(|| "/work/venv-torch/bin/python".to_owned())
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    println!(
        "2 threads each (RAYON_NUM_THREADS=2 for dapt, torch.set_num_threads(2)); load before: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for case in cases() {
        if !args.is_empty() && !args.iter().any(|a| a == case.name) {
            continue;
        }
        let exe = std::env::current_exe().expect("exe");
        let out = Command::new(exe)
            .env("DAPT_BENCH_ONE", case.name)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .expect("bench child");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        let Some(python) = &python else {
            println!("  pytorch: skipped (set DAPT_TORCH_PYTHON to a python with torch)");
            continue;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.json");
        std::fs::write(&config, case.config.to_json().to_string()).expect("config");
        let out = Command::new(python)
            .arg(root.join("benches/pytorch_anchor.py"))
            .args(["--config", &config.to_string_lossy()])
            .args([
                "--seq",
                &case.seq.to_string(),
                "--batch",
                &case.batch.to_string(),
            ])
            .args(["--steps", &case.steps.to_string(), "--threads", "2"])
            .output()
            .expect("pytorch anchor");
        let text = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<serde_json::Value>(text.trim()) {
            Ok(v) => println!(
                "  pytorch {}: {} tokens/s, {} GFLOP/s, peak RSS {} MiB (torch {})",
                case.name, v["tokens_per_s"], v["gflops_per_s"], v["peak_rss_mib"], v["torch"]
            ),
            Err(_) => println!(
                "  pytorch {}: failed: {}",
                case.name,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    }
}

fn run_dapt(case: &Case) {
    let training = TrainingSpec {
        seq_len: case.seq as u32,
        global_batch: case.batch as u64,
        micro_batch: None,
        tokens: 1 << 40,
        optimizer: OptimizerSpec::default(),
        schedule: ScheduleSpec::default(),
        activation_checkpointing: false,
        zero_stage: 0,
        eval_every: 0,
        eval_tokens: 0,
        nonfinite: Default::default(),
        max_skipped_steps: None,
    };
    let cfg = &case.config;
    let layout = ParamLayout::llama(cfg);
    let mut weights = layout.init(0.02, 1);
    let mut optimizer = AdamW::new(training.optimizer, &layout);
    let width = case.seq + 1;
    let mut x = 7u64;
    let ids: Vec<i64> = (0..case.batch * width)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((x >> 33) % cfg.vocab_size as u64) as i64
        })
        .collect();
    let device = Default::default();
    let tokens = (case.batch * case.seq) as f64;
    let mut phases = [Duration::ZERO; 4];
    let mut first_loss = None;
    let mut loss = 0.0;
    let warmup = 2;
    let mut started = Instant::now();
    for step in 0..warmup + case.steps {
        if step == warmup {
            phases = [Duration::ZERO; 4];
            started = Instant::now();
        }
        let t = Instant::now();
        let model = Llama::<CpuAutodiff>::from_flat(cfg, &weights, &device, true);
        phases[0] += t.elapsed();
        let t = Instant::now();
        let input = Tensor::<CpuAutodiff, 2, Int>::from_data(
            TensorData::new(ids.clone(), [case.batch, width]),
            &device,
        );
        let scaled = model.nll_sum(input).div_scalar(tokens);
        loss = scaled.clone().into_scalar().elem::<f64>();
        first_loss.get_or_insert(loss);
        let grads = scaled.backward();
        phases[1] += t.elapsed();
        let t = Instant::now();
        let mut flat = vec![0f32; layout.total];
        model.add_gradients(&grads, &mut flat);
        phases[2] += t.elapsed();
        let t = Instant::now();
        clip_global_norm(&mut flat, 1.0);
        optimizer.step(&mut weights, &flat, 1e-3);
        phases[3] += t.elapsed();
    }
    let secs = started.elapsed().as_secs_f64();
    let tps = tokens * case.steps as f64 / secs;
    let flops_per_token = 6.0 * cfg.num_params() as f64
        + 12.0 * (cfg.num_hidden_layers * cfg.hidden_size * case.seq) as f64;
    let gflops = flops_per_token * tps / 1e9;
    let total: f64 = phases.iter().map(Duration::as_secs_f64).sum();
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / total;
    println!(
        "dapt {}: {} params, seq {} x batch {}: {:.0} tokens/s, {:.1} GFLOP/s ({:.0}% of the {PEAK_GFLOPS} peak), peak RSS {} MiB, loss {:.3} -> {:.3}",
        case.name,
        cfg.num_params(),
        case.seq,
        case.batch,
        tps,
        gflops,
        100.0 * gflops / PEAK_GFLOPS,
        peak_rss_mib(),
        first_loss.unwrap_or(0.0),
        loss
    );
    println!(
        "  step profile: build model {:.1}%, forward+backward {:.1}%, gradients to flat buffer {:.1}%, clip+AdamW {:.1}%",
        pct(phases[0]),
        pct(phases[1]),
        pct(phases[2]),
        pct(phases[3])
    );
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
