"""Mixed-adapter batches (tunesmith/serve/mixed.py): one forward over rows with different adapters equals each
adapter alone, for every method that keeps the base frozen; greedy answers token for token against tunesmith's
generate path (fp32, tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from test_serve import make_adapter

PROMPT = "The quick brown fox"
# method -> options of make_adapter; "mts" is LoRA with a trained lm_head (modules_to_save)
METHODS = {
    "lora": {"r": 4, "alpha": 8},
    "rslora": {"r": 4, "alpha": 8, "rslora": True},
    "dora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "vera": {"r": 16},
    "lora_fa": {"r": 4, "alpha": 8, "target_modules": ["k_proj", "up_proj"]},
    "mts": {"r": 2, "alpha": 4, "target_modules": ["o_proj"]},
    "adapter": {"adapter_size": 8},
}


def add_modules_to_save(folder, seed: int) -> None:
    """Make a saved LoRA adapter one with a trained lm_head, as PEFT saves it (modules_to_save)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    tensors = load_file(folder / "adapter_model.safetensors")
    head = build_tiny_model().lm_head.weight.detach().clone()
    tensors["base_model.model.lm_head.weight"] = head + 0.5 * torch.randn(head.shape,
                                                                          generator=torch.Generator().manual_seed(seed))
    save_file(tensors, folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny base; `folders.need(method)` makes four adapters of that method (seeds differ), once."""
    root = tmp_path_factory.mktemp("mixed")
    build_tiny_model().save_pretrained(root / "base")
    build_tiny_tokenizer().save_pretrained(root / "base")

    class Folders(dict):
        def need(self, method: str) -> list[str]:
            names = [f"{method}{k}" for k in range(4)]
            for k, name in enumerate(names):
                if name not in self:
                    folder = root / name
                    make_adapter(root / "base", folder, {"rslora": "lora", "mts": "lora"}.get(method, method),
                                 10 * k + len(method), **METHODS[method])
                    if method == "mts":
                        add_modules_to_save(folder, k)
                    self[name] = folder
            return names

    return Folders(base=root / "base")


def mixed_model(folders, names):
    """The tiny base from its folder, the named adapters loaded in a registry, a mixer laid over them."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.serve.adapters import AdapterRegistry
    from tunesmith.serve.mixed import MixedAdapters

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(folders["base"])))
    registry = AdapterRegistry(model, "base", max_loaded=len(names) + 1)
    registry.mixer = MixedAdapters(registry)
    for name in names:
        registry.load(name, str(folders[name]))
    return model, tok, registry.mixer


def alone(folders, name):
    """The single-adapter path: the base with this one artifact loaded by its method (as `generate --adapter`)."""
    from tunesmith.methods.registry import load_artifact

    model = build_tiny_model()
    if name is not None:
        load_artifact(model, folders[name])
    return model.eval()


def greedy(model, ids: torch.Tensor, n: int, before_forward=lambda: None) -> torch.Tensor:
    """n greedy tokens for each row of ids (B, T), recomputing the whole prefix each step."""
    for _ in range(n):
        before_forward()
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


DEFAULT_RUN = ("lora", "dora", "vera", "mts")  # rsLoRA, LoRA-FA and bottleneck adapters run in make test-slow


@pytest.mark.parametrize("method", [m if m in DEFAULT_RUN else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_mixed_batch_equals_each_adapter_alone(folders, method):
    from tunesmith.evaluate.generate import generate

    names = folders.need(method)
    model, tok, mixer = mixed_model(folders, names)
    rows = [None, *names, names[1], None]  # the base, four adapters, one twice, the base again
    prompt = tok(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = prompt.repeat(len(rows), 1)
    out = greedy(model, ids, 4, lambda: mixer.route(rows, "cpu"))
    mixer.route(rows, "cpu")
    with torch.no_grad():
        mixed = model(input_ids=ids).logits  # (rows, T, V): one forward over every adapter

    models = {name: alone(folders, name) for name in dict.fromkeys(rows)}
    for row, name in enumerate(rows):
        assert torch.equal(out[row], greedy(models[name], prompt, 4)[0]), (method, name)
        with torch.no_grad():
            reference = models[name](input_ids=prompt).logits[0]
        torch.testing.assert_close(mixed[row], reference, atol=1e-5, rtol=1e-5)
        if name is not None:  # each adapter changes the logits, so the checks above tell them apart
            assert (mixed[row] - mixed[0]).abs().max() > 1e-3, name
    text = tok.decode(out[2, prompt.shape[1]:], skip_special_tokens=True).strip()
    assert text == generate(models[rows[2]], tok, [PROMPT], 4)[0]  # tunesmith generate's own path


@pytest.mark.slow  # peft's import alone takes seconds
def test_modules_to_save_loads_as_peft_loads_it(folders):
    peft = pytest.importorskip("peft")
    from tunesmith.methods.registry import load_artifact

    folders.need("mts")
    ours = build_tiny_model()
    load_artifact(ours, folders["mts0"])
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(), str(folders["mts0"])).eval()
    ids = torch.tensor([[5, 9, 33, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(input_ids=ids).logits, build_tiny_model()(input_ids=ids).logits, atol=1e-3)


def test_routing_all_base_or_unrouted_is_the_base_and_unload_relays(folders):
    folders.need("lora"), folders.need("dora")
    model, tok, mixer = mixed_model(folders, ["lora0", "dora0"])
    ids = torch.tensor([[5, 9, 33, 70], [5, 9, 33, 70]])
    with torch.no_grad():
        base = build_tiny_model()(input_ids=ids).logits
        mixer.route([None, None], "cpu")
        torch.testing.assert_close(model(input_ids=ids).logits, base)
        mixer.router.clear()
        torch.testing.assert_close(model(input_ids=ids).logits, base)
        mixer.route(["lora0", None], "cpu")
        assert not torch.allclose(model(input_ids=ids).logits[0], base[0], atol=1e-3)
        mixer.registry.unload("lora0")
        assert "lora0" not in mixer.slots
        mixer.route(["dora0", None], "cpu")
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out[1], base[1])
    assert not torch.allclose(out[0], base[0], atol=1e-3)


def test_modules_to_save_naming_no_module_is_a_user_error(folders, tmp_path):
    import shutil

    from tunesmith.errors import UserError
    from tunesmith.methods.registry import load_artifact

    folders.need("mts")
    shutil.copytree(folders["mts0"], tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["score"]}))
    with pytest.raises(UserError, match="modules_to_save entry 'score' names no module"):
        load_artifact(build_tiny_model(), tmp_path / "bad")


def test_a_change_that_cannot_be_routed_per_row_is_refused_and_the_base_kept(folders):
    from tunesmith.serve.adapters import _MISSING, LoadedAdapter, Patch
    from tunesmith.serve.mixed import NotMixable

    folders.need("lora")
    model, _, mixer = mixed_model(folders, ["lora0"])
    layer = model.model.layers[0].mlp
    extra = torch.nn.Parameter(torch.zeros(3))
    patch = Patch([(layer._parameters, "extra", _MISSING, extra)])  # a parameter added to an existing module
    mixer.registry.loaded["odd"] = LoadedAdapter("odd", "x", "peft", patch, 3, 12)
    with pytest.raises(NotMixable, match="--engine serial"):
        mixer.install()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # nothing laid over: the plain base


def test_gathered_rows_kept_between_routings_equal_a_fresh_gather(folders):
    """MixedModule._gather copies only the rows whose adapter changed (appended rows, a row moved into a hole,
    scattered changes, fewer rows); each forward equals one whose stacks are gathered afresh, bit for bit."""
    from tunesmith.serve.mixed import MixedModule

    names = folders.need("lora")
    kept_model, _, kept_mixer = mixed_model(folders, names)
    fresh_model, _, fresh_mixer = mixed_model(folders, names)
    kept_modules = [m for m in kept_model.modules() if isinstance(m, MixedModule)]
    fresh_modules = [m for m in fresh_model.modules() if isinstance(m, MixedModule)]
    routings = [[names[0], names[1]],  # a first gather
                [names[0], names[1], names[2], None],  # rows appended, past the buffers' rows: new buffers
                [names[0], None, names[2]],  # the last row moved into the hole of row 1
                [names[3], None, names[1]],  # rows 0 and 2 changed: two copies apart
                [names[3], names[2]]]  # fewer rows, one changed
    ids = torch.tensor([[5, 9, 33, 70, 2]])
    buffers = []
    for rows in routings:
        kept_mixer.route(rows, "cpu")
        for m in fresh_modules:
            m._rows_at = None  # forget what was gathered: every row again
        fresh_mixer.route(rows, "cpu")
        with torch.no_grad():
            kept = kept_model(input_ids=ids.repeat(len(rows), 1)).logits
            fresh = fresh_model(input_ids=ids.repeat(len(rows), 1)).logits
        assert torch.equal(kept, fresh), rows
        assert kept_modules[0]._held[:len(rows)] == kept_mixer.router.slots
        buffers.append(kept_modules[0]._rows_at)
    assert buffers[1] is not buffers[0] and all(b is buffers[1] for b in buffers[2:])  # kept from routing 2 on
    assert not torch.allclose(kept[0], kept[1], atol=1e-3)  # the rows' adapters differ
