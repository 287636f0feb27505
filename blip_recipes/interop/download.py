"""Pretrained weights onto local disk: ``blip download NAME [--dir pretrained]``.

Every asset is a Hugging Face Hub repository fetched with ``huggingface_hub.snapshot_download``
(the optional ``hub`` extra: ``pip install 'blip-recipes[hub]'``) into ``<dir>/<NAME>``, which is
the path the shipped configs point at. Only the files the recipes read are fetched (safetensors
weights, configs, tokenizer files), never the duplicate PyTorch / TensorFlow / Flax copies.

The recipes themselves never download anything: they read these local folders.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = "pretrained"

_TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
_HF_MODEL_FILES = [
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    *_TOKENIZER_FILES,
]


@dataclass(frozen=True)
class Asset:
    """One downloadable folder."""

    name: str
    """Folder name under the download dir and the argument of ``blip download``."""
    repo_id: str
    """Hugging Face Hub repository."""
    files: tuple[str, ...]
    """Files (glob patterns) fetched from it."""
    use: str
    """What it is for (shown by ``blip download --list``)."""
    size: str
    """Approximate download size."""


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("bert-base-uncased", "google-bert/bert-base-uncased",
              ("config.json", "model.safetensors", *_TOKENIZER_FILES),
              "text encoder/decoder init + tokenizer (model.text_init, tokenizer.path)", "440 MB"),
        Asset("deit-base-patch16-224", "timm/deit_base_patch16_224.fb_in1k",
              ("config.json", "model.safetensors"),
              "ViT-B/16 init of blip_pretrain_base: DeiT-B/16, the reference's "
              "deit_base_patch16_224-b5f2ef4d.pth (model.vision_init)", "350 MB"),
        Asset("vit-large-patch16-224", "timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
              ("config.json", "model.safetensors"),
              "ViT-L/16 init of blip_pretrain_large: ImageNet-21k pretrained, 224 px, timm "
              "layout like the reference's jx_vit_large_p16_224 (model.vision_init)", "1.2 GB"),
        Asset("blip-itm-base-coco", "Salesforce/blip-itm-base-coco", tuple(_HF_MODEL_FILES),
              "released BLIP ViT-B retrieval model, COCO fine-tuned, 384 px (eval.checkpoint, "
              "checkpoint.init_from after tools/convert_checkpoint.py)", "900 MB"),
        Asset("blip-itm-large-coco", "Salesforce/blip-itm-large-coco", tuple(_HF_MODEL_FILES),
              "released BLIP ViT-L retrieval model, COCO fine-tuned, 384 px", "1.8 GB"),
        Asset("blip-itm-base-flickr", "Salesforce/blip-itm-base-flickr", tuple(_HF_MODEL_FILES),
              "released BLIP ViT-B retrieval model, Flickr30k fine-tuned, 384 px", "900 MB"),
        Asset("blip-image-captioning-base", "Salesforce/blip-image-captioning-base",
              tuple(_HF_MODEL_FILES), "released BLIP ViT-B captioning model, 384 px", "990 MB"),
        Asset("blip-image-captioning-large", "Salesforce/blip-image-captioning-large",
              tuple(_HF_MODEL_FILES), "released BLIP ViT-L captioning model, 384 px", "1.9 GB"),
    ]
}  # fmt: skip

INSTALL_HINT = (
    "downloading needs huggingface_hub: pip install 'blip-recipes[hub]' "
    "(or pip install huggingface_hub)"
)


class DownloadError(Exception):
    """A download that cannot start or did not finish; printed as one line."""


def download_command(name: str, folder: str | Path | None = None) -> str:
    """The command line that fetches asset ``name`` (into ``folder``'s parent when it is not
    the default ``pretrained/<name>``)."""
    parent = Path(folder).parent if folder is not None else Path(DEFAULT_DIR)
    extra = "" if parent == Path(DEFAULT_DIR) else f" --dir {parent}"
    return f"blip download {name}{extra}"


def asset_for_path(path: str | Path) -> Asset | None:
    """The known asset whose folder ``path`` is (by its last component), if any."""
    return ASSETS.get(Path(path).name)


def download(name: str, dest_dir: str | Path = DEFAULT_DIR, revision: str | None = None) -> Path:
    """Fetch asset ``name`` into ``dest_dir/name`` and return that folder.

    Files already present and complete are not fetched again (huggingface_hub checks them).

    Raises:
        DownloadError: unknown name, huggingface_hub missing, or the download failed.
    """
    if name not in ASSETS:
        raise DownloadError(f"unknown asset '{name}'; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DownloadError(INSTALL_HINT) from None
    target = Path(dest_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            repo_id=asset.repo_id,
            revision=revision,
            local_dir=str(target),
            allow_patterns=list(asset.files),
        )
    except Exception as e:  # noqa: BLE001 - network, auth, disk: one line for the user
        raise DownloadError(
            f"downloading {asset.repo_id} into {target} failed: {type(e).__name__}: {e}"
        ) from None
    if not any(target.glob("*.safetensors")) and not (target / "vocab.txt").is_file():
        raise DownloadError(
            f"{asset.repo_id}: nothing usable arrived in {target} (no safetensors weights)"
        )
    return target


def list_text() -> str:
    """The ``blip download --list`` table."""
    width = max(len(n) for n in ASSETS) + 2
    lines = [f"{'NAME':<{width}}{'SIZE':<8}SOURCE / USE"]
    for a in ASSETS.values():
        lines.append(f"{a.name:<{width}}{a.size:<8}{a.repo_id}")
        lines.append(f"{'':<{width}}{'':<8}{a.use}")
    return "\n".join(lines)


HELP = f"""usage: blip download NAME [NAME ...] [--dir DIR] [--revision REV]
       blip download --list

Fetch pretrained weights from the Hugging Face Hub into DIR/NAME (default DIR: {DEFAULT_DIR}/,
the folder the shipped configs read). Needs the optional extra: pip install 'blip-recipes[hub]'.
Honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE as huggingface_hub does.

  base.toml:  blip download bert-base-uncased deit-base-patch16-224
  large.toml: blip download bert-base-uncased vit-large-patch16-224
"""


def main(args: list[str]) -> int:
    """``blip download`` (exit 0 on success, 1 on a failed download, 2 on usage errors)."""
    if not args or "-h" in args or "--help" in args:
        print(HELP + "\n" + list_text())
        return 0 if args else 2
    if "--list" in args:
        print(list_text())
        return 0
    dest, revision, names = DEFAULT_DIR, None, []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, inline = arg.partition("=")
        if key in ("--dir", "--revision"):
            if eq:
                value = inline
            elif i + 1 < len(args):
                value, i = args[i + 1], i + 1
            else:
                print(f"blip download: {key} needs a value", file=sys.stderr)
                return 2
            if key == "--dir":
                dest = value
            else:
                revision = value
        elif arg.startswith("-"):
            print(f"blip download: unknown flag '{arg}'", file=sys.stderr)
            return 2
        else:
            names.append(arg)
        i += 1
    unknown = [n for n in names if n not in ASSETS]
    if unknown or not names:
        what = f"unknown asset(s) {', '.join(unknown)}" if unknown else "missing NAME"
        hub = [n for n in unknown if "/" in n]
        if hub:  # a hub id (org/name): say which short name fetches it, if one does
            known = {a.repo_id: short for short, a in ASSETS.items()}
            hint = "; ".join(
                f"{n} is `blip download {known[n]}`" if n in known else f"{n} is not a known asset"
                for n in hub
            )
            what += f" (names here are short names, not hub ids: {hint})"
        print(
            f"blip download: {what}; `blip download --list` shows the known ones", file=sys.stderr
        )
        return 2
    for name in names:
        print(f"downloading {ASSETS[name].repo_id} -> {Path(dest) / name}", flush=True)
        try:
            folder = download(name, dest, revision)
        except DownloadError as e:
            print(f"blip download: {e}", file=sys.stderr)
            return 1
        print(f"ok: {folder}")
    return 0


__all__ = [
    "ASSETS",
    "Asset",
    "DEFAULT_DIR",
    "DownloadError",
    "asset_for_path",
    "download",
    "download_command",
    "main",
]
