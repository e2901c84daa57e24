#!/usr/bin/env bash
# The secrets deploy/k8s needs, made fresh for one deployment (nothing secret ships in the
# manifests): the job's token and a private CA with the certificates of etcd, the coordinator
# and the clients (workers, `dapt status`, the coordinator's own etcd client).
#
#   deploy/k8s/make-secrets.sh [--files-only] [DIR]        (DIR default: ./dapt-secrets)
#
# Writes into DIR (mode 0700; refuses a DIR that exists and is not empty):
#   token                     the job's token: 48 random bytes as hex (dapt needs >= 32 chars)
#   ca.crt, ca.key            the CA; keep ca.key offline, it is in no Secret
#   etcd.crt, etcd.key        etcd members (server and peer): *.dapt-etcd[.NS.svc[.cluster.local]]
#   coordinator.crt/.key      the coordinator: dapt-coordinator[.NS.svc[.cluster.local]],
#                             localhost, 127.0.0.1 (its readiness probe)
#   client.crt, client.key    CN=dapt: what workers present to etcd and to the coordinator
#   etcd-root-password        etcd's root user (only the etcd-auth.yaml Job reads it)
#   etcd-dapt-password        etcd's `dapt` user, limited to the job's keys (coordinator, workers)
# then, unless --files-only, creates the Secrets dapt-token, dapt-etcd-tls,
# dapt-coordinator-tls, dapt-client-tls, dapt-etcd-root and dapt-etcd-user with kubectl in namespace $NAMESPACE (default: the
# current context's). Certificates are valid for DAPT_CERT_DAYS days (default 365).
set -euo pipefail

files_only=0
if [ "${1:-}" = "--files-only" ]; then files_only=1; shift; fi
dir=${1:-./dapt-secrets}
ns=${NAMESPACE:-$(kubectl config view --minify -o jsonpath='{..namespace}' 2>/dev/null || true)}
ns=${ns:-default}
days=${DAPT_CERT_DAYS:-365}

die() { echo "make-secrets: $*" >&2; exit 2; }
command -v openssl >/dev/null || die "needs the openssl command"
[ "$files_only" = 1 ] || command -v kubectl >/dev/null || die "needs kubectl (or --files-only)"
if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
  die "$dir exists and is not empty: give a new directory"
fi
mkdir -p "$dir" && chmod 700 "$dir"
cd "$dir"
umask 077

openssl rand -hex 48 | tr -d "\n" >token
openssl rand -hex 24 | tr -d "\n" >etcd-root-password
openssl rand -hex 24 | tr -d "\n" >etcd-dapt-password
openssl req -x509 -newkey rsa:3072 -nodes -keyout ca.key -out ca.crt -days "$days" \
  -subj "/CN=dapt-ca" 2>/dev/null

# cert NAME CN EKU SAN
cert() {
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$4" "$3" >"$1.ext"
  openssl req -newkey rsa:3072 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" \
    -days "$days" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
svc="svc.cluster.local"
cert etcd dapt-etcd serverAuth,clientAuth \
  "DNS:dapt-etcd,DNS:*.dapt-etcd,DNS:*.dapt-etcd.$ns.svc,DNS:*.dapt-etcd.$ns.$svc,DNS:localhost,IP:127.0.0.1"
cert coordinator dapt-coordinator serverAuth \
  "DNS:dapt-coordinator,DNS:dapt-coordinator.$ns.svc,DNS:dapt-coordinator.$ns.$svc,DNS:localhost,IP:127.0.0.1"
cert client dapt clientAuth "DNS:dapt"
rm -f ca.srl
echo "make-secrets: wrote $(pwd) (namespace $ns)" >&2

[ "$files_only" = 1 ] && exit 0
k() { kubectl --namespace "$ns" "$@"; }
k create secret generic dapt-token --from-file=token=token
k create secret generic dapt-etcd-tls \
  --from-file=ca.crt=ca.crt --from-file=tls.crt=etcd.crt --from-file=tls.key=etcd.key
k create secret generic dapt-coordinator-tls \
  --from-file=ca.crt=ca.crt --from-file=tls.crt=coordinator.crt --from-file=tls.key=coordinator.key
k create secret generic dapt-client-tls \
  --from-file=ca.crt=ca.crt --from-file=tls.crt=client.crt --from-file=tls.key=client.key
k create secret generic dapt-etcd-root --from-file=password=etcd-root-password
k create secret generic dapt-etcd-user --from-file=password=etcd-dapt-password
