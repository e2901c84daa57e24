//! Ranks as threads on 127.0.0.1; every wait is bounded by the ring's own timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::collective::handshake::{GREET, MAX_GREETING};

const TIMEOUT: Duration = Duration::from_secs(1);

/// The key of the tests' job; strangers use another.
fn key() -> Key {
    Key::ring("t0ken", "ring-tests")
}

fn bind_all(world: usize) -> (Vec<RingListener>, Vec<SocketAddr>) {
    let listeners: Vec<_> = (0..world)
        .map(|_| TcpRing::bind("127.0.0.1:0".parse().expect("address"), key()).expect("bind"))
        .collect();
    let peers = listeners.iter().map(RingListener::local_addr).collect();
    (listeners, peers)
}

fn config(rank: usize, peers: &[SocketAddr], generation: u64, chunk_bytes: usize) -> RingConfig {
    RingConfig {
        rank,
        world: peers.len(),
        peers: peers.to_vec(),
        generation,
        timeout: TIMEOUT,
        chunk_bytes,
    }
}

/// Connects every rank of a ring at once; `generations[r]` is rank r's generation.
fn connect_all(generations: &[u64], chunk_bytes: usize) -> Vec<Result<TcpRing, CollectiveError>> {
    let (listeners, peers) = bind_all(generations.len());
    connect(listeners, &peers, generations, chunk_bytes)
}

/// Connects `listeners` (ranks 0.., of a world of `peers.len()`) from one thread each.
fn connect(
    listeners: Vec<RingListener>,
    peers: &[SocketAddr],
    generations: &[u64],
    chunk_bytes: usize,
) -> Vec<Result<TcpRing, CollectiveError>> {
    thread::scope(|s| {
        let joins: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let cfg = config(rank, peers, generations[rank], chunk_bytes);
                s.spawn(move || listener.connect(cfg, AbortHandle::new()))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread"))
            .collect()
    })
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u64 * 2_654_435_761 + rank as u64 * 40_503) % 100_003;
            (h as f32 - 50_000.0) / 7.0
        })
        .collect()
}

/// The ring's result computed directly: chunk c summed in ring order from rank c + 1 (ending at
/// rank c, its owner), then scaled.
fn expected(world: usize, len: usize) -> Vec<f32> {
    let inputs: Vec<_> = (0..world).map(|r| input(r, len)).collect();
    if world == 1 {
        return inputs[0].clone();
    }
    let (base, extra) = (len / world, len % world);
    let inverse = 1.0 / world as f32;
    let mut out = Vec::with_capacity(len);
    for c in 0..world {
        let start = c * base + c.min(extra);
        let range = start..start + base + usize::from(c < extra);
        let mut acc = inputs[(c + 1) % world][range.clone()].to_vec();
        for k in 2..=world {
            let theirs = &inputs[(c + k) % world][range.clone()];
            acc.iter_mut().zip(theirs).for_each(|(a, t)| *a += *t);
        }
        out.extend(acc.iter().map(|a| a * inverse));
    }
    out
}

/// Guards `expected` itself: within f32 rounding of the mean computed in f64.
fn assert_close_to_true_mean(world: usize, got: &[f32]) {
    let inputs: Vec<_> = (0..world).map(|r| input(r, got.len())).collect();
    for (i, &g) in got.iter().enumerate() {
        let sum: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
        let scale: f64 = inputs.iter().map(|x| f64::from(x[i]).abs()).sum();
        let error = (f64::from(g) - sum / world as f64).abs();
        assert!(
            error <= 1e-6 * scale,
            "element {i}: {g} vs {}",
            sum / world as f64
        );
    }
}

fn run_all_reduce(rings: Vec<TcpRing>, len: usize, calls: usize) -> Vec<Vec<f32>> {
    thread::scope(|s| {
        let joins: Vec<_> = rings
            .into_iter()
            .map(|mut ring| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for _ in 0..calls {
                        out = input(ring.rank(), len);
                        ring.all_reduce_mean(&mut out).expect("all-reduce");
                    }
                    out
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread"))
            .collect()
    })
}

#[test]
fn mean_matches_direct_sum_and_is_bitwise_equal_on_every_rank() {
    for world in 1..=5 {
        for len in [0, 1, 7, 1_000_003] {
            // Tiny pieces for short buffers, so pieces and uneven chunks both get exercised.
            let chunk_bytes = if len < 100 { 4 } else { 64 << 10 };
            let rings: Vec<_> = connect_all(&vec![3; world], chunk_bytes)
                .into_iter()
                .map(|r| r.expect("connect"))
                .collect();
            let results = run_all_reduce(rings, len, 2);
            let want = expected(world, len);
            assert_close_to_true_mean(world, &want);
            for (rank, got) in results.iter().enumerate() {
                let same = got
                    .iter()
                    .map(|x| x.to_bits())
                    .eq(want.iter().map(|x| x.to_bits()));
                assert!(
                    same,
                    "world {world}, len {len}: rank {rank} differs from the direct sum"
                );
            }
        }
    }
}

#[test]
fn reduce_scatter_and_all_gather_are_the_all_reduce_halves() {
    for world in 1..=4 {
        for len in [0, 1, 7, 100_003] {
            let chunk_bytes = if len < 100 { 4 } else { 64 << 10 };
            let rings: Vec<_> = connect_all(&vec![3; world], chunk_bytes)
                .into_iter()
                .map(|r| r.expect("connect"))
                .collect();
            let want = expected(world, len);
            let results: Vec<(Vec<f32>, Vec<f32>)> = thread::scope(|s| {
                let joins: Vec<_> = rings
                    .into_iter()
                    .map(|mut ring| {
                        s.spawn(move || {
                            let mut scattered = input(ring.rank(), len);
                            ring.reduce_scatter_mean(&mut scattered)
                                .expect("reduce-scatter");
                            // Only the owned slice is meaningful; the gather fills the rest.
                            let own = crate::collective::shard_range(len, world, ring.rank());
                            let mut gathered = vec![f32::NAN; len];
                            gathered[own.clone()].copy_from_slice(&scattered[own]);
                            ring.all_gather(&mut gathered).expect("all-gather");
                            // The ring still carries calls after the halves.
                            ring.all_reduce_mean(&mut [1.0]).expect("all-reduce");
                            (scattered, gathered)
                        })
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|j| j.join().expect("rank thread"))
                    .collect()
            });
            for (rank, (scattered, gathered)) in results.iter().enumerate() {
                let own = crate::collective::shard_range(len, world, rank);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&scattered[own.clone()]),
                    bits(&want[own]),
                    "world {world}, len {len}: rank {rank}'s reduce-scattered shard"
                );
                assert_eq!(
                    bits(gathered),
                    bits(&want),
                    "world {world}, len {len}: rank {rank}'s gathered buffer"
                );
            }
        }
    }
}

#[test]
fn shards_tile_the_buffer_in_rank_order() {
    use crate::collective::shard_range;
    for len in [0, 1, 5, 7, 1000] {
        for world in 1..=5 {
            let ranges: Vec<_> = (0..world).map(|r| shard_range(len, world, r)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[world - 1].end, len);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
            }
        }
    }
}

#[test]
fn lengths_that_differ_between_ranks_are_a_handshake_error() {
    let rings: Vec<_> = connect_all(&[1, 1], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    let errors: Vec<_> = thread::scope(|s| {
        let joins: Vec<_> = rings
            .into_iter()
            .map(|mut ring| s.spawn(move || ring.all_reduce_mean(&mut vec![1.0; 10 + ring.rank()])))
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread"))
            .collect()
    });
    for e in errors {
        assert!(matches!(e, Err(CollectiveError::Handshake { .. })), "{e:?}");
    }
}

#[test]
fn a_rank_that_never_joins_times_out_the_others() {
    // Rank 2 binds but never connects (its peers reach its backlog only), then rank 2 is not
    // even listening (its peers are refused and retry).
    for keep_listener in [true, false] {
        let (mut listeners, peers) = bind_all(3);
        let absent = listeners.pop();
        let absent = keep_listener.then_some(absent);
        let started = Instant::now();
        let results = connect(listeners, &peers, &[1, 1, 1], 1 << 20);
        let elapsed = started.elapsed();
        drop(absent);
        for r in results {
            assert!(
                matches!(r, Err(CollectiveError::Timeout { peer: 2, .. })),
                "{r:?}"
            );
        }
        assert!(
            elapsed < TIMEOUT + Duration::from_millis(500),
            "took {elapsed:?}"
        );
    }
}

#[test]
fn a_peer_that_dies_mid_reduce_fails_the_others_promptly() {
    let rings: Vec<_> = connect_all(&[1, 1, 1], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    let len = 16 << 20;
    let started = Instant::now();
    let results: Vec<_> = thread::scope(|s| {
        let joins: Vec<_> = rings
            .into_iter()
            .map(|mut ring| {
                s.spawn(move || {
                    if ring.rank() == 2 {
                        // Dies once the transfer is under way: abort, then drop the sockets.
                        let abort = ring.abort.clone();
                        s.spawn(move || {
                            thread::sleep(Duration::from_millis(20));
                            abort.abort();
                        });
                    }
                    ring.all_reduce_mean(&mut vec![1.0; len])
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread"))
            .collect()
    });
    let elapsed = started.elapsed();
    assert!(
        matches!(results[2], Err(CollectiveError::Aborted)),
        "{:?}",
        results[2]
    );
    for r in &results[..2] {
        let failed = matches!(
            r,
            Err(CollectiveError::PeerClosed { .. } | CollectiveError::Timeout { .. })
        );
        assert!(failed, "{r:?}");
    }
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
}

#[test]
fn abort_unblocks_a_rank_waiting_on_a_silent_peer() {
    let mut rings: Vec<_> = connect_all(&[1, 1], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    let _silent = rings.pop();
    let mut ring = rings.pop().expect("rank 0");
    let abort = ring.abort.clone();
    let aborted_at = thread::scope(|s| {
        let aborter = s.spawn(move || {
            thread::sleep(Duration::from_millis(200));
            abort.abort();
            Instant::now()
        });
        let result = ring.all_reduce_mean(&mut [1.0; 1000]);
        let returned = Instant::now();
        assert!(
            matches!(result, Err(CollectiveError::Aborted)),
            "{result:?}"
        );
        let aborted_at = aborter.join().expect("aborter");
        returned.saturating_duration_since(aborted_at)
    });
    assert!(
        aborted_at < Duration::from_millis(150),
        "returned {aborted_at:?} after abort"
    );
    let again = ring.all_reduce_mean(&mut [1.0; 4]);
    assert!(matches!(again, Err(CollectiveError::Aborted)), "{again:?}");
}

#[test]
fn a_failed_call_poisons_the_ring() {
    let mut rings: Vec<_> = connect_all(&[1, 1], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    drop(rings.pop());
    let mut ring = rings.pop().expect("rank 0");
    let first = ring.all_reduce_mean(&mut [1.0; 1000]);
    assert!(
        matches!(first, Err(CollectiveError::PeerClosed { peer: 1 })),
        "{first:?}"
    );
    let second = ring.all_reduce_mean(&mut [1.0; 1000]);
    assert!(
        matches!(second, Err(CollectiveError::Poisoned)),
        "{second:?}"
    );
}

#[test]
fn a_wrong_generation_is_refused_at_the_handshake() {
    let started = Instant::now();
    for result in connect_all(&[5, 6], 1 << 20) {
        let message = match result {
            Err(CollectiveError::Handshake { message, .. }) => message,
            other => panic!("expected a handshake error, got {other:?}"),
        };
        assert!(message.contains("generation"), "{message}");
    }
    assert!(
        started.elapsed() < TIMEOUT,
        "a refusal should not wait for the timeout"
    );
}

#[test]
fn a_stray_connection_is_refused_and_the_real_peer_still_joins() {
    let (listeners, peers) = bind_all(2);
    let mut stray = TcpStream::connect(peers[0]).expect("stray connect");
    stray.write_all(&[7u8; 48]).expect("stray write");
    let rings: Vec<TcpRing> = connect(listeners, &peers, &[9, 9], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    let results = run_all_reduce(rings, 5, 1);
    assert_eq!(results[0], expected(2, 5));
}

#[test]
fn invalid_configs_name_the_field() {
    let (mut listeners, peers) = bind_all(1);
    let mut cfg = config(0, &peers, 1, 2);
    let listener = listeners.pop().expect("listener");
    let error = listener
        .connect(cfg.clone(), AbortHandle::new())
        .expect_err("chunk_bytes 2");
    assert!(error.to_string().contains("chunk_bytes"), "{error}");
    cfg.rank = 1;
    assert!(cfg.validate().is_err());
}

#[test]
fn rank_0s_bytes_reach_every_rank_exactly() {
    // The NCCL unique id travels this way: 128 arbitrary bytes, every value 0..=255 included.
    let id: Vec<u8> = (0..128u32)
        .map(|i| (i * 37 % 256) as u8)
        .chain([0, 255])
        .collect();
    for world in 1..=7 {
        let rings: Vec<_> = connect_all(&vec![1; world], 4 << 10)
            .into_iter()
            .map(|r| r.expect("connect"))
            .collect();
        let got: Vec<Vec<u8>> = thread::scope(|s| {
            let joins: Vec<_> = rings
                .into_iter()
                .map(|mut ring| {
                    let mut bytes = if ring.rank() == 0 {
                        id.clone()
                    } else {
                        vec![0xAA; id.len()]
                    };
                    s.spawn(move || {
                        crate::agent::rank::broadcast_from_rank0(&mut ring, &mut bytes)
                            .expect("broadcast");
                        bytes
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().expect("rank")).collect()
        });
        for (rank, bytes) in got.iter().enumerate() {
            assert_eq!(bytes, &id, "world {world}: rank {rank}");
        }
    }
}

/// The 48-byte HELLO of the ring before it was authenticated (magic, kind, generation, world,
/// from, to): what a stranger who read the generation and ranks off `dapt status` would send.
fn bare_hello(generation: u64, world: u64, from: u64, to: u64) -> [u8; 48] {
    encode_words([MAGIC, 1, generation, world, from, to])
}

/// Everything `stream` receives until the other side closes it (or `wait` passes).
fn read_all(stream: &mut TcpStream, wait: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(wait)).expect("timeout");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

fn assert_exact(rings: Vec<TcpRing>, world: usize) {
    let results = run_all_reduce(rings, 1001, 2);
    for (rank, got) in results.iter().enumerate() {
        assert_eq!(got, &expected(world, 1001), "rank {rank}");
    }
}

#[test]
fn hellos_queued_before_the_generation_cannot_take_a_rank_and_hear_nothing() {
    // The 04_ring_hijack reproduction: strangers queue the HELLO the real left neighbour would
    // send, at every rank, before the ranks start accepting.
    let (listeners, peers) = bind_all(2);
    let mut strangers: Vec<TcpStream> = (0..2)
        .flat_map(|rank| {
            let left = (rank + 1) % 2;
            (0..3).map(move |_| (rank, left))
        })
        .map(|(rank, left)| {
            let mut s = TcpStream::connect(peers[rank]).expect("stranger connect");
            s.write_all(&bare_hello(4, 2, left as u64, rank as u64))
                .expect("stranger write");
            // Then what the poison of the reproduction sent: a call header and data.
            let _ = s.write_all(&encode_words::<3, 24>([MAGIC, 0, 1001]));
            s
        })
        .collect();
    let rings: Vec<TcpRing> = connect(listeners, &peers, &[4, 4], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    assert_exact(rings, 2);
    for s in &mut strangers {
        let heard = read_all(s, GREET + Duration::from_secs(1));
        // At most a CHALLENGE (magic, kind, a random nonce): never a generation, world or rank.
        assert!(heard.len() <= 48, "a stranger heard {} bytes", heard.len());
        if heard.len() == 48 {
            assert_eq!(&heard[8..16], &4u64.to_le_bytes(), "only a challenge");
        }
    }
}

#[test]
fn a_stranger_with_a_wrong_key_is_refused_and_the_ring_forms() {
    let (listeners, peers) = bind_all(2);
    // The stranger dials rank 0 as its left neighbour (rank 1) would, with the real protocol
    // and the right numbers but another job's key, before rank 0 accepts.
    let stranger = thread::spawn({
        let peers = peers.clone();
        move || {
            let cfg = config(1, &peers, 7, 1 << 20);
            let abort = AbortHandle::new();
            let never = AtomicBool::new(false);
            let watch = Watch {
                abort: &abort,
                stop: &never,
                patience: TIMEOUT,
                deadline: None,
            };
            let wrong = Key::ring("guess", "ring-tests");
            dial_right(&cfg, &wrong, Instant::now() + TIMEOUT, watch)
        }
    });
    thread::sleep(Duration::from_millis(50));
    let rings: Vec<TcpRing> = connect(listeners, &peers, &[7, 7], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    assert_exact(rings, 2);
    let result = stranger.join().expect("stranger");
    assert!(
        matches!(result, Err(CollectiveError::Timeout { .. })),
        "the stranger never got in: {result:?}"
    );
}

/// A stranger at another address (127.0.0.2: the loopback network's other addresses are this
/// host's too) that keeps every handshake place of the ranks' acceptors full with silent
/// connections, opening new ones as fast as it can: the ring still forms, its members dialing
/// from their own address (127.0.0.1), which has places of its own. Before, the flood failed
/// every generation of a job (`cases/security`'s kind 04, found again 2026-11-30).
#[test]
fn a_strangers_flood_from_elsewhere_does_not_keep_the_ring_from_forming() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (listeners, peers) = bind_all(2);
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = thread::spawn({
        let (stop, opened, peers) = (stop.clone(), opened.clone(), peers.clone());
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Acquire) {
                for &to in &peers {
                    let conn = rt.block_on(async {
                        let socket = tokio::net::TcpSocket::new_v4().ok()?;
                        socket.bind("127.0.0.2:0".parse().expect("address")).ok()?;
                        let connect = socket.connect(to);
                        let stream = tokio::time::timeout(Duration::from_millis(50), connect)
                            .await
                            .ok()?
                            .ok()?;
                        stream.into_std().ok()
                    });
                    if let Some(conn) = conn {
                        opened.fetch_add(1, Ordering::Relaxed);
                        held.push_back(conn);
                        // Each held for the acceptor's whole wait (a closed one frees its
                        // place at once); the oldest let go past a few hundred.
                        if held.len() > 16 * MAX_GREETING {
                            held.pop_front();
                        }
                    }
                }
            }
        }
    });
    // Every place taken, and more waiting, before the ranks start to accept.
    let started = Instant::now();
    while opened.load(Ordering::Relaxed) < 3 * MAX_GREETING {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flood cannot connect"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let rings = connect(listeners, &peers, &[5, 5], 1 << 20);
    stop.store(true, Ordering::Release);
    flood.join().expect("flood");
    let rings: Vec<TcpRing> = rings
        .into_iter()
        .map(|r| r.expect("the ring forms under the flood"))
        .collect();
    assert_exact(rings, 2);
}

#[test]
fn silent_connections_do_not_hold_the_accept_path() {
    // Before, each silent connection held the acceptor for a second, one after another, so a
    // few of them timed the ring out.
    let (listeners, peers) = bind_all(3);
    let _silent: Vec<TcpStream> = peers
        .iter()
        .flat_map(|p| (0..20).map(move |_| TcpStream::connect(p).expect("silent connect")))
        .collect();
    let started = Instant::now();
    let rings: Vec<TcpRing> = connect(listeners, &peers, &[2, 2, 2], 1 << 20)
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    let took = started.elapsed();
    assert!(took < TIMEOUT / 2, "connecting took {took:?}");
    assert_exact(rings, 3);
}

#[test]
fn a_replayed_handshake_is_refused() {
    // Record a real member's HELLO and proof, made for a challenge of the recorder's...
    let fake = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (listeners, peers) = bind_all(2);
    let dial_to = vec![peers[0], fake.local_addr().expect("addr")];
    let recorder = thread::spawn(move || {
        let (mut s, _) = fake.accept().expect("accept");
        let mut hello = [0u8; 80];
        s.read_exact(&mut hello).expect("hello");
        let mut challenge = encode_words::<2, 16>([MAGIC, 4]).to_vec();
        challenge.extend([9u8; 32]);
        s.write_all(&challenge).expect("challenge");
        let mut proof = [0u8; 32];
        s.read_exact(&mut proof).expect("proof");
        (hello, proof)
    });
    let member = {
        // Rank 0 of generation 3 dials its right neighbour: here, the recorder.
        let cfg = config(0, &dial_to, 3, 1 << 20);
        let abort = AbortHandle::new();
        let never = AtomicBool::new(false);
        let watch = Watch {
            abort: &abort,
            stop: &never,
            patience: Duration::from_millis(300),
            deadline: None,
        };
        dial_right(
            &cfg,
            &key(),
            Instant::now() + Duration::from_millis(300),
            watch,
        )
    };
    assert!(member.is_err(), "the recorder never answered");
    let (hello, proof) = recorder.join().expect("recorder");
    // ...and replay them to rank 1 of a real ring of generation 3, as its left neighbour.
    let mut replay = TcpStream::connect(peers[1]).expect("connect");
    replay.write_all(&hello).expect("hello");
    let rings = thread::spawn(move || connect(listeners, &peers, &[3, 3], 1 << 20));
    let mut challenge = [0u8; 48];
    replay.read_exact(&mut challenge).expect("a challenge");
    replay.write_all(&proof).expect("proof");
    let heard = read_all(&mut replay, GREET + Duration::from_secs(1));
    assert!(heard.is_empty(), "the replay got an answer: {heard:?}");
    let rings: Vec<TcpRing> = rings
        .join()
        .expect("rings")
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect();
    assert_exact(rings, 2);
}
