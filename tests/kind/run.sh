#!/usr/bin/env bash
# End-to-end test of the seed scenario on two kind clusters joined by strait.
#
# What it does:
#   1. creates kind clusters `usa` (pods 10.1.0.0/16, services 10.96.0.0/16) and `europe`
#      (pods 10.2.0.0/16, services 10.97.0.0/16), without CNI and without kube-proxy;
#   2. builds the strait image (deploy/Containerfile) and loads it into both;
#   3. wires pod networking on each node (strait has no CNI plugin yet: the reference ptp +
#      host-local plugins that kind ships, and routes between the nodes of a cluster);
#   4. creates each cluster's kvstore certificates and Secrets, deploys deploy/crds and
#      deploy/overlays/kind (per-cluster name, ID and API server), then the clustermesh
#      Secrets (Cilium's layout) connecting the two;
#   5. applies the scenario: the global `payment-api` Service (affinity local) in both
#      clusters, and the `cross-cluster-db-access` CiliumNetworkPolicy in europe;
#   6. asserts: a usa client reaches payment-api, and still does (through europe) when usa's
#      backends are gone; the usa frontend reaches europe's database, another usa pod is dropped.
#
# Prerequisites (not available on strait's CI machines, which have no container engine):
#   - Linux host with Docker (or podman with KIND_EXPERIMENTAL_PROVIDER=podman), cgroup v2;
#   - kind >= 0.20, kubectl >= 1.27, openssl;
#   - ~8 GB RAM, ~20 min for the first image build.
# Run from anywhere:  tests/kind/run.sh        (KEEP=1 keeps the clusters afterwards)
# Exit status 0 = every assertion passed; the clusters are deleted on exit unless KEEP=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-strait:dev}"
ENGINE="${ENGINE:-docker}"
WORK="$(mktemp -d)"
CLUSTERS=(usa europe)
declare -A CLUSTER_NAME=([usa]=cluster-usa [europe]=cluster-europe)
declare -A CLUSTER_ID=([usa]=1 [europe]=2)
declare -A POD_CIDR=([usa]=10.1.0.0/16 [europe]=10.2.0.0/16)
declare -A SVC_CIDR=([usa]=10.96.0.0/16 [europe]=10.97.0.0/16)
declare -A CP_IP=()

log() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
kc() { local c="$1"; shift; kubectl --context "kind-$c" "$@"; }

cleanup() {
    local rc=$?
    if [[ "${KEEP:-0}" != 1 ]]; then
        for c in "${CLUSTERS[@]}"; do kind delete cluster --name "$c" >/dev/null 2>&1 || true; done
    fi
    rm -rf "$WORK"
    if [[ $rc -eq 0 ]]; then echo "kind e2e: all assertions passed"; else echo "kind e2e: FAILED ($rc)"; fi
}
trap cleanup EXIT

for tool in kind kubectl openssl "$ENGINE"; do
    command -v "$tool" >/dev/null || fail "$tool is required (see the header of $0)"
done

# Retries "$@" until it succeeds or $1 seconds pass.
retry() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 3
    done
}

create_cluster() {
    local c="$1"
    cat >"$WORK/kind-$c.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: $c
networking:
  disableDefaultCNI: true
  kubeProxyMode: none
  podSubnet: ${POD_CIDR[$c]}
  serviceSubnet: ${SVC_CIDR[$c]}
nodes:
- role: control-plane
- role: worker
EOF
    kind create cluster --config "$WORK/kind-$c.yaml" --wait 0s
    CP_IP[$c]="$($ENGINE inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$c-control-plane")"
}

# Pod plumbing strait does not do yet: bpffs, a ptp CNI config from the node's podCIDR, and
# routes to the other nodes' pod CIDRs of the same cluster.
wire_nodes() {
    local c="$1" node cidr ip other ocidr oip
    for node in $(kind get nodes --name "$c"); do
        $ENGINE exec "$node" sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf'
        cidr="$(kc "$c" get node "$node" -o jsonpath='{.spec.podCIDR}')"
        [[ -n "$cidr" ]] || fail "$node has no podCIDR"
        $ENGINE exec -i "$node" sh -c 'mkdir -p /etc/cni/net.d && cat > /etc/cni/net.d/10-strait-ptp.conflist' <<EOF
{"cniVersion": "0.4.0", "name": "strait", "plugins": [
  {"type": "ptp", "ipMasq": false, "mtu": 1420,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
        for other in $(kind get nodes --name "$c"); do
            [[ "$other" == "$node" ]] && continue
            ocidr="$(kc "$c" get node "$other" -o jsonpath='{.spec.podCIDR}')"
            oip="$($ENGINE inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$other")"
            $ENGINE exec "$node" ip route replace "$ocidr" via "$oip"
        done
        ip="$($ENGINE inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$node")"
        echo "$node: podCIDR $cidr, IP $ip"
    done
}

# A CA per cluster kvstore; a server cert for its control-plane IP; client certs.
make_certs() {
    # Two `local`s: one line would expand $c before assigning it (both clusters one PKI).
    local c="$1"
    local d="$WORK/pki-$c"
    mkdir -p "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=strait-kvstore-$c-ca" \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    printf 'subjectAltName=IP:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "${CP_IP[$c]}" >"$d/server.ext"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=strait-kvstore" -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
        -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
    # CN = etcd user (deploy/README.md): kvstoremesh, agents, remote clusters.
    for who in "admin-${CLUSTER_NAME[$c]}" "agent-${CLUSTER_NAME[$c]}" remote; do
        printf 'extendedKeyUsage=clientAuth\n' >"$d/$who.ext"
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$who" -keyout "$d/$who.key" -out "$d/$who.csr" 2>/dev/null
        openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
            -extfile "$d/$who.ext" -out "$d/$who.crt" 2>/dev/null
    done
}

deploy_strait() {
    local c="$1"
    local d="$WORK/pki-$c" o="$WORK/overlay-$c"
    kc "$c" apply -k "$ROOT/deploy/crds"
    kc "$c" -n kube-system create secret generic strait-kvstore-server \
        --from-file=ca.crt="$d/ca.crt" --from-file=tls.crt="$d/server.crt" --from-file=tls.key="$d/server.key"
    cat >"$d/etcd-config.yaml" <<EOF
endpoints:
- https://${CP_IP[$c]}:32379
trusted-ca-file: /etc/strait/kvstore/ca.crt
cert-file: /etc/strait/kvstore/tls.crt
key-file: /etc/strait/kvstore/tls.key
EOF
    kc "$c" -n kube-system create secret generic strait-kvstore-client \
        --from-file=etcd-config.yaml="$d/etcd-config.yaml" --from-file=ca.crt="$d/ca.crt" \
        --from-file=tls.crt="$d/agent-${CLUSTER_NAME[$c]}.crt" --from-file=tls.key="$d/agent-${CLUSTER_NAME[$c]}.key"
    kc "$c" -n kube-system create secret generic strait-kvstore-admin \
        --from-file=etcd-config.yaml="$d/etcd-config.yaml" --from-file=ca.crt="$d/ca.crt" \
        --from-file=tls.crt="$d/admin-${CLUSTER_NAME[$c]}.crt" --from-file=tls.key="$d/admin-${CLUSTER_NAME[$c]}.key"

    # Per-cluster layer over deploy/overlays/kind.
    mkdir -p "$o"
    cat >"$o/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $(realpath --relative-to="$o" "$ROOT/deploy/overlays/kind")
patches:
- path: configmap.yaml
- target: {kind: Deployment, name: strait-kvstoremesh}
  patch: |-
    - op: replace
      path: /spec/template/spec/containers/1/env/3/value
      value: https://$c-control-plane:6443
EOF
    cat >"$o/configmap.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata: {name: strait-config, namespace: kube-system}
data:
  cluster-name: ${CLUSTER_NAME[$c]}
  cluster-id: "${CLUSTER_ID[$c]}"
  config.yaml: |
    cluster: {name: ${CLUSTER_NAME[$c]}, id: ${CLUSTER_ID[$c]}}
    node: {}
    kvstoreConfig: /etc/strait/kvstore/etcd-config.yaml
    kubernetes: {source: api, apiServer: "https://$c-control-plane:6443"}
    wireguard: {enabled: true, backend: auto, strict: true, strictCIDRs: [10.1.0.0/16, 10.2.0.0/16]}
EOF
    kubectl kustomize "$o" | grep -q "https://$c-control-plane:6443" || fail "overlay for $c did not render its API server"
    kc "$c" apply -k "$o"
    kc "$c" -n kube-system rollout status deployment/strait-kvstoremesh --timeout=300s
    kc "$c" -n kube-system rollout status daemonset/strait-agent --timeout=300s
}

# Cilium's cilium-clustermesh layout: key <remote> = its etcd config, plus the client files.
connect() {
    local c="$1" r="$2" rd="$WORK/pki-$2" dir=/var/lib/cilium/clustermesh name secret
    name="${CLUSTER_NAME[$r]}"
    cat >"$WORK/$c-to-$r" <<EOF
endpoints:
- https://${CP_IP[$r]}:32379
trusted-ca-file: $dir/$name.etcd-client-ca.crt
cert-file: $dir/$name.etcd-client.crt
key-file: $dir/$name.etcd-client.key
EOF
    for secret in cilium-clustermesh strait-kvstoremesh; do
        kc "$c" -n kube-system create secret generic "$secret" \
            --from-file="$name=$WORK/$c-to-$r" \
            --from-file="$name.etcd-client-ca.crt=$rd/ca.crt" \
            --from-file="$name.etcd-client.crt=$rd/remote.crt" \
            --from-file="$name.etcd-client.key=$rd/remote.key"
    done
    # Secret volumes that were absent at pod start appear only in new pods.
    kc "$c" -n kube-system rollout restart daemonset/strait-agent deployment/strait-kvstoremesh
    kc "$c" -n kube-system rollout status daemonset/strait-agent --timeout=300s
}

scenario() {
    local c="$1"
    kc "$c" apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: payment-api}
spec:
  replicas: 2
  selector: {matchLabels: {app: payment-api}}
  template:
    metadata: {labels: {app: payment-api}}
    spec:
      containers:
      - name: api
        image: registry.k8s.io/e2e-test-images/agnhost:2.53
        args: [netexec, --http-port=8080]
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: payment-api
  annotations:
    service.cilium.io/global: "true"
    service.cilium.io/affinity: "local"
spec:
  type: ClusterIP
  selector:
    app: payment-api
  ports:
  - port: 8080
EOF
}

log "creating clusters"
for c in "${CLUSTERS[@]}"; do create_cluster "$c"; done

log "building and loading $IMAGE"
$ENGINE build -f "$ROOT/deploy/Containerfile" -t "$IMAGE" "$ROOT"
for c in "${CLUSTERS[@]}"; do kind load docker-image "$IMAGE" --name "$c"; done

for c in "${CLUSTERS[@]}"; do
    log "wiring pod networking in $c"
    wire_nodes "$c"
    log "deploying strait to $c"
    make_certs "$c"
    deploy_strait "$c"
done

log "connecting the clusters (clustermesh secrets)"
connect usa europe
connect europe usa

log "scenario workloads"
for c in "${CLUSTERS[@]}"; do scenario "$c"; done
kc europe apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: database, labels: {app: database}}
spec:
  containers:
  - {name: db, image: registry.k8s.io/e2e-test-images/agnhost:2.53, args: [netexec, --http-port=5432]}
---
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: cross-cluster-db-access
spec:
  endpointSelector:
    matchLabels:
      app: database
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
        io.cilium.k8s.policy.cluster: cluster-usa
EOF
kc usa apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: frontend, labels: {app: frontend}}
spec:
  containers: [{name: c, image: busybox:1.36, command: [sleep, "36000"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: other}}
spec:
  containers: [{name: c, image: busybox:1.36, command: [sleep, "36000"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  containers: [{name: c, image: busybox:1.36, command: [sleep, "36000"]}]
EOF
for c in "${CLUSTERS[@]}"; do kc "$c" wait --for=condition=Ready pod --all --timeout=300s; done

VIP="$(kc usa get service payment-api -o jsonpath='{.spec.clusterIP}')"
DB_IP="$(kc europe get pod database -o jsonpath='{.status.podIP}')"
fetch() { kc usa exec "$1" -- wget -q -T 5 -O - "$2"; }

log "assert: usa client reaches payment-api ($VIP)"
retry 120 fetch client "http://$VIP:8080/hostname" || fail "usa client cannot reach payment-api"

log "assert: with usa's backends gone, payment-api is served by europe"
kc usa scale deployment/payment-api --replicas=0
kc usa wait --for=delete pod -l app=payment-api --timeout=120s
europe_pods="$(kc europe get pods -l app=payment-api -o jsonpath='{.items[*].metadata.name}')"
served_by_europe() {
    local host
    host="$(fetch client "http://$VIP:8080/hostname")" || return 1
    [[ " $europe_pods " == *" $host "* ]]
}
retry 120 served_by_europe || fail "payment-api did not fail over to europe"
kc usa scale deployment/payment-api --replicas=2

log "assert: the usa frontend reaches europe's database ($DB_IP)"
retry 120 fetch frontend "http://$DB_IP:5432/hostname" || fail "frontend cannot reach the database"

log "assert: another usa pod is dropped by cross-cluster-db-access"
for _ in 1 2 3; do
    if fetch other "http://$DB_IP:5432/hostname" >/dev/null 2>&1; then
        fail "pod app=other reached the database despite the policy"
    fi
done
echo "app=other: dropped (3 of 3 attempts timed out)"
