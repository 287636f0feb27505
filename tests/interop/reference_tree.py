"""A module tree named like the reference BLIP pretraining model, to load exports into strictly.

Built from the naming rules of the reference code, not from our key mapping, so a wrong or
missing name in an export fails `load_state_dict(strict=True)`:
- `visual_encoder` / `visual_encoder_m`: timm ViT (`cls_token`, `pos_embed`, `patch_embed.proj`,
  `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`).
- `text_encoder` / `text_encoder_m`: BERT without pooler (`embeddings.{word_embeddings,
  position_embeddings, LayerNorm}` + a `position_ids` buffer (1, P), `encoder.layer.N.{attention,
  crossattention}.{self.{query,key,value}, output.{dense,LayerNorm}}`, `intermediate.dense`,
  `output.{dense,LayerNorm}`); cross-attention keys/values read the vision width.
- `text_decoder`: `bert.` (the same BERT) and `cls.predictions.{transform.{dense,LayerNorm},
  decoder, bias}`, where `decoder.weight` is the word embeddings and `decoder.bias` is `bias`.
- `vision_proj`, `text_proj`, `itm_head`, their `_m` copies, `temp` (0-d), `image_queue`,
  `text_queue` (E, Q), `queue_ptr` (1,).
- Ties as the reference makes them: every text encoder weight except self-attention is the
  decoder's tensor; the momentum copies are their own tensors.
"""

from __future__ import annotations

import torch
from torch import nn


class _Group(nn.Module):
    """A named bag of submodules (`_Group(dense=..., LayerNorm=...)`)."""

    def __init__(self, /, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _attention(width: int, kv_width: int) -> nn.Module:
    self_part = _Group(query=nn.Linear(width, width), key=nn.Linear(kv_width, width),
                       value=nn.Linear(kv_width, width))  # fmt: skip
    return _Group(self=self_part, output=_Group(dense=nn.Linear(width, width),
                                                LayerNorm=nn.LayerNorm(width)))  # fmt: skip


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, width: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(positions, width)
        self.LayerNorm = nn.LayerNorm(width)
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)))


def _bert(vocab: int, positions: int, width: int, ffn: int, depth: int, vision: int) -> nn.Module:
    layers = [
        _Group(attention=_attention(width, width), crossattention=_attention(width, vision),
               intermediate=_Group(dense=nn.Linear(width, ffn)),
               output=_Group(dense=nn.Linear(ffn, width), LayerNorm=nn.LayerNorm(width)))
        for _ in range(depth)
    ]  # fmt: skip
    return _Group(embeddings=_Embeddings(vocab, positions, width),
                  encoder=_Group(layer=nn.ModuleList(layers)))  # fmt: skip


class _ViT(nn.Module):
    def __init__(self, width: int, depth: int, patch: int, tokens: int, mlp: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.patch_embed = _Group(proj=nn.Conv2d(3, width, patch, patch))
        self.blocks = nn.ModuleList(
            _Group(norm1=nn.LayerNorm(width),
                   attn=_Group(qkv=nn.Linear(width, 3 * width), proj=nn.Linear(width, width)),
                   norm2=nn.LayerNorm(width),
                   mlp=_Group(fc1=nn.Linear(width, mlp), fc2=nn.Linear(mlp, width)))
            for _ in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(width)


class ReferencePretrainTree(nn.Module):
    """Reference-named pretraining module with the shapes of one of our models."""

    def __init__(self, model: nn.Module, queue_size: int) -> None:
        super().__init__()
        vit = model.visual_encoder
        vision, tokens = vit.pos_embed.shape[-1], vit.pos_embed.shape[1]
        patch = vit.patch_embed.proj.kernel_size[0]
        vision_args = (vision, len(vit.blocks), patch, tokens, vit.blocks[0].mlp.fc1.out_features)
        word = model.text.embeddings.word_embeddings.weight
        vocab, width = word.shape
        positions = model.text.embeddings.position_embeddings.weight.shape[0]
        text_args = (vocab, positions, width, model.text.layers[0].ffn.fc1.out_features,
                     len(model.text.layers), vision)  # fmt: skip
        embed = model.vision_proj.out_features

        self.visual_encoder = _ViT(*vision_args)
        self.text_encoder = _bert(*text_args)
        self.vision_proj = nn.Linear(vision, embed)
        self.text_proj = nn.Linear(width, embed)
        self.itm_head = nn.Linear(width, 2)
        self.visual_encoder_m = _ViT(*vision_args)
        self.vision_proj_m = nn.Linear(vision, embed)
        self.text_encoder_m = _bert(*text_args)
        self.text_proj_m = nn.Linear(width, embed)
        self.register_buffer("image_queue", torch.randn(embed, queue_size))
        self.register_buffer("text_queue", torch.randn(embed, queue_size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        predictions = _Group(
            transform=_Group(dense=nn.Linear(width, width), LayerNorm=nn.LayerNorm(width)),
            decoder=nn.Linear(width, vocab, bias=False),
        )
        predictions.bias = nn.Parameter(torch.zeros(vocab))
        predictions.decoder.bias = predictions.bias
        self.text_decoder = _Group(bert=_bert(*text_args), cls=_Group(predictions=predictions))
        predictions.decoder.weight = self.text_decoder.bert.embeddings.word_embeddings.weight
        _tie_all_but_self_attention(self.text_encoder, self.text_decoder.bert)


def _tie_all_but_self_attention(encoder: nn.Module, decoder: nn.Module) -> None:
    """The encoder's modules take the decoder's weight and bias, except under `attention.`."""
    encoder_modules = dict(encoder.named_modules())
    for name, module in decoder.named_modules():
        if ".attention." in f".{name}." or "weight" not in module._parameters:
            continue
        target = encoder_modules[name]
        target.weight = module.weight
        if module._parameters.get("bias") is not None:
            target.bias = module.bias


def shared_groups(state: dict[str, torch.Tensor]) -> set[frozenset[str]]:
    """Key groups of two or more tensors that use one storage."""
    groups: dict[int, set[str]] = {}
    for key, value in state.items():
        groups.setdefault(value.untyped_storage().data_ptr(), set()).add(key)
    return {frozenset(keys) for keys in groups.values() if len(keys) > 1}


def randomised(tree: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and float buffer filled with distinct random values (ties stay ties)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(tree.parameters()) + [
            b for b in tree.buffers() if b.is_floating_point()
        ]:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
        tree.queue_ptr.fill_(4)
    return tree


__all__ = ["ReferencePretrainTree", "randomised", "shared_groups"]
