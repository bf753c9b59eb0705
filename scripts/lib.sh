# Shared helpers for scripts/demo and scripts/test. Sourced, not run.
set -euo pipefail

VIVA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Persistent cache outside the clone: cargo target dir and model files.
VIVA_CACHE="${VIVA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/viva}"
export VIVA_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$VIVA_CACHE/target}"
mkdir -p "$VIVA_CACHE"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# Installs Debian/Ubuntu packages that are missing (idempotent).
ensure_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing ${missing[*]} (apt)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with your package manager"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_rust() {
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
}
