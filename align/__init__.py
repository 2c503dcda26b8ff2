"""align: SFT -> reward model -> PPO RLHF for causal LMs, after the Qwen recipe."""

__version__ = "0.1.0"
