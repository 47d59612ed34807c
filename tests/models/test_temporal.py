import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import TemporalConfig
from pipeline.errors import TemporalError
from pipeline.models.temporal import AttentionHead, TemporalEmbedder, build_head, resolve_head, resolve_heads, save_head

D = 12


def lstm_checkpoint(folder, hidden, layers, bidirectional, input_size=D, seed=7):
    """A plain torch.nn.LSTM written in the checkpoint format by hand: `lstm.` keys + JSON beside."""
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(input_size, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True).eval()
    path = folder / f"lstm_{layers}_{int(bidirectional)}.safetensors"
    save_file({f"lstm.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    config = {"kind": "lstm", "input_size": input_size, "hidden_size": hidden, "num_layers": layers, "bidirectional": bidirectional}
    path.with_suffix(".json").write_text(json.dumps(config))
    return ref, str(path)


def attention_checkpoint(folder, hidden=5, seed=3):
    torch.manual_seed(seed)
    path = str(folder / "attn.safetensors")
    save_head(AttentionHead(D, hidden), {"kind": "attention", "input_size": D, "hidden_size": hidden}, path)
    return path


def head_for(cfg, index=0):
    info = resolve_head(cfg, D, {}, index)
    return info, build_head(info, {})


def padded(lengths, seed=0, pad=np.nan):
    """Clips of the given lengths padded to the longest with `pad`, which must never leak in."""
    rng = np.random.default_rng(seed)
    x = np.full((len(lengths), max(lengths), D), pad, dtype=np.float32)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.standard_normal((n, D))
    return torch.from_numpy(x), torch.tensor(lengths)


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (1, True), (2, True)])
def test_lstm_head_equals_a_direct_torch_lstm(tmp_path, layers, bidirectional):
    ref, path = lstm_checkpoint(tmp_path, 9, layers, bidirectional)
    info, head = head_for(TemporalConfig(kind="lstm", name="lstm", checkpoint=path))
    x = torch.randn(4, 6, D)
    with torch.no_grad():
        expected = ref(x)[0][:, -1]
        ours = head(x)
    assert info.out_dim == 9 * (2 if bidirectional else 1) == ours.shape[1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_feature_of_a_padded_clip_is_that_of_the_clip_alone(tmp_path, bidirectional):
    ref, path = lstm_checkpoint(tmp_path, 8, 2, bidirectional)
    _, head = head_for(TemporalConfig(kind="lstm", name="lstm", checkpoint=path))
    x, lengths = padded([5, 2, 7])
    with torch.no_grad():
        ours = head(x, lengths)
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(ours[i], ref(x[i : i + 1, :n])[0][0, -1], rtol=0, atol=1e-6)


def test_attention_weights_sum_to_one_and_ignore_padding(tmp_path):
    _, head = head_for(TemporalConfig(kind="attention", name="attn", checkpoint=attention_checkpoint(tmp_path)))
    x, lengths = padded([3, 6, 1])
    with torch.no_grad():
        out, weights = head.forward_with_weights(x, lengths)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
        assert (weights[0, 3:] == 0).all() and (weights[2, 1:] == 0).all() and (weights[1] > 0).all()
        assert out.shape == (3, D) and torch.isfinite(out).all()
        for i, n in enumerate(lengths.tolist()):
            alone, w = head.forward_with_weights(x[i : i + 1, :n])
            torch.testing.assert_close(out[i], alone[0])
            torch.testing.assert_close(out[i], (w[0, :, None] * x[i, :n]).sum(0))


@pytest.mark.parametrize("kind,reduce", [("mean", np.mean), ("max", np.max)])
def test_mean_and_max_equal_numpy_over_real_frames(kind, reduce):
    info, head = head_for(TemporalConfig(kind=kind, name=kind))
    x, lengths = padded([4, 1, 6], seed=2)
    out = head(x, lengths).numpy()
    assert info.out_dim == D and info.weights_id == "" and info.sha256 == ""
    for i, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(out[i], reduce(x[i, :n].numpy(), axis=0), rtol=1e-6, atol=1e-6)
    full = x[1:2, :1]
    np.testing.assert_allclose(head(full).numpy()[0], reduce(full[0].numpy(), axis=0), rtol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "attention"])
def test_a_learned_head_without_checkpoint_is_refused_unless_random_init_is_allowed(kind):
    with pytest.raises(TemporalError) as e:
        resolve_head(TemporalConfig(kind=kind, name=kind), D, {}, 1)
    assert str(e.value) == (f"temporal[1] ({kind} '{kind}'): a checkpoint is required; "
                            "set allow_random_init: true for tests and demos only")
    x = torch.randn(2, 5, D)
    outs = [head_for(TemporalConfig(kind=kind, name=kind, allow_random_init=True, seed=s, hidden_size=6))
            for s in (4, 4, 5)]
    with torch.no_grad():
        a, b, c = (head(x) for _, head in outs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert outs[0][0].weights_id == "random-init(seed=4)" and outs[0][0].checkpoint is None


def test_random_init_lstm_defaults_its_hidden_size_to_the_input_dimension():
    info, _ = head_for(TemporalConfig(kind="lstm", name="l", allow_random_init=True, bidirectional=True))
    assert info.config == {"kind": "lstm", "input_size": D, "hidden_size": D, "num_layers": 1, "bidirectional": True}
    assert info.out_dim == 2 * D
    with pytest.raises(TemporalError, match=r"^temporal\[0\]\.num_layers: must be a positive"):
        resolve_head(TemporalConfig(kind="lstm", name="l", allow_random_init=True, num_layers=0), D)


def test_a_checkpoint_that_disagrees_with_the_entry_is_refused_naming_the_key(tmp_path):
    _, lstm = lstm_checkpoint(tmp_path, 4, 1, False)
    attn = attention_checkpoint(tmp_path)
    with pytest.raises(TemporalError, match=r"^temporal\[2\]\.checkpoint: .*attn\.json is for kind 'attention', the entry says 'lstm'"):
        resolve_head(TemporalConfig(kind="lstm", name="x", checkpoint=attn), D, {}, 2)
    with pytest.raises(TemporalError, match=r"^temporal\[3\]\.checkpoint: .* has input_size 12, the frame features have dimension 16"):
        resolve_head(TemporalConfig(kind="lstm", name="x", checkpoint=lstm), 16, {}, 3)
    with pytest.raises(TemporalError, match=r"^temporal\[0\]\.checkpoint: file .*nope\.json not found"):
        resolve_head(TemporalConfig(kind="lstm", name="x", checkpoint=str(tmp_path / "nope.safetensors")), D)
    with pytest.raises(TemporalError, match=r"^temporal\[0\]\.checkpoint: a mean head has no weights"):
        resolve_head(TemporalConfig(kind="mean", name="x", checkpoint=lstm), D)


def test_weights_that_do_not_fit_the_json_config_are_refused(tmp_path):
    _, path = lstm_checkpoint(tmp_path, 4, 1, False)
    config = json.loads((tmp_path / "lstm_1_0.json").read_text())
    (tmp_path / "lstm_1_0.json").write_text(json.dumps({**config, "hidden_size": 5}))
    with pytest.raises(TemporalError, match=r"^temporal\[0\]\.checkpoint: weights do not fit the JSON config"):
        resolve_head(TemporalConfig(kind="lstm", name="x", checkpoint=path), D)
    (tmp_path / "lstm_1_0.json").write_text(json.dumps({**config, "dropout_typo": 1}))
    with pytest.raises(TemporalError, match=r"^temporal\[0\]\.checkpoint: config .* does not build a lstm head"):
        resolve_head(TemporalConfig(kind="lstm", name="x", checkpoint=path), D)


def test_weights_that_are_not_finite_are_refused(tmp_path):
    """A head trained to NaN would make every clip feature NaN: refused before any work, naming it."""
    from safetensors.torch import load_file

    path = attention_checkpoint(tmp_path)
    state = load_file(path)
    name = next(iter(state))
    state[name][0] = float("nan")
    save_file(state, path)
    with pytest.raises(TemporalError, match=rf"^temporal\[0\]\.checkpoint: weights that are not finite .* in {name}"):
        resolve_head(TemporalConfig(kind="attention", name="a", checkpoint=path), D)


def test_sha256_is_recorded_and_a_checkpoint_changed_after_resolve_is_refused(tmp_path):
    path = attention_checkpoint(tmp_path)
    info = resolve_head(TemporalConfig(kind="attention", name="a", checkpoint=path), D)
    with open(path, "rb") as f:
        assert info.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert info.provenance() == {"name": "a", "kind": "attention", "weights": path, "sha256": info.sha256,
                                 "config": {"kind": "attention", "input_size": D, "hidden_size": 5}, "dim": D}
    attention_checkpoint(tmp_path, seed=99)
    with pytest.raises(TemporalError, match=r"^temporal\[0\]\.checkpoint: .* changed while the job ran"):
        build_head(info)


def test_names_must_be_unique():
    cfgs = [TemporalConfig(kind="mean", name="m"), TemporalConfig(kind="max", name="m")]
    with pytest.raises(TemporalError, match=r"^temporal\[1\]\.name: 'm' is empty or used twice"):
        resolve_heads(cfgs, D)


def embedder_batch(rng, lengths, dim=D):
    """Clips of different lengths (an object column of (T_i, D) arrays), as fps sampling gives."""
    n = len(lengths)
    frames = np.empty(n, dtype=object)
    for i, k in enumerate(lengths):
        frames[i] = rng.standard_normal((k, dim)).astype(np.float16)
    errors = np.array(["", "decode", ""], dtype=object)
    return {
        "sample_id": np.array([f"v{i}.mp4" for i in range(n)], dtype=object),
        "frame_features": frames,
        "num_frames": np.array(lengths, dtype=np.int32),
        "error_stage": errors,
        "error_type": np.where(errors == "", "", "DecodeError").astype(object),
        "error_message": np.where(errors == "", "", "bad file").astype(object),
    }


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embedder_adds_one_column_per_head_and_skips_error_rows(tmp_path, dtype):
    _, lstm = lstm_checkpoint(tmp_path, 7, 1, True)
    cfgs = [TemporalConfig(kind="mean", name="mean"), TemporalConfig(kind="lstm", name="lstm", checkpoint=lstm),
            TemporalConfig(kind="attention", name="attn", allow_random_init=True, hidden_size=4)]
    heads = resolve_heads(cfgs, D)
    embedder = TemporalEmbedder(heads, dtype=dtype, torch_threads=1)
    batch = embedder_batch(np.random.default_rng(0), [6, 0, 3])
    frames = [f.astype(np.float32) for f in batch["frame_features"]]
    out = embedder(batch)
    assert "frame_features" not in out and embedder.output_columns == ("clip_mean", "clip_lstm", "clip_attn")
    for info in heads:
        col = out[info.column]
        assert col.shape == (3, info.out_dim) and col.dtype == np.dtype(dtype)
        assert not col[1].any()
    assert out["clip_lstm"].shape[1] == 14
    assert list(out["error_stage"]) == ["", "decode", ""]
    lstm_head = build_head(heads[1])
    with torch.no_grad():
        alone = lstm_head(torch.from_numpy(frames[2][None]))[0].numpy()
    np.testing.assert_allclose(out["clip_lstm"][2], alone, rtol=1e-2 if dtype == "float16" else 1e-5, atol=1e-3)
    np.testing.assert_allclose(out["clip_mean"][0], frames[0].mean(0), rtol=1e-2, atol=1e-3)


def test_embedder_keeps_frame_features_when_told_and_pads_ragged_rows():
    heads = resolve_heads([TemporalConfig(kind="max", name="max")], D)
    embedder = TemporalEmbedder(heads, dtype="float32", keep_frame_features=True)
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal((k, D)).astype(np.float32) for k in (2, 1, 4)]
    ragged = np.empty(3, dtype=object)
    ragged[:] = clips
    batch = {"frame_features": ragged, "num_frames": np.array([2, 1, 4]),
             "error_stage": np.array(["", "", ""], dtype=object),
             "error_type": np.array(["", "", ""], dtype=object), "error_message": np.array(["", "", ""], dtype=object)}
    out = embedder(batch)
    assert "frame_features" in out
    for i, clip in enumerate(clips):
        np.testing.assert_array_equal(out["clip_max"][i], clip.max(0))


def test_dense_clips_use_every_sampled_frame_whatever_num_frames_says():
    """Uniform sampling of a 2-frame video repeats frames: num_frames records 2 real frames,
    but the heads see the whole sampled sequence."""
    heads = resolve_heads([TemporalConfig(kind="mean", name="mean")], D)
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((3, 4, D)).astype(np.float32)
    batch = {"frame_features": frames, "num_frames": np.array([4, 2, 1]),
             "error_stage": np.array(["", "", ""], dtype=object),
             "error_type": np.array(["", "", ""], dtype=object), "error_message": np.array(["", "", ""], dtype=object)}
    out = TemporalEmbedder(heads, dtype="float32")(batch)
    np.testing.assert_allclose(out["clip_mean"], frames.mean(1), rtol=1e-5, atol=1e-6)


def test_a_failing_head_turns_the_batch_ok_rows_into_temporal_errors():
    heads = resolve_heads([TemporalConfig(kind="mean", name="mean")], D)
    batch = embedder_batch(np.random.default_rng(2), [6, 0, 3])
    batch["frame_features"][2] = np.zeros((3, D + 1), np.float16)  # features of the wrong width
    out = TemporalEmbedder(heads)(batch)
    assert list(out["error_stage"]) == ["temporal", "decode", "temporal"]
    assert out["error_type"][0] == "ValueError" and out["error_message"][0]
    assert out["error_message"][1] == "bad file"
    assert not out["clip_mean"].any()


def float32_batch(frames):
    n = len(frames)
    return {"frame_features": frames, "error_stage": np.array([""] * n, dtype=object),
            "error_type": np.array([""] * n, dtype=object), "error_message": np.array([""] * n, dtype=object)}


def test_clip_features_that_overflow_the_output_dtype_become_temporal_errors():
    """Frame features near 1e5 are finite in float32; their mean is inf in float16 (largest 65504)."""
    heads = resolve_heads([TemporalConfig(kind="mean", name="mean")], D)
    frames = np.random.default_rng(4).standard_normal((3, 4, D)).astype(np.float32)
    frames[1] += 1e5
    out = TemporalEmbedder(heads, dtype="float16")(float32_batch(frames.copy()))
    assert list(out["error_stage"]) == ["", "temporal", ""]
    assert out["error_type"][1] == "NonFiniteFeature"
    assert out["error_message"][1] == f"clip_mean: {D} of {D} values overflow float16 (largest 65504): " \
                                      "use output.dtype float32"
    assert np.isfinite(out["clip_mean"][[0, 2]]).all()
    out = TemporalEmbedder(heads, dtype="float32")(float32_batch(frames.copy()))
    assert list(out["error_stage"]) == ["", "", ""]


def test_kept_frame_features_that_overflow_become_model_errors():
    """The max head's clip is finite (the frame's inf is at one frame only, which max does not
    pick) while frame_features as stored would hold inf."""
    heads = resolve_heads([TemporalConfig(kind="max", name="max")], D)
    frames = np.random.default_rng(5).standard_normal((2, 3, D)).astype(np.float32)
    frames[0, 1, 0] = -1e6  # below float16's range: -inf as stored; the max of the column is another frame's
    kept = TemporalEmbedder(heads, dtype="float16", keep_frame_features=True)(float32_batch(frames.copy()))
    assert list(kept["error_stage"]) == ["model", ""] and kept["error_type"][0] == "NonFiniteFeature"
    assert kept["error_message"][0].startswith("frame_features: 1 of 36 values overflow float16")
    dropped = TemporalEmbedder(heads, dtype="float16")(float32_batch(frames.copy()))  # not published: fine
    assert list(dropped["error_stage"]) == ["", ""]


def test_a_head_name_that_is_not_plain_is_refused_in_code_too():
    """A JobConfig built in code skips the job file's checks; the name still becomes clip_<name>."""
    from pipeline.errors import UnsafeName

    with pytest.raises(UnsafeName, match=r"^temporal\[0\]\.name: '\.\./x' is not a plain name"):
        resolve_heads([TemporalConfig(kind="mean", name="../x")], D)
