"""Everything between files on disk and a batch on the device.

Public surface (what recipes use):

- :func:`build_tokenizer` (``[tokenizer]`` section) -> :class:`Tokenizer`
- :func:`build_train_loader` (``[data]`` section) -> infinite, resumable iterator of
  ``{"images": uint8 (B,3,s,s), "input_ids": int64 (B,L), "attention_mask": int64 (B,L),
  "image_ids": int64 (B,)}`` over map-style sources (:class:`TrainLoader`, a ``torchdata.nodes``
  graph), tar shards (``ShardLoader``) or both mixed by weight (``MixedLoader``)
- :data:`IMAGE_MEAN`, :data:`IMAGE_STD`, :func:`normalize_images` (on the device)
- :func:`build_train_transform`, :func:`build_eval_transform`, :func:`load_retrieval_annotations`
- :func:`pre_caption`, :func:`synthetic_sample`
"""

from blip_recipes.data.captions import pre_caption
from blip_recipes.data.loader import TrainLoader, build_train_loader
from blip_recipes.data.samples import BadSampleError
from blip_recipes.data.sources import (
    AnnotationError,
    JsonlSource,
    JsonSource,
    load_retrieval_annotations,
)
from blip_recipes.data.synthetic import SyntheticSource, synthetic_sample
from blip_recipes.data.tokenizers import (
    BPETokenizer,
    Tokenizer,
    WordPieceTokenizer,
    build_tokenizer,
    read_tiktoken_ranks,
)
from blip_recipes.data.transforms import (
    IMAGE_MEAN,
    IMAGE_STD,
    BadImage,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    open_image,
)

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "AnnotationError",
    "BPETokenizer",
    "BadImage",
    "BadSampleError",
    "JsonSource",
    "JsonlSource",
    "SyntheticSource",
    "Tokenizer",
    "TrainLoader",
    "WordPieceTokenizer",
    "build_eval_transform",
    "build_tokenizer",
    "build_train_loader",
    "build_train_transform",
    "load_retrieval_annotations",
    "normalize_images",
    "open_image",
    "pre_caption",
    "read_tiktoken_ranks",
    "synthetic_sample",
]
