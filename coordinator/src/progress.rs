//! What the coordinator's log tells a person: the start banner, one line per [`Log`] event (the
//! step line laid out for reading in the text format, every field at full precision in JSON),
//! and the end summary. [`Progress`] follows the job through the same [`Log`] events the
//! metrics do (smoothed throughput, elapsed time, the perplexity each source started from,
//! recoveries) and lends its figures to the lines.
//!
//! The text step line, documented with its regular expression in docs/control-plane.md:
//!
//! ```text
//! step=40/123 loss=5.940 grad_norm=0.3556 lr=3.04e-4 tokens/s=4833 (ema 4790) world=2 gen=1 elapsed=1m02s eta=3m19s; evaluated and checkpointed: train 0.84s, eval 1.20s, checkpoint 0.31s
//! ```
//!
//! `step=` counts the steps done (the JSON line's `step` is the 0-based index of the step that
//! completed, one less); `mfu=4.2%` follows the smoothed rate when every rank's device peak is
//! known (a GPU in `dapt plan`'s table); the part after `;` appears on a step that also
//! evaluated or checkpointed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dapt_proto::job::JobSpec;
use dapt_proto::logging::{self, clock, scientific, seconds, significant, LogFormat};

use crate::control::stall::{Culprit, StallAction};
use crate::control::{fmt_duration, Log, RecoveryPhase};

/// Weight of a new step's throughput in the smoothed rate: an exponential moving average over
/// about the last 10 steps.
pub const EMA_WEIGHT: f64 = 0.1;

/// A held-out perplexity and the steps done when it was measured.
type Reading = (u64, f64);

/// The job's figures as they stand, updated from each [`Log`] event.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Training FLOPs per token (6 N + 12 L d s), when the model's shape is known.
    flops_per_token: Option<f64>,
    /// When the first generation formed (or re-attached): the start of training here.
    started: Option<Instant>,
    /// Exponential moving average of the steps' training throughput, tokens/s.
    tokens_per_s_ema: Option<f64>,
    /// Steps done when this coordinator's first step completed, less one (its resume point).
    first_step: Option<u64>,
    /// Steps done after the newest step line.
    steps_done: u64,
    /// Tokens of every step trained here, steps trained again after a recovery included.
    tokens_computed: u64,
    tokens_per_step: u64,
    /// Each source's first and latest held-out perplexity: (steps done, perplexity).
    perplexity: BTreeMap<String, (Reading, Reading)>,
    /// The sources evaluated in this run (not only known from the committed base).
    evaluated: std::collections::BTreeSet<String>,
    recoveries: u32,
    /// The final checkpoint, once the job completed.
    completed: Option<(u64, String)>,
    /// When the last event was observed.
    last_seen: Option<Instant>,
}

impl Progress {
    /// A job's progress, before any event. Its MFU is known only when the model's shape is
    /// (a `model:` the coordinator can read, [`crate::plan::model_config`]).
    pub fn new(job: &JobSpec) -> Self {
        let flops_per_token = job.training.and_then(|t| {
            let config = crate::plan::model_config(job).ok()?;
            let (l, d, s) = (
                config.num_hidden_layers as f64,
                config.hidden_size as f64,
                f64::from(t.seq_len),
            );
            Some(6.0 * config.num_params() as f64 + 12.0 * l * d * s)
        });
        Progress {
            flops_per_token,
            tokens_per_step: job.training.map_or(0, |t| t.tokens_per_step()),
            ..Progress::default()
        }
    }

    /// Takes in what `line` says, at `now`.
    pub fn observe(&mut self, line: &Log, now: Instant) {
        self.last_seen = Some(now);
        match line {
            Log::Formed { .. } | Log::Reattached { .. } => {
                self.started.get_or_insert(now);
            }
            Log::Step {
                step,
                tokens_per_s,
                tokens,
                ..
            } => {
                self.started.get_or_insert(now);
                self.first_step.get_or_insert(*step);
                self.steps_done = step + 1;
                self.tokens_computed += tokens;
                self.tokens_per_s_ema = Some(match self.tokens_per_s_ema {
                    Some(ema) => (1.0 - EMA_WEIGHT) * ema + EMA_WEIGHT * tokens_per_s,
                    None => *tokens_per_s,
                });
            }
            Log::Eval {
                step,
                source,
                perplexity,
                ..
            } => {
                let reading = (*step, *perplexity);
                self.perplexity
                    .entry(source.clone())
                    .and_modify(|(_, latest)| *latest = reading)
                    .or_insert((reading, reading));
                self.evaluated.insert(source.clone());
            }
            Log::Recovery {
                phase,
                planned: false,
                ..
            } if *phase == RecoveryPhase::Detected => {
                self.recoveries += 1;
            }
            Log::Completed { step, dir } => {
                // A job that was complete before this run trained nothing here: its summary
                // says "0 (steps 123 to 123)", not "steps 0 to 0".
                self.steps_done = self.steps_done.max(*step);
                self.completed = Some((*step, dir.clone()));
            }
            _ => {}
        }
    }

    /// Takes in a source's base-model perplexity (step 0) as a resumed job's commit records it:
    /// the first reading its later evaluations compare with, not an evaluation of this run.
    pub fn seed_base(&mut self, source: &str, perplexity: f64) {
        let reading = (0, perplexity);
        self.perplexity
            .entry(source.to_owned())
            .or_insert((reading, reading));
    }

    /// Time since training started here.
    pub fn elapsed(&self, now: Instant) -> Duration {
        self.started.map_or(Duration::ZERO, |s| now - s)
    }

    /// The smoothed training throughput, tokens/s, once a step completed.
    pub fn tokens_per_s_ema(&self) -> Option<f64> {
        self.tokens_per_s_ema
    }

    /// Model FLOPs utilisation of a step that trained at `tokens_per_s` on devices whose peaks
    /// sum to `peak_flops`.
    pub fn mfu(&self, tokens_per_s: f64, peak_flops: Option<f64>) -> Option<f64> {
        let peak = peak_flops.filter(|p| *p > 0.0)?;
        Some(self.flops_per_token? * tokens_per_s / peak)
    }

    /// The job's figures at its last event (or `now`, before any), for the end summary.
    pub fn summary(&self, now: Instant) -> Summary {
        // The job ends with its last event, not with the export or the workers' exit after it.
        let end = self.last_seen.unwrap_or(now);
        let wall = self.elapsed(end);
        let resumed_at = self.first_step.unwrap_or(self.steps_done);
        Summary {
            resumed_at,
            steps_done: self.steps_done,
            tokens_trained: (self.steps_done - resumed_at.min(self.steps_done))
                * self.tokens_per_step,
            tokens_computed: self.tokens_computed,
            wall,
            tokens_per_s: self.tokens_computed as f64 / wall.as_secs_f64().max(1e-9),
            // (A source only known from the committed base was not evaluated in this run.)
            perplexity: self
                .perplexity
                .iter()
                .filter(|(source, _)| self.evaluated.contains(*source))
                .map(|(source, &(before, after))| PerplexityChange {
                    source: source.clone(),
                    before,
                    after,
                })
                .collect(),
            recoveries: self.recoveries,
            checkpoint: self.completed.as_ref().map(|(_, dir)| PathBuf::from(dir)),
        }
    }
}

/// One source's held-out perplexity at its first and latest evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityChange {
    pub source: String,
    /// (steps done, perplexity) at the first evaluation this coordinator saw.
    pub before: (u64, f64),
    pub after: (u64, f64),
}

impl PerplexityChange {
    /// The change from before to after, in percent of before.
    pub fn percent(&self) -> f64 {
        (self.after.1 / self.before.1 - 1.0) * 100.0
    }
}

/// How much the job trained, for the end of `dapt launch` and `dapt coordinator`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Steps done when training started here (0, or the committed step resumed from).
    pub resumed_at: u64,
    pub steps_done: u64,
    /// Tokens of the steps from `resumed_at` to `steps_done`, each counted once.
    pub tokens_trained: u64,
    /// Tokens of every step trained, steps trained again after a recovery counted again.
    pub tokens_computed: u64,
    /// From the first formation to the last event.
    pub wall: Duration,
    /// `tokens_computed` over `wall`: evaluations, checkpoints and recoveries included.
    pub tokens_per_s: f64,
    pub perplexity: Vec<PerplexityChange>,
    pub recoveries: u32,
    /// The final checkpoint, when the job completed.
    pub checkpoint: Option<PathBuf>,
}

impl Summary {
    /// The summary as indented lines for people (after a headline the caller prints); with
    /// the Hugging Face `export` and the workers' `logs` when there are.
    pub fn render(&self, export: Option<&Path>, logs: Option<&Path>) -> String {
        let mut o = String::new();
        let again = self.tokens_computed.saturating_sub(self.tokens_trained);
        let _ = write!(
            o,
            "  tokens trained     {} (steps {} to {})",
            thousands(self.tokens_trained),
            self.resumed_at,
            self.steps_done
        );
        if again > 0 {
            let _ = write!(
                o,
                "; {} more trained again after recoveries",
                thousands(again)
            );
        }
        o.push('\n');
        let _ = writeln!(
            o,
            "  wall time          {} ({} tokens/s on average, evaluations and checkpoints included)",
            clock(self.wall),
            thousands(self.tokens_per_s.round() as u64)
        );
        if !self.perplexity.is_empty() {
            let _ = writeln!(o, "  held-out perplexity");
            let width = self.perplexity.iter().map(|p| p.source.len()).max();
            let width = width.unwrap_or(0);
            for p in &self.perplexity {
                if p.before.0 == p.after.0 {
                    // One evaluation only: `training.eval_every` gives the base model's too.
                    let _ = writeln!(
                        o,
                        "    {:<width$}  {} at step {} (no earlier evaluation)",
                        p.source,
                        significant(p.after.1, 4),
                        p.after.0
                    );
                    continue;
                }
                let _ = writeln!(
                    o,
                    "    {:<width$}  {} -> {}  ({:+.1}%, step {} -> {})",
                    p.source,
                    significant(p.before.1, 4),
                    significant(p.after.1, 4),
                    p.percent(),
                    p.before.0,
                    p.after.0,
                );
            }
        }
        let _ = writeln!(o, "  recoveries         {}", self.recoveries);
        if let Some(dir) = &self.checkpoint {
            let _ = writeln!(o, "  final checkpoint   {}", dir.display());
        }
        if let Some(export) = export {
            let _ = writeln!(o, "  Hugging Face export {}", export.display());
        }
        if let Some(logs) = logs {
            let _ = writeln!(o, "  worker logs        {}", logs.display());
        }
        o
    }

    /// The summary as `job summary` and `held-out perplexity change` log events (for the JSON
    /// format: machines read the log, not stdout).
    pub fn log(&self, export: Option<&Path>) {
        tracing::info!(
            resumed_at = self.resumed_at,
            steps_done = self.steps_done,
            tokens_trained = self.tokens_trained,
            tokens_computed = self.tokens_computed,
            wall_s = self.wall.as_secs_f64(),
            tokens_per_s = self.tokens_per_s,
            recoveries = self.recoveries,
            checkpoint = self.checkpoint.as_ref().map(|c| c.display().to_string()),
            export = export.map(|e| e.display().to_string()),
            "job summary"
        );
        for p in &self.perplexity {
            tracing::info!(
                source = %p.source,
                before_step = p.before.0,
                before = p.before.1,
                after_step = p.after.0,
                after = p.after.1,
                change_pct = p.percent(),
                "held-out perplexity change"
            );
        }
    }
}

/// What a job is about to do, for the start of `dapt launch` and `dapt coordinator`.
#[derive(Debug, Clone)]
pub struct Banner {
    pub job: String,
    /// The model (a preset's name or a Hugging Face directory) and its parameter count.
    pub model: String,
    pub params: Option<u64>,
    pub tokens: u64,
    pub steps: u64,
    pub global_batch: u64,
    pub seq_len: u32,
    /// The ranks, e.g. `2 workers` or `1 to 8 workers, as they join`.
    pub world: String,
    /// Where the workers train and in what precision, when this process decides it.
    pub device: Option<String>,
    pub corpus: PathBuf,
    pub checkpoints: PathBuf,
    /// The coordinator's URL.
    pub coordinator: String,
    /// The Prometheus `/metrics` URL, when served.
    pub metrics: Option<String>,
    /// The dashboard's URL (served with `/metrics`).
    pub dashboard: Option<String>,
    /// The `dapt status` command that watches this job, when its token is in a file.
    pub status: Option<String>,
}

impl Banner {
    /// The banner of `job`, with the rest said by the caller.
    pub fn new(job: &JobSpec, world: String, coordinator: String) -> Self {
        let training = job.training;
        let config = crate::plan::model_config(job).ok();
        let model = match job.model.as_ref() {
            Some(m) => match (&m.hf, m.preset) {
                (Some(dir), _) => dir.display().to_string(),
                (None, Some(preset)) => serde_json::to_value(preset)
                    .ok()
                    .and_then(|v| v.as_str().map(|s| format!("{s} preset")))
                    .unwrap_or_else(|| format!("{preset:?}")),
                (None, None) => "none".into(),
            },
            None => "none".into(),
        };
        let steps = training.map_or(0, |t| t.steps());
        Banner {
            job: job.job.clone(),
            model,
            params: config.map(|c| c.num_params()),
            tokens: steps * training.map_or(0, |t| t.tokens_per_step()),
            steps,
            global_batch: training.map_or(0, |t| t.global_batch),
            seq_len: training.map_or(0, |t| t.seq_len),
            world,
            device: None,
            corpus: job.corpus.output.clone(),
            checkpoints: job.checkpoint.dir.clone(),
            coordinator,
            metrics: None,
            dashboard: None,
            status: None,
        }
    }

    /// The banner as lines for people.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "job {}", self.job);
        let params = self.params.map_or_else(
            || "parameters unknown".into(),
            |n| format!("{} parameters", count(n)),
        );
        let _ = writeln!(o, "  model        {} ({params})", self.model);
        let _ = writeln!(
            o,
            "  training     {} tokens in {} steps of {} samples x {} tokens",
            thousands(self.tokens),
            self.steps,
            self.global_batch,
            self.seq_len
        );
        let device = self
            .device
            .as_ref()
            .map(|d| format!(" on {d}"))
            .unwrap_or_default();
        let _ = writeln!(o, "  world        {}{device}", self.world);
        let _ = writeln!(o, "  corpus       {}", self.corpus.display());
        let _ = writeln!(o, "  checkpoints  {}", self.checkpoints.display());
        let _ = writeln!(o, "  coordinator  {}", self.coordinator);
        if let Some(dashboard) = &self.dashboard {
            let _ = writeln!(o, "  dashboard    {dashboard}");
        }
        if let Some(metrics) = &self.metrics {
            let _ = writeln!(o, "  metrics      {metrics}");
        }
        if let Some(status) = &self.status {
            let _ = writeln!(o, "  status       {status}");
        }
        o
    }

    /// Says the banner: a block on stderr in the text format, a `job starting` event in JSON.
    pub fn announce(&self) {
        match logging::format() {
            LogFormat::Text => {
                use std::io::Write;
                // A closed stderr loses the banner, not the job.
                let _ = std::io::stderr().write_all(self.render().as_bytes());
            }
            LogFormat::Json => tracing::info!(
                job = %self.job,
                model = %self.model,
                params = self.params,
                tokens = self.tokens,
                steps = self.steps,
                global_batch = self.global_batch,
                seq_len = self.seq_len,
                world = %self.world,
                device = self.device.as_deref(),
                corpus = %self.corpus.display(),
                checkpoints = %self.checkpoints.display(),
                coordinator = %self.coordinator,
                metrics = self.metrics.as_deref(),
                dashboard = self.dashboard.as_deref(),
                status = self.status.as_deref(),
                "job starting"
            ),
        }
    }
}

/// The text step line of `Log::Step` (see the module's documentation), or `None` for another
/// line.
pub fn step_line(line: &Log, progress: &Progress, now: Instant) -> Option<String> {
    let Log::Step {
        step,
        total_steps,
        loss,
        tokens_per_s,
        lr,
        grad_norm,
        world,
        generation,
        eta,
        times,
        peak_flops,
        ..
    } = line
    else {
        return None;
    };
    let ema = progress.tokens_per_s_ema.unwrap_or(*tokens_per_s);
    let mut o = format!(
        "step={}/{total_steps} loss={} grad_norm={} lr={} tokens/s={} (ema {})",
        step + 1,
        significant(*loss, 4),
        significant(*grad_norm, 4),
        scientific(*lr, 3),
        tokens_per_s.round() as u64,
        ema.round() as u64,
    );
    if let Some(mfu) = progress.mfu(*tokens_per_s, *peak_flops) {
        let _ = write!(o, " mfu={:.1}%", mfu * 100.0);
    }
    let _ = write!(
        o,
        " world={world} gen={} elapsed={} eta={}",
        generation.0,
        clock(progress.elapsed(now)),
        clock(*eta)
    );
    let evaluated = !times.eval.is_zero();
    let checkpointed = !times.checkpoint.is_zero();
    if evaluated || checkpointed {
        let what = match (evaluated, checkpointed) {
            (true, true) => "evaluated and checkpointed",
            (true, false) => "evaluated",
            _ => "checkpointed",
        };
        let _ = write!(o, "; {what}: train {}", seconds(times.train));
        if evaluated {
            let _ = write!(o, ", eval {}", seconds(times.eval));
        }
        if checkpointed {
            let _ = write!(o, ", checkpoint {}", seconds(times.checkpoint));
        }
    }
    Some(o)
}

/// Writes `line` to the log, with `progress`'s figures (which have taken `line` in already).
pub fn emit(line: Log, progress: &Progress, now: Instant) {
    let text = logging::format() == LogFormat::Text;
    if text {
        if let Some(step) = step_line(&line, progress, now) {
            tracing::info!("{step}");
            return;
        }
    }
    match line {
        Log::Joined {
            worker,
            members,
            standby,
        } => tracing::info!(%worker, members, standby, "worker joined"),
        Log::Lost { worker, reason } => tracing::warn!(%worker, %reason, "worker lost"),
        Log::Reattached {
            generation,
            world,
            took,
        } => tracing::info!(
            generation = generation.0,
            world,
            took_ms = took.as_millis() as u64,
            "ranks re-attached"
        ),
        Log::Refused { worker, refusal } => tracing::warn!(
            %worker,
            code = refusal.code.as_str_name(),
            reason = %refusal.message,
            "refused"
        ),
        Log::Formed {
            generation,
            world,
            resume_step,
            ranks,
        } => {
            let ranks: Vec<String> = ranks.iter().map(|w| w.0.clone()).collect();
            tracing::info!(
                generation = generation.0,
                world,
                resume_step,
                ranks = %ranks.join(","),
                "generation formed"
            )
        }
        Log::Waiting {
            members,
            min_workers,
        } => tracing::warn!(members, min_workers, "waiting for workers"),
        Log::Step {
            step,
            total_steps,
            loss,
            tokens_per_s,
            lr,
            grad_norm,
            world,
            generation,
            eta,
            tokens,
            elapsed,
            times,
            peak_flops,
        } => tracing::info!(
            step,
            total_steps,
            loss,
            tokens_per_s,
            tokens_per_s_ema = progress.tokens_per_s_ema,
            mfu = progress.mfu(tokens_per_s, peak_flops),
            lr,
            grad_norm,
            world,
            generation = generation.0,
            eta_s = eta.as_secs(),
            elapsed_s = progress.elapsed(now).as_secs_f64(),
            tokens,
            step_s = elapsed.as_secs_f64(),
            train_s = times.train.as_secs_f64(),
            eval_s = times.eval.as_secs_f64(),
            checkpoint_s = times.checkpoint.as_secs_f64(),
            "step"
        ),
        Log::Eval {
            step,
            source,
            perplexity,
            tokens,
        } => {
            let change = progress
                .perplexity
                .get(&source)
                .filter(|((first, _), _)| *first < step)
                .map(|((first, before), _)| (*first, (perplexity / before - 1.0) * 100.0));
            match change {
                Some((since, change)) if text => tracing::info!(
                    step,
                    %source,
                    perplexity,
                    tokens,
                    "held-out evaluation ({change:+.1}% since step {since})"
                ),
                _ => tracing::info!(step, %source, perplexity, tokens, "held-out evaluation"),
            }
        }
        Log::Recovery {
            phase,
            generation,
            took,
            since_detected,
            reason,
            planned,
        } => {
            // One line, at two levels (tracing's level is part of the call site): a
            // re-formation the job chose is no warning (guard rebalances read as recoveries).
            macro_rules! line {
                ($level:ident, $message:literal) => {
                    tracing::$level!(
                        phase = phase.name(),
                        generation = generation.0,
                        took_ms = took.as_millis() as u64,
                        since_detected_ms = since_detected.as_millis() as u64,
                        took = %fmt_duration(took),
                        %reason,
                        $message
                    )
                };
            }
            if planned {
                line!(info, "re-formation");
            } else {
                line!(warn, "recovery");
            }
        }
        Log::Committed { step, dir, digest } => {
            tracing::info!(step, checkpoint = %dir, weights_xxh3 = %digest, "checkpoint committed")
        }
        Log::Diverged { step, digests } => tracing::error!(
            step,
            digests = ?digests,
            "ranks' weights differ: the checkpoint is not committed"
        ),
        Log::Completed { step, dir } => {
            tracing::info!(step, checkpoint = %dir, "job completed")
        }
        Log::Failed { reason } => tracing::error!(%reason, "job failed"),
        Log::Cause {
            generation,
            worker,
            reason,
        } => tracing::warn!(generation = generation.0, %worker, %reason, "recovery cause"),
        Log::Stopping { reason } => tracing::warn!(%reason, "stopping the job"),
        Log::StopRequested { reason, grace } => tracing::warn!(
            %reason,
            grace = %crate::control::fmt_duration(grace),
            "stopping the job after the step in progress, with its checkpoint (a second Ctrl-C \
             or SIGTERM stops it at once, at the last committed checkpoint)"
        ),
        Log::Stall(stall) => {
            let waited = now.saturating_duration_since(stall.since);
            let (rank, peer) = match &stall.culprit {
                Culprit::Rank { rank, .. } => (i64::from(*rank), -1),
                Culprit::Link { from, to, .. } => (i64::from(*from), i64::from(*to)),
                Culprit::Unknown => (-1, -1),
            };
            let phase = stall.culprit.phase().map_or("", |p| p.name());
            let (action, waited_text, bound) = (
                stall.action.name(),
                fmt_duration(waited),
                fmt_duration(stall.bound),
            );
            match stall.action {
                StallAction::Cleared => tracing::info!(
                    %action, generation = stall.generation.0, step = stall.step,
                    culprit = %stall.culprit, rank, peer, phase,
                    waited = %waited_text, waited_ms = waited.as_millis() as u64, bound = %bound,
                    "stall"
                ),
                StallAction::Named | StallAction::Aborted => tracing::warn!(
                    %action, generation = stall.generation.0, step = stall.step,
                    culprit = %stall.culprit, rank, peer, phase,
                    waited = %waited_text, waited_ms = waited.as_millis() as u64, bound = %bound,
                    bytes = stall.bytes.unwrap_or(0),
                    "stall"
                ),
            }
        }
        Log::GuardTripped(trip) => tracing::warn!(
            step = trip.step,
            source = %trip.source,
            perplexity = trip.perplexity,
            base = trip.base,
            rise_pct = trip.rise * 100.0,
            max_rise_pct = trip.max_rise * 100.0,
            action = trip.action.name(),
            outcome = %trip.outcome,
            "forgetting guard tripped"
        ),
        Log::MixtureChanged {
            step,
            weights,
            replay_share,
        } => tracing::warn!(
            step,
            weights = ?weights,
            replay_share,
            "mixture changed"
        ),
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A parameter count: `1.234 M`, `6.738 B`.
fn count(n: u64) -> String {
    match n {
        0..=999_999 => thousands(n),
        1_000_000..=999_999_999 => format!("{:.3} M", n as f64 / 1e6),
        _ => format!("{:.3} B", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests;
