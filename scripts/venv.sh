# Sourced by scripts/demo, scripts/stack and scripts/screenshot: creates .venv if missing and
# installs the project with its demo extra, again only when pyproject.toml changed since.
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.demo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing the project into .venv (pip install -e '.[demo]')"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[demo]'
  touch "$stamp"
fi
