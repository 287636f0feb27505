"""Reference `.pth` export as the reference code reads it: strict load into a module tree with the
reference's names, ties stored once, a reference file back bit for bit (directly and through DCP
or safetensors), and `--force` replacing an output only once the new one is complete."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.commands.convert_checkpoint import convert_checkpoint
from blip_recipes.commands.convert_checkpoint import main as convert_main
from blip_recipes.interop.files import staged_output
from blip_recipes.training import init_checkpoint
from blip_recipes.training.init_checkpoint import save_training_checkpoint
from tests.interop.convert_helpers import HEADS, TINY
from tests.interop.reference_tree import ReferencePretrainTree, randomised, shared_groups
from tests.models.tiny_blip import make_model, momentum_state

QUEUE = 8
HINTS = dict(**HEADS, enc_token_id=TINY["enc_token_id"], dec_token_id=TINY["dec_token_id"])
CLI_HINTS = [arg for key, value in HINTS.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _reference_file(tmp_path, seed: int = 0):
    """A file as the reference writes it: `{"model": BLIP_Pretrain.state_dict()}`, ties and all."""
    tree = randomised(ReferencePretrainTree(make_model(), QUEUE), seed)
    state = tree.state_dict()
    path = tmp_path / "model_base.pth"
    torch.save({"model": state}, path)
    return path, state


def _assert_same(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_export_of_our_checkpoint_loads_strictly_with_the_reference_ties(tmp_path):
    model = make_model(seed=3)
    momentum = momentum_state(queue_size=QUEUE, seed=1)
    momentum.copy_from(model)
    with torch.no_grad():
        for p in momentum.encoders.parameters():
            p.mul_(0.9)
    dcp_dir = save_training_checkpoint(model, momentum, tmp_path / "run" / "checkpoints" / "step-5")
    out = convert_checkpoint(dcp_dir, tmp_path / "ref.pth", to="reference", **HINTS)
    exported = _load(out)

    tree = ReferencePretrainTree(model, QUEUE)
    tree.load_state_dict(exported, strict=True)  # what the reference's --checkpoint does
    assert shared_groups(exported) == shared_groups(tree.state_dict())
    assert len(shared_groups(exported)) > 10
    prediction = tree.text_decoder.cls.predictions
    assert torch.equal(prediction.decoder.bias, model.lm_head.bias)
    assert torch.equal(prediction.decoder.weight, model.text.embeddings.word_embeddings.weight)
    assert torch.equal(tree.text_encoder.embeddings.position_ids[0], torch.arange(40))
    # no momentum cross-attention in our state: copies of the online one, in their own storage
    cross_m = tree.text_encoder_m.encoder.layer[1].crossattention.self.key.weight
    assert torch.equal(cross_m, model.text.layers[1].cross_attn.key.weight)
    assert torch.equal(tree.visual_encoder_m.cls_token, momentum.encoders.visual_encoder.cls_token)

    untied = tmp_path / "untied.pth"
    torch.save({"model": {k: v.clone() for k, v in exported.items()}}, untied)
    unique = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in exported.values()
    }
    duplicated = sum(v.untyped_storage().nbytes() for v in exported.values()) - sum(unique.values())
    assert duplicated > 0
    assert out.stat().st_size <= untied.stat().st_size - 0.95 * duplicated


@pytest.mark.parametrize("through", [None, "dcp", "safetensors"])
def test_reference_file_comes_back_bit_exact(tmp_path, through):
    source, reference = _reference_file(tmp_path)
    cross_m = "text_encoder_m.encoder.layer.0.crossattention.self.query.weight"
    assert not torch.equal(reference[cross_m], reference[cross_m.replace("_m.", ".")])
    middle, hints = source, HINTS
    if through is not None:
        dest = tmp_path / ("mid" if through == "dcp" else "mid.safetensors")
        middle = convert_checkpoint(source, dest, to=through, **HINTS)
        hints = {}  # recorded with the checkpoint
    out = convert_checkpoint(middle, tmp_path / "back.pth", to="reference", **hints)
    back = _load(out)
    _assert_same(back, reference)
    assert shared_groups(back) == shared_groups(reference)


def test_force_replaces_a_dcp_folder_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    source, reference = _reference_file(tmp_path)
    dest = tmp_path / "converted"
    assert convert_main([str(source), str(dest), *CLI_HINTS]) == 0
    (dest / "notes.txt").write_text("mine")
    assert convert_main([str(source), str(dest), *CLI_HINTS]) == 2  # refuses without --force
    assert (dest / "notes.txt").is_file()

    def failing_save(model, momentum, path, *args):
        path.mkdir()
        (path / "__0_0.distcp").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(init_checkpoint, "save_training_checkpoint", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(source, dest, overwrite=True, **HINTS)
    assert (dest / "notes.txt").read_text() == "mine"  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model_base.pth"]
    monkeypatch.undo()

    assert convert_main([str(source), str(dest), "--force", *CLI_HINTS]) == 0
    assert not (dest / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model_base.pth"]
    out = convert_checkpoint(dest, tmp_path / "back.pth", to="reference")
    _assert_same(_load(out), reference)
    with pytest.raises(ValueError, match="holds it"):  # replacing it would delete the source
        convert_checkpoint(dest, tmp_path, overwrite=True)


def test_staged_output_keeps_the_old_file_on_interrupt(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--force"):
        with staged_output(path):
            pass
    with pytest.raises(KeyboardInterrupt):
        with staged_output(path, overwrite=True) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".pth"
            tmp.write_bytes(b"ne")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pth"]
    with staged_output(path, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.pth"]
