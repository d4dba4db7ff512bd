#!/usr/bin/env bash
# Test credentials for a TLS federation with SuperNode authentication (for tests and trials, not production):
# a CA, a SuperLink certificate signed by it for 127.0.0.1/localhost (plus SAN, e.g. SAN=IP:10.0.0.5,DNS:link.lan),
# and one ECDSA P-384 key pair per SuperNode in OpenSSH format (node-<i>, node-<i>.pub), which Flower requires.
#   usage: scripts/make_certs.sh DIR [NODES]
set -euo pipefail
out=${1:?usage: make_certs.sh DIR [NODES]}
nodes=${2:-2}
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "make_certs.sh: ssh-keygen (openssh-client) not found" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 30 -keyout ca.key -out ca.crt \
  -subj "/CN=florana test CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
printf "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost%s\n" "${SAN:+,$SAN}" > server.ext
openssl x509 -req -sha256 -days 30 -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem \
  -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
for i in $(seq 0 $((nodes - 1))); do
  rm -f "node-$i" "node-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "florana-node-$i" -f "node-$i"
done
chmod 600 ca.key server.key node-*[0-9]
echo "wrote $(pwd): ca.crt server.pem server.key, node-0..node-$((nodes - 1)) (+ .pub)"
