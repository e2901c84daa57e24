//! The job file's `guard:` section: the forgetting guard. The coordinator compares each named
//! source's held-out perplexity with its value at step 0 (the base model's, measured before
//! the first step) and, when it rose past the bound, warns, stops the job at the last committed
//! checkpoint within bounds, or raises the replay sources' share of the mixture.
//!
//! Every number is checked while it is read, so that an error names its field and line.

use serde::{Deserialize, Deserializer, Serialize};

/// `guard:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardSpec {
    /// The sources watched, each with how far its held-out perplexity may rise.
    pub bounds: Vec<GuardBound>,
    /// What a trip does.
    pub action: GuardAction,
    /// With `action: rebalance`: by how much the replay share rises, and up to where.
    #[serde(default)]
    pub rebalance: Option<RebalanceSpec>,
}

/// One watched source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardBound {
    /// A corpus source (any role; usually a replay source: general text).
    pub source: String,
    /// The most its held-out perplexity may rise over its step-0 value, as a fraction:
    /// `0.05` lets it rise 5%. Positive.
    #[serde(deserialize_with = "positive")]
    pub max_rise: f64,
}

/// What the guard does when a watched source's perplexity rises past its bound.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GuardAction {
    /// Log the trip (and count it); training goes on.
    Warn,
    /// End the job at the last committed checkpoint whose evaluation was within bounds, and
    /// export that one.
    Stop,
    /// Raise the replay sources' share of the mixture from the next committed step on.
    Rebalance,
}

impl GuardAction {
    pub fn name(self) -> &'static str {
        match self {
            GuardAction::Warn => "warn",
            GuardAction::Stop => "stop",
            GuardAction::Rebalance => "rebalance",
        }
    }
}

/// `guard.rebalance`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RebalanceSpec {
    /// Each trip multiplies the replay sources' share of samples by this (above 1).
    #[serde(deserialize_with = "above_one")]
    pub factor: f64,
    /// The replay share never rises above this fraction of the samples (in (0, 1)).
    #[serde(deserialize_with = "open_fraction")]
    pub cap: f64,
    /// A replay share of 0 (a job without replay) rises to this, then by `factor` (in (0, 1);
    /// default 0.05).
    #[serde(default = "default_floor", deserialize_with = "open_fraction")]
    pub floor: f64,
}

fn default_floor() -> f64 {
    0.05
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    checked(d, "a number above 0", |x| x > 0.0)
}

fn above_one<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    checked(d, "a number above 1", |x| x > 1.0)
}

fn open_fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    checked(d, "a fraction above 0 and below 1", |x| x > 0.0 && x < 1.0)
}

/// A finite float for which `ok` holds, refused with `expected` inside the visitor, where
/// serde_yaml still knows the value's line.
fn checked<'de, D: Deserializer<'de>>(
    d: D,
    expected: &'static str,
    ok: fn(f64) -> bool,
) -> Result<f64, D::Error> {
    struct Visitor {
        expected: &'static str,
        ok: fn(f64) -> bool,
    }
    impl Visitor {
        fn check<E: serde::de::Error>(&self, v: f64) -> Result<f64, E> {
            if v.is_finite() && (self.ok)(v) {
                Ok(v)
            } else {
                Err(E::custom(format!("must be {}, got {v}", self.expected)))
            }
        }
    }
    impl serde::de::Visitor<'_> for Visitor {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.expected)
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<f64, E> {
            self.check(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<f64, E> {
            self.check(v as f64)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<f64, E> {
            self.check(v as f64)
        }
    }
    d.deserialize_f64(Visitor { expected, ok })
}

impl GuardSpec {
    /// Checks against the rest of the job: the sources exist, the base is measured, every
    /// checkpoint a `stop` may end at is evaluated, `rebalance` has something to raise.
    pub fn validate(&self, job: &super::JobSpec) -> Result<(), (&'static str, String)> {
        if self.bounds.is_empty() {
            return Err(("guard.bounds", "name at least one source".into()));
        }
        let sources = &job.corpus.sources.0;
        for b in &self.bounds {
            if !sources.iter().any(|s| s.name.as_str() == b.source) {
                return Err((
                    "guard.bounds",
                    format!("`{}` is not a source of the corpus", b.source),
                ));
            }
        }
        let eval_every = job.training.map_or(0, |t| t.eval_every);
        if eval_every == 0 {
            return Err((
                "guard",
                "needs training.eval_every: the guard compares each evaluation with the base model's at step 0, which is measured only then".into(),
            ));
        }
        if self.action != GuardAction::Warn && !job.checkpoint.every.is_multiple_of(eval_every) {
            return Err((
                "guard.action",
                format!(
                    "`{}` needs every checkpoint evaluated: checkpoint.every ({}) must be a multiple of training.eval_every ({eval_every})",
                    self.action.name(),
                    job.checkpoint.every
                ),
            ));
        }
        match (self.action, &self.rebalance) {
            (GuardAction::Rebalance, None) => Err((
                "guard.rebalance",
                "`action: rebalance` needs `rebalance:` with its factor and cap".into(),
            )),
            (GuardAction::Rebalance, Some(r)) => {
                if !sources
                    .iter()
                    .any(|s| s.role == dapt_corpus::spec::Role::Replay)
                {
                    return Err((
                        "guard.rebalance",
                        "the corpus has no replay source to raise".into(),
                    ));
                }
                if r.floor > r.cap {
                    return Err((
                        "guard.rebalance.floor",
                        format!("must be at most the cap ({}), got {}", r.cap, r.floor),
                    ));
                }
                Ok(())
            }
            (_, Some(_)) => Err((
                "guard.rebalance",
                "only applies with `action: rebalance`".into(),
            )),
            (_, None) => Ok(()),
        }
    }
}
