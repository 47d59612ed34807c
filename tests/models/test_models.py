import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as TF

from pipeline.config import ModelConfig
from pipeline.errors import ModelError, WeightsError
from pipeline.extract.decode import ImageSpec, decode_image
from pipeline.models.actor import Embedder, EmbedSpec
from pipeline.models.base import feature_dim, resolve
from pipeline.samples import encode, photo
from pipeline.timing import block_seconds

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory):
    """A random-init ResNet-18 saved as .pth and .safetensors, as a user's own weights would be."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "r18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "r18.safetensors"))
    return state, folder


def spec_for(cfg, dim, dtype="float32", crop=64):
    return EmbedSpec(model=cfg, weights=resolve(cfg), crop=crop, dim=dim, mean=MEAN, std=STD, dtype=dtype, torch_threads=2)


def reference_features(state, pixels):
    model = torchvision.models.resnet18()
    model.load_state_dict(state)
    model.fc = torch.nn.Identity()
    model.eval()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = TF.normalize(x, MEAN, STD)
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("filename", ["r18.pth", "r18.safetensors"])
def test_embedder_equals_a_direct_torchvision_forward(resnet18_state, filename):
    state, folder = resnet18_state
    cfg = ModelConfig(arch="resnet18", weights=str(folder / filename))
    embedder = Embedder(spec_for(cfg, 512))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    ours = embedder.embed(pixels)
    ref = reference_features(state, pixels)
    assert ours.shape == (3, 512)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_batch_call_skips_failed_rows_and_drops_pixels(resnet18_state):
    state, folder = resnet18_state
    cfg = ModelConfig(arch="resnet18", weights=str(folder / "r18.pth"))
    embedder = Embedder(spec_for(cfg, 512, dtype="float16"))
    pixels = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    batch = {"sample_id": np.array(["a", "b", "c"], dtype=object), "pixels": pixels,
             "error_stage": np.array(["", "decode", ""], dtype=object),
             "error_type": np.array(["", "OSError", ""], dtype=object),
             "error_message": np.array(["", "truncated", ""], dtype=object)}
    out = embedder(batch)
    assert "pixels" not in out
    assert out["feature"].dtype == np.float16 and out["feature"].shape == (3, 512)
    assert not out["feature"][1].any()
    ref = reference_features(state, pixels[[0, 2]])
    np.testing.assert_allclose(out["feature"][[0, 2]].astype(np.float32), ref, rtol=2e-2, atol=2e-2)


def test_an_actor_that_decodes_its_own_batch_matches_decoding_first(resnet18_state):
    """resources.decode_on: actor: bytes in, features out, rows in order across the decode threads,
    a broken file one decode error row, and the decode seconds apart from the model's."""
    state, folder = resnet18_state
    cfg = ModelConfig(arch="resnet18", weights=str(folder / "r18.pth"))
    image = ImageSpec(resize=73, crop=64)
    embedder = Embedder(dataclasses.replace(spec_for(cfg, 512), image=image))
    files = [encode(photo(120 + 7 * i, 90 + 5 * i, seed=i)) for i in range(7)]
    files[3] = b"not an image"
    n = len(files)
    batch = {"sample_id": np.array([f"s{i}" for i in range(n)], dtype=object),
             "data": np.array(files, dtype=object),
             "error_stage": np.array([""] * n, dtype=object), "error_type": np.array([""] * n, dtype=object),
             "error_message": np.array([""] * n, dtype=object)}
    out = embedder(batch)
    assert "data" not in out and "pixels" not in out
    assert list(out["error_stage"]) == ["", "", "", "decode", "", "", ""]
    assert out["error_type"][3] == "UnidentifiedImageError" and not out["feature"][3].any()
    good = [i for i in range(n) if i != 3]
    pixels = np.stack([decode_image(files[i], image)[0] for i in good])
    np.testing.assert_allclose(out["feature"][good], reference_features(state, pixels), rtol=1e-4, atol=1e-5)
    assert list(out["width"][good]) == [120 + 7 * i for i in good]
    seconds = block_seconds(out)
    assert seconds["decode"] > 0 and seconds["model"] > 0


@pytest.mark.parametrize(
    "arch, layer, pool, crop, dim",
    [
        ("resnet18", None, "avg", 64, 512),
        ("resnet18", "layer3", "avg", 64, 256),
        ("resnet18", "layer3", "max", 64, 256),
        ("resnet18", "layer3", "none", 64, 256 * 4 * 4),
        ("resnet50", "layer3", "avg", 64, 1024),
        ("vgg16", "features.29", "avg", 64, 512),
        ("vgg16", "features.29", "none", 64, 512 * 4 * 4),
        ("vgg16", None, "avg", 64, 4096),
    ],
)
def test_layer_choice_and_pooling_shapes(arch, layer, pool, crop, dim):
    assert feature_dim(ModelConfig(arch=arch, weights="none", layer=layer, pool=pool), crop) == dim


def test_max_and_avg_pooling_differ_as_they_should():
    cfg = ModelConfig(arch="resnet18", weights="none", layer="layer3")
    pixels = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    avg = Embedder(spec_for(cfg, 256)).embed(pixels)
    mx = Embedder(spec_for(ModelConfig(arch="resnet18", weights="none", layer="layer3", pool="max"), 256)).embed(pixels)
    flat = Embedder(spec_for(ModelConfig(arch="resnet18", weights="none", layer="layer3", pool="none"), 4096)).embed(pixels)
    maps = flat.reshape(2, 256, 16)
    np.testing.assert_allclose(avg, maps.mean(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mx, maps.max(-1), rtol=1e-5, atol=1e-6)


def test_unknown_arch_and_layer_are_refused_by_name():
    with pytest.raises(ModelError, match="model.arch"):
        feature_dim(ModelConfig(arch="resnet9000", weights="none"), 64)
    with pytest.raises(ModelError, match="model.layer.*layer9"):
        feature_dim(ModelConfig(arch="resnet18", weights="none", layer="layer9"), 64)


def test_random_init_is_seeded():
    cfg = ModelConfig(arch="resnet18", weights="none", seed=7)
    pixels = np.full((1, 64, 64, 3), 128, np.uint8)
    a = Embedder(spec_for(cfg, 512)).embed(pixels)
    b = Embedder(spec_for(cfg, 512)).embed(pixels)
    np.testing.assert_array_equal(a, b)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/featurize-pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"fc.weight": RunsCode()}))
    cfg = ModelConfig(arch="resnet18", weights=str(path))
    with pytest.raises(WeightsError, match="not a plain state dict"):
        Embedder(spec_for(cfg, 512))
    assert not os.path.exists("/tmp/featurize-pwned")


def test_weights_hash_is_recorded_and_checked(resnet18_state):
    _, folder = resnet18_state
    weights = resolve(ModelConfig(arch="resnet18", weights=str(folder / "r18.pth")))
    assert weights.kind == "file" and len(weights.sha256) == 64
    with pytest.raises(WeightsError, match="weights_sha256"):
        resolve(ModelConfig(arch="resnet18", weights=str(folder / "r18.pth"), weights_sha256="0" * 64))
    assert resolve(ModelConfig(arch="resnet18", weights=str(folder / "r18.pth"), weights_sha256=weights.sha256)).sha256 == weights.sha256


def test_weights_that_do_not_fit_the_arch_are_refused(resnet18_state):
    _, folder = resnet18_state
    cfg = ModelConfig(arch="resnet50", weights=str(folder / "r18.pth"))
    with pytest.raises(WeightsError, match="does not fit"):
        Embedder(spec_for(cfg, 2048))


def test_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch, resnet18_state):
    state, _ = resnet18_state
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / os.path.basename(entry.url))
    cfg = ModelConfig(arch="resnet18", weights="IMAGENET1K_V1")
    weights = resolve(cfg)
    assert weights.id == "ResNet18_Weights.IMAGENET1K_V1"
    assert weights.transforms["crop"] == 224 and weights.transforms["resize"] == 256
    assert weights.transforms["mean"] == pytest.approx(MEAN)
    assert weights.transforms["interpolation"] == "bilinear"
    pixels = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ours = Embedder(spec_for(cfg, 512)).embed(pixels)
    np.testing.assert_allclose(ours, reference_features(state, pixels), rtol=1e-4, atol=1e-5)


def test_torchvision_weights_offline_name_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"place the file at .*resnet50-11ad3fa6\.pth"):
        resolve(ModelConfig(arch="resnet50", weights="IMAGENET1K_V2"))
    with pytest.raises(WeightsError, match="not a weights name"):
        resolve(ModelConfig(arch="resnet50", weights="IMAGENET9K"))


def overflowing_weights(state, folder, bias=1e6):
    """ResNet-18 weights whose last BatchNorm adds `bias` to every channel: pooled features near
    1e6 are finite in float32 and inf in float16 (largest 65504); a NaN bias makes them NaN."""
    state = {k: v.clone() for k, v in state.items()}
    state["layer4.1.bn2.bias"].fill_(bias)
    path = folder / f"r18_bias_{bias}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def failed_batch(pixels):
    return {"sample_id": np.array(["a", "b", "c"], dtype=object), "pixels": pixels,
            "error_stage": np.array(["", "decode", ""], dtype=object),
            "error_type": np.array(["", "OSError", ""], dtype=object),
            "error_message": np.array(["", "truncated", ""], dtype=object)}


def test_features_that_are_not_finite_as_stored_become_model_errors(resnet18_state, tmp_path):
    state, _ = resnet18_state
    cfg = ModelConfig(arch="resnet18", weights=overflowing_weights(state, tmp_path))
    pixels = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    out = Embedder(spec_for(cfg, 512, dtype="float16"))(failed_batch(pixels))
    assert list(out["error_stage"]) == ["model", "decode", "model"]
    assert list(out["error_type"]) == ["NonFiniteFeature", "OSError", "NonFiniteFeature"]
    assert out["error_message"][0] == "feature: 512 of 512 values overflow float16 (largest 65504): " \
                                      "use output.dtype float32"
    assert out["error_message"][1] == "truncated"
    as_float32 = Embedder(spec_for(cfg, 512, dtype="float32"))(failed_batch(pixels))  # what the message advises
    assert list(as_float32["error_stage"]) == ["", "decode", ""] and np.isfinite(as_float32["feature"]).all()
    cfg = ModelConfig(arch="resnet18", weights=overflowing_weights(state, tmp_path, bias=float("nan")))
    out = Embedder(spec_for(cfg, 512, dtype="float32"))(failed_batch(pixels))
    assert list(out["error_type"]) == ["NonFiniteFeature", "OSError", "NonFiniteFeature"]
    assert out["error_message"][2] == "feature: 512 of 512 values are NaN or inf"


def test_frame_features_that_are_not_finite_become_model_errors(resnet18_state, tmp_path):
    state, _ = resnet18_state
    cfg = ModelConfig(arch="resnet18", weights=overflowing_weights(state, tmp_path, bias=float("inf")))
    frames = np.random.default_rng(2).integers(0, 256, (3, 2, 64, 64, 3), dtype=np.uint8)
    batch = failed_batch(None)
    del batch["pixels"]
    out = Embedder(spec_for(cfg, 512))({**batch, "frames": frames})
    assert list(out["error_stage"]) == ["model", "decode", "model"]
    assert out["error_message"][0] == "frame_features: 1024 of 1024 values are NaN or inf"
