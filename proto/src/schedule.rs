//! The learning rate over training tokens: a linear re-warm from zero to the peak (continued
//! pretraining starts from a model whose own schedule ended near zero), then a decay to a floor;
//! and the re-warm a resume needs when the job file's schedule was edited so that the next step's
//! rate would jump up (a finished job's `training.tokens` raised to train further).
//!
//! Shared by the worker, which trains with it, and the coordinator, which says what a resume
//! will do.

use serde::{Deserialize, Serialize};

use crate::job::{ScheduleKind, ScheduleSpec, TrainingSpec};

/// A job's learning rate at every point of its token budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The peak rate (`optimizer.lr`).
    pub peak: f64,
    pub spec: ScheduleSpec,
    /// The budget the schedule spans: `steps() * tokens_per_step()` of the job's `training:`.
    pub total_tokens: u64,
    /// A re-warm begun by a resume under edited settings ([`LrSchedule::resume`]); `None`
    /// otherwise.
    pub rewarm: Option<Rewarm>,
}

/// A linear ramp of the learning rate from `from_lr` at `start` trained tokens to the schedule's
/// own rate at `start + tokens`, after which the schedule alone rules. Recorded in every
/// checkpoint's `trainer.json` until it ends, so a restart inside it goes on with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewarm {
    /// Trained tokens when the ramp began (the resumed checkpoint's).
    pub start: u64,
    /// The rate the checkpoint's own settings gave the step after it.
    pub from_lr: f64,
    /// The ramp's length in tokens: `schedule.warmup` of the tokens left then.
    pub tokens: u64,
}

impl LrSchedule {
    /// The schedule of a job's `training:` section, with no re-warm.
    pub fn of(training: &TrainingSpec) -> Self {
        LrSchedule {
            peak: training.optimizer.lr,
            spec: training.schedule,
            total_tokens: training.steps() * training.tokens_per_step(),
            rewarm: None,
        }
    }

    /// This schedule in the re-warm `rewarm` (a checkpoint's, as its `trainer.json` records it).
    pub fn with_rewarm(self, rewarm: Option<Rewarm>) -> Self {
        LrSchedule { rewarm, ..self }
    }

    /// The learning rate for the step that starts after `tokens` trained tokens.
    pub fn lr(&self, tokens: u64) -> f64 {
        let lr = self.planned(tokens);
        match self.rewarm {
            Some(r) if tokens >= r.start && tokens - r.start < r.tokens => {
                let f = (tokens - r.start) as f64 / r.tokens as f64;
                r.from_lr + (lr - r.from_lr) * f
            }
            _ => lr,
        }
    }

    /// The schedule to go on with when a checkpoint trained under `recorded` (its settings and
    /// the re-warm it was in; `None` for a checkpoint that records none) resumes under `self`
    /// (the job file's settings, no re-warm) after `tokens` trained tokens.
    ///
    /// Unchanged settings keep the recorded re-warm. Edited ones that give the next step a
    /// higher rate than the recorded schedule did (`training.tokens` raised after the decay, a
    /// higher `optimizer.lr`) re-warm linearly from that rate to the edited schedule over
    /// `schedule.warmup` of the tokens left, as the job's start does from zero, instead of
    /// jumping to it: a jump of the rate by several times after the decay spikes the loss
    /// (Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm
    /// your model?"; Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually
    /// Pre-train Large Language Models"). A lower rate, `warmup: 0`, or no tokens left: applied
    /// at once.
    fn resumed(self, recorded: Option<&LrSchedule>, tokens: u64) -> LrSchedule {
        let fresh = LrSchedule {
            rewarm: None,
            ..self
        };
        let Some(recorded) = recorded else {
            return fresh;
        };
        let same = LrSchedule {
            rewarm: None,
            ..*recorded
        } == fresh;
        if same {
            // (A ramp that has ended is dropped.)
            let rewarm = recorded
                .rewarm
                .filter(|r| tokens.saturating_sub(r.start) < r.tokens);
            return LrSchedule { rewarm, ..fresh };
        }
        let from_lr = recorded.lr(tokens);
        let left = self.total_tokens.saturating_sub(tokens);
        let length = (self.spec.warmup * left as f64).round() as u64;
        // Above 1% higher: a rounding of the rate is no jump.
        if fresh.planned(tokens) <= from_lr * 1.01 || length == 0 || !from_lr.is_finite() {
            return fresh;
        }
        LrSchedule {
            rewarm: Some(Rewarm {
                start: tokens,
                from_lr,
                tokens: length,
            }),
            ..fresh
        }
    }

    /// The schedule a resume goes on with (`resumed`, below), saying so in the log when it
    /// begins a re-warm (the rate it starts from, the edited schedule's rate it reaches, and
    /// how many steps of `tokens_per_step` it takes). The worker trains with the result; the
    /// coordinator only says what its ranks will do.
    pub fn resume(
        self,
        recorded: Option<&LrSchedule>,
        tokens: u64,
        tokens_per_step: u64,
    ) -> LrSchedule {
        let resumed = self.resumed(recorded, tokens);
        if let Some(r) = resumed
            .rewarm
            .filter(|r| recorded.and_then(|s| s.rewarm) != Some(*r))
        {
            tracing::info!(
                from_lr = r.from_lr,
                to_lr = resumed.planned(r.start + r.tokens),
                steps = r.tokens.div_ceil(tokens_per_step.max(1)),
                tokens = r.tokens,
                "re-warming the learning rate to the edited schedule's over schedule.warmup of \
                 the tokens left, rather than jumping to it"
            );
        }
        resumed
    }

    /// The rate the settings alone give after `tokens` (no re-warm).
    fn planned(&self, tokens: u64) -> f64 {
        let total = self.total_tokens.max(1) as f64;
        let t = (tokens as f64 / total).min(1.0);
        let floor = self.peak * self.spec.min_lr_ratio;
        let warmup = self.spec.warmup;
        if t < warmup {
            // The first step already has a small positive rate.
            return self.peak * (tokens as f64 + 1.0) / (warmup * total + 1.0);
        }
        let decay_from = match self.spec.kind {
            ScheduleKind::Wsd => (1.0 - self.spec.decay).max(warmup),
            _ => warmup,
        };
        if t < decay_from {
            return self.peak;
        }
        let progress = ((t - decay_from) / (1.0 - decay_from).max(f64::EPSILON)).min(1.0);
        let shape = match self.spec.kind {
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            ScheduleKind::Linear | ScheduleKind::Wsd => 1.0 - progress,
        };
        floor + (self.peak - floor) * shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            peak: 1e-3,
            spec: ScheduleSpec {
                kind,
                warmup: 0.1,
                min_lr_ratio: 0.1,
                decay: 0.2,
            },
            total_tokens: 1000,
            rewarm: None,
        }
    }

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        for kind in [
            ScheduleKind::Cosine,
            ScheduleKind::Linear,
            ScheduleKind::Wsd,
        ] {
            let s = schedule(kind);
            assert!(s.lr(0) > 0.0 && s.lr(0) < 2e-5, "{kind:?}");
            assert!(s.lr(50) < s.lr(99));
            assert!(
                (s.lr(100) - 1e-3).abs() < 1e-12,
                "{kind:?} peak after warmup"
            );
            assert!(
                (s.lr(1000) - 1e-4).abs() < 1e-12,
                "{kind:?} floor at the end"
            );
            assert!(
                (s.lr(5000) - 1e-4).abs() < 1e-12,
                "{kind:?} floor after the end"
            );
        }
        let cos = schedule(ScheduleKind::Cosine);
        assert!((cos.lr(550) - 5.5e-4).abs() < 1e-9, "cosine midpoint");
        let wsd = schedule(ScheduleKind::Wsd);
        assert_eq!(wsd.lr(700), 1e-3, "stable phase");
        assert!(
            (wsd.lr(900) - 5.5e-4).abs() < 1e-12,
            "half way through the decay"
        );
    }

    /// A cosine job of 1,000 tokens (peak 1e-3, floor 1e-4, warmup 0.1) that finished, then
    /// its `training.tokens` doubled.
    fn finished_then_doubled() -> (LrSchedule, LrSchedule) {
        let recorded = schedule(ScheduleKind::Cosine);
        let now = LrSchedule {
            total_tokens: 2000,
            ..recorded
        };
        (recorded, now)
    }

    #[test]
    fn a_raised_budget_rewarms_from_the_floor_instead_of_jumping() {
        let (recorded, now) = finished_then_doubled();
        // Without a re-warm the rate jumps from the floor to 0.6 of the peak at once.
        assert!((recorded.lr(1000) - 1e-4).abs() < 1e-12);
        assert!(now.lr(1000) > 5e-4, "{}", now.lr(1000));
        let resumed = now.resumed(Some(&recorded), 1000);
        assert_eq!(
            resumed.rewarm,
            Some(Rewarm {
                start: 1000,
                from_lr: recorded.lr(1000),
                tokens: 100,
            }),
            "warmup 0.1 of the 1,000 tokens left"
        );
        assert!((resumed.lr(1000) - 1e-4).abs() < 1e-12, "no jump");
        let mut last = resumed.lr(1000);
        for t in 1001..1100 {
            let lr = resumed.lr(t);
            assert!(lr > last && lr < now.lr(t), "{t}: {lr}");
            last = lr;
        }
        for t in [1100, 1500, 2000] {
            assert_eq!(
                resumed.lr(t),
                now.lr(t),
                "the schedule rules after the ramp"
            );
        }
    }

    #[test]
    fn a_lower_rate_unchanged_settings_or_no_warmup_do_not_rewarm() {
        let (recorded, now) = finished_then_doubled();
        let lower = LrSchedule { peak: 1e-5, ..now };
        assert_eq!(lower.resumed(Some(&recorded), 1000), lower);
        let flat = LrSchedule {
            spec: ScheduleSpec {
                warmup: 0.0,
                ..now.spec
            },
            ..now
        };
        assert_eq!(flat.resumed(Some(&recorded), 1000).rewarm, None);
        assert_eq!(
            now.resumed(None, 1000),
            now,
            "a checkpoint recording no settings"
        );
        assert_eq!(recorded.resumed(Some(&recorded), 500), recorded);
    }

    #[test]
    fn a_restart_inside_a_rewarm_goes_on_with_it_and_a_second_edit_starts_from_its_rate() {
        let (recorded, now) = finished_then_doubled();
        let ramp = now.resumed(Some(&recorded), 1000);
        // Restarted at 1,040 under the same (doubled) settings: the same ramp.
        assert_eq!(now.resumed(Some(&ramp), 1040), ramp);
        // Restarted after the ramp: it is dropped.
        assert_eq!(now.resumed(Some(&ramp), 1100), now);
        // Edited again inside it (a higher peak): a new ramp from the rate the first gave.
        let higher = LrSchedule { peak: 2e-3, ..now };
        let again = higher.resumed(Some(&ramp), 1040);
        let r = again.rewarm.expect("a second ramp");
        assert_eq!((r.start, r.from_lr), (1040, ramp.lr(1040)));
        assert_eq!(again.lr(1040), ramp.lr(1040));
    }
}
