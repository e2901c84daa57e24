//! The `dapt` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dapt_coordinator::plan;
use dapt_coordinator::spec::JobSpec;
use dapt_corpus::{prepare, PrepareOptions, PrepareOutcome};
use dapt_proto::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "dapt",
    version,
    about = "Domain-adaptive continued pretraining of Llama-family models"
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize and pack the job's corpora into checksummed shards and print a corpus report.
    Prepare {
        /// The job file.
        job: PathBuf,
        /// Rebuild even if the inputs did not change.
        #[arg(long)]
        force: bool,
        /// No progress bar or progress log lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Training FLOPs, steps, memory per GPU, GPU-hours and cost of the job, before running it.
    Plan {
        /// The job file.
        job: PathBuf,
        /// The GPU to plan for: h100, h200 or a100.
        #[arg(long, default_value = "h100")]
        gpu: String,
        /// GPUs (data-parallel ranks).
        #[arg(long, default_value_t = 8)]
        gpus: u32,
        /// Model FLOPs utilisation assumed for the time estimate.
        #[arg(long, default_value_t = 0.4)]
        mfu: f64,
        /// Price per GPU-hour in USD (default: an assumed on-demand price, printed as such).
        #[arg(long)]
        price_per_gpu_hour: Option<f64>,
    },
    /// Train the job on this machine as a single rank (runs `dapt-worker train`).
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Held-out perplexity of a model on a prepared corpus (runs `dapt-worker eval`).
    Eval {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A checkpoint as a Hugging Face model directory (runs `dapt-worker export`).
    Export {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A llama.cpp GGUF file as a Hugging Face model directory (runs `dapt-worker import-gguf`).
    ImportGguf {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Model work lives in the worker crate, which this crate never links: hand it over.
    let forwarded = match &cli.command {
        Command::Train { args } => Some(("train", args)),
        Command::Eval { args } => Some(("eval", args)),
        Command::Export { args } => Some(("export", args)),
        Command::ImportGguf { args } => Some(("import-gguf", args)),
        Command::Prepare { .. } | Command::Plan { .. } => None,
    };
    if let Some((sub, args)) = forwarded {
        return forward_to_worker(sub, args, cli.log_format);
    }
    logging::init(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `dapt-worker SUB ARGS...` from beside this executable and returns its exit status.
fn forward_to_worker(sub: &str, args: &[String], format: LogFormat) -> ExitCode {
    let worker = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("dapt-worker")))
        .filter(|p| p.is_file());
    let Some(worker) = worker else {
        eprintln!(
            "error: `dapt {sub}` runs `dapt-worker`, which is not next to this `dapt`: build both (cargo build --workspace --bins)"
        );
        return ExitCode::FAILURE;
    };
    let format = format.to_string();
    match std::process::Command::new(&worker)
        .args(["--log-format", &format, sub])
        .args(args)
        .status()
    {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("error: running {}: {e}", worker.display());
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train { .. }
        | Command::Eval { .. }
        | Command::Export { .. }
        | Command::ImportGguf { .. } => {
            unreachable!("forwarded to dapt-worker in main")
        }
        Command::Plan {
            job,
            gpu,
            gpus,
            mfu,
            price_per_gpu_hour,
        } => {
            let spec = JobSpec::load(&job)?;
            let gpu = plan::gpu(&gpu).ok_or_else(|| {
                let known: Vec<&str> = plan::GPUS.iter().map(|g| g.name).collect();
                anyhow::anyhow!("--gpu {gpu}: unknown GPU (known: {})", known.join(", "))
            })?;
            anyhow::ensure!(gpus > 0, "--gpus must be at least 1");
            anyhow::ensure!(
                mfu > 0.0 && mfu <= 1.0,
                "--mfu must be in (0, 1], got {mfu}"
            );
            let options = plan::PlanOptions {
                gpu,
                gpus,
                mfu,
                price_per_gpu_hour,
            };
            let config = plan::model_config(&spec).map_err(anyhow::Error::msg)?;
            let p = plan::plan(&spec, &config, &options).map_err(anyhow::Error::msg)?;
            print!("{}", plan::render(&p, &options, &config));
            Ok(())
        }
        Command::Prepare { job, force, quiet } => {
            let spec = JobSpec::load(&job)?;
            let plan = spec.training.map(|t| t.plan());
            let options = PrepareOptions {
                force,
                progress: !quiet,
            };
            let outcome = prepare(&spec.corpus, plan, &options)
                .with_context(|| format!("preparing the corpus of {}", job.display()))?;
            match outcome {
                PrepareOutcome::UpToDate { dir, .. } => {
                    println!(
                        "corpus at {} is up to date: its inputs have not changed since it was prepared; nothing to do (--force rebuilds)",
                        dir.display()
                    );
                }
                PrepareOutcome::Prepared {
                    dir, report, stats, ..
                } => {
                    print!("{}", dapt_corpus::report::render(&report));
                    let secs = stats.elapsed.as_secs_f64().max(1e-9);
                    println!(
                        "prepared {} tokens from {:.1} MB of text in {:.1} s ({:.2} MB/s, {:.0} tokens/s{}) into {}",
                        stats.tokens,
                        stats.input_bytes as f64 / 1e6,
                        secs,
                        stats.input_bytes as f64 / 1e6 / secs,
                        stats.tokens as f64 / secs,
                        if stats.tokenizer_training.is_zero() {
                            String::new()
                        } else {
                            format!(
                                "; {:.1} s of it training the tokenizer",
                                stats.tokenizer_training.as_secs_f64()
                            )
                        },
                        dir.display()
                    );
                }
            }
            Ok(())
        }
    }
}
