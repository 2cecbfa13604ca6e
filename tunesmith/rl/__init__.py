"""Online reinforcement learning (GRPO, PPO): sampling completions inside training, rewards, losses.

sampling.py draws the completions (batched, with a KV cache shared by each prompt's samples, seeded per
row so a resumed run draws the same ones); the objectives score them and compute the loss.
"""
