"""Hugging Face Trainer glue for the stages built on it (SFT, RM): our Trainer mixin, callbacks
and the mapping of `train.*` onto TrainingArguments."""
