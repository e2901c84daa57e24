//! The forgetting guard (the job file's `guard:`): pure decisions, like [`crate::control`]'s.
//!
//! Rank 0 evaluates every source's held-out perplexity at step 0 (the base model) and every
//! `training.eval_every` steps. The guard keeps each watched source's step-0 value as its base
//! (durable: it travels in the committed state, so a resumed job judges against the same base)
//! and compares every later evaluation with it. A reading whose rise over the base passes the
//! source's `max_rise` is a **trip**, and the job's action follows:
//!
//! * `warn`: the trip is logged and counted;
//! * `stop`: the job ends at its committed checkpoint (evaluated within bounds: every
//!   checkpoint is evaluated, and the evaluation of a step reaches the coordinator before that
//!   step's checkpoint votes, so the first reading out of bounds stops the job before its
//!   checkpoint commits), which `dapt launch` exports;
//! * `rebalance`: the replay sources' share is multiplied by `factor` (a share of 0 starts at
//!   `floor`), up to `cap`, from the next committed step on: that commit records the change in
//!   the mixture schedule, and the generation is re-formed from it so that every rank draws
//!   the new order (a pure function of the seed, the committed schedule and the sample index).

use std::collections::{BTreeMap, VecDeque};

pub mod metrics;

use dapt_corpus::Role;
use dapt_proto::job::{GuardAction, JobSpec, RebalanceSpec};
use serde::{Deserialize, Serialize};

/// Trips kept for the status (the count goes on).
const TRIPS_KEPT: usize = 32;

/// New mixture weights from a step on: one entry of the committed mixture schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureChange {
    /// The first step drawn with `weights`.
    pub step: u64,
    /// One weight per corpus source, in the corpus's order.
    pub weights: Vec<f64>,
}

/// One watched source, as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoundStatus {
    pub source: String,
    /// The most the perplexity may rise over the base, as a fraction (0.05: 5%).
    pub max_rise: f64,
    /// The step-0 (base model) perplexity, once measured.
    pub base: Option<f64>,
    /// The newest evaluation: step, perplexity, and its rise over the base (a fraction).
    pub last_step: Option<u64>,
    pub last: Option<f64>,
    pub rise: Option<f64>,
}

/// A trip: an evaluation out of bounds, and what the guard did about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trip {
    pub step: u64,
    pub source: String,
    pub perplexity: f64,
    pub base: f64,
    pub rise: f64,
    pub max_rise: f64,
    pub action: GuardAction,
    /// What was done, in words ("stopped at the committed step 10", ...).
    pub outcome: String,
}

/// What a trip asks the control loop to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing (in bounds, a base reading, or a warning only).
    Continue,
    /// End the job at the committed checkpoint.
    Stop,
}

/// The guard's state: fixed settings, the bases, the newest readings and the trips.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Guard {
    pub action: GuardAction,
    pub bounds: Vec<BoundStatus>,
    #[serde(skip)]
    rebalance: Option<RebalanceSpec>,
    /// Corpus source names, their weights and whether each is a replay source.
    #[serde(skip)]
    sources: Vec<(String, f64, bool)>,
    /// Trips so far (all of them; `recent` keeps the last few).
    pub trips: u64,
    pub recent: VecDeque<Trip>,
    /// Weights decided by a rebalance, waiting for the next commit.
    pub pending: Option<Vec<f64>>,
    /// The replay sources' share of samples now (under the committed schedule).
    pub replay_share: f64,
    /// The committed mixture schedule (a copy of the committed state's, for the status).
    pub schedule: Vec<MixtureChange>,
    /// The step of the checkpoint a `stop` ended the job at.
    pub stopped_at: Option<u64>,
    /// The job's last step (`training.tokens`), when it has a `training:` section: a trip there
    /// leaves no step to train under a new mixture.
    #[serde(skip)]
    final_step: Option<u64>,
}

impl Guard {
    /// The guard of `job`, if it has one, with the bases and schedule of what was committed.
    pub fn new(
        job: &JobSpec,
        base: &BTreeMap<String, f64>,
        schedule: &[MixtureChange],
    ) -> Option<Self> {
        let spec = job.guard.as_ref()?;
        let sources: Vec<(String, f64, bool)> = job
            .corpus
            .sources
            .0
            .iter()
            .map(|s| (s.name.to_string(), s.weight.get(), s.role == Role::Replay))
            .collect();
        let mut guard = Guard {
            action: spec.action,
            bounds: spec
                .bounds
                .iter()
                .map(|b| BoundStatus {
                    source: b.source.clone(),
                    max_rise: b.max_rise,
                    base: base.get(&b.source).copied(),
                    last_step: None,
                    last: None,
                    rise: None,
                })
                .collect(),
            rebalance: spec.rebalance,
            sources,
            trips: 0,
            recent: VecDeque::new(),
            pending: None,
            replay_share: 0.0,
            schedule: Vec::new(),
            stopped_at: None,
            final_step: job.training.map(|t| t.steps()),
        };
        guard.committed_schedule(schedule);
        Some(guard)
    }

    /// The bases measured so far, by source (what the committed state keeps).
    pub fn bases(&self) -> BTreeMap<String, f64> {
        self.bounds
            .iter()
            .filter_map(|b| Some((b.source.clone(), b.base?)))
            .collect()
    }

    /// Whether every watched source has its base.
    pub fn has_bases(&self) -> bool {
        self.bounds.iter().all(|b| b.base.is_some())
    }

    /// Takes in the committed schedule (at start, and after each commit).
    pub fn committed_schedule(&mut self, schedule: &[MixtureChange]) {
        self.schedule = schedule.to_vec();
        self.replay_share = self.share_of_replay(&self.current_weights());
    }

    /// The weights in force after the committed schedule.
    fn current_weights(&self) -> Vec<f64> {
        self.schedule.last().map_or_else(
            || self.sources.iter().map(|s| s.1).collect(),
            |c| c.weights.clone(),
        )
    }

    fn share_of_replay(&self, weights: &[f64]) -> f64 {
        let total: f64 = weights.iter().sum();
        let replay: f64 = weights
            .iter()
            .zip(&self.sources)
            .filter(|(_, s)| s.2)
            .map(|(w, _)| w)
            .sum();
        if total > 0.0 {
            replay / total
        } else {
            0.0
        }
    }

    /// Takes in rank 0's evaluation of `source` after `step` steps. `committed` is the step of
    /// the committed checkpoint, if any. Returns what the control loop must do and the trip,
    /// if this reading is one.
    pub fn observe(
        &mut self,
        step: u64,
        source: &str,
        perplexity: f64,
        committed: Option<u64>,
    ) -> (Verdict, Option<Trip>) {
        let Some(i) = self.bounds.iter().position(|b| b.source == source) else {
            return (Verdict::Continue, None);
        };
        let bound = &mut self.bounds[i];
        if step == 0 && perplexity.is_finite() && perplexity > 0.0 {
            // The base model's. A generation re-formed before the first commit measures it
            // again: the same weights give the same value; the first stays. (Ranks refuse a
            // non-finite evaluation; one off the wire is never a baseline: every rise against
            // it would be NaN.)
            bound.base.get_or_insert(perplexity);
        }
        let Some(base) = bound.base else {
            return (Verdict::Continue, None);
        };
        let rise = perplexity / base - 1.0;
        bound.last_step = Some(step);
        bound.last = Some(perplexity);
        bound.rise = Some(rise);
        if step == 0 || rise <= bound.max_rise {
            return (Verdict::Continue, None);
        }
        let max_rise = bound.max_rise;
        let (verdict, outcome) = match self.action {
            GuardAction::Warn => (Verdict::Continue, "warned; training goes on".to_string()),
            GuardAction::Stop => match committed {
                Some(c) => {
                    self.stopped_at = Some(c);
                    (
                    Verdict::Stop,
                    format!("stopping at the committed checkpoint of step {c}, the last within bounds"),
                )
                }
                None => (
                    Verdict::Stop,
                    "stopping: no checkpoint was committed within bounds, nothing to export"
                        .to_string(),
                ),
            },
            GuardAction::Rebalance => (Verdict::Continue, self.rebalance(step)),
        };
        let trip = Trip {
            step,
            source: source.to_string(),
            perplexity,
            base,
            rise,
            max_rise,
            action: self.action,
            outcome,
        };
        self.trips += 1;
        if self.recent.len() == TRIPS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(trip.clone());
        (verdict, Some(trip))
    }

    /// Decides new weights (kept in `pending` for the next commit) and says what it did, after
    /// a trip at `step`.
    fn rebalance(&mut self, step: u64) -> String {
        let Some(r) = self.rebalance else {
            return "no rebalance settings".into();
        };
        if self.final_step.is_some_and(|last| step >= last) {
            // It said "raising the replay share ... from the next committed step", and that
            // commit was the job's last: nothing trained under it.
            return format!(
                "step {step} is the job's last: no step is left to train under a raised replay \
                 share (raise training.tokens to train further; the same trip raises it then)"
            );
        }
        if let Some(pending) = &self.pending {
            let share = self.share_of_replay(pending);
            return format!(
                "a raise of the replay share to {share:.4} already waits for the next commit"
            );
        }
        let now = self.replay_share;
        let target = (now * r.factor).max(r.floor).min(r.cap);
        if target <= now + 1e-9 {
            return format!(
                "the replay share is at its cap ({:.4}): nothing more to raise",
                r.cap
            );
        }
        let weights = reweighted(&self.current_weights(), &self.sources, target);
        self.pending = Some(weights);
        format!(
            "raising the replay share from {now:.4} to {target:.4} from the next committed step"
        )
    }

    /// At a commit of `step`: the change a rebalance decided, to record with it (and re-form
    /// the generation on).
    pub fn take_change(&mut self, step: u64) -> Option<MixtureChange> {
        self.pending
            .take()
            .map(|weights| MixtureChange { step, weights })
    }
}

/// `dapt status`'s lines about the guard, from the status reply's `guard_json` (`None` when
/// the job has no guard): the action, trips and replay share, then each watched source's last
/// perplexity against its base and bound.
///
/// Its strings come from the server: escaped ([`dapt_proto::auth::printable`]), so that one
/// posing as the coordinator forges no line and sends no terminal escape.
pub fn status_line(guard_json: &str) -> Option<String> {
    use dapt_proto::auth::printable;
    let g: serde_json::Value = serde_json::from_str(guard_json).ok()?;
    let mut out = format!(
        "forgetting guard: {}, {} trip(s), replay share {:.4}\n",
        printable(g["action"].as_str().unwrap_or("?")),
        g["trips"].as_u64().unwrap_or(0),
        g["replay_share"].as_f64().unwrap_or(0.0)
    );
    for b in g["bounds"].as_array().into_iter().flatten() {
        let pct = |key: &str| b[key].as_f64().map(|x| format!("{:+.1}%", x * 100.0));
        out.push_str(&format!(
            "  {}: base {}, last {} ({} at step {}), bound {}\n",
            printable(b["source"].as_str().unwrap_or("?")),
            b["base"]
                .as_f64()
                .map_or("not measured".into(), |x| format!("{x:.4}")),
            b["last"]
                .as_f64()
                .map_or("none".into(), |x| format!("{x:.4}")),
            pct("rise").unwrap_or_else(|| "-".into()),
            b["last_step"]
                .as_u64()
                .map_or("-".into(), |s| s.to_string()),
            pct("max_rise").unwrap_or_else(|| "-".into()),
        ));
    }
    Some(out)
}

/// `weights` with the replay sources' total share set to `replay`: replay sources in
/// proportion to their weights (evenly when all are 0), the others in proportion to theirs.
fn reweighted(weights: &[f64], sources: &[(String, f64, bool)], replay: f64) -> Vec<f64> {
    let sum = |want: bool| -> (f64, usize) {
        let picked = weights.iter().zip(sources).filter(|(_, s)| s.2 == want);
        picked.fold((0.0, 0), |(t, n), (w, _)| (t + w, n + 1))
    };
    let (replay_total, replay_count) = sum(true);
    let (domain_total, _) = sum(false);
    weights
        .iter()
        .zip(sources)
        .map(|(&w, s)| {
            if s.2 {
                if replay_total > 0.0 {
                    w / replay_total * replay
                } else {
                    replay / replay_count as f64
                }
            } else if domain_total > 0.0 {
                w / domain_total * (1.0 - replay)
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(action: &str, rebalance: &str) -> JobSpec {
        let text = format!(
            "job: g\ncorpus:\n  output: c\n  sources:\n    - name: code\n      role: domain\n      paths: [a]\n      weight: 1\n    - name: web\n      role: replay\n      paths: [b]\n      weight: 0\ntraining:\n  seq_len: 8\n  global_batch: 4\n  tokens: 1000\n  eval_every: 2\ncheckpoint:\n  every: 2\nguard:\n  bounds:\n    - source: web\n      max_rise: 0.05\n  action: {action}\n{rebalance}"
        );
        JobSpec::parse(&text).expect("parses")
    }

    #[test]
    fn warns_on_a_rise_past_the_bound_and_not_within_it() {
        job("warn", "").validate().expect("valid");
        let mut g = Guard::new(&job("warn", ""), &BTreeMap::new(), &[]).expect("guard");
        assert_eq!(g.observe(0, "web", 100.0, None), (Verdict::Continue, None));
        assert_eq!(g.bounds[0].base, Some(100.0));
        assert_eq!(g.observe(2, "web", 104.0, None).1, None);
        assert_eq!(g.observe(2, "code", 900.0, None).1, None, "not watched");
        let (verdict, trip) = g.observe(4, "web", 110.0, Some(4));
        assert_eq!(verdict, Verdict::Continue);
        let trip = trip.expect("a trip");
        assert!((trip.rise - 0.1).abs() < 1e-12);
        assert_eq!(g.trips, 1);
        // A second step-0 reading (a re-formation before the first commit) keeps the first base.
        g.observe(0, "web", 120.0, None);
        assert_eq!(g.bases()["web"], 100.0);
    }

    /// A trip at the job's last step changes no mixture: nothing would train under it (it said
    /// "raising the replay share ... from the next committed step", and that was the last).
    #[test]
    fn a_rebalance_trip_at_the_last_step_changes_nothing() {
        let settings = "  rebalance:\n    factor: 2\n    cap: 0.3\n    floor: 0.1\n";
        let job = job("rebalance", settings);
        let last = job.training.expect("training").steps();
        let mut g = Guard::new(&job, &BTreeMap::new(), &[]).expect("guard");
        g.observe(0, "web", 100.0, None);
        let (_, trip) = g.observe(last, "web", 150.0, Some(last - 1));
        let outcome = trip.expect("a trip").outcome;
        assert!(outcome.contains("the job's last"), "{outcome}");
        assert_eq!(g.pending, None);
        assert_eq!(g.take_change(last), None);
    }

    #[test]
    fn stop_ends_at_the_committed_step() {
        let mut g = Guard::new(&job("stop", ""), &BTreeMap::new(), &[]).expect("guard");
        g.observe(0, "web", 100.0, None);
        let (verdict, trip) = g.observe(6, "web", 200.0, Some(4));
        assert_eq!(verdict, Verdict::Stop);
        assert!(trip.expect("trip").outcome.contains("step 4"));
    }

    #[test]
    fn rebalance_raises_the_replay_share_by_its_factor_up_to_its_cap() {
        let settings = "  rebalance:\n    factor: 2\n    cap: 0.3\n    floor: 0.1\n";
        job("rebalance", settings).validate().expect("valid");
        let mut g = Guard::new(&job("rebalance", settings), &BTreeMap::new(), &[]).expect("guard");
        assert_eq!(g.replay_share, 0.0);
        g.observe(0, "web", 100.0, None);
        g.observe(2, "web", 150.0, Some(2));
        // 0% replay starts at the floor.
        let pending = g.pending.clone().expect("pending");
        assert_eq!(pending, vec![0.9, 0.1]);
        // A second trip before the commit changes nothing more.
        let (_, trip) = g.observe(2, "web", 150.0, Some(2));
        assert!(trip.expect("trip").outcome.contains("already waits"));
        let change = g.take_change(2).expect("change");
        assert_eq!(change.step, 2);
        g.committed_schedule(std::slice::from_ref(&change));
        assert!((g.replay_share - 0.1).abs() < 1e-12);
        g.observe(4, "web", 150.0, Some(4));
        let next = g.take_change(4).expect("second change");
        assert!((next.weights[1] - 0.2).abs() < 1e-12, "{next:?}");
        g.committed_schedule(&[change, next.clone()]);
        g.observe(6, "web", 150.0, Some(6));
        let capped = g.take_change(6).expect("third change");
        assert!((capped.weights[1] - 0.3).abs() < 1e-12, "{capped:?}");
        g.committed_schedule(&[next, capped]);
        let (_, trip) = g.observe(8, "web", 150.0, Some(8));
        assert!(trip.expect("trip").outcome.contains("cap"));
        assert_eq!(g.take_change(8), None);
    }

    #[test]
    fn the_job_file_is_checked_with_field_and_line() {
        let head = "job: g\ncorpus:\n  output: c\n  sources:\n    - {name: a, role: domain, paths: [a], weight: 1}\nguard:\n";
        let err = JobSpec::parse(&format!(
            "{head}  bounds:\n    - source: web\n      max_rise: -1\n  action: warn\n"
        ))
        .expect_err("refused");
        assert!(
            err.contains("guard.bounds[0].max_rise") && err.contains("line 9"),
            "{err}"
        );
        let err =
            JobSpec::parse(&format!("{head}  bounds: []\n  action: shout\n")).expect_err("refused");
        assert!(
            err.contains("guard.action") && err.contains("line 8"),
            "{err}"
        );
        // Across sections: the base needs evaluations, a stop needs every checkpoint evaluated.
        let mut spec = job("stop", "");
        spec.training.as_mut().expect("training").eval_every = 0;
        assert_eq!(spec.validate().expect_err("refused").0, "guard");
        let mut spec = job("stop", "");
        spec.checkpoint.every = 3;
        assert_eq!(spec.validate().expect_err("refused").0, "guard.action");
        let mut spec = job("rebalance", "");
        assert_eq!(spec.validate().expect_err("refused").0, "guard.rebalance");
        spec.guard.as_mut().expect("guard").bounds[0].source = "nope".into();
        assert_eq!(spec.validate().expect_err("refused").0, "guard.bounds");
    }
}
