//! Coordinator scale: N simulated workers (gRPC clients that join, heartbeat, confirm aborts and
//! never train) against the real `dapt coordinator` binary with embedded membership. Measures
//! the time to form a generation of N, the coordinator's CPU time and memory per member, and the
//! time to re-form after one member is lost (from its session ending to the last survivor's new
//! assignment).
//!
//! Each size runs twice: with one loopback address and one connection per member (`127.1.x.y`,
//! as on a cluster, where each node has its own address), and with every member on
//! 127.0.0.1, multiplexed over a connection per 128 members (as `dapt launch --workers N` on
//! one machine; the coordinator takes at most 16 not-yet-joined sessions per address, so the
//! members beyond that are refused and try again, as a real worker does).
//!
//! Run: `cargo build --release --bins && cargo bench -p dapt-tests --bench coordinator_scale`
//! (sizes with DAPT_SCALE_SIZES=64,256,1024).

use std::process::Command;
use std::time::{Duration, Instant};

use dapt_proto::rpc::{self, coordinator_message, worker_message::Kind, WorkerMessage};
use dapt_tests::{binary, events, free_port, Proc};
use tokio::sync::mpsc;

/// The job's token (a coordinator takes no fewer than 32 characters).
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn main() {
    let sizes: Vec<usize> = std::env::var("DAPT_SCALE_SIZES")
        .unwrap_or_else(|_| "64,256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("| members | addresses | form (ms) | coordinator CPU (ms) | CPU per member (µs) | RSS growth (KiB) | per member (KiB) | re-form after a loss (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    for n in sizes {
        for shared in [false, true] {
            let r = runtime.block_on(run(n, shared));
            let addresses = if shared {
                "1 (127.0.0.1)"
            } else {
                "one per member"
            };
            println!(
                "| {n} | {addresses} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {:.0} |",
                r.form.as_secs_f64() * 1e3,
                r.cpu.as_secs_f64() * 1e3,
                r.cpu.as_secs_f64() * 1e6 / n as f64,
                r.rss_kib,
                r.rss_kib as f64 / n as f64,
                r.reform.as_secs_f64() * 1e3,
            );
        }
    }
}

struct Result {
    form: Duration,
    cpu: Duration,
    rss_kib: i64,
    reform: Duration,
}

/// (utime + stime, VmRSS KiB) of process `pid`.
fn usage(pid: u32) -> (Duration, i64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (Duration::from_millis(ticks * 1000 / hz), rss)
}

/// One formation of `n` members; `shared`: all from 127.0.0.1 (else one address each).
async fn run(n: usize, shared: bool) -> Result {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("scale.yaml");
    std::fs::write(
        &job,
        format!(
            "job: scale\ncorpus:\n  output: {0}/corpus\n  sources:\n    - name: d\n      role: domain\n      paths: [x]\n      weight: 1\ntraining:\n  seq_len: 8\n  global_batch: 4096\n  tokens: 327680000\ncheckpoint:\n  dir: {0}/ck\ncluster:\n  min_workers: 1\n  max_workers: {n}\n  formation_grace_ms: 600000\n  heartbeat_ms: 1000\n  session_timeout_ms: 60000\n",
            dir.path().display()
        ),
    )
    .expect("job");
    let port = free_port();
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "coordinator"])
        .arg(&job)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("DAPT_TOKEN", TOKEN)
        .env("RUST_LOG", "warn,dapt_coordinator::server=info");
    let mut coordinator = Proc::spawn(cmd);
    coordinator.wait_for("listening", Duration::from_secs(30), |l| {
        !events(l, "coordinator listening").is_empty()
    });
    let pid = coordinator.child.id();
    let url = format!("http://127.0.0.1:{port}");
    let endpoint = tonic::transport::Endpoint::from_shared(url).expect("url");
    // Shared: a few connections from 127.0.0.1, each multiplexing many sessions, made before
    // the clock starts. Else each member connects from its own address once started.
    let mut channels = Vec::new();
    if shared {
        for _ in 0..n.div_ceil(128) {
            channels.push(endpoint.clone().connect().await.expect("connect"));
        }
    }
    let (before_cpu, before_rss) = usage(pid);
    let (assigned_tx, mut assigned) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let started = Instant::now();
    let mut leave = Vec::new();
    for i in 0..n {
        let channel = if shared {
            channels[i % channels.len()].clone()
        } else {
            endpoint
                .clone()
                .local_address(Some(member_address(i)))
                .connect_lazy()
        };
        let assigned_tx = assigned_tx.clone();
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        leave.push(stop_tx);
        tokio::spawn(simulated_worker(i, channel, assigned_tx, stop));
    }
    let mut first_generation = 0;
    let mut count = 0;
    while count < n {
        let Ok(Some((_, generation, _))) =
            tokio::time::timeout(Duration::from_secs(120), assigned.recv()).await
        else {
            panic!(
                "no formation of {n} in 2 minutes:\n{}",
                coordinator.stderr()
            );
        };
        first_generation = generation;
        count += 1;
    }
    let form = started.elapsed();
    let (after_cpu, after_rss) = usage(pid);
    // Lose one member: its session ends.
    let lost_at = Instant::now();
    drop(leave.remove(0));
    let mut reassigned = 0;
    while reassigned < n - 1 {
        let Ok(Some((_, generation, _))) =
            tokio::time::timeout(Duration::from_secs(120), assigned.recv()).await
        else {
            panic!(
                "no re-formation of {} in 2 minutes:\n{}",
                n - 1,
                coordinator.stderr()
            );
        };
        if generation > first_generation {
            reassigned += 1;
        }
    }
    let reform = lost_at.elapsed();
    drop(leave);
    coordinator.signal(libc::SIGKILL);
    Result {
        form,
        cpu: after_cpu.saturating_sub(before_cpu),
        rss_kib: after_rss - before_rss,
        reform,
    }
}

/// Member `i`'s own loopback address: 127.1.x.y (Linux answers for all of 127.0.0.0/8).
fn member_address(i: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::from(0x7f01_0001_u32 + i as u32).into()
}

async fn simulated_worker(
    i: usize,
    channel: tonic::transport::Channel,
    assigned: mpsc::UnboundedSender<(usize, u64, Instant)>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut client = rpc::CoordinatorClient::new(channel);
    let join = rpc::Join {
        job: "scale".into(),
        worker_id: format!("sim-{i:05}"),
        devices: vec!["cpu".into()],
        version: rpc::VERSION.into(),
        collective_endpoint: format!("127.0.0.1:{}", 10000 + i),
        attach_generation: 0,
        attach_rank: 0,
        proof: Vec::new(),
    };
    let key = dapt_proto::auth::Key::control(TOKEN);
    // A thousand sessions joining at once exceed the coordinator's cap on sessions that have not
    // joined yet: those refused try again, as a real worker does.
    let session = loop {
        match dapt_proto::join::open(&mut client, &key, join.clone()).await {
            Ok(session) => break session,
            Err(e) if !e.is_final() => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                eprintln!("session {i}: {e}");
                return;
            }
        }
    };
    let send = move |k| {
        let _ = session.outbound.send(WorkerMessage { kind: Some(k) });
    };
    let mut inbound = session.inbound;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = heartbeat.tick() => send(Kind::Heartbeat(rpc::Heartbeat { generation: 0, step: 0, ..Default::default() })),
            m = inbound.message() => match m {
                Ok(Some(rpc::CoordinatorMessage { kind: Some(kind) })) => match kind {
                    coordinator_message::Kind::Assign(a) => {
                        let _ = assigned.send((i, a.generation, Instant::now()));
                    }
                    coordinator_message::Kind::Abort(a) => {
                        send(Kind::Aborted(rpc::Aborted { generation: a.generation }));
                    }
                    _ => {}
                },
                Ok(Some(_)) => {}
                _ => return,
            },
        }
    }
}
