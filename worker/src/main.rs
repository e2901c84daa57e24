//! `dapt-worker`: training, evaluation, import and export on this node. The `dapt` command
//! forwards `eval`, `export`, `import-gguf` and `train` here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dapt_corpus::CorpusReader;
use dapt_proto::job::JobSpec;
use dapt_proto::logging::{self, LogFormat};
use dapt_worker::import::hf::{self, ExportDtype};
use dapt_worker::train::eval::perplexity;
use dapt_worker::train::run::{run, RunOptions};
use dapt_worker::{checkpoint, import};

#[derive(Parser)]
#[command(
    name = "dapt-worker",
    version,
    about = "The dapt worker: train, evaluate, import and export Llama models"
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
    /// Train the job on this machine as a single rank, resuming from its last checkpoint.
    Train {
        job: PathBuf,
        /// Stop (with a checkpoint) once this many steps are complete.
        #[arg(long)]
        stop_after: Option<u64>,
    },
    /// Perplexity of a model (Hugging Face directory or checkpoint) on a prepared corpus's
    /// held-out documents, per source.
    Eval {
        model: PathBuf,
        corpus: PathBuf,
        #[arg(long, default_value_t = 256)]
        seq_len: u32,
        /// At most this many predicted tokens per source.
        #[arg(long, default_value_t = 65_536)]
        max_tokens: u64,
        /// Windows per forward pass.
        #[arg(long, default_value_t = 8)]
        batch: usize,
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
    let cli = Cli::parse();
    logging::init(cli.log_format);
    // Before any training thread starts: see dapt_worker::memory.
    dapt_worker::memory::retain_freed_memory();
    match run_command(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train { job, stop_after } => {
            let spec = JobSpec::load(&job)?;
            let summary = run(&spec, &RunOptions { stop_after })
                .with_context(|| format!("training {}", job.display()))?;
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
        Command::Eval {
            model,
            corpus,
            seq_len,
            max_tokens,
            batch,
        } => {
            let reader = CorpusReader::open(&corpus)?;
            let tokenizer = model.join(hf::TOKENIZER_FILE);
            if tokenizer.is_file() {
                reader.check_tokenizer(&tokenizer)?;
            }
            let weights = hf::load_dir(&model)?;
            let mut rows = Vec::new();
            for (i, source) in reader.manifest().sources.iter().enumerate() {
                let Some(p) = perplexity(
                    &weights.config,
                    &weights.weights,
                    reader.held_out(i),
                    seq_len,
                    max_tokens,
                    batch,
                ) else {
                    eprintln!(
                        "source {}: no held-out window of {seq_len} tokens",
                        source.name
                    );
                    continue;
                };
                rows.push(serde_json::json!({
                    "source": source.name,
                    "role": source.role,
                    "perplexity": p.perplexity(),
                    "mean_nll": p.mean_nll(),
                    "tokens": p.tokens,
                }));
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
            let layout = dapt_worker::model::ParamLayout::llama(&loaded.config);
            hf::write_dir(&out, &loaded.config, &layout, &loaded.weights, dtype)?;
            copy_if_present(
                &checkpoint.join(hf::TOKENIZER_FILE),
                &out.join(hf::TOKENIZER_FILE),
            )?;
            println!("exported step {} to {}", loaded.state.step, out.display());
            Ok(())
        }
        Command::ImportGguf { file, out } => {
            let gguf = import::gguf::GgufFile::open(&file)?;
            let model = import::import_gguf(&gguf, &out)?;
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

fn copy_if_present(from: &Path, to: &Path) -> anyhow::Result<()> {
    if from.is_file() {
        std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}
