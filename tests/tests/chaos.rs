//! Issues 5 and 18: a seeded chaos run over the real binaries and a real etcd. Faults of five
//! kinds come one after another on a schedule drawn from a seed (printed; `DAPT_TEST_SEED`
//! replays it):
//!
//! - `worker-kill`: SIGKILL a worker; a replacement starts at once;
//! - `worker-hang`: SIGSTOP a worker; it must be found out by its lease and heartbeats expiring
//!   and the job re-formed without it; then it is sent SIGCONT (it must find its way back) or,
//!   by the seed, killed and replaced;
//! - `leader-kill`: SIGKILL the leading coordinator; the standby takes over, a new standby
//!   starts;
//! - `etcd-restart`: SIGKILL etcd, keep it down for 0.5 to 3 s (longer than the 2 s leases at
//!   times), start it again on the same data directory and port;
//! - `partition`: cut the worker that lives in a network namespace off the network (the
//!   `deploy/lab/netns.sh` lab, [`dapt_tests::Net`]), heal it once the job went on without it.
//!   Where namespaces cannot be made (not root, no iptables), a partition becomes a worker-kill
//!   and the test says so.
//!
//! Each fault waits until the previous one is recovered from and the world is whole again
//! (overlapping failures are the property tests' business, `control/proptests.rs`). Afterwards
//! the job has completed, etcd's ledger holds every sample of every step exactly once, the
//! final weights are finite, a step trained twice (after a rollback to the committed
//! checkpoint) shows the same loss both times, and no coordinator logged a control invariant
//! violation. The recovery times are printed as min / median / max per kind of fault:
//!
//! - a worker fault is recovered from when a generation formed after it trains a step;
//! - a leader kill, when the new leader's job trains a step;
//! - an etcd restart, when a commit newer than the last one before the kill is read back
//!   from etcd.
//!
//! CI runs 6 faults over 156 steps (every kind at least once; under 3 minutes on a loaded 2-core
//! machine); `DAPT_CHAOS_LONG=1` runs 24 over 444 steps.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use dapt_proto::job::EtcdSpec;
use dapt_tests::{
    binary, check_entries, coordinator, coordinator_on, events, finite_weights, losses, serial,
    standby, standby_on, test_seed, Cluster, Etcd, Net, Proc, BATCH, LONG,
};

const TTL_S: u64 = 2;
const PREFIX: &str = "/dapt-chaos";
/// How long the world may take to be whole again after a fault is recovered from: a worker
/// that was stopped or cut off must find its way back within it.
const REJOIN: Duration = Duration::from_secs(90);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    WorkerKill,
    WorkerHang,
    LeaderKill,
    EtcdRestart,
    Partition,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::WorkerKill,
        Fault::WorkerHang,
        Fault::LeaderKill,
        Fault::EtcdRestart,
        Fault::Partition,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker-kill",
            Fault::WorkerHang => "worker-hang",
            Fault::LeaderKill => "leader-kill",
            Fault::EtcdRestart => "etcd-restart",
            Fault::Partition => "partition",
        }
    }
}

/// One fault of the schedule: its kind, how many steps to let pass before it, and a number
/// that picks its victim (and, for a hang, whether it is continued or killed; for an etcd
/// restart, how long etcd stays down).
#[derive(Debug, Clone, Copy)]
struct Planned {
    fault: Fault,
    after_steps: u64,
    pick: u64,
}

/// `n` faults, every kind `n / 5` times or more, in a seeded order.
fn schedule(rng: &mut Rng, n: usize) -> Vec<Planned> {
    let mut kinds: Vec<Fault> = Fault::ALL.iter().copied().cycle().take(n).collect();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i as u64 + 1) as usize);
    }
    kinds
        .into_iter()
        .map(|fault| Planned {
            fault,
            after_steps: 3 + rng.below(8),
            pick: rng.below(1 << 16),
        })
        .collect()
}

/// The (step, generation, world) of every step line of `coordinators`, in log order.
fn steps(coordinators: &[Proc]) -> Vec<(u64, u64, u64)> {
    coordinators
        .iter()
        .flat_map(|c| events(&c.lines(), "step"))
        .filter_map(|f| {
            Some((
                f["step"].as_u64()?,
                f["generation"].as_u64()?,
                f["world"].as_u64()?,
            ))
        })
        .collect()
}

fn top_step(coordinators: &[Proc]) -> u64 {
    steps(coordinators).iter().map(|s| s.0).max().unwrap_or(0)
}

fn top_generation(coordinators: &[Proc]) -> u64 {
    steps(coordinators).iter().map(|s| s.1).max().unwrap_or(0)
}

/// Polls `done` every 100 ms until it holds; panics naming `what` after `timeout`.
fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The workers, and where they run: every worker but one listens on the lab's bridge (or on
/// loopback without a lab); the one in `netns`, if any, runs on the lab's host 0, which a
/// partition cuts off.
struct Workers<'a> {
    live: BTreeMap<String, Proc>,
    next_id: u32,
    net: Option<&'a Net>,
    /// The worker on host 0.
    netns: Option<String>,
    host: String,
}

impl Workers<'_> {
    fn start(&mut self, c: &Cluster) {
        let id = format!("w{}", self.next_id);
        self.next_id += 1;
        let cmd = match self.net {
            Some(net) if self.netns.is_none() => {
                self.netns = Some(id.clone());
                net.worker_command(0, 0)
            }
            _ => {
                let mut cmd = Command::new(binary("dapt-worker"));
                cmd.args(["--listen", &format!("{}:0", self.host)]);
                cmd
            }
        };
        self.live.insert(id.clone(), c.member_from(cmd, &id));
    }

    /// Takes the worker `pick` names out of the live ones; says whether it ran on host 0.
    fn take(&mut self, pick: u64) -> (String, Proc, bool) {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        let id = ids[pick as usize % ids.len()].clone();
        let proc = self.live.remove(&id).expect("a live worker");
        let on_host_0 = self.netns.as_deref() == Some(id.as_str());
        if on_host_0 {
            self.netns = None;
        }
        (id, proc, on_host_0)
    }

    /// Puts back a worker that [`Workers::take`] took.
    fn put_back(&mut self, id: String, proc: Proc, on_host_0: bool) {
        if on_host_0 {
            self.netns = Some(id.clone());
        }
        self.live.insert(id, proc);
    }
}

fn ledger_top(runtime: &tokio::runtime::Runtime, spec: &EtcdSpec) -> Option<u64> {
    runtime
        .block_on(dapt_coordinator::etcd::ledger(spec, "chaos"))
        .ok()
        .and_then(|entries| entries.iter().map(|e| e.step).max())
}

/// min / median / max of `times`, in seconds.
fn summary(times: &[Duration]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (s[0], median, s[s.len() - 1])
}

#[test]
fn chaos_of_five_kinds_of_fault_loses_and_repeats_nothing() {
    let seed = test_seed();
    let long = std::env::var("DAPT_CHAOS_LONG").is_ok_and(|v| v == "1");
    let n = if long { 24 } else { 6 };
    // Mixed first, so that neighbouring seeds draw different schedules.
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let plan = schedule(&mut rng, n);
    // Room for every fault: the steps before it, the rollback after it, and the rejoin. The
    // steps go on while a lost rank rejoins (min_workers is 1), so a fast machine trains more
    // of them per fault: 16 per fault was too few for a leader kill once (36 steps).
    let total = 60 + 40 * n as u64;
    println!(
        "chaos seed {seed} (replay with DAPT_TEST_SEED={seed}), {n} faults over {total} steps: {:?}",
        plan.iter().map(|p| p.fault.name()).collect::<Vec<_>>()
    );

    let _serial = serial();
    let net = match Net::new(1) {
        Ok(net) => Some(net),
        Err(why) => {
            println!(
                "partitions become worker kills: network namespaces cannot be made here: {why}"
            );
            None
        }
    };
    let host = net.as_ref().map_or("127.0.0.1".to_string(), Net::gateway);
    let mut etcd = Etcd::start_on(&host);
    let spec = EtcdSpec {
        endpoints: vec![etcd.url.clone()],
        prefix: PREFIX.into(),
        lease_ttl_s: TTL_S,
        user: None,
        password_env: None,
        tls: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = format!(
        "cluster:\n  min_workers: 1\n  max_workers: 3\n  heartbeat_ms: 200\n  session_timeout_ms: 2000\n  formation_grace_ms: 1000\n  abort_timeout_ms: 3000\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: {PREFIX}\n    lease_ttl_s: {TTL_S}\n",
        etcd.url
    );
    let mut c = coordinator_on(dir.path(), "chaos", total, &cluster, &host);
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    // Every coordinator process that ever ran, in start order; `leader` indexes the one that
    // leads, `leader + 1` the standby.
    let mut coordinators: Vec<Proc> = vec![std::mem::replace(
        &mut c.coordinator,
        Proc::spawn(Command::new("true")),
    )];
    let mut leader = 0;
    let (proc, mut standby_url) = standby_on(&c, &host);
    coordinators.push(proc);
    let mut workers = Workers {
        live: BTreeMap::new(),
        next_id: 0,
        net: net.as_ref(),
        netns: None,
        host: host.clone(),
    };
    for _ in 0..3 {
        workers.start(&c);
    }

    let mut recoveries: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let started = Instant::now();
    for (i, p) in plan.iter().enumerate() {
        let fault = match p.fault {
            Fault::Partition if workers.netns.is_none() => Fault::WorkerKill,
            f => f,
        };
        // The world is whole, then `after_steps` more steps.
        wait("a world of 3", REJOIN, || {
            steps(&coordinators[leader..])
                .last()
                .is_some_and(|s| s.2 == 3)
        });
        let at = top_step(&coordinators) + p.after_steps;
        assert!(
            at + 20 < total,
            "seed {seed}: fault {i} would come at step {at} of {total}: the run is too short for its schedule"
        );
        wait(&format!("step {at}"), LONG, || {
            top_step(&coordinators) >= at
        });
        let generation = top_generation(&coordinators);
        let injected = Instant::now();
        let reformed = |coordinators: &[Proc]| top_generation(coordinators) > generation;
        let what = match fault {
            Fault::WorkerKill => {
                let (id, victim, _) = workers.take(p.pick);
                victim.signal(libc::SIGKILL);
                drop(victim);
                workers.start(&c);
                wait("a re-formation without the killed worker", LONG, || {
                    reformed(&coordinators)
                });
                format!("SIGKILL worker {id}")
            }
            Fault::WorkerHang => {
                let (id, victim, on_host_0) = workers.take(p.pick);
                victim.signal(libc::SIGSTOP);
                wait("a re-formation without the stopped worker", LONG, || {
                    reformed(&coordinators)
                });
                if p.pick % 3 == 0 {
                    victim.signal(libc::SIGKILL);
                    drop(victim);
                    workers.start(&c);
                    format!("SIGSTOP worker {id}, then SIGKILL")
                } else {
                    victim.signal(libc::SIGCONT);
                    workers.put_back(id.clone(), victim, on_host_0);
                    format!("SIGSTOP worker {id}, then SIGCONT")
                }
            }
            Fault::Partition => {
                let id = workers.netns.clone().expect("a worker on host 0");
                let net = net.as_ref().expect("the lab");
                net.cut(0);
                wait("a re-formation without the cut-off worker", LONG, || {
                    reformed(&coordinators)
                });
                std::thread::sleep(Duration::from_millis(200 + p.pick % 1800));
                net.heal(0);
                format!("cut worker {id} off the network, healed")
            }
            Fault::LeaderKill => {
                coordinators[leader].signal(libc::SIGKILL);
                leader += 1;
                let new = &mut coordinators[leader];
                new.wait_for("the standby to lead", LONG, |l| {
                    !events(l, "leading the job").is_empty()
                });
                new.wait_for("the new leader's first step", LONG, |l| {
                    !events(l, "step").is_empty()
                });
                c.url = standby_url.clone();
                let (proc, url) = standby_on(&c, &host);
                coordinators.push(proc);
                standby_url = url;
                "SIGKILL the leading coordinator".to_string()
            }
            Fault::EtcdRestart => {
                let before = ledger_top(&runtime, &spec);
                let injected = Instant::now();
                etcd.kill();
                let down = Duration::from_millis(500 + p.pick % 2500);
                std::thread::sleep(down);
                etcd.restart();
                let back = injected.elapsed();
                wait("a commit recorded after the etcd restart", LONG, || {
                    ledger_top(&runtime, &spec) > before
                });
                format!("SIGKILL etcd, restarted after {back:.1?}")
            }
        };
        let took = injected.elapsed();
        println!(
            "fault {}/{n} ({}) at step {at}, generation {generation}: {what}; recovered in {took:.2?}",
            i + 1,
            fault.name()
        );
        recoveries.entry(fault).or_default().push(took);
    }
    let chaos_took = started.elapsed();

    let (status, stdout) = coordinators[leader].finish(LONG);
    assert!(
        status.success(),
        "seed {seed}: {}",
        coordinators[leader].stderr()
    );
    assert!(stdout.contains("job completed"), "{stdout}");
    for (id, w) in workers.live.iter_mut() {
        let (status, _) = w.finish(LONG);
        assert!(status.success(), "seed {seed}: worker {id}: {}", w.stderr());
    }

    // Every sample of every step, exactly once, in etcd's ledger.
    let entries = runtime
        .block_on(dapt_coordinator::etcd::ledger(&spec, "chaos"))
        .expect("ledger");
    let entries = entries.iter().map(|e| (e.step, e.start, e.end)).collect();
    check_entries(entries, total * BATCH).unwrap_or_else(|e| panic!("seed {seed}: ledger: {e}"));

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
        last.ends_with(format!("step-{total:08}")),
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
        "chaos seed {seed}: {n} faults in {chaos_took:.0?}; {} steps logged ({repeated} retrained after a rollback), {generations} generations formed, loss {first:.3} -> {end:.3}",
        seen.len(),
    );
    println!("recovery times (s):\n| fault | n | min | median | max |\n|---|---|---|---|---|");
    for (fault, times) in &recoveries {
        let (min, median, max) = summary(times);
        println!(
            "| {} | {} | {min:.2} | {median:.2} | {max:.2} |",
            fault.name(),
            times.len()
        );
    }
    // Every step of the job was trained (and logged) at least once.
    assert_eq!(seen.len() as u64, total, "seed {seed}");
}

/// Found by the chaos run (every seed of the long one, at the first leader kill after an etcd
/// restart): a standby coordinator exited on etcd's first refused connection ("tcp connect
/// error"), so after an etcd restart no standby was left to take over from a leader that died
/// next. A standby now rides the outage out and leads when the leader dies.
#[test]
fn a_standby_rides_out_an_etcd_restart_and_takes_over_afterwards() {
    let _serial = serial();
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = format!(
        "cluster:\n  min_workers: 1\n  max_workers: 1\n  session_timeout_ms: 2000\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: {PREFIX}\n    lease_ttl_s: {TTL_S}\n",
        etcd.url
    );
    let mut c = coordinator(dir.path(), "standby-outage", 60, &cluster);
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let (mut second, _) = standby(&c);
    let mut w = c.member("w0");
    c.wait_step(5);
    etcd.kill();
    // Longer than the standby's 200 ms rounds and the leases' TTL.
    std::thread::sleep(Duration::from_millis(2500));
    etcd.restart();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        second.child.try_wait().expect("try_wait").is_none(),
        "the standby exited in the etcd outage:\n{}",
        second.stderr()
    );
    c.coordinator.signal(libc::SIGKILL);
    second.wait_for("the standby to lead", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let (status, stdout) = second.finish(LONG);
    assert!(status.success(), "{}", second.stderr());
    assert!(stdout.contains("job completed"), "{stdout}");
    let (status, _) = w.finish(LONG);
    assert!(status.success(), "{}", w.stderr());
}
