//! The connection caps and the first-request deadline.

use super::*;

const LIMITS: Limits = Limits {
    per_address: 2,
    total: 3,
};

#[test]
fn an_address_gets_its_share_and_all_together_the_total() {
    assert_eq!(judge(LIMITS, 0, 0), Verdict::Admit);
    assert_eq!(judge(LIMITS, 1, 2), Verdict::Admit);
    assert_eq!(judge(LIMITS, 2, 2), Verdict::AddressFull);
    assert_eq!(judge(LIMITS, 0, 3), Verdict::Full);
}

#[test]
fn places_are_given_back_and_a_mapped_address_is_its_ipv4_one() {
    let places = Places::new(LIMITS);
    let v4: SocketAddr = "10.0.0.1:5".parse().expect("address");
    let mapped: SocketAddr = "[::ffff:10.0.0.1]:6".parse().expect("address");
    let other: SocketAddr = "10.0.0.2:5".parse().expect("address");
    let a = places.take(canonical(&v4)).expect("first");
    let b = places.take(canonical(&mapped)).expect("second");
    assert_eq!(
        places.take(canonical(&v4)).err(),
        Some(Verdict::AddressFull)
    );
    let c = places.take(canonical(&other)).expect("another address");
    assert_eq!(places.take(canonical(&other)).err(), Some(Verdict::Full));
    drop((a, c));
    assert_eq!(places.held(canonical(&v4)), (1, 1));
    drop(b);
    assert_eq!(places.held(canonical(&v4)), (0, 0));
    assert!(places.counts.lock().expect("counts").per_address.is_empty());
}

#[test]
fn the_caps_stay_below_the_descriptor_limit() {
    assert_eq!(Limits::grpc(1024).total, 512);
    assert_eq!(Limits::metrics(1024).total, 128);
    assert_eq!(Limits::grpc(1 << 20).total, 4096);
    assert_eq!(Limits::grpc(u64::MAX).total, 4096);
    assert_eq!(Limits::metrics(64).total, 16);
}

#[tokio::test]
async fn a_silent_connection_fails_its_read_after_the_deadline_and_a_used_one_does_not() {
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = Limits {
        per_address: 1,
        total: 8,
    };
    let mut incoming = Incoming::new(listener, limits, Some(Duration::from_millis(200)), "test");
    let _silent = TcpStream::connect(addr).await.expect("connect");
    let mut silent = incoming.next().await.expect("some").expect("accepted");
    // Its address has its one place: the next connection from it is closed at once.
    let mut refused = TcpStream::connect(addr).await.expect("connect");
    let accept_more = tokio::time::timeout(Duration::from_millis(300), incoming.next());
    assert!(accept_more.await.is_err(), "nothing more admitted");
    let mut byte = [0u8; 1];
    let bound = Duration::from_secs(10);
    let read = tokio::time::timeout(bound, refused.read(&mut byte)).await;
    assert_eq!(read.expect("closed in time").expect("closed"), 0);
    let read = tokio::time::timeout(bound, silent.read(&mut byte)).await;
    let err = read.expect("in time").expect_err("timed out");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    drop(silent);
    let _used = TcpStream::connect(addr).await.expect("connect");
    let mut used = incoming.next().await.expect("some").expect("accepted");
    used.connection().used();
    let read = tokio::time::timeout(Duration::from_millis(500), used.read(&mut byte));
    assert!(
        read.await.is_err(),
        "still waiting for data after the deadline"
    );
}

#[test]
fn running_out_of_descriptors_is_told_from_other_accept_errors() {
    for errno in [libc::EMFILE, libc::ENFILE] {
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(errno)));
    }
    for errno in [libc::ECONNABORTED, libc::EINTR] {
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(errno)));
    }
}

/// A loopback peer is counted under the user that owns its socket, found in the kernel's table:
/// every process of a host dials from 127.0.0.1, and a local user's 64 connections locked the
/// workers out (an audit).
#[test]
fn a_loopback_peer_is_counted_under_its_user() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
    let (server, peer) = listener.accept().expect("accept");
    assert_eq!(peer, client.local_addr().expect("client addr"));
    let local = server.local_addr().expect("server addr");
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(local_peer_uid(&peer, &local), Some(euid));
    let key = PeerKey::of(&peer, Some(local));
    assert_eq!(key.uid, Some(euid));
    // Over IPv6, and an IPv4 client of a dual-stack listener, where the host has IPv6.
    for (listen, dial) in [("[::1]:0", "::1"), ("[::]:0", "127.0.0.1")] {
        let Ok(listener) = std::net::TcpListener::bind(listen) else {
            continue;
        };
        let port = listener.local_addr().expect("addr").port();
        let Ok(client) = std::net::TcpStream::connect((dial, port)) else {
            continue;
        };
        let (server, peer) = listener.accept().expect("accept");
        let local = server.local_addr().expect("server addr");
        assert_eq!(
            local_peer_uid(&peer, &local),
            Some(euid),
            "{listen} {dial}: {peer} -> {local}"
        );
        drop(client);
    }
    // A process dialling this host's own address (a listener on 0.0.0.0, workers on the same
    // node) is on this host too.
    let own = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|u| u.connect("10.255.255.254:9").map(|()| u))
        .and_then(|u| u.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback());
    if let Some(own) = own {
        let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = std::net::TcpStream::connect((own, port)).expect("dial");
        let (server, peer) = listener.accept().expect("accept");
        let local = server.local_addr().expect("server addr");
        assert_eq!(
            PeerKey::of(&peer, Some(local)).uid,
            Some(euid),
            "{peer} -> {local}"
        );
        drop(client);
    }
    // A remote address is not looked up.
    let remote: SocketAddr = "10.1.2.3:4000".parse().expect("addr");
    assert_eq!(PeerKey::of(&remote, Some(local)).uid, None);

    // Two users of one address hold places of their own.
    let places = Places::new(LIMITS);
    let ip = canonical(&peer);
    let mallory = PeerKey {
        ip,
        uid: Some(4242),
    };
    let _a = places.take(mallory).expect("first");
    let _b = places.take(mallory).expect("second");
    assert_eq!(places.take(mallory).err(), Some(Verdict::AddressFull));
    let _ours = places.take(key).expect("this user's own place");
}
