//! The single-rank training loop: the job's model on the job's corpus, step after step in the
//! global sample order, with evaluation, checkpoints and resume. The distributed agent runs the
//! same step with a collective between its two halves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dapt_corpus::{step_range, CorpusReader};
use dapt_proto::job::{JobSpec, TrainingSpec};
use dapt_proto::schedule::LrSchedule;
use serde::Serialize;

use super::engine::Engine;
use super::eval::Perplexity;
use super::{MicroBatch, Trainer};
use crate::checkpoint;
use crate::device::{DeviceSpec, Precision};
use crate::error::{Result, WorkerError};
use crate::import::hf;
use crate::model::{LlamaConfig, ParamLayout};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop (with a checkpoint) once this many steps are complete, before the job's end.
    pub stop_after: Option<u64>,
    /// Where the passes run: the host trainer on the CPU, or device-resident on a GPU.
    pub device: DeviceSpec,
    /// Compute dtype on a GPU (the CPU path is f32).
    pub precision: Precision,
    /// Write no checkpoints at all (benchmarks).
    pub no_checkpoints: bool,
    /// On a GPU, all-reduce every step's gradients through a one-rank NCCL communicator: the
    /// multi-rank code path and its cost, on one GPU (NCCL refuses two ranks on one device).
    pub nccl_single_rank: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    /// Steps completed with this one (1 for a job's first step).
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalLog {
    pub step: u64,
    /// Per source: name and perplexity on its held-out documents.
    pub sources: Vec<(String, Perplexity)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub resumed_from: Option<u64>,
    pub steps: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    pub last_checkpoint: Option<PathBuf>,
    pub finished: bool,
    /// Stopped by SIGINT or SIGTERM ([`stop_on_interrupt`]) after a step, with a checkpoint of
    /// it.
    pub interrupted: bool,
}

/// Set by the first SIGINT or SIGTERM once [`stop_on_interrupt`] is called.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// When the first one came, in `CLOCK_MONOTONIC` milliseconds.
static FIRST_SIGNAL_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// A signal this soon after the first is the same stop, delivered twice: a group-wide SIGTERM
/// (`timeout`, systemd, `scancel`) reaches this process directly and through the `dapt` that
/// started it, and a terminal's Ctrl-C reaches both.
const SAME_STOP_MS: u64 = 2_000;

fn monotonic_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` is async-signal-safe (POSIX) and writes only `now`.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
    }
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000 + 1
}

extern "C" fn on_interrupt(signal: libc::c_int) {
    use std::sync::atomic::Ordering::SeqCst;
    let now = monotonic_ms();
    match FIRST_SIGNAL_MS.compare_exchange(0, now, SeqCst, SeqCst) {
        Ok(_) => {
            INTERRUPTED.store(true, SeqCst);
            // Said at once (a step, or loading a large model, can take a while).
            const SAID: &[u8] =
                b"stopping after the step in progress, with a checkpoint (again after 2 s: at once)\n";
            // SAFETY: `write` is async-signal-safe (POSIX); a failed write is of no matter.
            unsafe {
                libc::write(2, SAID.as_ptr().cast(), SAID.len());
            }
        }
        // A later one, past the same stop's copies, ends the process as it would have without
        // this handler.
        Err(first) if now.saturating_sub(first) > SAME_STOP_MS => {
            const SAID: &[u8] = b"stopped at once: the step in progress is not checkpointed; the \
                same command resumes from the last checkpoint\n";
            // SAFETY: `write`, `signal` and `raise` are async-signal-safe (POSIX).
            unsafe {
                libc::write(2, SAID.as_ptr().cast(), SAID.len());
                libc::signal(signal, libc::SIG_DFL);
                libc::raise(signal);
            }
        }
        Err(_) => {}
    }
}

/// Makes the first SIGINT (Ctrl-C) or SIGTERM stop `dapt train` after the step in progress,
/// with a checkpoint of it, instead of killing it between checkpoints without a word (the steps
/// since the last checkpoint were lost; a new user's walk-through). Another one more than 2 s
/// later kills it (copies of the first within 2 s are the same stop).
pub fn stop_on_interrupt() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler uses only atomics and async-signal-safe calls.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Returns when this process's stdin ends (or fails): a pipe whose write end only the parent
/// holds ends when the parent does, however it ended. Anything read is ignored.
pub fn wait_for_end_of_stdin() {
    use std::io::Read;
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The environment variable `dapt train` sets on the `dapt-worker` it runs: the worker's stdin
/// is a pipe whose write end only that `dapt` holds.
pub const PARENT_PIPE_ENV: &str = "DAPT_PARENT_PIPE";

/// Under `dapt train` (`DAPT_PARENT_PIPE=stdin`), stops this run after the step in progress, with
/// a checkpoint, as a Ctrl-C does, once the `dapt` that started it is gone (its stdin ends,
/// however it ended, SIGKILL included): a `dapt train` killed alone left its worker training to
/// the end, unsupervised, holding checkpoint.dir's lock against the next run (an audit).
pub fn stop_when_parent_gone() {
    if std::env::var_os(PARENT_PIPE_ENV).is_none_or(|v| v != "stdin") {
        return;
    }
    let watch = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(|| {
            use std::sync::atomic::Ordering::SeqCst;
            wait_for_end_of_stdin();
            if FIRST_SIGNAL_MS
                .compare_exchange(0, monotonic_ms(), SeqCst, SeqCst)
                .is_ok()
            {
                INTERRUPTED.store(true, SeqCst);
                tracing::warn!(
                    "the dapt train that started this worker is gone: stopping after the step in \
                     progress, with a checkpoint (the same dapt train resumes there)"
                );
            }
        });
    if let Err(e) = watch {
        tracing::warn!(error = %e, "cannot watch for the exit of the dapt that started this worker");
    }
}

/// Trains `job` on one rank from its last checkpoint (or from the start).
pub fn run(job: &JobSpec, options: &RunOptions) -> Result<RunSummary> {
    let training = job
        .training
        .ok_or_else(|| WorkerError::Invalid("the job has no `training:` section".into()))?;
    let reader = CorpusReader::open(&job.corpus.output)?;
    reader
        .manifest()
        .check_spec(&job.corpus)
        .map_err(WorkerError::Invalid)?;
    check_guard_windows(job, &reader, training.seq_len)?;
    let order = reader.sample_order(job.seed, training.seq_len)?;
    let root = job.checkpoint.dir.clone();
    // The directory's lock and `job.json`, as a coordinator takes them: never beside a
    // coordinator (or another `dapt train`) of this directory, never another job's checkpoints
    // resumed and pruned. Held until the run ends.
    let _dir_lock = if options.no_checkpoints {
        None
    } else {
        // A user's folder named as checkpoint.dir by mistake is refused before anything is
        // written there, as `dapt launch` refuses it. One that dapt claimed (its `job.json`,
        // checked against this job below) or a coordinator's (`committed.json`) is dapt's: a
        // damaged checkpoint there is named by the resume, not called a user's.
        let claimed = std::fs::read(root.join(dapt_proto::identity::JOB_FILE))
            .is_ok_and(|b| serde_json::from_slice::<dapt_proto::identity::JobIdentity>(&b).is_ok());
        if !claimed && !root.join(dapt_proto::checkpoint::COMMITTED_FILE).exists() {
            let foreign =
                dapt_proto::checkpoint::foreign_entry(&root, |_, _| false).map_err(|e| {
                    WorkerError::Invalid(format!("checkpoint.dir {}: {e}", root.display()))
                })?;
            if let Some(name) = foreign {
                return Err(WorkerError::Invalid(format!(
                    "checkpoint.dir {} exists and holds `{name}`, which dapt did not write: \
                     choose an empty or new directory for checkpoint.dir",
                    root.display()
                )));
            }
        }
        std::fs::create_dir_all(&root)
            .map_err(|e| WorkerError::Invalid(format!("checkpoint.dir {}: {e}", root.display())))?;
        let ours = dapt_proto::identity::JobIdentity::new(job, None);
        let lock = dapt_proto::identity::claim(&root, &ours)
            .map_err(|e| WorkerError::Invalid(e.to_string()))?;
        // Nothing else writes here while the lock is ours: what an interrupted checkpoint left
        // in staging (a whole checkpoint's size) goes.
        dapt_proto::checkpoint::remove_stale_staging(&root);
        Some(lock)
    };

    let mut resumed_from = None;
    let mut kept = checkpoint::list(&root)?;
    refuse_unreadable_newer(&root, kept.last().map(|(step, _)| *step))?;
    let mut restored = None;
    // The newest checkpoint that verifies: a corrupt one gives way to the one before it.
    let digest = reader.manifest().content_digest();
    while let Some((step, dir)) = kept.pop() {
        match restore(&dir, &training, job.seed) {
            Ok(trainer) => {
                // After the checkpoint verified, and never a reason to fall back to an older
                // one (which would train on the other corpus from there): another corpus.
                checkpoint::check_corpus(&dir, &digest)?;
                check_job_model(&dir, &trainer.config, job, &reader)?;
                resumed_from = Some(step);
                tracing::info!(step, dir = %dir.display(), "resumed from checkpoint");
                restored = Some(trainer);
                break;
            }
            Err(e @ WorkerError::Checkpoint { .. }) if !kept.is_empty() => {
                tracing::warn!(step, dir = %dir.display(), error = %e, "checkpoint failed verification; falling back to the previous kept checkpoint");
            }
            Err(e) => return Err(e),
        }
    }
    let trainer = match restored {
        Some(trainer) => trainer,
        None => {
            let (config, weights) = initial_model(job, &reader)?;
            Trainer::new(config, weights, &training)
        }
    };
    warn_past_max_positions(training.seq_len, &trainer.config, "training.seq_len");
    let vocab = reader.manifest().tokenizer.vocab_size as usize;
    if vocab > trainer.config.vocab_size {
        return Err(WorkerError::Invalid(format!(
            "the corpus tokenizer has {vocab} tokens but the model only {}",
            trainer.config.vocab_size
        )));
    }
    let ctx = LoopContext {
        job,
        training: &training,
        reader: &reader,
        corpus_digest: &digest,
        order: &order,
        options,
        resumed_from,
    };
    match options.device {
        DeviceSpec::Cpu => train_loop(&mut super::engine::HostEngine::alone(trainer), &ctx),
        DeviceSpec::Cuda(ordinal) => on_gpu(trainer, ordinal, &ctx),
        DeviceSpec::Vulkan => on_vulkan(trainer, &ctx),
    }
}

/// The GPU's engine on Burn's wgpu backend (`--device vulkan`, f32): the CUDA step's code and
/// kernels where there is no CUDA, for checks and kernel counts on Mesa's lavapipe.
#[cfg(feature = "wgpu")]
fn on_vulkan(trainer: Trainer, ctx: &LoopContext) -> Result<RunSummary> {
    if ctx.options.precision != crate::device::Precision::F32 {
        return Err(WorkerError::Invalid(format!(
            "--device vulkan computes in f32 (lavapipe has no bf16); got --precision {}",
            ctx.options.precision
        )));
    }
    // One buffer binding holds the flat f32 weights, moments and gradients each: a driver that
    // binds less (lavapipe: 128 MiB) would fail on the device thread, not here.
    let device = Default::default();
    let client = <cubecl::wgpu::WgpuRuntime as cubecl::Runtime>::client(&device);
    let most = client.properties().memory.max_page_size;
    let flat = 4 * trainer.layout.total as u64;
    if flat > most {
        return Err(WorkerError::Invalid(format!(
            "--device vulkan: the flat f32 buffers are {} MiB each, but this Vulkan device binds \
             at most {} MiB per buffer: take a smaller model (the tiny preset)",
            flat >> 20,
            most >> 20
        )));
    }
    // The gradient norm's sum of squares is f64 (`fused::accumulate`).
    if !client
        .properties()
        .supports_type(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F64))
    {
        return Err(WorkerError::Invalid(
            "--device vulkan: this Vulkan device has no f64 shaders (shaderFloat64), which the \
             gradient norm's sum of squares needs"
                .into(),
        ));
    }
    tracing::info!(device = %ctx.options.device, "training on vulkan (a check of the gpu step, not for training)");
    let mut engine = super::engine::on_vulkan(trainer, ctx.training.activation_checkpointing);
    train_loop(engine.as_mut(), ctx)
}

#[cfg(not(feature = "wgpu"))]
fn on_vulkan(_trainer: Trainer, _ctx: &LoopContext) -> Result<RunSummary> {
    Err(crate::device::no_vulkan())
}

/// What the loop needs besides the engine.
struct LoopContext<'a> {
    job: &'a JobSpec,
    training: &'a TrainingSpec,
    reader: &'a CorpusReader,
    /// The corpus's content digest, recorded in each checkpoint.
    corpus_digest: &'a str,
    order: &'a dapt_corpus::SampleOrder,
    options: &'a RunOptions,
    resumed_from: Option<u64>,
}

#[cfg(feature = "cuda")]
fn on_gpu(trainer: Trainer, ordinal: usize, ctx: &LoopContext) -> Result<RunSummary> {
    use super::resident::GradReducer;
    use crate::collective::nccl::{unique_id, NcclCollective, NcclConfig};
    use crate::collective::AbortHandle;
    let info = crate::device::cuda_ready(ordinal)?;
    tracing::info!(
        device = %ctx.options.device,
        name = %info.name,
        precision = %ctx.options.precision,
        cuda_path = %info.include_root.display(),
        "training on the gpu"
    );
    let started = Instant::now();
    let reducer: Option<Box<dyn GradReducer<crate::Gpu>>> = if ctx.options.nccl_single_rank {
        let cfg = NcclConfig {
            rank: 0,
            world: 1,
            id: unique_id()?,
            ordinal,
            timeout: std::time::Duration::from_secs(60),
        };
        Some(Box::new(NcclCollective::connect(cfg, AbortHandle::new())?))
    } else {
        None
    };
    let mut engine = super::engine::on_cuda(
        trainer,
        ordinal,
        ctx.options.precision,
        ctx.training.activation_checkpointing,
        reducer,
    );
    tracing::info!(
        secs = started.elapsed().as_secs_f64(),
        "weights and optimizer state on the device"
    );
    train_loop(engine.as_mut(), ctx)
}

#[cfg(not(feature = "cuda"))]
fn on_gpu(_trainer: Trainer, ordinal: usize, _ctx: &LoopContext) -> Result<RunSummary> {
    crate::device::cuda_ready(ordinal).map(|_| unreachable!("no cuda feature"))
}

fn train_loop(trainer: &mut dyn Engine, ctx: &LoopContext) -> Result<RunSummary> {
    let LoopContext {
        job,
        training,
        reader,
        corpus_digest,
        order,
        options,
        resumed_from,
    } = *ctx;
    let training = *training;
    let root = job.checkpoint.dir.clone();
    let resumed_dir = resumed_from.map(|step| checkpoint::step_dir(&root, step));
    let base_files =
        checkpoint::BaseFiles::read(job, reader.tokenizer_bytes(), resumed_dir.as_deref());

    let steps = training.steps();
    let stop = options.stop_after.unwrap_or(steps).min(steps);
    let mut summary = RunSummary {
        resumed_from,
        steps: Vec::new(),
        evals: Vec::new(),
        last_checkpoint: None,
        finished: false,
        interrupted: false,
    };
    if resumed_from.is_none() && training.eval_every > 0 {
        // The base model's held-out perplexity: what continued pretraining is measured against.
        summary.evals.push(evaluate(trainer, reader, &training, 0)?);
    }
    while trainer.step() < stop {
        let started = Instant::now();
        let step = trainer.step();
        let micro = MicroBatch::split(
            reader,
            order,
            step_range(step, training.global_batch),
            training.micro_batch(),
            training.seq_len,
        )?;
        let step_tokens = training.tokens_per_step();
        // One rank: the whole step's tokens are the denominator.
        let (loss, stats) = trainer.train_step(&micro, step_tokens as f64, step_tokens)?;
        let secs = started.elapsed().as_secs_f64();
        // Numbered by steps completed, as the coordinator's step lines and the evaluation and
        // checkpoint of the step are (dapt train's first step was "step 0" before).
        let log = StepLog {
            step: step + 1,
            loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: step_tokens as f64 / secs,
        };
        // Numbers, not pre-formatted strings: the text format rounds them for people, the JSON
        // format keeps them whole (proto::logging).
        tracing::info!(
            step = log.step,
            loss,
            lr = stats.lr,
            grad_norm = stats.grad_norm,
            tokens_per_s = log.tokens_per_s,
            eta_s = secs * (steps - trainer.step()) as f64,
            "step"
        );
        summary.steps.push(log);
        let done = trainer.step();
        let interrupted = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
        // (Stopping: the checkpoint, not an evaluation that can take a while.) The last step's
        // evaluation too comes before its checkpoint: a model whose held-out loss is not finite
        // was committed first, and the earlier checkpoints pruned (an audit).
        if (done >= steps || training.eval_every > 0 && done.is_multiple_of(training.eval_every))
            && !interrupted
        {
            summary
                .evals
                .push(evaluate(trainer, reader, &training, done)?);
        }
        // Again: a signal during the evaluation stops here too, not after another step.
        let interrupted = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
        if !options.no_checkpoints
            && (done.is_multiple_of(job.checkpoint.every) || done == stop || interrupted)
        {
            check_before_checkpoint(trainer, reader, training.seq_len, done)?;
            let origin = checkpoint::Origin::new(reader, corpus_digest, job, &base_files);
            let dir = trainer.save(&root, job.seed, Some(origin))?;
            checkpoint::prune(&root, job.checkpoint.keep)?;
            tracing::info!(step = done, dir = %dir.display(), "checkpoint committed");
            summary.last_checkpoint = Some(dir);
        }
        if interrupted && done < stop {
            summary.interrupted = true;
            return Ok(summary);
        }
    }
    if trainer.step() >= steps {
        // (Evaluated in the loop, before the last checkpoint; not when the run started done.)
        if summary.evals.last().map(|e| e.step) != Some(trainer.step()) {
            summary
                .evals
                .push(evaluate(trainer, reader, &training, trainer.step())?);
        }
        summary.finished = true;
    }
    Ok(summary)
}

/// A `step-N` directory under `root` newer than the newest readable checkpoint (`newest`) whose
/// manifest cannot be read (damaged, another format, another step) is an error naming it:
/// resuming from an older one (or from the start) would silently throw its training away, and
/// the first save would then fail on the directory anyway.
fn refuse_unreadable_newer(root: &Path, newest: Option<u64>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(dapt_proto::checkpoint::step_of_name) else {
            continue;
        };
        let dir = entry.path();
        if newest.is_some_and(|n| step <= n) || dapt_proto::checkpoint::identify(&dir).is_some() {
            continue;
        }
        let why = match dapt_proto::checkpoint::CheckpointManifest::read(&dir) {
            Err(e) => e.to_string(),
            Ok(m) => format!("its manifest is of step {}", m.step),
        };
        return Err(WorkerError::Checkpoint {
            path: dir.clone(),
            message: format!(
                "is newer than every readable checkpoint but cannot be resumed from ({why}); \
                 restore it, or move it out of checkpoint.dir to resume from the one before"
            ),
        });
    }
    Ok(())
}

/// The trainer saved in checkpoint `dir` (verified against its checksums), for a job with
/// `training` and `seed`.
pub fn restore(dir: &Path, training: &TrainingSpec, seed: u64) -> Result<Trainer> {
    restore_part(dir, training, seed, None)
}

/// [`restore`] holding only rank `r`'s ZeRO slice of the optimizer state of a `w`-way split when
/// `shard` is `Some((r, w))`, read from whatever split the checkpoint was written with.
pub fn restore_part(
    dir: &Path,
    training: &TrainingSpec,
    seed: u64,
    shard: Option<(usize, usize)>,
) -> Result<Trainer> {
    let loaded = checkpoint::load_part(dir, shard)?;
    if loaded.state.seed != seed {
        return Err(WorkerError::Invalid(format!(
            "checkpoint {} was trained with seed {}, the job says {seed}",
            dir.display(),
            loaded.state.seed,
        )));
    }
    // A step's samples are `step_range(step, global_batch)` windows of `seq_len + 1` tokens:
    // under other values the steps after the checkpoint would skip or repeat samples (an audit:
    // global_batch 8 -> 16 left a quarter of the corpus untrained, 8 -> 4 trained some twice).
    // (Checkpoints written before `training` was recorded are taken as they are.)
    if let Some(recorded) = &loaded.state.training {
        let shape = [
            (
                "training.seq_len",
                recorded.seq_len as u64,
                training.seq_len as u64,
            ),
            (
                "training.global_batch",
                recorded.global_batch,
                training.global_batch,
            ),
        ];
        for (field, recorded, now) in shape {
            if recorded != now {
                return Err(WorkerError::Invalid(format!(
                    "checkpoint {} was trained with {field} {recorded}, the job says {now}: each \
                     step's samples follow from seq_len and global_batch, so resuming under \
                     another value would skip or repeat samples; restore the job file's value, \
                     or start the job in another checkpoint.dir",
                    dir.display()
                )));
            }
        }
    }
    if let Some(recorded) = &loaded.state.training {
        let changed = dapt_proto::checkpoint::changed_training(recorded, training);
        if !changed.is_empty() {
            tracing::warn!(
                checkpoint = %dir.display(),
                changed = %changed.join(", "),
                "resuming with other training settings than the checkpoint was trained under (the job file was edited)"
            );
        }
    }
    let mut trainer = Trainer::new_sharded(loaded.config, loaded.weights, training, loaded.range);
    trainer.optimizer.m = loaded.m;
    trainer.optimizer.v = loaded.v;
    trainer.optimizer.t = loaded.state.optimizer_steps;
    trainer.step = loaded.state.step;
    trainer.tokens = loaded.state.tokens;
    trainer.skipped_steps = loaded.state.skipped_steps;
    // Settings edited so that the rate would jump up (a finished job's budget raised): a
    // re-warm to the edited schedule, kept in the checkpoints until it ends.
    let recorded = (loaded.state.training.as_ref())
        .map(|t| LrSchedule::of(t).with_rewarm(loaded.state.rewarm));
    trainer.schedule = trainer.schedule.resume(
        recorded.as_ref(),
        loaded.state.tokens,
        training.tokens_per_step(),
    );
    Ok(trainer)
}

/// The architecture the job's `model:` names: its preset with the corpus tokenizer's
/// vocabulary, or its Hugging Face folder's `config.json` (the weights are not read).
pub fn job_architecture(job: &JobSpec, reader: &CorpusReader) -> Result<LlamaConfig> {
    let spec = job
        .model
        .as_ref()
        .ok_or_else(|| WorkerError::Invalid("the job has no `model:` section".into()))?;
    match (&spec.hf, spec.preset) {
        (Some(dir), _) => hf::read_config(dir),
        (None, Some(preset)) => Ok(LlamaConfig::preset(
            preset,
            reader.manifest().tokenizer.vocab_size as usize,
        )),
        (None, None) => Err(WorkerError::Invalid(
            "model: give exactly one of `preset` and `hf`".into(),
        )),
    }
}

/// Refuses to resume the checkpoint at `dir` (whose model is `checkpoint`) when the job's
/// `model:` names another architecture (`job`): the job file was edited after the checkpoint
/// was written, and training would go on with a model the job does not describe.
///
/// # Errors
/// [`WorkerError::Invalid`] naming the checkpoint and each field that differs.
pub fn check_architecture(dir: &Path, checkpoint: &LlamaConfig, job: &LlamaConfig) -> Result<()> {
    // Each field as `{:?}` prints it on both sides.
    macro_rules! differing {
        ($($field:ident),*) => {
            [$((
                stringify!($field),
                format!("{:?}", checkpoint.$field),
                format!("{:?}", job.$field),
            )),*]
        };
    }
    let differ: Vec<String> = differing!(
        family,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        tie_word_embeddings,
        rope_theta,
        rope_scaling,
        rms_norm_eps,
        sliding_window
    )
    .into_iter()
    .filter(|(_, a, b)| a != b)
    .map(|(name, a, b)| format!("{name} {a} (the job: {b})"))
    .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(WorkerError::Invalid(format!(
        "checkpoint {} holds another model than the job's `model:` ({}): the job file was \
         edited after it was written; put `model:` back, or start the job afresh in a new \
         checkpoint.dir",
        dir.display(),
        differ.join(", ")
    )))
}

/// [`check_architecture`] against the job's `model:` ([`job_architecture`]); a Hugging Face
/// folder that cannot be read here (not mounted on this node: a resume does not need it) is
/// warned about and not checked.
pub fn check_job_model(
    dir: &Path,
    checkpoint: &LlamaConfig,
    job: &JobSpec,
    reader: &CorpusReader,
) -> Result<()> {
    match job_architecture(job, reader) {
        Ok(architecture) => check_architecture(dir, checkpoint, &architecture),
        Err(e) => {
            tracing::warn!(error = %e, "the job's model: cannot be read here; the checkpoint's model is not checked against it");
            Ok(())
        }
    }
}

/// The model a fresh run starts from: a Hugging Face directory (whose tokenizer must be the
/// corpus's), or a preset initialised from the job's seed with the corpus tokenizer's vocabulary.
pub fn initial_model(job: &JobSpec, reader: &CorpusReader) -> Result<(LlamaConfig, Vec<f32>)> {
    let spec = job
        .model
        .as_ref()
        .ok_or_else(|| WorkerError::Invalid("the job has no `model:` section".into()))?;
    match (&spec.hf, spec.preset) {
        (Some(dir), _) => {
            let tokenizer = dir.join(hf::TOKENIZER_FILE);
            if tokenizer.is_file() {
                reader.check_tokenizer(&tokenizer)?;
                check_base_tokenization(&tokenizer, reader, job)?;
            } else {
                warn_no_base_tokenizer(dir, reader);
            }
            let model = hf::load_dir(dir)?;
            warn_on_another_eos(dir, &model.config, reader);
            Ok((model.config, model.weights))
        }
        (None, Some(preset)) => {
            let mut config =
                LlamaConfig::preset(preset, reader.manifest().tokenizer.vocab_size as usize);
            config.eos_token_id = Some(reader.manifest().tokenizer.eos_id);
            let weights = ParamLayout::llama(&config).init(spec.init_std, job.seed);
            Ok((config, weights))
        }
        (None, None) => Err(WorkerError::Invalid(
            "model: give exactly one of `preset` and `hf`".into(),
        )),
    }
}

/// Refuses a corpus whose documents start or end otherwise than the base model's folder says:
/// its `tokenizer.json` is the corpus's (checked before), but read with the folder's
/// `tokenizer_config.json` (which can decide the BOS, as transformers applies it) it adds
/// another BOS or ends with another EOS. That happens when `corpus.tokenizer` is a copy of the
/// file without the config beside it (an audit: a Mistral folder's `LlamaTokenizerFast` adds
/// `<s>`, the copy did not, and the export carried the folder's config asking for it).
///
/// # Errors
/// [`WorkerError::Invalid`] naming both decisions and what to do; the base tokenizer's own
/// errors.
pub fn check_base_tokenization(
    base_tokenizer: &Path,
    reader: &CorpusReader,
    job: &JobSpec,
) -> Result<()> {
    use dapt_corpus::tokenizer::TokenizerOptions;
    match base_tokenization_differs(base_tokenizer, reader, &TokenizerOptions::from(&job.corpus))? {
        None => Ok(()),
        Some(message) => Err(WorkerError::Invalid(message)),
    }
}

/// What [`check_base_tokenization`] refuses, as a message (`None` when the corpus's documents
/// start and end as the base folder's tokenizer, read with `options`, says). `dapt eval`, which
/// has no job file, says it in a warning (it measured the base model's perplexity on documents
/// without the BOS its folder adds, without a word; an audit).
///
/// # Errors
/// The base tokenizer's own errors.
pub fn base_tokenization_differs(
    base_tokenizer: &Path,
    reader: &CorpusReader,
    options: &dapt_corpus::tokenizer::TokenizerOptions,
) -> Result<Option<String>> {
    use dapt_corpus::tokenizer::CorpusTokenizer;
    let base = CorpusTokenizer::load(base_tokenizer, options)?;
    let corpus = &reader.manifest().tokenizer;
    if base.bos.as_ref().map(|b| b.1) == corpus.bos_id && base.eos_id == corpus.eos_id {
        return Ok(None);
    }
    let bos = |token: Option<&str>| token.map_or("no BOS".to_owned(), |t| format!("`{t}`"));
    Ok(Some(format!(
        "{}: read in the base model's folder (with its tokenizer_config.json, as transformers \
         reads it), this tokenizer starts a document with {} and ends it with `{}`; the corpus \
         was prepared with {} and `{}` (was corpus.tokenizer a copy of this file without the \
         folder's tokenizer_config.json?): set corpus.tokenizer to this file and run dapt \
         prepare again, or say which in corpus.add_bos / corpus.bos_token / corpus.eos_token",
        base_tokenizer.display(),
        bos(base.bos.as_ref().map(|b| b.0.as_str())),
        base.eos_token,
        bos(corpus.bos_token.as_deref()),
        corpus.eos_token,
    )))
}

/// Warns when windows of `seq_len` tokens reach past the model's `max_position_embeddings`
/// (`what` names the setting: `training.seq_len`, `--seq-len`): the positions past it were
/// never trained, so losses and perplexities there are not the model's usual ones.
pub fn warn_past_max_positions(seq_len: u32, config: &LlamaConfig, what: &str) {
    if seq_len as usize > config.max_position_embeddings {
        tracing::warn!(
            seq_len,
            max_position_embeddings = config.max_position_embeddings,
            "{what} is longer than the model's max_position_embeddings: positions past it were never trained"
        );
    }
}

/// Says that a base model folder without `tokenizer.json` leaves the corpus's tokenizer
/// unchecked: another model's tokenizer with no more ids than the embedding has rows trains
/// without an error, every id meaning another token (an audit).
pub fn warn_no_base_tokenizer(dir: &Path, reader: &CorpusReader) {
    tracing::warn!(
        model = %dir.display(),
        corpus_vocab = reader.manifest().tokenizer.vocab_size,
        "the base model's folder has no tokenizer.json: dapt cannot check that the corpus's \
         tokenizer is the model's (with another, every id means another token); put the \
         model's tokenizer.json there"
    );
}

/// Says when the base model's `config.json` ends sequences with other ids than the corpus's
/// EOS: the model would learn a document end it does not stop at (a pad token taken for the
/// EOS; an Instruct model, whose turn end is not its document end, is a deliberate case).
pub fn warn_on_another_eos(dir: &Path, config: &LlamaConfig, reader: &CorpusReader) {
    let corpus = &reader.manifest().tokenizer;
    let ids = match (&config.eos_token_ids, config.eos_token_id) {
        (Some(ids), _) => ids.clone(),
        (None, Some(id)) => vec![id],
        (None, None) => return,
    };
    if !ids.contains(&corpus.eos_id) {
        tracing::warn!(
            model = %dir.display(),
            config_eos_token_id = ?ids,
            corpus_eos = %corpus.eos_token,
            corpus_eos_id = corpus.eos_id,
            "the base model's config.json ends sequences with other ids than the corpus's \
             document end: the model learns an end it does not stop at; set corpus.eos_token \
             to the model's if that is not meant (an Instruct model's turn end is not its \
             document end)"
        );
    }
}

/// Refuses a forgetting guard that could never trip: a bound on a source whose held-out stream
/// holds no evaluation window of `seq_len + 1` tokens is never measured, so the guard was off
/// without a word (an audit: a 5% held-out share of a small replay source left 121 tokens).
///
/// # Errors
/// [`WorkerError::Invalid`] naming the bound's source, its held-out tokens and the window.
pub fn check_guard_windows(job: &JobSpec, reader: &CorpusReader, seq_len: u32) -> Result<()> {
    let Some(guard) = &job.guard else {
        return Ok(());
    };
    let sources = &reader.manifest().sources;
    for (b, bound) in guard.bounds.iter().enumerate() {
        let Some(i) = sources.iter().position(|s| s.name == bound.source) else {
            continue;
        };
        let held_out = reader.held_out(i);
        if held_out.windows(seq_len) == 0 {
            return Err(WorkerError::Invalid(format!(
                "guard.bounds[{b}]: source `{}` holds {} held-out tokens, fewer than one \
                 evaluation window of training.seq_len + 1 = {}: its perplexity can never be \
                 measured, so the guard could never trip; raise its held_out (and prepare \
                 again) or lower training.seq_len",
                bound.source,
                held_out.len(),
                u64::from(seq_len) + 1
            )));
        }
    }
    Ok(())
}

/// Whether `source` is named here for the first time in this process.
fn warn_once_unmeasured(source: &str) -> bool {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.iter().any(|s| s == source) {
        return false;
    }
    said.push(source.to_owned());
    true
}

/// Before the checkpoint of step `step` is written (and older ones pruned): the model it would
/// hold gives a usable loss on one training window of `seq_len` tokens (the first source with
/// one), or [`WorkerError::Diverged`]. One window's forward pass, against a step's many.
pub fn check_before_checkpoint(
    trainer: &dyn Engine,
    reader: &CorpusReader,
    seq_len: u32,
    step: u64,
) -> Result<()> {
    let probe = (0..reader.manifest().sources.len())
        .find_map(|i| trainer.perplexity(reader.train(i), seq_len, u64::from(seq_len), 1));
    match probe {
        Some(p) if !p.is_finite() => Err(WorkerError::Diverged {
            step,
            mean_nll: p.mean_nll(),
        }),
        _ => Ok(()),
    }
}

/// Held-out perplexity of every source at `step`.
///
/// # Errors
/// A token id outside the vocabulary in a held-out shard, naming it; a held-out mean NLL that
/// is not finite ([`WorkerError::NonFiniteEval`], naming the source and the step).
pub fn evaluate(
    trainer: &dyn Engine,
    reader: &CorpusReader,
    training: &TrainingSpec,
    step: u64,
) -> Result<EvalLog> {
    let mut sources = Vec::new();
    for (i, source) in reader.manifest().sources.iter().enumerate() {
        reader
            .held_out(i)
            .check_eval_windows(training.seq_len, training.eval_tokens)?;
        if let Some(p) = trainer.perplexity(
            reader.held_out(i),
            training.seq_len,
            training.eval_tokens,
            training.micro_batch() as usize,
        ) {
            // A non-finite held-out loss stops the job: the model is broken, and a report of
            // null would hide it.
            p.check_finite(&source.name, Some(step))?;
            tracing::info!(
                step,
                source = %source.name,
                role = %source.role,
                perplexity = p.perplexity(),
                tokens = p.tokens,
                "held-out evaluation"
            );
            sources.push((source.name.clone(), p));
        } else if warn_once_unmeasured(&source.name) {
            // Said once per source and process (it was passed over without a word).
            tracing::warn!(
                source = %source.name,
                held_out_tokens = reader.held_out(i).len(),
                seq_len = training.seq_len,
                "a source's held-out stream holds no evaluation window of seq_len + 1 tokens: its perplexity is not measured"
            );
        }
    }
    Ok(EvalLog { step, sources })
}
