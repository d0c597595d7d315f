#!/usr/bin/env bash
# Installs what `make e2e` needs: Debian's chromium (only when missing) and Playwright from PyPI into .venv.
# Playwright drives the system browser through its executable path: never `playwright install`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}

# Fonts: DejaVu for text, Noto Color Emoji for the status lines (⏳, ⏹️) in the screenshot.
PACKAGES="chromium fonts-dejavu-core fonts-noto-color-emoji"
if [ ! -x /usr/bin/chromium ] || ! dpkg -s $PACKAGES >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $PACKAGES
fi

if ! "$VENV_PYTHON" -c "import playwright" 2>/dev/null; then
    # Playwright's own browser downloads stay off: the system chromium is used instead.
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check \
        "playwright>=1.40"
fi
