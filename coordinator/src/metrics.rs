//! The coordinator's `/metrics`, in Prometheus text format (`dapt coordinator --metrics-listen
//! ADDR`). Two sources: the log lines the control loop emits ([`Log`]: each step's figures,
//! evaluations, recoveries, commits, refusals) update gauges and counters as they happen, and
//! the status snapshot (the one `dapt status` reads) gives the phase, members and committed step
//! at scrape time. Only a leading coordinator serves it: a standby has nothing to say yet.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use dapt_proto::rpc::StatusReply;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::control::Log;

mod server;
pub use server::serve;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Label {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StallLabel {
    /// `rank`, `link` or `unknown`.
    culprit: String,
    /// The culprit's phase (`collective` for a link; empty when unknown).
    phase: String,
}

/// The phases a job can be in (`Phase::name`), each a series of `dapt_phase`.
const PHASES: [&str; 8] = [
    "forming",
    "re-attaching",
    "running",
    "stopping",
    "recovering",
    "completed",
    "failed",
    "stopped",
];

pub struct Metrics {
    registry: Registry,
    info: Family<Label, Gauge>,
    phase: Family<PhaseLabel, Gauge>,
    generation: Gauge,
    members: Gauge,
    ranks: Gauge,
    world: Gauge,
    step: Gauge,
    total_steps: Gauge,
    loss: FloatGauge,
    tokens_per_second: FloatGauge,
    learning_rate: FloatGauge,
    grad_norm: FloatGauge,
    eta_seconds: FloatGauge,
    committed_step: Gauge,
    commits: Counter,
    perplexity: Family<SourceLabel, FloatGauge>,
    recoveries: Counter,
    recovery_seconds: Family<PhaseLabel, FloatGauge>,
    workers_lost: Counter,
    refusals: Family<CodeLabel, Counter>,
    divergences: Counter,
    stalls: Family<StallLabel, Counter>,
    stall_aborts: Counter,
    guard: crate::guard::metrics::GuardMetrics,
}

impl Metrics {
    pub fn new(job: &str) -> Self {
        let mut m = Metrics {
            info: Family::default(),
            phase: Family::default(),
            generation: Gauge::default(),
            members: Gauge::default(),
            ranks: Gauge::default(),
            world: Gauge::default(),
            step: Gauge::default(),
            total_steps: Gauge::default(),
            loss: FloatGauge::default(),
            tokens_per_second: FloatGauge::default(),
            learning_rate: FloatGauge::default(),
            grad_norm: FloatGauge::default(),
            eta_seconds: FloatGauge::default(),
            committed_step: Gauge::default(),
            commits: Counter::default(),
            perplexity: Family::default(),
            recoveries: Counter::default(),
            recovery_seconds: Family::default(),
            workers_lost: Counter::default(),
            refusals: Family::default(),
            divergences: Counter::default(),
            stalls: Family::default(),
            stall_aborts: Counter::default(),
            guard: Default::default(),
            registry: Registry::with_prefix("dapt"),
        };
        let r = &mut m.registry;
        r.register(
            "job",
            "The job this coordinator runs (value 1)",
            m.info.clone(),
        );
        r.register(
            "phase",
            "1 for the job's current phase, 0 for the others",
            m.phase.clone(),
        );
        r.register(
            "generation",
            "The current generation (fencing token)",
            m.generation.clone(),
        );
        r.register(
            "members",
            "Workers in the job (ranks and standbys)",
            m.members.clone(),
        );
        r.register(
            "ranks",
            "Members with a rank in the current generation",
            m.ranks.clone(),
        );
        r.register(
            "world_size",
            "Ranks that trained the last step",
            m.world.clone(),
        );
        r.register("step", "Steps completed", m.step.clone());
        r.register(
            "total_steps",
            "Steps of the whole job",
            m.total_steps.clone(),
        );
        r.register("loss", "Training loss of the last step", m.loss.clone());
        r.register(
            "tokens_per_second",
            "Training throughput of the last step",
            m.tokens_per_second.clone(),
        );
        r.register(
            "learning_rate",
            "Learning rate of the last step",
            m.learning_rate.clone(),
        );
        r.register(
            "grad_norm",
            "Global gradient norm of the last step, before clipping",
            m.grad_norm.clone(),
        );
        r.register(
            "eta_seconds",
            "Estimated time to the end of the job",
            m.eta_seconds.clone(),
        );
        r.register(
            "committed_step",
            "Step of the last committed checkpoint",
            m.committed_step.clone(),
        );
        r.register(
            "checkpoints_committed",
            "Checkpoints committed by this coordinator",
            m.commits.clone(),
        );
        r.register(
            "heldout_perplexity",
            "Held-out perplexity of each source at the last evaluation",
            m.perplexity.clone(),
        );
        r.register(
            "recoveries",
            "Re-formations after a lost worker",
            m.recoveries.clone(),
        );
        r.register(
            "recovery_seconds",
            "Time from detection to each phase of the last recovery",
            m.recovery_seconds.clone(),
        );
        r.register(
            "workers_lost",
            "Workers declared lost",
            m.workers_lost.clone(),
        );
        r.register(
            "refusals",
            "Joins and messages refused, by code",
            m.refusals.clone(),
        );
        r.register(
            "weight_divergences",
            "Checkpoint steps whose ranks reported different weights",
            m.divergences.clone(),
        );
        r.register(
            "stalls",
            "Steps that took longer than their bound, by what held them (docs/control-plane.md#stall-detection)",
            m.stalls.clone(),
        );
        r.register(
            "stall_aborts",
            "Generations aborted because a stall outlasted cluster.stall_timeout_s",
            m.stall_aborts.clone(),
        );
        m.guard.register(&mut m.registry);
        m.info
            .get_or_create(&Label {
                name: job.to_string(),
            })
            .set(1);
        m
    }

    /// Takes in what a log line says.
    pub fn observe(&self, line: &Log) {
        self.guard.observe(line);
        match line {
            Log::Lost { .. } => {
                self.workers_lost.inc();
            }
            Log::Refused { refusal, .. } => {
                self.refusals
                    .get_or_create(&CodeLabel {
                        code: refusal.code.as_str_name().to_string(),
                    })
                    .inc();
            }
            Log::Step {
                step,
                loss,
                tokens_per_s,
                lr,
                grad_norm,
                world,
                eta,
                ..
            } => {
                self.loss.set(*loss);
                self.tokens_per_second.set(*tokens_per_s);
                self.learning_rate.set(*lr);
                self.grad_norm.set(*grad_norm);
                self.world.set(i64::from(*world));
                self.eta_seconds.set(eta.as_secs_f64());
                self.step.set((step + 1) as i64);
            }
            Log::Eval {
                source, perplexity, ..
            } => {
                self.perplexity
                    .get_or_create(&SourceLabel {
                        source: source.clone(),
                    })
                    .set(*perplexity);
            }
            Log::Recovery {
                phase,
                since_detected,
                planned,
                ..
            } => {
                if *phase == crate::control::RecoveryPhase::Detected && !planned {
                    self.recoveries.inc();
                }
                self.recovery_seconds
                    .get_or_create(&PhaseLabel {
                        phase: phase.name().to_string(),
                    })
                    .set(since_detected.as_secs_f64());
            }
            Log::Committed { .. } => {
                self.commits.inc();
            }
            Log::Diverged { .. } => {
                self.divergences.inc();
            }
            Log::Stall(stall) => {
                use crate::control::stall::{Culprit, StallAction};
                match stall.action {
                    StallAction::Named => {
                        let culprit = match stall.culprit {
                            Culprit::Rank { .. } => "rank",
                            Culprit::Link { .. } => "link",
                            Culprit::Unknown => "unknown",
                        };
                        let phase = stall.culprit.phase().map_or("", |p| p.name());
                        self.stalls
                            .get_or_create(&StallLabel {
                                culprit: culprit.to_string(),
                                phase: phase.to_string(),
                            })
                            .inc();
                    }
                    StallAction::Aborted => {
                        self.stall_aborts.inc();
                    }
                    StallAction::Cleared => {}
                }
            }
            _ => {}
        }
    }

    /// The text exposition, with the snapshot's figures as of now.
    pub fn render(&self, status: &StatusReply) -> String {
        for p in PHASES {
            self.phase
                .get_or_create(&PhaseLabel {
                    phase: p.to_string(),
                })
                .set(i64::from(status.phase == p));
        }
        self.generation.set(status.generation as i64);
        self.members.set(status.members.len() as i64);
        self.ranks
            .set(status.members.iter().filter(|m| m.rank >= 0).count() as i64);
        self.total_steps.set(status.total_steps as i64);
        self.committed_step.set(status.committed_step as i64);
        self.guard.render(&status.guard_json);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// Binds `addr` for [`serve`], saying what failed.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))
}
