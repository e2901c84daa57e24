//! The forgetting guard's series of `/metrics`: trips and mixture changes counted from the log
//! lines, the bounds, bases, last readings and replay share from the status snapshot's guard.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::control::Log;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TripLabel {
    source: String,
    action: String,
}

/// `dapt_guard_*`.
#[derive(Default)]
pub struct GuardMetrics {
    trips: Family<TripLabel, Counter>,
    mixture_changes: Counter,
    base: Family<SourceLabel, FloatGauge>,
    last: Family<SourceLabel, FloatGauge>,
    rise: Family<SourceLabel, FloatGauge>,
    max_rise: Family<SourceLabel, FloatGauge>,
    replay_share: FloatGauge,
    stopped_at: Gauge,
}

impl GuardMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "guard_trips",
            "Evaluations out of the forgetting guard's bounds, by source and the job's action",
            self.trips.clone(),
        );
        r.register(
            "guard_mixture_changes",
            "Mixture changes the forgetting guard committed (rebalance)",
            self.mixture_changes.clone(),
        );
        r.register(
            "guard_base_perplexity",
            "Held-out perplexity of each watched source at step 0 (the base model)",
            self.base.clone(),
        );
        r.register(
            "guard_perplexity",
            "Held-out perplexity of each watched source at its last evaluation",
            self.last.clone(),
        );
        r.register(
            "guard_rise",
            "Rise of each watched source's last perplexity over its base, as a fraction",
            self.rise.clone(),
        );
        r.register(
            "guard_max_rise",
            "The bound on each watched source's rise, as a fraction",
            self.max_rise.clone(),
        );
        r.register(
            "guard_replay_share",
            "The replay sources' share of samples under the committed mixture schedule",
            self.replay_share.clone(),
        );
        r.register(
            "guard_stopped_at_step",
            "The committed step a `stop` ended the job at (-1: not stopped)",
            self.stopped_at.clone(),
        );
        self.stopped_at.set(-1);
    }

    pub fn observe(&self, line: &Log) {
        match line {
            Log::GuardTripped(trip) => {
                self.trips
                    .get_or_create(&TripLabel {
                        source: trip.source.clone(),
                        action: trip.action.name().to_string(),
                    })
                    .inc();
            }
            Log::MixtureChanged { .. } => {
                self.mixture_changes.inc();
            }
            _ => {}
        }
    }

    /// Sets the gauges from the status snapshot's `guard_json` (empty: no guard).
    pub fn render(&self, guard_json: &str) {
        let Ok(guard) = serde_json::from_str::<serde_json::Value>(guard_json) else {
            return;
        };
        for bound in guard["bounds"].as_array().into_iter().flatten() {
            let label = SourceLabel {
                source: bound["source"].as_str().unwrap_or_default().to_string(),
            };
            let set = |family: &Family<SourceLabel, FloatGauge>, key: &str| {
                if let Some(v) = bound[key].as_f64() {
                    family.get_or_create(&label).set(v);
                }
            };
            set(&self.base, "base");
            set(&self.last, "last");
            set(&self.rise, "rise");
            set(&self.max_rise, "max_rise");
        }
        if let Some(share) = guard["replay_share"].as_f64() {
            self.replay_share.set(share);
        }
        if let Some(step) = guard["stopped_at"].as_i64() {
            self.stopped_at.set(step);
        }
    }
}
