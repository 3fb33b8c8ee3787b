#!/usr/bin/env bash
# Development material for docker/compose.yaml (never for production): a test CA, a
# server certificate for server-1/server-2/localhost, one caller's client certificate
# (SPIFFE ID spiffe://example.org/ns/dev/sa/client), a PostgreSQL password, the
# database URL, an admin token, and callers.toml from docker/k8s/callers.toml with
# the dev caller allowed. Files are made readable by uid 10001 (the image's user).
# git ignores everything written here.
set -euo pipefail
cd "$(dirname "$0")"
umask 077
mkdir -p secrets tls
[ -s secrets/postgres-password ] || openssl rand -hex 24 > secrets/postgres-password
printf 'postgresql://privacy_vault:%s@postgres:5432/privacy_vault\n' \
    "$(cat secrets/postgres-password)" > secrets/database-url
[ -s secrets/admin-token ] || openssl rand -base64 36 | tr '+/' '-_' | tr -d '=\n' > secrets/admin-token

if [ ! -s tls/ca.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
        -subj "/CN=privacy-vault dev CA" -keyout tls/ca.key -out tls/ca.crt 2>/dev/null
    issue() {  # name, subjectAltName, extendedKeyUsage
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
            -keyout "tls/$1.key" -out "tls/$1.csr" 2>/dev/null
        openssl x509 -req -in "tls/$1.csr" -CA tls/ca.crt -CAkey tls/ca.key -CAcreateserial \
            -days 90 -out "tls/$1.crt" \
            -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$2" "$3") 2>/dev/null
        rm "tls/$1.csr"
    }
    # The server's pair is also what `privacy-vault health` presents under mTLS.
    issue server "DNS:server-1,DNS:server-2,DNS:localhost,IP:127.0.0.1,URI:spiffe://example.org/ns/privacy-vault/sa/server" serverAuth,clientAuth
    issue client "URI:spiffe://example.org/ns/dev/sa/client" clientAuth
fi
if [ ! -s callers.toml ]; then
    cp k8s/callers.toml callers.toml
    cat >> callers.toml <<'TOML'

[[caller]]
identity    = "spiffe://example.org/ns/dev/sa/client"
description = "development client (docker/tls/client.crt)"
# GetMember for MEMBER_REQUEST and EndSession need the session Authenticate returned,
# sent as x-member-session.
methods     = ["MemberService/SignUp", "MemberService/Authenticate",
               "MemberService/GetMember", "MemberService/EndSession"]
purposes    = ["IDENTIFICATION", "MEMBER_REQUEST"]
TOML
fi
chmod 0644 callers.toml tls/*.crt
# PostgreSQL's entrypoint reads its password file as the postgres user (uid 999).
chmod 0444 secrets/postgres-password
OURS=(secrets/database-url secrets/admin-token tls/server.key)
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "${OURS[@]}" && chmod 0400 "${OURS[@]}"
else
    chmod 0644 "${OURS[@]}"  # no chown without root: readable by all
    echo "not root: ${OURS[*]} are 0644 (chown them to 10001, chmod 0400)" >&2
fi
echo "written: docker/secrets/, docker/tls/, docker/callers.toml"
