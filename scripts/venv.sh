# Sourced by the quick-start scripts: create .venv and install the project once (and again when
# pyproject.toml changes). PyTorch is installed first, from the versions named in TORCH_SPEC.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.installed-${EXTRAS:-core}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet ${TORCH_SPEC:-"torch>=2.4" "torchvision>=0.19"}
    .venv/bin/python -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
    touch "$stamp"
fi
