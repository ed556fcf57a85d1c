"""generative-recommenders' PyTorch HSTU reference (``pytorch_hstu_mha``), from a checkout of theirs.

Their reference pads jagged tensors with fbgemm's ``jagged_to_padded_dense`` / ``dense_to_jagged``;
fbgemm does not install here, so :func:`load` first defines those two ops in plain PyTorch (padding
and unpadding only: the attention maths stays theirs). Point ``OMNIATTN_GR_PATH`` at the checkout
(the folder holding ``generative_recommenders/``). No code of theirs is part of this repository.
"""

from __future__ import annotations

import os
import sys

import torch

ENV = "OMNIATTN_GR_PATH"
_lib = None


def _define_fbgemm_ops() -> None:
    global _lib
    if _lib is not None or hasattr(torch.ops.fbgemm, "jagged_to_padded_dense"):
        return
    _lib = torch.library.Library("fbgemm", "DEF")
    _lib.define("jagged_to_padded_dense(Tensor values, Tensor[] offsets, SymInt[] max_lengths, float padding_value=0.0) -> Tensor")
    _lib.define("dense_to_jagged(Tensor dense, Tensor[] x_offsets, SymInt? total_L=None) -> (Tensor, Tensor[])")

    def to_padded(values, offsets, max_lengths, padding_value=0.0):
        off, n = offsets[0].long(), max_lengths[0]
        out = values.new_full((off.numel() - 1, n, values.shape[1]), padding_value)
        for b in range(off.numel() - 1):
            length = min(int(off[b + 1] - off[b]), n)
            out[b, :length] = values[int(off[b]) : int(off[b]) + length]
        return out

    def to_jagged(dense, x_offsets, total_L=None):
        off = x_offsets[0].long()
        return torch.cat([dense[b, : int(off[b + 1] - off[b])] for b in range(off.numel() - 1)]), [x_offsets[0]]

    _lib.impl("jagged_to_padded_dense", to_padded, "CompositeImplicitAutograd")
    _lib.impl("dense_to_jagged", to_jagged, "CompositeImplicitAutograd")


def load(path: str | None = None):
    """Their ``pytorch_hstu_mha``, or None when no checkout is configured."""
    path = path or os.environ.get(ENV)
    if not path or not os.path.isdir(os.path.join(path, "generative_recommenders")):
        return None
    _define_fbgemm_ops()
    if path not in sys.path:
        sys.path.insert(0, path)
    from generative_recommenders.ops.pytorch.pt_hstu_attention import pytorch_hstu_mha

    return pytorch_hstu_mha
