//! Stall detection on the wire: a heartbeat's progress as a [`RankReport`], and the stalls seen
//! as the status's `stalls` list (what `dapt status --json` and the dashboard show).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dapt_proto::rpc::{self, Generation};

use crate::control::stall::{Culprit, RankPhase, Stall, StallWatch};
use crate::control::RankReport;

/// The progress a heartbeat carries, or `None` when it says nothing (a worker that predates
/// the field, or one between generations).
pub fn from_heartbeat(h: &rpc::Heartbeat) -> Option<RankReport> {
    use rpc::RankPhase as Wire;
    let phase = match Wire::try_from(h.phase).ok()? {
        Wire::Unspecified => return None,
        Wire::Setup => RankPhase::Setup,
        Wire::Data => RankPhase::Data,
        Wire::Forward => RankPhase::Forward,
        Wire::Backward => RankPhase::Backward,
        Wire::Collective => RankPhase::Collective,
        Wire::Optimizer => RankPhase::Optimizer,
        Wire::Checkpoint => RankPhase::Checkpoint,
        Wire::Evaluate => RankPhase::Evaluate,
    };
    let collective = h
        .collective
        .as_ref()
        .map(|c| crate::control::stall::CollectiveReport {
            calls: c.calls,
            received: c.bytes_received,
            sent: c.bytes_sent,
            waiting_for: c.waiting_for.checked_sub(1),
            // Bounded: a number off the wire must not overflow a clock reading.
            waited: Duration::from_millis(c.waited_ms.min(u64::from(u32::MAX))),
        });
    Some(RankReport {
        generation: Generation(h.generation),
        step: h.step,
        phase,
        collective,
    })
}

/// The stalls seen, oldest first, for the status.
pub fn stalls(watch: &StallWatch) -> Vec<rpc::Stall> {
    let (now, wall) = (Instant::now(), SystemTime::now());
    watch
        .history
        .iter()
        .map(|s| to_wire(s, now, wall))
        .collect()
}

fn to_wire(s: &Stall, now: Instant, wall: SystemTime) -> rpc::Stall {
    let since = wall
        .checked_sub(now.saturating_duration_since(s.since))
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    let (rank, worker, peer, peer_worker) = match &s.culprit {
        Culprit::Rank { rank, worker, .. } => (*rank as i32, worker.0.clone(), -1, String::new()),
        Culprit::Link {
            from,
            from_worker,
            to,
            to_worker,
        } => (
            *from as i32,
            from_worker.0.clone(),
            *to as i32,
            to_worker.0.clone(),
        ),
        Culprit::Unknown => (-1, String::new(), -1, String::new()),
    };
    rpc::Stall {
        generation: s.generation.0,
        step: s.step,
        rank,
        worker,
        peer,
        peer_worker,
        phase: s.culprit.phase().map_or("", RankPhase::name).to_string(),
        since_unix_ms: since,
        action: s.action.name().to_string(),
        description: describe(s),
    }
}

/// The stall as one line: what holds which step, for how long, against which bound.
pub fn describe(s: &Stall) -> String {
    let bytes = s
        .bytes
        .map(|b| format!(", {b} bytes moved in the call"))
        .unwrap_or_default();
    format!(
        "step {} of generation {} held by {} (bound {:.3}s{bytes})",
        s.step,
        s.generation,
        s.culprit,
        s.bound.as_secs_f64()
    )
}

/// The status's stalls as JSON (`dapt status --json`): one object per stall, oldest first.
pub fn stalls_json(stalls: &[rpc::Stall]) -> serde_json::Value {
    stalls.iter().map(stall_json).collect()
}

/// One stall as the JSON object of [`stalls_json`] (and of the dashboard's stalls table).
pub fn stall_json(s: &rpc::Stall) -> serde_json::Value {
    serde_json::json!({
                "generation": s.generation,
                "step": s.step,
                "rank": s.rank,
                "worker": s.worker,
                "peer": s.peer,
                "peer_worker": s.peer_worker,
                "phase": s.phase,
                "since_unix_ms": s.since_unix_ms,
                "action": s.action,
        "description": s.description,
    })
}

/// `s` as the status and the dashboard show it, at this moment.
pub fn stall_now(s: &Stall) -> rpc::Stall {
    to_wire(s, Instant::now(), SystemTime::now())
}

/// The status's stalls for `dapt status`: a header and one line each, or nothing when none.
pub fn render(stalls: &[rpc::Stall]) -> String {
    if stalls.is_empty() {
        return String::new();
    }
    let mut out = format!("stalls ({}):\n", stalls.len());
    for s in stalls {
        out.push_str(&format!("  {}: {}\n", s.action, s.description));
    }
    out
}
