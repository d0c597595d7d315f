#!/usr/bin/env bash
# Installs what the store tests need: Debian's PostgreSQL server programs (initdb, pg_ctl), only when missing.
# The tests start and remove their own throwaway cluster; nothing here starts a server.
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends postgresql
