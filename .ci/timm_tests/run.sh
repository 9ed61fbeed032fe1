#!/usr/bin/env bash
# timm's own model tests on our models: the installed timm version's source distribution from the
# package registry (its tests are not in the wheel, and none of its code is copied here), and its
# tests/test_models.py run with .ci/timm_tests/vitpkg_listing.py, which lists every registered
# vitpkg_* model where timm lists its own ViTs. Extra arguments go to pytest (e.g. -k cct_2).
#
# By default the tests timm's own CI runs (its markers: base, cfg, forward, backward, torchscript,
# features, fxforward, fxbackward); --all first adds its unmarked ones, which timm's CI leaves out
# as slow: test_prune_intermediate_layers_contract (prunes every model at every block; ~2/3 of
# the time) and test_model_forward_fx_torchscript.
set -euo pipefail
markers=(-m "base or cfg or forward or backward or torchscript or features or fxforward or fxbackward")
if [[ "${1:-}" == "--all" ]]; then
  markers=()
  shift
fi
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
  -W "ignore::pytest.PytestUnknownMarkWarning" "${markers[@]}" "$src/tests/test_models.py" "$@"
echo "timm model tests: $((SECONDS - start)) s"
