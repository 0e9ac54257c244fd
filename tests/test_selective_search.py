"""Our selective search must give the reference's boxes, in the reference's order, exactly.

The reference is PyPI ``selectivesearch`` 0.4 with the released SoCo fix (texture range 0..255),
run here on real photos that ship inside scikit-image, and on random images (hypothesis).
"""

import importlib
import warnings

import numpy as np
import pytest
import skimage.data
import skimage.feature
import skimage.segmentation
import skimage.util
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from soco_pretrain.proposals.reference import reference_selective_search

ss = importlib.import_module("soco_pretrain.proposals.selective_search")
selective_search = ss.selective_search


def photo(name: str, long_side: int | None = None) -> np.ndarray:
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if long_side:
        pil = Image.fromarray(image)
        pil.thumbnail((long_side, long_side), Image.BILINEAR)
        image = np.asarray(pil)
    return np.ascontiguousarray(image[:, :, :3])


def reference(image, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about LBP on float images
        return reference_selective_search(image, *args)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


# The reference costs seconds per full-size photo; 240-300 px copies keep this under a minute
# while still exercising thousands of merges and tied similarities.
@pytest.mark.parametrize(
    "name,size,params",
    [
        ("astronaut", 300, (500, 0.9, 10)),  # the paper's parameters (appendix A.1)
        ("coffee", 300, (500, 0.9, 10)),
        ("chelsea", 260, (500, 0.9, 10)),
        ("rocket", 260, (500, 0.9, 10)),
        ("camera", 240, (500, 0.9, 10)),  # grayscale photo as RGB: equal channels, many ties
        ("coffee", 300, (300, 0.9, 100)),  # the released code's parameters
    ],
)
def test_identical_to_reference_on_real_photos(name, size, params):
    image = photo(name, size)
    ours = selective_search(image, *params)
    ref = reference(image, *params)
    assert ours.dtype == np.int32 and ours.shape[1] == 4
    assert len(ref) > 50  # a real hierarchy, not a trivial case
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "camera"])
def test_identical_to_reference_full_size(name):
    image = photo(name)
    np.testing.assert_array_equal(selective_search(image), reference(image))


@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera"])
def test_felzenszwalb_partition_matches_skimage_full_size(name):
    image = photo(name)
    ref = skimage.segmentation.felzenszwalb(skimage.util.img_as_float(image), scale=500, sigma=0.9, min_size=10)
    assert same_partition(ss.felzenszwalb_roots(image, 500, 0.9, 10), ref)


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_lbp_matches_skimage_full_size(name):
    image = photo(name)
    for ch in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = skimage.feature.local_binary_pattern(image[:, :, ch].astype(np.float64), 8, 1.0)
        np.testing.assert_array_equal(ss._lbp_codes(image, ch, float(ss._LBP_CP[1])), ref)


def test_cost_kernel_matches_numpy_arithmetic():
    g = np.random.default_rng(1).random((31, 17, 3))
    np.testing.assert_array_equal(ss._edge_costs_kernel(g), ss._edge_costs_numpy(g))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 2), (3, 40), (40, 3)])
def test_degenerate_shapes_match_reference(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(selective_search(image, 500, 0.9, 1), reference(image, 500, 0.9, 1))
    np.testing.assert_array_equal(selective_search(image), reference(image))


@st.composite
def blocky_images(draw):
    # Flat blocks with a little noise: many equal similarities and tied edge costs, the cases
    # where merge order and tie-breaking must follow the reference exactly.
    h = draw(st.integers(8, 40))
    w = draw(st.integers(8, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(rng.integers(1, 5), rng.integers(1, 5), 3))
    image = np.asarray(Image.fromarray(cells.astype(np.uint8)).resize((w, h), Image.NEAREST)).copy()
    noise = draw(st.sampled_from([0, 2, 20]))
    if noise:
        image = np.clip(image.astype(int) + rng.integers(-noise, noise + 1, image.shape), 0, 255).astype(np.uint8)
    return image


@settings(max_examples=40, deadline=None)
@given(image=blocky_images(), min_size=st.sampled_from([1, 10]), scale=st.sampled_from([100, 500]))
def test_identical_to_reference_on_random_images(image, min_size, scale):
    np.testing.assert_array_equal(selective_search(image, scale, 0.9, min_size), reference(image, scale, 0.9, min_size))


def test_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        selective_search(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        selective_search(np.zeros((10, 10, 3), dtype=np.float64))
