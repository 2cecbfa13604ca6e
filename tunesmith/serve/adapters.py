"""Many adapters on one copy of the base weights, switched per request.

tunesmith's methods put one artifact onto a model in place (`registry.load_artifact`): LoRA, DoRA,
rsLoRA, LoRA-FA and VeRA replace each target nn.Linear by a wrapper that holds the *same* weight
Parameter plus the adapter's own tensors; bottleneck adapters add a child module and a forward
hook; the peft bridge replaces layers and sets `model.peft_config`. None of them holds several
adapters at once, so the registry does not ask them to. It records what loading changed instead:

    before = every original module's children, parameters, buffers, hooks and attributes
    load_artifact(model, folder)                       # the method's own loader, unchanged
    patch  = the entries that differ from `before`     # (dict, key, base value, adapter value)
    revert the patch                                   # the model is the base again

Activating an adapter is applying its patch (a few hundred dict assignments, microseconds per
layer); the base is every patch reverted. The active model is then the very object graph that
`load_artifact` builds for `tunesmith generate --adapter`, so outputs agree exactly.

Memory: one adapter costs its own tensors only (LoRA r 16 on all linear layers of the 135M default
model: 4.9 M parameters, 19.5 MB in fp32), since every wrapper shares the base layer's weight; the
size is measured and reported when it loads (`LoadedAdapter.bytes`). Methods that change the base
weights themselves (full, freeze, delta_lora) are refused here: serve such a model as its own
`--base`. A loader that writes into a base tensor in place is caught by the tensor's version counter
and refused too.

The serial engine applies one patch at a time (`activate`); the batching engine never does: its
`mixer` (mixed.py) reads every patch and lays all adapters over the base at once, per row, and is
laid again after each load and unload.

Thread safety: everything that touches the model runs under `lock` (the engine's model lock).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError
from tunesmith.serve.errors import BadRequest, Conflict, ModelNotFound

# Module dicts a loader may change: children, tensors, hooks (with their kwargs/always-call flags).
_SLOTS = ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_MISSING = object()
# Methods whose artifact is (or rewrites) the base weights: they cannot share one base with others.
BASE_CHANGING = ("full", "freeze", "delta_lora")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


class NotFoundAdapter(ModelNotFound):
    code = "adapter_not_found"


@dataclass
class Patch:
    """What loading an adapter changed on the base model: (dict, key, base value, adapter value) entries."""

    entries: list[tuple[dict, Any, Any, Any]]

    def apply(self) -> None:
        for d, key, _, new in self.entries:
            _put(d, key, new)

    def revert(self) -> None:
        for d, key, old, _ in reversed(self.entries):
            _put(d, key, old)


def _put(d: dict, key, value) -> None:
    if value is _MISSING:
        d.pop(key, None)
    else:
        d[key] = value


def _dicts(module) -> list[dict]:
    """The dicts of one module a loader may change: the _SLOTS ones and its plain attributes."""
    return [getattr(module, s) for s in _SLOTS if isinstance(getattr(module, s, None), dict)] + [vars(module)]


def _snapshot(model) -> list[tuple[dict, dict]]:
    """(the live dict, a shallow copy of it) for every dict of every module of the base model."""
    return [(d, dict(d)) for m in model.modules() for d in _dicts(m)]


def _diff(snapshot: list[tuple[dict, dict]]) -> Patch:
    entries = []
    for live, before in snapshot:
        for key in before.keys() | live.keys():
            old, new = before.get(key, _MISSING), live.get(key, _MISSING)
            if old is not new:  # by identity: a loader that sets an equal new value costs one harmless entry
                entries.append((live, key, old, new))
    return Patch(entries)


def capture_load(model, folder: Path) -> tuple[Patch, Any]:
    """Load the artifact in `folder` onto `model` (the base), record what changed, and put the base back.
    Returns (patch, the method config). On any failure the base is restored before the error propagates."""
    from tunesmith.methods.registry import load_artifact

    snapshot = _snapshot(model)
    versions = [(p, p._version) for p in model.parameters()]
    try:
        cfg = load_artifact(model, folder)
        model.eval()  # a loader's new modules start in training mode: no adapter dropout while serving
    finally:
        patch = _diff(snapshot)
        patch.revert()
    changed = [p for p, v in versions if p._version != v]
    if changed:
        raise UserError(f"{str(folder)!r}: loading it wrote into {len(changed)} base weight(s) in place, so it "
                        "cannot share the base with other adapters; serve it as its own --base.")
    return patch, cfg


def adapter_size(patch: Patch, model) -> tuple[int, int]:
    """(parameters, bytes) that the adapter adds: tensors reachable from its patch that the base does not hold."""
    import torch

    base = {id(t) for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    params = nbytes = 0
    for _, _, _, new in patch.entries:
        tensors = []
        if isinstance(new, torch.nn.Module):
            tensors = [*new.parameters(), *new.buffers()]
        elif isinstance(new, torch.Tensor):
            tensors = [new]
        for t in tensors:
            if id(t) not in base and id(t) not in seen:
                seen.add(id(t))
                params += t.numel()
                nbytes += t.numel() * t.element_size()
    return params, nbytes


@dataclass
class LoadedAdapter:
    name: str
    path: str
    method: str
    patch: Patch
    parameters: int
    bytes: int
    created: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "method": self.method, "parameters": self.parameters,
                "bytes": self.bytes}


class AdapterRegistry:
    """name -> adapter loaded on the shared base; at most `max_loaded`, the least recently used idle one evicted.

    Requests `acquire` an adapter when they are admitted and `release` it when they end; an adapter with
    requests in flight is neither unloaded (409) nor evicted. The engine's worker calls `activate` before each
    forward pass."""

    def __init__(self, model, base_name: str, max_loaded: int = 8, lock: threading.RLock | None = None):
        self.model, self.base_name, self.max_loaded = model, base_name, max_loaded
        self.lock = lock or threading.RLock()  # held around every forward pass and every change of the model
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self.in_flight: dict[str, int] = {}
        self.active: str | None = None
        self.mixer = None  # a MixedAdapters laid over the model for batching (mixed.py): rebuilt on every change
        self._count_lock = threading.Lock()  # acquire/release come from the event loop and the worker

    # -- names --------------------------------------------------------------------------------------------------
    def resolve(self, model: str) -> str | None:
        """None for the base, the adapter's name for a loaded adapter; 404 model_not_found otherwise."""
        if model == self.base_name:
            return None
        if model in self.loaded:
            return model
        known = ", ".join([self.base_name, *self.loaded])
        raise ModelNotFound(f"The model {model!r} does not exist here; served: {known}.", param="model")

    def models(self) -> list[LoadedAdapter]:
        return list(self.loaded.values())

    # -- requests -----------------------------------------------------------------------------------------------
    def acquire(self, name: str | None) -> None:
        with self._count_lock:
            if name is None:
                return
            if name not in self.loaded:
                raise ModelNotFound(f"The adapter {name!r} was unloaded.", param="model")
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            self.loaded.move_to_end(name)

    def release(self, name: str | None) -> None:
        with self._count_lock:
            if name is not None and self.in_flight.get(name):
                self.in_flight[name] -= 1

    def busy(self, name: str) -> int:
        return self.in_flight.get(name, 0)

    # -- the model ----------------------------------------------------------------------------------------------
    def activate(self, name: str | None) -> None:
        """Make the model compute `name` (None: the base). Call with `lock` held."""
        if name == self.active:
            return
        if self.active is not None:
            self.loaded[self.active].patch.revert()
            self.active = None
        if name is not None:
            self.loaded[name].patch.apply()
            self.active = name

    def load(self, name: str, path: str) -> tuple[LoadedAdapter, list[str]]:
        """Load the artifact at `path` as `name`; returns it and the names evicted to make room."""
        with self.lock:
            self._check_new(name, path)
            evicted = self._make_room()
            self.activate(None)
            if self.mixer is not None:
                self.mixer.remove()  # the loader must see the plain base
            try:
                patch, cfg = capture_load(self.model, Path(path))
            except (UserError, ValueError, KeyError, OSError) as e:  # a bad folder: the client's to fix
                self._relay()
                raise BadRequest(f"{path!r}: {e}", param="path") from None
            except BaseException:
                self._relay()
                raise
            params, nbytes = adapter_size(patch, self.model)
            adapter = LoadedAdapter(name, str(path), cfg.name, patch, params, nbytes)
            self.loaded[name] = adapter
            try:
                self._relay()
            except UserError as e:  # it cannot share a batch (mixed.NotMixable): forget it again
                self.loaded.pop(name)
                self._relay()
                raise BadRequest(f"{path!r}: {e}", param="path") from None
        return adapter, evicted

    def _relay(self) -> None:
        """Lay the loaded adapters over the base again for batching (mixed.py), when a mixer is in use."""
        if self.mixer is not None:
            self.mixer.install()

    def _check_new(self, name: str, path: str) -> None:
        from tunesmith.methods.registry import _artifact_config

        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequest(f"Adapter name {name!r} must be 1-128 letters, digits or ._:@+- (starting with a letter "
                             "or digit).", param="name")
        if name == self.base_name or name in self.loaded:
            raise Conflict(f"The name {name!r} is already served; unload it first or choose another.", param="name",
                           code="adapter_exists")
        folder = Path(path)
        if not folder.is_dir():
            raise BadRequest(f"{path!r} is not a folder on the server.", param="path")
        try:
            kind, raw = _artifact_config(folder)
        except UserError as e:
            raise BadRequest(str(e), param="path") from None
        if kind == "tunesmith" and raw.get("method") in BASE_CHANGING:
            raise BadRequest(f"{path!r} is a {raw['method']} artifact: it changes the base weights themselves, so it "
                             "cannot share the base with other adapters. Serve it as its own --base (a `full` folder "
                             "as is, the others after `tunesmith merge`).", param="path")

    def _make_room(self) -> list[str]:
        """Evict least recently used idle adapters until one more fits; 409 when every one is busy."""
        evicted = []
        while len(self.loaded) >= self.max_loaded:
            idle = next((n for n in self.loaded if not self.busy(n)), None)
            if idle is None:
                raise Conflict(f"All {self.max_loaded} adapter slots (max_loaded_adapters) have requests in flight; "
                               "retry when one finishes, or unload one.", code="adapters_busy")
            self._drop(idle)
            evicted.append(idle)
        return evicted

    def unload(self, name: str) -> LoadedAdapter:
        """Forget an adapter and free its tensors; 409 while requests use it."""
        with self.lock:
            if name not in self.loaded:
                raise NotFoundAdapter(f"No adapter named {name!r} is loaded.", param="name")
            if self.busy(name):
                raise Conflict(f"The adapter {name!r} has {self.busy(name)} request(s) in flight; unload it when they "
                               "finish.", param="name", code="adapter_busy")
            return self._drop(name)

    def _drop(self, name: str) -> LoadedAdapter:
        if self.active == name:
            self.activate(None)
        adapter = self.loaded.pop(name)
        self._relay()
        return adapter
