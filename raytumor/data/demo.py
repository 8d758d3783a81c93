"""A realistic demo dataset: the MNI152 brain with synthetic tumours, in the contract format.

Every case is the real MNI152 T1 template shipped inside ``nilearn`` (no download), warped by
a random smooth deformation and by the tumour's mass effect, with one synthetic tumour
painted in, then a multiplicative bias field, a gamma/scale contrast change and Rician noise.
The 27 classes follow the paper's Table 1 (class imbalance, rare flags). Each class is a fixed
combination of location, size, shape, boundary, internal texture, intensity and oedema; any
two classes differ in at least :data:`MIN_ATTRIBUTE_DIFFERENCES` of these and share the rest,
so no single intensity threshold separates them. The hemisphere is drawn per case, never per
class, so left-right flip augmentation cannot destroy class information.

Random parameters are sampled first (:func:`sample_case`), then rendered deterministically
(:func:`render_case`); each case has its own generator ``np.random.default_rng([seed, index])``.
Geometry is defined in millimetres, so one case looks the same at any ``shape``.

Speed, files included, one process on a shared 2-core machine: 50-95 cases/s at
``(32, 32, 8)`` (1-2 s per hundred cases) and ~20 cases/s at ``(64, 64, 16)``, plus 1-3 s
once per call to import nilearn and load and resample the template.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from raytumor.data.manifest import LABELLED_SPLITS, build_class_table, write_classes, write_manifest
from raytumor.errors import ConfigError, DatasetError
from raytumor.storage import atomic_path, atomic_write_text

DEMO_MARKER = "demo.json"
DEMO_SOURCE = "demo"
DEMO_VERSION = 1
IMAGES_DIR = "images"
MASKS_DIR = "masks"
# Class definitions come from this constant, never from the dataset seed: every demo
# dataset shares the same 27 classes.
CLASS_DEFINITION_SEED = 20210927
MIN_CASES_PER_SPLIT = {"train": 3, "val": 1, "test": 1}
MIN_ATTRIBUTE_DIFFERENCES = 3
NON_RAS_FRACTION = 0.1

LOCATIONS: dict[str, tuple[float, float, float]] = {
    # Tumour centre in brain-box coordinates (-1..1 per axis: x lateral, y posterior->anterior,
    # z inferior->superior). x is the distance from the midline; the side is drawn per case.
    "frontal": (0.40, 0.60, 0.25),
    "parietal": (0.40, -0.35, 0.50),
    "temporal": (0.62, 0.05, -0.35),
    "occipital": (0.30, -0.75, 0.10),
    "deep": (0.20, -0.05, 0.15),
    "convexity": (0.15, 0.10, 0.70),
    "cerebellar": (0.35, -0.60, -0.55),
    "sellar": (0.00, 0.10, -0.35),
    "brainstem": (0.00, -0.25, -0.50),
}
SIZES = {"small": 0.10, "medium": 0.14, "large": 0.19}  # mean radius / mean field of view
SHAPES = ("round", "lobulated", "irregular")
BOUNDARIES = {"sharp": 0.04, "infiltrative": 0.2}  # edge width in units of the tumour radius
TEXTURES = ("solid", "heterogeneous", "cystic", "ring", "necrotic")
INTENSITIES = {"hypo": 0.55, "iso": 1.0, "hyper": 1.5}  # relative to the median brain voxel
OEDEMA = {"none": 0.0, "mild": 0.35, "marked": 0.9}  # extent beyond the tumour, in radii

CYST_LEVEL = 0.22
RIM_LEVEL = 1.8
NECROSIS_LEVEL = 0.3
RING_INTERIOR = 0.6  # times the class level
OEDEMA_LEVEL = 0.65
BRAIN_THRESHOLD = 0.05
MAX_INT16 = 32767


@dataclass(frozen=True)
class TumourClass:
    """One fixed tumour type: a combination of categorical attributes."""

    label: int
    location: str
    size: str
    shape: str
    boundary: str
    texture: str
    intensity: str
    oedema: str

    @property
    def name(self) -> str:
        return f"type{self.label:02d}_{self.location}_{self.shape}_{self.texture}"

    def attributes(self) -> tuple[str, ...]:
        return (self.location, self.size, self.shape, self.boundary, self.texture, self.intensity, self.oedema)


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`make_demo_dataset` wrote; ``counts`` maps split -> number of cases."""

    out_dir: Path
    n_labelled: int
    n_unlabelled: int
    counts: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class Anatomy:
    """The template resampled once to the target grid.

    ``intensity``, ``brain`` (0..1) and ``depth_mm`` (distance inside the brain) are ``(X, Y, Z)``
    float32; ``points_mm`` is ``(X*Y*Z, 3)``, voxel centres relative to the field-of-view
    centre; ``affine`` maps voxel indices to RAS millimetres.
    """

    intensity: np.ndarray
    brain: np.ndarray
    depth_mm: np.ndarray
    points_mm: np.ndarray
    fov_mm: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.intensity.shape)


@dataclass(frozen=True)
class SmoothField:
    """A sum of random cosines: ``value(p) = sum_k amps[c, k] * cos(2 pi freqs[k] . p + phases[c, k])``.

    ``freqs`` is ``(K, 3)`` in cycles/mm; ``phases`` and ``amps`` are ``(C, K)`` for ``C``
    channels. Analytic, so it is the same field at every resolution.
    """

    freqs: np.ndarray
    phases: np.ndarray
    amps: np.ndarray


@dataclass(frozen=True)
class CaseParams:
    """Every random choice of one case; :func:`render_case` turns it into voxels."""

    tumour_class: TumourClass
    centre_mm: np.ndarray  # (3,) wished tumour centre, before snapping into the brain
    linear: np.ndarray  # (3, 3) global head scale and rotation
    shift_mm: np.ndarray  # (3,)
    deformation: SmoothField  # 3 channels, mm
    mass_effect: float
    radius_mm: float
    axes: np.ndarray  # (3,) relative semi-axes
    rotation: np.ndarray  # (3, 3)
    lobe_directions: np.ndarray  # (L, 3) unit vectors
    lobe_amplitude: float
    lobe_sharpness: float
    outline: SmoothField  # 1 channel, unit variance
    outline_amplitude: float
    edge_width: float
    level: float
    core_fraction: float
    rim_fraction: float
    grain_mm: float  # feature size of the tumour's internal texture
    texture_amplitude: float
    oedema_extent: float
    oedema_outline: SmoothField  # 1 channel, unit variance
    bias: SmoothField  # 1 channel
    gamma: float
    noise_sigma: float
    scale: float
    non_ras: bool
    noise_seed: int


def load_table1() -> pd.DataFrame:
    """The paper's Table 1: ``class, train, val, test, rare`` (27 rows)."""
    with resources.files("raytumor.data").joinpath("table1.csv").open("r") as handle:
        table = pd.read_csv(handle)
    table["rare"] = table["rare"].astype(str).str.lower().eq("true")
    return table


def demo_split_counts(scale: float, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Cases per class and split: ``max(round(table_count * scale), minimum)``.

    Rounds half up; the minimum is 3 train, 1 val, 1 test. Columns ``class, train, val,
    test, rare``.
    """
    table = load_table1() if table is None else table
    out = table[["class", *LABELLED_SPLITS, "rare"]].copy()
    for split in LABELLED_SPLITS:
        scaled = np.floor(table[split].to_numpy(dtype=float) * scale + 0.5).astype(int)
        out[split] = np.maximum(scaled, MIN_CASES_PER_SPLIT[split])
    return out


def demo_classes(n_classes: int = 27) -> tuple[TumourClass, ...]:
    """The fixed class definitions: any two differ in >= MIN_ATTRIBUTE_DIFFERENCES attributes.

    Drawn greedily from :data:`CLASS_DEFINITION_SEED`; a solid iso-intense tumour is refused
    because it would be invisible.
    """
    rng = np.random.default_rng(CLASS_DEFINITION_SEED)
    options = (tuple(LOCATIONS), tuple(SIZES), SHAPES, tuple(BOUNDARIES), TEXTURES, tuple(INTENSITIES), tuple(OEDEMA))
    chosen: list[tuple[str, ...]] = []
    while len(chosen) < n_classes:
        candidate = tuple(str(values[rng.integers(len(values))]) for values in options)
        if candidate[5] == "iso" and candidate[4] == "solid":
            continue
        if all(sum(a != b for a, b in zip(candidate, other)) >= MIN_ATTRIBUTE_DIFFERENCES for other in chosen):
            chosen.append(candidate)
    return tuple(TumourClass(label, *attributes) for label, attributes in enumerate(chosen))


def load_anatomy(shape: Sequence[int]) -> Anatomy:
    """The nilearn MNI152 T1 template (2 mm), cropped to the brain and resampled to ``shape``.

    The field of view is the brain's bounding box plus a 4 mm margin; voxel size = field of
    view / shape. Intensity is scaled so the median brain voxel is 1.
    """
    from nilearn.datasets import load_mni152_template
    from scipy import ndimage

    template = load_mni152_template(resolution=2)
    data = np.asarray(template.get_fdata(), dtype=np.float32)
    source_affine = np.asarray(template.affine, dtype=float)
    source_voxel = np.abs(np.diag(source_affine)[:3])
    brain = data > BRAIN_THRESHOLD * data.max()
    nonzero = np.argwhere(brain)
    lo = np.maximum(nonzero.min(0) - 2, 0)
    hi = np.minimum(nonzero.max(0) + 3, data.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    data, brain = data[crop], brain[crop].astype(np.float32)

    shape = np.asarray(shape, dtype=int)
    factors = shape / np.asarray(data.shape)
    # Anti-alias before shrinking, as skimage does: sigma = (downsampling - 1) / 2 voxels.
    sigma = np.maximum(0.0, (1.0 / factors - 1.0) / 2.0)
    resampled = [
        ndimage.zoom(ndimage.gaussian_filter(volume, sigma), factors, order=1, grid_mode=True, mode="grid-constant")
        for volume in (data, brain)
    ]
    intensity, brain_fraction = (np.clip(v, 0.0, None).astype(np.float32) for v in resampled)
    brain_fraction = np.clip(brain_fraction, 0.0, 1.0)
    intensity /= float(np.median(intensity[brain_fraction > 0.5]))

    fov_mm = np.asarray(data.shape) * source_voxel
    voxel_mm = fov_mm / shape
    # World position of the crop's first voxel edge: its centre minus half a source voxel.
    origin_edge = source_affine[:3, :3] @ lo + source_affine[:3, 3] - source_voxel / 2
    affine = np.eye(4)
    affine[:3, :3] = np.diag(voxel_mm)
    affine[:3, 3] = origin_edge + voxel_mm / 2
    depth_mm = ndimage.distance_transform_edt(brain_fraction > 0.5, sampling=voxel_mm).astype(np.float32)

    axes = [(np.arange(n) + 0.5) * v - f / 2 for n, v, f in zip(shape, voxel_mm, fov_mm)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float32)
    return Anatomy(
        intensity=intensity,
        brain=brain_fraction,
        depth_mm=depth_mm,
        points_mm=points,
        fov_mm=fov_mm,
        affine=affine,
    )


def random_smooth_field(
    rng: np.random.Generator, *, channels: int, components: int, wavelength_mm: float, amplitude: float
) -> SmoothField:
    """A random field with about ``wavelength_mm`` feature size and per-channel std ``amplitude``."""
    directions = rng.normal(size=(components, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequencies = directions * rng.uniform(0.6, 1.4, size=(components, 1)) / wavelength_mm
    phases = rng.uniform(0.0, 2 * np.pi, size=(channels, components))
    weights = rng.normal(size=(channels, components))
    weights *= amplitude * np.sqrt(2.0 / components)
    return SmoothField(freqs=frequencies, phases=phases, amps=weights)


def _points_times(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(N, K) @ (K, C)`` in float32 via einsum.

    BLAS would be no faster for such a thin product, and its threads spin badly on a busy
    machine; a float32 @ float64 product skips BLAS altogether and is ~100x slower.
    """
    return np.einsum("nk,kc->nc", points.astype(np.float32, copy=False), np.asarray(matrix, dtype=np.float32))


def evaluate_field(smooth: SmoothField, points_mm: np.ndarray) -> np.ndarray:
    """``points_mm`` ``(N, 3)`` -> ``(N, C)`` field values."""
    # float32 trig is ~20x faster (SIMD) and precise enough for a smooth field.
    angles = _points_times(points_mm, 2 * np.pi * smooth.freqs.T)  # (N, K)
    # cos(a + phi) = cos a cos phi - sin a sin phi: 2K trig calls per point instead of C*K.
    cos_weights = (smooth.amps * np.cos(smooth.phases)).T  # (K, C)
    sin_weights = (smooth.amps * np.sin(smooth.phases)).T
    return _points_times(np.cos(angles), cos_weights) - _points_times(np.sin(angles), sin_weights)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix ``(3, 3)``."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sample_case(tumour_class: TumourClass, fov_mm: np.ndarray, rng: np.random.Generator) -> CaseParams:
    """Draw every random choice of one case (class attributes jittered per case)."""
    side = 1.0 if rng.random() < 0.5 else -1.0
    location = np.asarray(LOCATIONS[tumour_class.location]) * np.array([side, 1.0, 1.0])
    location = location + rng.normal(0.0, 0.06, size=3)
    centre_mm = location * fov_mm / 2

    angle = np.deg2rad(rng.normal(0.0, 4.0))
    rotation_z = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    linear = rotation_z @ np.diag(rng.uniform(0.93, 1.07, size=3))
    shift_mm = rng.normal(0.0, 2.0, size=3)
    deformation = random_smooth_field(rng, channels=3, components=8, wavelength_mm=90.0, amplitude=2.5)

    radius_mm = SIZES[tumour_class.size] * float(np.mean(fov_mm)) * rng.uniform(0.85, 1.15)
    axes = np.array([1.0, *rng.uniform(0.7, 1.1, size=2)])
    n_lobes = int(rng.integers(3, 6))
    lobe_directions = rng.normal(size=(n_lobes, 3))
    lobe_directions /= np.linalg.norm(lobe_directions, axis=1, keepdims=True)
    outline_amplitude = {"round": 0.04, "lobulated": 0.05, "irregular": 0.28}[tumour_class.shape]
    texture_amplitude = {"solid": 0.05, "heterogeneous": 0.3, "cystic": 0.04, "ring": 0.08, "necrotic": 0.12}[
        tumour_class.texture
    ]
    oedema_extent = OEDEMA[tumour_class.oedema] * rng.uniform(0.75, 1.25)
    return CaseParams(
        tumour_class=tumour_class,
        centre_mm=centre_mm,
        linear=linear,
        shift_mm=shift_mm,
        deformation=deformation,
        mass_effect=float(rng.uniform(0.1, 0.3)),
        radius_mm=float(radius_mm),
        axes=axes,
        rotation=random_rotation(rng),
        lobe_directions=lobe_directions,
        lobe_amplitude=float(rng.uniform(0.3, 0.45)) if tumour_class.shape == "lobulated" else 0.0,
        lobe_sharpness=float(rng.uniform(4.0, 8.0)),
        outline=random_smooth_field(rng, channels=1, components=10, wavelength_mm=radius_mm * 0.9, amplitude=1.0),
        outline_amplitude=outline_amplitude,
        edge_width=BOUNDARIES[tumour_class.boundary] * float(rng.uniform(0.75, 1.25)),
        level=INTENSITIES[tumour_class.intensity] * float(rng.uniform(0.9, 1.1)),
        core_fraction=float(rng.uniform(0.5, 0.7)),
        rim_fraction=float(rng.uniform(0.18, 0.28)),
        grain_mm=float(radius_mm * rng.uniform(0.12, 0.2)),
        texture_amplitude=texture_amplitude,
        oedema_extent=float(oedema_extent),
        oedema_outline=random_smooth_field(rng, channels=1, components=10, wavelength_mm=radius_mm, amplitude=1.0),
        bias=random_smooth_field(
            rng, channels=1, components=6, wavelength_mm=220.0, amplitude=float(rng.uniform(0.05, 0.2))
        ),
        gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
        noise_sigma=float(rng.uniform(0.01, 0.04)),
        scale=float(rng.uniform(600.0, 1200.0)),
        non_ras=bool(rng.random() < NON_RAS_FRACTION),
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def _sample_volume(volume: np.ndarray, points_mm: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Trilinear samples of an anatomy volume at ``points_mm`` ``(N, 3)`` -> ``(N,)``."""
    from scipy import ndimage

    shape = np.asarray(anatomy.shape)
    index = (points_mm / (anatomy.fov_mm / 2) + 1.0) * shape / 2 - 0.5
    return ndimage.map_coordinates(volume, index.T, order=1, mode="constant", cval=0.0)


def _grain(rng: np.random.Generator, anatomy: Anatomy, grain_mm: float) -> np.ndarray:
    """Unit-variance smoothed white noise ``(X*Y*Z,)`` with about ``grain_mm`` feature size.

    Noise rather than a few cosines: a sum of few plane waves looks like a woven plaid.
    """
    from scipy import ndimage

    voxel_mm = anatomy.fov_mm / np.asarray(anatomy.shape)
    white = rng.standard_normal(anatomy.shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(white, grain_mm / voxel_mm, mode="reflect")
    return (smooth / max(float(smooth.std()), 1e-6)).reshape(-1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def render_case(params: CaseParams, anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """One case -> ``(image, mask)``, both ``(X, Y, Z)`` in RAS voxel order.

    ``image`` is int16 (intensity units, median brain ~ ``params.scale``); ``mask`` is uint8
    with the tumour = 1 (oedema excluded), always non-empty and inside the brain.
    """
    # float32 throughout: half the memory traffic, and plenty for 16-bit output.
    points = anatomy.points_mm
    tumour_class = params.tumour_class
    linear_t = params.linear.T

    # Output point p shows the template at linear @ p' + shift + deformation(p), where p' is p
    # pulled towards the tumour centre (mass effect; identity before the tumour is placed).
    warp = params.shift_mm.astype(np.float32) + evaluate_field(params.deformation, points)

    # Snap the wished centre to the nearest point deep enough inside this case's brain.
    depth = _sample_volume(anatomy.depth_mm, _points_times(points, linear_t) + warp, anatomy)
    margin = min(0.4 * params.radius_mm, 0.8 * float(depth.max()))
    nearest = int(np.argmin(((points - params.centre_mm) ** 2).sum(1)))
    if depth[nearest] >= margin:
        centre = params.centre_mm.astype(np.float32)
    else:
        candidates = points[depth >= margin]
        centre = candidates[np.argmin(((candidates - params.centre_mm) ** 2).sum(1))]

    # Sampling tissue from nearer the centre pushes it outwards.
    offset = points - centre
    distance = np.linalg.norm(offset, axis=1, keepdims=True)
    push = params.mass_effect * np.exp(-((distance / (1.3 * params.radius_mm)) ** 2))
    source = _points_times(centre + offset * (1.0 - push), linear_t) + warp
    brain_tissue = _sample_volume(anatomy.intensity, source, anatomy)
    brain = np.clip(_sample_volume(anatomy.brain, source, anatomy), 0.0, 1.0)

    local = _points_times(offset, params.rotation) / (params.radius_mm * params.axes).astype(np.float32)
    rho0 = np.linalg.norm(local, axis=1)
    direction = local / np.maximum(rho0, 1e-6)[:, np.newaxis]
    outline = evaluate_field(params.outline, points)[:, 0]
    lobes = np.exp(params.lobe_sharpness * (_points_times(direction, params.lobe_directions.T) - 1.0)).sum(1)
    if params.lobe_amplitude > 0:
        extent = 0.8 + params.lobe_amplitude * lobes
    else:
        extent = np.ones_like(rho0)
    extent = np.clip(extent * (1.0 + params.outline_amplitude * outline), 0.35, None)
    rho = rho0 / extent

    noise_rng = np.random.default_rng(params.noise_seed)
    texture = _grain(noise_rng, anatomy, params.grain_mm)
    level = params.level * (1.0 + params.texture_amplitude * texture)
    if tumour_class.texture == "cystic":
        fluid = _sigmoid((params.core_fraction - rho) / 0.04)
        level = level * (1.0 - fluid) + CYST_LEVEL * fluid
    elif tumour_class.texture == "ring":
        rim = _sigmoid((rho - (1.0 - params.rim_fraction)) / 0.04)
        level = RING_INTERIOR * level * (1.0 - rim) + RIM_LEVEL * (1.0 + 0.05 * texture) * rim
    elif tumour_class.texture == "necrotic":
        core = _sigmoid((params.core_fraction * (1.0 + 0.3 * outline) - rho) / 0.06)
        level = level * (1.0 - core) + NECROSIS_LEVEL * (1.0 + 0.3 * texture) * core

    tumour_weight = _sigmoid((1.0 - rho) / params.edge_width) * brain
    if params.oedema_extent > 0:
        oedema_outline = evaluate_field(params.oedema_outline, points)[:, 0]
        rho_oedema = rho / np.clip(1.0 + 0.25 * oedema_outline, 0.5, None)
        oedema = _sigmoid((1.0 + params.oedema_extent - rho_oedema) / 0.12) * (1.0 - tumour_weight) * brain
        brain_tissue = brain_tissue * (1.0 - oedema * (1.0 - OEDEMA_LEVEL))
    image = brain_tissue * (1.0 - tumour_weight) + level * tumour_weight

    mask = (rho < 1.0) & (brain > 0.5)
    if not mask.any():
        mask[np.argmin(rho + 1e3 * (brain <= 0.5))] = True

    image = np.clip(image, 0.0, None) * np.exp(evaluate_field(params.bias, points)[:, 0])
    image = image**params.gamma
    real = image + params.noise_sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = params.noise_sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real**2 + imaginary**2) * params.scale
    image = np.clip(np.rint(image), 0, MAX_INT16).astype(np.int16)
    return image.reshape(anatomy.shape), mask.reshape(anatomy.shape).astype(np.uint8)


def to_lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS-ordered ``data`` ``(X, Y, Z)`` flipped along x and y, with the affine that keeps
    every voxel at the same world position (so ``as_closest_canonical`` undoes it exactly)."""
    nx, ny = data.shape[0], data.shape[1]
    flip = np.array([[-1.0, 0, 0, nx - 1], [0, -1.0, 0, ny - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    return np.ascontiguousarray(data[::-1, ::-1, :]), affine @ flip


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def _check_arguments(scale: float, unlabelled: int, shape: Sequence[int]) -> tuple[int, int, int]:
    if not 0 < scale < float("inf"):
        raise ConfigError(f"demo --scale: must be a finite number > 0, got {scale}")
    if unlabelled < 0:
        raise ConfigError(f"demo --unlabelled: must be >= 0, got {unlabelled}")
    if len(shape) != 3 or any(int(s) < 4 for s in shape):
        raise ConfigError(f"demo --shape: must be three ints >= 4, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / DEMO_MARKER).is_file():
        raise DatasetError(f"{out_dir}: directory is not empty and not a demo dataset; choose an empty or new path")


def make_demo_dataset(
    out_dir: str | Path,
    *,
    scale: float = 0.1,
    seed: int = 0,
    unlabelled: int = 50,
    shape: Sequence[int] = (64, 64, 16),
    progress: Callable[[int, int], None] | None = None,
) -> DemoSummary:
    """Write a demo dataset (images, masks, ``manifest.parquet``, ``classes.parquet``) to ``out_dir``.

    Cases per class and split follow Table 1 times ``scale`` (:func:`demo_split_counts`);
    ``unlabelled`` more cases draw their class with Table 1's proportions and carry no label
    or mask. About 10 % of cases are stored in LPS order. The same ``seed`` gives identical
    voxels. ``out_dir`` may be new, empty or an earlier demo dataset (which is replaced);
    the dataset is built in a temporary sibling and renamed into place.
    ``progress(n_done, n_total)`` is called after every case.
    """
    started = time.perf_counter()
    shape = _check_arguments(scale, unlabelled, shape)
    out_dir = Path(out_dir)
    _check_target(out_dir)

    table = load_table1()
    counts = demo_split_counts(scale, table)
    classes = demo_classes(len(counts))
    plan: list[tuple[str, int | None]] = [
        (split, int(row["class"]))
        for _, row in counts.iterrows()
        for split in LABELLED_SPLITS
        for _ in range(int(row[split]))
    ]
    plan += [("unlabelled", None)] * unlabelled
    totals = table[list(LABELLED_SPLITS)].sum(axis=1).to_numpy(dtype=float)
    class_probabilities = totals / totals.sum()
    anatomy = load_anatomy(shape)

    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for index, (split, label) in enumerate(plan):
            rng = np.random.default_rng([seed, index])
            case_class = int(rng.choice(len(classes), p=class_probabilities)) if label is None else label
            params = sample_case(classes[case_class], anatomy.fov_mm, rng)
            image, mask = render_case(params, anatomy)
            affine = anatomy.affine
            if params.non_ras:
                image, affine = to_lps(image, anatomy.affine)
                mask, _ = to_lps(mask, anatomy.affine)
            case_id = f"demo-{index:05d}"
            image_path = f"{IMAGES_DIR}/{case_id}.nii.gz"
            _write_nifti(tmp / image_path, image, affine)
            mask_path = None
            if label is not None:
                mask_path = f"{MASKS_DIR}/{case_id}.nii.gz"
                _write_nifti(tmp / mask_path, mask, affine)
            rows.append(
                {
                    "case_id": case_id,
                    "image": image_path,
                    "mask": mask_path,
                    "label": label,
                    "label_name": None if label is None else classes[label].name,
                    "patient_id": f"demo-p{index:05d}",
                    "split": split,
                    "source": DEMO_SOURCE,
                    "mask_kind": None if label is None else "ground_truth",
                }
            )
            if progress is not None:
                progress(index + 1, len(plan))
        manifest = pd.DataFrame(rows)
        manifest["label"] = pd.array(manifest["label"], dtype="Int32")
        write_manifest(tmp, manifest)
        rare = counts.loc[counts["rare"], "class"].astype(int).tolist()
        names = {c.label: c.name for c in classes}
        write_classes(tmp, build_class_table(manifest, names=names, rare_classes=rare))
        marker = {"generator": "raytumor.data.demo", "version": DEMO_VERSION, "seed": seed, "scale": scale,
                  "unlabelled": unlabelled, "shape": list(shape)}
        atomic_write_text(tmp / DEMO_MARKER, json.dumps(marker, indent=2) + "\n")

    split_counts = {split: int((manifest["split"] == split).sum()) for split in (*LABELLED_SPLITS, "unlabelled")}
    return DemoSummary(
        out_dir=out_dir,
        n_labelled=len(plan) - unlabelled,
        n_unlabelled=unlabelled,
        counts=split_counts,
        seconds=time.perf_counter() - started,
    )
