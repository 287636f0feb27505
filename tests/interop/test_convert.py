"""Every conversion direction, verified by model outputs: reference .pth / HF folders -> DCP
(loadable by the recipe's init path), DCP -> HF folders / consolidated .pt / .safetensors /
reference .pth; and clear errors for unknown layouts."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.checkpoint import (
    MODEL,
    MOMENTUM,
    CheckpointManager,
    ModelWrapper,
    load_model_weights,
)
from blip_recipes.interop import ours_to_reference
from blip_recipes.interop.exporters import export_hf, save_consolidated, save_reference
from blip_recipes.interop.files import CheckpointLayoutError
from blip_recipes.interop.loading import build_model_from_weights, load_model
from blip_recipes.interop.readers import read_weights
from blip_recipes.models import build_model
from blip_recipes.training.init_checkpoint import (
    build_momentum_from_weights,
    save_training_checkpoint,
)
from tests.interop.convert_helpers import (
    HEADS,
    TINY,
    assert_outputs_close,
    hf_outputs,
    hf_pair,
    inputs,
    our_outputs,
)
from tests.models.tiny_blip import make_model, momentum_state

#: Token ids a reference file does not record (the tokenizer's), for the tiny vocabulary.
IDS = dict(enc_token_id=TINY["enc_token_id"], dec_token_id=TINY["dec_token_id"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread avoids OpenMP contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


transformers = pytest.importorskip("transformers")


def _trained_momentum(model, seed=0):
    """A momentum state whose weights differ from the online model and whose queues moved."""
    state = momentum_state(queue_size=8, seed=seed)
    state.copy_from(model)
    with torch.no_grad():
        for p in state.encoders.parameters():
            p.mul_(0.9)
        state.enqueue(torch.randn(8, TINY["embed_dim"]), torch.randn(8, TINY["embed_dim"]))
        state.enqueue(torch.randn(4, TINY["embed_dim"]), torch.randn(4, TINY["embed_dim"]))
    return state


def _assert_momentum_equal(a, b):
    sa, sb = a.encoders.state_dict(), b.encoders.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for key in ("image_queue", "text_queue", "queue_ptr"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def _fresh_like(model):
    """What the recipe builds before `checkpoint.init_from`: same args, other weights."""
    torch.manual_seed(123)
    return build_model("blip_pretrain_tiny", **TINY)


@pytest.fixture(scope="module")
def dcp_from_reference(tmp_path_factory):
    """reference .pth (with momentum and queues) -> DCP via the library."""
    tmp = tmp_path_factory.mktemp("ref")
    model = make_model(seed=11)
    with torch.no_grad():
        model.temp.fill_(0.05)
    momentum = _trained_momentum(model)
    ref = ours_to_reference(model.state_dict(), momentum.encoders.state_dict(),
                            {k: getattr(momentum, k) for k in ("image_queue", "text_queue", "queue_ptr")})  # fmt: skip
    ref["text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    ref["text_decoder.cls.predictions.decoder.bias"] = ref["text_decoder.cls.predictions.bias"]
    assert ref["temp"].dim() == 0
    torch.save({"model": ref, "epoch": 3}, tmp / "model_base.pth")
    weights = read_weights(tmp / "model_base.pth")
    assert weights.layout == "reference"
    converted = build_model_from_weights(weights, strict=True, **HEADS, **IDS)
    converted_momentum = build_momentum_from_weights(converted, weights)
    out = save_training_checkpoint(converted, converted_momentum, tmp / "checkpoints" / "step-0")
    return model, momentum, out


def test_reference_to_dcp_recipe_init_gives_same_outputs(dcp_from_reference):
    model, momentum, dcp_dir = dcp_from_reference
    fresh = _fresh_like(model)
    load_model_weights(dcp_dir, fresh)  # exactly what checkpoint.init_from does (strict)
    images, ids, mask = inputs()
    assert_outputs_close(
        our_outputs(fresh.eval(), images, ids, mask), our_outputs(model, images, ids, mask), atol=0
    )
    assert fresh.temp.item() == pytest.approx(0.05)


def test_reference_to_dcp_carries_momentum_and_queues(dcp_from_reference):
    model, momentum, dcp_dir = dcp_from_reference
    restored = momentum_state(queue_size=8, seed=99)
    CheckpointManager(dcp_dir.parent).load(dcp_dir, {MOMENTUM: restored})
    _assert_momentum_equal(restored, momentum)
    assert int(restored.queue_ptr) == (8 + 4) % 8


def test_converted_dcp_checkpoint_verifies(dcp_from_reference):
    from blip_recipes.checkpoint.integrity import verify_checkpoint

    assert verify_checkpoint(dcp_from_reference[2]).ok


def test_dcp_to_hf_folders_load_without_warnings_and_match(dcp_from_reference, tmp_path):
    model, _, dcp_dir = dcp_from_reference
    ours = load_model(dcp_dir)  # shapes and heads from model_args.json
    folders = export_hf(ours, tmp_path / "hf", tokenizer=_Tok())
    retrieval, info_r = transformers.BlipForImageTextRetrieval.from_pretrained(
        folders["retrieval"], output_loading_info=True
    )
    captioning, info_c = transformers.BlipForConditionalGeneration.from_pretrained(
        folders["captioning"], output_loading_info=True
    )
    for info in (info_r, info_c):
        assert (
            not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        )
    for config in (retrieval.config, captioning.config):
        assert config.vision_config.layer_norm_eps == 1e-6
        assert config.text_config.label_smoothing == 0.1
        assert config.text_config.bos_token_id == TINY["dec_token_id"]
    images, ids, mask = inputs()
    assert_outputs_close(
        our_outputs(model, images, ids, mask),
        hf_outputs(retrieval.eval(), captioning.eval(), images, ids, mask),
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dcp_to_consolidated_file_round_trips(dcp_from_reference, tmp_path, suffix):
    model, momentum, dcp_dir = dcp_from_reference
    weights = read_weights(dcp_dir)
    ours = build_model_from_weights(weights, strict=True)
    path = save_consolidated(
        ours, tmp_path / f"blip{suffix}", build_momentum_from_weights(ours, weights)
    )
    back = read_weights(path)
    assert back.layout == "ours"
    hints = {} if suffix == ".safetensors" else {**HEADS, **IDS}  # safetensors records them
    again = build_model_from_weights(back, strict=True, **hints)
    images, ids, mask = inputs()
    assert_outputs_close(
        our_outputs(again, images, ids, mask), our_outputs(model, images, ids, mask), atol=0
    )
    _assert_momentum_equal(build_momentum_from_weights(again, back), momentum)


def test_dcp_to_reference_pth_round_trips(dcp_from_reference, tmp_path):
    model, momentum, dcp_dir = dcp_from_reference
    weights = read_weights(dcp_dir)
    ours = build_model_from_weights(weights)
    path = save_reference(ours, tmp_path / "ref.pth", build_momentum_from_weights(ours, weights))
    raw = torch.load(path, weights_only=True)["model"]
    assert raw["temp"].dim() == 0 and "visual_encoder_m.cls_token" in raw and "image_queue" in raw
    back = read_weights(path)
    again = build_model_from_weights(back, strict=True, **HEADS, **IDS)
    images, ids, mask = inputs()
    assert_outputs_close(
        our_outputs(again, images, ids, mask), our_outputs(model, images, ids, mask), atol=0
    )
    _assert_momentum_equal(build_momentum_from_weights(again, back), momentum)


def test_hf_folders_to_dcp_match_transformers(tmp_path):
    retrieval, captioning = hf_pair()
    retrieval.save_pretrained(tmp_path / "hf" / "retrieval")
    captioning.save_pretrained(tmp_path / "hf" / "captioning")
    weights = read_weights(tmp_path / "hf")
    assert weights.layout == "hf"
    model = build_model_from_weights(weights)  # heads, eps, token ids from config.json
    assert model.visual_encoder.norm.eps == retrieval.config.vision_config.layer_norm_eps
    momentum = build_momentum_from_weights(model, weights, queue_size=32)  # copy of online
    dcp_dir = save_training_checkpoint(model, momentum, tmp_path / "dcp")
    fresh = _fresh_like(model)
    load_model_weights(dcp_dir, fresh)
    images, ids, mask = inputs()
    assert_outputs_close(
        our_outputs(fresh.eval(), images, ids, mask),
        hf_outputs(retrieval, captioning, images, ids, mask),
    )
    state = momentum_state(queue_size=32)
    CheckpointManager(tmp_path).load(dcp_dir, {MOMENTUM: state})
    assert torch.equal(state.encoders.visual_encoder.cls_token, fresh.visual_encoder.cls_token)


def test_single_hf_retrieval_folder_is_enough_for_retrieval(tmp_path):
    retrieval, _ = hf_pair(vision_eps=1e-5)
    retrieval.save_pretrained(tmp_path / "ret")
    model = load_model(tmp_path / "ret")  # captioning parts keep their initialisation
    images, ids, mask = inputs()
    theirs = hf_outputs(retrieval, None, images, ids, mask)
    ours = our_outputs(model, images, ids, mask)
    assert_outputs_close({k: ours[k] for k in ("vision", "itc", "itm")}, theirs)


def test_recipe_checkpoint_is_read_with_its_config(tmp_path):
    """A checkpoint written by the CheckpointManager the way the recipe does (config.toml beside)."""
    model = make_model(seed=2)
    momentum = _trained_momentum(model)
    manager = CheckpointManager(tmp_path / "checkpoints")
    manager.save(5, {MODEL: ModelWrapper(model), MOMENTUM: momentum},
                 extra_files={"config.toml": '[model]\nname = "blip_pretrain_tiny"\n'})  # fmt: skip
    weights = read_weights(tmp_path)  # the run folder: newest complete step
    assert weights.source.endswith("step-5") and weights.model_args == {
        "name": "blip_pretrain_tiny"
    }
    ours = build_model_from_weights(weights, strict=True, **HEADS, **IDS)
    images, ids, mask = inputs()
    assert_outputs_close(
        our_outputs(ours, images, ids, mask), our_outputs(model, images, ids, mask), atol=0
    )
    _assert_momentum_equal(build_momentum_from_weights(ours, weights), momentum)


def test_unknown_layouts_name_the_keys(tmp_path):
    torch.save({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointLayoutError, match="first keys: foo.weight, bar.bias"):
        read_weights(tmp_path / "x.pth")
    model = make_model()
    ref = ours_to_reference(model.state_dict())
    ref["text_encoder.encoder.layer.0.adapter.weight"] = torch.zeros(3)
    torch.save({"model": ref}, tmp_path / "ref.pth")
    with pytest.raises(
        CheckpointLayoutError, match=r"1 key\(s\).*text_encoder.encoder.layer.0.adapter.weight"
    ):
        read_weights(tmp_path / "ref.pth")
    ours = model.state_dict() | {"text.layers.0.lora_a": torch.zeros(2)}
    torch.save(ours, tmp_path / "ours.pt")
    with pytest.raises(CheckpointLayoutError, match="text.layers.0.lora_a"):
        load_model(tmp_path / "ours.pt", **HEADS, **IDS)
    with pytest.raises(ValueError, match="enc_token_id=30523 is outside the vocabulary"):
        load_model(_write(tmp_path / "plain.pt", model.state_dict()), **HEADS)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointLayoutError, match="neither a DCP checkpoint"):
        read_weights(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        read_weights(tmp_path / "missing.pth")


def _write(path, state):
    torch.save(state, path)
    return path


class _Tok:
    """The ids export_hf needs from a tokenizer (the tiny model's vocabulary)."""

    sep_token_id = 2
