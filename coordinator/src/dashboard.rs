//! The coordinator's dashboard: a page for people at `GET /` and the same figures as JSON at
//! `GET /api/dashboard`, on the listener that serves `/metrics` (docs/monitoring.md).
//!
//! [`Dashboard`] follows the job through the control loop's [`Log`] events, like the metrics
//! and [`Progress`] do, and keeps what the page shows in bounded memory: each chart's series is
//! a [`Series`] of at most [`POINTS`] points (merged evenly on long runs) and each list (the
//! generations, recoveries, refusals, checkpoints) keeps its newest [`KEEP`] entries with a
//! count of all. [`Dashboard::view`] joins it with the status snapshot (the one `dapt status`
//! reads) into a [`View`], which is both the JSON and what [`render`] draws.
//!
//! The page is rendered on the server, charts included (inline SVG): one code path for the
//! HTML and the JSON, nothing fetched from elsewhere (clusters are often offline), and the
//! charts' points are in the page's DOM, where a browser test reads them. A small script
//! (`assets/dashboard.js`) replaces the panels with a fresh rendering every two seconds.
//!
//! Sections that come with later features are part of the [`View`] only when there is
//! something to show: `guard` (an object, set with [`Dashboard::set_guard`]) and `stalls` (a
//! list, [`Dashboard::push_stall`]); the page draws any JSON object or list of objects as a
//! table, so they need no change to the renderer.

mod render;
mod series;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dapt_proto::job::JobSpec;
use dapt_proto::rpc::StatusReply;
use serde::Serialize;
use tokio::sync::watch;

use crate::control::{Log, RecoveryPhase};
use crate::progress::Progress;

pub use render::{escape, render_page, render_panels};
pub use series::{Point, Series};

/// Points per chart series at most.
pub const POINTS: usize = 512;
/// Points per held-out perplexity series at most (evaluations are rarer than steps).
pub const EVAL_POINTS: usize = 256;
/// Entries of each list (generations, recoveries, workers lost, refusals, checkpoints, stalls)
/// kept, newest last; older ones are counted only.
pub const KEEP: usize = 50;

/// The job's history as the page draws it (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Dashboard {
    started: Instant,
    started_unix_ms: u64,
    /// Tokens in one step's global batch: evaluations are placed on the tokens axis with it.
    tokens_per_step: u64,
    total_tokens: u64,
    loss: Series,
    learning_rate: Series,
    grad_norm: Series,
    tokens_per_s: Series,
    mfu: Series,
    latest: Option<Latest>,
    perplexity: BTreeMap<String, SourceHistory>,
    generations: Bounded<GenerationView>,
    recoveries: Bounded<RecoveryView>,
    lost: Bounded<LostView>,
    refusals: Bounded<RefusalView>,
    checkpoints: Bounded<CheckpointView>,
    guard: Option<serde_json::Value>,
    stalls: Bounded<serde_json::Value>,
}

/// The newest `KEEP` entries of a list, and how many there were in all.
#[derive(Debug, Clone)]
struct Bounded<T> {
    items: VecDeque<T>,
    total: u64,
}

impl<T> Default for Bounded<T> {
    fn default() -> Self {
        Bounded {
            items: VecDeque::new(),
            total: 0,
        }
    }
}

impl<T: Clone> Bounded<T> {
    fn push(&mut self, item: T) {
        if self.items.len() == KEEP {
            self.items.pop_front();
        }
        self.items.push_back(item);
        self.total += 1;
    }

    fn last_mut(&mut self) -> Option<&mut T> {
        self.items.back_mut()
    }

    fn to_vec(&self) -> Vec<T> {
        self.items.iter().cloned().collect()
    }
}

#[derive(Debug, Clone)]
struct SourceHistory {
    /// The first evaluation seen: at step 0 it is the base model's.
    base: Reading,
    latest: Reading,
    series: Series,
}

/// The last step's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latest {
    /// Steps done.
    pub step: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Training throughput of the step, tokens/s.
    pub tokens_per_s: f64,
    /// Its exponential moving average (the step line's `ema`).
    pub tokens_per_s_ema: f64,
    /// Model FLOPs utilisation (0 to 1), when every rank's device peak is known.
    pub mfu: Option<f64>,
    pub world: u32,
    /// Estimated time to the end, seconds.
    pub eta_s: f64,
}

/// A held-out evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading {
    /// Steps done when it was measured.
    pub step: u64,
    pub tokens: u64,
    pub perplexity: f64,
}

/// A generation (fencing token) of the job: who trained in it, from when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationView {
    pub generation: u64,
    pub world: u32,
    /// The ranks' worker ids, by rank (empty for one re-attached to a new coordinator).
    pub ranks: Vec<String>,
    /// The committed step it started from.
    pub resume_step: u64,
    /// Seconds since the dashboard started.
    pub at_s: f64,
    /// When the next generation formed (or the job ended).
    pub until_s: Option<f64>,
    /// Re-attached to this coordinator (a take-over), not formed by it.
    pub reattached: bool,
}

/// One recovery from a lost worker, phase by phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryView {
    /// The generation torn down.
    pub generation: u64,
    pub reason: String,
    /// A rank's own report of what failed, when a peer's fault was blamed first.
    pub cause: Option<String>,
    pub detected_at_s: f64,
    /// detected, aborted, re-formed, resumed (as far as it got).
    pub phases: Vec<PhaseView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseView {
    pub phase: String,
    pub at_s: f64,
    /// Since the previous phase, milliseconds.
    pub took_ms: u64,
    pub since_detected_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LostView {
    pub at_s: f64,
    pub worker: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusalView {
    pub at_s: f64,
    pub worker: String,
    /// The wire error code, e.g. `WRONG_GENERATION`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointView {
    pub step: u64,
    pub tokens: u64,
    pub at_s: f64,
    pub dir: String,
    /// xxh3 of the ranks' (equal) weights.
    pub weights_xxh3: String,
}

/// A list and how many entries it had in all (only the newest [`KEEP`] are listed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct List<T> {
    pub total: u64,
    pub items: Vec<T>,
}

impl<T: Clone> From<&Bounded<T>> for List<T> {
    fn from(b: &Bounded<T>) -> Self {
        List {
            total: b.total,
            items: b.to_vec(),
        }
    }
}

/// The chart series against tokens trained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesView {
    pub loss: Vec<Point>,
    pub learning_rate: Vec<Point>,
    pub grad_norm: Vec<Point>,
    pub tokens_per_s: Vec<Point>,
    /// Empty unless every rank's device peak is known.
    pub mfu: Vec<Point>,
}

/// One source's held-out perplexity against tokens trained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceView {
    pub source: String,
    /// The reference: the first evaluation seen (the base model's when at step 0).
    pub base: Reading,
    pub latest: Reading,
    /// latest against base, percent.
    pub change_pct: f64,
    pub points: Vec<Point>,
}

/// A member as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberView {
    pub worker: String,
    /// None for a standby.
    pub rank: Option<u32>,
    pub devices: Vec<String>,
}

/// Everything the page shows, as of one moment: `GET /api/dashboard`'s JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct View {
    pub job: String,
    /// forming, re-attaching, running, recovering, completed, failed or stopped.
    pub phase: String,
    /// Why the job failed or stopped.
    pub reason: Option<String>,
    pub generation: u64,
    /// Steps done, of `total_steps`.
    pub step: u64,
    pub total_steps: u64,
    pub tokens_trained: u64,
    pub total_tokens: u64,
    pub committed_step: u64,
    /// Wall clock when the dashboard started, ms since the Unix epoch; every `at_s` counts from
    /// it.
    pub started_unix_ms: u64,
    pub elapsed_s: f64,
    pub latest: Option<Latest>,
    pub members: Vec<MemberView>,
    pub series: SeriesView,
    pub perplexity: Vec<SourceView>,
    pub generations: List<GenerationView>,
    pub recoveries: List<RecoveryView>,
    pub lost: List<LostView>,
    pub refusals: List<RefusalView>,
    pub checkpoints: List<CheckpointView>,
    /// The forgetting guard's state, when the job has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<serde_json::Value>,
    /// Steps held up by a rank, when there were any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalls: Option<List<serde_json::Value>>,
}

impl Dashboard {
    /// An empty dashboard of `job`, started `now`.
    pub fn for_job(job: &JobSpec, now: Instant) -> Self {
        let training = job.training;
        Dashboard::new(
            training.map_or(0, |t| t.tokens_per_step()),
            training.map_or(0, |t| t.steps()),
            now,
        )
    }

    /// An empty dashboard of a job of `total_steps` steps of `tokens_per_step` tokens, started
    /// `now`.
    pub fn new(tokens_per_step: u64, total_steps: u64, now: Instant) -> Self {
        Dashboard {
            started: now,
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            tokens_per_step,
            total_tokens: total_steps * tokens_per_step,
            loss: Series::new(POINTS),
            learning_rate: Series::new(POINTS),
            grad_norm: Series::new(POINTS),
            tokens_per_s: Series::new(POINTS),
            mfu: Series::new(POINTS),
            latest: None,
            perplexity: BTreeMap::new(),
            generations: Bounded::default(),
            recoveries: Bounded::default(),
            lost: Bounded::default(),
            refusals: Bounded::default(),
            checkpoints: Bounded::default(),
            guard: None,
            stalls: Bounded::default(),
        }
    }

    fn at(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Takes in what `line` says, at `now`; `progress` has taken it in already (it lends the
    /// smoothed throughput and the MFU).
    pub fn observe(&mut self, line: &Log, progress: &Progress, now: Instant) {
        let at_s = self.at(now);
        match line {
            Log::Step {
                step,
                loss,
                tokens_per_s,
                lr,
                grad_norm,
                world,
                eta,
                tokens,
                peak_flops,
                ..
            } => {
                let x = ((step + 1) * tokens) as f64;
                let mfu = progress.mfu(*tokens_per_s, *peak_flops);
                self.loss.push(x, *loss);
                self.learning_rate.push(x, *lr);
                self.grad_norm.push(x, *grad_norm);
                self.tokens_per_s.push(x, *tokens_per_s);
                if let Some(mfu) = mfu {
                    self.mfu.push(x, mfu);
                }
                self.latest = Some(Latest {
                    step: step + 1,
                    loss: *loss,
                    learning_rate: *lr,
                    grad_norm: *grad_norm,
                    tokens_per_s: *tokens_per_s,
                    tokens_per_s_ema: progress.tokens_per_s_ema().unwrap_or(*tokens_per_s),
                    mfu,
                    world: *world,
                    eta_s: eta.as_secs_f64(),
                });
            }
            Log::Eval {
                step,
                source,
                perplexity,
                ..
            } => {
                let reading = Reading {
                    step: *step,
                    tokens: step * self.tokens_per_step,
                    perplexity: *perplexity,
                };
                let history =
                    self.perplexity
                        .entry(source.clone())
                        .or_insert_with(|| SourceHistory {
                            base: reading,
                            latest: reading,
                            series: Series::new(EVAL_POINTS),
                        });
                history.latest = reading;
                history.series.push(reading.tokens as f64, *perplexity);
            }
            Log::Formed {
                generation,
                world,
                resume_step,
                ranks,
            } => self.begin_generation(GenerationView {
                generation: generation.0,
                world: *world,
                ranks: ranks.iter().map(|w| w.0.clone()).collect(),
                resume_step: *resume_step,
                at_s,
                until_s: None,
                reattached: false,
            }),
            Log::Reattached {
                generation, world, ..
            } => self.begin_generation(GenerationView {
                generation: generation.0,
                world: *world,
                ranks: Vec::new(),
                resume_step: 0,
                at_s,
                until_s: None,
                reattached: true,
            }),
            Log::Recovery {
                phase,
                generation,
                took,
                since_detected,
                reason,
                ..
            } => {
                let view = PhaseView {
                    phase: phase.name().to_string(),
                    at_s,
                    took_ms: millis(*took),
                    since_detected_ms: millis(*since_detected),
                };
                // A later phase belongs to the recovery in progress; a detection (or a phase
                // whose detection was dropped) starts one.
                let open = self
                    .recoveries
                    .last_mut()
                    .filter(|r| r.phases.last().is_some_and(|p| p.phase != "resumed"))
                    .filter(|_| *phase != RecoveryPhase::Detected);
                if let Some(recovery) = open {
                    recovery.phases.push(view);
                } else {
                    self.recoveries.push(RecoveryView {
                        generation: generation.0,
                        reason: reason.clone(),
                        cause: None,
                        detected_at_s: (at_s - since_detected.as_secs_f64()).max(0.0),
                        phases: vec![view],
                    });
                }
            }
            Log::Cause {
                generation, reason, ..
            } => {
                if let Some(r) = self
                    .recoveries
                    .last_mut()
                    .filter(|r| r.generation == generation.0)
                {
                    r.cause = Some(reason.clone());
                }
            }
            Log::Lost { worker, reason } => self.lost.push(LostView {
                at_s,
                worker: worker.0.clone(),
                reason: reason.clone(),
            }),
            Log::Refused { worker, refusal } => self.refusals.push(RefusalView {
                at_s,
                worker: worker.0.clone(),
                code: refusal.code.as_str_name().to_string(),
                message: refusal.message.clone(),
            }),
            Log::Committed { step, dir, digest } => self.checkpoints.push(CheckpointView {
                step: *step,
                tokens: step * self.tokens_per_step,
                at_s,
                dir: dir.clone(),
                weights_xxh3: digest.clone(),
            }),
            Log::Stall(stall) => self.push_stall(crate::stall_wire::stall_json(
                &crate::stall_wire::stall_now(stall),
            )),
            Log::Completed { .. } | Log::Failed { .. } => {
                if let Some(g) = self.generations.last_mut() {
                    g.until_s.get_or_insert(at_s);
                }
            }
            _ => {}
        }
    }

    fn begin_generation(&mut self, view: GenerationView) {
        if let Some(previous) = self.generations.last_mut() {
            previous.until_s.get_or_insert(view.at_s);
        }
        self.generations.push(view);
    }

    /// Sets the forgetting guard's state, shown as the page's "guard" section.
    pub fn set_guard(&mut self, guard: serde_json::Value) {
        self.guard = Some(guard);
    }

    /// Adds a step held up by a rank, shown in the page's "stalls" table (newest [`KEEP`]).
    pub fn push_stall(&mut self, stall: serde_json::Value) {
        self.stalls.push(stall);
    }

    /// What the page shows at `now`, with the status snapshot's phase, members and step.
    pub fn view(&self, status: &StatusReply, now: Instant) -> View {
        let latest_step = self.latest.map_or(status.step, |l| l.step);
        View {
            job: status.job.clone(),
            phase: status.phase.clone(),
            reason: Some(status.reason.clone()).filter(|r| !r.is_empty()),
            generation: status.generation,
            step: latest_step,
            total_steps: status.total_steps,
            tokens_trained: latest_step * self.tokens_per_step,
            total_tokens: self.total_tokens,
            committed_step: status.committed_step,
            started_unix_ms: self.started_unix_ms,
            elapsed_s: self.at(now),
            latest: self.latest,
            members: status
                .members
                .iter()
                .map(|m| MemberView {
                    worker: m.worker_id.clone(),
                    rank: u32::try_from(m.rank).ok(),
                    devices: m.devices.clone(),
                })
                .collect(),
            series: SeriesView {
                loss: self.loss.points(),
                learning_rate: self.learning_rate.points(),
                grad_norm: self.grad_norm.points(),
                tokens_per_s: self.tokens_per_s.points(),
                mfu: self.mfu.points(),
            },
            perplexity: self
                .perplexity
                .iter()
                .map(|(source, h)| SourceView {
                    source: source.clone(),
                    base: h.base,
                    latest: h.latest,
                    change_pct: (h.latest.perplexity / h.base.perplexity - 1.0) * 100.0,
                    points: h.series.points(),
                })
                .collect(),
            generations: (&self.generations).into(),
            recoveries: (&self.recoveries).into(),
            lost: (&self.lost).into(),
            refusals: (&self.refusals).into(),
            checkpoints: (&self.checkpoints).into(),
            // The guard's state lives in the control loop; the status carries it as JSON.
            guard: self
                .guard
                .clone()
                .or_else(|| serde_json::from_str(&status.guard_json).ok()),
            stalls: (self.stalls.total > 0).then(|| (&self.stalls).into()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The dashboard's routes: `/` (the page), `/dashboard/panels` (the page's live part, which
/// the page's script fetches), `/api/dashboard` (JSON) and the page's two assets. Read-only;
/// no token and no path of the job's secrets is on them.
pub fn routes(
    dashboard: Arc<Mutex<Dashboard>>,
    status: watch::Receiver<StatusReply>,
) -> axum::Router {
    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
    use axum::routing::get;
    let view = move || {
        let now = Instant::now();
        let status = status.borrow().clone();
        // A poisoned lock still holds the figures so far; the page shows them.
        let dashboard = dashboard.lock().unwrap_or_else(|p| p.into_inner());
        dashboard.view(&status, now)
    };
    let (page, panels, api) = (view.clone(), view.clone(), view);
    axum::Router::new()
        .route(
            "/",
            get(move || {
                let html = render_page(&page());
                async move { ([(CONTENT_TYPE, "text/html; charset=utf-8")], html) }
            }),
        )
        .route(
            "/dashboard/panels",
            get(move || {
                let html = render_panels(&panels());
                async move { ([(CONTENT_TYPE, "text/html; charset=utf-8")], html) }
            }),
        )
        .route(
            "/api/dashboard",
            get(move || {
                let json = serde_json::to_string(&api()).unwrap_or_else(|e| {
                    // Only a non-string map key fails, which the view has none of.
                    tracing::error!("dashboard json: {e}");
                    "{}".to_string()
                });
                async move { ([(CONTENT_TYPE, "application/json")], json) }
            }),
        )
        .route(
            "/dashboard.css",
            get(|| async {
                (
                    [
                        (CONTENT_TYPE, "text/css; charset=utf-8"),
                        (CACHE_CONTROL, "max-age=300"),
                    ],
                    include_str!("dashboard/assets/dashboard.css"),
                )
            }),
        )
        .route(
            "/dashboard.js",
            get(|| async {
                (
                    [
                        (CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (CACHE_CONTROL, "max-age=300"),
                    ],
                    include_str!("dashboard/assets/dashboard.js"),
                )
            }),
        )
        .layer(axum::middleware::map_response(secure_headers))
}

/// Every answer: not cached (it is live), not sniffed, nothing loaded from elsewhere and no
/// inline script run (the page's text comes from workers' ids and reasons).
async fn secure_headers(mut response: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{self, HeaderValue};
    let h = response.headers_mut();
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; frame-ancestors 'none'",
        ),
    );
    response
}
