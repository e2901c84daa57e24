//! One generation's training on one rank, on its own OS thread: load the committed checkpoint
//! (or the job's initial model), connect the ring, and train the assigned steps, reporting each
//! step's samples and figures, rank 0's evaluations and every checkpoint step. Returns when the
//! job's last step is done, the agent fires the abort handle, or something fails.
//!
//! On the CPU the host trainer's gradients are all-reduced over the TCP ring between the two
//! halves of the step. On a GPU (`--device cuda:N`, a `cuda` build) the weights, gradients and
//! AdamW state stay on the device and the gradients go through an NCCL communicator made for
//! this generation: rank 0 creates its unique id (it must: the id names rank 0's bootstrap
//! socket) and the TCP ring, already connected, carries the 128 bytes to the other ranks: only
//! after the ring's handshake proved every neighbour a member of the job (the ring key, derived
//! from the job's token), so a stranger never learns the id. The ring also carries each step's
//! loss, and with it whether the coordinator asked this rank to stop (`Stop`): a rank told so
//! contributes a 1 beside its loss, so every rank learns of it in the same step, checkpoints that
//! step and ends its training. The coordinator's abort fires the communicator's abort.

use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dapt_corpus::{rank_slice, CorpusReader};
use dapt_proto::job::JobSpec;
use dapt_proto::rpc::{self, worker_message::Kind, Assignment, RankPhase};

use crate::checkpoint;
use crate::collective::{AbortHandle, Collective, CollectiveError, RingConfig, RingListener};
use crate::device::{DeviceSpec, EngineKind, Precision};
use crate::error::WorkerError;
use crate::train::engine::{Engine, HostEngine};
use crate::train::run::{check_job_model, evaluate, initial_model, restore_part};
use crate::train::{MicroBatch, Trainer};

/// Why a rank does not run on `--device vulkan`.
pub const VULKAN_NOT_A_RANK: &str =
    "--device vulkan is a check of the gpu step for `dapt-worker train`, not a rank's device";

/// Why a generation's training ended early.
#[derive(Debug, thiserror::Error)]
pub enum RankError {
    #[error("aborted")]
    Aborted,
    /// `fatal`: the same failure would recur on a retry from the same checkpoint (a
    /// non-finite step), so the job should fail rather than re-form.
    #[error("{message}")]
    Failed {
        message: String,
        peer_fault: bool,
        fatal: bool,
    },
}

impl RankError {
    fn failed(e: impl std::fmt::Display) -> Self {
        RankError::Failed {
            message: e.to_string(),
            peer_fault: false,
            fatal: false,
        }
    }

    /// A failure that a retry cannot help (the corpus is not the one the job or its checkpoint
    /// was made for): the job fails rather than re-forms until its generations run out.
    fn fatal(e: impl std::fmt::Display) -> Self {
        RankError::Failed {
            message: e.to_string(),
            peer_fault: false,
            fatal: true,
        }
    }

    /// A worker error, fatal when a retry cannot help ([`WorkerError::recurs_on_retry`]).
    fn worker(e: WorkerError) -> Self {
        RankError::Failed {
            fatal: e.recurs_on_retry(),
            message: e.to_string(),
            peer_fault: false,
        }
    }
}

/// Where the rank is, for the heartbeats.
pub use crate::progress::Progress;

/// Where this worker's rank trains, and with which engine.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub device: DeviceSpec,
    /// Compute dtype of the resident engine.
    pub precision: Precision,
    /// Resolved for `device` ([`EngineKind::resolve`]).
    pub engine: EngineKind,
    /// The device's dense bf16 peak, FLOP/s, when known ([`dapt_proto::device::peak_flops`]):
    /// the coordinator's MFU.
    pub peak_flops: Option<f64>,
}

/// How a generation's training ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankEnd {
    /// The job's last step is trained (and its checkpoint written).
    Done,
    /// The coordinator asked the ranks to stop (`stop`): this step's checkpoint is written and
    /// voted with `CheckpointReport.stop`.
    Stopped { step: u64 },
}

/// Trains `a` to the job's end, or until `stop` is set (the coordinator's `Stop`): then the
/// ranks agree on the step through its loss all-reduce, checkpoint it and end. `report` sends a
/// message to the coordinator.
#[allow(clippy::too_many_arguments)]
pub fn train(
    job: &JobSpec,
    a: &Assignment,
    placement: Placement,
    listener: &RingListener,
    abort: &AbortHandle,
    stop: &AtomicBool,
    progress: &Arc<Progress>,
    report: &dyn Fn(Kind),
) -> Result<RankEnd, RankError> {
    progress.begin_generation(a.generation, a.resume_step);
    let training = job
        .training
        .ok_or_else(|| RankError::failed("the job has no `training:` section"))?;
    let reader = CorpusReader::open(&job.corpus.output).map_err(RankError::failed)?;
    reader
        .manifest()
        .check_spec(&job.corpus)
        .map_err(RankError::fatal)?;
    crate::train::run::check_guard_windows(job, &reader, training.seq_len)
        .map_err(RankError::fatal)?;
    let corpus_digest = reader.manifest().content_digest();
    // The committed mixture schedule (the forgetting guard's rebalances), from step to sample.
    let schedule: Vec<dapt_corpus::MixtureChange> = a
        .mixture_schedule
        .iter()
        .map(|c| dapt_corpus::MixtureChange {
            start: c.step.saturating_mul(training.global_batch),
            weights: c.weights.clone(),
        })
        .collect();
    let order = reader
        .sample_order(job.seed, training.seq_len)
        .and_then(|order| order.with_schedule(&schedule))
        .map_err(RankError::failed)?;
    let zero_stage = training.zero_stage;
    // Under ZeRO with more than one rank this rank holds only its slice of the optimizer state,
    // on either engine (the resident one keeps the host trainer's shard on its device).
    let shard = (zero_stage > 0 && a.world > 1).then_some((a.rank as usize, a.world as usize));
    let trainer = if a.checkpoint.is_empty() {
        let (config, weights) = initial_model(job, &reader).map_err(RankError::worker)?;
        let mut trainer = Trainer::new(config, weights, &training);
        if let Some((rank, world)) = shard {
            trainer.shard(rank, world);
        }
        trainer
    } else {
        let dir = std::path::Path::new(&a.checkpoint);
        let trainer = restore_part(dir, &training, job.seed, shard).map_err(RankError::worker)?;
        // After the checkpoint verified: another corpus is no corruption.
        checkpoint::check_corpus(dir, &corpus_digest).map_err(RankError::fatal)?;
        // And of the job's model: a `model:` edited since is no corruption either.
        check_job_model(dir, &trainer.config, job, &reader).map_err(RankError::fatal)?;
        trainer
    };
    tracing::info!(
        generation = a.generation,
        rank = a.rank,
        world = a.world,
        zero_stage,
        optimizer_bytes = trainer.optimizer.bytes(),
        "optimizer state held"
    );
    dump_restored_optimizer(a, &trainer);
    crate::train::run::warn_past_max_positions(
        training.seq_len,
        &trainer.config,
        "training.seq_len",
    );
    let vocab = reader.manifest().tokenizer.vocab_size as usize;
    if vocab > trainer.config.vocab_size {
        // As the job's model and corpus stand, every retry meets it again.
        return Err(RankError::fatal(format!(
            "the corpus tokenizer has {vocab} tokens but the model only {}",
            trainer.config.vocab_size
        )));
    }
    if trainer.step != a.resume_step {
        return Err(RankError::failed(format!(
            "checkpoint `{}` is at step {}, the assignment resumes at {}",
            a.checkpoint, trainer.step, a.resume_step
        )));
    }
    if abort.is_aborted() {
        return Err(RankError::Aborted);
    }
    let peers = a
        .peers
        .iter()
        .map(|p| resolve(p))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = RingConfig {
        rank: a.rank as usize,
        world: a.world as usize,
        peers,
        generation: a.generation,
        timeout: Duration::from_secs(job.cluster.collective_timeout_s),
        chunk_bytes: RingConfig::DEFAULT_CHUNK_BYTES,
    };
    // Shared: the loss goes over it, and so do the gradients of a resident engine on the CPU.
    let ring = Rc::new(RefCell::new(
        listener
            .connect(cfg, abort.clone())
            .map_err(|e| collective_error(e, abort))?,
    ));
    ring.borrow_mut().set_progress(progress.clone());
    let mut trainer: Box<dyn Engine> = match (placement.device, placement.engine) {
        (DeviceSpec::Cpu, EngineKind::Host) => Box::new(HostEngine {
            trainer,
            reducer: (a.world > 1).then(|| Box::new(ring.clone()) as Box<_>),
        }),
        (DeviceSpec::Cpu, EngineKind::Resident) => {
            use crate::train::resident::{GradReducer, HostStaged};
            let reducer: Option<Box<dyn GradReducer<crate::Cpu>>> =
                (a.world > 1).then(|| Box::new(HostStaged(ring.clone())) as Box<_>);
            crate::train::engine::on_cpu(
                trainer,
                placement.precision,
                training.activation_checkpointing,
                reducer,
            )
        }
        (DeviceSpec::Vulkan, _) => {
            // Refused before joining (`agent::session`); here too, as the same job would
            // fail again.
            return Err(RankError::Failed {
                message: VULKAN_NOT_A_RANK.into(),
                peer_fault: false,
                fatal: true,
            });
        }
        (DeviceSpec::Cuda(ordinal), _) => on_gpu(
            trainer,
            ordinal,
            placement.precision,
            training.activation_checkpointing,
            a,
            &mut *ring.borrow_mut(),
            abort,
            Duration::from_secs(job.cluster.collective_timeout_s),
        )?,
    };
    let base_files = checkpoint::BaseFiles::read(
        job,
        reader.tokenizer_bytes(),
        (!a.checkpoint.is_empty()).then(|| std::path::Path::new(&a.checkpoint)),
    );
    let origin = checkpoint::Origin::new(&reader, &corpus_digest, job, &base_files)
        .in_generation(a.generation);
    let eval = |trainer: &dyn Engine, step: u64| -> Result<(), RankError> {
        if a.rank != 0 {
            return Ok(());
        }
        // A non-finite held-out loss recurs on a retry: fatal, the job stops.
        let log = evaluate(trainer, &reader, &training, step).map_err(RankError::worker)?;
        for (source, p) in log.sources {
            report(Kind::Eval(rpc::EvalReport {
                generation: a.generation,
                step,
                source,
                perplexity: p.perplexity(),
                tokens: p.tokens,
            }));
        }
        Ok(())
    };
    if a.resume_step == 0 && training.eval_every > 0 {
        // The base model's held-out perplexity: what continued pretraining is measured against.
        progress.set_phase(RankPhase::Evaluate);
        eval(trainer.as_ref(), 0)?;
        // The other ranks wait for it here rather than inside the first step's training time.
        barrier(&mut *ring.borrow_mut()).map_err(|e| collective_error(e, abort))?;
    }

    let step_tokens = training.tokens_per_step();
    let total = a.total_steps.min(training.steps());
    let panic_at = fault_panic_step();
    while trainer.step() < total {
        if abort.is_aborted() {
            return Err(RankError::Aborted);
        }
        if panic_at == Some(trainer.step()) {
            panic!(
                "{FAULT_PANIC_AT_STEP} asked for a panic at step {}",
                trainer.step()
            );
        }
        let started = Instant::now();
        let step = trainer.step();
        let slice = rank_slice(step, training.global_batch, a.rank, a.world);
        progress.set_phase(RankPhase::Data);
        let micro = MicroBatch::split(
            &reader,
            &order,
            slice.clone(),
            u64::from(a.micro_batch.max(1)),
            training.seq_len,
        )
        .map_err(RankError::failed)?;
        let denominator = step_tokens as f64 / a.world as f64;
        // The ring marks its all-reduce (`collective`) and the optimizer step after it.
        progress.set_phase(RankPhase::Forward);
        let (loss, stats) = trainer
            .train_step(&micro, denominator, step_tokens)
            .map_err(|e| match e {
                // The ring's, or NCCL's inside a device engine: a peer may be gone.
                WorkerError::Collective(e) => collective_error(e, abort),
                e => RankError::worker(e),
            })?;
        // The loss's mean, and beside it whether any rank was asked to stop (a mean above 0):
        // every rank reads the same pair, so all of them stop after the same step.
        let asked = if stop.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        };
        let mut loss_buf = [loss as f32, asked];
        ring.borrow_mut()
            .all_reduce_mean(&mut loss_buf)
            .map_err(|e| collective_error(e, abort))?;
        let train_time = started.elapsed();
        let done = trainer.step();
        progress.step.store(done, Ordering::Relaxed);
        let stopping = loss_buf[1] > 0.0 && done < total;
        let evaluate_now =
            done == total || (training.eval_every > 0 && done.is_multiple_of(training.eval_every));
        let checkpoint_now = done.is_multiple_of(job.checkpoint.every) || done == total || stopping;
        let mut eval_time = Duration::ZERO;
        if evaluate_now {
            progress.set_phase(RankPhase::Evaluate);
            let t = Instant::now();
            eval(trainer.as_ref(), done)?;
            eval_time = t.elapsed();
        }
        let mut checkpoint_time = Duration::ZERO;
        let mut vote = None;
        if checkpoint_now {
            progress.set_phase(RankPhase::Checkpoint);
            let t = Instant::now();
            // Rank 0, as for its evaluations (every rank holds the same weights): a commit needs
            // every rank's vote, so its failure keeps a diverged model from being committed.
            if a.rank == 0 {
                crate::train::run::check_before_checkpoint(
                    trainer.as_ref(),
                    &reader,
                    training.seq_len,
                    done,
                )
                .map_err(RankError::worker)?;
            }
            // The time spent waiting for the other ranks (rank 0's evaluation, their shards) is
            // theirs, not this rank's checkpoint: with 2 workers the step line said "eval
            // 1.05s, checkpoint 1.05s" for a 1.16 s step (a new user's walk-through).
            let mut waited = Duration::ZERO;
            let wait = |waited: &mut Duration| {
                let w = Instant::now();
                let met = barrier(&mut *ring.borrow_mut()).map_err(|e| collective_error(e, abort));
                *waited += w.elapsed();
                met
            };
            // One host copy of a device engine's state serves the checkpoint and the digest.
            let host = trainer.host().map_err(|e| match e {
                WorkerError::Collective(e) => collective_error(e, abort),
                e => RankError::worker(e),
            })?;
            let root = &job.checkpoint.dir;
            let staging = checkpoint::shards::staging_dir(root, a.generation, done);
            let own_shard = match shard {
                // Every rank writes its optimizer shard; rank 0 gathers the files only once all
                // are written.
                Some((rank, world)) => {
                    let sha = checkpoint::shards::write(&staging, &host.optimizer, rank, world)
                        .map_err(RankError::worker)?;
                    wait(&mut waited)?;
                    Some((checkpoint::shards::file_name(rank, world), sha))
                }
                // Every rank of the generation meets here before rank 0 writes: a rank 0 whose
                // generation was replaced while it was stopped (SIGSTOP, a long pause) finds
                // its ring gone instead of writing over the new generation's committed
                // `step-N` (an audit: the committed checkpoint's weights were replaced by the
                // stale rank's).
                None => {
                    wait(&mut waited)?;
                    None
                }
            };
            if abort.is_aborted() {
                return Err(RankError::Aborted);
            }
            let dir = if a.rank == 0 {
                // Rank 0 writes; every rank vouches with its weights' digest.
                let files = match shard {
                    Some((_, world)) => checkpoint::OptimizerFiles::Shards {
                        staging: &staging,
                        world,
                    },
                    None => checkpoint::OptimizerFiles::Whole,
                };
                let dir = checkpoint::save_with(root, &host, job.seed, Some(origin), files)
                    .map_err(RankError::worker)?;
                dir.display().to_string()
            } else {
                String::new()
            };
            if let Some((name, sha)) = own_shard {
                // A rank vouches only for a checkpoint that holds its own shard, unchanged.
                wait(&mut waited)?;
                check_own_shard(&checkpoint::step_dir(root, done), &name, &sha)?;
            }
            vote = Some(rpc::CheckpointReport {
                generation: a.generation,
                step: done,
                rank: a.rank,
                dir,
                weights_digest: digest(&host.weights),
                stop: stopping,
            });
            checkpoint_time = t.elapsed().saturating_sub(waited);
        }
        if evaluate_now || checkpoint_now {
            // The ranks wait here for rank 0's evaluation and checkpoint, so that the wait is
            // this step's, not hidden in the next step's training time.
            barrier(&mut *ring.borrow_mut()).map_err(|e| collective_error(e, abort))?;
        }
        // The step report goes before the checkpoint's: the coordinator commits a checkpoint
        // only once every step before it was reported.
        report(Kind::Step(rpc::StepReport {
            generation: a.generation,
            step,
            rank: a.rank,
            samples_start: slice.start,
            samples_end: slice.end,
            loss: f64::from(loss_buf[0]),
            grad_norm: stats.grad_norm,
            lr: stats.lr,
            tokens: step_tokens,
            elapsed_ms: millis(started.elapsed()),
            train_ms: millis(train_time),
            eval_ms: millis(eval_time),
            checkpoint_ms: millis(checkpoint_time),
            peak_flops: placement.peak_flops.unwrap_or(0.0),
        }));
        if let Some(vote) = vote {
            report(Kind::Checkpoint(vote));
        }
        if stopping {
            return Ok(RankEnd::Stopped { step: done });
        }
    }
    Ok(RankEnd::Done)
}

/// Whether the checkpoint in `dir` lists this rank's shard `name` with the SHA-256 it wrote.
fn check_own_shard(dir: &std::path::Path, name: &str, sha: &str) -> Result<(), RankError> {
    let manifest = dapt_proto::checkpoint::CheckpointManifest::read(dir)
        .map_err(|e| RankError::failed(e.to_string()))?;
    match manifest.files.iter().find(|f| f.path == name) {
        Some(f) if f.sha256 == sha => Ok(()),
        Some(f) => Err(RankError::failed(format!(
            "checkpoint {}: {name} has SHA-256 {}, this rank wrote {sha}",
            dir.display(),
            f.sha256
        ))),
        None => Err(RankError::failed(format!(
            "checkpoint {}: the manifest does not list this rank's shard {name}",
            dir.display()
        ))),
    }
}

/// Test hook, not a setting: with `DAPT_TEST_DUMP_RESTORED_OPTIMIZER=DIR` each rank writes the
/// optimizer state it starts a generation with to `DIR/g<generation>-r<rank>-w<world>.bin`
/// (offset as u64, then `m` and `v` as f32, little-endian), so that the tests over the real
/// binaries can compare a resharded state with the committed one element by element.
pub const DUMP_RESTORED_OPTIMIZER: &str = "DAPT_TEST_DUMP_RESTORED_OPTIMIZER";

fn dump_restored_optimizer(a: &Assignment, trainer: &Trainer) {
    let Some(dir) = std::env::var_os(DUMP_RESTORED_OPTIMIZER) else {
        return;
    };
    let o = &trainer.optimizer;
    let mut bytes = (o.range.start as u64).to_le_bytes().to_vec();
    bytes.extend(o.m.iter().chain(&o.v).flat_map(|x| x.to_le_bytes()));
    let path =
        std::path::Path::new(&dir).join(format!("g{}-r{}-w{}.bin", a.generation, a.rank, a.world));
    if let Err(e) = std::fs::write(&path, bytes) {
        tracing::warn!(path = %path.display(), error = %e, "test hook: optimizer dump not written");
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Returns once every rank reached it (an all-reduce of one float).
fn barrier(ring: &mut dyn Collective) -> Result<(), CollectiveError> {
    ring.all_reduce_mean(&mut [0.0])
}

/// Test hook, not a setting: a worker started with `DAPT_FAULT_PANIC_AT_STEP=N` panics on its
/// training thread when it is about to train step N, so that the tests over the real binaries
/// can check that a panic is reported as a failure (docs/control-plane.md). Never set it in a
/// real job.
pub const FAULT_PANIC_AT_STEP: &str = "DAPT_FAULT_PANIC_AT_STEP";

fn fault_panic_step() -> Option<u64> {
    let step = std::env::var(FAULT_PANIC_AT_STEP).ok()?.parse().ok()?;
    tracing::warn!(
        step,
        "test hook {FAULT_PANIC_AT_STEP} is set: this worker will panic"
    );
    Some(step)
}

/// XXH3-128 of `weights` as little-endian f32, in hex.
pub fn digest(weights: &[f32]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for chunk in weights.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|w| w.to_le_bytes()).collect();
        h.update(&bytes);
    }
    format!("{:032x}", h.digest128())
}

/// `trainer` on GPU `ordinal`, with an NCCL communicator for this generation when it has more
/// than one rank.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn on_gpu(
    trainer: Trainer,
    ordinal: usize,
    precision: Precision,
    activation_checkpointing: bool,
    a: &Assignment,
    ring: &mut dyn Collective,
    abort: &AbortHandle,
    timeout: Duration,
) -> Result<Box<dyn Engine>, RankError> {
    use crate::collective::nccl::{unique_id, NcclCollective, NcclConfig, NcclId};
    use crate::train::resident::GradReducer;
    // The agent checked the driver (`device::cuda_ready`) before it joined.
    let reducer: Option<Box<dyn GradReducer<crate::Gpu>>> = if a.world > 1 {
        let mut id: NcclId = if a.rank == 0 {
            unique_id().map_err(RankError::failed)?
        } else {
            [0; 128]
        };
        // `ring` is connected, so its handshake has authenticated both neighbours: the id goes
        // to members of the job only.
        broadcast_from_rank0(ring, &mut id).map_err(|e| collective_error(e, abort))?;
        let cfg = NcclConfig {
            rank: a.rank as usize,
            world: a.world as usize,
            id,
            ordinal,
            timeout,
        };
        let nccl =
            NcclCollective::connect(cfg, abort.clone()).map_err(|e| collective_error(e, abort))?;
        tracing::info!(
            generation = a.generation,
            rank = a.rank,
            world = a.world,
            ordinal,
            "nccl communicator ready"
        );
        Some(Box::new(nccl))
    } else {
        None
    };
    Ok(crate::train::engine::on_cuda(
        trainer,
        ordinal,
        precision,
        activation_checkpointing,
        reducer,
    ))
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
fn on_gpu(
    _trainer: Trainer,
    _ordinal: usize,
    _precision: Precision,
    _activation_checkpointing: bool,
    _a: &Assignment,
    _ring: &mut dyn Collective,
    _abort: &AbortHandle,
    _timeout: Duration,
) -> Result<Box<dyn Engine>, RankError> {
    // Unreached in practice: the agent refuses `--device cuda` in such a build before joining.
    Err(RankError::failed(
        "this dapt-worker was built without the `cuda` feature",
    ))
}

/// Gives every rank rank 0's `bytes`, through the one operation a [`Collective`] has (a mean):
/// rank 0 contributes each byte as a float, the others zeros, and `world × mean` rounds back to
/// the byte exactly (it is at most 255, far inside f32's exact integers).
pub fn broadcast_from_rank0(
    ring: &mut dyn Collective,
    bytes: &mut [u8],
) -> Result<(), CollectiveError> {
    let world = ring.world() as f32;
    let rank0 = ring.rank() == 0;
    let mut buf: Vec<f32> = bytes
        .iter()
        .map(|&b| if rank0 { f32::from(b) } else { 0.0 })
        .collect();
    ring.all_reduce_mean(&mut buf)?;
    for (b, x) in bytes.iter_mut().zip(buf) {
        *b = (x * world).round().clamp(0.0, 255.0) as u8;
    }
    Ok(())
}

fn resolve(endpoint: &str) -> Result<SocketAddr, RankError> {
    endpoint
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| RankError::failed(format!("cannot resolve peer endpoint `{endpoint}`")))
}

fn collective_error(e: crate::collective::CollectiveError, abort: &AbortHandle) -> RankError {
    if abort.is_aborted() {
        return RankError::Aborted;
    }
    RankError::Failed {
        peer_fault: e.is_peer_fault(),
        message: format!("collective: {e}"),
        fatal: false,
    }
}
