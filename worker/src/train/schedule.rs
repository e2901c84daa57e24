//! The learning rate over training tokens: a linear re-warm from zero to the peak (continued
//! pretraining starts from a model whose own schedule ended near zero), then a decay to a floor.

use dapt_proto::job::{ScheduleKind, ScheduleSpec};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub spec: ScheduleSpec,
    pub total_tokens: u64,
}

impl LrSchedule {
    /// The learning rate for the step that starts after `tokens` trained tokens.
    pub fn lr(&self, tokens: u64) -> f64 {
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
}
