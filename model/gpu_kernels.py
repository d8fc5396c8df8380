"""Which ops of a TensorFlow graph would leave a GPU, read from TensorFlow's kernel registry (no GPU needed).

`tensorflow.python.framework.kernels.get_registered_kernels_for_op` lists every kernel of an op with its
device, its type constraints and its `host_memory_arg`s: the arguments the GPU kernel reads or writes in host
memory. An op without a GPU kernel for its dtypes runs on the CPU (its inputs copied over and back); a kernel
that keeps an image-sized argument in host memory copies the batch GPU -> host -> GPU. Small host-memory
arguments (shapes, axes, seeds) are how TensorFlow's GPU kernels normally take them. Kernels registered for
DEVICE_DEFAULT (variable reads, some int32 shape ops) run on every device, a GPU too. Used by the tests of the
augmentation layer and by `hpa-doctor` on the whole training step.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework import kernels

NO_KERNEL_NEEDED = {"Placeholder", "Const", "NoOp", "Identity", "VarHandleOp"}


def _arg_tensors(op, args, tensors) -> dict[str, list]:
    """{argument name: its tensors} for an op's input or output arguments (list arguments expanded)."""
    out, i = {}, 0
    for arg in args:
        if arg.number_attr:
            n = op.get_attr(arg.number_attr)
        elif arg.type_list_attr:
            n = len(op.get_attr(arg.type_list_attr))
        else:
            n = 1
        out[arg.name] = list(tensors[i : i + n])
        i += n
    return out


def _matches(kernel, op) -> bool:
    for c in kernel.constraint:
        try:
            value = op.get_attr(c.name)
        except ValueError:
            return False
        if tf.as_dtype(value).as_datatype_enum not in c.allowed_values.list.type:
            return False
    return True


def _per_sample_elements(t) -> float:
    """Elements per sample of a tensor (all dims after the first; an unknown one counts as unbounded)."""
    dims = t.shape.as_list() if t.shape.rank is not None else None
    if dims is None:
        return float("inf")
    if not dims:
        return 1.0  # a scalar
    if len(dims) == 1:
        return float("inf") if dims[0] is None else float(dims[0])
    per = 1.0
    for d in dims[1:]:
        per *= float("inf") if d is None else d
    return per


def gpu_problems(graph, image_elements: int) -> list[str]:
    """Ops without a GPU kernel for their dtypes, or whose GPU kernel keeps image-sized data on the host."""
    problems = []
    for op in graph.get_operations():
        if op.type in NO_KERNEL_NEEDED:
            continue
        gpu = [
            k
            for k in kernels.get_registered_kernels_for_op(op.type).kernel
            if k.device_type in ("GPU", "DEFAULT")
        ]
        found = [k for k in gpu if _matches(k, op)]
        if not found:
            problems.append(f"{op.type} ({op.name}): no GPU kernel for its dtypes")
            continue
        args = _arg_tensors(op, op.op_def.input_arg, op.inputs)
        args.update(_arg_tensors(op, op.op_def.output_arg, op.outputs))
        for name in found[0].host_memory_arg:
            for t in args.get(name, []):
                if t.dtype.is_integer and t.shape.rank is not None and t.shape.rank <= 1:
                    continue  # shapes, axes, indices of a reduction: metadata, not the batch
                if _per_sample_elements(t) < image_elements:
                    continue  # per-sample rows smaller than an image plane (labels, indices [B, classes])
                problems.append(
                    f"{op.type} ({op.name}): GPU kernel keeps {name} {t.shape} {t.dtype.name} on host"
                )
    return problems


