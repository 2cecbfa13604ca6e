"""The adapters an adapter merge reads (LoRA, rsLoRA, DoRA, VeRA), each as low-rank factors per layer.

Every input becomes, per adapted layer (PEFT's module path without the `base_model.model.` prefix),
factors A (r, in) and B (out, r) with a scale s, and for DoRA a magnitude m (out,):

  LoRA, rsLoRA  dW = s B A,  s = alpha / r (rsLoRA: alpha / sqrt(r))
  VeRA          dW = diag(b) B_v[:out] diag(d) A_v[:, :in] = B A  with  B = diag(b) B_v[:out] (out, r),
                A = diag(d) A_v[:, :in] (r, in), s = 1 (Kopiczko et al. 2024, Eq. 2). The shared projections
                A_v, B_v are cut to the largest adapted layer, so each layer's in size is read from the base
                model (its weight's shape in the safetensors header; no weights are loaded for it).
  DoRA          W' = m (W0 + s B A) / ||W0 + s B A||_c (Liu et al. 2024, Eq. 5), so
                dW = diag(k) (W0 + s B A) - W0,   k = m / ||W0 + s B A||_c   (out,), one factor per row;
                dW depends on W0, which is read from the base model one layer at a time (fp32).

The base is the recipe's `base_model`, else the adapters' base_model_name_or_path (a folder, a
.gguf file, the built-in model's name or a cached hub id, as everywhere). Refused with the reason:
a DoRA adapter trained on a 4-bit base (its magnitude is relative to the dequantized 4-bit weights,
which no float base reproduces), other PEFT types and tunesmith's own artifact formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import UserError

A_KEY, B_KEY, M_KEY = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
VERA_B, VERA_D = ".vera_lambda_b", ".vera_lambda_d"


@dataclass
class AdapterFactors:
    """One input adapter: per layer its A (r, in) and B (out, r) in fp32, the scale s, DoRA's magnitudes."""

    folder: Path
    raw: dict
    kind: str  # "lora" (also rsLoRA), "dora" or "vera"
    r: int
    scale: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: m (out,)

    def low_rank(self, name: str) -> torch.Tensor | None:
        """s B A (out, in) in fp64, or None when this adapter does not adapt the layer."""
        if name not in self.layers:
            return None
        a, b = self.layers[name]
        return (b.double() @ a.double()) * self.scale

    def row_factor(self, name: str, w0: torch.Tensor | None) -> torch.Tensor | None:
        """DoRA's k = m / ||W0 + s B A||_c (out,) in fp64; None for LoRA and VeRA (k = 1)."""
        if self.kind != "dora" or name not in self.layers:
            return None
        return self.magnitudes[name].double() / torch.linalg.norm(w0.double() + self.low_rank(name), dim=1)

    def delta(self, name: str, w0: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layer's weight change dW (out, in) in fp32 (computed in fp64); None when not adapted.
        DoRA needs W0: dW = diag(k) (W0 + s B A) - W0."""
        low = self.low_rank(name)
        if low is None:
            return None
        if self.kind != "dora":
            return low.float()
        k = self.row_factor(name, w0)[:, None]
        return (k * (w0.double() + low) - w0.double()).float()


class BaseWeights:
    """The base model's weights, read one layer at a time and only when asked (DoRA's W0, VeRA's shapes)."""

    def __init__(self, reference: str | None):
        self.reference = reference
        self._tensors = None

    def tensors(self, why: str):
        from tunesmith.merge.tensors import ModelTensors

        if self._tensors is None:
            if not self.reference:
                raise UserError(f"{why} needs the base model's weights, and no base model is named: set base_model "
                                "in the recipe (or base_model= in merge_adapters), or base_model_name_or_path in "
                                "the adapter's adapter_config.json.")
            from tunesmith.config import ModelConfig
            from tunesmith.models.loading import resolve_model_folder

            self._tensors = ModelTensors(resolve_model_folder(ModelConfig(name_or_path=self.reference)))
        return self._tensors

    def shape(self, layer: str, why: str) -> tuple[int, int]:
        """(out, in) of the layer's weight, from the safetensors header."""
        return tuple(self.tensors(why).meta(f"{layer}.weight").shape)

    def weight(self, layer: str, why: str) -> torch.Tensor:
        """W0 of the layer (out, in) in fp32."""
        return self.tensors(why).get(f"{layer}.weight").float()

    def module_order(self) -> list[str] | None:
        """The base architecture's module names in model order (named_modules of a meta-device model),
        the order PEFT visits layers in; None when the base is unknown."""
        if not self.reference:
            return None
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = self.tensors("the module order").folder
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        return [name for name, _ in model.named_modules()]


def read_adapter(folder: str | Path, base: BaseWeights) -> AdapterFactors:
    """A PEFT LoRA, rsLoRA, DoRA or VeRA adapter folder; everything else is refused with the reason."""
    from tunesmith.files import read_json
    from tunesmith.methods.artifact import ARTIFACT_NAME
    from tunesmith.methods.io import CONFIG_NAME, read_adapter_config, read_adapter_weights

    folder = Path(folder).expanduser()
    if not (folder / CONFIG_NAME).is_file():
        kind = "a tunesmith artifact (its own format)" if (folder / ARTIFACT_NAME).is_file() else "no adapter folder"
        raise UserError(f"{str(folder)!r} is {kind}: adapters merge into an adapter only from PEFT LoRA, rsLoRA, "
                        f"DoRA and VeRA adapters ({CONFIG_NAME}).")
    raw = read_json(folder / CONFIG_NAME, "the settings of a PEFT adapter")
    if isinstance(raw, dict) and raw.get("peft_type") == "VERA":
        return read_vera(folder, raw, base)
    cfg = read_adapter_config(folder)  # refuses other peft types and options our LoRA does not compute
    if cfg.name == "dora":
        refuse_quantized_dora(folder)
    path, state = read_adapter_weights(folder, f"the weights of a {cfg.name} adapter")
    groups = grouped(state, (A_KEY, B_KEY, M_KEY) if cfg.name == "dora" else (A_KEY, B_KEY), path)
    layers, magnitudes = {}, {}
    for name, parts in groups.items():
        a, b = parts[A_KEY].float(), parts[B_KEY].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != cfg.r or b.shape[1] != cfg.r:
            raise UserError(f"{str(path)!r}: layer {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, not rank "
                            f"r={cfg.r} as {CONFIG_NAME} says.")
        layers[name] = (a, b)
        if cfg.name == "dora":
            magnitudes[name] = parts[M_KEY].float()
    scale = cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r
    return AdapterFactors(folder, raw, cfg.name, cfg.r, scale, layers, magnitudes)


def grouped(state: dict, suffixes: tuple[str, ...], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {suffix: tensor}} of PEFT keys `base_model.model.<layer><suffix>`; each layer needs every suffix."""
    from tunesmith.methods.io import PREFIX

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise UserError(f"{str(path)!r} holds {key!r}, which is none of {', '.join(suffixes)}; only plain "
                            "LoRA, DoRA and VeRA adapters merge into an adapter.")
        layers.setdefault(key[len(PREFIX):-len(suffix)], {})[suffix] = tensor
    for name, parts in layers.items():
        if set(parts) != set(suffixes):
            raise UserError(f"{str(path)!r}: layer {name} has only {', '.join(sorted(parts))} of "
                            f"{', '.join(suffixes)}.")
    return layers


def refuse_quantized_dora(folder: Path) -> None:
    from tunesmith.commands.infer import run_quantization

    quant = run_quantization(folder)
    if quant:
        raise UserError(f"{str(folder)!r} is a DoRA adapter trained on a {quant['quantization']} base (its run's "
                        "config.yaml): its magnitude m is relative to the dequantized 4-bit weights, so its change "
                        "m (W0 + sBA) / ||W0 + sBA|| - W0 is not defined on the float base an adapter merge reads. "
                        "Fold it into its base with `tunesmith merge --adapter` (which dequantizes) and merge models.")


def read_vera(folder: Path, raw: dict, base: BaseWeights) -> AdapterFactors:
    """VeRA as factors B = diag(b) B_v[:out] (out, r), A = diag(d) A_v[:, :in] (r, in), scale 1; the in size
    of each layer from the base model. Projections not saved (save_projection: false) are regenerated
    from projection_prng_key as training drew them (methods/vera.py)."""
    from tunesmith.methods.io import read_adapter_weights
    from tunesmith.methods.vera import _UNSUPPORTED, kaiming_uniform

    bad = [k for k in _UNSUPPORTED if raw.get(k)] + (["bias"] if raw.get("bias", "none") != "none" else [])
    if bad:
        raise UserError(f"{str(folder)!r} uses VeRA options tunesmith does not support: "
                        + ", ".join(f"{k}={raw[k]!r}" for k in bad) + ".")
    path, state = read_adapter_weights(folder, "the weights of a VeRA adapter")
    projections = {k: state.pop(k) for k in ("base_model.vera_A", "base_model.vera_B") if k in state}
    groups = grouped(state, (VERA_B, VERA_D), path)
    why = f"The VeRA adapter {str(folder)!r} (each layer's input size)"
    shapes = {name: base.shape(name, why) for name in groups}
    r = int(raw.get("r", 256))
    if len(projections) == 2:
        a_v, b_v = projections["base_model.vera_A"].float(), projections["base_model.vera_B"].float()
    else:
        generator = torch.Generator(device="cpu").manual_seed(int(raw.get("projection_prng_key", 0)))
        a_v = kaiming_uniform((r, max(s[1] for s in shapes.values())), generator)
        b_v = kaiming_uniform((max(s[0] for s in shapes.values()), r), generator)
    layers = {}
    for name, parts in groups.items():
        out_f, in_f = shapes[name]
        lam_b, lam_d = parts[VERA_B].float(), parts[VERA_D].float()
        if lam_b.shape != (out_f,) or lam_d.shape != (a_v.shape[0],) or a_v.shape[1] < in_f or b_v.shape[0] < out_f:
            raise UserError(f"{str(path)!r}: layer {name} ({out_f} x {in_f} in the base model) does not fit its VeRA "
                            f"vectors b {tuple(lam_b.shape)}, d {tuple(lam_d.shape)} and projections "
                            f"{tuple(a_v.shape)}, {tuple(b_v.shape)}; is it the base the adapter was trained on?")
        layers[name] = (lam_d[:, None] * a_v[:, :in_f], lam_b[:, None] * b_v[:out_f])
    return AdapterFactors(folder, raw, "vera", a_v.shape[0], 1.0, layers)
