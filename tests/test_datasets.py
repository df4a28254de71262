import json

import pytest

from sd3fit import datasets
from sd3fit.errors import UserError


def backends(folder, **extra):
    return [
        {"id": "images", "type": "local", "instance_data_dir": str(folder), "caption_strategy": "textfile", **extra},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "/tmp/x"},
    ]


def test_render_fills_sd3fit_placeholders_only(tmp_path):
    template = tmp_path / "t.json"
    template.write_text(json.dumps([{"instance_data_dir": "{dataset_dir}", "cache_dir_vae": "{run_dir}/vae/{id}", "x": "{env:HOME}"}]))
    out = datasets.render(template, {"dataset_dir": "/data", "run_dir": "/runs/a"})
    assert out == [{"instance_data_dir": "/data", "cache_dir_vae": "/runs/a/vae/{id}", "x": "{env:HOME}"}]


def test_render_names_the_missing_dataset_dir(tmp_path):
    template = tmp_path / "t.json"
    template.write_text(json.dumps([{"instance_data_dir": "{dataset_dir}"}]))
    with pytest.raises(UserError, match=r"uses \{dataset_dir\} but no dataset_dir is set; pass dataset_dir="):
        datasets.render(template, {"dataset_dir": "", "run_dir": "/r"})


def test_render_refuses_missing_or_malformed_definitions(tmp_path):
    with pytest.raises(UserError, match="dataset definition not found"):
        datasets.render(tmp_path / "none.json", {})
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(UserError, match="must be a JSON list"):
        datasets.render(tmp_path / "obj.json", {})


def test_good_folder_counts_images(image_folder):
    assert datasets.check(backends(image_folder)) == {"images": 8}


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=r"dataset folder not found: .*nowhere \(dataset images\); set dataset_dir="):
        datasets.check(backends(tmp_path / "nowhere"))


def test_image_without_caption_is_named(image_folder):
    (image_folder / "shape-003.txt").unlink()
    with pytest.raises(UserError, match=r"image without caption: .*shape-003\.png has no shape-003\.txt beside it"):
        datasets.check(backends(image_folder))


def test_captions_not_needed_for_other_strategies(image_folder):
    (image_folder / "shape-003.txt").unlink()
    assert datasets.check(backends(image_folder, caption_strategy="filename")) == {"images": 8}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named(image_folder, damage):
    target = image_folder / "shape-005.png"
    data = target.read_bytes()
    target.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(UserError, match=r"corrupt image .*shape-005\.png: Pillow cannot read it"):
        datasets.check(backends(image_folder))


def test_images_in_subfolders_are_checked(image_folder):
    sub = image_folder / "more"
    sub.mkdir()
    (image_folder / "shape-000.png").rename(sub / "x.png")
    with pytest.raises(UserError, match=r"more/x\.png has no x\.txt"):
        datasets.check(backends(image_folder))


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="holds no images"):
        datasets.check(backends(tmp_path))


def test_definition_without_image_dataset(tmp_path):
    with pytest.raises(UserError, match="no image dataset"):
        datasets.check([{"id": "text", "dataset_type": "text_embeds"}])


@pytest.mark.parametrize(
    "settings,ok",
    [
        ({"resolution_type": "pixel", "minimum_image_size": 128}, True),  # the demo images are 128 x 128
        ({"resolution_type": "pixel", "minimum_image_size": 129}, False),
        ({"resolution_type": "area", "minimum_image_size": 0.016}, True),
        ({"resolution_type": "area", "minimum_image_size": 0.589824}, False),  # the study's 768 px minimum
        ({"resolution_type": "pixel_area", "minimum_image_size": 256}, False),
        ({}, True),
    ],
)
def test_all_images_too_small_is_refused(image_folder, settings, ok):
    if ok:
        assert datasets.check(backends(image_folder, **settings)) == {"images": 8}
    else:
        with pytest.raises(UserError, match=r"all 8 images in .* are smaller than minimum_image_size"):
            datasets.check(backends(image_folder, **settings))


def test_preset_options_apply_where_the_dataset_is_silent(image_folder):
    with pytest.raises(UserError, match="smaller than minimum_image_size=512"):
        datasets.check(backends(image_folder), {"resolution_type": "pixel", "minimum_image_size": 512})


def test_the_study_layout_reads_one_folder_twice(tmp_path):
    from PIL import Image

    from sd3fit.presets import CONFIG_DIR

    folder = tmp_path / "sargent"
    folder.mkdir()
    for i, size in enumerate([(800, 1000), (1024, 768), (900, 900)]):
        Image.new("RGB", size, (120, 80, 40)).save(folder / f"painting-{i}.jpg")
        (folder / f"painting-{i}.txt").write_text("a painting by John Singer Sargent")
    filled = datasets.render(CONFIG_DIR / "datasets" / "sargent.json", {"dataset_dir": str(folder), "run_dir": str(tmp_path / "run")})
    assert [b["instance_data_dir"] for b in filled if b.get("dataset_type") == "image"] == [str(folder)] * 2
    assert all(b.get("cache_dir", b.get("cache_dir_vae", "")).startswith(str(tmp_path / "run")) for b in filled)
    # every picture has 0.59 MP or more and a 768 px edge or longer: the study's minimum for both datasets
    assert datasets.check(filled) == {"sargent-bucketed": 3, "sargent-square": 3}
