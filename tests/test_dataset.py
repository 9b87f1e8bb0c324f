"""Dataset, loaders and the prepared-image cache."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image

from age_detect_resnet.data.cache import prepare_cache
from age_detect_resnet.data.dataset import (
    AgeDataset,
    FileImages,
    RandomOcclusion,
    RandomTightCut,
    collate_batch,
    create_dataloaders,
    make_loader,
    train_transform,
)
from age_detect_resnet.data.photo_shares import PhotoShares
from age_detect_resnet.images import ImageReadError


def make_images(folder, n=6):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (50 + i, 40), (i * 40, 100, 200 - i * 30)).save(folder / f"{i}.jpg")
    return [f"{i}.jpg" for i in range(n)]


def test_items_are_uint8_images_and_float32_ages(tmp_path):
    paths = make_images(tmp_path)
    dataset = AgeDataset(FileImages(tmp_path, paths, 32), [20, 30, 40, 50, 60, 70])
    image, age = dataset[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert age.dtype == torch.float32 and age.item() == 40


def test_a_bad_image_names_the_file_or_is_skipped_and_counted(tmp_path):
    paths = make_images(tmp_path, 3)
    (tmp_path / "1.jpg").write_bytes(b"")  # zero bytes
    strict = AgeDataset(FileImages(tmp_path, paths, 16), [1, 2, 3])
    with pytest.raises(ImageReadError, match=r"1\.jpg.*--skip-bad-images"):
        strict[1]
    lenient = AgeDataset(FileImages(tmp_path, paths, 16), [1, 2, 3], skip_bad_images=True)
    batch = collate_batch([lenient[i] for i in range(3)])
    assert batch.images.shape[0] == 2 and batch.kept.tolist() == [True, False, True]


def test_dataloaders_shuffle_and_augment_only_training(tmp_path):
    paths = make_images(tmp_path, 8)
    frame = pd.DataFrame({"path": paths, "age": range(20, 28)})
    loaders = create_dataloaders(
        {"train": frame, "val": frame}, tmp_path, image_size=24, batch_size=4, num_workers=0, augment="light"
    )
    assert len(loaders["train"]) == 2 and len(loaders["val"]) == 2
    val = next(iter(loaders["val"]))
    assert val.ages.tolist() == [20, 21, 22, 23]  # evaluation keeps the table's order
    assert loaders["train"].dataset.transform is not None and loaders["val"].dataset.transform is None
    assert train_transform("none", 24) is None


def test_occlusion_hides_one_patch_of_the_face_in_the_share_asked_for():
    torch.manual_seed(0)
    image = torch.full((3, 40, 40), 7, dtype=torch.uint8)
    always = RandomOcclusion(p=1.0, area=(0.05, 0.2))
    for _ in range(50):
        hidden = (always(image) != 7).any(0)
        rows, cols = hidden.any(1).nonzero(), hidden.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.03 * 1600 <= box <= 0.22 * 1600  # one rectangle of the asked-for size (rounded)
        assert hidden.sum() >= 0.95 * box  # filled (a pixel may draw the old value by chance)
    assert torch.equal(image, torch.full((3, 40, 40), 7, dtype=torch.uint8))  # the input is not changed
    assert torch.equal(RandomOcclusion(p=0.0)(image), image)
    half = RandomOcclusion(p=0.5)
    share = sum(bool((half(image) != 7).any()) for _ in range(400)) / 400
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="between 0 and 1"):
        RandomOcclusion(p=1.5)


def test_occlusion_is_a_setting_of_the_photo_augmentation_only():
    from age_detect_resnet.training.config import ConfigError, resolve_config

    torch.manual_seed(0)
    photo = train_transform("photo", 32, PhotoShares(occlusion=1.0))
    assert isinstance(photo.transforms[-1], RandomOcclusion) and photo.transforms[-1].p == 1.0
    assert not any(isinstance(t, RandomOcclusion) for t in train_transform("photo", 32).transforms)
    assert photo(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="photo augmentation"):
        train_transform("light", 32, PhotoShares(occlusion=0.5))
    assert resolve_config("cpu", {"occlusion": 0.5}).data.occlusion == 0.5
    with pytest.raises(ConfigError, match="add --augment photo"):
        resolve_config(None, {"occlusion": 0.5})
    with pytest.raises(ConfigError, match="between 0 and 1"):
        resolve_config("cpu", {"occlusion": 2.0})


def test_a_tight_cut_repeats_the_edge_of_a_box_inside_the_crop_as_the_aligner_shows_a_cut_photo():
    # A 40 px context image around a 32 px crop (border 4), every pixel telling its row and column.
    rows, cols = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    image = torch.stack([rows, cols, rows + cols]).to(torch.uint8)
    cut = RandomTightCut(p=1.0, image_size=32, cut=(0.25, 0.25), jitter=0.0)(image)
    # Each side cut in by a quarter of the crop (8 px) from the crop's edge: the box is rows/cols 12..27.
    assert torch.equal(cut[0], rows.clamp(12, 27).to(torch.uint8))
    assert torch.equal(cut[1], cols.clamp(12, 27).to(torch.uint8))
    assert torch.equal(cut[:, 12:28, 12:28], image[:, 12:28, 12:28])  # inside the box: untouched
    torch.manual_seed(0)
    varied = RandomTightCut(p=1.0, image_size=32)  # shares in [0, 0.25], each side +-0.05
    for _ in range(50):
        kept = varied(image)[0, :, 20]  # one column: the rows the box kept, then the edge repeated
        first, last = int(kept.min()), int(kept.max())
        assert 4 - 2 <= first <= 4 + 0.3 * 32 + 1 and 35 - 0.3 * 32 - 1 <= last <= 35 + 2
    assert torch.equal(RandomTightCut(p=0.0, image_size=32)(image), image)
    with pytest.raises(ValueError, match="between 0 and 1"):
        RandomTightCut(p=2.0, image_size=32)


def test_tight_cuts_are_a_setting_of_the_photo_augmentation_only():
    from age_detect_resnet.training.config import ConfigError, resolve_config

    photo = train_transform("photo", 32, PhotoShares(tight_cut=0.3))
    assert isinstance(photo.transforms[0], RandomTightCut) and photo.transforms[0].p == 0.3
    assert not any(isinstance(t, RandomTightCut) for t in train_transform("photo", 32).transforms)
    assert photo(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="photo augmentation"):
        train_transform("light", 32, PhotoShares(tight_cut=0.3))
    assert resolve_config("cpu", {"tight_cut": 0.3}).data.tight_cut == 0.3
    with pytest.raises(ConfigError, match="add --augment photo"):
        resolve_config(None, {"tight_cut": 0.3})


def test_the_share_of_greyscale_faces_is_a_setting_of_the_photo_augmentation():
    from torchvision.transforms import v2

    from age_detect_resnet.data.photo_shares import GREYSCALE_SHARE
    from age_detect_resnet.training.config import ConfigError, resolve_config

    def share(transform):
        return next(t.p for t in transform.transforms if isinstance(t, v2.RandomGrayscale))

    assert share(train_transform("photo", 32)) == GREYSCALE_SHARE == 0.1  # the bundled model's recipe
    every = train_transform("photo", 32, PhotoShares(greyscale=1.0))
    torch.manual_seed(0)
    face = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    grey = every(face)
    assert grey.shape == (3, 32, 32) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert resolve_config("cpu", {"greyscale": 0.3}).data.greyscale == 0.3
    with pytest.raises(ConfigError, match="add --augment photo"):
        resolve_config(None, {"greyscale": 0.3})


def test_the_share_of_low_resolution_faces_is_a_setting_of_the_photo_augmentation():
    from age_detect_resnet.data.dataset import RandomLowResolution
    from age_detect_resnet.data.photo_shares import LOW_RESOLUTION_SHARE
    from age_detect_resnet.training.config import ConfigError, resolve_config

    assert RandomLowResolution().p == LOW_RESOLUTION_SHARE  # one default, read by the torch-free config too

    def share(transform):
        return next(t.p for t in transform.transforms if isinstance(t, RandomLowResolution))

    assert share(train_transform("photo", 32)) == LOW_RESOLUTION_SHARE
    assert share(train_transform("photo", 32, PhotoShares(low_resolution=0.5))) == 0.5
    torch.manual_seed(0)
    face = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    shrunk = RandomLowResolution(p=1.0, min_side=8)(face)
    assert shrunk.shape == face.shape and not torch.equal(shrunk, face)
    assert torch.equal(RandomLowResolution(p=0.0, min_side=8)(face), face)
    with pytest.raises(ValueError, match="photo augmentation"):
        train_transform("light", 32, PhotoShares(low_resolution=0.5))
    assert resolve_config("cpu", {"low_resolution": 0.5}).data.low_resolution == 0.5
    assert resolve_config(None, {}).data.low_resolution == LOW_RESOLUTION_SHARE  # no augmentation: unused
    with pytest.raises(ConfigError, match="add --augment photo"):
        resolve_config(None, {"low_resolution": 0.5})
    with pytest.raises(ConfigError, match="between 0 and 1"):
        resolve_config("cpu", {"low_resolution": 1.5})


def test_the_cache_serves_the_same_pixels_as_decoding(tmp_path):
    paths = make_images(tmp_path / "img")
    cache = prepare_cache(tmp_path / "img", paths, image_size=32, cache_dir=tmp_path / "cache", workers=1)
    files = FileImages(tmp_path / "img", paths, 32)
    for i in range(len(paths)):
        assert torch.equal(cache.load(i), files.load(i))
    view = cache.subset([4, 1])
    assert torch.equal(view.load(0), files.load(4)) and view.name(1) == "1.jpg"


def test_the_cache_is_rebuilt_when_inputs_or_size_change(tmp_path):
    paths = make_images(tmp_path / "img", 3)
    first = prepare_cache(tmp_path / "img", paths, image_size=16, cache_dir=tmp_path / "cache", workers=1)
    assert (
        prepare_cache(tmp_path / "img", paths, image_size=16, cache_dir=tmp_path / "cache").folder
        == first.folder
    )
    assert (
        prepare_cache(tmp_path / "img", paths, image_size=24, cache_dir=tmp_path / "cache").folder
        != first.folder
    )
    Image.new("RGB", (20, 20), (0, 0, 0)).save(tmp_path / "img" / "0.jpg")  # an input changed
    rebuilt = prepare_cache(tmp_path / "img", paths, image_size=16, cache_dir=tmp_path / "cache", workers=1)
    assert rebuilt.folder != first.folder
    assert rebuilt.load(0).sum() == 0


def test_runs_started_together_prepare_their_shared_cache_once(tmp_path, monkeypatch):
    import threading

    from age_detect_resnet.data import cache as cache_module

    paths = make_images(tmp_path / "img", 12)
    prepared, real_progress = [], cache_module.progress

    def counted(iterable, **kwargs):
        for item in real_progress(iterable, **kwargs):
            prepared.append(threading.get_ident())
            yield item

    monkeypatch.setattr(cache_module, "progress", counted)
    folders = []

    def run():
        cache = prepare_cache(tmp_path / "img", paths, image_size=16, cache_dir=tmp_path / "cache", workers=1)
        folders.append((cache.folder, cache.load(5)))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(prepared) == len(paths) and len(set(prepared)) == 1  # one of them prepared every image
    assert len({folder for folder, _ in folders}) == 1 and len(folders) == 3
    assert all(torch.equal(image, folders[0][1]) for _, image in folders)
    assert sorted(p.name for p in folders[0][0].iterdir()) == ["images.u8", "index.json"]


def test_unreadable_images_in_the_cache_raise_when_used(tmp_path):
    paths = make_images(tmp_path / "img", 2)
    (tmp_path / "img" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cache = prepare_cache(tmp_path / "img", paths, image_size=16, cache_dir=tmp_path / "cache", workers=1)
    assert cache.load(0).shape == (3, 16, 16)
    with pytest.raises(ImageReadError, match=r"1\.jpg"):
        cache.load(1)


def test_cached_batches_are_read_at_once_in_process_with_the_same_pixels(tmp_path):
    paths = make_images(tmp_path / "img")
    cache = prepare_cache(tmp_path / "img", paths, image_size=16, cache_dir=tmp_path / "cache", workers=1)
    view = cache.subset([5, 0, 3, 2, 4, 1])
    dataset = AgeDataset(view, [10, 20, 30, 40, 50, 60])
    assert dataset.reads_batches
    batch = collate_batch(dataset.__getitems__([4, 0, 2]))
    assert torch.equal(batch.images, torch.stack([dataset[i][0] for i in (4, 0, 2)]))
    assert batch.ages.tolist() == [50, 10, 30] and batch.kept.all()
    loader = make_loader(dataset, batch_size=4, train=False, num_workers=2, device=torch.device("cpu"))
    assert loader.num_workers == 0  # workers would only add a copy through shared memory
    assert torch.equal(torch.cat([b.images for b in loader]), torch.stack([dataset[i][0] for i in range(6)]))
    augmented = AgeDataset(view, [1] * 6, transform=train_transform("light", 16))
    assert not augmented.reads_batches
    assert (
        make_loader(
            augmented, batch_size=4, train=True, num_workers=2, device=torch.device("cpu")
        ).num_workers
        == 2
    )


def test_a_cached_batch_with_an_unreadable_image_falls_back_to_one_by_one(tmp_path):
    paths = make_images(tmp_path / "img", 3)
    (tmp_path / "img" / "1.jpg").write_bytes(b"not a jpeg")
    cache = prepare_cache(tmp_path / "img", paths, image_size=16, cache_dir=tmp_path / "cache", workers=1)
    batch = collate_batch(AgeDataset(cache, [1, 2, 3], skip_bad_images=True).__getitems__([0, 1, 2]))
    assert batch.kept.tolist() == [True, False, True] and batch.images.shape == (2, 3, 16, 16)
    with pytest.raises(ImageReadError, match=r"1\.jpg"):
        AgeDataset(cache, [1, 2, 3]).__getitems__([0, 1, 2])


def test_the_config_and_the_transform_read_the_same_photo_shares():
    """One owner (`PhotoShares`): every share is a field of the config's data section, under the same
    name, whose default is the share's, and each is checked the same way."""
    from dataclasses import fields

    from age_detect_resnet.training.config import ConfigError, DataConfig, resolve_config

    defaults = {f.name: f.default for f in fields(DataConfig)}
    for f in fields(PhotoShares):
        assert defaults[f.name] == f.default, f.name
        option = PhotoShares.option(f.name)
        with pytest.raises(ConfigError, match=f"--{option} is part of the photo augmentation"):
            resolve_config(None, {f.name: 0.6})
        with pytest.raises(ConfigError, match="between 0 and 1"):
            resolve_config("cpu", {f.name: 1.5})
        with pytest.raises(ValueError, match=f"--{option} is part of the photo augmentation"):
            train_transform("light", 32, PhotoShares(**{f.name: 0.6}))
    assert PhotoShares.of(resolve_config("cpu", {"tight_cut": 0.3}).data) == PhotoShares(tight_cut=0.3)


def test_a_yaw_pulls_one_side_in_and_shortens_it_and_leaves_the_other():
    from age_detect_resnet.data.dataset import RandomYaw

    image = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    sides = set()
    for _ in range(20):
        turned = RandomYaw(p=1.0, strength=0.3)(image)
        assert turned.shape == image.shape
        left_gone, right_gone = bool((turned[:, 0, 0] == 0).all()), bool((turned[:, 0, -1] == 0).all())
        assert not (left_gone and right_gone)  # one far side at most (none: a turn under a pixel)
        if not (left_gone or right_gone):
            continue
        near = 38 if left_gone else 1  # the edge pixel itself is blended with the empty outside
        assert (turned[:, 2:-2, near] == 200).all()
        # The far side moves in by less than a tenth of the width: the context border cache.py keeps.
        inside = 4 if left_gone else 35
        assert (turned[:, 20, inside] >= 190).all()
        sides.add(left_gone)
    assert sides == {True, False}
    assert torch.equal(RandomYaw(p=0.0)(image), image)
    with pytest.raises(ValueError, match="between 0 and 1"):
        RandomYaw(p=1.5)
    photo = train_transform("photo", 32, PhotoShares(yaw=0.3))
    assert any(isinstance(t, RandomYaw) and t.p == 0.3 for t in photo.transforms)
