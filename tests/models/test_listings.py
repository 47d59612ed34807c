"""`featurize models`, `featurize layers ARCH`, and the model refusals that point at them.

The listings (and a `layers` refusal) never import Ray, proved by poisoning the import in a separate
process (each command's main() in turn, its exit code, stdout and stderr kept apart), so that nothing
this test process imported is taken for granted; the refusals of `featurize run` come before Ray
starts, with one line and exit 2, through main() in this process with Ray's start made to fail.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ModelConfig
from pipeline.errors import ModelError, WeightsError
from pipeline.models.base import resolve
from pipeline.models.catalog import FAMILIES, format_layers, format_models, layer_nodes
from pipeline.samples import make_image_folder

from conftest import job_dict
from test_cli import assert_refused, featurize_each, write_job


def without_ray(tmp_path: Path) -> dict:
    """The environment of a process for which `import ray` fails."""
    poison = tmp_path / "poison" / "ray"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('ray imported for a listing')\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(poison.parent), os.environ.get("PYTHONPATH")]))}


def test_models_and_layers_list_and_an_unknown_arch_is_refused_without_ray(tmp_path, ray_tmpdir):
    result, layers, clip_layers, arch = featurize_each(
        ["models"], ["layers", "resnet18", "--crop", "112"],
        ["layers", "r2plus1d_18", "--family", "torchvision_video", "--crop", "56"], ["layers", "resnet181"],
        env_extra={**without_ray(tmp_path), "RAY_TMPDIR": str(ray_tmpdir)})
    assert result.returncode == 0, result.stderr
    sections = {}
    for block in result.stdout.strip().split("\n\n"):
        head, _, body = block.partition("\n")
        sections[head.split()[0]] = {name.strip() for name in body.replace("\n", " ").split(",")}
    assert set(sections) == set(FAMILIES) == {"torchvision", "timm", "open_clip", "torchvision_video", "temporal"}
    assert sections["torchvision_video"] == {"r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s",
                                             "swin3d_t", "swin3d_s", "swin3d_b"}
    assert not {"r3d_18", "s3d"} & sections["torchvision"]  # clip models are not image backbones
    assert {"resnet18", "convnext_atto", "vit_tiny_patch16_224"} <= sections["timm"]
    assert {"ViT-B-32", "RN50"} <= sections["open_clip"]
    assert {"resnet18", "resnet50", "vit_b_16", "convnext_tiny"} <= sections["torchvision"]
    assert "maskrcnn_resnet50_fpn" not in sections["torchvision"]  # detection models are not backbones here
    assert {"mean", "max", "lstm", "attention"} == sections["temporal"]
    assert "model.arch" in result.stdout and "temporal[].kind" in result.stdout

    # `featurize layers ARCH`: a table of each node's output shape at the crop
    result = layers
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:-1]}
    assert "(512, 4, 4)" in rows["layer4.1.relu_1"] and rows["layer4.1.relu_1"].endswith("= layer4, layer4.1")
    assert rows["avgpool"].split()[1:] == ["(512,", "1,", "1)", "512"]
    assert "crop 112" in result.stdout.splitlines()[0]

    # a clip model's layers: (C, T, H, W) at its clip length (16 frames) and the crop, pooled to C
    assert clip_layers.returncode == 0, clip_layers.stderr
    rows = {line.split()[0]: line for line in clip_layers.stdout.splitlines()[2:-1]}
    assert rows["layer4"].split()[1:] == ["(512,", "2,", "4,", "4)", "512"]
    assert rows["avgpool"].split()[1:] == ["(512,", "1,", "1,", "1)", "512"]
    assert "pooled over time and space" in clip_layers.stdout.splitlines()[-1]

    # an unknown arch, naming the closest
    line = assert_refused(arch, ray_tmpdir, "model.arch", "'resnet181'", "featurize models")
    assert line.split("did you mean ")[1].startswith("resnet18,")


def test_layers_have_their_output_shapes_at_the_crop():
    for crop, side in ((224, 7), (64, 2)):
        nodes = {n.name: n for n in layer_nodes("resnet18", crop)}
        assert nodes["x"].shape == (3, crop, crop)
        assert nodes["layer4.1.relu_1"].shape == (512, side, side)
        assert "layer4" in nodes["layer4.1.relu_1"].modules  # the module's name stands for its last node
        assert nodes["layer3.1.relu_1"].shape == (256, 2 * side, 2 * side)
        assert nodes["avgpool"].shape == (512, 1, 1)
        assert nodes["fc"].shape == (1000,)
    nodes = {n.name: n for n in layer_nodes("shufflenet_v2_x0_5", 64)}
    assert nodes["stage2.0.size"].shape is None and nodes["stage2.0.size"].kind == "Size"  # x.size(): not a tensor
    assert nodes["conv5.2"].shape == (1024, 2, 2)


def test_models_and_layers_of_one_family():
    assert format_models(only="open_clip").startswith("open_clip (model.arch, model.family: open_clip, ")
    with pytest.raises(ModelError, match=r"--family: 'keras' is not one of torchvision, open_clip, timm, "
                                         r"torchvision_video, temporal"):
        format_models(only="keras")
    nodes = {n.name: n.shape for n in layer_nodes("convnext_atto", 64, "timm")}
    assert nodes["stages.2"] == (160, 4, 4) and nodes["stages.3"] == (320, 2, 2)
    assert list(nodes)[:3] == ["stem.0", "stem.1", "stem"]  # in the order their outputs come
    assert "head.fc" not in nodes  # timm's forward_features: no classifier
    table = format_layers("ViT-S-32", 224, "open_clip")
    assert "transformer.resblocks.11" in table and "the image embedding, L2-normalised" in table
    with pytest.raises(ModelError, match=r"is not a timm model; did you mean resnet18"):
        layer_nodes("resnet18x", 64, "timm")


@pytest.fixture
def images(tmp_path):
    make_image_folder(str(tmp_path / "images"), n=4, broken=0)
    return tmp_path / "images"


def test_an_unknown_layer_and_a_crop_the_model_cannot_take_are_refused_before_ray(tmp_path, images, ray_tmpdir,
                                                                                 monkeypatch, capsys):
    from pipeline.cli import main

    def start_ray(*args, **kwargs):
        raise AssertionError("a refused job started Ray")

    monkeypatch.setattr("pipeline.extract.runner.init_ray", start_ray)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    layer = job_dict(str(images), str(tmp_path / "out"))
    layer["model"]["layer"] = "layer5"
    crop = job_dict(str(images), str(tmp_path / "out"))
    crop["model"] = {"arch": "vit_b_16", "weights": "none"}
    crop["preprocess"] = {"resize": 128, "crop": 112}

    def refused(job, *needles):
        capsys.readouterr()
        code = main(["run", str(job)])
        out = capsys.readouterr()
        return assert_refused(SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err), ray_tmpdir, *needles)

    # an unknown layer, naming the closest
    line = refused(write_job(tmp_path / "layer.yaml", layer), "model.layer", "'layer5'", "featurize layers resnet18")
    assert line.split("did you mean ")[1].startswith("layer4,")

    # a crop the model cannot take
    line = refused(write_job(tmp_path / "crop.yaml", crop), "preprocess.crop", "vit_b_16", "112x112", "needs crop 224")
    assert "resume" not in line
    assert not (tmp_path / "out").exists()


def test_a_weights_name_error_lists_each_name_once():
    with pytest.raises(WeightsError) as e:
        resolve(ModelConfig(arch="resnet50", weights="IMAGENET9K"))
    names = str(e.value).split("(")[-1].rstrip(")").split(", ")
    assert names == ["DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"]
