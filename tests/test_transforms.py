"""Joint geometry of image and labels, preprocessing, folds and limits."""

import numpy as np
import pytest
import torch

from kdcache.core.errors import DatasetError
from kdcache.data.base import SampleRef, SegmentationDataset
from kdcache.data.splits import fold_split, kfold_indices, limit
from kdcache.pipeline.transforms import (
    Augment,
    Geometry,
    Preprocess,
    SegPipeline,
    apply_geometry,
    collate,
    resize_labels,
    sample_geometry,
)


class ArrayDataset(SegmentationDataset):
    name = "arrays"
    class_names = ("a", "b", "c")

    def __init__(self, images, masks):
        self.images, self.masks = images, masks
        super().__init__([SampleRef(id=f"s{i}") for i in range(len(images))], "train")

    def read_image(self, ref):
        return self.images[int(ref.id[1:])]

    def read_mask(self, ref):
        return self.masks[int(ref.id[1:])]


def test_labels_are_never_interpolated():
    y = torch.tensor([[0, 2], [1, 255]])
    z = resize_labels(y, (5, 7))
    assert set(z.unique().tolist()) <= {0, 1, 2, 255}
    assert z[0, 0] == 0 and z[-1, -1] == 255


def test_geometry_is_the_same_on_image_and_label():
    # an image made of constant 4x4 blocks whose red channel is the block's label: after any
    # sampled scale/crop/flip, the bilinearly resampled image must still carry, away from block
    # edges, the colour of the label that nearest-neighbour resampling puts at the same pixel
    rng = np.random.default_rng(0)
    blocks = torch.from_numpy(rng.integers(0, 3, size=(4, 5))).long()
    y = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 16 x 20
    x = torch.stack([y.float(), torch.zeros(16, 20), torch.zeros(16, 20)])
    checked = 0
    for s in range(20):
        g = sample_geometry(np.random.default_rng(s), (16, 20), Augment(scale=(1.0, 2.0), crop=(14, 18)))
        xi = apply_geometry(x, g, kind="image", fill=-1.0)
        yi = apply_geometry(y, g, kind="label", fill=255)
        assert yi.shape == (14, 18) and xi.shape == (3, 14, 18)
        # pixels whose 3x3 neighbourhood has one label are far from block edges
        pad = torch.nn.functional.pad(yi[None, None].float(), (1, 1, 1, 1), value=255)
        nb = pad.unfold(2, 3, 1).unfold(3, 3, 1).reshape(14, 18, 9)
        interior = (nb == yi[..., None]).all(-1) & (yi != 255)
        assert torch.allclose(xi[0][interior], yi[interior].float(), atol=1e-4)
        assert (yi[xi[0] == -1.0] == 255).all()  # padding is padding in both
        checked += int(interior.sum())
    assert checked > 1000


def test_crop_beyond_image_is_padded_with_ignore():
    g = Geometry(in_size=(4, 4), scale=1.0, top=0, left=0, out_size=(6, 5), flip=False)
    y = apply_geometry(torch.zeros(4, 4, dtype=torch.long), g, kind="label", fill=255)
    assert (y[4:] == 255).all() and (y[:, 4:] == 255).all() and (y[:4, :4] == 0).all()
    x = apply_geometry(torch.ones(3, 4, 4), g, kind="image", fill=0.0)
    assert (x[:, 4:] == 0).all() and (x[:, :4, :4] == 1).all()


def test_flip_mirrors():
    g = Geometry(in_size=(2, 3), scale=1.0, top=0, left=0, out_size=(2, 3), flip=True)
    y = torch.tensor([[0, 1, 2], [2, 1, 0]])
    assert torch.equal(apply_geometry(y, g, kind="label"), y.flip(-1))


def test_preprocess_normalises_and_round_trips():
    p = Preprocess()
    img = np.random.default_rng(0).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    x = p.image_to_tensor(img)
    assert x.shape == (3, 5, 6)
    assert abs(float(x[0, 0, 0]) - (img[0, 0, 0] / 255 - 0.485) / 0.229) < 1e-5
    np.testing.assert_array_equal(p.denormalize(x), img)
    r = Preprocess(resize=(10, 12))
    assert r.image_to_tensor(img).shape == (3, 10, 12)
    assert r.mask_to_tensor(np.zeros((5, 6), np.uint8)).shape == (10, 12)
    assert Preprocess.from_dict(r.to_dict()) == r


def test_pipeline_is_deterministic_per_epoch_and_index():
    rng = np.random.default_rng(0)
    ds = ArrayDataset([rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)],
                      [rng.integers(0, 3, (8, 8), dtype=np.uint8) for _ in range(3)])
    pipe = SegPipeline(ds, Preprocess(), Augment(scale=(0.5, 2.0), crop=(6, 6)), seed=1)
    a = pipe[1]
    b = pipe[1]
    assert torch.equal(a["image"], b["image"]) and a["id"] == "s1"
    different = False
    for e in range(1, 6):
        pipe.set_epoch(e)
        different |= not torch.equal(pipe[1]["image"], a["image"])
    assert different
    batch = collate([pipe[0], pipe[1]])
    assert batch["image"].shape == (2, 3, 6, 6) and batch["label"].dtype == torch.long


def test_collate_keeps_lists_for_different_sizes():
    items = [{"image": torch.zeros(3, 4, 4), "label": torch.zeros(4, 4), "id": "a", "index": 0},
             {"image": torch.zeros(3, 5, 4), "label": torch.zeros(5, 4), "id": "b", "index": 1}]
    batch = collate(items)
    assert isinstance(batch["image"], list) and len(batch["image"]) == 2


def test_kfold_partitions_the_data():
    n, k = 11, 3
    held = []
    for f in range(k):
        train, val = kfold_indices(n, k, f, seed=0)
        assert not set(train) & set(val) and sorted(train + val) == list(range(n))
        held += val
    assert sorted(held) == list(range(n))
    assert kfold_indices(n, k, 1, seed=0) == kfold_indices(n, k, 1, seed=0)


def test_kfold_and_limit_errors():
    with pytest.raises(DatasetError, match="--fold must be in 0..1"):
        kfold_indices(10, 2, 2)
    with pytest.raises(DatasetError, match="at least 2"):
        kfold_indices(10, 1, 0)
    ds = ArrayDataset([np.zeros((2, 2, 3), np.uint8)] * 4, [np.zeros((2, 2), np.uint8)] * 4)
    assert limit(ds, 2).ids == ["s0", "s1"] and len(limit(ds, None)) == 4
    with pytest.raises(DatasetError, match="--limit must be positive, got 0"):  # a Python caller's (the CLI's bounds come first)
        limit(ds, 0)
    tr, va = fold_split(ds, 2, 0)
    assert len(tr) + len(va) == 4 and not set(tr.ids) & set(va.ids)
