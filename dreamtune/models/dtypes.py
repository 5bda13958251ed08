"""The one table from the names users write (train.mixed_precision, export.dtype, --dtype) to torch dtypes."""

from __future__ import annotations

import torch

#: "no" is train.mixed_precision's spelling of full precision.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype for ``name``; an unknown name lists the known ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
