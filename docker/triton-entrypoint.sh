#!/usr/bin/env bash
# Entrypoint of the ivvae Triton image: export model artifacts from mounted weights when they
# are missing or stale, write a prepared copy of the model repository, then exec tritonserver.
#
#   triton-entrypoint.sh [serve] [tritonserver flags...]  export if needed, then run Triton
#   triton-entrypoint.sh export                          export if needed, then exit (k8s init)
#   triton-entrypoint.sh COMMAND [ARGS...]               run anything else as is (debugging)
#
# Environment (all optional; see docs/deploy.md):
#   WEIGHTS_FILE          file name under WEIGHTS_DIR (or an absolute path); empty: the only
#                         *.pth / *.pt / *.safetensors file in WEIGHTS_DIR
#   WEIGHTS_DIR           /weights, mounted read-only
#   ARTIFACT_ROOT         /artifacts, writable; artifacts live in ARTIFACT_ROOT/<fingerprint>/,
#                         the fingerprint covering the weights' bytes, format and ivvae code
#   ARTIFACT_FORMAT       torchscript | onnx                     (default torchscript)
#   PRECISION             float32 | bfloat16 | float16           (empty: the model config's)
#   SEQUENCE_TTL_S        idle sequence state lifetime, seconds  (empty: the model config's)
#   INSTANCE_KIND         KIND_GPU | KIND_CPU | KIND_AUTO        (empty: the model config's)
#   INSTANCE_COUNT        model instances per device             (empty: the model config's)
#   MODEL_REPOSITORY_SRC  committed repository   (default /opt/ivvae/model_repository)
#   MODEL_REPOSITORY      prepared copy          (default /tmp/model_repository)
#   TRITONSERVER_ARGS     extra tritonserver flags, separated by spaces
set -euo pipefail
# Without this, a failing command inside $(...) would not stop the function running there:
# a failed export would be marked complete.
shopt -s inherit_errexit

WEIGHTS_DIR="${WEIGHTS_DIR:-/weights}"
WEIGHTS_FILE="${WEIGHTS_FILE:-}"
ARTIFACT_ROOT="${ARTIFACT_ROOT:-/artifacts}"
ARTIFACT_FORMAT="${ARTIFACT_FORMAT:-torchscript}"
MODEL_REPOSITORY_SRC="${MODEL_REPOSITORY_SRC:-/opt/ivvae/model_repository}"
MODEL_REPOSITORY="${MODEL_REPOSITORY:-/tmp/model_repository}"
PYTHON="${PYTHON:-python3}"
HELPER="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/triton_prepare.py"

log() { printf '%s ivvae-triton: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() {
  log "error: $*"
  exit 64
}

# Print the weights file to use, or nothing when there is none (pre-exported artifacts only).
find_weights() {
  if [[ -n "${WEIGHTS_FILE}" ]]; then
    local path="${WEIGHTS_FILE}"
    [[ "${path}" == /* ]] || path="${WEIGHTS_DIR}/${path}"
    [[ -f "${path}" ]] || die "WEIGHTS_FILE=${WEIGHTS_FILE}: ${path} is not a file (is ${WEIGHTS_DIR} mounted?)"
    printf '%s\n' "${path}"
    return
  fi
  local found=()
  if [[ -d "${WEIGHTS_DIR}" ]]; then
    mapfile -t found < <(find "${WEIGHTS_DIR}" -maxdepth 1 -type f \
      \( -name '*.pth' -o -name '*.pt' -o -name '*.safetensors' \) | sort)
  fi
  if ((${#found[@]} > 1)); then
    die "${#found[@]} weights files in ${WEIGHTS_DIR}; set WEIGHTS_FILE to one of: ${found[*]##*/}"
  fi
  if ((${#found[@]} == 1)); then
    printf '%s\n' "${found[0]}"
  fi
}

# Print the directory holding artifacts for the current weights, exporting them first if needed.
ensure_artifacts() {
  local weights fingerprint target partial
  weights="$(find_weights)"
  mkdir -p "${ARTIFACT_ROOT}"
  if [[ -z "${weights}" ]]; then
    local complete=()
    mapfile -t complete < <(find "${ARTIFACT_ROOT}" -mindepth 2 -maxdepth 2 -name .complete \
      -printf '%h\n' | sort)
    ((${#complete[@]} == 1)) ||
      die "no weights in ${WEIGHTS_DIR} and ${#complete[@]} exported artifact sets in ${ARTIFACT_ROOT}; mount the weights and set WEIGHTS_FILE"
    log "no weights mounted; using pre-exported artifacts ${complete[0]}"
    printf '%s\n' "${complete[0]}"
    return
  fi

  fingerprint="$("${PYTHON}" "${HELPER}" fingerprint --weights "${weights}" --format "${ARTIFACT_FORMAT}")"
  target="${ARTIFACT_ROOT}/${fingerprint}"
  if [[ -f "${target}/.complete" ]]; then
    log "artifacts for ${weights##*/} (${ARTIFACT_FORMAT}) are current: ${target}"
  else
    log "exporting ${ARTIFACT_FORMAT} artifacts from ${weights} to ${target}"
    partial="$(mktemp -d "${ARTIFACT_ROOT}/.partial-XXXXXX")"
    # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
    trap "rm -rf '${partial}'" EXIT
    ivvae export --format "${ARTIFACT_FORMAT}" --weights "${weights}" --out "${partial}" >&2
    touch "${partial}/.complete"
    # rename(2) is atomic: a replica exporting to the same shared volume either wins or finds
    # the finished directory already there, never a half-written one.
    if ! mv -T "${partial}" "${target}" 2>/dev/null; then
      [[ -f "${target}/.complete" ]] || die "could not move the export into ${target}"
      log "another replica finished the same export first; using it"
      rm -rf "${partial}"
    fi
    trap - EXIT
  fi

  # Older fingerprints are stale; leftovers of crashed exports go after a day.
  find "${ARTIFACT_ROOT}" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
    -regex '.*/[0-9a-f]{16}' ! -path "${target}" -exec rm -rf {} +
  find "${ARTIFACT_ROOT}" -mindepth 1 -maxdepth 1 -type d -name '.partial-*' -mmin +1440 \
    -exec rm -rf {} +
  printf '%s\n' "${target}"
}

prepare_repository() {
  local artifact_dir="$1"
  local args=(repository --src "${MODEL_REPOSITORY_SRC}" --dst "${MODEL_REPOSITORY}"
    --set "ARTIFACT_DIR=${artifact_dir}" --set "ARTIFACT_FORMAT=${ARTIFACT_FORMAT}")
  [[ -z "${PRECISION:-}" ]] || args+=(--set "PRECISION=${PRECISION}")
  [[ -z "${SEQUENCE_TTL_S:-}" ]] || args+=(--set "SEQUENCE_TTL_S=${SEQUENCE_TTL_S}")
  [[ -z "${INSTANCE_KIND:-}" ]] || args+=(--instance-kind "${INSTANCE_KIND}")
  [[ -z "${INSTANCE_COUNT:-}" ]] || args+=(--instance-count "${INSTANCE_COUNT}")
  local models
  models="$("${PYTHON}" "${HELPER}" "${args[@]}")"
  log "model repository ${MODEL_REPOSITORY}: ${models}"
}

command="${1:-serve}"
case "${command}" in
  export)
    ensure_artifacts >/dev/null
    ;;
  serve | -*)
    [[ "${command}" == serve ]] && shift $(($# > 0 ? 1 : 0))
    artifact_dir="$(ensure_artifacts)"
    prepare_repository "${artifact_dir}"
    # The python models also read the directory from the environment.
    export IVVAE_ARTIFACT_DIR="${artifact_dir}"
    extra=()
    read -r -a extra <<<"${TRITONSERVER_ARGS:-}"
    exec tritonserver \
      --model-repository="${MODEL_REPOSITORY}" \
      --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
      --backend-config=python,shm-growth-byte-size=67108864 \
      "${extra[@]}" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
