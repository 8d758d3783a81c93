"""Secure defaults: a loopback-only dashboard, token authentication on the job API, checkpoints
loaded with ``weights_only=True``, and reports that never copy free text from NIfTI headers
or patient ids.

The Ray checks start their own embedded Ray in a subprocess (its own driver, temp dir and
HOME), so the session's shared Ray is never touched and no token is written to your ~/.ray.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from raytumor.cli import app
from raytumor.data.manifest import read_manifest, write_manifest
from raytumor.data.validate import validate_dataset
from tests.conftest import blob_volume
from tests.evaluate.test_report import SHAPE, make_run, write_prepared_cache

REPO = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "250"}  # rich must not wrap (and so split) a marker across lines

# ---------------------------------------------------------------- the dashboard of an embedded Ray

EMBEDDED_RAY_SCRIPT = r"""
import json, os, sys, urllib.error, urllib.request
from pathlib import Path

import ray  # puts ray/thirdparty_files (psutil) on sys.path
import psutil

from raytumor.runtime import ray_session


def get(port, headers):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


out = {}
with ray_session(num_cpus=1, dashboard=True, announce=False):
    out["dashboard_url"] = ray._private.worker.get_dashboard_url()
    port = int(out["dashboard_url"].rsplit(":", 1)[1])
    out["listening_on"] = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                                  if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
    token_file = Path.home() / ".ray" / "auth_token"
    out["token_file_exists"] = token_file.is_file()
    token = token_file.read_text().strip() if token_file.is_file() else ""
    out["no_token"] = get(port, {})
    out["wrong_token"] = get(port, {"Authorization": "Bearer not-the-token"})
    out["token"] = get(port, {"Authorization": f"Bearer {token}"})
    out["worker_env"] = ray.get(ray.remote(lambda: os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")).remote())
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def embedded_ray_with_token():
    """What an embedded Ray (``ray_session``) with ``RAY_AUTH_MODE=token`` exposes on the network."""
    scratch = Path(tempfile.mkdtemp(prefix="rts", dir="/tmp"))  # short: Ray's socket paths live under it
    (scratch / "home").mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    env.update(RAY_AUTH_MODE="token", HOME=str(scratch / "home"), RAY_TMPDIR=str(scratch / "ray"))
    try:
        proc = subprocess.run([sys.executable, "-c", EMBEDDED_RAY_SCRIPT], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=180)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
        yield json.loads(lines[-1][len("RESULT "):])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_dashboard_listens_on_loopback_only(embedded_ray_with_token):
    result = embedded_ray_with_token
    assert result["dashboard_url"].startswith("127.0.0.1:")
    assert result["listening_on"] == ["127.0.0.1"]  # not 0.0.0.0, not ::, not the host's address


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_ray_workers_get_raytumors_train_settings(embedded_ray_with_token):
    # Ray Train's controller polls every 0.5 s instead of Ray's 2 s (a shorter fit teardown).
    assert embedded_ray_with_token["worker_env"] == "0.5"


@pytest.mark.ray
@pytest.mark.slow
def test_job_api_needs_the_token(embedded_ray_with_token):
    result = embedded_ray_with_token
    # Ray 2.60 generated the token where its docs say: ~/.ray/auth_token (of the subprocess's HOME).
    assert result["token_file_exists"]
    assert result["no_token"][0] == 401
    assert result["wrong_token"][0] in (401, 403)
    status, body = result["token"]
    assert status == 200
    assert isinstance(json.loads(body), list)  # the job list (holding this driver)


# ---------------------------------------------------------------- checkpoints


def _torch_load_calls(path: Path) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "torch":
                calls.append(node)
    return calls


def test_every_torch_load_in_the_package_is_weights_only():
    sources = sorted((REPO / "raytumor").rglob("*.py"))
    found = 0
    for path in sources:
        text = path.read_text()
        calls = _torch_load_calls(path)
        # Every textual `torch.load(` is a call the AST saw (none hidden behind an alias or in a string).
        assert text.count("torch.load(") == len(calls), path
        assert "from torch import load" not in text and "torch.serialization.load" not in text, path
        for call in calls:
            flags = {kw.arg: kw.value for kw in call.keywords}
            value = flags.get("weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, \
                f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True"
        found += len(calls)
    assert found >= 3  # trainer, loops, ... load checkpoints: the scan really looked


# ---------------------------------------------------------------- reports and NIfTI header text

MARKERS = {
    "descrip": "DESCRIPMARKER7Q",
    "aux_file": "AUXMARKER7Q",
    "intent_name": "INTENTMARK7Q",
    "db_name": "DBNAMEMARK7Q",
}
EXTENSION_MARKER = "EXTENSIONMARKER7Q"
PATIENT_MARKER = "PATIENTMARKER7Q"
ALL_MARKERS = [*MARKERS.values(), EXTENSION_MARKER, PATIENT_MARKER]


def write_marked_nifti(path: Path, data: np.ndarray) -> Path:
    """A NIfTI file whose free-text header fields and a comment extension carry markers."""
    image = nib.Nifti1Image(np.asarray(data), np.eye(4))
    for field, marker in MARKERS.items():
        image.header[field] = marker.encode()
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", f"note {EXTENSION_MARKER}".encode()))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def make_marked_source(src: Path, n_per_class=(6, 6, 6)) -> Path:
    """A folder of marked volumes + masks and a labels CSV with marked patient ids; three bad cases."""
    rows = []
    index = 0
    for label, n in enumerate(n_per_class):
        for _ in range(n):
            image, mask = blob_volume((12, 12, 4), radius=2.0 + label * 1.5, seed=index)
            case = f"c{index:03d}"
            write_marked_nifti(src / f"{case}.nii.gz", image)
            write_marked_nifti(src / f"{case}_mask.nii.gz", mask)
            rows.append(dict(case_id=case, image=f"{case}.nii.gz", label=label, mask=f"{case}_mask.nii.gz",
                             patient_id=f"{PATIENT_MARKER}-{index}"))
            index += 1
    image, _ = blob_volume((12, 12, 4), seed=99)
    nan_image = image.copy()
    nan_image[1, 1, 1] = np.nan
    bad = {"bad_nan": nan_image, "bad_constant": np.full((12, 12, 4), 7.0, np.float32),
           "bad_4d": np.stack([image, image], axis=-1)}
    for case, data in bad.items():
        write_marked_nifti(src / f"{case}.nii.gz", data)
        rows.append(dict(case_id=case, image=f"{case}.nii.gz", label=0, mask="", patient_id=f"{PATIENT_MARKER}-{case}"))
    pd.DataFrame(rows).to_csv(src / "labels.csv", index=False)
    return src / "labels.csv"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=WIDE)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.output


BAD_CASES = ("bad_nan", "bad_constant", "bad_4d")


def import_marked(tmp_path: Path, n_per_class=(6, 6, 6)) -> tuple[Path, str]:
    """``raytumor data import-folder`` of the marked source: the dataset and the command's output."""
    labels = make_marked_source(tmp_path / "src", n_per_class)
    sample = nib.load(str(tmp_path / "src" / "c000.nii.gz"))  # the markers really are in the files
    assert sample.header["descrip"].item().decode() == MARKERS["descrip"]
    assert EXTENSION_MARKER.encode() in sample.header.extensions[0].get_content()
    dataset = tmp_path / "ds"
    output = _invoke("data", "import-folder", str(tmp_path / "src"), "--labels", str(labels), "--out", str(dataset),
                     "--rare-classes", "2")
    assert read_manifest(dataset)["patient_id"].str.startswith(PATIENT_MARKER).all()  # the input did carry them
    assert set(pd.read_csv(dataset / "import-quarantine.csv")["case_id"]) == set(BAD_CASES)
    return dataset, output


def add_bad_rows(dataset: Path, src: Path) -> None:
    """List the quarantined cases in the manifest again, as a hand-edited manifest would."""
    manifest = read_manifest(dataset)
    bad_rows = pd.DataFrame([dict(case_id=c, image=str(src / f"{c}.nii.gz"), mask=None, label=0,
                                  label_name=manifest["label_name"].iloc[0], patient_id=f"{PATIENT_MARKER}-{c}",
                                  split="train", source="folder", mask_kind=None) for c in BAD_CASES])
    write_manifest(dataset, pd.concat([manifest, bad_rows], ignore_index=True))


def assert_no_marker(files: list[Path], texts: list[str], root: Path) -> None:
    for marker in ALL_MARKERS:
        for path in files:
            assert marker.encode() not in path.read_bytes(), f"{marker} copied into {path.relative_to(root)}"
        for text in texts:
            assert marker not in text, f"{marker} in command output or figure text:\n{text}"


def test_reports_never_copy_nifti_header_text_or_patient_ids(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    plot_texts: list[str] = []  # every string drawn into any report figure (PNG bytes hide text)
    savefig = Figure.savefig

    def recording_savefig(fig, *args, **kwargs):
        plot_texts.extend(t.get_text() for t in fig.findobj(Text))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)

    dataset, output = import_marked(tmp_path)
    outputs = [output]
    write_prepared_cache(dataset, shape=SHAPE)
    run = make_run(tmp_path / "runs", dataset, "marked")
    outputs.append(_invoke("evaluate", str(run), "--out", str(tmp_path / "report"), "--examples", "2"))
    outputs.append(_invoke("search", str(run), str(tmp_path / "src" / "c001.nii.gz"), "--csv",
                           str(tmp_path / "search.csv")))
    assert "c001" in outputs[-1]  # the search printed its matches

    # Validation of a manifest that lists the bad cases again: the problem table and summary.
    add_bad_rows(dataset, tmp_path / "src")
    outputs.append(_invoke("data", "validate", str(dataset)))
    report = validate_dataset(dataset)
    assert report.n_bad == len(BAD_CASES)
    outputs += [report.summary(), report.to_frame().to_csv(index=False)]

    written = [dataset / "import-quarantine.csv", tmp_path / "search.csv",
               *sorted(p for p in (tmp_path / "report").rglob("*") if p.is_file()),
               *sorted(p for p in (run / "index").rglob("*") if p.is_file())]
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "metrics.json").is_file()
    assert plot_texts and any("c0" in t for t in plot_texts)  # figures were drawn, case ids and all
    assert_no_marker(written, outputs + plot_texts, tmp_path)


@pytest.mark.ray
@pytest.mark.slow
def test_preprocessing_quarantine_never_copies_nifti_header_text(ray_local, tmp_path):
    from raytumor.data.preprocess import PrepareSettings, prepare_dataset

    dataset, _ = import_marked(tmp_path, n_per_class=(2, 2, 2))
    add_bad_rows(dataset, tmp_path / "src")
    prepared = prepare_dataset(dataset, PrepareSettings(shape=(8, 8, 4)))
    quarantine = pd.read_csv(prepared.quarantine)
    assert set(quarantine["case_id"]) == set(BAD_CASES)
    assert_no_marker([prepared.quarantine, prepared.path / "meta.json"], [], tmp_path)


# ---------------------------------------------------------------- model files

class _RunsCode:
    """Unpickling this would call os.system: a model file must never get that far."""

    def __reduce__(self):
        import os

        return os.system, ("touch should-never-exist",)


def test_a_bad_or_unsafe_model_file_is_a_one_line_error(tmp_path, monkeypatch):
    from raytumor.config import RunConfig
    from raytumor.errors import RaytumorError
    from raytumor.models import build_model
    from raytumor.train.trainer import load_best_model

    monkeypatch.chdir(tmp_path)
    config = RunConfig.model_validate({"model": {"embedding_dim": 4, "width": 0.125}})
    model = build_model(config.model.encoder, in_channels=2, embedding_dim=4, normalize=True, width=0.125)
    good = {"model": model.state_dict(), "config": config.model_dump(mode="json"), "num_classes": 3}
    other_dim = build_model(config.model.encoder, in_channels=2, embedding_dim=5, normalize=True, width=0.125)
    payloads = {
        "unsafe": ({"model": _RunsCode()}, "holds objects other than tensors and plain values; refused"),
        "no-config": ({"model": model.state_dict()}, "not a raytumor model (no config)"),
        "other-dim": ({**good, "model": other_dim.state_dict()}, "its weights do not fit its config (size mismatch for"),
    }
    for name, (payload, message) in payloads.items():
        (tmp_path / name).mkdir()
        torch.save(payload, tmp_path / name / "best_model.pt")
    (tmp_path / "truncated").mkdir()
    torch.save(good, tmp_path / "truncated" / "best_model.pt")
    data = (tmp_path / "truncated" / "best_model.pt").read_bytes()
    (tmp_path / "truncated" / "best_model.pt").write_bytes(data[: len(data) // 2])
    payloads["truncated"] = (None, "not a readable raytumor model (PytorchStreamReader failed")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "best_model.pt").write_bytes(b"")
    payloads["empty"] = (None, "not a readable raytumor model")

    for name, (_, message) in payloads.items():
        with pytest.raises(RaytumorError) as info:
            load_best_model(tmp_path / name)
        text = str(info.value)
        assert text.startswith(f"{tmp_path / name / 'best_model.pt'}: {message}") and "\n" not in text, text
    assert not (tmp_path / "should-never-exist").exists()
    (tmp_path / "good").mkdir()
    torch.save(good, tmp_path / "good" / "best_model.pt")
    assert load_best_model(tmp_path / "good")[1] == config
