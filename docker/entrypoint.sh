#!/usr/bin/env bash
# vitserve image entrypoint (after NGC's own): when the command is tritonserver, check every TensorRT plan
# of its model repository against this host's TensorRT and GPU first (`vitserve check-engines`), so a
# mismatch is a clear error naming both versions and how to rebuild, not Triton's deserialization failure.
# VITSERVE_SKIP_ENGINE_CHECK=1 skips the check.
set -euo pipefail
if [[ "${1:-}" == "tritonserver" && -z "${VITSERVE_SKIP_ENGINE_CHECK:-}" ]]; then
    repos=()
    args=("$@")
    for ((i = 1; i < ${#args[@]}; i++)); do
        case "${args[$i]}" in
            --model-repository=* | --model-store=*) repos+=("${args[$i]#*=}") ;;
            --model-repository | --model-store) repos+=("${args[$((i + 1))]:-}") ;;
        esac
    done
    for repo in "${repos[@]}"; do
        if [[ "$repo" == *://* ]]; then
            echo "vitserve: $repo is remote; plans there are not checked before serving" >&2
        else
            vitserve check-engines --repository "$repo"
        fi
    done
fi
exec "$@"
