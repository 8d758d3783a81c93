"""Rare-case data augmentation and the two-view transform for contrastive pre-training.

Implements the "Data Augmentation Module" of Liu & Feng, *Triplet Contrastive Learning for
Brain Tumor Classification*, section 3: each rare-class training case gets N independent random
sequences of rotation, horizontal and vertical flip, Gaussian noise, and a random crop resized
back to the original resolution. The same module is the "random augmentation" step of the
SimCLR-style pre-training (no colour distortion: MRI has no RGB channels), see :class:`TwoViews`.

A prepared volume is a float32 array ``(2, X, Y, Z)``: channel 0 the intensity-normalised
image, channel 1 the tumour mask (0/1, all zeros when there is none). Z is a few thick slices
(or 1 for 2-D slices), so every geometric step works in the X-Y plane and keeps the depth.

Design choices:

- The chain is MONAI dictionary transforms over ``("image", "mask")``, so one sampled rotation,
  flip and crop is applied to both keys. Noise goes to the image only.
- In-plane work is done on a depth-as-channels view ``(Z, X, Y)`` of each key: rotating a
  3-D volume about Z is the same as rotating every slice by the same angle, and the 2-D
  resampler is ~5x faster on CPU than MONAI's 3-D one (which also interpolates along Z for
  nothing). For the record, in MONAI's 3-D ``RandRotate`` it is ``range_z`` that rotates the
  X-Y plane (``range_x`` turns about the first spatial axis, i.e. mixes Y and Z) — the
  ``RandRotated`` docstring's "plane defined by the first and second axes" is misleading.
- The mask is resampled with the image's (bi)linear interpolation and then thresholded at 0.5,
  rather than nearest-neighbour: it is sampled on exactly the image's grid, so a tumour's
  boundary in the mask agrees with the one in the image to the voxel, its edges are smooth
  rather than staircased after a rotation, and torch's ``"nearest"`` resize (which is offset
  by half a voxel when upsampling) is avoided. The mask stays exactly {0, 1}.
- Noise is added after the crop-and-resize, so ``noise_std`` is the standard deviation the
  network sees (upsampling noise first would blur it by an amount that depends on the crop).
- Outside the rotated field of view the image repeats its border ("border" padding) and the
  mask is zero. Preprocessing z-scores over the foreground, so an image's background is its
  lowest value, not 0: zero padding would paint brighter-than-background corners; the volume's
  edge is background, and repeating it keeps the corners background.
- Each random transform owns its RNG; the chain is re-seeded on every call, so a result is a
  pure function of ``(volume, seed, config)``. Per-copy seeds come from a stable hash of
  ``(base_seed, case_key, k)``, never Python's salted ``hash()``, so they do not depend on the
  worker or partition that processes a case.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleCropd,
    Resized,
    SqueezeDimd,
    ToNumpyd,
    Transposed,
)

IMAGE_KEY = "image"
MASK_KEY = "mask"
KEYS = (IMAGE_KEY, MASK_KEY)
MASK_THRESHOLD = 0.5
SEED_MODULUS = 2**32  # MONAI seeds numpy RandomState, which takes 32-bit seeds

_PROBABILITY_FIELDS = ("rotate_prob", "flip_prob", "noise_prob")


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one random augmentation sequence (paper section 3, "Data Augmentation Module").

    rotate_degrees: in-plane angle drawn uniformly from [-rotate_degrees, rotate_degrees].
    rotate_prob: probability that the rotation is applied.
    flip_prob: probability of each flip, horizontal (X) and vertical (Y), drawn independently.
    noise_std: standard deviation of the zero-mean Gaussian noise added to the image.
    noise_prob: probability that noise is added.
    crop_min_fraction: each in-plane side of the crop box is drawn from
        [crop_min_fraction, 1] of the volume's side (depth kept); 1 disables crop-and-resize.
    """

    rotate_degrees: float = 15.0
    rotate_prob: float = 1.0
    flip_prob: float = 0.5
    noise_std: float = 0.05
    noise_prob: float = 1.0
    crop_min_fraction: float = 0.75

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"AugmentConfig.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"AugmentConfig.{f.name} must be finite, got {value!r}")
        for name in _PROBABILITY_FIELDS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.rotate_degrees <= 180.0:
            raise ValueError(f"AugmentConfig.rotate_degrees must be in [0, 180], got {self.rotate_degrees!r}")
        if self.noise_std < 0.0:
            raise ValueError(f"AugmentConfig.noise_std must be >= 0, got {self.noise_std!r}")
        if not 0.0 < self.crop_min_fraction <= 1.0:
            raise ValueError(f"AugmentConfig.crop_min_fraction must be in (0, 1], got {self.crop_min_fraction!r}")


def rare_case_transform(
    spatial_size: Sequence[int], config: AugmentConfig = AugmentConfig(), seed: int | None = None
) -> Compose:
    """MONAI dictionary chain for one random augmentation sequence.

    Input and output dicts map ``"image"`` and ``"mask"`` to ``(1, X, Y, Z)`` arrays with
    ``spatial_size == (X, Y, Z)``; outputs are float32 numpy arrays, the mask in {0, 1}.
    Steps (each sampled once and shared by both keys): rotation about Z, flip along X, flip
    along Y, random crop of the X-Y plane resized back to (X, Y), then noise on the image.
    Steps that the config disables are left out. ``seed`` seeds every random step; call
    ``set_random_state(seed)`` on the result to replay.
    """
    size = tuple(int(s) for s in spatial_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"spatial_size must be three positive ints (X, Y, Z), got {tuple(spatial_size)}")
    in_plane = size[:2]
    steps: list = [
        # (1, X, Y, Z) -> (Z, X, Y): depth becomes channels, so what follows is in-plane 2-D.
        SqueezeDimd(KEYS, dim=0),
        Transposed(KEYS, (2, 0, 1)),
    ]
    if config.rotate_degrees > 0 and config.rotate_prob > 0:
        angle = math.radians(config.rotate_degrees)
        steps.append(
            RandRotated(
                KEYS,
                range_x=angle,  # in 2-D the one angle is the X-Y plane's
                prob=config.rotate_prob,
                keep_size=True,
                mode="bilinear",
                padding_mode=("border", "zeros"),  # per key: image, mask
                dtype=np.float32,
            )
        )
    if config.flip_prob > 0:
        steps += [
            RandFlipd(KEYS, prob=config.flip_prob, spatial_axis=0),  # horizontal: X
            RandFlipd(KEYS, prob=config.flip_prob, spatial_axis=1),  # vertical: Y
        ]
    if config.crop_min_fraction < 1:
        steps += [
            RandScaleCropd(
                KEYS, roi_scale=config.crop_min_fraction, max_roi_scale=1.0, random_center=True, random_size=True
            ),
            Resized(KEYS, spatial_size=in_plane, mode="bilinear"),
        ]
    steps.append(AsDiscreted(MASK_KEY, threshold=MASK_THRESHOLD))
    if config.noise_std > 0 and config.noise_prob > 0:
        steps.append(
            RandGaussianNoised(IMAGE_KEY, prob=config.noise_prob, mean=0.0, std=config.noise_std, sample_std=False)
        )
    steps += [
        Transposed(KEYS, (1, 2, 0)),  # (Z, X, Y) -> (X, Y, Z)
        EnsureChannelFirstd(KEYS, channel_dim="no_channel"),
        ToNumpyd(KEYS, dtype=np.float32),
    ]
    transform = Compose(steps)
    if seed is not None:
        transform.set_random_state(seed=int(seed) % SEED_MODULUS)
    return transform


# Building the chain costs about as much as running it on a small volume, so each thread keeps
# one per (spatial_size, config) and re-seeds it on every call: results do not depend on call
# order, and threads never share a transform's RNG.
_CACHE = threading.local()
_CACHE_MAX = 16


def _cached_transform(spatial_size: tuple[int, ...], config: AugmentConfig) -> Compose:
    cache = getattr(_CACHE, "transforms", None)
    if cache is None:
        cache = _CACHE.transforms = {}
    key = (spatial_size, config)
    transform = cache.get(key)
    if transform is None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        transform = cache[key] = rare_case_transform(spatial_size, config)
    return transform


def _as_volume(volume: np.ndarray) -> np.ndarray:
    array = np.asarray(volume, dtype=np.float32)
    if array.ndim != 4 or array.shape[0] != 2:
        raise ValueError(f"expected a prepared volume of shape (2, X, Y, Z), got {np.shape(volume)}")
    return array


def augment_volume(volume: np.ndarray, seed: int, config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One random augmentation sequence of a prepared volume.

    volume: ``(2, X, Y, Z)``, channel 0 image, channel 1 mask; not modified.
    Returns a new float32 ``(2, X, Y, Z)`` array, a pure function of ``(volume, seed, config)``.
    """
    array = _as_volume(volume)
    transform = _cached_transform(tuple(array.shape[1:]), config)
    transform.set_random_state(seed=int(seed) % SEED_MODULUS)
    out = transform({IMAGE_KEY: array[0:1], MASK_KEY: array[1:2]})
    return np.concatenate([out[IMAGE_KEY], out[MASK_KEY]], axis=0).astype(np.float32, copy=False)


def _stable_seed(*parts: int | str) -> int:
    """A 32-bit seed from a stable hash of ``parts`` (same on every process and machine)."""
    payload = json.dumps([p if isinstance(p, str) else int(p) for p in parts]).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") % SEED_MODULUS


def case_seed(base_seed: int, case_key: str, k: int) -> int:
    """Seed of the ``k``-th augmented copy of case ``case_key``; independent of who computes it."""
    return _stable_seed(base_seed, str(case_key), k)


def augment_case(
    volume: np.ndarray, n: int, base_seed: int, case_key: str, config: AugmentConfig = AugmentConfig()
) -> list[np.ndarray]:
    """The ``n`` augmented copies of one rare-class case (paper: "N independent and random sequences").

    volume: ``(2, X, Y, Z)``. Returns ``n`` float32 ``(2, X, Y, Z)`` arrays; copy ``k`` uses
    ``case_seed(base_seed, case_key, k)``, so it is the same whatever else was processed before.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n (augmented copies per case) must be a non-negative int, got {n!r}")
    array = _as_volume(volume)
    return [augment_volume(array, case_seed(base_seed, case_key, k), config) for k in range(int(n))]


class TwoViews:
    """Two independent augmented views of one volume, for contrastive (SimCLR-style) pre-training.

    Both views come from the rare-case chain (paper section 3, "Contrastive Learning": colour
    distortion is dropped since MRI has no RGB channels). ``rng_or_seed`` is an int (the two
    view seeds are hashed from it) or a ``numpy.random.Generator`` (two seeds are drawn from it).
    Returns ``(view1, view2)``, each float32 ``(2, X, Y, Z)``.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config

    def __call__(self, volume: np.ndarray, rng_or_seed: int | np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(rng_or_seed, np.random.Generator):
            seed1, seed2 = (int(s) for s in rng_or_seed.integers(0, SEED_MODULUS, size=2))
        else:
            seed1, seed2 = _stable_seed(rng_or_seed, "view", 0), _stable_seed(rng_or_seed, "view", 1)
        return augment_volume(volume, seed1, self.config), augment_volume(volume, seed2, self.config)


def two_view_batch(
    volumes: np.ndarray, seed: int, config: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Two views of every volume in a batch: ``(B, 2, X, Y, Z)`` -> two float32 ``(B, 2, X, Y, Z)``.

    Volume ``b`` uses a seed hashed from ``(seed, b)``, so a batch's views are reproducible.
    """
    batch = np.asarray(volumes, dtype=np.float32)
    if batch.ndim != 5 or batch.shape[1] != 2:
        raise ValueError(f"expected a batch of prepared volumes of shape (B, 2, X, Y, Z), got {np.shape(volumes)}")
    views = TwoViews(config)
    views1 = np.empty_like(batch)
    views2 = np.empty_like(batch)
    for b in range(batch.shape[0]):
        views1[b], views2[b] = views(batch[b], _stable_seed(seed, "batch", b))
    return views1, views2
