#!/usr/bin/env bash
# timm's own model tests on our models: the installed timm version's source distribution from the
# package registry (its tests are not in the wheel, and none of its code is copied here), and its
# tests/test_models.py run with .ci/timm_tests/vitpkg_listing.py, which lists every registered
# vitpkg_* model where timm lists its own ViTs. Extra arguments go to pytest (e.g. -k cct_2).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
version=$(python -c "import timm; print(timm.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download -q --no-deps --no-binary :all: "timm==$version" -d "$work"
tar -xzf "$work/timm-$version.tar.gz" -C "$work" "timm-$version/tests" "timm-$version/pyproject.toml"
src="$work/timm-$version"
start=$SECONDS
# timm's own pytest configuration (markers); this checkout's vit and the plugin on the path.
PYTHONPATH="$root:$root/.ci/timm_tests${PYTHONPATH:+:$PYTHONPATH}" python -m pytest \
  -c "$src/pyproject.toml" --rootdir "$src" -p vitpkg_listing -q -rs \
  -W "ignore::pytest.PytestUnknownMarkWarning" "$src/tests/test_models.py" "$@"
echo "timm model tests: $((SECONDS - start)) s"
