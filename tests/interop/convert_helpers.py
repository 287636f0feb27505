"""Tiny models, inputs and output probes shared by the conversion tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip_recipes.models.row_layout import DECODER_ROWS
from blip_recipes.objectives import pretrain as objective
from tests.models.tiny_blip import DEC_ID, ENC_ID, PAD_ID, SEP_ID, TINY, make_model, make_text

#: Builder arguments that the tensors cannot tell (heads) for the tiny test model.
HEADS = dict(vision_heads=TINY["vision_heads"], text_heads=TINY["text_heads"])


def inputs(batch: int = 3, seed: int = 5):
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids, mask = make_text(batch, seed=seed)
    return images, ids, mask


@torch.no_grad()
def our_outputs(model, images, ids, mask) -> dict[str, torch.Tensor]:
    """ViT tokens, ITC similarities, ITM logits ([ENC] first), LM logits ([DEC] first)."""
    embeds = model.visual_encoder(images)
    image_feat = F.normalize(model.vision_proj(embeds[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(model.text(ids, mask).hidden_states[:, 0]), dim=-1)
    enc = objective.replace_first_token(ids, ENC_ID)
    itm = model.itm_head(model.text(enc, mask, embeds).hidden_states[:, 0])
    dec = objective.replace_first_token(ids, DEC_ID)
    hidden = model.text(dec, mask, embeds, DECODER_ROWS).hidden_states
    lm = model.lm_head(hidden, model.text.embeddings.word_embeddings.weight)
    return {"vision": embeds, "itc": image_feat @ text_feat.t(), "itm": itm, "lm": lm,
            "temp": model.temp.detach().reshape(())}  # fmt: skip


@torch.no_grad()
def hf_outputs(retrieval, captioning, images, ids, mask) -> dict[str, torch.Tensor]:
    """The same probes computed with transformers' BLIP models."""
    out = {}
    if retrieval is not None:
        out["vision"] = retrieval.vision_model(pixel_values=images).last_hidden_state
        itc = retrieval(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False)
        out["itc"] = itc.itm_score
        enc = objective.replace_first_token(ids, ENC_ID)
        out["itm"] = retrieval(input_ids=enc, pixel_values=images, attention_mask=mask).itm_score
    if captioning is not None:
        embeds = captioning.vision_model(pixel_values=images).last_hidden_state
        out.setdefault("vision", embeds)
        dec = objective.replace_first_token(ids, DEC_ID)
        out["lm"] = captioning.text_decoder(
            input_ids=dec, attention_mask=mask, encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        ).logits  # fmt: skip
    return out


def assert_outputs_close(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    keys = set(ours) & set(theirs)
    assert keys, "nothing to compare"
    for key in sorted(keys):
        torch.testing.assert_close(
            ours[key], theirs[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )


def hf_pair(seed: int = 7, vision_eps: float | None = None):
    """Random transformers BLIP retrieval + captioning models sharing one config (and ViT)."""
    import transformers

    from blip_recipes.interop import hf_blip_config

    template = make_model(seed=seed)
    config = hf_blip_config(template, label_smoothing=0.1, sep_token_id=SEP_ID, eos_token_id=SEP_ID)
    if vision_eps is not None:
        config.vision_config.layer_norm_eps = vision_eps
    torch.manual_seed(seed)
    retrieval = transformers.BlipForImageTextRetrieval(config).eval()
    captioning = transformers.BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in retrieval.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for p in captioning.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        captioning.vision_model.load_state_dict(retrieval.vision_model.state_dict())
        # the text tensors both models share in BLIP (all but the self-attention)
        enc, dec = retrieval.text_encoder.state_dict(), captioning.text_decoder.bert.state_dict()
        shared = {k: v for k, v in enc.items() if ".attention." not in k and k in dec}
        captioning.text_decoder.bert.load_state_dict(shared, strict=False)
    captioning.tie_weights()
    return retrieval, captioning


__all__ = ["DEC_ID", "ENC_ID", "HEADS", "PAD_ID", "SEP_ID", "TINY", "make_model"]
