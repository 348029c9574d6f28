# Sourced by scripts/run and scripts/test: a virtual environment in .venv (Debian's system Python
# refuses pip installs outside one, PEP 668), created on first use and activated.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv 2>/dev/null || {
    echo "python3 -m venv failed: install it with 'apt-get install python3-venv'" >&2
    exit 1
  }
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
