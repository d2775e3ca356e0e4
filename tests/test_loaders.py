"""The real data-set loaders (VOC, CamVid, Cityscapes, folder) on tiny fake data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdcache.core.errors import DatasetError
from kdcache.data import DATASETS, build_dataset
from kdcache.data.base import default_palette
from kdcache.data.camvid import CamVidDataset
from kdcache.data.cityscapes import LABEL_TO_TRAIN_ID, CityscapesDataset
from kdcache.data.folder import FolderDataset
from kdcache.data.voc import VOC_CLASSES, VOCDataset

H, W = 16, 20


# -- writing tiny files ------------------------------------------------------------------------
def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_rgb(path: Path, seed: int = 0, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(seed, h, w)).save(path)


def write_gray(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def write_palette(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(values.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[:21] = default_palette(21)
    pal[255] = (224, 224, 192)
    im.putpalette(pal.tobytes())
    im.save(path)


def class_mask(cls: int, border: int | None = 255, h: int = H, w: int = W) -> np.ndarray:
    m = np.full((h, w), cls, np.uint8)
    if border is not None:
        m[0, :] = border
        m[:, 0] = border
    return m


# -- fake data sets ----------------------------------------------------------------------------
VOC_IDS = {"train": ["2007_000032", "2007_000039"], "val": ["2008_000002", "2007_000033"]}


def make_voc(base: Path) -> Path:
    """base/VOCdevkit/VOC2012 with train (2), val (2), trainval (4); returns the VOC2012 folder."""
    voc = base / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for i, sid in enumerate(VOC_IDS["train"] + VOC_IDS["val"]):
        write_rgb(voc / "JPEGImages" / f"{sid}.jpg", seed=i)
        write_palette(voc / "SegmentationClass" / f"{sid}.png", class_mask(i * 5))
    write_rgb(voc / "JPEGImages" / "2009_999999.jpg", seed=9)  # an image in no split
    (sets / "train.txt").write_text("\n".join(VOC_IDS["train"]) + "\n")
    (sets / "val.txt").write_text("\n".join(VOC_IDS["val"]) + "\n")
    (sets / "trainval.txt").write_text("\n".join(VOC_IDS["train"] + VOC_IDS["val"]) + "\n")
    return voc


CAMVID_STEMS = {
    "train": ["0001TP_006690", "0001TP_006720", "0006R0_f00930"],
    "val": ["0016E5_07959"],
}


def make_camvid(root: Path) -> Path:
    for split, stems in CAMVID_STEMS.items():
        for i, stem in enumerate(stems):
            write_rgb(root / split / f"{stem}.png", seed=i)
            m = np.full((H, W), i, np.uint8)
            m[:, :4] = 11  # void
            m[0, 4:] = 10
            write_gray(root / f"{split}annot" / f"{stem}.png", m)
    (root / "test").mkdir()
    (root / "testannot").mkdir()
    return root


CITY_STEMS = {
    "train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
    "val": ["frankfurt_000000_000294"],
}


def make_cityscapes(root: Path) -> Path:
    for split, stems in CITY_STEMS.items():
        for i, stem in enumerate(stems):
            city = stem.split("_")[0]
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i)
            m = np.zeros((H, W), np.uint8)  # 0 = unlabeled
            m[:, 5:10] = 7  # road
            m[:, 10:15] = 26  # car
            m[:, 15:] = 33  # bicycle
            m[0, :] = 1  # ego vehicle
            m[1, :] = 9  # parking (void in train ids)
            write_gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", m)
            # the other gtFine files must be ignored
            write_gray(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", m)
    (root / "leftImg8bit" / "test").mkdir()
    (root / "gtFine" / "test").mkdir()
    return root


FOLDER_CLASSES = ["background", "cat", "dog"]


def make_folder(root: Path, stems=("b", "a", "c"), exts=(".jpg", ".png", ".bmp")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n\n")
    for i, (stem, ext) in enumerate(zip(stems, exts, strict=False)):
        write_rgb(root / "images" / f"{stem}{ext}", seed=i)
        write_palette(root / "masks" / f"{stem}.png", class_mask(i % 3))
    return root


# -- Pascal VOC --------------------------------------------------------------------------------
def test_voc_splits_ids_and_masks(tmp_path):
    make_voc(tmp_path)
    ds = VOCDataset(tmp_path, "train")
    assert ds.ids == sorted(VOC_IDS["train"])
    assert ds.class_names == VOC_CLASSES and ds.num_classes == 21
    assert ds.class_names[0] == "background" and ds.class_names[-1] == "tvmonitor"
    img, mask = ds.load(1)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert mask[0, 0] == 255 and mask[5, 5] == 5  # palette indices are class ids, 255 borders kept
    assert set(np.unique(mask)) == {5, 255}
    val = VOCDataset(tmp_path, "val")
    assert val.ids == ["2007_000033", "2008_000002"]  # sorted, not list order
    tv = VOCDataset(tmp_path, "trainval")
    assert tv.ids == sorted(VOC_IDS["train"] + VOC_IDS["val"])
    assert [tv.load(i)[1][3, 3] for i in range(4)] == [0, 15, 5, 10]
    assert ds.palette.shape == (21, 3)
    assert tuple(ds.palette[1]) == (128, 0, 0) and tuple(ds.palette[15]) == (192, 128, 128)


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_root_variants(tmp_path, sub):
    make_voc(tmp_path)
    ds = VOCDataset(tmp_path / sub if sub else tmp_path, "train")
    assert ds.ids == sorted(VOC_IDS["train"])


def test_voc_through_registry(tmp_path):
    make_voc(tmp_path)
    assert DATASETS.get("voc") is VOCDataset
    ds = build_dataset("voc", "val", tmp_path)
    assert isinstance(ds, VOCDataset) and len(ds) == 2 and ds.split == "val"
    ds = build_dataset("voc", "train", str(tmp_path / "VOCdevkit"))
    assert len(ds) == 2


def test_voc_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match=r"expected VOCdevkit/VOC2012/\{JPEGImages"):
        VOCDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match="expected VOCdevkit/VOC2012"):
        VOCDataset(tmp_path / "nowhere", "train")
    voc = make_voc(tmp_path)
    with pytest.raises(DatasetError, match="no split 'test'.*valid splits: train, trainval, val"):
        VOCDataset(tmp_path, "test")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2010_000001\n")
    with pytest.raises(DatasetError, match=r"train.txt names '2010_000001'.*2010_000001\.jpg"):
        VOCDataset(tmp_path, "train")
    write_rgb(voc / "JPEGImages" / "2010_000001.jpg")
    with pytest.raises(DatasetError, match=r"mask .*SegmentationClass/2010_000001\.png does not"):
        VOCDataset(tmp_path, "train")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match="split 'val' is empty"):
        VOCDataset(tmp_path, "val")
    (voc / "ImageSets" / "Segmentation" / "trainval.txt").unlink()
    with pytest.raises(DatasetError, match=r"split list .*trainval\.txt does not exist"):
        VOCDataset(tmp_path, "trainval")


def test_voc_partial_layout_names_missing_folder(tmp_path):
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"lacks SegmentationClass, ImageSets/Segmentation"):
        VOCDataset(tmp_path, "train")


def test_voc_bad_mask_values_and_size(tmp_path):
    voc = make_voc(tmp_path)
    sid = VOC_IDS["train"][0]
    write_palette(voc / "SegmentationClass" / f"{sid}.png", class_mask(21))
    ds = VOCDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match=rf"{sid}\.png has values \{{21\}} outside the 21"):
        ds.load(0)
    write_palette(voc / "SegmentationClass" / f"{sid}.png", class_mask(3, h=H + 1))
    with pytest.raises(DatasetError, match=rf"{sid}\.jpg is 20x16 .* is 20x17"):
        ds.load(0)


# -- CamVid ------------------------------------------------------------------------------------
def test_camvid_splits_ids_and_void(tmp_path):
    make_camvid(tmp_path)
    ds = CamVidDataset(tmp_path, "train")
    assert ds.ids == CAMVID_STEMS["train"]
    assert ds.num_classes == 11 and ds.class_names[0] == "sky" and ds.class_names[10] == "bicyclist"
    img, mask = ds.load(2)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert (mask[:, :4] == 255).all()  # void 11 -> ignore
    assert (mask[1:, 4:] == 2).all() and (mask[0, 4:] == 10).all()
    assert ds.palette.shape == (11, 3) and tuple(ds.palette[3]) == (128, 64, 128)
    assert CamVidDataset(tmp_path, "val").ids == CAMVID_STEMS["val"]
    ds2 = build_dataset("camvid", "val", tmp_path)
    assert isinstance(ds2, CamVidDataset) and len(ds2) == 1


def test_camvid_root_may_be_parent(tmp_path):
    make_camvid(tmp_path / "CamVid")
    assert CamVidDataset(tmp_path, "train").ids == CAMVID_STEMS["train"]


def test_camvid_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match=r"expected \{train,val,test\}/\*\.png with .*annot"):
        CamVidDataset(tmp_path, "train")
    make_camvid(tmp_path)
    with pytest.raises(DatasetError, match="no split 'trainval'.*valid splits: test, train, val"):
        CamVidDataset(tmp_path, "trainval")
    with pytest.raises(DatasetError, match="CamVid split 'test' is empty"):
        CamVidDataset(tmp_path, "test")
    write_rgb(tmp_path / "train" / "0001TP_009999.png")
    write_gray(tmp_path / "valannot" / "0016E5_00001.png", class_mask(1))
    with pytest.raises(DatasetError, match="without a mask .*: 0001TP_009999"):
        CamVidDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match="without an image .*: 0016E5_00001"):
        CamVidDataset(tmp_path, "val")


def test_camvid_bad_mask_values_and_size(tmp_path):
    make_camvid(tmp_path)
    stem = CAMVID_STEMS["train"][0]
    write_gray(tmp_path / "trainannot" / f"{stem}.png", class_mask(12, border=11))
    ds = CamVidDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match=rf"{stem}\.png has values \{{12\}} outside the 11"):
        ds.load(0)
    write_gray(tmp_path / "trainannot" / f"{stem}.png", class_mask(1, w=W - 2))
    with pytest.raises(DatasetError, match="same size"):
        ds.load(0)


# -- Cityscapes --------------------------------------------------------------------------------
def test_cityscapes_ids_and_train_id_mapping(tmp_path):
    make_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    assert ds.ids == CITY_STEMS["train"]
    assert ds.num_classes == 19 and ds.class_names[0] == "road" and ds.class_names[-1] == "bicycle"
    assert ds.refs[2].mask.name == "bochum_000000_000313_gtFine_labelIds.png"
    img, mask = ds.load(0)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert (mask[2:, 5:10] == 0).all()  # 7 road -> 0
    assert (mask[2:, 10:15] == 13).all()  # 26 car -> 13
    assert (mask[2:, 15:] == 18).all()  # 33 bicycle -> 18
    assert (mask[:, :5] == 255).all() and (mask[:2] == 255).all()  # 0 / 1 / 9 -> ignore
    assert ds.palette.shape == (19, 3) and tuple(ds.palette[13]) == (0, 0, 142)
    assert CityscapesDataset(tmp_path, "val").ids == CITY_STEMS["val"]


def test_cityscapes_lookup_table_is_official():
    ds = object.__new__(CityscapesDataset)
    ds.label_type = "labelIds"
    mapped = ds.map_mask(np.arange(256, dtype=np.uint8)[None])[0]
    assert mapped.dtype == np.uint8
    expected = np.full(256, 255)
    for label, train in LABEL_TO_TRAIN_ID.items():
        expected[label] = train
    assert (mapped == expected).all()
    assert sorted(LABEL_TO_TRAIN_ID.values()) == list(range(19))
    for label in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30):
        assert mapped[label] == 255
    wide = ds.map_mask(np.array([[-1, 7, 300, 24]], dtype=np.int64))
    assert wide.tolist() == [[255, 0, 255, 11]] and wide.dtype == np.uint8


def test_cityscapes_registry_root_variant_and_train_ids(tmp_path):
    make_cityscapes(tmp_path / "cityscapes")
    ds = build_dataset("cityscapes", "train", tmp_path)
    assert isinstance(ds, CityscapesDataset) and ds.ids == CITY_STEMS["train"]
    stem = CITY_STEMS["val"][0]
    write_gray(
        tmp_path / "cityscapes/gtFine/val/frankfurt" / f"{stem}_gtFine_labelTrainIds.png",
        class_mask(13),
    )
    ds = build_dataset("cityscapes", "val", tmp_path, label_type="trainIds")
    assert ds.refs[0].mask.name.endswith("_gtFine_labelTrainIds.png")
    assert set(np.unique(ds.load(0)[1])) == {13, 255}
    with pytest.raises(DatasetError, match="unknown Cityscapes label_type 'colour'"):
        CityscapesDataset(tmp_path, "val", label_type="colour")


def test_cityscapes_bad_inputs(tmp_path):
    with pytest.raises(
        DatasetError, match=r"expected leftImg8bit/\{split\}/<city>/<stem>_leftImg8bit"
    ):
        CityscapesDataset(tmp_path, "train")
    make_cityscapes(tmp_path)
    with pytest.raises(
        DatasetError, match="no split 'extra'.*valid splits: test, train, train_extra, val"
    ):
        CityscapesDataset(tmp_path, "extra")
    with pytest.raises(DatasetError, match=r"split 'train_extra' needs .*leftImg8bit/train_extra"):
        CityscapesDataset(tmp_path, "train_extra")
    with pytest.raises(DatasetError, match="Cityscapes split 'test' is empty"):
        CityscapesDataset(tmp_path, "test")
    write_rgb(tmp_path / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    with pytest.raises(DatasetError, match=r"lindau_000000_000019_gtFine_labelIds\.png does not"):
        CityscapesDataset(tmp_path, "val")


def test_cityscapes_bad_mask_values_and_size(tmp_path):
    make_cityscapes(tmp_path)
    stem = CITY_STEMS["train"][0]
    mask_path = tmp_path / "gtFine/train/aachen" / f"{stem}_gtFine_labelIds.png"
    write_gray(mask_path, class_mask(7, h=H - 1))
    ds = CityscapesDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match=rf"{stem}_leftImg8bit\.png is 20x16 .* is 20x15"):
        ds.load(0)
    # labelIds cannot fall outside the classes (unknown ids are void), but train ids can
    for s in CITY_STEMS["train"]:
        city = s.split("_")[0]
        value = 19 if s == stem else 0
        write_gray(
            tmp_path / "gtFine/train" / city / f"{s}_gtFine_labelTrainIds.png", class_mask(value)
        )
    ds = CityscapesDataset(tmp_path, "train", label_type="trainIds")
    with pytest.raises(DatasetError, match=r"labelTrainIds\.png has values \{19\} outside the 19"):
        ds.load(0)


# -- plain folder ------------------------------------------------------------------------------
def test_folder_all_files(tmp_path):
    make_folder(tmp_path)
    ds = FolderDataset(tmp_path, "train")
    assert ds.ids == ["a", "b", "c"]
    assert ds.class_names == tuple(FOLDER_CLASSES)
    assert [r.image.suffix for r in ds.refs] == [".png", ".jpg", ".bmp"]
    img, mask = ds.load(0)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert mask[0, 0] == 255 and mask[4, 4] == 1  # "a" was written second -> class 1
    assert FolderDataset(tmp_path, "all").ids == ["a", "b", "c"]
    ds2 = build_dataset("folder", "all", tmp_path)
    assert isinstance(ds2, FolderDataset) and len(ds2) == 3


def test_folder_split_lists(tmp_path):
    make_folder(tmp_path, stems=("x1", "x2", "x3"))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("x3\n# a comment\nx1.bmp\n\n")
    (tmp_path / "splits" / "val.txt").write_text("x2\n")
    assert FolderDataset(tmp_path, "train").ids == ["x1", "x3"]
    assert FolderDataset(tmp_path, "val").ids == ["x2"]
    assert FolderDataset(tmp_path, "all").ids == ["x1", "x2", "x3"]
    with pytest.raises(DatasetError, match="no split 'test'.*valid splits: all, train, val"):
        FolderDataset(tmp_path, "test")
    (tmp_path / "splits" / "val.txt").write_text("x2\nmissing_one\n")
    with pytest.raises(
        DatasetError,
        match=r"val.txt names 'missing_one' but there is no image .*missing_one\.\{jpg",
    ):
        FolderDataset(tmp_path, "val")
    (tmp_path / "masks" / "x2.png").unlink()
    (tmp_path / "splits" / "val.txt").write_text("x2\n")
    with pytest.raises(DatasetError, match=r"names 'x2' but its mask .*x2\.png does not exist"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "splits" / "val.txt").write_text("# nothing\n")
    with pytest.raises(DatasetError, match="split 'val' is empty"):
        FolderDataset(tmp_path, "val")


def test_split_list_names_with_spaces_and_image_label_pairs(tmp_path):
    """A split list's line is the whole name (spaces included: 'img 4 copy' is not 'img'), and a
    line of two paths (image and label, CamVid-style lists) names its image by the first."""
    make_folder(tmp_path, stems=("img 4", "img 4 copy", "x"), exts=(".jpg", ".png", ".webp"))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "a.txt").write_text("img 4 copy\n")
    ds = FolderDataset(tmp_path, "a")
    assert ds.ids == ["img 4 copy"] and ds.refs[0].image.name == "img 4 copy.png"
    (tmp_path / "splits" / "b.txt").write_text("img 4.jpg\nx.webp masks/x.png\n")
    assert FolderDataset(tmp_path, "b").ids == ["img 4", "x"]
    assert FolderDataset(tmp_path, "b").load(1)[0].shape == (H, W, 3)  # a .webp image is an image


def test_masks_of_another_suffix_and_one_bit_masks(tmp_path):
    """Masks saved as JPEG are named as the reason the images lack masks; a 1-bit PNG mask (a
    saved bool array) reads as classes 0 and 1."""
    make_folder(tmp_path, stems=("a", "b"), exts=(".png", ".png"))
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "b.jpg")
    with pytest.raises(DatasetError, match=r"without a mask in .*: b \(masks are read from \.png files, and theirs "
                                           r"are \.jpg: save them as PNG"):
        FolderDataset(tmp_path, "train")
    (tmp_path / "masks" / "b.jpg").unlink()
    bits = np.zeros((H, W), bool)
    bits[2:5, 3:9] = True
    Image.fromarray(bits).save(tmp_path / "masks" / "b.png")
    assert Image.open(tmp_path / "masks" / "b.png").mode == "1"
    mask = FolderDataset(tmp_path, "train").load(1)[1]
    assert np.array_equal(mask, bits.astype(np.uint8))


def test_folder_split_subfolders(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    make_folder(tmp_path / "train", stems=("t1", "t0"), exts=(".png", ".jpeg"))
    make_folder(tmp_path / "val", stems=("v0",), exts=(".tif",))
    assert FolderDataset(tmp_path, "train").ids == ["t0", "t1"]
    val = FolderDataset(tmp_path, "val", binary_255=False)  # v0: background and a 255 frame, two classes
    assert val.ids == ["v0"] and val.class_names == ("bg", "fg")  # ROOT/classes.txt wins
    assert val.load(0)[0].shape == (H, W, 3)
    with pytest.raises(DatasetError, match="no split 'all'.*valid splits: train, val"):
        FolderDataset(tmp_path, "all")


def test_folder_train_needs_defined_split_once_splits_exist(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text("a\n")
    with pytest.raises(DatasetError, match="no split 'train'.*valid splits: all, val"):
        FolderDataset(tmp_path, "train")


def test_folder_class_names_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"needs .*classes\.txt .*or -o class_names_file=FILE"):
        FolderDataset(tmp_path, "train")
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\n")
    ds = build_dataset("folder", "train", tmp_path, class_names_file=names)
    assert ds.class_names == ("a", "b", "c", "d") and ds.num_classes == 4
    with pytest.raises(DatasetError, match=r"class names file .*nope\.txt does not exist"):
        FolderDataset(tmp_path, "train", class_names_file=tmp_path / "nope.txt")
    names.write_text("\n\n")
    with pytest.raises(DatasetError, match="lists no classes"):
        FolderDataset(tmp_path, "train", class_names_file=names)
    names.write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match="repeats a"):
        FolderDataset(tmp_path, "train", class_names_file=names)


def test_binary_masks_of_0_and_255_are_refused_or_read_as_class_1(tmp_path):
    """A two-class folder whose masks hold 0 and 255 (255 = foreground, as many binary data sets
    save them): by default one line says 255 would be read as 'ignore' and names the fix; with
    -o binary_255=true, 255 is class 1 and a teacher trains on it (through the command line)."""
    from cli_runner import kd

    root = tmp_path / "binary"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nlesion\n")
    for i in range(4):
        write_rgb(root / "images" / f"s{i}.png", seed=i)
        mask = np.zeros((H, W), np.uint8)
        mask[2:6, 3 + i:9 + i] = 255
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")
    with pytest.raises(DatasetError, match=r"mask .*s0\.png holds only 0 and 255, and the data set has two classes: "
                                           r"is 255 class 1 or 'ignore'\?.* give -o binary_255=true if 255 marks "
                                           r"class 1, -o binary_255=false if it marks pixels to ignore"):
        build_dataset("folder", "all", root).load(0)
    _, as_ignore = build_dataset("folder", "all", root, binary_255=False).load(0)  # the way out for void regions
    assert set(np.unique(as_ignore).tolist()) == {0, 255}
    ds = build_dataset("folder", "all", root, binary_255=True)
    _, mask = ds.load(0)
    assert set(np.unique(mask).tolist()) == {0, 1} and (mask == 1).sum() == 4 * 6
    with pytest.raises(DatasetError, match="-o binary_255 takes true or false, got 'no'"):
        build_dataset("folder", "all", root, binary_255="no")
    with pytest.raises(DatasetError, match="binary_255=true reads 255 as class 1 of two, but the class names list 3"):
        build_dataset("folder", "all", make_folder(tmp_path / "three"), binary_255=True)
    # a mask with 255 as ignore beside both classes is read as it always was
    Image.fromarray(np.array([[0, 1, 255]] * H, np.uint8).repeat(W // 3 + 1, 1)[:, :W], mode="L").save(
        root / "masks" / "s3.png")
    assert 255 in build_dataset("folder", "all", root).load(3)[1]
    common = ["train-teacher", "--model", "demo_teacher", "--dataset", "folder", "--data-root", root, "--train-split",
              "all", "--val-split", "all", "--epochs", 1, "--batch-size", 2, "--crop-size", "8x8", "--device", "cpu",
              "--workers", 0, "--out"]
    r = kd(*common, tmp_path / "refused")
    assert r.exit_code == 2 and "give -o binary_255=true" in r.output and "Traceback" not in r.output
    r = kd(*common, tmp_path / "t", "-o", "binary_255=true")
    assert r.exit_code == 0, r.output


def test_class_names_and_split_lists_saved_with_a_byte_order_mark(tmp_path):
    """Windows editors start a UTF-8 file with a byte-order mark; it is not part of the first class
    name or the first listed id."""
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\r\n", encoding="utf-8-sig")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_bytes("a\r\nc\r\n".encode("utf-8-sig"))
    ds = FolderDataset(tmp_path, "val")
    assert ds.class_names == tuple(FOLDER_CLASSES) and ds.ids == ["a", "c"]


def test_folder_unpaired_and_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        FolderDataset(tmp_path / "nowhere", "train")
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    with pytest.raises(DatasetError, match=r"expected .*images and .*masks"):
        FolderDataset(tmp_path, "train")
    make_folder(tmp_path)
    write_rgb(tmp_path / "images" / "lonely.png")
    write_gray(tmp_path / "masks" / "orphan.png", class_mask(0))
    with pytest.raises(
        DatasetError, match="without a mask .*: lonely.*without an image .*: orphan"
    ):
        FolderDataset(tmp_path, "train")
    (tmp_path / "masks" / "orphan.png").unlink()
    write_rgb(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(DatasetError, match="several files with the same stem: lonely"):
        FolderDataset(tmp_path, "train")
    (tmp_path / "images" / "lonely.png").unlink()
    (tmp_path / "images" / "lonely.jpg").unlink()
    (tmp_path / "images" / "notes.txt").write_text("not an image")  # ignored
    assert FolderDataset(tmp_path, "train").ids == ["a", "b", "c"]
    (tmp_path / "masks").rename(tmp_path / "labels")  # no masks folder: an unlabelled split, not an error
    ds = FolderDataset(tmp_path, "train")
    assert not ds.labelled and ds.ids == ["a", "b", "c"]


def test_folder_empty_split(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="folder data set split 'train' is empty"):
        FolderDataset(tmp_path, "train")


def test_folder_bad_mask_values_and_size(tmp_path):
    make_folder(tmp_path)
    write_palette(tmp_path / "masks" / "a.png", class_mask(7))
    ds = FolderDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"a\.png has values \{7\} outside the 3 classes"):
        ds.load(0)
    write_palette(tmp_path / "masks" / "b.png", class_mask(1, h=8, w=8))
    with pytest.raises(DatasetError, match=r"b\.jpg is 20x16 .* is 8x8"):
        ds.load(1)


@pytest.mark.parametrize("name", ["voc", "camvid", "cityscapes", "folder"])
def test_registry_names_and_missing_root(tmp_path, name):
    assert name in DATASETS
    with pytest.raises(DatasetError, match="does not exist or is not a directory"):
        build_dataset(name, "train", tmp_path / "missing")
    (tmp_path / "classes.txt").write_text("bg\n")
    with pytest.raises(DatasetError, match="expected"):
        build_dataset(name, "train", tmp_path)


def test_ids_are_stable_and_hashable(tmp_path):
    make_camvid(tmp_path)
    a = CamVidDataset(tmp_path, "train")
    b = build_dataset("camvid", "train", tmp_path)
    assert a.ids == b.ids
    assert [a.content_hash(i) for i in range(len(a))] == [b.content_hash(i) for i in range(len(b))]
    assert len({a.content_hash(i) for i in range(len(a))}) == len(a)


def _check_unlabelled(ds, ids, images):
    """Unlabelled: the images as written, masks of 255, a content hash over the image bytes
    alone, and a one-line error where labels are needed."""
    assert not ds.labelled and ds.ids == ids
    for i, path in enumerate(images):
        image, mask = ds.load(i)
        np.testing.assert_array_equal(image, np.asarray(Image.open(path).convert("RGB")))
        assert mask.shape == image.shape[:2] and (mask == 255).all()
    before = ds.content_hash(0)
    write_rgb(images[0], seed=99)
    assert ds.content_hash(0) != before
    with pytest.raises(DatasetError, match="unlabelled images \\(no masks\\); train-teacher needs labelled"):
        ds.require_labels("train-teacher")


def test_folder_split_without_masks_is_unlabelled(tmp_path):
    make_folder(tmp_path)
    for stem in ("u2", "u1"):
        write_rgb(tmp_path / "pool" / "images" / f"{stem}.jpg", seed=3)
    ds = FolderDataset(tmp_path, "pool")
    _check_unlabelled(ds, ["u1", "u2"], [tmp_path / "pool" / "images" / f"{s}.jpg" for s in ("u1", "u2")])
    assert FolderDataset(tmp_path, "all").labelled  # the labelled images beside it stay labelled


def test_image_folder_is_recursive_and_unlabelled(tmp_path):
    root = tmp_path / "frames"
    paths = [root / "seq02" / "000001.png", root / "seq01" / "000002.jpg", root / "seq01" / "000001.jpg",
             root / "top.bmp"]
    for i, p in enumerate(paths):
        write_rgb(p, seed=i)
    (root / "seq01" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    write_rgb(root / ".hidden" / "x.png")
    ds = build_dataset("images", "all", root)
    assert ds.num_classes == 0
    _check_unlabelled(ds, ["seq01/000001", "seq01/000002", "seq02/000001", "top"],
                      [paths[2], paths[1], paths[0], paths[3]])
    (tmp_path / "names.txt").write_text("road\ncar\n")
    named = build_dataset("images", "all", root, class_names_file=tmp_path / "names.txt")
    assert named.class_names == ("road", "car")
    assert ds.with_class_names(["a", "b", "c"]).num_classes == 3 and ds.num_classes == 0
    with pytest.raises(DatasetError, match="split 'all' is empty"):
        build_dataset("images", "all", _empty(tmp_path))


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_cityscapes_train_extra_is_unlabelled(tmp_path):
    make_cityscapes(tmp_path)
    stems = ["augsburg_000000_000001", "bad-honnef_000000_000000"]
    paths = [tmp_path / "leftImg8bit" / "train_extra" / s.split("_")[0] / f"{s}_leftImg8bit.png" for s in stems]
    for i, p in enumerate(paths):
        write_rgb(p, seed=i)
    _check_unlabelled(CityscapesDataset(tmp_path, "train_extra"), stems, paths)
    # only leftImg8bit: extra frames need no gtFine folder
    import shutil
    shutil.rmtree(tmp_path / "gtFine")
    assert len(CityscapesDataset(tmp_path, "train_extra")) == 2
