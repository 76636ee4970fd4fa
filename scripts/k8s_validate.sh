#!/usr/bin/env bash
# Validates scripts/k8s_indexed_job.yaml against the Kubernetes Job schema with
# kubernetes-validate (PyPI; it ships the API's JSON schemas, so no cluster is needed), strictly:
# unknown fields are errors. It checks structure and types, not enum values or what a cluster
# would admit (e.g. backoffLimitPerIndex needs Kubernetes >= 1.29). Run by hand.
#
#   bash scripts/k8s_validate.sh [KUBERNETES_VERSION]    # default: the package's newest
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SDFIX_K8S_VENV:-/tmp/sdfix-k8s-validate}
[[ -x $venv/bin/kubernetes-validate ]] || {
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate
}
"$venv/bin/kubernetes-validate" --strict ${1:+-k "$1"} scripts/k8s_indexed_job.yaml
