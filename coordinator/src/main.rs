//! The `dapt` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dapt_coordinator::spec::JobSpec;
use dapt_corpus::{prepare, PrepareOptions, PrepareOutcome};

#[derive(Parser)]
#[command(
    name = "dapt",
    version,
    about = "Domain-adaptive continued pretraining of Llama-family models"
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
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
