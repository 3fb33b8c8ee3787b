#!/usr/bin/env bash
# The deployment files under their validators (all from the dev extra, offline):
# hadolint for the Dockerfile, the compose specification's schema and compose's own
# `config` for compose.yaml, kubernetes-validate --strict for the manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}

"$BIN/hadolint" docker/Dockerfile
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker/compose.yaml
# The real compose binary: the package's console script always exits 0.
COMPOSE=$("$BIN/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')
"$COMPOSE" -f docker/compose.yaml --profile maintenance config --quiet
# Every resource; kustomization.yaml is kustomize's, not a Kubernetes resource.
find docker/k8s -name '*.yaml' ! -name kustomization.yaml -print0 | sort -z \
    | xargs -0 "$BIN/kubernetes-validate" --strict --quiet
echo "deployment files: hadolint, compose schema, compose config, kubernetes-validate --strict: clean"
