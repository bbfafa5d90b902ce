#!/usr/bin/env bash
# vitserve image entrypoint, run by NGC's own (/opt/nvidia/nvidia_entrypoint.sh, the image's ENTRYPOINT
# before this one, which then execs us). When the command is tritonserver, check every TensorRT plan of its
# model repositories against this host's TensorRT and GPU first (`vitserve check-engines`), so a mismatch
# is a clear error naming both versions and how to rebuild, not Triton's deserialization failure:
#   - a local repository: each plan's bytes and provenance against vitserve-manifest.json;
#   - an s3:// repository (Kubernetes): the published vitserve-manifest.json read from S3, every plan
#     listed there checked against this host (credentials and endpoint as tritonserver gets them).
# Plain tritonserver arguments (`--model-repository=...`, as a Kubernetes `args:` gives them) run
# tritonserver. VITSERVE_SKIP_ENGINE_CHECK=1 skips the check.
set -euo pipefail
if [[ "${1:-}" == -* ]]; then
    set -- tritonserver "$@"
fi
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
        if [[ "$repo" == *://* && "$repo" != s3://* ]]; then
            echo "vitserve: $repo is neither local nor s3://; its plans are not checked before serving" >&2
        else
            vitserve check-engines --repository "$repo"
        fi
    done
fi
exec "$@"
