#!/usr/bin/env bash
# A network-namespace lab: several "hosts" on one Linux machine, each a network namespace with a
# veth on one bridge, so that dapt's coordinator and workers talk over real addresses and a host
# can be cut off with iptables (a network partition) and healed. Needs root, iproute2 and
# iptables. tests/tests/partition.rs runs the partition scenario on it.
#
#   deploy/lab/netns.sh up TAG HOSTS   # bridge dbrTAG at 10.213.N.1/24 (N = TAG % 250), hosts
#                                      # daptTAGh0.. at 10.213.N.10, .11, ...; prints them
#   deploy/lab/netns.sh exec TAG I CMD...  # run CMD on host I
#   deploy/lab/netns.sh cut TAG I      # drop every packet in and out of host I
#   deploy/lab/netns.sh cut-link TAG I PEER_IP PORT  # on host I, drop only the TCP traffic with
#                                      # PEER_IP to or from PORT (a collective's port)
#   deploy/lab/netns.sh heal TAG I     # remove those rules
#   deploy/lab/netns.sh down TAG       # remove the hosts and the bridge
#
# For example, a coordinator on the bridge and a worker on each of three hosts:
#   deploy/lab/netns.sh up 7 3
#   DAPT_TOKEN=t dapt coordinator job.yaml --listen 10.213.7.1:7070 &
#   for i in 0 1 2; do DAPT_TOKEN=t deploy/lab/netns.sh exec 7 $i dapt-worker \
#     --coordinator http://10.213.7.1:7070 --job NAME --listen 10.213.7.1$i:29500 & done
#   deploy/lab/netns.sh cut 7 2; sleep 10; deploy/lab/netns.sh heal 7 2
set -euo pipefail

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 tag=$2
[[ $tag =~ ^[0-9]+$ ]] || { echo "netns.sh: TAG must be a number" >&2; exit 2; }
subnet=10.213.$((tag % 250))
bridge=dbr$tag
ns() { echo "dapt${tag}h$1"; }

case $cmd in
  up)
    hosts=${3:?netns.sh up TAG HOSTS}
    ip link add "$bridge" type bridge
    ip addr add "$subnet.1/24" dev "$bridge"
    ip link set "$bridge" up
    echo "gateway $subnet.1 ($bridge)"
    for ((i = 0; i < hosts; i++)); do
      n=$(ns "$i") outer=dv${tag}h$i inner=dp${tag}h$i
      ip netns add "$n"
      ip link add "$outer" type veth peer name "$inner"
      ip link set "$inner" netns "$n"
      ip link set "$outer" master "$bridge" up
      ip -n "$n" addr add "$subnet.$((10 + i))/24" dev "$inner"
      ip -n "$n" link set "$inner" up
      ip -n "$n" link set lo up
      echo "host $i $subnet.$((10 + i)) ($n)"
    done
    # iptables must work in there, or no partition can be made.
    ip netns exec "$(ns 0)" iptables -L -n >/dev/null
    ;;
  exec)
    i=${3:?netns.sh exec TAG I CMD...}
    shift 3
    exec ip netns exec "$(ns "$i")" "$@"
    ;;
  cut)
    i=${3:?netns.sh cut TAG I}
    ip netns exec "$(ns "$i")" iptables -A INPUT -j DROP
    ip netns exec "$(ns "$i")" iptables -A OUTPUT -j DROP
    ;;
  cut-link)
    i=${3:?netns.sh cut-link TAG I PEER_IP PORT} peer=${4:?PEER_IP} port=${5:?PORT}
    n=$(ns "$i")
    ip netns exec "$n" iptables -A INPUT -s "$peer" -p tcp --sport "$port" -j DROP
    ip netns exec "$n" iptables -A INPUT -s "$peer" -p tcp --dport "$port" -j DROP
    ip netns exec "$n" iptables -A OUTPUT -d "$peer" -p tcp --dport "$port" -j DROP
    ip netns exec "$n" iptables -A OUTPUT -d "$peer" -p tcp --sport "$port" -j DROP
    ;;
  heal)
    i=${3:?netns.sh heal TAG I}
    ip netns exec "$(ns "$i")" iptables -F
    ;;
  down)
    for n in $(ip netns list | awk '{print $1}' | grep -E "^dapt${tag}h[0-9]+$" || true); do
      ip netns del "$n"
    done
    ip link del "$bridge" 2>/dev/null || true
    ;;
  *) usage ;;
esac
