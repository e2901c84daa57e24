//! `dapt plan`: what a job will cost before it spends anything — training FLOPs, steps, memory
//! per rank, GPU-hours at dapt's own measured MFU, and money at a stated price.
//!
//! The formulas, each printed with the plan so it can be checked:
//! * FLOPs = 6 N D (forward and backward through N parameters for D tokens) + attention
//!   12 L d s D (PaLM, appendix B: L layers, model width d, sequence length s).
//! * Memory per rank as dapt's device (resident) engine holds it, by ZeRO stage over w
//!   data-parallel ranks (Rajbhandari et al. 2020): the weights in the compute dtype (every rank,
//!   whole); f32 master weights (bf16 compute only: in f32 the compute weights are the master),
//!   and AdamW's two f32 moments, 1/w of them from stage 1; the f32 gradient buffer, whole at
//!   stages 0 and 1, the rank's slice (1/w) at stage 2 over more than one rank, plus one 64 MiB
//!   gradient bucket in flight, twice (the device engine reduces each micro-batch's gradients to
//!   their owners in buckets during the backward pass).
//!   Then the larger of the backward phase (the gradients the backward pass holds before they
//!   are added into the flat buffer, the activations, the logits) and the optimizer phase
//!   (on a GPU AdamW is one in-place kernel: only a sharded f32 master's compute-dtype copy of
//!   the owned slice; on the CPU five f32 temporaries of one chunk of the update). Activations are
//!   counted from dapt's own graph (`worker/src/model/llama.rs` with its fused ops on Burn's
//!   autodiff: what each op keeps for its backward pass), which differs between GPUs (flash
//!   attention) and the CPU (the decomposed attention formula); see docs/plan.md.
//! * Time at the MFU dapt measured on that GPU (docs/benchmarks.md), or the nearest one it
//!   measured, said as such; `--mfu` overrides it and the plan says so.

use std::fmt::Write as _;

use dapt_proto::job::{JobSpec, Preset, TrainingSpec};
use dapt_proto::model::LlamaConfig;

/// An MFU dapt measured, and where.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeasuredMfu {
    pub mfu: f64,
    /// What was measured, for the plan's text.
    pub what: &'static str,
}

/// The H200 measurement (docs/benchmarks.md, "Training on one H200"): Llama 3.2 1B shape, bf16,
/// 6,877 tokens/s on 2026-11-29 (commit 1cbc69e, blockwise attention; 5.2% on 2026-11-28).
const H200_MFU: MeasuredMfu = MeasuredMfu {
    mfu: 0.068,
    what: "measured by dapt on an H200: Llama-3.2-1B shape, bf16, docs/benchmarks.md",
};

/// A device that jobs are planned for: peak, memory, and what dapt computes in there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    pub name: &'static str,
    /// Dense (no sparsity) peak in the compute dtype, FLOP/s (bf16 tensor cores on GPUs).
    pub peak_flops: f64,
    pub memory_bytes: f64,
    /// An on-demand cloud price assumed when the user gives none, USD per GPU-hour.
    pub assumed_price: f64,
    /// Bytes per element of the compute dtype: 2 (bf16 with f32 master weights) on GPUs, 4 (f32)
    /// on the CPU backend.
    pub compute_bytes: f64,
    /// What the process holds before the model: the CUDA context and kernels (assumed), or a
    /// CPU worker's resident size before its first step (measured).
    pub runtime_bytes: f64,
    /// dapt's own MFU on this device, where it has been measured.
    pub measured_mfu: Option<MeasuredMfu>,
    /// Bytes per parameter that the process holds beyond what the model below attributes:
    /// measured on the CPU (see [`CPU_UNATTRIBUTED_PER_PARAM`]), not known for GPUs (0).
    pub unattributed_per_param: f64,
    /// Whether the model's attention is the fused flash-attention op here (the CubeCL backends:
    /// keeps q, k, v, the output and an f32 log-sum-exp per row) or the decomposed formula (the
    /// CPU backend, `AttentionOps::FUSED_ATTENTION` in `worker/src/fused/attention.rs`: keeps
    /// `[batch, heads, seq, seq]` scores three times and repeats k and v for grouped-query
    /// attention).
    pub flash_attention: bool,
}

pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "h100",
        peak_flops: 989e12,
        memory_bytes: 80e9,
        assumed_price: 2.50,
        compute_bytes: 2.0,
        runtime_bytes: 1e9,
        measured_mfu: None,
        unattributed_per_param: 0.0,
        flash_attention: true,
    },
    Gpu {
        name: "h200",
        peak_flops: 989e12,
        memory_bytes: 141e9,
        assumed_price: 3.50,
        compute_bytes: 2.0,
        runtime_bytes: 1e9,
        measured_mfu: Some(H200_MFU),
        unattributed_per_param: 0.0,
        flash_attention: true,
    },
    Gpu {
        name: "a100",
        peak_flops: 312e12,
        memory_bytes: 80e9,
        assumed_price: 1.50,
        compute_bytes: 2.0,
        runtime_bytes: 1e9,
        measured_mfu: None,
        unattributed_per_param: 0.0,
        flash_attention: true,
    },
    // The CPU backend (f32), as this project's 2-core development machines run it: the fp32
    // matmul peak with 2 threads (FACTS.md), the d512 shape's measured 25% of it
    // (docs/benchmarks.md), and a worker's resident size before its first step.
    Gpu {
        name: "cpu",
        peak_flops: 377e9,
        memory_bytes: 24e9,
        assumed_price: 0.0,
        compute_bytes: 4.0,
        runtime_bytes: CPU_RUNTIME_BYTES,
        measured_mfu: Some(MeasuredMfu {
            mfu: 0.25,
            what:
                "measured by dapt on this project's 2-core CPU: d512 shape, f32, docs/benchmarks.md",
        }),
        unattributed_per_param: CPU_UNATTRIBUTED_PER_PARAM,
        flash_attention: false,
    },
];

/// A CPU `dapt-worker`'s resident size besides the model: fitted to the tiny shape's peak at
/// one rank (docs/plan.md), where the model's own bytes are a few MB (refitted 2026-11-30: 50 MB
/// measured, 48 the day before; 21 MB then).
pub const CPU_RUNTIME_BYTES: f64 = 23e6;

/// What a CPU worker holds per parameter beyond the parts the model attributes, fitted to the
/// d512 shape's peak at one rank without recompute (docs/plan.md): the remainder after the
/// states, activations and logits, about 1.5 x the f32 weights. Likely the allocator (glibc
/// keeps each thread's freed memory in that thread's arena, and `dapt_worker::memory` tells it
/// to keep freed memory) and the matmul's packing buffers; not traced to an owner yet.
pub const CPU_UNATTRIBUTED_PER_PARAM: f64 = 6.0;

pub fn gpu(name: &str) -> Option<Gpu> {
    GPUS.iter()
        .copied()
        .find(|g| g.name.eq_ignore_ascii_case(name))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    pub gpu: Gpu,
    /// Data-parallel ranks (one per GPU).
    pub gpus: u32,
    /// Model FLOPs utilisation for the time estimate; `None`: dapt's measured figure.
    pub mfu: Option<f64>,
    pub price_per_gpu_hour: Option<f64>,
}

/// Where the time estimate's MFU came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MfuSource {
    /// dapt measured it on this GPU.
    Measured(&'static str),
    /// dapt has not measured this GPU: the figure of the one it did measure.
    Nearest(&'static str),
    /// `--mfu`.
    User,
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
    /// The memory settings of the job.
    pub setting: MemorySetting,
    /// The first setting in the order of [`smallest_fit`] that fits, when the job's does not,
    /// or when a cheaper one than the job's fits.
    pub fits_with: Option<(MemorySetting, Memory)>,
    pub mfu: f64,
    pub mfu_source: MfuSource,
    pub gpu_hours: f64,
    pub wall_hours: f64,
    pub price_per_gpu_hour: f64,
    pub price_assumed: bool,
    pub warnings: Vec<String>,
}

/// What the job's memory depends on besides the model: ZeRO stage, recompute, micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySetting {
    pub zero_stage: u8,
    pub recompute: bool,
    /// Samples per forward/backward pass on one rank.
    pub micro_batch: u64,
}

/// Bytes per rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Memory {
    /// The weights as the passes read them, in the compute dtype, whole on every rank.
    pub weights: f64,
    /// f32 master weights (bf16 compute only), 1/w from stage 1.
    pub master_f32: f64,
    /// AdamW's two f32 moments, 1/w from stage 1.
    pub optimizer_f32: f64,
    /// The f32 gradient buffer a step accumulates into: the whole flat buffer at stages 0 and
    /// 1, the rank's slice (1/w) at stage 2, where each micro-batch's gradients are reduced to
    /// their owners in buckets as the backward pass makes them.
    pub gradients_f32: f64,
    /// Stage 2 over more than one rank: one gradient bucket in flight
    /// (`dapt_proto::model::GRADIENT_BUCKET_ELEMENTS` f32s, or the whole model when smaller),
    /// twice: on a GPU the parameters' f32 casts and their concatenation; on the CPU (f32, where
    /// the pieces are the gradients in flight) the concatenation and the ring's host copy.
    pub gradient_buckets: f64,
    /// Whether the blocks are recomputed in the backward pass: then each block's gradients
    /// leave in buckets while the kept inputs are alive; without, they leave after the whole
    /// backward pass, when the graph's activations are gone.
    pub recompute: bool,
    /// Gradients the backward pass holds before they reach the flat buffer, compute dtype: all
    /// parameters' with one graph, one block's (or the embedding's) with recompute.
    pub gradients_in_flight: f64,
    pub activations: f64,
    /// One vocabulary chunk of the fused loss's logits `[tokens, chunk]` in the compute dtype
    /// and three f32 tensors of that size (the f32 cast, the exponentials, the gradient); the
    /// chunk is `dapt_proto::model::loss_chunk` (the whole vocabulary when it fits 128 MiB).
    pub logits: f64,
    /// The bytes beyond the states after the backward phase (the all-reduce, the norm and
    /// AdamW; not at the same time as the backward phase): see [`optimizer_temporaries`].
    pub optimizer_temporaries: f64,
    /// The process before the model (see [`Gpu::runtime_bytes`]).
    pub runtime: f64,
    /// See [`Gpu::unattributed_per_param`].
    pub unattributed: f64,
}

impl Memory {
    /// The states held through the whole step.
    pub fn states(&self) -> f64 {
        self.runtime
            + self.unattributed
            + self.weights
            + self.master_f32
            + self.optimizer_f32
            + self.gradients_f32
    }

    /// The backward phase's extra: gradients in flight, activations, logits; and stage 2's
    /// bucket, with them under recompute, or after them (beside the gradients only) without.
    pub fn backward_phase(&self) -> f64 {
        let passes = self.gradients_in_flight + self.activations + self.logits;
        if self.recompute {
            passes + self.gradient_buckets
        } else {
            passes.max(self.gradients_in_flight + self.gradient_buckets)
        }
    }

    /// The peak: states plus the larger of the two phases.
    pub fn total(&self) -> f64 {
        self.states() + self.backward_phase().max(self.optimizer_temporaries)
    }
}

/// Bytes one decoder block keeps for its backward pass in dapt's graph, for `b` sequences of
/// `s` tokens (`n = b s` rows), with `c` bytes per element of the compute dtype and `flash`
/// whether attention is the fused op ([`Gpu::flash_attention`]).
///
/// Every backend: the two RMSNorms' outputs (each norm one autodiff node keeping its input,
/// the gain and an f32 inverse rms `[n]`), the residual sum and the block's output (4 n h; a
/// norm's input is the block's input or the residual sum, kept once); RoPE's rotated q and k
/// (n d + n d_kv: its node keeps only the `[seq, head_dim]` tables, not its input), v
/// (n d_kv), the attention output (n d); the MLP's gate, up and SwiGLU's product (3 n f: the
/// fused SwiGLU keeps gate and up). Qwen3's per-head q/k norms add their inputs and f32
/// inverse rms. Then attention's own: with flash attention the f32 log-sum-exp
/// `[b, heads, s]`; with the decomposed formula (CPU) k and v repeated to the query heads when
/// there are fewer kv heads (in place of the rotated k and v: n (d - d_kv) more each) and
/// three `[b, heads, s, s]` score tensors (the shifted scores, their exponentials, the
/// probabilities).
pub fn block_activation_bytes(config: &LlamaConfig, b: f64, s: f64, c: f64, flash: bool) -> f64 {
    let n = b * s;
    let d = (config.num_attention_heads * config.head_dim) as f64;
    let h = config.hidden_size as f64;
    let kv = (config.num_key_value_heads * config.head_dim) as f64;
    let f = config.intermediate_size as f64;
    let a = config.num_attention_heads as f64;
    let norms = c * n * 4.0 * h + 4.0 * 2.0 * n;
    let mlp = c * n * 3.0 * f;
    let qk_norm = if config.family.qk_norm() {
        c * n * (d + kv) + 4.0 * n * (a + config.num_key_value_heads as f64)
    } else {
        0.0
    };
    let attention = if flash {
        c * n * (2.0 * d + 2.0 * kv) + 4.0 * b * a * s
    } else {
        c * n * 4.0 * d + 3.0 * c * b * a * s * s
    };
    norms + mlp + qk_norm + attention
}

/// The bytes beyond the states after the backward passes (the all-reduce, the norm, AdamW), for
/// `n` parameters of which the rank owns `owned`, with `c` bytes per element of the compute
/// dtype. On a GPU the all-reduce is NCCL's, in place, and AdamW one in-place kernel
/// (`worker/src/fused/adamw.rs`): nothing, except one piece of the compute-dtype copy of the
/// owned slice cast from a sharded f32 master (bf16, ZeRO over more than one rank) on its way
/// into the compute weights, piece by piece of
/// [`dapt_proto::model::GRADIENT_BUCKET_ELEMENTS`]. On the CPU the larger of: the ring's host-staged all-reduce of the whole
/// gradient at stages 0 and 1 over more than one rank (`HostStaged`: a host copy of it, 4 n,
/// and the ring's chunk in flight, 4 n / w; fitted to the d512 rows of docs/plan.md, not derived
/// from the ring's code), and AdamW in Burn's ops over chunks of
/// [`dapt_proto::model::ADAMW_CHUNK_ELEMENTS`] (five f32 temporaries of a chunk at the peak).
fn optimizer_temporaries(
    gpu: &Gpu,
    setting: MemorySetting,
    world: u32,
    c: f64,
    n: f64,
    owned: f64,
) -> f64 {
    if gpu.name == "cpu" {
        let adamw = 5.0 * 4.0 * owned.min(dapt_proto::model::ADAMW_CHUNK_ELEMENTS as f64);
        let staged = if world > 1 && setting.zero_stage < 2 {
            4.0 * n + 4.0 * n / world as f64
        } else {
            0.0
        };
        adamw.max(staged)
    } else if c < 4.0 && setting.zero_stage >= 1 && world > 1 {
        c * owned.min(dapt_proto::model::GRADIENT_BUCKET_ELEMENTS as f64)
    } else {
        0.0
    }
}

/// Per-rank memory for `config` trained with `training` on `gpu` over `world` ranks at
/// `setting`.
pub fn memory(
    config: &LlamaConfig,
    training: &TrainingSpec,
    gpu: &Gpu,
    world: u32,
    setting: MemorySetting,
) -> Memory {
    let n = config.num_params() as f64;
    let w = world.max(1) as f64;
    let c = gpu.compute_bytes;
    let l = config.num_hidden_layers as f64;
    let s = training.seq_len as f64;
    let b = setting.micro_batch as f64;
    let h = config.hidden_size as f64;
    let block = block_activation_bytes(config, b, s, c, gpu.flash_attention);
    let activations = if setting.recompute {
        // Each block's input, kept; one block's graph at a time in the backward pass.
        c * l * b * s * h + block
    } else {
        l * block
    };
    let embedding = (config.vocab_size as f64) * h;
    let per_block = (n - embedding * if config.tie_word_embeddings { 1.0 } else { 2.0 }) / l;
    let in_flight = if setting.recompute {
        c * per_block.max(embedding)
    } else {
        c * n
    };
    // From stage 1 a rank owns 1/w of the flat buffer's optimizer state; from stage 2 of its
    // gradients too (one bucket at a time in flight beyond that).
    let owned = if setting.zero_stage >= 1 { n / w } else { n };
    let sharded_gradients = setting.zero_stage >= 2 && world > 1;
    let bucket = 4.0 * n.min(dapt_proto::model::GRADIENT_BUCKET_ELEMENTS as f64);
    Memory {
        weights: c * n,
        master_f32: if c < 4.0 { 4.0 * owned } else { 0.0 },
        optimizer_f32: 8.0 * owned,
        gradients_f32: if sharded_gradients {
            4.0 * owned
        } else {
            4.0 * n
        },
        gradient_buckets: if sharded_gradients { 2.0 * bucket } else { 0.0 },
        recompute: setting.recompute,
        gradients_in_flight: in_flight,
        activations,
        logits: (c + 12.0)
            * b
            * s
            * dapt_proto::model::loss_chunk((b * s) as usize, config.vocab_size) as f64,
        optimizer_temporaries: optimizer_temporaries(gpu, setting, world, c, n, owned),
        runtime: gpu.runtime_bytes,
        unattributed: gpu.unattributed_per_param * n,
    }
}

/// Samples per forward/backward pass on one rank: the job's micro-batch, or the rank's share
/// of the global batch when that is smaller.
pub fn rank_micro_batch(training: &TrainingSpec, world: u32) -> u64 {
    let share = training.global_batch.div_ceil(world.max(1) as u64);
    training.micro_batch().min(share).max(1)
}

/// The first setting that fits in 90% of `gpu`'s memory, trying the cheapest first: without
/// recompute before with it (recompute costs a forward pass), the job's micro-batch before
/// halves of it (smaller passes run less efficiently), and ZeRO stage 0, 1, 2 (stage 1 adds an
/// all-gather of the weights to stage 0's all-reduce; stage 2 reduces once per micro-batch
/// instead of once per step).
pub fn smallest_fit(
    config: &LlamaConfig,
    training: &TrainingSpec,
    gpu: &Gpu,
    world: u32,
) -> Option<(MemorySetting, Memory)> {
    let usable = 0.9 * gpu.memory_bytes;
    let mut micro = Vec::new();
    let mut m = rank_micro_batch(training, world);
    while m >= 1 {
        micro.push(m);
        m /= 2;
    }
    for recompute in [false, true] {
        for &micro_batch in &micro {
            for zero_stage in 0..=2 {
                let setting = MemorySetting {
                    zero_stage,
                    recompute,
                    micro_batch,
                };
                let mem = memory(config, training, gpu, world, setting);
                if mem.total() <= usable {
                    return Some((setting, mem));
                }
            }
        }
    }
    None
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

    let gpu = options.gpu;
    let world = options.gpus;
    let setting = MemorySetting {
        zero_stage: training.zero_stage,
        recompute: training.activation_checkpointing,
        micro_batch: rank_micro_batch(&training, world),
    };
    let memory = memory(config, &training, &gpu, world, setting);
    let usable = 0.9 * gpu.memory_bytes;
    let fits = memory.total() <= usable;
    let cheapest = smallest_fit(config, &training, &gpu, world);
    let fits_with = cheapest.filter(|(cheap, _)| *cheap != setting);

    let (mfu, mfu_source) = match (options.mfu, gpu.measured_mfu) {
        (Some(m), _) => (m, MfuSource::User),
        (None, Some(measured)) => (measured.mfu, MfuSource::Measured(measured.what)),
        (None, None) => (H200_MFU.mfu, MfuSource::Nearest(H200_MFU.what)),
    };
    let gpu_hours = (flops_dense + flops_attention) / (gpu.peak_flops * mfu) / 3600.0;
    let mut warnings = Vec::new();
    if !fits {
        let advice = match &fits_with {
            Some((cheap, mem)) => format!(
                "it fits at {} ({} per rank)",
                describe(cheap),
                gb(mem.total())
            ),
            None => {
                let bigger = GPUS
                    .iter()
                    .filter(|g| {
                        g.compute_bytes == gpu.compute_bytes && g.memory_bytes > gpu.memory_bytes
                    })
                    .filter(|g| smallest_fit(config, &training, g, world).is_some())
                    .min_by(|x, y| x.memory_bytes.total_cmp(&y.memory_bytes));
                match bigger {
                    Some(g) => format!(
                        "no zero_stage, recompute or micro_batch makes it fit on {world} ranks; {} ({:.0} GB) does, or more ranks",
                        g.name.to_uppercase(),
                        g.memory_bytes / 1e9
                    ),
                    None => format!(
                        "no zero_stage, recompute or micro_batch makes it fit on {world} ranks; more ranks (ZeRO shards the states 1/w)"
                    ),
                }
            }
        };
        warnings.push(format!(
            "does not fit: {} per rank against {:.0} GB usable on {} ({:.0} GB); {}",
            gb(memory.total()),
            usable / 1e9,
            gpu.name.to_uppercase(),
            gpu.memory_bytes / 1e9,
            advice
        ));
    }
    let needs_zero = setting.zero_stage > 0
        || (!fits && fits_with.as_ref().is_some_and(|(c, _)| c.zero_stage > 0));
    if gpu.name != "cpu" && needs_zero {
        let stage = if setting.zero_stage > 0 {
            setting.zero_stage
        } else {
            fits_with.as_ref().map_or(1, |(c, _)| c.zero_stage)
        };
        warnings.push(format!(
            "zero_stage {stage} on GPUs: the device engine's NCCL reduce and all-gather have run on one GPU (one rank), not yet across GPUs (docs/model.md, ZeRO)"
        ));
    }
    if training.global_batch % world as u64 != 0 {
        warnings.push(format!(
            "global_batch {} does not divide over {} GPUs: ranks hold {} or {} samples per step",
            training.global_batch,
            world,
            training.global_batch / world as u64,
            training.global_batch / world as u64 + 1
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
        setting,
        fits_with,
        mfu,
        mfu_source,
        gpu_hours,
        wall_hours: gpu_hours / world as f64,
        price_per_gpu_hour: price,
        price_assumed: assumed,
        warnings,
    })
}

/// Bytes as the plan prints them: GB with one decimal, or MB under 10 GB.
/// A FLOP/s figure in TFLOP/s, or GFLOP/s below one TFLOP/s (the CPU's 377 GFLOP/s).
fn flop_rate(flops: f64) -> String {
    if flops >= 1e12 {
        format!("{:.0} TFLOP/s", flops / 1e12)
    } else {
        format!("{:.0} GFLOP/s", flops / 1e9)
    }
}

pub fn gb(bytes: f64) -> String {
    if bytes >= 10e9 {
        format!("{:.1} GB", bytes / 1e9)
    } else {
        format!("{:.0} MB", bytes / 1e6)
    }
}

/// A memory setting as the job file spells it.
fn describe(s: &MemorySetting) -> String {
    format!(
        "zero_stage {}, activation_checkpointing {}, micro_batch {}",
        s.zero_stage, s.recompute, s.micro_batch
    )
}

/// A parameter count as people say it: `6.738 B` from a billion up, `1.2 M` below (a tiny
/// model was `0.001 B`).
fn parameter_count(params: u64) -> String {
    if params >= 1_000_000_000 {
        format!("{:.3} B", params as f64 / 1e9)
    } else if params >= 1_000_000 {
        format!("{:.1} M", params as f64 / 1e6)
    } else {
        format!("{params}")
    }
}

/// The plan as the terminal shows it.
pub fn render(plan: &Plan, options: &PlanOptions, config: &LlamaConfig) -> String {
    let mut o = String::new();
    let m = &plan.memory;
    let _ = writeln!(
        o,
        "model: {} parameters ({} layers, hidden {}, {}/{} heads, vocabulary {})",
        parameter_count(plan.params),
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
    let gpu = options.gpu;
    let dtype = if gpu.compute_bytes < 4.0 {
        "bf16"
    } else {
        "f32"
    };
    let _ = writeln!(
        o,
        "memory per rank: {} at {} over {} rank{} = runtime {}{} + {dtype} weights {} + f32 master {} + AdamW moments {} + f32 gradients {} + max(backward: gradients in flight {} + activations {} + logits {}{}; optimizer temporaries {})",
        gb(m.total()),
        describe(&plan.setting),
        options.gpus,
        if options.gpus == 1 { "" } else { "s" },
        gb(m.runtime),
        if m.unattributed > 0.0 {
            format!(" + unattributed {}", gb(m.unattributed))
        } else {
            String::new()
        },
        gb(m.weights),
        gb(m.master_f32),
        gb(m.optimizer_f32),
        gb(m.gradients_f32),
        gb(m.gradients_in_flight),
        gb(m.activations),
        gb(m.logits),
        match (m.gradient_buckets > 0.0, m.recompute) {
            (false, _) => String::new(),
            (true, true) => format!(" + gradient buckets {}", gb(m.gradient_buckets)),
            (true, false) => format!(
                "; after it: gradients in flight + gradient buckets {}",
                gb(m.gradient_buckets)
            ),
        },
        gb(m.optimizer_temporaries)
    );
    if let Some((cheap, mem)) = &plan.fits_with {
        let _ = writeln!(
            o,
            "smallest setting that fits {}: {} ({})",
            gpu.name.to_uppercase(),
            describe(cheap),
            gb(mem.total())
        );
    }
    let mfu = match plan.mfu_source {
        MfuSource::Measured(what) => format!("{:.1}% MFU ({what})", plan.mfu * 100.0),
        MfuSource::Nearest(what) => format!(
            "{:.1}% MFU (none measured on {}; {what})",
            plan.mfu * 100.0,
            gpu.name.to_uppercase()
        ),
        MfuSource::User => format!(
            "{:.1}% MFU (given with --mfu, not measured)",
            plan.mfu * 100.0
        ),
    };
    // The CPU's units are machines (ranks), and a small job's time is minutes, not "0.0 h"
    // (a new user's walk-through).
    let unit = if gpu.name == "cpu" { "CPU" } else { "GPU" };
    let hours = |h: f64| {
        if h < 0.1 {
            format!("{:.1} {unit}-minutes", h * 60.0)
        } else {
            format!("{h:.1} {unit}-hours")
        }
    };
    let span = |h: f64| {
        if h < 0.1 {
            format!("{:.1} min", h * 60.0)
        } else {
            format!("{h:.1} h")
        }
    };
    let wall = span(plan.wall_hours);
    // The CPU's peak is one machine's: ranks sharing one machine (as `dapt launch` runs them)
    // share it, so the wall time is the machine's whole time (the quickstart's plan said 0.3
    // min on 2 ranks for a run of 1m25s; a new user's walk-through).
    let where_ = if gpu.name == "cpu" && options.gpus > 1 {
        format!(
            "{} machines, a rank each ({} when the {} ranks share one machine's cores, as dapt \
             launch runs them)",
            options.gpus,
            span(plan.gpu_hours),
            options.gpus
        )
    } else if gpu.name == "cpu" {
        "one machine".to_owned()
    } else {
        format!("{} GPUs", options.gpus)
    };
    let _ = writeln!(
        o,
        "time: {} on {} ({} dense {dtype}) at {mfu}; {wall} wall on {where_}",
        hours(plan.gpu_hours),
        gpu.name.to_uppercase(),
        flop_rate(gpu.peak_flops),
    );
    let cost = plan.gpu_hours * plan.price_per_gpu_hour;
    let _ = writeln!(
        o,
        "cost: ${} at ${:.2} per {unit}-hour{}",
        if cost < 10.0 {
            format!("{cost:.2}")
        } else {
            format!("{cost:.0}")
        },
        plan.price_per_gpu_hour,
        if plan.price_assumed && plan.price_per_gpu_hour == 0.0 {
            " (no price assumed for this machine: pass --price-per-gpu-hour with its hourly price)"
        } else if plan.price_assumed {
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
        for g in GPUS.iter().filter(|g| g.name != "cpu") {
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
            mfu: None,
            price_per_gpu_hour: None,
        }
    }

    #[test]
    fn seven_billion_on_a_billion_tokens_at_the_measured_mfu() {
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
        // No H100 measurement: the H200's 6.8%, said as such.
        assert_eq!(p.mfu, 0.068);
        assert!(matches!(p.mfu_source, MfuSource::Nearest(_)));
        let gpu_hours = (p.flops_dense + p.flops_attention) / (989e12 * 0.068) / 3600.0;
        assert!((p.gpu_hours - gpu_hours).abs() < 1e-9);
        let text = render(&p, &options("h100"), &config);
        assert!(text.contains("6.8% MFU (none measured on H100"), "{text}");
        // 18 bytes/parameter replicated, and every layer's activations: does not fit, and the
        // plan names what does.
        assert!((p.memory.optimizer_f32 - 8.0 * 6.738_415_616e9).abs() < 1.0);
        assert!(
            p.warnings.iter().any(|w| w.contains("does not fit")
                && w.contains("H100")
                && w.contains("it fits at zero_stage")),
            "{:?}",
            p.warnings
        );
    }

    /// A small model's size in millions (the quickstart's was "0.001 B"), and the CPU, which
    /// has no assumed price, asks for one instead of calling $0.00 an assumed price.
    #[test]
    fn a_small_model_on_the_cpu_is_counted_in_millions_and_priced_by_the_user() {
        assert_eq!(parameter_count(6_738_415_616), "6.738 B");
        assert_eq!(parameter_count(1_234_567), "1.2 M");
        assert_eq!(parameter_count(999), "999");
        let job = job("");
        let config = model_config(&job).expect("config");
        let o = options("cpu");
        let p = plan(&job, &config, &o).expect("plan");
        let text = render(&p, &o, &config);
        assert!(text.contains("no price assumed for this machine"), "{text}");
        assert!(!text.contains("an assumed on-demand price"), "{text}");
    }

    #[test]
    fn a_given_mfu_is_said_to_be_given() {
        let job = job("");
        let config = model_config(&job).expect("config");
        let mut o = options("h200");
        let measured = plan(&job, &config, &o).expect("plan");
        assert!(matches!(measured.mfu_source, MfuSource::Measured(_)));
        o.mfu = Some(0.4);
        let given = plan(&job, &config, &o).expect("plan");
        assert_eq!(given.mfu_source, MfuSource::User);
        let text = render(&given, &o, &config);
        assert!(
            text.contains("40.0% MFU (given with --mfu, not measured)"),
            "{text}"
        );
        assert!((measured.gpu_hours / given.gpu_hours - 0.4 / 0.068).abs() < 1e-9);
    }

    #[test]
    fn zero_shards_states_one_over_w() {
        let job = job("");
        let config = model_config(&job).expect("config");
        let training = job.training.expect("training");
        let h100 = gpu("h100").expect("h100");
        let at = |stage, world| {
            memory(
                &config,
                &training,
                &h100,
                world,
                MemorySetting {
                    zero_stage: stage,
                    recompute: true,
                    micro_batch: 1,
                },
            )
        };
        let n = config.num_params() as f64;
        let (s0, s1, s2) = (at(0, 8), at(1, 8), at(2, 8));
        assert_eq!(s0.optimizer_f32, 8.0 * n);
        assert_eq!(s1.optimizer_f32, n);
        assert_eq!(s1.master_f32, 0.5 * n);
        // Stages 0 and 1 accumulate into the whole gradient buffer; stage 2 into the rank's
        // slice, with one 64 MiB f32 bucket (twice: pieces and concatenation) in flight.
        for s in [&s0, &s1] {
            assert_eq!(s.gradients_f32, 4.0 * n);
            assert_eq!(s.gradient_buckets, 0.0);
        }
        assert_eq!(s2.gradients_f32, 0.5 * n);
        assert_eq!(s2.gradient_buckets, 2.0 * 4.0 * (16 << 20) as f64);
        assert_eq!(s1.optimizer_temporaries, s2.optimizer_temporaries);
        // Every rank keeps the whole bf16 weights.
        assert_eq!(s2.weights, 2.0 * n);
        assert!(s0.total() > s1.total());
        assert!(s1.total() > s2.total() + 3.0 * n);
        // One rank has nobody to shard with: stage 2 holds the whole buffer there.
        assert_eq!(at(2, 1).gradients_f32, 4.0 * n);
        // More ranks, less per rank.
        assert!(at(2, 16).total() < s2.total());
        // Recompute keeps one block's activations instead of all of them.
        let full = memory(
            &config,
            &training,
            &h100,
            8,
            MemorySetting {
                zero_stage: 2,
                recompute: false,
                micro_batch: 1,
            },
        );
        assert!(full.activations > 10.0 * s2.activations);
    }

    #[test]
    fn the_seven_billion_example_fits_eight_h100s_at_zero_stage_two_with_recompute() {
        let job = job("  activation_checkpointing: true\n  zero_stage: 2\n");
        let config = model_config(&job).expect("config");
        let p = plan(&job, &config, &options("h100")).expect("plan");
        // With 1/8 of the f32 gradients (3.4 GB) on every rank: about 31 GB of 72 usable.
        let total = p.memory.total();
        assert!(total < 35e9 && total > 28e9, "{total}");
        assert_eq!(
            p.memory.gradients_f32,
            4.0 * config.num_params() as f64 / 8.0
        );
        // The only warning: the NCCL collectives have not run on GPUs.
        assert!(
            p.warnings.len() == 1 && p.warnings[0].contains("NCCL reduce and all-gather"),
            "{:?}",
            p.warnings
        );
        // Stage 2 fits without recompute too (every block's activations, about 59 GB): the
        // cheaper setting, named. Stage 1 does not (the whole gradient buffer, about 83 GB).
        let (cheapest, mem) = p.fits_with.expect("a cheaper setting");
        assert_eq!(
            cheapest,
            MemorySetting {
                zero_stage: 2,
                recompute: false,
                micro_batch: 1
            }
        );
        assert!(
            mem.total() > 55e9 && mem.total() < 0.9 * 80e9,
            "{}",
            mem.total()
        );
        let text = render(&p, &options("h100"), &config);
        assert!(
            text.contains("6.738 B parameters") && text.contains("assumed"),
            "{text}"
        );
    }

    #[test]
    fn flash_attention_keeps_no_seq_squared_scores_and_the_cpu_formula_does() {
        let config = model_config(&job("")).expect("config");
        let (a, hd) = (config.num_attention_heads as f64, config.head_dim as f64);
        let at = |s: f64, flash| block_activation_bytes(&config, 1.0, s, 2.0, flash);
        // On a GPU the block's bytes grow linearly with the sequence (the log-sum-exp is per
        // row); the decomposed formula adds three `[heads, s, s]` score tensors.
        assert!((at(8192.0, true) / at(4096.0, true) - 2.0).abs() < 1e-12);
        let scores = |s: f64| 3.0 * 2.0 * a * s * s;
        assert_eq!(
            at(4096.0, false) - scores(4096.0),
            at(4096.0, true) - 4.0 * a * 4096.0
        );
        // Llama-2-7B at seq 4096 in bf16: 4 h + 2 d + 2 d_kv + 3 f rows of 4096 values (h = d =
        // d_kv = 4096, f = 11008) and two f32 inverse rms, plus the f32 log-sum-exp: 540 MB.
        let rows = 4.0 * 4096.0 + 4.0 * a * hd + 3.0 * 11008.0;
        let expected = 2.0 * 4096.0 * rows + 8.0 * 4096.0 + 4.0 * a * 4096.0;
        assert_eq!(at(4096.0, true), expected);
    }

    #[test]
    fn the_rank_micro_batch_is_at_most_the_ranks_share() {
        let job = job("");
        let training = job.training.expect("training");
        assert_eq!(rank_micro_batch(&training, 8), 1);
        let mut t = training;
        t.micro_batch = Some(64);
        assert_eq!(rank_micro_batch(&t, 8), 32);
        assert_eq!(rank_micro_batch(&t, 2), 64);
    }
}
