//! Naming the rank or link that holds a stalled step (docs/control-plane.md#stall-detection).
//!
//! Every heartbeat carries the rank's progress ([`RankReport`]): its step, its phase and, in the
//! collective, how many calls it began, the bytes it received in the current one, the peer it
//! waits for and for how long. [`StallWatch`] keeps the current generation's latest report per
//! rank and the recent step times. When the generation has gone longer than its bound without
//! completing a step (a multiple of the median recent step time, never under a floor, plus an
//! allowance while a rank evaluates or writes a checkpoint), [`StallWatch::check`] names the
//! culprit once ([`name_culprit`]); when the stall outlasts the job's timeout it says abort, and
//! the control loop re-forms without the culprit.
//!
//! Everything here is a pure function of the reports and the time: the tests drive it directly.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use dapt_proto::rpc::{Generation, WorkerId};

/// Step times kept for the median.
const RECENT_STEPS: usize = 16;
/// Stalls kept for the status (oldest dropped first).
const HISTORY: usize = 32;

/// When a step counts as stalled, and how long a stall may last.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallConfig {
    /// A step is stalled once it has taken this many times the median of the recent steps' times.
    pub factor: f64,
    /// ... and never before this.
    pub floor: Duration,
    /// A named stall that lasts this much longer aborts the generation, which re-forms without
    /// the culprit. `None`: name it only.
    pub timeout: Option<Duration>,
}

impl Default for StallConfig {
    fn default() -> Self {
        StallConfig {
            factor: 5.0,
            floor: Duration::from_secs(30),
            timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// Where a rank's training thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankPhase {
    Setup,
    Data,
    Forward,
    Backward,
    Collective,
    Optimizer,
    Checkpoint,
    Evaluate,
}

impl RankPhase {
    pub fn name(self) -> &'static str {
        match self {
            RankPhase::Setup => "setup",
            RankPhase::Data => "data",
            RankPhase::Forward => "forward",
            RankPhase::Backward => "backward",
            RankPhase::Collective => "collective",
            RankPhase::Optimizer => "optimizer",
            RankPhase::Checkpoint => "checkpoint",
            RankPhase::Evaluate => "evaluate",
        }
    }
}

/// A rank's collective, from its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectiveReport {
    /// Calls begun in this generation.
    pub calls: u64,
    /// Bytes received in the call in progress.
    pub received: u64,
    pub sent: u64,
    /// The rank it is blocked on.
    pub waiting_for: Option<u32>,
    /// Since it last moved a byte.
    pub waited: Duration,
}

/// One rank's progress, from its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankReport {
    pub generation: Generation,
    /// Steps completed.
    pub step: u64,
    pub phase: RankPhase,
    pub collective: Option<CollectiveReport>,
}

/// What holds a stalled step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Culprit {
    /// A rank that has not reached the collective the others wait in (or that the rank waiting
    /// longest waits on while it is itself elsewhere).
    Rank {
        rank: u32,
        worker: WorkerId,
        phase: RankPhase,
    },
    /// Every rank waits in the collective, and `to` has received the least in the call: the
    /// bytes from `from` do not arrive.
    Link {
        from: u32,
        from_worker: WorkerId,
        to: u32,
        to_worker: WorkerId,
    },
    /// The reports do not say (a worker that predates them, a collective that cannot tell).
    Unknown,
}

impl Culprit {
    /// The worker a re-formation leaves out: the rank, or the sending end of a link (either end
    /// would do: each has one working link left, and a ring without either avoids the link).
    pub fn benched(&self) -> Option<&WorkerId> {
        match self {
            Culprit::Rank { worker, .. } => Some(worker),
            Culprit::Link { from_worker, .. } => Some(from_worker),
            Culprit::Unknown => None,
        }
    }

    pub fn phase(&self) -> Option<RankPhase> {
        match self {
            Culprit::Rank { phase, .. } => Some(*phase),
            Culprit::Link { .. } => Some(RankPhase::Collective),
            Culprit::Unknown => None,
        }
    }
}

impl fmt::Display for Culprit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Culprit::Rank {
                rank,
                worker,
                phase,
            } => write!(f, "rank {rank} ({worker}) in {}", phase.name()),
            Culprit::Link {
                from,
                from_worker,
                to,
                to_worker,
            } => write!(
                f,
                "link rank {from} ({from_worker}) -> rank {to} ({to_worker}) in the collective"
            ),
            Culprit::Unknown => write!(f, "no rank could be named"),
        }
    }
}

/// What became of a stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallAction {
    /// Logged; the job waits.
    Named,
    /// The generation was aborted and re-forms without the culprit.
    Aborted,
    /// The step completed after all.
    Cleared,
}

impl StallAction {
    pub fn name(self) -> &'static str {
        match self {
            StallAction::Named => "named",
            StallAction::Aborted => "aborted",
            StallAction::Cleared => "cleared",
        }
    }
}

/// A step that took longer than its bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    pub generation: Generation,
    /// The step in flight (0-based).
    pub step: u64,
    pub culprit: Culprit,
    /// When the generation last made progress.
    pub since: Instant,
    /// When the stall was named.
    pub named: Instant,
    /// The bound the step passed.
    pub bound: Duration,
    /// Bytes the culprit (a link's receiving end) moved in the stalled call, when known.
    pub bytes: Option<u64>,
    pub action: StallAction,
}

/// What [`StallWatch::check`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A stall was named just now.
    Named(Stall),
    /// The named stall outlasted the timeout: abort, and leave out `Culprit::benched`.
    Abort(Stall),
}

/// The current generation's reports and the job's recent step times.
#[derive(Debug, Clone, Default)]
pub struct StallWatch {
    /// The latest report of each rank of the current generation.
    reports: BTreeMap<u32, RankReport>,
    /// Training times of recent steps, oldest first (kept across generations).
    recent: VecDeque<Duration>,
    longest_eval: Option<Duration>,
    longest_checkpoint: Option<Duration>,
    /// When the current generation last completed a step; `None` before its first (loading and
    /// connecting are bounded by the ranks' own collective timeout).
    last_progress: Option<Instant>,
    /// The stalls seen, oldest first; the last one is open while its action is `Named` and
    /// `open` is set.
    pub history: VecDeque<Stall>,
    open: bool,
}

impl StallWatch {
    /// A new generation formed (or the old one ended): its ranks start afresh.
    pub fn formed(&mut self) {
        self.reports.clear();
        self.last_progress = None;
        self.open = false;
    }

    /// A rank's report for the current generation.
    pub fn report(&mut self, rank: u32, report: RankReport) {
        self.reports.insert(rank, report);
    }

    /// Every rank completed a step taking `train` (the slowest rank's), `eval` and `checkpoint`.
    /// Returns the stall it clears, if one was named.
    pub fn step_done(
        &mut self,
        train: Duration,
        eval: Duration,
        checkpoint: Duration,
        now: Instant,
    ) -> Option<Stall> {
        if self.recent.len() == RECENT_STEPS {
            self.recent.pop_front();
        }
        self.recent.push_back(train);
        let longest = |kept: &mut Option<Duration>, d: Duration| {
            if !d.is_zero() {
                *kept = Some(kept.map_or(d, |k| k.max(d)));
            }
        };
        longest(&mut self.longest_eval, eval);
        longest(&mut self.longest_checkpoint, checkpoint);
        self.last_progress = Some(now);
        if !std::mem::take(&mut self.open) {
            return None;
        }
        let stall = self.history.back_mut()?;
        stall.action = StallAction::Cleared;
        Some(stall.clone())
    }

    /// Closes the open stall as aborted (the ranks' own collective timeout ended it first).
    pub fn abort_open(&mut self) -> Option<Stall> {
        if !std::mem::take(&mut self.open) {
            return None;
        }
        let stall = self.history.back_mut()?;
        stall.action = StallAction::Aborted;
        Some(stall.clone())
    }

    /// The median of the recent steps' training times.
    pub fn median(&self) -> Option<Duration> {
        let mut sorted: Vec<Duration> = self.recent.iter().copied().collect();
        sorted.sort();
        sorted.get(sorted.len() / 2).copied()
    }

    /// How long the step in flight may take before it counts as stalled: `None` while no bound
    /// can be given (no step completed in this generation yet, or a rank evaluates or writes a
    /// checkpoint and no evaluation or checkpoint has been timed yet).
    pub fn bound(&self, config: &StallConfig) -> Option<Duration> {
        let median = self.median()?;
        let mut bound = median.mul_f64(config.factor.max(1.0)).max(config.floor);
        for (phase, longest) in [
            (RankPhase::Evaluate, self.longest_eval),
            (RankPhase::Checkpoint, self.longest_checkpoint),
        ] {
            if self.reports.values().any(|r| r.phase == phase) {
                bound += longest?.mul_f64(config.factor.max(1.0));
            }
        }
        Some(bound)
    }

    /// Names a stall once the step in flight passed its bound, and says abort once a named
    /// stall outlasted `config.timeout`. `ranks` are the generation's workers, by rank.
    pub fn check(
        &mut self,
        config: &StallConfig,
        generation: Generation,
        ranks: &[WorkerId],
        now: Instant,
    ) -> Option<Verdict> {
        let since = self.last_progress?;
        // Nothing is said for a generation whose ranks do not all report where they are (a
        // worker that predates the reports).
        if (0..ranks.len() as u32).any(|r| !self.reports.contains_key(&r)) {
            return None;
        }
        if self.open {
            let stall = self.history.back_mut()?;
            let timeout = config.timeout?;
            if now.saturating_duration_since(stall.named) < timeout {
                return None;
            }
            self.open = false;
            stall.action = StallAction::Aborted;
            return Some(Verdict::Abort(stall.clone()));
        }
        let bound = self.bound(config)?;
        if now.saturating_duration_since(since) <= bound {
            return None;
        }
        // Once per step: a stall already named for this step is not named again.
        let step = self.reports.values().map(|r| r.step).min().unwrap_or(0);
        if self
            .history
            .back()
            .is_some_and(|s| s.generation == generation && s.step == step && s.since == since)
        {
            return None;
        }
        let culprit = name_culprit(ranks, &self.reports);
        let bytes = match &culprit {
            Culprit::Link { to, .. } => self
                .reports
                .get(to)
                .and_then(|r| r.collective)
                .map(|c| c.received + c.sent),
            _ => None,
        };
        let stall = Stall {
            generation,
            step,
            culprit,
            since,
            named: now,
            bound,
            bytes,
            action: StallAction::Named,
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(stall.clone());
        self.open = true;
        Some(Verdict::Named(stall))
    }
}

/// Who holds the others, from the ranks' latest reports (`ranks`: the generation's workers, by
/// rank):
///
/// 1. A rank that began fewer collective calls than another has not reached the call the others
///    wait in: the first such rank outside the collective is the culprit, in its phase.
/// 2. Otherwise every rank behind waits in the same call. In a ring each rank receives the same
///    bytes per call, and a link that stopped starves its receiver first: every rank after it
///    still got what was sent before the wait reached it. So the rank that received the fewest
///    bytes in the call (the longest-waiting on a tie) names the link from the peer it waits on.
///    If that peer is not in the collective itself, the peer is the culprit (it holds a rank
///    whose receive waits on it).
/// 3. Reports missing or without the collective's progress: [`Culprit::Unknown`].
pub fn name_culprit(ranks: &[WorkerId], reports: &BTreeMap<u32, RankReport>) -> Culprit {
    let worker = |rank: u32| ranks.get(rank as usize).cloned();
    let known: Vec<(u32, &RankReport)> = (0..ranks.len() as u32)
        .filter_map(|r| reports.get(&r).map(|report| (r, report)))
        .collect();
    if known.len() != ranks.len() || known.is_empty() {
        return Culprit::Unknown;
    }
    let calls = |r: &RankReport| r.collective.map_or(0, |c| c.calls);
    let fewest = known.iter().map(|(_, r)| calls(r)).min().unwrap_or(0);
    let behind: Vec<&(u32, &RankReport)> =
        known.iter().filter(|(_, r)| calls(r) == fewest).collect();
    let outside = |(rank, r): &&(u32, &RankReport)| {
        (r.phase != RankPhase::Collective).then(|| Culprit::Rank {
            rank: *rank,
            // `known` holds ranks of `ranks` only.
            worker: ranks[*rank as usize].clone(),
            phase: r.phase,
        })
    };
    if behind.len() < known.len() {
        if let Some(culprit) = behind.iter().find_map(outside) {
            return culprit;
        }
    }
    let starved = behind
        .iter()
        .filter(|(_, r)| r.phase == RankPhase::Collective)
        .filter_map(|(rank, r)| {
            let c = r.collective?;
            Some((*rank, c.waiting_for?, c.received, c.waited))
        })
        .min_by(|a, b| a.2.cmp(&b.2).then(b.3.cmp(&a.3)));
    let Some((to, from, _, _)) = starved else {
        // Nobody waits on a peer: all ranks are busy elsewhere, or do not say.
        return Culprit::Unknown;
    };
    match (reports.get(&from), worker(from), worker(to)) {
        (Some(peer), Some(from_worker), _) if peer.phase != RankPhase::Collective => {
            Culprit::Rank {
                rank: from,
                worker: from_worker,
                phase: peer.phase,
            }
        }
        (Some(_), Some(from_worker), Some(to_worker)) => Culprit::Link {
            from,
            from_worker,
            to,
            to_worker,
        },
        _ => Culprit::Unknown,
    }
}

#[cfg(test)]
mod tests;
