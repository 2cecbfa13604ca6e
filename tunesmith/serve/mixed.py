"""Mixed-adapter batches: one forward pass over rows that use different adapters, each row through its own.

The registry (adapters.py) keeps each loaded adapter as a patch: what its method's own loader changed
on the base model. For batching, the patches are read instead of applied. Wherever some adapter
replaced a module (a LoRA-family or VeRA wrapper around a target linear layer, a trained copy of a
`modules_to_save` module, a peft bridge layer), one MixedModule takes the base module's place; wherever
an adapter hung a forward hook (bottleneck adapters), one mixed hook does. Before each forward the
engine routes: row i uses adapter a_i (slot 0: the base), and the rows are grouped by adapter.

For a target linear layer, with the rows R_a of adapter a (Punica/S-LoRA's per-row adapter index,
computed grouped: an index_select of the rows, the adapter's own matmuls, an index_copy back):

    y       = W0 x + b                                  every row, one matmul (the shared base)
    y[R_a] += dW_a x[R_a]                               each adapter present, its method's own update:
              LoRA, rsLoRA, LoRA-FA:  s_a B_a (A_a x)       (module._add_update, the fused addmm)
              VeRA:                   b_a * (B (d_a * (A x)))  (its own projections and vectors)
    DoRA:   y[R_a] = y + (m_a/n_a - 1) (y - b) + (m_a/n_a) s_a B_a A_a x     (dora.py's forward; n_a =
              ||W0 + s_a B_a A_a||_c is fixed while serving, so m_a/n_a is computed once per adapter)
    other replaced modules (modules_to_save, peft layers): y[R_a] = module_a(x[R_a])
    base rows (no adapter): nothing added

Two ways to compute the LoRA-family rows, chosen per layer and forward:

    one adapter for every row   y = addmm(y, x A_a^T, (s_a B_a)^T): that adapter's slice of the stacks below,
                                no gather at all
    rows of >= 2 LoRA adapters  gathered (Punica's BGMV, as batched matmuls): with the stacks
                                A (slots, R, in) and sB (slots, out, R) built once per layer (ranks
                                zero-padded to the largest R, zeros for the base and other methods),
                                idx (B,) the slot of each row, both stacks kept transposed for bmm:
                                    y = baddbmm(y, bmm(x, A^T[idx]), (sB)^T[idx])    (B, T, in) -> (B, T, out)
                                four kernels per layer whatever the number of adapters (the transposed
                                layout and the fused add: 30% less time than gathering A and sB as they are)
    DoRA, VeRA, other modules   grouped: index_select their rows, the method's own code, index_copy back

Zero-padded ranks and zero slots add exact zeros; both differ from the adapter's own fused addmm only
by float rounding (s folded into B; 1e-7 relative), which never changed a greedy token in the tests.
The stacks copy the LoRA matrices once more (an adapter's size again per loaded LoRA adapter). What
each layer does for the current rows (the gathered stacks of the rows, a single slice, the grouped
modules) is planned once per routing and kept while the rows stay the same: decode steps between two
joins or leaves gather nothing, and a new routing copies only the rows whose adapter changed (a join
appends rows, a leave moves the last row into the hole). The gathered stacks hold one adapter's LoRA
matrices per row (16 rows of r 16 adapters on every linear layer of the default model: 310 MB), kept
(with room for up to twice the rows seen) while the adapters loaded stay the same.

A grouped update is the very code `tunesmith generate --adapter` runs for that adapter on those rows;
with the LoRA paths above, greedy answers agree token for token (fp32) with each adapter alone
(tests/test_serve_mixed.py).

A patch entry of another kind (a parameter added to an existing module, a pre-hook, a removed
child) cannot be told apart per row: such an adapter is refused for batching (NotMixable) and can be
served by the serial engine (`--engine serial`).
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.errors import UserError
from tunesmith.serve.adapters import _MISSING


class NotMixable(UserError):
    """An adapter whose changes to the model cannot be applied per row."""


class Router:
    """The rows of the current forward grouped by adapter slot: [(slot, row indices or None for all rows)]."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        self.index: torch.Tensor | None = None  # (B,) the slot of each row, when rows use different adapters
        self.slots: list[int] = []  # the same, as a list
        self.version = 0  # changes when the routing does: the layers' plans (MixedModule.plan) are made again
        self._key = None

    def set(self, slots: list[int], device) -> None:
        if self._key == (slots, device):  # the same rows as the last forward (decode steps): keep the plans
            return
        self._key = (list(slots), device)
        self.slots = list(slots)
        distinct = sorted(set(slots) - {0})
        self.index = None
        self.version += 1
        if len(distinct) == 1 and 0 not in slots:
            self.groups = [(distinct[0], None)]  # every row uses the same adapter: no gather
            return
        self.groups = [(s, torch.tensor([i for i, x in enumerate(slots) if x == s], device=device)) for s in distinct]
        if self.groups:
            self.index = torch.tensor(slots, device=device)

    def clear(self) -> None:
        self.groups, self.index, self._key = [], None, None
        self.version += 1


class MixedModule(nn.Module):
    """In place of a base module that some adapters replaced: the base on every row, then each adapter's
    update on its rows (see the module docstring)."""

    def __init__(self, base: nn.Module, adapters: dict[int, nn.Module], router: Router):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict({str(k): m for k, m in adapters.items()})
        self.__dict__["router"] = router  # shared, not a submodule
        self.dora_scale = {k: _dora_scale(m) for k, m in adapters.items() if _is_dora(m)}
        self.stacked: set[int] = set()  # slots whose s B A lives in the stacks below
        stackable = {k: m for k, m in adapters.items() if _is_plain_lora(m)}
        if stackable:
            a, b = lora_stacks(stackable, max(adapters) + 1)
            self.register_buffer("stack_at", a.transpose(1, 2).contiguous(), persistent=False)  # (slots, in, R)
            self.register_buffer("stack_bt", b.transpose(1, 2).contiguous(), persistent=False)  # (slots, R, out), s B^T
            self.stacked = set(stackable)
        self._plan_version, self._plan = -1, None
        self._rows_at = self._rows_bt = None  # gathered stacks, row j holding stack[self._held[j]] (_gather)
        self._held: list[int] = []

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        gathered, single, grouped = self.plan()
        if gathered is not None:
            out = self._add_gathered(out, x, *gathered)
        elif single is not None:
            out = self._add_single(out, x, single)
        for slot, rows, module in grouped:
            if rows is None:
                out = self._update(slot, module, out, x, args, kwargs)
            else:
                part = self._update(slot, module, out.index_select(0, rows), x.index_select(0, rows), args, kwargs)
                out = out.index_copy(0, rows, part)
        return out

    def plan(self) -> tuple[tuple | None, int | None, list]:
        """For the current routing: (the rows' gathered stacks (A^T, sB^T) or None, the one stacked slot of every
        row or None, the groups computed by their own module [(slot, rows or None, module)]); made once per
        routing, so decode steps over the same rows gather nothing."""
        if self._plan_version != self.router.version:
            groups, index = self.router.groups, self.router.index
            gathered = None
            if index is not None and sum(slot in self.stacked for slot, _ in groups) >= 2:
                gathered = self._gather(self.router.slots)
            single = groups[0][0] if len(groups) == 1 and groups[0][1] is None and groups[0][0] in self.stacked \
                else None
            folded = gathered is not None or single is not None
            grouped = [(slot, rows, self.adapters[str(slot)]) for slot, rows in groups
                       if str(slot) in self.adapters and not (folded and slot in self.stacked)]
            self._plan_version, self._plan = self.router.version, (gathered, single, grouped)
        return self._plan

    def _gather(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' stacks (B, in, R) and (B, R, out), in buffers kept from one routing to the next: only the rows
        whose slot changed are copied. A join appends rows and a leave moves the last rows into the holes
        (batching.py), so between decode steps one or two rows change, not all B (a whole gather of 16 rows of
        the default model's r 16 adapters copies 310 MB, about 30 ms on the 2-core CPU)."""
        n = len(slots)
        if self._rows_at is None or self._rows_at.shape[0] < n:
            rows = max(n, 2 * len(self._held))
            self._rows_at = self.stack_at.new_empty(rows, *self.stack_at.shape[1:])
            self._rows_bt = self.stack_bt.new_empty(rows, *self.stack_bt.shape[1:])
            self._held = [-1] * rows
        changed = [j for j in range(n) if self._held[j] != slots[j]]
        if changed and changed[-1] - changed[0] + 1 == len(changed):  # one run of rows: one copy per stack
            run, source = slice(changed[0], changed[-1] + 1), torch.tensor(slots[changed[0]:changed[-1] + 1],
                                                                               device=self.stack_at.device)
            torch.index_select(self.stack_at, 0, source, out=self._rows_at[run])
            torch.index_select(self.stack_bt, 0, source, out=self._rows_bt[run])
        else:
            for j in changed:
                self._rows_at[j].copy_(self.stack_at[slots[j]])
                self._rows_bt[j].copy_(self.stack_bt[slots[j]])
        for j in changed:
            self._held[j] = slots[j]
        return self._rows_at[:n], self._rows_bt[:n]

    def _add_single(self, out: torch.Tensor, x: torch.Tensor, slot: int) -> torch.Tensor:
        """out + s B (A x) for every row, with adapter `slot`'s slice of the stacks."""
        at, bt = self.stack_at[slot], self.stack_bt[slot]  # (in, R), (R, out)
        u = x.reshape(-1, x.shape[-1]).to(at.dtype) @ at
        if out.dtype != bt.dtype:
            return out + (u @ bt).view(out.shape).to(out.dtype)
        return torch.addmm(out.reshape(-1, out.shape[-1]), u, bt).view(out.shape)

    @staticmethod
    def _add_gathered(out: torch.Tensor, x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
        """out + s_i B_i (A_i x) for every row i at once (zero for rows of the base and of other adapters), with the
        rows' stacks at (B, in, R) and bt (B, R, out)."""
        u = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(at.dtype), at)  # (B, T, R)
        if out.dtype != bt.dtype:
            return out + torch.bmm(u, bt).view(out.shape).to(out.dtype)
        return torch.baddbmm(out.reshape(out.shape[0], -1, out.shape[-1]), u, bt).view(out.shape)  # (B, T, out)

    def _update(self, slot: int, module, out, x, args, kwargs):
        """The rows' output through `module`, given the base output `out` of the same rows."""
        from tunesmith.methods.weight_delta import WeightDeltaLinear

        if slot in self.dora_scale:  # dora.py DoRALinear.forward, inference branch, with n fixed
            scale = self.dora_scale[slot].to(out.dtype)
            base = out if module.bias is None else out - module.bias
            return out + (scale - 1) * base + scale * module._update(x, dropout=False).to(out.dtype)
        if isinstance(module, WeightDeltaLinear) and not module.merged and not module.disabled:
            return module._add_update(out, x)  # W0 x + b + dW x, the method's own update
        return module(x, *args, **kwargs)


def _is_dora(module) -> bool:
    from tunesmith.methods.dora import DoRALinear

    return isinstance(module, DoRALinear) and not module.merged and not module.disabled


def _is_plain_lora(module) -> bool:
    """LoRA, rsLoRA or LoRA-FA in inference: y = W0 x + b + s B A x (LoRA-FA only trains differently)."""
    from tunesmith.methods.lora import LoRALinear
    from tunesmith.methods.lora_fa import LoRAFALinear

    return type(module) in (LoRALinear, LoRAFALinear) and not module.merged and not module.disabled \
        and module.quantized_base is None


@torch.no_grad()
def lora_stacks(adapters: dict[int, nn.Module], slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (slots, R, in) and s B (slots, out, R), R the largest rank: slot k holds adapter k's matrices, zero-padded
    to rank R (the padding adds exact zeros), and zeros for slots without one here (the base: no update)."""
    first = next(iter(adapters.values()))
    rank = max(m.r for m in adapters.values())
    kw = {"device": first.lora_A.weight.device, "dtype": first.lora_A.weight.dtype}
    a = torch.zeros(slots, rank, first.in_features, **kw)
    b = torch.zeros(slots, first.out_features, rank, **kw)
    for k, m in adapters.items():
        a[k, : m.r] = m.lora_A.weight
        b[k, :, : m.r] = m.lora_B.weight * m.scaling
    return a, b


@torch.no_grad()
def _dora_scale(module) -> torch.Tensor:
    """m / n, (out,): DoRA's magnitude over the row norms of W0 + s B A, which stay fixed while serving."""
    return module.lora_magnitude_vector / module.weight_norm()


class _HookView:
    """What an adapter's forward hook sees as its module: the base module with that adapter's children."""

    def __init__(self, module: nn.Module, children: dict[str, nn.Module]):
        self._module, self._children = module, children

    def __getattr__(self, name):
        children = self.__dict__["_children"]
        return children[name] if name in children else getattr(self.__dict__["_module"], name)


class MixedAdapters:
    """The loaded adapters of a registry laid over its base model for per-row routing; see the module docstring.

    Build and install with the model lock held and the model the plain base (registry.active None). The
    registry calls `remove()` before it loads an adapter and `install()` after any change."""

    def __init__(self, registry):
        self.registry, self.model = registry, registry.model
        self.router = Router()
        self.slots: dict[str | None, int] = {None: 0}
        self._installed: list[tuple[dict, str, nn.Module]] = []  # (parent._modules, key, base module)
        self._hook_handles: list = []

    def slot(self, name: str | None) -> int:
        return self.slots[name]

    def route(self, names: list[str | None], device) -> None:
        """Row i of the next forward uses adapter names[i] (None: the base)."""
        self.router.set([self.slots[n] for n in names], device)

    def remove(self) -> None:
        """Put the plain base modules back (mixed modules and hooks out)."""
        for handle in self._hook_handles:
            handle.remove()
        for modules, key, base in reversed(self._installed):
            modules[key] = base
        self._installed, self._hook_handles = [], []
        self.router.clear()

    def install(self) -> None:
        """Lay every loaded adapter over the base (after remove(); the registry must have none active)."""
        self.remove()
        owners = {id(d): (m, kind) for m in self.model.modules()
                  for kind in ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
                               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                               "_forward_pre_hooks_with_kwargs") if isinstance(d := getattr(m, kind, None), dict)}
        owners.update({id(vars(m)): (m, "attr") for m in self.model.modules()})
        replaced: dict[tuple[int, str], tuple[dict, nn.Module, dict[int, nn.Module]]] = {}
        hooks: dict[int, tuple[nn.Module, dict[int, list]]] = {}
        added: dict[tuple[int, int], dict[str, nn.Module]] = {}
        self.slots = {None: 0}
        for i, adapter in enumerate(self.registry.models(), start=1):
            self.slots[adapter.name] = i
            for d, key, old, new in adapter.patch.entries:
                module, kind = owners.get(id(d), (None, None))
                self._classify(adapter.name, i, module, kind, d, key, old, new, replaced, hooks, added)
        for modules, base, by_slot in replaced.values():
            for m in by_slot.values():
                m.eval()
        for (_, key), (modules, base, by_slot) in replaced.items():
            modules[key] = MixedModule(base, by_slot, self.router)
            self._installed.append((modules, key, base))
        for module_id, (module, by_slot) in hooks.items():
            views = {s: (_HookView(module, added.get((module_id, s), {})), fns) for s, fns in by_slot.items()}
            self._hook_handles.append(module.register_forward_hook(self._mixed_hook(views)))

    def _classify(self, name, slot, module, kind, d, key, old, new, replaced, hooks, added) -> None:
        def refuse(what: str):
            raise NotMixable(f"The adapter {name!r} changes the base model in a way that cannot be applied per row "
                             f"({what}), so it cannot share a batch with others; serve it with --engine serial.")

        if module is None:
            refuse(f"an unknown dict, key {key!r}")
        if kind == "attr":
            if isinstance(new, (torch.Tensor, nn.Module)):
                refuse(f"attribute {key!r}")
            return  # bookkeeping (peft_config, flags of the loader): nothing a forward reads per row
        if new is _MISSING:
            refuse(f"{kind} entry {key!r} removed")
        if kind == "_modules" and old is _MISSING:
            added.setdefault((id(module), slot), {})[key] = new  # a new child: read through its hook or its owner
            return
        if kind == "_modules":
            base = old.base if isinstance(old, MixedModule) else old
            replaced.setdefault((id(module), key), (d, base, {}))[2][slot] = new
            return
        if kind == "_forward_hooks" and old is _MISSING:
            hooks.setdefault(id(module), (module, {}))[1].setdefault(slot, []).append(new)
            return
        refuse(f"{kind} entry {key!r}")

    def _mixed_hook(self, views: dict[int, tuple[_HookView, list]]):
        router = self.router

        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            for slot, rows in router.groups:
                if slot not in views:
                    continue
                view, fns = views[slot]
                part = first if rows is None else first.index_select(0, rows)
                for fn in fns:  # the adapter's own hook, on its rows' (first) output
                    result = fn(view, args, part)
                    part = part if result is None else (result[0] if isinstance(result, tuple) else result)
                first = part if rows is None else first.index_copy(0, rows, part)
            return (first, *output[1:]) if isinstance(output, tuple) else first

        return hook
