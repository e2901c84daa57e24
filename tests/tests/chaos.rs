//! Issue 5, scenario 5: a seeded chaos run. Over a few hundred steps, workers and the leading
//! coordinator are killed with SIGKILL at random steps (the schedule and its seed are printed;
//! `DAPT_TEST_SEED` replays it), replacements start, and afterwards the job has completed, the
//! etcd ledger holds every sample of every step exactly once, the final weights are finite and
//! the loss is continuous across recoveries: a step trained twice (after a rollback to the
//! committed checkpoint) shows the same loss both times.

use std::collections::BTreeMap;
use std::time::Duration;

use dapt_proto::job::EtcdSpec;
use dapt_tests::{
    check_entries, coordinator, events, finite_weights, losses, serial, standby, test_seed,
    Cluster, Etcd, Proc, BATCH, LONG,
};

const TTL_S: u64 = 2;
const STEPS: u64 = 400;
const EVENTS: usize = 8;

/// xorshift64: enough for a schedule, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// SIGKILL a worker (picked at random among the live ones) and start a new one.
    Worker(u64),
    /// SIGKILL the leading coordinator; the standby takes over, a new standby starts.
    Leader,
}

/// The highest step any of `coordinators` logged.
fn top_step(coordinators: &[Proc]) -> u64 {
    coordinators
        .iter()
        .flat_map(|c| events(&c.lines(), "step"))
        .filter_map(|f| f["step"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn chaos_kills_workers_and_coordinators_and_nothing_is_lost_or_repeated() {
    let seed = test_seed();
    let mut rng = Rng(seed | 1);
    // Kill points spread over the run, at least 12 steps apart so that each recovery is done
    // before the next kill (overlapping failures are the recovery tests' business).
    let mut at: Vec<u64> = Vec::new();
    while at.len() < EVENTS {
        let step = 8 + rng.below(STEPS - 30);
        if at.iter().all(|a| a.abs_diff(step) >= 12) {
            at.push(step);
        }
    }
    at.sort_unstable();
    let schedule: Vec<(u64, Kill)> = at
        .into_iter()
        .map(|step| {
            let kill = if rng.below(3) == 0 {
                Kill::Leader
            } else {
                Kill::Worker(rng.below(1 << 16))
            };
            (step, kill)
        })
        .collect();
    println!("chaos seed {seed} (replay with DAPT_TEST_SEED={seed}); schedule {schedule:?}");

    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let cluster = format!(
        "cluster:\n  min_workers: 1\n  max_workers: 3\n  session_timeout_ms: 5000\n  formation_grace_ms: 1500\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: /dapt-chaos\n    lease_ttl_s: {TTL_S}\n",
        etcd.url
    );
    let mut c = coordinator(dir.path(), "chaos", STEPS, &cluster);
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    // Every coordinator process that ever ran, in start order; `leader` indexes the one that
    // leads (or will, once the previous one is killed).
    let mut coordinators: Vec<Proc> = Vec::new();
    let first = std::mem::replace(
        &mut c.coordinator,
        Proc::spawn(std::process::Command::new("true")),
    );
    coordinators.push(first);
    let mut leader = 0;
    // URLs of the coordinators that have not led yet: a new worker joins the current leader.
    let mut next_urls = std::collections::VecDeque::new();
    let (proc, url) = standby(&c);
    coordinators.push(proc);
    next_urls.push_back(url);
    let mut workers: BTreeMap<String, Proc> = BTreeMap::new();
    let mut next_id = 0;
    let start_worker = |c: &Cluster, workers: &mut BTreeMap<String, Proc>, next_id: &mut u32| {
        let id = format!("w{next_id}");
        *next_id += 1;
        workers.insert(id.clone(), c.member(&id));
    };
    for _ in 0..3 {
        start_worker(&c, &mut workers, &mut next_id);
    }

    for (step, kill) in &schedule {
        let deadline = std::time::Instant::now() + LONG;
        while top_step(&coordinators) < *step {
            assert!(
                std::time::Instant::now() < deadline,
                "stuck before step {step}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        match kill {
            Kill::Worker(pick) => {
                let ids: Vec<String> = workers.keys().cloned().collect();
                let id = ids[*pick as usize % ids.len()].clone();
                let victim = workers.remove(&id).expect("worker");
                victim.signal(libc::SIGKILL);
                println!("step {step}: killed worker {id}");
                start_worker(&c, &mut workers, &mut next_id);
            }
            Kill::Leader => {
                coordinators[leader].signal(libc::SIGKILL);
                println!("step {step}: killed the leading coordinator");
                leader += 1;
                coordinators[leader].wait_for("the standby to lead", LONG, |l| {
                    !events(l, "leading the job").is_empty()
                });
                c.url = next_urls.pop_front().expect("the standby's URL");
                let (proc, url) = standby(&c);
                coordinators.push(proc);
                next_urls.push_back(url);
            }
        }
    }

    let (status, stdout) = coordinators[leader].finish(LONG);
    assert!(
        status.success(),
        "seed {seed}: {}",
        coordinators[leader].stderr()
    );
    assert!(stdout.contains("job completed"), "{stdout}");
    for (_, w) in workers.iter_mut() {
        let (status, _) = w.finish(LONG);
        assert!(status.success(), "seed {seed}: {}", w.stderr());
    }

    // Every sample of every step, exactly once, in etcd's ledger.
    let spec = EtcdSpec {
        endpoints: vec![etcd.url.clone()],
        prefix: "/dapt-chaos".into(),
        lease_ttl_s: TTL_S,
        user: None,
        password_env: None,
        tls: None,
    };
    let entries = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(dapt_coordinator::etcd::ledger(&spec, "chaos"))
        .expect("ledger");
    let entries = entries.iter().map(|e| (e.step, e.start, e.end)).collect();
    check_entries(entries, STEPS * BATCH).unwrap_or_else(|e| panic!("seed {seed}: ledger: {e}"));

    // The final weights.
    let last = std::fs::read_dir(&c.job.checkpoints)
        .expect("checkpoints")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .max()
        .expect("a checkpoint");
    assert!(
        last.ends_with(format!("step-{STEPS:08}")),
        "{}",
        last.display()
    );
    let values = finite_weights(&last.join("model.safetensors"))
        .unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", last.display()));
    assert!(values > 0);

    // The loss across recoveries: one curve. Steps retrained after a rollback must repeat
    // their loss (the data of a step does not depend on who trains it, and the weights are
    // the committed ones), and the curve ends well below where it started.
    let mut seen: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for proc in &coordinators {
        for (step, loss) in losses(&proc.lines()) {
            assert!(loss.is_finite(), "seed {seed}: step {step} loss {loss}");
            seen.entry(step).or_default().push(loss);
        }
    }
    let repeated = seen.values().filter(|l| l.len() > 1).count();
    for (step, l) in &seen {
        let (lo, hi) = l
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(
            hi - lo <= 1e-3 * hi.abs().max(1.0),
            "seed {seed}: step {step} trained twice with losses {l:?}"
        );
    }
    let first = seen.values().next().expect("steps")[0];
    let end = seen.values().next_back().expect("steps")[0];
    assert!(end < first - 1.0, "seed {seed}: loss {first} -> {end}");
    let generations = coordinators
        .iter()
        .flat_map(|c| events(&c.lines(), "generation formed"))
        .count();
    println!(
        "chaos seed {seed}: {} steps logged ({} retrained after a rollback), {generations} generations formed, loss {first:.3} -> {end:.3}",
        seen.len(),
        repeated
    );
    // Every step of the job was trained (and logged) at least once.
    assert_eq!(seen.len() as u64, STEPS, "seed {seed}");
}
