"""The quick cache look (``inputs.json``): it finds exactly the cache the fingerprint finds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from raytumor.data.layout import INPUTS_FILE, PrepareSettings, find_prepared_quick
from raytumor.data.manifest import read_manifest, write_manifest
from raytumor.data.preprocess import cache_dir, find_prepared, fingerprint
from tests.conftest import make_dataset
from tests.evaluate.test_report import SHAPE, write_prepared_cache

SETTINGS = PrepareSettings(shape=SHAPE)


def fingerprint_cache(dataset, settings=SETTINGS):
    """The cache directory the full fingerprint points to now."""
    return cache_dir(dataset, settings, fingerprint(read_manifest(dataset), dataset, settings))


@pytest.fixture
def recorded(tmp_path):
    """A dataset with a complete cache whose ``inputs.json`` the full look has written."""
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), unlabelled=1)
    cache = write_prepared_cache(dataset, shape=SHAPE)
    assert not (cache.path / INPUTS_FILE).exists()
    assert find_prepared_quick(dataset, SETTINGS) is None  # a cache from before inputs.json
    assert find_prepared(dataset, SETTINGS).path == cache.path
    assert (cache.path / INPUTS_FILE).is_file()
    return dataset, cache


def test_quick_look_finds_the_recorded_cache(recorded):
    dataset, cache = recorded
    found = find_prepared_quick(dataset, SETTINGS)
    assert found is not None and found.path == cache.path and found.cached
    assert found.n_cases == cache.n_cases == 7
    record = json.loads((cache.path / INPUTS_FILE).read_text())
    assert len(record["files"]) == 13  # 7 images, 6 masks (the unlabelled case has none)
    # A relative spelling of the same directory is the same dataset.
    relative = os.path.relpath(dataset)
    assert find_prepared_quick(relative, SETTINGS).path.resolve() == cache.path.resolve()


def _touch_an_image(dataset):
    image = dataset / read_manifest(dataset)["image"].iloc[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def _drop_a_case(dataset):
    write_manifest(dataset, read_manifest(dataset).iloc[1:])


def _relabel_a_case(dataset):
    manifest = read_manifest(dataset)
    manifest.loc[0, "label"] = 1 - manifest.loc[0, "label"]
    write_manifest(dataset, manifest)


def _remove_a_mask(dataset):
    masks = read_manifest(dataset)["mask"].dropna()
    (dataset / masks.iloc[0]).unlink()


@pytest.mark.parametrize("change", [_touch_an_image, _drop_a_case, _relabel_a_case, _remove_a_mask])
def test_quick_look_misses_when_the_fingerprint_changes(recorded, change):
    dataset, cache = recorded
    change(dataset)
    assert fingerprint_cache(dataset) != cache.path
    assert find_prepared_quick(dataset, SETTINGS) is None
    assert find_prepared(dataset, SETTINGS) is None


def test_quick_look_misses_other_settings_and_a_moved_dataset(recorded, tmp_path):
    dataset, cache = recorded
    assert find_prepared_quick(dataset, PrepareSettings(shape=SHAPE, upper_percentile=99.0)) is None
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)  # copy2 keeps every mtime; the absolute paths change
    assert fingerprint_cache(moved).name != cache.path.name
    assert find_prepared_quick(moved, SETTINGS) is None


def test_manifest_rewritten_without_a_hashed_change_is_rerecorded(recorded):
    dataset, cache = recorded
    manifest = read_manifest(dataset)
    manifest["patient_id"] = [f"p{i}" for i in range(len(manifest))]  # not part of the fingerprint
    write_manifest(dataset, manifest)
    assert fingerprint_cache(dataset) == cache.path
    assert find_prepared_quick(dataset, SETTINGS) is None  # other manifest bytes
    assert find_prepared(dataset, SETTINGS).path == cache.path  # the full look still matches, and records it
    assert find_prepared_quick(dataset, SETTINGS).path == cache.path


@pytest.mark.parametrize("damage", ["{not json", '{"files": 3}', "[]"])
def test_a_damaged_record_is_a_miss_not_an_error(recorded, damage):
    dataset, cache = recorded
    (cache.path / INPUTS_FILE).write_text(damage)
    assert find_prepared_quick(dataset, SETTINGS) is None
    assert find_prepared(dataset, SETTINGS).path == cache.path


def test_cli_cache_hit_imports_neither_pandas_nor_ray(recorded):
    """What makes the second ``raytumor data prepare`` fast: the quick look and no heavy import."""
    dataset, cache = recorded
    script = (
        "import sys\n"
        f"sys.argv = ['raytumor', 'data', 'prepare', {str(dataset)!r}, '--shape', '{','.join(map(str, SHAPE))}']\n"
        "from raytumor.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in ('pandas', 'numpy', 'pyarrow', 'ray', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "(cache hit, nothing to do)" in lines[0] and str(cache.path) in lines[0]
    assert lines[-1] == "[]"
