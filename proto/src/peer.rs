//! Who is at the other end of a TCP connection accepted from this host: the user owning the
//! peer's socket, as the kernel's socket diagnostics (`sock_diag`, what `ss` reads) give it for
//! that one socket.
//!
//! Every process of a host dials from 127.0.0.1 (or the host's own address): counted by address
//! alone, another local user's silent connections took the places of `dapt launch`'s workers on
//! the coordinator and of the left neighbour on the ring (audits). Counted per user, a stranger
//! holds only their own places. The lookup is one netlink request for the connection's four
//! addresses (the kernel's hash lookup, `inet_diag_find_one_icsk`): it costs the same however
//! many sockets the host has. Reading `/proc/net/tcp` for it, as before, scaled with them: a
//! stranger who grew the table to 100k TIME_WAIT entries and reset connections at 20 per second
//! stalled the coordinator's accept loop until a healthy worker was declared lost (an audit).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// How long the kernel's answer is waited for (it answers at once; a bound all the same, as
/// the lookup runs on an accept path).
const ANSWER: Duration = Duration::from_millis(100);

/// The address a peer is counted under: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
/// dual-stack listener sees of an IPv4 client) is its IPv4 address.
pub fn canonical(peer: &SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

/// What a connection is counted under: its [`canonical`] address and, from this host, the user
/// that owns the peer's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub ip: IpAddr,
    /// The owner of the peer's socket, for a peer on this host whose socket was found
    /// ([`local_peer_uid`]).
    pub uid: Option<u32>,
}

impl From<IpAddr> for PeerKey {
    fn from(ip: IpAddr) -> Self {
        PeerKey { ip, uid: None }
    }
}

impl PeerKey {
    /// The key of an accepted connection from `peer` to this host's `local` address: a peer on
    /// this host (loopback, or this host's own address, which a process dialling the host's IP
    /// comes from: `--listen 0.0.0.0` with workers on the same node) is looked up.
    pub fn of(peer: &SocketAddr, local: Option<SocketAddr>) -> Self {
        let ip = canonical(peer);
        let uid = match local {
            Some(local) if on_this_host(peer, &local) => local_peer_uid(peer, &local),
            _ => None,
        };
        PeerKey { ip, uid }
    }
}

/// Whether a connection from `peer` accepted at `local` comes from this host.
pub fn on_this_host(peer: &SocketAddr, local: &SocketAddr) -> bool {
    let ip = canonical(peer);
    ip.is_loopback() || canonical(local) == ip
}

/// The user owning the socket at `peer` (on this host) that is connected to `local`: the kernel's
/// `sock_diag` answer for the socket whose own address is `peer` and whose remote one is
/// `local`. `None` where there is none (the peer already closed, another network namespace, a
/// kernel without `sock_diag`).
pub fn local_peer_uid(peer: &SocketAddr, local: &SocketAddr) -> Option<u32> {
    let (source, destination) = (canonical(peer), canonical(local));
    // An IPv4 pair is looked up as IPv4 whatever the sockets' family: the kernel keeps a
    // dual-stack socket connected to an IPv4 peer in the IPv4 lookup too.
    let family = match (source, destination) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => return None,
    };
    let id = SocketId {
        source_port: peer.port(),
        destination_port: local.port(),
        source_address: source,
        destination_address: destination,
        interface_id: 0,
        // INET_DIAG_NOCOOKIE: any socket with these addresses.
        cookie: [0xff; 8],
    };
    query(family, id)
}

fn query(family: u8, socket_id: SocketId) -> Option<u32> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).ok()?;
    socket.bind_auto().ok()?;
    socket.connect(&NetlinkAddr::new(0, 0)).ok()?;
    rustix::net::sockopt::set_socket_timeout(
        &socket,
        rustix::net::sockopt::Timeout::Recv,
        Some(ANSWER),
    )
    .ok()?;
    let mut header = NetlinkHeader::default();
    // One socket, not a dump: the kernel looks the four addresses up in its hash.
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0).ok()?;
    let mut answer = vec![0u8; 4096];
    let n = socket.recv(&mut &mut answer[..], 0).ok()?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(answer.get(..n)?).ok()?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Some(response.header.uid)
        }
        // NLMSG_ERROR (ENOENT: no such socket) and anything else.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A loopback connection's peer socket is found and is this process's user's; a connection
    /// from another user is tested over the real binaries (tests/tests/security.rs, as root).
    #[test]
    fn a_loopback_peer_is_this_user() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        for host in ["127.0.0.1", "[::1]"] {
            let Ok(listener) = TcpListener::bind(format!("{host}:0")) else {
                continue;
            };
            let local = listener.local_addr().expect("addr");
            let dialer = TcpStream::connect(local).expect("connect");
            let (_accepted, peer) = listener.accept().expect("accept");
            assert_eq!(peer, dialer.local_addr().expect("addr"));
            assert_eq!(local_peer_uid(&peer, &local), Some(euid), "{host}");
            assert_eq!(PeerKey::of(&peer, Some(local)).uid, Some(euid), "{host}");
            // No socket has these addresses: none.
            let mut gone = peer;
            gone.set_port(if peer.port() == 1 { 2 } else { 1 });
            assert_eq!(local_peer_uid(&gone, &local), None, "{host}");
        }
    }

    /// A peer on another host is not looked up (its socket is not in this kernel).
    #[test]
    fn a_remote_peer_has_no_user() {
        let local: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let remote: SocketAddr = "10.0.0.2:40000".parse().expect("addr");
        assert_eq!(PeerKey::of(&remote, Some(local)).uid, None);
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().expect("addr");
        assert_eq!(
            canonical(&mapped),
            "127.0.0.1".parse::<IpAddr>().expect("ip")
        );
    }
}
