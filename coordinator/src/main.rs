//! The `dapt` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use dapt_coordinator::spec::JobSpec;
use dapt_coordinator::{launch, ledger, plan, progress, server};
use dapt_corpus::{prepare, PrepareOptions, PrepareOutcome, VerifyMode};
use dapt_proto::logging::{self, LogArgs};
use dapt_proto::rpc;

#[derive(Parser)]
#[command(
    name = "dapt",
    version,
    about = "Domain-adaptive continued pretraining of Llama-family models"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
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
        /// How an existing corpus made from the same inputs is checked before it is trusted:
        /// `full` hashes every byte (catches bit rot and files changed with their mtime kept),
        /// `cached` trusts files whose size and mtime match the last check.
        #[arg(long, default_value_t = VerifyMode::Full)]
        verify: VerifyMode,
    },
    /// Training FLOPs, steps, memory per GPU, GPU-hours and cost of the job, before running it.
    Plan {
        /// The job file.
        job: PathBuf,
        /// The device to plan for: h100, h200, a100, or cpu (the CPU backend, f32).
        #[arg(long, default_value = "h100")]
        gpu: String,
        /// GPUs (data-parallel ranks).
        #[arg(long, default_value_t = 8)]
        gpus: u32,
        /// Model FLOPs utilisation for the time estimate (default: dapt's own measured figure
        /// for that GPU, or the nearest GPU it measured; the plan says which).
        #[arg(long)]
        mfu: Option<f64>,
        /// Price per GPU-hour in USD (default: an assumed on-demand price, printed as such).
        #[arg(long)]
        price_per_gpu_hour: Option<f64>,
    },
    /// Run the job on this machine: the corpus prepared if needed, a coordinator and N local
    /// workers, trained to the end and exported. Ctrl-C stops; the same command resumes.
    Launch {
        /// The job file.
        job: PathBuf,
        /// Local worker processes (data-parallel ranks).
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// The coordinator's listen address (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Do not export the final checkpoint as a Hugging Face directory.
        #[arg(long)]
        no_export: bool,
        /// Where the workers train: cpu, or cuda (worker i on GPU i: `--workers` at most the
        /// number of GPUs; needs a `cuda` build of dapt-worker).
        #[arg(long, default_value = "cpu")]
        device: launch::LaunchDevice,
        /// Compute dtype on GPUs: f32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: dapt_proto::device::Precision,
        /// How the prepared corpus is checked before training: `full` (every byte hashed) or
        /// `cached` (size and mtime trusted where a check recorded them), as `dapt prepare`.
        #[arg(long, default_value_t = VerifyMode::Full)]
        verify: VerifyMode,
        /// Where the dashboard (http://ADDR/) and Prometheus /metrics are served (port 0 picks a
        /// free one; the URL is printed). No authentication: keep it on loopback unless only
        /// your people reach the address.
        #[arg(long, default_value = "127.0.0.1:0")]
        metrics_listen: std::net::SocketAddr,
    },
    /// Run the job's coordinator for a cluster: workers join with
    /// `dapt-worker --coordinator http(s)://HOST:PORT --job NAME` and the same token.
    Coordinator {
        /// The job file.
        job: PathBuf,
        #[arg(long, default_value = "0.0.0.0:7070")]
        listen: std::net::SocketAddr,
        /// The job's token (shared secret, at least 32 characters). On the command line it
        /// shows in `ps`: prefer DAPT_TOKEN or --token-file.
        #[arg(long, env = "DAPT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the job's token (e.g. a mounted Kubernetes Secret).
        #[arg(long, env = "DAPT_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// The URL workers reach this coordinator at (default: http(s)://<listen address>);
        /// with etcd membership it is published as the leader's address. https:// exactly
        /// when the coordinator serves TLS.
        #[arg(long)]
        advertise: Option<String>,
        /// Serve Prometheus metrics at http(s)://ADDR/metrics (step, loss, throughput, members,
        /// recoveries, commits, held-out perplexity; docs/control-plane.md) and the dashboard at
        /// http(s)://ADDR/ (docs/monitoring.md), e.g. 0.0.0.0:9090. Over TLS, with the same
        /// certificates, when the coordinator serves TLS. No authentication: bind it where only
        /// your monitoring and your people reach.
        #[arg(long, env = "DAPT_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// The coordinator's TLS certificate (PEM); overrides `cluster.tls.cert`.
        #[arg(long, env = "DAPT_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Its private key (PEM); overrides `cluster.tls.key`.
        #[arg(long, env = "DAPT_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// CA (PEM) of the clients' certificates (mutual TLS); overrides `cluster.tls.client_ca`.
        #[arg(long, env = "DAPT_TLS_CLIENT_CA")]
        tls_client_ca: Option<PathBuf>,
    },
    /// What a running job is doing: phase, generation, members, step, loss, throughput and the
    /// last committed checkpoint.
    Status {
        /// The coordinator's URL, e.g. http://127.0.0.1:7070 or https://HOST:7070 (with
        /// --coordinator-ca).
        url: String,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tls: dapt_proto::tls::ClientTls,
        /// The job's token: the coordinator answers only a request that proves it (the token
        /// itself is not sent). Prefer the environment or --token-file.
        #[arg(long, env = "DAPT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the job's token (e.g. a mounted Kubernetes Secret).
        #[arg(long, env = "DAPT_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Train the job on this machine as a single rank (runs `dapt-worker train`).
    // `-h`/`--help` go to the worker, whose help lists the arguments (here: only `[ARGS]...`).
    #[command(disable_help_flag = true)]
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Compile (and with a `cuda-autotune` worker, autotune) the GPU kernels of the job's step
    /// into the kernel cache, for every later run and rank (runs `dapt-worker tune`).
    // `-h`/`--help` go to the worker, whose help lists the arguments (here: only `[ARGS]...`).
    #[command(disable_help_flag = true)]
    Tune {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Held-out perplexity of a model on a prepared corpus (runs `dapt-worker eval`).
    // `-h`/`--help` go to the worker, whose help lists the arguments (here: only `[ARGS]...`).
    #[command(disable_help_flag = true)]
    Eval {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A checkpoint as a Hugging Face model directory (runs `dapt-worker export`).
    // `-h`/`--help` go to the worker, whose help lists the arguments (here: only `[ARGS]...`).
    #[command(disable_help_flag = true)]
    Export {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A llama.cpp GGUF file as a Hugging Face model directory (runs `dapt-worker import-gguf`).
    // `-h`/`--help` go to the worker, whose help lists the arguments (here: only `[ARGS]...`).
    #[command(disable_help_flag = true)]
    ImportGguf {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `dapt status ... --token-file F` (the command `dapt launch` prints) with a DAPT_TOKEN
    // exported for another job: the file given on the command line wins (it refused, "the token
    // is given twice").
    let status_token_from_env = matches
        .subcommand_matches("status")
        .and_then(|m| m.value_source("token"))
        == Some(ValueSource::EnvVariable);
    if let Command::Status {
        token, token_file, ..
    } = &mut cli.command
    {
        if status_token_from_env && token_file.is_some() {
            *token = None;
        }
    }
    let token_on_command_line = matches
        .subcommand_matches("coordinator")
        .and_then(|m| m.value_source("token"))
        == Some(ValueSource::CommandLine);
    // Model work lives in the worker crate, which this crate never links: hand it over.
    let forwarded = match &cli.command {
        Command::Train { args } => Some(("train", args)),
        Command::Tune { args } => Some(("tune", args)),
        Command::Eval { args } => Some(("eval", args)),
        Command::Export { args } => Some(("export", args)),
        Command::ImportGguf { args } => Some(("import-gguf", args)),
        _ => None,
    };
    if let Some((sub, args)) = forwarded {
        return forward_to_worker(sub, args, cli.log);
    }
    if matches!(cli.command, Command::Plan { .. } | Command::Prepare { .. }) {
        // A command that prints and exits ends quietly when its reader does (`dapt plan ... |
        // head`), as Unix tools do, instead of panicking on the broken pipe; the long-running
        // `launch` and `coordinator` keep Rust's default (a failed write is an error there, and
        // their log writer drops it). Not `status`: it talks over a socket, and with SIGPIPE's
        // default a server that closed the connection (a TLS handshake refused for want of a
        // client certificate) killed it silently, no error printed (a flaky test showed it); it
        // writes its output without panicking instead.
        // SAFETY: at the start of main, before any thread: restoring the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    logging::init(cli.log);
    if token_on_command_line {
        tracing::warn!(
            "--token on the command line shows in `ps` to every user of this machine: prefer \
             DAPT_TOKEN or --token-file"
        );
    }
    match run(cli.command, cli.log) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `dapt-worker SUB ARGS...` from beside this executable and returns its exit status.
fn forward_to_worker(sub: &str, args: &[String], log: LogArgs) -> ExitCode {
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
    // The worker writes to this process's stderr: the same colour choice applies. Its stdin is
    // a pipe only this process holds: when it ends (this process killed, even by SIGKILL),
    // `dapt train`'s worker stops after its step with a checkpoint instead of training on alone
    // (an audit); the other subcommands read no stdin and finish what they do.
    let child = std::process::Command::new(&worker)
        .env("DAPT_FORWARDED_BY", "dapt")
        .env("DAPT_PARENT_PIPE", "stdin")
        .stdin(std::process::Stdio::piped())
        .arg("--log-format")
        .arg(log.log_format.to_string())
        .arg("--color")
        .arg(log.color.to_string())
        .arg(sub)
        .args(args)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!("error: running {}: {e}", worker.display());
            return ExitCode::FAILURE;
        }
    };
    // The worker decides what a Ctrl-C or a SIGTERM does (`dapt train` finishes its step and
    // checkpoints it): this process passes them on and waits for it, instead of dying first and
    // handing the terminal back while it still writes. (A signal to the whole group reaches the
    // worker twice, directly and passed on: it takes copies within 2 s for one.)
    forward_signals_to(child.id());
    // Held until the worker ends (dropped with this process otherwise).
    let _parent_pipe = child.stdin.take();
    let waited = child.wait();
    FORWARDED_TO.store(0, std::sync::atomic::Ordering::SeqCst);
    match waited {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            // Ended by a signal: 128 + its number, as a shell reports it.
            let code = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(1);
            ExitCode::from(code.clamp(1, 255) as u8)
        }
        Err(e) => {
            eprintln!("error: running {}: {e}", worker.display());
            ExitCode::FAILURE
        }
    }
}

/// The forwarded worker's pid, for [`pass_on`].
static FORWARDED_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn pass_on(signal: libc::c_int) {
    let pid = FORWARDED_TO.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: `kill` is async-signal-safe (POSIX).
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// SIGINT and SIGTERM passed on to the worker `pid`.
fn forward_signals_to(pid: u32) {
    FORWARDED_TO.store(pid as i32, std::sync::atomic::Ordering::SeqCst);
    let handler = pass_on as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: setting dispositions; the handler only reads an atomic and calls `kill`.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn run(command: Command, log: LogArgs) -> anyhow::Result<ExitCode> {
    match command {
        Command::Launch {
            job,
            workers,
            listen,
            no_export,
            device,
            precision,
            verify,
            metrics_listen,
        } => {
            let spec = JobSpec::load(&job)?;
            // A checkpoint.dir that is a user's folder is refused before anything (job.lock,
            // logs/) is written into it.
            dapt_coordinator::ledger::check_foreign(&spec.checkpoint.dir)?;
            // Another coordinator (or `dapt train`, or another job) holding checkpoint.dir is
            // refused before the corpus is touched: a second launch of an edited job prepared
            // the corpus again under the running one before its lock refused it (an audit).
            // (Only a directory dapt claimed before: one without job.json is checked by the
            // coordinator, before anything is written there.)
            if spec
                .checkpoint
                .dir
                .join(dapt_proto::identity::JOB_FILE)
                .is_file()
            {
                let ours = dapt_proto::identity::JobIdentity::new(&spec, None);
                drop(dapt_proto::identity::claim(&spec.checkpoint.dir, &ours)?);
            }
            prepare_quietly(&spec, &job, verify)?;
            // Held for the whole run, across generations (each rank holds its own while it
            // trains): no `dapt prepare` replaces the corpus under the job.
            let _corpus_readers = dapt_corpus::readers::read_lock(&spec.corpus.output)?;
            let options = launch::LaunchOptions {
                workers,
                log,
                listen,
                no_export,
                device,
                precision,
                metrics_listen,
            };
            let launched = runtime()?.block_on(launch::launch(spec.clone(), options))?;
            Ok(report_outcome(
                &launched.outcome,
                &launched.summary,
                launched.export.as_deref(),
                launched.export_failed.as_deref(),
                Some(&launched.logs),
            ))
        }
        Command::Coordinator {
            job,
            listen,
            token,
            token_file,
            advertise,
            metrics_listen,
            tls_cert,
            tls_key,
            tls_client_ca,
        } => {
            let mut spec = JobSpec::load(&job)?;
            let token = dapt_proto::token::resolve(token, token_file.as_deref())
                .and_then(|t| dapt_proto::token::check_strength(&t).map(|()| t))
                .map_err(anyhow::Error::msg)?;
            spec.cluster.tls =
                tls_settings(spec.cluster.tls.take(), tls_cert, tls_key, tls_client_ca)?;
            let scheme = if spec.cluster.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let (outcome, summary) = runtime()?.block_on(async {
                let workers = match (spec.cluster.min_workers, spec.cluster.max_workers) {
                    (min, Some(max)) if min == max => format!("{min} workers"),
                    (min, Some(max)) => format!("{min} to {max} workers, as they join"),
                    (min, None) => format!("{min} or more workers, as they join"),
                };
                let job = spec.clone();
                let handle = server::start(
                    spec,
                    server::Token::Lasting(token),
                    listen,
                    advertise,
                    metrics_listen,
                )
                .await?;
                let mut banner =
                    progress::Banner::new(&job, workers, format!("{scheme}://{}", handle.addr));
                banner.metrics = handle
                    .metrics_addr
                    .map(|a| format!("{scheme}://{a}/metrics"));
                banner.dashboard = handle.metrics_addr.map(|a| format!("{scheme}://{a}/"));
                banner.announce();
                let progress = handle.progress();
                let stopper = handle.events();
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                    // The first signal: the ranks checkpoint the step in progress, then the job
                    // stops; the second: at once, at the last commit.
                    for first in [true, false] {
                        let reason = tokio::select! {
                            _ = tokio::signal::ctrl_c() => "interrupted (Ctrl-C)",
                            _ = term.recv() => "terminated (SIGTERM)",
                        };
                        if first {
                            stopper.stop(reason);
                        } else {
                            stopper.shutdown(&format!("{reason}, a second time"));
                        }
                    }
                    anyhow::Ok(())
                });
                let outcome = handle.wait().await;
                let summary = progress
                    .lock()
                    .expect("progress")
                    .summary(std::time::Instant::now());
                anyhow::Ok((outcome, summary))
            })?;
            Ok(report_outcome(&outcome, &summary, None, None, None))
        }
        Command::Status {
            url,
            json,
            tls,
            token,
            token_file,
        } => {
            let token =
                dapt_proto::token::resolve(token.filter(|t| !t.is_empty()), token_file.as_deref())
                    .map_err(|e| anyhow::anyhow!("dapt status: {e}"))?;
            let key = dapt_proto::auth::Key::control(&token);
            // Bounded: a standby coordinator accepts connections but answers only once it
            // leads (Kubernetes' readiness probe relies on this failing).
            let limit = std::time::Duration::from_secs(10);
            let reply = runtime()?.block_on(async {
                let endpoint = dapt_proto::tls::endpoint(&url, &tls)?;
                let ask = async {
                    let channel = endpoint.connect().await.map_err(|e| {
                        // Only where nothing listens: a typo'd host or a TLS failure is no
                        // ended job (a review).
                        let refused = std::iter::successors(
                            Some(&e as &(dyn std::error::Error + 'static)),
                            |e| e.source(),
                        )
                        .any(|e| {
                            e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                                io.kind() == std::io::ErrorKind::ConnectionRefused
                            })
                        });
                        anyhow::anyhow!(
                            "connecting to {url}: {}{}",
                            dapt_proto::tls::explain(&e),
                            if refused {
                                no_coordinator_hint(token_file.as_deref())
                            } else {
                                String::new()
                            }
                        )
                    })?;
                    let mut client = rpc::CoordinatorClient::new(channel);
                    let request =
                        dapt_proto::join::status_request(&key, dapt_proto::join::unix_ms())?;
                    match client.status(request).await {
                        Ok(reply) => anyhow::Ok(reply.into_inner()),
                        Err(status) => match rpc::Refusal::from_status(&status) {
                            Some(r) => anyhow::bail!("{url} refused: {r}"),
                            None => anyhow::bail!(
                                "{url}: {}",
                                dapt_proto::tls::explain_first_call_probing(&status, &url, &tls)
                                    .await
                            ),
                        },
                    }
                };
                tokio::time::timeout(limit, ask).await.map_err(|_| {
                    anyhow::anyhow!(
                        "{url} did not answer within {limit:?} (a standby coordinator answers only once it leads)"
                    )
                })?
            })?;
            // Written without panicking on a closed pipe (`dapt status URL | head -1`): this
            // command keeps SIGPIPE ignored (see `main`).
            if json {
                say_out(&format!("{}\n", status_json(&reply)));
            } else {
                say_out(&render_status(&reply));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train { .. }
        | Command::Tune { .. }
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
            if let Some(mfu) = mfu {
                anyhow::ensure!(
                    mfu > 0.0 && mfu <= 1.0,
                    "--mfu must be in (0, 1], got {mfu}"
                );
            }
            let options = plan::PlanOptions {
                gpu,
                gpus,
                mfu,
                price_per_gpu_hour,
            };
            let config = plan::model_config(&spec).map_err(anyhow::Error::msg)?;
            let p = plan::plan(&spec, &config, &options).map_err(anyhow::Error::msg)?;
            print!("{}", plan::render(&p, &options, &config));
            Ok(ExitCode::SUCCESS)
        }
        Command::Prepare {
            job,
            force,
            quiet,
            verify,
        } => {
            let spec = JobSpec::load(&job)?;
            check_model_tokenizer(&spec, false)?;
            let plan = spec.training.map(|t| t.plan());
            let options = PrepareOptions {
                force,
                progress: !quiet,
                verify,
                keep: None,
            };
            let outcome = prepare(&spec.corpus, plan, &options)
                .with_context(|| format!("preparing the corpus of {}", job.display()))?;
            match outcome {
                PrepareOutcome::UpToDate { dir, .. } => {
                    println!(
                        "corpus at {} is up to date: its inputs have not changed since it was prepared; nothing to do (its report: {}; --force rebuilds)",
                        dir.display(),
                        dir.join(dapt_corpus::manifest::REPORT_FILE).display()
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
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The coordinator's TLS: the job file's `cluster.tls` with the flags (or their variables) over
/// it. `--tls-cert` and `--tls-key` come together (clap checks it).
fn tls_settings(
    from_job: Option<dapt_proto::job::CoordinatorTls>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> anyhow::Result<Option<dapt_proto::job::CoordinatorTls>> {
    use dapt_proto::job::TlsFieldNames;
    let mut tls = match (cert, key, from_job) {
        (Some(cert), Some(key), from_job) => dapt_proto::job::CoordinatorTls {
            cert,
            key,
            client_ca: from_job.and_then(|t| t.client_ca),
            names: TlsFieldNames {
                client_ca: TlsFieldNames::JOB.client_ca,
                ..TlsFieldNames::FLAGS
            },
        },
        (_, _, Some(from_job)) => from_job,
        (_, _, None) if client_ca.is_some() => anyhow::bail!(
            "--tls-client-ca needs the coordinator's own certificate: --tls-cert and --tls-key, or cluster.tls"
        ),
        (_, _, None) => return Ok(None),
    };
    if client_ca.is_some() {
        tls.client_ca = client_ca;
        tls.names.client_ca = TlsFieldNames::FLAGS.client_ca;
    }
    Ok(Some(tls))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The corpus the job resumes on, if its checkpoint records one: the committed checkpoint's
/// (`committed.json`), else the newest in `checkpoint.dir` (a single rank's `dapt train`
/// commits none, and the committed one may be on another machine's disk). A newer checkpoint
/// that was never committed is dropped on resume, so its corpus is not the one to keep.
fn resumed_corpus(spec: &JobSpec) -> Option<dapt_corpus::prepare::KeepCorpus> {
    let mut checkpoints = dapt_proto::checkpoint::list(&spec.checkpoint.dir);
    let committed = dapt_coordinator::ledger::committed_step(&spec.checkpoint.dir);
    let at = committed.and_then(|step| checkpoints.iter().position(|(s, _, _)| *s == step));
    let (_, dir, _) = match at {
        Some(at) => checkpoints.swap_remove(at),
        None => checkpoints.pop()?,
    };
    Some(dapt_corpus::prepare::KeepCorpus {
        digest: dapt_proto::checkpoint::trained_corpus(&dir)?,
        checkpoint: dir,
    })
}

/// Refuses a job whose base model (`model.hf`) has a tokenizer other than the one its corpus is
/// tokenized with, before any worker starts: every worker refused it, and `dapt launch` went
/// through four generations of "recovery" and 15 s before it failed (a new user's
/// walk-through). Before the corpus is prepared (`prepared: false`) a given `corpus.tokenizer`
/// file is compared; after, the corpus's own (a BPE trained on the corpus is the model's only
/// when the model was trained from scratch on it, as a first stage).
fn check_model_tokenizer(spec: &JobSpec, prepared: bool) -> anyhow::Result<()> {
    let Some(dir) = spec.model.as_ref().and_then(|m| m.hf.as_ref()) else {
        return Ok(());
    };
    let model_tokenizer = dir.join(dapt_corpus::manifest::TOKENIZER_FILE);
    if !model_tokenizer.is_file() {
        return Ok(());
    }
    let (corpus_sha, what) = match (&spec.corpus.tokenizer, prepared) {
        (Some(given), false) => (
            dapt_corpus::tokenizer::sha256_file(given)?,
            format!("corpus.tokenizer {}", given.display()),
        ),
        (_, true) => (
            dapt_corpus::manifest::Manifest::read(&spec.corpus.output)?
                .tokenizer
                .sha256,
            format!(
                "the tokenizer of the corpus at {}",
                spec.corpus.output.display()
            ),
        ),
        (None, false) => return Ok(()),
    };
    let model_sha = dapt_corpus::tokenizer::sha256_file(&model_tokenizer)?;
    if model_sha != corpus_sha {
        anyhow::bail!(
            "{what} (SHA-256 {corpus_sha}) is not model.hf's tokenizer {} ({model_sha}): the \
             corpus's ids would mean other tokens to the model; set corpus.tokenizer: {} and \
             prepare the corpus again",
            model_tokenizer.display(),
            model_tokenizer.display()
        );
    }
    Ok(())
}

/// Brings the job's corpus up to date (a no-op when its inputs did not change), never over the
/// corpus the job's checkpoints were trained on ([`resumed_corpus`]).
fn prepare_quietly(
    spec: &JobSpec,
    job: &std::path::Path,
    verify: VerifyMode,
) -> anyhow::Result<()> {
    check_model_tokenizer(spec, false)?;
    let plan = spec.training.map(|t| t.plan());
    let options = PrepareOptions {
        force: false,
        progress: false,
        verify,
        keep: resumed_corpus(spec),
    };
    match prepare(&spec.corpus, plan, &options)
        .with_context(|| format!("preparing the corpus of {}", job.display()))?
    {
        PrepareOutcome::UpToDate { dir, .. } => {
            tracing::info!(corpus = %dir.display(), "corpus up to date")
        }
        PrepareOutcome::Prepared { dir, stats, .. } => tracing::info!(
            corpus = %dir.display(),
            tokens = stats.tokens,
            report = %dir.join(dapt_corpus::manifest::REPORT_FILE).display(),
            "corpus prepared (its report: report.json there)"
        ),
    }
    check_model_tokenizer(spec, true)
}

/// This process's command line, quoted for a shell, as it was typed (with its flags: the
/// printed "same command" dropped `--workers 1 --no-export`, a new user's walk-through).
fn this_command() -> String {
    let mut args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // A token given on the command line is not printed (logs keep stdout).
    for i in 0..args.len() {
        if args[i] == "--token" && i + 1 < args.len() {
            args[i + 1] = "<token>".into();
        } else if args[i].starts_with("--token=") {
            args[i] = "--token=<token>".into();
        }
    }
    shlex::try_join(args.iter().map(String::as_str)).unwrap_or_else(|_| args.join(" "))
}

/// Prints how the job ended, with the summary of what it did, and returns the exit status. In
/// the JSON log format the summary is also logged, for machines. A completed job whose final
/// export failed (`export_failed`) is said to have completed, then the export's failure, and
/// exits 1.
fn report_outcome(
    outcome: &server::Outcome,
    summary: &progress::Summary,
    export: Option<&std::path::Path>,
    export_failed: Option<&str>,
    logs: Option<&std::path::Path>,
) -> ExitCode {
    if logging::format() == logging::LogFormat::Json {
        summary.log(export);
    }
    match outcome {
        server::Outcome::Completed { step, checkpoint } => {
            let mut summary = summary.clone();
            if summary.checkpoint.is_none() && !checkpoint.as_os_str().is_empty() {
                summary.checkpoint = Some(checkpoint.clone());
            }
            // Launched again after it completed (to export again, or by mistake): said so, not
            // "tokens trained 0" under a headline that reads as this run's work.
            let headline = if summary.tokens_computed == 0 && summary.resumed_at >= *step {
                format!(
                    "job completed at step {step}, before this run: nothing was trained (the \
                     steps come from training.tokens; raise it to train further)"
                )
            } else {
                format!("job completed at step {step}")
            };
            say_out(&format!("{headline}\n{}", summary.render(export, logs)));
            match export_failed {
                None => ExitCode::SUCCESS,
                Some(failure) => {
                    say_err(&format!(
                        "error: {failure}\nthe job's final checkpoint is committed; the same command exports it again: {}\n",
                        this_command()
                    ));
                    ExitCode::FAILURE
                }
            }
        }
        server::Outcome::Stopped { reason, committed } => {
            let logs = logs
                .map(|l| format!("\nworker logs: {}", l.display()))
                .unwrap_or_default();
            // The steps trained since the last commit are not kept: said, so that the summary's
            // tokens are not read as saved (a new user's walk-through).
            let uncommitted = |step: u64| {
                if summary.steps_done > step {
                    format!(
                        " (steps {} to {} were not committed: they are trained again)",
                        step + 1,
                        summary.steps_done
                    )
                } else {
                    String::new()
                }
            };
            match committed {
                Some((step, dir)) => say_out(&format!(
                    "stopped ({reason}); last committed checkpoint: step {step} at {}{}\nthe same command resumes from it: {}{logs}\n",
                    dir.display(),
                    uncommitted(*step),
                    this_command()
                )),
                None => say_out(&format!(
                    "stopped ({reason}) before any checkpoint was committed{logs}\n"
                )),
            }
            say_out(&summary.render(None, None));
            ExitCode::from(130)
        }
        server::Outcome::Failed(reason) => {
            let logs = logs
                .map(|l| format!("\nworker logs: {}", l.display()))
                .unwrap_or_default();
            say_err(&format!("error: the job failed: {reason}{logs}\n"));
            ExitCode::FAILURE
        }
        // Not the job's failure (it said "the job failed" while the job completed under the
        // next leader; an audit): this process's end, non-zero so that a supervisor starts it
        // again, as a standby.
        server::Outcome::SteppedDown(reason) => {
            say_err(&format!(
                "error: this coordinator stepped down ({reason}); the job goes on under the \
                 coordinator that leads it now\n"
            ));
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to standard output; a reader that went away (`dapt launch ... | head`) loses it,
/// and the run's exit status stands (print! panicked there, exit 101, after a finished job).
fn say_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
    let _ = std::io::stdout().flush();
}

/// [`say_out`] on standard error.
pub(crate) fn say_err(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// What `dapt status` adds when no coordinator answers and its token is a `dapt launch` job's
/// (`checkpoint.dir/launch.token`): the job's last committed step, from that directory (a
/// finished job's status said only "connection refused").
fn no_coordinator_hint(token_file: Option<&std::path::Path>) -> String {
    let Some(dir) = token_file
        .filter(|f| f.file_name() == Some(std::ffi::OsStr::new(launch::LAUNCH_TOKEN_FILE)))
        .and_then(|f| f.parent())
    else {
        return String::new();
    };
    match ledger::committed_step(dir) {
        Some(step) => format!(
            "\n(no coordinator serves the job of {} now: its last committed checkpoint is step \
             {step}; `dapt launch` of its job file resumes it, or exports it when it completed)",
            dapt_proto::auth::printable(&dir.display().to_string())
        ),
        None => String::new(),
    }
}

fn status_json(s: &rpc::StatusReply) -> String {
    let members: Vec<serde_json::Value> = s
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "worker_id": m.worker_id,
                "rank": m.rank,
                "collective_endpoint": m.collective_endpoint,
                "devices": m.devices,
            })
        })
        .collect();
    serde_json::json!({
        "job": s.job,
        "phase": s.phase,
        "generation": s.generation,
        "members": members,
        "step": s.step,
        "total_steps": s.total_steps,
        "loss": s.loss,
        "tokens_per_s": s.tokens_per_s,
        "committed_step": s.committed_step,
        "committed_checkpoint": s.committed_checkpoint,
        "reason": s.reason,
        "stalls": dapt_coordinator::stall_wire::stalls_json(&s.stalls),
        "guard": serde_json::from_str::<serde_json::Value>(&s.guard_json).ok(),
    })
    .to_string()
}

fn render_status(s: &rpc::StatusReply) -> String {
    // Every string of the reply is the server's: one posing as the coordinator (over plain
    // http:// nothing proves it is not) wrote terminal escapes (screen clears, a window title,
    // OSC 52 to the clipboard) and newlines that forged lines (an audit). Escaped, each field
    // by itself (the guard's lines escape theirs).
    use dapt_proto::auth::printable as p;
    // Before the run's first step there is no loss to show (it said `loss 0.0000`; a new
    // user's walk-through).
    let figures = if s.loss == 0.0 && s.tokens_per_s == 0.0 {
        "no step trained yet in this run".to_owned()
    } else {
        format!("loss {:.4}  {:.0} tokens/s", s.loss, s.tokens_per_s)
    };
    let mut out = format!(
        "job {}: {} (generation {})\nstep {}/{}  {figures}\nlast committed checkpoint: {}\n",
        p(&s.job),
        p(&s.phase),
        s.generation,
        s.step,
        s.total_steps,
        if s.committed_checkpoint.is_empty() {
            "none yet".to_string()
        } else {
            format!(
                "step {} at {}",
                s.committed_step,
                p(&s.committed_checkpoint)
            )
        }
    );
    if !s.reason.is_empty() {
        out.push_str(&format!("reason: {}\n", p(&s.reason)));
    }
    if let Some(guard) = dapt_coordinator::guard::status_line(&s.guard_json) {
        out.push_str(&guard);
    }
    out.push_str(&format!("members ({}):\n", s.members.len()));
    for m in &s.members {
        let rank = if m.rank < 0 {
            "standby".to_string()
        } else {
            format!("rank {}", m.rank)
        };
        out.push_str(&format!(
            "  {}  {rank}  {}  {}\n",
            p(&m.worker_id),
            p(&m.collective_endpoint),
            p(&m.devices.join(","))
        ));
    }
    let stalls: Vec<rpc::Stall> = s
        .stalls
        .iter()
        .map(|stall| rpc::Stall {
            action: p(&stall.action).into_owned(),
            description: p(&stall.description).into_owned(),
            ..stall.clone()
        })
        .collect();
    out.push_str(&dapt_coordinator::stall_wire::render(&stalls));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before the run's first step the status says so, not `loss 0.0000  0 tokens/s` (a new
    /// user's walk-through).
    #[test]
    fn a_status_before_the_first_step_shows_no_loss() {
        let mut reply = rpc::StatusReply {
            job: "j".into(),
            phase: "running".into(),
            total_steps: 20,
            ..Default::default()
        };
        let text = render_status(&reply);
        assert!(
            text.contains("step 0/20  no step trained yet in this run"),
            "{text}"
        );
        reply.step = 3;
        reply.loss = 5.5;
        reply.tokens_per_s = 100.0;
        let text = render_status(&reply);
        assert!(
            text.contains("step 3/20  loss 5.5000  100 tokens/s"),
            "{text}"
        );
    }

    /// A server posing as the coordinator wrote terminal escapes (a screen clear, OSC 52 to
    /// the clipboard) and newlines that forged lines into every string of its reply, and
    /// `dapt status` printed them raw (an audit).
    #[test]
    fn a_status_reply_cannot_control_the_terminal_or_forge_lines() {
        let hostile = "x\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\nstep 10/10 completed";
        let reply = rpc::StatusReply {
            job: hostile.into(),
            phase: hostile.into(),
            reason: hostile.into(),
            committed_checkpoint: hostile.into(),
            committed_step: 3,
            members: vec![rpc::Member {
                worker_id: hostile.into(),
                collective_endpoint: hostile.into(),
                devices: vec![hostile.into()],
                ..Default::default()
            }],
            stalls: vec![rpc::Stall {
                action: hostile.into(),
                description: hostile.into(),
                ..Default::default()
            }],
            guard_json: serde_json::json!({"action": hostile, "trips": 1, "replay_share": 0.5,
                "bounds": [{"source": hostile, "base": 3.0}]})
            .to_string(),
            ..Default::default()
        };
        let text = render_status(&reply);
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text}");
        // The lines dapt writes, and no more: each forged line stayed inside its field.
        let honest = render_status(&rpc::StatusReply {
            committed_checkpoint: "c".into(),
            committed_step: 3,
            reason: "r".into(),
            members: reply
                .members
                .iter()
                .map(|_| rpc::Member::default())
                .collect(),
            stalls: reply.stalls.iter().map(|_| rpc::Stall::default()).collect(),
            guard_json: serde_json::json!({"action": "warn", "bounds": [{"source": "s"}]})
                .to_string(),
            ..Default::default()
        });
        assert_eq!(text.lines().count(), honest.lines().count(), "{text}");
        assert!(text.contains(r"\u{1b}[2J"), "{text}");
    }
}
