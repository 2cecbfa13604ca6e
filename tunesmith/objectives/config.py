"""The `objective:` section of the run configuration: what is learned and each objective's options.

Beside the objectives it configures; tunesmith/config.py puts it in the whole schema. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.objectives.registry import AUTO_BY_FORMAT, OBJECTIVES
from tunesmith.section import Section


class ObjectiveConfig(Section):
    name: str = Field(
        "auto", description=f"What is learned: auto, {', '.join(OBJECTIVES)} (docs/objectives.md: sft learns the "
        "answers of instruction data, causal_lm every token). auto picks by the data format: "
        + ", ".join(f"{fmt} -> {name}" for fmt, name in AUTO_BY_FORMAT.items()) + ".",
    )

    beta: float | None = Field(
        None, ge=0, description="The preference objectives' beta; unset: the objective's default. dpo (0.1): the "
        "pull towards the reference model, the reward of an answer is beta * (log pi(y|x) - log pi_ref(y|x)); "
        "orpo (0.1): lambda, the weight of the odds-ratio term; simpo (2.0): the reward scale; kto (0.1): as dpo, "
        "the reward scale against the reference point z0. grpo (0): the weight of the k3 KL to the reference per "
        "token; 0 skips the reference forward.",
    )
    gamma: float | None = Field(
        None, ge=0, description="simpo: the target reward margin of the paper's Eq. 6 (TRL's simpo_gamma); set it "
        "or gamma_beta_ratio, not both; neither: gamma_beta_ratio 0.5. ppo: the discount of GAE (default 1).",
    )
    gamma_beta_ratio: float | None = Field(
        None, ge=0, description="simpo: the margin as gamma / beta (the SimPO authors' own configs use this scale).",
    )
    loss: Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo (squared loss towards 1/(2 beta)), cdpo (DPO with "
        "label_smoothing as the share of flipped labels), robust (unbiased under flipped labels), hinge (SLiC). "
        "docs/alignment.md has each formula.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo with loss cdpo or robust, and simpo: the assumed share of pairs whose "
        "labels are flipped.",
    )
    reference: Literal["auto", "adapters_off", "precomputed"] = Field(
        "auto", description="dpo's and kto's reference model: adapters_off (the same weights with the method "
        "switched off, one more forward per step, no second copy); precomputed (the base model's log-probabilities "
        "of every answer, computed once before training and kept in output.dir); auto: adapters_off where the "
        "method can be switched off, else precomputed (full, freeze).",
    )
    drift_warning: float = Field(
        5.0, gt=0, description="dpo: warn once when the chosen answers' mean log-probability falls this many nats "
        "below the reference's (likelihood displacement; metrics.jsonl has chosen_logp_drift every step).",
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="kto: w_D, the weight of the loss of answers labelled true (desirable). The paper "
        "advises w_D * n_D / (w_U * n_U) in [1, 4/3] for unbalanced data. docs/alignment.md.",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="kto: w_U, the weight of the loss of answers labelled false (undesirable).",
    )
    reward_center: float = Field(
        0.0, ge=0, description="reward: c of the centring term c * (r_chosen + r_rejected)^2 that keeps the rewards "
        "near zero (TRL's center_rewards_coefficient; Eisenstein et al. suggest 0.01); 0: off.",
    )
    ipo_length_normalise: bool = Field(
        True, description="dpo with loss ipo: divide each answer's log-ratio by its token count first (TRL's "
        "choice); false: summed log-ratios (OpenRLHF's, and the paper read literally). docs/alignment.md.",
    )

    # grpo (docs/rl.md): online RL on the model's own samples, scored by reward functions.
    num_generations: int = Field(8, ge=1, description="grpo: G, completions sampled per prompt; the advantages are "
                                 "normalised within each prompt's group (at least 2). ppo: samples per prompt.")
    rewards: list[str | dict[str, Any]] = Field(
        default_factory=list, description="grpo: the reward functions, each a built-in (exact_match, valid_json, "
        "field_accuracy, regex_format, length), a module:function on the Python path with TRL's signature "
        "f(prompts, completions, **columns) -> list[float], or {name, weight, options} (options: keyword arguments, "
        "e.g. a regex_format pattern). The reward is the weighted sum.",
    )
    max_new_tokens: int = Field(64, ge=1, description="grpo: the longest completion sampled; longer ones are cut "
                                "(counted as truncated).")
    temperature: float = Field(1.0, ge=0, description="grpo: sampling temperature (0: greedy, every sample alike).")
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling, keep the most likely tokens up to this "
                         "mass; 1: off.")
    top_k: int = Field(0, ge=0, description="grpo: sample among the k most likely tokens; 0: off.")
    fold_adapters: bool | None = Field(
        None, description="grpo and ppo: sample with each adapter's update folded into a temporary copy of its "
        "weight, W0 + dW (one matmul per layer instead of three; costs one copy of the adapted weights while "
        "sampling; on an AMD CPU the folded model's fp32 linears then run through oneDNN, models/cpu_linear.py); "
        "null: on when the model is on the CPU. Quantized (QLoRA) and sharded (FSDP) weights are never folded. "
        "docs/rl.md.",
    )
    epsilon_low: float = Field(0.2, ge=0, lt=1, description="grpo: the importance ratio is clipped below at "
                               "1 - epsilon_low.")
    epsilon_high: float = Field(0.2, ge=0, description="grpo: ... and above at 1 + epsilon_high (DAPO's clip-higher "
                                "uses 0.28).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="grpo: how token losses are averaged: grpo (per sequence, then over sequences), bnpo (per "
        "token in each micro-batch), dr_grpo (sum / (sequences * max_new_tokens)), dapo (per token over the step's "
        "whole batch; TRL's default).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide advantages by the std of the group's rewards, of the batch's, or none "
        "(Dr. GRPO).",
    )
    num_iterations: int = Field(1, ge=1, description="grpo: optimizer steps per rollout; the steps after the first "
                                "reuse its samples with the sampling policy's log-probabilities as the old ones.")
    kl_every: int = Field(0, ge=0, description="grpo: log the KL to the reference every N steps even with beta 0 (one "
                          "more forward then); 0: only when beta > 0.")
    dynamic_sampling: bool = Field(False, description="grpo: draw flat groups (every completion rewarded alike, no "
                                   "signal) again with new seeds, up to 3 times (DAPO's dynamic sampling).")
    # ppo (docs/rl.md, "PPO"): the sampling options and epsilon_low/high above apply too.
    reward_model: str | None = Field(None, description="ppo (and grpo): a reward model folder (output.dir/reward_model "
                                     "of an objective.name=reward run) whose score is a reward, as tunesmith score "
                                     "computes it; logged as reward_reward_model.")
    reward_model_weight: float = Field(1.0, description="ppo and grpo: the weight of objective.reward_model's score in "
                                       "the reward, beside objective.rewards' weights.")
    kl_coef: float = Field(0.05, ge=0, description="ppo: the per-token KL penalty -kl_coef * (log pi - log ref) in the "
                           "reward (TRL's init_kl_coef).")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: lambda of GAE.")
    ppo_epochs: int = Field(4, ge=1, description="ppo: passes over each rollout; a rollout serves ppo_epochs * "
                            "num_minibatches optimizer steps.")
    num_minibatches: int = Field(1, ge=1, description="ppo: minibatches a rollout is cut into per pass (one "
                                 "optimizer step each).")
    vf_coef: float = Field(0.1, ge=0, description="ppo: the weight of the value loss.")
    cliprange_value: float = Field(0.2, gt=0, description="ppo: new values are clipped to old +- this in the value loss.")
    whiten_rewards: bool = Field(False, description="ppo: whiten the per-token rewards (keeping their mean) before GAE.")
    value_init: Literal["normal", "reward_model"] = Field(
        "normal", description="ppo: the value head starts as N(0, initializer_range) or as the reward model's score "
        "head (the same base model required).")

    @field_validator("rewards")
    @classmethod
    def _rewards_are_specs(cls, specs: list) -> list:
        from tunesmith.rl.rewards import parse_spec

        for spec in specs:
            parse_spec(spec)
        return specs

    @model_validator(mode="after")
    def _grpo_options(self) -> "ObjectiveConfig":
        if self.name == "grpo" and self.num_generations < 2:
            raise ValueError("objective.num_generations must be >= 2 for grpo (advantages compare a prompt's samples)")
        if self.name == "grpo" and not self.rewards and not self.reward_model:
            raise ValueError("objective.name=grpo needs objective.rewards (e.g. [field_accuracy] or "
                             "[my_module:my_reward]) or objective.reward_model (output.dir/reward_model of a reward "
                             "run), or both")
        if self.beta == 0 and self.name != "grpo":
            raise ValueError(f"objective.beta must be > 0 for {self.name} (0 is grpo's: no KL term)")
        return self

    @model_validator(mode="after")
    def _smoothing_fits_loss(self) -> "ObjectiveConfig":
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise ValueError("objective.gamma and objective.gamma_beta_ratio set the same margin; set one of them")
        if self.label_smoothing and self.name == "dpo" and self.loss not in ("cdpo", "robust"):
            raise ValueError(f"objective.label_smoothing applies to loss cdpo or robust, not to {self.loss}")
        return self

    @field_validator("name")
    @classmethod
    def _known_objective(cls, name: str) -> str:
        if name != "auto" and name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; known: auto, {', '.join(OBJECTIVES)}")
        return name
