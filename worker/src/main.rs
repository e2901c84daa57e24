//! `dapt-worker`: training, evaluation, import and export on this node. The `dapt` command
//! forwards `eval`, `export`, `import-gguf` and `train` here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dapt_corpus::CorpusReader;
use dapt_proto::job::JobSpec;
use dapt_proto::logging::{self, LogArgs};
use dapt_worker::device::{DeviceSpec, EngineKind, Precision};
use dapt_worker::import::hf::{self, ExportDtype};
use dapt_worker::train::eval::perplexity_on;
use dapt_worker::train::run::{run, RunOptions};
use dapt_worker::{checkpoint, import};

#[derive(Parser)]
#[command(
    name = "dapt-worker",
    version,
    about = "The dapt worker: train, evaluate, import and export Llama models"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Training under a coordinator: `dapt-worker --coordinator URL --job NAME` (no subcommand).
#[derive(clap::Args)]
struct AgentArgs {
    /// The coordinator's URL (http://HOST:PORT, or https://HOST:PORT with
    /// --coordinator-ca): join its job and train as it assigns.
    #[arg(long)]
    coordinator: Option<String>,
    /// The job's name (`job:` in its file).
    #[arg(long, env = "DAPT_JOB")]
    job: Option<String>,
    /// The job's token (shared secret). On the command line it shows in `ps`: prefer
    /// DAPT_TOKEN or --token-file.
    #[arg(long, env = "DAPT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the job's token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "DAPT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: dapt_proto::tls::ClientTls,
    /// This worker's id, unique in the job (default: host name and process id).
    #[arg(long)]
    id: Option<String>,
    /// Listen address of the collective (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// The host:port other ranks dial to reach this worker's collective (default: the listen
    /// address).
    #[arg(long)]
    advertise: Option<String>,
    /// Where this worker's rank trains: cpu, or cuda / cuda:N (a `cuda` build; run one worker
    /// per GPU).
    #[arg(long = "device", id = "agent_device", default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype on a GPU: f32 (TF32 matmuls) or bf16 (f32 master weights and loss).
    #[arg(long = "precision", id = "agent_precision", default_value = "f32")]
    precision: Precision,
    /// The trainer: `host` (the CPU's default) or `resident` (the GPU's device-resident engine;
    /// on the CPU it runs the GPU path without a GPU, for tests).
    #[arg(long, env = "DAPT_ENGINE")]
    engine: Option<EngineKind>,
    /// Seconds to keep trying to reach the coordinator at the start.
    #[arg(long, default_value_t = 60)]
    connect_timeout_s: u64,
}

/// Where training runs.
#[derive(clap::Args)]
struct GpuArgs {
    /// cpu, or cuda / cuda:N (a `cuda` build and an NVIDIA GPU); vulkan (a `wgpu` build, f32,
    /// `train` only): the GPU step on Burn's wgpu backend, a check where there is no GPU.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype on a GPU: f32 (TF32 matmuls) or bf16 (f32 master weights and loss).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// On a GPU, all-reduce each step's gradients through a one-rank NCCL communicator.
    #[arg(long)]
    nccl: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Train the job on this machine as a single rank, resuming from its last checkpoint.
    Train {
        job: PathBuf,
        /// Stop (with a checkpoint) once this many steps are complete.
        #[arg(long)]
        stop_after: Option<u64>,
        #[command(flatten)]
        gpu: GpuArgs,
        /// Write no checkpoints (benchmarks).
        #[arg(long)]
        no_checkpoints: bool,
    },
    /// Compile (and, in a `cuda-autotune` build, autotune) the kernels of the job's training
    /// step into the kernel cache ($DAPT_KERNEL_CACHE, default $XDG_CACHE_HOME/dapt/kernels or
    /// ~/.cache/dapt/kernels), by training `--steps` steps from the job's initial model with no
    /// checkpoint read or written. Every later run of this build on this GPU model, every rank,
    /// reuses them.
    Tune {
        job: PathBuf,
        /// Optimizer steps to run (one reaches every kernel of the step; the job's initial
        /// held-out evaluation, if any, runs first).
        #[arg(long, default_value_t = 1)]
        steps: u64,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Write the token windows of the job's first `--steps` steps, in the order a single rank
    /// trains them, for another trainer to train on the same data (scripts/gpu_anchor.py
    /// --batches, the loss parity of scripts/gpu-check.sh): u32 little-endian,
    /// [steps, global_batch, seq_len + 1]. Refuses to overwrite an existing file.
    #[command(hide = true)]
    Batches {
        job: PathBuf,
        #[arg(long)]
        steps: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Perplexity of a model (Hugging Face directory or checkpoint) on a prepared corpus's
    /// held-out documents, per source.
    Eval {
        model: PathBuf,
        corpus: PathBuf,
        /// Window length in tokens [default: the sequence length the model was trained at, as a
        /// dapt checkpoint or export records it; else 256].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        seq_len: Option<u32>,
        /// At most this many predicted tokens per source, in whole windows of --seq-len (at
        /// least one).
        #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
        max_tokens: u64,
        /// Windows per forward pass [default: the micro-batch the model was trained with, when a
        /// dapt checkpoint or export records it and --seq-len is not given; else 8].
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        batch: Option<usize>,
        /// cpu, or cuda / cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// Write a checkpoint as a Hugging Face model directory.
    Export {
        checkpoint: PathBuf,
        /// Output directory.
        #[arg(long = "hf")]
        out: PathBuf,
        /// Weight dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: ExportDtype,
    },
    /// Convert a llama.cpp GGUF file into a Hugging Face model directory.
    ImportGguf {
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    // Run by `dapt train` (and the other forwarded commands): its help names `dapt`, the
    // program the user typed.
    let mut command = Cli::command();
    if std::env::var_os("DAPT_FORWARDED_BY").is_some_and(|name| name == "dapt") {
        command = command.bin_name("dapt");
    }
    let matches = command.get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    logging::init(cli.log);
    if matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine) {
        tracing::warn!(
            "--token on the command line shows in `ps` to every user of this machine: prefer \
             DAPT_TOKEN or --token-file"
        );
    }
    // Before any training thread starts: see dapt_worker::memory.
    dapt_worker::memory::retain_freed_memory();
    // A misspelt attention, block size or matmul choice is refused here, not silently taken as
    // the default.
    if let Err(e) = dapt_worker::fused::blockwise::attention_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = dapt_worker::fused::matmul::matmul_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = dapt_worker::fused::blockwise::block_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if cli.command.is_some() {
        // A command (train, eval, export ...) ends quietly when the reader of its output does
        // (`dapt-worker train JOB | head -1`), as Unix tools do, instead of panicking on the
        // broken pipe; the agent (no command) keeps Rust's default, and its log writer drops a
        // line it cannot write.
        // SAFETY: at the start of main, before any thread: restoring the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Some(command) => run_command(command),
        None => run_agent(cli.agent),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Said already; 130, as a shell reports a process ended by SIGINT.
        Err(e) if e.is::<Interrupted>() => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The sequence length and micro-batch the model in `dir` was trained with, as a dapt
/// checkpoint's `trainer.json` or an export's marker records them.
fn trained_shape(dir: &std::path::Path) -> Option<(u32, usize)> {
    if let Some(t) = dapt_proto::checkpoint::recorded_training(dir) {
        return Some((t.seq_len, t.micro_batch() as usize)).filter(|s| s.0 > 0 && s.1 > 0);
    }
    let marker = dapt_proto::checkpoint::export_marker(dir)?;
    let seq_len = u32::try_from(marker.get("seq_len")?.as_u64()?).ok()?;
    let micro_batch = marker
        .get("micro_batch")
        .and_then(|m| m.as_u64())
        .map_or(8, |m| m as usize);
    Some((seq_len, micro_batch)).filter(|s| s.0 > 0 && s.1 > 0)
}

/// `dapt train` stopped by SIGINT or SIGTERM after a step (said, with its checkpoint).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train {
            job,
            stop_after,
            gpu,
            no_checkpoints,
        } => {
            let spec = JobSpec::load(&job)?;
            // The forgetting guard is the coordinator's (it compares every rank's evaluations
            // and changes the mixture); `dapt train` trained on past a tripped bound without a
            // word (an audit): refused, by field, saying how to run the job with it.
            if spec.guard.is_some() {
                anyhow::bail!(
                    "{}: `guard:` is applied by the coordinator, which `dapt train` does not run: \
                     run this job with `dapt launch {} --workers 1` to train one rank under its \
                     forgetting guard, or remove `guard:` to train without one",
                    job.display(),
                    job.display()
                );
            }
            if let DeviceSpec::Cuda(ordinal) = gpu.device {
                // Before any thread starts: a clear error instead of a panic without a GPU.
                dapt_worker::device::cuda_ready(ordinal)?;
                if gpu.nccl {
                    ensure_nccl_loadable()?;
                }
            }
            let options = RunOptions {
                stop_after,
                device: gpu.device,
                precision: gpu.precision,
                no_checkpoints,
                nccl_single_rank: gpu.nccl,
            };
            dapt_worker::train::run::stop_on_interrupt();
            dapt_worker::train::run::stop_when_parent_gone();
            let summary =
                run(&spec, &options).with_context(|| format!("training {}", job.display()))?;
            if let Some(dir) = &summary.last_checkpoint {
                println!("last checkpoint: {}", dir.display());
            }
            for eval in &summary.evals {
                for (source, p) in &eval.sources {
                    println!(
                        "step {} held-out {source}: perplexity {:.3} over {} tokens",
                        eval.step,
                        p.perplexity(),
                        p.tokens
                    );
                }
            }
            if summary.interrupted {
                let step = summary
                    .steps
                    .last()
                    .map_or(summary.resumed_from.unwrap_or(0), |s| s.step);
                match &summary.last_checkpoint {
                    Some(dir) => eprintln!(
                        "stopped at step {step} (interrupted), checkpoint {}; the same command \
                         resumes from it",
                        dir.display()
                    ),
                    None => {
                        eprintln!("stopped at step {step} (interrupted); no checkpoint written")
                    }
                }
                return Err(Interrupted.into());
            }
            println!(
                "{}",
                if summary.finished {
                    "training finished"
                } else {
                    "stopped before the end; run again to resume"
                }
            );
            Ok(())
        }
        Command::Tune { job, steps, gpu } => {
            let mut spec = JobSpec::load(&job)?;
            let DeviceSpec::Cuda(ordinal) = gpu.device else {
                anyhow::bail!("tune compiles GPU kernels: give --device cuda or cuda:N");
            };
            if !cfg!(feature = "cuda") {
                // Not `cuda_ready`'s sentence, which offers `--device cpu`: tune has no CPU path.
                anyhow::bail!(
                    "this dapt-worker was built without the `cuda` feature, and tune compiles GPU \
                     kernels: rebuild with `cargo build --release --features cuda` (or \
                     `--features cuda-autotune`)"
                );
            }
            let info = dapt_worker::device::cuda_ready(ordinal)?;
            if gpu.nccl {
                ensure_nccl_loadable()?;
            }
            // From the initial model, whatever checkpoints the job has: an empty folder to
            // resume from, and nothing written.
            let scratch = tempfile::tempdir().context("making a scratch checkpoint folder")?;
            spec.checkpoint.dir = scratch.path().to_path_buf();
            let options = RunOptions {
                stop_after: Some(steps),
                device: gpu.device,
                precision: gpu.precision,
                no_checkpoints: true,
                nccl_single_rank: gpu.nccl,
            };
            let started = std::time::Instant::now();
            run(&spec, &options).with_context(|| format!("tuning {}", job.display()))?;
            match info.kernel_cache {
                Some(dir) => println!(
                    "kernels for {} ({}) in {} after {:.0} s{}",
                    info.name,
                    gpu.precision,
                    dir.display(),
                    started.elapsed().as_secs_f64(),
                    if cfg!(feature = "cuda-autotune") {
                        " (autotuned)"
                    } else {
                        " (compiled; this build does not autotune)"
                    }
                ),
                None => println!(
                    "no kernel cache (DAPT_KERNEL_CACHE=off, or its folder could not be made): \
                     nothing kept"
                ),
            }
            Ok(())
        }
        Command::Batches { job, steps, out } => {
            use std::io::Write;
            let spec = JobSpec::load(&job)?;
            let training = spec.training.with_context(|| {
                format!("{}: the job has no `training:` section", job.display())
            })?;
            let reader = CorpusReader::open(&spec.corpus.output)?;
            let order = reader.sample_order(spec.seed, training.seq_len)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let mut file = std::io::BufWriter::new(file);
            let written = (0..steps).try_for_each(|step| -> anyhow::Result<()> {
                let range = dapt_corpus::step_range(step, training.global_batch);
                let batch =
                    dapt_worker::train::MicroBatch::read(&reader, &order, range, training.seq_len)?;
                for id in batch.ids {
                    file.write_all(&id.to_le_bytes())?;
                }
                Ok(())
            });
            if let Err(e) = written.and_then(|()| Ok(file.flush()?)) {
                // The file is ours (created above): no half-written windows are left behind.
                drop(file);
                let _ = std::fs::remove_file(&out);
                return Err(e.context(format!("writing {}", out.display())));
            }
            println!(
                "{steps} steps x {} windows x {} tokens -> {}",
                training.global_batch,
                training.seq_len + 1,
                out.display()
            );
            Ok(())
        }
        Command::Eval {
            model,
            corpus,
            seq_len,
            max_tokens,
            batch,
            device,
        } => {
            let reader = CorpusReader::open(&corpus)?;
            // The model's own training length by default: a fixed 256 gave another perplexity
            // than the training log's for a model trained at 128 (a new user's walk-through).
            // ... and its micro-batch with it (8 windows of a 4096-token training length were 8
            // times the memory of training's own evaluation).
            let trained = trained_shape(&model).filter(|_| seq_len.is_none());
            // Said either way: a base model and its adapted export trained at other lengths
            // were compared at two lengths, which read as forgetting (a new user's walk-through).
            match (trained, seq_len) {
                (Some((n, b)), _) => eprintln!(
                    "evaluating at seq_len {n} in batches of {b}, the model's training length and \
                     micro-batch (--seq-len and --batch set others; compare models at one \
                     --seq-len)"
                ),
                (None, None) => eprintln!(
                    "evaluating at seq_len 256, the default: the model records no training \
                     length (--seq-len sets another; compare models at one --seq-len)"
                ),
                (None, Some(_)) => {}
            }
            let seq_len = seq_len.or(trained.map(|t| t.0)).unwrap_or(256);
            let batch = batch.or(trained.map(|t| t.1)).unwrap_or(8);
            // A dapt checkpoint is verified against its manifest before any file is used.
            if model.join(dapt_proto::checkpoint::MANIFEST_FILE).exists() {
                dapt_proto::checkpoint::CheckpointManifest::read(&model)
                    .and_then(|m| m.verify(&model))?;
            }
            let tokenizer = model.join(hf::TOKENIZER_FILE);
            if tokenizer.is_file() {
                reader.check_tokenizer(&tokenizer)?;
                // The corpus's BOS/EOS against the folder's own reading of that file (its
                // tokenizer_config.json): a warning, since the job's corpus options are not
                // known here.
                let options = dapt_corpus::tokenizer::TokenizerOptions::default();
                match dapt_worker::train::run::base_tokenization_differs(
                    &tokenizer, &reader, &options,
                ) {
                    Ok(None) => {}
                    Ok(Some(message)) => tracing::warn!(
                        "{message}; the perplexity below is of documents in another form than \
                         the model's folder gives it"
                    ),
                    // A tokenizer that needs the job's corpus options to be read (two template
                    // tokens, no document end): nothing to compare without a job file (it failed
                    // the evaluation; a review).
                    Err(e) => tracing::warn!(
                        "the model folder's tokenizer could not be read without the job's corpus \
                         settings ({e}): its BOS/EOS were not compared with the corpus's"
                    ),
                }
            } else {
                dapt_worker::train::run::warn_no_base_tokenizer(&model, &reader);
            }
            let weights = hf::load_dir(&model)?;
            dapt_worker::train::run::warn_on_another_eos(&model, &weights.config, &reader);
            dapt_worker::train::run::warn_past_max_positions(
                seq_len,
                &weights.config,
                "the evaluation's seq_len",
            );
            let vocab = reader.manifest().tokenizer.vocab_size as usize;
            if vocab > weights.config.vocab_size {
                anyhow::bail!(
                    "{}: the corpus tokenizer has {vocab} tokens but the model only {}",
                    model.display(),
                    weights.config.vocab_size
                );
            }
            let mut rows = Vec::new();
            for (i, source) in reader.manifest().sources.iter().enumerate() {
                reader.held_out(i).check_eval_windows(seq_len, max_tokens)?;
                let Some(p) = perplexity_on(
                    device,
                    &weights.config,
                    &weights.weights,
                    reader.held_out(i),
                    seq_len,
                    max_tokens,
                    batch,
                )?
                else {
                    if reader.held_out(i).is_empty() {
                        eprintln!("source {}: no held-out documents", source.name);
                    } else {
                        eprintln!(
                            "source {}: no held-out window of {seq_len} tokens (--seq-len sets \
                             a shorter one)",
                            source.name
                        );
                    }
                    continue;
                };
                p.check_finite(&source.name, None)?;
                rows.push(serde_json::json!({
                    "source": source.name,
                    "role": source.role,
                    "seq_len": seq_len,
                    "perplexity": p.perplexity(),
                    "mean_nll": p.mean_nll(),
                    "tokens": p.tokens,
                }));
            }
            // Nothing measured is no result: an empty list with exit 0 read as success to a
            // script waiting for a perplexity (the lines above say why for each source).
            if rows.is_empty() {
                anyhow::bail!(
                    "{}: no source of the corpus has a held-out window of {seq_len} tokens to \
                     evaluate on (see above)",
                    corpus.display()
                );
            }
            println!("{}", serde_json::to_string_pretty(&rows)?);
            Ok(())
        }
        Command::Export {
            checkpoint,
            out,
            dtype,
        } => {
            let loaded = checkpoint::load(&checkpoint)?;
            checkpoint::check_export_target(&loaded, &out)?;
            let layout = dapt_worker::model::ParamLayout::llama(&loaded.config);
            hf::check_writable(&out, &layout, &loaded.weights, dtype)?;
            hf::claim_output_dir(&out)?;
            hf::write_dir(&out, &loaded.config, &layout, &loaded.weights, dtype)?;
            copy_if_present(
                &checkpoint.join(hf::TOKENIZER_FILE),
                &out.join(hf::TOKENIZER_FILE),
            )
            .inspect_err(|_| {
                // An earlier export's tokenizer must not pass for this model's.
                let _ = std::fs::remove_file(out.join(hf::TOKENIZER_FILE));
            })?;
            // The base model's generation and tokenizer settings, as the checkpoint carries
            // them; an earlier export's copy that this checkpoint lacks goes (it described
            // another model; `claim_output_dir` let only copies dapt wrote through).
            let mut carried = Vec::new();
            for name in checkpoint::BASE_FILES {
                let (from, to) = (checkpoint.join(name), out.join(name));
                if from.is_file() {
                    copy_if_present(&from, &to).inspect_err(|_| {
                        let _ = std::fs::remove_file(&to);
                    })?;
                    carried.push(name.to_owned());
                } else if to.is_file() {
                    std::fs::remove_file(&to)
                        .with_context(|| format!("removing {}", to.display()))?;
                }
            }
            let trained_at = loaded
                .state
                .training
                .map(|t| (t.seq_len, t.micro_batch() as usize));
            hf::record_export(&out, &carried, trained_at)?;
            println!("exported step {} to {}", loaded.state.step, out.display());
            Ok(())
        }
        Command::ImportGguf { file, out } => {
            // Every error names the file (the open and magic errors do it themselves).
            let named = |e: import::gguf::GgufError| match e {
                e @ (import::gguf::GgufError::Io { .. }
                | import::gguf::GgufError::BadMagic { .. }) => {
                    anyhow::anyhow!(e)
                }
                e => anyhow::anyhow!("{}: {e}", file.display()),
            };
            let gguf = import::gguf::GgufFile::open(&file).map_err(named)?;
            // (`import_gguf` claims `out` once the file converts.)
            let model = import::import_gguf(&gguf, &out)
                .map_err(|e| anyhow::anyhow!("importing {}: {e}", file.display()))?;
            println!(
                "imported {} ({} parameters, {} layers) to {}",
                file.display(),
                model.layout.total,
                model.config.num_hidden_layers,
                out.display()
            );
            Ok(())
        }
    }
}

/// cudarc opens `libnccl.so`; NVIDIA's PyPI wheels ship only `libnccl.so.2`, and the loader
/// reads `LD_LIBRARY_PATH` once, at start. So when NCCL cannot be loaded as it is, link the
/// library found (see `device::nccl_library`) as `libnccl.so` in a cache folder and re-execute
/// this process with that folder on `LD_LIBRARY_PATH` (once: `DAPT_NCCL_REEXEC` guards it).
#[cfg(feature = "cuda")]
fn ensure_nccl_loadable() -> anyhow::Result<()> {
    use dapt_worker::collective::nccl;
    use std::os::unix::process::CommandExt;
    if nccl::available() {
        return Ok(());
    }
    let guard = "DAPT_NCCL_REEXEC";
    let lib = dapt_worker::device::nccl_library().filter(|_| std::env::var_os(guard).is_none());
    let Some(lib) = lib else {
        anyhow::bail!(
            "NCCL cannot be loaded: install it, or set DAPT_NCCL_LIB to libnccl.so.2 (the \
             nvidia-nccl-cu12/-cu13 wheels ship it under nvidia/nccl/lib)"
        );
    };
    let dir = dapt_worker::device::nccl_link_dir(&lib)
        .with_context(|| format!("linking {} as libnccl.so", lib.display()))?;
    let mut path = std::ffi::OsString::from(&dir);
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    tracing::info!(nccl = %lib.display(), link = %dir.display(), "re-executing with NCCL on the library path");
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(guard, "1")
        .exec();
    Err(err).context("re-executing with NCCL on LD_LIBRARY_PATH")
}

#[cfg(not(feature = "cuda"))]
fn ensure_nccl_loadable() -> anyhow::Result<()> {
    anyhow::bail!("--nccl needs a dapt-worker built with the `cuda` feature")
}

/// The environment variable `dapt launch` sets on the workers it starts: their stdin is a pipe
/// whose write end only the launcher holds.
const LAUNCHER_PIPE_ENV: &str = "DAPT_LAUNCHER_PIPE";

/// Under `dapt launch` (`DAPT_LAUNCHER_PIPE=stdin`), ends this worker when its launcher is gone:
/// the launcher holds the only write end of the worker's stdin, so a read sees end-of-file
/// however it ended, SIGKILL included (its coordinator, in the same process, went with it;
/// nothing this worker trains from here on can be committed). A worker left behind had trained
/// on for ~60 s until it gave up on the coordinator, holding the cores, the ring ports and the
/// checkpoint directory (an audit). `PR_SET_PDEATHSIG` is no substitute: it fires when the
/// *thread* that forked exits, and the launcher forks from tokio's threads, which come and go.
fn exit_with_launcher() {
    if std::env::var_os(LAUNCHER_PIPE_ENV).is_none_or(|v| v != "stdin") {
        return;
    }
    let watch = std::thread::Builder::new()
        .name("launcher-watch".into())
        .spawn(|| {
            // Nothing is ever written: only the end counts.
            dapt_worker::train::run::wait_for_end_of_stdin();
            tracing::error!(
                "the dapt launch that started this worker is gone (its coordinator with it): \
                 stopping; run the same `dapt launch` again to resume from the last committed \
                 checkpoint"
            );
            std::process::exit(1);
        });
    if let Err(e) = watch {
        tracing::warn!(error = %e, "cannot watch for the launcher's exit");
    }
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    use dapt_worker::agent::{self, AgentExit, AgentOptions};
    let Some(coordinator) = args.coordinator else {
        anyhow::bail!(
            "give a subcommand, or --coordinator URL to train under a coordinator (see --help)"
        );
    };
    let job = args
        .job
        .context("--job (or DAPT_JOB): the name of the job to join")?;
    let token = dapt_proto::token::resolve(args.token, args.token_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    exit_with_launcher();
    let worker_id = args.id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let exit = agent::run(AgentOptions {
        coordinator,
        job,
        worker_id,
        token,
        listen: args.listen,
        advertise: args.advertise,
        placement: dapt_worker::agent::rank::Placement {
            device: args.device,
            precision: args.precision,
            engine: EngineKind::resolve(args.engine, args.device).map_err(anyhow::Error::msg)?,
            // Known once the GPU is (the agent asks its driver).
            peak_flops: None,
        },
        connect_timeout: std::time::Duration::from_secs(args.connect_timeout_s),
        tls: args.tls,
    })?;
    match exit {
        AgentExit::Finished { step, checkpoint } => {
            tracing::info!(step, %checkpoint, "job completed");
            Ok(())
        }
        AgentExit::Interrupted {
            stopped_at: Some(step),
        } => {
            tracing::info!(
                step,
                "the job stopped at the coordinator's request, with the checkpoint of this step; \
                 the worker exits on the signal that followed"
            );
            std::process::exit(130);
        }
        AgentExit::Interrupted { stopped_at: None } => {
            tracing::warn!(
                "interrupted: a step in flight was aborted; the last committed checkpoint stands"
            );
            // The conventional status of a process stopped by a signal it handled.
            std::process::exit(130);
        }
    }
}

/// `from`'s bytes written to `to` through a temporary file and a rename (which replaces what is
/// at `to` rather than writing through it), when `from` is a file.
fn copy_if_present(from: &Path, to: &Path) -> anyhow::Result<()> {
    if from.is_file() {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        hf::write_atomic(to, &bytes).with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(())
}
