"""Communication between the processes of data-parallel training on torch.

`torch.distributed` is used as `torchrun` sets it up: one process per
device, each reading its own shard of the data. Each helper sends one
message per call and per dtype, whatever the number of tensors.
"""

import torch
import torch.distributed as dist


def process_count():
    """The number of processes that train together: 1 without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _counting_device():
    """Where the helpers' own integer tensors live: NCCL exchanges CUDA ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchanged(tensors, exchange):
    """Runs `exchange` in place on the tensors, one flat buffer per dtype.

    Returns:
        The exchanged tensors (detached), in the order and shapes given.
    """
    tensors = list(tensors)
    groups = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(index)
    results = [None] * len(tensors)
    for indices in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
        exchange(flat)
        pieces = torch.split(flat, [tensors[i].numel() for i in indices])
        for i, piece in zip(indices, pieces):
            results[i] = piece.reshape(tensors[i].shape)
    return results


def sum_over_processes(tensors):
    """Returns each tensor summed over the processes (detached)."""
    return _exchanged(tensors, dist.all_reduce)


def copy_from_first_process(variables):
    """Assigns every process's `variables` the values of process 0's."""
    values = _exchanged(
        [v.value for v in variables], lambda flat: dist.broadcast(flat, src=0)
    )
    for variable, value in zip(variables, values):
        variable.assign(value)


def gather_over_processes(tensors, axis):
    """Concatenates each tensor along `axis` over the processes, in rank order.

    The processes may hold different sizes along `axis` (the last batch of
    an epoch); every other dimension must agree.

    Returns:
        `(gathered, start, size)`: the concatenated tensors (detached), and
        where this process's part lies along `axis`.
    """
    size = tensors[0].shape[axis]
    device = _counting_device()
    sizes = [
        torch.zeros((), dtype=torch.int64, device=device)
        for _ in range(process_count())
    ]
    dist.all_gather(sizes, torch.tensor(size, dtype=torch.int64, device=device))
    sizes = [int(s) for s in sizes]
    largest = max(sizes)
    gathered = []
    for tensor in tensors:
        tensor = tensor.detach().movedim(axis, 0)
        padded = torch.zeros(
            (largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
        )
        padded[:size] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        whole = torch.cat([part[:count] for part, count in zip(parts, sizes)])
        gathered.append(whole.movedim(0, axis))
    return gathered, sum(sizes[: dist.get_rank()]), size


def sum_scattered(matrix):
    """Sums a `(T, P)` matrix over the processes; returns this process's columns.

    Each process receives the sum of its own contiguous slice of the
    columns, about P / R of them (the last slices padded with zero
    columns), for `(T P) (R - 1) / R` elements sent instead of the
    `2 (T P) (R - 1) / R` of an all-reduce.

    Returns:
        The `(T, ceil(P / R))` columns (detached).
    """
    processes = process_count()
    rows, columns = matrix.shape
    width = -(-columns // processes)
    padded = matrix.new_zeros((processes * width, rows))
    padded[:columns] = matrix.detach().T
    own = matrix.new_empty((width, rows))
    dist.reduce_scatter_tensor(own, padded)
    return own.T


def gather_scattered(own, size):
    """Concatenates the processes' `own` vectors in rank order, cut to `size`."""
    whole = own.new_empty((process_count() * own.numel(),))
    dist.all_gather_into_tensor(whole, own.detach().contiguous())
    return whole[:size]


def range_over_processes(value):
    """Returns `(smallest, largest)` of an integer over the processes."""
    extremes = torch.tensor(
        [-value, value], dtype=torch.int64, device=_counting_device()
    )
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return -int(extremes[0]), int(extremes[1])
