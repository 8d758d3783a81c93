"""Rare-case augmentation: determinism, purity, image/mask geometry, and the two-view helper."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from monai.transforms import Compose, RandRotated

from raytumor.data.augment import (
    AugmentConfig,
    TwoViews,
    augment_case,
    augment_volume,
    case_seed,
    rare_case_transform,
    two_view_batch,
)

FLIP_ONLY = AugmentConfig(rotate_degrees=0, flip_prob=0.5, noise_std=0, crop_min_fraction=1.0)
ROTATE_ONLY = AugmentConfig(rotate_degrees=30, flip_prob=0, noise_std=0, crop_min_fraction=1.0)
CROP_ONLY = AugmentConfig(rotate_degrees=0, flip_prob=0, noise_std=0, crop_min_fraction=0.5)
NOISE_ONLY = AugmentConfig(rotate_degrees=0, flip_prob=0, noise_std=0.05, crop_min_fraction=1.0)
NO_NOISE = AugmentConfig(noise_std=0)


def make_volume(shape=(24, 20, 6), seed=0, centre=(8, 12), radius=4.0) -> np.ndarray:
    """(2, X, Y, Z): a smooth random image and an off-centre disc tumour through every slice."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    image = rng.normal(size=shape).astype(np.float32)
    xx, yy = np.meshgrid(np.arange(x), np.arange(y), indexing="ij")
    disc = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) <= radius**2
    mask = np.repeat(disc[:, :, None], z, axis=2).astype(np.float32)
    return np.stack([image, mask]).astype(np.float32)


def phantom(shape=(24, 20, 6), value=3.0) -> np.ndarray:
    """A volume whose image is ``mask * value`` on a zero background."""
    volume = make_volume(shape)
    volume[0] = volume[1] * value
    return volume


# --- determinism and purity ---------------------------------------------------------------


def test_same_seed_gives_identical_arrays_and_different_seed_differs():
    volume = make_volume()
    a = augment_volume(volume, seed=11)
    b = augment_volume(volume, seed=11)
    c = augment_volume(volume, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], c[0])


def test_result_does_not_depend_on_call_order():
    volume = make_volume()
    first = augment_volume(volume, seed=5)
    for seed in range(3):  # use the cached chain for other seeds, shapes and configs in between
        augment_volume(volume, seed=seed)
        augment_volume(make_volume((10, 10, 1)), seed=seed, config=CROP_ONLY)
    np.testing.assert_array_equal(augment_volume(volume, seed=5), first)


def test_same_result_in_another_thread():
    volume = make_volume()
    expected = augment_volume(volume, seed=3)
    got = {}
    thread = threading.Thread(target=lambda: got.setdefault("out", augment_volume(volume, seed=3)))
    thread.start()
    thread.join()
    np.testing.assert_array_equal(got["out"], expected)


def test_inputs_are_not_mutated():
    volume = make_volume()
    before = volume.copy()
    augment_volume(volume, seed=1)
    augment_case(volume, n=2, base_seed=0, case_key="c")
    TwoViews()(volume, 4)
    batch = np.stack([volume, volume])
    batch_before = batch.copy()
    two_view_batch(batch, seed=0)
    np.testing.assert_array_equal(volume, before)
    np.testing.assert_array_equal(batch, batch_before)

    data = {"image": volume[0:1], "mask": volume[1:2]}
    rare_case_transform(volume.shape[1:], seed=0)(data)
    np.testing.assert_array_equal(volume, before)
    assert data["image"] is not None and data["image"].shape == (1, 24, 20, 6)


@pytest.mark.parametrize("shape", [(24, 20, 6), (16, 16, 12), (17, 13, 8), (24, 20, 1)])
def test_shape_and_dtype_are_kept_and_mask_stays_binary(shape):
    volume = make_volume(shape).astype(np.float64)
    for seed in range(4):
        out = augment_volume(volume, seed=seed)
        assert out.shape == volume.shape
        assert out.dtype == np.float32
        assert set(np.unique(out[1])) <= {0.0, 1.0}
        assert np.isfinite(out).all()


def test_non_contiguous_input_gives_the_same_result_as_a_copy():
    view = make_volume()[:, ::-1, :, ::2]
    np.testing.assert_array_equal(augment_volume(view, seed=4), augment_volume(view.copy(), seed=4))


def test_empty_mask_stays_empty():
    volume = make_volume()
    volume[1] = 0
    out = augment_volume(volume, seed=2)
    assert not out[1].any()


def test_rare_case_transform_is_a_seeded_monai_chain_returning_numpy():
    volume = make_volume()
    data = {"image": volume[0:1], "mask": volume[1:2]}
    transform = rare_case_transform(volume.shape[1:], AugmentConfig(), seed=9)
    assert isinstance(transform, Compose)
    out = transform(data)
    for key in ("image", "mask"):
        assert isinstance(out[key], np.ndarray)
        assert out[key].dtype == np.float32
        assert out[key].shape == (1, 24, 20, 6)
    replay = rare_case_transform(volume.shape[1:], AugmentConfig(), seed=9)(data)
    np.testing.assert_array_equal(out["image"], replay["image"])
    np.testing.assert_array_equal(out["mask"], replay["mask"])
    np.testing.assert_array_equal(np.concatenate([out["image"], out["mask"]]), augment_volume(volume, 9))


# --- geometry ------------------------------------------------------------------------------


def test_image_and_mask_move_together():
    volume = phantom(value=3.0)
    for seed in range(6):
        out = augment_volume(volume, seed=seed, config=NO_NOISE)
        image, mask = out[0], out[1].astype(bool)
        assert mask.any()
        # Both keys share the sampling grid, so thresholding the image halfway equals the mask.
        mismatch = np.mean((image > 1.5) != mask)
        assert mismatch <= 0.002, (seed, mismatch)
        # The image is zero away from the mask (grown by the two bilinear steps' reach in X-Y).
        grown = np.zeros_like(mask)
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                grown |= np.roll(mask, (dx, dy), axis=(0, 1))
        assert np.all(image[~grown] == 0), seed


def test_flip_moves_a_marked_voxel_to_a_mirrored_position_in_both_channels():
    x, y, z = 12, 10, 4
    volume = np.zeros((2, x, y, z), np.float32)
    volume[:, 2, 3, 1] = 1.0
    allowed = {(2, 3), (x - 1 - 2, 3), (2, y - 1 - 3), (x - 1 - 2, y - 1 - 3)}
    seen = set()
    for seed in range(40):
        out = augment_volume(volume, seed=seed, config=FLIP_ONLY)
        image_at = [tuple(p) for p in np.argwhere(out[0] == 1.0)]
        mask_at = [tuple(p) for p in np.argwhere(out[1] == 1.0)]
        assert image_at == mask_at and len(image_at) == 1
        px, py, pz = image_at[0]
        assert pz == 1 and (px, py) in allowed
        seen.add((px, py))
    assert seen == allowed  # horizontal and vertical flips each happen, independently

    always = AugmentConfig(rotate_degrees=0, flip_prob=1.0, noise_std=0, crop_min_fraction=1.0)
    out = augment_volume(volume, seed=0, config=always)
    assert out[0, x - 3, y - 4, 1] == 1.0 and out[1, x - 3, y - 4, 1] == 1.0
    assert out.sum() == 2.0


def test_rotation_is_in_the_xy_plane():
    x, y, z = 24, 24, 5
    volume = np.zeros((2, x, y, z), np.float32)
    # Each slice holds its own depth index; a rotation that tilted Z would mix them.
    volume[0] = np.arange(z, dtype=np.float32)[None, None, :] + 1.0
    volume[1, 8:16, 6:12, :] = 1.0  # an off-centre box, constant along Z
    xx, yy = np.meshgrid(np.arange(x) - (x - 1) / 2, np.arange(y) - (y - 1) / 2, indexing="ij")
    inner = xx**2 + yy**2 < (x / 2 - 2) ** 2  # away from the zero-padded corners
    changed = False
    for seed in range(5):
        out = augment_volume(volume, seed=seed, config=ROTATE_ONLY)
        np.testing.assert_allclose(out[0][inner], np.broadcast_to(volume[0][inner], out[0][inner].shape), atol=1e-5)
        np.testing.assert_array_equal(out[1], np.repeat(out[1][:, :, :1], z, axis=2))  # constant along Z
        changed |= not np.array_equal(out[1], volume[1])
    assert changed


def test_rotation_fills_corners_with_the_background_not_zero():
    # Preprocessing z-scores over the foreground, so the background is negative, not 0.
    volume = np.full((2, 24, 24, 3), -1.5, np.float32)
    volume[0, 8:16, 8:16] = 2.0
    volume[1] = 0.0
    volume[1, 8:16, 8:16] = 1.0
    config = AugmentConfig(rotate_degrees=45, flip_prob=0, noise_std=0, crop_min_fraction=1.0)
    out = augment_volume(volume, seed=0, config=config)
    assert out[0, 0, 0, 0] == pytest.approx(-1.5) and out[0, -1, -1, 0] == pytest.approx(-1.5)
    assert out[0].min() >= -1.5 - 1e-5
    assert out[1, 0, 0, 0] == 0.0


def test_monai_3d_range_z_is_the_xy_plane():
    """Pins the MONAI convention the module's docstring relies on: range_* turns *about* an axis."""
    volume = np.zeros((1, 9, 9, 5), np.float32)
    volume[0, 6, 4, 2] = 1.0  # offset from the centre along X only
    quarter = (math.pi / 2, math.pi / 2)
    about_z = RandRotated("a", range_z=quarter, prob=1.0, mode="nearest", padding_mode="zeros")
    about_x = RandRotated("a", range_x=quarter, prob=1.0, mode="nearest", padding_mode="zeros")
    moved = np.argwhere(np.asarray(about_z({"a": volume})["a"])[0] > 0.5).tolist()
    kept = np.argwhere(np.asarray(about_x({"a": volume})["a"])[0] > 0.5).tolist()
    assert moved in ([[4, 2, 2]], [[4, 6, 2]])  # X offset became a Y offset, same slice
    assert kept == [[6, 4, 2]]


def test_crop_and_resize_keeps_shape_and_zooms_in():
    volume = make_volume((32, 32, 4), centre=(16, 16), radius=3.0)
    area = volume[1].sum()
    config = AugmentConfig(rotate_degrees=0, flip_prob=0, noise_std=0, crop_min_fraction=0.8)
    zoomed = 0
    for seed in range(6):
        out = augment_volume(volume, seed=seed, config=config)
        assert out.shape == volume.shape
        assert set(np.unique(out[1])) <= {0.0, 1.0}
        assert out[1].sum() >= area * 0.9  # the centred tumour is inside every crop box
        zoomed += out[1].sum() > area * 1.05
    assert zoomed >= 4

    out = augment_volume(volume, seed=0, config=CROP_ONLY)
    assert out.shape == volume.shape and not np.array_equal(out[0], volume[0])


def test_noise_touches_only_the_image():
    volume = make_volume((32, 32, 8))
    out = augment_volume(volume, seed=0, config=NOISE_ONLY)
    np.testing.assert_array_equal(out[1], volume[1])
    residual = out[0] - volume[0]
    assert 0.045 < residual.std() < 0.055
    assert abs(residual.mean()) < 0.005


def test_depth_one_volumes_work():
    volume = make_volume((28, 22, 1))
    out = augment_volume(volume, seed=3)
    assert out.shape == (2, 28, 22, 1) and out.dtype == np.float32
    assert set(np.unique(out[1])) <= {0.0, 1.0}
    np.testing.assert_array_equal(out, augment_volume(volume, seed=3))
    assert not np.array_equal(out, volume)


# --- per-case seeds ------------------------------------------------------------------------


def test_case_seed_is_a_stable_hash():
    # Fixed values: not Python's salted hash(), so the same on every worker and run.
    assert case_seed(0, "case-a", 0) == 2889204863
    assert case_seed(7, "BraTS_001", 3) == 301711004
    assert len({case_seed(0, "case-a", k) for k in range(50)}) == 50
    assert case_seed(0, "case-a", 0) != case_seed(1, "case-a", 0) != case_seed(0, "case-b", 0)


def test_augment_case_does_not_depend_on_what_was_processed_before():
    case_a, case_b = make_volume(seed=1), make_volume((16, 16, 1), seed=2)
    alone = augment_case(case_a, n=3, base_seed=42, case_key="A")
    augment_case(case_b, n=2, base_seed=42, case_key="B")
    after_b = augment_case(case_a, n=3, base_seed=42, case_key="A")
    assert len(alone) == 3
    for x, y in zip(alone, after_b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(alone[0], alone[1])  # the N copies are independent
    assert augment_case(case_a, n=0, base_seed=42, case_key="A") == []
    with pytest.raises(ValueError, match="n "):
        augment_case(case_a, n=-1, base_seed=42, case_key="A")


# --- contrastive views ---------------------------------------------------------------------


def test_two_views_are_different_and_reproducible():
    volume = make_volume()
    view1, view2 = TwoViews()(volume, 7)
    assert view1.shape == view2.shape == volume.shape
    assert not np.array_equal(view1, view2)
    again1, again2 = TwoViews()(volume, 7)
    np.testing.assert_array_equal(view1, again1)
    np.testing.assert_array_equal(view2, again2)

    g1, g2 = TwoViews()(volume, np.random.default_rng(0))
    h1, _ = TwoViews()(volume, np.random.default_rng(0))
    assert not np.array_equal(g1, g2)
    np.testing.assert_array_equal(g1, h1)


def test_two_view_batch():
    batch = np.stack([make_volume((16, 16, 4), seed=s) for s in range(3)])
    views1, views2 = two_view_batch(batch, seed=0)
    assert views1.shape == views2.shape == batch.shape
    assert views1.dtype == views2.dtype == np.float32
    for b in range(3):
        assert not np.array_equal(views1[b], views2[b])
    again1, _ = two_view_batch(batch, seed=0)
    np.testing.assert_array_equal(views1, again1)
    with pytest.raises(ValueError, match="B, 2, X, Y, Z"):
        two_view_batch(batch[0], seed=0)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rotate_degrees", -1.0),
        ("rotate_degrees", 181.0),
        ("rotate_prob", 1.5),
        ("flip_prob", -0.1),
        ("noise_std", -0.01),
        ("noise_prob", 2.0),
        ("crop_min_fraction", 0.0),
        ("crop_min_fraction", 1.2),
        ("noise_std", float("nan")),
        ("flip_prob", "0.5"),
        ("rotate_prob", True),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"AugmentConfig.{field}"):
        AugmentConfig(**{field: value})


def test_config_is_frozen_and_unknown_fields_are_errors():
    config = AugmentConfig()
    with pytest.raises(AttributeError):
        config.noise_std = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        AugmentConfig(colour_jitter=0.5)  # type: ignore[call-arg]


def test_bad_volume_shape_is_an_error():
    with pytest.raises(ValueError, match=r"\(2, X, Y, Z\)"):
        augment_volume(np.zeros((3, 8, 8, 2), np.float32), seed=0)
    with pytest.raises(ValueError, match="spatial_size"):
        rare_case_transform((8, 8))
