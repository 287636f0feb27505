"""Caption images with a BLIP checkpoint (greedy, beam search or nucleus sampling).

    blip caption outputs/blip_base cat.jpg dog.png --tokenizer pretrained/bert-base-uncased
    blip caption hf_blip/captioning *.jpg --method nucleus --top-p 0.9 --seed 0

CHECKPOINT: a DCP checkpoint of blip_pretrain (or a run folder: its best/ weights when it has
them, else its newest step; the checkpoint used is named on stderr), a reference BLIP .pth, a
Hugging Face BLIP folder (captioning, or one holding retrieval + captioning), or a consolidated
.pt / .safetensors. Prints one `path<TAB>caption` line per image (`--json` for JSON lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from blip_recipes.cli.help import HelpFormatter


def run_checkpoint(path: str) -> str:
    """``path``, or for a run folder the checkpoint to caption with: its ``best/`` weights (what
    fine-tuning kept by validation score) when complete, else its newest complete step."""
    from blip_recipes.interop.files import latest_dcp_step

    folder = Path(path)
    if not folder.is_dir() or (folder / ".metadata").is_file():
        return path
    chosen = latest_dcp_step(folder / "best") or latest_dcp_step(folder)
    return str(chosen) if chosen is not None else path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("checkpoint", help="model to caption with")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--tokenizer", help="wordpiece vocab.txt / folder (default: the one "
                        "recorded with the checkpoint)")  # fmt: skip
    parser.add_argument(
        "--tokenizer-kind",
        default="wordpiece",
        choices=["wordpiece", "bpe", "synthetic"],
        help="tokenizer kind",
    )
    parser.add_argument("--method", default="beam", choices=["greedy", "beam", "nucleus"],
                        help="decoding")  # fmt: skip
    parser.add_argument(
        "--prompt",
        default="a picture of ",
        help='decoder prompt ("" for none; default: "a picture of ")',
    )
    parser.add_argument("--num-beams", type=int, default=3, help="beams (beam search)")
    parser.add_argument("--max-length", type=int, default=30, help="tokens, prompt included")
    parser.add_argument("--min-length", type=int, default=5, help="tokens, prompt included")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (nucleus)")
    parser.add_argument("--top-k", type=int, default=50, help="candidates kept (nucleus)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="1.0 (beam, greedy) / 1.1 (nucleus) when unset, as the reference")  # fmt: skip
    parser.add_argument("--image-size", type=int, help="input side (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (nucleus)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available")  # fmt: skip
    parser.add_argument("--model", help="builder preset for what the checkpoint shapes cannot tell")
    parser.add_argument("--json", action="store_true", help="print JSON lines {image, caption}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    import torch

    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer
    from blip_recipes.evaluation.generation import caption_images
    from blip_recipes.interop.files import CheckpointLayoutError
    from blip_recipes.interop.loading import build_model_from_weights, tokenizer_from_weights
    from blip_recipes.interop.readers import read_weights

    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        print(f"error: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        source = run_checkpoint(args.checkpoint)
        if source != args.checkpoint:
            print(f"blip caption: using {source}", file=sys.stderr)
        weights = read_weights(source)
        if args.tokenizer or args.tokenizer_kind != "wordpiece":
            cfg = TokenizerConfig(kind=args.tokenizer_kind, path=args.tokenizer)
            tokenizer = build_tokenizer(cfg)
        else:
            tokenizer = tokenizer_from_weights(weights)
        if tokenizer is None:
            raise ValueError(
                f"no tokenizer recorded with {args.checkpoint} that can be built here: pass "
                "--tokenizer PATH (bert-base-uncased vocab.txt or tokenizer folder)"
            )
        model = build_model_from_weights(weights, args.model, tokenizer)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        penalty = args.repetition_penalty
        if penalty is None:
            penalty = 1.1 if args.method == "nucleus" else 1.0
        captions = caption_images(
            model, tokenizer, args.images, prompt=args.prompt, method=args.method,
            image_size=args.image_size, batch_size=args.batch_size, num_beams=args.num_beams,
            max_length=args.max_length, min_length=args.min_length, top_p=args.top_p,
            top_k=args.top_k, repetition_penalty=penalty,
            generator=torch.Generator(device=device).manual_seed(args.seed),
        )  # fmt: skip
    except (CheckpointLayoutError, FileNotFoundError, ValueError) as e:  # BadImage is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path, caption in zip(args.images, captions):
        print(
            json.dumps({"image": path, "caption": caption}) if args.json else f"{path}\t{caption}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
