"""Our pretraining step against the original BLIP code's, in one process, in alternating rounds.

    blip benchmark vs-reference --reference-dir PATH [--image-size 96] [--batch-size 8]
        [--queue-size 57600] [--rounds 3] [--warmup 1] [--steps 2] [--threads 1]
        [--baseline] [--set KEY=VALUE ...] [--json FILE]

PATH is a local checkout of the original code (``models/blip_pretrain.py``, ``configs/``; it
imports timm). Without ``--reference-dir`` nothing is measured (one line, exit 0). Both steps
run ViT-B/16 + the BERT-base MED in fp32 on the CPU, dropout off, from the same weights (ours,
loaded into the original's modules), the same queues and the same batches: our step is the
recipe's (`PretrainStep` as `blip benchmark` builds it, eager fp32), the original's is its
``BLIP_Pretrain.forward`` + backward + AdamW step as its ``train.py`` runs them. It prints the
first step's losses of both (they agree to fp32 rounding), then per step the wall time, CPU time,
system time, page faults and involuntary context switches, and the per-round ratios original /
ours (above 1: ours is faster) of the wall and the CPU time; ``--baseline`` adds the
transformers-composed baseline (`blip benchmark`'s, its own weights) as a third contender;
``--json`` writes all of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from blip_recipes.cli.help import HelpFormatter


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "blip benchmark vs-reference",
                                description=__doc__, formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--reference-dir", default=None,
                   help="checkout of the original BLIP code (models/, configs/)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--queue-size", type=int, default=57600)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (A B, B A, ...)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side and round")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true",
                   help="also time the transformers-composed baseline (its own weights, same sizes)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of our side (repeatable), e.g. optimizer.fused=false")  # fmt: skip
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _ours(args: argparse.Namespace, out_dir: str):
    import torch

    from blip_recipes.benchmarking.inputs import write_bert_layout_vocab
    from blip_recipes.benchmarking.runner import _OursRun
    from blip_recipes.benchmarking.settings import BenchmarkSettings, benchmark_config
    from blip_recipes.benchmarking.variants import parse_variant

    settings = BenchmarkSettings(model="blip_pretrain_base", image_size=args.image_size,
                                 batch_sizes=[args.batch_size], queue_size=args.queue_size,
                                 device="cpu", seed=args.seed, workers=0,
                                 overrides=list(args.overrides))  # fmt: skip
    vocab = write_bert_layout_vocab(out_dir)
    variant = parse_variant("eager-fp32")
    cfg = benchmark_config(settings, variant.for_device("cpu"), args.batch_size, out_dir, vocab,
                           torch.device("cpu"))  # fmt: skip
    return cfg, _OursRun.build(cfg, with_loader=False)


def _baseline_step(cfg, tok, args: argparse.Namespace, batches: list, disable_dropout):
    """The transformers-composed baseline's step (`benchmarking.baseline_hf`), dropout off."""
    import itertools

    import torch

    from blip_recipes.benchmarking.baseline_hf import build_hf_baseline

    baseline = build_hf_baseline(
        "blip_pretrain_base", image_size=args.image_size, queue_size=cfg.momentum.queue_size,
        device=torch.device("cpu"), bf16=False, lr=cfg.optimizer.lr, seed=args.seed,
        vocab_size=tok.vocab_size, embed_dim=cfg.model.embed_dim, pad_token_id=tok.pad_token_id,
        enc_token_id=tok.enc_token_id, dec_token_id=tok.dec_token_id,
    )  # fmt: skip
    disable_dropout(baseline.model)
    cycle = itertools.cycle(batches)
    alpha = cfg.momentum.alpha
    return lambda: baseline.train_step(next(cycle), alpha=alpha)


def run(args: argparse.Namespace, log=print) -> dict:
    """Build both steps, compare their first losses, time them in alternating rounds."""
    import torch

    from blip_recipes.benchmarking.inputs import synthetic_batches
    from blip_recipes.benchmarking.interleaved import StepCost, interleave
    from blip_recipes.benchmarking.reference_code import (
        ReferenceStep,
        build_reference,
        disable_dropout,
        import_reference,
    )
    from blip_recipes.benchmarking.report import environment
    from blip_recipes.data import normalize_images
    from blip_recipes.training.step import DeviceBatch

    torch.set_num_threads(args.threads)
    import_reference(args.reference_dir)  # fail before minutes of building
    with tempfile.TemporaryDirectory(prefix="blip-vs-reference-") as out_dir:
        cfg, ours = _ours(args, out_dir)
        step_fn, tok = ours.step_fn, ours.tokenizer
        disable_dropout(step_fn.model, step_fn.momentum.encoders)
        reference_model = build_reference(
            args.reference_dir, step_fn.model, step_fn.momentum, image_size=args.image_size,
            vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
            enc_token_id=tok.enc_token_id, dec_token_id=tok.dec_token_id,
        )  # fmt: skip
        opt = cfg.optimizer
        reference = ReferenceStep(reference_model, opt.lr, opt.weight_decay, tuple(opt.betas),
                                  opt.eps, cfg.job.seed)  # fmt: skip
        special = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id}
        batches = synthetic_batches(args.batch_size, args.image_size, tok.vocab_size, special,
                                    torch.device("cpu"), seed=args.seed)  # fmt: skip
        alpha = cfg.momentum.alpha
        counters = {"ours": 0, "reference": 0}

        def batch_of(name: str) -> tuple:
            batch = batches[counters[name] % len(batches)]
            images = normalize_images(batch["images"])
            return images, batch["input_ids"], batch["attention_mask"]

        def ours_step() -> tuple[float, float, float]:
            result = step_fn([DeviceBatch(*batch_of("ours"))], counters["ours"], alpha)
            counters["ours"] += 1
            out = result.output
            return float(out.loss_ita), float(out.loss_itm), float(out.loss_lm)

        def reference_step() -> tuple[float, float, float]:
            losses = reference(*batch_of("reference"), counters["reference"], alpha)
            counters["reference"] += 1
            return losses

        first = {}
        for name, fn in (("reference", reference_step), ("ours", ours_step)):
            cost, losses = StepCost.of(fn)
            first[name] = {"losses": dict(zip(("ita", "itm", "lm"), losses)),
                           "cost": cost.__dict__}  # fmt: skip
        diff = max(abs(first["ours"]["losses"][k] - first["reference"]["losses"][k]) /
                   abs(first["reference"]["losses"][k]) for k in ("ita", "itm", "lm"))  # fmt: skip
        log(f"first step losses (ita, itm, lm): reference {first['reference']['losses']}, "
            f"ours {first['ours']['losses']}; largest relative difference {diff:.2e}")  # fmt: skip
        contenders = {"reference": reference_step, "ours": ours_step}
        if args.baseline:
            contenders["baseline"] = _baseline_step(cfg, tok, args, batches, disable_dropout)
        timing = interleave(contenders, args.rounds, args.warmup, args.steps, log)
        ours.close()
    for name, med in timing["median"].items():
        log(f"{name}: median step wall {med['wall_s']:.2f} s, CPU {med['cpu_s']:.2f} s, system "
            f"{med['system_s']:.2f} s, {med['minor_faults']:.0f} page faults")  # fmt: skip
    for name in list(timing["ratio_rounds"])[1:]:
        rounds, ratio = timing["ratio_rounds"][name], timing["ratio"][name]
        log(f"reference / {name} per round: wall " +
            ", ".join(f"{r:.2f}" for r in rounds["wall_s"]) + "; CPU " +
            ", ".join(f"{r:.2f}" for r in rounds["cpu_s"]) +
            f" (median wall {ratio['wall_s']:.2f}, CPU {ratio['cpu_s']:.2f}; above 1: {name} is "
            "faster)")  # fmt: skip
    return {
        "meta": {**vars(args), "environment": environment(torch.device("cpu"))},
        "first_step": first,
        "first_step_largest_relative_loss_difference": diff,
        **timing,
    }


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if not args.reference_dir:
        print("benchmark vs-reference: no --reference-dir given (a checkout of the original BLIP "
              "code); nothing measured")  # fmt: skip
        return 0
    from blip_recipes.benchmarking.reference_code import ReferenceCodeError

    try:
        result = run(args)
    except ReferenceCodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
