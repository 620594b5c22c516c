"""Tensor parallel: split a model over the processes of a group (``mlx.launch``)."""

from __future__ import annotations

from ..cache.shape import attach_shape, read_shape
from ..distributed import Group
from ..errors import GroupError


def shard(model, group: Group) -> None:
    """Split ``model`` over ``group``, tensor parallel, with mlx-lm's own ``model.shard``:
    each rank keeps 1/N of the attention heads (and so the caches of its own kv heads) and
    of the MLP. A model that cannot be split that way is a ``GroupError``. The model's
    shape (``shape_of``) records the group."""
    if group.size == 1:
        return
    arch = type(model).__module__.split(".")[-1]
    if not callable(getattr(model, "shard", None)):
        raise GroupError(f"mlx-lm cannot split {arch} models over processes (they have no "
                         "tensor-parallel shard): run this model in one process")
    args, n = model.args, group.size
    sizes = {"{} query heads": args.num_attention_heads,
             "{} kv heads": args.num_key_value_heads or args.num_attention_heads,
             "an MLP width of {}": getattr(args, "intermediate_size", None) or n}
    bad = [k.format(v) for k, v in sizes.items() if v % n]
    if bad:
        fits = [d for d in range(2, 65) if all(v % d == 0 for v in sizes.values())]
        what = ", ".join(bad[:-1]) + " and " + bad[-1] if len(bad) > 1 else bad[0]
        fix = (f"launch {' or '.join(map(str, fits))} processes (mlx.launch -n)" if fits
               else "it runs in one process only")
        raise GroupError(f"this model's {what} do not divide over {n} processes: {fix}")
    model.shard(group.group)
    attach_shape(model, read_shape(model, group=group))  # this rank's heads, and the group
