//! A stranger on the network, with no token, against the real binaries (issue 14; the
//! reproductions `01_control_plane_auth.sh` and `04_ring_hijack.sh`): it cannot take a rank's
//! place on the collective ring, hears nothing about the job before it proves the token (no job
//! file, no job name, no status), and silent connections or sessions do not stall the job, nor
//! does a flood of them from another address.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dapt_proto::auth::Key;
use dapt_proto::rpc::{
    self, coordinator_message, worker_message::Kind, CoordinatorMessage, WorkerMessage,
};
use dapt_tests::{
    binary, check_ledger, coordinator, events, free_port, serial, Cluster, Proc, BATCH, LONG,
};

const MAGIC: u64 = u64::from_le_bytes(*b"dapt-rng");

/// A worker of `c` whose collective listens on `127.0.0.1:port`.
fn member_on(c: &Cluster, id: &str, port: u16) -> Proc {
    let mut cmd = Command::new(binary("dapt-worker"));
    cmd.args(["--log-format", "json", "--coordinator", &c.url, "--id", id])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("DAPT_JOB", c.job_name())
        .env("DAPT_TOKEN", &c.token)
        .env("RAYON_NUM_THREADS", "1");
    Proc::spawn(cmd)
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Waits until something listens on `port`.
fn listening(port: u16) {
    let deadline = Instant::now() + LONG;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The coordinator's port.
fn port_of(c: &Cluster) -> u16 {
    c.url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// Waits for the job to end and returns whether it completed, with the coordinator's lines.
fn outcome(c: &mut Cluster) -> (bool, Vec<serde_json::Value>) {
    c.coordinator.wait_for("the job to end", LONG, |l| {
        !events(l, "job completed").is_empty() || !events(l, "job failed").is_empty()
    });
    let lines = c.coordinator.lines();
    (!events(&lines, "job completed").is_empty(), lines)
}

#[test]
fn strangers_on_the_collective_ports_cannot_take_a_rank_and_hear_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 12;
    let mut c = coordinator(
        dir.path(),
        "hijack",
        steps,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n  formation_grace_ms: 1500\n  collective_timeout_s: 10\n",
    );
    let ports = [free_port(), free_port()];
    let _w0 = member_on(&c, "w0", ports[0]);
    let _w1 = member_on(&c, "w1", ports[1]);
    ports.iter().for_each(|&p| listening(p));
    // Before the first generation forms: at each port, the HELLO a left neighbour of either
    // rank would send for generations 1 to 6 (the ranks and generations are easy to guess),
    // followed by a call header and poison floats; and full-length handshakes that go on with
    // a made-up proof.
    let mut strangers = Vec::new();
    for &port in &ports {
        for generation in 1..=6 {
            for (from, to) in [(1, 0), (0, 1)] {
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                let mut hello = words(&[MAGIC, 1, generation, 2, from, to]);
                hello.extend(words(&[MAGIC, 0, 893_568]));
                hello.extend(1e30f32.to_le_bytes().repeat(64));
                s.write_all(&hello).expect("hello");
                strangers.push(s);
            }
        }
    }
    let (completed, lines) = outcome(&mut c);
    assert!(completed, "the job failed:\n{}", c.coordinator.stderr());
    let formed = events(&lines, "generation formed");
    assert_eq!(formed.len(), 1, "no re-formation: {formed:?}");
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
    let losses: Vec<f64> = events(&lines, "step")
        .iter()
        .map(|f| f["loss"].as_f64().expect("loss"))
        .collect();
    assert!(
        losses.iter().all(|l| l.is_finite() && *l < 20.0),
        "{losses:?}"
    );
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success());
    for mut s in strangers {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut heard = Vec::new();
        let _ = s.read_to_end(&mut heard);
        // At most a challenge: magic, kind 4 and a random nonce. Never an ACCEPT or a REFUSE
        // with the worker's generation, world and rank.
        assert!(
            heard.is_empty() || (heard.len() == 48 && heard[8..16] == 4u64.to_le_bytes()),
            "a stranger heard {heard:?}"
        );
    }
}

/// Messages and the final status of a session that sends `first` and then `then(reply)`.
async fn stranger_session(
    url: &str,
    first: Vec<Kind>,
    then: impl Fn(&rpc::Challenge) -> Option<Kind>,
) -> (Vec<CoordinatorMessage>, Option<tonic::Status>) {
    let mut client = rpc::CoordinatorClient::connect(url.to_string())
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for kind in first {
        tx.send(WorkerMessage { kind: Some(kind) }).expect("send");
    }
    let mut inbound = client
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    let mut heard = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("an answer in time");
        match next {
            Ok(Some(m)) => {
                if let Some(coordinator_message::Kind::Challenge(ch)) = &m.kind {
                    if let Some(kind) = then(ch) {
                        tx.send(WorkerMessage { kind: Some(kind) }).expect("send");
                    }
                }
                heard.push(m);
            }
            Ok(None) => return (heard, None),
            Err(status) => return (heard, Some(status)),
        }
    }
}

fn join(job: &str, worker_id: &str) -> rpc::Join {
    rpc::Join {
        job: job.into(),
        worker_id: worker_id.into(),
        devices: vec!["cpu".into()],
        version: rpc::VERSION.into(),
        collective_endpoint: "127.0.0.1:9".into(),
        attach_generation: 0,
        attach_rank: 0,
        proof: Vec::new(),
    }
}

#[test]
fn a_session_without_the_token_hears_nothing_about_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    // No workers: the coordinator stays in `forming`, which is enough here.
    let c = coordinator(dir.path(), "classified", 10, "cluster:\n  min_workers: 2\n");
    let name = c.job_name();
    let secrets = [
        name.clone(),
        c.job.checkpoints.display().to_string(),
        dir.path().display().to_string(),
    ];
    let told = |heard: &[CoordinatorMessage], status: &Option<tonic::Status>| {
        let mut text = format!("{heard:?}");
        if let Some(s) = status {
            text.push_str(&format!("{s:?}"));
        }
        secrets
            .iter()
            .filter(|s| text.contains(s.as_str()))
            .cloned()
            .collect::<Vec<_>>()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // A Join first, as workers did before (the token in clear), for the real job and for
        // a guessed name: refused, no `Joined`, no job name.
        for job in [name.as_str(), "guess"] {
            let (heard, status) =
                stranger_session(&c.url, vec![Kind::Join(join(job, "stranger"))], |_| None).await;
            assert!(heard.is_empty(), "heard {heard:?}");
            let status = status.expect("refused");
            assert_eq!(
                rpc::Refusal::from_status(&status).map(|r| r.code),
                Some(rpc::ErrorCode::NotJoined)
            );
            assert!(told(&heard, &Some(status)).is_empty());
        }
        // The new protocol with a made-up proof: a challenge (random bytes and a tag), then a
        // refusal that says nothing.
        let hello = Kind::Hello(rpc::Hello { nonce: vec![7; 32] });
        let (heard, status) = stranger_session(&c.url, vec![hello], |_| {
            let mut j = join(&name, "stranger");
            j.proof = vec![0; 32];
            Some(Kind::Join(j))
        })
        .await;
        assert_eq!(heard.len(), 1, "only the challenge: {heard:?}");
        let status = status.expect("refused");
        assert_eq!(
            rpc::Refusal::from_status(&status).map(|r| r.code),
            Some(rpc::ErrorCode::WrongToken)
        );
        assert!(told(&heard, &Some(status)).is_empty());
        // A worker with a wrong token does not follow this coordinator: its proof is wrong.
        let mut client = rpc::CoordinatorClient::connect(c.url.clone())
            .await
            .expect("connect");
        let wrong = dapt_proto::join::open(&mut client, &Key::control("guess"), join(&name, "w9"))
            .await
            .err()
            .expect("not joined");
        assert!(
            matches!(wrong, dapt_proto::join::SessionError::Unproven { .. }),
            "{wrong}"
        );
        // A member whose id would forge a log line: refused, and logged escaped.
        let key = Key::control(&c.token);
        let forged = dapt_proto::join::open(&mut client, &key, join(&name, "w0\nforged line"))
            .await
            .err()
            .expect("refused");
        assert!(
            forged.to_string().contains("control characters"),
            "{forged}"
        );
        // A proven status request recorded on the wire and sent again is no proof: refused.
        let request =
            dapt_proto::join::status_request(&key, dapt_proto::join::unix_ms()).expect("request");
        let first = client.status(request.clone()).await;
        assert!(first.is_ok(), "{first:?}");
        let replayed = client
            .status(request)
            .await
            .expect_err("a replay is refused");
        assert_eq!(
            rpc::Refusal::from_status(&replayed).map(|r| r.code),
            Some(rpc::ErrorCode::WrongToken)
        );
    });
    std::thread::sleep(Duration::from_millis(200));
    let raw = c.coordinator.stderr();
    assert!(!raw.contains("\nforged line"), "{raw}");
    assert!(
        c.coordinator
            .events("refused a session")
            .iter()
            .any(|f| f["reason"]
                .as_str()
                .is_some_and(|r| r.contains("w0\\nforged line"))),
        "{raw}"
    );
    // `dapt status`: without the token, with a wrong one, with the right one.
    let status = |token: Option<&str>| {
        let mut cmd = Command::new(binary("dapt"));
        cmd.args(["status", &c.url]).env_remove("DAPT_TOKEN");
        if let Some(t) = token {
            cmd.env("DAPT_TOKEN", t);
        }
        let out = cmd.output().expect("dapt status");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for token in [None, Some("guess")] {
        let (ok, text) = status(token);
        assert!(!ok, "{text}");
        assert!(!text.contains(&name), "{text}");
    }
    assert!(status(None).1.contains("DAPT_TOKEN"));
    assert!(status(Some("guess")).1.contains("WRONG_TOKEN"));
    let (ok, text) = status(Some(&c.token));
    assert!(ok && text.contains(&name), "{text}");
    c.coordinator.signal(libc::SIGTERM);
}

/// A stranger at another address (127.0.0.2) that keeps opening gRPC sessions that never say
/// Hello, as fast as the coordinator takes them, on a few HTTP/2 connections: the workers (from
/// 127.0.0.1) still join and the job completes, and the refusals are a few log lines, not one
/// per stream. Before, the stranger held every place for sessions that had not joined yet
/// (64), the workers were refused until they gave up, and each refused stream was a line.
#[test]
fn a_session_flood_from_another_address_does_not_keep_workers_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 6;
    let mut c = coordinator(
        dir.path(),
        "flood",
        steps,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n",
    );
    let port = port_of(&c);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let held: Held = Default::default();
    let flood_started = Instant::now();
    for _ in 0..3 {
        runtime.spawn(flood_sessions(port, opened.clone(), held.clone()));
    }
    // The flood holds its places before the workers come.
    let started = Instant::now();
    while opened.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(started.elapsed() < LONG, "the flood cannot open sessions");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ports = [free_port(), free_port()];
    let _w0 = member_on(&c, "w0", ports[0]);
    let _w1 = member_on(&c, "w1", ports[1]);
    let (completed, lines) = outcome(&mut c);
    let flooded = opened.load(std::sync::atomic::Ordering::Relaxed);
    runtime.shutdown_background();
    assert!(
        completed,
        "the job did not complete under the flood:\n{}",
        c.coordinator.stderr()
    );
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
    // The stranger's address had at most its 16 places (before: all 64; counted on the
    // stranger's side, where a new session's headers may arrive before an ended one's trailers:
    // a little slack).
    let most = held.1.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=24).contains(&most),
        "the stranger held {most} sessions at once"
    );
    // Each kind of refusal at most once per 10 s (and the first of each).
    let refusals = events(
        &lines,
        "too many sessions that have not joined, in all or from this address: refused sessions",
    )
    .len()
        + events(&lines, "refused a session").len();
    let allowed = 2 * (flood_started.elapsed().as_secs() as usize / 10 + 1) + 2;
    assert!(
        (1..=allowed).contains(&refusals),
        "{refusals} refusal lines for {flooded} stranger sessions (at most {allowed})"
    );
}

/// Sessions held now, and the most at once.
type Held = std::sync::Arc<(
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicUsize,
)>;

/// Opens gRPC `Session` streams to the coordinator on `127.0.0.1:port` from 127.0.0.2 that
/// never send a message, a new one whenever one ends, up to the connection's stream limit.
/// `held`: the sessions the coordinator has taken and not ended yet, and the most at once.
async fn flood_sessions(
    port: u16,
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    held: Held,
) {
    use std::sync::atomic::Ordering::SeqCst;
    loop {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        if socket
            .bind("127.0.0.2:0".parse().expect("address"))
            .is_err()
        {
            return;
        }
        let Ok(tcp) = socket.connect(([127, 0, 0, 1], port).into()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok((client, connection)) = h2::client::handshake(tcp).await else {
            continue;
        };
        tokio::spawn(connection);
        let mut client = client;
        loop {
            client = match client.ready().await {
                Ok(c) => c,
                Err(_) => break,
            };
            let request = http::Request::post(format!(
                "http://127.0.0.1:{port}/dapt.v1.Coordinator/Session"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
            let Ok((response, send)) = client.send_request(request, false) else {
                break;
            };
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Paced (50 a second per connection: the coordinator's places for sessions last
            // 10 s, so this refills them all many times over) so that the flood does not take
            // this 2-core machine's CPU from the workers.
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Held open (never a message) until the coordinator ends it. A session the
            // coordinator takes (no `grpc-status` in its headers: not refused at once) counts
            // in `held` while it lasts.
            let held = held.clone();
            tokio::spawn(async move {
                let _send = send;
                if let Ok(response) = response.await {
                    let taken = !response.headers().contains_key("grpc-status");
                    if taken {
                        let now = held.0.fetch_add(1, SeqCst) + 1;
                        held.1.fetch_max(now, SeqCst);
                    }
                    let mut body = response.into_body();
                    while let Some(Ok(_)) = body.data().await {}
                    let _ = body.trailers().await;
                    if taken {
                        held.0.fetch_sub(1, SeqCst);
                    }
                }
            });
        }
    }
}

#[test]
fn silent_connections_and_sessions_do_not_stall_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 10;
    let mut c = coordinator(
        dir.path(),
        "silent",
        steps,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n  collective_timeout_s: 10\n",
    );
    let port = port_of(&c);
    // Silent TCP connections to the coordinator from a stranger's address (64 kept, the rest
    // closed at once, the kept ones after 10 s), and more silent sessions than it lets wait to
    // join (64): the extra ones are refused at once, the others cut off after 10 s.
    let _tcp = strangers("127.0.0.2", port, 100, b"");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (refused, _held) = runtime.block_on(async {
        let mut refused = 0;
        let mut held = Vec::new();
        for _ in 0..8 {
            let channel = tonic::transport::Endpoint::from_shared(c.url.clone())
                .expect("url")
                .connect()
                .await
                .expect("connect");
            for _ in 0..10 {
                let mut client = rpc::CoordinatorClient::new(channel.clone());
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<WorkerMessage>();
                match client
                    .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                    .await
                {
                    Ok(r) => held.push((tx, r.into_inner())),
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
                    Err(s) => panic!("{s}"),
                }
            }
        }
        (refused, held)
    });
    assert!(
        refused >= 10,
        "{refused} of 80 silent sessions refused at once"
    );
    // The workers, with silent connections on their collective ports too.
    let ports = [free_port(), free_port()];
    let _w0 = member_on(&c, "w0", ports[0]);
    let _w1 = member_on(&c, "w1", ports[1]);
    ports.iter().for_each(|&p| listening(p));
    let _ring: Vec<TcpStream> = ports
        .iter()
        .flat_map(|&p| (0..40).map(move |_| TcpStream::connect(("127.0.0.1", p)).expect("connect")))
        .collect();
    let (completed, lines) = outcome(&mut c);
    assert!(completed, "the job failed:\n{}", c.coordinator.stderr());
    assert_eq!(events(&lines, "generation formed").len(), 1);
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success());
    drop(runtime);
}

/// [`coordinator`] started under `ulimit -n fds` (soft and hard: it cannot raise it), so that a
/// stranger's connections could take every file descriptor it has.
fn coordinator_with_fds(
    dir: &std::path::Path,
    name: &str,
    steps: u64,
    cluster: &str,
    fds: u32,
) -> Cluster {
    let job = dapt_tests::write_job(dir, name, steps, cluster);
    let out = Command::new(binary("dapt"))
        .args(["prepare", "--quiet"])
        .arg(&job.path)
        .output()
        .expect("prepare");
    assert!(out.status.success(), "{}", dapt_tests::text(&out.stderr));
    let port = free_port();
    let token = "dapt-test-token-0123456789abcdef".to_string();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &format!("ulimit -n {fds} && exec \"$@\""), "sh"])
        .arg(binary("dapt"))
        .args(["--log-format", "json", "coordinator"])
        .arg(&job.path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("DAPT_TOKEN", &token);
    let mut coordinator = Proc::spawn(cmd);
    coordinator.wait_for("the coordinator to listen", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    Cluster {
        coordinator,
        url: format!("http://127.0.0.1:{port}"),
        token,
        job,
        env: Vec::new(),
    }
}

/// `n` TCP connections from `from` (an address of this machine, e.g. 127.0.0.2) to
/// `127.0.0.1:port`, each sending `first` (if anything) and then nothing; paced (50 at a time,
/// then 20 ms). Those that could not connect within 2 s are left out.
fn strangers(from: &str, port: u16, n: usize, first: &[u8]) -> Vec<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let from: std::net::SocketAddr = format!("{from}:0").parse().expect("address");
    runtime.block_on(async {
        let mut held = Vec::new();
        for i in 0..n {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(from).expect("bind the stranger's address");
            let connect = socket.connect(([127, 0, 0, 1], port).into());
            let Ok(Ok(tcp)) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
                continue;
            };
            let mut tcp = tcp.into_std().expect("std stream");
            tcp.set_nonblocking(false).expect("blocking");
            if !first.is_empty() {
                let _ = tcp.write_all(first);
            }
            held.push(tcp);
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        held
    })
}

/// Whether the server closed `s` (what it sent before, such as HTTP/2 settings, is read away).
fn closed(s: &TcpStream) -> bool {
    let mut s = s;
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// The HTTP/2 client preface and an empty SETTINGS frame: a connection that then says nothing.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// The audit's descriptor exhaustion: a stranger at 127.0.0.2 opens 300 silent connections to a
/// coordinator allowed 256 open files. Those beyond its address's share (64) are closed at
/// once, and while the stranger keeps its share full (opening new connections as the old ones
/// reach their deadline), workers from 127.0.0.1 join and complete the job with an exact ledger
/// (its commits write files); the refusals are a few log lines. Before, every connection was
/// kept: the coordinator ran out of descriptors, tonic's accept loop spun on `EMFILE`, and the
/// workers could not join.
#[test]
fn silent_connections_beyond_an_address_share_are_closed_and_workers_from_another_address_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 6;
    let mut c = coordinator_with_fds(
        dir.path(),
        "fds",
        steps,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n",
        256,
    );
    let port = port_of(&c);
    let flood_started = Instant::now();
    let held = strangers("127.0.0.2", port, 300, b"");
    std::thread::sleep(Duration::from_secs(2));
    let open = held.iter().filter(|s| !closed(s)).count();
    assert!(
        open <= 64,
        "{open} of the stranger's {} connections still open",
        held.len()
    );
    // The stranger tops its connections up to 80 every 1.5 s for as long as the job runs (the
    // count is taken 1.5 s after a top-up: a loaded machine's coordinator may take a while to
    // accept, and close, the ones past the share).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stranger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = held;
            let mut most_open = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                held.retain(|s| !closed(s));
                most_open = most_open.max(held.len());
                let more = 80usize.saturating_sub(held.len());
                held.extend(strangers("127.0.0.2", port, more, b""));
                std::thread::sleep(Duration::from_millis(1500));
            }
            most_open
        })
    };
    let ports = [free_port(), free_port()];
    let _w0 = member_on(&c, "w0", ports[0]);
    let _w1 = member_on(&c, "w1", ports[1]);
    let (completed, lines) = outcome(&mut c);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most_open = stranger.join().expect("the stranger's thread");
    assert!(completed, "the job failed:\n{}", c.coordinator.stderr());
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
    assert!(
        (1..=64).contains(&most_open),
        "the stranger held {most_open} connections"
    );
    let limit = events(&lines, "open-file limit");
    assert_eq!(limit[0]["open_files"], 256, "{limit:?}");
    let refusals = events(&lines, "refused connections");
    let allowed = flood_started.elapsed().as_secs() as usize / 10 + 2;
    assert!(
        (1..=allowed).contains(&refusals.len()),
        "{} refusal lines (at most {allowed})",
        refusals.len()
    );
}

/// Workers at the same address as a stranger holding that address's whole share of connections
/// (64 silent ones) are refused connections at first; they try again (for their connect
/// timeout), and join once the stranger's connections reach their 10 s deadline. Before, a
/// worker whose connection was closed before its session was answered gave up at once (`lost
/// the coordinator: ... connection closed`).
#[test]
fn workers_at_a_strangers_address_join_once_its_connections_reach_their_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 4;
    let mut c = coordinator(
        dir.path(),
        "sameaddr",
        steps,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n",
    );
    let port = port_of(&c);
    let held = strangers("127.0.0.1", port, 64, b"");
    let ports = [free_port(), free_port()];
    let w0 = member_on(&c, "w0", ports[0]);
    let _w1 = member_on(&c, "w1", ports[1]);
    c.coordinator
        .wait_for("a generation to form", Duration::from_secs(60), |l| {
            !events(l, "generation formed").is_empty()
        });
    let (completed, _) = outcome(&mut c);
    assert!(
        completed,
        "the job failed:\n{}\n{}",
        c.coordinator.stderr(),
        w0.stderr()
    );
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
    drop(held);
}

/// Another user's process, killed when dropped (also when a test fails: a flooder left running
/// would hold the machine's ports for every later test).
struct Stranger(std::process::Child);

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs python `script` with `args` as another user of this machine (uid 4242; needs root).
fn as_stranger(script: &str, args: &[String]) -> Stranger {
    use std::os::unix::process::CommandExt;
    Stranger(
        Command::new("python3")
            .args(["-c", script])
            .args(args)
            .uid(4242)
            .gid(4242)
            .spawn()
            .expect("python3 as uid 4242"),
    )
}

/// Keeps `argv[1]` silent connections open to port `argv[2]` of 127.0.0.1, opening new ones as
/// the other side closes them.
const HOLD_AND_REFILL: &str = r#"
import socket, sys, time
port = int(sys.argv[2])
held = []
def gone(s):
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
while True:
    held = [s for s in held if not gone(s)]
    while len(held) < int(sys.argv[1]):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            break
        s.setblocking(False)
        held.append(s)
    time.sleep(0.2)
"#;

/// `argv[1]` threads per port of `argv[2:]` (of 127.0.0.1), each holding a silent connection
/// until the other side closes it, then dialling again (at once, or after 30 ms when it was
/// closed within a second; every 10 ms while nothing listens).
const HOLD_PER_THREAD: &str = r#"
import socket, sys, threading, time
per_port, ports = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def hold(port):
    while True:
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            time.sleep(0.01)
            continue
        opened = time.time()
        try:
            s.recv(1)
        except OSError:
            pass
        s.close()
        if time.time() - opened < 1:
            time.sleep(0.03)
for port in ports:
    for _ in range(per_port):
        threading.Thread(target=hold, args=(port,), daemon=True).start()
while True:
    time.sleep(1)
"#;

/// Whether this test process may act as another user (root; CI runs as root).
fn can_be_another_user() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: running the stranger as another user needs root");
    }
    root
}

/// Another user of this machine holding more connections than an address's share from
/// 127.0.0.1, topping them up as they reach their deadline: every process of a host dials from
/// there, so it locked the workers and `dapt status` out of the coordinator (an audit: the job
/// never formed). Loopback peers are counted per user, so this user's workers join at once and
/// complete the job, and its status answers. Needs root, to run the stranger as another user.
#[test]
fn another_local_user_flooding_loopback_does_not_lock_this_users_workers_out() {
    if !can_be_another_user() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 4;
    let mut c = coordinator(
        dir.path(),
        "localuser",
        steps,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n",
    );
    let port = port_of(&c);
    let stranger = as_stranger(HOLD_AND_REFILL, &["80".into(), port.to_string()]);
    // The stranger holds its share before the workers come.
    c.coordinator
        .wait_for("the stranger's refusals", LONG, |l| {
            !events(l, "refused connections").is_empty()
        });
    let started = Instant::now();
    let ports = [free_port(), free_port()];
    let _w0 = member_on(&c, "w0", ports[0]);
    let _w1 = member_on(&c, "w1", ports[1]);
    c.coordinator.wait_for("a generation to form", LONG, |l| {
        !events(l, "generation formed").is_empty()
    });
    let formed = started.elapsed();
    let status = Command::new(binary("dapt"))
        .args(["status", &c.url])
        .env("DAPT_TOKEN", &c.token)
        .output()
        .expect("dapt status");
    let (completed, _) = outcome(&mut c);
    drop(stranger);
    assert!(
        status.status.success(),
        "{}",
        dapt_tests::text(&status.stderr)
    );
    assert!(completed, "the job failed:\n{}", c.coordinator.stderr());
    // Not after the stranger's connections reached their 10 s deadline: at once.
    assert!(formed < Duration::from_secs(8), "formed after {formed:?}");
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
}

/// Another user of this machine holding 160 silent connections on each worker's ring port
/// cannot keep the ring from forming: the left neighbour's places are for this user's sockets.
/// They were for its address, 127.0.0.1, which every local process dials from: four generations
/// in a row failed ("no progress for 10s") and the job with them (an audit).
#[test]
fn another_local_user_flooding_the_ring_ports_does_not_keep_the_ring_from_forming() {
    if !can_be_another_user() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 4;
    let mut c = coordinator(
        dir.path(),
        "ringflood",
        steps,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n  formation_grace_ms: 500\n  collective_timeout_s: 10\n",
    );
    let ports = [free_port(), free_port()];
    // Dialling the ports before the workers listen, as the audit's stranger did.
    let mut args = vec!["160".to_string()];
    args.extend(ports.map(|p| p.to_string()));
    let stranger = as_stranger(HOLD_PER_THREAD, &args);
    std::thread::sleep(Duration::from_secs(2));
    let _w0 = member_on(&c, "w0", ports[0]);
    let _w1 = member_on(&c, "w1", ports[1]);
    let (completed, lines) = outcome(&mut c);
    drop(stranger);
    assert!(completed, "the job failed:\n{}", c.coordinator.stderr());
    let formed = events(&lines, "generation formed");
    assert_eq!(formed.len(), 1, "no generation lost: {formed:?}");
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
}

/// A connection that makes no request is closed: a silent one and one that sent only the
/// HTTP/2 preface on the gRPC port after 10 s, one sending half a request header on the
/// metrics port after 5 s. Before, none was ever closed (0 of 200 after 45 s in the audit).
#[test]
fn a_connection_that_makes_no_request_is_closed_after_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let c = dapt_tests::coordinator_with(
        dir.path(),
        "deadline",
        10,
        "cluster:\n  min_workers: 2\n",
        "127.0.0.1",
        &[("DAPT_METRICS_LISTEN", &metrics)],
    );
    let port = port_of(&c);
    let opened = Instant::now();
    let mut grpc = strangers("127.0.0.2", port, 2, b"");
    grpc.extend(strangers("127.0.0.2", port, 2, H2_PREFACE));
    let slow = strangers(
        "127.0.0.2",
        metrics_port,
        2,
        b"GET / HTTP/1.1\r\nHost: x\r\n",
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(grpc.iter().all(|s| !closed(s)), "closed too soon");
    let deadline = opened + Duration::from_secs(25);
    let (mut grpc_at, mut metrics_at) = (None, None);
    while Instant::now() < deadline && (grpc_at.is_none() || metrics_at.is_none()) {
        if grpc_at.is_none() && grpc.iter().all(closed) {
            grpc_at = Some(opened.elapsed());
        }
        if metrics_at.is_none() && slow.iter().all(closed) {
            metrics_at = Some(opened.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let grpc_at = grpc_at.expect("the gRPC connections were not closed within 25 s");
    let metrics_at = metrics_at.expect("the metrics connections were not closed within 25 s");
    assert!(grpc_at >= Duration::from_secs(8), "{grpc_at:?}");
    assert!(metrics_at >= Duration::from_secs(3), "{metrics_at:?}");
    c.coordinator.signal(libc::SIGTERM);
}

/// A resident set size in bytes, from /proc/PID/status.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// An HTTP/2 connection from 127.0.0.2 to the coordinator on `127.0.0.1:port`.
async fn h2_from_stranger(port: u16) -> h2::client::SendRequest<tonic::codegen::Bytes> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("address"))
        .expect("bind");
    let tcp = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    client
}

/// A `Status` request's headers.
fn status_request(port: u16) -> http::Request<()> {
    http::Request::post(format!(
        "http://127.0.0.1:{port}/dapt.v1.Coordinator/Status"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request")
}

/// The audit's memory flood: from 127.0.0.2, 2 connections with 100 `Status` streams each,
/// half announcing a 4 MiB message, half one just under 1 MiB, each sending 1 MiB of it and
/// never the rest. The coordinator refuses the oversized ones as soon as it reads their length
/// and reads at most 4 requests from one address at once, so it holds a few MiB, not 200: its
/// RSS grows by less than 48 MiB (before: by about 200 MiB here; 19 MB to 1,071 MB in the
/// audit's larger flood). `dapt status` with the token still answers.
#[test]
fn an_oversized_status_flood_is_refused_without_the_memory_growing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let c = coordinator(dir.path(), "bigstatus", 10, "cluster:\n  min_workers: 2\n");
    let port = port_of(&c);
    let pid = c.coordinator.child.id();
    let before = rss(pid);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let chunk = tonic::codegen::Bytes::from(vec![0u8; 1 << 20]);
    let _streams = runtime.block_on(async {
        let mut streams = Vec::new();
        for _ in 0..2 {
            let mut client = h2_from_stranger(port).await;
            for i in 0..100u32 {
                client = client.ready().await.expect("ready");
                let (response, mut send) = client
                    .send_request(status_request(port), false)
                    .expect("request");
                let announced: u32 = if i % 2 == 0 { 4 << 20 } else { (1 << 20) - 64 };
                let mut header = vec![0u8];
                header.extend(announced.to_be_bytes());
                let _ = send.send_data(header.into(), false);
                // The same buffer for every stream: the test holds 1 MiB, not 200.
                let _ = send.send_data(chunk.clone(), false);
                streams.push((response, send));
            }
        }
        streams
    });
    let mut most = before;
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_secs(6) {
        most = most.max(rss(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let grown = most.saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "the coordinator's RSS grew by {} MiB",
        grown >> 20
    );
    let out = Command::new(binary("dapt"))
        .args(["status", &c.url])
        .env("DAPT_TOKEN", &c.token)
        .output()
        .expect("dapt status");
    assert!(out.status.success(), "{}", dapt_tests::text(&out.stderr));
    runtime.shutdown_background();
    c.coordinator.signal(libc::SIGTERM);
}

/// Status requests without the token's proof, 100 a second for 5 s from 127.0.0.2: refused,
/// and logged at most once per 10 s with a count (before: a line each, 8,900 lines in 10 s in
/// the audit).
#[test]
fn refused_status_requests_are_logged_a_few_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let c = coordinator(
        dir.path(),
        "statusflood",
        10,
        "cluster:\n  min_workers: 2\n",
    );
    let port = port_of(&c);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let sent = runtime.block_on(async {
        let mut client = h2_from_stranger(port).await;
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(5) {
            client = client.ready().await.expect("ready");
            let (response, mut send) = client
                .send_request(status_request(port), false)
                .expect("request");
            // An empty `StatusRequest`: no proof.
            let _ = send.send_data(vec![0u8; 5].into(), true);
            tokio::spawn(async move {
                if let Ok(r) = response.await {
                    let mut body = r.into_body();
                    while let Some(Ok(_)) = body.data().await {}
                    let _ = body.trailers().await;
                }
            });
            sent += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(500));
    let refused = c
        .coordinator
        .events("refused a status request without the token's proof");
    assert!(
        (1..=2).contains(&refused.len()),
        "{} lines for {sent} refused requests",
        refused.len()
    );
    let counted: u64 = refused.iter().filter_map(|f| f["refused"].as_u64()).sum();
    assert!(counted >= 1, "{refused:?}");
    c.coordinator.signal(libc::SIGTERM);
}

/// The TLS metrics port: 64 silent connections from 127.0.0.2 took every handshake place for
/// the 10 s handshake deadline, so a scraper waited that long. Now one address has 8 places and
/// a connection that sends no ClientHello within 3 s is closed: a scrape from 127.0.0.1 is
/// answered at once, and the silent connections are closed within a few seconds.
#[test]
fn silent_connections_on_the_tls_metrics_port_do_not_lock_scrapers_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs_dir = dir.path().join("certs");
    std::fs::create_dir_all(&certs_dir).expect("certs dir");
    let certs = dapt_tests::EtcdCerts::make(&certs_dir);
    let _serial = serial();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let cluster = format!(
        "cluster:\n  min_workers: 2\n  tls:\n    cert: {}\n    key: {}\n",
        certs.server_cert.display(),
        certs.server_key.display(),
    );
    let c = dapt_tests::coordinator_with(
        dir.path(),
        "tlsmetrics",
        10,
        &cluster,
        "127.0.0.1",
        &[("DAPT_METRICS_LISTEN", &metrics)],
    );
    let opened = Instant::now();
    let silent = strangers("127.0.0.2", metrics_port, 64, b"");
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let reply = dapt_tests::scrape_tls(metrics_port, &certs.ca, None);
    let took = asked.elapsed();
    assert!(reply.contains("dapt_phase"), "{reply}");
    assert!(took < Duration::from_secs(5), "the scrape took {took:?}");
    while opened.elapsed() < Duration::from_secs(8) && !silent.iter().all(closed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        silent.iter().all(closed),
        "silent connections still open after {:?}",
        opened.elapsed()
    );
    c.coordinator.signal(libc::SIGTERM);
}

/// A metrics client that pipelines requests and never reads their answers is closed once the
/// server's write to it has waited `WRITE_STALL` (10 s), while a scraper from another address
/// is answered throughout. Before, such connections were held for ever (an audit: 256 of them
/// from 16 addresses, ~718 MB of unsent answers in the kernel, locked every scraper out).
#[test]
fn a_metrics_client_that_never_reads_its_answers_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let c = dapt_tests::coordinator_with(
        dir.path(),
        "nonreader",
        10,
        "cluster:\n  min_workers: 2\n",
        "127.0.0.1",
        &[("DAPT_METRICS_LISTEN", &metrics)],
    );
    let _ = port_of(&c);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(64);
    let mut held = Vec::new();
    for _ in 0..2 {
        let tcp = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .set_recv_buffer_size(4096)
                .expect("small receive buffer");
            socket
                .bind("127.0.0.3:0".parse().expect("address"))
                .expect("bind");
            socket
                .connect(([127, 0, 0, 1], metrics_port).into())
                .await
                .expect("connect")
                .into_std()
                .expect("std stream")
        });
        tcp.set_nonblocking(true).expect("nonblocking");
        held.push(tcp);
    }
    // Requests until neither side's buffers take more: the server is blocked writing answers.
    let flooded = Instant::now();
    let mut blocked = vec![false; held.len()];
    while blocked.iter().any(|b| !b) && flooded.elapsed() < Duration::from_secs(20) {
        for (s, blocked) in held.iter_mut().zip(&mut blocked) {
            match s.write(&request) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => *blocked = true,
                Err(e) => panic!("the server closed a reader that had read nothing: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        blocked.iter().all(|&b| b),
        "the server kept reading requests"
    );
    let stalled = Instant::now();
    // A scraper from elsewhere is answered meanwhile.
    let (head, _) = dapt_tests::http_get(&metrics, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Then, without reading before: 10 s of a blocked write, and the margin of a loaded machine.
    std::thread::sleep(Duration::from_secs(20));
    let all_closed = held.iter().all(|s| {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            if Instant::now() > until {
                return false;
            }
            if closed(s) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(
        all_closed,
        "a non-reading metrics client was still connected {:?} after the server's writes blocked",
        stalled.elapsed()
    );
    c.coordinator.signal(libc::SIGTERM);
}
