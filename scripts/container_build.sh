#!/usr/bin/env bash
# Build the privacy-vault image with podman, on a machine with no Docker engine and no
# registry: a minimal Debian bookworm base made with mmdebstrap (python3, venv,
# ca-certificates) and imported into podman, then docker/Dockerfile on top of it.
#
#   scripts/container_build.sh            # builds $PRIVACY_VAULT_IMAGE (localhost/privacy-vault:ci)
#
# The base tarball is cached in $PRIVACY_VAULT_IMAGE_CACHE (/var/cache/privacy-vault),
# keyed by the hash of its recipe and of the apt sources it came from. Package
# sources, pip's index and CA bundle come from this machine's configuration; none of
# them is written into the repository or into a layer of the image.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${PRIVACY_VAULT_IMAGE:-localhost/privacy-vault:ci}
CACHE=${PRIVACY_VAULT_IMAGE_CACHE:-/var/cache/privacy-vault}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/containers.conf}

for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install podman runc mmdebstrap)" >&2; exit 2; }
done

# --- the base: minimal Debian with Python, cached by recipe ------------------------
SOURCES=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && SOURCES+=("$f")
done
[ "${#SOURCES[@]}" -gt 0 ] || { echo "no apt sources on this machine" >&2; exit 2; }
RECIPE=(
    --variant=minbase
    --include=python3,python3-venv,ca-certificates
    --aptopt='Acquire::Check-Valid-Until "false"'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
    bookworm
)
KEY=$( { printf '%s\n' "${RECIPE[@]}"; cat "${SOURCES[@]}"; } | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-bookworm-$KEY.tar
BASE_IMAGE=localhost/privacy-vault-base:$KEY

started=$(date +%s)
mkdir -p "$CACHE"
if [ ! -s "$BASE_TAR" ]; then
    echo "== base: mmdebstrap (recipe $KEY, not cached)"
    rm -f "$CACHE"/base-bookworm-*.tar  # older recipes
    # Each apt source file of this machine is a mirror argument (no host name here).
    mmdebstrap --quiet --format=tar "${RECIPE[@]}" "$BASE_TAR.part" "${SOURCES[@]}" </dev/null
    mv "$BASE_TAR.part" "$BASE_TAR"
else
    echo "== base: cached ($BASE_TAR)"
fi
if ! podman image exists "$BASE_IMAGE"; then
    podman import --quiet "$BASE_TAR" "$BASE_IMAGE" >/dev/null
fi
echo "   base ready in $(($(date +%s) - started)) s"

# --- the image ---------------------------------------------------------------------
ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# pip's index, when this machine sets one (a build arg of the build stage only).
INDEX=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
[ -n "$INDEX" ] && ARGS+=(--build-arg "PIP_INDEX_URL=$INDEX")
# pip's CA bundle, as a build secret: it never lands in a layer.
CA=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$CA" ] && ARGS+=(--secret "id=ca,src=$CA")

built=$(date +%s)
echo "== image: $IMAGE"
# chroot isolation and host networking: no nested namespaces, no podman bridge.
podman build --runtime runc --isolation chroot --network host --format docker \
    "${ARGS[@]}" -f docker/Dockerfile -t "$IMAGE" .
echo "   built in $(($(date +%s) - built)) s; size $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
echo "   total $(($(date +%s) - started)) s"
