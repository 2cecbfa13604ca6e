"""A rollout under torchrun: each process samples its share of the prompts; what depends on all of them is
computed on the whole rollout, in the order one process would have it.

The loop gives process r its contiguous share of each global micro-batch (distributed.share), so one process's
window holds, micro-batch by micro-batch, the rows [mb 0 of rank 0, mb 0 of rank 1, ..., mb 1 of rank 0, ...].
`gather_in_order` puts every process's per-completion values back in that order, on every process, and says
where this process's own entries are. Whatever is then computed from the whole rollout (GRPO's batch std and
logged statistics, PPO's advantage whitening) takes the same numbers in the same order as one process with the
same global batch, so it equals it bit for bit; each process then trains on its own entries.

With one process nothing is sent: the values come back as they are and every entry is this process's.
"""

from __future__ import annotations

from tunesmith.train import distributed


def gather_in_order(sizes: list[int], values: dict[str, list]) -> tuple[dict[str, list], list[int]]:
    """(each list of `values` over all processes in the global order, the positions of this process's entries).

    sizes[k]: how many entries of each list belong to this process's micro-batch k (every process passes as many
    micro-batches); values: name -> a list of entries (numbers, or lists such as token ids), micro-batch by
    micro-batch. A collective: every process calls it alike."""
    parts = distributed.gather_objects((list(sizes), values))
    out: dict[str, list] = {name: [] for name in values}
    mine: list[int] = []
    offsets = [0] * len(parts)
    length = 0
    for k in range(len(sizes)):
        for r, (their_sizes, theirs) in enumerate(parts):
            n = their_sizes[k]
            for name in out:
                out[name].extend(theirs[name][offsets[r] : offsets[r] + n])
            if r == distributed.rank():
                mine.extend(range(length, length + n))
            offsets[r] += n
            length += n
    return out, mine
