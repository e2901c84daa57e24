//! All-reduce bandwidth of the TCP ring between worker processes on this machine (loopback),
//! against Gloo (torch.distributed, `benches/gloo_allreduce.py`) in the same run, alternating.
//!
//! ```text
//! cargo bench -p dapt-worker --bench allreduce                        # 2 and 4 ranks, 1..256 MiB
//! cargo bench -p dapt-worker --bench allreduce -- ranks=2 sizes=16,64 chunk=4194304 gloo=no
//! DAPT_TORCH_PYTHON=/path/to/venv/bin/python ...                      # Gloo's interpreter
//! DAPT_GLOO_SCRIPT=/path/to/gloo_allreduce.py ...                     # default ../benches/
//! ```
//!
//! Each rank is its own process (this binary re-executed with `DAPT_ALLREDUCE_RANK` set), as
//! the real workers are: it binds port 0, prints its address, reads everyone's from stdin,
//! connects the ring, and per size runs 2 warm-up calls and then `clamp(1 GiB / size, 5, 100)`
//! timed ones after a barrier. A size's time is the slowest rank's mean per call;
//! algbw = bytes / time and busbw = algbw * 2(n-1)/n (nccl-tests' definitions, GB = 1e9 B).
//! It measures and prints; it asserts nothing about speed.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dapt_worker::collective::{AbortHandle, Collective, RingConfig, TcpRing};

const MIB: usize = 1 << 20;
const WARMUP: usize = 2;

fn timed_iters(bytes: usize) -> usize {
    ((1usize << 30) / bytes.max(1)).clamp(5, 100)
}

struct Options {
    ranks: Vec<usize>,
    sizes_mib: Vec<usize>,
    chunk_bytes: usize,
    gloo: bool,
}

fn options() -> Options {
    let mut o = Options {
        ranks: vec![2, 4],
        sizes_mib: vec![1, 4, 16, 64, 256],
        chunk_bytes: RingConfig::DEFAULT_CHUNK_BYTES,
        gloo: true,
    };
    let list =
        |v: &str| -> Vec<usize> { v.split(',').map(|x| x.parse().expect("a number")).collect() };
    // cargo passes `--bench`; options are key=value.
    for arg in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        match arg.split_once('=') {
            Some(("ranks", v)) => o.ranks = list(v),
            Some(("sizes", v)) => o.sizes_mib = list(v),
            Some(("chunk", v)) => o.chunk_bytes = v.parse().expect("chunk bytes"),
            Some(("gloo", v)) => o.gloo = v != "no",
            _ => panic!("unknown argument {arg:?} (ranks=2,4 sizes=1,4 chunk=BYTES gloo=no)"),
        }
    }
    o
}

fn main() {
    if let Ok(rank) = std::env::var("DAPT_ALLREDUCE_RANK") {
        run_rank(rank.parse().expect("DAPT_ALLREDUCE_RANK"));
        return;
    }
    let o = options();
    let gloo = o.gloo.then(gloo_command).flatten();
    println!("load before: {}", loadavg());
    println!(
        "chunk_bytes {}, gloo: {}",
        o.chunk_bytes,
        if gloo.is_some() { "yes" } else { "no" }
    );
    println!();
    println!("| ranks | size | dapt ms | dapt algbw GB/s | dapt busbw GB/s | gloo busbw GB/s | dapt/gloo |");
    println!("|---|---|---|---|---|---|---|");
    for &n in &o.ranks {
        for &mib in &o.sizes_mib {
            let load = loadavg();
            let dapt = run_dapt(n, mib, o.chunk_bytes);
            let gloo_busbw = gloo
                .as_ref()
                .map(|(py, script)| run_gloo(py, script, n, mib));
            let bytes = (mib * MIB) as f64;
            let algbw = bytes / dapt / 1e9;
            let busbw = algbw * 2.0 * (n - 1) as f64 / n as f64;
            let (gloo_cell, ratio) = match gloo_busbw {
                Some(g) => (format!("{g:.2}"), format!("{:.2}x", busbw / g)),
                None => ("-".into(), "-".into()),
            };
            println!(
                "| {n} | {mib} MiB | {:.2} | {algbw:.2} | {busbw:.2} | {gloo_cell} | {ratio} |  load {load}",
                dapt * 1e3
            );
        }
    }
    println!();
    println!("load after: {}", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Runs one size on `n` rank processes; returns the slowest rank's seconds per call.
fn run_dapt(n: usize, mib: usize, chunk_bytes: usize) -> f64 {
    let exe = std::env::current_exe().expect("exe");
    let mut children: Vec<Child> = (0..n)
        .map(|rank| {
            Command::new(&exe)
                .env("DAPT_ALLREDUCE_RANK", rank.to_string())
                .env("DAPT_ALLREDUCE_WORLD", n.to_string())
                .env("DAPT_ALLREDUCE_MIB", mib.to_string())
                .env("DAPT_ALLREDUCE_CHUNK", chunk_bytes.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    let mut outputs: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("stdout")))
        .collect();
    let addrs: Vec<String> = outputs
        .iter_mut()
        .map(|out| {
            let mut line = String::new();
            out.read_line(&mut line).expect("rank address");
            line.trim().to_owned()
        })
        .collect();
    for child in &mut children {
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{}", addrs.join(",")).expect("send peers");
    }
    let slowest = outputs
        .iter_mut()
        .map(|out| {
            let mut line = String::new();
            out.read_line(&mut line).expect("rank result");
            line.trim()
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("rank result {line:?}"))
        })
        .fold(0.0, f64::max);
    for mut child in children {
        assert!(child.wait().expect("wait").success(), "a rank failed");
    }
    slowest
}

/// One rank process: bind, publish the address, learn the peers, connect, time the calls.
fn run_rank(rank: usize) {
    let var = |k: &str| -> usize { std::env::var(k).expect(k).parse().expect(k) };
    let (world, mib, chunk_bytes) = (
        var("DAPT_ALLREDUCE_WORLD"),
        var("DAPT_ALLREDUCE_MIB"),
        var("DAPT_ALLREDUCE_CHUNK"),
    );
    // Every rank process derives the same ring key from the same (benchmark) token.
    let key = dapt_proto::auth::Key::ring("allreduce-bench", "bench");
    let listener = TcpRing::bind("127.0.0.1:0".parse().expect("addr"), key).expect("bind");
    println!("{}", listener.local_addr());
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("peers");
    let peers: Vec<SocketAddr> = line
        .trim()
        .split(',')
        .map(|a| a.parse().expect("peer"))
        .collect();
    let cfg = RingConfig {
        rank,
        world,
        peers,
        generation: 1,
        timeout: Duration::from_secs(30),
        chunk_bytes,
    };
    let mut ring = listener.connect(cfg, AbortHandle::new()).expect("connect");
    let len = mib * MIB / 4;
    let mut buf: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 + rank as f32).collect();
    for _ in 0..WARMUP {
        ring.all_reduce_mean(&mut buf).expect("warm-up");
    }
    ring.all_reduce_mean(&mut [0.0; 1]).expect("barrier");
    let iters = timed_iters(mib * MIB);
    let started = Instant::now();
    for _ in 0..iters {
        ring.all_reduce_mean(&mut buf).expect("all-reduce");
    }
    let per_call = started.elapsed().as_secs_f64() / iters as f64;
    assert!(buf.iter().all(|x| x.is_finite()));
    println!("{per_call}");
}

/// The interpreter with torch and the Gloo script, if both are there.
fn gloo_command() -> Option<(String, PathBuf)> {
    let python = std::env::var("DAPT_TORCH_PYTHON").ok().or_else(|| {
        Path::new("/work/venv-torch/bin/python")
            .is_file()
            .then(|| "/work/venv-torch/bin/python".to_owned())
    })?;
    let script = std::env::var_os("DAPT_GLOO_SCRIPT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/gloo_allreduce.py"),
        PathBuf::from,
    );
    script.is_file().then_some((python, script))
}

/// Gloo's busbw for one size, from the script's JSON line.
fn run_gloo(python: &str, script: &Path, n: usize, mib: usize) -> f64 {
    let out = Command::new(python)
        .arg(script)
        .args(["--ranks", &n.to_string(), "--sizes", &mib.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .args(["--iters", &timed_iters(mib * MIB).to_string()])
        .output()
        .expect("gloo script");
    let text = String::from_utf8_lossy(&out.stdout);
    let busbw = text.lines().find_map(|l| {
        let rest = l.split("\"busbw_gbs\":").nth(1)?;
        rest.trim_start()
            .split([',', '}'])
            .next()?
            .trim()
            .parse::<f64>()
            .ok()
    });
    busbw.unwrap_or_else(|| {
        panic!(
            "gloo output: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
