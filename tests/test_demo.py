import torch

from sd3fit import demo


def test_tiny_pipeline_is_seeded_and_complete():
    a, b = demo.build_tiny_pipeline(seed=0), demo.build_tiny_pipeline(seed=0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        pa, pb = dict(getattr(a, name).named_parameters()), dict(getattr(b, name).named_parameters())
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), name
    # SD3's structure at toy size: 16 latent channels, CLIP pooled outputs feeding the pooled projection
    assert a.transformer.config.in_channels == 16 == a.vae.config.latent_channels
    assert a.transformer.config.pooled_projection_dim == 2 * a.text_encoder.config.projection_dim
    assert a.tokenizer("a red circle").input_ids[0] == a.tokenizer.bos_token_id
    assert a.tokenizer_3("a red circle").input_ids[-1] == a.tokenizer_3.eos_token_id


def test_demo_dataset_captions_describe_the_images(tmp_path):
    folder = demo.write_demo_dataset(tmp_path / "shapes", count=6)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 6
    for image in images:
        caption = image.with_suffix(".txt").read_text()
        assert any(shape in caption for shape in ("circle", "square", "triangle")) and "background" in caption


def test_assets_are_built_once(demo_assets):
    model = demo_assets["model"]
    stamp = (model / "model_index.json").stat().st_mtime_ns
    assert demo.ensure_demo_assets(model.parent)["model"] == model
    assert (model / "model_index.json").stat().st_mtime_ns == stamp
