"""The original BLIP code's pretraining step, built offline beside ours (same weights, same batch).

Nothing of the original code is copied here: it is imported from a local checkout
(``--reference-dir``, the folder holding ``models/blip_pretrain.py`` and ``configs/``), with
what it needs to run offline and on current libraries:

- transformers >= 5 moved or dropped helpers its ``models/med.py`` imports
  (``apply_chunking_to_forward``, ``prune_linear_layer``, ``find_pruneable_heads_and_indices``)
  and ``PreTrainedModel`` methods it calls (``get_head_mask``, ``invert_attention_mask``,
  ``init_weights`` through ``post_init``); each is restored only when missing;
- ``fairscale`` (only its checkpoint wrapper, used with ``vit_grad_ckpt``) is stubbed when absent;
- its constructor downloads DeiT and ``bert-base-uncased`` weights and a tokenizer: the downloads
  return nothing, the tokenizer is :class:`PretokenizedCaptions` (the caption it is given is
  the batch's ``(input_ids, attention_mask)``), and every tensor is then loaded from our model
  through ``interop.ours_to_reference`` with a strict ``load_state_dict``.

Dropout is off on both sides (``dropout=0``) so that one step's losses can be compared exactly;
the hard negatives match because the original draws them row by row from the global RNG, which
:class:`ReferenceStep` seeds as our step seeds its generator (one ``multinomial`` over the rows
consumes the stream in the same order).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import types
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from blip_recipes.data._seeding import derive_seed
from blip_recipes.interop.reference import ours_to_reference


class ReferenceCodeError(RuntimeError):
    """The original code cannot be imported or built (one line: what is missing and where)."""


class PretokenizedCaptions:
    """What ``BLIP_Pretrain`` reads of its tokenizer. Called with ``caption=(input_ids,
    attention_mask)``, each (B, L), it returns them as the tokenizer's output would."""

    def __init__(self, vocab_size: int, pad_token_id: int, enc_token_id: int, dec_token_id: int):
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.enc_token_id = enc_token_id
        self.bos_token_id = dec_token_id

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, caption: tuple[torch.Tensor, torch.Tensor], **_: Any) -> Any:
        input_ids, attention_mask = caption
        out = types.SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask)
        out.to = lambda _device: out
        return out


def _restore_transformers_helpers() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):

        def find_pruneable_heads_and_indices(*_: Any, **__: Any) -> Any:
            raise NotImplementedError("head pruning is not needed to train")

        modeling_utils.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices


def _stub_fairscale() -> None:
    try:
        importlib.import_module("fairscale.nn.checkpoint.checkpoint_activations")
    except ImportError:
        names = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
                 "fairscale.nn.checkpoint.checkpoint_activations"]  # fmt: skip
        for name in names:
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules[names[-1]].checkpoint_wrapper = lambda module, *_, **__: module  # type: ignore[attr-defined]


def _restore_pretrained_model_methods(med: Any) -> None:
    base = med.BertPreTrainedModel
    base.init_weights = lambda self: None  # every tensor is loaded from our model afterwards

    def get_head_mask(self, head_mask, layers, *_):
        if head_mask is not None:
            raise NotImplementedError("head masks are not used in pretraining")
        return [None] * layers

    def invert_attention_mask(self, mask):
        mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        mask = mask.to(dtype=self.dtype)
        return (1.0 - mask) * torch.finfo(self.dtype).min

    for name, method in (("get_head_mask", get_head_mask),
                         ("invert_attention_mask", invert_attention_mask)):  # fmt: skip
        if not hasattr(base, name):
            setattr(base, name, method)


def import_reference(reference_dir: str | Path) -> types.ModuleType:
    """``models.blip_pretrain`` of the checkout at ``reference_dir``, importable offline.

    Raises:
        ReferenceCodeError: no ``models/blip_pretrain.py`` there, or a package it imports is
            missing (named in the message).
    """
    folder = Path(reference_dir).resolve()
    if not (folder / "models" / "blip_pretrain.py").is_file():
        raise ReferenceCodeError(
            f"--reference-dir {folder}: no models/blip_pretrain.py there; expected a checkout "
            "of the original BLIP code"
        )
    _restore_transformers_helpers()
    _stub_fairscale()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("models.blip_pretrain")
    except ImportError as e:
        raise ReferenceCodeError(
            f"the original code in {folder} does not import: {e} (it needs timm, which needs "
            "torchvision: pip install timm)"
        ) from e
    if Path(module.__file__).resolve().parent.parent != folder:
        raise ReferenceCodeError(
            f"'models' is already imported from {Path(module.__file__).parent}, not {folder}"
        )
    _restore_pretrained_model_methods(importlib.import_module("models.med"))
    return module


def build_reference(
    reference_dir: str | Path,
    model: nn.Module,
    momentum: Any,
    *,
    image_size: int,
    vocab_size: int,
    pad_token_id: int,
    enc_token_id: int,
    dec_token_id: int,
    dropout: float = 0.0,
) -> nn.Module:
    """The original ``BLIP_Pretrain`` (ViT-B/16 + BERT-base MED) holding our model's weights,
    momentum encoders and queues.

    Args:
        reference_dir: the checkout (``models/``, ``configs/med_config.json``).
        model: our `BlipPretrain` (ViT-B + BERT-base sizes).
        momentum: our `MomentumState` (encoders, queues, pointer).
        image_size: the ViT's input resolution.
        vocab_size, pad_token_id, enc_token_id, dec_token_id: our tokenizer's.
        dropout: hidden and attention dropout of the original's MED.
    """
    blip_pretrain = import_reference(reference_dir)
    med = importlib.import_module("models.med")
    config_path = Path(reference_dir) / "configs" / "med_config.json"
    read_config = blip_pretrain.BertConfig.from_json_file

    def config(path):
        cfg = read_config(path)
        cfg.vocab_size = vocab_size
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
        return cfg

    def from_config(cls, _name, config=None, **kwargs):
        return cls(config=config, **kwargs)

    tokenizer = PretokenizedCaptions(vocab_size, pad_token_id, enc_token_id, dec_token_id)
    with contextlib.ExitStack() as stack:
        for target, name, value in (
            (torch.hub, "load_state_dict_from_url", lambda *_, **__: {"model": {}}),
            (blip_pretrain, "init_tokenizer", lambda: tokenizer),
            (blip_pretrain.BertConfig, "from_json_file", staticmethod(config)),
            (med.BertModel, "from_pretrained", classmethod(from_config)),
            (med.BertLMHeadModel, "from_pretrained", classmethod(from_config)),
            (med.BertPreTrainedModel, "resize_token_embeddings", lambda self, n: None),
        ):
            stack.enter_context(mock.patch.object(target, name, value))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # "... is tied" x 100
        reference = blip_pretrain.BLIP_Pretrain(
            med_config=str(config_path),
            image_size=image_size,
            vit="base",
            queue_size=momentum.queue_size,
            momentum=momentum.decay,
        )
    queues = {k: getattr(momentum, k) for k in ("image_queue", "text_queue", "queue_ptr")}
    state = ours_to_reference(model.state_dict(), momentum.encoders.state_dict(), queues)
    reference.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return reference.train()


def disable_dropout(*modules: nn.Module) -> None:
    """Dropout probability 0 in every `nn.Dropout` and attention of ``modules`` (our model)."""
    for root in modules:
        for module in root.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.0


class ReferenceStep:
    """One training step as the original ``train.py`` runs it: forward (losses), their sum,
    ``zero_grad``, backward, AdamW step (one group, ``foreach`` left to torch as there).

    Args:
        model: from :func:`build_reference`.
        lr, weight_decay, betas, eps: AdamW's (the same numbers as our optimizer's).
        seed, rank: as our step's, so that step s draws its hard negatives from the same seed.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                           betas=betas, eps=eps)  # fmt: skip
        self.seed, self.rank = seed, rank

    def __call__(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        step: int, alpha: float,
    ) -> tuple[float, float, float]:  # fmt: skip
        """(ITA, ITM, LM) losses of the step (read after the update, as floats)."""
        torch.manual_seed(derive_seed(self.seed, self.rank, step))
        loss_ita, loss_itm, loss_lm = self.model(images, (input_ids, attention_mask), alpha)
        loss = loss_ita + loss_itm + loss_lm
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss_ita), float(loss_itm), float(loss_lm)


__all__ = [
    "ReferenceCodeError",
    "ReferenceStep",
    "PretokenizedCaptions",
    "build_reference",
    "disable_dropout",
    "import_reference",
]
