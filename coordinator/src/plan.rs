//! `dapt plan`: what a job will cost before it spends anything — training FLOPs, steps, memory
//! per GPU, GPU-hours at a stated MFU, and money at a stated price.
//!
//! The formulas are the standard ones, and each is printed with the plan so it can be checked:
//! * FLOPs = 6 N D (forward and backward through N parameters for D tokens) + attention
//!   12 L d s D (PaLM, appendix B: L layers, model width d, sequence length s).
//! * Memory per GPU for data parallelism without sharding, as dapt trains: a bf16 compute copy
//!   (2 bytes/parameter), f32 master weights (4), f32 gradients (4: the all-reduce buckets) and
//!   AdamW's two f32 moments (8) = 18 bytes/parameter; activations per micro-batch after
//!   Korthikanti et al. (2022), s b d (34 + 5 a s / d) bytes per layer with 16-bit activations
//!   (a heads), or 2 s b d per layer plus one layer's worth with activation checkpointing; and
//!   the logits with their gradient in f32, 8 s b V.

use std::fmt::Write as _;

use dapt_proto::job::{JobSpec, Preset};
use dapt_proto::model::LlamaConfig;

/// A GPU that jobs are planned for: dense bf16 peak and memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    pub name: &'static str,
    /// Dense (no sparsity) bf16 tensor-core peak, FLOP/s.
    pub peak_flops: f64,
    pub memory_bytes: f64,
    /// An on-demand cloud price assumed when the user gives none, USD per GPU-hour.
    pub assumed_price: f64,
}

pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "h100",
        peak_flops: 989e12,
        memory_bytes: 80e9,
        assumed_price: 2.50,
    },
    Gpu {
        name: "h200",
        peak_flops: 989e12,
        memory_bytes: 141e9,
        assumed_price: 3.50,
    },
    Gpu {
        name: "a100",
        peak_flops: 312e12,
        memory_bytes: 80e9,
        assumed_price: 1.50,
    },
];

pub fn gpu(name: &str) -> Option<Gpu> {
    GPUS.iter()
        .copied()
        .find(|g| g.name.eq_ignore_ascii_case(name))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    pub gpu: Gpu,
    pub gpus: u32,
    /// Model FLOPs utilisation assumed for the time estimate.
    pub mfu: f64,
    pub price_per_gpu_hour: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub params: u64,
    pub tokens: u64,
    pub steps: u64,
    pub tokens_per_step: u64,
    pub flops_dense: f64,
    pub flops_attention: f64,
    pub memory: Memory,
    pub gpu_hours: f64,
    pub wall_hours: f64,
    pub price_per_gpu_hour: f64,
    pub price_assumed: bool,
    pub warnings: Vec<String>,
}

/// Bytes per GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Memory {
    pub weights_bf16: f64,
    pub master_f32: f64,
    pub gradients_f32: f64,
    pub optimizer_f32: f64,
    pub activations: f64,
    pub logits: f64,
}

impl Memory {
    pub fn total(&self) -> f64 {
        self.weights_bf16
            + self.master_f32
            + self.gradients_f32
            + self.optimizer_f32
            + self.activations
            + self.logits
    }
}

/// The model a job trains, for planning: a Hugging Face `config.json`, or a preset with the
/// corpus tokenizer's vocabulary (or, before `prepare`, the vocabulary the preset's model has).
pub fn model_config(job: &JobSpec) -> Result<LlamaConfig, String> {
    let model = job
        .model
        .as_ref()
        .ok_or("the job has no `model:` section")?;
    if let Some(dir) = &model.hf {
        return LlamaConfig::read(&dir.join("config.json"));
    }
    let preset = model.preset.ok_or("model: give `preset` or `hf`")?;
    let manifest = dapt_corpus::Manifest::read(&job.corpus.output).ok();
    let vocab = match (manifest, preset) {
        (Some(m), _) => m.tokenizer.vocab_size as usize,
        (None, Preset::Tiny) => job.corpus.vocab_size.get() as usize,
        (None, Preset::Smollm2_135m) => 49_152,
        (None, Preset::Llama2_7b) => 32_000,
        (None, Preset::Llama3_8b) => 128_256,
    };
    Ok(LlamaConfig::preset(preset, vocab))
}

pub fn plan(job: &JobSpec, config: &LlamaConfig, options: &PlanOptions) -> Result<Plan, String> {
    let training = job.training.ok_or("the job has no `training:` section")?;
    let n = config.num_params();
    let steps = training.steps();
    let tokens_per_step = training.tokens_per_step();
    let tokens = steps * tokens_per_step;
    let (l, d, s) = (
        config.num_hidden_layers as f64,
        config.hidden_size as f64,
        training.seq_len as f64,
    );
    let flops_dense = 6.0 * n as f64 * tokens as f64;
    let flops_attention = 12.0 * l * d * s * tokens as f64;

    let b = training.micro_batch() as f64;
    let a = config.num_attention_heads as f64;
    let per_layer_full = s * b * d * (34.0 + 5.0 * a * s / d);
    let activations = if training.activation_checkpointing {
        2.0 * s * b * d * l + per_layer_full
    } else {
        per_layer_full * l
    };
    let memory = Memory {
        weights_bf16: 2.0 * n as f64,
        master_f32: 4.0 * n as f64,
        gradients_f32: 4.0 * n as f64,
        optimizer_f32: 8.0 * n as f64,
        activations,
        logits: 8.0 * s * b * config.vocab_size as f64,
    };

    let gpu = options.gpu;
    let gpu_hours = (flops_dense + flops_attention) / (gpu.peak_flops * options.mfu) / 3600.0;
    let mut warnings = Vec::new();
    let usable = 0.9 * gpu.memory_bytes;
    if memory.total() > usable {
        let mut advice = Vec::new();
        if !training.activation_checkpointing && activations > 0.25 * memory.total() {
            advice.push("turn on training.activation_checkpointing".to_string());
        }
        if training.micro_batch() > 1 {
            advice.push(
                "lower training.micro_batch (gradient accumulation keeps the global batch)".into(),
            );
        }
        if let Some(bigger) = GPUS
            .iter()
            .filter(|g| 0.9 * g.memory_bytes > memory.total())
            .min_by(|x, y| x.memory_bytes.total_cmp(&y.memory_bytes))
        {
            advice.push(format!(
                "use {} ({:.0} GB)",
                bigger.name.to_uppercase(),
                bigger.memory_bytes / 1e9
            ));
        }
        advice.push(
            "dapt does not shard weights or optimizer state across GPUs (ZeRO/FSDP) yet".into(),
        );
        warnings.push(format!(
            "does not fit: {:.1} GB per GPU against {:.0} GB usable on {} ({:.0} GB); {}",
            memory.total() / 1e9,
            usable / 1e9,
            gpu.name.to_uppercase(),
            gpu.memory_bytes / 1e9,
            advice.join("; ")
        ));
    }
    if training.global_batch % options.gpus as u64 != 0 {
        warnings.push(format!(
            "global_batch {} does not divide over {} GPUs: ranks hold {} or {} samples per step",
            training.global_batch,
            options.gpus,
            training.global_batch / options.gpus as u64,
            training.global_batch / options.gpus as u64 + 1
        ));
    }
    let (price, assumed) = match options.price_per_gpu_hour {
        Some(p) => (p, false),
        None => (gpu.assumed_price, true),
    };
    Ok(Plan {
        params: n,
        tokens,
        steps,
        tokens_per_step,
        flops_dense,
        flops_attention,
        memory,
        gpu_hours,
        wall_hours: gpu_hours / options.gpus as f64,
        price_per_gpu_hour: price,
        price_assumed: assumed,
        warnings,
    })
}

/// The plan as the terminal shows it.
pub fn render(plan: &Plan, options: &PlanOptions, config: &LlamaConfig) -> String {
    let mut o = String::new();
    let gb = |x: f64| format!("{:.1} GB", x / 1e9);
    let m = &plan.memory;
    let _ = writeln!(
        o,
        "model: {:.3} B parameters ({} layers, hidden {}, {}/{} heads, vocabulary {})",
        plan.params as f64 / 1e9,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size
    );
    let _ = writeln!(
        o,
        "data: {} tokens = {} steps x {} tokens per step",
        plan.tokens, plan.steps, plan.tokens_per_step
    );
    let total_flops = plan.flops_dense + plan.flops_attention;
    let _ = writeln!(
        o,
        "compute: {:.3e} FLOPs = 6ND {:.3e} + attention 12LdsD {:.3e}",
        total_flops, plan.flops_dense, plan.flops_attention
    );
    let _ = writeln!(
        o,
        "memory per GPU: {} = bf16 weights {} + f32 master {} + f32 gradients {} + AdamW moments {} + activations {} + logits {}",
        gb(m.total()),
        gb(m.weights_bf16),
        gb(m.master_f32),
        gb(m.gradients_f32),
        gb(m.optimizer_f32),
        gb(m.activations),
        gb(m.logits)
    );
    let gpu = options.gpu;
    let _ = writeln!(
        o,
        "time: {:.1} GPU-hours on {} ({:.0} TFLOP/s dense bf16) at {:.0}% MFU; {:.1} h wall on {} GPUs",
        plan.gpu_hours,
        gpu.name.to_uppercase(),
        gpu.peak_flops / 1e12,
        options.mfu * 100.0,
        plan.wall_hours,
        options.gpus
    );
    let _ = writeln!(
        o,
        "cost: ${:.0} at ${:.2} per GPU-hour{}",
        plan.gpu_hours * plan.price_per_gpu_hour,
        plan.price_per_gpu_hour,
        if plan.price_assumed {
            " (an assumed on-demand price: pass --price-per-gpu-hour)"
        } else {
            ""
        }
    );
    for w in &plan.warnings {
        let _ = writeln!(o, "warning: {w}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_agree_with_the_table_workers_report_mfu_against() {
        for g in GPUS {
            assert_eq!(
                dapt_proto::device::peak_flops(g.name),
                Some(g.peak_flops),
                "{}",
                g.name
            );
        }
    }

    fn job(extra: &str) -> JobSpec {
        JobSpec::parse(&format!(
            "job: seven\nmodel:\n  preset: llama-2-7b\ncorpus:\n  output: /nonexistent\n  sources:\n    - name: d\n      role: domain\n      paths: [x]\n      weight: 1\ntraining:\n  seq_len: 4096\n  global_batch: 256\n  micro_batch: 1\n  tokens: 1000000000\n{extra}"
        ))
        .expect("job")
    }

    fn options(name: &str) -> PlanOptions {
        PlanOptions {
            gpu: gpu(name).expect("gpu"),
            gpus: 8,
            mfu: 0.4,
            price_per_gpu_hour: None,
        }
    }

    #[test]
    fn seven_billion_on_a_billion_tokens() {
        let job = job("");
        let config = model_config(&job).expect("config");
        let p = plan(&job, &config, &options("h100")).expect("plan");
        assert_eq!(
            p.params, 6_738_415_616,
            "Llama-2-7B's published parameter count"
        );
        assert_eq!(p.tokens_per_step, 1_048_576);
        assert_eq!(p.steps, 954);
        // 6 N D with D = 954 steps of 2^20 tokens.
        assert!((p.flops_dense / (6.0 * 6.738_415_616e9 * 1_000_341_504.0) - 1.0).abs() < 1e-9);
        let gpu_hours = (p.flops_dense + p.flops_attention) / (989e12 * 0.4) / 3600.0;
        assert!((p.gpu_hours - gpu_hours).abs() < 1e-9);
        assert!(p.gpu_hours > 30.0 && p.gpu_hours < 36.0, "{}", p.gpu_hours);
        assert!((p.memory.optimizer_f32 - 8.0 * 6.738_415_616e9).abs() < 1.0);
        // 18 bytes/parameter plus activations does not fit in 80 GB.
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("does not fit") && w.contains("H100")),
            "{:?}",
            p.warnings
        );
        assert!(p
            .warnings
            .iter()
            .any(|w| w.contains("activation_checkpointing")));
    }

    #[test]
    fn checkpointing_on_an_h200_fits() {
        let job = job("  activation_checkpointing: true\n");
        let config = model_config(&job).expect("config");
        let p = plan(&job, &config, &options("h200")).expect("plan");
        assert!(p.memory.total() < 0.9 * 141e9, "{}", p.memory.total());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let text = render(&p, &options("h200"), &config);
        assert!(
            text.contains("6.738 B parameters") && text.contains("assumed"),
            "{text}"
        );
    }
}
