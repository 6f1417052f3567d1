#!/usr/bin/env bash
# timm's own generic model tests (pytorch-image-models tests/test_models.py, unchanged) on our models.
#   bash benchmarks/timm_model_tests.sh PATH/TO/pytorch-image-models/tests/test_models.py [MODEL ...]
#   ENTRY=metaformer bash benchmarks/timm_model_tests.sh ...   # models created by metaformer.create_model
# MODEL: timm names of ours (default: metaformer_poolformer_s12, the four hybrids, the 14 Table-5 rows and one
# size per Baselines family). The tests that download weights (inference, load/features_pretrained) need a
# network; they are left out here. Runs in a temporary folder; prints pytest's summary.
set -euo pipefail
src=$(realpath "$1"); shift
py=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")  # absolute, the venv link kept
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tests"
cp "$src" "$work/tests/test_models.py"
printf '[pytest]\ntestpaths = tests\n' > "$work/pytest.ini"
cat > "$work/tests/conftest.py" <<PY
import re
import timm
import metaformer  # noqa: F401  registers our models before test_models.py is collected

if "${ENTRY:-timm}" == "metaformer":  # test_models.py imports create_model when collected: give it ours
    _timm_create = timm.create_model

    def create_model(name, *args, **kwargs):
        if name.startswith("metaformer_"):
            return metaformer.create_model(name, *args, **kwargs)  # it takes timm's names as they are
        return _timm_create(name, *args, **kwargs)

    timm.create_model = create_model

KEEP = set("${*}".split()) or {"metaformer_poolformer_s12", "metaformer_pppa_s12", "metaformer_ppaa_s12",
    "metaformer_pppf_s12", "metaformer_ppff_s12", "metaformer_identityformer_s12", "metaformer_randformer_s12",
    "metaformer_poolformerv2_s12", "metaformer_convformer_s18", "metaformer_caformer_s18",
    *timm.list_models("metaformer_s12_*")}


def pytest_collection_modifyitems(config, items):
    def model(item):  # test_x[1-metaformer_caformer_s18.sail_in1k] -> metaformer_caformer_s18
        m = re.search(r"\[(?:\d+-)?([a-z0-9_]+)(?:\.[a-z0-9_]+)?\]$", item.name)
        return m and m.group(1)
    items[:] = [i for i in items if model(i) in KEEP]
PY
cd "$work"
"$py" -m pytest -q -p no:cacheprovider -n 2 -k "not pretrained and not inference" tests/test_models.py 2>&1 | tail -3
