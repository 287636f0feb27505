"""The momentum state: EMA encoders + feature queues + pointer, one `Stateful` for DCP.

Per step (reference order): `update(online)` (EMA, shard-local, no communication), then
`targets(images, ids, mask)` (momentum features + queue snapshot), the online forward/backward,
then `enqueue(targets)` (one all-gather over the data-parallel group it was given). Queues are
replicated fp32 tensors, seeded identically on every rank, never broadcast.

Optionally (`track_ids=True`, retrieval fine-tuning) an int64 id queue (Q,) stores the image id
of every queued pair, enqueued with the features, so that queued captions of the same image
count as positives. It starts at `UNKNOWN_ID` (matches no real id), is checkpointed under
`id_queue`, and may be absent from a checkpoint written without it (then it keeps its value).
Without `track_ids` nothing changes: same queues, same collectives, same checkpoint keys.

The momentum modules (`encoders`, also reachable as `.visual_encoder`, `.text_encoder`, ...) are
sharded by the recipe exactly like the online ones; the EMA then pairs local shards directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from blip_recipes.models.blip import MomentumTargets
from blip_recipes.models.builders import build_momentum_encoders, preset_queue_size
from blip_recipes.models.momentum_encoders import ONLINE_PREFIX_OF, MomentumEncoders
from blip_recipes.parallel.fsdp import reshard_all

UNKNOWN_ID = -100
"""Id of queue entries that carry no image id (fresh or pretraining queues): never a real id."""

_WRAPPER_TOKENS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


# torch >= 2.10 names the one-tensor all-gather all_gather_single (all_gather_into_tensor then
# warns that it is deprecated); older releases only have all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_queue_batch(queue_size: int, batch_size: int, world_size: int = 1) -> None:
    """Raise ValueError unless the global batch B * W divides the queue size Q.

    Call at start-up: the reference asserts this mid-run, after hours of training.
    """
    global_batch = batch_size * world_size
    if global_batch <= 0 or queue_size % global_batch != 0:
        raise ValueError(
            f"queue size {queue_size} is not a multiple of the global batch {global_batch} "
            f"(batch {batch_size} x world size {world_size}); pick a queue size divisible by it"
        )


def _canonical(name: str) -> str:
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def paired_parameters(
    encoders: nn.Module, online: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Momentum parameters and the online parameters they follow, in matching order.

    Names are compared after removing activation-checkpoint / compile wrapper prefixes, so the
    online model may be wrapped differently from the momentum one. Every momentum parameter
    must have an online partner of the same shape.
    """
    online_params = {_canonical(n): p for n, p in online.named_parameters()}
    momentum_list, online_list = [], []
    for name, param in encoders.named_parameters():
        name = _canonical(name)
        top, _, rest = name.partition(".")
        online_name = f"{ONLINE_PREFIX_OF.get(top, top)}.{rest}"
        partner = online_params.get(online_name)
        if partner is None:
            raise KeyError(f"momentum parameter {name} has no online partner {online_name}")
        if partner.shape != param.shape:
            raise ValueError(
                f"{name}: momentum {tuple(param.shape)} vs online {tuple(partner.shape)}"
            )
        momentum_list.append(param)
        online_list.append(partner)
    return momentum_list, online_list


class MomentumState(Stateful):
    """EMA encoders, image/text queues (E, Q) and the queue pointer.

    Args:
        encoders: momentum encoders (from `build_momentum_encoders`, same preset as online).
        queue_size: Q.
        embed_dim: E.
        decay: EMA factor d in `p_m = d * p_m + (1 - d) * p` (0.995, `momentum.decay`).
        train_mode: keep dropout / drop-path active in the momentum forward (reference: True).
        seed: seed of the queue initialisation (identical on every rank).
        device: device of the queues.
        group: every data-parallel rank (`DistInfo.dp_group`): the queues gather the momentum
            features of all of them each step. None = one process.
        track_ids: also keep an int64 image-id queue `id_queue` (Q,), filled by
            `enqueue(..., ids=...)` (retrieval fine-tuning); None of this exists otherwise.
    """

    def __init__(
        self,
        encoders: MomentumEncoders,
        queue_size: int,
        embed_dim: int,
        decay: float = 0.995,
        train_mode: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
        track_ids: bool = False,
    ) -> None:
        self.encoders = encoders
        self.group = group
        self.queue_size = queue_size
        self.decay = decay
        self.train_mode = train_mode
        generator = torch.Generator().manual_seed(seed)
        queues = torch.randn(2, embed_dim, queue_size, generator=generator)
        queues = torch.nn.functional.normalize(queues, dim=1).to(device)
        self.image_queue = queues[0].clone()
        self.text_queue = queues[1].clone()
        self.queue_ptr = torch.zeros(1, dtype=torch.long, device=device)
        self.id_queue: torch.Tensor | None = None
        if track_ids:
            self.id_queue = torch.full((queue_size,), UNKNOWN_ID, dtype=torch.long, device=device)

    @classmethod
    def build(
        cls,
        name: str,
        decay: float = 0.995,
        train_mode: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
        track_ids: bool = False,
        **model_overrides: Any,
    ) -> MomentumState:
        """Momentum state for `build_model(name, **model_overrides)` (queue_size included)."""
        encoders = build_momentum_encoders(name, **model_overrides)
        queue_size = preset_queue_size(name, **model_overrides)
        return cls(
            encoders,
            queue_size,
            encoders.vision_proj.out_features,
            decay=decay,
            train_mode=train_mode,
            seed=seed,
            device=device,
            group=group,
            track_ids=track_ids,
        )

    @property
    def visual_encoder(self) -> nn.Module:
        return self.encoders.visual_encoder

    @property
    def text_encoder(self) -> nn.Module:
        return self.encoders.text_encoder

    @property
    def vision_proj(self) -> nn.Module:
        return self.encoders.vision_proj

    @property
    def text_proj(self) -> nn.Module:
        return self.encoders.text_proj

    def to(self, device: torch.device | str) -> MomentumState:
        """Move the encoders (unsharded use) and the queues to `device`."""
        self.encoders.to(device)
        self.image_queue = self.image_queue.to(device)
        self.text_queue = self.text_queue.to(device)
        self.queue_ptr = self.queue_ptr.to(device)
        if self.id_queue is not None:
            self.id_queue = self.id_queue.to(device)
        return self

    @torch.no_grad()
    def copy_from(self, online: nn.Module) -> None:
        """Set every momentum parameter to its online partner (after the weights are loaded)."""
        momentum_params, online_params = paired_parameters(self.encoders, online)
        for momentum_param, online_param in zip(momentum_params, online_params):
            momentum_param.copy_(online_param)  # DTensor has no _foreach_copy_ strategy

    def _pairs(self, online: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`paired_parameters`, matched by name once per online model, not every step."""
        if getattr(self, "_paired_with", None) is not online:
            self._paired = paired_parameters(self.encoders, online)
            self._paired_with = online
        return self._paired

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """EMA step `p_m <- m * p_m + (1 - m) * p` with one `_foreach_lerp_` (buffers untouched).

        Works on FSDP2 DTensor parameters when online and momentum are sharded the same way.
        """
        momentum_params, online_params = self._pairs(online)
        online_params = [p.to(m.dtype) if p.dtype != m.dtype else p for m, p in
                         zip(momentum_params, online_params)]  # fmt: skip
        torch._foreach_lerp_(momentum_params, online_params, 1.0 - self.decay)

    @torch.no_grad()
    def targets(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> MomentumTargets:
        """Momentum features of the batch and the current queues (call after `update`).

        Args:
            images: (B, 3, H, W) normalised.
            input_ids: (B, L) with [CLS] first.
            attention_mask: (B, L).

        Returns:
            `MomentumTargets`; the queues are the live buffers (read before `enqueue`).
        """
        self.encoders.train(self.train_mode)
        image_feat_m, text_feat_m = self.encoders(images, input_ids, attention_mask)
        reshard_all(self.encoders)  # no backward follows: free what FSDP2 gathered
        return MomentumTargets(image_feat_m, text_feat_m, self.image_queue, self.text_queue)

    @torch.no_grad()
    def enqueue(
        self,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        valid: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> None:
        """Write the global batch's momentum features at the pointer and advance it.

        Args:
            image_feat_m, text_feat_m: (B, E) local momentum features. With a data-parallel
                group of W > 1 ranks they are all-gathered (rank order) into (B * W, E) first.
            valid: optional 0-d bool tensor; when False the queues and pointer stay as they are
                (a skipped step), decided on the device without a host sync.
            ids: (B,) int64 image ids of the local batch, gathered in the same rank order into
                `id_queue`; required exactly when the state tracks ids.

        Raises:
            ValueError: when B * W does not divide Q, or `ids` is given without `track_ids`
                (or missing with it).
        """
        if (ids is None) != (self.id_queue is None):
            raise ValueError(
                "enqueue: ids are needed exactly when the momentum state tracks ids "
                f"(track_ids={self.id_queue is not None}, ids given: {ids is not None})"
            )
        world = dist.get_world_size(self.group) if self.group is not None else 1
        batch = image_feat_m.shape[0]
        check_queue_batch(self.queue_size, batch, world)
        feats = torch.stack([image_feat_m, text_feat_m]).to(self.image_queue.dtype)  # (2, B, E)
        if world > 1:
            gathered = feats.new_empty((world * 2, *feats.shape[1:]))  # rank-major (W*2, B, E)
            _all_gather_single(gathered, feats.contiguous(), group=self.group)
            feats = gathered.view(world, 2, batch, -1).transpose(0, 1).reshape(2, world * batch, -1)
        # Modulo the queue size: a checkpoint saved with another global batch can leave the
        # pointer off a multiple of this one; the write then wraps around the end like any
        # ring buffer (the oldest entries are replaced first, as always).
        columns = (
            self.queue_ptr + torch.arange(world * batch, device=self.queue_ptr.device)
        ) % self.queue_size
        step = world * batch
        if valid is not None:
            keep_old = ~valid.to(torch.bool)
            feats = torch.where(
                keep_old,
                torch.stack([self.image_queue[:, columns].t(), self.text_queue[:, columns].t()]),
                feats,
            )
            step = step * valid.to(self.queue_ptr.dtype)
        self.image_queue.index_copy_(1, columns, feats[0].t())
        self.text_queue.index_copy_(1, columns, feats[1].t())
        if ids is not None:
            self._enqueue_ids(ids, columns, world, valid)
        self.queue_ptr.copy_((self.queue_ptr + step) % self.queue_size)

    def _enqueue_ids(
        self,
        ids: torch.Tensor,
        columns: torch.Tensor,
        world: int,
        valid: torch.Tensor | None,
    ) -> None:
        """Write the global batch's ids (rank order, as the features) at `columns`."""
        assert self.id_queue is not None
        ids = ids.reshape(-1).to(device=self.id_queue.device, dtype=torch.long)
        if world > 1:
            gathered = ids.new_empty(world * ids.shape[0])
            _all_gather_single(gathered, ids.contiguous(), group=self.group)
            ids = gathered
        if valid is not None:
            ids = torch.where(valid.to(torch.bool), ids, self.id_queue[columns])
        self.id_queue.index_copy_(0, columns, ids)

    def state_dict(self) -> dict[str, Any]:
        """Momentum weights (DCP model state dict, sharded if FSDP2), queues and pointer (and
        the id queue when the state tracks ids)."""
        state = {
            "encoders": get_model_state_dict(self.encoders),
            "image_queue": self.image_queue,
            "text_queue": self.text_queue,
            "queue_ptr": self.queue_ptr,
        }
        if self.id_queue is not None:
            state["id_queue"] = self.id_queue
        return state

    def optional_keys(self) -> list[str]:
        """Keys a checkpoint may lack: the id queue (checkpoints written without ids)."""
        return ["id_queue"] if self.id_queue is not None else []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore weights, queues and pointer (in place; shapes must match). A missing
        `id_queue` leaves the id queue as it is."""
        set_model_state_dict(
            self.encoders, state_dict["encoders"], options=StateDictOptions(strict=True)
        )
        with torch.no_grad():
            self.image_queue.copy_(state_dict["image_queue"])
            self.text_queue.copy_(state_dict["text_queue"])
            self.queue_ptr.copy_(state_dict["queue_ptr"])
            if self.id_queue is not None and "id_queue" in state_dict:
                self.id_queue.copy_(state_dict["id_queue"])
