//! One generation's training on one rank, on its own OS thread: load the committed checkpoint
//! (or the job's initial model), connect the ring, and train the assigned steps, reporting each
//! step's samples and figures, rank 0's evaluations and every checkpoint step. Returns when the
//! job's last step is done, the agent fires the abort handle, or something fails.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dapt_corpus::{rank_slice, CorpusReader};
use dapt_proto::job::JobSpec;
use dapt_proto::rpc::{self, worker_message::Kind, Assignment};

use crate::checkpoint;
use crate::collective::{AbortHandle, Collective, RingConfig, RingListener};
use crate::train::run::{evaluate, initial_model, restore};
use crate::train::{MicroBatch, Trainer};

/// Why a generation's training ended early.
#[derive(Debug, thiserror::Error)]
pub enum RankError {
    #[error("aborted")]
    Aborted,
    #[error("{message}")]
    Failed { message: String, peer_fault: bool },
}

impl RankError {
    fn failed(e: impl std::fmt::Display) -> Self {
        RankError::Failed {
            message: e.to_string(),
            peer_fault: false,
        }
    }
}

/// Where the rank is, for the heartbeats.
#[derive(Debug, Default)]
pub struct Progress {
    pub generation: AtomicU64,
    pub step: AtomicU64,
}

/// Trains `a` to the job's end. `report` sends a message to the coordinator.
pub fn train(
    job: &JobSpec,
    a: &Assignment,
    listener: &RingListener,
    abort: &AbortHandle,
    progress: &Progress,
    report: &dyn Fn(Kind),
) -> Result<(), RankError> {
    let training = job
        .training
        .ok_or_else(|| RankError::failed("the job has no `training:` section"))?;
    let reader = CorpusReader::open(&job.corpus.output).map_err(RankError::failed)?;
    let order = reader
        .sample_order(job.seed, training.seq_len)
        .map_err(RankError::failed)?;
    let mut trainer = if a.checkpoint.is_empty() {
        let (config, weights) = initial_model(job, &reader).map_err(RankError::failed)?;
        Trainer::new(config, weights, &training)
    } else {
        restore(a.checkpoint.as_ref(), &training, job.seed).map_err(RankError::failed)?
    };
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
    let mut ring = listener
        .connect(cfg, abort.clone())
        .map_err(|e| collective_error(e, abort))?;
    let corpus_tokenizer = job
        .corpus
        .output
        .join(dapt_corpus::manifest::TOKENIZER_FILE);
    let tokenizer = corpus_tokenizer
        .is_file()
        .then_some(corpus_tokenizer.as_path());
    let eval = |trainer: &Trainer, step: u64| {
        if a.rank != 0 {
            return;
        }
        for (source, p) in evaluate(trainer, &reader, &training, step).sources {
            report(Kind::Eval(rpc::EvalReport {
                generation: a.generation,
                step,
                source,
                perplexity: p.perplexity(),
                tokens: p.tokens,
            }));
        }
    };
    if a.resume_step == 0 && training.eval_every > 0 {
        // The base model's held-out perplexity: what continued pretraining is measured against.
        eval(&trainer, 0);
    }

    let step_tokens = training.tokens_per_step();
    let total = a.total_steps.min(training.steps());
    progress.generation.store(a.generation, Ordering::Relaxed);
    while trainer.step < total {
        if abort.is_aborted() {
            return Err(RankError::Aborted);
        }
        let started = Instant::now();
        let step = trainer.step;
        let slice = rank_slice(step, training.global_batch, a.rank, a.world);
        let micro = MicroBatch::split(
            &reader,
            &order,
            slice.clone(),
            u64::from(a.micro_batch.max(1)),
            training.seq_len,
        );
        let (loss, mut grads) = trainer.gradients(&micro, step_tokens as f64 / a.world as f64);
        ring.all_reduce_mean(&mut grads)
            .map_err(|e| collective_error(e, abort))?;
        let mut loss_buf = [loss as f32];
        ring.all_reduce_mean(&mut loss_buf)
            .map_err(|e| collective_error(e, abort))?;
        let stats = trainer.apply(&mut grads, step_tokens);
        let done = trainer.step;
        progress.step.store(done, Ordering::Relaxed);
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
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        }));
        if done == total || (training.eval_every > 0 && done % training.eval_every == 0) {
            eval(&trainer, done);
        }
        if done % job.checkpoint.every == 0 || done == total {
            let dir = if a.rank == 0 {
                // Rank 0 writes; every rank vouches with its weights' digest.
                let dir = checkpoint::save(&job.checkpoint.dir, &trainer, job.seed, tokenizer)
                    .map_err(RankError::failed)?;
                dir.display().to_string()
            } else {
                String::new()
            };
            report(Kind::Checkpoint(rpc::CheckpointReport {
                generation: a.generation,
                step: done,
                rank: a.rank,
                dir,
                weights_digest: digest(&trainer.weights),
            }));
        }
    }
    Ok(())
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
    }
}
